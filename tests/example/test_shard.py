"""
Tests for shardtcp.example.shard, the reference shard.

Most run in memory: a PROXY v2 header signed with a PolicySigner and encoded
with proxyv2 is fed, with data, to the factory's protocol over a
StringTransport, or over real TLS handshakes pumped by twisted.test.iosim.
A few run the shard as a process (``python -m shardtcp.example.shard``) over
loopback sockets.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl as stdlib_ssl
import subprocess
import sys
import time
from typing import Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from shardtcp import proxyv2
from shardtcp.backend import ShardVerifier
from shardtcp.keys import jwks_document
from shardtcp.example.pki import CertificateAuthority
from shardtcp.policy import PolicyContext, PolicySigner, new_connection_id
from shardtcp.proxyv2 import PP2_TYPE_AUTHORITY, PP2_TYPE_UNIQUE_ID, Command, ProxyHeader
from shardtcp.example.shard import (
    Behaviour,
    HalfCloseTLSProtocol,
    ShardFactory,
    hello_line,
    parse_behaviour,
    pattern_bytes,
    pattern_sha256,
    shard_factory,
)

NOW = 1_800_000_000.0
SHARD = "api-fra-1"
CLIENT = ("192.0.2.7", 50123)
PROXY = ("198.51.100.1", 443)
# Where the shard sees the TCP connection come from: the proxy, not the client.
PROXY_SIDE = IPv4Address("TCP", "10.0.0.5", 40000)
SHARD_SIDE = IPv4Address("TCP", "10.0.0.9", 9001)
POLICY = PolicyContext("tls", ("none",), ("orders:read", "orders:write"))


def fixed_now() -> float:
    """The tests' wall clock: a fixed instant."""
    return NOW


class Keys:
    """A policy-signing key with its signer and a verifier for SHARD that trusts it."""

    def __init__(self, kid: str = "policy-1") -> None:
        self.private = Ed25519PrivateKey.generate()
        self.kid = kid
        self.signer = PolicySigner(self.private, kid=kid, issuer="edge-test", ttl=30, now=fixed_now)

    def verifier(self, shard_id: str = SHARD) -> ShardVerifier:
        """A verifier for ``shard_id`` trusting this key, on the fixed clock."""
        return ShardVerifier(shard_id, {self.kid: self.private.public_key()}, now=fixed_now)

    def header(
        self,
        *,
        audience: str = SHARD,
        source: tuple = CLIENT,
        destination: tuple = PROXY,
        service: str = "api",
        sni: Optional[str] = "api.example.test",
        subject: Optional[str] = None,
        policy: PolicyContext = POLICY,
        connection_id: Optional[str] = None,
    ) -> bytes:
        """The PROXY v2 header shardtcp would send for one connection."""
        cid = connection_id if connection_id is not None else new_connection_id()
        token = self.signer.sign(
            policy=policy,
            audience=audience,
            connection_id=cid,
            service=service,
            source=source,
            destination=destination,
            subject=subject,
            sni=sni,
        )
        tlvs = []
        if sni is not None:
            tlvs.append((PP2_TYPE_AUTHORITY, sni.encode("utf-8")))
        tlvs += [(PP2_TYPE_UNIQUE_ID, cid.encode("ascii")), (0xE0, token)]
        return proxyv2.encode(
            ProxyHeader(command=Command.PROXY, source=source, destination=destination, tlvs=tlvs)
        )


class RecordingTransport(StringTransport):
    """A StringTransport that tells an abort from a clean close."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class PausingTransport(RecordingTransport):
    """
    A StringTransport whose buffer holds ``limit`` bytes: beyond that it
    pauses its streaming producer, as a TCP transport with a full send
    buffer does.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(hostAddress=SHARD_SIDE, peerAddress=PROXY_SIDE)
        self.limit = limit

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) >= self.limit and self.producer is not None and self.streaming:
            self.producer.pauseProducing()


def connect(factory: ShardFactory, transport: Optional[StringTransport] = None):
    """Accept one in-memory connection on ``factory``; return its protocol and transport."""
    protocol = factory.buildProtocol(PROXY_SIDE)
    if transport is None:
        transport = RecordingTransport(hostAddress=SHARD_SIDE, peerAddress=PROXY_SIDE)
    protocol.makeConnection(transport)
    return protocol, transport


def bye(data: bytes, word: bytes = b"BYE") -> bytes:
    """The line a shard writes on half-close after receiving ``data``."""
    return word + b" %d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode())


class PatternTests(SynchronousTestCase):
    """The source:N byte pattern."""

    def test_pattern(self) -> None:
        """Byte i of the pattern is i % 251, from any offset."""
        self.assertEqual(pattern_bytes(600), bytes(i % 251 for i in range(600)))
        self.assertEqual(pattern_bytes(10, offset=250), bytes(i % 251 for i in range(250, 260)))
        self.assertEqual(pattern_bytes(0), b"")

    def test_long_pattern(self) -> None:
        """A pattern longer than the internal block still follows i % 251."""
        n = 251 * 256 * 2 + 99
        self.assertEqual(pattern_bytes(n), bytes(i % 251 for i in range(n)))

    def test_sha256(self) -> None:
        """pattern_sha256(n) is the SHA-256 of pattern_bytes(n)."""
        for n in (0, 1, 251 * 256, 251 * 256 * 3 + 7):
            self.assertEqual(pattern_sha256(n), hashlib.sha256(pattern_bytes(n)).hexdigest())


class BehaviourTests(SynchronousTestCase):
    """Parsing behaviour names."""

    def test_valid(self) -> None:
        """The five behaviours parse, with their counts."""
        self.assertEqual(parse_behaviour("hello"), Behaviour("hello"))
        self.assertEqual(parse_behaviour("sink"), Behaviour("sink"))
        self.assertEqual(parse_behaviour("http"), Behaviour("http"))
        self.assertEqual(parse_behaviour("source:1048576"), Behaviour("source", 1048576))
        self.assertEqual(parse_behaviour("die-after:0"), Behaviour("die-after", 0))
        self.assertEqual(str(parse_behaviour("die-after:5")), "die-after:5")

    def test_invalid(self) -> None:
        """Unknown names, missing or negative counts and counts on count-less kinds are refused."""
        for text in ("echo", "source", "source:", "source:-1", "source:x", "hello:3", "die-after"):
            self.assertRaises(ValueError, parse_behaviour, text)

    def test_factory_refuses_unknown(self) -> None:
        """shard_factory refuses an unknown behaviour at once, not on the first connection."""
        keys = Keys()
        self.assertRaises(ValueError, shard_factory, SHARD, keys.verifier(), behaviour="nope", reactor=Clock())


class HelloLineTests(SynchronousTestCase):
    """The hello line's exact bytes."""

    def test_hello_line(self) -> None:
        """The line names the shard and every verified fact; absent sub is '-'."""
        keys = Keys()
        factory = shard_factory(SHARD, keys.verifier(), reactor=Clock())
        _, transport = connect(factory)
        _.dataReceived(keys.header())
        self.assertEqual(
            transport.value(),
            b"SHARD api-fra-1 client=192.0.2.7:50123 service=api sni=api.example.test"
            b" enc=tls amr=none acl=orders:read,orders:write sub=-\n",
        )
        self.assertEqual(hello_line(SHARD, factory.connections[0]), transport.value())

    def test_shard_key_and_owned_keys(self) -> None:
        """
        A keyed connection's line ends with shk=<key>; with --owns-key globs
        a key matching one is served and another is refused (foreign_key,
        counted), as is a connection without a key (no_shard_key).
        """
        import attrs

        from shardtcp.example.shard import owned_keys

        keys = Keys()
        owns = owned_keys(["tenant4*", "vip"])
        self.assertIsNone(owned_keys(None))
        self.assertEqual([owns(k) for k in ("tenant42", "vip", "vip2", "tenant5")], [True, True, False, False])
        verifier = ShardVerifier(SHARD, {keys.kid: keys.private.public_key()}, now=fixed_now, owns_key=owns)
        factory = shard_factory(SHARD, verifier, reactor=Clock())
        protocol, transport = connect(factory)
        protocol.dataReceived(keys.header(policy=attrs.evolve(POLICY, shard_key="tenant42")))
        self.assertTrue(transport.value().endswith(b" sub=- shk=tenant42\n"), transport.value())
        for policy, reason in ((attrs.evolve(POLICY, shard_key="tenant5"), "foreign_key"), (POLICY, "no_shard_key")):
            protocol, transport = connect(factory)
            protocol.dataReceived(keys.header(policy=policy))
            self.assertEqual(transport.value(), b"")
            self.assertEqual(factory.stats[reason], 1)

    def test_ipv6_mtls_subject(self) -> None:
        """An IPv6 client is bracketed; mtls and the subject are shown; no SNI is '-'."""
        keys = Keys()
        factory = shard_factory(SHARD, keys.verifier(), reactor=Clock())
        protocol, transport = connect(factory)
        protocol.dataReceived(
            keys.header(
                source=("2001:db8::7", 50123),
                destination=("2001:db8::1", 443),
                sni=None,
                subject="spiffe://example.test/orders",
                policy=PolicyContext("mtls", ("mtls",), ()),
            )
        )
        self.assertEqual(
            transport.value(),
            b"SHARD api-fra-1 client=[2001:db8::7]:50123 service=api sni=-"
            b" enc=mtls amr=mtls acl= sub=spiffe://example.test/orders\n",
        )


class HelloTests(SynchronousTestCase):
    """The hello behaviour over plain TCP, in memory."""

    def setUp(self) -> None:
        self.keys = Keys()
        self.factory = shard_factory(SHARD, self.keys.verifier(), reactor=Clock())
        self.protocol, self.transport = connect(self.factory)
        self.hello = (
            b"SHARD api-fra-1 client=192.0.2.7:50123 service=api sni=api.example.test"
            b" enc=tls amr=none acl=orders:read,orders:write sub=-\n"
        )

    def test_echo_with_header(self) -> None:
        """Bytes sent in the same segment as the header are echoed after the hello line."""
        self.protocol.dataReceived(self.keys.header() + b"ping\n")
        self.assertEqual(self.transport.value(), self.hello + b"ping\n")

    def test_echo_byte_by_byte(self) -> None:
        """A header and data arriving one byte at a time give the same result."""
        for byte in self.keys.header() + b"abc":
            self.protocol.dataReceived(bytes([byte]))
        self.assertEqual(self.transport.value(), self.hello + b"abc")
        self.assertFalse(self.transport.disconnecting)

    def test_peer_is_client(self) -> None:
        """The application sees the client of the header as its peer, not the proxy."""
        self.protocol.dataReceived(self.keys.header())
        application_transport = self.protocol.wrappedProtocol.transport
        self.assertEqual(application_transport.getPeer(), IPv4Address("TCP", *CLIENT))

    def test_half_close(self) -> None:
        """After a half-close the shard writes BYE with the byte count and SHA-256, then closes."""
        self.protocol.dataReceived(self.keys.header() + b"hello ")
        self.protocol.dataReceived(b"world")
        self.assertTrue(IHalfCloseableProtocol.providedBy(self.protocol))
        self.assertFalse(self.transport.disconnecting)
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), self.hello + b"hello world" + bye(b"hello world"))
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.aborted)

    def test_half_close_without_data(self) -> None:
        """A half-close right after the header gives BYE 0 and the hash of nothing."""
        self.protocol.dataReceived(self.keys.header())
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), self.hello + bye(b""))

    def test_counts(self) -> None:
        """The factory records the verified connection and counts bytes, half-close and close."""
        self.protocol.dataReceived(self.keys.header(connection_id="c" * 24) + b"12345")
        self.assertEqual(self.factory.active, 1)
        self.protocol.readConnectionLost()
        self.protocol.connectionLost(None)
        self.assertEqual([c.connection_id for c in self.factory.connections], ["c" * 24])
        self.assertEqual(self.factory.connections[0].client, CLIENT)
        self.assertEqual(self.factory.counts["connections"], 1)
        self.assertEqual(self.factory.counts["bytes_received"], 5)
        self.assertEqual(self.factory.counts["bytes_sent"], len(self.hello) + 5 + len(bye(b"12345")))
        self.assertEqual(self.factory.counts["half_closed"], 1)
        self.assertEqual(self.factory.counts["closed"], 1)
        self.assertEqual(self.factory.active, 0)
        self.assertEqual(self.factory.stats["accepted"], 1)


class RefusalTests(SynchronousTestCase):
    """Connections the shard must not serve."""

    def setUp(self) -> None:
        self.keys = Keys()
        self.factory = shard_factory(SHARD, self.keys.verifier(), reactor=Clock())

    def assertRefused(self, data: bytes, reason: str) -> None:
        """Feeding ``data`` closes the connection with nothing written and counts ``reason``."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(data)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.factory.stats[reason], 1)

    def test_bad_crc(self) -> None:
        """A header whose CRC32C does not match is refused before the application sees it."""
        header = bytearray(self.keys.header())
        header[-1] ^= 0xFF
        self.assertRefused(bytes(header) + b"data", "bad_crc")
        self.assertEqual(self.factory.connections, [])
        self.assertEqual(self.factory.counts["connections"], 0)

    def test_not_proxy(self) -> None:
        """A connection that starts without a PROXY header gets nothing."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.factory.connections, [])

    def test_other_shard(self) -> None:
        """A token addressed to another shard is refused."""
        self.assertRefused(self.keys.header(audience="api-fra-2"), "wrong_audience")

    def test_untrusted_key(self) -> None:
        """A token signed by a key the shard does not trust is refused."""
        self.assertRefused(Keys(kid="policy-1").header(), "invalid_signature")

    def test_replay(self) -> None:
        """The same header a second time is refused as a replay."""
        header = self.keys.header()
        first, first_transport = connect(self.factory)
        first.dataReceived(header)
        self.assertNotEqual(first_transport.value(), b"")
        self.assertRefused(header, "replay")
        self.assertEqual(len(self.factory.connections), 1)

    def test_timeout(self) -> None:
        """A connection that sends no complete header is closed after the timeout."""
        clock = Clock()
        factory = shard_factory(SHARD, self.keys.verifier(), reactor=clock)
        protocol, transport = connect(factory)
        protocol.dataReceived(self.keys.header()[:10])
        clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")


class SinkTests(SynchronousTestCase):
    """The sink behaviour."""

    def test_sink(self) -> None:
        """A sink answers nothing until the half-close, then SINK with count and hash, and closes."""
        keys = Keys()
        factory = shard_factory(SHARD, keys.verifier(), reactor=Clock(), behaviour="sink")
        protocol, transport = connect(factory)
        payload = os.urandom(100_000)
        protocol.dataReceived(keys.header() + payload[:1000])
        for i in range(1000, len(payload), 4096):
            protocol.dataReceived(payload[i : i + 4096])
        self.assertEqual(transport.value(), b"")
        protocol.readConnectionLost()
        self.assertEqual(transport.value(), bye(payload, b"SINK"))
        self.assertTrue(transport.disconnecting)


class HTTPTests(SynchronousTestCase):
    """The http behaviour (the example's shards, read with curl)."""

    def setUp(self) -> None:
        self.keys = Keys()
        factory = shard_factory(SHARD, self.keys.verifier(), reactor=Clock(), behaviour="http")
        self.protocol, self.transport = connect(factory)

    def test_answers_once_the_head_is_complete(self) -> None:
        """Nothing before the blank line; then 200 with the hello line as body, and a close."""
        self.protocol.dataReceived(self.keys.header() + b"GET / HTTP/1.1\r\nHost: api.example.test\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.protocol.dataReceived(b"\r\n")
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
        self.assertIn(f"Content-Length: {len(body)}".encode(), head)
        self.assertTrue(body.startswith(b"SHARD api-fra-1 client=192.0.2.7:50123 service=api "), body)
        self.assertTrue(self.transport.disconnecting)

    def test_overlong_head_is_closed(self) -> None:
        """A head that never ends is closed after 64 KiB, unanswered."""
        self.protocol.dataReceived(self.keys.header() + b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 20000)
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)


class SourceTests(SynchronousTestCase):
    """The source:N behaviour."""

    def setUp(self) -> None:
        self.keys = Keys()

    def test_source(self) -> None:
        """A source writes the hello line, exactly N pattern bytes, then closes."""
        n = 251 * 256 * 3 + 17
        factory = shard_factory(SHARD, self.keys.verifier(), reactor=Clock(), behaviour=f"source:{n}")
        protocol, transport = connect(factory)
        protocol.dataReceived(self.keys.header())
        hello = hello_line(SHARD, factory.connections[0])
        self.assertEqual(transport.value(), hello + pattern_bytes(n))
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)

    def test_source_zero(self) -> None:
        """source:0 writes only the hello line and closes."""
        factory = shard_factory(SHARD, self.keys.verifier(), reactor=Clock(), behaviour="source:0")
        protocol, transport = connect(factory)
        protocol.dataReceived(self.keys.header())
        self.assertEqual(transport.value(), hello_line(SHARD, factory.connections[0]))
        self.assertTrue(transport.disconnecting)

    def test_flow_control(self) -> None:
        """A source stops writing when paused and carries on where it stopped when resumed."""
        n = 1_000_000
        factory = shard_factory(SHARD, self.keys.verifier(), reactor=Clock(), behaviour=f"source:{n}")
        transport = PausingTransport(limit=100_000)
        protocol, _ = connect(factory, transport)
        protocol.dataReceived(self.keys.header())
        producer = transport.producer
        verifyObject(IPushProducer, producer)
        received = b""
        rounds = 0
        while transport.producer is not None:
            rounds += 1
            self.assertLess(rounds, 100)
            # Paused with at most one block beyond the limit in the buffer.
            self.assertLess(len(transport.value()), 100_000 + 251 * 256 + 200)
            self.assertFalse(transport.disconnecting)
            received += transport.value()
            transport.clear()
            producer.resumeProducing()
        received += transport.value()
        hello = hello_line(SHARD, factory.connections[0])
        self.assertGreater(rounds, 5)
        self.assertEqual(received, hello + pattern_bytes(n))
        self.assertTrue(transport.disconnecting)

    def test_stopped(self) -> None:
        """A source whose connection is lost writes no more."""
        factory = shard_factory(SHARD, self.keys.verifier(), reactor=Clock(), behaviour="source:1000000")
        transport = PausingTransport(limit=10_000)
        protocol, _ = connect(factory, transport)
        protocol.dataReceived(self.keys.header())
        producer = transport.producer
        producer.stopProducing()
        protocol.connectionLost(None)
        transport.clear()
        producer.resumeProducing()
        self.assertEqual(transport.value(), b"")

    def test_half_close_keeps_sending(self) -> None:
        """A client's half-close does not stop a source mid-download."""
        factory = shard_factory(SHARD, self.keys.verifier(), reactor=Clock(), behaviour="source:500000")
        transport = PausingTransport(limit=10_000)
        protocol, _ = connect(factory, transport)
        protocol.dataReceived(self.keys.header())
        protocol.readConnectionLost()
        self.assertFalse(transport.disconnecting)
        received = transport.value()
        while transport.producer is not None:
            transport.clear()
            transport.producer.resumeProducing()
            received += transport.value()
        self.assertTrue(received.endswith(pattern_bytes(500000)[-1000:]))
        self.assertTrue(transport.disconnecting)


class DieAfterTests(SynchronousTestCase):
    """The die-after:N behaviour."""

    def setUp(self) -> None:
        self.keys = Keys()
        self.factory = shard_factory(SHARD, self.keys.verifier(), reactor=Clock(), behaviour="die-after:10")
        self.protocol, self.transport = connect(self.factory)
        self.protocol.dataReceived(self.keys.header())
        self.hello = hello_line(SHARD, self.factory.connections[0])

    def test_dies(self) -> None:
        """The shard echoes up to N bytes, then aborts rather than closing."""
        self.protocol.dataReceived(b"12345")
        self.assertFalse(self.transport.disconnecting)
        self.protocol.dataReceived(b"6789abcdef")
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.transport.value(), self.hello + b"123456789a")
        self.assertEqual(self.factory.counts["aborted"], 1)

    def test_nothing_after_death(self) -> None:
        """Bytes and a half-close after the abort get no answer."""
        self.protocol.dataReceived(b"x" * 10)
        self.transport.clear()
        self.protocol.dataReceived(b"more")
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), b"")

    def test_half_close_before(self) -> None:
        """A half-close before N bytes is answered as by hello."""
        self.protocol.dataReceived(b"abc")
        self.protocol.readConnectionLost()
        self.assertEqual(self.transport.value(), self.hello + b"abc" + bye(b"abc"))
        self.assertFalse(self.transport.aborted)


# ---------------------------------------------------------------------------
# TLS, in memory


class _Prefixed(Protocol):
    """Writes ``prefix`` (the PROXY header) in clear, then runs ``inner`` (TLS) on the same transport."""

    def __init__(self, prefix: bytes, inner: Protocol) -> None:
        self.prefix = prefix
        self.inner = inner

    def makeConnection(self, transport) -> None:
        transport.write(self.prefix)
        Protocol.makeConnection(self, transport)
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason) -> None:
        self.inner.connectionLost(reason)


class _Client(Protocol):
    """Collects what the shard sends; records the loss of the connection."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


class TLSTests(SynchronousTestCase):
    """The shard behind TLS, with real handshakes pumped in memory."""

    def setUp(self) -> None:
        self.keys = Keys()
        self.ca = CertificateAuthority()
        issued = self.ca.issue_server(["api-fra-1.shards.test"])
        self.server_cert = ssl.PrivateCertificate.loadPEM(issued.cert_pem + issued.key_pem)
        self.clock = Clock()

    def connect(self, behaviour: str = "hello", tls_version: Optional[ssl.TLSVersion] = None):
        """Connect a TLS client to a TLS shard in memory; return the factory, client and pump."""
        extra = {}
        if tls_version is not None:
            extra = {"raiseMinimumTo": tls_version, "lowerMaximumSecurityTo": tls_version}
        server_options = ssl.CertificateOptions(
            privateKey=self.server_cert.privateKey.original,
            certificate=self.server_cert.original,
            **extra,
        )
        factory = shard_factory(
            SHARD, self.keys.verifier(), tls=server_options, reactor=self.clock, behaviour=behaviour
        )
        client_options = ssl.optionsForClientTLS(
            "api-fra-1.shards.test",
            trustRoot=ssl.Certificate.loadPEM(self.ca.cert_pem),
            extraCertificateOptions=extra or None,
        )
        client = _Client()
        tls_factory = TLSMemoryBIOFactory(client_options, True, _SingleFactory(client), clock=self.clock)
        client_tls = tls_factory.buildProtocol(SHARD_SIDE)
        server = factory.buildProtocol(PROXY_SIDE)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            _Prefixed(self.keys.header(), client_tls),
            iosim.makeFakeClient(client_tls),
            clock=self.clock,
        )
        return factory, server, client, pump

    def test_uses_half_close_tls(self) -> None:
        """The TLS layer under the application is the half-closeable one."""
        factory, server, client, pump = self.connect()
        self.assertIsInstance(server.wrappedProtocol, HalfCloseTLSProtocol)
        self.assertTrue(IHalfCloseableProtocol.providedBy(server))

    def test_hello_and_echo(self) -> None:
        """Over TLS the client gets the hello line (the facts reached through the TLS layer) and its echo."""
        factory, server, client, pump = self.connect()
        hello = hello_line(SHARD, factory.connections[0])
        self.assertEqual(client.received, hello)
        client.transport.write(b"over tls")
        pump.flush()
        self.assertEqual(client.received, hello + b"over tls")

    def _half_close(self, tls_version: Optional[ssl.TLSVersion]) -> None:
        factory, server, client, pump = self.connect(tls_version=tls_version)
        client.transport.write(b"request body")
        pump.flush()
        # A Twisted TLS client's loseConnection sends close_notify and keeps
        # reading until the peer's close_notify: a TLS half-close.
        client.transport.loseConnection()
        pump.flush()
        hello = hello_line(SHARD, factory.connections[0])
        self.assertEqual(client.received, hello + b"request body" + bye(b"request body"))
        self.assertIsNotNone(client.lost)
        self.assertEqual(factory.counts["half_closed"], 1)
        self.assertEqual(factory.counts["closed"], 1)

    def test_half_close_tls13(self) -> None:
        """A close_notify under TLS 1.3 is a half-close: the client still gets BYE."""
        self._half_close(ssl.TLSVersion.TLSv1_3)

    def test_half_close_tls12(self) -> None:
        """A close_notify under TLS 1.2 is a half-close too."""
        self._half_close(ssl.TLSVersion.TLSv1_2)

    def test_source(self) -> None:
        """A source shard streams its pattern through TLS and closes."""
        n = 300_000
        factory, server, client, pump = self.connect(behaviour=f"source:{n}")
        pump.flush()
        hello = hello_line(SHARD, factory.connections[0])
        self.assertEqual(client.received, hello + pattern_bytes(n))
        self.assertIsNotNone(client.lost)

    def test_truncation_is_not_half_close(self) -> None:
        """A TCP EOF without close_notify does not earn a BYE: the connection just ends."""
        factory, server, client, pump = self.connect()
        client.transport.write(b"partial")
        pump.flush()
        before = client.received
        server.readConnectionLost()
        pump.flush()
        self.assertEqual(client.received, before)
        self.assertEqual(factory.counts["half_closed"], 0)
        self.assertEqual(factory.counts["closed"], 1)


class _SingleFactory:
    """A factory handing out one given protocol (the test's client)."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


# ---------------------------------------------------------------------------
# As a process, over loopback


class ProcessTests(SynchronousTestCase):
    """``python -m shardtcp.example.shard`` over real sockets."""

    def setUp(self) -> None:
        self.keys = Keys()
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.jwks = os.path.join(self.directory, "jwks.json")
        with open(self.jwks, "w") as f:
            json.dump(jwks_document({self.keys.kid: self.keys.private}), f)
        # The process checks tokens against the real clock.
        self.keys.signer = PolicySigner(
            self.keys.private, kid=self.keys.kid, issuer="edge-test", ttl=30, now=time.time
        )

    def start(self, *extra: str) -> tuple[subprocess.Popen, int]:
        """Start a shard process; return it and its port once it listens."""
        port_file = os.path.join(self.directory, "port")
        process = subprocess.Popen(
            [sys.executable, "-m", "shardtcp.example.shard", "--id", SHARD, "--jwks", self.jwks,
             "--port-file", port_file, *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(self._stop, process)
        deadline = time.monotonic() + 20
        while not os.path.exists(port_file):
            if process.poll() is not None:
                self.fail(f"shard exited early: {process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                self.fail("shard did not write its port file")
            time.sleep(0.05)
        with open(port_file) as f:
            return process, int(f.read())

    def _stop(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()

    def header_for(self, sock: socket.socket) -> bytes:
        """A header whose source and destination are the socket's own addresses."""
        return self.keys.header(source=sock.getsockname(), destination=sock.getpeername())

    def test_plain_half_close_and_sigterm(self) -> None:
        """Over loopback: hello, echo, BYE after shutdown(SHUT_WR); SIGTERM then exits with 0."""
        process, port = self.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(self.header_for(sock) + b"abc")
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        lines = received.split(b"\n")
        self.assertTrue(lines[0].startswith(b"SHARD api-fra-1 client=127.0.0.1:"), received)
        self.assertEqual(lines[1:], [b"abc" + bye(b"abc").rstrip(b"\n"), b""])
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=20), 0)

    def test_tls_half_close(self) -> None:
        """Over loopback with TLS: a client's close_notify is answered with BYE before the shard's own."""
        ca = CertificateAuthority()
        cert, key = ca.issue_server(["127.0.0.1"]).write(self.directory, "shard")
        process, port = self.start("--cert", cert, "--key", key)
        context = stdlib_ssl.create_default_context(cadata=ca.cert_pem.decode())
        incoming, outgoing = stdlib_ssl.MemoryBIO(), stdlib_ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        received = b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(self.header_for(sock))

            def step(action):
                while True:
                    try:
                        return action()
                    except stdlib_ssl.SSLWantReadError:
                        sock.sendall(outgoing.read())
                        data = sock.recv(65536)
                        if not data:
                            incoming.write_eof()
                        incoming.write(data)

            step(tls.do_handshake)
            tls.write(b"secret")
            sock.sendall(outgoing.read())
            try:
                tls.unwrap()  # sends close_notify, then wants the peer's
            except stdlib_ssl.SSLWantReadError:
                pass
            sock.sendall(outgoing.read())
            while True:
                try:
                    chunk = step(lambda: tls.read(65536))
                except stdlib_ssl.SSLZeroReturnError:
                    break
                if not chunk:
                    break
                received += chunk
        self.assertTrue(received.startswith(b"SHARD api-fra-1 client=127.0.0.1:"), received)
        self.assertTrue(received.endswith(b"\nsecret" + bye(b"secret")), received)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=20), 0)

    def test_bad_arguments(self) -> None:
        """A missing JWKS file is reported and exits with status 2."""
        result = subprocess.run(
            [sys.executable, "-m", "shardtcp.example.shard", "--id", SHARD,
             "--jwks", os.path.join(self.directory, "missing.json")],
            capture_output=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn(b"missing.json", result.stderr)
