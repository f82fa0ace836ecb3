"""
Tests for shardtcp.metrics' per-shard series: written straight from the
resolver's snapshot, they are what ``generate_latest`` writes for the
same series, and reading other metrics does not build them.
"""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.metrics import GCPauses, ProxyMetrics, ShardCollector
from shardtcp.resolver.snapshot import ResolverSnapshot, ServiceSnapshot, ShardSnapshot


def _shard(shard_id: str, **changes) -> ShardSnapshot:
    fields = dict(
        shard_id=shard_id, address="127.0.0.1:9", region="eu", health="healthy",
        check_health="healthy", admin_state=None, agent_state=None, agent_load=None,
        agent_weight_percent=None, eligible=True, rejected_by=(), ejected=False,
        ejected_until=None, ejections=0, total_ejections=0, consecutive_failures=0,
        open_connections=0, capacity=100, load=0.0, security_score=90.0,
        security_baseline=90.0, security_source="baseline", weight=1.0,
        weight_overridden=False, slow_start_ramp=1.0, effective_weight=1.0, rtt_ms=None,
        rtt_samples=0, connects_ok=0, connects_failed=0,
    )
    fields.update(changes)
    return ShardSnapshot(**fields)


SHARDS = (
    _shard("a-1"),
    _shard("a-2", open_connections=7, load=0.07, effective_weight=0.1 + 0.2),
    _shard("a-3", health="unhealthy", eligible=False, load=-0.0, security_score=1e9),
    _shard('we"ird\\id\nx', admin_state="drain", effective_weight=float("inf")),
    _shard("a-5", agent_state="maint", security_score=float("nan"), capacity=0, load=1.0),
    _shard("a-6", agent_state="drain", admin_state="ready", effective_weight=1234567.0),
)


def snapshot_of(*services) -> ResolverSnapshot:
    return ResolverSnapshot(
        time=1.0,
        services=tuple(
            ServiceSnapshot(service_id=sid, panic=False, in_rotation=1, eligible_by_policy=1, shards=shards)
            for sid, shards in services
        ),
    )


class ShardSeriesTests(SynchronousTestCase):
    """``ShardCollector.text`` against ``generate_latest`` over ``collect``."""

    def reference(self, snapshot: ResolverSnapshot) -> str:
        registry = CollectorRegistry()
        registry.register(ShardCollector(lambda: snapshot))
        return generate_latest(registry).decode("utf-8")

    def test_text_is_what_generate_latest_writes(self) -> None:
        """
        Over two services and shards with quotes, backslashes and a newline
        in their id, drains by operator and agent, an operator ``ready``
        over an agent drain, -0.0, NaN, infinity and large values, the
        text is byte for byte the reference's; and again after a shard
        leaves and its values change (the labels kept for it are dropped).
        """
        collector_snapshot = [snapshot_of(("api", SHARDS), ("w\\eb", SHARDS[:2]))]
        collector = ShardCollector(lambda: collector_snapshot[0])
        self.assertEqual(collector.text(), self.reference(collector_snapshot[0]))
        self.assertIn('shardtcp_shard_draining{service="api",shard="we\\"ird\\\\id\\nx"} 1.0\n', collector.text())
        changed = (attrs.evolve(SHARDS[0], open_connections=3, load=0.03),) + SHARDS[2:]
        collector_snapshot[0] = snapshot_of(("api", changed))
        self.assertEqual(collector.text(), self.reference(collector_snapshot[0]))
        self.assertEqual(len(collector._labels), 5)

    def test_render_writes_the_series_and_value_does_not_build_them(self) -> None:
        """
        ``render`` holds every per-shard line; ``value`` (the /status
        counters) reads the registry without asking for a snapshot.
        """
        calls = []

        def snapshot() -> ResolverSnapshot:
            calls.append(1)
            return snapshot_of(("api", SHARDS[:2]))

        metrics = ProxyMetrics()
        metrics.watch_shards(snapshot)
        metrics.accepted.labels("edge").inc()
        self.assertEqual(metrics.value("shardtcp_connections_accepted_total", listener="edge"), 1.0)
        self.assertEqual(calls, [])
        body = metrics.render().decode("utf-8")
        self.assertEqual(calls, [1])
        self.assertIn('shardtcp_connections_accepted_total{listener="edge"} 1.0\n', body)
        self.assertIn('shardtcp_shard_open_connections{service="api",shard="a-2"} 7.0\n', body)
        self.assertIn('shardtcp_shard_weight{service="api",shard="a-2"} 0.30000000000000004\n', body)
        self.assertTrue(body.endswith('shardtcp_shard_weight{service="api",shard="a-2"} 0.30000000000000004\n'))


class GCPausesTests(SynchronousTestCase):
    """``GCPauses``: each collector run, timed into ``shardtcp_gc_pause_seconds`` by generation."""

    def bucket(self, metrics: ProxyMetrics, generation: str, le: str) -> float:
        return metrics.value("shardtcp_gc_pause_seconds_bucket", generation=generation, le=le)

    def test_pause_lands_in_its_bucket_at_both_edges(self) -> None:
        """A pause of exactly a bound counts in that bound's bucket; a hair over, in the next only."""
        now = [100.0]
        metrics = ProxyMetrics()
        pauses = GCPauses(metrics, clock=lambda: now[0])
        pauses("start", {"generation": 2})
        now[0] += 0.0025
        pauses("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
        self.assertEqual(self.bucket(metrics, "2", "0.001"), 0.0)
        self.assertEqual(self.bucket(metrics, "2", "0.0025"), 1.0)
        pauses("start", {"generation": 2})
        now[0] += 0.0025 + 1e-9
        pauses("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
        self.assertEqual(self.bucket(metrics, "2", "0.0025"), 1.0)
        self.assertEqual(self.bucket(metrics, "2", "0.005"), 2.0)
        self.assertEqual(metrics.value("shardtcp_gc_pause_seconds_count", generation="2"), 2.0)
        self.assertEqual(metrics.value("shardtcp_gc_pause_seconds_count", generation="0"), 0.0)
        self.assertAlmostEqual(metrics.value("shardtcp_gc_pause_seconds_sum", generation="2"), 0.005, places=6)

    def test_each_generation_and_nothing_else(self) -> None:
        """Generations 0, 1 and 2 each have their series; anything else reported is ignored, not raised."""
        now = [0.0]
        metrics = ProxyMetrics()
        pauses = GCPauses(metrics, clock=lambda: now[0])
        for generation in (0, 1, 1, 7, -1):
            pauses("start", {"generation": generation})
            now[0] += 0.0001
            pauses("stop", {"generation": generation})
        counts = [metrics.value("shardtcp_gc_pause_seconds_count", generation=str(g)) for g in range(3)]
        self.assertEqual(counts, [1.0, 2.0, 0.0])

    def test_installed_it_sees_real_collections_until_removed(self) -> None:
        """Installed, ``gc.collect()`` counts one full collection; removed (twice is harmless), none."""
        import gc

        metrics = ProxyMetrics()
        pauses = GCPauses(metrics)
        pauses.install()
        pauses.install()
        self.addCleanup(pauses.remove)
        self.assertEqual(gc.callbacks.count(pauses), 1)
        gc.collect()
        self.assertEqual(metrics.value("shardtcp_gc_pause_seconds_count", generation="2"), 1.0)
        self.assertGreater(metrics.value("shardtcp_gc_pause_seconds_sum", generation="2"), 0.0)
        pauses.remove()
        pauses.remove()
        self.assertNotIn(pauses, gc.callbacks)
        gc.collect()
        self.assertEqual(metrics.value("shardtcp_gc_pause_seconds_count", generation="2"), 1.0)
