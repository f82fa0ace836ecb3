"""
Limits and the proxy's own failures over real loopback sockets: one source
flooding a listener with ``per_source`` limits while another source is
served, a ``twistd`` proxy run out of file descriptors while its shards stay
healthy, and a shard that accepts and closes without a byte.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from twisted.internet import protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from shardtcp.identify.clienthello import AlertDescription, tls_alert
from tests.e2e import harness as e2e
from tests.e2e.harness import (
    AMSTERDAM,
    FRANKFURT,
    NEW_YORK,
    Deployment,
    Shard,
    listener_toml,
    plain_tls_exchange,
    service_toml,
)
from tests.support import client_hello

#: Connections the flooding source opens, as fast as it can.
FLOOD = 500
#: The flooding source's per_source.max_connections.
SOURCE_MAX = 20


def _flood(port: int, count: int) -> tuple[list, float]:
    """
    Open ``count`` connections from 127.0.0.1 as fast as possible, each
    sending a ClientHello and holding on; return the sockets and the seconds
    it took.
    """
    hello = client_hello(e2e.SERVICE_NAME)
    sockets = []
    started = time.monotonic()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock.sendall(hello)
        except OSError:
            pass  # refused at accept and already closed: fine
        sockets.append(sock)
    return sockets, time.monotonic() - started


def _still_open(sockets: list) -> int:
    """How many of ``sockets`` the proxy has not closed (no EOF, no reset, within 2 s)."""
    deadline = time.monotonic() + 2.0
    open_count = 0
    for sock in sockets:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
        except socket.timeout:
            open_count += 1
        except OSError:
            pass
    return open_count


def _close_all(sockets: list) -> None:
    for sock in sockets:
        sock.close()


class FloodTests(TestCase):
    """One source is held to its limits at accept; other sources are not slowed."""

    timeout = 120

    async def test_flooding_source_limited_other_source_served(self):
        """
        127.0.0.1 opens 500 connections as fast as it can against a
        listener with per_source = { max_connections = 20, rate = "1000/s" }:
        exactly 20 are held, the other 480 are closed at accept and counted
        as source_connections; meanwhile 127.0.0.2 completes TLS exchanges
        through the proxy promptly, and no shard records a failure.
        """
        d = Deployment(self, reactor)
        shards = [d.add_shard("api-fra-1", FRANKFURT), d.add_shard("api-nyc-1", NEW_YORK)]
        port = d.start_proxy_text(
            listener_toml(
                "passthrough",
                f'peek_timeout = "60s"\nper_source = {{ max_connections = {SOURCE_MAX}, rate = "1000/s" }}',
            )
            + service_toml([(s.shard_id, s.port, "") for s in shards])
        )
        quiet = []
        for _ in range(5):
            started = time.monotonic()
            await deferToThread(plain_tls_exchange, port, d.ca_path, source="127.0.0.2", payload=b"ping")
            quiet.append(time.monotonic() - started)
        flood = deferToThread(_flood, port, FLOOD)
        timings = []
        for _ in range(5):
            started = time.monotonic()
            result = await deferToThread(plain_tls_exchange, port, d.ca_path, source="127.0.0.2", payload=b"ping")
            timings.append(time.monotonic() - started)
            self.assertEqual(result["echo"], b"ping")
        sockets, flood_seconds = await flood
        try:
            held = await deferToThread(_still_open, sockets)
        finally:
            _close_all(sockets)
        refused = d.rejected("source_connections") + d.rejected("source_rate")
        self.assertEqual(held, SOURCE_MAX)
        self.assertEqual(refused, FLOOD - SOURCE_MAX)
        self.assertEqual(d.rejected("source_connections"), FLOOD - SOURCE_MAX)
        self.assertLess(max(timings), 2.0, timings)
        for shard_id in d.shards:
            self.assertEqual(d.proxy.resolver.connect_stats(shard_id).failed, 0, shard_id)
        print(
            f"\nflood: {FLOOD} connections from 127.0.0.1 in {flood_seconds:.3f}s, {held} held, "
            f"{refused:.0f} refused at accept; 127.0.0.2 exchanges took "
            f"{', '.join(f'{t * 1000:.1f}' for t in timings)} ms under the flood "
            f"({', '.join(f'{t * 1000:.1f}' for t in quiet)} ms before it)"
        )

    async def test_rate_per_source(self):
        """
        per_source rate = "50/s": 200 connect-and-close cycles from one
        source as fast as possible are admitted no more than the bucket
        allows (50 at once plus 50 per second elapsed), the rest are counted
        as source_rate; another source is admitted meanwhile.
        """
        d = Deployment(self, reactor)
        shard = d.add_shard("api-fra-1", FRANKFURT)
        port = d.start_proxy_text(
            listener_toml("passthrough", 'per_source = { rate = "50/s" }')
            + service_toml([(shard.shard_id, shard.port, "")])
        )

        def cycles() -> float:
            started = time.monotonic()
            for _ in range(200):
                with socket.create_connection(("127.0.0.1", port), timeout=10):
                    pass
            return time.monotonic() - started

        elapsed = await deferToThread(cycles)
        result = await deferToThread(plain_tls_exchange, port, d.ca_path, source="127.0.0.2", payload=b"x")
        self.assertEqual(result["echo"], b"x")
        await e2e.wait_for(lambda: d.metric("shardtcp_connections_accepted_total", listener="edge") +
                           d.rejected("source_rate") >= 201, 5.0)
        accepted = d.metric("shardtcp_connections_accepted_total", listener="edge") - 1
        self.assertEqual(accepted + d.rejected("source_rate"), 200)
        self.assertGreaterEqual(accepted, 50)
        self.assertLessEqual(accepted, 50 + 50 * (elapsed + 0.5))
        print(f"\nrate 50/s: 200 cycles in {elapsed:.3f}s, {accepted:.0f} admitted, "
              f"{d.rejected('source_rate'):.0f} refused as source_rate")


class _CloseAtOnce(protocol.Protocol):
    """A shard that accepts and closes before sending a byte."""

    def connectionMade(self):
        self.transport.loseConnection()


class EmptyResponseTests(TestCase):
    """A shard that closes without a byte is replaced by the next one."""

    timeout = 60

    async def test_next_shard_answers(self):
        """
        The nearest shard accepts and closes at once; the client's TLS
        exchange still completes, with the Amsterdam shard, and the closing
        shard's failure is recorded.
        """
        d = Deployment(self, reactor)
        listening = reactor.listenTCP(0, protocol.Factory.forProtocol(_CloseAtOnce), interface="127.0.0.1")
        d.shards["api-fra-1"] = Shard("api-fra-1", FRANKFURT, listening.getHost().port, listening=listening)
        d.add_shard("api-ams-1", AMSTERDAM)
        d.start_proxy([{"name": "edge", "retries": 1}])
        result = await deferToThread(plain_tls_exchange, d.port(), d.ca_path, payload=b"ping")
        self.assertEqual(e2e.parse_hello(result["hello"])["shard"], "api-ams-1")
        self.assertEqual(result["echo"], b"ping")
        self.assertEqual(d.proxy.resolver.connect_stats("api-fra-1").failed, 1)
        self.assertEqual(
            d.metric("shardtcp_upstream_connect_failures_total", service="api", shard="api-fra-1",
                     reason="empty_response"),
            1.0,
        )


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _overloaded_clients(port: int, count: int) -> list:
    """``count`` clients one after the other: each sends a ClientHello and reads to the close."""
    hello = client_hello(e2e.SERVICE_NAME)
    answers = []
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(hello)
            received = b""
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
            except ConnectionResetError:
                pass
            answers.append(received)
    return answers


def _hold(port: int, count: int) -> list:
    """``count`` connections spliced to a shard and held (each costs the proxy two descriptors)."""
    hello = client_hello(e2e.SERVICE_NAME)
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(hello)
        sock.recv(1)  # the shard's ServerHello: spliced
        sockets.append(sock)
    return sockets


class OutOfDescriptorsTests(TestCase):
    """A proxy out of file descriptors refuses clients and keeps its shards."""

    timeout = 120

    async def test_emfile_never_ejects(self):
        """
        A ``twistd`` proxy is limited (``prlimit``) to the descriptors it
        uses plus two held connections plus one: each of 30 further clients
        is accepted on the last descriptor, the proxy's socket() for the
        shard fails with EMFILE, and the client gets an internal_error
        alert.  The proxy's log blames itself and ejects nothing, and once
        the held connections close, a client is served by the same shard
        as before.
        """
        prlimit = e2e.require_binary("prlimit")
        d = Deployment(self, reactor)
        d.add_shard("api-fra-1", FRANKFURT)
        d.add_shard("api-ams-1", AMSTERDAM)
        d.add_shard("api-nyc-1", NEW_YORK)
        twistd = e2e.twistd_binary()
        child = port = None
        for attempt in range(5):
            port = e2e.free_port()
            config = d.write_config([{"name": "edge", "retries": 2}], port=port, name=f"fd-{attempt}.toml")
            child = e2e.spawn(
                self,
                [twistd, "-n", "--pidfile", os.path.join(d.directory, f"fd-{attempt}.pid"),
                 "shardtcp", "--config", config],
                cwd=d.directory,
                timeout=100,
            )
            if await e2e.wait_until_accepting(port, 20.0, lambda: not child.done):
                break
        else:
            self.fail("twistd did not start")
        pid = child.transport.pid
        first = await deferToThread(plain_tls_exchange, port, d.ca_path, payload=b"a")
        best = e2e.parse_hello(first["hello"])["shard"]
        await e2e.wait_for(lambda: d.shard_connections() == 0, 5.0)
        baseline = _open_fds(pid)
        limit = baseline + 2 * 2 + 1
        subprocess.run([prlimit, f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True)
        held = await deferToThread(_hold, port, 2)
        try:
            answers = await deferToThread(_overloaded_clients, port, 30)
        finally:
            _close_all(held)
        alert = tls_alert(AlertDescription.internal_error)
        self.assertNotIn("ejected", child.out.decode(errors="replace"))
        self.assertEqual(answers, [alert] * 30, (baseline, limit))
        await e2e.wait_for(lambda: d.shard_connections() == 0, 5.0)
        served = set()
        for _ in range(6):
            after = await deferToThread(plain_tls_exchange, port, d.ca_path, payload=b"b")
            self.assertEqual(after["echo"], b"b")
            served.add(e2e.parse_hello(after["hello"])["shard"])
        log = child.out.decode(errors="replace")
        self.assertEqual(log.count("the proxy itself failed to reach shard"), 30, log[-3000:])
        self.assertIn("Too many open files", log)
        self.assertNotIn("ejected", log)
        self.assertNotIn("panic", log)
        self.assertNotIn("Unhandled", log)
        print(f"\nEMFILE: proxy at {baseline} descriptors limited to {limit}; 30 clients refused as "
              f"proxy_overloaded, 0 ejections; first client served by {best}, then {sorted(served)}")
