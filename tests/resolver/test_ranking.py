"""
Tests for shardtcp.resolver.ranking and the seams around it: resolve and
explain share one pipeline (admission included), the ranking is pure, the
factors are a typed value, and ShardResolver provides its interfaces.
"""

from __future__ import annotations

import random

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from shardtcp.model import Health, PolicyConfig
from shardtcp.net import parse_ip
from shardtcp.resolver import (
    AccessDenied,
    Factors,
    IResolver,
    IResolverControl,
    ShardResolver,
)
from shardtcp.resolver import ranking
from shardtcp.resolver.state import ShardState

from tests.resolver.test_resolver import (
    AP_CLIENT,
    EU_CLIENT,
    US_CLIENT,
    make_config,
    net,
    request,
    resolver_for,
    shard,
    world_shards,
)
from tests.support import FRANKFURT, NEW_YORK, SINGAPORE

FEED_RULE = "threat feed intel.example seq 7 denies 203.0.113.0/24"


def feed_denies(ip: str):
    """A stand-in for ThreatIntel.denies: the EU test network is denied."""
    return FEED_RULE if ip.startswith("203.0.113.") else None


class InterfaceTests(SynchronousTestCase):
    """ShardResolver provides the interfaces its callers hold."""

    def test_provides_resolver_interfaces(self) -> None:
        """ShardResolver fully implements IResolver and IResolverControl."""
        resolver = resolver_for(make_config())
        self.assertTrue(verifyObject(IResolver, resolver))
        self.assertTrue(verifyObject(IResolverControl, resolver))


class AdmissionTests(SynchronousTestCase):
    """explain admits clients exactly as resolve does."""

    def test_feed_denied_client_is_denied_by_both(self) -> None:
        """
        With a threat feed in force, a client it denies gets AccessDenied
        from resolve naming the feed, and explain shows the same refusal
        with no shard eligible; other clients are unaffected.
        """
        resolver = resolver_for(make_config())
        resolver.set_admission(feed_denies)
        error = self.assertRaises(AccessDenied, resolver.resolve, request(EU_CLIENT))
        self.assertEqual(error.rule, FEED_RULE)
        explanation = resolver.explain(request(EU_CLIENT))
        self.assertEqual(explanation.denied, FEED_RULE)
        self.assertEqual(len(explanation.shards), 3)
        for s in explanation.shards:
            self.assertEqual(s.rejected_by[0], f"denied: {FEED_RULE}")
        self.assertIsNone(resolver.explain(request(US_CLIENT)).denied)
        self.assertEqual(resolver.resolve(request(US_CLIENT))[0].shard.shard_id, "us-ny-1")

    def test_admission_given_at_construction(self) -> None:
        """The admission check may be given to the constructor as well."""
        resolver = ShardResolver(make_config(), clock=Clock(), admission=feed_denies)
        self.assertEqual(resolver.explain(request(EU_CLIENT)).denied, FEED_RULE)

    def test_policy_denied_client_ranks_nothing(self) -> None:
        """
        A client the policy denies is not ranked by explain: every shard is
        listed as rejected, the rule first, none in the draw.
        """
        resolver = resolver_for(
            make_config(policy=PolicyConfig(deny=(net("198.51.100.0/24"),)))
        )
        explanation = resolver.explain(request(US_CLIENT))
        self.assertEqual(explanation.denied, "policy.deny 198.51.100.0/24")
        self.assertTrue(all(s.rejected_by for s in explanation.shards))
        self.assertFalse(any(s.evaluation.details.get("in_draw") for s in explanation.shards))


class OnePipelineTests(SynchronousTestCase):
    """resolve's retry order is explain's eligible order, whatever the state."""

    def test_orders_agree(self) -> None:
        """
        Over many random live states (health, drains, leases, weights,
        agent load, measured latency), the shards resolve returns are the
        ones explain calls eligible (when ``retries`` lets it offer them
        all), and after the drawn first one they follow explain's rank
        order.
        """
        rng = random.Random(11)
        shards = tuple(
            shard(f"s{i}", (NEW_YORK, FRANKFURT, SINGAPORE)[i % 3], capacity=4, port=9000 + i)
            for i in range(9)
        )
        for _ in range(60):
            resolver = resolver_for(make_config(shards))
            for s in shards:
                resolver.set_health(
                    s.id, rng.choice([Health.HEALTHY] * 4 + [Health.UNHEALTHY, Health.DRAINING])
                )
                for _ in range(rng.randrange(6)):
                    resolver.lease(s.id)
                resolver.set_weight(s.id, rng.choice([0.0, 0.5, 1.0, 2.0]))
                if rng.random() < 0.5:
                    resolver.record_rtt(s.id, rng.random() / 10)
            client = rng.choice([US_CLIENT, EU_CLIENT, AP_CLIENT])
            explanation = resolver.explain(request(client))
            eligible = [s.shard.shard_id for s in explanation.shards if not s.rejected_by]
            if not eligible:
                continue
            candidates = [
                c.shard.shard_id for c in resolver.resolve(request(client), retries=len(shards))
            ]
            self.assertEqual(sorted(candidates), sorted(eligible))
            self.assertEqual(candidates[1:], [i for i in eligible if i != candidates[0]])


def table_and_client(
    client_location=NEW_YORK,
) -> tuple[ranking.ServiceTable, ranking.Client]:
    """The test service's table over fresh live state, and a placed client."""
    service = make_config().services[0]
    states = [ShardState(config=s, service_id=service.id) for s in service.shards]
    table = ranking.ServiceTable.build(service, states, None)
    return table, ranking.Client(US_CLIENT, parse_ip(US_CLIENT), client_location, "geo")


class PurityTests(SynchronousTestCase):
    """ranking.rank reads live state and changes none of it."""

    def test_rank_changes_nothing(self) -> None:
        """
        Ranking twice gives the same answer and leaves ledgers, leases and
        health untouched, even in panic mode.
        """
        table, client = table_and_client()
        table.shards[0].health = Health.UNHEALTHY
        table.shards[1].health = Health.UNHEALTHY
        table.shards[2].ledger = 3.0
        table.shards[2].open_connections = 5
        before = [attrs.asdict(s, recurse=False) for s in table.shards]
        first = ranking.rank(table, client, 0.0, ranking.Settings(), score_all=True)
        second = ranking.rank(table, client, 0.0, ranking.Settings(), score_all=True)
        self.assertTrue(first.panic)
        self.assertEqual(
            [(r.info, r.total, r.reasons) for r in first.eligible + first.rejected],
            [(r.info, r.total, r.reasons) for r in second.eligible + second.rejected],
        )
        self.assertEqual([attrs.asdict(s, recurse=False) for s in table.shards], before)

    def test_resolve_scores_only_eligible(self) -> None:
        """
        Without score_all the rejected shards are neither scored nor
        listed; their reasons are kept only when nothing is eligible.
        """
        table, client = table_and_client()
        table.shards[2].admin_state = "drain"
        result = ranking.rank(table, client, 0.0, ranking.Settings())
        self.assertEqual([r.info.shard_id for r in result.eligible], ["us-ny-1", "eu-fra-1"])
        self.assertEqual(result.rejected, ())
        self.assertEqual(result.rejections, {})
        table.shards[0].admin_state = table.shards[1].admin_state = "drain"
        result = ranking.rank(table, client, 0.0, ranking.Settings())
        self.assertEqual(result.eligible, ())
        self.assertEqual(result.rejections["ap-sg-1"], ("admin: drain",))

    def test_denied_client_looks_at_no_shard(self) -> None:
        """
        For resolve (no score_all) a refused client's ranking is empty:
        admission comes before any shard is looked at.
        """
        table, client = table_and_client()
        result = ranking.rank(table, client, 0.0, ranking.Settings(), threat=feed_denies)
        self.assertIsNone(result.denied)
        eu = ranking.Client(EU_CLIENT, parse_ip(EU_CLIENT), FRANKFURT, "geo")
        result = ranking.rank(table, eu, 0.0, ranking.Settings(), threat=feed_denies)
        self.assertEqual((result.denied, result.eligible, result.rejected), (FEED_RULE, (), ()))


class FactorsTests(SynchronousTestCase):
    """The factors are a frozen, typed value; details are derived from it."""

    def test_frozen_and_typed(self) -> None:
        """
        explain's shards carry Factors; they cannot be changed, and
        evaluation.details is exactly Factors.as_dict().
        """
        resolver = resolver_for(make_config())
        resolver.record_rtt("eu-fra-1", 0.030)
        explanation = resolver.explain(request(EU_CLIENT))
        top = explanation.shards[0]
        self.assertIsInstance(top.factors, Factors)
        self.assertEqual(top.factors.latency_source, "geo+measured")
        self.assertTrue(top.factors.in_draw)
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, top.factors, "rtt_ms", 1.0)
        self.assertEqual(top.evaluation.details, top.factors.as_dict())

    def test_resolve_details_match_explain(self) -> None:
        """
        A candidate's factors, worked out on demand, equal explain's for the
        same shard (but for the draw fields, which only explain has).
        """
        resolver = resolver_for(make_config(world_shards()))
        candidates = {c.shard.shard_id: c for c in resolver.resolve(request(AP_CLIENT))}
        for s in resolver.explain(request(AP_CLIENT)).shards:
            self.assertEqual(
                attrs.evolve(s.factors, in_draw=None, draw_share=None),
                candidates[s.shard.shard_id].factors,
            )
            self.assertNotIn("in_draw", candidates[s.shard.shard_id].evaluation.details)
