"""
Tests for shardtcp.resolver.ownercache, the eligible totals of
shardtcp.resolver.shortlist and the resolver's keyed path built on them:
the kept and worked-out owner orders equal ``ownership.owner_order``, and
``resolve`` by key equals the reference chain ``explain`` shows, through
random eligibility, load and weight changes.
"""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.model import (
    Address,
    Config,
    ConnectionRequest,
    Health,
    ProxyConfig,
    ServiceConfig,
    ShardConfig,
    SigningConfig,
)
from shardtcp.resolver import ownercache, ownership, ranking, shortlist
from shardtcp.resolver.ownercache import OwnerCache
from shardtcp.resolver.ownership import Shard, owner_order
from shardtcp.resolver.service import NoShardAvailable, ShardResolver
from shardtcp.resolver.state import Lease, ShardState

KEYS = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)
# Weights from a small set, equal ones likely: sums stay exact, and the
# equal-weight path (order by hash) and the weighted path both run.
WEIGHTS = st.sampled_from([1.0, 1.0, 1.0, 2.0, 0.5, 3.0, 0.0])


def reference(key: str, ids, weights, owners=()) -> list[str]:
    """The reference owner order of ``key`` over every member."""
    return [s.shard_id for s in owner_order(key, [Shard(i, w) for i, w in zip(ids, weights)], owners)]


class OwnerOrderTests(SynchronousTestCase):
    """OwnerCache's orders are owner_order's, whatever the path that works them out."""

    @settings(max_examples=150, deadline=None)
    @given(
        key=KEYS,
        weights=st.lists(WEIGHTS, min_size=1, max_size=60),
        count=st.integers(1, 70),
        pins=st.lists(st.integers(0, 59), max_size=4),
    )
    def test_compute_equals_reference(self, key, weights, count, pins) -> None:
        """The first ``count`` owners, pinned ones included, are the reference's first ``count``."""
        ids = [f"s{i}" for i in range(len(weights))]
        owners = ((key, tuple(f"s{p}" for p in dict.fromkeys(pins))),) if pins else ()
        cache = OwnerCache(ids, weights, owners)
        self.assertEqual(list(cache.compute(key, count)), reference(key, ids, weights, owners)[:count])

    def test_large_services(self) -> None:
        """
        At 3,000 shards (the vectorised path): equal weights, mixed
        weights and weights with zeros give the reference's first 8 and
        first 100 owners for 40 keys each.
        """
        rng = random.Random(7)
        ids = [f"api-{i}" for i in range(3000)]
        for weights in (
            [1.0] * 3000,
            [rng.choice([0.5, 1.0, 2.0, 4.0]) for _ in ids],
            [rng.choice([0.0, 1.0, 1.5]) for _ in ids],
            [0.0] * 2995 + [1.0] * 5,
        ):
            cache = OwnerCache(ids, weights)
            for k in range(40):
                key = f"tenant{rng.randrange(10**9)}"
                expected = reference(key, ids, weights)
                self.assertEqual(list(cache.compute(key, 8)), expected[:8])
                self.assertEqual(list(cache.compute(key, 100)), expected[:100])

    def test_paths_agree(self) -> None:
        """
        Just below and just above ``SMALL`` members (plain Python, then
        numpy), and past the full-sort size, the orders are the reference's.
        """
        for n in (ownercache.SMALL, ownercache.SMALL + 1, 300):
            ids = [f"n{i}" for i in range(n)]
            for weights in ([1.0] * n, [float(1 + i % 3) for i in range(n)]):
                cache = OwnerCache(ids, weights)
                for k in range(25):
                    self.assertEqual(
                        list(cache.compute(f"k{k}", 5)), reference(f"k{k}", ids, weights)[:5], (n, k)
                    )

    def test_tied_seeds(self) -> None:
        """Members whose hashes tie (equal seeds) are ordered as the reference orders ties: by id."""
        arrays = ownercache._Arrays([5, 9, 5, 5, 7] * 60, [1.0] * 300)
        self.assertFalse(arrays.distinct)
        ids = [f"t{i:03d}" for i in range(300)]
        key_h = ownership.key_hash(b"tie")
        hashes = [ownership.rendezvous_hash(key_h, s) for s in [5, 9, 5, 5, 7] * 60]
        expected = sorted(range(300), key=lambda i: (-hashes[i], ids[i]))[:70]
        self.assertEqual(arrays.best(key_h, 70, ids, [1.0] * 300), expected)

    def test_pinned_not_members(self) -> None:
        """Pinned ids that are not members are left out; pinned members lead in their order."""
        ids = [f"s{i}" for i in range(20)]
        cache = OwnerCache(ids, [1.0] * 20, (("vip-*", ("gone", "s7", "s3")),))
        order = cache.compute("vip-1", 4)
        self.assertEqual(order[:2], ("s7", "s3"))
        self.assertEqual(list(order), reference("vip-1", ids, [1.0] * 20, cache.owners)[:4])
        self.assertEqual(cache.compute("vip-1", 1), ("s7",))


class KeptTests(SynchronousTestCase):
    """What OwnerCache keeps, and for how long."""

    def test_hits_and_depth(self) -> None:
        """A key's owners are worked out once, then kept: ``depth`` of them, or all of fewer members."""
        cache = OwnerCache([f"s{i}" for i in range(40)], [1.0] * 40, depth=6)
        first = cache.owners_of("a")
        self.assertEqual(len(first), 6)
        self.assertIs(cache.owners_of("a"), first)
        self.assertEqual((cache.hits, cache.misses), (1, 1))
        small = OwnerCache(["x", "y", "z"], [1.0] * 3, depth=6)
        self.assertEqual(len(small.owners_of("a")), 3)
        self.assertEqual(len(small.owners_of("a", at_least=10)), 3)
        self.assertEqual((small.hits, small.misses), (1, 1))

    def test_deeper_on_demand(self) -> None:
        """Asking for more owners than kept works them out again, and keeps the longer order."""
        ids = [f"s{i}" for i in range(40)]
        cache = OwnerCache(ids, [1.0] * 40, depth=4)
        self.assertEqual(len(cache.owners_of("a")), 4)
        deeper = cache.owners_of("a", at_least=16)
        self.assertEqual(list(deeper), reference("a", ids, [1.0] * 40)[:16])
        self.assertIs(cache.owners_of("a", at_least=5), deeper)
        self.assertEqual((cache.hits, cache.misses), (1, 2))

    def test_used_key_stays(self) -> None:
        """With room for 3 keys, a key used since it was kept is not the one dropped: 3 kept at most."""
        cache = OwnerCache([f"s{i}" for i in range(5)], [1.0] * 5, keep=3)
        for key in ("a", "b", "c"):
            cache.owners_of(key)
        cache.owners_of("a")  # now b is the oldest
        cache.owners_of("d")
        self.assertEqual(len(cache._entries), 3)
        misses = cache.misses
        cache.owners_of("a")
        cache.owners_of("c")
        self.assertEqual(cache.misses, misses)
        cache.owners_of("b")
        self.assertEqual(cache.misses, misses + 1)

    def test_second_chance(self) -> None:
        """
        A used key is passed over once, then dropped in its turn unless
        used again; exactly ``keep`` keys stay kept, and hits and misses
        count as before.
        """
        cache = OwnerCache([f"s{i}" for i in range(20)], [1.0] * 20, keep=3)
        for key in ("a", "b", "c"):
            cache.owners_of(key)
        cache.owners_of("a")
        cache.owners_of("d")
        self.assertEqual(set(cache._entries), {"a", "c", "d"})
        cache.owners_of("e")
        self.assertEqual(set(cache._entries), {"a", "d", "e"})
        # "a" was passed over and not used since: in its turn it goes.
        cache.owners_of("f")
        self.assertEqual(set(cache._entries), {"d", "e", "f"})
        self.assertEqual((cache.hits, cache.misses), (1, 6))
        self.assertEqual(len(cache._queue), 3)

    def test_every_key_used(self) -> None:
        """When every kept key was used, one sweep unmarks them and the oldest goes: 2 kept of 2."""
        cache = OwnerCache([f"s{i}" for i in range(20)], [1.0] * 20, keep=2)
        for key in ("a", "b", "a", "b"):
            cache.owners_of(key)
        cache.owners_of("c")
        self.assertEqual(set(cache._entries), {"b", "c"})
        self.assertEqual(cache._used, set())
        self.assertEqual((cache.hits, cache.misses), (2, 3))

    def test_deeper_order_keeps_one_place(self) -> None:
        """A key worked out deeper is replaced in place, not queued twice: with room for 2, 2 kept."""
        cache = OwnerCache([f"s{i}" for i in range(40)], [1.0] * 40, depth=4, keep=2)
        cache.owners_of("a")
        self.assertEqual(len(cache.owners_of("a", at_least=10)), 10)
        cache.owners_of("b")
        self.assertEqual(len(cache._queue), 2)
        cache.owners_of("c")
        # "a" was used (worked out deeper): "b" goes first.
        self.assertEqual(set(cache._entries), {"a", "c"})
        self.assertEqual(len(cache.owners_of("a")), 10)

    def test_fits(self) -> None:
        """A cache fits only the very members, weights and owners it was made for."""
        cache = OwnerCache(["a", "b"], [1, 2], (("k", ("a",)),))
        self.assertTrue(cache.fits(["a", "b"], [1.0, 2.0], (("k", ("a",)),)))
        self.assertFalse(cache.fits(["b", "a"], [2.0, 1.0], (("k", ("a",)),)))
        self.assertFalse(cache.fits(["a", "b"], [1.0, 2.5], (("k", ("a",)),)))
        self.assertFalse(cache.fits(["a", "b", "c"], [1.0, 2.0, 1.0], (("k", ("a",)),)))
        self.assertFalse(cache.fits(["a", "b"], [1.0, 2.0], ()))
        self.assertRaises(ValueError, OwnerCache, ["a"], [1.0, 2.0])


def service(n: int, weights=None, owners: tuple = (), bounded_load: float = 1.25) -> ServiceConfig:
    return ServiceConfig(
        id="api",
        names=("*.api.example.test",),
        shard_key="line-arg",
        owners=owners,
        bounded_load=bounded_load,
        shards=tuple(
            ShardConfig(
                id=f"api-{i}", address=Address("127.0.0.1", 9000 + i), slow_start=30.0,
                weight=1.0 if weights is None else weights[i],
            )
            for i in range(n)
        ),
    )


def config_of(*services: ServiceConfig) -> Config:
    return Config(
        proxy=ProxyConfig(id="edge"),
        signing=SigningConfig(private_key="k.pem", kid="k"),
        services=services,
    )


def request(key: str) -> ConnectionRequest:
    return ConnectionRequest(service_id="api", client=("192.0.2.1", 1234), shard_key=key)


class ResolverDifferentialTests(SynchronousTestCase):
    """resolve by key (kept owners, eligible totals) equals explain's reference chain."""

    def check(self, resolver: ShardResolver, keys, retries: int) -> None:
        for key in keys:
            chain = resolver.explain(request(key)).owners
            if not chain.order:
                self.assertRaises(NoShardAvailable, resolver.resolve, request(key), retries)
                continue
            got = [c.shard.shard_id for c in resolver.resolve(request(key), retries)]
            self.assertEqual(got, list(chain.order[: 1 + retries]), key)

    def test_random_changes(self) -> None:
        """
        Through 300 random steps over 24 shards (health, drains, agent
        maintenance, weights, leases taken and released, remote load,
        panic mode coming and going, the clock moving) resolve by key
        gives, for every one of 12 keys, kept or not, exactly explain's
        owner order.
        """
        rng = random.Random(2026)
        clock = Clock()
        clock.advance(1000)
        resolver = ShardResolver(
            config_of(service(24, weights=[rng.choice([1.0, 1.0, 2.0, 0.5]) for _ in range(24)])),
            clock=clock, random=random.Random(1),
        )
        ids = [f"api-{i}" for i in range(24)]
        keys = [f"tenant{i}" for i in range(12)]
        leases = []
        for step in range(300):
            action = rng.randrange(8)
            shard = rng.choice(ids)
            if action == 0:
                resolver.set_health(shard, rng.choice([Health.HEALTHY, Health.UNHEALTHY, Health.DRAINING]))
            elif action == 1:
                resolver.set_admin_state(shard, rng.choice([None, "drain", "ready"]))
            elif action == 2:
                resolver.set_weight(shard, rng.choice([0.0, 0.5, 1.0, 3.0]))
            elif action in (3, 4):
                leases.extend(resolver.lease(shard) for _ in range(rng.randrange(1, 6)))
            elif action == 5 and leases:
                for lease in rng.sample(leases, min(len(leases), rng.randrange(1, 8))):
                    lease.release()
                leases = [lease for lease in leases if not lease.released]
            elif action == 6:
                resolver.set_remote_load({i: rng.randrange(0, 4) for i in rng.sample(ids, 5)})
            else:
                clock.advance(rng.choice([0.5, 5, 40]))
            self.check(resolver, keys, retries=rng.choice([0, 2, 5]))
        cache = resolver.owner_cache("api")
        self.assertGreater(cache.hits, 0)

    def test_deep_walk(self) -> None:
        """
        With 30 of 40 shards drained, the walk goes past the kept owners
        (``DEPTH``) for most keys and still gives explain's order, retries
        included.
        """
        clock = Clock()
        clock.advance(1000)
        resolver = ShardResolver(config_of(service(40)), clock=clock)
        for i in range(30):
            resolver.set_admin_state(f"api-{i}", "drain")
        self.check(resolver, [f"k{i}" for i in range(50)], retries=6)
        self.assertGreater(max(len(v) for v in resolver.owner_cache("api")._entries.values()), ownercache.DEPTH)

    def test_nothing_eligible(self) -> None:
        """Every shard drained: NoShardAvailable names them, as without a key."""
        clock = Clock()
        resolver = ShardResolver(config_of(service(3)), clock=clock)
        for i in range(3):
            resolver.set_admin_state(f"api-{i}", "drain")
        e = self.assertRaises(NoShardAvailable, resolver.resolve, request("k"))
        self.assertEqual(set(e.rejections), {"api-0", "api-1", "api-2"})

    def test_bound_edges(self) -> None:
        """
        4 equal shards, 7 open in all, bounded_load 1.25: every bound is
        ceil(1.25 x 8 / 4) = 3.  The first owner at 2 open takes the key;
        at 3 it is skipped for the second, and comes right after it.
        """
        clock = Clock()
        resolver = ShardResolver(config_of(service(4)), clock=clock)
        first, second, third, fourth = resolver.explain(request("k")).owners.order
        held = [resolver.lease(first) for _ in range(2)] + [resolver.lease(fourth) for _ in range(5)]
        self.assertEqual([c.shard.shard_id for c in resolver.resolve(request("k"), 3)],
                         [first, second, third, fourth])
        self.assertEqual(resolver.explain(request("k")).owners.owners[0].bound, 3)
        held.pop().release()
        held.append(resolver.lease(first))  # first at 3 of 7: at its bound
        self.assertEqual([c.shard.shard_id for c in resolver.resolve(request("k"), 3)],
                         [second, first, third, fourth])
        held.pop().release()  # first back at 2 of 6: bound ceil(1.25 x 7 / 4) = 3
        self.assertEqual(resolver.resolve(request("k"))[0].shard.shard_id, first)

    def test_everyone_at_bound(self) -> None:
        """
        With bounded_load under 1 (the configuration refuses it; the model
        does not) every owner can be at its bound: the first eligible
        owner then takes the key, the others after it in order, as in the
        reference chain.
        """
        clock = Clock()
        resolver = ShardResolver(config_of(service(4, bounded_load=0.1)), clock=clock)
        held = [resolver.lease(f"api-{i}") for i in range(4)]
        chain = resolver.explain(request("k")).owners
        self.assertEqual(chain.owners[0].skipped, ())
        for later in chain.owners[1:]:
            self.assertTrue(later.skipped[0].startswith("bounded_load: 1 open >= bound 1"), later)
        self.assertEqual([c.shard.shard_id for c in resolver.resolve(request("k"), 3)], list(chain.order))
        self.assertEqual(chain.order[0], chain.owners[0].shard_id)
        self.assertEqual(len(held), 4)

    def test_remote_load_counts(self) -> None:
        """The fleet's open connections count towards the bound as this proxy's do."""
        clock = Clock()
        resolver = ShardResolver(config_of(service(4)), clock=clock)
        first, second = resolver.explain(request("k")).owners.order[:2]
        third = resolver.explain(request("k")).owners.order[2]
        resolver.set_remote_load({first: 3, third: 4})
        # 7 open: bound ceil(1.25 x 8 / 4) = 3 for all; first is at 3.
        self.assertEqual(resolver.resolve(request("k"))[0].shard.shard_id, second)
        resolver.set_remote_load({first: 2, third: 5})
        self.assertEqual(resolver.resolve(request("k"))[0].shard.shard_id, first)


class InvalidationTests(SynchronousTestCase):
    """The kept owners follow the members and weights, and only them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def test_weight_change(self) -> None:
        """
        A key's owner set to weight 0 loses the key at once (a stale order
        would keep it: the shard is still eligible); back to weight 1 it
        has it again.
        """
        resolver = ShardResolver(config_of(service(8)), clock=self.clock)
        owner = resolver.resolve(request("k"))[0].shard.shard_id
        before = resolver.owner_cache("api")
        resolver.set_weight(owner, 0.0)
        moved = resolver.resolve(request("k"))[0].shard.shard_id
        self.assertNotEqual(moved, owner)
        self.assertEqual(moved, resolver.explain(request("k")).owners.order[0])
        self.assertIsNot(resolver.owner_cache("api"), before)
        resolver.clear_weight(owner)
        self.assertEqual(resolver.resolve(request("k"))[0].shard.shard_id, owner)

    def test_health_keeps_the_cache(self) -> None:
        """Health and drains change nothing kept: the same cache answers, from what it kept."""
        resolver = ShardResolver(config_of(service(8)), clock=self.clock)
        owner = resolver.resolve(request("k"))[0].shard.shard_id
        cache = resolver.owner_cache("api")
        resolver.set_health(owner, Health.UNHEALTHY)
        self.assertNotEqual(resolver.resolve(request("k"))[0].shard.shard_id, owner)
        self.assertIs(resolver.owner_cache("api"), cache)
        self.assertEqual((cache.hits, cache.misses), (1, 1))

    def test_membership_change(self) -> None:
        """
        A reload that adds a shard starts anew (keys it now owns move to
        it); a reload with the same members and weights keeps the cache.
        """
        resolver = ShardResolver(config_of(service(8)), clock=self.clock)
        keys = [f"t{i}" for i in range(200)]
        before = {k: resolver.resolve(request(k))[0].shard.shard_id for k in keys}
        cache = resolver.owner_cache("api")
        resolver.replace_config(config_of(service(8)))
        resolver.resolve(request(keys[0]))
        self.assertIs(resolver.owner_cache("api"), cache)
        resolver.replace_config(config_of(service(9)))
        after = {k: resolver.resolve(request(k))[0].shard.shard_id for k in keys}
        self.assertIsNot(resolver.owner_cache("api"), cache)
        moved = [k for k in keys if after[k] != before[k]]
        self.assertTrue(moved)
        self.assertTrue(all(after[k] == "api-8" for k in moved))
        for k in keys:
            self.assertEqual(after[k], resolver.explain(request(k)).owners.order[0])

    def test_owners_change(self) -> None:
        """A reload that pins a key to a shard sends it there at once."""
        resolver = ShardResolver(config_of(service(8)), clock=self.clock)
        owner = resolver.resolve(request("vip"))[0].shard.shard_id
        other = next(f"api-{i}" for i in range(8) if f"api-{i}" != owner)
        resolver.replace_config(config_of(service(8, owners=(("vip", (other,)),))))
        self.assertEqual(resolver.resolve(request("vip"))[0].shard.shard_id, other)


class EligibleTotalsTests(SynchronousTestCase):
    """The index's eligible totals equal the sums over its eligible shards."""

    def test_random_changes(self) -> None:
        """
        Through 400 random changes (health, drains, weights, leases, remote
        load, and the clock going back, which reads every shard again) the
        open connections and weight of the healthy shards and of the
        shards passing the hard filters equal a fresh exact sum;
        ``weights_version`` grows exactly when a weight changes.
        """
        rng = random.Random(12)
        config = service(16, weights=[0.1 * (1 + i % 4) for i in range(16)])
        states = [ShardState(config=shard, service_id="api") for shard in config.shards]
        index = shortlist.ServiceIndex(
            ranking.ServiceTable.build(config, states, None), ranking.Settings(60.0, 0.5)
        )
        now = 1000.0
        index.refresh(now)
        self.assertEqual(index.totals.of(False), (0, math.fsum(s.weight for s in states)))
        leases = []
        for _ in range(400):
            action = rng.randrange(6)
            state = rng.choice(states)
            version = index.totals.weights_version
            weight = state.weight
            if action == 0:
                state.health = rng.choice([Health.HEALTHY, Health.UNHEALTHY])
            elif action == 1:
                state.admin_state = rng.choice([None, "drain"])
            elif action == 2:
                state.weight_override = rng.choice([None, 0.0, 0.1, 0.3, 2.0])
            elif action == 3:
                leases.append(Lease(state))
            elif action == 4 and leases:
                leases.pop(rng.randrange(len(leases))).release()
            else:
                state.remote_connections = rng.randrange(3)
            now += rng.choice([1.0, 1.0, -5.0])
            index.refresh(now)
            self.assertEqual(index.totals.weights_version, version + (state.weight != weight))
            for panic in (False, True):
                rows = [r for r in index.rows() if not r.hard and (panic or not r.soft)]
                self.assertEqual(index.totals.of(panic), (
                    sum(r.state.open_connections + r.state.remote_connections for r in rows),
                    math.fsum(r.state.weight for r in rows),
                ))
