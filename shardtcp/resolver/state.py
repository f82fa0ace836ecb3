# -*- test-case-name: tests.resolver.test_resolver -*-
"""
The live state of each shard, and the leases counted against it.

``ShardState`` holds what changes while the proxy runs (health, operator and
agent state, overrides, leases, connect counters, ejections, measured
latency, the draw's ledger) and survives reloads of the records.  ``Lease``
counts one connection against a shard and releases it at most once.
"""

from __future__ import annotations

import datetime
from typing import Optional

import attrs

from shardtcp.model import Health, ShardConfig, ShardInfo
from shardtcp.resolver import scoring
from shardtcp.resolver.outlier import OutlierTracker

#: Operator states accepted by ``ShardResolver.set_admin_state``.
ADMIN_STATES = ("drain", "ready")


@attrs.frozen
class ConnectStats:
    """
    What the connection path reported of its connects to one shard.

    ``last_seconds`` is the duration of the last successful connect, and
    ``last_at`` the clock time of the last report, either way.
    """

    ok: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    last_seconds: Optional[float] = None
    last_at: Optional[float] = None


def timestamp(seconds: float) -> str:
    """Clock seconds as UTC ISO 8601, to the second: 2026-01-01T12:00:10Z."""
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.0f}s"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


#: Attributes whose writes change nothing a ranking reads.
_UNRANKED = frozenset({"ledger", "changed", "rtt_samples", "ejection_open"})


_set = object.__setattr__


@attrs.define(eq=False)
class ShardState:
    """
    The live, mutable state of one shard, kept across record reloads.

    Leases hold a reference to this object, so a lease taken before a reload
    still releases the count it added.

    ``health`` is the active health check's verdict (or what ``set_health``
    set); ``admin_state`` the operator's override; ``agent_admin``,
    ``agent_load`` and ``agent_weight_percent`` what the shard's agent last
    said; ``back_since`` when the slow-start ramp began; ``ledger`` the
    draw's fair-share ledger.  Only the resolver writes it; the ranking
    only reads it.  ``changed``, when set (by the service's
    ``shortlist.ServiceIndex``), receives the state on every write of an
    attribute a ranking reads.
    """

    config: ShardConfig
    service_id: str
    health: Health = Health.HEALTHY
    admin_state: Optional[str] = None
    agent_admin: Optional[str] = None
    agent_load: Optional[float] = None
    agent_weight_percent: Optional[float] = None
    security_override: Optional[float] = None
    weight_override: Optional[float] = None
    open_connections: int = 0
    #: The other proxies' open connections to this shard (the fleet's shared
    #: load, ``ShardResolver.set_remote_load``); counted in ``load()``.
    remote_connections: int = 0
    stats: ConnectStats = attrs.field(factory=ConnectStats)
    outlier: OutlierTracker = attrs.field(factory=OutlierTracker)
    ejection_open: bool = False
    rtt_ms: Optional[float] = None
    rtt_at: Optional[float] = None
    rtt_samples: int = 0
    back_since: Optional[float] = None
    ledger: float = 0.0
    changed: Optional[set] = attrs.field(default=None, repr=False)

    def __attrs_pre_init__(self) -> None:
        # ``changed`` first, so that the writes of ``__init__`` find it
        # (None) rather than an AttributeError each: 10,000 shards are
        # 230,000 writes at start-up.
        _set(self, "changed", None)

    def __setattr__(self, name: str, value: object) -> None:
        # Every write that a ranking reads tells the service's index, which
        # then reads this shard again on the next resolve (and only this
        # one).  One plain method: a lease and a connect write several.
        _set(self, name, value)
        if name not in _UNRANKED:
            changed = self.changed
            if changed is not None:
                changed.add(self)

    def take_sample(
        self, rtt_ms: float, at: float, stats: Optional[ConnectStats] = None
    ) -> None:
        """
        Take in a new measured latency ``rtt_ms`` (its value after the
        sample taken at ``at``) and count the sample; with ``stats``, the
        connect counters that came with it.  The same writes as setting
        each attribute, noted as one change.
        """
        _set(self, "rtt_ms", rtt_ms)
        _set(self, "rtt_at", at)
        _set(self, "rtt_samples", self.rtt_samples + 1)
        if stats is not None:
            _set(self, "stats", stats)
        changed = self.changed
        if changed is not None:
            changed.add(self)

    @property
    def security_score(self) -> float:
        """The feed's score when one is in force, else the record's."""
        if self.security_override is not None:
            return self.security_override
        return self.config.security_score

    @property
    def weight(self) -> float:
        """The operator's weight: the admin override, else the record's."""
        if self.weight_override is not None:
            return self.weight_override
        return self.config.weight

    def ramp(self, now: float) -> float:
        """The slow-start factor at ``now``, 0.1 to 1."""
        return scoring.slow_start_factor(self.back_since, now, self.config.slow_start)

    def effective_weight(self, now: float) -> float:
        """Operator weight × agent weight % × slow-start ramp."""
        agent = (
            self.agent_weight_percent / 100.0
            if self.agent_weight_percent is not None
            else 1.0
        )
        return self.weight * agent * self.ramp(now)

    def load(self) -> float:
        """``max((open + remote) / capacity, agent-reported load)``."""
        return scoring.combined_load(
            self.open_connections + self.remote_connections, self.config.capacity, self.agent_load
        )

    def measured_ms(self, now: float, max_age: float) -> Optional[float]:
        """The peak-EWMA connect time, unless its last sample is too old."""
        if self.rtt_ms is None or self.rtt_at is None:
            return None
        if now - self.rtt_at > max_age:
            return None
        return self.rtt_ms

    def drains(self) -> list[str]:
        """Why the shard takes no new connections (hard filters)."""
        reasons = []
        if self.admin_state != "ready":
            if self.health is Health.DRAINING:
                reasons.append("health: draining")
            if self.agent_admin is not None:
                reasons.append(f"agent: {self.agent_admin}")
        if self.admin_state == "drain":
            reasons.append("admin: drain")
        return reasons

    def sickness(self, now: float) -> list[str]:
        """Why the shard is out of rotation (the health filters)."""
        reasons = []
        if self.health is Health.UNHEALTHY:
            reasons.append("health: unhealthy")
        if self.outlier.ejected(now):
            until = self.outlier.ejected_until
            assert until is not None
            reasons.append(
                f"ejected until {timestamp(until)} "
                f"({self.outlier.consecutive} consecutive failures)"
            )
        return reasons

    def effective_health(self, now: float) -> Health:
        """UNHEALTHY when sick, DRAINING when draining, else HEALTHY."""
        if self.sickness(now):
            return Health.UNHEALTHY
        if self.drains():
            return Health.DRAINING
        return Health.HEALTHY

    def info(self, now: float, health: Optional[Health] = None) -> ShardInfo:
        """
        The shard as it stands at ``now``, as a frozen ``ShardInfo``;
        ``health``, when given, is its effective health already worked out.
        """
        # ``effective_weight`` and ``load`` worked out inline, with the
        # same arithmetic: explain and the snapshot read every shard.
        config = self.config
        weight = self.weight_override if self.weight_override is not None else config.weight
        percent = self.agent_weight_percent
        agent = percent / 100.0 if percent is not None else 1.0
        since = self.back_since
        ramp = 1.0 if since is None else scoring.slow_start_factor(since, now, config.slow_start)
        security = self.security_override
        return ShardInfo(
            config.id,
            self.service_id,
            config.address,
            config.location,
            config.capacity,
            security if security is not None else config.security_score,
            weight * agent * ramp,
            health if health is not None else self.effective_health(now),
            self.open_connections,
            scoring.combined_load(
                self.open_connections + self.remote_connections, config.capacity, self.agent_load
            ),
            config.server_name,
        )


class Lease:
    """
    One connection (opening or open) counted against a shard.

    Obtained from ``ShardResolver.lease``; ``release()`` ends the count and
    may be called any number of times, so every path that ends a connection
    can call it without coordinating with the others.
    """

    def __init__(self, state: ShardState) -> None:
        self._state = state
        self._released = False
        state.open_connections += 1

    @property
    def shard_id(self) -> str:
        """The id of the shard this lease counts against."""
        return self._state.config.id

    @property
    def released(self) -> bool:
        """Whether ``release()`` has been called."""
        return self._released

    def release(self) -> None:
        """Stop counting this connection; later calls do nothing."""
        if self._released:
            return
        self._released = True
        self._state.open_connections -= 1

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<Lease {self.shard_id} {state}>"
