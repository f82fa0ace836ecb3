# -*- test-case-name: tests.resolver.test_ownership -*-
"""
Which shard owns a shard key (SPEC section 10), as pure functions.

``key_for`` takes the key of a connection from where the service says it
comes from.  ``owner_order`` ranks shards for a key by weighted rendezvous
(highest random weight) hashing, after the pinned owners of the best
matching ``[service.S.owners]`` glob: one BLAKE2b hash of the key, one of
each shard id (kept), and a 64-bit integer mix of the two per shard.  ``chain`` walks that order over the
eligible shards with bounded load: the first owner whose open connections
are under its bound takes the key, and every owner before it says why it
was skipped.

Nothing here reads a clock, draws a random number or looks at anything of
a request but its key: the same key and the same eligible shards give the
same owner on every proxy.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import math
from typing import Iterable, Optional, Sequence

import attrs

from shardtcp.net import parse_ip

__all__ = [
    "KEY_SOURCES",
    "MAX_KEY_LENGTH",
    "Owner",
    "OwnerChain",
    "Shard",
    "bound",
    "bound_for",
    "chain",
    "key_for",
    "key_hash",
    "mix64",
    "owner_order",
    "pinned_owners",
    "rendezvous_hash",
    "rendezvous_key",
    "rendezvous_score",
    "shard_seed",
    "weighted_score",
]

#: Where a key can come from (``shard_key``); ``none`` means no key.
KEY_SOURCES = ("client-ip", "sni-label", "authority", "line-arg")

#: The longest key routed by (a DNS name's length): longer ones are no key.
MAX_KEY_LENGTH = 253

_MASK = (1 << 64) - 1
# 2**-52: a hash's top 52 bits plus one half, times this, is a uniform
# strictly inside (0, 1), and exact in a double.
_ULP52 = 2.0 ** -52
# BLAKE2b personalisations: a key and a shard id never hash alike.
_KEY_PERSON = b"shardtcp key"
_SHARD_PERSON = b"shardtcp shard"
# Copied per key: cheaper than setting the parameters up again.
_KEY_HASHER = hashlib.blake2b(digest_size=8, person=_KEY_PERSON)
_GLOB_CHARS = frozenset("*?[")


def key_for(
    source: str,
    *,
    client_ip: Optional[str] = None,
    name: Optional[str] = None,
    line_arg: Optional[str] = None,
) -> Optional[str]:
    """
    The shard key of a connection, or None when it has none.

    ``client-ip``: the client address in its canonical text (IPv4-mapped
    IPv6 as IPv4); ``authority``: the identified name without its port,
    lower-cased; ``sni-label``: that name's first label (not of an IP
    literal); ``line-arg``: the ``SHARD <service> <key>`` line's key.  Keys
    that are empty, not printable or longer than ``MAX_KEY_LENGTH`` are no
    key.
    """
    key: Optional[str] = None
    if source == "client-ip":
        address = parse_ip(client_ip) if client_ip else None
        key = str(address) if address is not None else None
    elif source in ("authority", "sni-label"):
        host = _host(name)
        if host is not None and source == "sni-label":
            key = None if parse_ip(host) is not None else host.split(".", 1)[0]
        else:
            key = host
    elif source == "line-arg":
        key = line_arg
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable() or " " in key:
        return None
    return key


def _host(name: Optional[str]) -> Optional[str]:
    """A name's host part: the port dropped, brackets of IPv6 removed."""
    if not name:
        return None
    if name.startswith("["):
        end = name.find("]")
        return name[1:end].lower() if end > 0 else None
    host, colon, port = name.rpartition(":")
    if colon and port.isdigit() and ":" not in host:
        name = host
    return name.rstrip(".").lower() or None


def key_hash(key: bytes) -> int:
    """A key's 64-bit hash: BLAKE2b of the key, personalised for keys."""
    hasher = _KEY_HASHER.copy()
    hasher.update(key)
    return int.from_bytes(hasher.digest(), "big")


@functools.lru_cache(maxsize=65536)
def shard_seed(shard_id: str) -> int:
    """A shard's 64-bit seed: BLAKE2b of its id, personalised for shard ids."""
    raw = shard_id.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=_SHARD_PERSON).digest(), "big")


def mix64(value: int) -> int:
    """
    A bijection on 64-bit integers that spreads every input bit over the
    high output bits, which decide the order: multiply, fold the high
    half onto the low, multiply again (SplitMix64's multipliers).  Its
    input is already uniform (BLAKE2b outputs XORed), so the two rounds
    suffice: over 100,000 keys the first owner and the first two owners
    of 10 and of 100 shards pass a chi-squared test of uniformity.
    Integer arithmetic only, so a vectorised copy
    (``shardtcp.resolver.ownercache``) gives the very same numbers.
    """
    value = (value * 0xBF58476D1CE4E5B9) & _MASK
    value ^= value >> 32
    return (value * 0x94D049BB133111EB) & _MASK


def rendezvous_hash(key_h: int, seed: int) -> int:
    """The 64-bit hash of a key (its ``key_hash``) at a shard (its ``shard_seed``)."""
    return mix64(key_h ^ seed)


def weighted_score(h: int, weight: float) -> float:
    """
    The weighted rendezvous score ``-weight / ln(u)`` of a ``rendezvous_hash``
    ``h``, ``u`` its top 52 bits as a uniform strictly inside (0, 1) (exact
    in a double).  A weight of 0 (or less) scores 0.
    """
    if weight <= 0:
        return 0.0
    return -weight / math.log(((h >> 12) + 0.5) * _ULP52)


def rendezvous_score(key: bytes, shard_id: str, weight: float) -> float:
    """
    The weighted rendezvous score of a shard for a key: the shard with the
    highest score owns the key (``weighted_score`` of ``rendezvous_hash``).
    """
    return weighted_score(rendezvous_hash(key_hash(key), shard_seed(shard_id)), weight)


def rendezvous_key(key_h: int, shard_id: str, weight: float) -> tuple[float, int, str]:
    """
    A shard's place in a key's rendezvous order, smallest first: higher
    score, then higher hash, then shard id.  Within one weight the score
    never falls as the hash grows, so shards of equal weight are simply in
    descending hash order.
    """
    h = rendezvous_hash(key_h, shard_seed(shard_id))
    return (-weighted_score(h, weight), -h, shard_id)


def pinned_owners(owners: Sequence[tuple], key: str) -> tuple[str, ...]:
    """
    The shard ids ``[service.S.owners]`` pins ``key`` to, in order: the
    entry naming the key exactly, else the longest matching glob (the first
    in file order among equally long ones); empty when none matches.
    """
    best: Optional[tuple[str, ...]] = None
    best_length = -1
    for pattern, ids in owners:
        if not _GLOB_CHARS.intersection(pattern):
            if pattern == key:
                return tuple(ids)
            continue
        if len(pattern) > best_length and fnmatch.fnmatchcase(key, pattern):
            best, best_length = tuple(ids), len(pattern)
    return best if best is not None else ()


@attrs.frozen
class Shard:
    """
    A shard as ownership sees it: its id, its configured weight (not the
    slow-start ramp, which must not move keys), its open connections, and
    why it is not eligible (empty when it is).
    """

    shard_id: str
    weight: float = 1.0
    open_connections: int = 0
    rejected_by: tuple[str, ...] = ()


def owner_order(
    key: str, shards: Iterable[Shard], owners: Sequence[tuple] = ()
) -> list[Shard]:
    """
    Every shard in order of ownership of ``key``: the pinned owners (of the
    shards given) in their listed order, then the rest by descending
    rendezvous score, ties by descending hash, then shard id
    (``rendezvous_key``).  This is the reference: the resolver's cached
    order (``shardtcp.resolver.ownercache``) is tested against it.
    """
    raw = key.encode("utf-8")
    shards = list(shards)
    by_id = {s.shard_id: s for s in shards}
    pinned = [by_id[i] for i in pinned_owners(owners, key) if i in by_id]
    taken = {s.shard_id for s in pinned}
    rest = [s for s in shards if s.shard_id not in taken]
    key_h = key_hash(raw)
    rest.sort(key=lambda s: rendezvous_key(key_h, s.shard_id, s.weight))
    return pinned + rest


def bound_for(shard: Shard, total_open: int, total_weight: float, count: int, bounded_load: float) -> int:
    """
    The open connections at which an eligible shard stops taking keys it
    owns: ``ceil(bounded_load x its share of the load counting this
    connection)``, its share being its weight over all eligible weight (an
    equal share when no eligible shard has weight).  Some eligible shard
    is always under its bound.
    """
    return bound(shard.weight, total_open, total_weight, count, bounded_load)


def bound(weight: float, total_open: int, total_weight: float, count: int, bounded_load: float) -> int:
    """``bound_for`` from the numbers alone (no ``Shard`` built)."""
    load = bounded_load * (total_open + 1)
    share = weight / total_weight if total_weight > 0 else 1.0 / count
    return math.ceil(load * max(share, 0.0) - 1e-9)


@attrs.frozen
class Owner:
    """
    One place in an owner chain: the shard, whether it was pinned, and why
    it did not take the key (its filters when it is not eligible; the
    bounded load for an eligible owner before the taker; empty for the
    taker and the eligible owners after it).
    """

    shard_id: str
    pinned: bool
    skipped: tuple[str, ...] = ()
    open_connections: int = 0
    bound: Optional[int] = None


@attrs.frozen
class OwnerChain:
    """
    A key's owners in order.  ``taker`` is the index in ``owners`` of the
    shard that takes the connection (None when no shard is eligible);
    ``order`` the eligible shard ids, taker first, then the other eligible
    owners in chain order (the retry order).
    """

    key: str
    owners: tuple[Owner, ...]
    taker: Optional[int]
    order: tuple[str, ...]


def chain(
    key: str,
    shards: Iterable[Shard],
    *,
    owners: Sequence[tuple] = (),
    bounded_load: float = 1.25,
) -> OwnerChain:
    """
    Walk the owners of ``key``: shards not eligible are skipped with their
    reasons; the first eligible owner under its bound takes the key, those
    before it are skipped as over the bounded load.
    """
    ordered = owner_order(key, shards, owners)
    pinned = set(pinned_owners(owners, key))
    eligible = [s for s in ordered if not s.rejected_by]
    total_open = sum(s.open_connections for s in eligible)
    total_weight = sum(max(s.weight, 0.0) for s in eligible)
    count = len(eligible)
    result: list[Owner] = []
    taker: Optional[int] = None
    for shard in ordered:
        is_pinned = shard.shard_id in pinned
        if shard.rejected_by:
            result.append(Owner(shard.shard_id, is_pinned, shard.rejected_by, shard.open_connections))
            continue
        bound = bound_for(shard, total_open, total_weight, count, bounded_load)
        if taker is None and shard.open_connections >= bound:
            why = f"bounded_load: {shard.open_connections} open >= bound {bound}"
            result.append(Owner(shard.shard_id, is_pinned, (why,), shard.open_connections, bound))
            continue
        if taker is None:
            taker = len(result)
        result.append(Owner(shard.shard_id, is_pinned, (), shard.open_connections, bound))
    if taker is None and eligible:
        # Only rounding could leave every eligible owner at its bound; the
        # first eligible owner then takes the key rather than nobody.
        taker = next(i for i, o in enumerate(result) if o.shard_id == eligible[0].shard_id)
        result[taker] = attrs.evolve(result[taker], skipped=())
    order: list[str] = []
    if taker is not None:
        order.append(result[taker].shard_id)
        order.extend(
            s.shard_id for s in eligible if s.shard_id != result[taker].shard_id
        )
    return OwnerChain(key, tuple(result), taker, tuple(order))
