"""
Choosing by shard key: what routing by key costs at 100 and 10,000 shards.

Three figures per size, in CPU microseconds per call
(``time.process_time``, batches doubled until one takes 0.2 s, best of a
few): the whole ``ShardResolver.resolve`` of a service with ``shard_key =
"sni-label"`` (ranking, then the ownership step, no draw), over 1,000
distinct keys in turn, on a resolver built from a generated configuration
with the public ``load_config`` and ``ShardResolver``; the same service
without a shard key (ranking and the draw), for comparison in the same
run; and the ownership step alone, ``shardtcp.resolver.ownership.chain``
over the same shards.  The run also
checks what it measures: every key resolved lands on the owner
``ownership.owner_order`` names, or the bench fails.
"""

from __future__ import annotations

import time

from bench import targets
from bench.lab import BenchError, Lab, say
from bench.report import fmt, table

SIZES = (100, 10000)
KEYS = 1000
CLIENT = "198.51.100.7"


def _config_text(lab: Lab, shards: int, keyed: bool = True) -> str:
    """
    The resolver run's generated configuration, keyed by ``sni-label``, its
    shards without location, capacity and score (equal shards: ownership
    reads only ids and weights), which keeps 10,000 of them under the
    configuration file's 1 MiB bound.
    """
    text = targets.shardtcp_config(lab, [targets.listener("edge", 1, "passthrough")], targets.many_shards(shards))
    if "[service.api]\n" not in text:
        raise BenchError("the generated configuration has no [service.api] table to key")
    if keyed:
        text = text.replace("[service.api]\n", '[service.api]\nshard_key = "sni-label"\n', 1)
    shard_tables = text.split("[[service.api.shard]]")
    for i in range(1, len(shard_tables)):
        shard_tables[i] = "\n".join(
            line for line in shard_tables[i].split("\n")
            if not line.startswith(("location = ", "capacity = ", "security_score = "))
        )
    return "[[service.api.shard]]".join(shard_tables)


def _time(call, quick: bool) -> tuple[float, int]:
    """CPU seconds per call of ``call(i)``, and the batch size used."""
    number = 1
    for _ in range(30):
        t0 = time.process_time()
        for i in range(number):
            call(i)
        if time.process_time() - t0 >= 0.2 or number >= 1 << 20:
            break
        number *= 2
    best = float("inf")
    for _ in range(2 if quick else 3):
        t0 = time.process_time()
        for i in range(number):
            call(i)
        best = min(best, (time.process_time() - t0) / number)
    return best, number


def key_cost(lab: Lab, shards: int, quick: bool) -> dict:
    from twisted.internet.task import Clock

    from shardtcp.config import load_config
    from shardtcp.model import ConnectionRequest
    from shardtcp.resolver import ShardResolver
    from shardtcp.resolver.ownership import Shard, chain, owner_order

    path = lab.path(f"shardkey-{shards}.toml")
    with open(path, "w") as f:
        f.write(_config_text(lab, shards))
    clock = Clock()
    clock.advance(time.time())
    config = load_config(path)
    resolver = ShardResolver(config, clock=clock)
    requests = [
        ConnectionRequest(service_id="api", client=(CLIENT, 51515), destination=("127.0.0.1", 8443),
                          sni=f"tenant{i}.api.example.test", listener="edge", shard_key=f"tenant{i}")
        for i in range(KEYS)
    ]
    members = [Shard(s.id, s.weight) for s in config.services[0].shards]
    for request in requests[:20]:
        chosen = resolver.resolve(request)[0].shard.shard_id
        expected = owner_order(request.shard_key, members)[0].shard_id
        if chosen != expected:
            raise BenchError(f"key {request.shard_key!r} went to {chosen}, its owner is {expected}")
    resolve, resolve_batch = _time(lambda i: resolver.resolve(requests[i % KEYS]), quick)
    plain_path = lab.path(f"shardkey-{shards}-none.toml")
    with open(plain_path, "w") as f:
        f.write(_config_text(lab, shards, keyed=False))
    plain = ShardResolver(load_config(plain_path), clock=clock)
    if plain.service_config("api").shard_key != "none" or not plain.resolve(requests[0]):
        raise BenchError("the comparison service without a shard key did not resolve")
    unkeyed, _ = _time(lambda i: plain.resolve(requests[i % KEYS]), quick)
    own, own_batch = _time(lambda i: chain(f"tenant{i % KEYS}", members), quick)
    return {
        "resolve_us_per_call": resolve * 1e6, "resolve_batch": resolve_batch,
        "unkeyed_us_per_call": unkeyed * 1e6,
        "ownership_us_per_call": own * 1e6, "ownership_batch": own_batch,
    }


def run(lab: Lab, settings: dict) -> dict:
    results: dict = {"by_key": {}}
    for shards in SIZES:
        figures = key_cost(lab, shards, settings["quick"])
        results["by_key"][shards] = figures
        say(f"by key at {shards} shards: resolve {figures['resolve_us_per_call']:.1f} µs "
            f"(without a key {figures['unkeyed_us_per_call']:.1f} µs), "
            f"ownership step {figures['ownership_us_per_call']:.1f} µs")
    return results


def report(r: dict) -> str:
    rows = [
        [f"{n:,} shards", fmt(v["resolve_us_per_call"], ".1f"), fmt(v["unkeyed_us_per_call"], ".1f"),
         fmt(v["ownership_us_per_call"], ".1f"),
         fmt(v["ownership_us_per_call"] / n, ".2f")]
        for n, v in r["by_key"].items()
    ]
    return table("Shard key: ShardResolver.resolve by key and the ownership step alone, CPU per call",
                 ["", "resolve by key µs", "resolve, no key µs", "ownership µs", "ownership µs per shard"], rows)
