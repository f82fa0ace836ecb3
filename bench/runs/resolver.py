"""
Resolver scaling: what choosing a shard costs as a service grows.

``ShardResolver.resolve`` is timed in this process at 3, 100, 1,000 and
10,000 shards, on a resolver built from a generated configuration as the
proxy builds it (``shardtcp.config.load_config``, then the public
``ShardResolver(config, clock=...)``), in CPU microseconds per call
(``time.process_time``).  At the largest size the run also times the three
commands an operator runs: ``twistd -n shardtcp`` until it listens,
``shardtcp check-config`` and ``shardtcp explain``, with their CPU time;
and what connections to that service cost and do to an open connection of
another service on the same proxy.  The package is byte-compiled first,
as an installed one is (``compile_package``).

What the resolver costs a connection (``cycle_cost``) is measured at 1, 3
and 100 shards as one cycle of what the connection path asks of it:
``resolve``, ``lease`` on the first candidate, ``record_connect_result``
with a connect time, then ``release``, on a clock that moves 13 ms per
cycle; once with each connection closed before the next one, and once
with five held open.  Per cycle: CPU µs, Python calls (``cProfile``)
and, where ``valgrind`` is installed, instructions (``callgrind``, the
difference between two counts of cycles, so that start-up cancels out).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import threading
import time

from bench import clients, measure, targets
from bench.clients import percentile
from bench.lab import REPO_ROOT, SERVICE_NAME, BenchError, Lab, bin_path, free_port, recv_exact, say
from bench.report import fmt, table

SIZES = (3, 100, 1000, 10000)
CYCLE_SIZES = (1, 3, 100)
CYCLE_HELD = (0, 5)
CLIENT = "198.51.100.7"
BUDGET = 2.0  # seconds of timing per size, at most a few times over


def _many_shards_config(lab: Lab, listeners: list, shards: int, echo=None) -> str:
    """
    ``targets.shardtcp_config`` with the service's shards as one inline
    array (the same records in TOML), so that 10,000 of them stay under
    the configuration file's 1 MiB limit.
    """
    text = targets.shardtcp_config(lab, listeners, [], echo=echo)
    records = ",".join(
        f'{{id="{s.id}",address="{s.address}",location={{lat={s.lat},lon={s.lon}}},capacity=100000}}'
        for s in targets.many_shards(shards)
    )
    head = f'[service.api]\nnames = ["{SERVICE_NAME}"]\n'
    if head not in text:
        raise BenchError("the generated configuration no longer starts its service as expected")
    return text.replace(head, head + f"shard = [{records}]\n", 1)


def _config_text(lab: Lab, shards: int, port: int) -> str:
    return _many_shards_config(lab, [targets.listener("edge", port, "passthrough")], shards)


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


def cycles(config_path: str, count: int, held: int = 0):
    """
    A resolver over ``config_path`` and a function running ``count``
    connection cycles (see the module docstring) with ``held`` leases
    kept open.
    """
    import random

    from twisted.internet.task import Clock

    from shardtcp.config import load_config
    from shardtcp.model import ConnectionRequest
    from shardtcp.resolver import ShardResolver

    clock = Clock()
    clock.advance(1.8e9)
    resolver = ShardResolver(load_config(config_path), clock=clock, random=random.Random(1))
    request = ConnectionRequest(service_id="api", client=(CLIENT, 51515), destination=("127.0.0.1", 8443),
                                sni=SERVICE_NAME, alpn=(), listener="edge")
    open_leases: list = []

    def run() -> None:
        for _ in range(count):
            shard_id = resolver.resolve(request, 2)[0].shard.shard_id
            lease = resolver.lease(shard_id)
            clock.advance(0.003)
            resolver.record_connect_result(shard_id, True, 0.0011)
            clock.advance(0.01)
            open_leases.append(lease)
            if len(open_leases) > held:
                open_leases.pop(0).release()

    return run


def _cycle_instructions(path: str, counts: tuple[int, int]) -> float:
    """Instructions per cycle under callgrind: two counts of cycles, their difference."""
    totals = []
    for count in counts:
        out = path + f".{count}.callgrind"
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench.runs.resolver import cycles; "
                "cycles(sys.argv[2], int(sys.argv[3]))()")
        try:
            done = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                 sys.executable, "-c", code, REPO_ROOT, path, str(count)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=900,
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"callgrind over {count} cycles took more than 900 s") from e
        if done.returncode != 0:
            raise BenchError(f"callgrind over {count} cycles exited with {done.returncode}: "
                             f"{done.stderr[-2000:].decode('utf-8', 'replace')}")
        total = 0
        with open(out, errors="replace") as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        if not total:
            raise BenchError(f"callgrind counted nothing over {count} cycles")
        totals.append(total)
    return (totals[1] - totals[0]) / (counts[1] - counts[0])


def cycle_cost(lab: Lab, shards: int, quick: bool) -> dict:
    """What a connection's calls into the resolver cost at ``shards`` shards."""
    import cProfile
    import pstats

    path = lab.path(f"cycle-{shards}.toml")
    with open(path, "w") as f:
        f.write(_config_text(lab, shards, 1))
    result: dict = {}
    for held in CYCLE_HELD:
        count = 2000 if quick else 5000
        run = cycles(path, count, held)
        run()  # warm-up: every bucket and ordering built
        best = float("inf")
        for _ in range(2 if quick else 3):
            t0 = time.process_time()
            run()
            best = min(best, (time.process_time() - t0) / count)
        profile = cProfile.Profile()
        profile.enable()
        run()
        profile.disable()
        result[held] = {"us_per_cycle": best * 1e6,
                        "calls_per_cycle": pstats.Stats(profile).total_calls / count}
    if shutil.which("valgrind"):
        result["instructions_per_cycle"] = _cycle_instructions(path, (100, 600) if quick else (200, 1200))
    return result


# A small service beside the large one, whose shards do not listen either:
# what a refused connection costs when the service is small.
FEW_NAME = "few"
FEW_PREAMBLE = f"SHARD {FEW_NAME}\n".encode()


def _few_service() -> str:
    records = ",".join(
        f'{{id="few-{i}",address="127.4.0.{i + 1}:9",location={{lat=50,lon=8}},capacity=100000}}' for i in range(3)
    )
    return f'\n[service.few]\nnames = ["{FEW_NAME}"]\nshard = [{records}]\n'


def large_service(lab: Lab, target: targets.Target, count: int, seconds: float, rounds: int = 4) -> dict:
    """
    What connections to the 10,000-shard service cost, and what they do to
    an open connection of another service, against the same for a 3-shard
    service: 64-byte echoes through that connection, 10 ms apart, idle,
    then while connections to the large service are made one after another
    (at least ``count``, for at least ``seconds``), then the same with the
    3-shard service; ``rounds`` times in turn, each kind's samples pooled,
    so that the machine's slower and faster moments fall on all three.  No
    shard of either listens, so each such connection ends when its
    attempts are refused (the proxy then answers with its refusal line and
    closes): the two differ only in the service's size.
    """
    payload = b"x" * 64

    def rtt(sock) -> float:
        t0 = time.perf_counter()
        sock.sendall(payload)
        recv_exact(sock, len(payload))
        return (time.perf_counter() - t0) * 1000

    def opener(preamble: bytes, latencies: list, failures: list) -> None:
        until = time.monotonic() + seconds
        while len(latencies) < count or time.monotonic() < until:
            if len(latencies) >= 100_000:
                break
            t0 = time.perf_counter()
            try:
                with clients.connect(target.port, None, preamble) as sock:
                    sock.settimeout(30.0)
                    # The proxy answers with its refusal line, then closes.
                    for _ in range(64):
                        if not sock.recv(1024):
                            break
            except ConnectionResetError:
                pass  # how the proxy may drop a connection none of whose shards answered
            except OSError as e:
                failures.append(f"{type(e).__name__}: {e}")
            latencies.append((time.perf_counter() - t0) * 1000)

    def idle_phase(echo, pooled: dict) -> None:
        until = time.monotonic() + seconds
        while len(pooled["echo"]) < 50 * (pooled["rounds"] + 1) or time.monotonic() < until:
            pooled["echo"].append(rtt(echo))
            time.sleep(0.01)
        pooled["rounds"] += 1

    def meanwhile(echo, preamble: bytes, pooled: dict) -> None:
        latencies: list[float] = []
        failures: list[str] = []
        before = measure.cpu(target.pid)
        thread = threading.Thread(target=opener, args=(preamble, latencies, failures), daemon=True)
        thread.start()
        busy = []
        deadline = time.monotonic() + 60.0 * count + seconds
        for _ in range(100_000):
            if not thread.is_alive() or time.monotonic() > deadline:
                break
            busy.append(rtt(echo))
            time.sleep(0.01)
        thread.join(timeout=60.0)
        used = measure.cpu(target.pid) - before
        made = len(latencies)
        if thread.is_alive() or failures or made < count or not busy:
            raise BenchError(f"connections to the service of {preamble!r}: {made} of at least {count} ended"
                             + (f", first failure: {failures[0]}" if failures else ""))
        pooled["echo"] += busy
        pooled["latency"] += latencies
        pooled["cpu_s"] += used.total

    def summary(pooled: dict) -> dict:
        busy, latencies = sorted(pooled["echo"]), sorted(pooled["latency"])
        made = len(latencies)
        return {"connections": made, "cpu_ms_per_connection": pooled["cpu_s"] * 1000 / made,
                "latency_ms_p50": percentile(latencies, 50), "latency_ms_max": latencies[-1],
                "echo_ms_p50": percentile(busy, 50), "echo_ms_p99": percentile(busy, 99),
                "echo_ms_max": busy[-1], "echo_samples": len(busy)}

    idle = {"echo": [], "rounds": 0}
    large = {"echo": [], "latency": [], "cpu_s": 0.0}
    small = {"echo": [], "latency": [], "cpu_s": 0.0}
    try:
        with clients.connect(target.port, None, targets.ECHO_PREAMBLE) as echo:
            echo.sendall(clients.OP.pack(b"E", 0))
            for _ in range(rounds):
                # As long idle as busy: the figures compared are of as many samples.
                idle_phase(echo, idle)
                meanwhile(echo, targets.PLAIN_PREAMBLE, large)
                meanwhile(echo, FEW_PREAMBLE, small)
    except (OSError, EOFError) as e:
        raise BenchError(f"echo through the small service next to the 10,000-shard one: {e}") from e
    lab.alive("shardtcp", target.process)
    quiet = sorted(idle["echo"])
    large_figures = summary(large)
    return {
        **{key: value for key, value in large_figures.items() if not key.startswith("echo_")},
        "echo_idle_ms_p50": percentile(quiet, 50), "echo_idle_ms_p99": percentile(quiet, 99),
        "echo_idle_ms_max": quiet[-1],
        "echo_busy_ms_p50": large_figures["echo_ms_p50"], "echo_busy_ms_p99": large_figures["echo_ms_p99"],
        "echo_busy_ms_max": large_figures["echo_ms_max"], "echo_busy_samples": large_figures["echo_samples"],
        "rounds": rounds,
        "few": summary(small),
    }


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


def compile_package() -> None:
    """
    Byte-compile the ``shardtcp`` package, as installing it does, so that
    the timed commands do not also compile their modules from source (with
    ``PYTHONDONTWRITEBYTECODE`` set, an editable install would, on every
    run: about 0.2 s of CPU).
    """
    import compileall

    import shardtcp

    if not compileall.compile_dir(os.path.dirname(shardtcp.__file__), quiet=1):
        raise BenchError("the shardtcp package does not byte-compile")


def run(lab: Lab, settings: dict) -> dict:
    results: dict = {"resolve": {}, "cycle": {}}
    for shards in SIZES:
        results["resolve"][shards] = resolve_cost(lab, shards, settings["quick"])
        say(f"resolve at {shards} shards: {results['resolve'][shards]['us_per_call']:.1f} µs")
    for shards in CYCLE_SIZES:
        cycle = results["cycle"][shards] = cycle_cost(lab, shards, settings["quick"])
        say(f"connection cycle at {shards} shards: {cycle[0]['us_per_cycle']:.1f} µs, "
            f"{cycle[0]['calls_per_cycle']:.0f} Python calls")
    compile_package()
    shards = SIZES[-1]
    backend = targets.start_backend(lab, "backend-echo", tls=False)
    port = free_port()
    text = _many_shards_config(lab, [targets.listener("plain", port, "plain")], shards,
                               echo=f"127.0.0.1:{backend.port}") + _few_service()
    target, seconds = targets.start_shardtcp(lab, f"shardtcp-{shards}", text, port, timeout=120.0)
    results["startup"] = {"seconds": seconds, "cpu_s": measure.cpu(target.pid).total}
    results["large_service"] = large_service(lab, target, 4 if settings["quick"] else 10,
                                            0.5 if settings["quick"] else 1.5, 1 if settings["quick"] else 4)
    lab.stop(target.process)
    lab.stop(backend.process)
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
    if r.get("cycle"):
        rows = []
        for n, v in r["cycle"].items():
            rows.append([f"{n:,} shards", fmt(v[0]["us_per_cycle"], ".1f"), fmt(v[0]["calls_per_cycle"], ".0f"),
                         fmt(v.get("instructions_per_cycle"), ",.0f"),
                         fmt(v[5]["us_per_cycle"], ".1f"), fmt(v[5]["calls_per_cycle"], ".0f")])
        out += "\n\n" + table(
            "Resolver per connection: resolve + lease + connect result + release",
            ["", "µs", "Python calls", "instructions", "µs, 5 open", "calls, 5 open"], rows)
    rows = [
        ["twistd -n shardtcp until listening", fmt(r["startup"]["seconds"], ".2f"), fmt(r["startup"]["cpu_s"], ".2f")],
        ["shardtcp check-config", fmt(r["check_config"]["seconds"], ".2f"), fmt(r["check_config"]["cpu_s"], ".2f")],
        ["shardtcp explain", fmt(r["explain"]["seconds"], ".2f"), fmt(r["explain"]["cpu_s"], ".2f")],
    ]
    out += "\n\n" + table(f"Commands at {r['shards']:,} shards", ["", "seconds", "CPU seconds"], rows)
    g = r["large_service"]
    few = g["few"]
    rows = [
        ["proxy CPU ms per connection to it", fmt(g["cpu_ms_per_connection"], ".2f"), "", "",
         fmt(few["cpu_ms_per_connection"], ".2f"), "", ""],
        ["its connections' latency ms (accept to close)", fmt(g["latency_ms_p50"], ".2f"), "",
         fmt(g["latency_ms_max"], ".2f"), fmt(few["latency_ms_p50"], ".2f"), "", fmt(few["latency_ms_max"], ".2f")],
        ["another service's echo ms, meanwhile", fmt(g["echo_busy_ms_p50"], ".2f"), fmt(g["echo_busy_ms_p99"], ".2f"),
         fmt(g["echo_busy_ms_max"], ".2f"), fmt(few["echo_ms_p50"], ".2f"), fmt(few["echo_ms_p99"], ".2f"),
         fmt(few["echo_ms_max"], ".2f")],
        ["another service's echo ms, idle", fmt(g["echo_idle_ms_p50"], ".2f"), fmt(g["echo_idle_ms_p99"], ".2f"),
         fmt(g["echo_idle_ms_max"], ".2f"), "", "", ""],
        ["connections made / echoes meanwhile", f"{g['connections']:,}", f"{g['echo_busy_samples']}", "",
         f"{few['connections']:,}", f"{few['echo_samples']}", ""],
    ]
    return out + "\n\n" + table(
        f"Refused connections to a {r['shards']:,}-shard service, then to a 3-shard one, one after another, "
        f"beside an open connection of a third service ({g.get('rounds', 1)} rounds in turn, pooled)",
        ["", f"{r['shards']:,}: p50", "p99", "max", "3: p50", "p99", "max"], rows)
