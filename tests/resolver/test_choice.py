"""
Tests for shardtcp.resolver.choice: the pool the first candidate is drawn
from, and the power-of-two draw on the fair-share ledger, as pure functions.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.resolver import choice
from shardtcp.resolver.choice import Entry, SystemRandom, draw, pool, shares

choice_module = choice

# No example database: the tree is shared, and failures print their input.
_PROPERTY = settings(
    database=None,
    deadline=None,
    max_examples=80,
    suppress_health_check=[HealthCheck.too_slow],
)


class ScriptedRandom:
    """A random source that returns the given values in turn."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def run(weights: list[float], picks: int, rng, ledgers=None) -> tuple[Counter, list[float]]:
    """Draw ``picks`` times from a stable pool, keeping the ledgers."""
    ledgers = list(ledgers) if ledgers is not None else [0.0] * len(weights)
    counts: Counter = Counter()
    for _ in range(picks):
        members = [Entry(i, 0.9, w, False, ledgers[i]) for i, w in enumerate(weights)]
        index, ledger = draw(members, rng)
        ledgers[index] = ledger
        counts[index] += 1
    return counts, ledgers


class PoolTests(SynchronousTestCase):
    """pool(): capacity first, then weight, then the band on base scores."""

    def test_band(self) -> None:
        """Entries within 0.02 of the best base are in; the rest are not."""
        entries = [Entry("a", 0.90, 1, False), Entry("b", 0.885, 1, False),
                   Entry("c", 0.85, 1, False)]
        self.assertEqual([e.item for e in pool(entries)], ["a", "b"])
        self.assertEqual([e.item for e in pool(entries, band=0.1)], ["a", "b", "c"])

    def test_full_shards_only_when_all_full(self) -> None:
        """A full entry is left out while another has room, whatever its score."""
        entries = [Entry("full", 0.99, 1, True), Entry("room", 0.2, 1, False)]
        self.assertEqual([e.item for e in pool(entries)], ["room"])
        both_full = [Entry("a", 0.99, 1, True), Entry("b", 0.2, 1, True)]
        self.assertEqual([e.item for e in pool(both_full)], ["a"])

    def test_zero_weight_last_resort(self) -> None:
        """
        A zero-weight entry is left out while another has weight, even with
        the best base; when all are zero, the band applies to them all.
        """
        entries = [Entry("zero", 0.99, 0.0, False), Entry("far", 0.5, 0.5, False)]
        self.assertEqual([e.item for e in pool(entries)], ["far"])
        zeros = [Entry("a", 0.9, 0.0, False), Entry("b", 0.9, 0.0, False)]
        self.assertEqual([e.item for e in pool(zeros)], ["a", "b"])

    def test_band_ignores_weight(self) -> None:
        """
        The band is on the base score: a shard at a tenth of its weight (slow
        start) stays in the pool, with a tenth of the share.
        """
        entries = [Entry("warm", 0.9, 0.9, False), Entry("cold", 0.9, 0.09, False)]
        members = pool(entries)
        self.assertEqual(len(members), 2)
        self.assertEqual([round(s, 4) for s in shares(members)], [0.9091, 0.0909])

    def test_empty(self) -> None:
        """No entries, no pool; drawing from nothing is an error."""
        self.assertEqual(pool([]), [])
        self.assertRaises(ValueError, draw, [], random.Random(1))


class DrawTests(SynchronousTestCase):
    """draw(): two sampled by weight, the one behind on the ledger wins."""

    def test_single_member(self) -> None:
        """A pool of one is its own draw, and its ledger advances by 1/t."""
        index, ledger = draw([Entry("a", 0.5, 0.5, False, 3.0)], ScriptedRandom())
        self.assertEqual((index, ledger), (0, 5.0))

    def test_ledger_decides_beyond_tie(self) -> None:
        """
        Of two sampled entries, the one far behind on the ledger wins,
        whatever the sampling order.
        """
        members = [Entry("ahead", 1, 1.0, False, 10.0), Entry("behind", 1, 1.0, False, 7.0)]
        for first in (0.1, 0.9):
            index, ledger = draw(members, ScriptedRandom(first, 0.5))
            self.assertEqual(index, 1)
            self.assertEqual(ledger, 8.0)

    def test_close_ledgers_coin(self) -> None:
        """Ledgers less than two picks apart are settled by a weighted coin."""
        members = [Entry("a", 1, 1.0, False, 5.0), Entry("b", 1, 1.0, False, 4.0)]
        self.assertEqual(draw(members, ScriptedRandom(0.1, 0.5, 0.2))[0], 0)
        self.assertEqual(draw(members, ScriptedRandom(0.1, 0.5, 0.7))[0], 1)

    def test_credit_capped(self) -> None:
        """
        An entry whose ledger lags far behind (back after a long absence)
        is lifted to at most CREDIT of its picks behind the leader, so it
        gets its share at once rather than a burst paying back all it
        missed: of 30 draws over three equal entries it takes about 10, plus
        at most the credit.
        """
        counts, _ = run([1.0, 1.0, 1.0], 30, random.Random(7), ledgers=[1000.0, 1000.0, 0.0])
        self.assertLessEqual(counts[2], 10 + choice.CREDIT + 1)

    def test_no_burst_for_slow_start(self) -> None:
        """
        A returning entry at a tenth of the others' weight (slow start) is
        not favoured at all while it catches up: of 20 draws it takes at
        most its share (0.7) rounded up.
        """
        _, ledgers = run([0.9, 0.9, 0.9], 1000, random.Random(5))
        counts, _ = run([0.9, 0.9, 0.9, 0.09], 20, random.Random(9), ledgers=ledgers + [0.0])
        self.assertLessEqual(counts[3], 1)

    def test_weights_are_shares(self) -> None:
        """Over many draws each entry's share is its weight's share, within 10 picks."""
        counts, _ = run([1.0, 2.0, 3.0], 6000, random.Random(3))
        for index, expected in ((0, 1000), (1, 2000), (2, 3000)):
            self.assertLessEqual(abs(counts[index] - expected), 10, counts)

    @_PROPERTY
    @given(
        seed=st.integers(min_value=0, max_value=2**32 - 1),
        count=st.integers(min_value=2, max_value=8),
    )
    def test_property_equal_spread(self, seed: int, count: int) -> None:
        """
        For any seed and 2 to 8 equal entries, 1000 draws give each its
        share within ±10% (pure random choice would miss this for about one
        seed in twenty with three entries).
        """
        counts, _ = run([0.9] * count, 1000, random.Random(seed))
        share = 1000 / count
        for n in (counts[i] for i in range(count)):
            self.assertLessEqual(abs(n - share), 0.1 * share, (seed, counts))

    @_PROPERTY
    @given(
        seed=st.integers(min_value=0, max_value=2**32 - 1),
        weights=st.lists(st.floats(min_value=0.05, max_value=2.0), min_size=2, max_size=6),
    )
    def test_property_weighted_shares(self, seed: int, weights: list[float]) -> None:
        """
        For any weights, 3000 draws give each entry its share within 2% of
        all draws (60 picks).
        """
        counts, _ = run(weights, 3000, random.Random(seed))
        total = sum(weights)
        for i, w in enumerate(weights):
            self.assertLessEqual(abs(counts[i] - 3000 * w / total), 60, (seed, weights, counts))

    def test_every_pair_possible(self) -> None:
        """With equal ledgers every member can come first: the draw is random."""
        firsts = set()
        for seed in range(200):
            members = [Entry(i, 0.9, 0.9, False) for i in range(4)]
            firsts.add(draw(members, random.Random(seed))[0])
        self.assertEqual(firsts, {0, 1, 2, 3})


class SystemRandomTests(SynchronousTestCase):
    """choice.SystemRandom: os.urandom read in chunks, 53 bits a number."""

    def test_numbers_from_the_chunks(self) -> None:
        """
        Each number is the next 7 bytes of the chunk, top 53 bits, over
        2**53; a chunk of 14 bytes gives two numbers, then a new chunk is
        read: all zero bytes give 0.0, all 0xff bytes the largest float
        below 1.
        """
        reads = []

        def urandom(n: int) -> bytes:
            reads.append(n)
            return (b"\x00" * 7 + b"\xff" * 7) * (n // 14)

        source = SystemRandom(chunk=14)
        self.patch(choice_module.os, "urandom", urandom)
        values = [source.random() for _ in range(4)]
        self.assertEqual(values, [0.0, 1 - 2.0 ** -53, 0.0, 1 - 2.0 ** -53])
        self.assertEqual(reads, [14, 14])

    def test_default_chunk(self) -> None:
        """The default chunk is 511 bytes (73 numbers); the numbers lie in [0, 1)."""
        reads = []
        real = choice_module.os.urandom

        def urandom(n: int) -> bytes:
            reads.append(n)
            return real(n)

        self.patch(choice_module.os, "urandom", urandom)
        source = SystemRandom()
        values = [source.random() for _ in range(74)]
        self.assertEqual(reads, [511, 511])
        self.assertTrue(all(0.0 <= v < 1.0 for v in values))
