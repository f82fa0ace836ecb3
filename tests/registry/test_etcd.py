"""
The etcd client, the registration service and the shard source against a
real etcd (Debian's etcd-server) on loopback ports.
"""

from __future__ import annotations

import json
import os
import sys
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from shardtcp.config import read_registered_shard
from shardtcp.model import Address, Config, ProxyConfig, RegistryConfig, ServiceConfig, ShardConfig, SigningConfig
from shardtcp.registry.etcd import EtcdClient, EtcdError, WatchCompacted
from shardtcp.registry.register import Registration, shard_key
from shardtcp.registry.source import EtcdShardSource
from tests.e2e.harness import EtcdServer, child_environment, spawn
from tests.e2e.harness import wait_until as eventually

PREFIX = "/shardtcp"


def config(snapshot=None) -> Config:
    """One service ``api`` with one file shard, registry on etcd."""
    return Config(
        proxy=ProxyConfig(id="edge-test-1"),
        signing=SigningConfig(private_key="unused.pem", kid="policy-1"),
        services=(
            ServiceConfig(
                id="api",
                names=("api.example.test",),
                shards=(ShardConfig(id="api-file", address=Address("127.0.0.1", 9001)),),
            ),
        ),
        registry=RegistryConfig(kind="etcd", endpoints=("http://127.0.0.1:1",), prefix=PREFIX, snapshot=snapshot),
    )


def shard_ids(source) -> list:
    return [shard.id for service in source.services() for shard in service.shards]


class ClientTests(TestCase):
    """The JSON-gateway client speaks etcd v3 as etcd 3.4 answers it."""

    timeout = 60

    async def _etcd(self):
        server = EtcdServer(self)
        await server.start()
        return server, EtcdClient(reactor, [server.url], timeout=3.0)

    async def test_put_range_delete(self):
        """A put is read back by a prefix range, a delete removes it, other prefixes stay apart."""
        server, client = await self._etcd()
        await client.put(b"/a/x", b"1")
        await client.put(b"/a/y", b"2")
        await client.put(b"/b/z", b"3")
        revision, kvs = await client.range(b"/a/")
        self.assertEqual([(kv.key, kv.value) for kv in kvs], [(b"/a/x", b"1"), (b"/a/y", b"2")])
        self.assertGreaterEqual(revision, 4)
        await client.delete(b"/a/x")
        _, kvs = await client.range(b"/a/")
        self.assertEqual([kv.key for kv in kvs], [b"/a/y"])

    async def test_leases(self):
        """A key under a lease disappears when the lease is revoked; keepalive says 0 for a gone lease."""
        server, client = await self._etcd()
        lease = await client.grant(5)
        await client.put(b"/l/k", b"v", lease=lease)
        self.assertGreater(await client.keepalive(lease), 0)
        _, kvs = await client.range(b"/l/")
        self.assertEqual([(kv.key, kv.lease) for kv in kvs], [(b"/l/k", lease)])
        await client.revoke(lease)
        _, kvs = await client.range(b"/l/")
        self.assertEqual(kvs, [])
        self.assertEqual(await client.keepalive(lease), 0)

    async def test_watch(self):
        """A watch from the next revision sees puts and deletes in order, and nothing older."""
        server, client = await self._etcd()
        revision = await client.put(b"/w/old", b"0")
        seen = []
        watch = client.watch(b"/w/", revision + 1, lambda rev, events: seen.extend((e.kind, e.kv.key, e.kv.value) for e in events))
        await deferLater(reactor, 0.2, lambda: None)
        await client.put(b"/w/a", b"1")
        await client.delete(b"/w/old")
        await client.put(b"/other", b"x")
        await eventually(lambda: len(seen) >= 2)
        self.assertEqual(seen, [("put", b"/w/a", b"1"), ("delete", b"/w/old", b"")])
        watch.cancel()
        self.assertIsNone(await watch.done)

    async def test_watch_compacted(self):
        """A watch from a compacted revision fails with WatchCompacted naming the oldest revision kept."""
        server, client = await self._etcd()
        await client.put(b"/c/a", b"1")
        revision = await client.put(b"/c/a", b"2")
        await client.compact(revision)
        watch = client.watch(b"/c/", 1, lambda rev, events: None)
        with self.assertRaises(WatchCompacted) as caught:
            await watch.done
        self.assertEqual(caught.exception.compact_revision, revision)

    async def test_unreachable(self):
        """No endpoint answering is one EtcdError naming each endpoint tried."""
        client = EtcdClient(reactor, ["http://127.0.0.1:1", "http://127.0.0.1:2"], timeout=2.0)
        with self.assertRaises(EtcdError) as caught:
            await client.range(b"/x/")
        self.assertIn("http://127.0.0.1:1", str(caught.exception))
        self.assertIn("http://127.0.0.1:2", str(caught.exception))


class SourceTests(TestCase):
    """The registry as the resolver sees it, fail-static."""

    timeout = 90

    async def _start(self, snapshot=None):
        self.server = EtcdServer(self)
        await self.server.start()
        self.client = EtcdClient(reactor, [self.server.url], timeout=2.0)
        return self._source(snapshot)

    def _source(self, snapshot=None):
        source = EtcdShardSource(
            config(snapshot), EtcdClient(reactor, [self.server.url], timeout=2.0), read_registered_shard,
            clock=reactor, snapshot=snapshot, backoff=(0.1, 0.5),
        )
        self.changes = 0

        def changed():
            self.changes += 1

        source.subscribe(changed)
        source.startService()
        self.addCleanup(source.stopService)
        return source

    def _registration(self, shard_id="api-reg", ttl=3, port=9100):
        registration = Registration(
            self.client, prefix=PREFIX, service="api", shard_id=shard_id,
            record={"address": f"127.0.0.1:{port}", "capacity": 10}, ttl=ttl, clock=reactor,
        )
        registration.startService()
        self.addCleanup(registration.stopService)
        return registration

    async def test_registered_shard_appears_and_leaves(self):
        """A registered shard joins the file's shards within a second; stopping the registration removes it at once."""
        source = await self._start()
        await eventually(lambda: not source.stale)
        self.assertEqual(shard_ids(source), ["api-file"])
        registration = self._registration()
        took = await eventually(lambda: "api-reg" in shard_ids(source))
        self.assertLess(took, 1.0)
        [service] = source.services()
        self.assertEqual(service.shards[1].address, Address("127.0.0.1", 9100))
        self.assertEqual(service.shards[1].capacity, 10)
        self.assertGreater(self.changes, 0)
        await defer.maybeDeferred(registration.stopService)
        took = await eventually(lambda: shard_ids(source) == ["api-file"])
        self.assertLess(took, 1.0)

    async def test_bad_records_ignored(self):
        """Records for unknown services, clashing ids or bad values are ignored; the good ones stay."""
        source = await self._start()
        await self.client.put(b"/shardtcp/shards/api/ok", json.dumps({"address": "127.0.0.1:9200"}).encode())
        await self.client.put(b"/shardtcp/shards/nosuch/x", json.dumps({"address": "127.0.0.1:9201"}).encode())
        await self.client.put(b"/shardtcp/shards/api/api-file", json.dumps({"address": "127.0.0.1:9202"}).encode())
        await self.client.put(b"/shardtcp/shards/api/bad", json.dumps({"address": "nope", "capacity": 0}).encode())
        await self.client.put(b"/shardtcp/shards/api/notjson", b"{")
        await eventually(lambda: "ok" in shard_ids(source))
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(shard_ids(source), ["api-file", "ok"])

    async def test_killed_registrar_disappears_within_ttl(self):
        """A ``shardtcp register`` process killed with SIGKILL: its shard leaves within the lease TTL."""
        source = await self._start()
        child = spawn(self, [sys.executable, "-m", "shardtcp", "register", "--endpoints", self.server.url,
                             "--service", "api", "--id", "api-proc", "--address", "127.0.0.1:9300",
                             "--location", "50.1,8.6,eu-central", "--ttl", "2s"], env=child_environment())
        await eventually(lambda: "api-proc" in shard_ids(source), timeout=15)
        [service] = source.services()
        self.assertEqual(service.shards[1].location.region, "eu-central")
        child.signal("KILL")
        await child.ended
        killed = time.monotonic()
        await eventually(lambda: "api-proc" not in shard_ids(source), timeout=10)
        # etcd checks leases about every 500 ms: allow that beyond the 2 s TTL.
        self.assertLess(time.monotonic() - killed, 2.0 + 1.5)

    async def test_register_refuses_a_bad_record(self):
        """``shardtcp register`` with a bad address says so on one line and exits 1 without touching etcd."""
        child = spawn(self, [sys.executable, "-m", "shardtcp", "register", "--endpoints", "http://127.0.0.1:1",
                             "--service", "api", "--id", "x", "--address", "127.0.0.1:99999"], env=child_environment())
        status = await child.ended
        self.assertEqual(status, 1)
        self.assertEqual(len(child.err.strip().splitlines()), 1, child.err)
        self.assertIn(b"address", child.err)

    async def test_fail_static_and_resync(self):
        """etcd stopped: the registry stays, marked stale; etcd back: it resyncs and sees new changes."""
        source = await self._start(snapshot=os.path.join(self.mktemp(), "registry.json"))
        self._registration("api-a", ttl=30, port=9401)
        await eventually(lambda: "api-a" in shard_ids(source))
        await self.server.stop()
        await eventually(lambda: source.stale, timeout=15)
        self.assertEqual(shard_ids(source), ["api-file", "api-a"])
        await self.server.start()
        await eventually(lambda: not source.stale, timeout=15)
        client = EtcdClient(reactor, [self.server.url], timeout=2.0)
        await client.put(b"/shardtcp/shards/api/api-b", json.dumps({"address": "127.0.0.1:9402"}).encode())
        await eventually(lambda: "api-b" in shard_ids(source))
        self.assertIn("api-a", shard_ids(source))

    async def test_starts_from_snapshot_when_etcd_is_down(self):
        """A source started while etcd is down serves the snapshot the last one wrote, marked stale."""
        snapshot = os.path.join(os.path.abspath(self.mktemp()), "state", "registry.json")
        source = await self._start(snapshot=snapshot)
        self._registration("api-s", ttl=30, port=9501)
        await eventually(lambda: "api-s" in shard_ids(source))
        await eventually(lambda: os.path.exists(snapshot))
        with open(snapshot) as f:
            self.assertIn("/shardtcp/shards/api/api-s", json.load(f)["shards"])
        await defer.maybeDeferred(source.stopService)
        await self.server.kill()
        fresh = self._source(snapshot)
        self.assertEqual(shard_ids(fresh), ["api-file", "api-s"])
        self.assertTrue(fresh.stale)
        self.assertEqual(fresh.status()["registered_shards"], 1)
