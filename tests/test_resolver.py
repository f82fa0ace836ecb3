"""
Tests for shardtcp.resolver: shard sources, the ShardResolver's filters,
ranking, leases and explanations, in scenarios with real coordinates.

Shards stand in New York (us-east), Frankfurt (eu-central) and Singapore
(ap-southeast); [geo] places test networks at those same cities.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, Iterable, Optional

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from shardtcp.model import (
    Address,
    Config,
    ConnectionRequest,
    GeoNetwork,
    Health,
    Location,
    PolicyConfig,
    ProxyConfig,
    ServiceConfig,
    ShardConfig,
    SigningConfig,
    Weights,
)
from shardtcp.resolver import (
    AccessDenied,
    IShardSource,
    NoShardAvailable,
    ResolverError,
    ShardResolver,
    StaticShardSource,
    UnknownService,
    UnknownShard,
    estimated_rtt_ms,
    great_circle_km,
    latency_factor,
    load_factor,
    security_factor,
    total_score,
)

NEW_YORK = Location(40.71, -74.0, "us-east")
FRANKFURT = Location(50.11, 8.68, "eu-central")
SINGAPORE = Location(1.35, 103.82, "ap-southeast")

US_CLIENT = "198.51.100.7"
EU_CLIENT = "203.0.113.9"
AP_CLIENT = "192.0.2.44"
EU_CLIENT_V6 = "2001:db8:e0::5"
UNPLACED_CLIENT = "10.1.2.3"


def net(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr)


GEO = (
    GeoNetwork(net("198.51.100.0/24"), NEW_YORK),
    GeoNetwork(net("203.0.113.0/24"), FRANKFURT),
    GeoNetwork(net("192.0.2.0/24"), SINGAPORE),
    GeoNetwork(net("2001:db8:e0::/48"), FRANKFURT),
)


def shard(
    shard_id: str,
    location: Optional[Location],
    *,
    capacity: int = 100,
    security: float = 90.0,
    weight: float = 1.0,
    port: int = 9001,
) -> ShardConfig:
    return ShardConfig(
        id=shard_id,
        address=Address("127.0.0.1", port),
        location=location,
        capacity=capacity,
        security_score=security,
        weight=weight,
    )


def world_shards(**overrides: dict) -> tuple[ShardConfig, ...]:
    """One shard per city; ``overrides`` maps a shard id to keyword changes."""
    specs = [("us-ny-1", NEW_YORK, 9001), ("eu-fra-1", FRANKFURT, 9002),
             ("ap-sg-1", SINGAPORE, 9003)]
    return tuple(
        shard(shard_id, location, port=port, **overrides.get(shard_id, {}))
        for shard_id, location, port in specs
    )


def make_config(
    shards: Iterable[ShardConfig] | None = None,
    *,
    policy: PolicyConfig | None = None,
    weights: Weights | None = None,
    geo: tuple = GEO,
    proxy_location: Optional[Location] = None,
    extra_services: tuple = (),
) -> Config:
    service = ServiceConfig(
        id="api",
        names=("api.example.test",),
        weights=weights if weights is not None else Weights(),
        policy=policy if policy is not None else PolicyConfig(),
        shards=tuple(shards) if shards is not None else world_shards(),
    )
    return Config(
        proxy=ProxyConfig(id="edge-test-1", location=proxy_location),
        signing=SigningConfig(private_key="/nonexistent/policy.pem", kid="policy-1"),
        services=(service,) + extra_services,
        geo=geo,
    )


def request(client: str, service_id: str = "api") -> ConnectionRequest:
    return ConnectionRequest(service_id=service_id, client=(client, 40000))


def chosen(resolver: ShardResolver, client: str) -> str:
    return resolver.resolve(request(client))[0].shard.shard_id


def order(resolver: ShardResolver, client: str) -> list[str]:
    return [c.shard.shard_id for c in resolver.resolve(request(client))]


def resolver_for(config: Config, **kwargs) -> ShardResolver:
    return ShardResolver(config, clock=Clock(), **kwargs)


class SourceTests(SynchronousTestCase):
    """StaticShardSource provides IShardSource over a Config's services."""

    def test_provides_interface(self) -> None:
        """StaticShardSource fully implements IShardSource."""
        self.assertTrue(verifyObject(IShardSource, StaticShardSource(make_config())))

    def test_services(self) -> None:
        """services() returns the configuration's services in file order."""
        config = make_config(
            extra_services=(ServiceConfig(id="web", shards=(shard("web-1", None),)),)
        )
        self.assertEqual(
            [s.id for s in StaticShardSource(config).services()], ["api", "web"]
        )

    def test_unsubscribe_idempotent(self) -> None:
        """
        Unsubscribing twice is harmless and removes only that subscription,
        even when the same callback was subscribed twice.
        """
        source = StaticShardSource(make_config())
        callback = lambda: None  # noqa: E731
        first = source.subscribe(callback)
        source.subscribe(callback)
        first()
        first()
        self.assertEqual(list(source._callbacks.values()), [callback])


class GeographyTests(SynchronousTestCase):
    """With all else equal, the nearest shard to the client wins."""

    def setUp(self) -> None:
        self.resolver = resolver_for(make_config())

    def test_us_client_reaches_us_shard(self) -> None:
        """
        A client from the US network is placed in New York and ranked
        New York, Frankfurt (~6200 km), Singapore (~15300 km).
        """
        candidates = self.resolver.resolve(request(US_CLIENT))
        self.assertEqual(
            [c.shard.shard_id for c in candidates], ["us-ny-1", "eu-fra-1", "ap-sg-1"]
        )
        details = [c.evaluation.details for c in candidates]
        self.assertEqual(details[0]["distance_km"], 0.0)
        self.assertEqual(details[0]["client_location_source"], "geo")
        self.assertApproximates(details[1]["distance_km"], 6202.4, 1.0)
        self.assertApproximates(details[2]["distance_km"], 15333.0, 1.0)
        # 1 ms base RTT only: 1 / (1 + 1/50).
        self.assertAlmostEqual(candidates[0].evaluation.latency, 50 / 51)

    def test_eu_client_reaches_eu_shard(self) -> None:
        """A client from the EU network reaches Frankfurt first."""
        self.assertEqual(
            order(self.resolver, EU_CLIENT), ["eu-fra-1", "us-ny-1", "ap-sg-1"]
        )

    def test_ap_client_reaches_ap_shard(self) -> None:
        """A client from the Singapore network reaches Singapore first."""
        self.assertEqual(
            order(self.resolver, AP_CLIENT), ["ap-sg-1", "eu-fra-1", "us-ny-1"]
        )

    def test_ipv6_client(self) -> None:
        """An IPv6 client inside an IPv6 geo network is located by it."""
        self.assertEqual(
            self.resolver.locate_client(EU_CLIENT_V6), (FRANKFURT, "geo")
        )
        self.assertEqual(chosen(self.resolver, EU_CLIENT_V6), "eu-fra-1")

    def test_ipv4_mapped_client(self) -> None:
        """::ffff:a.b.c.d is located as a.b.c.d."""
        mapped = "::ffff:" + US_CLIENT
        self.assertEqual(self.resolver.locate_client(mapped), (NEW_YORK, "geo"))
        self.assertEqual(chosen(self.resolver, mapped), "us-ny-1")

    def test_longest_prefix_wins(self) -> None:
        """
        The most specific geo network places the client, whatever the order
        in which networks are listed.
        """
        geo = (
            GeoNetwork(net("198.51.0.0/16"), SINGAPORE),
            GeoNetwork(net("198.51.100.0/24"), NEW_YORK),
            GeoNetwork(net("198.0.0.0/8"), FRANKFURT),
        )
        resolver = resolver_for(make_config(geo=geo))
        self.assertEqual(resolver.locate_client("198.51.100.7"), (NEW_YORK, "geo"))
        self.assertEqual(resolver.locate_client("198.51.7.1"), (SINGAPORE, "geo"))
        self.assertEqual(resolver.locate_client("198.1.1.1"), (FRANKFURT, "geo"))
        self.assertEqual(chosen(resolver, "198.51.100.7"), "us-ny-1")
        self.assertEqual(chosen(resolver, "198.51.7.1"), "ap-sg-1")

    def test_unplaced_client_uses_proxy_location(self) -> None:
        """
        A client in no geo network is placed at the proxy's location: with
        the proxy in Frankfurt, Frankfurt's shard wins.
        """
        resolver = resolver_for(make_config(proxy_location=FRANKFURT))
        self.assertEqual(
            resolver.locate_client(UNPLACED_CLIENT), (FRANKFURT, "proxy")
        )
        candidates = resolver.resolve(request(UNPLACED_CLIENT))
        self.assertEqual(candidates[0].shard.shard_id, "eu-fra-1")
        self.assertEqual(
            candidates[0].evaluation.details["client_location_source"], "proxy"
        )

    def test_no_location_is_neutral(self) -> None:
        """
        With no client nor proxy location, every shard's latency factor is
        the neutral 0.5 and no distance is claimed.
        """
        resolver = resolver_for(make_config())
        self.assertEqual(resolver.locate_client(UNPLACED_CLIENT), (None, "unknown"))
        for candidate in resolver.resolve(request(UNPLACED_CLIENT)):
            self.assertEqual(candidate.evaluation.latency, 0.5)
            self.assertIsNone(candidate.evaluation.details["distance_km"])
            self.assertEqual(
                candidate.evaluation.details["client_location_source"], "unknown"
            )

    def test_shard_without_location_is_neutral(self) -> None:
        """A shard with no location gets the neutral 0.5, a placed one does not."""
        resolver = resolver_for(
            make_config([shard("nowhere-1", None), shard("us-ny-1", NEW_YORK)])
        )
        by_id = {
            c.shard.shard_id: c.evaluation for c in resolver.resolve(request(US_CLIENT))
        }
        self.assertEqual(by_id["nowhere-1"].latency, 0.5)
        self.assertAlmostEqual(by_id["us-ny-1"].latency, 50 / 51)


class EvaluateTests(SynchronousTestCase):
    """evaluate_shard computes the factors and the total by the formulas."""

    def test_factors_and_details(self) -> None:
        """
        For an EU client and the New York shard with 25 of 100 connections
        open and a score of 80, each factor and the total match the formulas.
        """
        config = make_config(world_shards(**{"us-ny-1": {"security": 80.0}}))
        resolver = resolver_for(config)
        leases = [resolver.lease("us-ny-1") for _ in range(25)]
        info = {i.shard_id: i for i in resolver.get_shard_info("api")}["us-ny-1"]
        evaluation = resolver.evaluate_shard(info, request(EU_CLIENT))

        distance = great_circle_km(FRANKFURT, NEW_YORK)
        rtt = estimated_rtt_ms(distance)
        self.assertAlmostEqual(evaluation.details["distance_km"], distance)
        self.assertAlmostEqual(evaluation.details["rtt_ms"], rtt)
        self.assertAlmostEqual(rtt, 94.04, places=2)
        self.assertEqual(evaluation.details["client_location_source"], "geo")
        self.assertEqual(evaluation.details["open_connections"], 25)
        self.assertEqual(evaluation.details["capacity"], 100)
        self.assertAlmostEqual(evaluation.latency, latency_factor(rtt))
        self.assertEqual(evaluation.security, 0.8)
        self.assertEqual(evaluation.load, 0.75)
        expected = 0.5 * latency_factor(rtt) + 0.3 * 0.8 + 0.2 * 0.75
        self.assertAlmostEqual(evaluation.total, expected)
        self.assertAlmostEqual(evaluation.total, 0.5 * 0.34714 + 0.24 + 0.15, places=4)
        for lease in leases:
            lease.release()

    def test_weight_multiplies_total(self) -> None:
        """A shard weight of 2 doubles the weighted mean."""
        shards = world_shards(**{"us-ny-1": {"weight": 2.0}})
        resolver = resolver_for(make_config(shards))
        info = resolver.get_shard_info("api")[0]
        evaluation = resolver.evaluate_shard(info, request(US_CLIENT))
        base = total_score(
            Weights(), 50 / 51, security_factor(90.0), load_factor(0, 100)
        )
        self.assertAlmostEqual(evaluation.details["base_total"], base)
        self.assertAlmostEqual(evaluation.total, 2 * base)

    def test_set_weight_reorders(self) -> None:
        """
        Setting the nearest shard's weight to 0 sends a US client elsewhere;
        a negative weight is refused.
        """
        resolver = resolver_for(make_config())
        resolver.set_weight("us-ny-1", 0.0)
        self.assertEqual(order(resolver, US_CLIENT), ["eu-fra-1", "ap-sg-1", "us-ny-1"])
        self.assertRaises(ValueError, resolver.set_weight, "us-ny-1", -1.0)
        self.assertRaises(UnknownShard, resolver.set_weight, "nope", 1.0)


class PolicyFilterTests(SynchronousTestCase):
    """min_security_score, regions and health filter shards out."""

    def test_below_min_security_never_chosen(self) -> None:
        """
        The New York shard scores 40 against a minimum of 50: a US client
        goes to Frankfurt even when latency is all that counts, and
        explain() says why New York was passed over.
        """
        config = make_config(
            world_shards(**{"us-ny-1": {"security": 40.0}}),
            policy=PolicyConfig(min_security_score=50),
            weights=Weights(latency=1.0, security=0.0, load=0.0),
        )
        resolver = resolver_for(config)
        self.assertEqual(order(resolver, US_CLIENT), ["eu-fra-1", "ap-sg-1"])
        explanation = resolver.explain(request(US_CLIENT))
        self.assertEqual(
            [(s.shard.shard_id, s.rejected_by) for s in explanation.shards],
            [
                ("eu-fra-1", ()),
                ("ap-sg-1", ()),
                ("us-ny-1", ("min_security_score: 40 < 50",)),
            ],
        )
        # The rejected shard is still scored, and would have been best.
        best = max(explanation.shards, key=lambda s: s.evaluation.total)
        self.assertEqual(best.shard.shard_id, "us-ny-1")

    def test_security_override(self) -> None:
        """
        A feed lowering a score below the minimum excludes the shard; None
        restores the baseline and the shard returns.
        """
        resolver = resolver_for(make_config(policy=PolicyConfig(min_security_score=50)))
        resolver.set_security_score("us-ny-1", 30.0)
        self.assertEqual(chosen(resolver, US_CLIENT), "eu-fra-1")
        info = resolver.get_shard_info("api")[0]
        self.assertEqual(info.security_score, 30.0)
        resolver.set_security_score("us-ny-1", None)
        self.assertEqual(chosen(resolver, US_CLIENT), "us-ny-1")
        self.assertEqual(resolver.get_shard_info("api")[0].security_score, 90.0)

    def test_outside_regions_never_chosen(self) -> None:
        """
        With regions = ["EU-*"] (matched case-insensitively), a US client is
        sent to Frankfurt, and the other shards are explained as out of region.
        """
        resolver = resolver_for(make_config(policy=PolicyConfig(regions=("EU-*",))))
        self.assertEqual(order(resolver, US_CLIENT), ["eu-fra-1"])
        self.assertEqual(order(resolver, AP_CLIENT), ["eu-fra-1"])
        rejected = {
            s.shard.shard_id: s.rejected_by
            for s in resolver.explain(request(US_CLIENT)).shards
        }
        self.assertEqual(
            rejected,
            {
                "eu-fra-1": (),
                "us-ny-1": ("regions: us-east not in ['EU-*']",),
                "ap-sg-1": ("regions: ap-southeast not in ['EU-*']",),
            },
        )

    def test_region_case_ignored(self) -> None:
        """A shard's region "EU-West" matches the pattern "eu-*"."""
        dublin = Location(53.35, -6.26, "EU-West")
        resolver = resolver_for(
            make_config(
                [shard("us-ny-1", NEW_YORK), shard("eu-dub-1", dublin)],
                policy=PolicyConfig(regions=("eu-*",)),
            )
        )
        self.assertEqual(order(resolver, US_CLIENT), ["eu-dub-1"])

    def test_shard_without_region_outside_regions(self) -> None:
        """
        A shard with no region matches no regions pattern, not even "*":
        its residency cannot be shown, so it cannot satisfy a constraint.
        """
        resolver = resolver_for(
            make_config(
                [shard("nowhere-1", None), shard("eu-fra-1", FRANKFURT)],
                policy=PolicyConfig(regions=("*",)),
            )
        )
        explanation = resolver.explain(request(EU_CLIENT))
        self.assertEqual(
            explanation.shards[1].rejected_by, ("regions: (none) not in ['*']",)
        )

    def test_unhealthy_and_draining_excluded(self) -> None:
        """UNHEALTHY and DRAINING shards are skipped; HEALTHY again brings them back."""
        resolver = resolver_for(make_config())
        resolver.set_health("us-ny-1", Health.UNHEALTHY)
        resolver.set_health("eu-fra-1", Health.DRAINING)
        self.assertEqual(order(resolver, US_CLIENT), ["ap-sg-1"])
        self.assertEqual(
            [s.rejected_by for s in resolver.explain(request(US_CLIENT)).shards],
            [(), ("health: unhealthy",), ("health: draining",)],
        )
        resolver.set_health("us-ny-1", Health.HEALTHY)
        self.assertEqual(chosen(resolver, US_CLIENT), "us-ny-1")

    def test_all_unhealthy(self) -> None:
        """
        With every shard unhealthy, resolve raises NoShardAvailable whose
        message and rejections give each shard's reason.
        """
        resolver = resolver_for(make_config())
        for shard_id in ("us-ny-1", "eu-fra-1", "ap-sg-1"):
            resolver.set_health(shard_id, Health.UNHEALTHY)
        resolver.set_health("ap-sg-1", Health.DRAINING)
        error = self.assertRaises(
            NoShardAvailable, resolver.resolve, request(US_CLIENT)
        )
        self.assertEqual(error.reason, "no-shard-available")
        self.assertEqual(
            error.rejections,
            {
                "us-ny-1": ("health: unhealthy",),
                "eu-fra-1": ("health: unhealthy",),
                "ap-sg-1": ("health: draining",),
            },
        )
        self.assertEqual(
            str(error),
            "no shard available for service 'api': "
            "us-ny-1, eu-fra-1 (health: unhealthy), ap-sg-1 (health: draining)",
        )

    def test_rejection_message_bounded(self) -> None:
        """Many shards rejected for one reason are summarised, not all listed."""
        shards = [shard(f"s{i:02d}", NEW_YORK, port=9000 + i) for i in range(10)]
        resolver = resolver_for(make_config(shards))
        for s in shards:
            resolver.set_health(s.id, Health.UNHEALTHY)
        error = self.assertRaises(
            NoShardAvailable, resolver.resolve, request(US_CLIENT)
        )
        self.assertEqual(
            str(error),
            "no shard available for service 'api': "
            "s00, s01, s02 and 7 more (health: unhealthy)",
        )
        self.assertEqual(len(error.rejections), 10)

    def test_service_without_shards(self) -> None:
        """A service with no shards raises NoShardAvailable saying so."""
        resolver = resolver_for(make_config([]))
        error = self.assertRaises(
            NoShardAvailable, resolver.resolve, request(US_CLIENT)
        )
        self.assertIn("it has no shards", str(error))


class CapacityTests(SynchronousTestCase):
    """Full shards yield to shards with room, whatever the weights."""

    def test_nearest_full_next_nearest_takes(self) -> None:
        """
        With New York's 2 slots held by leases, a US client goes to
        Frankfurt (next nearest), New York is ranked last, and it comes back
        first once a lease is released.
        """
        shards = world_shards(**{"us-ny-1": {"capacity": 2}})
        resolver = resolver_for(make_config(shards))
        leases = [resolver.lease("us-ny-1"), resolver.lease("us-ny-1")]
        self.assertEqual(order(resolver, US_CLIENT), ["eu-fra-1", "ap-sg-1", "us-ny-1"])
        leases[0].release()
        self.assertEqual(chosen(resolver, US_CLIENT), "us-ny-1")

    def test_full_ranks_last_even_when_load_does_not_count(self) -> None:
        """
        With load weighted 0, a full New York shard still loses to
        Frankfurt, although its total score is the higher one.
        """
        resolver = resolver_for(
            make_config(
                world_shards(**{"us-ny-1": {"capacity": 2}}),
                weights=Weights(latency=1.0, security=0.0, load=0.0),
            )
        )
        resolver.lease("us-ny-1")
        resolver.lease("us-ny-1")
        candidates = resolver.resolve(request(US_CLIENT))
        self.assertEqual(candidates[0].shard.shard_id, "eu-fra-1")
        self.assertEqual(candidates[-1].shard.shard_id, "us-ny-1")
        self.assertGreater(
            candidates[-1].evaluation.total, candidates[0].evaluation.total
        )
        self.assertTrue(candidates[-1].evaluation.details["at_capacity"])


class HerdingTests(SynchronousTestCase):
    """The choice counts the connections it has just sent."""

    def make_resolver(self) -> ShardResolver:
        shards = [
            shard(f"ny-{i}", NEW_YORK, capacity=1000, port=9001 + i) for i in (1, 2, 3)
        ]
        return resolver_for(make_config(shards))

    def test_held_connections_spread(self) -> None:
        """
        300 connections, each leasing its first candidate and never
        releasing, spread over three equal shards within ±20%, and in fact
        exactly 100 each since ties break deterministically.
        """
        resolver = self.make_resolver()
        counts = {"ny-1": 0, "ny-2": 0, "ny-3": 0}
        for _ in range(300):
            first = resolver.resolve(request(US_CLIENT))[0]
            resolver.lease(first.shard.shard_id)
            counts[first.shard.shard_id] += 1
        for shard_id, count in counts.items():
            self.assertTrue(80 <= count <= 120, f"{shard_id} got {count}")
        self.assertEqual(counts, {"ny-1": 100, "ny-2": 100, "ny-3": 100})
        self.assertEqual(
            [i.open_connections for i in resolver.get_shard_info("api")],
            [100, 100, 100],
        )

    def test_spread_without_load_weight(self) -> None:
        """
        With load weighted 0 the totals stay equal, and the tie-break on
        fewer open connections alone still spreads 300 held connections
        100 per shard.
        """
        shards = [
            shard(f"ny-{i}", NEW_YORK, capacity=1000, port=9001 + i) for i in (1, 2, 3)
        ]
        resolver = resolver_for(
            make_config(shards, weights=Weights(latency=0.5, security=0.5, load=0.0))
        )
        for _ in range(300):
            resolver.lease(chosen(resolver, US_CLIENT))
        self.assertEqual(
            [i.open_connections for i in resolver.get_shard_info("api")],
            [100, 100, 100],
        )

    def test_equal_totals_prefer_fewer_connections(self) -> None:
        """
        Two shards with equal totals (20 of 200 and 10 of 100 open, the same
        load factor 0.9): the one with fewer open connections comes first,
        although its id sorts second.
        """
        resolver = resolver_for(
            make_config(
                [
                    shard("ny-a", NEW_YORK, capacity=200, port=9001),
                    shard("ny-b", NEW_YORK, capacity=100, port=9002),
                ]
            )
        )
        for _ in range(20):
            resolver.lease("ny-a")
        for _ in range(10):
            resolver.lease("ny-b")
        candidates = resolver.resolve(request(US_CLIENT))
        self.assertEqual(
            candidates[0].evaluation.total, candidates[1].evaluation.total
        )
        self.assertEqual([c.shard.shard_id for c in candidates], ["ny-b", "ny-a"])

    def test_without_leases_all_herd(self) -> None:
        """
        Without leases every choice is the same shard: the spread above is
        the leases' doing.
        """
        resolver = self.make_resolver()
        chosen_ids = {chosen(resolver, US_CLIENT) for _ in range(300)}
        self.assertEqual(chosen_ids, {"ny-1"})


class LeaseTests(SynchronousTestCase):
    """Leases count connections; releasing is idempotent."""

    def test_release_lowers_load(self) -> None:
        """
        A lease raises open connections and load; releasing lowers them;
        releasing again changes nothing.
        """
        resolver = resolver_for(make_config())
        lease = resolver.lease("eu-fra-1")
        other = resolver.lease("eu-fra-1")
        info = resolver.get_shard_info("api")[1]
        self.assertEqual((info.open_connections, info.load), (2, 0.02))
        self.assertEqual(lease.shard_id, "eu-fra-1")
        self.assertFalse(lease.released)
        lease.release()
        info = resolver.get_shard_info("api")[1]
        self.assertEqual((info.open_connections, info.load), (1, 0.01))
        lease.release()
        info = resolver.get_shard_info("api")[1]
        self.assertEqual((info.open_connections, info.load), (1, 0.01))
        self.assertTrue(lease.released)
        other.release()
        self.assertEqual(resolver.get_shard_info("api")[1].open_connections, 0)

    def test_unknown_shard(self) -> None:
        """Leasing a shard that does not exist raises UnknownShard."""
        resolver = resolver_for(make_config())
        error = self.assertRaises(UnknownShard, resolver.lease, "nope")
        self.assertEqual(error.reason, "unknown-shard")


class AccessTests(SynchronousTestCase):
    """The service policy's allow/deny networks, checked before anything else."""

    def test_deny_wins_over_allow(self) -> None:
        """A client in both allow and deny is denied, naming the deny rule."""
        resolver = resolver_for(
            make_config(policy=PolicyConfig(deny=(net("203.0.113.0/24"),)))
        )
        error = self.assertRaises(AccessDenied, resolver.resolve, request(EU_CLIENT))
        self.assertEqual(error.rule, "policy.deny 203.0.113.0/24")
        self.assertEqual(error.reason, "access-denied")
        self.assertIsInstance(error, ResolverError)
        self.assertEqual(
            str(error),
            "client 203.0.113.9 may not reach service 'api': "
            "policy.deny 203.0.113.0/24",
        )
        self.assertEqual(chosen(resolver, US_CLIENT), "us-ny-1")

    def test_most_specific_deny_rule_named(self) -> None:
        """Of two deny rules holding the client, the narrower one is named."""
        resolver = resolver_for(
            make_config(
                policy=PolicyConfig(deny=(net("203.0.0.0/16"), net("203.0.113.0/28")))
            )
        )
        error = self.assertRaises(AccessDenied, resolver.resolve, request(EU_CLIENT))
        self.assertEqual(error.rule, "policy.deny 203.0.113.0/28")

    def test_not_in_allow(self) -> None:
        """A client matching no allow network is denied, the allow rule named."""
        resolver = resolver_for(
            make_config(policy=PolicyConfig(allow=(net("10.0.0.0/8"), net("fd00::/8"))))
        )
        error = self.assertRaises(AccessDenied, resolver.resolve, request(US_CLIENT))
        self.assertEqual(error.rule, "policy.allow: in none of 10.0.0.0/8, fd00::/8")
        self.assertEqual(len(resolver.resolve(request("10.9.8.7"))), 3)

    def test_empty_allow(self) -> None:
        """An empty allow list admits nobody, and the message says so."""
        resolver = resolver_for(make_config(policy=PolicyConfig(allow=())))
        error = self.assertRaises(AccessDenied, resolver.resolve, request(US_CLIENT))
        self.assertEqual(error.rule, "policy.allow is empty")

    def test_ipv6_rules(self) -> None:
        """IPv6 clients are matched against IPv6 allow/deny networks."""
        resolver = resolver_for(
            make_config(policy=PolicyConfig(deny=(net("2001:db8:bad::/48"),)))
        )
        error = self.assertRaises(
            AccessDenied, resolver.resolve, request("2001:db8:bad::1")
        )
        self.assertEqual(error.rule, "policy.deny 2001:db8:bad::/48")
        self.assertEqual(chosen(resolver, EU_CLIENT_V6), "eu-fra-1")

    def test_ipv4_mapped_client_matches_ipv4_rule(self) -> None:
        """::ffff:203.0.113.9 is denied by the IPv4 rule 203.0.113.0/24."""
        resolver = resolver_for(
            make_config(policy=PolicyConfig(deny=(net("203.0.113.0/24"),)))
        )
        error = self.assertRaises(
            AccessDenied, resolver.resolve, request("::ffff:" + EU_CLIENT)
        )
        self.assertEqual(error.rule, "policy.deny 203.0.113.0/24")

    def test_ipv4_mapped_rule_matches_ipv4_client(self) -> None:
        """A rule written as ::ffff:203.0.113.0/120 denies 203.0.113.9."""
        resolver = resolver_for(
            make_config(policy=PolicyConfig(deny=(net("::ffff:203.0.113.0/120"),)))
        )
        error = self.assertRaises(AccessDenied, resolver.resolve, request(EU_CLIENT))
        self.assertEqual(error.rule, "policy.deny 203.0.113.0/24")

    def test_ipv4_only_allow_refuses_ipv6(self) -> None:
        """An allow list of IPv4 networks only refuses native IPv6 clients."""
        policy = PolicyConfig(allow=(net("0.0.0.0/0"),))
        resolver = resolver_for(make_config(policy=policy))
        self.assertRaises(AccessDenied, resolver.resolve, request(EU_CLIENT_V6))
        self.assertEqual(chosen(resolver, "::ffff:" + US_CLIENT), "us-ny-1")

    def test_not_an_ip(self) -> None:
        """A client address that is not an IP is denied, not crashed on."""
        resolver = resolver_for(make_config())
        error = self.assertRaises(AccessDenied, resolver.resolve, request("not-an-ip"))
        self.assertEqual(error.rule, "client address 'not-an-ip' is not an IP address")

    def test_access_checked_first(self) -> None:
        """
        A denied client gets AccessDenied even when no shard is available,
        and explain() reports the rule while still listing the shards.
        """
        resolver = resolver_for(
            make_config(policy=PolicyConfig(deny=(net("198.51.100.0/24"),)))
        )
        for shard_id in ("us-ny-1", "eu-fra-1", "ap-sg-1"):
            resolver.set_health(shard_id, Health.UNHEALTHY)
        self.assertRaises(AccessDenied, resolver.resolve, request(US_CLIENT))
        explanation = resolver.explain(request(US_CLIENT))
        self.assertEqual(explanation.denied, "policy.deny 198.51.100.0/24")
        self.assertEqual(len(explanation.shards), 3)


class UnknownServiceTests(SynchronousTestCase):
    """An unknown service id is refused everywhere a service is named."""

    def test_unknown_service(self) -> None:
        """resolve, explain, get_shard_info and service_config raise UnknownService."""
        resolver = resolver_for(make_config())
        for call in (
            lambda: resolver.resolve(request(US_CLIENT, "nope")),
            lambda: resolver.explain(request(US_CLIENT, "nope")),
            lambda: resolver.get_shard_info("nope"),
            lambda: resolver.service_config("nope"),
        ):
            error = self.assertRaises(UnknownService, call)
            self.assertEqual(error.reason, "unknown-service")
            self.assertEqual(str(error), "unknown service 'nope'")
        self.assertEqual(resolver.service_config("api").names, ("api.example.test",))


class ExplainTests(SynchronousTestCase):
    """explain() ranks as resolve() does, and adds the rejected shards."""

    def test_matches_resolve(self) -> None:
        """
        Eligible shards come first in resolve's order, with the same
        evaluations; rejected shards follow.
        """
        resolver = resolver_for(make_config())
        resolver.set_health("eu-fra-1", Health.DRAINING)
        candidates = resolver.resolve(request(AP_CLIENT))
        explanation = resolver.explain(request(AP_CLIENT))
        self.assertEqual(explanation.client_location, SINGAPORE)
        self.assertEqual(explanation.location_source, "geo")
        self.assertIsNone(explanation.denied)
        self.assertEqual(
            [(s.shard, s.evaluation) for s in explanation.shards[:2]],
            [(c.shard, c.evaluation) for c in candidates],
        )
        self.assertEqual(explanation.shards[2].shard.shard_id, "eu-fra-1")
        self.assertEqual(explanation.shards[2].rejected_by, ("health: draining",))


class ConnectResultTests(SynchronousTestCase):
    """record_connect_result keeps per-shard counters stamped by the clock."""

    def test_counters(self) -> None:
        """Successes, failures, the failure streak and timings are counted."""
        clock = Clock()
        resolver = ShardResolver(make_config(), clock=clock)
        clock.advance(5)
        resolver.record_connect_result("us-ny-1", True, 0.02)
        clock.advance(1)
        resolver.record_connect_result("us-ny-1", False)
        resolver.record_connect_result("us-ny-1", False)
        stats = resolver.connect_stats("us-ny-1")
        self.assertEqual(
            (stats.ok, stats.failed, stats.consecutive_failures, stats.last_seconds,
             stats.last_at),
            (1, 2, 2, 0.02, 6.0),
        )
        resolver.record_connect_result("us-ny-1", True, 0.03)
        stats = resolver.connect_stats("us-ny-1")
        self.assertEqual((stats.ok, stats.consecutive_failures, stats.last_seconds),
                         (2, 0, 0.03))
        self.assertEqual(resolver.connect_stats("eu-fra-1").ok, 0)

    def test_unknown_shard_ignored(self) -> None:
        """A report on a shard that is gone is ignored rather than raising."""
        resolver = resolver_for(make_config())
        resolver.record_connect_result("gone-1", False)
        self.assertRaises(UnknownShard, resolver.connect_stats, "gone-1")


@implementer(IShardSource)
class ChangingSource:
    """A shard source whose records the test changes by hand."""

    def __init__(self, services: Iterable[ServiceConfig]) -> None:
        self.records = tuple(services)
        self.callbacks: dict[object, Callable[[], None]] = {}

    def services(self) -> Iterable[ServiceConfig]:
        return self.records

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        token = object()
        self.callbacks[token] = callback
        return lambda: self.callbacks.pop(token, None)

    def change(self, services: Iterable[ServiceConfig]) -> None:
        self.records = tuple(services)
        for callback in list(self.callbacks.values()):
            callback()


class ReloadTests(SynchronousTestCase):
    """A running resolver follows its source; shard state survives reloads."""

    def test_follows_source(self) -> None:
        """
        After a change a new shard is routed to, a held lease still counts
        against its shard and still releases it, and a stopped resolver no
        longer listens.
        """
        config = make_config()
        api = config.services[0]
        source = ChangingSource([api])
        resolver = ShardResolver(config, source, clock=Clock())
        resolver.startService()
        self.assertEqual(len(source.callbacks), 1)
        lease = resolver.lease("us-ny-1")
        resolver.set_health("eu-fra-1", Health.DRAINING)

        closer = shard("us-ny-2", Location(40.72, -74.0, "us-east"), port=9009)
        source.change([ServiceConfig(id="api", shards=api.shards + (closer,))])
        info = {i.shard_id: i for i in resolver.get_shard_info("api")}
        self.assertEqual(info["us-ny-1"].open_connections, 1)
        self.assertEqual(info["eu-fra-1"].health, Health.DRAINING)
        self.assertEqual(chosen(resolver, "198.51.100.1"), "us-ny-2")
        lease.release()
        self.assertEqual(resolver.get_shard_info("api")[0].open_connections, 0)

        resolver.stopService()
        self.assertEqual(source.callbacks, {})

    def test_bad_reload_keeps_records(self) -> None:
        """A change with a duplicate shard id is refused; routing goes on."""
        config = make_config()
        api = config.services[0]
        source = ChangingSource([api])
        resolver = ShardResolver(config, source, clock=Clock())
        resolver.startService()
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        source.change([ServiceConfig(id="api", shards=api.shards + (api.shards[0],))])
        self.assertEqual(len(resolver.get_shard_info("api")), 3)
        self.assertEqual(chosen(resolver, US_CLIENT), "us-ny-1")
        errors = [e for e in events if e["log_level"] is LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("'us-ny-1' appears twice", errors[0]["error"])
        resolver.stopService()

    def test_duplicate_shard_ids_refused_at_start(self) -> None:
        """Shard ids shared between services are a configuration error."""
        config = make_config(
            extra_services=(ServiceConfig(id="web", shards=(shard("us-ny-1", None),)),)
        )
        self.assertRaises(ValueError, ShardResolver, config, clock=Clock())
