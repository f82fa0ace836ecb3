"""
Preambles over loopback with real clients: curl through HTTP CONNECT, curl
routed by Host, ``openssl s_client -proxy``, the ``SHARD`` line, detection
of the method on one port, and every refusal's exact answer.
"""

from __future__ import annotations

import socket

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.e2e.harness import SERVICE_NAME as NAME
from tests.e2e.harness import EdgeFixture as Fixture
from tests.e2e.harness import exchange_until_close, free_port, run_child
from tests.e2e.harness import listener_toml as _listener
from tests.e2e.harness import service_toml as _service


async def _run(case, cmd, data=b"", timeout=20):
    child = await run_child(case, cmd, stdin=data, timeout=timeout)
    return child.status, child.out.decode("utf-8", "replace"), child.err.decode("utf-8", "replace")


def _exchange(port, data: bytes) -> bytes:
    """Send ``data`` raw, read until the proxy closes."""
    return exchange_until_close(port, data)


class PreambleTests(TestCase):
    """identify = connect / line / http-host, alone and together."""

    timeout = 60

    def setUp(self):
        self.fx = Fixture(self)
        # "source:0" answers with the hello line and closes: curl and
        # s_client then end by themselves.
        self.tls_shard = self.fx.start_shard("api-1", tls_names=[NAME], behaviour="source:0")

    def plain_proxy(self, identify, *, extra="", policy="", shard_port=None):
        plain_shard = shard_port or self.fx.start_shard("api-plain", behaviour="source:0")
        return self.fx.proxy(
            _listener("plain", f"identify = {identify}\n{extra}")
            + _service([("api-plain", plain_shard, "")], policy=policy)
        )

    async def test_curl_connect(self):
        """
        ``curl -p -x`` tunnels through CONNECT: 200 once the shard is
        connected, then TLS end to end with the shard's own certificate.
        """
        port = self.fx.proxy(
            _listener("plain", 'identify = ["connect"]') + _service([("api-1", self.tls_shard, "")])
        )
        code, out, err = await _run(
            self,
            ["curl", "-sv", "--http0.9", "-p", "-x", f"http://127.0.0.1:{port}",
             "--cacert", self.fx.shard_ca_path, f"https://{NAME}/"],
        )
        self.assertIn("HTTP/1.1 200 Connection established", err)
        self.assertIn("CN=api-1", err.replace(" = ", "="))
        self.assertIn("SHARD api-1 ", out)
        self.assertIn("sni=- enc=none", out)
        verified = self.fx.shards["api-1"].connections[-1]
        self.assertEqual(verified.header.authority, f"{NAME}:443")

    async def test_openssl_s_client_proxy(self):
        """``openssl s_client -proxy`` (HTTP/1.0 CONNECT without Host) is tunnelled."""
        port = self.fx.proxy(
            _listener("plain", 'identify = ["connect"]') + _service([("api-1", self.tls_shard, "")])
        )
        code, out, err = await _run(
            self,
            ["openssl", "s_client", "-proxy", f"127.0.0.1:{port}", "-connect", f"{NAME}:443",
             "-servername", NAME, "-CAfile", self.fx.shard_ca_path, "-ign_eof"],
        )
        self.assertIn("SHARD api-1 ", out)
        self.assertIn("Verify return code: 0 (ok)", out)

    async def test_curl_routed_by_host(self):
        """A plain HTTP request is routed by its Host header and reaches the shard unchanged."""
        port = self.plain_proxy('["http-host"]')
        code, out, err = await _run(
            self, ["curl", "-s", "--http0.9", "-H", f"Host: {NAME}", f"http://127.0.0.1:{port}/path?q=1"]
        )
        self.assertIn("SHARD api-plain ", out)
        verified = self.fx.shards["api-plain"].connections[-1]
        self.assertEqual(verified.header.authority, NAME)
        self.assertEqual(verified.policy.encryption_level, "none")

    async def test_line_preamble(self):
        """``SHARD api`` names the service by id; the line itself is not forwarded."""
        port = self.plain_proxy('["line"]')
        answer = await deferToThread(_exchange, port, b"SHARD api\r\n")
        self.assertTrue(answer.startswith(b"SHARD api-plain "), answer)

    async def test_one_port_detects_each_method(self):
        """identify = ["sni", "connect", "http-host", "line"] on one passthrough port."""
        plain = self.fx.start_shard("api-plain", behaviour="source:0")
        port = self.fx.proxy(
            _listener("passthrough", 'identify = ["sni", "connect", "http-host", "line"]')
            + _service([("api-plain", plain, "")])
        )
        line = await deferToThread(_exchange, port, b"SHARD api\r\n")
        self.assertTrue(line.startswith(b"SHARD api-plain "))
        get = await deferToThread(_exchange, port, f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
        self.assertTrue(get.startswith(b"SHARD api-plain "))
        connect = await deferToThread(_exchange, port, f"CONNECT {NAME}:443 HTTP/1.1\r\n\r\n".encode())
        self.assertTrue(connect.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nSHARD api-plain "))

    async def test_refusals(self):
        """Each refusal gets its exact status line or ERR line, and is counted."""
        dead_port = free_port()
        port = self.fx.proxy(
            _listener("plain", 'identify = ["connect", "http-host", "line"]\npeek_timeout = "1s"\nretries = 0')
            + _service([("api-plain", self.fx.start_shard("api-plain", behaviour="source:0"), "")],
                       policy='deny = ["127.0.0.2/32"]')
            + '[service.dead]\nnames = ["dead.example.test"]\n'
            + f'[[service.dead.shard]]\nid = "dead-1"\naddress = "127.0.0.1:{dead_port}"\n'
        )

        def status(raw):
            return raw.split(b"\r\n", 1)[0]

        self.assertEqual(
            status(await deferToThread(_exchange, port, b"CONNECT nosuch.example.test:443 HTTP/1.1\r\n\r\n")),
            b"HTTP/1.1 404 Not Found",
        )
        self.assertEqual(
            status(await deferToThread(_exchange, port, b"CONNECT bad host HTTP/1.1\r\n\r\n")),
            b"HTTP/1.1 400 Bad Request",
        )
        self.assertEqual(
            status(await deferToThread(_exchange, port, b"CONNECT dead.example.test:443 HTTP/1.1\r\n\r\n")),
            b"HTTP/1.1 503 Service Unavailable",
        )
        self.assertEqual(
            status(await deferToThread(_exchange, port, b"CONNECT api.exam")), b"HTTP/1.1 408 Request Timeout"
        )
        self.assertEqual(
            status(await deferToThread(_exchange, port, b"GET / HTTP/1.1\r\n\r\n")), b"HTTP/1.1 400 Bad Request"
        )
        self.assertEqual(await deferToThread(_exchange, port, b"SHARD nosuch\r\n"), b"ERR unknown_service\r\n")
        self.assertEqual(
            status(await deferToThread(_exchange, port, b"CONNECT api.example.test:443 HTTP/1.1\r\n" + b"X: " + b"y" * 9000)),
            b"HTTP/1.1 431 Request Header Fields Too Large",
        )
        self.assertEqual(self.fx.rejected("unknown_service"), 2.0)
        self.assertEqual(self.fx.rejected("shard_unreachable"), 1.0)
        self.assertEqual(self.fx.rejected("peek_timeout"), 1.0)

    async def test_denied_client_gets_403(self):
        """A client the service's deny list names gets 403 from CONNECT."""

        def from_denied():
            with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)) as s:
                s.sendall(f"CONNECT {NAME}:443 HTTP/1.1\r\n\r\n".encode())
                return s.recv(4096)

        port = self.plain_proxy('["connect"]', policy='deny = ["127.0.0.2/32"]')
        answer = await deferToThread(from_denied)
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 Forbidden\r\n"), answer)
        self.assertEqual(self.fx.rejected("denied"), 1.0)

    async def test_encryption_required_refuses_plain(self):
        """encryption = "tls": a plain listener cannot reach the service (ERR policy_encryption)."""
        port = self.plain_proxy('["line"]', policy='encryption = "tls"')
        answer = await deferToThread(_exchange, port, b"SHARD api\r\n")
        self.assertEqual(answer, b"ERR policy_encryption\r\n")
        self.assertEqual(self.fx.rejected("policy_encryption"), 1.0)
