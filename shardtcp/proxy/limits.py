# -*- test-case-name: tests.proxy.test_limits -*-
"""
Admission limits of one listener, decided at accept before any byte is read.

``AdmissionLimits`` holds a listener's ``max_connections`` (open
connections at which it refuses new ones) and ``per_source`` limits: open
connections and new connections per second per *source*, where a source is
an IPv4 address or an IPv6 /64 (one subscriber's prefix: counting IPv6 per
address would let one host rotate through 2**64 addresses).  The rate is a
token bucket that holds one second's worth of connections (at least one):
a source may open ``rate`` connections at once from a full bucket and
``rate`` per second after that.

Memory stays bounded: a source's entry is kept only while it has an open
connection or its bucket is refilling; entries are forgotten once they are
neither (at most one bucket-refill time after the source's last connection),
so the table holds at most the sources with open connections plus those
seen in the last refill time.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Optional

from twisted.internet.interfaces import IReactorTime

from shardtcp.model import PerSourceConfig

__all__ = ["AdmissionLimits", "LISTENER_FULL", "SOURCE_CONNECTIONS", "SOURCE_RATE", "source_key"]

#: Refusal reasons (metrics labels) of this module.
LISTENER_FULL = "listener_full"
SOURCE_CONNECTIONS = "source_connections"
SOURCE_RATE = "source_rate"


# A token refilled in float steps may fall short of 1.0 by rounding alone.
_WHOLE_TOKEN = 1.0 - 1e-6


def source_key(ip: str) -> str:
    """
    The source a client address counts against: the IPv4 address itself
    (an IPv4-mapped IPv6 address counts as its IPv4 address), or the /64 of
    an IPv6 address.
    """
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if address.version == 6:
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class _Source:
    """One source's open connections and token bucket."""

    __slots__ = ("open", "tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.open = 0
        self.tokens = tokens
        self.stamp = stamp


class AdmissionLimits:
    """
    Count a listener's open connections, per listener and per source, and
    say whether a new one is admitted.

    ``admit(ip)`` answers None and counts the connection, or the refusal
    reason; ``bind(holder, ip)`` ties the counted connection to the object
    that will later be passed to ``release`` (a protocol; a hand-over to
    another protocol goes through ``moved``).
    """

    def __init__(self, max_connections: int, per_source: PerSourceConfig, clock: IReactorTime) -> None:
        self._clock = clock
        self.open = 0
        # source key -> _Source, least recently touched first
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._held: dict = {}
        self.reconfigure(max_connections, per_source)

    def reconfigure(self, max_connections: int, per_source: PerSourceConfig) -> None:
        """
        Take new limits (a reload) and keep the counts: connections open
        now still count against the listener and their sources, and a
        source's bucket keeps its tokens (capped at the new burst), so a
        reload opens no gap for a source already at its limit.
        """
        self.max_connections = max_connections
        self.source_max = per_source.max_connections
        self.rate = per_source.rate
        self.burst = max(1.0, per_source.rate)
        self._per_source = per_source.max_connections > 0 or per_source.rate > 0
        # A bucket emptied at time t is full again at t + refill.
        self._refill = self.burst / self.rate if self.rate > 0 else 0.0
        for source in self._sources.values():
            source.tokens = min(source.tokens, self.burst)

    @property
    def enabled(self) -> bool:
        """Whether any limit is set (a listener without limits skips all of this)."""
        return self.max_connections > 0 or self._per_source

    @property
    def sources(self) -> int:
        """How many sources are remembered now (bounded; see the module docstring)."""
        return len(self._sources)

    def admit(self, ip: str) -> Optional[str]:
        """Admit and count a new connection from ``ip``, or say why not."""
        if self.max_connections and self.open >= self.max_connections:
            return LISTENER_FULL
        if not self._per_source:
            self.open += 1
            return None
        now = self._clock.seconds()
        self._forget_idle(now)
        key = source_key(ip)
        source = self._sources.get(key)
        if source is None:
            source = _Source(self.burst, now)
            self._sources[key] = source
        else:
            self._sources.move_to_end(key)
        if self.rate > 0:
            source.tokens = min(self.burst, source.tokens + (now - source.stamp) * self.rate)
            source.stamp = now
        if self.source_max and source.open >= self.source_max:
            return SOURCE_CONNECTIONS
        if self.rate > 0:
            if source.tokens < _WHOLE_TOKEN:
                return SOURCE_RATE
            source.tokens = max(0.0, source.tokens - 1.0)
        source.open += 1
        self.open += 1
        return None

    def bind(self, holder: object, ip: str) -> None:
        """``holder`` holds the connection ``admit(ip)`` just counted."""
        self._held[holder] = source_key(ip) if self._per_source else None

    def moved(self, before: object, after: object) -> None:
        """The connection held by ``before`` goes on as ``after``."""
        if before in self._held:
            self._held[after] = self._held.pop(before)

    def release(self, holder: object) -> None:
        """``holder``'s connection is closed (once; unknown holders are ignored)."""
        if holder not in self._held:
            return
        key = self._held.pop(holder)
        self.open -= 1
        if key is None:
            return
        source = self._sources.get(key)
        if source is None:
            return
        source.open -= 1
        if source.open <= 0 and self.rate <= 0:
            del self._sources[key]

    def _forget_idle(self, now: float) -> None:
        """Drop sources with no open connection whose bucket is full again."""
        if self.rate <= 0:
            # Without a rate an entry lives exactly as long as its connections.
            return
        sources = self._sources
        while sources:
            key, source = next(iter(sources.items()))
            if now - source.stamp < self._refill:
                return
            if source.open > 0:
                # Still counted: keep it, look at it again a refill later.
                source.tokens = self.burst
                source.stamp = now
                sources.move_to_end(key)
                if now - next(iter(sources.values())).stamp < self._refill:
                    return
                continue
            del sources[key]
