"""
Live shard state over real sockets: a shard process killed under steady
load, and TLS health checks against a TLS shard.
"""

from __future__ import annotations

import socket
import ssl
import time

from twisted.internet import reactor
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from shardtcp.model import Health
from tests.e2e.harness import SERVICE_NAME as NAME
from tests.e2e.harness import Deployment, listener_toml


class FailoverTests(TestCase):
    """Ejection and retries keep clients served while a shard dies."""

    timeout = 90

    def setUp(self):
        self.deployment = Deployment(self, reactor)
        self.dir = self.deployment.directory
        self.ca_path = self.deployment.ca_path

    async def shard(self, shard_id):
        """A shard in a child process: (its ChildProcess, its port)."""
        return await self.deployment.add_shard_process(shard_id)

    def proxy(self, body: str, *, mode: str = "passthrough", listener: str = ""):
        self.deployment.start_proxy_text(
            listener_toml(mode, "retries = 2\n" + listener, connect_timeout="1s") + body, proxy_id="edge-f"
        )
        return self.deployment.proxy

    async def test_killed_shard_under_load(self):
        """
        Sequential clients run while shard A is killed with SIGKILL: every
        client that starts after the kill is served (retries cover the
        window before ejection; only the one in flight may fail), A is
        marked unhealthy within fall x interval, and after that no
        connection attempt goes to A.
        """
        proc_a, port_a = await self.shard("api-a")
        _, port_b = await self.shard("api-b")
        check = 'health_check = { kind = "tcp", interval = "200ms", timeout = "200ms", rise = 2, fall = 2 }'
        service = self.proxy(
            f'[service.api]\nnames = ["{NAME}"]\n'
            f'[[service.api.shard]]\nid = "api-a"\naddress = "127.0.0.1:{port_a}"\n{check}\n'
            f'[[service.api.shard]]\nid = "api-b"\naddress = "127.0.0.1:{port_b}"\n{check}\n'
        )
        port = service.listening_port("edge").getHost().port
        metrics = service.metrics
        observed = {}

        def failures_to_a():
            return sum(
                metrics.value("shardtcp_upstream_connect_failures_total", service="api", shard="api-a", reason=r)
                for r in ("refused", "timeout", "connect_error", "error")
            )

        def watch():
            health = {i.shard_id: i.health for i in service.resolver.get_shard_info("api")}
            if "killed" in observed and "unhealthy_at" not in observed and health["api-a"] != Health.HEALTHY:
                observed["unhealthy_at"] = time.monotonic()
                observed["failures_at_ejection"] = failures_to_a()

        watcher = LoopingCall(watch)
        watcher.start(0.02)
        self.addCleanup(lambda: watcher.running and watcher.stop())

        def stamp(result):
            observed["killed"] = time.monotonic()
            return result

        # Stamp once it is really gone (reaped: its sockets closed by the kernel).
        proc_a.ended.addCallback(stamp)

        def kill():
            proc_a.signal("KILL")

        def clients():
            context = ssl.create_default_context(cafile=self.ca_path)
            served, failed = {}, []
            end = time.monotonic() + 4.0
            while time.monotonic() < end:
                started = time.monotonic()
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                        with context.wrap_socket(raw, server_hostname=NAME) as tls:
                            line = tls.recv(4096)
                    shard = line.split()[1].decode() if line.startswith(b"SHARD ") else None
                    if shard is None:
                        failed.append((started, line))
                    else:
                        served[shard] = served.get(shard, 0) + 1
                except (OSError, ssl.SSLError) as e:
                    failed.append((started, repr(e)))
            return served, failed

        reactor.callLater(1.0, kill)
        served, failed = await deferToThread(clients)
        # The connection in flight through api-a when it died may fail (its
        # bytes were on the dead shard); every connection that started after
        # its death must be served, before and after ejection.
        self.assertEqual([f for f in failed if f[0] >= observed["killed"]], [])
        self.assertLessEqual(len(failed), 1, failed)
        self.assertGreater(served.get("api-a", 0), 0)
        self.assertGreater(served.get("api-b", 0), 0)
        self.assertIn("unhealthy_at", observed, "api-a was never marked unhealthy")
        # fall (2) x interval (0.2 s), plus jitter, plus one check timeout.
        self.assertLess(observed["unhealthy_at"] - observed["killed"], 1.5)
        self.assertEqual(failures_to_a(), observed["failures_at_ejection"])
        self.assertEqual(service.resolver.get_shard_info("api")[0].health, Health.UNHEALTHY)

    async def test_tls_health_check_against_tls_shard(self):
        """
        A "tls" check sends LOCAL, handshakes against upstream_ca and the
        shard's server_name, and keeps a good shard healthy; a shard whose
        certificate does not match is marked unhealthy.
        """
        _, good = await self.shard("api-good")
        _, bad = await self.shard("api-bad")
        proxy_ca, _ = self.deployment.authority("edge-ca", "edge CA")
        self.deployment.issue_server("edge", proxy_ca, [NAME])
        check = 'health_check = { kind = "tls", interval = "200ms", timeout = "1s", rise = 1, fall = 1 }'
        service = self.proxy(
            f'[service.api]\nnames = ["{NAME}"]\nupstream_tls = true\nupstream_ca = "certs/ca.pem"\n'
            f'[[service.api.shard]]\nid = "api-good"\naddress = "127.0.0.1:{good}"\n'
            f'server_name = "api-good.shards.test"\n{check}\n'
            f'[[service.api.shard]]\nid = "api-bad"\naddress = "127.0.0.1:{bad}"\n'
            f'server_name = "not-this.shards.test"\n{check}\n',
            mode="terminate",
            listener='certificates = [ { names = ["api.example.test"], cert = "edge.pem", key = "edge.key" } ]',
        )
        for _ in range(100):
            status = service.health.status()["shards"]
            if status["api-good"]["checks"] >= 2 and status["api-bad"]["checks"] >= 2:
                break
            await deferLater(reactor, 0.05, lambda: None)
        health = {i.shard_id: i.health for i in service.resolver.get_shard_info("api")}
        self.assertEqual(health["api-good"], Health.HEALTHY, status["api-good"])
        self.assertEqual(health["api-bad"], Health.UNHEALTHY, status["api-bad"])
        self.assertTrue(status["api-good"]["last_ok"])
