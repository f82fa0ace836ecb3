"""
TLS termination, client certificates, TLS origination to shards and PROXY
headers from a trusted load balancer, with real clients (Python's ssl and
``openssl s_client``) over loopback, against reference shards that verify
every PolicyContext.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.e2e.harness import SERVICE_NAME as NAME
from tests.e2e.harness import EdgeFixture as Fixture
from tests.e2e.harness import half_close_exchange, run_child, sha256_hex
from tests.e2e.harness import service_toml as _service
from tests.e2e.harness import terminate_listener_toml as _terminate_listener
from tests.e2e.harness import tls_client
from tests.e2e.test_plain_halfclose import HalfClosingShard, run_half_close, start_proxy
from tests.e2e.test_plain_halfclose import tls_client as half_close_tls_client


async def _s_client(case, port, *args, data=b"ping\n"):
    child = await run_child(
        case, ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *args], stdin=data
    )
    return child.out.decode("utf-8", "replace") + child.err.decode("utf-8", "replace")


class TerminateTests(TestCase):
    """mode = "terminate": certificates per SNI, ALPN, client certificates."""

    timeout = 60

    def setUp(self):
        self.fx = Fixture(self)
        # "source:0": the hello line, then the shard closes, so that
        # openssl s_client (which ignores its stdin's EOF) ends too.
        self.shard_port = self.fx.start_shard("api-1", behaviour="source:0")

    def start(self, listener_extra="", policy=""):
        return self.fx.proxy(
            _terminate_listener(listener_extra) + _service([("api-1", self.shard_port, "")], policy=policy)
        )

    async def test_terminated_without_client_cert(self):
        """
        The client sees the proxy's certificate for its SNI; the shard sees
        enc=tls, amr=none, and the negotiated ALPN in the ALPN TLV.
        """
        port = self.start('alpn = ["h2", "http/1.1"]')
        cn, alpn, line = await deferToThread(
            tls_client, port, cafile=self.fx.server_ca_path, alpn=["http/1.1", "h2"]
        )
        self.assertEqual(cn, NAME)
        self.assertEqual(alpn, "h2")
        self.assertTrue(line.startswith(b"SHARD api-1 "), line)
        self.assertIn(b" enc=tls amr=none ", line)
        verified = self.fx.shards["api-1"].connections[-1]
        self.assertEqual(verified.alpn, b"h2")
        self.assertEqual(verified.ssl.version, "TLSv1.3")
        self.assertEqual(verified.ssl.client, 0x01)
        self.assertIsNone(verified.subject)

    async def test_client_certificate_gives_mtls(self):
        """
        A verified client certificate makes enc=mtls, amr=mtls and sub the
        certificate's SAN URI; the SSL TLV carries CN, version and cipher.
        """
        port = self.start('client_ca = "client-ca.pem"')
        cert = self.fx.client_cert()
        _, _, line = await deferToThread(tls_client, port, cafile=self.fx.server_ca_path, cert=cert)
        self.assertIn(b" enc=mtls amr=mtls ", line)
        self.assertIn(b" sub=spiffe://example.test/orders", line)
        verified = self.fx.shards["api-1"].connections[-1]
        self.assertEqual(verified.subject, "spiffe://example.test/orders")
        self.assertEqual(verified.ssl.cn, "orders-client")
        self.assertEqual(verified.ssl.verify, 0)
        self.assertEqual(verified.ssl.client & 0x03, 0x03)
        self.assertTrue(verified.ssl.cipher)

    async def test_openssl_with_and_without_client_certificate(self):
        """``openssl s_client`` reaches the shard with and without a client certificate."""
        port = self.start('client_ca = "client-ca.pem"')
        cert, key = self.fx.client_cert()
        out = await _s_client(
            self, port, "-servername", NAME, "-CAfile", self.fx.server_ca_path, "-cert", cert, "-key", key
        )
        self.assertIn("SHARD api-1 ", out)
        self.assertIn("enc=mtls amr=mtls", out)
        self.assertIn("Verify return code: 0 (ok)", out)
        out = await _s_client(self, port, "-servername", NAME, "-CAfile", self.fx.server_ca_path)
        self.assertIn("enc=tls amr=none", out)

    async def test_certificate_from_another_ca_refused(self):
        """A client certificate from another CA fails the handshake with unknown_ca."""
        port = self.start('client_ca = "client-ca.pem"')
        cert, key = self.fx.client_cert(self.fx.other_ca)
        out = await _s_client(
            self, port, "-servername", NAME, "-CAfile", self.fx.server_ca_path, "-cert", cert, "-key", key
        )
        self.assertNotIn("SHARD api-1", out)
        self.assertIn("unknown ca", out.lower())
        self.assertEqual(self.fx.shards["api-1"].connections, [])
        self.assertEqual(self.fx.rejected("tls_handshake"), 1.0)

    async def test_expired_certificate_refused(self):
        """An expired client certificate fails the handshake with certificate_expired."""
        port = self.start('client_ca = "client-ca.pem"')
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
        cert, key = self.fx.client_cert(not_after=past)
        out = await _s_client(
            self, port, "-servername", NAME, "-CAfile", self.fx.server_ca_path, "-cert", cert, "-key", key
        )
        self.assertNotIn("SHARD api-1", out)
        self.assertIn("certificate expired", out.lower())

    async def test_service_requiring_mtls_refuses_client_without_cert(self):
        """authentication = "mtls": no certificate, no connection (certificate_required alert)."""
        port = self.start('client_ca = "client-ca.pem"', policy='authentication = "mtls"')
        with self.assertRaises(ssl.SSLError) as raised:
            await deferToThread(tls_client, port, cafile=self.fx.server_ca_path)
        self.assertIn("CERTIFICATE_REQUIRED", str(raised.exception).upper())
        self.assertEqual(self.fx.shards["api-1"].connections, [])
        cert = self.fx.client_cert()
        _, _, line = await deferToThread(tls_client, port, cafile=self.fx.server_ca_path, cert=cert)
        self.assertIn(b" enc=mtls amr=mtls ", line)

    async def test_unknown_sni_gets_default_certificate(self):
        """Without strict_sni, a name outside the list gets default_certificate (and routes by default_service)."""
        port = self.start(
            'default_certificate = { cert = "default.pem", key = "default.key" }\ndefault_service = "api"'
        )
        cn, _, line = await deferToThread(tls_client, port, server_name=None)
        self.assertEqual(cn, "default.example.test")
        self.assertTrue(line.startswith(b"SHARD api-1 "))

    async def test_strict_sni_refuses_unknown_name(self):
        """strict_sni = true: a name without a certificate gets an unrecognized_name alert."""
        port = self.fx.proxy(
            _terminate_listener(
                'strict_sni = true\ndefault_certificate = { cert = "default.pem", key = "default.key" }'
            )
            + _service([("api-1", self.shard_port, "")])
            + '[service.other]\nnames = ["other.example.test"]\n'
            + f'[[service.other.shard]]\nid = "other-1"\naddress = "127.0.0.1:{self.shard_port}"\n'
        )
        with self.assertRaises(ssl.SSLError) as raised:
            await deferToThread(tls_client, port, server_name="other.example.test")
        self.assertIn("UNRECOGNIZED_NAME", str(raised.exception).upper())
        self.assertEqual(self.fx.rejected("no_certificate"), 1.0)


class UpstreamTLSTests(TestCase):
    """upstream_tls: the hop to the shard is TLS, verified with service-identity."""

    timeout = 60

    async def test_upstream_tls_verified_and_wrong_name_skipped(self):
        """
        A shard whose certificate does not match its server_name counts as a
        failed attempt (a security event) and the next shard serves; the
        PROXY header still reached the good shard in clear before TLS.
        """
        fx = Fixture(self)
        bad = fx.start_shard("api-bad", tls_names=["somebody-else.shards.test"])
        good = fx.start_shard("api-good", tls_names=["api-good.shards.test"])
        port = fx.proxy(
            _terminate_listener()
            + _service(
                [
                    ("api-bad", bad, 'server_name = "api-bad.shards.test"\nsecurity_score = 100'),
                    ("api-good", good, 'server_name = "api-good.shards.test"\nsecurity_score = 60'),
                ],
                upstream='upstream_tls = true\nupstream_ca = "certs/ca.pem"',
            )
        )
        _, _, line = await deferToThread(tls_client, port, cafile=fx.server_ca_path)
        self.assertTrue(line.startswith(b"SHARD api-good "), line)
        self.assertEqual(
            fx.service.metrics.value(
                "shardtcp_upstream_connect_failures_total", service="api", shard="api-bad", reason="tls_verify"
            ),
            1.0,
        )
        # The header went out in clear before TLS, so the bad shard verified
        # it, but not one application byte crossed the failed handshake.
        self.assertEqual(fx.shards["api-bad"].counts["bytes_received"], 0)


class AcceptProxyTests(TestCase):
    """accept_proxy: a PROXY header from a trusted load balancer names the client."""

    timeout = 60

    async def test_trusted_and_untrusted(self):
        """
        From a trusted network the header's source becomes the client the
        shard sees; from an untrusted one the connection is closed unread.
        """
        fx = Fixture(self)
        shard_port = fx.start_shard("api-1")
        port = fx.proxy(
            _terminate_listener('accept_proxy = true\ntrusted_proxies = ["127.0.0.0/30"]')
            + _service([("api-1", shard_port, "")])
        )

        def through_lb(source):
            context = ssl.create_default_context(cafile=fx.server_ca_path)
            with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as raw:
                raw.sendall(b"PROXY TCP4 203.0.113.5 127.0.0.1 40000 443\r\n")
                try:
                    with context.wrap_socket(raw, server_hostname=NAME) as tls:
                        return tls.recv(4096)
                except (ssl.SSLError, OSError) as e:
                    return repr(e).encode()

        line = await deferToThread(through_lb, "127.0.0.2")
        self.assertTrue(line.startswith(b"SHARD api-1 client=203.0.113.5:40000 "), line)
        line = await deferToThread(through_lb, "127.0.0.9")
        self.assertNotIn(b"SHARD", line)
        self.assertEqual(fx.rejected("untrusted_proxy"), 1.0)


class ShardHalfCloseTests(TestCase):
    """A plain shard's FIN reaches a terminated client as close_notify and a half-close."""

    timeout = 30

    async def test_shard_half_close_reaches_client(self):
        """
        The shard answers, then shuts its write side down while reading: the
        client gets the answer and a close_notify, then sends more, which the
        shard reads before the client's own close_notify and EOF.
        """
        fx = Fixture(self)
        shard = HalfClosingShard(self, fx.deployment, "api-1")
        port = start_proxy(
            fx.deployment, _terminate_listener() + _service([("api-1", shard.port, "")]), "userspace"
        )
        await run_half_close(self, shard, half_close_tls_client, port, fx.server_ca_path)


class UpstreamTLSHalfCloseTests(TestCase):
    """upstream_tls: a close_notify is a half-close on the hop to the shard, both ways."""

    timeout = 30

    def _service(self, fx, port: int) -> str:
        return _service(
            [("api-1", port, 'server_name = "api-1.shards.test"')],
            upstream='upstream_tls = true\nupstream_ca = "certs/ca.pem"',
        )

    async def test_shard_half_close_reaches_client(self):
        """
        A TLS shard answers, then sends close_notify and FIN while reading:
        the client gets the answer and a close_notify, then sends more,
        which the shard reads before the client's own EOF.
        """
        fx = Fixture(self)
        cert = fx.deployment.ca.issue_server(["api-1.shards.test"], common_name="api-1").write(
            fx.deployment.cert_dir, "api-1"
        )
        shard = HalfClosingShard(self, fx.deployment, "api-1", cert)
        port = start_proxy(fx.deployment, _terminate_listener() + self._service(fx, shard.port), "userspace")
        await run_half_close(self, shard, half_close_tls_client, port, fx.server_ca_path)

    async def test_client_half_close_reaches_shard(self):
        """
        The client sends 64 KiB then close_notify and FIN: the ``hello``
        shard sees a half-close (not the end of the connection) and its
        echo and ``BYE <count> <sha256>`` still reach the client.
        """
        fx = Fixture(self)
        shard_port = fx.start_shard("api-1", tls_names=["api-1.shards.test"])
        port = start_proxy(fx.deployment, _terminate_listener() + self._service(fx, shard_port), "userspace")
        payload = os.urandom(64 * 1024)
        got = await deferToThread(half_close_exchange, port, fx.server_ca_path, payload)
        self.assertTrue(got["hello"].startswith(b"SHARD api-1 "), got["hello"])
        bye = f"BYE {len(payload)} {sha256_hex(payload)}\n".encode()
        self.assertEqual(got["data"], payload + bye)
        self.assertTrue(got["clean"], "the client's TLS stream did not end with close_notify")
        self.assertEqual(fx.shards["api-1"].counts["half_closed"], 1)
