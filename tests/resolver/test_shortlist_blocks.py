"""
Tests for the blocks of ``shardtcp.resolver.shortlist.Ordered``: after
any sequence of changes they hold the keys of a plain sorted list, with
the figures of their own keys; a key added or taken out forgets the
figures of its own block only, wherever it stands; and the draw over a
list built by many changes chooses what it chooses over the same keys
built at once.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from shardtcp.resolver import choice, shortlist
from shardtcp.resolver.shortlist import BLOCK, Ordered

from tests.resolver.test_resolver import US_CLIENT, request
from tests.resolver.test_shortlist import build
from tests.support import NEW_YORK


def _ranked(ids) -> dict:
    """Shard id -> a stand-in for its ``Ranked`` value, with a ledger."""
    return {i: SimpleNamespace(state=SimpleNamespace(ledger=0.0)) for i in ids}


def _key(rng: random.Random, shard_id: str) -> tuple:
    return (-rng.choice([1.0, 2.0, 2.5, 3.0]), shard_id, rng.choice([0.25, 0.3, 1.0, 1.7]))


class InvariantTests(SynchronousTestCase):
    """``Ordered`` against a plain sorted list, over random changes."""

    def check(self, ordered: Ordered, plain: list, ranked: dict) -> None:
        self.assertEqual(ordered.items, plain)
        self.assertEqual(len(ordered), len(plain))
        blocks = ordered.blocks
        self.assertEqual(ordered.lasts, [block[-1] for block in blocks])
        for figures in (ordered.sums, ordered.tops, ordered.lows, ordered.stale):
            self.assertEqual(len(figures), len(blocks))
        for block in blocks:
            self.assertLessEqual(len(block), 2 * BLOCK)
            self.assertGreaterEqual(len(block), BLOCK // 2 if len(blocks) > 1 else 1)
        # Every block's figures, once worked out, are those of the keys
        # at its positions in the plain list.
        ordered.figures(len(blocks), ranked, False)
        self.assertEqual(ordered.stale, bytes(len(blocks)))
        start = 0
        for b, block in enumerate(blocks):
            keys = plain[start:start + len(block)]
            start += len(block)
            self.assertEqual(ordered.sums[b], sum(k[2] for k in keys))
            self.assertEqual(ordered.tops[b], max(ranked[k[1]].state.ledger for k in keys))
            self.assertEqual(ordered.lows[b], min(k[2] for k in keys))
        self.assertEqual(start, len(plain))

    def test_random_changes_keep_the_plain_order_and_figures(self) -> None:
        """
        Over 4 seeds, 2,500 random adds, discards (of keys there and not
        there), replaces (in place and moving) and ledger changes (up and
        down) on a list grown from empty and on one built from 200 keys,
        the blocks hold the plain sorted list's keys in its order, each
        between ``BLOCK // 2`` and ``2 * BLOCK`` long, and every block's
        sum of weights, highest ledger and lowest weight are those of the
        plain list's keys at the block's positions, checked after every
        change, with figures worked out between changes (so that blocks
        split and dropped after their figures were known are covered).
        """
        for seed in range(4):
            rng = random.Random(seed)
            ids = [f"s{i:04d}" for i in range(600)]
            ranked = _ranked(ids)
            present: dict[str, tuple] = {}
            if seed % 2:
                for shard_id in rng.sample(ids, 200):
                    present[shard_id] = _key(rng, shard_id)
            plain = sorted(present.values())
            ordered = Ordered(list(plain))
            self.check(ordered, plain, ranked)
            splits = merges = 0
            for step in range(2500):
                blocks_before = len(ordered.blocks)
                shard_id = rng.choice(ids)
                op = rng.random()
                # Grow to about 250 keys, shrink to none, grow again.
                growing = (step // 800) % 2 == 0
                if op < (0.5 if growing else 0.1):
                    if shard_id not in present:
                        key = present[shard_id] = _key(rng, shard_id)
                        ordered.add(key)
                        plain.append(key)
                        plain.sort()
                elif op < 0.7:
                    if present and rng.random() < 0.9:
                        shard_id = rng.choice(sorted(present))
                    key = present.pop(shard_id, None) or _key(rng, shard_id)
                    ordered.discard(key)
                    if key in plain:
                        plain.remove(key)
                elif op < 0.85:
                    if shard_id in present:
                        old = present[shard_id]
                        # Half of them in place: only the weight moves.
                        new = (
                            (old[0], old[1], rng.choice([0.4, 1.1]))
                            if rng.random() < 0.5 else _key(rng, shard_id)
                        )
                        present[shard_id] = new
                        ordered.replace(old, new)
                        plain.remove(old)
                        plain.append(new)
                        plain.sort()
                else:
                    state = ranked[shard_id].state
                    state.ledger = max(0.0, state.ledger + rng.choice([-1.0, 0.5, 2.0]))
                    if shard_id in present:
                        ordered.touch(present[shard_id], state.ledger)
                    else:
                        # Not in the list: nothing to take in.
                        ordered.touch(_key(rng, shard_id), state.ledger)
                splits += len(ordered.blocks) > blocks_before
                merges += len(ordered.blocks) < blocks_before
                if step % 3 == 0:
                    self.check(ordered, plain, ranked)
                else:
                    self.assertEqual(ordered.items, plain)
            self.check(ordered, plain, ranked)
            # The sequence did split and merge blocks.
            self.assertGreater(splits, 5)
            self.assertGreater(merges, 5)

    def test_empty_and_single_key(self) -> None:
        """
        An empty list has no block; its first key makes one, taking that
        key out drops it, and a discard or touch of a key not there is
        ignored.
        """
        ranked = _ranked(["a", "b"])
        ordered = Ordered()
        self.assertEqual((ordered.blocks, len(ordered)), ([], 0))
        ordered.discard((-1.0, "a", 1.0))
        ordered.touch((-1.0, "a", 1.0), 3.0)
        ordered.add((-1.0, "a", 1.0))
        self.check(ordered, [(-1.0, "a", 1.0)], ranked)
        ordered.discard((-1.0, "b", 1.0))
        self.assertEqual(ordered.items, [(-1.0, "a", 1.0)])
        ordered.discard((-1.0, "a", 1.0))
        self.assertEqual((ordered.blocks, ordered.lasts, ordered.stale, len(ordered)), ([], [], b"", 0))


class BoundedWorkTests(SynchronousTestCase):
    """A change forgets the figures of its own block only."""

    def setUp(self) -> None:
        rng = random.Random(5)
        self.ids = [f"s{i:04d}" for i in range(1000)]
        self.ranked = _ranked(self.ids)
        for shard_id in self.ids:
            self.ranked[shard_id].state.ledger = rng.random()
        self.keys = sorted(
            (-float(i // 3), shard_id, 0.5 + (i % 7) / 3) for i, shard_id in enumerate(self.ids)
        )
        self.ordered = Ordered(list(self.keys))
        self.ordered.figures(len(self.ordered.blocks), self.ranked, False)
        self.calls: list[int] = []
        figures = shortlist._figures

        def counted(keys, ranked, uniform):
            self.calls.append(len(keys))
            return figures(keys, ranked, uniform)

        self.patch(shortlist, "_figures", counted)

    def worked_out(self) -> int:
        """How many blocks' figures the next read works out."""
        del self.calls[:]
        self.ordered.figures(len(self.ordered.blocks), self.ranked, False)
        return len(self.calls)

    def test_one_block_for_a_change_at_either_edge_or_a_boundary(self) -> None:
        """
        In a list of 1,000 keys (63 blocks) whose figures are all known,
        taking out or putting back its first key, its last key, the last
        key of block 20 or the first key of block 21, or moving a key from
        the first block to the last, has the next read work out the
        figures of one block (two for the move: the block it left and the
        one it joined), where positions fixed by offset would shift every
        block after the change; the figures then match the keys again.
        """
        ordered = self.ordered
        self.assertEqual(len(ordered.blocks), 63)
        self.assertEqual(self.worked_out(), 0)
        for pick in (
            lambda: ordered.blocks[0][0],
            lambda: ordered.blocks[-1][-1],
            lambda: ordered.blocks[20][-1],
            lambda: ordered.blocks[21][0],
        ):
            key = pick()
            ordered.discard(key)
            self.assertEqual(self.worked_out(), 1)
            self.assertNotIn(key, ordered.items)
            ordered.add(key)
            self.assertEqual(self.worked_out(), 1)
            self.assertEqual(ordered.items, self.keys)
        first = ordered.blocks[0][0]
        moved = (ordered.blocks[-1][-1][0] + 1.0, first[1], first[2])
        ordered.replace(first, moved)
        self.assertEqual(self.worked_out(), 2)
        self.assertEqual(ordered.blocks[-1][-1], moved)
        ordered.replace(moved, first)
        self.assertEqual(ordered.items, self.keys)
        self.assertEqual(self.worked_out(), 2)
        InvariantTests.check(self, ordered, self.keys, self.ranked)

    def test_split_and_merge_forget_two_blocks_and_one(self) -> None:
        """
        Seventeen keys added to block 10 (16 keys) split it at its 33rd
        key: the next read works out two blocks, of 16 and 17 keys, and
        not the other 62; taking them out again merges the two halves back
        into one block of 16, the one block then worked out.  Nine keys
        taken out of block 30 leave it 7 keys, under ``BLOCK // 2``: it
        merges with block 31 into one of 23 keys, and the next read works
        out that one block; the same at the last block (8 keys, one taken
        out), which merges with the one before.
        """
        ordered = self.ordered
        low, high = ordered.blocks[10][0], ordered.blocks[10][-1]
        self.assertLess(low[0], high[0])
        # After the block's first keys (``x`` sorts after ``s``), before its last.
        added = [(low[0], f"x{i:02d}", 1.0) for i in range(17)]
        self.ranked.update(_ranked(key[1] for key in added))
        for key in added[:16]:
            ordered.add(key)
        self.assertEqual(len(ordered.blocks), 63)
        self.assertEqual(len(ordered.blocks[10]), 32)
        ordered.add(added[16])
        self.assertEqual(len(ordered.blocks), 64)
        self.assertEqual(self.calls, [])
        self.assertEqual(self.worked_out(), 2)
        self.assertEqual(sorted(self.calls), [16, 17])
        for key in added:
            ordered.discard(key)
        # The first half shrinks under ``BLOCK // 2`` and merges with the
        # second: one block of 16 keys again.
        self.assertEqual(ordered.items, self.keys)
        self.assertEqual(len(ordered.blocks), 63)
        self.assertEqual(self.worked_out(), 1)
        self.assertEqual(self.calls, [16])
        blocks = len(ordered.blocks)
        taken = ordered.blocks[30][:9]
        for key in taken:
            ordered.discard(key)
        self.assertEqual(len(ordered.blocks), blocks - 1)
        self.assertEqual(len(ordered.blocks[30]), 23)
        self.assertEqual(self.worked_out(), 1)
        self.assertEqual(self.calls, [23])
        # The last block, 8 keys (1,000 = 62 * 16 + 8), one taken out.
        self.assertEqual((len(ordered.blocks[-2]), len(ordered.blocks[-1])), (16, 8))
        taken.append(ordered.blocks[-1][0])
        ordered.discard(taken[-1])
        self.assertEqual(len(ordered.blocks), blocks - 2)
        self.assertEqual(self.worked_out(), 1)
        self.assertEqual(self.calls, [23])
        InvariantTests.check(self, ordered, sorted(set(self.keys) - set(taken)), self.ranked)

    def test_an_ejection_in_a_large_pool_reads_one_block(self) -> None:
        """
        In a 600-shard service, the shard at the head of the draw's pool
        ejected after two refused connects is taken out of the lists; the
        next resolve works out the figures of its block only (the pool is
        every shard, 38 whole blocks, no partial one), not the 37 blocks
        after the head; once the ejection ends and the shard is back, the
        same.
        """
        resolver, clock, _, _ = build([(0, 100, 0.3 + (i % 5) / 7, 90.0) for i in range(600)], seed=2)
        resolver.resolve(request(US_CLIENT))
        index = resolver._indexes["api"]
        ordered, group = index._group_of_pool(index.bucket(NEW_YORK))
        self.assertEqual(group, 0)
        self.assertEqual(shortlist._pool_end(ordered, choice.DEFAULT_BAND), 600)
        self.assertEqual(ordered.pool_end(choice.DEFAULT_BAND), (38, 0))
        head = ordered.blocks[0][0][1]
        for _ in range(2):
            lease = resolver.lease(head)
            resolver.record_connect_result(head, False, None)
            lease.release()
        del self.calls[:]
        resolver.resolve(request(US_CLIENT))
        self.assertNotIn(head, [key[1] for key in ordered.items])
        self.assertEqual(len(self.calls), 1)
        clock.advance(30.0)
        del self.calls[:]
        resolver.resolve(request(US_CLIENT))
        self.assertIn(head, [key[1] for key in ordered.items])
        self.assertEqual(len(self.calls), 1)


class SameDrawTests(SynchronousTestCase):
    """The draw does not depend on how the list's blocks came to be."""

    def test_a_list_built_by_changes_draws_as_one_built_at_once(self) -> None:
        """
        Two identical 400-shard resolvers with the same seeded random
        numbers; in the second, the draw's list is replaced by one holding
        the same keys but grown key by key in random order, with 300
        passing keys added and taken out and keys moved away and back on
        the way (its blocks of other lengths than the first's).  Over
        1,500 resolves, a lease taken on the chosen shard every 7th (moving
        keys in both lists alike), both choose the same shards in the same
        order.
        """
        weights = [0.3, 0.7, 1.3, 2.9, 0.45]
        specs = [(0, 100, weights[i % 5], 90.0) for i in range(400)]
        first, _, _, _ = build(specs, seed=11)
        second, _, _, _ = build(specs, seed=11)
        for resolver in (first, second):
            resolver.resolve(request(US_CLIENT))
        index = second._indexes["api"]
        bucket = index.bucket(NEW_YORK)
        ordered, group = index._group_of_pool(bucket)
        self.assertEqual(group, 0)
        keys = ordered.items
        rng = random.Random(3)
        grown = Ordered()
        passing: list[tuple] = []
        for key in rng.sample(keys, len(keys)):
            grown.add(key)
            if rng.random() < 0.75:
                extra = (key[0] + rng.choice([-0.5, 0.25]), key[1], rng.choice([0.2, 2.2]))
                grown.add(extra)
                passing.append(extra)
            if passing and rng.random() < 0.4:
                grown.discard(passing.pop(rng.randrange(len(passing))))
            if rng.random() < 0.1:
                grown.figures(len(grown.blocks), bucket.ranked, False)
        for extra in passing:
            grown.discard(extra)
        for key in rng.sample(keys, 60):
            away = (key[0] - 7.0, key[1], key[2])
            grown.replace(key, away)
            grown.replace(away, key)
        self.assertEqual(grown.items, keys)
        self.assertNotEqual(
            [len(b) for b in grown.blocks], [len(b) for b in ordered.blocks]
        )
        bucket.by_base[0][group] = grown
        bucket.view = None
        chosen: tuple[list, list] = ([], [])
        for step in range(1500):
            for resolver, got in zip((first, second), chosen):
                candidate = resolver.resolve(request(US_CLIENT), 0)[0]
                got.append(candidate.shard.shard_id)
                if step % 7 == 0:
                    resolver.lease(candidate.shard.shard_id)
        self.assertIsNone(index.view(bucket, choice.DEFAULT_BAND).members)
        self.assertEqual(chosen[0], chosen[1])
        self.assertGreater(len(set(chosen[0])), 300)
