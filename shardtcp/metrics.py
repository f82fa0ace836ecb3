"""
Prometheus metrics of the proxy.

One ``ProxyMetrics`` per process, holding its own ``CollectorRegistry`` (no
global registry: tests build as many as they like and read them back).
Label values are bounded by configuration (listener, service and shard ids)
and by the fixed vocabulary of rejection reasons, never by client input.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ProxyMetrics:
    """The counters, gauges and histograms the connection path updates."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.accepted = Counter(
            "shardtcp_connections_accepted", "Client connections accepted", ["listener"], registry=r
        )
        self.active = Gauge(
            "shardtcp_connections_active", "Client connections open now", ["listener"], registry=r
        )
        self.rejected = Counter(
            "shardtcp_connections_rejected",
            "Client connections refused before splicing, by reason",
            ["listener", "reason"],
            registry=r,
        )
        self.spliced = Counter(
            "shardtcp_connections_spliced",
            "Client connections spliced to a shard",
            ["listener", "service", "shard"],
            registry=r,
        )
        self.kernel_spliced = Counter(
            "shardtcp_connections_kernel_spliced",
            "Spliced client connections whose bytes the kernel moves (splice(2))",
            ["listener"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "shardtcp_upstream_connect_failures",
            "Failed connection attempts to shards, by reason",
            ["service", "shard", "reason"],
            registry=r,
        )
        self.connect_seconds = Histogram(
            "shardtcp_upstream_connect_seconds",
            "Time to connect to a shard",
            ["service"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.bytes = Counter(
            "shardtcp_bytes", "Bytes spliced, by direction", ["listener", "direction"], registry=r
        )
        self.ended = Counter(
            "shardtcp_connections_ended",
            "Spliced connections ended, by the side or event that ended them",
            ["listener", "ended_by"],
            registry=r,
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0.0 when absent); for tests and status."""
        result = self.registry.get_sample_value(name, labels)
        return 0.0 if result is None else result
