# -*- test-case-name: tests.registry.test_fleet -*-
"""
What the proxies of a fleet share through etcd (SPEC 9): their load, and the
operator's fleet-wide overrides.

``LoadSharing`` publishes this proxy's open connections per shard under
``<prefix>/load/<proxy-id>`` (JSON ``{"shard-id": n}``) under its own lease,
at most once per ``interval`` and only when they changed, and follows
``<prefix>/load/`` to hand the sum of the other proxies' latest counts to
the resolver (``set_remote_load``).  A proxy whose key disappears (its lease
ran out: it died) stops counting.

``FleetAdmin`` follows ``<prefix>/admin/<shard-id>`` (``{"state": "drain" |
"ready", "weight": W}``) and applies each through the resolver's operator
calls, the ones the admin API uses; a deleted key clears the override.

Both follow their prefix with ``shardtcp.registry.follow.Follower``, as the
shard source does: a range, then a watch from the next revision, a full
re-read on compaction, and retries with backoff and jitter.  While etcd
cannot be reached they keep what they last saw (fail-static).
"""

from __future__ import annotations

import json
import random as _random
from typing import Callable, Optional

from twisted.internet.defer import CancelledError, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from shardtcp.registry.etcd import EtcdClient
from shardtcp.registry.follow import Follower

log = Logger(namespace="shardtcp.registry")

#: The largest count or weight taken from a peer's or operator's record.
MAX_COUNT = 10_000_000


def load_prefix(prefix: str) -> bytes:
    """``<prefix>/load/``."""
    return (prefix.rstrip("/") + "/load/").encode("utf-8")


def admin_prefix(prefix: str) -> bytes:
    """``<prefix>/admin/``."""
    return (prefix.rstrip("/") + "/admin/").encode("utf-8")


def admin_key(prefix: str, shard_id: str) -> bytes:
    """``<prefix>/admin/<shard-id>``: a fleet-wide operator override."""
    return admin_prefix(prefix) + shard_id.encode("utf-8")


def parse_counts(value: bytes) -> Optional[dict[str, int]]:
    """A peer's ``{"shard-id": n}``; None when it is not that."""
    try:
        document = json.loads(value)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    counts = {}
    for shard_id, n in document.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_COUNT:
            return None
        counts[str(shard_id)] = n
    return counts


def parse_override(value: bytes) -> tuple[Optional[tuple[Optional[str], Optional[float]]], Optional[str]]:
    """``((state, weight), None)`` of an admin record, or ``(None, problem)``."""
    try:
        document = json.loads(value)
    except ValueError:
        return None, "the value is not JSON"
    if not isinstance(document, dict):
        return None, "expected a JSON object"
    unknown = set(document) - {"state", "weight"}
    if unknown:
        return None, f"unknown keys {sorted(unknown)}"
    state = document.get("state")
    if state is not None and state not in ("drain", "ready"):
        return None, f'state must be "drain" or "ready", not {state!r}'
    weight = document.get("weight")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= MAX_COUNT:
            return None, f"weight must be a number from 0, not {weight!r}"
        weight = float(weight)
    return (state, weight), None


class _Follower(Follower):
    """Follows every key under ``prefix``: ``_replace`` then ``_events``."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: bytes,
        *,
        clock: IReactorTime,
        backoff: tuple[float, float] = (0.5, 10.0),
        random: Optional[_random.Random] = None,
    ) -> None:
        super().__init__(client, prefix, clock=clock, backoff=backoff, random=random)
        #: How many changes etcd announced under the prefix.
        self.changes = 0

    def _replace(self, kvs: list) -> None:
        raise NotImplementedError

    def _events(self, events: list) -> None:
        raise NotImplementedError

    def replaced(self, revision: int, kvs: list) -> None:
        self.revision = revision
        self._replace(kvs)

    def changed(self, revision: int, events: list) -> None:
        self.revision = max(self.revision, revision)
        self.changes += 1
        self._events(events)

    def stale_changed(self, stale: bool, reason: str) -> None:
        if stale:
            log.warn("registry: lost {prefix} ({error}); keeping what was seen",
                     prefix=self._prefix.decode("utf-8", "replace"), error=reason)


class LoadSharing(_Follower):
    """
    Publishes this proxy's load and feeds the other proxies' to the resolver.

    ``own()`` returns this proxy's open connections by shard id;
    ``apply(counts)`` takes the sum of the others' (``set_remote_load``).
    Where other remote load adds to the fleet's (a proxy's other worker
    processes), ``apply`` is ``RemoteLoad.sink("fleet")`` of
    ``shardtcp.workers.aggregate``, which hands the resolver the sum.
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        proxy_id: str,
        own: Callable[[], dict],
        apply: Callable[[dict], None],
        *,
        clock: IReactorTime,
        lease_ttl: float = 10.0,
        interval: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(client, load_prefix(prefix), clock=clock, **kwargs)
        self._key = load_prefix(prefix) + proxy_id.encode("utf-8")
        self._own = own
        self._apply = apply
        self._ttl = max(2, int(round(lease_ttl)))
        self._interval = interval
        self._lease = 0
        self._published: Optional[dict] = None
        self._last_keepalive = 0.0
        self._busy = False
        self._in_flight = None
        self._loop: Optional[LoopingCall] = None
        #: peer proxy id -> (counts, clock time last seen)
        self.peers: dict[str, tuple[dict, float]] = {}
        #: How many times this proxy's counts were written.
        self.publications = 0

    # -- following the others -------------------------------------------------

    def _peer(self, key: bytes) -> Optional[str]:
        if key == self._key:
            return None
        return key[len(self._prefix):].decode("utf-8", "replace")

    def _replace(self, kvs: list) -> None:
        now = self._clock.seconds()
        peers = {}
        for kv in kvs:
            peer = self._peer(kv.key)
            counts = parse_counts(kv.value) if peer else None
            if counts is not None:
                previous = self.peers.get(peer)
                same = previous is not None and previous[0] == counts
                peers[peer] = (counts, previous[1] if same else now)
        self.peers = peers
        self._push()

    def _events(self, events: list) -> None:
        now = self._clock.seconds()
        for event in events:
            peer = self._peer(event.kv.key)
            if not peer:
                continue
            if event.kind == "delete":
                self.peers.pop(peer, None)
                continue
            counts = parse_counts(event.kv.value)
            if counts is None:
                log.warn("registry: ignoring the load of {peer}: not {{\"shard-id\": n}}", peer=peer)
                self.peers.pop(peer, None)
            else:
                self.peers[peer] = (counts, now)
        self._push()

    def remote(self) -> dict[str, int]:
        """The other proxies' open connections, summed by shard id."""
        total: dict[str, int] = {}
        for counts, _ in self.peers.values():
            for shard_id, n in counts.items():
                total[shard_id] = total.get(shard_id, 0) + n
        return total

    def _push(self) -> None:
        self._apply(self.remote())

    def reapply(self) -> None:
        """Hand the resolver the others' load again (after its shards changed)."""
        self._push()

    def status(self) -> dict:
        """Each peer's shard count and the age of its last report, for ``/status``."""
        now = self._clock.seconds()
        return {
            peer: {"shards": len(counts), "connections": sum(counts.values()), "age": round(now - at, 3)}
            for peer, (counts, at) in sorted(self.peers.items())
        }

    # -- publishing this proxy's -----------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._in_flight is not None:
            # a report on its way (to an etcd that may be gone) is dropped
            self._in_flight.cancel()
        super().stopService()
        lease, self._lease = self._lease, 0
        if lease:
            # The key goes at once instead of after the TTL; bounded, as
            # every call is, and not waited for when etcd is gone.
            d = self._client.revoke(lease)
            d.addErrback(lambda _: None)
            return d
        return None

    def _tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        d = self._in_flight = self._publish()
        d.addErrback(self._failed)
        d.addBoth(self._done)

    def _done(self, _) -> None:
        self._busy = False
        self._in_flight = None

    def _failed(self, failure) -> None:
        if not failure.check(CancelledError):
            # Published again on the next tick.
            self._published = None

    @inlineCallbacks
    def _publish(self):
        now = self._clock.seconds()
        if not self._lease:
            self._lease = yield self._client.grant(self._ttl)
            self._published = None
            self._last_keepalive = now
        elif now - self._last_keepalive >= self._ttl / 3.0:
            remaining = yield self._client.keepalive(self._lease)
            self._last_keepalive = now
            if remaining <= 0:
                self._lease = 0
                self._published = None
                return
        counts = dict(sorted(self._own().items()))
        if counts == self._published:
            return
        yield self._client.put(self._key, json.dumps(counts).encode("utf-8"), lease=self._lease)
        self._published = counts
        self.publications += 1


class FleetAdmin(_Follower):
    """
    Applies ``<prefix>/admin/<shard-id>`` overrides to the resolver.

    ``resolver`` is the ``ShardResolver`` (``set_admin_state``,
    ``set_weight``, ``clear_weight``); an override naming a shard the
    resolver does not know (yet) is applied when it appears (``reapply``).
    """

    def __init__(self, client: EtcdClient, prefix: str, resolver, *, clock: IReactorTime, **kwargs) -> None:
        super().__init__(client, admin_prefix(prefix), clock=clock, **kwargs)
        self._resolver = resolver
        #: shard id -> (state, weight) as etcd holds it
        self.overrides: dict[str, tuple[Optional[str], Optional[float]]] = {}
        #: shard id -> (state, weight) as applied to the resolver
        self._applied: dict[str, tuple[Optional[str], Optional[float]]] = {}

    def _shard(self, key: bytes) -> str:
        return key[len(self._prefix):].decode("utf-8", "replace")

    def _parse(self, key: bytes, value: bytes):
        override, problem = parse_override(value)
        if override is None:
            log.warn("registry: ignoring {key}: {problem}", key=key.decode("utf-8", "replace"), problem=problem)
        return override

    def _replace(self, kvs: list) -> None:
        overrides = {}
        for kv in kvs:
            override = self._parse(kv.key, kv.value)
            if override is not None:
                overrides[self._shard(kv.key)] = override
        self.overrides = overrides
        self.reapply()

    def _events(self, events: list) -> None:
        for event in events:
            shard_id = self._shard(event.kv.key)
            override = None if event.kind == "delete" else self._parse(event.kv.key, event.kv.value)
            if override is None:
                self.overrides.pop(shard_id, None)
            else:
                self.overrides[shard_id] = override
        self.reapply()

    def reapply(self) -> None:
        """Bring the resolver in line with ``overrides``."""
        from shardtcp.resolver.service import UnknownShard

        for shard_id in sorted(set(self._applied) | set(self.overrides)):
            wanted = self.overrides.get(shard_id, (None, None))
            applied = self._applied.get(shard_id, (None, None))
            try:
                if wanted[0] != applied[0]:
                    self._resolver.set_admin_state(shard_id, wanted[0])
                if wanted[1] != applied[1]:
                    if wanted[1] is None:
                        self._resolver.clear_weight(shard_id)
                    else:
                        self._resolver.set_weight(shard_id, wanted[1])
            except UnknownShard:
                self._applied.pop(shard_id, None)
                continue
            if shard_id in self.overrides:
                if shard_id not in self._applied or applied != wanted:
                    log.info("registry: fleet override for {shard}: state {state}, weight {weight}",
                             shard=shard_id, state=wanted[0] or "none",
                             weight="record" if wanted[1] is None else wanted[1])
                self._applied[shard_id] = wanted
            else:
                self._applied.pop(shard_id, None)
