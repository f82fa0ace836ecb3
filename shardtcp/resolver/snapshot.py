# -*- test-case-name: tests.test_status -*-
"""
A frozen picture of the resolver's live state at one moment.

``ShardResolver.snapshot()`` returns a ``ResolverSnapshot``; renderers
(``shardtcp.status`` for the admin ``/status``) work from it alone, so they
need neither the resolver nor its clock.
"""

from __future__ import annotations

from typing import Optional

import attrs


@attrs.frozen
class ShardSnapshot:
    """
    One shard: its effective ``health`` and the check's ``check_health``,
    operator (``admin_state``) and agent state, whether it is eligible and
    why not, ejection, load, connections, security score with its baseline
    and source (``"feed"`` or ``"baseline"``), weights, slow-start ramp,
    measured latency and connect counters.  ``recent_keys``, for a service
    routing by shard key, counts the distinct recent keys this shard took
    (None otherwise).
    """

    shard_id: str
    address: str
    region: str
    health: str
    check_health: str
    admin_state: Optional[str]
    agent_state: Optional[str]
    agent_load: Optional[float]
    agent_weight_percent: Optional[float]
    eligible: bool
    rejected_by: tuple[str, ...]
    ejected: bool
    ejected_until: Optional[float]
    ejections: int
    total_ejections: int
    consecutive_failures: int
    open_connections: int
    capacity: int
    load: float
    security_score: float
    security_baseline: float
    security_source: str
    weight: float
    weight_overridden: bool
    slow_start_ramp: float
    effective_weight: float
    rtt_ms: Optional[float]
    rtt_samples: int
    connects_ok: int
    connects_failed: int
    recent_keys: Optional[int] = None


@attrs.frozen
class ServiceSnapshot:
    """
    One service: whether panic mode is in force, how many shards are in
    rotation (healthy and passing the hard filters), how many pass the hard
    filters (``eligible_by_policy``), and its shards in record order.
    """

    service_id: str
    panic: bool
    in_rotation: int
    eligible_by_policy: int
    shards: tuple[ShardSnapshot, ...]


@attrs.frozen
class ResolverSnapshot:
    """Every service at clock time ``time``, in record order."""

    time: float
    services: tuple[ServiceSnapshot, ...]
