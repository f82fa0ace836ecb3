"""
``LoadSharing`` and ``FleetAdmin`` in memory: a fake etcd client, an
injected clock and a real ``ShardResolver``.
"""

from __future__ import annotations

import json

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.model import Address, ConnectionRequest, ShardConfig
from shardtcp.registry.etcd import EtcdError, Event, KeyValue
from shardtcp.registry.fleet import FleetAdmin, LoadSharing, parse_counts, parse_override
from shardtcp.resolver.service import NoShardAvailable, build_resolver
from tests.registry.test_etcd import config
from tests.registry.test_source import FakeWatch


class FakeClient:
    """A fake etcd: one range answer per call, watches recorded, writes recorded."""

    def __init__(self) -> None:
        self.answers: list = []
        self.watches: list = []
        self.puts: list = []
        self.grants = 0
        self.keepalives: list = []
        self.keepalive_ttl = 10
        self.revoked: list = []
        self.failing = False

    def range(self, prefix: bytes):
        answer = self.answers.pop(0) if self.answers else (1, [])
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def watch(self, prefix: bytes, start_revision: int, on_events):
        watch = FakeWatch(on_events)
        self.watches.append(watch)
        return watch

    def grant(self, ttl: int):
        if self.failing:
            return fail(EtcdError("down"))
        self.grants += 1
        return succeed(100 + self.grants)

    def keepalive(self, lease: int):
        self.keepalives.append(lease)
        return succeed(self.keepalive_ttl)

    def put(self, key: bytes, value: bytes, lease: int = 0):
        if self.failing:
            return fail(EtcdError("down"))
        self.puts.append((key, json.loads(value), lease))
        return succeed(2)

    def revoke(self, lease: int):
        self.revoked.append(lease)
        return succeed({})


def two_shard_config(capacity: int = 10):
    """``api`` with a preferred shard ``small`` (capacity 10) and a far worse ``big``."""
    base = config()
    service = attrs.evolve(
        base.services[0],
        shards=(
            ShardConfig(id="small", address=Address("127.0.0.1", 9001), capacity=capacity, security_score=100),
            ShardConfig(id="big", address=Address("127.0.0.1", 9002), capacity=1000, security_score=10, weight=0.01),
        ),
    )
    return attrs.evolve(base, services=(service,))


def put(key: str, document) -> Event:
    return Event("put", KeyValue(key.encode(), json.dumps(document).encode()))


def delete(key: str) -> Event:
    return Event("delete", KeyValue(key.encode(), b""))


REQUEST = ConnectionRequest(service_id="api", client=("192.0.2.1", 5000))


class ParseTests(SynchronousTestCase):
    """The records other proxies and operators write are read strictly."""

    def test_counts(self):
        """A mapping of shard ids to non-negative integers is a load; anything else is not."""
        self.assertEqual(parse_counts(b'{"a": 3, "b": 0}'), {"a": 3, "b": 0})
        for bad in (b"[1]", b'{"a": -1}', b'{"a": 1.5}', b'{"a": true}', b"not json", b'{"a": 10000001}'):
            self.assertIsNone(parse_counts(bad), bad)
        self.assertEqual(parse_counts(b'{"a": 10000000}'), {"a": 10000000})

    def test_override(self):
        """State drain/ready and a weight from 0 are an override; each problem is one line."""
        self.assertEqual(parse_override(b'{"state": "drain"}'), (("drain", None), None))
        self.assertEqual(parse_override(b'{"state": "ready", "weight": 0}'), (("ready", 0.0), None))
        self.assertEqual(parse_override(b'{"weight": 2.5}'), ((None, 2.5), None))
        self.assertEqual(parse_override(b'{"state": "maint"}'),
                         (None, "state must be \"drain\" or \"ready\", not 'maint'"))
        self.assertEqual(parse_override(b'{"weight": -1}'), (None, "weight must be a number from 0, not -1"))
        self.assertEqual(parse_override(b'{"colour": 1}'), (None, "unknown keys ['colour']"))
        self.assertEqual(parse_override(b"[]"), (None, "expected a JSON object"))
        self.assertEqual(parse_override(b"{"), (None, "the value is not JSON"))


class RemoteLoadTests(SynchronousTestCase):
    """The resolver counts the other proxies' connections in load, capacity, resolve and explain."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.resolver = build_resolver(two_shard_config(), clock=self.clock)

    def first(self) -> str:
        return self.resolver.resolve(REQUEST)[0].shard.shard_id

    def test_remote_connections_fill_a_shard(self):
        """With 9 remote connections the small shard still takes one; with 10 it is skipped for the big one."""
        self.assertEqual(self.first(), "small")
        self.resolver.set_remote_load({"small": 9})
        self.assertEqual(self.first(), "small")
        info = {i.shard_id: i for i in self.resolver.get_shard_info("api")}
        self.assertAlmostEqual(info["small"].load, 0.9)
        self.assertEqual(info["small"].open_connections, 0)
        self.resolver.set_remote_load({"small": 10})
        self.assertEqual(self.first(), "big")
        # explain ranks as resolve does: the full shard last, at capacity
        explained = self.resolver.explain(REQUEST).shards
        self.assertEqual([e.shard.shard_id for e in explained], ["big", "small"])
        self.assertTrue(explained[1].factors.at_capacity)
        self.assertEqual(explained[1].factors.load, 1.0)
        self.assertEqual(explained[1].factors.open_connections, 0)
        # and back: the remote proxies closed theirs
        self.resolver.set_remote_load({})
        self.assertEqual(self.first(), "small")

    def test_own_plus_remote(self):
        """Own leases and remote connections add up: 6 own + 4 remote fill a capacity of 10."""
        leases = [self.resolver.lease("small") for _ in range(6)]
        self.resolver.set_remote_load({"small": 3})
        self.assertEqual(self.first(), "small")
        self.assertEqual(self.resolver.open_connections(), {"small": 6})
        self.resolver.set_remote_load({"small": 4})
        self.assertEqual(self.first(), "big")
        leases[0].release()
        self.assertEqual(self.first(), "small")

    def test_unknown_shards_and_negative_counts_ignored(self):
        """Counts for shards this proxy does not know change nothing; a negative count is none."""
        self.resolver.set_remote_load({"elsewhere": 50, "small": -5})
        self.assertEqual({i.shard_id: i.load for i in self.resolver.get_shard_info("api")}["small"], 0.0)


class LoadSharingTests(SynchronousTestCase):
    """Publishing this proxy's counts and summing the others'."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.client = FakeClient()
        self.applied: list = []
        self.own = {}
        self.sharing = LoadSharing(
            self.client, "/shardtcp", "edge-1", lambda: dict(self.own), self.applied.append,
            clock=self.clock, lease_ttl=6,
        )

    def test_publishes_only_changes_at_most_once_per_interval(self):
        """The first tick grants a lease and writes; unchanged counts are not written again;
        a change is written on the next tick, not before."""
        self.own = {"a": 2}
        self.sharing.startService()
        self.assertEqual(self.client.puts, [(b"/shardtcp/load/edge-1", {"a": 2}, 101)])
        self.clock.advance(1)
        self.assertEqual(len(self.client.puts), 1)
        self.own = {"a": 3}
        self.clock.advance(0.999)
        self.assertEqual(len(self.client.puts), 1)
        self.clock.advance(0.001)
        self.assertEqual(self.client.puts[-1], (b"/shardtcp/load/edge-1", {"a": 3}, 101))
        self.assertEqual(self.sharing.publications, 2)

    def test_keepalive_and_lost_lease(self):
        """The lease is refreshed every third of its TTL; a lease etcd no longer has is granted again
        and the counts written under it."""
        self.own = {"a": 1}
        self.sharing.startService()
        self.clock.advance(1)
        self.assertEqual(self.client.keepalives, [])
        self.clock.advance(1)
        self.assertEqual(self.client.keepalives, [101])
        self.client.keepalive_ttl = 0
        self.clock.advance(2)
        self.assertEqual(self.client.keepalives, [101, 101])
        self.clock.advance(1)
        self.assertEqual(self.client.grants, 2)
        self.assertEqual(self.client.puts[-1], (b"/shardtcp/load/edge-1", {"a": 1}, 102))

    def test_failure_publishes_again(self):
        """A write etcd refused is tried again on the next tick."""
        self.own = {"a": 1}
        self.client.failing = True
        self.sharing.startService()
        self.assertEqual(self.client.puts, [])
        self.client.failing = False
        self.clock.advance(1)
        self.assertEqual(self.client.puts, [(b"/shardtcp/load/edge-1", {"a": 1}, 101)])

    def test_peers_summed_own_key_ignored_dead_peer_dropped(self):
        """Other proxies' counts are summed per shard, this proxy's own key is not counted,
        a deleted key drops its proxy, and a bad record drops it too."""
        self.client.answers = [(5, [
            KeyValue(b"/shardtcp/load/edge-1", b'{"a": 100}'),
            KeyValue(b"/shardtcp/load/edge-2", b'{"a": 2, "b": 1}'),
        ])]
        self.sharing.startService()
        self.assertEqual(self.applied[-1], {"a": 2, "b": 1})
        watch = self.client.watches[0]
        watch.on_events(6, [put("/shardtcp/load/edge-3", {"a": 5})])
        self.assertEqual(self.applied[-1], {"a": 7, "b": 1})
        self.clock.advance(3)
        self.assertEqual(self.sharing.status()["edge-2"], {"shards": 2, "connections": 3, "age": 3.0})
        self.assertEqual(self.sharing.status()["edge-3"]["age"], 3.0)
        watch.on_events(7, [delete("/shardtcp/load/edge-2")])
        self.assertEqual(self.applied[-1], {"a": 5})
        watch.on_events(8, [Event("put", KeyValue(b"/shardtcp/load/edge-3", b"[]"))])
        self.assertEqual(self.applied[-1], {})
        self.assertEqual(self.sharing.changes, 3)

    def test_etcd_down_keeps_peers(self):
        """A broken watch keeps the peers last seen (fail-static) until a new range replaces them."""
        self.client.answers = [(5, [KeyValue(b"/shardtcp/load/edge-2", b'{"a": 2}')]), EtcdError("down"),
                               (9, [])]
        self.sharing.startService()
        self.client.watches[0].done.errback(EtcdError("stream ended"))
        self.assertTrue(self.sharing.stale)
        self.assertEqual(self.applied[-1], {"a": 2})
        self.clock.advance(2)
        self.assertTrue(self.sharing.stale)
        self.assertEqual(self.applied[-1], {"a": 2})
        self.clock.advance(3)
        self.assertFalse(self.sharing.stale)
        self.assertEqual(self.applied[-1], {})

    def test_stop_revokes(self):
        """Stopping revokes the lease, so the others stop counting this proxy at once."""
        self.own = {"a": 1}
        self.sharing.startService()
        self.sharing.stopService()
        self.assertEqual(self.client.revoked, [101])


class FleetAdminTests(SynchronousTestCase):
    """Fleet-wide overrides reach the resolver through its operator calls."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.resolver = build_resolver(two_shard_config(), clock=self.clock)
        self.client = FakeClient()
        self.admin = FleetAdmin(self.client, "/shardtcp", self.resolver, clock=self.clock)

    def states(self):
        return {i.shard_id: (i.health.value, i.weight) for i in self.resolver.get_shard_info("api")}

    def test_drain_weight_and_clear(self):
        """A drain record drains the shard, a weight overrides its weight, deleting the key
        gives back the record's state and weight."""
        self.client.answers = [(3, [KeyValue(b"/shardtcp/admin/small", b'{"state": "drain"}')])]
        self.admin.startService()
        self.assertEqual(self.states()["small"][0], "draining")
        self.assertEqual(self.resolver.resolve(REQUEST)[0].shard.shard_id, "big")
        watch = self.client.watches[0]
        watch.on_events(4, [put("/shardtcp/admin/big", {"weight": 3})])
        self.assertEqual(self.states()["big"], ("healthy", 3.0))
        watch.on_events(5, [delete("/shardtcp/admin/small"), delete("/shardtcp/admin/big")])
        self.assertEqual(self.states(), {"small": ("healthy", 1.0), "big": ("healthy", 0.01)})
        self.assertEqual(self.resolver.resolve(REQUEST)[0].shard.shard_id, "small")

    def test_unknown_shard_applied_when_it_appears(self):
        """An override for a shard not known yet waits, and is applied when the resolver's shards change."""
        self.client.answers = [(3, [KeyValue(b"/shardtcp/admin/later", b'{"state": "drain"}')])]
        self.admin.startService()
        base = two_shard_config()
        later = ShardConfig(id="later", address=Address("127.0.0.1", 9003))
        service = attrs.evolve(base.services[0], shards=base.services[0].shards + (later,))
        self.resolver.watch(self.admin.reapply)
        self.resolver.replace_config(attrs.evolve(base, services=(service,)))
        self.assertEqual(self.states()["later"][0], "draining")

    def test_bad_record_ignored(self):
        """A record that is not an override changes nothing."""
        self.client.answers = [(3, [KeyValue(b"/shardtcp/admin/small", b'{"state": "off"}')])]
        self.admin.startService()
        self.assertEqual(self.states()["small"], ("healthy", 1.0))
        self.assertEqual(self.admin.overrides, {})

    def test_no_shard_when_all_drained(self):
        """Both shards drained fleet-wide: the service has no shard to offer."""
        self.client.answers = [(3, [KeyValue(b"/shardtcp/admin/small", b'{"state": "drain"}'),
                                    KeyValue(b"/shardtcp/admin/big", b'{"state": "drain"}')])]
        self.admin.startService()
        self.assertRaises(NoShardAvailable, self.resolver.resolve, REQUEST)


class FakeSource:
    """What the metrics and /status read of an ``EtcdShardSource``."""

    stale = True
    changes = 7

    def status(self) -> dict:
        return {"kind": "etcd", "stale": True, "reason": "etcd down", "revision": 4, "registered_shards": 2,
                "changes": 7, "peers": {}}


class RegistryReportTests(SynchronousTestCase):
    """The registry's freshness in /status and in the metrics."""

    def test_metrics(self):
        """``shardtcp_registry_stale`` is 1 while stale, 0 after; ``shardtcp_registry_changes`` counts changes."""
        from shardtcp.metrics import ProxyMetrics

        source = FakeSource()
        metrics = ProxyMetrics()
        metrics.watch_registry(source)
        self.assertEqual(metrics.value("shardtcp_registry_stale"), 1.0)
        self.assertEqual(metrics.value("shardtcp_registry_changes_total"), 7.0)
        source.stale = False
        source.changes = 8
        self.assertEqual(metrics.value("shardtcp_registry_stale"), 0.0)
        self.assertIn(b"shardtcp_registry_changes_total 8.0", metrics.render())

    def test_status_document(self):
        """/status shows the etcd registry's own status when there is one, else the static file."""
        from shardtcp.admin._reading import status_document
        from shardtcp.metrics import ProxyMetrics

        clock = MemoryReactorClock()
        resolver = build_resolver(two_shard_config(), clock=clock)
        with_etcd = status_document(resolver, ProxyMetrics(), (), lambda: True, registry=FakeSource().status)
        self.assertEqual(with_etcd["registry"], FakeSource().status())
        static = status_document(resolver, ProxyMetrics(), (), lambda: True)
        self.assertEqual(static["registry"], {"kind": "static", "stale": False})


class FleetCtlTests(SynchronousTestCase):
    """``shardtcp ctl`` fleet-wide: bad invocations get one line and exit 1, without a network call."""

    def ctl(self, *argv):
        import io
        from contextlib import redirect_stderr

        from shardtcp.cli import main

        err = io.StringIO()
        with redirect_stderr(err):
            code = main(["ctl", *argv])
        return code, err.getvalue()

    def test_refusals(self):
        """status is not fleet-wide; clear needs etcd; --fleet needs --config; a URL must be http(s)."""
        self.assertEqual(self.ctl("--etcd", "http://127.0.0.1:1", "status"),
                         (1, "shardtcp ctl: status is not a fleet-wide action (those are: drain, ready, weight, clear)\n"))
        self.assertEqual(self.ctl("clear", "x"),
                         (1, "shardtcp ctl: clear removes a fleet-wide override: give --etcd URL or --fleet\n"))
        self.assertEqual(self.ctl("--fleet", "drain", "x"),
                         (1, "shardtcp ctl: --fleet reads [registry] from --config PATH\n"))
        self.assertEqual(self.ctl("--etcd", "etcd:2379", "drain", "x"),
                         (1, "shardtcp ctl: --etcd 'etcd:2379' is not an http:// or https:// URL\n"))
        self.assertEqual(self.ctl("--etcd", "http://127.0.0.1:1", "weight", "x", "heavy"),
                         (1, "shardtcp ctl: weight 'heavy' is not a number\n"))


class RemoteLoadByKeyTests(SynchronousTestCase):
    """A service routing by shard key counts the fleet's connections in its bounded load too."""

    def test_remote_connections_move_a_key_past_a_loaded_owner(self):
        """With 100 remote connections on the key's owner (0 elsewhere) the owner is over its bound:
        resolve and explain both hand the key to the next owner; without them the owner takes it."""
        import random

        from shardtcp.resolver.service import ShardResolver
        from tests.resolver.test_ownership import keyed_config

        clock = MemoryReactorClock()
        clock.advance(1000)
        resolver = ShardResolver(keyed_config(), clock=clock, random=random.Random(1))
        request = ConnectionRequest(service_id="api", client=("192.0.2.1", 1234), shard_key="tenant7")
        owner = resolver.resolve(request, retries=4)[0].shard.shard_id
        order = [c.shard.shard_id for c in resolver.resolve(request, retries=4)]
        resolver.set_remote_load({owner: 100})
        moved = resolver.resolve(request, retries=4)[0].shard.shard_id
        self.assertEqual(moved, order[1])
        chain = resolver.explain(request).owners
        self.assertEqual(chain.owners[0].shard_id, owner)
        self.assertEqual(chain.owners[0].skipped[0].split(":")[0], "bounded_load")
        self.assertEqual(chain.owners[0].open_connections, 100)
        resolver.set_remote_load({})
        self.assertEqual(resolver.resolve(request, retries=4)[0].shard.shard_id, owner)


class LoadSharingThroughRemoteLoadTests(SynchronousTestCase):
    """``LoadSharing`` feeding a ``RemoteLoad`` (worker processes) instead of the resolver."""

    def test_fleet_counts_reach_the_resolver_only_summed(self):
        """With ``apply`` a RemoteLoad sink, the resolver never gets the fleet's counts alone: every
        call it gets is fleet + workers, so 4 remote proxies' and 6 other workers' connections fill
        the small shard's capacity of 10, 3 + 6 leave room for one, and 3 + 7 fill it again."""
        from shardtcp.workers.aggregate import RemoteLoad

        clock = MemoryReactorClock()
        clock.advance(1000)
        resolver = build_resolver(two_shard_config(), clock=clock)
        seen: list = []

        def set_remote_load(counts):
            seen.append(counts)
            resolver.set_remote_load(counts)

        remote = RemoteLoad(set_remote_load)
        remote.set("workers", {"small": 6})
        client = FakeClient()
        sharing = LoadSharing(
            client, "/shardtcp", "edge-1", dict, remote.sink("fleet"), clock=clock, lease_ttl=6,
        )
        client.answers = [(5, [KeyValue(b"/shardtcp/load/edge-2", b'{"small": 4, "big": 1}')])]
        sharing.startService()
        self.assertEqual(remote.total(), {"small": 10, "big": 1})
        self.assertEqual(resolver.resolve(REQUEST)[0].shard.shard_id, "big")
        client.watches[0].on_events(6, [put("/shardtcp/load/edge-2", {"small": 3})])
        self.assertEqual(resolver.resolve(REQUEST)[0].shard.shard_id, "small")
        remote.set("workers", {"small": 7})
        self.assertEqual(resolver.resolve(REQUEST)[0].shard.shard_id, "big")
        self.assertEqual(seen, [{"small": 6}, {"small": 10, "big": 1}, {"small": 9}, {"small": 10}])
        sharing.stopService()
