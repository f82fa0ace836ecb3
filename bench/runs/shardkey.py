"""
Choosing by shard key: what routing by key costs at 100 and 10,000 shards.

Figures per size, in CPU microseconds per call (``time.process_time``,
batches doubled until one takes 0.2 s, best of a few), each the whole
``ShardResolver.resolve`` of a service with ``shard_key = "sni-label"``,
on a resolver built from a generated configuration with the public
``load_config`` and ``ShardResolver``:

* keys repeated: 1,000 distinct keys in turn, each one's owners kept
  (``shardtcp.resolver.ownercache``) after its first call;
* every key new: 4 x ``ownercache.KEYS_KEPT`` distinct keys in turn, so
  that no key is still kept when it comes back (least recently used
  dropped first), each call working its owners out over every shard;
* the same service without a shard key (ranking and the draw), for
  comparison in the same run;
* ``ownership.chain`` over every shard, the reference ``explain`` runs.

Both keyed figures are judged against the resolver goals of issue 10
(20 µs at 100 shards, 200 µs at 10,000).  The run also checks what it
measures: keys resolved, kept or new, land on the owner
``ownership.owner_order`` names, or the bench fails.
"""

from __future__ import annotations

import itertools
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


def _requests(keys) -> list:
    from shardtcp.model import ConnectionRequest

    return [
        ConnectionRequest(service_id="api", client=(CLIENT, 51515), destination=("127.0.0.1", 8443),
                          sni=f"{key}.api.example.test", listener="edge", shard_key=key)
        for key in keys
    ]


def _check(resolver, requests, members) -> None:
    from shardtcp.resolver.ownership import owner_order

    for request in requests:
        chosen = resolver.resolve(request)[0].shard.shard_id
        expected = owner_order(request.shard_key, members)[0].shard_id
        if chosen != expected:
            raise BenchError(f"key {request.shard_key!r} went to {chosen}, its owner is {expected}")


def key_cost(lab: Lab, shards: int, quick: bool) -> dict:
    from twisted.internet.task import Clock

    from shardtcp.config import load_config
    from shardtcp.resolver import ShardResolver
    from shardtcp.resolver.ownercache import KEYS_KEPT
    from shardtcp.resolver.ownership import Shard, chain

    path = lab.path(f"shardkey-{shards}.toml")
    with open(path, "w") as f:
        f.write(_config_text(lab, shards))
    clock = Clock()
    clock.advance(time.time())
    config = load_config(path)
    members = [Shard(s.id, s.weight) for s in config.services[0].shards]

    kept = ShardResolver(config, clock=clock)
    repeated = _requests(f"tenant{i}" for i in range(KEYS))
    _check(kept, repeated[:20], members)
    _check(kept, repeated[:20], members)  # now from the kept owners
    hit, hit_batch = _time(lambda i: kept.resolve(repeated[i % KEYS]), quick)
    if kept.owner_cache("api").misses != KEYS:
        raise BenchError("the repeated keys were not all kept after their first call")

    new = ShardResolver(config, clock=clock)
    fresh = _requests(f"new{i}" for i in range(4 * KEYS_KEPT))
    _check(new, _requests(f"check{i}" for i in range(20)), members)
    # A running count, not the batch's: batches must not repeat keys.
    turn = itertools.count()
    miss, miss_batch = _time(lambda i: new.resolve(fresh[next(turn) % len(fresh)]), quick)
    cache = new.owner_cache("api")
    if cache is None or cache.hits:
        raise BenchError(f"{cache.hits} of the new keys were found kept: the figure is not of new keys")

    plain_path = lab.path(f"shardkey-{shards}-none.toml")
    with open(plain_path, "w") as f:
        f.write(_config_text(lab, shards, keyed=False))
    plain = ShardResolver(load_config(plain_path), clock=clock)
    if plain.service_config("api").shard_key != "none" or not plain.resolve(repeated[0]):
        raise BenchError("the comparison service without a shard key did not resolve")
    unkeyed, _ = _time(lambda i: plain.resolve(repeated[i % KEYS]), quick)
    reference, reference_batch = _time(lambda i: chain(f"tenant{i % KEYS}", members), True)
    return {
        "hit_us_per_call": hit * 1e6, "hit_batch": hit_batch,
        "miss_us_per_call": miss * 1e6, "miss_batch": miss_batch,
        "unkeyed_us_per_call": unkeyed * 1e6,
        "reference_us_per_call": reference * 1e6, "reference_batch": reference_batch,
    }


#: The resolver goals of issue 10, µs per call, by number of shards.
GOALS = {100: 20.0, 10000: 200.0}


def verdict(figure: float, goal: float) -> str:
    """``met``, or by how much the figure misses the goal."""
    return "met" if figure <= goal else f"missed by {figure / goal:.2f}x"


def run(lab: Lab, settings: dict) -> dict:
    results: dict = {"by_key": {}}
    for shards in SIZES:
        figures = key_cost(lab, shards, settings["quick"])
        results["by_key"][shards] = figures
        say(f"by key at {shards} shards: keys repeated {figures['hit_us_per_call']:.1f} µs, "
            f"every key new {figures['miss_us_per_call']:.1f} µs "
            f"(without a key {figures['unkeyed_us_per_call']:.1f} µs, "
            f"reference chain {figures['reference_us_per_call']:.1f} µs)")
    return results


def report(r: dict) -> str:
    rows = []
    for n, v in r["by_key"].items():
        n = int(n)
        goal = GOALS.get(n)
        rows.append([
            f"{n:,} shards", fmt(v["hit_us_per_call"], ".1f"), fmt(v["miss_us_per_call"], ".1f"),
            fmt(v["unkeyed_us_per_call"], ".1f"), fmt(v["reference_us_per_call"], ".1f"),
            fmt(goal, ".0f"),
            "-" if goal is None else
            f"{verdict(v['hit_us_per_call'], goal)} / {verdict(v['miss_us_per_call'], goal)}",
        ])
    return table("Shard key: ShardResolver.resolve by key, CPU per call",
                 ["", "keys repeated µs", "every key new µs", "no key µs", "reference chain µs",
                  "goal µs", "repeated / new"], rows)
