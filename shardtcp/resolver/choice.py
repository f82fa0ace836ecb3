"""
Drawing the shard that takes a connection, among the best few.

The resolver ranks the eligible shards; this module decides which of the
best ones is tried first. The aim is a choice that nobody can steer, that
still spreads connections evenly, and that honours weights as shares.

The pool
========

The pool is the set of shards the first candidate is drawn from:

1. **Capacity.** Shards with room (load < 1) if there are any, else all
   (a full shard never takes a connection while another has room).
2. **Weight.** Shards whose draw weight is above zero, if there are any
   (weight 0 means "only if nothing else is left").
3. **Band.** Shards whose *base* score (the weighted mean of latency,
   security and load, before any weight) is within ``band`` of the best
   base score in the group: ``base >= best - band`` (0.02 by default, i.e.
   two points out of a hundred: about 2 ms of round trip near the client,
   10 % of capacity, or 7 points of security score). Shards further down
   are clearly worse and are only retries.

The band is measured on the base score, not on the weighted total, so that
weights act as *shares* among comparable shards (weight 0.5 gets half the
connections of weight 1) rather than as a cliff that removes a shard from
the pool, and the slow-start ramp really ramps.

The draw
========

Power of two choices over the pool, on a fair-share ledger:

1. Two distinct shards ``a`` and ``b`` are sampled from the pool, each with
   probability proportional to its draw weight ``t`` (its total score times
   its slow-start ramp), using the injected random source (by default
   ``SystemRandom`` here, the operating system's CSPRNG read in chunks).
2. Each shard keeps a ledger value ``F`` (stride scheduling): the service it
   has been given so far, in units of its own weight. Taking a connection
   adds its stride ``s = 1/t`` to it. The candidate that would stand lower
   after the pick wins::

       key = max(F, F_top - s_max - CREDIT · s) + s

   ``F_top`` is the highest ledger in the pool and ``s_max`` its longest
   stride (how far apart fairly served ledgers can be). The ``max`` caps
   the credit a shard can bank at ``CREDIT`` (6) of its own picks, so a
   shard coming back after a long absence gets its fair share at once, not
   a burst paying back everything it missed; a shard in slow start (a long
   stride) gets no burst at all.
3. When the two keys are less than ``TIE`` strides apart (the shorter of
   the two strides), the ledger says nothing worth acting on and a weighted
   coin (``t_a : t_b``) decides.

In the long run every shard of a stable pool gets a share ``t / Σt`` of
the picks; over any run the counts stay close to that share (1000 draws
over three equal shards: each within ±1 % of 333 over hundreds of seeds;
over eight, within ±5 %), which pure random choice cannot promise (over
three shards its spread is ±4.5 %, one standard deviation, and one seed in
twenty misses ±10 %).

What may influence the draw
===========================

Only the pool (which comes from the service, the client's *address*, and
the live state of the shards), the ledger (which only the picks themselves
move) and the random source. The request's SNI, ALPN, preamble, listener
and ports never reach this module, so no choice of them can steer a
connection to a chosen shard. Each individual pick involves fresh random
draws, so even a client that knows the ledger cannot tell which shard the
next connection will land on among those that are close.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence, TypeVar

import attrs

#: How many of its own picks a shard may bank while it is not chosen.
CREDIT = 6.0

#: Ledger differences below this many strides are decided by a weighted coin.
TIE = 2.0

#: Default width of the pool's band, on the 0..1 base score.
DEFAULT_BAND = 0.02

T = TypeVar("T")


class RandomSource(Protocol):
    """What the draw needs of a random source: ``random()`` in [0, 1)."""

    def random(self) -> float: ...


class SystemRandom:
    """
    ``random()`` from the operating system's CSPRNG (``os.urandom``), as
    ``secrets.SystemRandom`` gives it, but reading ``chunk`` bytes at a
    time rather than 7 bytes per call: one system call per 73 numbers
    instead of one per number.  Each number takes 53 fresh random bits.
    """

    def __init__(self, chunk: int = 512) -> None:
        self._chunk = max(8, chunk - chunk % 7)
        self._buffer = b""
        self._at = 0

    def random(self) -> float:
        """A float in [0, 1) with 53 random bits."""
        at = self._at
        if at + 7 > len(self._buffer):
            self._buffer = os.urandom(self._chunk)
            at = 0
        self._at = at + 7
        return (int.from_bytes(self._buffer[at:at + 7], "big") >> 3) * 2.0 ** -53


@attrs.frozen
class Entry:
    """
    One eligible shard as the draw sees it.

    ``item`` is the caller's own object, handed back untouched. ``base`` is
    the unweighted score, ``weight`` the draw weight ``t`` (>= 0), ``full``
    whether the shard is at capacity, ``ledger`` its current ``F``.
    """

    item: object
    base: float
    weight: float
    full: bool
    ledger: float = 0.0


def pool(entries: Sequence[Entry], band: float = DEFAULT_BAND) -> list[Entry]:
    """
    Return the entries the first candidate is drawn from (see the module
    docstring), in the order given. Empty only when ``entries`` is.
    """
    group = [e for e in entries if not e.full] or list(entries)
    weighted = [e for e in group if e.weight > 0]
    if weighted:
        group = weighted
    if not group:
        return []
    best = max(e.base for e in group)
    return [e for e in group if e.base >= best - band]


def _stride(entry: Entry, uniform: bool) -> float:
    return 1.0 if uniform else 1.0 / entry.weight


def _weighted_index(weights: Sequence[float], rng: RandomSource) -> int:
    total = sum(weights)
    target = rng.random() * total
    running = 0.0
    for i, w in enumerate(weights):
        running += w
        if target < running:
            return i
    # Rounding can leave target == total: the last positive weight takes it.
    for i in range(len(weights) - 1, -1, -1):
        if weights[i] > 0:
            return i
    return len(weights) - 1


def ledger_key(entry: Entry, top: float, spread: float, uniform: bool) -> float:
    """
    Where ``entry``'s ledger would stand after a pick, in a pool whose
    highest ledger is ``top`` and longest stride ``spread``.
    """
    stride = _stride(entry, uniform)
    return max(entry.ledger, top - spread - CREDIT * stride) + stride


def duel(
    a: Entry, b: Entry, top: float, spread: float, uniform: bool, rng: RandomSource
) -> tuple[bool, float]:
    """
    Decide between the two sampled entries: whether ``a`` wins, and the
    winner's new ledger value (step 3 of the draw).
    """
    return duel_values(a.ledger, a.weight, b.ledger, b.weight, top, spread, uniform, rng)


def duel_values(
    ledger_a: float, weight_a: float, ledger_b: float, weight_b: float,
    top: float, spread: float, uniform: bool, rng: RandomSource,
) -> tuple[bool, float]:
    """``duel`` on the entries' ledgers and draw weights alone."""
    if uniform:
        stride_a = stride_b = 1.0
        weight_a = weight_b = 1.0
    else:
        stride_a, stride_b = 1.0 / weight_a, 1.0 / weight_b
        weight_a, weight_b = max(0.0, weight_a), max(0.0, weight_b)
    key_a = max(ledger_a, top - spread - CREDIT * stride_a) + stride_a
    key_b = max(ledger_b, top - spread - CREDIT * stride_b) + stride_b
    if abs(key_a - key_b) < TIE * min(stride_a, stride_b):
        a_wins = rng.random() * (weight_a + weight_b) < weight_a
    else:
        a_wins = key_a < key_b
    return a_wins, key_a if a_wins else key_b


def draw(members: Sequence[Entry], rng: RandomSource) -> tuple[int, float]:
    """
    Draw one entry of a pool; return its index and its new ledger value.

    The caller stores the new ledger value for the chosen shard (the others'
    are unchanged). When every weight is zero the draw is uniform.
    """
    if not members:
        raise ValueError("cannot draw from an empty pool")
    uniform = all(e.weight <= 0 for e in members)
    weights = [1.0 if uniform else max(0.0, e.weight) for e in members]
    top = max(e.ledger for e in members)
    # Ledgers of members served fairly spread over up to one longest stride
    # (a light member that was just picked jumps that far ahead); beyond
    # that, each member may bank CREDIT of its own picks.
    spread = max(_stride(e, uniform) for e in members)
    if len(members) == 1:
        return 0, ledger_key(members[0], top, spread, uniform)
    a = _weighted_index(weights, rng)
    rest = [i for i in range(len(members)) if i != a]
    b = rest[_weighted_index([weights[i] for i in rest], rng)]
    a_wins, ledger = duel(members[a], members[b], top, spread, uniform, rng)
    return (a if a_wins else b), ledger


def shares(members: Sequence[Entry]) -> list[float]:
    """
    Return each pool member's long-run share of the picks, ``t / Σt``
    (equal shares when every weight is zero): what ``explain`` shows.
    """
    if not members:
        return []
    if all(e.weight <= 0 for e in members):
        return [1.0 / len(members)] * len(members)
    total = sum(max(0.0, e.weight) for e in members)
    return [max(0.0, e.weight) / total for e in members]
