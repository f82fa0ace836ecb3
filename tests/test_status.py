"""
Tests for shardtcp.status: the admin status document is a pure function of
a resolver snapshot.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.resolver import ResolverSnapshot, ServiceSnapshot, ShardResolver, ShardSnapshot
from shardtcp.status import render_status

from tests.resolver.test_resolver import make_config

SHARD = ShardSnapshot(
    shard_id="a-1", address="127.0.0.1:9001", region="eu", health="healthy",
    check_health="healthy", admin_state=None, agent_state="drain", agent_load=0.5,
    agent_weight_percent=None, eligible=False, rejected_by=("agent: drain",),
    ejected=False, ejected_until=None, ejections=0, total_ejections=2,
    consecutive_failures=1, open_connections=3, capacity=10, load=0.5,
    security_score=20.0, security_baseline=90.0, security_source="feed",
    weight=1.0, weight_overridden=False, slow_start_ramp=1.0, effective_weight=1.0,
    rtt_ms=4.5, rtt_samples=7, connects_ok=5, connects_failed=1,
)


class RenderStatusTests(SynchronousTestCase):
    """render_status turns a snapshot into plain JSON types."""

    def test_document(self) -> None:
        """A hand-made snapshot renders to the documented shape, lists for tuples."""
        snapshot = ResolverSnapshot(
            time=12.0,
            services=(ServiceSnapshot("a", False, 0, 1, (SHARD,)),),
        )
        document = render_status(snapshot)
        self.assertEqual(document["time"], 12.0)
        service = document["services"]["a"]
        self.assertEqual(
            (service["panic"], service["in_rotation"], service["eligible_by_policy"]),
            (False, 0, 1),
        )
        shard = service["shards"]["a-1"]
        self.assertEqual(shard["rejected_by"], ["agent: drain"])
        self.assertEqual(shard["security_source"], "feed")
        self.assertNotIn("shard_id", shard)
        self.assertEqual(len(shard), 30)
        # Not a service routing by key: no key count.
        self.assertIsNone(shard["recent_keys"])
        self.assertEqual(render_status(snapshot), document)

    def test_resolver_status_is_rendered_snapshot(self) -> None:
        """ShardResolver.status() is render_status of its snapshot()."""
        clock = Clock()
        clock.advance(100)
        resolver = ShardResolver(make_config(), clock=clock)
        resolver.set_admin_state("eu-fra-1", "drain")
        self.assertEqual(resolver.status(), render_status(resolver.snapshot()))
        shards = resolver.status()["services"]["api"]["shards"]
        self.assertEqual(shards["eu-fra-1"]["rejected_by"], ["admin: drain"])
        self.assertEqual(resolver.status()["time"], 100)
