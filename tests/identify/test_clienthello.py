"""
Tests for shardtcp.identify.clienthello: the incremental ClientHello parser,
its error reasons, and the TLS helpers around it.

Real ClientHellos come from the stdlib ``ssl`` module, run in memory; the
hand-built ones reach the corners real clients do not.
"""

from __future__ import annotations

import functools
import ssl
from typing import Optional, Sequence

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.identify.clienthello import (
    AlertDescription,
    ClientHelloError,
    ClientHelloInfo,
    ClientHelloParser,
    ClientHelloTooLarge,
    MalformedClientHello,
    NotTLS,
    looks_like_tls,
    split_into_records,
    tls_alert,
)
from tests.support import client_hello

# No example database: the tree is shared, and failures print their input.
_PROPERTY = settings(
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def real_hello(
    server_name: Optional[str] = "api.example.test",
    alpn: Sequence[str] = ("h2", "http/1.1"),
    maximum_version: Optional[ssl.TLSVersion] = None,
) -> bytes:
    """The first flight of a real ``ssl`` client, captured in memory."""
    return client_hello(server_name, alpn, maximum_version)


@functools.cache
def cached_real_hello() -> bytes:
    """One real hello, shared by the property tests' many examples."""
    return real_hello()


def u8(value: int) -> bytes:
    return value.to_bytes(1, "big")


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def u24(value: int) -> bytes:
    return value.to_bytes(3, "big")


def vec1(data: bytes) -> bytes:
    return u8(len(data)) + data


def vec2(data: bytes) -> bytes:
    return u16(len(data)) + data


def extension(kind: int, data: bytes) -> bytes:
    return u16(kind) + vec2(data)


def sni_extension(*names: bytes, name_type: int = 0) -> bytes:
    return extension(0, vec2(b"".join(u8(name_type) + vec2(n) for n in names)))


def alpn_extension(*protocols: bytes) -> bytes:
    return extension(16, vec2(b"".join(vec1(p) for p in protocols)))


def versions_extension(*versions: int) -> bytes:
    return extension(43, vec1(b"".join(u16(v) for v in versions)))


def hello_body(
    extensions: Optional[bytes] = b"",
    legacy_version: int = 0x0303,
    session_id: bytes = b"\x11" * 32,
    cipher_suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
) -> bytes:
    """A ClientHello body; ``extensions=None`` leaves the block out."""
    body = u16(legacy_version) + b"\x42" * 32 + vec1(session_id)
    body += vec2(cipher_suites) + vec1(compression)
    if extensions is not None:
        body += vec2(extensions)
    return body


def handshake(body: bytes, kind: int = 1) -> bytes:
    return u8(kind) + u24(len(body)) + body


def record(payload: bytes, kind: int = 22, version: int = 0x0301) -> bytes:
    return u8(kind) + u16(version) + u16(len(payload)) + payload


def built_hello(
    server_name: Optional[bytes] = b"api.example.test",
    alpn: Sequence[bytes] = (b"h2", b"http/1.1"),
    versions: Sequence[int] = (0x0304, 0x0303),
    padding: int = 0,
) -> bytes:
    """A hand-built one-record ClientHello with the usual routing extensions."""
    extensions = b""
    if server_name is not None:
        extensions += sni_extension(server_name)
    if alpn:
        extensions += alpn_extension(*alpn)
    if versions:
        extensions += versions_extension(*versions)
    if padding:
        extensions += extension(21, b"\x00" * padding)
    return record(handshake(hello_body(extensions)))


def outcome(chunks: Sequence[bytes], max_size: int = 16384) -> tuple:
    """
    What a parser says after being fed ``chunks``: the info, ``None`` for
    "need more", or the error's class, message, slug and alert.
    """
    parser = ClientHelloParser(max_size)
    try:
        result = None
        for chunk in chunks:
            result = parser.feed(chunk)
        return ("result", result)
    except ClientHelloError as error:
        return ("error", type(error), str(error), error.reason, error.alert)


def split_at(data: bytes, points: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets."""
    edges = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


class RealClientHelloTests(SynchronousTestCase):
    """The parser against the bytes a real TLS client sends."""

    def setUp(self) -> None:
        self.hello = real_hello()
        self.expected = ClientHelloInfo(
            server_name="api.example.test",
            alpn=("h2", "http/1.1"),
            legacy_version=0x0303,
            supported_versions=(0x0304, 0x0303),
            length=len(self.hello) - 9,
            records=1,
        )

    def test_whole(self) -> None:
        """A real hello fed at once yields its SNI, ALPN and versions."""
        parser = ClientHelloParser()
        self.assertEqual(parser.feed(self.hello), self.expected)
        self.assertEqual(parser.buffered, len(self.hello))

    def test_one_byte_at_a_time(self) -> None:
        """
        Fed one byte per call, the parser asks for more until the very last
        byte and then gives the same result.
        """
        parser = ClientHelloParser()
        answers = [parser.feed(self.hello[i : i + 1]) for i in range(len(self.hello))]
        self.assertEqual(answers[:-1], [None] * (len(self.hello) - 1))
        self.assertEqual(answers[-1], self.expected)
        self.assertEqual(parser.buffered, len(self.hello))

    def test_every_split_point(self) -> None:
        """A hello cut into two TCP reads at any offset parses the same."""
        for cut in range(len(self.hello) + 1):
            parser = ClientHelloParser()
            first = parser.feed(self.hello[:cut])
            second = parser.feed(self.hello[cut:])
            if cut < len(self.hello):
                self.assertIsNone(first, cut)
            self.assertEqual(second, self.expected, cut)

    def test_two_records(self) -> None:
        """A hello re-framed into two handshake records parses the same."""
        framed = split_into_records(self.hello, [100])
        self.assertEqual(len(framed), len(self.hello) + 5)
        info = ClientHelloParser().feed(framed)
        self.assertEqual(info, attrs.evolve(self.expected, records=2))

    def test_many_records(self) -> None:
        """
        A hello in 7-byte records, so that the handshake header itself is
        cut across records, parses the same at every split point.
        """
        payload = len(self.hello) - 5
        framed = split_into_records(self.hello, [7] * (payload // 7))
        records = -(-payload // 7)
        expected = attrs.evolve(self.expected, records=records)
        self.assertEqual(len(framed), len(self.hello) + 5 * (records - 1))
        for cut in range(len(framed) + 1):
            parser = ClientHelloParser()
            parser.feed(framed[:cut])
            self.assertEqual(parser.feed(framed[cut:]), expected, cut)

    def test_one_byte_records(self) -> None:
        """A hello in one-byte records, fed one byte at a time, parses."""
        payload = len(self.hello) - 5
        framed = split_into_records(self.hello, [1] * payload)
        parser = ClientHelloParser(max_size=len(framed))
        for i in range(len(framed) - 1):
            self.assertIsNone(parser.feed(framed[i : i + 1]))
        self.assertEqual(
            parser.feed(framed[-1:]), attrs.evolve(self.expected, records=payload)
        )

    def test_bytes_after_hello_ignored(self) -> None:
        """
        Records after the hello (a middlebox-compatibility
        ChangeCipherSpec, 0-RTT data) do not disturb the result, and later
        feeds repeat it.
        """
        parser = ClientHelloParser()
        ccs = b"\x14\x03\x03\x00\x01\x01"
        self.assertEqual(parser.feed(self.hello + ccs), self.expected)
        self.assertEqual(parser.feed(b"\x17\x03\x03"), self.expected)
        self.assertEqual(parser.buffered, len(self.hello) + 9)

    def test_no_sni(self) -> None:
        """A client given no server name (or an IP address) sends no SNI."""
        for server_hostname in (None, "192.0.2.7"):
            info = ClientHelloParser().feed(real_hello(server_hostname))
            self.assertIsNone(info.server_name, server_hostname)
            self.assertEqual(info.alpn, ("h2", "http/1.1"))

    def test_no_alpn_tls12(self) -> None:
        """
        A TLS 1.2-only client without ALPN has no ALPN and no
        supported_versions extension.
        """
        info = ClientHelloParser().feed(
            real_hello(alpn=(), maximum_version=ssl.TLSVersion.TLSv1_2)
        )
        self.assertEqual(info.alpn, ())
        self.assertEqual(info.supported_versions, ())
        self.assertEqual(info.legacy_version, 0x0303)
        self.assertEqual(info.server_name, "api.example.test")

    def test_large_hello(self) -> None:
        """
        A real ~10 KiB hello (40 long ALPN names) parses under the default
        16384 limit and is refused under 8192 from its record header alone.
        """
        names = [f"p{i:03d}" + "x" * 246 for i in range(40)]
        hello = real_hello(alpn=names)
        self.assertTrue(10240 <= len(hello) <= 16384, len(hello))
        info = ClientHelloParser().feed(hello)
        self.assertEqual(info.alpn, tuple(names))
        self.assertEqual(info.server_name, "api.example.test")
        parser = ClientHelloParser(max_size=8192)
        exc = self.assertRaises(ClientHelloTooLarge, parser.feed, hello[:5])
        self.assertEqual(
            str(exc),
            f"ClientHello records reach {len(hello)} bytes, over the limit of 8192",
        )
        self.assertEqual(exc.reason, "too_large")

    def test_large_hello_fragmented(self) -> None:
        """
        A ~10 KiB hello in 1000-byte records is refused under 8192 as soon
        as the handshake header declares its length, long before the
        records that would carry it.
        """
        names = [f"p{i:03d}" + "x" * 246 for i in range(40)]
        hello = real_hello(alpn=names)
        framed = split_into_records(hello, [1000] * 10)
        self.assertEqual(ClientHelloParser().feed(framed).records, 11)
        parser = ClientHelloParser(max_size=8192)
        self.assertIsNone(parser.feed(framed[:8]))
        exc = self.assertRaises(ClientHelloTooLarge, parser.feed, framed[8:9])
        length = len(hello) - 9
        # The first record holds 1000 bytes, so at best a second one holds
        # the rest: one more record header than the original hello.
        self.assertEqual(
            str(exc),
            f"ClientHello of {length} bytes needs at least {len(hello) + 5} bytes"
            " with its record headers, over the limit of 8192",
        )


class BuiltClientHelloTests(SynchronousTestCase):
    """Hand-built hellos: the fields and limits exactly."""

    def test_fields(self) -> None:
        """Every field of ClientHelloInfo comes from the matching bytes."""
        hello = built_hello(versions=(0x0A0A, 0x0304))
        self.assertEqual(
            ClientHelloParser().feed(hello),
            ClientHelloInfo(
                server_name="api.example.test",
                alpn=("h2", "http/1.1"),
                legacy_version=0x0303,
                supported_versions=(0x0A0A, 0x0304),
                length=len(hello) - 9,
                records=1,
            ),
        )

    def test_no_extensions(self) -> None:
        """A pre-TLS-1.3 hello without an extensions block is valid."""
        hello = record(handshake(hello_body(None, legacy_version=0x0301)))
        self.assertEqual(
            ClientHelloParser().feed(hello),
            ClientHelloInfo(None, (), 0x0301, (), len(hello) - 9, 1),
        )

    def test_server_name_normalized(self) -> None:
        """The server name is lowercased and loses one trailing dot."""
        info = ClientHelloParser().feed(built_hello(b"API.Example.TEST."))
        self.assertEqual(info.server_name, "api.example.test")

    def test_server_name_first_host_name(self) -> None:
        """
        The first host_name entry wins, and entries of other name types are
        skipped.
        """
        ext = extension(
            0,
            vec2(
                u8(7) + vec2(b"other")
                + u8(0) + vec2(b"first.test")
                + u8(0) + vec2(b"second.test")
            ),
        )
        hello = record(handshake(hello_body(ext)))
        self.assertEqual(ClientHelloParser().feed(hello).server_name, "first.test")

    def test_server_name_only_other_types(self) -> None:
        """A server_name list without a host_name gives no server name."""
        hello = record(handshake(hello_body(sni_extension(b"x", name_type=9))))
        self.assertIsNone(ClientHelloParser().feed(hello).server_name)

    def test_alpn_latin1(self) -> None:
        """ALPN names keep every byte, decoded as latin-1."""
        hello = built_hello(alpn=(b"\xff\x00z", b"h2"))
        self.assertEqual(ClientHelloParser().feed(hello).alpn, ("\xff\x00z", "h2"))

    def test_padded_10k(self) -> None:
        """
        A 10 KiB padding extension parses under 16384, even split into two
        records, and is refused under a smaller limit.
        """
        hello = built_hello(padding=10000)
        info = ClientHelloParser().feed(split_into_records(hello, [5000]))
        self.assertEqual((info.server_name, info.records), ("api.example.test", 2))
        self.assertRaises(
            ClientHelloTooLarge, ClientHelloParser(max_size=10000).feed, hello
        )

    def test_max_size_exact(self) -> None:
        """
        ``max_size`` counts handshake bytes plus record headers: a hello of
        exactly that size parses, one byte less is refused.
        """
        framed = split_into_records(built_hello(), [30])
        self.assertEqual(
            ClientHelloParser(max_size=len(framed)).feed(framed).records, 2
        )
        parser = ClientHelloParser(max_size=len(framed) - 1)
        exc = self.assertRaises(ClientHelloTooLarge, parser.feed, framed)
        # The declared length already shows the second record cannot fit.
        self.assertEqual(
            str(exc),
            f"ClientHello of {len(framed) - 14} bytes needs at least"
            f" {len(framed)} bytes with its record headers, over the limit"
            f" of {len(framed) - 1}",
        )

    def test_declared_length_over_max(self) -> None:
        """
        A handshake header declaring 16 MiB is refused from its first nine
        bytes, before any of the announced bytes are sent.
        """
        start = record(b"\x01\xff\xff\xff")
        parser = ClientHelloParser()
        self.assertIsNone(parser.feed(start[:8]))
        exc = self.assertRaises(ClientHelloTooLarge, parser.feed, start[8:])
        self.assertEqual(
            str(exc),
            "ClientHello of 16777215 bytes needs at least 16782344 bytes with"
            " its record headers, over the limit of 16384",
        )
        self.assertEqual(exc.alert, AlertDescription.illegal_parameter)

    def test_error_repeats(self) -> None:
        """Once refused, every further feed raises the same error."""
        parser = ClientHelloParser()
        first = self.assertRaises(NotTLS, parser.feed, b"GET")
        second = self.assertRaises(NotTLS, parser.feed, b"")
        self.assertIs(first, second)
        self.assertEqual(parser.buffered, 3)

    def test_max_size_positive(self) -> None:
        """A limit below one byte is a programming error."""
        self.assertRaises(ValueError, ClientHelloParser, 0)


class RefusalTests(SynchronousTestCase):
    """Each way a hello is refused, with its exact reason."""

    def assertRefused(
        self,
        data: bytes,
        error: type,
        message: str,
        alert: Optional[AlertDescription] = AlertDescription.decode_error,
    ) -> None:
        """
        ``data`` is refused with ``error`` and ``message``, fed whole or a
        byte at a time.
        """
        for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
            self.assertEqual(
                outcome(chunks),
                ("error", error, message, error.reason, alert),
            )

    def test_http(self) -> None:
        """An HTTP request is not TLS, and the first byte already says so."""
        self.assertRefused(
            b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
            NotTLS,
            "first byte 0x47 is not a TLS handshake record",
            None,
        )
        self.assertRaises(NotTLS, ClientHelloParser().feed, b"G")

    def test_sslv2(self) -> None:
        """An SSLv2-compatible ClientHello is not TLS."""
        self.assertRefused(
            b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10",
            NotTLS,
            "SSLv2-compatible ClientHello",
            None,
        )

    def test_high_bit_noise(self) -> None:
        """A first byte with its high bit set but no SSLv2 hello is noise."""
        self.assertRefused(
            b"\x80\x05\x07", NotTLS, "first byte 0x80 is not a TLS handshake record", None
        )

    def test_record_version(self) -> None:
        """The first record must carry version 3.x with x below 0x10."""
        self.assertRefused(b"\x16\x02", NotTLS, "record version major 2 is not TLS", None)
        self.assertRefused(b"\x16\x03\x31", NotTLS, "record version 0x0331 is not TLS", None)

    def test_record_overflow(self) -> None:
        """A record longer than 2^14 is refused with record_overflow."""
        self.assertRefused(
            b"\x16\x03\x01\x4e\x20",
            MalformedClientHello,
            "record length 20000 exceeds 16384",
            AlertDescription.record_overflow,
        )

    def test_record_over_max_size(self) -> None:
        """A record header alone can show the hello exceeds ``max_size``."""
        self.assertEqual(
            outcome([b"\x16\x03\x01\x23\x28"], max_size=4096),
            (
                "error",
                ClientHelloTooLarge,
                "ClientHello records reach 9005 bytes, over the limit of 4096",
                "too_large",
                AlertDescription.illegal_parameter,
            ),
        )

    def test_empty_record(self) -> None:
        """Zero-length handshake records are forbidden."""
        self.assertRefused(b"\x16\x03\x01\x00\x00", MalformedClientHello, "empty handshake record")

    def test_not_client_hello(self) -> None:
        """A handshake message other than ClientHello is refused."""
        self.assertRefused(
            record(handshake(hello_body(), kind=2)),
            MalformedClientHello,
            "handshake type 2 is not ClientHello",
            AlertDescription.unexpected_message,
        )

    def test_too_short(self) -> None:
        """A declared length too small for any ClientHello is refused early."""
        self.assertRefused(
            record(b"\x01\x00\x00\x0a"),
            MalformedClientHello,
            "handshake length 10 is too short for a ClientHello",
        )

    def test_interleaved_record(self) -> None:
        """
        An alert or application-data record between the hello's fragments
        is refused.
        """
        hello = built_hello()
        first = split_into_records(hello, [20])[:25]
        for kind in (21, 23):
            self.assertRefused(
                first + record(b"\x02\x28", kind=kind),
                MalformedClientHello,
                f"record type {kind} interleaved with the ClientHello",
                AlertDescription.unexpected_message,
            )

    def test_later_record_version(self) -> None:
        """A later fragment with a non-TLS version is malformed, not NotTLS."""
        first = split_into_records(built_hello(), [20])[:25]
        self.assertRefused(
            first + b"\x16\x04\x01\x00\x05",
            MalformedClientHello,
            "record version major 4 is not TLS",
        )

    def test_bytes_past_hello_in_record(self) -> None:
        """
        A record carrying bytes after the hello is refused from the
        handshake header, before the hello is complete.
        """
        payload = handshake(hello_body(b"")) + b"\x00\x00"
        data = record(payload)
        self.assertRefused(
            data,
            MalformedClientHello,
            "records carry 2 bytes past the end of the ClientHello",
            AlertDescription.unexpected_message,
        )
        self.assertRaises(MalformedClientHello, ClientHelloParser().feed, data[:9])

    def test_record_past_hello(self) -> None:
        """A later fragment longer than what the hello still needs is refused."""
        hello = built_hello()
        need = len(hello) - 5 - 20
        data = split_into_records(hello, [20])[:25] + b"\x16\x03\x01" + u16(need + 1)
        self.assertRefused(
            data,
            MalformedClientHello,
            "records carry 1 bytes past the end of the ClientHello",
            AlertDescription.unexpected_message,
        )

    def body_refused(
        self,
        body: bytes,
        message: str,
        alert: AlertDescription = AlertDescription.decode_error,
    ) -> None:
        """A ClientHello with ``body`` is refused with ``message``."""
        self.assertRefused(record(handshake(body)), MalformedClientHello, message, alert)

    def test_legacy_version(self) -> None:
        """A legacy_version outside 3.x is refused with protocol_version."""
        self.body_refused(
            hello_body(legacy_version=0x0200),
            "legacy_version 0x0200 is not TLS",
            AlertDescription.protocol_version,
        )

    def test_session_id(self) -> None:
        """A session_id longer than 32 bytes is refused."""
        self.body_refused(
            hello_body(session_id=b"\x00" * 33),
            "session_id length 33 exceeds 32",
            AlertDescription.illegal_parameter,
        )

    def test_session_id_truncated(self) -> None:
        """A session_id longer than the message is truncated."""
        body = u16(0x0303) + b"\x00" * 32 + b"\xff" + b"\x00" * 20
        self.body_refused(body, "session_id truncated")

    def test_cipher_suites(self) -> None:
        """Cipher suites must be a non-empty list of 16-bit values."""
        self.body_refused(
            hello_body(cipher_suites=b"\x13\x01\x13"),
            "cipher_suites length 3 is not a positive even number",
        )
        self.body_refused(
            hello_body(cipher_suites=b"", compression=b"\x00" * 3),
            "cipher_suites length 0 is not a positive even number",
        )

    def test_compression(self) -> None:
        """The compression methods list may not be empty."""
        self.body_refused(
            hello_body(compression=b"", extensions=b"\x00" * 4),
            "compression_methods list is empty",
        )

    def test_extensions_truncated(self) -> None:
        """An extensions block longer than the message is truncated."""
        body = hello_body(None) + b"\x00\x10\x00\x00"
        self.body_refused(body, "extensions truncated")

    def test_after_extensions(self) -> None:
        """Bytes after the extensions block are refused."""
        self.body_refused(hello_body(b"") + b"\x00", "1 bytes after the extensions")

    def test_extension_truncated(self) -> None:
        """An extension longer than the block is truncated."""
        self.body_refused(hello_body(b"\x00\x00\x00\x09abc"), "extension 0 truncated")

    def test_extension_type_truncated(self) -> None:
        """A block ending inside an extension type is truncated."""
        self.body_refused(hello_body(b"\x00"), "extension type truncated")

    def test_duplicate_extension(self) -> None:
        """The same extension twice is refused."""
        self.body_refused(
            hello_body(alpn_extension(b"h2") + sni_extension(b"a.test") + alpn_extension(b"h2")),
            "duplicate extension 16",
            AlertDescription.illegal_parameter,
        )

    def test_server_name_list_truncated(self) -> None:
        """A server_name list longer than its extension is truncated."""
        self.body_refused(
            hello_body(extension(0, b"\x00\x20\x00\x00\x03abc")),
            "server_name list truncated",
        )

    def test_server_name_entry_truncated(self) -> None:
        """A host name longer than its list is truncated."""
        self.body_refused(
            hello_body(extension(0, vec2(b"\x00\x00\x09abc"))),
            "server_name entry truncated",
        )

    def test_server_name_trailing(self) -> None:
        """Bytes after the server_name list are refused."""
        self.body_refused(
            hello_body(extension(0, vec2(b"\x00" + vec2(b"a.test")) + b"\x00")),
            "1 bytes after the server_name list",
        )

    def test_server_name_list_empty(self) -> None:
        """An empty server_name list is refused."""
        self.body_refused(hello_body(extension(0, vec2(b""))), "server_name list is empty")

    def test_server_name_empty(self) -> None:
        """An empty host name, or a lone dot, is refused."""
        for name in (b"", b"."):
            self.body_refused(
                hello_body(sni_extension(name)),
                "server_name is empty",
                AlertDescription.illegal_parameter,
            )

    def test_server_name_not_ascii(self) -> None:
        """A host name with non-ASCII bytes is refused."""
        self.body_refused(
            hello_body(sni_extension("bücher.test".encode())),
            "server_name is not ASCII",
            AlertDescription.illegal_parameter,
        )

    def test_server_name_syntax(self) -> None:
        """Host names break on spaces, empty labels, edge hyphens, long labels."""
        bad = ("bad name.test", "a..test", "-a.test", "a-.test", "a.test..", "x" * 64, "a*.test")
        for name in bad:
            self.body_refused(
                hello_body(sni_extension(name.encode())),
                f"server_name {name.lower().removesuffix('.')!r} is not a host name",
                AlertDescription.illegal_parameter,
            )

    def test_server_name_too_long(self) -> None:
        """A 254-character name is refused, quoted only in part."""
        name = ".".join(["a" * 63] * 3 + ["b" * 62])
        self.assertEqual(len(name), 254)
        self.body_refused(
            hello_body(sni_extension(name.encode())),
            f"server_name {name[:64] + '...'!r} is not a host name",
            AlertDescription.illegal_parameter,
        )
        self.assertEqual(
            ClientHelloParser().feed(built_hello(name[:-2].encode())).server_name,
            name[:-2],
        )

    def test_alpn_errors(self) -> None:
        """ALPN lists may be neither empty, nor hold empty names, nor be cut."""
        self.body_refused(hello_body(extension(16, vec2(b""))), "ALPN list is empty")
        self.body_refused(
            hello_body(extension(16, vec2(b"\x02h2\x00"))), "empty ALPN protocol name"
        )
        self.body_refused(
            hello_body(extension(16, vec2(b"\x05h2"))), "ALPN protocol name truncated"
        )
        self.body_refused(hello_body(extension(16, b"\x00")), "ALPN list truncated")

    def test_supported_versions_errors(self) -> None:
        """supported_versions must hold whole 16-bit versions."""
        self.body_refused(
            hello_body(extension(43, vec1(b"\x03\x04\x03"))),
            "supported_versions length 3 is not a positive even number",
        )
        self.body_refused(
            hello_body(extension(43, b"\x04\x03\x04")),
            "supported_versions list truncated",
        )


class HelperTests(SynchronousTestCase):
    """looks_like_tls, tls_alert, split_into_records and the error types."""

    def test_looks_like_tls(self) -> None:
        """Three bytes decide; fewer may not."""
        cases = {
            b"": None,
            b"\x16": None,
            b"\x16\x03": None,
            b"\x16\x03\x01": True,
            b"\x16\x03\x04\x02\x00": True,
            b"G": False,
            b"GET / HTTP/1.1": False,
            b"\x80": False,
            b"\x16\x02": False,
            b"\x16\x03\x10": False,
        }
        self.assertEqual({data: looks_like_tls(data) for data in cases}, cases)

    def test_tls_alert_bytes(self) -> None:
        """A fatal alert record, exactly."""
        self.assertEqual(
            tls_alert(AlertDescription.unrecognized_name),
            b"\x15\x03\x03\x00\x02\x02\x70",
        )
        self.assertEqual(tls_alert(40, version=0x0301), b"\x15\x03\x01\x00\x02\x02\x28")
        self.assertRaises(ValueError, tls_alert, 256)
        self.assertRaises(ValueError, tls_alert, 40, 0x10000)

    def test_tls_alert_understood(self) -> None:
        """A real TLS client reads the alert as the one we meant."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = context.wrap_bio(incoming, outgoing, server_hostname="a.test")
        self.assertRaises(ssl.SSLWantReadError, client.do_handshake)
        incoming.write(tls_alert(AlertDescription.unrecognized_name))
        exc = self.assertRaises(ssl.SSLError, client.do_handshake)
        self.assertEqual(exc.reason, "TLSV1_UNRECOGNIZED_NAME")

    def test_alert_values(self) -> None:
        """Alert descriptions carry their RFC numbers."""
        self.assertEqual(
            [
                AlertDescription.close_notify,
                AlertDescription.unexpected_message,
                AlertDescription.record_overflow,
                AlertDescription.handshake_failure,
                AlertDescription.bad_certificate,
                AlertDescription.illegal_parameter,
                AlertDescription.access_denied,
                AlertDescription.decode_error,
                AlertDescription.protocol_version,
                AlertDescription.internal_error,
                AlertDescription.unrecognized_name,
                AlertDescription.no_application_protocol,
            ],
            [0, 10, 22, 40, 42, 47, 49, 50, 70, 80, 112, 120],
        )

    def test_error_slugs(self) -> None:
        """Each error class has one metric slug and a default alert."""
        self.assertEqual(
            [
                (cls.reason, cls("x").alert, str(cls("why")))
                for cls in (NotTLS, MalformedClientHello, ClientHelloTooLarge)
            ],
            [
                ("not_tls", None, "why"),
                ("malformed", AlertDescription.decode_error, "why"),
                ("too_large", AlertDescription.illegal_parameter, "why"),
            ],
        )
        self.assertTrue(issubclass(ClientHelloTooLarge, ClientHelloError))

    def test_split_into_records(self) -> None:
        """Re-framing keeps the version and puts the rest in a last record."""
        one = b"\x16\x03\x01\x00\x05abcde"
        two = b"\x16\x03\x01\x00\x02ab\x16\x03\x01\x00\x03cde"
        self.assertEqual(split_into_records(one, [2]), two)
        self.assertEqual(split_into_records(one, [2, 3]), two)
        self.assertEqual(split_into_records(two, []), one)
        self.assertEqual(
            split_into_records(two, [1, 1, 1, 1]),
            b"".join(b"\x16\x03\x01\x00\x01" + bytes([c]) for c in b"abcde"),
        )

    def test_split_into_records_refuses(self) -> None:
        """Sizes that do not fit, and input that is not records, are errors."""
        one = b"\x16\x03\x01\x00\x05abcde"
        for hello, sizes in [
            (one, [6]),
            (one, [0, 5]),
            (one[:-1], [2]),
            (b"\x17" + one[1:], [2]),
            (b"", []),
        ]:
            self.assertRaises(ValueError, split_into_records, hello, sizes)


def host_names() -> st.SearchStrategy[str]:
    label = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
    return st.lists(label, min_size=1, max_size=4).map(".".join)


@st.composite
def valid_hellos(draw: st.DrawFn) -> tuple[bytes, ClientHelloInfo]:
    """A hand-built hello, possibly fragmented, and what it must parse to."""
    name = draw(st.none() | host_names())
    alpn = draw(st.lists(st.binary(min_size=1, max_size=20), max_size=5))
    versions = draw(st.lists(st.integers(0, 0xFFFF), max_size=5))
    padding = draw(st.integers(0, 300))
    hello = built_hello(
        None if name is None else name.encode(), alpn, versions, padding
    )
    payload = len(hello) - 5
    sizes = draw(st.lists(st.integers(1, 64), max_size=8))
    kept, total = [], 0
    for size in sizes:
        if total + size >= payload:
            break
        kept.append(size)
        total += size
    framed = split_into_records(hello, kept)
    info = ClientHelloInfo(
        server_name=name,
        alpn=tuple(p.decode("latin-1") for p in alpn),
        legacy_version=0x0303,
        supported_versions=tuple(versions),
        length=payload - 4,
        records=len(kept) + 1,
    )
    return framed, info


@st.composite
def cuts(draw: st.DrawFn, data: bytes) -> list[bytes]:
    points = draw(st.lists(st.integers(0, len(data)), max_size=12))
    return split_at(data, points)


class PropertyTests(SynchronousTestCase):
    """Properties over generated hellos and arbitrary bytes."""

    @_PROPERTY
    @given(st.data())
    def test_any_split_same_result(self, data: st.DataObject) -> None:
        """
        A valid hello, in any records and cut at any reads, parses to the
        values it was built from.
        """
        framed, info = data.draw(valid_hellos())
        self.assertEqual(outcome(data.draw(cuts(framed))), ("result", info))

    @_PROPERTY
    @given(st.data())
    def test_real_hello_any_split(self, data: st.DataObject) -> None:
        """A real hello cut at arbitrary reads parses like the whole."""
        hello = cached_real_hello()
        self.assertEqual(outcome(data.draw(cuts(hello))), outcome([hello]))

    @_PROPERTY
    @given(st.binary(max_size=600), st.data())
    def test_random_bytes(self, blob: bytes, data: st.DataObject) -> None:
        """
        Arbitrary bytes only ever raise ClientHelloError, and the answer
        does not depend on how they are cut.
        """
        self.assertEqual(outcome(data.draw(cuts(blob))), outcome([blob]))
        self.assertEqual(outcome([blob[i : i + 1] for i in range(len(blob))]), outcome([blob]))

    @_PROPERTY
    @given(st.binary(min_size=41, max_size=400), st.data())
    def test_random_bodies(self, body: bytes, data: st.DataObject) -> None:
        """
        Arbitrary bodies in valid framing reach the body parser, which only
        ever raises ClientHelloError, the same for any cut.
        """
        blob = record(handshake(body))
        whole = outcome([blob])
        self.assertNotEqual(whole, ("result", None))
        self.assertEqual(outcome(data.draw(cuts(blob))), whole)

    @_PROPERTY
    @given(st.data())
    def test_mutated_real_hello(self, data: st.DataObject) -> None:
        """
        A real hello with bytes overwritten either still parses or is
        refused with a ClientHelloError, the same for any cut.
        """
        hello = bytearray(cached_real_hello())
        for _ in range(data.draw(st.integers(1, 4))):
            hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(hello)
        self.assertEqual(outcome(data.draw(cuts(blob))), outcome([blob]))

    @_PROPERTY
    @given(st.binary(min_size=3, max_size=12))
    def test_looks_like_tls_agrees(self, blob: bytes) -> None:
        """Given three bytes, looks_like_tls is False exactly on NotTLS."""
        refused = outcome([blob])[:2] == ("error", NotTLS)
        self.assertEqual(looks_like_tls(blob) is False, refused)

