"""
A proxy whose shards come from etcd: a real etcd, a shard registered by the
``shardtcp register`` command, and real TLS clients through the proxy.
"""

from __future__ import annotations

import os
import sys
import time

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.e2e import harness as e2e


def _registry_toml(url: str, snapshot: str) -> str:
    return (
        e2e.listener_toml("passthrough")
        + f'[registry]\nkind = "etcd"\nendpoints = ["{url}"]\nprefix = "/shardtcp"\n'
        f'snapshot = "{snapshot}"\n'
        + e2e.service_toml(())
    )


class RegistryRoutingTests(TestCase):
    """Connections follow the registry: shards that register are used, shards that die are not."""

    timeout = 120

    async def _connect(self, port: int) -> dict:
        return await deferToThread(e2e.plain_tls_exchange, port, self.deployment.ca_path, payload=b"ping\n")

    async def test_registered_shard_routed_within_a_second(self):
        """A shard registered with ``shardtcp register`` gets verified connections within a second;
        killed, it is gone within its TTL and new connections go to the survivor."""
        etcd = e2e.EtcdServer(self)
        await etcd.start()
        self.deployment = d = e2e.Deployment(self)
        first = d.add_shard("api-reg-1", e2e.FRANKFURT)
        second = d.add_shard("api-reg-2", e2e.FRANKFURT)
        port = d.start_proxy_text(_registry_toml(etcd.url, os.path.join(d.directory, "state", "registry.json")))

        # Nothing registered: the service has no shard, the client is refused.
        with self.assertRaises(Exception):
            await self._connect(port)

        def register(shard, ttl):
            return e2e.spawn(self, [sys.executable, "-m", "shardtcp", "register", "--endpoints", etcd.url,
                                    "--service", "api", "--id", shard.shard_id,
                                    "--address", f"127.0.0.1:{shard.port}", "--ttl", ttl],
                             env=e2e.child_environment(), timeout=110)

        started = time.monotonic()
        first_registrar = register(first, "2s")
        while True:
            try:
                result = await self._connect(port)
                break
            except Exception:
                if time.monotonic() - started > 10:
                    raise
                await deferLater(reactor, 0.05, lambda: None)
        fields = e2e.parse_hello(result["hello"])
        self.assertEqual(fields["shard"], "api-reg-1")
        self.assertEqual(result["echo"], b"ping\n")
        # from the command's start (a Python process) to a routed, verified connection
        self.assertLess(time.monotonic() - started, 5.0)

        register(second, "2s")
        await e2e.wait_until(lambda: len(d.proxy.resolver.get_shard_info("api")) == 2, timeout=10)

        # The first shard's registrar dies: its lease runs out, and every new
        # connection goes to the shard still registered.
        first_registrar.signal("KILL")
        await first_registrar.ended
        gone = await e2e.wait_until(
            lambda: [s.shard_id for s in d.proxy.resolver.get_shard_info("api")] == ["api-reg-2"], timeout=10
        )
        self.assertLess(gone, 2.0 + 1.5)
        for _ in range(10):
            self.assertEqual(e2e.parse_hello((await self._connect(port))["hello"])["shard"], "api-reg-2")
        self.assertTrue(os.path.exists(os.path.join(d.directory, "state", "registry.json")))


class ReferenceShardRegistrationTests(TestCase):
    """The reference shard registers itself with ``--register`` and leaves when stopped."""

    timeout = 60

    async def test_reference_shard_registers_and_revokes(self):
        """Started with --register it appears under its service; SIGTERM revokes its lease at once."""
        etcd = e2e.EtcdServer(self)
        await etcd.start()
        d = e2e.Deployment(self)
        port_file = os.path.join(d.directory, "port")
        shard = e2e.spawn(self, [sys.executable, "-m", "shardtcp.example.shard", "--id", "api-ref",
                                 "--jwks", d.jwks, "--listen", "tcp:0:interface=127.0.0.1",
                                 "--port-file", port_file, "--register", etcd.url, "--service", "api",
                                 "--ttl", "30"], env=e2e.child_environment(), timeout=55)
        from shardtcp.registry.etcd import EtcdClient

        client = EtcdClient(reactor, [etcd.url])
        found: list = []

        async def registered() -> list:
            _, kvs = await client.range(b"/shardtcp/shards/")
            return kvs

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not found:
            found = await registered()
            if not found:
                await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual([kv.key for kv in found], [b"/shardtcp/shards/api/api-ref"])
        with open(port_file) as f:
            port = int(f.read().strip())
        self.assertIn(f'"address": "127.0.0.1:{port}"'.encode(), found[0].value)
        shard.signal("TERM")
        await shard.ended
        self.assertEqual(await registered(), [])


class SnapshotRestartTests(TestCase):
    """A proxy restarted while etcd is down routes on its snapshot."""

    timeout = 90

    async def test_restart_while_etcd_is_down(self):
        """
        A proxy learns a registered shard and writes its snapshot; it stops,
        etcd dies, and a new proxy from the same file starts from the
        snapshot: stale, and its clients get verified connections to that
        shard.
        """
        from shardtcp.config import load_config
        from shardtcp.registry.etcd import EtcdClient
        from shardtcp.registry.register import Registration
        from shardtcp.tap import build_service

        etcd = e2e.EtcdServer(self)
        await etcd.start()
        d = e2e.Deployment(self)
        shard = d.add_shard("api-snap", e2e.FRANKFURT)
        snapshot = os.path.join(d.directory, "state", "registry.json")
        port = d.start_proxy_text(_registry_toml(etcd.url, snapshot))
        registration = Registration(
            EtcdClient(reactor, [etcd.url]), prefix="/shardtcp", service="api", shard_id="api-snap",
            record={"address": f"127.0.0.1:{shard.port}"}, ttl=60, clock=reactor,
        )
        registration.startService()
        await e2e.wait_until(lambda: len(d.proxy.resolver.get_shard_info("api")) == 1, timeout=10)
        await e2e.wait_until(lambda: os.path.exists(snapshot), timeout=5)
        first = await deferToThread(e2e.plain_tls_exchange, port, d.ca_path, payload=b"one\n")
        self.assertEqual(e2e.parse_hello(first["hello"])["shard"], "api-snap")
        await d.proxy.stopService()
        # The shard leaves etcd; the snapshot the stopped proxy wrote keeps it.
        await registration.stopService()
        await etcd.kill()

        again = build_service(load_config(d.config_path), reactor)
        again.startService()
        self.addCleanup(again.stopService)
        self.assertTrue(again.registry.stale)
        self.assertEqual([s.shard_id for s in again.resolver.get_shard_info("api")], ["api-snap"])
        new_port = again.listening_port("edge").getHost().port
        result = await deferToThread(e2e.plain_tls_exchange, new_port, d.ca_path, payload=b"two\n")
        self.assertEqual(e2e.parse_hello(result["hello"])["shard"], "api-snap")
        self.assertEqual(result["echo"], b"two\n")
