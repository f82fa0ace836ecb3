"""
Tests for shardtcp.backend: what a shard checks before it trusts a connection.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from typing import Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from shardtcp import keys as keys_module
from shardtcp import proxyv2
from shardtcp.backend import (
    IKeySource,
    ReplayCache,
    StaticKeySource,
    ShardVerifier,
    VerificationError,
    VerifiedConnection,
    VerifyingFactory,
    verified_connection,
)
from shardtcp.policy import PolicyContext, PolicySigner
from shardtcp.proxyv2 import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    Command,
    ProxyHeader,
    SSLInfo,
)

NOW = 1_700_000_000.0
CONN_ID = "Qk9fX2Rldi1jb25uLWlkLTAx"
SHARD = "api-fra-1"
CLIENT = ("198.51.100.7", 50123)
PROXY_ADDR = ("203.0.113.1", 8443)
POLICY = PolicyContext("mtls", ("mtls",), ("orders:read",))
# Where the connection really comes from: the proxy, not the client.
PROXY_PEER = IPv4Address("TCP", "10.0.0.5", 40000)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class HeaderMixin:
    """A signing proxy and a verifying shard sharing one clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.key = Ed25519PrivateKey.generate()
        self.signer = PolicySigner(
            self.key, kid="policy-1", issuer="edge-fra-1", ttl=30, now=self.clock.seconds
        )
        self.verifier = ShardVerifier(
            SHARD, {"policy-1": self.key.public_key()}, now=self.clock.seconds
        )

    def token(self, **kw) -> bytes:
        args = dict(
            policy=POLICY,
            audience=SHARD,
            connection_id=CONN_ID,
            service="api",
            source=CLIENT,
            destination=PROXY_ADDR,
            subject="spiffe://example.test/client",
            sni="api.example.test",
        )
        args.update(kw)
        return self.signer.sign(**args)

    def header(
        self,
        *,
        token: Optional[bytes] = None,
        source=CLIENT,
        destination=PROXY_ADDR,
        unique_id: Optional[bytes] = CONN_ID.encode(),
        tlv_type: int = 0xE0,
        extra=(),
        command=Command.PROXY,
        **sign_kw,
    ) -> ProxyHeader:
        if token is None:
            sign_kw.setdefault("source", source)
            sign_kw.setdefault("destination", destination)
            token = self.token(**sign_kw)
        tlvs = [
            (PP2_TYPE_ALPN, b"h2"),
            (PP2_TYPE_AUTHORITY, b"api.example.test"),
        ]
        if unique_id is not None:
            tlvs.append((PP2_TYPE_UNIQUE_ID, unique_id))
        tlvs.append(
            (PP2_TYPE_SSL, SSLInfo(client=7, verify=0, version="TLSv1.3", cn="client").to_bytes())
        )
        if tlv_type is not None:
            tlvs.append((tlv_type, token))
        tlvs.extend(extra)
        return ProxyHeader(command=command, source=source, destination=destination, tlvs=tlvs)

    def wire(self, *, crc32c: bool = True, **kw) -> bytes:
        return proxyv2.encode(self.header(**kw), crc32c=crc32c)

    def parsed(self, **kw) -> ProxyHeader:
        header, rest = proxyv2.parse(self.wire(**kw))
        return header


class VerifierTests(HeaderMixin, SynchronousTestCase):
    """Tests for ShardVerifier.verify and verify_bytes."""

    def assertRefused(self, reason: str, header_or_bytes) -> VerificationError:
        if isinstance(header_or_bytes, bytes):
            e = self.assertRaises(VerificationError, self.verifier.verify_bytes, header_or_bytes)
        else:
            e = self.assertRaises(VerificationError, self.verifier.verify, header_or_bytes)
        self.assertEqual(e.reason, reason, str(e))
        return e

    def test_accepts_signed_header(self) -> None:
        """
        A header written by PolicySigner + proxyv2.encode is accepted, and the
        VerifiedConnection carries the client, the signed facts and the TLVs.
        """
        verified, rest = self.verifier.verify_bytes(self.wire() + b"GET / HTTP/1.1\r\n")
        self.assertEqual(rest, b"GET / HTTP/1.1\r\n")
        self.assertEqual(verified.client, CLIENT)
        self.assertEqual(verified.destination, PROXY_ADDR)
        self.assertEqual(verified.connection_id, CONN_ID)
        self.assertEqual(verified.service, "api")
        self.assertEqual(verified.shard_id, SHARD)
        self.assertEqual(verified.sni, "api.example.test")
        self.assertEqual(verified.subject, "spiffe://example.test/client")
        self.assertEqual(verified.policy, POLICY)
        self.assertEqual(verified.claims["iss"], "edge-fra-1")
        self.assertEqual(verified.alpn, b"h2")
        self.assertEqual(verified.ssl.cn, "client")
        self.assertEqual(verified.header.command, Command.PROXY)

    def test_ipv6_round_trip(self) -> None:
        """IPv6 source and destination survive signing, encoding and verification."""
        client, proxy = ("2001:db8::7", 443), ("2001:db8:ffff::1", 8443)
        verified, _ = self.verifier.verify_bytes(self.wire(source=client, destination=proxy))
        self.assertEqual(verified.client, client)
        self.assertEqual(verified.destination, proxy)
        self.assertEqual(verified.claims["src"], "[2001:db8::7]:443")

    def test_from_jwks(self) -> None:
        """A verifier built from a JWKS file trusts its keys."""
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump(keys_module.jwks_document({"policy-1": self.key.public_key()}), f)
        verifier = ShardVerifier.from_jwks(SHARD, path, now=self.clock.seconds)
        self.assertEqual(verifier.verify_bytes(self.wire())[0].connection_id, CONN_ID)

    def test_local(self) -> None:
        """A LOCAL header is refused as local: it carries no connection."""
        self.assertRefused("local", proxyv2.local_header())

    def test_bad_crc(self) -> None:
        """A header whose bytes were altered after its CRC32C was computed is bad_crc."""
        data = bytearray(self.wire())
        data[20] ^= 0x01  # inside the source address
        self.assertRefused("bad_crc", bytes(data))

    def test_missing_crc(self) -> None:
        """A header without CRC32C TLV is missing_crc, as bytes and as a parsed header."""
        self.assertRefused("missing_crc", self.wire(crc32c=False))
        header, _ = proxyv2.parse(self.wire(crc32c=False))
        self.assertRefused("missing_crc", header)

    def test_missing_token(self) -> None:
        """A header without the PolicyContext TLV is missing_policy."""
        self.assertRefused("missing_policy", self.wire(tlv_type=None))

    def test_token_under_other_tlv_type(self) -> None:
        """A verifier for tlv_type 0xE1 does not find a token sent as 0xE0."""
        verifier = ShardVerifier(
            SHARD, {"policy-1": self.key.public_key()}, tlv_type=0xE1, now=self.clock.seconds
        )
        e = self.assertRaises(VerificationError, verifier.verify_bytes, self.wire())
        self.assertEqual(e.reason, "missing_policy")
        self.assertEqual(verifier.verify_bytes(self.wire(tlv_type=0xE1))[0].service, "api")

    def test_duplicate_token(self) -> None:
        """Two PolicyContext TLVs are refused as duplicate_tlv."""
        self.assertRefused("duplicate_tlv", self.wire(extra=[(0xE0, self.token())]))

    def test_unknown_kid(self) -> None:
        """A token from a signer whose kid the shard does not trust is unknown_kid."""
        other = PolicySigner(self.key, kid="policy-2", issuer="edge", ttl=30, now=self.clock.seconds)
        token = other.sign(
            policy=POLICY, audience=SHARD, connection_id=CONN_ID, service="api",
            source=CLIENT, destination=PROXY_ADDR,
        )
        self.assertRefused("unknown_kid", self.wire(token=token))

    def test_bad_signature(self) -> None:
        """A token from another key claiming the trusted kid is invalid_signature."""
        forger = PolicySigner(
            Ed25519PrivateKey.generate(), kid="policy-1", issuer="edge", ttl=30, now=self.clock.seconds
        )
        token = forger.sign(
            policy=POLICY, audience=SHARD, connection_id=CONN_ID, service="api",
            source=CLIENT, destination=PROXY_ADDR,
        )
        self.assertRefused("invalid_signature", self.wire(token=token))

    def _forged_claims(self) -> dict:
        return {
            "iss": "edge", "aud": SHARD, "iat": int(NOW), "exp": int(NOW) + 30,
            "jti": CONN_ID, "svc": "api", "src": "198.51.100.7:50123",
            "dst": "203.0.113.1:8443", "enc": "mtls", "amr": ["mtls"], "acl": ["admin"],
        }

    def test_alg_none(self) -> None:
        """An unsigned (alg none) token is refused as bad_algorithm."""
        head = _b64(json.dumps({"alg": "none", "kid": "policy-1", "typ": "JWT"}).encode())
        body = _b64(json.dumps(self._forged_claims()).encode())
        self.assertRefused("bad_algorithm", self.wire(token=f"{head}.{body}.".encode()))

    def test_hs256_forgery(self) -> None:
        """An HS256 token keyed with the public key's bytes is refused as bad_algorithm."""
        secret = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        head = _b64(json.dumps({"alg": "HS256", "kid": "policy-1", "typ": "JWT"}).encode())
        body = _b64(json.dumps(self._forged_claims()).encode())
        mac = _b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
        self.assertRefused("bad_algorithm", self.wire(token=f"{head}.{body}.{mac}".encode()))

    def test_audience_mismatch(self) -> None:
        """A token for another shard is wrong_audience."""
        self.assertRefused("wrong_audience", self.wire(audience="api-nyc-1"))

    def test_expiry_and_leeway(self) -> None:
        """
        A token (ttl 30 s) is accepted 34 s after issue (within the 5 s
        leeway) and refused as expired 35 s after.
        """
        other_id = "another-connection-id-01"
        within = self.wire()
        beyond = self.wire(connection_id=other_id, unique_id=other_id.encode())
        self.clock.advance(34)
        self.assertEqual(self.verifier.verify_bytes(within)[0].connection_id, CONN_ID)
        self.clock.advance(1)
        self.assertRefused("expired", beyond)

    def test_leeway_above_limit_refused(self) -> None:
        """A verifier cannot be given more than 5 s of leeway."""
        self.assertRaises(
            ValueError, ShardVerifier, SHARD, {"policy-1": self.key.public_key()}, leeway=6
        )

    def test_source_mismatch(self) -> None:
        """A token signed for another client than the header's source is source_mismatch."""
        self.assertRefused(
            "source_mismatch", self.wire(source=CLIENT, token=self.token(source=("198.51.100.8", 50123)))
        )

    def test_destination_mismatch(self) -> None:
        """A token signed for another destination is destination_mismatch."""
        self.assertRefused(
            "destination_mismatch",
            self.wire(token=self.token(destination=("203.0.113.1", 9443))),
        )

    def test_jti_mismatch(self) -> None:
        """A token whose jti is not the UNIQUE_ID is jti_mismatch."""
        self.assertRefused("jti_mismatch", self.wire(unique_id=b"some-other-connection-id"))

    def test_missing_or_invalid_unique_id(self) -> None:
        """No UNIQUE_ID is missing_unique_id; one outside 16..32 ASCII is invalid_unique_id."""
        self.assertRefused("missing_unique_id", self.wire(unique_id=None))
        self.assertRefused("invalid_unique_id", self.wire(unique_id=b"short"))
        self.assertRefused("invalid_unique_id", self.wire(unique_id=b"\xff" * 20))

    def test_replay(self) -> None:
        """The same header a second time is refused as replay."""
        data = self.wire()
        self.verifier.verify_bytes(data)
        self.assertRefused("replay", data)

    def test_refused_header_not_remembered(self) -> None:
        """
        A header refused for another reason does not consume its connection
        id: the genuine header with that id is still accepted.
        """
        self.assertRefused("wrong_audience", self.wire(audience="api-nyc-1"))
        self.verifier.verify_bytes(self.wire())

    def test_no_addresses(self) -> None:
        """A PROXY header with UNSPEC addresses is no_addresses."""
        header = ProxyHeader(
            command=Command.PROXY,
            tlvs=[(PP2_TYPE_UNIQUE_ID, CONN_ID.encode()), (0xE0, self.token()), (0x03, b"\0\0\0\0")],
        )
        self.assertRefused("no_addresses", header)


def reframed(wire: bytes, family_byte: int, addresses: Optional[bytes] = None) -> bytes:
    """
    ``wire`` (one v2 header, CRC32C included) with another family/transport
    byte and, optionally, another address block; the CRC32C recomputed, as
    anyone on the path could.
    """
    import struct

    import google_crc32c

    length = struct.unpack_from("!H", wire, 14)[0]
    old_block = {0x1: 12, 0x2: 36, 0x3: 216}[wire[13] >> 4]
    tlvs = wire[16 + old_block : 16 + length]
    block = wire[16 : 16 + old_block] if addresses is None else addresses
    body = bytearray(block + tlvs)
    # Find the CRC32C TLV in the new body and zero it.
    offset = len(block)
    while offset < len(body):
        tlv_type, tlv_length = body[offset], struct.unpack_from("!H", body, offset + 1)[0]
        if tlv_type == 0x03:
            crc_at = 16 + offset + 3
        offset += 3 + tlv_length
    head = wire[:13] + bytes([family_byte]) + struct.pack("!H", len(body))
    data = bytearray(head + body)
    data[crc_at : crc_at + 4] = b"\0\0\0\0"
    data[crc_at : crc_at + 4] = struct.pack("!I", google_crc32c.value(bytes(data)))
    return bytes(data)


class FamilyByteTests(HeaderMixin, SynchronousTestCase):
    """
    The family and transport come from the header's family byte (SPEC §4:
    INET or INET6 over STREAM), never from the address text.
    """

    def assertRefused(self, reason: str, data: bytes) -> VerificationError:
        e = self.assertRaises(VerificationError, self.verifier.verify_bytes, data)
        self.assertEqual(e.reason, reason, str(e))
        return e

    def test_stream_accepted(self) -> None:
        """The header as signed (INET over STREAM) is accepted, and survives reframed() unchanged."""
        wire = proxyv2.encode(self.header())
        self.assertEqual(reframed(wire, 0x11), wire)
        verified, rest = self.verifier.verify_bytes(wire)
        self.assertEqual((verified.client, rest), (CLIENT, b""))

    def test_dgram_refused(self) -> None:
        """The same signed header re-framed as INET over DGRAM is refused as not_stream."""
        self.assertRefused("not_stream", reframed(proxyv2.encode(self.header()), 0x12))

    def test_inet6_dgram_refused(self) -> None:
        """INET6 over DGRAM is refused too; INET6 over STREAM passes."""
        header = self.header(source=("2001:db8::7", 50123), destination=("2001:db8::1", 443))
        wire = proxyv2.encode(header)
        self.verifier.verify_bytes(wire)
        other = ShardVerifier(SHARD, {"policy-1": self.key.public_key()}, now=self.clock.seconds)
        e = self.assertRaises(VerificationError, other.verify_bytes, reframed(wire, 0x22))
        self.assertEqual(e.reason, "not_stream")

    def test_unix_with_ip_paths_refused(self) -> None:
        """
        A signed header (ports 0) re-framed as UNIX whose paths spell the
        token's IP addresses is refused as unix_family.
        """
        source, destination = (CLIENT[0], 0), (PROXY_ADDR[0], 0)
        wire = proxyv2.encode(self.header(source=source, destination=destination))
        paths = CLIENT[0].encode().ljust(108, b"\0") + PROXY_ADDR[0].encode().ljust(108, b"\0")
        for family_byte in (0x31, 0x32):
            self.assertRefused("unix_family", reframed(wire, family_byte, paths))
        self.verifier.verify_bytes(wire)


class ReplayCacheTests(SynchronousTestCase):
    """Tests for ReplayCache."""

    def setUp(self) -> None:
        self.now = 1000.0
        self.cache = ReplayCache(max_entries=2, now=lambda: self.now)

    def test_remembers_until_expiry(self) -> None:
        """An id is refused as replay until its time has passed, then forgotten."""
        self.cache.check_and_remember("a", 1010)
        e = self.assertRaises(VerificationError, self.cache.check_and_remember, "a", 1010)
        self.assertEqual(e.reason, "replay")
        self.now = 1010
        self.assertNotIn("a", self.cache)
        self.cache.check_and_remember("a", 1020)
        self.assertIn("a", self.cache)

    def test_full_refuses_rather_than_forgets(self) -> None:
        """
        When full of live ids, a new id is refused (replay_cache_full) and
        the remembered ones are still refused as replays.
        """
        self.cache.check_and_remember("a", 1010)
        self.cache.check_and_remember("b", 1020)
        e = self.assertRaises(VerificationError, self.cache.check_and_remember, "c", 1030)
        self.assertEqual(e.reason, "replay_cache_full")
        for jti in ["a", "b"]:
            e = self.assertRaises(VerificationError, self.cache.check_and_remember, jti, 1030)
            self.assertEqual(e.reason, "replay")

    def test_expired_entries_make_room(self) -> None:
        """Once the soonest-expiring id has expired, a new one fits."""
        self.cache.check_and_remember("a", 1010)
        self.cache.check_and_remember("b", 1020)
        self.now = 1011
        self.cache.check_and_remember("c", 1030)
        self.assertEqual(len(self.cache), 2)
        self.assertNotIn("a", self.cache)
        self.assertIn("b", self.cache)

    def test_verifier_refuses_when_full(self) -> None:
        """A verifier with a full cache refuses new connections as replay_cache_full."""
        clock = Clock()
        clock.advance(NOW)
        key = Ed25519PrivateKey.generate()
        signer = PolicySigner(key, kid="k", issuer="edge", ttl=30, now=clock.seconds)
        verifier = ShardVerifier(
            SHARD, {"k": key.public_key()}, now=clock.seconds,
            replay_cache=ReplayCache(max_entries=1, now=clock.seconds),
        )
        results = []
        for connection_id in ["connection-id-number-1", "connection-id-number-2"]:
            token = signer.sign(
                policy=POLICY, audience=SHARD, connection_id=connection_id, service="api",
                source=CLIENT, destination=PROXY_ADDR,
            )
            header = ProxyHeader(
                source=CLIENT, destination=PROXY_ADDR,
                tlvs=[(PP2_TYPE_UNIQUE_ID, connection_id.encode()), (0xE0, token)],
            )
            try:
                verifier.verify_bytes(proxyv2.encode(header))
                results.append("ok")
            except VerificationError as e:
                results.append(e.reason)
        self.assertEqual(results, ["ok", "replay_cache_full"])


class Recorder(Protocol):
    """An application protocol that records what happens to it."""

    def __init__(self) -> None:
        self.data = b""
        self.made = False
        self.lost = None

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    """A Recorder that supports half-close."""

    read_lost = write_lost = False

    def readConnectionLost(self) -> None:
        self.read_lost = True

    def writeConnectionLost(self) -> None:
        self.write_lost = True


class RecordingFactory(Factory):
    """Builds Recorders and remembers them and the addresses given."""

    def __init__(self, protocol=Recorder) -> None:
        self.protocol = protocol
        self.built = []
        self.addresses = []

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        p = self.protocol()
        p.factory = self
        self.built.append(p)
        return p


@implementer(IPushProducer)
class Producer:
    def pauseProducing(self): pass
    def resumeProducing(self): pass
    def stopProducing(self): pass


class FactoryTests(HeaderMixin, SynchronousTestCase):
    """Tests for VerifyingFactory and its protocol, over StringTransport."""

    def setUp(self) -> None:
        super().setUp()
        self.app = RecordingFactory()
        self.factory = VerifyingFactory(self.app, self.verifier, timeout=5, reactor=self.clock)

    def connect(self, peer=PROXY_PEER):
        protocol = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_byte_by_byte(self) -> None:
        """
        A header fed one byte at a time, followed by application data in the
        same and later reads, reaches the application exactly, after the
        application protocol was built with the client's address.
        """
        protocol, transport = self.connect()
        data = self.wire() + b"hello"
        for i in range(len(data)):
            protocol.dataReceived(data[i : i + 1])
        protocol.dataReceived(b", world")
        [app] = self.app.built
        self.assertTrue(app.made)
        self.assertEqual(app.data, b"hello, world")
        self.assertEqual(self.app.addresses, [IPv4Address("TCP", *CLIENT)])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.factory.stats["accepted"], 1)

    def test_header_and_data_in_one_read(self) -> None:
        """Bytes after the header in the same read are passed on unchanged."""
        protocol, _ = self.connect()
        payload = bytes(range(256))
        protocol.dataReceived(self.wire() + payload)
        self.assertEqual(self.app.built[0].data, payload)

    def test_transport_is_the_client(self) -> None:
        """
        The application's transport reports the header's client as peer, the
        header's destination as host, and carries the verified connection.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(self.wire())
        app = self.app.built[0]
        self.assertEqual(app.transport.getPeer(), IPv4Address("TCP", *CLIENT))
        self.assertEqual(app.transport.getHost(), IPv4Address("TCP", *PROXY_ADDR))
        self.assertIsInstance(app.transport.verified, VerifiedConnection)
        self.assertEqual(app.transport.verified.policy, POLICY)
        self.assertIs(verified_connection(app.transport), app.transport.verified)
        app.transport.write(b"reply")
        self.assertEqual(transport.value(), b"reply")
        app.transport.loseConnection()
        self.assertTrue(transport.disconnecting)

    def test_ipv6_peer(self) -> None:
        """An IPv6 client appears as an IPv6Address peer."""
        protocol, _ = self.connect()
        client, proxy = ("2001:db8::7", 443), ("2001:db8::1", 8443)
        protocol.dataReceived(self.wire(source=client, destination=proxy))
        app = self.app.built[0]
        self.assertEqual(app.transport.getPeer(), IPv6Address("TCP", *client))
        self.assertEqual(app.transport.getHost(), IPv6Address("TCP", *proxy))

    def test_bad_header_closes_and_counts(self) -> None:
        """
        A header refused by the verifier closes the connection, builds no
        application protocol, counts the reason, and ignores later bytes.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(self.wire(audience="api-nyc-1"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.app.built, [])
        self.assertEqual(self.factory.stats["wrong_audience"], 1)
        protocol.dataReceived(b"more")
        self.assertEqual(self.factory.stats["wrong_audience"], 1)

    def test_not_proxy_protocol(self) -> None:
        """A client speaking HTTP directly is refused at its first byte (bad_signature)."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.stats["bad_signature"], 1)

    def test_corrupt_header_counts_bad_crc(self) -> None:
        """A corrupted header closes the connection and counts bad_crc."""
        protocol, transport = self.connect()
        data = bytearray(self.wire())
        data[-10] ^= 0x40
        protocol.dataReceived(bytes(data))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.stats["bad_crc"], 1)

    def test_header_too_large(self) -> None:
        """A header declaring more than max_header_size bytes is refused before it arrives."""
        factory = VerifyingFactory(
            self.app, self.verifier, reactor=self.clock, max_header_size=256
        )
        protocol = factory.buildProtocol(PROXY_PEER)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(self.wire()[:16])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.stats["too_large"], 1)

    def test_timeout(self) -> None:
        """
        Without a complete header within the timeout the connection is closed
        and counted as timeout; not a moment before.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(self.wire()[:20])
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.stats["timeout"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_cancelled_by_header(self) -> None:
        """Once the header is verified, the timeout no longer applies."""
        protocol, transport = self.connect()
        protocol.dataReceived(self.wire())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertFalse(transport.disconnecting)

    def test_closed_before_header(self) -> None:
        """A peer that leaves before completing the header is counted as incomplete."""
        protocol, _ = self.connect()
        protocol.dataReceived(self.wire()[:5])
        protocol.connectionLost(None)
        self.assertEqual(self.factory.stats["incomplete"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_reaches_application(self) -> None:
        """connectionLost after acceptance is passed on with its reason."""
        protocol, _ = self.connect()
        protocol.dataReceived(self.wire())
        reason = object()
        protocol.connectionLost(reason)
        self.assertIs(self.app.built[0].lost, reason)
        self.assertEqual(self.factory.stats["incomplete"], 0)

    def test_local_health_check(self) -> None:
        """
        A LOCAL header is a health check: counted, the connection closed,
        the application never involved.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(proxyv2.local_header() + b"ignored")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.app.built, [])
        self.assertEqual(self.factory.stats["health_check"], 1)
        self.assertEqual(self.factory.stats["local"], 0)

    def test_local_refused(self) -> None:
        """With allow_local=False a LOCAL header is refused and counted as local."""
        factory = VerifyingFactory(self.app, self.verifier, reactor=self.clock, allow_local=False)
        protocol = factory.buildProtocol(PROXY_PEER)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(proxyv2.local_header())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.stats["local"], 1)
        self.assertEqual(factory.stats["health_check"], 0)

    def test_application_refuses(self) -> None:
        """An application factory returning None closes the connection, counted."""
        self.app.buildProtocol = lambda addr: None
        protocol, transport = self.connect()
        protocol.dataReceived(self.wire())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.stats["refused_by_application"], 1)
        self.assertEqual(self.factory.stats["accepted"], 0)

    def test_half_close_forwarded(self) -> None:
        """
        With a half-closeable application protocol, the wrapper provides
        IHalfCloseableProtocol and forwards read/writeConnectionLost.
        """
        self.app.protocol = HalfCloseRecorder
        protocol, _ = self.connect()
        self.assertFalse(IHalfCloseableProtocol.providedBy(protocol))
        protocol.dataReceived(self.wire())
        self.assertTrue(IHalfCloseableProtocol.providedBy(protocol))
        protocol.readConnectionLost()
        protocol.writeConnectionLost()
        app = self.app.built[0]
        self.assertTrue(app.read_lost)
        self.assertTrue(app.write_lost)

    def test_no_half_close_without_support(self) -> None:
        """
        With an application protocol that does not support half-close, the
        wrapper does not claim to, so the reactor closes fully on EOF.
        """
        protocol, _ = self.connect()
        protocol.dataReceived(self.wire())
        self.assertFalse(IHalfCloseableProtocol.providedBy(protocol))

    def test_producer_registration_passes_through(self) -> None:
        """A producer the application registers is registered on the real transport."""
        protocol, transport = self.connect()
        protocol.dataReceived(self.wire())
        app = self.app.built[0]
        producer = Producer()
        app.transport.registerProducer(producer, True)
        self.assertIs(transport.producer, producer)
        self.assertTrue(transport.streaming)
        app.transport.unregisterProducer()
        self.assertIsNone(transport.producer)

    def test_transport_is_a_producer(self) -> None:
        """Pausing the application's transport pauses the real one."""
        protocol, transport = self.connect()
        protocol.dataReceived(self.wire())
        app = self.app.built[0]
        self.assertTrue(IPushProducer.providedBy(app.transport))
        app.transport.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        app.transport.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_verified_connection_absent(self) -> None:
        """verified_connection of an ordinary transport is None."""
        self.assertIsNone(verified_connection(StringTransport()))
        self.assertIsNone(verified_connection(None))


def _self_signed(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=36500))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class PrefixThenWrapped(Protocol):
    """A client that writes ``prefix`` in clear, then lets ``inner`` (TLS) run."""

    def __init__(self, prefix: bytes, inner: Protocol) -> None:
        self.prefix = prefix
        self.inner = inner

    def makeConnection(self, transport) -> None:
        Protocol.makeConnection(self, transport)
        transport.write(self.prefix)
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason) -> None:
        self.inner.connectionLost(reason)


class Greeter(Protocol):
    """A TLS client application that sends one line once connected."""

    def connectionMade(self) -> None:
        self.transport.write(b"hello over tls\n")


class TLSBehindVerifierTests(HeaderMixin, SynchronousTestCase):
    """VerifyingFactory in front of a TLSMemoryBIOFactory, in memory."""

    def test_tls_application_sees_client_and_policy(self) -> None:
        """
        A shard terminating TLS behind the verifier gets the decrypted bytes,
        sees the header's client through the TLS transport's getPeer, and
        reaches the verified connection with verified_connection().
        """
        cert_pem, key_pem = _self_signed("shard.test")
        server_options = PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        client_creator = optionsForClientTLS(
            "shard.test", trustRoot=Certificate.loadPEM(cert_pem)
        )
        app = RecordingFactory()
        factory = VerifyingFactory(
            TLSMemoryBIOFactory(server_options, False, app, clock=self.clock),
            self.verifier,
            reactor=self.clock,
        )
        client_tls = TLSMemoryBIOFactory(
            client_creator, True, Factory.forProtocol(Greeter), clock=self.clock
        )
        header = self.wire()

        client, server, pump = connectedServerAndClient(
            lambda: factory.buildProtocol(PROXY_PEER),
            lambda: PrefixThenWrapped(header, client_tls.buildProtocol(None)),
            clock=self.clock,
        )
        pump.flush()
        [recorder] = app.built
        self.assertEqual(recorder.data, b"hello over tls\n")
        self.assertEqual(recorder.transport.getPeer(), IPv4Address("TCP", *CLIENT))
        self.assertEqual(app.addresses, [IPv4Address("TCP", *CLIENT)])
        verified = verified_connection(recorder.transport)
        self.assertIsNotNone(verified)
        self.assertEqual(verified.policy, POLICY)
        self.assertEqual(verified.connection_id, CONN_ID)
        self.assertEqual(factory.stats["accepted"], 1)


@implementer(IKeySource)
class _RecordingSource:
    """An IKeySource that records the unknown kids it is told of."""

    def __init__(self, keys) -> None:
        self.keys = dict(keys)
        self.unknown: list = []

    def key_for(self, kid):
        return self.keys.get(kid)

    def unknown_kid(self, kid) -> None:
        self.unknown.append(kid)


class KeySourceTests(HeaderMixin, SynchronousTestCase):
    """ShardVerifier over an IKeySource."""

    def test_interfaces(self) -> None:
        """StaticKeySource provides IKeySource; a plain mapping is wrapped in one."""
        self.assertTrue(verifyObject(IKeySource, StaticKeySource({"k": self.key.public_key()})))
        self.assertTrue(IKeySource.providedBy(self.verifier.keys))
        with self.assertRaises(ValueError):
            ShardVerifier(SHARD, {})

    def test_unknown_kid_reported(self) -> None:
        """
        A token under a kid the source lacks is refused unknown_kid and the
        kid reported once; a known kid with a bad signature and a good
        token report nothing.
        """
        source = _RecordingSource({"policy-1": self.key.public_key()})
        verifier = ShardVerifier(SHARD, source, now=self.clock.seconds)
        other = PolicySigner(
            Ed25519PrivateKey.generate(), kid="policy-9", issuer="x", ttl=30, now=self.clock.seconds
        )
        token = other.sign(
            policy=POLICY, audience=SHARD, connection_id=CONN_ID, service="api",
            source=CLIENT, destination=PROXY_ADDR,
        )
        e = self.assertRaises(VerificationError, verifier.verify, self.parsed(token=token))
        self.assertEqual(e.reason, "unknown_kid")
        self.assertEqual(source.unknown, ["policy-9"])
        forged = PolicySigner(
            Ed25519PrivateKey.generate(), kid="policy-1", issuer="x", ttl=30, now=self.clock.seconds
        ).sign(
            policy=POLICY, audience=SHARD, connection_id=CONN_ID, service="api",
            source=CLIENT, destination=PROXY_ADDR,
        )
        e = self.assertRaises(VerificationError, verifier.verify, self.parsed(token=forged))
        self.assertEqual(e.reason, "invalid_signature")
        verifier.verify(self.parsed())
        self.assertEqual(source.unknown, ["policy-9"])

    def test_set_keys_replaces_source(self) -> None:
        """set_keys trusts the new keys only: the old kid becomes unknown_kid."""
        new = Ed25519PrivateKey.generate()
        self.verifier.set_keys({"policy-2": new.public_key()})
        e = self.assertRaises(VerificationError, self.verifier.verify, self.parsed())
        self.assertEqual(e.reason, "unknown_kid")


class OwnedKeyTests(HeaderMixin, SynchronousTestCase):
    """ShardVerifier(owns_key=...) refuses shard keys (shk) the shard does not own."""

    def verifier_owning(self, owns) -> ShardVerifier:
        return ShardVerifier(SHARD, {"policy-1": self.key.public_key()}, now=self.clock.seconds, owns_key=owns)

    def keyed(self, key, jti: str = CONN_ID):
        policy = attrs.evolve(POLICY, shard_key=key)
        return self.wire(policy=policy, connection_id=jti, unique_id=jti.encode())

    def test_shk_round_trip(self) -> None:
        """The signed key reaches the shard as VerifiedConnection.shard_key; an unkeyed token has None."""
        verified, _ = self.verifier.verify_bytes(self.keyed("tenant42"))
        self.assertEqual(verified.shard_key, "tenant42")
        self.assertEqual(verified.claims["shk"], "tenant42")
        verified, _ = self.verifier_owning(None).verify_bytes(self.wire(connection_id="c" * 16, unique_id=b"c" * 16))
        self.assertIsNone(verified.shard_key)

    def test_set_and_predicate(self) -> None:
        """An owned key passes; another is refused foreign_key, with a set or a predicate; no key is no_shard_key."""
        for owns in ({"tenant42"}, frozenset({"tenant42"}), lambda k: k.startswith("tenant4")):
            verifier = self.verifier_owning(owns)
            verified, _ = verifier.verify_bytes(self.keyed("tenant42", "a" * 16))
            self.assertEqual(verified.shard_key, "tenant42")
            e = self.assertRaises(VerificationError, verifier.verify_bytes, self.keyed("tenant7", "b" * 16))
            self.assertEqual(e.reason, "foreign_key")
            self.assertIn("'tenant7'", str(e))
            e = self.assertRaises(VerificationError, verifier.verify_bytes, self.wire(connection_id="d" * 16, unique_id=b"d" * 16))
            self.assertEqual(e.reason, "no_shard_key")

    def test_refused_key_not_remembered(self) -> None:
        """A connection refused for its key does not burn its id in the replay cache: only accepted ids are."""
        verifier = self.verifier_owning({"mine"})
        self.assertRaises(VerificationError, verifier.verify_bytes, self.keyed("theirs", "e" * 16))
        verifier.verify_bytes(self.keyed("mine", "e" * 16))

    def test_bad_ownership(self) -> None:
        """owns_key must be a callable or a set."""
        self.assertRaises(TypeError, self.verifier_owning, "tenant42")

    def test_counted_and_logged(self) -> None:
        """The factory counts a foreign key under its reason and closes the connection."""
        app = RecordingFactory()
        factory = VerifyingFactory(app, self.verifier_owning({"mine"}), timeout=5, reactor=self.clock)
        protocol = factory.buildProtocol(PROXY_PEER)
        transport = StringTransport(peerAddress=PROXY_PEER)
        protocol.makeConnection(transport)
        protocol.dataReceived(self.keyed("theirs"))
        self.assertEqual(factory.stats["foreign_key"], 1)
        self.assertEqual(app.built, [])
        self.assertTrue(transport.disconnecting)
