# -*- test-case-name: tests.resolver.test_shortlist -*-
"""
Incremental orderings of one service's shards, so that ``resolve`` costs
the same at 10 shards and at 10,000.

``ranking.rank`` looks at every shard on every call; it stays the
reference (``explain`` uses it).  A ``ServiceIndex`` keeps what ``rank``
would compute, and recomputes only what changed:

* per shard, its filters, its ``ShardInfo`` and its measured latency
  (``Row``), recomputed when the shard's live state is written (every
  ``ShardState`` attribute write but the draw's ledger lands in the
  index's ``changed`` set) or when time changes it: an ejection ends, a
  measurement ages out, a slow-start ramp begins (a heap of deadlines), or
  a ramp is under way (re-read on every call while it lasts);
* per client location (``Bucket``, at most ``MAX_BUCKETS`` of them, the
  least recently used dropped), the eligible shards' ``Ranked`` values in
  sorted lists: by ``Ranked.rank_key`` (the retry order) and by base score
  within each draw group (full or not, weighted or not), for the healthy
  shards and for all shards passing the hard filters (panic mode).

A call then touches only the shards that changed since the previous one,
the draw's pool and the ``retries`` after it.  The contract, which
``tests.resolver.test_shortlist`` checks against ``ranking.rank`` over
random states: for the same state at the same clock reading, ``pool``
returns the members ``choice.pool`` returns, in the same order, and
``ordered`` the first shards of ``rank``'s ``eligible``, in its order.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from itertools import accumulate
from collections import OrderedDict
from typing import Iterable, Optional

from shardtcp.model import Health, Location
from shardtcp.resolver import choice, ranking
from shardtcp.resolver.state import ShardState

#: Client locations whose orderings are kept per service.
MAX_BUCKETS = 32

#: Past this share of a bucket's shards changed at once, it is rebuilt.
_REBUILD_SHARE = 0.25


class Row:
    """One shard of the index as it stood when last read (mutable)."""

    __slots__ = (
        "state", "position", "expected_ms", "hard", "soft", "info",
        "measured_ms", "version",
    )

    def __init__(self, state: ShardState, position: int, expected_ms: Optional[float]) -> None:
        self.state = state
        self.position = position
        self.expected_ms = expected_ms
        self.hard: tuple[str, ...] = ()
        self.soft: tuple[str, ...] = ()
        self.info = None  # type: ignore[assignment]
        self.measured_ms: Optional[float] = None
        self.version = 0

    @property
    def passing(self) -> bool:
        return not self.hard

    @property
    def healthy(self) -> bool:
        return not self.hard and not self.soft


def _deadline(state: ShardState, now: float, max_age: float) -> Optional[float]:
    """
    Until when the time-dependent inputs of a shard stay as they are at
    ``now``: ``now`` itself when they may change at any moment (a ramp
    under way, a measurement at the very edge of its age), None when only
    a write to its state can change them.
    """
    times = []
    until = state.outlier.ejected_until
    if until is not None and now < until:
        times.append(until)
    since, duration = state.back_since, state.config.slow_start
    if since is not None and duration > 0:
        if now < since:
            times.append(since)
        elif now < since + duration:
            return now
    if state.rtt_ms is not None and state.rtt_at is not None:
        expiry = state.rtt_at + max_age
        if now <= expiry:
            # Still in use at ``expiry`` itself, gone just after.
            times.append(expiry)
    return min(times) if times else None


class Ordered:
    """
    A sorted list of ``(-base, shard id)`` keys with per-block figures
    (``BLOCK`` keys a block: their sum of weights, highest ledger, lowest
    weight), so that the draw reads a pool of thousands of shards in a few
    dozen steps.  A block's figures are worked out when first read, and
    forgotten when its keys move or a ledger in it changes.
    """

    __slots__ = ("items", "sums", "tops", "lows", "stale", "tail", "_lo", "_hi", "_delta", "_swing")

    def __init__(self, items: Optional[list] = None) -> None:
        self.items: list = items if items is not None else []
        blocks = -(-len(self.items) // BLOCK)
        self.sums: list[float] = [0.0] * blocks
        self.tops: list[float] = [0.0] * blocks
        self.lows: list[float] = [0.0] * blocks
        self.stale: set[int] = set(range(blocks))
        # The figures of the pool's last, partial block: (end, figures).
        self.tail: Optional[tuple[int, tuple[float, float, float]]] = None
        self._lo: Optional[int] = None
        self._hi = -1
        self._delta = 0
        self._swing = 0

    def _moved(self, i: int, delta: int) -> None:
        self._lo = i if self._lo is None else min(self._lo, i)
        self._hi = max(self._hi, i)
        self._delta += delta
        self._swing = max(self._swing, abs(self._delta))

    def add(self, key: tuple) -> None:
        i = bisect_left(self.items, key)
        self.items.insert(i, key)
        self._moved(i, 1)

    def discard(self, key: tuple) -> None:
        items = self.items
        i = bisect_left(items, key)
        if i < len(items) and items[i] == key:
            del items[i]
            self._moved(i, -1)

    def touch(self, key: tuple, ledger: float) -> None:
        """
        Take in that the ledger of the shard at ``key`` is now ``ledger``.
        Ledgers only grow, so the block's highest ledger is raised in place;
        a lower value (never written by the draw) forgets the figures.
        """
        items = self.items
        i = bisect_left(items, key)
        if i < len(items) and items[i] == key:
            block = i // BLOCK
            if block < len(self.tops) and ledger >= self.tops[block]:
                self.tops[block] = ledger
                tail = self.tail
                if tail is not None and block == tail[0] // BLOCK and i < tail[0]:
                    total, top, lowest = tail[1]
                    self.tail = (tail[0], (total, max(top, ledger), lowest))
            else:
                self.stale.add(block)
                self.tail = None

    def settle(self) -> None:
        """Forget the figures of every block whose keys moved."""
        if self._lo is None:
            return
        blocks = -(-len(self.items) // BLOCK)
        for figures in (self.sums, self.tops, self.lows):
            del figures[blocks:]
            figures.extend([0.0] * (blocks - len(figures)))
        first = self._lo // BLOCK
        if self._delta:
            # Everything after the first change shifted.
            last = blocks - 1
        else:
            # Keys past every change (and past how far the changes ever
            # shifted them) are back where they were.
            last = min(blocks - 1, (self._hi + self._swing) // BLOCK)
        self.stale = {b for b in self.stale if b < blocks}
        self.stale.update(range(first, last + 1))
        self.tail = None
        self._lo, self._hi, self._delta, self._swing = None, -1, 0, 0

    def figures(self, blocks: int, ranked: dict, uniform: bool) -> None:
        """Work out the figures of the first ``blocks`` blocks still unknown."""
        if not self.stale or min(self.stale) >= blocks:
            return
        items = self.items
        for block in [b for b in self.stale if b < blocks]:
            self.sums[block], self.tops[block], self.lows[block] = _figures(
                items[block * BLOCK:(block + 1) * BLOCK], ranked, uniform
            )
            self.stale.discard(block)


#: Keys per block of an ``Ordered`` list.
BLOCK = 16

#: Pools up to this size are drawn by ``choice.draw`` itself.
SMALL_POOL = 8


class Bucket:
    """The orderings of a service's eligible shards for one client location."""

    def __init__(self, location: Optional[Location]) -> None:
        self.client = ranking.Client("", None, location, "")
        self.pending: set[Row] = set()
        self.ledgers: set[Row] = set()
        self.ranked: dict[str, ranking.Ranked] = {}
        # [panic] -> sorted rank keys; [panic][group] -> Ordered (-base, id).
        self.by_rank: tuple[list, list] = ([], [])
        self.by_base: tuple[list[Ordered], list[Ordered]] = (
            [Ordered() for _ in range(4)], [Ordered() for _ in range(4)],
        )


def _base_key(r: ranking.Ranked) -> tuple[float, str, float]:
    """A shard's key in the by-base lists: best base first, its draw weight."""
    return (-r.base, r.info.shard_id, max(0.0, r.total))


def _group(r: ranking.Ranked) -> int:
    """0: room and weight, 1: room, no weight, 2: full with weight, 3: full."""
    return (2 if r.info.load >= 1.0 else 0) + (0 if r.total > 0 else 1)


def _entry(r: ranking.Ranked) -> choice.Entry:
    return choice.Entry(
        item=r, base=r.base, weight=max(0.0, r.total),
        full=r.info.load >= 1.0, ledger=r.state.ledger if r.state is not None else 0.0,
    )


# Every finite double is a whole number of 2**-1074, the smallest one.
_UNITS = 1 << 1074


def _exact(weight: float) -> int:
    """A weight (negative as 0) as a whole number of 2**-1074."""
    if not 0 < weight < math.inf:
        return 0
    numerator, denominator = float(weight).as_integer_ratio()
    return numerator << (1074 - denominator.bit_length() + 1)


class EligibleTotals:
    """
    The open connections (this proxy's and the fleet's) and operator
    weights of a service's eligible shards, added up as each shard is read
    (for bounded load by shard key, without a pass over every shard), for
    both eligible sets: the healthy shards, and in panic mode every shard
    passing the hard filters.  ``weights_version`` grows whenever a shard's
    operator weight changes.
    """

    __slots__ = ("_counted", "_open", "_weight", "_weight_float", "weights_version")

    def __init__(self) -> None:
        # row -> (healthy, passing, open connections, weight) as counted
        self._counted: dict[Row, tuple[bool, bool, int, float]] = {}
        self._open = [0, 0]
        # Exact sums, in units of the smallest double: no drift however
        # many times a shard comes and goes.
        self._weight = [0, 0]
        self._weight_float = [0.0, 0.0]
        self.weights_version = 0

    def read(self, row: Row) -> None:
        """Count a shard as it was just read, in place of how it was counted."""
        state = row.state
        now = (row.healthy, row.passing, state.open_connections + state.remote_connections, state.weight)
        before = self._counted.get(row)
        if before == now:
            return
        self._counted[row] = now
        if before is not None:
            self._add(before, -1, weight=before[:2] != now[:2] or before[3] != now[3])
            if before[3] != now[3]:
                self.weights_version += 1
        self._add(now, 1, weight=before is None or before[:2] != now[:2] or before[3] != now[3])

    def _add(self, counted: tuple, sign: int, weight: bool) -> None:
        healthy, passing, open_, shard_weight = counted
        if healthy:
            self._open[0] += sign * open_
        if passing:
            self._open[1] += sign * open_
        if weight:
            share = sign * _exact(shard_weight)
            if healthy:
                self._weight[0] += share
                self._weight_float[0] = self._weight[0] / _UNITS
            if passing:
                self._weight[1] += share
                self._weight_float[1] = self._weight[1] / _UNITS

    def of(self, panic: bool) -> tuple[int, float]:
        """The eligible shards' open connections and weight (panic: all passing)."""
        i = 1 if panic else 0
        return self._open[i], self._weight_float[i]


class ServiceIndex:
    """
    The live orderings of one service (see the module docstring).

    ``changed`` is the set the service's ``ShardState`` objects add
    themselves to when written; the resolver hands it to them.
    """

    def __init__(self, table: ranking.ServiceTable, settings: ranking.Settings) -> None:
        self.table = table
        self.settings = settings
        self.changed: set[ShardState] = set()
        self._rows = {
            state: Row(state, i, expected)
            for i, (state, expected) in enumerate(zip(table.shards, table.expected_ms))
        }
        self._ordered_rows = list(self._rows.values())
        self._deadlines: list[tuple[float, int, int, Row]] = []
        self._volatile: set[Row] = set()
        self._buckets: OrderedDict[Optional[Location], Bucket] = OrderedDict()
        self._sequence = 0
        self._last_now: Optional[float] = None
        self.passing = 0
        self.healthy = 0
        self.totals = EligibleTotals()
        self._fresh = False
        for state in table.shards:
            state.changed = self.changed

    # -- per shard ------------------------------------------------------------

    def _read(self, row: Row, now: float) -> None:
        """Read a shard's filters, info and measurement again at ``now``."""
        table, state = self.table, row.state
        if row.info is not None:
            self.passing -= row.passing
            self.healthy -= row.healthy
        soft = state.sickness(now)
        drains = state.drains()
        minimum = table.config.policy.min_security_score
        security = state.security_score
        if security < minimum or table.regions:
            location = state.config.location
            hard = drains + ranking.policy_reasons(
                table, security, location.region if location is not None else ""
            )
        else:
            hard = drains
        health = Health.UNHEALTHY if soft else Health.DRAINING if drains else Health.HEALTHY
        row.hard, row.soft = tuple(hard), tuple(soft)
        row.info = state.info(now, health)
        row.measured_ms = state.measured_ms(now, self.settings.rtt_max_age)
        self.passing += row.passing
        self.healthy += row.healthy
        row.version += 1
        self.totals.read(row)
        self._volatile.discard(row)
        until = _deadline(state, now, self.settings.rtt_max_age)
        if until is not None:
            if until <= now:
                self._volatile.add(row)
            else:
                self._sequence += 1
                heapq.heappush(self._deadlines, (until, self._sequence, row.version, row))

    def refresh(self, now: float) -> list[Row]:
        """
        Bring every shard up to ``now``; return the rows that were read
        again (in no particular order), for the caller's own notes.
        """
        if not self._fresh or (self._last_now is not None and now < self._last_now):
            # First use, or the clock went back: read everything.
            self._fresh = True
            self.changed.clear()
            self._deadlines.clear()
            self._volatile.clear()
            self.passing = self.healthy = 0
            for row in self._ordered_rows:
                row.info = None
            for row in self._ordered_rows:
                self._read(row, now)
            self._buckets.clear()
            self._last_now = now
            return list(self._ordered_rows)
        self._last_now = now
        if not self.changed and not self._volatile and (
            not self._deadlines or self._deadlines[0][0] > now
        ):
            return []
        rows = self._rows
        touched = {rows[s] for s in self.changed if s in rows}
        self.changed.clear()
        touched |= self._volatile
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, version, row = heapq.heappop(deadlines)
            if version == row.version:
                touched.add(row)
        for row in touched:
            self._read(row, now)
        if touched:
            for bucket in self._buckets.values():
                bucket.pending |= touched
        return list(touched)

    # -- per client location ----------------------------------------------------

    def _rank_one(self, bucket: Bucket, row: Row) -> ranking.Ranked:
        return ranking.score(
            row.info, row.state, bucket.client, self.table.config.weights,
            row.expected_ms, row.measured_ms, (), row.soft,
        )

    def _place(self, bucket: Bucket, row: Row, r: ranking.Ranked) -> None:
        bucket.ranked[r.info.shard_id] = r
        key = r.rank_key()
        base = _base_key(r)
        group = _group(r)
        insort(bucket.by_rank[1], key)
        bucket.by_base[1][group].add(base)
        if not row.soft:
            insort(bucket.by_rank[0], key)
            bucket.by_base[0][group].add(base)

    def _remove(self, bucket: Bucket, row: Row) -> None:
        r = bucket.ranked.pop(row.state.config.id, None)
        if r is None:
            return
        key = r.rank_key()
        base = _base_key(r)
        group = _group(r)
        panics = (1,) if r.set_aside else (0, 1)
        for panic in panics:
            items = bucket.by_rank[panic]
            i = bisect_left(items, key)
            if i < len(items) and items[i] == key:
                del items[i]
            bucket.by_base[panic][group].discard(base)

    def _build(self, bucket: Bucket) -> None:
        bucket.pending.clear()
        bucket.ledgers.clear()
        bucket.ranked.clear()
        keyed: tuple[list, list] = ([], [])
        based: tuple[list[list], list[list]] = ([[], [], [], []], [[], [], [], []])
        for row in self._ordered_rows:
            if row.hard:
                continue
            r = self._rank_one(bucket, row)
            bucket.ranked[r.info.shard_id] = r
            key = r.rank_key()
            base = _base_key(r)
            group = _group(r)
            keyed[1].append(key)
            based[1][group].append(base)
            if not row.soft:
                keyed[0].append(key)
                based[0][group].append(base)
        for items in (*keyed, *based[0], *based[1]):
            items.sort()
        bucket.by_rank = keyed
        bucket.by_base = (
            [Ordered(items) for items in based[0]], [Ordered(items) for items in based[1]],
        )

    def drawn(self, row_state: ShardState) -> None:
        """Note that the draw moved a shard's ledger."""
        row = self._rows.get(row_state)
        if row is not None:
            for bucket in self._buckets.values():
                bucket.ledgers.add(row)

    def bucket(self, location: Optional[Location]) -> Bucket:
        """The up-to-date orderings for clients at ``location``."""
        buckets = self._buckets
        bucket = buckets.get(location)
        if bucket is None:
            bucket = Bucket(location)
            self._build(bucket)
            buckets[location] = bucket
            if len(buckets) > MAX_BUCKETS:
                buckets.popitem(last=False)
            return bucket
        buckets.move_to_end(location)
        pending = bucket.pending
        if pending:
            if len(pending) > _REBUILD_SHARE * len(self._ordered_rows) + 8:
                self._build(bucket)
            else:
                for row in pending:
                    self._remove(bucket, row)
                    if not row.hard:
                        self._place(bucket, row, self._rank_one(bucket, row))
                pending.clear()
                for lists in bucket.by_base:
                    for ordered in lists:
                        ordered.settle()
        if bucket.ledgers:
            for row in bucket.ledgers:
                r = bucket.ranked.get(row.state.config.id)
                if r is not None:
                    base = _base_key(r)
                    for lists in bucket.by_base:
                        lists[_group(r)].touch(base, row.state.ledger)
            bucket.ledgers.clear()
        return bucket

    # -- what resolve asks ----------------------------------------------------------

    @property
    def panic(self) -> bool:
        """Whether panic mode is in force, as ``ranking.select`` decides."""
        return bool(self.passing) and self.healthy < self.settings.panic_threshold * self.passing

    def _group_of_pool(self, bucket: Bucket) -> tuple[Optional[Ordered], int]:
        groups = bucket.by_base[1 if self.panic else 0]
        for group in ((0, 1) if groups[0].items or groups[1].items else (2, 3)):
            if groups[group].items:
                return groups[group], group
        return None, 0

    def pool_size(self, bucket: Bucket, band: float) -> int:
        """How many shards ``choice.pool`` would return."""
        ordered, _ = self._group_of_pool(bucket)
        if ordered is None:
            return 0
        return _pool_end(ordered.items, band)

    def pool(self, bucket: Bucket, band: float) -> list[choice.Entry]:
        """``choice.pool`` of the eligible shards, in rank order."""
        ordered, _ = self._group_of_pool(bucket)
        if ordered is None:
            return []
        items = ordered.items
        ranked = bucket.ranked
        members = [ranked[key[1]] for key in items[: _pool_end(items, band)]]
        members.sort(key=ranking.Ranked.rank_key)
        return [_entry(r) for r in members]

    def draw(
        self, bucket: Bucket, band: float, rng: choice.RandomSource
    ) -> Optional[tuple[ranking.Ranked, float]]:
        """
        Draw the first candidate as ``choice.draw`` over ``pool`` would
        (None: no shard is eligible): the same function for a pool of up
        to ``SMALL_POOL`` shards; above, the same pool, highest ledger,
        longest stride and rules, with each of the two shards sampled in
        proportion to its weight from the blocks' sums, without reading
        the whole pool.  Returns the shard and its new ledger value.
        """
        ordered, group = self._group_of_pool(bucket)
        if ordered is None:
            return None
        items = ordered.items
        end = _pool_end(items, band)
        ranked = bucket.ranked
        if end <= SMALL_POOL:
            members = [ranked[key[1]] for key in items[:end]]
            members.sort(key=ranking.Ranked.rank_key)
            entries = [_entry(r) for r in members]
            index, ledger = choice.draw(entries, rng)
            return members[index], ledger
        uniform = group in (1, 3)
        full = end // BLOCK
        ordered.figures(full, ranked, uniform)
        sums = ordered.sums[:full]
        tops = ordered.tops[:full]
        lows = ordered.lows[:full]
        if end > full * BLOCK:
            if ordered.tail is not None and ordered.tail[0] == end:
                tail = ordered.tail[1]
            else:
                tail = _figures(items[full * BLOCK:end], ranked, uniform)
                ordered.tail = (end, tail)
            sums.append(tail[0])
            tops.append(tail[1])
            lows.append(tail[2])
        total = sum(sums)
        top = max(tops)
        spread = 1.0 if uniform else 1.0 / min(lows)
        a = _sample(items, end, sums, total, uniform, rng, None)
        weight_a = 1.0 if uniform else items[a][2]
        sums[a // BLOCK] -= weight_a
        b = _sample(items, end, sums, total - weight_a, uniform, rng, a)
        first, second = ranked[items[a][1]], ranked[items[b][1]]
        state_a, state_b = first.state, second.state
        a_wins, ledger = choice.duel_values(
            state_a.ledger if state_a is not None else 0.0, items[a][2],
            state_b.ledger if state_b is not None else 0.0, items[b][2],
            top, spread, uniform, rng,
        )
        return (first if a_wins else second), ledger

    def ordered(self, bucket: Bucket, count: Optional[int] = None) -> list[ranking.Ranked]:
        """The first ``count`` eligible shards in rank order (all: None)."""
        keys = bucket.by_rank[1 if self.panic else 0]
        if count is not None:
            keys = keys[:count]
        ranked = bucket.ranked
        return [ranked[key[3]] for key in keys]

    def rejections(self) -> dict[str, tuple[str, ...]]:
        """Every shard's filter reasons, in record order."""
        return {row.info.shard_id: row.soft + row.hard for row in self._ordered_rows}

    def rows(self) -> Iterable[Row]:
        """Every row, in record order."""
        return iter(self._ordered_rows)


def _pool_end(items: list, band: float) -> int:
    """How many keys, from the best, have a base within ``band`` of it."""
    floor = -items[0][0] - band
    # base >= floor  <=>  -base <= -floor; keys are (-base, id).
    return bisect_left(items, (math.nextafter(-floor, math.inf),))


def _figures(
    keys: list, ranked: dict[str, ranking.Ranked], uniform: bool
) -> tuple[float, float, float]:
    """A block's sum of weights, highest ledger and lowest weight."""
    top = -math.inf
    for key in keys:
        state = ranked[key[1]].state
        ledger = state.ledger if state is not None else 0.0
        if ledger > top:
            top = ledger
    if uniform:
        return float(len(keys)), top, 1.0
    weights = [key[2] for key in keys]
    return sum(weights), top, min(weights)


def _sample(
    items: list, end: int, sums: list, total: float, uniform: bool,
    rng: choice.RandomSource, skip: Optional[int],
) -> int:
    """
    The position of a key among the first ``end``, drawn in proportion to
    its weight (``skip`` excluded; ``sums`` already leaves it out): the
    blocks' running sums find the block, then the keys within it.
    """
    target = rng.random() * total
    running = list(accumulate(sums))
    block = bisect_right(running, target)
    last = None
    while block < len(sums):
        start = block * BLOCK
        stop = min(start + BLOCK, end)
        if uniform:
            weights = [1.0] * (stop - start)
        else:
            weights = [key[2] for key in items[start:stop]]
        if skip is not None and start <= skip < stop:
            weights[skip - start] = 0.0
        before = running[block - 1] if block else 0.0
        within = list(accumulate(weights, initial=before))
        i = bisect_right(within, target, 1)
        if i < len(within):
            return start + i - 1
        positive = [j for j, w in enumerate(weights) if w > 0]
        if positive:
            last = start + positive[-1]
        # Rounding within the block: the next one takes it.
        block += 1
    # Rounding can leave the target past the sum: the last positive weight
    # takes it, as in choice.draw.
    if last is not None:
        return last
    return next(i for i in range(end - 1, -1, -1) if i != skip)
