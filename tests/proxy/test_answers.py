"""
How a listener without TLS answers: an HTTP-only port answers bytes it
cannot read with ``400 Bad Request``; a listener that identifies nothing
(``identify = []``) routes every connection to its default service.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from shardtcp import proxyv2
from shardtcp.identify.detect import AnswerProtocol, Detector, IdentifyError
from shardtcp.model import ListenerConfig

from tests.proxy.test_listener import Harness


class HttpOnlyPortTests(SynchronousTestCase):
    """A port identifying only connect / http-host speaks HTTP to what it cannot read."""

    def test_detector_answers_http(self) -> None:
        """Unrecognised bytes are refused in HTTP on HTTP-only ports, in nothing elsewhere."""
        for methods, expected in (
            (("connect",), AnswerProtocol.HTTP),
            (("http-host",), AnswerProtocol.HTTP),
            (("connect", "http-host"), AnswerProtocol.HTTP),
            (("connect", "line"), AnswerProtocol.NONE),
            (("sni", "http-host"), AnswerProtocol.NONE),
        ):
            with self.assertRaises(IdentifyError) as caught:
                Detector(methods).feed(b"\x00\x01\x02\x03\x04\x05\x06\x07")
            self.assertEqual(caught.exception.protocol, expected, methods)
            self.assertEqual(caught.exception.reason, "unrecognized")

    def test_400_on_the_wire(self) -> None:
        """An HTTP-only listener writes a 400 status line, then closes; counted as unrecognized."""
        h = Harness(listener=ListenerConfig(name="edge", listen="tcp:0", mode="plain", identify=("connect", "http-host")))
        protocol, transport = h.connect_client()
        protocol.dataReceived(b"\x16\x03\x01garbage")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"), transport.value())
        self.assertIn(b"X-Shardtcp-Reason: unrecognized\r\n", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.rejected("unrecognized"), 1.0)

    def test_eof_before_method(self) -> None:
        """A client closing before its first bytes decide a method also gets the 400."""
        h = Harness(listener=ListenerConfig(name="edge", listen="tcp:0", mode="plain", identify=("http-host",)))
        protocol, transport = h.connect_client()
        protocol.dataReceived(b"GE")
        protocol.readConnectionLost()
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))


class NoIdentifyTests(SynchronousTestCase):
    """identify = [] with a default_service: every connection goes to that service."""

    def listener(self) -> ListenerConfig:
        return ListenerConfig(name="edge", listen="tcp:0", mode="plain", identify=(), default_service="api")

    def test_connects_without_bytes(self) -> None:
        """
        The shard is connected as soon as the client is accepted (a
        server-speaks-first protocol sends nothing first), and the header
        names the default service.
        """
        h = Harness(listener=self.listener())
        protocol, transport = h.connect_client()
        self.assertEqual(len(h.connector.attempts), 1)
        self.assertEqual(transport.producerState, "paused")
        shard = h.connector.attempts[0][0].shard_id
        _, up = h.connector.succeed()
        header, rest = proxyv2.parse(up.value())
        self.assertEqual(rest, b"")
        self.assertEqual(h.verifier(shard).verify(header).service, "api")
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(h.rejected("unrecognized"), 0.0)

    def test_bytes_while_connecting_forwarded(self) -> None:
        """Bytes that arrive while the shard is being connected reach it unchanged, first."""
        h = Harness(listener=self.listener())
        protocol, _ = h.connect_client()
        protocol.dataReceived(b"\x00\x01any bytes at all")
        _, up = h.connector.succeed()
        _, rest = proxyv2.parse(up.value())
        self.assertEqual(rest, b"\x00\x01any bytes at all")
