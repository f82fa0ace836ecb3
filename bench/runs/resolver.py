"""
Resolver scaling: what choosing a shard costs as a service grows.

``ShardResolver.resolve`` is timed in this process at 3, 100, 1,000 and
10,000 shards, on a resolver built from a generated configuration as the
proxy builds it (``shardtcp.config.load_config``, then the public
``ShardResolver(config, clock=...)``), in CPU microseconds per call
(``time.process_time``).  At the largest size the run also times the three
commands an operator runs: ``twistd -n shardtcp`` until it listens,
``shardtcp check-config`` and ``shardtcp explain``, with their CPU time.
"""

from __future__ import annotations

import resource
import subprocess
import time

from bench import measure, targets
from bench.lab import SERVICE_NAME, BenchError, Lab, bin_path, free_port, say
from bench.report import fmt, table

SIZES = (3, 100, 1000, 10000)
CLIENT = "198.51.100.7"
BUDGET = 2.0  # seconds of timing per size, at most a few times over


def _config_text(lab: Lab, shards: int, port: int) -> str:
    return targets.shardtcp_config(lab, [targets.listener("edge", port, "passthrough")], targets.many_shards(shards))


def resolve_cost(lab: Lab, shards: int, quick: bool) -> dict:
    from twisted.internet.task import Clock

    from shardtcp.config import load_config
    from shardtcp.model import ConnectionRequest
    from shardtcp.resolver import ShardResolver

    path = lab.path(f"resolver-{shards}.toml")
    with open(path, "w") as f:
        f.write(_config_text(lab, shards, 1))
    clock = Clock()
    clock.advance(time.time())
    resolver = ShardResolver(load_config(path), clock=clock)
    request = ConnectionRequest(service_id="api", client=(CLIENT, 51515), destination=("127.0.0.1", 8443),
                                sni=SERVICE_NAME, alpn=(), listener="edge")
    candidates = resolver.resolve(request)
    if not candidates:
        raise BenchError(f"resolve at {shards} shards chose no shard")
    # Batches that double until one takes 0.2 s (bounded), then the best of a few.
    number = 1
    for _ in range(30):
        t0 = time.process_time()
        for _ in range(number):
            resolver.resolve(request)
        if time.process_time() - t0 >= 0.2 or number >= 1 << 20:
            break
        number *= 2
    best = float("inf")
    for _ in range(2 if quick else 3):
        t0 = time.process_time()
        for _ in range(number):
            resolver.resolve(request)
        best = min(best, (time.process_time() - t0) / number)
    return {"us_per_call": best * 1e6, "calls_per_batch": number, "candidates": len(candidates)}


def _command(argv: list, timeout: float) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{' '.join(argv[:2])} took more than {timeout:.0f}s") from e
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {done.returncode}: "
                         f"{(done.stderr or done.stdout)[-2000:].decode('utf-8', 'replace')}")
    return {"seconds": seconds, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def run(lab: Lab, settings: dict) -> dict:
    results: dict = {"resolve": {}}
    for shards in SIZES:
        results["resolve"][shards] = resolve_cost(lab, shards, settings["quick"])
        say(f"resolve at {shards} shards: {results['resolve'][shards]['us_per_call']:.1f} µs")
    shards = SIZES[-1]
    port = free_port()
    text = _config_text(lab, shards, port)
    target, seconds = targets.start_shardtcp(lab, f"shardtcp-{shards}", text, port, timeout=120.0)
    results["startup"] = {"seconds": seconds, "cpu_s": measure.cpu(target.pid).total}
    lab.stop(target.process)
    config = lab.path(f"shardtcp-{shards}.toml")
    shardtcp = bin_path("shardtcp")
    results["check_config"] = _command([shardtcp, "check-config", config], 120.0)
    results["explain"] = _command([shardtcp, "explain", "--config", config, "--service", "api",
                                   "--client", CLIENT, "--sni", SERVICE_NAME], 120.0)
    results["shards"] = shards
    say(f"at {shards} shards: start-up {results['startup']['seconds']:.2f} s, "
        f"check-config {results['check_config']['seconds']:.2f} s, explain {results['explain']['seconds']:.2f} s")
    return results


def report(r: dict) -> str:
    rows = [[f"{n:,} shards", fmt(v["us_per_call"], ".1f"), fmt(v["us_per_call"] / n, ".2f")]
            for n, v in r["resolve"].items()]
    out = table("Resolver: ShardResolver.resolve, one service, CPU per call",
                ["", "µs per call", "µs per shard"], rows)
    rows = [
        ["twistd -n shardtcp until listening", fmt(r["startup"]["seconds"], ".2f"), fmt(r["startup"]["cpu_s"], ".2f")],
        ["shardtcp check-config", fmt(r["check_config"]["seconds"], ".2f"), fmt(r["check_config"]["cpu_s"], ".2f")],
        ["shardtcp explain", fmt(r["explain"]["seconds"], ".2f"), fmt(r["explain"]["cpu_s"], ".2f")],
    ]
    return out + "\n\n" + table(f"Commands at {r['shards']:,} shards", ["", "seconds", "CPU seconds"], rows)
