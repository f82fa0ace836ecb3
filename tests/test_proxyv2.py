"""
Tests for ``shardtcp.proxyv2``, the PROXY protocol encoder and decoder.

Besides hand-computed byte strings, the codec is cross-checked both ways
against an independent implementation (the ``proxy-protocol`` package,
imported as ``proxyprotocol``) and against a bit-by-bit CRC32C written here
from RFC 4960 appendix B, so that neither the wire layout nor the checksum
is only ever compared with itself.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from ipaddress import IPv4Address, IPv6Address

import proxyprotocol
import proxyprotocol.tlv
from hypothesis import given, settings
from hypothesis import strategies as st
from proxyprotocol.result import (
    ProxyResultIPv4,
    ProxyResultIPv6,
    ProxyResultLocal,
    ProxyResultUnknown,
)
from proxyprotocol.tlv import ProxyProtocolSSLTLV, ProxyProtocolTLV
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import proxyv2
from shardtcp.proxyv2 import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    SIGNATURE,
    Command,
    HeaderParser,
    InvalidProxyHeader,
    ProxyHeader,
    SSLInfo,
    encode,
    format_hostport,
    local_header,
    parse,
)

CUSTOM = 0xE0


def reference_crc32c(data: bytes, crc: int = 0) -> int:
    """
    CRC32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit.  The
    ``crc`` argument continues a previous result, which is the calling
    convention ``proxyprotocol`` expects of its checksum function.
    """
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def crc_of_header(data: bytes, crc_value_offset: int) -> int:
    """The CRC32C of a header with its 4-byte CRC field zeroed."""
    return reference_crc32c(
        data[:crc_value_offset] + b"\x00" * 4 + data[crc_value_offset + 4 :]
    )


def feed_in_pieces(
    parser: HeaderParser, data: bytes, cuts: list[int]
) -> tuple[ProxyHeader | None, bytes]:
    """
    Feed ``data`` split at ``cuts``, as a protocol adapter would: once a
    header completes, later pieces go to the application.  Return the header
    (or None) and every byte the application would have received.
    """
    bounds = [0] + sorted(c for c in cuts if 0 < c < len(data)) + [len(data)]
    header = None
    application = b""
    for start, end in zip(bounds, bounds[1:]):
        if header is not None:
            application += data[start:end]
            continue
        header = parser.feed(data[start:end])
        if header is not None:
            application = parser.rest
    return header, application


SSL_FULL = SSLInfo(
    client=PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
    verify=0,
    version="TLSv1.3",
    cn="client.example.test",
    cipher="TLS_AES_128_GCM_SHA256",
    sig_alg="ECDSA-SHA256",
    key_alg="EC256",
)

JWS = b"eyJhbGciOiJFZERTQSJ9.eyJqdGkiOiJhYmMifQ.c2lnbmF0dXJl"
CONNECTION_ID = b"0123456789abcdef0123"


def spec_tlvs() -> tuple[tuple[int, bytes], ...]:
    """The TLVs of SPEC section 4, in its order (CRC32C is added by encode)."""
    return (
        (PP2_TYPE_ALPN, b"h2"),
        (PP2_TYPE_AUTHORITY, "api.example.test".encode()),
        (PP2_TYPE_UNIQUE_ID, CONNECTION_ID),
        (PP2_TYPE_SSL, SSL_FULL.to_bytes()),
        (CUSTOM, JWS),
    )


def spec_header_v4() -> ProxyHeader:
    return ProxyHeader(
        source=("203.0.113.9", 51000),
        destination=("192.0.2.10", 8443),
        tlvs=spec_tlvs(),
    )


def spec_header_v6() -> ProxyHeader:
    return ProxyHeader(
        source=("2001:db8::9", 51000),
        destination=("2001:db8:1::10", 8443),
        tlvs=spec_tlvs(),
    )


class ReferenceChecksumTests(SynchronousTestCase):
    """The test's own CRC32C, on which later tests rely."""

    def test_check_value(self) -> None:
        """
        The reference function gives CRC32C's published check value for
        "123456789" (0xE3069283), so it is CRC32C and not another CRC.
        """
        self.assertEqual(reference_crc32c(b"123456789"), 0xE3069283)

    def test_continuation(self) -> None:
        """Continuing from a previous result equals checksumming in one go."""
        self.assertEqual(
            reference_crc32c(b"56789", reference_crc32c(b"1234")),
            reference_crc32c(b"123456789"),
        )


class ExactBytesTests(SynchronousTestCase):
    """encode() writes the layout of doc/proxy-protocol.txt, byte for byte."""

    def test_ipv4_without_crc(self) -> None:
        """
        An IPv4 PROXY header with one AUTHORITY TLV is exactly the
        hand-assembled bytes: signature, 0x21 (v2, PROXY), 0x11 (INET,
        STREAM), length 21, addresses, ports, then the TLV.
        """
        header = ProxyHeader(
            source=("192.0.2.1", 56324),
            destination=("198.51.100.7", 443),
            tlvs=((PP2_TYPE_AUTHORITY, b"a.test"),),
        )
        expected = bytes.fromhex(
            "0d0a0d0a000d0a515549540a"  # signature
            "21"  # version 2, command PROXY
            "11"  # AF_INET, STREAM
            "0015"  # 12 address bytes + 9 TLV bytes
            "c0000201"  # 192.0.2.1
            "c6336407"  # 198.51.100.7
            "dc04"  # 56324
            "01bb"  # 443
            "020006" "612e74657374"  # AUTHORITY "a.test"
        )
        self.assertEqual(encode(header, crc32c=False), expected)

    def test_ipv4_with_crc(self) -> None:
        """
        With the CRC32C the same header grows by one 7-byte TLV at the end,
        the length says 28, and the CRC field holds, big-endian, the CRC32C
        of the whole header with that field zeroed.
        """
        header = ProxyHeader(
            source=("192.0.2.1", 56324),
            destination=("198.51.100.7", 443),
            tlvs=((PP2_TYPE_AUTHORITY, b"a.test"),),
        )
        prefix = bytes.fromhex(
            "0d0a0d0a000d0a515549540a" "21" "11" "001c"
            "c0000201" "c6336407" "dc04" "01bb"
            "020006" "612e74657374"
            "030004"
        )
        data = encode(header)
        self.assertEqual(data[:-4], prefix)
        self.assertEqual(struct.unpack("!I", data[-4:])[0], crc_of_header(data, len(data) - 4))
        self.assertEqual(data[-4:], bytes.fromhex("be7a89ac"))

    def test_ipv6(self) -> None:
        """An IPv6 header uses family 0x21 and a 36-byte address block."""
        header = ProxyHeader(source=("2001:db8::1", 1234), destination=("2001:db8::2", 443))
        expected = bytes.fromhex(
            "0d0a0d0a000d0a515549540a" "21" "21" "0024"
            "20010db8000000000000000000000001"
            "20010db8000000000000000000000002"
            "04d2" "01bb"
        )
        self.assertEqual(encode(header, crc32c=False), expected)

    def test_local_header(self) -> None:
        """
        local_header() is command LOCAL (0x20), family UNSPEC (0x00), no
        address block, and a single valid CRC32C TLV.
        """
        data = local_header()
        self.assertEqual(data[:-4], SIGNATURE + bytes.fromhex("2000" "0007" "030004"))
        self.assertEqual(struct.unpack("!I", data[-4:])[0], crc_of_header(data, 19))

    def test_unspec_proxy(self) -> None:
        """A PROXY header without addresses is family UNSPEC with length 0."""
        self.assertEqual(encode(ProxyHeader(), crc32c=False), SIGNATURE + b"\x21\x00\x00\x00")

    def test_tlv_order_and_crc_last(self) -> None:
        """TLVs come out in the given order, and the CRC32C TLV is the last."""
        header, rest = parse(encode(spec_header_v4()))
        self.assertEqual(
            [t for t, _ in header.tlvs],
            [
                PP2_TYPE_ALPN,
                PP2_TYPE_AUTHORITY,
                PP2_TYPE_UNIQUE_ID,
                PP2_TYPE_SSL,
                CUSTOM,
                PP2_TYPE_CRC32C,
            ],
        )
        self.assertEqual(rest, b"")

    def test_ssl_info_bytes(self) -> None:
        """
        SSLInfo.to_bytes() is client (u8), verify (u32 BE), then sub-TLVs
        VERSION, CN, CIPHER, SIG_ALG, KEY_ALG; unset fields are left out.
        """
        info = SSLInfo(client=0x07, verify=0x01020304, version="TLSv1.3", cipher="X")
        self.assertEqual(
            info.to_bytes(),
            bytes.fromhex("07" "01020304" "210007") + b"TLSv1.3" + bytes.fromhex("230001") + b"X",
        )
        self.assertEqual(
            SSL_FULL.to_bytes(),
            b"\x07\x00\x00\x00\x00"
            + b"\x21\x00\x07TLSv1.3"
            + b"\x22\x00\x13client.example.test"
            + b"\x23\x00\x16TLS_AES_128_GCM_SHA256"
            + b"\x24\x00\x0cECDSA-SHA256"
            + b"\x25\x00\x05EC256",
        )

    def test_reencode_is_identity(self) -> None:
        """
        A decoded header (CRC32C TLV included) re-encoded with crc32c=False
        gives back the exact bytes it was decoded from.
        """
        data = encode(spec_header_v6())
        header, _ = parse(data)
        self.assertEqual(encode(header, crc32c=False), data)


class EncodeErrorTests(SynchronousTestCase):
    """encode() refuses what it cannot write faithfully."""

    def test_mixed_families(self) -> None:
        """An IPv4 source with an IPv6 destination is a ValueError."""
        with self.assertRaises(ValueError):
            encode(ProxyHeader(source=("192.0.2.1", 1), destination=("2001:db8::1", 2)))

    def test_one_address_missing(self) -> None:
        """A source without a destination (or the reverse) is a ValueError."""
        with self.assertRaises(ValueError):
            encode(ProxyHeader(source=("192.0.2.1", 1)))
        with self.assertRaises(ValueError):
            encode(ProxyHeader(destination=("192.0.2.1", 1)))

    def test_bad_addresses(self) -> None:
        """Names, scoped IPv6 and ports outside 0..65535 are ValueErrors."""
        sources = [
            ("example.test", 1), ("fe80::1%eth0", 1), ("192.0.2.1", 65536), ("192.0.2.1", -1)
        ]
        for source in sources:
            with self.assertRaises(ValueError, msg=repr(source)):
                encode(ProxyHeader(source=source, destination=("192.0.2.2", 2)))

    def test_tlv_value_too_long(self) -> None:
        """A TLV value of 65536 bytes is a ValueError."""
        with self.assertRaises(ValueError):
            encode(ProxyHeader(tlvs=((CUSTOM, b"x" * 65536),)), crc32c=False)

    def test_total_length_bound(self) -> None:
        """
        The body may be exactly 65535 bytes (addresses + TLVs + CRC); one
        byte more is a ValueError.
        """
        addresses = {"source": ("192.0.2.1", 1), "destination": ("192.0.2.2", 2)}
        fits = 65535 - 12 - 3 - 7
        data = encode(ProxyHeader(tlvs=((CUSTOM, b"x" * fits),), **addresses))
        self.assertEqual(len(data), 16 + 65535)
        self.assertEqual(parse(data)[0].get(CUSTOM), b"x" * fits)
        with self.assertRaises(ValueError):
            encode(ProxyHeader(tlvs=((CUSTOM, b"x" * (fits + 1)),), **addresses))

    def test_crc_already_present(self) -> None:
        """
        A CRC32C TLV in header.tlvs is refused with crc32c=True (it would be
        duplicated) and written as given with crc32c=False.
        """
        header = ProxyHeader(tlvs=((PP2_TYPE_CRC32C, b"\x00\x00\x00\x00"),))
        with self.assertRaises(ValueError):
            encode(header)
        self.assertEqual(encode(header, crc32c=False)[-7:], b"\x03\x00\x04\x00\x00\x00\x00")

    def test_fixed_meaning_tlvs_validated(self) -> None:
        """
        encode() refuses the TLV values its decoder would refuse: a
        non-UTF-8 AUTHORITY, a UNIQUE_ID over 128 bytes, a malformed SSL
        value, a TLV type outside 0..255.
        """
        for tlv in [
            (PP2_TYPE_AUTHORITY, b"\xff"),
            (PP2_TYPE_UNIQUE_ID, b"u" * 129),
            (PP2_TYPE_SSL, b"\x01\x00"),
            (256, b""),
        ]:
            with self.assertRaises(ValueError, msg=repr(tlv)):
                encode(ProxyHeader(tlvs=(tlv,)))
        encode(ProxyHeader(tlvs=((PP2_TYPE_UNIQUE_ID, b"u" * 128),)))

    def test_ssl_info_ranges(self) -> None:
        """SSLInfo.to_bytes() refuses flags over a byte, verify over 32 bits, non-ASCII versions."""
        for info in [SSLInfo(client=256), SSLInfo(verify=2**32), SSLInfo(version="TLSv1.3\u00e9")]:
            with self.assertRaises(ValueError, msg=repr(info)):
                info.to_bytes()


class EncodeProxyTests(SynchronousTestCase):
    """encode_proxy() is encode() of a PROXY header, without the header value."""

    def test_same_bytes(self) -> None:
        """
        For IPv4 and IPv6 pairs, ports 0 and 65535, with and without TLVs,
        encode_proxy writes exactly what encode writes of the same header.
        """
        pairs = [
            (("192.0.2.1", 0), ("198.51.100.2", 65535)),
            (("2001:db8::1", 65535), ("2001:db8::2", 0)),
            (("::ffff:192.0.2.1", 443), ("2001:db8::2", 8443)),
        ]
        tlv_sets = [
            [],
            [(PP2_TYPE_UNIQUE_ID, b"u" * 24), (CUSTOM, b"token")],
            [(PP2_TYPE_ALPN, b"h2"), (PP2_TYPE_AUTHORITY, "b\u00fccher.test".encode()), (PP2_TYPE_UNIQUE_ID, b"u" * 128)],
        ]
        for source, destination in pairs:
            for tlvs in tlv_sets:
                expected = encode(ProxyHeader(source=source, destination=destination, tlvs=tlvs))
                self.assertEqual(proxyv2.encode_proxy(source, destination, tlvs), expected, (source, tlvs))
                canonical = (str(ipaddress.ip_address(source[0])), source[1])
                self.assertEqual(parse(expected)[0].source, canonical)

    def test_same_refusals(self) -> None:
        """
        What encode refuses, encode_proxy refuses with the same message: a
        name, a scoped address, ports -1 and 65536 and a bool, mixed
        families, a fixed-meaning TLV its decoder would refuse, a CRC32C TLV.
        """
        good = ("192.0.2.2", 2)
        cases = [
            (("example.test", 1), good, []),
            (("fe80::1%eth0", 1), ("fe80::2", 2), []),
            (("192.0.2.1", -1), good, []),
            (("192.0.2.1", 65536), good, []),
            (("192.0.2.1", True), good, []),
            (good, (b"192.0.2.1", 1), []),
            (("192.0.2.1", 1), ("2001:db8::1", 2), []),
            (("192.0.2.1", 1), good, [(PP2_TYPE_UNIQUE_ID, b"u" * 129)]),
            (("192.0.2.1", 1), good, [(PP2_TYPE_AUTHORITY, b"\xff")]),
            (("192.0.2.1", 1), good, [(PP2_TYPE_CRC32C, b"\x00" * 4)]),
            (("192.0.2.1", 1), good, [(256, b"")]),
        ]
        for source, destination, tlvs in cases:
            with self.assertRaises(ValueError) as theirs:
                encode(ProxyHeader(source=source, destination=destination, tlvs=tlvs))
            with self.assertRaises(ValueError) as ours:
                proxyv2.encode_proxy(source, destination, tlvs)
            self.assertEqual(str(ours.exception), str(theirs.exception))


class TheirParserTests(SynchronousTestCase):
    """What encode() writes, proxyprotocol reads the same way."""

    def assert_spec_tlvs(self, tlv: ProxyProtocolTLV) -> None:
        self.assertEqual(tlv.alpn, b"h2")
        self.assertEqual(tlv.authority, "api.example.test")
        self.assertEqual(tlv.unique_id, CONNECTION_ID)
        self.assertEqual(tlv[CUSTOM], JWS)
        ssl = tlv.ssl
        self.assertEqual(ssl.client, SSL_FULL.client)
        self.assertTrue(ssl.has_ssl and ssl.has_cert_conn and ssl.has_cert_sess)
        self.assertTrue(ssl.verified)
        self.assertEqual(
            (ssl.version, ssl.cn, ssl.cipher, ssl.sig_alg, ssl.key_alg),
            (SSL_FULL.version, SSL_FULL.cn, SSL_FULL.cipher, SSL_FULL.sig_alg, SSL_FULL.key_alg),
        )

    def test_ipv4(self) -> None:
        """
        proxyprotocol decodes our IPv4 header to the same addresses, STREAM,
        every SPEC TLV (ALPN, AUTHORITY, UNIQUE_ID, SSL and its sub-TLVs,
        0xE0), and a CRC32C equal to the reference checksum.
        """
        data = encode(spec_header_v4())
        result = ProxyProtocolV2().unpack(data)
        self.assertIsInstance(result, ProxyResultIPv4)
        self.assertEqual(result.source, (IPv4Address("203.0.113.9"), 51000))
        self.assertEqual(result.dest, (IPv4Address("192.0.2.10"), 8443))
        self.assertEqual(result.protocol, socket.SOCK_STREAM)
        self.assert_spec_tlvs(result.tlv)
        self.assertEqual(result.tlv.crc32c, crc_of_header(data, len(data) - 4))

    def test_ipv6(self) -> None:
        """The same holds for an IPv6 header."""
        data = encode(spec_header_v6())
        result = ProxyProtocolV2().unpack(data)
        self.assertIsInstance(result, ProxyResultIPv6)
        self.assertEqual(result.source, (IPv6Address("2001:db8::9"), 51000))
        self.assertEqual(result.dest, (IPv6Address("2001:db8:1::10"), 8443))
        self.assert_spec_tlvs(result.tlv)
        self.assertEqual(result.tlv.crc32c, crc_of_header(data, len(data) - 4))

    def test_their_checksum_accepts_ours(self) -> None:
        """
        With a checksum function installed, proxyprotocol verifies our CRC32C
        and rejects the header once an address bit is flipped.

        proxyprotocol re-serializes TLVs sorted by type before checksumming,
        so its verification only matches wire order when every TLV type is
        below CRC32C's (ALPN, AUTHORITY); the SPEC order is checked against
        the reference checksum in the other tests.  It has no parameter for
        the checksum function, hence the patch of its module global.
        """
        self.patch(proxyprotocol.tlv, "crc32c_checksum", reference_crc32c)
        header = ProxyHeader(
            source=("203.0.113.9", 51000),
            destination=("192.0.2.10", 8443),
            tlvs=((PP2_TYPE_ALPN, b"h2"), (PP2_TYPE_AUTHORITY, b"api.example.test")),
        )
        data = encode(header)
        result = ProxyProtocolV2().unpack(data)
        self.assertEqual(result.tlv.authority, "api.example.test")
        corrupted = bytearray(data)
        corrupted[16] ^= 0x01
        with self.assertRaises(proxyprotocol.ProxyProtocolChecksumError):
            ProxyProtocolV2().unpack(bytes(corrupted))

    def test_local(self) -> None:
        """proxyprotocol reads local_header() as an unproxied (LOCAL) connection with a CRC32C."""
        data = local_header()
        result = ProxyProtocolV2().unpack(data)
        self.assertIsInstance(result, ProxyResultLocal)
        self.assertFalse(result.proxied)
        self.assertEqual(result.tlv.crc32c, crc_of_header(data, 19))


class OurParserOfTheirsTests(SynchronousTestCase):
    """What proxyprotocol writes, our parser reads the same way."""

    def their_tlv(self) -> ProxyProtocolTLV:
        ssl = ProxyProtocolSSLTLV(
            has_ssl=True,
            has_cert_conn=True,
            verified=False,
            version="TLSv1.2",
            cn="Client CN \u00e9",
            cipher="ECDHE-RSA-AES128-GCM-SHA256",
            sig_alg="SHA256",
            key_alg="RSA2048",
        )
        return ProxyProtocolTLV(
            init={CUSTOM: JWS},
            alpn=b"http/1.1",
            authority="web.example.test",
            unique_id=CONNECTION_ID,
            ssl=ssl,
        )

    def assert_their_tlvs(self, header: ProxyHeader) -> None:
        self.assertEqual(header.alpn, b"http/1.1")
        self.assertEqual(header.authority, "web.example.test")
        self.assertEqual(header.unique_id, CONNECTION_ID.decode())
        self.assertEqual(header.get(CUSTOM), JWS)
        self.assertEqual(
            header.ssl,
            SSLInfo(
                client=PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN,
                verify=1,
                version="TLSv1.2",
                cn="Client CN \u00e9",
                cipher="ECDHE-RSA-AES128-GCM-SHA256",
                sig_alg="SHA256",
                key_alg="RSA2048",
            ),
        )

    def test_ipv4_with_their_crc(self) -> None:
        """
        A header proxyprotocol packs with a CRC32C (which it places by type
        order, in the middle of the TLVs) parses here: addresses, TLVs, and
        a CRC that our decoder verified.
        """
        self.patch(proxyprotocol.tlv, "crc32c_checksum", reference_crc32c)
        result = ProxyResultIPv4(
            (IPv4Address("198.51.100.20"), 40000),
            (IPv4Address("192.0.2.1"), 443),
            protocol=socket.SOCK_STREAM,
            tlv=self.their_tlv(),
        )
        data = ProxyProtocolV2().pack(result)
        header, rest = parse(data + b"payload", require_crc32c=True)
        self.assertEqual(rest, b"payload")
        self.assertEqual(header.command, Command.PROXY)
        self.assertEqual(header.source, ("198.51.100.20", 40000))
        self.assertEqual(header.destination, ("192.0.2.1", 443))
        self.assertEqual(header.family, "INET")
        types = [t for t, _ in header.tlvs]
        self.assertIn(PP2_TYPE_CRC32C, types)
        self.assertNotEqual(types[-1], PP2_TYPE_CRC32C)
        self.assert_their_tlvs(header)
        corrupted = bytearray(data)
        corrupted[-1] ^= 0x80
        with self.assertRaises(InvalidProxyHeader) as caught:
            parse(bytes(corrupted))
        self.assertEqual(caught.exception.reason, "bad_crc")

    def test_ipv6_without_crc(self) -> None:
        """An IPv6 header proxyprotocol packs without a CRC parses here too."""
        result = ProxyResultIPv6(
            (IPv6Address("2001:db8::20"), 40000),
            (IPv6Address("::1"), 443),
            protocol=socket.SOCK_STREAM,
            tlv=self.their_tlv(),
        )
        header, rest = parse(ProxyProtocolV2().pack(result))
        self.assertEqual(rest, b"")
        self.assertEqual(header.source, ("2001:db8::20", 40000))
        self.assertEqual(header.destination, ("::1", 443))
        self.assertEqual(header.family, "INET6")
        self.assertIsNone(header.get(PP2_TYPE_CRC32C))
        self.assert_their_tlvs(header)

    def test_local(self) -> None:
        """proxyprotocol's LOCAL header parses as LOCAL without addresses."""
        header, _ = parse(ProxyProtocolV2().pack(ProxyResultLocal()))
        self.assertEqual(header.command, Command.LOCAL)
        self.assertIsNone(header.source)
        self.assertEqual(header.family, "UNSPEC")

    def test_v1(self) -> None:
        """proxyprotocol's v1 lines (TCP4, TCP6, UNKNOWN) parse here as version 1."""
        v1 = ProxyProtocolV1()
        header, _ = parse(
            v1.pack(ProxyResultIPv4((IPv4Address("10.1.2.3"), 5), (IPv4Address("10.3.2.1"), 6))),
            accept_v1=True,
        )
        self.assertEqual(
            (header.source, header.destination, header.version),
            (("10.1.2.3", 5), ("10.3.2.1", 6), 1),
        )
        header, _ = parse(
            v1.pack(ProxyResultIPv6((IPv6Address("2001:db8::1"), 65535), (IPv6Address("::"), 0))),
            accept_v1=True,
        )
        self.assertEqual((header.source, header.destination), (("2001:db8::1", 65535), ("::", 0)))
        header, _ = parse(v1.pack(ProxyResultUnknown()), accept_v1=True)
        self.assertEqual((header.command, header.source, header.version), (Command.PROXY, None, 1))


class IncrementalTests(SynchronousTestCase):
    """HeaderParser takes bytes as they arrive and hands back the rest."""

    def test_byte_at_a_time(self) -> None:
        """
        Fed one byte at a time, the parser answers None until the very last
        byte of the header, then returns the same header parse() gives.
        """
        data = encode(spec_header_v4())
        parser = HeaderParser()
        for index in range(len(data) - 1):
            self.assertIsNone(parser.feed(data[index : index + 1]), f"byte {index}")
            self.assertIsNone(parser.header)
        header = parser.feed(data[-1:])
        self.assertEqual(header, parse(data)[0])
        self.assertEqual(parser.rest, b"")

    def test_v1_byte_at_a_time(self) -> None:
        """A v1 line fed byte by byte completes exactly on its LF."""
        data = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"
        parser = HeaderParser(accept_v1=True)
        for index in range(len(data) - 1):
            self.assertIsNone(parser.feed(data[index : index + 1]), f"byte {index}")
        header = parser.feed(data[-1:])
        assert header is not None, "no header on the final LF"
        self.assertEqual(header.source, ("2001:db8::1", 1))

    def test_rest_preserved(self) -> None:
        """
        Bytes after the header, arriving in the same chunk as its end, come
        back in ``rest`` exactly, whatever the split.
        """
        payload = bytes(range(256)) + SIGNATURE + b"PROXY "
        data = encode(spec_header_v6())
        for cut in [1, 12, 16, 17, len(data) - 1]:
            parser = HeaderParser()
            self.assertIsNone(parser.feed(data[:cut]))
            self.assertIsNotNone(parser.feed(data[cut:] + payload))
            self.assertEqual(parser.rest, payload, f"cut {cut}")

    def test_rest_preserved_v1(self) -> None:
        """The same holds after a v1 line."""
        parser = HeaderParser(accept_v1=True)
        parser.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r")
        self.assertIsNotNone(parser.feed(b"\nGET / HTTP/1.1\r\n\r\n"))
        self.assertEqual(parser.rest, b"GET / HTTP/1.1\r\n\r\n")

    def test_empty_feed(self) -> None:
        """Feeding nothing, before or during a header, changes nothing."""
        parser = HeaderParser(accept_v1=True)
        self.assertIsNone(parser.feed(b""))
        self.assertIsNone(parser.feed(SIGNATURE[:3]))
        self.assertIsNone(parser.feed(b""))
        self.assertIsNotNone(parser.feed(local_header()[3:]))

    def test_feed_after_header(self) -> None:
        """Feeding again once a header was returned is a programming error."""
        parser = HeaderParser()
        parser.feed(local_header())
        with self.assertRaises(RuntimeError):
            parser.feed(b"x")

    def test_error_is_sticky(self) -> None:
        """After an InvalidProxyHeader, every further feed raises it again."""
        parser = HeaderParser()
        with self.assertRaises(InvalidProxyHeader) as first:
            parser.feed(b"X")
        with self.assertRaises(InvalidProxyHeader) as second:
            parser.feed(local_header())
        self.assertIs(second.exception, first.exception)

    def test_parse_truncated(self) -> None:
        """parse() of any proper prefix of a header is "truncated"."""
        data = encode(spec_header_v4())
        for length in range(len(data)):
            with self.assertRaises(InvalidProxyHeader, msg=str(length)) as caught:
                parse(data[:length])
            self.assertEqual(caught.exception.reason, "truncated")


class EarlyRejectionTests(SynchronousTestCase):
    """The parser fails on the first byte that rules a header out."""

    def test_wrong_first_byte(self) -> None:
        """A single wrong first byte (say, a TLS record) fails at once."""
        for accept_v1 in (False, True):
            with self.assertRaises(InvalidProxyHeader) as caught:
                HeaderParser(accept_v1=accept_v1).feed(b"\x16")
            self.assertEqual(caught.exception.reason, "bad_signature")

    def test_wrong_byte_at_each_signature_position(self) -> None:
        """
        For every position of the 12-byte signature, the correct bytes before
        it are accepted one by one and a wrong byte there fails immediately,
        naming the position.
        """
        for position in range(len(SIGNATURE)):
            parser = HeaderParser()
            for index in range(position):
                self.assertIsNone(parser.feed(SIGNATURE[index : index + 1]))
            wrong = bytes([SIGNATURE[position] ^ 0x40])
            with self.assertRaises(InvalidProxyHeader) as caught:
                parser.feed(wrong)
            self.assertEqual(caught.exception.reason, "bad_signature")
            if position:
                self.assertIn(f"byte {position}", str(caught.exception))

    def test_wrong_byte_inside_a_larger_chunk(self) -> None:
        """A chunk carrying a bad signature byte fails, whatever follows it."""
        with self.assertRaises(InvalidProxyHeader) as caught:
            HeaderParser().feed(SIGNATURE[:5] + b"X" + local_header()[6:])
        self.assertIn("byte 5", str(caught.exception))

    def test_fixed_fields(self) -> None:
        """
        The version, command, family and length bytes are each checked as
        soon as they arrive: bad version nibble, unknown command, undefined
        family byte, and a length shorter than the family's addresses.
        """
        cases = [
            (b"\x11", "bad_version"),
            (b"\x31", "bad_version"),
            (b"\x22", "bad_command"),
            (b"\x21\x13", "bad_family"),
            (b"\x21\x41", "bad_family"),
            (b"\x21\x01", "bad_family"),
            (b"\x21\x10", "bad_family"),
            (b"\x21\x11\x00\x0b", "bad_length"),
            (b"\x21\x21\x00\x23", "bad_length"),
            (b"\x20\x31\x00\xd7", "bad_length"),
        ]
        for tail, reason in cases:
            with self.assertRaises(InvalidProxyHeader, msg=repr(tail)) as caught:
                HeaderParser().feed(SIGNATURE + tail)
            self.assertEqual(caught.exception.reason, reason, repr(tail))

    def test_v1_refused_by_default(self) -> None:
        """Without accept_v1, a v1 line fails on its first byte, saying so."""
        with self.assertRaises(InvalidProxyHeader) as caught:
            HeaderParser().feed(b"P")
        self.assertEqual(caught.exception.reason, "bad_signature")
        self.assertIn("v1", str(caught.exception))

    def test_v2_refused_when_only_v1(self) -> None:
        """With accept_v2=False, a v2 signature fails on its first byte."""
        with self.assertRaises(InvalidProxyHeader):
            HeaderParser(accept_v1=True, accept_v2=False).feed(b"\r")
        self.assertIsNotNone(
            HeaderParser(accept_v1=True, accept_v2=False).feed(b"PROXY UNKNOWN\r\n")
        )

    def test_v1_early(self) -> None:
        """
        A v1 line fails on the byte that makes it impossible (a wrong letter
        of "PROXY ", an unknown protocol, a character no address or port can
        hold, a CR not followed by LF), every byte before it being accepted.
        """
        cases = [
            (b"PROX", b"y"),
            (b"PROXY T", b"X"),
            (b"PROXY TCP", b"5"),
            (b"PROXY UNKNOWN", b"X"),
            (b"PROXY TCP4 1.2.3.4", b"x"),
            (b"PROXY TCP6 ::1 ::", b"g"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", b"x"),
        ]
        for good, bad in cases:
            parser = HeaderParser(accept_v1=True)
            for index in range(len(good)):
                self.assertIsNone(parser.feed(good[index : index + 1]), repr(good))
            with self.assertRaises(InvalidProxyHeader, msg=repr(good + bad)):
                parser.feed(bad)

    def test_no_flags(self) -> None:
        """A parser accepting neither version, or with max_size under 16, is refused."""
        with self.assertRaises(ValueError):
            HeaderParser(accept_v1=False, accept_v2=False)
        with self.assertRaises(ValueError):
            HeaderParser(max_size=15)


class SizeBoundTests(SynchronousTestCase):
    """max_size bounds what the parser will buffer."""

    def test_max_size(self) -> None:
        """
        A header of N bytes passes with max_size=N, and with max_size=N-1
        fails as "too_large" as soon as its 16 fixed bytes are in.
        """
        data = encode(spec_header_v4())
        self.assertIsNotNone(HeaderParser(max_size=len(data)).feed(data))
        parser = HeaderParser(max_size=len(data) - 1)
        self.assertIsNone(parser.feed(data[:15]))
        with self.assertRaises(InvalidProxyHeader) as caught:
            parser.feed(data[15:16])
        self.assertEqual(caught.exception.reason, "too_large")

    def test_v1_line_bound(self) -> None:
        """
        A v1 line of 107 bytes (CRLF included) passes; without an LF within
        107 bytes the parser fails as "too_large" on the 107th byte.
        """
        line = b"PROXY UNKNOWN " + b"x" * (107 - 16) + b"\r\n"
        self.assertEqual(len(line), 107)
        self.assertIsNotNone(HeaderParser(accept_v1=True).feed(line))
        parser = HeaderParser(accept_v1=True)
        long_line = line[:-2] + b"xx\r\n"
        self.assertIsNone(parser.feed(long_line[:106]))
        with self.assertRaises(InvalidProxyHeader) as caught:
            parser.feed(long_line[106:])
        self.assertEqual(caught.exception.reason, "too_large")

    def test_v1_longest_tcp6(self) -> None:
        """The longest TCP6 line the specification allows (104 bytes) parses."""
        full = ":".join(["ffff"] * 8)
        line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
        self.assertEqual(len(line), 104)
        header, _ = parse(line, accept_v1=True)
        self.assertEqual(header.source, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535))


class ChecksumTests(SynchronousTestCase):
    """A CRC32C TLV, when present, must match."""

    def test_every_bit_flip_detected(self) -> None:
        """
        With require_crc32c, flipping any single bit anywhere in a header
        (signature, fixed fields, addresses, TLV types, lengths, values or
        the CRC itself) makes it invalid.
        """
        data = encode(spec_header_v4())
        for bit in range(len(data) * 8):
            corrupted = bytearray(data)
            corrupted[bit // 8] ^= 1 << (bit % 8)
            with self.assertRaises(InvalidProxyHeader, msg=f"bit {bit}"):
                parse(bytes(corrupted), require_crc32c=True)

    def test_value_bit_flip_is_bad_crc(self) -> None:
        """
        Flipping any bit of the address block or of any TLV value (including
        values whose meaning the decoder also checks, and the CRC field) is
        reported as "bad_crc".
        """
        data = encode(spec_header_v6())
        header, _ = parse(data)
        value_ranges = [(16, 16 + 36)]
        offset = 16 + 36
        for _, value in header.tlvs:
            value_ranges.append((offset + 3, offset + 3 + len(value)))
            offset += 3 + len(value)
        for start, end in value_ranges:
            for bit in range(start * 8, end * 8):
                corrupted = bytearray(data)
                corrupted[bit // 8] ^= 1 << (bit % 8)
                with self.assertRaises(InvalidProxyHeader, msg=f"bit {bit}") as caught:
                    parse(bytes(corrupted))
                self.assertEqual(caught.exception.reason, "bad_crc", f"bit {bit}")

    def test_crc_optional_unless_required(self) -> None:
        """
        A header without a CRC32C is accepted by default and refused as
        "missing_crc" with require_crc32c; a v1 line, which cannot carry
        one, is refused too.
        """
        data = encode(spec_header_v4(), crc32c=False)
        self.assertIsNone(parse(data)[0].get(PP2_TYPE_CRC32C))
        for blob, accept_v1 in [(data, False), (b"PROXY UNKNOWN\r\n", True)]:
            with self.assertRaises(InvalidProxyHeader) as caught:
                parse(blob, accept_v1=accept_v1, require_crc32c=True)
            self.assertEqual(caught.exception.reason, "missing_crc")

    def test_crc_tlv_malformed(self) -> None:
        """A CRC32C TLV that is not 4 bytes, or a second one, is "bad_tlv"."""
        for tlvs in [((PP2_TYPE_CRC32C, b"\x00" * 3),), ((PP2_TYPE_CRC32C, b"\x00" * 4),) * 2]:
            body = b"".join(struct.pack("!BH", t, len(v)) + v for t, v in tlvs)
            data = SIGNATURE + struct.pack("!BBH", 0x21, 0x00, len(body)) + body
            with self.assertRaises(InvalidProxyHeader) as caught:
                parse(data)
            self.assertEqual(caught.exception.reason, "bad_tlv")


def raw_v2(family: int, addresses: bytes, tlv_area: bytes, command: int = 1) -> bytes:
    """Assemble a v2 header by hand, without a CRC."""
    body = addresses + tlv_area
    return SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


INET_ADDRESSES = bytes.fromhex("c0000201" "c0000202" "0001" "0002")


class DecodeTests(SynchronousTestCase):
    """Decoding rules beyond the round trip."""

    def test_tlv_past_end(self) -> None:
        """A TLV declaring more bytes than the header holds is "bad_tlv"."""
        data = raw_v2(0x11, INET_ADDRESSES, b"\xe0\x00\x0aabcde")
        with self.assertRaises(InvalidProxyHeader) as caught:
            parse(data + b"fghij")
        self.assertEqual(caught.exception.reason, "bad_tlv")

    def test_stray_bytes_after_tlvs(self) -> None:
        """One or two bytes after the last TLV, too few for a TLV, are "bad_tlv"."""
        for stray in (b"\x04", b"\x04\x00"):
            with self.assertRaises(InvalidProxyHeader) as caught:
                parse(raw_v2(0x11, INET_ADDRESSES, b"\x04\x00\x00" + stray))
            self.assertEqual(caught.exception.reason, "bad_tlv")

    def test_fixed_meaning_tlv_values(self) -> None:
        """Invalid AUTHORITY, UNIQUE_ID and SSL values are "bad_tlv"."""
        for tlv in [
            b"\x02\x00\x01\xff",
            b"\x05\x00\x81" + b"u" * 129,
            b"\x20\x00\x08\x01\x00\x00\x00\x00\x21\x00\x05",
        ]:
            with self.assertRaises(InvalidProxyHeader, msg=repr(tlv)) as caught:
                parse(raw_v2(0x11, INET_ADDRESSES, tlv))
            self.assertEqual(caught.exception.reason, "bad_tlv")

    def test_local_ignores_addresses(self) -> None:
        """
        A LOCAL header carrying INET addresses decodes with no addresses but
        keeps its TLVs, whose CRC is still checked.
        """
        header = ProxyHeader(
            command=Command.LOCAL,
            source=("192.0.2.1", 1),
            destination=("192.0.2.2", 2),
            tlvs=((CUSTOM, b"v"),),
        )
        data = encode(header)
        decoded, _ = parse(data)
        self.assertEqual(decoded.command, Command.LOCAL)
        self.assertIsNone(decoded.source)
        self.assertIsNone(decoded.destination)
        self.assertEqual(decoded.tlvs[0], (CUSTOM, b"v"))
        corrupted = bytearray(data)
        corrupted[20] ^= 1
        with self.assertRaises(InvalidProxyHeader) as caught:
            parse(bytes(corrupted))
        self.assertEqual(caught.exception.reason, "bad_crc")

    def test_unix_and_dgram(self) -> None:
        """
        UNIX addresses decode as (path, 0) with family "UNIX"; DGRAM is an
        accepted transport.
        """
        addresses = b"/run/a.sock".ljust(108, b"\x00") + b"/run/b.sock".ljust(108, b"\x00")
        header, _ = parse(raw_v2(0x31, addresses, b""))
        self.assertEqual(
            (header.source, header.destination), (("/run/a.sock", 0), ("/run/b.sock", 0))
        )
        self.assertEqual(header.family, "UNIX")
        header, _ = parse(raw_v2(0x12, INET_ADDRESSES, b""))
        self.assertEqual(header.source, ("192.0.2.1", 1))

    def test_unspec_with_tlvs(self) -> None:
        """A PROXY UNSPEC header has no addresses; everything after the fixed part is TLVs."""
        header, _ = parse(raw_v2(0x00, b"", b"\xe0\x00\x01z"))
        self.assertEqual((header.source, header.family, header.get(CUSTOM)), (None, "UNSPEC", b"z"))

    def test_accessors(self) -> None:
        """
        get() returns the first TLV of a type; the accessors decode
        AUTHORITY, UNIQUE_ID (non-ASCII bytes replaced), ALPN and SSL, and
        are None when absent.
        """
        header = ProxyHeader(
            tlvs=(
                (CUSTOM, b"first"),
                (CUSTOM, b"second"),
                (PP2_TYPE_AUTHORITY, "\u00e9.test".encode()),
                (PP2_TYPE_UNIQUE_ID, b"id\xff"),
            )
        )
        self.assertEqual(header.get(CUSTOM), b"first")
        self.assertEqual(header.authority, "\u00e9.test")
        self.assertEqual(header.unique_id, "id\ufffd")
        self.assertIsNone(header.alpn)
        self.assertIsNone(header.ssl)
        self.assertIsNone(ProxyHeader().authority)

    def test_family(self) -> None:
        """family follows the addresses."""
        self.assertEqual(spec_header_v4().family, "INET")
        self.assertEqual(spec_header_v6().family, "INET6")
        self.assertEqual(ProxyHeader().family, "UNSPEC")

    def test_ssl_info_parsing(self) -> None:
        """
        SSLInfo.from_bytes() skips unknown sub-TLVs, keeps the first of a
        repeated one, and refuses a short prefix, an overrunning sub-TLV or
        a non-ASCII VERSION.
        """
        value = b"\x01\x00\x00\x00\x00" + b"\x2f\x00\x01z" + b"\x21\x00\x01A" + b"\x21\x00\x01B"
        self.assertEqual(SSLInfo.from_bytes(value), SSLInfo(client=1, version="A"))
        for bad in [
            b"\x01\x00\x00\x00",
            b"\x01\x00\x00\x00\x00\x21\x00\x02A",
            b"\x01\x00\x00\x00\x00\x21\x00\x01\xff",
        ]:
            with self.assertRaises(InvalidProxyHeader, msg=repr(bad)):
                SSLInfo.from_bytes(bad)

    def test_format_hostport(self) -> None:
        """format_hostport brackets IPv6 and only IPv6."""
        self.assertEqual(format_hostport("192.0.2.1", 80), "192.0.2.1:80")
        self.assertEqual(format_hostport("2001:db8::1", 443), "[2001:db8::1]:443")

    def test_error_fields(self) -> None:
        """InvalidProxyHeader carries a message and a slug, and the default slug."""
        error = InvalidProxyHeader("peer 192.0.2.1 not trusted", reason="untrusted")
        self.assertEqual((str(error), error.reason), ("peer 192.0.2.1 not trusted", "untrusted"))
        self.assertEqual(InvalidProxyHeader("x").reason, "invalid")


class V1Tests(SynchronousTestCase):
    """The v1 text format, when accepted."""

    def test_accepted(self) -> None:
        """TCP4, TCP6, and both UNKNOWN forms decode, with version 1."""
        cases = [
            (
                b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\r\n",
                ("192.0.2.1", 56324),
                ("192.0.2.2", 443),
            ),
            (
                b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
                ("0.0.0.0", 0),
                ("255.255.255.255", 65535),
            ),
            (
                b"PROXY TCP6 2001:DB8::1 ::ffff:192.0.2.1 1 2\r\n",
                ("2001:db8::1", 1),
                (str(IPv6Address("::ffff:192.0.2.1")), 2),
            ),
            (b"PROXY UNKNOWN\r\n", None, None),
            (b"PROXY UNKNOWN 1.2.3.4 what ever\r\n", None, None),
        ]
        for line, source, destination in cases:
            header, rest = parse(line + b"rest", accept_v1=True)
            self.assertEqual(
                (
                    header.command,
                    header.source,
                    header.destination,
                    header.version,
                    header.tlvs,
                    rest,
                ),
                (Command.PROXY, source, destination, 1, (), b"rest"),
                repr(line),
            )

    def test_refused_without_flag(self) -> None:
        """The same lines are refused by a v2-only parser."""
        with self.assertRaises(InvalidProxyHeader):
            parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n")

    def test_edge_cases(self) -> None:
        """
        Strict v1 validation refuses: leading zeros in ports or octets,
        ports over 65535, signs, the wrong family for the address, missing
        or extra fields, double or trailing spaces, tabs, lowercase tokens,
        scoped IPv6, a bare LF, UNKNOWN glued to more letters, and an empty
        protocol.
        """
        bad = [
            b"PROXY TCP4 192.0.2.1 192.0.2.2 080 443\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80 65536\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 +80 443\r\n",
            b"PROXY TCP4 192.0.2.01 192.0.2.2 80 443\r\n",
            b"PROXY TCP4 192.0.2 192.0.2.2 80 443\r\n",
            b"PROXY TCP4 2001:db8::1 192.0.2.2 80 443\r\n",
            b"PROXY TCP6 192.0.2.1 2001:db8::2 80 443\r\n",
            b"PROXY TCP6 fe80::1%eth0 2001:db8::2 80 443\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80 443 1\r\n",
            b"PROXY TCP4 192.0.2.1  192.0.2.2 80 443\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80 443 \r\n",
            b"PROXY TCP4\t192.0.2.1 192.0.2.2 80 443\r\n",
            b"PROXY tcp4 192.0.2.1 192.0.2.2 80 443\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80 443\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 80 4\r43\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY \r\n",
            b"PROXY  TCP4 192.0.2.1 192.0.2.2 80 443\r\n",
            b"PROXYTCP4 192.0.2.1 192.0.2.2 80 443\r\n",
        ]
        for line in bad:
            with self.assertRaises(InvalidProxyHeader, msg=repr(line)):
                parse(line, accept_v1=True)

    def test_both_versions(self) -> None:
        """With both accepted, the first byte chooses the version."""
        self.assertEqual(parse(b"PROXY UNKNOWN\r\n", accept_v1=True)[0].version, 1)
        self.assertEqual(parse(local_header(), accept_v1=True)[0].version, 2)


# Strategies for the property tests.
ports = st.integers(0, 65535)
ascii_text = st.text(alphabet=st.characters(max_codepoint=127), max_size=24)
ssl_infos = st.builds(
    SSLInfo,
    client=st.integers(0, 255),
    verify=st.integers(0, 2**32 - 1),
    version=st.none() | ascii_text,
    cn=st.none() | st.text(max_size=24),
    cipher=st.none() | ascii_text,
    sig_alg=st.none() | ascii_text,
    key_alg=st.none() | ascii_text,
)
opaque_types = st.integers(0, 255).filter(
    lambda t: t not in (PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C, PP2_TYPE_UNIQUE_ID, PP2_TYPE_SSL)
)
tlv_lists = st.lists(
    st.one_of(
        st.tuples(opaque_types, st.binary(max_size=48)),
        st.text(max_size=32).map(lambda s: (PP2_TYPE_AUTHORITY, s.encode())),
        st.binary(max_size=128).map(lambda b: (PP2_TYPE_UNIQUE_ID, b)),
        ssl_infos.map(lambda s: (PP2_TYPE_SSL, s.to_bytes())),
    ),
    max_size=6,
)
address_pairs = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), ports, st.ip_addresses(v=4).map(str), ports),
    st.tuples(st.ip_addresses(v=6).map(str), ports, st.ip_addresses(v=6).map(str), ports),
    st.none(),
)


@st.composite
def headers(draw: st.DrawFn) -> ProxyHeader:
    """A PROXY header with random addresses and TLVs, or a LOCAL header without addresses."""
    tlvs = tuple(draw(tlv_lists))
    if draw(st.booleans()):
        return ProxyHeader(command=Command.LOCAL, tlvs=tlvs)
    pair = draw(address_pairs)
    if pair is None:
        return ProxyHeader(tlvs=tlvs)
    return ProxyHeader(source=(pair[0], pair[1]), destination=(pair[2], pair[3]), tlvs=tlvs)


cut_lists = st.lists(st.integers(0, 400), max_size=8)


class PropertyTests(SynchronousTestCase):
    """Properties over random headers and random bytes."""

    @settings(max_examples=300, deadline=None)
    @given(header=headers(), cuts=cut_lists, trailing=st.binary(max_size=16))
    def test_round_trip(self, header: ProxyHeader, cuts: list[int], trailing: bytes) -> None:
        """
        encode() then the parser, fed in random pieces, gives back the same
        header plus a CRC32C TLV at the end; the trailing bytes come back in
        ``rest``; and re-encoding the decoded header reproduces the bytes.
        """
        data = encode(header)
        parser = HeaderParser(require_crc32c=True)
        decoded, application = feed_in_pieces(parser, data + trailing, cuts)
        assert decoded is not None, "no header from a complete encoding"
        self.assertEqual(decoded.tlvs[-1][0], PP2_TYPE_CRC32C)
        self.assertEqual(without_crc(decoded), header)
        self.assertEqual(application, trailing)
        self.assertEqual(encode(decoded, crc32c=False), data)

    @settings(max_examples=300, deadline=None)
    @given(info=ssl_infos)
    def test_ssl_round_trip(self, info: SSLInfo) -> None:
        """SSLInfo survives to_bytes() then from_bytes() unchanged."""
        self.assertEqual(SSLInfo.from_bytes(info.to_bytes()), info)

    @settings(max_examples=500, deadline=None)
    @given(
        prefix=st.sampled_from(
            [
                b"",
                SIGNATURE,
                SIGNATURE + b"\x21\x11",
                SIGNATURE + b"\x20\x00",
                b"PROXY ",
                b"PROXY TCP4 ",
                b"PROXY TCP6 ",
                b"PROXY UNKNOWN",
            ]
        ),
        data=st.binary(max_size=300),
        cuts=cut_lists,
        accept_v1=st.booleans(),
        require_crc32c=st.booleans(),
    )
    def test_random_bytes(
        self, prefix: bytes, data: bytes, cuts: list[int], accept_v1: bool, require_crc32c: bool
    ) -> None:
        """
        Arbitrary bytes, after a plausible start or not, either give a
        header, ask for more, or raise InvalidProxyHeader; nothing else.
        """
        parser = HeaderParser(accept_v1=accept_v1, require_crc32c=require_crc32c)
        try:
            feed_in_pieces(parser, prefix + data, cuts)
        except InvalidProxyHeader:
            pass

    @settings(max_examples=500, deadline=None)
    @given(
        header=headers(),
        edits=st.lists(
            st.tuples(
                st.integers(0, 10_000),
                st.integers(0, 255),
                st.sampled_from(["set", "insert", "delete"]),
            ),
            min_size=1,
            max_size=4,
        ),
        crc32c=st.booleans(),
    )
    def test_mutated_headers(
        self, header: ProxyHeader, edits: list[tuple[int, int, str]], crc32c: bool
    ) -> None:
        """
        Valid headers with random bytes changed, inserted or deleted either
        parse or raise InvalidProxyHeader; nothing else.
        """
        data = bytearray(encode(header, crc32c=crc32c))
        for position, value, kind in edits:
            position %= len(data) + 1
            if kind == "insert":
                data[position:position] = bytes([value])
            elif position < len(data):
                if kind == "set":
                    data[position] = value
                else:
                    del data[position]
        try:
            parse(bytes(data), accept_v1=True)
        except InvalidProxyHeader:
            pass


def without_crc(header: ProxyHeader) -> ProxyHeader:
    """The header with its trailing CRC32C TLV removed."""
    return ProxyHeader(
        command=header.command,
        source=header.source,
        destination=header.destination,
        tlvs=header.tlvs[:-1],
        version=header.version,
    )


class LayeringTests(SynchronousTestCase):
    """proxyv2 sits on the lowest floor of the project."""

    def test_imports_nothing_of_the_project(self) -> None:
        """
        The module's source has no relative import and no import of shardtcp
        but ``shardtcp.net``, which sits on the same floor (tests.test_net
        checks that it imports nothing of the project).
        """
        import ast

        with open(proxyv2.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                self.assertEqual(node.level, 0, "relative import")
                if node.module == "shardtcp.net":
                    continue
                self.assertFalse((node.module or "").startswith("shardtcp"), node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    self.assertFalse(alias.name.startswith("shardtcp"), alias.name)


class FamilyByteTests(SynchronousTestCase):
    """family and transport report the family byte received, not a guess from the text."""

    def _wire(self, family_byte: int, block: bytes) -> bytes:
        import struct

        return SIGNATURE + bytes([0x21, family_byte]) + struct.pack("!H", len(block)) + block

    def test_dgram(self) -> None:
        """INET over DGRAM decodes with transport DGRAM; over STREAM, STREAM."""
        block = bytes([192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 2])
        for byte, transport in ((0x12, "DGRAM"), (0x11, "STREAM")):
            header, _ = proxyv2.parse(self._wire(byte, block))
            self.assertEqual((header.family, header.transport), ("INET", transport))

    def test_unix_paths_that_look_like_ips(self) -> None:
        """A UNIX header whose paths spell IP addresses is still UNIX."""
        block = b"192.0.2.1".ljust(108, b"\0") + b"192.0.2.2".ljust(108, b"\0")
        header, _ = proxyv2.parse(self._wire(0x31, block))
        self.assertEqual(header.source, ("192.0.2.1", 0))
        self.assertEqual((header.family, header.transport), ("UNIX", "STREAM"))

    def test_in_memory_and_v1(self) -> None:
        """Built headers report what encode writes; v1 lines report TCP4/TCP6 as STREAM."""
        self.assertEqual(ProxyHeader().transport, "UNSPEC")
        built = ProxyHeader(source=("192.0.2.1", 1), destination=("192.0.2.2", 2))
        self.assertEqual((built.family, built.transport), ("INET", "STREAM"))
        header, _ = proxyv2.parse(b"PROXY TCP6 ::1 ::2 1 2\r\n", accept_v1=True)
        self.assertEqual((header.family, header.transport), ("INET6", "STREAM"))
        header, _ = proxyv2.parse(b"PROXY UNKNOWN\r\n", accept_v1=True)
        self.assertEqual((header.family, header.transport), ("UNSPEC", "UNSPEC"))

    def test_family_byte_not_in_equality(self) -> None:
        """A decoded header equals the one it was encoded from."""
        built = ProxyHeader(source=("192.0.2.1", 1), destination=("192.0.2.2", 2))
        decoded, _ = proxyv2.parse(proxyv2.encode(built, crc32c=False))
        self.assertEqual(decoded, built)
        self.assertEqual(decoded.family_byte, 0x11)

    def test_format_hostport_is_nets(self) -> None:
        """proxyv2.format_hostport is shardtcp.net's, re-exported."""
        from shardtcp import net

        self.assertIs(proxyv2.format_hostport, net.format_hostport)
