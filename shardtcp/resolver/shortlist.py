# -*- test-case-name: tests.resolver.test_shortlist -*-
"""
Incremental orderings of one service's shards, so that ``resolve`` costs
the same at 10 shards and at 10,000.

``ranking.rank`` looks at every shard on every call; it stays the
reference (``explain`` uses it).  A ``ServiceIndex`` keeps what ``rank``
would compute, and recomputes only what changed:

* per shard, its filters, its ``ShardInfo`` and its measured latency
  (``Row``), read again when the shard's live state is written (every
  ``ShardState`` attribute write but the draw's ledger lands in the
  index's ``changed`` set) or when time changes it: an ejection ends, a
  measurement ages out, a slow-start ramp begins (a heap of deadlines, one
  entry per shard), or a ramp is under way (re-read on every call while it
  lasts); the filters and the ``ShardInfo`` are made again only when what
  they read moved (a lease, a connect result or a measurement leaves the
  filters as they were);
* per client location (``Bucket``, at most ``MAX_BUCKETS`` of them, the
  least recently used dropped), the eligible shards' ``Ranked`` values in
  sorted lists: by ``Ranked.rank_key`` (the retry order) and by base score
  within each draw group (full or not, weighted or not), for the healthy
  shards and for all shards passing the hard filters (panic mode);
* per bucket, the draw's pool (``View``): its members, running weights,
  highest ledger and longest stride, and the retry order, kept until a
  shard's key in the bucket moves (a shard scored again to the same keys
  only has its value replaced); meanwhile only the highest ledger moves,
  raised as the draw writes ledgers (they only grow).  A shard scored
  again moves within its lists; the by-base lists are held in blocks
  (``Ordered``), so that a key added or taken out forgets the figures of
  its own block only, worked out again when a pool large enough to read
  them is next worked out.

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
from typing import Iterable, Optional

from shardtcp.model import Health, Location
from shardtcp.resolver import choice, ranking, scoring
from shardtcp.resolver.state import ShardState

#: Client locations whose orderings are kept per service.
MAX_BUCKETS = 32

#: Past this share of a bucket's shards changed at once, it is rebuilt.
_REBUILD_SHARE = 0.25


class Row:
    """One shard of the index as it stood when last read (mutable)."""

    __slots__ = (
        "state", "position", "expected_ms", "hard", "soft", "info",
        "measured_ms", "version", "kept", "filtered", "health", "until", "queued", "loaded",
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
        # What the resolver's snapshot made of this row, and for which
        # version of it (``ShardResolver.snapshot``).
        self.kept: Optional[tuple] = None
        # The inputs the filters were last worked out from (``_filter_inputs``)
        # and the health they gave.
        self.filtered: Optional[tuple] = None
        # The inputs ``info`` was last made from (``ServiceIndex._read``).
        self.loaded: Optional[tuple] = None
        self.health = Health.HEALTHY
        # Until when the time-dependent inputs stay as read (``_deadline``),
        # and the time of this row's one live entry in the deadline heap.
        self.until: Optional[float] = None
        self.queued: Optional[float] = None

    @property
    def passing(self) -> bool:
        return not self.hard

    @property
    def healthy(self) -> bool:
        return not self.hard and not self.soft


def _deadline(state: ShardState, now: float, max_age: float) -> Optional[float]:
    """
    Until when the time-dependent inputs of a shard stay as they are at
    ``now``: the end of an ejection, the next step of a slow-start ramp,
    the age limit of a measurement; None when only a write to its state
    can change them.
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
            times.append(scoring.slow_start_next(since, now, duration))
    if state.rtt_ms is not None and state.rtt_at is not None:
        expiry = state.rtt_at + max_age
        if now <= expiry:
            # Still in use at ``expiry`` itself, gone just after.
            times.append(expiry)
    return min(times) if times else None


class Ordered:
    """
    A sorted list of ``(-base, shard id, weight)`` keys held as a sequence
    of blocks (separate lists of ``BLOCK // 2`` to ``2 * BLOCK`` keys, one
    block when there are fewer), each with its figures (its sum of
    weights, highest ledger, lowest weight), so that the draw reads a pool
    of thousands of shards in a few dozen steps.  A key added or taken out
    moves only the keys of its own block: that block's figures are
    forgotten (both halves' when it splits), the others stay.  A block's
    figures are worked out when next read, and forgotten when a ledger in
    it goes down.
    """

    __slots__ = ("blocks", "lasts", "sums", "tops", "lows", "stale", "size")

    def __init__(self, items: Optional[list] = None) -> None:
        items = items if items is not None else []
        #: The keys, block by block, and each block's last key.
        self.blocks: list[list] = [items[i:i + BLOCK] for i in range(0, len(items), BLOCK)]
        if len(self.blocks) > 1 and len(self.blocks[-1]) < BLOCK // 2:
            # No block shorter than ``BLOCK // 2`` but a lone one.
            self.blocks[-2].extend(self.blocks.pop())
        self.lasts: list = [block[-1] for block in self.blocks]
        count = len(self.blocks)
        self.sums: list[float] = [0.0] * count
        self.tops: list[float] = [0.0] * count
        self.lows: list[float] = [0.0] * count
        # Per block, 1 while its figures are not known (moved with the
        # blocks as they split and merge, as the figures are).
        self.stale = bytearray(b"\x01" * count)
        self.size = len(items)

    def __len__(self) -> int:
        return self.size

    @property
    def items(self) -> list:
        """Every key, in order (a new list)."""
        return [key for block in self.blocks for key in block]

    def head(self, count: int) -> list:
        """The first ``count`` keys (a new list)."""
        got: list = []
        for block in self.blocks:
            if len(got) + len(block) >= count:
                got.extend(block[:count - len(got)])
                break
            got.extend(block)
        return got

    def _locate(self, key: tuple) -> tuple[int, int]:
        """The block and offset where ``key`` is or would go (block -1: no block)."""
        lasts = self.lasts
        b = bisect_left(lasts, key)
        if b == len(lasts):
            b -= 1
            return b, (len(self.blocks[b]) if b >= 0 else 0)
        return b, bisect_left(self.blocks[b], key)

    def _new_block(self, b: int, keys: list) -> None:
        """Put a block of ``keys`` at ``b``, its figures unknown."""
        self.blocks.insert(b, keys)
        self.lasts.insert(b, keys[-1])
        for figures in (self.sums, self.tops, self.lows):
            figures.insert(b, 0.0)
        self.stale.insert(b, 1)

    def _drop_block(self, b: int) -> None:
        del self.blocks[b], self.lasts[b], self.sums[b], self.tops[b], self.lows[b]
        del self.stale[b]

    def add(self, key: tuple) -> None:
        blocks = self.blocks
        self.size += 1
        if not blocks:
            self._new_block(0, [key])
            return
        b, i = self._locate(key)
        block = blocks[b]
        block.insert(i, key)
        self.lasts[b] = block[-1]
        self.stale[b] = 1
        if len(block) > 2 * BLOCK:
            # Split in two: ``BLOCK`` keys and the rest.
            half = block[BLOCK:]
            del block[BLOCK:]
            self.lasts[b] = block[-1]
            self._new_block(b + 1, half)

    def discard(self, key: tuple) -> None:
        if not self.blocks:
            return
        b, i = self._locate(key)
        block = self.blocks[b]
        if i < len(block) and block[i] == key:
            del block[i]
            self.size -= 1
            self._shrunk(b)

    def _shrunk(self, b: int) -> None:
        """Block ``b`` lost a key: kept, dropped or merged with a neighbour."""
        blocks = self.blocks
        block = blocks[b]
        self.stale[b] = 1
        if not block:
            self._drop_block(b)
            return
        self.lasts[b] = block[-1]
        if len(block) >= BLOCK // 2 or len(blocks) == 1:
            return
        # Too small: into its neighbour (the next one, or the one before
        # for the last block), split again if that makes it too large.
        if b + 1 == len(blocks):
            b -= 1
        first, second = blocks[b], blocks[b + 1]
        first.extend(second)
        self._drop_block(b + 1)
        self.lasts[b] = first[-1]
        self.stale[b] = 1
        if len(first) > 2 * BLOCK:
            half = first[len(first) // 2:]
            del first[len(first) // 2:]
            self.lasts[b] = first[-1]
            self._new_block(b + 1, half)

    def replace(self, old: tuple, new: tuple) -> None:
        """``discard(old)`` then ``add(new)``, in place when ``new`` sorts where ``old`` stood."""
        if self.blocks:
            b, i = self._locate(old)
            block = self.blocks[b]
            if i < len(block) and block[i] == old:
                before = block[i - 1] if i else (self.lasts[b - 1] if b else None)
                after = (
                    block[i + 1] if i + 1 < len(block)
                    else self.blocks[b + 1][0] if b + 1 < len(self.blocks) else None
                )
                if (before is None or before < new) and (after is None or new < after):
                    block[i] = new
                    if i + 1 == len(block):
                        self.lasts[b] = new
                    # Its block's figures change; nothing moves.
                    self.stale[b] = 1
                    return
                del block[i]
                self.size -= 1
                self._shrunk(b)
        self.add(new)

    def touch(self, key: tuple, ledger: float) -> None:
        """
        Take in that the ledger of the shard at ``key`` is now ``ledger``.
        Ledgers only grow, so the block's highest ledger is raised in place;
        a lower value (never written by the draw) forgets the figures.
        """
        if not self.blocks:
            return
        b, i = self._locate(key)
        block = self.blocks[b]
        if i < len(block) and block[i] == key:
            if ledger >= self.tops[b]:
                self.tops[b] = ledger
            else:
                self.stale[b] = 1

    def pool_end(self, band: float) -> tuple[int, int]:
        """
        Where the keys with a base within ``band`` of the best one end: the
        blocks before the first returned are all in, and that many keys of
        that block (``(len(blocks), 0)``: every key).
        """
        floor = -self.blocks[0][0][0] - band
        # base >= floor  <=>  -base <= -floor; keys are (-base, id, weight).
        bound = (math.nextafter(-floor, math.inf),)
        b = bisect_left(self.lasts, bound)
        if b == len(self.blocks):
            return b, 0
        return b, bisect_left(self.blocks[b], bound)

    def figures(self, blocks: int, ranked: dict, uniform: bool) -> None:
        """Work out the figures of the first ``blocks`` blocks still unknown."""
        stale = self.stale
        keys = self.blocks
        block = stale.find(1, 0, blocks)
        while block >= 0:
            self.sums[block], self.tops[block], self.lows[block] = _figures(
                keys[block], ranked, uniform
            )
            stale[block] = 0
            block = stale.find(1, block + 1, blocks)


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
        # The draw's pool as it stands (None: work it out again), and the
        # shards drawn since it was built, whose ledgers the blocks'
        # figures have not taken in yet.
        self.view: Optional[View] = None
        self.deferred: set[Row] = set()
        # Per shard ranked here: its Ranked value, its keys in the lists
        # (rank key, base key, group) and the path RTT it was scored on.
        self.keys: dict[Row, tuple[ranking.Ranked, tuple, tuple, int, Optional[float]]] = {}
        # Shard id -> rank key, of the shards in ``ranked``.
        self.rank_keys: dict[str, tuple] = {}
        # Per shard: the client-to-shard estimate (``ranking.geo_rtt_ms``),
        # which only the records change.
        self.geo: dict[Row, Optional[float]] = {}


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
        passing = not row.hard
        weight = state.weight_override
        now = (
            passing and not row.soft, passing,
            state.open_connections + state.remote_connections,
            # ``ShardState.weight``, inline.
            weight if weight is not None else state.config.weight,
        )
        before = self._counted.get(row)
        if before == now:
            return
        self._counted[row] = now
        if (
            before is not None and before[0] == now[0] and before[1] == now[1]
            and before[3] == now[3]
        ):
            # Only the open connections moved.
            moved = now[2] - before[2]
            if now[0]:
                self._open[0] += moved
            if now[1]:
                self._open[1] += moved
            return
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
        self._deadlines: list[tuple[float, int, Row]] = []
        self._volatile: set[Row] = set()
        # Least recently used first (a plain dict: iterating over an
        # OrderedDict's values hashes every key, a Location).
        self._buckets: dict[Optional[Location], Bucket] = {}
        self._sequence = 0
        self._last_now: Optional[float] = None
        self.passing = 0
        self.healthy = 0
        #: Whether panic mode is in force, as ``ranking.select`` decides.
        self.panic = False
        # The bucket asked for last, and its location.
        self._last: Optional[tuple[Optional[Location], Bucket]] = None
        self.totals = EligibleTotals()
        self._fresh = False
        for state in table.shards:
            state.changed = self.changed

    # -- per shard ------------------------------------------------------------

    def _read(self, row: Row, now: float) -> None:
        """Read a shard's filters, info and measurement again at ``now``."""
        state = row.state
        outlier = state.outlier
        ejected_until = outlier.ejected_until
        ejected = ejected_until is not None and now < ejected_until
        # Everything the filters read: most writes (a lease, a connect
        # result, a measurement) leave them as they were.
        inputs = (
            state.health, state.admin_state, state.agent_admin, state.security_override,
            state.config, ejected_until if ejected else None,
            outlier.consecutive if ejected else None,
        )
        if inputs != row.filtered or row.info is None:
            self._filter(row, now)
            row.filtered = inputs
        # Everything ``ShardState.info`` reads; the same ``ShardInfo`` is
        # kept while they stay as they were (a lease taken and given back),
        # so that the buckets see at a glance that no score can have moved.
        since = state.back_since
        config = state.config
        loaded = (
            row.health, config, state.weight_override, state.agent_weight_percent,
            state.security_override, state.open_connections, state.remote_connections,
            state.agent_load, since,
            None if since is None else scoring.slow_start_factor(since, now, config.slow_start),
        )
        if loaded != row.loaded or row.info is None:
            row.info = state.info(now, row.health)
            row.loaded = loaded
        # ``ShardState.measured_ms``, inline.
        rtt_ms, rtt_at = state.rtt_ms, state.rtt_at
        max_age = self.settings.rtt_max_age
        if rtt_ms is None or rtt_at is None or now - rtt_at > max_age:
            row.measured_ms = None
        else:
            row.measured_ms = rtt_ms
        row.version += 1
        self.totals.read(row)
        if ejected_until is None and since is None:
            # ``_deadline`` when only a measurement can age out.
            if rtt_ms is None or rtt_at is None or now > rtt_at + max_age:
                until = None
            else:
                until = rtt_at + max_age
        else:
            until = _deadline(state, now, max_age)
        row.until = until
        if until is not None and until <= now:
            self._volatile.add(row)
            return
        self._volatile.discard(row)
        if until is not None:
            queued = row.queued
            # One live heap entry per row, at or before its deadline: an
            # earlier one is taken again for the later time when it comes.
            if queued is None or queued > until:
                row.queued = until
                self._sequence += 1
                heapq.heappush(self._deadlines, (until, self._sequence, row))

    def _filter(self, row: Row, now: float) -> None:
        """Work out a shard's filters (as ``ranking.consider``) and its health."""
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
        row.health = Health.UNHEALTHY if soft else Health.DRAINING if drains else Health.HEALTHY
        row.hard, row.soft = tuple(hard), tuple(soft)
        self.passing += row.passing
        self.healthy += row.healthy
        passing = self.passing
        self.panic = bool(passing) and self.healthy < self.settings.panic_threshold * passing

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
            self.panic = False
            self._last = None
            for row in self._ordered_rows:
                row.info = None
                row.filtered = row.until = row.queued = None
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
        touched = set()
        for state in self.changed:
            row = rows.get(state)
            if row is not None:
                touched.add(row)
        self.changed.clear()
        touched |= self._volatile
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            when, _, row = heapq.heappop(deadlines)
            if when != row.queued:
                continue  # an entry a nearer deadline replaced
            row.queued = None
            until = row.until
            if until is None:
                continue
            if until <= now:
                touched.add(row)
            else:
                row.queued = until
                self._sequence += 1
                heapq.heappush(deadlines, (until, self._sequence, row))
        for row in touched:
            self._read(row, now)
        if touched:
            for bucket in self._buckets.values():
                bucket.pending |= touched
        return list(touched)

    # -- per client location ----------------------------------------------------

    def _rtt(self, bucket: Bucket, row: Row) -> Optional[float]:
        """The path RTT a score for the bucket's clients reads (``ranking.score``)."""
        geo = bucket.geo
        try:
            geo_ms = geo[row]
        except KeyError:
            geo_ms = geo[row] = ranking.geo_rtt_ms(row.info.location, bucket.client.location)
        return scoring.path_rtt_ms(geo_ms, row.expected_ms, row.measured_ms)

    def _rank_one(self, bucket: Bucket, row: Row, rtt: Optional[float]) -> ranking.Ranked:
        return ranking.score_rtt(
            row.info, row.state, rtt, self.table.config.weights,
            row.expected_ms, row.measured_ms, row.soft,
        )

    def _place(
        self, bucket: Bucket, row: Row, r: ranking.Ranked, rtt: Optional[float], moved: set,
        key: tuple, base: tuple, group: int,
    ) -> None:
        shard_id = r.info.shard_id
        bucket.ranked[shard_id] = r
        bucket.rank_keys[shard_id] = key
        bucket.keys[row] = (r, key, base, group, rtt)
        insort(bucket.by_rank[1], key)
        ordered = bucket.by_base[1][group]
        ordered.add(base)
        moved.add(ordered)
        if not r.set_aside:
            insort(bucket.by_rank[0], key)
            ordered = bucket.by_base[0][group]
            ordered.add(base)
            moved.add(ordered)

    def _remove(self, bucket: Bucket, row: Row, moved: set) -> None:
        kept = bucket.keys.pop(row, None)
        if kept is None:
            return
        r, key, base, group, _ = kept
        del bucket.ranked[r.info.shard_id]
        del bucket.rank_keys[r.info.shard_id]
        for panic in ((1,) if r.set_aside else (0, 1)):
            items = bucket.by_rank[panic]
            i = bisect_left(items, key)
            if i < len(items) and items[i] == key:
                del items[i]
            ordered = bucket.by_base[panic][group]
            ordered.discard(base)
            moved.add(ordered)

    def _build(self, bucket: Bucket) -> None:
        bucket.pending.clear()
        bucket.ledgers.clear()
        bucket.deferred.clear()
        bucket.view = None
        bucket.ranked.clear()
        bucket.rank_keys.clear()
        bucket.keys.clear()
        keyed: tuple[list, list] = ([], [])
        based: tuple[list[list], list[list]] = ([[], [], [], []], [[], [], [], []])
        for row in self._ordered_rows:
            if row.hard:
                continue
            rtt = self._rtt(bucket, row)
            r = self._rank_one(bucket, row, rtt)
            bucket.ranked[r.info.shard_id] = r
            key = r.rank_key()
            base = _base_key(r)
            group = _group(r)
            bucket.keys[row] = (r, key, base, group, rtt)
            bucket.rank_keys[r.info.shard_id] = key
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

    def _update(self, bucket: Bucket) -> None:
        """
        Take in the bucket's pending shards: each scored again, and moved
        in the lists only when one of its keys moved; the pool (``View``)
        kept when none did.
        """
        pending = bucket.pending
        keys = bucket.keys
        ranked = bucket.ranked
        weights = self.table.config.weights
        moved: set[Ordered] = set()
        for row in pending:
            kept = keys.get(row)
            if row.hard:
                if kept is not None:
                    self._remove(bucket, row, moved)
                continue
            if kept is None or kept[0].measured_ms != row.measured_ms:
                rtt = self._rtt(bucket, row)
            else:
                rtt = kept[4]  # the same inputs as last time
            if kept is not None:
                old = kept[0]
                if old.info is row.info and old.set_aside == row.soft and rtt == kept[4]:
                    # Nothing the score reads moved (a lease taken and given
                    # back, a measurement within what geography predicts):
                    # the same value but for the measurement it carries.
                    if old.measured_ms != row.measured_ms:
                        r = ranking.Ranked(
                            old.state, old.info, old.latency, old.security, old.spare,
                            old.base, old.total, row.measured_ms, old.expected_ms,
                            old.reasons, old.set_aside,
                        )
                        keys[row] = (r, kept[1], kept[2], kept[3], rtt)
                        ranked[r.info.shard_id] = r
                        view = bucket.view
                        if view is not None:
                            view.replace(old, r)
                    continue
            info = row.info
            r = ranking.score_rtt(
                info, row.state, rtt, weights, row.expected_ms, row.measured_ms, row.soft,
            )
            # ``Ranked.rank_key``, ``_base_key`` and ``_group``, inline.
            total = r.total
            full = info.load >= 1.0
            key = (full, -total, info.open_connections, info.shard_id)
            base = (-r.base, info.shard_id, max(0.0, total))
            group = (2 if full else 0) + (0 if total > 0 else 1)
            if kept is not None and kept[0].set_aside == r.set_aside:
                if key == kept[1] and base == kept[2] and group == kept[3]:
                    # The same place everywhere, and the same draw weight:
                    # only the value changes.
                    keys[row] = (r, key, base, group, rtt)
                    ranked[r.info.shard_id] = r
                    view = bucket.view
                    if view is not None:
                        view.replace(kept[0], r)
                    continue
                if group == kept[3]:
                    # The same lists: each key moves within its own (in
                    # place when it keeps its rank, as a shard whose only
                    # change is its load or latency often does).
                    for panic in ((1,) if r.set_aside else (0, 1)):
                        _swap(bucket.by_rank[panic], kept[1], key)
                        ordered = bucket.by_base[panic][group]
                        ordered.replace(kept[2], base)
                        moved.add(ordered)
                    shard_id = info.shard_id
                    keys[row] = (r, key, base, group, rtt)
                    ranked[shard_id] = r
                    bucket.rank_keys[shard_id] = key
                    continue
            self._remove(bucket, row, moved)
            self._place(bucket, row, r, rtt, moved, key, base, group)
        pending.clear()
        if moved:
            bucket.view = None

    def drawn(self, row_state: ShardState) -> None:
        """Note that the draw moved a shard's ledger."""
        row = self._rows.get(row_state)
        if row is not None:
            for bucket in self._buckets.values():
                bucket.ledgers.add(row)

    def bucket(self, location: Optional[Location]) -> Bucket:
        """The up-to-date orderings for clients at ``location``."""
        last = self._last
        if last is not None and last[0] is location:
            # The same location as last time: already the most recent.
            bucket = last[1]
        else:
            buckets = self._buckets
            bucket = buckets.get(location)
            if bucket is None:
                bucket = Bucket(location)
                self._build(bucket)
                buckets[location] = bucket
                if len(buckets) > MAX_BUCKETS:
                    del buckets[next(iter(buckets))]
                self._last = (location, bucket)
                return bucket
            del buckets[location]
            buckets[location] = bucket
            self._last = (location, bucket)
        if bucket.pending:
            if len(bucket.pending) > _REBUILD_SHARE * len(self._ordered_rows) + 8:
                self._build(bucket)
            else:
                self._update(bucket)
        if bucket.ledgers:
            # Ledgers only grow (the draw writes them), so the pool's
            # highest one is raised in place; the blocks' figures take
            # them in when the pool is next worked out.
            view = bucket.view
            if view is not None:
                for row in bucket.ledgers:
                    view.raise_top(bucket, row)
            bucket.deferred |= bucket.ledgers
            bucket.ledgers.clear()
        return bucket


    def view(self, bucket: Bucket, band: float) -> View:
        """The draw's pool for ``bucket`` now (built when first asked for)."""
        panic = self.panic
        view = bucket.view
        if view is None or view.panic != panic or view.band != band:
            ordered, group = self._group_of_pool(bucket)
            view = bucket.view = View(bucket, panic, band, ordered, group)
        return view

    # -- what resolve asks ----------------------------------------------------------

    def _group_of_pool(self, bucket: Bucket) -> tuple[Optional[Ordered], int]:
        groups = bucket.by_base[1 if self.panic else 0]
        for group in ((0, 1) if groups[0].size or groups[1].size else (2, 3)):
            if groups[group].size:
                return groups[group], group
        return None, 0

    def pool(self, bucket: Bucket, band: float) -> list[choice.Entry]:
        """``choice.pool`` of the eligible shards, in rank order."""
        ordered, _ = self._group_of_pool(bucket)
        if ordered is None:
            return []
        ranked = bucket.ranked
        members = [ranked[key[1]] for key in ordered.head(_pool_end(ordered, band))]
        members.sort(key=ranking.Ranked.rank_key)
        return [_entry(r) for r in members]

    def draw(
        self, bucket: Bucket, band: float, rng: choice.RandomSource
    ) -> Optional[tuple[ranking.Ranked, float]]:
        """
        Draw the first candidate as ``choice.draw`` over ``pool`` would
        (None: no shard is eligible): for a pool of up to ``SMALL_POOL``
        shards the same numbers from the same random numbers; above, the
        same pool, highest ledger, longest stride and rules, with each of
        the two shards sampled in proportion to its weight from the
        blocks' running sums, without reading the whole pool.  Returns the
        shard and its new ledger value.  The pool's figures are kept
        (``View``) until a shard in the bucket changes.
        """
        return self.view(bucket, band).draw(rng)

    def leading(self, bucket: Bucket, count: int) -> list[ranking.Ranked]:
        """``ordered(bucket, count)``, kept with the pool until a shard changes."""
        view = bucket.view
        if view is None or view.panic != self.panic:
            return self.ordered(bucket, count)
        got = view.leading.get(count)
        if got is None:
            got = view.leading[count] = self.ordered(bucket, count)
        return got

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


def _swap(items: list, old: tuple, new: tuple) -> None:
    """In a sorted list, ``old`` taken out and ``new`` put in (in place when it fits there)."""
    i = bisect_left(items, old)
    if i < len(items) and items[i] == old:
        if (i == 0 or items[i - 1] < new) and (i + 1 == len(items) or new < items[i + 1]):
            items[i] = new
            return
        del items[i]
    insort(items, new)


def _touch_deferred(bucket: Bucket) -> None:
    """Let the blocks' figures take in the ledgers drawn meanwhile."""
    keys = bucket.keys
    for row in bucket.deferred:
        kept = keys.get(row)
        if kept is not None:
            r, _, base, group, _ = kept
            ledger = row.state.ledger
            bucket.by_base[1][group].touch(base, ledger)
            if not r.set_aside:
                bucket.by_base[0][group].touch(base, ledger)
    bucket.deferred.clear()


def _pool_end(ordered: Ordered, band: float) -> int:
    """How many keys, from the best, have a base within ``band`` of it."""
    full, rest = ordered.pool_end(band)
    return sum(map(len, ordered.blocks[:full])) + rest


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
    parts: list[list], sums: list, total: float, uniform: bool,
    rng: choice.RandomSource, skip: Optional[tuple[int, int]],
) -> tuple[int, int]:
    """
    The block and offset of a key of the pool (``parts``: its keys, block
    by block), drawn in proportion to its weight (``skip`` excluded;
    ``sums`` already leaves it out): the blocks' running sums find the
    block, then the keys within it.
    """
    return _position(parts, sums, rng.random() * total, uniform, skip)


def _position(
    parts: list[list], sums: list, target: float, uniform: bool,
    skip: Optional[tuple[int, int]],
) -> tuple[int, int]:
    """Where ``target`` falls on the running weights (``_sample``'s second half)."""
    running = list(accumulate(sums))
    block = bisect_right(running, target)
    last = None
    while block < len(sums):
        keys = parts[block]
        if uniform:
            weights = [1.0] * len(keys)
        else:
            weights = [key[2] for key in keys]
        if skip is not None and skip[0] == block:
            weights[skip[1]] = 0.0
        before = running[block - 1] if block else 0.0
        within = list(accumulate(weights, initial=before))
        i = bisect_right(within, target, 1)
        if i < len(within):
            return block, i - 1
        positive = [j for j, w in enumerate(weights) if w > 0]
        if positive:
            last = (block, positive[-1])
        # Rounding within the block: the next one takes it.
        block += 1
    # Rounding can leave the target past the sum: the last positive weight
    # takes it, as in choice.draw.
    if last is not None:
        return last
    return next(
        (block, i) for block in range(len(parts) - 1, -1, -1)
        for i in range(len(parts[block]) - 1, -1, -1) if (block, i) != skip
    )


class View:
    """
    The draw's pool of one bucket, worked out once and kept while no key
    of the bucket moves (``ServiceIndex.bucket`` drops it then): its
    members, running weights, highest ledger and longest stride.  Only
    the highest ledger moves meanwhile, raised as the draw writes ledgers
    (``raise_top``), and a shard's value when it is scored again to the
    same keys (``replace``), so that a draw reads two random numbers, two
    positions and two ledgers, whatever the size of the pool.  A large
    pool's keys are the list's blocks (``parts``, the last one cut where
    the pool ends), and its positions (block, offset) pairs.
    """

    __slots__ = (
        "panic", "band", "end", "parts", "last", "group", "uniform", "top", "spread",
        "total", "ranked", "members", "states", "weights", "entry_weights", "running",
        "ids", "rests", "sums", "inner", "leading",
    )

    def __init__(
        self, bucket: Bucket, panic: bool, band: float, ordered: Optional[Ordered], group: int
    ) -> None:
        self.panic = panic
        self.band = band
        self.leading: dict[int, list] = {}
        self.ranked = bucket.ranked
        self.members: Optional[list] = None
        self.end = 0
        self.top = 0.0
        if ordered is None:
            return
        blocks = ordered.blocks
        full, rest = ordered.pool_end(band)
        parts = self.parts = blocks[:full]
        if rest:
            parts.append(blocks[full][:rest])
        end = self.end = ordered.size if full == len(blocks) else sum(map(len, parts))
        self.last = parts[-1][-1]
        self.group = group
        ranked = self.ranked
        if end <= SMALL_POOL:
            # As choice.draw sees the pool: members in rank order.
            # As choice.draw sees the pool (``_entry`` of each member),
            # in one pass.
            if end == 1:
                members = [ranked[blocks[0][0][1]]]
            else:
                rank_keys = bucket.rank_keys
                ranks = [rank_keys[key[1]] for part in parts for key in part]
                ranks.sort()
                # A rank key ends with the shard id.
                members = [ranked[key[-1]] for key in ranks]
            entry_weights = []
            states = []
            ids = set()
            top = None
            uniform = True
            for r in members:
                total = r.total
                weight = total if total > 0.0 else 0.0
                if weight > 0:
                    uniform = False
                entry_weights.append(weight)
                state = r.state
                states.append(state)
                ids.add(r.info.shard_id)
                ledger = state.ledger if state is not None else 0.0
                if top is None or ledger > top:
                    top = ledger
            self.uniform = uniform
            if uniform:
                weights = self.weights = [1.0] * end
                spread = 1.0
            else:
                weights = self.weights = entry_weights
                spread = None
                for weight in entry_weights:
                    stride = 1.0 / weight
                    if spread is None or stride > spread:
                        spread = stride
            self.entry_weights = entry_weights
            self.members = members
            self.states = states
            self.ids = ids
            self.running = list(accumulate(weights))
            self.total = sum(weights)
            self.top = top
            self.spread = spread
            self.rests: dict[int, tuple[list[int], list[float], list[float], float]] = {}
            return
        uniform = self.uniform = group in (1, 3)
        # Only a pool this large reads the blocks' figures: the ledgers
        # drawn meanwhile are taken in now.
        if bucket.deferred:
            _touch_deferred(bucket)
        ordered.figures(full, ranked, uniform)
        sums = ordered.sums[:full]
        tops = ordered.tops[:full]
        lows = ordered.lows[:full]
        if rest:
            tail = _figures(parts[-1], ranked, uniform)
            sums.append(tail[0])
            tops.append(tail[1])
            lows.append(tail[2])
        self.sums = sums
        self.running = list(accumulate(sums))
        self.total = sum(sums)
        self.top = max(tops)
        self.spread = 1.0 if uniform else 1.0 / min(lows)
        self.inner: dict[int, list[float]] = {}

    def replace(self, old: ranking.Ranked, new: ranking.Ranked) -> None:
        """Put ``new`` where ``old`` stood: a shard's value, its place unchanged."""
        members = self.members
        if members is not None:
            for i, r in enumerate(members):
                if r is old:
                    members[i] = new
                    break
        for got in self.leading.values():
            for i, r in enumerate(got):
                if r is old:
                    got[i] = new
                    break

    def raise_top(self, bucket: Bucket, row: Row) -> None:
        """Take in the new, higher ledger of a shard the draw chose."""
        state = row.state
        if self.members is not None:
            if state.config.id in self.ids:
                self.top = max(self.top, state.ledger)
            return
        if self.end == 0:
            return
        kept = bucket.keys.get(row)
        if kept is None:
            return
        r, _, base, group, _ = kept
        if group != self.group or (r.set_aside and not self.panic):
            return
        if base <= self.last:
            self.top = max(self.top, state.ledger)

    def draw(self, rng: choice.RandomSource) -> Optional[tuple[ranking.Ranked, float]]:
        """The chosen shard and its new ledger, as ``ServiceIndex.draw``."""
        if self.end == 0:
            return None
        if self.members is not None:
            return self._draw_small(rng)
        parts, uniform = self.parts, self.uniform
        total = self.total
        a = self._find(rng.random() * total, None)
        key_a = parts[a[0]][a[1]]
        weight_a = 1.0 if uniform else key_a[2]
        left = total - weight_a
        target = rng.random() * left
        # The same position as on the running weights without ``a``: past
        # where ``a`` starts, everything sits ``weight_a`` further on.
        start_a = self._within(a[0])[a[1]]
        b = self._find(target + weight_a if target >= start_a else target, a, target)
        key_b = parts[b[0]][b[1]]
        ranked = self.ranked
        first, second = ranked[key_a[1]], ranked[key_b[1]]
        state_a, state_b = first.state, second.state
        a_wins, ledger = choice.duel_values(
            state_a.ledger if state_a is not None else 0.0, key_a[2],
            state_b.ledger if state_b is not None else 0.0, key_b[2],
            self.top, self.spread, uniform, rng,
        )
        return (first if a_wins else second), ledger

    def _within(self, block: int) -> list[float]:
        """A block's running weights, starting from the blocks before it."""
        within = self.inner.get(block)
        if within is None:
            keys = self.parts[block]
            if self.uniform:
                weights = [1.0] * len(keys)
            else:
                weights = [key[2] for key in keys]
            before = self.running[block - 1] if block else 0.0
            within = self.inner[block] = list(accumulate(weights, initial=before))
        return within

    def _find(
        self, target: float, skip: Optional[tuple[int, int]], unmoved: float = 0.0
    ) -> tuple[int, int]:
        """
        The block and offset ``target`` falls on in the running weights;
        with ``skip``, ``target`` was moved past it and ``unmoved`` is the
        number drawn over the weights without it.
        """
        block = bisect_right(self.running, target)
        if block < len(self.running):
            within = self._within(block)
            i = bisect_right(within, target, 1)
            if i < len(within) and within[i] > within[i - 1]:
                found = (block, i - 1)
                if found != skip:
                    return found
        # At the edge of a block, or of the pool, where rounding decides:
        # the running sums worked out afresh, as ``_sample`` does.
        sums = list(self.sums)
        if skip is not None:
            sums[skip[0]] -= 1.0 if self.uniform else self.parts[skip[0]][skip[1]][2]
            target = unmoved
        return _position(self.parts, sums, target, self.uniform, skip)


    def _draw_small(self, rng: choice.RandomSource) -> tuple[ranking.Ranked, float]:
        """``choice.draw`` over the members, on the figures kept."""
        members, uniform, top, spread = self.members, self.uniform, self.top, self.spread
        assert members is not None
        states = self.states
        if len(members) == 1:
            state = states[0]
            stride = 1.0 if uniform else 1.0 / self.entry_weights[0]
            ledger = state.ledger if state is not None else 0.0
            return members[0], max(ledger, top - spread - choice.CREDIT * stride) + stride
        a = _index(self.running, self.weights, rng.random() * self.total)
        rest = self.rests.get(a)
        if rest is None:
            indices = [i for i in range(len(members)) if i != a]
            weights = [self.weights[i] for i in indices]
            rest = self.rests[a] = (indices, weights, list(accumulate(weights)), sum(weights))
        indices, weights, running, total = rest
        b = indices[_index(running, weights, rng.random() * total)]
        state_a, state_b = states[a], states[b]
        a_wins, ledger = choice.duel_values(
            state_a.ledger if state_a is not None else 0.0, self.entry_weights[a],
            state_b.ledger if state_b is not None else 0.0, self.entry_weights[b],
            top, spread, uniform, rng,
        )
        return members[a if a_wins else b], ledger


def _index(running: list[float], weights: list[float], target: float) -> int:
    """``choice._weighted_index`` for a target already drawn, on running sums."""
    i = bisect_right(running, target)
    if i < len(running):
        return i
    for j in range(len(weights) - 1, -1, -1):
        if weights[j] > 0:
            return j
    return len(weights) - 1
