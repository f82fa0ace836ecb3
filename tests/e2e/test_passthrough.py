"""
End-to-end tests: real TLS clients, the proxy, and verifying TLS shards,
over loopback sockets.

Every test builds its own ``Deployment`` (``tests.e2e.harness``): reference
shards in two or three regions that accept a connection only with a PROXY
v2 header whose PolicyContext verifies against the JWKS of the deployment's
signing key, and the proxy built by ``build_service`` on the real reactor.
One test runs the proxy as ``twistd -n shardtcp --config PATH`` instead.
The clients are ``openssl s_client`` and Python's ``ssl`` (both as an
ordinary socket and driven through ``MemoryBIO`` so that the test chooses
how the ClientHello goes on the wire).

"Served" always means three things: the TLS session completed and the
client verified the chain against the deployment's CA; the certificate it
saw is the chosen shard's own (DER equal, CN the shard id); and the shard
verified the header (its hello line and ``factory.connections`` name the
client's real address and port).
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
import time

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from shardtcp.config import load_config
from shardtcp.identify.clienthello import split_into_records
from shardtcp.proxy.ksplice import kernel_splice_available
from shardtcp.tap import build_service
from shardtcp.example.shard import pattern_sha256
from tests.e2e import harness as e2e
from tests.e2e.harness import (
    AMSTERDAM,
    FRANKFURT,
    NEW_YORK,
    SERVICE_NAME,
    SINGAPORE,
    ClosedByPeer,
    Deployment,
    TLSClient,
)
from tests.e2e.test_plain_halfclose import HalfClosingShard, run_half_close, start_proxy
from tests.e2e.test_plain_halfclose import tls_client as half_close_tls_client
from tests.support import client_hello

# Fatal alerts as the proxy must send them (TLS 1.2 record version, level 2).
ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"
ALERT_HANDSHAKE_FAILURE = b"\x15\x03\x03\x00\x02\x02\x28"

MIB = 1024 * 1024


def _require_openssl() -> None:
    if e2e.openssl_binary() is None:
        raise SkipTest("the openssl command is not installed (CI installs it)")


class _EndToEnd(TestCase):
    """Shared set-up and assertions."""

    timeout = 60

    def three_regions(self, behaviour: str = "hello", listeners=({"name": "edge"},)) -> Deployment:
        """Shards in Frankfurt, New York and Singapore, and a started in-process proxy."""
        deployment = Deployment(self, reactor)
        deployment.add_shard("api-fra-1", FRANKFURT, behaviour)
        deployment.add_shard("api-nyc-1", NEW_YORK, behaviour)
        deployment.add_shard("api-sgp-1", SINGAPORE, behaviour)
        deployment.start_proxy(listeners)
        return deployment

    def assert_served(
        self,
        deployment: Deployment,
        shard_id: str,
        *,
        cert_der: bytes,
        local: tuple,
        hello: bytes = None,
        sni: str = SERVICE_NAME,
    ) -> None:
        """
        The client at ``local`` was served by ``shard_id``: it saw that
        shard's certificate, and the shard verified a header naming the
        client (and said so in its hello line, when there is one).
        """
        shard = deployment.shards[shard_id]
        self.assertEqual(cert_der, shard.cert_der, f"the client did not see {shard_id}'s certificate")
        client = (local[0], local[1])
        verified = [c for c in shard.factory.connections if tuple(c.client) == client]
        self.assertEqual(len(verified), 1, f"{shard_id} verified no header for {client}")
        self.assertEqual(verified[0].service, "api")
        self.assertEqual(verified[0].sni, sni)
        self.assertEqual(verified[0].shard_id, shard_id)
        self.assertEqual(tuple(verified[0].policy.access_control_list), ("orders:read", "orders:write"))
        if hello is not None:
            fields = e2e.parse_hello(hello)
            self.assertEqual(fields["shard"], shard_id)
            self.assertEqual(fields["client"], f"{local[0]}:{local[1]}")
            self.assertEqual(fields["sni"], sni if sni is not None else "-")
            self.assertEqual(fields["enc"], "tls")
        for other in deployment.shards.values():
            if other.shard_id != shard_id and other.factory is not None:
                self.assertFalse(
                    [c for c in other.factory.connections if tuple(c.client) == client],
                    f"{other.shard_id} saw the connection too",
                )


class ClientTests(_EndToEnd):
    """Real clients through the in-process proxy to the nearest shard."""

    async def test_openssl_s_client(self):
        """
        ``openssl s_client -servername`` completes a verified TLS session
        with the Frankfurt shard through the proxy: it prints the shard's own
        certificate, ``Verify return code: 0``, the shard's hello line and
        the echo of what it sent; the shard verified the header.
        """
        _require_openssl()
        deployment = self.three_regions()
        payload = b"ping through shardtcp\n"
        child = e2e.spawn(
            self,
            e2e.s_client_argv(deployment.port(), deployment.ca_path, SERVICE_NAME),
            stdin=payload,
            until=payload,
            timeout=20,
        )
        status = await child.ended
        out = child.out
        self.assertEqual(status, 0, child.err.decode(errors="replace"))
        self.assertIn(b"Verify return code: 0 (ok)", out)
        self.assertIn(b"subject=CN = api-fra-1", out)
        shard = deployment.shards["api-fra-1"]
        self.assertEqual(e2e.pem_body(e2e.first_certificate(out)), e2e.pem_body(shard.cert_pem))
        hello = next(line for line in out.splitlines() if line.startswith(b"SHARD "))
        fields = e2e.parse_hello(hello)
        self.assertEqual(fields["shard"], "api-fra-1")
        self.assertEqual(fields["sni"], SERVICE_NAME)
        self.assertIn(payload, out.split(hello, 1)[1])
        self.assertEqual(len(shard.factory.connections), 1)
        verified = shard.factory.connections[0]
        self.assertEqual(f"{verified.client[0]}:{verified.client[1]}", fields["client"])
        self.assertEqual(verified.client[0], "127.0.0.1")
        self.assertEqual(verified.sni, SERVICE_NAME)

    async def test_geo_places_clients_in_their_region(self):
        """
        With ``[geo]`` placing 127.0.0.2 in New York and 127.0.0.3 in
        Singapore, a Python ``ssl`` client from each address is served by the
        shard of its region, and one from 127.0.0.1 (unplaced: the proxy's
        Frankfurt stands in) by the Frankfurt shard.
        """
        deployment = self.three_regions()
        for source, shard_id in (
            ("127.0.0.2", "api-nyc-1"),
            ("127.0.0.3", "api-sgp-1"),
            ("127.0.0.1", "api-fra-1"),
        ):
            result = await deferToThread(
                e2e.plain_tls_exchange, deployment.port(), deployment.ca_path, source=source, payload=b"hello?\n"
            )
            self.assertEqual(e2e.common_name(result["cert"]), shard_id)
            self.assertEqual(result["echo"], b"hello?\n")
            self.assertEqual(result["local"][0], source)
            self.assert_served(deployment, shard_id, cert_der=result["der"], local=result["local"], hello=result["hello"])


class ClientHelloShapeTests(_EndToEnd):
    """ClientHellos cut, re-framed and enlarged on the wire still reach the shard intact."""

    async def test_one_byte_at_a_time(self):
        """
        A ClientHello sent one byte per TCP segment (TCP_NODELAY, 1 ms
        apart) is reassembled by the proxy; the handshake then completes
        over the same socket with the Frankfurt shard, whose certificate the
        client sees, and data echoes back.
        """
        deployment = self.three_regions()
        reads = e2e.count_reads(deployment.proxy.factories["edge"])

        def run():
            with TLSClient(deployment.port(), SERVICE_NAME, deployment.ca_path) as client:
                hello_size = len(client.client_hello())
                client.handshake(e2e.send_bytewise(0.001))
                line = client.read_line()
                client.send(b"after a slow hello\n")
                echo = client.read_exactly(len(b"after a slow hello\n"))
                return hello_size, line, echo, client.cert_der, client.local

        hello_size, line, echo, der, local = await deferToThread(run)
        self.assertEqual(echo, b"after a slow hello\n")
        self.assert_served(deployment, "api-fra-1", cert_der=der, local=local, hello=line)
        # The proxy really saw the hello in pieces, not coalesced by the kernel.
        first_reads, seen = [], 0
        for size in reads:
            if seen >= hello_size:
                break
            first_reads.append(size)
            seen += size
        self.assertGreater(len(first_reads), hello_size // 2, f"reads of the hello: {first_reads[:20]}...")

    async def test_split_across_two_records(self):
        """
        A ClientHello re-framed into two TLS handshake records (with
        ``split_into_records``), the second sent 50 ms after the first,
        completes the handshake with the Frankfurt shard (OpenSSL reassembles
        fragmented handshake messages) through the proxy.
        """
        deployment = self.three_regions()

        def run():
            with TLSClient(deployment.port(), SERVICE_NAME, deployment.ca_path) as client:
                original = client.client_hello()
                payload_size = len(original) - 5
                reframed = split_into_records(original, [payload_size // 2])
                first_record = 5 + payload_size // 2

                def send_two(sock, _hello):
                    sock.sendall(reframed[:first_record])
                    time.sleep(0.05)
                    sock.sendall(reframed[first_record:])

                client.handshake(send_two)
                line = client.read_line()
                return reframed, line, client.cert_der, client.local

        reframed, line, der, local = await deferToThread(run)
        # Two handshake records indeed, the second right after the first.
        first_length = int.from_bytes(reframed[3:5], "big")
        second = reframed[5 + first_length :]
        self.assertEqual((reframed[0], second[0]), (0x16, 0x16))
        self.assertEqual(len(second), 5 + int.from_bytes(second[3:5], "big"))
        self.assert_served(deployment, "api-fra-1", cert_der=der, local=local, hello=line)

    async def test_ten_kib_client_hello(self):
        """
        A ClientHello of about 10 KiB (39 ALPN names of 250 bytes, the last
        ``http/1.1``) fits the default ``max_client_hello`` of 16 KiB: the
        Frankfurt shard receives the whole ALPN list unchanged, negotiates
        ``http/1.1`` from its end, and the handshake completes.
        """
        deployment = Deployment(self, reactor)
        offered: list = []
        deployment.add_shard("api-fra-1", FRANKFURT, alpn=offered)
        deployment.add_shard("api-nyc-1", NEW_YORK)
        deployment.start_proxy()
        names = [f"{i:02d}-" + "x" * 247 for i in range(38)] + ["http/1.1"]

        def run():
            with TLSClient(deployment.port(), SERVICE_NAME, deployment.ca_path, alpn=names) as client:
                size = len(client.client_hello())
                client.handshake()
                line = client.read_line()
                return size, line, client.tls.selected_alpn_protocol(), client.cert_der, client.local

        size, line, selected, der, local = await deferToThread(run)
        self.assertTrue(9.5 * 1024 <= size <= 11 * 1024, f"ClientHello of {size} bytes")
        self.assert_served(deployment, "api-fra-1", cert_der=der, local=local, hello=line)
        self.assertEqual(offered, [[name.encode() for name in names]])
        self.assertEqual(selected, "http/1.1")

    async def test_client_offering_alpn_the_shard_lacks(self):
        """
        A client offering ALPN protocols the shard does not speak (``h2``
        and ``http/1.1``, as curl does) is still served: the reference
        shard declines ALPN instead of failing the handshake.
        """
        deployment = self.three_regions()

        def run():
            with TLSClient(deployment.port(), SERVICE_NAME, deployment.ca_path, alpn=["h2", "http/1.1"]) as client:
                client.handshake()
                line = client.read_line()
                return line, client.tls.selected_alpn_protocol(), client.cert_der, client.local

        line, selected, der, local = await deferToThread(run)
        self.assert_served(deployment, "api-fra-1", cert_der=der, local=local, hello=line)
        self.assertIsNone(selected)

    async def test_client_hello_over_the_limit(self):
        """
        A ClientHello of about 18 KiB (over the default ``max_client_hello``
        of 16 KiB) is refused with a handshake_failure alert, counted as
        ``too_large``, and reaches no shard.
        """
        deployment = self.three_regions()
        names = [f"{i:02d}-" + "y" * 247 for i in range(70)]

        def run():
            with TLSClient(deployment.port(), SERVICE_NAME, deployment.ca_path, alpn=names) as client:
                hello = client.client_hello()
                client.sock.sendall(hello)
                received = b""
                try:
                    while True:
                        chunk = client.sock.recv(65536)
                        if not chunk:
                            break
                        received += chunk
                except ConnectionResetError:
                    pass
                return len(hello), received

        size, received = await deferToThread(run)
        self.assertGreater(size, 16384)
        self.assertEqual(received, ALERT_HANDSHAKE_FAILURE)
        self.assertEqual(deployment.metric("shardtcp_connections_rejected_total", listener="edge", reason="too_large"), 1)
        self.assertEqual(deployment.shard_connections(), 0)
        self.assertEqual(sum(len(s.factory.connections) for s in deployment.shards.values()), 0)


class RefusalTests(_EndToEnd):
    """Input the proxy cannot route: answered, closed and counted."""

    async def test_no_sni_is_refused(self):
        """
        A real ClientHello without SNI, on a listener without
        ``default_service``, gets exactly one unrecognized_name alert and the
        close; Python's ``ssl`` and ``openssl s_client -noservername`` report
        that alert; all are counted as ``no_service`` and no shard sees them.
        """
        deployment = self.three_regions()
        received, how = await deferToThread(e2e.raw_exchange, deployment.port(), client_hello(server_name=None))
        self.assertEqual((received, how), (ALERT_UNRECOGNIZED_NAME, "eof"))

        def python_client():
            with TLSClient(deployment.port(), None, deployment.ca_path) as client:
                try:
                    client.handshake()
                except ssl.SSLError as e:
                    return e.reason
                return "handshake completed"

        self.assertEqual(await deferToThread(python_client), "TLSV1_UNRECOGNIZED_NAME")
        expected = 2
        if e2e.openssl_binary() is not None:
            child = e2e.spawn(self, e2e.s_client_argv(deployment.port(), deployment.ca_path, None), timeout=20)
            status = await child.ended
            self.assertNotEqual(status, 0)
            self.assertIn(b"unrecognized name", child.out + child.err)
            self.assertNotIn(b"BEGIN CERTIFICATE", child.out)
            expected += 1
        self.assertEqual(
            deployment.metric("shardtcp_connections_rejected_total", listener="edge", reason="no_service"), expected
        )
        self.assertEqual(sum(len(s.factory.connections) for s in deployment.shards.values()), 0)

    async def test_no_sni_with_default_service(self):
        """
        On a listener with ``default_service = "api"``, a Python ``ssl``
        client that sends no SNI is served by the Frankfurt shard, whose
        header carries no SNI (``sni=-``).
        """
        deployment = self.three_regions(listeners=({"name": "edge"}, {"name": "fallback", "default_service": "api"}))
        result = await deferToThread(
            e2e.plain_tls_exchange, deployment.port("fallback"), deployment.ca_path, server_name=None, payload=b"x\n"
        )
        self.assertEqual(e2e.common_name(result["cert"]), "api-fra-1")
        self.assertEqual(result["echo"], b"x\n")
        self.assert_served(deployment, "api-fra-1", cert_der=result["der"], local=result["local"], hello=result["hello"], sni=None)

    async def test_garbage_instead_of_tls(self):
        """
        Bytes that are not TLS (binary noise, and a plain HTTP request on
        this SNI-only listener) are answered with nothing but the close, and
        counted as ``not_tls``; no shard sees them.
        """
        deployment = self.three_regions()
        for garbage in (
            b"\x00\x01\x02\x03 this is not TLS \xff\xfe\r\n" * 8,
            b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
        ):
            received, how = await deferToThread(e2e.raw_exchange, deployment.port(), garbage)
            self.assertEqual(received, b"")
            self.assertIn(how, ("eof", "reset"))
        self.assertEqual(deployment.metric("shardtcp_connections_rejected_total", listener="edge", reason="not_tls"), 2)
        self.assertEqual(sum(len(s.factory.connections) for s in deployment.shards.values()), 0)
        self.assertTrue(await e2e.wait_for(lambda: deployment.proxy_connections() == 0, 2.0))


class ShardFailureTests(_EndToEnd):
    """Shards that refuse or die."""

    async def test_refusing_shard_is_skipped(self):
        """
        When the best shard (Frankfurt, next to the proxy) refuses the
        connection, the proxy counts the refusal and serves the client from
        the next best one (Amsterdam) with the same ClientHello.
        """
        deployment = Deployment(self, reactor)
        deployment.add_refusing_shard("api-fra-0", FRANKFURT)
        deployment.add_shard("api-ams-1", AMSTERDAM)
        deployment.add_shard("api-nyc-1", NEW_YORK)
        deployment.start_proxy()
        result = await deferToThread(e2e.plain_tls_exchange, deployment.port(), deployment.ca_path, payload=b"retry\n")
        self.assertEqual(e2e.common_name(result["cert"]), "api-ams-1")
        self.assertEqual(result["echo"], b"retry\n")
        self.assert_served(deployment, "api-ams-1", cert_der=result["der"], local=result["local"], hello=result["hello"])
        self.assertEqual(
            deployment.metric("shardtcp_upstream_connect_failures_total", service="api", shard="api-fra-0", reason="refused"), 1
        )
        self.assertEqual(deployment.metric("shardtcp_connections_spliced_total", listener="edge", service="api", shard="api-ams-1"), 1)

    async def test_shard_dies_mid_stream(self):
        """
        A shard that aborts its connection after 1000 bytes
        (``die-after:1000``): the client sees its connection end promptly
        (within 2 s, without a TLS close_notify, so the truncation shows),
        and the proxy counts the connection as ended by the shard.
        """
        deployment = Deployment(self, reactor)
        deployment.add_shard("api-fra-1", FRANKFURT, "die-after:1000")
        deployment.start_proxy()

        def run():
            with TLSClient(deployment.port(), SERVICE_NAME, deployment.ca_path) as client:
                client.handshake()
                line = client.read_line()
                started = time.monotonic()
                try:
                    client.send(os.urandom(4000), chunk=500)
                except OSError:
                    pass  # the proxy may already have closed
                data, clean = client.read_to_end()
                return line, client.cert_der, client.local, time.monotonic() - started, clean

        line, der, local, elapsed, clean = await deferToThread(run)
        self.assert_served(deployment, "api-fra-1", cert_der=der, local=local, hello=line)
        self.assertLess(elapsed, 2.0)
        self.assertFalse(clean, "the stream ended with close_notify although the shard died")
        self.assertEqual(deployment.shards["api-fra-1"].factory.counts["aborted"], 1)
        self.assertTrue(
            await e2e.wait_for(
                lambda: deployment.metric("shardtcp_connections_ended_total", listener="edge", ended_by="shard") == 1, 2.0
            ),
            "the proxy did not count the connection as ended by the shard",
        )
        self.assertEqual(deployment.proxy_connections(), 0)


class StreamTests(_EndToEnd):
    """Half-close and bulk transfers, content checked."""

    async def test_half_close(self):
        """
        A client sends 256 KiB, then a TLS close_notify and a TCP
        ``shutdown(SHUT_WR)``: it still receives the whole echo and the
        shard's ``BYE <count> <sha256>`` line with the right count and hash,
        and the shard saw the half-close.
        """
        deployment = self.three_regions()
        payload = os.urandom(256 * 1024)

        got = await deferToThread(e2e.half_close_exchange, deployment.port(), deployment.ca_path, payload)
        line, data, clean, der, local = got["hello"], got["data"], got["clean"], got["der"], got["local"]
        self.assert_served(deployment, "api-fra-1", cert_der=der, local=local, hello=line)
        bye = f"BYE {len(payload)} {e2e.sha256_hex(payload)}\n".encode()
        self.assertEqual(len(data), len(payload) + len(bye))
        self.assertEqual(data[len(payload) :], bye)
        self.assertTrue(data[: len(payload)] == payload, "the echo differs from what was sent")
        self.assertTrue(clean, "the shard's close_notify did not arrive")
        self.assertEqual(deployment.shards["api-fra-1"].factory.counts["half_closed"], 1)

    async def test_upload_100_mib(self):
        """
        100 MiB of random bytes streamed through TLS to a ``sink`` shard,
        then a half-close: the shard reports ``SINK 104857600 <sha256>``
        equal to what was sent, and the proxy never held more than 1 MiB in
        its write buffers (flow control, not buffering).
        """
        deployment = self.three_regions("sink")
        size = 100 * MIB
        watch = e2e.BufferWatch(deployment)
        watch.start()
        self.addCleanup(watch.stop)

        def run():
            digest = hashlib.sha256()
            with TLSClient(deployment.port(), SERVICE_NAME, deployment.ca_path) as client:
                client.handshake()
                sent = 0
                while sent < size:
                    chunk = os.urandom(min(256 * 1024, size - sent))
                    digest.update(chunk)
                    client.send(chunk)
                    sent += len(chunk)
                client.close_notify()
                client.sock.shutdown(socket.SHUT_WR)
                data, clean = client.read_to_end()
                return digest.hexdigest(), data, client.cert_der, client.local

        started = time.monotonic()
        sent_hash, data, der, local = await deferToThread(run)
        elapsed = time.monotonic() - started
        watch.stop()
        self.assertEqual(data, f"SINK {size} {sent_hash}\n".encode())
        self.assert_served(deployment, "api-fra-1", cert_der=der, local=local)
        self.assertGreater(watch.samples, 10)
        self.assertLess(watch.peak, MIB, f"the proxy held {watch.peak} bytes")
        self.assertLess(elapsed, 45, f"100 MiB took {elapsed:.1f}s")

    async def test_download_100_mib(self):
        """
        A ``source:104857600`` shard sends its hello line and then 100 MiB of
        its pattern through the proxy: the client receives exactly that many
        bytes, with the pattern's SHA-256, then the shard's close_notify.
        The client stalls for 0.5 s after the hello line; the proxy never
        holds more than 1 MiB in its write buffers.
        """
        size = 100 * MIB
        deployment = self.three_regions(f"source:{size}")
        watch = e2e.BufferWatch(deployment)
        watch.start()
        self.addCleanup(watch.stop)

        def run():
            digest = hashlib.sha256()
            count = 0
            with TLSClient(deployment.port(), SERVICE_NAME, deployment.ca_path) as client:
                client.handshake()
                line = client.read_line()
                # A client that stalls: without flow control the shard's
                # bytes would pile up in the proxy meanwhile.
                time.sleep(0.5)
                try:
                    while True:
                        chunk = client.recv_some()
                        digest.update(chunk)
                        count += len(chunk)
                except ClosedByPeer as end:
                    digest.update(end.data)
                    count += len(end.data)
                    clean = end.clean
                return line, count, digest.hexdigest(), clean, client.cert_der, client.local

        started = time.monotonic()
        line, count, received_hash, clean, der, local = await deferToThread(run)
        elapsed = time.monotonic() - started
        watch.stop()
        self.assertGreater(watch.samples, 10)
        self.assertLess(watch.peak, MIB, f"the proxy held {watch.peak} bytes")
        self.assert_served(deployment, "api-fra-1", cert_der=der, local=local, hello=line)
        self.assertEqual(count, size)
        self.assertEqual(received_hash, pattern_sha256(size))
        self.assertTrue(clean, "the download ended without the shard's close_notify")
        self.assertLess(elapsed, 45, f"100 MiB took {elapsed:.1f}s")


class TwistdTests(_EndToEnd):
    """The proxy as users run it: ``twistd -n shardtcp --config PATH``."""

    async def start_twistd(self, deployment: Deployment) -> tuple:
        """
        Start ``twistd -n shardtcp`` on a free port (retrying when another
        process takes the port first); return (child, port) once it accepts.
        """
        twistd = e2e.twistd_binary()
        for attempt in range(5):
            port = e2e.free_port()
            config = deployment.write_config(port=port, name=f"twistd-{attempt}.toml")
            child = e2e.spawn(
                self,
                [twistd, "-n", "--pidfile", os.path.join(deployment.directory, f"twistd-{attempt}.pid"),
                 "shardtcp", "--config", config],
                cwd=deployment.directory,
                timeout=50,
            )
            if await e2e.wait_until_accepting(port, 20.0, lambda: not child.done):
                return child, port
            if not child.done:
                self.fail(f"twistd did not accept on port {port}:\n{child.out.decode(errors='replace')}{child.err.decode(errors='replace')}")
            output = child.out + child.err
            if b"Address already in use" not in output and b"CannotListenError" not in output:
                self.fail(f"twistd exited with {child.status}:\n{output.decode(errors='replace')}")
        self.fail("no free port could be bound in five attempts")

    async def test_twistd_subprocess(self):
        """
        ``twistd -n shardtcp --config PATH``, run as a process, routes
        ``openssl s_client`` to the Frankfurt shard (verified certificate,
        the shard's hello line) and a Python ``ssl`` client from 127.0.0.2
        to the New York shard, which answers its half-close with the right
        ``BYE`` line; SIGTERM then shuts it down cleanly.
        """
        _require_openssl()
        deployment = Deployment(self, reactor)
        deployment.add_shard("api-fra-1", FRANKFURT)
        deployment.add_shard("api-nyc-1", NEW_YORK)
        deployment.add_shard("api-sgp-1", SINGAPORE)
        child, port = await self.start_twistd(deployment)

        s_client = e2e.spawn(
            self,
            e2e.s_client_argv(port, deployment.ca_path, SERVICE_NAME),
            stdin=b"via twistd\n",
            until=b"via twistd\n",
            timeout=20,
        )
        self.assertEqual(await s_client.ended, 0, s_client.err.decode(errors="replace"))
        self.assertIn(b"Verify return code: 0 (ok)", s_client.out)
        fra = deployment.shards["api-fra-1"]
        self.assertEqual(e2e.pem_body(e2e.first_certificate(s_client.out)), e2e.pem_body(fra.cert_pem))
        hello = next(line for line in s_client.out.splitlines() if line.startswith(b"SHARD "))
        self.assertEqual(e2e.parse_hello(hello)["shard"], "api-fra-1")
        self.assertEqual(len(fra.factory.connections), 1)

        payload = b"half-closed through twistd\n" * 100

        got = await deferToThread(e2e.half_close_exchange, port, deployment.ca_path, payload, source="127.0.0.2")
        line, data, der, local = got["hello"], got["data"], got["der"], got["local"]
        self.assert_served(deployment, "api-nyc-1", cert_der=der, local=local, hello=line)
        self.assertEqual(data, payload + f"BYE {len(payload)} {e2e.sha256_hex(payload)}\n".encode())

        await child.stop()
        log = (child.out + child.err).decode(errors="replace")
        # twistd stops cleanly, then re-raises SIGTERM so that its exit
        # status says which signal stopped it.
        self.assertIn(child.status, (0, -15), log)
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)


class KernelSpliceTests(_EndToEnd):
    """
    Which pump moves a passthrough connection's bytes: the kernel's
    ``splice(2)`` where it works, the userspace splice when the pipes run
    out or the configuration says so; the bytes are the same either way.
    """

    def start(self, deployment: Deployment, proxy_keys: str = "") -> None:
        """Start the in-process proxy with ``proxy_keys`` added to ``[proxy]``."""
        path = deployment.write_config()
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("[proxy]\n", "[proxy]\n" + proxy_keys, 1))
        deployment.proxy = build_service(load_config(path), reactor)
        deployment.proxy.startService()

    def deployment(self, size: int, proxy_keys: str = "") -> Deployment:
        deployment = Deployment(self, reactor)
        deployment.add_shard("api-fra-1", FRANKFURT, f"source:{size}")
        self.start(deployment, proxy_keys)
        return deployment

    def held_download(self, deployment: Deployment, arrived: threading.Event, release: threading.Event):
        """
        In a thread: a client reads the shard's hello line, says so through
        ``arrived``, waits for ``release``, then reads to the end.
        """

        def run():
            digest = hashlib.sha256()
            count = 0
            with TLSClient(deployment.port(), SERVICE_NAME, deployment.ca_path) as client:
                client.handshake()
                line = client.read_line()
                arrived.set()
                release.wait(30)
                try:
                    while True:
                        chunk = client.recv_some()
                        digest.update(chunk)
                        count += len(chunk)
                except ClosedByPeer as end:
                    digest.update(end.data)
                    count += len(end.data)
                    clean = end.clean
                return line, count, digest.hexdigest(), clean, client.cert_der, client.local

        return deferToThread(run)

    def kernel_spliced(self, deployment: Deployment) -> float:
        return deployment.metric("shardtcp_connections_kernel_spliced_total", listener="edge")

    async def test_download_moved_by_the_kernel(self):
        """
        A 32 MiB download held open after the shard's hello line: while it
        is held the process's pipe pool has exactly two pipes in use and the
        kernel-spliced counter is 1; then every byte arrives with the
        pattern's SHA-256 and the close_notify, the pipes are back (0 in
        use), and the end is counted as the shard's with at least the
        payload's bytes down.
        """
        if not kernel_splice_available():
            raise SkipTest("splice(2) does not work on this kernel")
        size = 32 * MIB
        deployment = self.deployment(size)
        pool = deployment.proxy.splicer.pool
        arrived, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        d = self.held_download(deployment, arrived, release)
        self.assertTrue(await e2e.wait_for(arrived.is_set, 20), "no hello line")
        self.assertTrue(await e2e.wait_for(lambda: pool.in_use == 2, 5), f"{pool.in_use} pipes in use")
        self.assertEqual(self.kernel_spliced(deployment), 1.0)
        release.set()
        line, count, received_hash, clean, der, local = await d
        self.assert_served(deployment, "api-fra-1", cert_der=der, local=local, hello=line)
        self.assertEqual(count, size)
        self.assertEqual(received_hash, pattern_sha256(size))
        self.assertTrue(clean, "the download ended without the shard's close_notify")
        self.assertTrue(await e2e.wait_for(lambda: deployment.proxy_connections() == 0, 10))
        self.assertEqual(pool.in_use, 0)
        self.assertEqual(deployment.metric("shardtcp_connections_ended_total", listener="edge", ended_by="shard"), 1.0)
        self.assertGreaterEqual(deployment.metric("shardtcp_bytes_total", listener="edge", direction="down"), size)

    async def test_pipes_run_out_falls_back(self):
        """
        With ``max_pipes = 2`` a second connection held beside the first
        finds no pipes: it is spliced in userspace (the kernel-spliced
        counter stays 1 of 2 spliced, still two pipes in use) and both
        downloads arrive whole and unchanged.
        """
        if not kernel_splice_available():
            raise SkipTest("splice(2) does not work on this kernel")
        size = 8 * MIB
        deployment = self.deployment(size, "max_pipes = 2\n")
        pool = deployment.proxy.splicer.pool
        release = threading.Event()
        self.addCleanup(release.set)
        first_arrived, second_arrived = threading.Event(), threading.Event()
        first = self.held_download(deployment, first_arrived, release)
        self.assertTrue(await e2e.wait_for(first_arrived.is_set, 20), "no hello line")
        second = self.held_download(deployment, second_arrived, release)
        self.assertTrue(await e2e.wait_for(second_arrived.is_set, 20), "no hello line")
        self.assertEqual(deployment.metric("shardtcp_connections_spliced_total", listener="edge",
                                           service="api", shard="api-fra-1"), 2.0)
        self.assertEqual(self.kernel_spliced(deployment), 1.0)
        self.assertEqual(pool.in_use, 2)
        release.set()
        for d in (first, second):
            _, count, received_hash, clean, _, _ = await d
            self.assertEqual((count, received_hash, clean), (size, pattern_sha256(size), True))
        self.assertTrue(await e2e.wait_for(lambda: deployment.proxy_connections() == 0, 10))
        self.assertEqual(pool.in_use, 0)

    async def test_userspace_switch(self):
        """
        ``[proxy] splice = "userspace"``: the proxy builds no kernel
        splicer, the half-close echo exchange still arrives whole, and no
        connection is counted as kernel-spliced.
        """
        deployment = Deployment(self, reactor)
        deployment.add_shard("api-fra-1", FRANKFURT, "hello")
        self.start(deployment, 'splice = "userspace"\n')
        self.assertIsNone(deployment.proxy.splicer)
        payload = os.urandom(64 * 1024)
        got = await deferToThread(e2e.half_close_exchange, deployment.port(), deployment.ca_path, payload)
        bye = f"BYE {len(payload)} {e2e.sha256_hex(payload)}\n".encode()
        self.assertEqual(got["data"], payload + bye)
        self.assertEqual(self.kernel_spliced(deployment), 0.0)
        self.assertEqual(deployment.metric("shardtcp_connections_spliced_total", listener="edge",
                                           service="api", shard="api-fra-1"), 1.0)


class ShardHalfCloseTests(TestCase):
    """A TLS shard's close_notify and FIN pass through to the client as a half-close."""

    timeout = 30

    async def _exchange(self, splice: str):
        deployment = Deployment(self, reactor)
        cert = deployment.ca.issue_server([SERVICE_NAME], common_name="api-fra-1").write(
            deployment.cert_dir, "api-fra-1"
        )
        shard = HalfClosingShard(self, deployment, "api-fra-1", cert)
        port = start_proxy(
            deployment, e2e.listener_toml("passthrough") + e2e.service_toml([("api-fra-1", shard.port, "")]), splice
        )
        await run_half_close(self, shard, half_close_tls_client, port, deployment.ca_path)

    async def test_userspace_splice(self):
        """
        Userspace splice: the client gets the shard's answer and close_notify,
        then still sends bytes the shard reads before the client's EOF.
        """
        await self._exchange("userspace")

    async def test_kernel_splice_or_fallback(self):
        """With ``splice = "auto"`` the same exchange holds."""
        await self._exchange("auto")
