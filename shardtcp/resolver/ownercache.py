# -*- test-case-name: tests.resolver.test_ownercache -*-
"""
The owner order of shard keys, kept per service, so that choosing by key
does not hash and sort every shard on every connection.

An ``OwnerCache`` belongs to one generation of a service's members: their
ids, their operator weights and the service's ``[service.S.owners]``.  For
each recent key it keeps the first owners over ALL members, in the order
``ownership.owner_order`` gives.  Health, drain, policy and load do not
enter it: the owner order of the eligible shards is that order with the
others left out, so the resolver walks the kept owners and skips, one
lookup each, those not eligible now; a shard coming or going from rotation
changes nothing kept.  A new generation (a shard added or removed, a
weight changed) starts an empty cache.

A key not kept, or whose kept owners run out before the walk ends, is
worked out again over every member, vectorised with numpy: one BLAKE2b
hash of the key, the 64-bit mix of ``ownership.rendezvous_hash`` per
member, the best few picked, and those few put in order with
``ownership``'s own arithmetic.  The result is the reference's exactly
(``tests.resolver.test_ownercache`` checks it against ``owner_order``).
numpy is imported on the first key worked out, so a proxy without keyed
services never loads it.

The kept keys are dropped by "second chance" (the clock algorithm): the
oldest key goes first unless it was used since it was kept or last passed
over, in which case it is passed over once more.  That is close to least
recently used at a fraction of its cost per key: a hit only marks the key,
and a miss appends to a queue instead of reordering a linked dict.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Optional, Sequence

from shardtcp.resolver import ownership

__all__ = ["DEPTH", "KEYS_KEPT", "OwnerCache", "SMALL"]

#: How many keys one service keeps the owners of (the oldest not used
#: lately dropped first): about 5 MiB at most.
KEYS_KEPT = 16384

#: How many owners a key keeps: the taker and two retries, with room for
#: a few owners out of rotation or over their bound.
DEPTH = 8

#: Up to this many members a key's order is worked out in plain Python,
#: which is cheaper than numpy's cost per call at that size.
SMALL = 12

# Up to this many members a full sort is cheaper than a partition.
_SORTED = 256

# A score threshold is relaxed by this share before candidates are scored
# exactly: numpy's logarithm may differ from math.log by a few units in
# the last place (about 1e-15 relative), far inside it.
_MARGIN = 1e-9


class OwnerCache:
    """
    The kept owner orders of one generation of a service's members (see
    the module docstring).  ``hits`` and ``misses`` count ``owners_of``
    answered from what was kept and worked out anew.
    """

    def __init__(
        self,
        ids: Sequence[str],
        weights: Sequence[float],
        owners: Sequence[tuple] = (),
        *,
        keep: int = KEYS_KEPT,
        depth: int = DEPTH,
    ) -> None:
        self.ids: tuple[str, ...] = tuple(ids)
        self.weights: tuple[float, ...] = tuple(float(w) for w in weights)
        if len(self.ids) != len(self.weights):
            raise ValueError("one weight per shard id")
        self.owners: tuple = tuple(owners)
        self.keep = max(1, keep)
        self.depth = max(1, depth)
        self.hits = 0
        self.misses = 0
        self._members = frozenset(self.ids)
        self._seeds = [ownership.shard_seed(i) for i in self.ids]
        self._entries: dict[str, tuple[str, ...]] = {}
        # The kept keys, oldest first, and those used since kept or last
        # passed over (the clock's marks).
        self._queue: deque[str] = deque()
        self._used: set[str] = set()
        self._arrays: Optional[_Arrays] = None

    def __len__(self) -> int:
        """How many members the orders cover."""
        return len(self.ids)

    def fits(self, ids: Sequence[str], weights: Sequence[float], owners: Sequence[tuple]) -> bool:
        """Whether this cache is for these members (in this order) and owners."""
        return (
            tuple(ids) == self.ids
            and tuple(float(w) for w in weights) == self.weights
            and tuple(owners) == self.owners
        )

    def owners_of(self, key: str, at_least: int = 0) -> tuple[str, ...]:
        """
        The first owners of ``key`` among all members, in owner order: at
        least ``depth`` and at least ``at_least`` of them, or all when
        there are fewer members.  Kept for the next call.
        """
        entries = self._entries
        kept = entries.get(key)
        want = self.depth if at_least <= self.depth else at_least
        if kept is not None:
            self._used.add(key)
            if len(kept) >= want or len(kept) == len(self.ids):
                self.hits += 1
                return kept
            self.misses += 1
            found = entries[key] = self.compute(key, want)
            return found
        self.misses += 1
        found = self.compute(key, want)
        # Room is made before the new key is queued, so that the sweep
        # never drops the key being kept.
        if len(entries) >= self.keep:
            self._drop_one()
        entries[key] = found
        self._queue.append(key)
        return found

    def _drop_one(self) -> None:
        """Drop the oldest kept key not used since kept or last passed over."""
        queue, used = self._queue, self._used
        while True:
            oldest = queue.popleft()
            if oldest in used:
                # Its second chance: unmarked, and back at the end.
                used.discard(oldest)
                queue.append(oldest)
                continue
            del self._entries[oldest]
            return

    def compute(self, key: str, count: int) -> tuple[str, ...]:
        """The first ``count`` owners of ``key`` (all when fewer), not kept."""
        ids = self.ids
        if not self.owners and len(ids) > SMALL and count * 2 < len(ids):
            # The usual case of a service routing by key: no pins, many
            # more members than owners wanted.
            arrays = self._arrays
            if arrays is None:
                arrays = self._arrays = _Arrays(self._seeds, self.weights)
            best = arrays.best(ownership.key_hash(key.encode("utf-8")), count, ids, self.weights)
            return tuple(map(ids.__getitem__, best))
        present = self._members
        pinned: list[str] = []
        if self.owners:
            for shard_id in ownership.pinned_owners(self.owners, key):
                if shard_id in present and shard_id not in pinned:
                    pinned.append(shard_id)
        if len(pinned) >= count:
            return tuple(pinned[:count])
        key_h = ownership.key_hash(key.encode("utf-8"))
        # The pinned ones are taken out of the rendezvous order: ask for
        # as many more.
        wanted = min(len(ids), count + len(pinned))
        if len(ids) <= SMALL or wanted * 2 >= len(ids):
            best = self._all(key_h)[:wanted]
        else:
            best = self._best(key_h, wanted)
        if pinned:
            taken = set(pinned)
            return tuple(pinned + [ids[i] for i in best if ids[i] not in taken][: count - len(pinned)])
        return tuple(map(ids.__getitem__, best))

    def _all(self, key_h: int) -> list[int]:
        """Every member's position, in rendezvous order (the reference's arithmetic)."""
        ids, weights, seeds = self.ids, self.weights, self._seeds
        mix, score = ownership.mix64, ownership.weighted_score
        places = []
        for i, seed in enumerate(seeds):
            h = mix(key_h ^ seed)
            places.append((-score(h, weights[i]), -h, ids[i], i))
        places.sort()
        return [p[3] for p in places]

    def _best(self, key_h: int, count: int) -> list[int]:
        """The positions of the first ``count`` members in rendezvous order."""
        arrays = self._arrays
        if arrays is None:
            arrays = self._arrays = _Arrays(self._seeds, self.weights)
        return arrays.best(key_h, count, self.ids, self.weights)


class _Arrays:
    """The members as numpy arrays, and the vectorised rendezvous order."""

    def __init__(self, seeds: Sequence[int], weights: Sequence[float]) -> None:
        # numpy's OpenBLAS would start a thread per core at import; nothing
        # here multiplies matrices, and a proxy has no use for idle threads.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        import numpy as np

        self.np = np
        self.seeds = np.array(seeds, dtype=np.uint64)
        weight = np.array(weights, dtype=np.float64)
        positive = weight > 0
        self.positive = np.flatnonzero(positive)
        self.zero = np.flatnonzero(~positive)
        self.positive_weight = weight[self.positive]
        # Equal positive weights: the order is the hash's, no logarithm.
        self.uniform = len(self.zero) == 0 and bool(np.all(weight == weight[0])) if len(weight) else True
        self.distinct = len(set(seeds)) == len(seeds)
        self.x = np.empty(len(self.seeds), dtype=np.uint64)
        self.t = np.empty(len(self.seeds), dtype=np.uint64)
        # Operands as 0-d arrays: a ufunc takes them at about half the
        # price of a numpy scalar or a Python int.
        self.k = np.zeros((), dtype=np.uint64)
        self.c1 = np.array(0xBF58476D1CE4E5B9, dtype=np.uint64)
        self.c2 = np.array(0x94D049BB133111EB, dtype=np.uint64)
        self.s12 = np.array(12, dtype=np.uint64)
        self.s32 = np.array(32, dtype=np.uint64)
        self._xor, self._multiply, self._shift = np.bitwise_xor, np.multiply, np.right_shift
        # Equal weights, distinct seeds, few members: a full sort by hash.
        self.sorted_by_hash = self.uniform and self.distinct and len(weight) <= _SORTED

    def hashes(self, key_h: int):
        """``ownership.rendezvous_hash`` of the key at every member (uint64)."""
        x, t, xor, multiply = self.x, self.t, self._xor, self._multiply
        k = self.k
        k[()] = key_h
        xor(self.seeds, k, x)
        multiply(x, self.c1, x)
        self._shift(x, self.s32, t)
        xor(x, t, x)
        multiply(x, self.c2, x)
        return x

    def _highest(self, values, count: int):
        """The positions of the ``count`` highest values, and of any tied with the last."""
        np = self.np
        n = len(values)
        if count >= n:
            return np.arange(n)
        kth = np.partition(values, n - count)[n - count]
        return np.flatnonzero(values >= kth)

    def best(self, key_h: int, count: int, ids: Sequence[str], weights: Sequence[float]) -> list[int]:
        """The positions of the first ``count`` members in rendezvous order."""
        x = self.hashes(key_h)
        if self.sorted_by_hash:
            # Distinct seeds never tie (the mix is a bijection): the order
            # is the hash's, descending.
            return x.argsort()[: -count - 1 : -1].tolist()
        np = self.np
        if self.uniform:
            if self.distinct:
                chosen = np.argpartition(x, len(x) - count)[len(x) - count:]
                return chosen[np.argsort(x[chosen])[::-1]].tolist()
            chosen = self._highest(x, count)
            hs = x[chosen].tolist()
            places = sorted(zip([-h for h in hs], [ids[i] for i in chosen.tolist()], chosen.tolist()))
            return [p[2] for p in places[:count]]
        score = ownership.weighted_score
        places = []
        positive = self.positive
        if len(positive):
            hp = x[positive]
            u = (np.right_shift(hp, self.s12).astype(np.float64) + 0.5) * (2.0 ** -52)
            approx = -self.positive_weight / np.log(u)
            if count < len(positive):
                n = len(positive)
                kth = np.partition(approx, n - count)[n - count]
                chosen = positive[np.flatnonzero(approx >= kth * (1.0 - _MARGIN))]
            else:
                chosen = positive
            for i, h in zip(chosen.tolist(), x[chosen].tolist()):
                places.append((-score(h, weights[i]), -h, ids[i], i))
            places.sort()
            del places[count:]
        if len(places) < count and len(self.zero):
            zero = self.zero
            chosen = zero[self._highest(x[zero], count - len(places))]
            rest = sorted(
                (-h, ids[i], i) for i, h in zip(chosen.tolist(), x[chosen].tolist())
            )
            places.extend((0.0, *r) for r in rest[: count - len(places)])
        return [p[3] for p in places]
