"""
Tests for shardtcp.tlslayer: half-close both ways over real TLS handshakes
pumped in memory (twisted.test.iosim), and no use of OpenSSL's connection
once the layer has lost it.
"""

from __future__ import annotations

from twisted.internet import ssl
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from shardtcp.example.pki import CertificateAuthority
from shardtcp.tlslayer import HalfCloseTLSFactory, HalfCloseTLSProtocol

NAME = "shard.tlslayer.test"


@implementer(IHalfCloseableProtocol)
class _Recorder(Protocol):
    """Records bytes, half-closes and the end of the connection."""

    def __init__(self) -> None:
        self.received = b""
        self.read_closed = 0
        self.lost = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.read_closed += 1

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


class _One(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


class HalfCloseTests(SynchronousTestCase):
    """``loseWriteConnection`` sends close_notify and a TCP half-close; reading goes on."""

    def setUp(self) -> None:
        ca = CertificateAuthority()
        issued = ca.issue_server([NAME])
        cert = ssl.PrivateCertificate.loadPEM(issued.cert_pem + issued.key_pem)
        server_options = ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original)
        client_options = ssl.optionsForClientTLS(NAME, trustRoot=ssl.Certificate.loadPEM(ca.cert_pem))
        self.clock = Clock()
        self.server_app, self.client_app = _Recorder(), _Recorder()
        self.server = HalfCloseTLSFactory(server_options, False, _One(self.server_app), clock=self.clock).buildProtocol(None)
        self.client = HalfCloseTLSFactory(client_options, True, _One(self.client_app), clock=self.clock).buildProtocol(None)
        self.server_io = iosim.makeFakeServer(self.server)
        self.client_io = iosim.makeFakeClient(self.client)
        self.pump = iosim.connect(self.server, self.server_io, self.client, self.client_io, clock=self.clock)
        # iosim's transports ignore loseWriteConnection: count the calls.
        self.tcp_half_closes = []
        self.server_io.loseWriteConnection = lambda: self.tcp_half_closes.append("server")
        self.client_io.loseWriteConnection = lambda: self.tcp_half_closes.append("client")

    def test_interfaces(self) -> None:
        """The layer is an ``IHalfCloseableProtocol`` to the transport below it."""
        self.assertIsInstance(self.server, HalfCloseTLSProtocol)
        self.assertTrue(verifyObject(IHalfCloseableProtocol, self.server))

    def test_half_close_then_keep_reading(self) -> None:
        """
        The server writes, half-closes and writes again: the client gets the
        first bytes then a half-close (one TCP ``shutdown`` from the server,
        none from the client) and not the late bytes; the client's bytes
        still reach the server, then the client's own half-close; the
        server's ``loseConnection`` then ends both cleanly.
        """
        self.server_app.transport.write(b"reply")
        self.server.loseWriteConnection()
        self.server.loseWriteConnection()  # a second call changes nothing
        self.server_app.transport.write(b"late")
        self.pump.flush()
        self.assertEqual(self.client_app.received, b"reply")
        self.assertEqual(self.client_app.read_closed, 1)
        self.assertEqual(self.tcp_half_closes, ["server"])
        self.assertEqual(self.client_app.lost, [])

        self.client_app.transport.write(b"more from the client")
        self.pump.flush()
        self.assertEqual(self.server_app.received, b"more from the client")
        self.assertEqual(self.server_app.read_closed, 0)

        self.client.loseWriteConnection()
        self.pump.flush()
        self.assertEqual(self.server_app.read_closed, 1)
        self.assertEqual(self.tcp_half_closes, ["server", "client"])
        self.assertEqual(self.server_app.lost, [])

        self.server.loseConnection()
        self.pump.flush()
        self.assertEqual(len(self.server_app.lost), 1)
        self.assertTrue(self.server_app.lost[0].check(ConnectionDone))
        self.assertEqual(self.client_app.received, b"reply")

    def test_truncated_eof_after_half_close(self) -> None:
        """
        After our half-close, a TCP EOF without the peer's close_notify ends
        the connection; when the transport then reports the loss at once
        (as Twisted's TCP transport does once its write side is shut down),
        the layer no longer touches OpenSSL's released connection: no
        exception, one ``connectionLost``, no half-close delivered.
        """
        self.pump.flush()
        self.server.loseWriteConnection()
        self.pump.flush()
        self.server_io.loseConnection = lambda: self.server.connectionLost(Failure(ConnectionDone()))
        self.server.readConnectionLost()
        self.assertEqual(self.server_app.read_closed, 0)
        self.assertEqual(len(self.server_app.lost), 1)
        # Nothing more happens on later events either.
        self.server.readConnectionLost()
        self.server.loseWriteConnection()
        self.assertEqual(len(self.server_app.lost), 1)
