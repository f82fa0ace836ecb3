"""
The shard resolver: chooses the shard instance that takes a connection.

It knows no protocol: the connection path gives it a ``ConnectionRequest``
and gets ranked ``Candidate`` shards back, then holds a ``Lease`` on the one
it uses and reports how the connect went. ``sources`` says where shard
records come from, ``scoring`` holds the score formulas, ``choice`` the
draw among the best shards, ``outlier`` passive ejection, ``agent`` the
agent-check reply format, ``health`` the active health checks, ``state``
each shard's live state and leases, ``ranking`` the one pipeline behind
``resolve`` and ``explain``, ``snapshot`` the frozen view ``status``
renders, and ``service`` the ``ShardResolver`` itself.
"""

from shardtcp.resolver.agent import AgentReplyError, AgentReport, parse_agent_reply
from shardtcp.resolver.interfaces import IResolver, IResolverControl
from shardtcp.resolver.outlier import OutlierPolicy, OutlierTracker
from shardtcp.resolver.ranking import Factors
from shardtcp.resolver.scoring import (
    combined_load,
    ejection_seconds,
    estimated_rtt_ms,
    great_circle_km,
    latency_factor,
    load_factor,
    path_rtt_ms,
    peak_ewma,
    security_factor,
    slow_start_factor,
    spare_factor,
    total_score,
)
from shardtcp.resolver.service import (
    ADMIN_STATES,
    AccessDenied,
    Candidate,
    ConnectStats,
    Explanation,
    Lease,
    NoShardAvailable,
    ResolverError,
    ShardExplanation,
    ShardResolver,
    UnknownService,
    UnknownShard,
)
from shardtcp.resolver.snapshot import ResolverSnapshot, ServiceSnapshot, ShardSnapshot
from shardtcp.resolver.sources import IShardSource, StaticShardSource

# The active health checks pull in TLS, endpoints and the web client: loaded
# when first asked for, so that commands which never check (explain,
# check-config) do not pay for them.
_HEALTH_NAMES = frozenset({"CheckResult", "HealthChecker", "build_health_service"})


def __getattr__(name: str):
    if name in _HEALTH_NAMES:
        from shardtcp.resolver import health

        return getattr(health, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ADMIN_STATES",
    "AccessDenied",
    "AgentReplyError",
    "AgentReport",
    "Candidate",
    "CheckResult",
    "ConnectStats",
    "Explanation",
    "Factors",
    "HealthChecker",
    "IResolver",
    "IResolverControl",
    "IShardSource",
    "Lease",
    "NoShardAvailable",
    "OutlierPolicy",
    "OutlierTracker",
    "ResolverError",
    "ResolverSnapshot",
    "ServiceSnapshot",
    "ShardExplanation",
    "ShardResolver",
    "ShardSnapshot",
    "StaticShardSource",
    "UnknownService",
    "UnknownShard",
    "build_health_service",
    "combined_load",
    "ejection_seconds",
    "estimated_rtt_ms",
    "great_circle_km",
    "latency_factor",
    "load_factor",
    "parse_agent_reply",
    "path_rtt_ms",
    "peak_ewma",
    "security_factor",
    "slow_start_factor",
    "spare_factor",
    "total_score",
]
