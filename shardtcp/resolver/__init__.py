"""
The shard resolver: chooses the shard instance that takes a connection.

It knows no protocol: the connection path gives it a ``ConnectionRequest``
and gets ranked ``Candidate`` shards back, then holds a ``Lease`` on the one
it uses. ``sources`` says where shard records come from, ``scoring`` holds
the score formulas, ``service`` the ``ShardResolver`` itself.
"""

from shardtcp.resolver.scoring import (
    estimated_rtt_ms,
    great_circle_km,
    latency_factor,
    load_factor,
    security_factor,
    total_score,
)
from shardtcp.resolver.service import (
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
from shardtcp.resolver.sources import IShardSource, StaticShardSource

__all__ = [
    "AccessDenied",
    "Candidate",
    "ConnectStats",
    "Explanation",
    "IShardSource",
    "Lease",
    "NoShardAvailable",
    "ResolverError",
    "ShardExplanation",
    "ShardResolver",
    "StaticShardSource",
    "UnknownService",
    "UnknownShard",
    "estimated_rtt_ms",
    "great_circle_km",
    "latency_factor",
    "load_factor",
    "security_factor",
    "total_score",
]
