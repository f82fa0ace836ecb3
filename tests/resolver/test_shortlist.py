"""
Tests for shardtcp.resolver.shortlist: ``resolve``'s incremental orderings
give what the reference pipeline (``ranking.rank`` over every shard, then
``choice.pool`` and ``choice.draw``) gives for the same live state, over
random states and random sequences of changes; the draw over a large pool
samples each shard in proportion to its weight; the candidate list is
bounded by ``retries``; and the key ordering seam replaces the draw.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.model import Health, PolicyConfig
from shardtcp.resolver import AccessDenied, NoShardAvailable, ShardResolver, choice, ranking
from shardtcp.resolver import shortlist
from shardtcp.resolver.outlier import OutlierPolicy
from shardtcp.resolver.state import _UNRANKED, ConnectStats, ShardState

from tests.resolver.test_resolver import (
    AP_CLIENT,
    EU_CLIENT,
    UNPLACED_CLIENT,
    US_CLIENT,
    make_config,
    request,
    shard,
)
from tests.support import FRANKFURT, NEW_YORK, SINGAPORE

_PROPERTY = settings(
    database=None,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LOCATIONS = (NEW_YORK, FRANKFURT, SINGAPORE, None)
CLIENTS = (US_CLIENT, EU_CLIENT, AP_CLIENT, UNPLACED_CLIENT)


def build(specs, policy=None, seed=0):
    """A resolver over shards built from ``(location, capacity, weight, security)``."""
    shards = tuple(
        shard(f"s{i:03d}", LOCATIONS[loc], capacity=cap, weight=w, security=sec, port=9000 + i)
        for i, (loc, cap, w, sec) in enumerate(specs)
    )
    clock = Clock()
    clock.advance(1_000_000)
    rng = random.Random(seed)
    resolver = ShardResolver(
        make_config(shards, policy=policy),
        clock=clock,
        random=rng,
        outlier=OutlierPolicy(consecutive_failures=2, base_ejection=5.0, max_ejection=20.0),
    )
    return resolver, clock, rng, shards


shard_spec = st.tuples(
    st.integers(0, 3),
    st.sampled_from([1, 2, 3, 100]),
    st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0]),
    st.sampled_from([30.0, 60.0, 90.0, 90.0]),
)

operation = st.one_of(
    st.tuples(st.just("lease"), st.integers(0, 10_000)),
    st.tuples(st.just("release"), st.integers(0, 10_000)),
    st.tuples(st.just("health"), st.integers(0, 10_000),
              st.sampled_from([Health.HEALTHY, Health.HEALTHY, Health.UNHEALTHY, Health.DRAINING])),
    st.tuples(st.just("admin"), st.integers(0, 10_000), st.sampled_from([None, "drain", "ready"])),
    st.tuples(st.just("weight"), st.integers(0, 10_000), st.sampled_from([0.0, 0.5, 1.0, 3.0])),
    st.tuples(st.just("security"), st.integers(0, 10_000), st.sampled_from([None, 20.0, 70.0, 100.0])),
    st.tuples(st.just("rtt"), st.integers(0, 10_000), st.floats(0.0, 0.3)),
    st.tuples(st.just("connect"), st.integers(0, 10_000), st.booleans()),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 3.0, 7.0, 31.0, 61.0])),
    st.tuples(st.just("resolve"), st.integers(0, 3), st.integers(0, 4)),
)


def reference(resolver: ShardResolver, req, band: float = choice.DEFAULT_BAND):
    """What the straightforward pipeline says now: the ranking and the pool."""
    result, _ = resolver._rank(req, score_all=False)
    if result.denied is not None or not result.eligible:
        return result, []
    return result, choice.pool(resolver._entries(result.eligible), band)


class DifferentialTests(SynchronousTestCase):
    """resolve against the reference pipeline, over random states."""

    def check(self, resolver: ShardResolver, rng: random.Random, client: str, retries: int) -> None:
        req = request(client)
        result, members = reference(resolver, req)
        if result.denied is not None:
            self.assertRaises(AccessDenied, resolver.resolve, req, retries)
            return
        if not result.eligible:
            error = self.assertRaises(NoShardAvailable, resolver.resolve, req, retries)
            self.assertEqual(error.rejections, dict(result.rejections))
            self.assertEqual(list(error.rejections), list(result.rejections))
            return
        index = resolver._indexes["api"]
        index.refresh(resolver._now())
        bucket = index.bucket(result.client.location)
        fast_pool = index.pool(bucket, choice.DEFAULT_BAND)
        # The same pool, in the same (rank) order, with the same figures.
        self.assertEqual(fast_pool, members)
        expected_draw = None
        if len(members) <= shortlist.SMALL_POOL:
            clone = random.Random()
            clone.setstate(rng.getstate())
            expected_draw = choice.draw(members, clone)
        candidates = resolver.resolve(req, retries)
        first = candidates[0]
        pool_ids = [m.item.info.shard_id for m in members]
        self.assertIn(first.shard.shard_id, pool_ids)
        if expected_draw is not None:
            index_, ledger = expected_draw
            self.assertEqual(first.shard.shard_id, pool_ids[index_])
            self.assertEqual(first.ranked.state.ledger, ledger)
        by_id = {r.info.shard_id: r for r in result.eligible}
        retry = [r for r in result.eligible if r.info.shard_id != first.shard.shard_id][:retries]
        self.assertEqual([c.shard.shard_id for c in candidates[1:]], [r.info.shard_id for r in retry])
        self.assertEqual(len(candidates), 1 + min(retries, len(result.eligible) - 1))
        for c in candidates:
            want = by_id[c.shard.shard_id]
            self.assertEqual(c.shard, want.info)
            self.assertEqual(
                (c.ranked.latency, c.ranked.security, c.ranked.spare, c.ranked.base,
                 c.ranked.total, c.ranked.measured_ms, c.ranked.expected_ms, c.ranked.set_aside),
                (want.latency, want.security, want.spare, want.base,
                 want.total, want.measured_ms, want.expected_ms, want.set_aside),
            )

    def run_operations(self, specs, operations, policy=None) -> None:
        resolver, clock, rng, shards = build(specs, policy)
        leases = []
        for op in operations:
            kind = op[0]
            if kind == "advance":
                clock.advance(op[1])
                continue
            if kind == "resolve":
                self.check(resolver, rng, CLIENTS[op[1]], op[2])
                continue
            shard_id = shards[op[1] % len(shards)].id
            if kind == "lease":
                leases.append(resolver.lease(shard_id))
            elif kind == "release":
                if leases:
                    leases.pop(op[1] % len(leases)).release()
            elif kind == "health":
                resolver.set_health(shard_id, op[2])
            elif kind == "admin":
                resolver.set_admin_state(shard_id, op[2])
            elif kind == "weight":
                resolver.set_weight(shard_id, op[2])
            elif kind == "security":
                resolver.set_security_score(shard_id, op[2])
            elif kind == "rtt":
                resolver.record_rtt(shard_id, op[2])
            elif kind == "connect":
                resolver.record_connect_result(shard_id, op[2], 0.01 if op[2] else None)
        for client in range(len(CLIENTS)):
            self.check(resolver, rng, CLIENTS[client], 3)

    @_PROPERTY
    @given(
        specs=st.lists(shard_spec, min_size=1, max_size=12),
        operations=st.lists(operation, max_size=60),
        min_security=st.sampled_from([0.0, 0.0, 50.0]),
    )
    def test_small_services(self, specs, operations, min_security) -> None:
        """
        Over random services of up to 12 shards and random sequences of
        leases, releases, health, drain, weight, security, latency and
        connect reports and clock steps (ejections ending, slow starts
        ramping, measurements ageing out), every resolve gives: the same
        refusal as the reference, or the same pool in the same order, the
        very first candidate and ledger ``choice.draw`` gives with the same
        random numbers, and the reference's retry order, values and all.
        """
        self.run_operations(specs, operations, PolicyConfig(min_security_score=min_security))

    @settings(_PROPERTY, max_examples=6)
    @given(
        specs=st.lists(shard_spec, min_size=100, max_size=160),
        operations=st.lists(operation, max_size=40),
    )
    def test_large_services(self, specs, operations) -> None:
        """
        The same over services of 100 to 160 shards, where the draw's pool
        is read from the blocks' figures: the same pool and retry order as
        the reference, and a first candidate from that pool.
        """
        self.run_operations(specs, operations)

    def test_every_ranked_attribute_is_noticed(self) -> None:
        """
        Writing any attribute of a shard's live state that a ranking reads
        puts the state in its index's ``changed`` set; the draw's ledger
        and the other bookkeeping do not.
        """
        resolver, _, _, shards = build([(0, 100, 1.0, 90.0)])
        state = resolver._states[shards[0].id]
        index = resolver._indexes["api"]
        self.assertIs(state.changed, index.changed)
        for field in attrs.fields(ShardState):
            index.changed.clear()
            setattr(state, field.name, getattr(state, field.name))
            if field.name == "changed":
                self.assertIs(state.changed, index.changed)
                continue
            self.assertEqual(bool(index.changed), field.name not in _UNRANKED, field.name)
        self.assertEqual(_UNRANKED, {"ledger", "changed", "rtt_samples", "ejection_open"})

    def test_construction_notes_nothing_and_raises_nothing(self) -> None:
        """
        Building a shard's state with a ``changed`` set given: ``changed``
        is None from the first write of ``__init__`` on (no attribute is
        ever missing to a write), the set given is kept and left empty by
        the construction's own writes; the first ranked write after it is
        noted.
        """
        seen: list = []
        original = ShardState.__setattr__

        def watching(state, name, value):
            seen.append((name, object.__getattribute__(state, "changed")))
            original(state, name, value)

        notes: set = set()
        self.patch(ShardState, "__setattr__", watching)
        state = ShardState(config=None, service_id="api", changed=notes)
        self.assertEqual(len(seen), len(attrs.fields(ShardState)))
        self.assertEqual({changed for _, changed in seen}, {None})
        self.assertIs(state.changed, notes)
        self.assertEqual(notes, set())
        state.open_connections = 1
        self.assertEqual(notes, {state})

    def test_a_sample_is_one_noticed_change(self) -> None:
        """
        ``ShardState.take_sample`` writes the measurement, its time, the
        sample count and the connect counters given, and puts the state in
        its index's ``changed`` set; without counters it leaves them.
        """
        resolver, _, _, shards = build([(0, 100, 1.0, 90.0)])
        state = resolver._states[shards[0].id]
        index = resolver._indexes["api"]
        index.changed.clear()
        stats = ConnectStats(ok=4, last_seconds=0.002, last_at=50.0)
        state.take_sample(2.0, 50.0, stats)
        self.assertEqual(
            (state.rtt_ms, state.rtt_at, state.rtt_samples, state.stats), (2.0, 50.0, 1, stats)
        )
        self.assertEqual(index.changed, {state})
        index.changed.clear()
        state.take_sample(3.0, 51.0)
        self.assertEqual(
            (state.rtt_ms, state.rtt_at, state.rtt_samples, state.stats), (3.0, 51.0, 2, stats)
        )
        self.assertEqual(index.changed, {state})


class LargePoolDrawTests(SynchronousTestCase):
    """The block-based draw samples as the reference does."""

    def pool_resolver(self, count: int = 300):
        weights = [0.5, 1.0, 2.0, 3.0]
        specs = [(0, 100, weights[i % 4], 90.0) for i in range(count)]
        return build(specs, seed=3)

    def test_each_shard_owns_its_share_of_the_random_numbers(self) -> None:
        """
        In a pool of 300 shards over 19 blocks, a random number landing in
        the middle of a shard's interval of the running weights picks that
        shard, for every shard, first draw and second (with the first left
        out): each is sampled with probability weight / total.
        """
        resolver, _, _, _ = self.pool_resolver()
        resolver.resolve(request(US_CLIENT))
        index = resolver._indexes["api"]
        bucket = index.bucket(NEW_YORK)
        ordered, group = index._group_of_pool(bucket)
        self.assertEqual(group, 0)
        end = shortlist._pool_end(ordered, choice.DEFAULT_BAND)
        self.assertEqual(end, 300)
        full, rest = ordered.pool_end(choice.DEFAULT_BAND)
        parts = ordered.blocks[:full] + ([ordered.blocks[full][:rest]] if rest else [])
        self.assertEqual(len(parts), 19)
        # Position -> (block, offset).
        places = [(b, j) for b, part in enumerate(parts) for j in range(len(part))]
        weights = [k[2] for part in parts for k in part]
        ordered.figures(full, bucket.ranked, False)
        sums = ordered.sums[:full] + ([sum(k[2] for k in parts[-1])] if rest else [])
        total = sum(weights)

        class Fixed:
            value = 0.0

            def random(self) -> float:
                return self.value

        fixed = Fixed()
        for skip in (None, 0, 17, 299):
            kept = list(sums)
            left = total
            if skip is not None:
                kept[places[skip][0]] -= weights[skip]
                left -= weights[skip]
            skipped = None if skip is None else places[skip]
            running = 0.0
            for i, w in enumerate(weights):
                if i == skip:
                    continue
                fixed.value = (running + w / 2) / left
                got = shortlist._sample(parts, kept, left, False, fixed, skipped)
                self.assertEqual(got, places[i])
                running += w

    def test_first_choice_distribution_matches_reference(self) -> None:
        """
        2,000 draws over a 300-shard pool of four weights (0.5 to 3), the
        ledgers moving, against 2,000 draws of the reference ``choice.draw``
        on an identical resolver: each weight class gets the same share of
        the picks within 1.5 points on both, and no shard strays further
        from its long-run share with the fast draw than the worst shard
        does with the reference, give or take 3 picks.
        """
        fast, _, _, _ = self.pool_resolver()
        slow, _, slow_rng, _ = self.pool_resolver()
        counts = (Counter(), Counter())
        for _ in range(2000):
            counts[0][fast.resolve(request(US_CLIENT))[0].shard.shard_id] += 1
            result, members = reference(slow, request(US_CLIENT))
            index, ledger = choice.draw(members, slow_rng)
            members[index].item.state.ledger = ledger
            counts[1][members[index].item.info.shard_id] += 1
        weights = [0.5, 1.0, 2.0, 3.0]
        total_weight = 75 * sum(weights)
        strays = []
        shares = []
        for count in counts:
            self.assertEqual(sum(count.values()), 2000)
            by_weight: Counter = Counter()
            stray = 0.0
            for i in range(300):
                weight = weights[i % 4]
                got = count[f"s{i:03d}"]
                by_weight[weight] += got
                stray = max(stray, abs(got - 2000 * weight / total_weight))
            shares.append([by_weight[w] / 2000 for w in weights])
            strays.append(stray)
        for fast_share, slow_share in zip(*shares):
            self.assertLessEqual(abs(fast_share - slow_share), 0.015)
        self.assertLessEqual(strays[0], strays[1] + 3)


class BoundTests(SynchronousTestCase):
    """resolve offers the first candidate and at most ``retries`` more."""

    def test_retries_bound_the_candidates(self) -> None:
        """
        Five eligible shards: retries 0 gives 1 candidate, the default 2
        gives 3, 4 gives all 5 and 10 still 5.
        """
        resolver, _, _, _ = build([(0, 100, 1.0, 90.0)] * 5)
        self.assertEqual(len(resolver.resolve(request(US_CLIENT), 0)), 1)
        self.assertEqual(len(resolver.resolve(request(US_CLIENT))), 3)
        self.assertEqual(len(resolver.resolve(request(US_CLIENT), 4)), 5)
        self.assertEqual(len(resolver.resolve(request(US_CLIENT), 10)), 5)


class WarmTests(SynchronousTestCase):
    """Starting the resolver builds the orderings first connections need."""

    def test_start_builds_proxy_and_geo_locations(self) -> None:
        """
        Before startService no ordering is built; after it, the service has
        its shards read and one ordering per distinct [geo] location (three
        in the test configuration) and one for the proxy's location, and a
        resolve from a geo network builds no new one.
        """
        resolver, _, _, _ = build([(0, 100, 1.0, 90.0)] * 3)
        index = resolver._indexes["api"]
        self.assertEqual(list(index._buckets), [])
        resolver.startService()
        self.addCleanup(resolver.stopService)
        index = resolver._indexes["api"]
        self.assertEqual(list(index._buckets), [None, NEW_YORK, FRANKFURT, SINGAPORE])
        resolver.resolve(request(EU_CLIENT))
        self.assertEqual(len(index._buckets), 4)


class ViewTests(SynchronousTestCase):
    """The draw's pool kept between resolves (``shortlist.View``)."""

    def test_a_change_drops_the_kept_pool(self) -> None:
        """
        A resolve keeps its bucket's pool; a lease on a shard, a health
        change or a weight override drops it at the next resolve, which
        builds one equal to the reference pool again.
        """
        resolver, _, _, shards = build([(0, 100, 1.0, 90.0)] * 5)
        index = resolver._indexes["api"]
        resolver.resolve(request(US_CLIENT))
        bucket = index.bucket(NEW_YORK)
        kept = bucket.view
        self.assertIsNotNone(kept)
        resolver.resolve(request(US_CLIENT))
        self.assertIs(bucket.view, kept)
        changes = [
            lambda: resolver.lease(shards[0].id),
            lambda: resolver.set_health(shards[1].id, Health.UNHEALTHY),
            lambda: resolver.set_weight(shards[2].id, 3.0),
        ]
        for change in changes:
            change()
            index.refresh(resolver._now())
            self.assertIsNone(index.bucket(NEW_YORK).view)
            resolver.resolve(request(US_CLIENT))
            view = index.bucket(NEW_YORK).view
            self.assertIsNot(view, kept)
            _, members = reference(resolver, request(US_CLIENT))
            self.assertEqual(
                [r.info.shard_id for r in view.members], [m.item.info.shard_id for m in members]
            )
            kept = view

    def assert_values_match_reference(self, resolver, candidates) -> None:
        """Every candidate's ranked values are the reference ranking's."""
        result, _ = reference(resolver, request(US_CLIENT))
        by_id = {r.info.shard_id: r for r in result.eligible}
        for c in candidates:
            want = by_id[c.shard.shard_id]
            self.assertEqual(c.shard, want.info)
            self.assertEqual(
                (c.ranked.latency, c.ranked.base, c.ranked.total, c.ranked.measured_ms,
                 c.ranked.set_aside),
                (want.latency, want.base, want.total, want.measured_ms, want.set_aside),
            )

    def test_a_change_that_moves_no_key_keeps_the_pool(self) -> None:
        """
        A lease taken and given back, or a measurement within what
        geography predicts (0.5 ms against the 1 ms a shard next to the
        client is expected to take), leaves every key where it was: the
        next resolve keeps the pool, yet its candidates carry the new
        measurement, as the reference ranking does.  A measurement past the
        prediction (30 ms) moves the shard and drops the pool.
        """
        resolver, _, _, shards = build([(0, 100, 1.0, 90.0)] * 3)
        index = resolver._indexes["api"]
        resolver.resolve(request(US_CLIENT))
        kept = index.bucket(NEW_YORK).view
        self.assertIsNotNone(kept)
        resolver.lease(shards[0].id).release()
        resolver.record_rtt(shards[1].id, 0.0005)
        candidates = resolver.resolve(request(US_CLIENT), 2)
        self.assertIs(index.bucket(NEW_YORK).view, kept)
        measured = {c.shard.shard_id: c.ranked.measured_ms for c in candidates}
        self.assertEqual(measured, {shards[0].id: None, shards[1].id: 0.5, shards[2].id: None})
        self.assertIn(0.5, [r.measured_ms for r in kept.members])
        self.assert_values_match_reference(resolver, candidates)
        resolver.record_rtt(shards[1].id, 0.030)
        candidates = resolver.resolve(request(US_CLIENT), 2)
        view = index.bucket(NEW_YORK).view
        self.assertIsNot(view, kept)
        self.assertEqual(
            {c.shard.shard_id: c.ranked.measured_ms for c in candidates}[shards[1].id], 30.0
        )
        self.assert_values_match_reference(resolver, candidates)

    def test_one_deadline_per_shard_however_often_it_is_measured(self) -> None:
        """
        A shard measured on every connection keeps one entry in the
        deadline heap (not one per measurement), over 1,000 connections
        spanning more than a measurement's life; its last measurement is
        still used at exactly its age limit and gone just after, as in the
        reference ranking.
        """
        resolver, clock, _, shards = build([(0, 100, 1.0, 90.0)])
        index = resolver._indexes["api"]
        for _ in range(1000):
            resolver.resolve(request(US_CLIENT))
            resolver.record_connect_result(shards[0].id, True, 0.002)
            clock.advance(0.1)
        resolver.resolve(request(US_CLIENT))
        self.assertEqual(len(index._deadlines), 1)
        age = resolver._settings.rtt_max_age
        clock.advance(age - 0.1)
        first = resolver.resolve(request(US_CLIENT))[0]
        self.assertEqual(first.ranked.measured_ms, 2.0)
        self.assert_values_match_reference(resolver, [first])
        clock.advance(0.001)
        first = resolver.resolve(request(US_CLIENT))[0]
        self.assertIsNone(first.ranked.measured_ms)
        self.assert_values_match_reference(resolver, [first])
        self.assertEqual(index._deadlines, [])

    def test_failures_during_an_ejection_update_its_reason(self) -> None:
        """
        A failure reported while a shard is ejected changes the count its
        ejection reason gives (the only shard: panic mode routes to it,
        the reason set aside), although nothing else about it moved.
        """
        resolver, _, _, shards = build([(0, 100, 1.0, 90.0)])
        shard_id = shards[0].id
        resolver.record_connect_result(shard_id, False)
        resolver.record_connect_result(shard_id, False)
        first = resolver.resolve(request(US_CLIENT))[0]
        self.assertEqual(len(first.ranked.set_aside), 1)
        self.assertIn("(2 consecutive failures)", first.ranked.set_aside[0])
        self.assert_values_match_reference(resolver, [first])
        resolver.record_connect_result(shard_id, False)
        first = resolver.resolve(request(US_CLIENT))[0]
        self.assertIn("(3 consecutive failures)", first.ranked.set_aside[0])
        self.assert_values_match_reference(resolver, [first])

    def test_highest_ledger_follows_draws_from_every_location(self) -> None:
        """
        Over 300 draws from three client locations (three buckets, each
        with its own kept pool) on a small and on a large pool, each kept
        pool's highest ledger is, before every draw, the highest ledger of
        the reference pool for that location: raised by the draws of its
        own bucket and of the others on shards it holds, never by shards
        it does not hold.
        """
        for specs in ([(i % 3, 100, 1.0, 90.0) for i in range(6)],
                      [(i % 3, 100, (0.5, 1.0, 2.0)[i // 3 % 3], 90.0) for i in range(240)]):
            resolver, _, rng, _ = build(specs, seed=9)
            index = resolver._indexes["api"]
            for n in range(300):
                client = CLIENTS[n % 3]
                _, members = reference(resolver, request(client))
                location = ranking.locate(client, resolver._geo, None).location
                index.refresh(resolver._now())
                view = index.view(index.bucket(location), choice.DEFAULT_BAND)
                self.assertEqual(view.top, max(m.ledger for m in members))
                resolver.resolve(request(client))
            self.assertGreater(max(s.ledger for s in resolver._states.values()), 0.0)

    def test_second_sample_leaves_the_first_out(self) -> None:
        """
        In a 300-shard pool, a number landing in the middle of a shard's
        interval of the running weights without the first shard picks the
        same shard through the kept pool's shifted lookup as through
        ``_sample`` over the reduced sums, for every shard and for the
        first shard at the start, inside and at the end of the pool.
        """
        weights = [0.5, 1.0, 2.0, 3.0]
        resolver, _, _, _ = build([(0, 100, weights[i % 4], 90.0) for i in range(300)], seed=3)
        resolver.resolve(request(US_CLIENT))
        index = resolver._indexes["api"]
        view = index.view(index.bucket(NEW_YORK), choice.DEFAULT_BAND)
        self.assertEqual(view.end, 300)
        self.assertIsNone(view.members)
        pool = [k[2] for part in view.parts for k in part]
        self.assertEqual(len(pool), 300)
        # Position -> (block, offset).
        places = [(b, j) for b, part in enumerate(view.parts) for j in range(len(part))]
        for skip in (0, 17, 160, 299):
            left = sum(pool) - pool[skip]
            running = 0.0
            at = places[skip]
            for i, w in enumerate(pool):
                if i == skip:
                    continue
                target = running + w / 2
                start = view._within(at[0])[at[1]]
                moved = target + pool[skip] if target >= start else target
                self.assertEqual(view._find(moved, at, target), places[i])
                sums = list(view.sums)
                sums[at[0]] -= pool[skip]
                self.assertEqual(shortlist._position(view.parts, sums, target, False, at), places[i])
                running += w
            self.assertLess(abs(running - left), 1e-9)

    def test_leading_follows_the_ranking(self) -> None:
        """
        The retry order kept with the pool is the reference order, and a
        lease that moves a shard down the ranking moves it in the kept
        order at the next resolve.
        """
        resolver, _, _, shards = build([(0, 2, 1.0, 90.0)] * 4)
        resolver.resolve(request(US_CLIENT), 3)
        before = [c.shard.shard_id for c in resolver.resolve(request(US_CLIENT), 3)]
        self.assertEqual(sorted(before), [s.id for s in shards])
        index = resolver._indexes["api"]
        leader = index.leading(index.bucket(NEW_YORK), 4)[0].info.shard_id
        resolver.lease(leader)
        index.refresh(resolver._now())
        after = [r.info.shard_id for r in index.leading(index.bucket(NEW_YORK), 4)]
        result, _ = reference(resolver, request(US_CLIENT))
        self.assertEqual(after, [r.info.shard_id for r in result.eligible])
        self.assertEqual(after[-1], leader)


class RampReadTests(SynchronousTestCase):
    """A shard in its slow start is read again at each step of the ramp, not at each call."""

    def test_read_once_per_step(self) -> None:
        """
        Back from an ejection, a shard is read when its ramp begins; then
        not again within a step (however many refreshes), and again exactly
        at each step's start (30 s slow start: every 1.5 s), until the
        ramp ends.
        """
        resolver, clock, _, shards = build([(0, 100, 1.0, 90.0)] * 3)
        index = resolver._indexes["api"]
        resolver.resolve(request(US_CLIENT), 3)
        sid = shards[0].id
        resolver.record_connect_result(sid, False)
        resolver.record_connect_result(sid, False)
        state = resolver._states[sid]
        back = state.outlier.ejected_until
        index.refresh(clock.seconds())
        clock.advance(back - clock.seconds())
        read = [r.state.config.id for r in index.refresh(clock.seconds())]
        self.assertEqual(read, [sid])
        self.assertEqual(state.back_since, back)

        def reads_at(offset: float) -> list:
            clock.advance(back + offset - clock.seconds())
            return [r.state.config.id for r in index.refresh(clock.seconds())]

        for offset in (0.1, 0.7, 1.4999):
            self.assertEqual(reads_at(offset), [], offset)
        self.assertEqual(reads_at(1.5), [sid])
        self.assertEqual(reads_at(2.9999), [])
        self.assertEqual(reads_at(3.0), [sid])
        # ... and the ramp's factor is what the reference pipeline uses.
        result, _ = reference(resolver, request(US_CLIENT))
        weights = {r.info.shard_id: r.info.weight for r in result.eligible}
        self.assertAlmostEqual(weights[sid], 0.1 + 0.9 * 2 / 20)
        self.assertEqual(reads_at(29.9), [sid])
        self.assertEqual(reads_at(29.95), [])
        self.assertEqual(reads_at(30.0), [sid])
        self.assertEqual(reads_at(31.0), [])
        self.assertEqual(reads_at(45.0), [])


class VerdictTests(SynchronousTestCase):
    """The policy's verdict on a client address is kept until the records change."""

    def test_policy_verdict_kept_threat_asked_every_time(self) -> None:
        """
        A denied address is refused with the policy's rule every time;
        a threat check set afterwards is asked on every resolve (its
        answer wins while it denies, the policy's again when it stops);
        and a reload with a policy allowing the address admits it.
        """
        policy = PolicyConfig(deny=(ipaddress.ip_network("198.51.100.0/24"),))
        resolver, _, _, shards = build([(0, 100, 1.0, 90.0)] * 2, policy)
        for _ in range(2):
            error = self.assertRaises(AccessDenied, resolver.resolve, request(US_CLIENT))
            self.assertEqual(error.rule, "policy.deny 198.51.100.0/24")
        asked = []
        answer = ["feed: listed"]
        resolver.set_admission(lambda ip: asked.append(ip) or answer[0])
        error = self.assertRaises(AccessDenied, resolver.resolve, request(US_CLIENT))
        self.assertEqual(error.rule, "feed: listed")
        answer[0] = None
        error = self.assertRaises(AccessDenied, resolver.resolve, request(US_CLIENT))
        self.assertEqual(error.rule, "policy.deny 198.51.100.0/24")
        self.assertEqual(asked, [US_CLIENT, US_CLIENT])
        resolver.replace_config(make_config(
            tuple(shard(f"s{i:03d}", NEW_YORK, port=9000 + i) for i in range(2))
        ))
        self.assertIn(resolver.resolve(request(US_CLIENT))[0].shard.shard_id, {"s000", "s001"})


def reference_snapshot(resolver: ShardResolver):
    """The snapshot worked out from scratch: ``ranking.consider`` over every shard."""
    from collections import Counter as Taken

    from shardtcp.resolver import ResolverSnapshot, ServiceSnapshot, ShardSnapshot

    now = resolver._now()
    services = []
    for service_id, table in resolver._tables.items():
        considered = ranking.consider(table, now)
        eligible, panic, in_rotation, passing = ranking.select(considered, resolver._settings.panic_threshold)
        eligible_ids = {c.info.shard_id for c in eligible}
        keyed = table.config.shard_key != "none"
        taken = Taken(resolver._recent_keys.get(service_id, {}).values())
        shards = []
        for c in considered:
            state, info, outlier = c.state, c.info, c.state.outlier
            ejected = outlier.ejected(now)
            shards.append(ShardSnapshot(
                shard_id=info.shard_id, address=str(info.address), region=info.region,
                health=info.health.value, check_health=state.health.value,
                admin_state=state.admin_state, agent_state=state.agent_admin,
                agent_load=state.agent_load, agent_weight_percent=state.agent_weight_percent,
                eligible=info.shard_id in eligible_ids, rejected_by=c.reasons, ejected=ejected,
                ejected_until=outlier.ejected_until if ejected else None,
                ejections=outlier.run_length(now, resolver._outlier),
                total_ejections=outlier.total_ejections, consecutive_failures=outlier.consecutive,
                open_connections=info.open_connections, capacity=info.capacity, load=info.load,
                security_score=info.security_score, security_baseline=state.config.security_score,
                security_source="feed" if state.security_override is not None else "baseline",
                weight=state.weight, weight_overridden=state.weight_override is not None,
                slow_start_ramp=state.ramp(now), effective_weight=info.weight,
                rtt_ms=state.measured_ms(now, resolver._rtt_max_age), rtt_samples=state.rtt_samples,
                connects_ok=state.stats.ok, connects_failed=state.stats.failed,
                recent_keys=taken.get(info.shard_id, 0) if keyed else None,
            ))
        services.append(ServiceSnapshot(service_id, panic, in_rotation, passing, tuple(shards)))
    return ResolverSnapshot(time=now, services=tuple(services))


class SnapshotTests(SynchronousTestCase):
    """The snapshot built from the index rows, each shard's part kept while unchanged."""

    @settings(_PROPERTY, max_examples=30)
    @given(
        specs=st.lists(shard_spec, min_size=1, max_size=10),
        operations=st.lists(operation, max_size=50),
    )
    def test_snapshot_equals_reference(self, specs, operations) -> None:
        """
        After every step of random leases, releases, health, drain,
        weight, security, latency and connect reports (ejections and their
        runs), clock steps (ejections ending, runs resetting, slow starts,
        measurements ageing out) and resolves, ``snapshot()`` equals the
        snapshot worked out from scratch with ``ranking.consider``.
        """
        resolver, clock, rng, shards = build(specs)
        leases = []
        for op in operations:
            kind = op[0]
            if kind == "advance":
                clock.advance(op[1] * 4)
            elif kind == "resolve":
                try:
                    resolver.resolve(request(CLIENTS[op[1]]), op[2])
                except (AccessDenied, NoShardAvailable):
                    pass
            else:
                shard_id = shards[op[1] % len(shards)].id
                if kind == "lease":
                    leases.append(resolver.lease(shard_id))
                elif kind == "release":
                    if leases:
                        leases.pop(op[1] % len(leases)).release()
                elif kind == "health":
                    resolver.set_health(shard_id, op[2])
                elif kind == "admin":
                    resolver.set_admin_state(shard_id, op[2])
                elif kind == "weight":
                    resolver.set_weight(shard_id, op[2])
                elif kind == "security":
                    resolver.set_security_score(shard_id, op[2])
                elif kind == "rtt":
                    resolver.record_rtt(shard_id, op[2])
                elif kind == "connect":
                    resolver.record_connect_result(shard_id, op[2], 0.01 if op[2] else None)
            self.assertEqual(resolver.snapshot(), reference_snapshot(resolver))

    def test_unchanged_shards_are_kept_changed_ones_made_again(self) -> None:
        """
        Two snapshots in a row share every shard's part; after a lease on
        one shard only that shard's part is made again, and after an
        ejection run resets with the clock, the part shows zero ejections.
        """
        resolver, clock, _, shards = build([(0, 100, 1.0, 90.0)] * 3)
        first = resolver.snapshot().services[0].shards
        second = resolver.snapshot().services[0].shards
        self.assertTrue(all(a is b for a, b in zip(first, second)))
        resolver.lease(shards[1].id)
        third = resolver.snapshot().services[0].shards
        self.assertEqual([a is b for a, b in zip(second, third)], [True, False, True])
        self.assertEqual(third[1].open_connections, 1)
        resolver.record_connect_result(shards[0].id, False)
        resolver.record_connect_result(shards[0].id, False)
        self.assertEqual(resolver.snapshot().services[0].shards[0].ejections, 1)
        clock.advance(5.0 + resolver._outlier.reset_after - 1)
        self.assertEqual(resolver.snapshot().services[0].shards[0].ejections, 1)
        clock.advance(1)
        self.assertEqual(resolver.snapshot().services[0].shards[0].ejections, 0)
        self.assertEqual(resolver.snapshot(), reference_snapshot(resolver))

    def test_panic_changes_every_shard_part(self) -> None:
        """
        One of three shards unhealthy: it is not eligible.  A second one
        unhealthy puts the service in panic mode: the first, whose own
        state did not change, is now shown eligible, with its reasons.
        """
        resolver, _, _, shards = build([(0, 100, 1.0, 90.0)] * 3)
        resolver.set_health(shards[0].id, Health.UNHEALTHY)
        before = resolver.snapshot().services[0]
        self.assertEqual((before.panic, before.shards[0].eligible), (False, False))
        resolver.set_health(shards[1].id, Health.UNHEALTHY)
        after = resolver.snapshot().services[0]
        self.assertEqual((after.panic, after.in_rotation, after.eligible_by_policy), (True, 1, 3))
        self.assertEqual([s.eligible for s in after.shards], [True, True, True])
        self.assertEqual(after.shards[0].rejected_by, ("health: unhealthy",))
        self.assertEqual(resolver.snapshot(), reference_snapshot(resolver))
