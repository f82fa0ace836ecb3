"""
Live shard state over real sockets: a shard process killed under steady
load, and TLS health checks against a TLS shard.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time

from twisted.internet import reactor
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from shardtcp import keys as keymod
from shardtcp.config import load_config
from shardtcp.model import Health
from shardtcp.example.pki import CertificateAuthority
from shardtcp.tap import build_service

NAME = "api.example.test"


def _start_shard_process(case, directory, shard_id, jwks, cert, key):
    port_file = os.path.join(directory, f"{shard_id}.port")
    process = subprocess.Popen(
        [sys.executable, "-m", "shardtcp.example.shard", "--id", shard_id, "--jwks", jwks,
         "--cert", cert, "--key", key, "--port-file", port_file],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(directory, f"{shard_id}.log"), "wb"),
    )

    def stop():
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    case.addCleanup(stop)
    deadline = time.monotonic() + 20
    while not os.path.exists(port_file):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"shard {shard_id} did not start")
        time.sleep(0.05)
    with open(port_file) as f:
        return process, int(f.read().strip())


class FailoverTests(TestCase):
    """Ejection and retries keep clients served while a shard dies."""

    timeout = 90

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.keys = keymod.generate_keypair(os.path.join(self.dir, "keys"), kid="policy-1")
        self.ca = CertificateAuthority("shards CA")
        self.ca_path = self.ca.write(self.dir, "ca")

    def shard(self, shard_id):
        cert, key = self.ca.issue_server([NAME, f"{shard_id}.shards.test"], common_name=shard_id).write(
            self.dir, shard_id
        )
        return _start_shard_process(self, self.dir, shard_id, self.keys.jwks, cert, key)

    def proxy(self, body: str):
        path = os.path.join(self.dir, "proxy.toml")
        with open(path, "w") as f:
            f.write(
                '[proxy]\nid = "edge-f"\n[signing]\nprivate_key = "keys/policy-1.pem"\nkid = "policy-1"\n'
                '[[listener]]\nname = "edge"\nlisten = "tcp:0:interface=127.0.0.1"\n'
                'connect_timeout = "1s"\nretries = 2\n' + body
            )
        service = build_service(load_config(path), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def test_killed_shard_under_load(self):
        """
        Sequential clients run while shard A is killed with SIGKILL: every
        client that starts after the kill is served (retries cover the
        window before ejection; only the one in flight may fail), A is
        marked unhealthy within fall x interval, and after that no
        connection attempt goes to A.
        """
        proc_a, port_a = await deferToThread(self.shard, "api-a")
        _, port_b = await deferToThread(self.shard, "api-b")
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

        def kill():
            proc_a.send_signal(signal.SIGKILL)
            # Stamp once it is really gone (its sockets closed by the kernel).
            proc_a.wait(timeout=10)
            observed["killed"] = time.monotonic()

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
        _, good = await deferToThread(self.shard, "api-good")
        _, bad = await deferToThread(self.shard, "api-bad")
        proxy_ca = CertificateAuthority("edge CA")
        cert, key = proxy_ca.issue_server([NAME]).write(self.dir, "edge")
        check = 'health_check = { kind = "tls", interval = "200ms", timeout = "1s", rise = 1, fall = 1 }'
        service = self.proxy(
            'mode = "terminate"\ncertificates = [ { names = ["api.example.test"], cert = "edge.pem", key = "edge.key" } ]\n'
            f'[service.api]\nnames = ["{NAME}"]\nupstream_tls = true\nupstream_ca = "ca.pem"\n'
            f'[[service.api.shard]]\nid = "api-good"\naddress = "127.0.0.1:{good}"\n'
            f'server_name = "api-good.shards.test"\n{check}\n'
            f'[[service.api.shard]]\nid = "api-bad"\naddress = "127.0.0.1:{bad}"\n'
            f'server_name = "not-this.shards.test"\n{check}\n'
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
