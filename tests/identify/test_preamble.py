"""
Tests for shardtcp.identify.preamble (the connect, line and http-host
methods) and for the Detector choosing among them and sni on one port.

Every refusal is checked by its reason and by the exact bytes the client
is answered with (``refusal_bytes``); every parser is also fed one byte at
a time, and random input may only ever raise ``IdentifyError``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from shardtcp.identify.detect import (
    METHODS,
    Detector,
    IIdentifyMethod,
    Identified,
    IdentifyError,
)
from shardtcp.identify.preamble import (
    CONNECT_ESTABLISHED,
    HTTP_METHODS,
    ConnectMethod,
    HttpHostMethod,
    LineMethod,
    parse_authority,
)
from shardtcp.proxy.refusal import REASONS, refusal_bytes
from tests.support import client_hello

LIMIT = 8192
ALL = ["sni", "connect", "http-host", "line"]

# No example database: the tree is shared, and failures print their input.
_PROPERTY = settings(
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CURL_CONNECT = (
    b"CONNECT api.example.test:443 HTTP/1.1\r\n"
    b"Host: api.example.test:443\r\n"
    b"User-Agent: curl/8.5.0\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"\r\n"
)
# What ``openssl s_client -proxy`` sends: HTTP/1.0 and no Host field.
OPENSSL_CONNECT = b"CONNECT api.example.test:443 HTTP/1.0\r\nProxy-Connection: Keep-Alive\r\n\r\n"
CURL_GET = (
    b"GET /orders?id=7 HTTP/1.1\r\n"
    b"Host: api.example.test\r\n"
    b"User-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)

BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n"
    b"X-Shardtcp-Reason: malformed\r\n\r\n"
)


def feed_whole(method, data: bytes) -> Optional[Identified]:
    return method.feed(data)


def feed_bytewise(method, data: bytes) -> Optional[Identified]:
    """Feed one byte at a time; a result must only come with the last byte."""
    result = None
    for index in range(len(data)):
        result = method.feed(data[index : index + 1])
        if result is not None and index != len(data) - 1:
            raise AssertionError(f"answered after {index + 1} of {len(data)} bytes")
    return result


FEEDS: Sequence[Callable] = (feed_whole, feed_bytewise)


class RefusalAssertions:
    """Helpers asserting a refusal's reason, protocol and answer bytes."""

    def assertRefused(
        self, method_class, data: bytes, reason: str, answer: bytes, protocol: str
    ) -> IdentifyError:
        """``data`` is refused with ``reason``, whole and byte by byte."""
        error = None
        for feed in FEEDS:
            with self.subTest(feed=feed.__name__, data=data[:80]):
                error = self.assertRaises(IdentifyError, feed, method_class(LIMIT), data)
                self.assertEqual((error.reason, error.protocol), (reason, protocol), str(error))
                self.assertEqual(refusal_bytes(error.reason, error.protocol), answer)
        return error


class ConnectTests(RefusalAssertions, SynchronousTestCase):
    """The ``connect`` method: ``CONNECT host:port HTTP/1.x``."""

    def test_curl(self) -> None:
        """curl's CONNECT is identified by host:port, consumed whole, and answered with the 200."""
        expected = Identified(
            method="connect",
            protocol="http",
            name="api.example.test:443",
            consume=len(CURL_CONNECT),
            reply_when_connected=b"HTTP/1.1 200 Connection established\r\n\r\n",
        )
        for feed in FEEDS:
            with self.subTest(feed=feed.__name__):
                self.assertEqual(feed(ConnectMethod(LIMIT), CURL_CONNECT), expected)

    def test_openssl_http10_without_host(self) -> None:
        """openssl s_client's HTTP/1.0 CONNECT without a Host field is accepted."""
        for feed in FEEDS:
            with self.subTest(feed=feed.__name__):
                found = feed(ConnectMethod(LIMIT), OPENSSL_CONNECT)
                self.assertEqual((found.name, found.consume), ("api.example.test:443", len(OPENSSL_CONNECT)))

    def test_incomplete(self) -> None:
        """Without its blank line the head is not yet identified."""
        self.assertIsNone(ConnectMethod(LIMIT).feed(CURL_CONNECT[:-2]))

    def test_pipelined_bytes_not_consumed(self) -> None:
        """A ClientHello sent right after the head is left for the shard: consume stops at the blank line."""
        hello = client_hello("api.example.test")
        data = CURL_CONNECT + hello
        found = ConnectMethod(LIMIT).feed(data)
        self.assertEqual(found.consume, len(CURL_CONNECT))
        self.assertEqual(data[found.consume :], hello)

    def test_pipelined_bytes_in_later_chunks(self) -> None:
        """Pipelined bytes arriving in the same chunk as the head's last byte are not consumed either."""
        method = ConnectMethod(LIMIT)
        self.assertIsNone(method.feed(CURL_CONNECT[:-1]))
        found = method.feed(b"\n\x16\x03\x01")
        self.assertEqual(found.consume, len(CURL_CONNECT))

    def test_ipv6_target(self) -> None:
        """An IPv6 target stays bracketed, compressed and lowercased."""
        data = b"CONNECT [2001:DB8:0:0::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n"
        for feed in FEEDS:
            with self.subTest(feed=feed.__name__):
                self.assertEqual(feed(ConnectMethod(LIMIT), data).name, "[2001:db8::1]:8443")

    def test_names_canonical(self) -> None:
        """Hosts are lowercased, a trailing dot dropped, ports written without leading zeros."""
        cases = {
            b"API.Example.TEST:443": "api.example.test:443",
            b"api.example.test.:0443": "api.example.test:443",
            b"192.0.2.10:8443": "192.0.2.10:8443",
            b"under_score.test:1": "under_score.test:1",
            b"localhost:65535": "localhost:65535",
        }
        for target, name in cases.items():
            with self.subTest(target=target):
                found = ConnectMethod(LIMIT).feed(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
                self.assertEqual(found.name, name)

    def test_bare_lf_tolerated(self) -> None:
        """Lines ended by a bare LF are accepted (RFC 9112 section 2.2), and consume counts them."""
        data = b"CONNECT a.test:443 HTTP/1.1\nHost: a.test:443\n\n"
        for feed in FEEDS:
            with self.subTest(feed=feed.__name__):
                found = feed(ConnectMethod(LIMIT), data)
                self.assertEqual((found.name, found.consume), ("a.test:443", len(data)))
        self.assertEqual(ConnectMethod(LIMIT).feed(data + b"tail").consume, len(data))

    def test_mixed_line_ends(self) -> None:
        """A bare LF line followed by a CRLF blank line ends the head."""
        data = b"CONNECT a.test:443 HTTP/1.1\n\r\n"
        self.assertEqual(ConnectMethod(LIMIT).feed(data).consume, len(data))

    def test_malformed(self) -> None:
        """Every malformed head is refused as malformed with a 400."""
        cases = [
            b"CONNECT api.example.test HTTP/1.1\r\n\r\n",  # no port
            b"CONNECT api.example.test: HTTP/1.1\r\n\r\n",  # empty port
            b"CONNECT api.example.test:0 HTTP/1.1\r\n\r\n",
            b"CONNECT api.example.test:65536 HTTP/1.1\r\n\r\n",
            b"CONNECT api.example.test:000443 HTTP/1.1\r\n\r\n",  # more than 5 digits
            b"CONNECT api.example.test:https HTTP/1.1\r\n\r\n",
            b"CONNECT api.example.test:443\r\n\r\n",  # no version
            b"CONNECT api.example.test:443 HTTP/2.0\r\n\r\n",
            b"CONNECT api.example.test:443 http/1.1\r\n\r\n",
            b"CONNECT  api.example.test:443 HTTP/1.1\r\n\r\n",
            b"CONNECT api.example.test:443 HTTP/1.1 \r\n\r\n",
            b"CONNECT user@api.example.test:443 HTTP/1.1\r\n\r\n",
            b"CONNECT api.example.test:443/x HTTP/1.1\r\n\r\n",
            b"CONNECT http://api.example.test:443/ HTTP/1.1\r\n\r\n",
            b"CONNECT ::1:443 HTTP/1.1\r\n\r\n",
            b"CONNECT [::1 HTTP/1.1\r\n\r\n",
            b"CONNECT [::1]x:443 HTTP/1.1\r\n\r\n",
            b"CONNECT [fe80::1%25eth0]:443 HTTP/1.1\r\n\r\n",
            b"CONNECT [v1.x]:443 HTTP/1.1\r\n\r\n",
            b"CONNECT [1:2:3]:443 HTTP/1.1\r\n\r\n",
            b"CONNECT bad-.test:443 HTTP/1.1\r\n\r\n",
            b"CONNECT a..test:443 HTTP/1.1\r\n\r\n",
            b"CONNECT a!b.test:443 HTTP/1.1\r\n\r\n",
            b"CONNECT " + b"a" * 64 + b".test:443 HTTP/1.1\r\n\r\n",  # label over 63
            b"CONNECT " + b"a." * 127 + b"test:443 HTTP/1.1\r\n\r\n",  # host over 253
            b"CONNECT 256.1.1.1:443 HTTP/1.1\r\n\r\n",
            b"CONNECT 1.2.3:443 HTTP/1.1\r\n\r\n",
            b"CONNECT 01.2.3.4:443 HTTP/1.1\r\n\r\n",
            b"CONNECT \xc3\xa9.test:443 HTTP/1.1\r\n\r\n",
            b"CONNECT a.test:443 HTTP/1.1\r\nHost a.test\r\n\r\n",  # no colon
            b"CONNECT a.test:443 HTTP/1.1\r\nHost : a.test\r\n\r\n",  # space before colon
            b"CONNECT a.test:443 HTTP/1.1\r\n: a.test\r\n\r\n",  # empty field name
            b"CONNECT a.test:443 HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",  # obs-fold
            b"CONNECT a.test:443 HTTP/1.1\r\n Host: a.test\r\n\r\n",  # whitespace before a field
            b"CONNECT a.test:443 HTTP/1.1\r\nX-A: 1\x002\r\n\r\n",  # NUL
            b"CONNECT a.test:443 HTTP/1.1\r\nX-A: 1\x7f\r\n\r\n",  # DEL
            b"CONNECT a.test:443 HTTP/1.1\r\nX-A: 1\r2\r\n\r\n",  # bare CR in a field
            b"CONNECT a.test:443\rHTTP/1.1\r\n\r\n",  # bare CR in the request line
            b"CONNECT a.test:443 HTTP/1.1\r\n\r\r\n",  # bare CR then CRLF
        ]
        for data in cases:
            self.assertRefused(ConnectMethod, data, "malformed", BAD_REQUEST, "http")

    def test_not_connect(self) -> None:
        """Fed directly another method's request, the connect parser refuses it."""
        self.assertRefused(ConnectMethod, CURL_GET, "malformed", BAD_REQUEST, "http")

    def test_malformed_refused_early(self) -> None:
        """A bad request line is refused as soon as it ends, before the rest of the head."""
        method = ConnectMethod(LIMIT)
        self.assertRaises(IdentifyError, method.feed, b"CONNECT a.test HTTP/1.1\r\n")

    def test_too_large_headers(self) -> None:
        """A head of exactly 8 KiB is accepted; one of 8 KiB + 1 is refused with 431, on its 8192nd byte."""
        start = b"CONNECT a.test:443 HTTP/1.1\r\nX-Pad: "
        fits = start + b"p" * (LIMIT - len(start) - 4) + b"\r\n\r\n"
        self.assertEqual(len(fits), LIMIT)
        self.assertEqual(ConnectMethod(LIMIT).feed(fits).consume, LIMIT)

        over = start + b"p" * (LIMIT - len(start) - 3) + b"\r\n\r\n"
        self.assertEqual(len(over), LIMIT + 1)
        answer = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
            b"Connection: close\r\nX-Shardtcp-Reason: header_too_large\r\n\r\n"
        )
        self.assertRefused(ConnectMethod, over, "header_too_large", answer, "http")
        method = ConnectMethod(LIMIT)
        self.assertIsNone(method.feed(over[: LIMIT - 1]))
        error = self.assertRaises(IdentifyError, method.feed, over[LIMIT - 1 : LIMIT])
        self.assertEqual(error.reason, "header_too_large")

    def test_too_large_request_line(self) -> None:
        """A request line that does not end within 8 KiB is refused with 414."""
        data = b"CONNECT " + b"a" * LIMIT + b":443 HTTP/1.1\r\n\r\n"
        answer = (
            b"HTTP/1.1 414 URI Too Long\r\nContent-Length: 0\r\n"
            b"Connection: close\r\nX-Shardtcp-Reason: uri_too_long\r\n\r\n"
        )
        self.assertRefused(ConnectMethod, data, "uri_too_long", answer, "http")

    def test_never_holds_more_than_the_limit(self) -> None:
        """A 1 MiB first chunk is refused while the parser holds at most 8 KiB of it."""
        method = ConnectMethod(LIMIT)
        data = b"CONNECT a.test:443 HTTP/1.1\r\nX-Pad: " + b"p" * (1 << 20)
        self.assertRaises(IdentifyError, method.feed, data)
        self.assertEqual(method.buffered, LIMIT)

    def test_refusal_is_final(self) -> None:
        """Once refused, later bytes are refused with the same reason and not held."""
        method = ConnectMethod(LIMIT)
        self.assertRaises(IdentifyError, method.feed, b"CONNECT x HTTP/1.1\r\n")
        held = method.buffered
        error = self.assertRaises(IdentifyError, method.feed, b"\r\n" + b"x" * 100)
        self.assertEqual((error.reason, method.buffered), ("malformed", held))

    def test_answer_is_final(self) -> None:
        """Once identified, later bytes change nothing: the same answer comes back."""
        method = ConnectMethod(LIMIT)
        first = method.feed(CURL_CONNECT)
        self.assertIs(method.feed(b"GET / HTTP/1.1\r\n\r\n"), first)

    def test_reply_constant(self) -> None:
        """The 200 written once the shard is connected is an exact, complete response."""
        self.assertEqual(CONNECT_ESTABLISHED, b"HTTP/1.1 200 Connection established\r\n\r\n")


class LineTests(RefusalAssertions, SynchronousTestCase):
    """The ``line`` method: ``SHARD <service>``."""

    def test_crlf(self) -> None:
        """``SHARD api\\r\\n`` names api, is consumed, and may name a service id."""
        expected = Identified(method="line", protocol="line", name="api", consume=11, by_service_id=True)
        for feed in FEEDS:
            with self.subTest(feed=feed.__name__):
                self.assertEqual(feed(LineMethod(LIMIT), b"SHARD api\r\n"), expected)

    def test_lf_only(self) -> None:
        """A bare LF ends the line too."""
        for feed in FEEDS:
            with self.subTest(feed=feed.__name__):
                found = feed(LineMethod(LIMIT), b"SHARD api\n")
                self.assertEqual((found.name, found.consume), ("api", 10))

    def test_pipelined(self) -> None:
        """Bytes after the line are the connection's and are not consumed."""
        data = b"SHARD api.example.test:443\r\nhello"
        found = LineMethod(LIMIT).feed(data)
        self.assertEqual((found.name, data[found.consume :]), ("api.example.test:443", b"hello"))

    def test_name_kept_as_written(self) -> None:
        """The name's case is kept (service ids are case-sensitive); every allowed character passes."""
        name = "Api_v2.Example-test:8443"
        self.assertEqual(LineMethod(LIMIT).feed(f"SHARD {name}\r\n".encode()).name, name)

    def test_longest_name(self) -> None:
        """A name of 253 characters is accepted; 254 is refused as too_large, even before the line ends."""
        self.assertEqual(LineMethod(LIMIT).feed(b"SHARD " + b"a" * 253 + b"\r\n").name, "a" * 253)
        self.assertRefused(LineMethod, b"SHARD " + b"a" * 254 + b"\r\n", "too_large", b"ERR too_large\r\n", "line")
        method = LineMethod(LIMIT)
        self.assertIsNone(method.feed(b"SHARD " + b"a" * 253))
        self.assertEqual(self.assertRaises(IdentifyError, method.feed, b"a").reason, "too_large")

    def test_too_large_bounded(self) -> None:
        """8 KiB + 1 bytes without a line end: too_large, holding no more than the longest valid line."""
        data = b"SHARD " + b"a" * (LIMIT + 1 - 6)
        self.assertRefused(LineMethod, data, "too_large", b"ERR too_large\r\n", "line")
        method = LineMethod(LIMIT)
        self.assertRaises(IdentifyError, method.feed, data + b"a" * (1 << 20))
        # The longest valid line: prefix, service, space, key, CRLF.
        self.assertEqual(method.buffered, 6 + 253 + 1 + 253 + 2)

    def test_malformed(self) -> None:
        """Every malformed line is refused as malformed with ``ERR malformed``."""
        cases = [
            b"SHARD \r\n",
            b"SHARD \n",
            b"SHARD  api\r\n",
            b"SHARD api \r\n",
            b"SHARD api\tx\r\n",
            b"SHARD a/b\r\n",
            b"SHARD api\r\r\n",
            b"SHARD api\rx\r\n",
            b"SHARD \xc3\xa9\r\n",
            b"SHARDapi\r\n",
            b"shard api\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ]
        for data in cases:
            self.assertRefused(LineMethod, data, "malformed", b"ERR malformed\r\n", "line")

    def test_malformed_refused_early(self) -> None:
        """A character outside the name is refused at once, without waiting for the line end."""
        method = LineMethod(LIMIT)
        self.assertIsNone(method.feed(b"SHARD ap"))
        self.assertRaises(IdentifyError, method.feed, b"/")
        method = LineMethod(LIMIT)
        self.assertIsNone(method.feed(b"SHARD api k"))
        self.assertEqual(self.assertRaises(IdentifyError, method.feed, b"\t").reason, "malformed")
        method = LineMethod(LIMIT)
        self.assertIsNone(method.feed(b"SHARD api k"))
        self.assertEqual(self.assertRaises(IdentifyError, method.feed, b" x").reason, "malformed")

    def test_line_arg_key(self) -> None:
        """
        ``SHARD <service> <key>``: the second word is ``Identified.key``
        (1 to 253 printable characters, both edges pinned); without it the
        key is None; an empty, spaced, too long or unprintable key is refused.
        """
        found = LineMethod(LIMIT).feed(b"SHARD api tenant-42\r\nrest")
        self.assertEqual((found.name, found.key, found.consume), ("api", "tenant-42", 21))
        self.assertIsNone(LineMethod(LIMIT).feed(b"SHARD api\n").key)
        self.assertEqual(LineMethod(LIMIT).feed(b"SHARD api k\n").key, "k")
        self.assertEqual(LineMethod(LIMIT).feed(b"SHARD api " + b"k" * 253 + b"\n").key, "k" * 253)
        self.assertRefused(LineMethod, b"SHARD api " + b"k" * 254 + b"\n", "too_large", b"ERR too_large\r\n", "line")
        for bad in (b"SHARD api \n", b"SHARD api a b\n", b"SHARD api k\x01\n", b"SHARD api k\xc3\xa9\n"):
            self.assertRefused(LineMethod, bad, "malformed", b"ERR malformed\r\n", "line")

    def test_cr_pending(self) -> None:
        """A CR as the last byte so far waits for its LF."""
        method = LineMethod(LIMIT)
        self.assertIsNone(method.feed(b"SHARD api\r"))
        self.assertEqual(method.feed(b"\n").consume, 11)

    def test_small_limit(self) -> None:
        """A limit below the longest line bounds it: too_large once the limit is reached without a line end."""
        method = LineMethod(10)
        self.assertEqual(self.assertRaises(IdentifyError, method.feed, b"SHARD abcd\r\n").reason, "too_large")
        self.assertEqual(LineMethod(10).feed(b"SHARD abc\n").name, "abc")


class HttpHostTests(RefusalAssertions, SynchronousTestCase):
    """The ``http-host`` method: a plain HTTP/1.x request routed by Host."""

    def test_curl(self) -> None:
        """curl's GET is identified by its Host and not consumed at all."""
        expected = Identified(method="http-host", protocol="http", name="api.example.test")
        for feed in FEEDS:
            with self.subTest(feed=feed.__name__):
                self.assertEqual(feed(HttpHostMethod(LIMIT), CURL_GET), expected)

    def test_with_body_following(self) -> None:
        """The body after the head changes nothing: consume stays 0."""
        data = b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\nbody"
        found = HttpHostMethod(LIMIT).feed(data)
        self.assertEqual((found.name, found.consume, found.reply_when_connected), ("a.test", 0, b""))

    def test_every_method(self) -> None:
        """Each routed method is accepted, through the Detector too."""
        for method in HTTP_METHODS:
            with self.subTest(method=method):
                data = method + b" / HTTP/1.1\r\nHost: a.test\r\n\r\n"
                self.assertEqual(HttpHostMethod(LIMIT).feed(data).name, "a.test")
                self.assertEqual(Detector(ALL).feed(data).method, "http-host")

    def test_host_forms(self) -> None:
        """A Host port is kept; case, trailing dot and IPv6 spelling are made canonical; an empty port dropped."""
        cases = {
            b"a.test:8080": "a.test:8080",
            b"A.Test.": "a.test",
            b"a.test:": "a.test",
            b"[2001:DB8::0:1]:8443": "[2001:db8::1]:8443",
            b"[::1]": "[::1]",
            b"198.51.100.7": "198.51.100.7",
        }
        for host, name in cases.items():
            with self.subTest(host=host):
                data = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
                self.assertEqual(HttpHostMethod(LIMIT).feed(data).name, name)

    def test_field_name_case_and_whitespace(self) -> None:
        """The Host field is found whatever its case, its value trimmed of surrounding whitespace."""
        data = b"GET / HTTP/1.1\r\nhOsT:\t a.test \t\r\n\r\n"
        self.assertEqual(HttpHostMethod(LIMIT).feed(data).name, "a.test")

    def test_absolute_form(self) -> None:
        """An absolute-form target names the service by its authority, over the Host field."""
        data = b"GET http://Api.Example.test:8080/x?y HTTP/1.1\r\nHost: other.test\r\n\r\n"
        for feed in FEEDS:
            with self.subTest(feed=feed.__name__):
                self.assertEqual(feed(HttpHostMethod(LIMIT), data).name, "api.example.test:8080")
        https = b"GET HTTPS://api.example.test HTTP/1.1\r\nHost: api.example.test\r\n\r\n"
        self.assertEqual(HttpHostMethod(LIMIT).feed(https).name, "api.example.test")

    def test_absolute_form_http10_without_host(self) -> None:
        """HTTP/1.0 in absolute-form needs no Host field."""
        data = b"GET http://[::1]:81/ HTTP/1.0\r\n\r\n"
        self.assertEqual(HttpHostMethod(LIMIT).feed(data).name, "[::1]:81")

    def test_http10_without_host(self) -> None:
        """HTTP/1.0 without Host identifies no name, so default_service can apply."""
        found = HttpHostMethod(LIMIT).feed(b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual((found.method, found.protocol, found.name), ("http-host", "http", None))

    def test_empty_host(self) -> None:
        """An empty Host value (a target without authority) identifies no name."""
        found = HttpHostMethod(LIMIT).feed(b"GET / HTTP/1.1\r\nHost:\r\n\r\n")
        self.assertIsNone(found.name)

    def test_asterisk_form(self) -> None:
        """``OPTIONS *`` is routed by its Host."""
        data = b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n"
        self.assertEqual(HttpHostMethod(LIMIT).feed(data).name, "a.test")

    def test_malformed(self) -> None:
        """Every malformed request is refused as malformed with a 400."""
        cases = [
            b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
            b"GET http://a.test/ HTTP/1.1\r\n\r\n",  # even in absolute-form
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test\r\nhost: b.test\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a.test\r\nHOST: b.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test:0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test:99999\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test/x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \xc3\xa9.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: 999.1.1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test\n\r\n",  # bare LF refused on forwarded heads
            b"GET / HTTP/1.1\nHost: a.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test\r\n\n",
            b"GET / HTTP/1.1\r\nHost: a.test\r\nX: 1\r2\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: 1\r\n\tfolded\r\nHost: a.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: \x01\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost:a.test\r\nnocolon\r\n\r\n",
            b"GET http://user@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"GET http:/// HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"GET ftp://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"GET http:a.test HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"GET a.test:80 HTTP/1.1\r\nHost: a.test\r\n\r\n",  # authority-form is CONNECT's
            b"GET * HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"GET /\x80 HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"GET / HTTP/1.2\r\nHost: a.test\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\nHost: a.test\r\n\r\n",
            b"GET\t/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n",  # not routed by Host
            b"FOO / HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        ]
        for data in cases:
            self.assertRefused(HttpHostMethod, data, "malformed", BAD_REQUEST, "http")

    def test_too_large_headers(self) -> None:
        """A head of exactly 8 KiB is accepted; 8 KiB + 1 is refused with 431, holding no more than 8 KiB."""
        start = b"GET / HTTP/1.1\r\nHost: a.test\r\nCookie: "
        fits = start + b"c" * (LIMIT - len(start) - 4) + b"\r\n\r\n"
        self.assertEqual(len(fits), LIMIT)
        self.assertEqual(HttpHostMethod(LIMIT).feed(fits).name, "a.test")
        over = start + b"c" * (LIMIT - len(start) - 3) + b"\r\n\r\n"
        answer = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
            b"Connection: close\r\nX-Shardtcp-Reason: header_too_large\r\n\r\n"
        )
        self.assertRefused(HttpHostMethod, over, "header_too_large", answer, "http")
        method = HttpHostMethod(LIMIT)
        self.assertRaises(IdentifyError, method.feed, over + b"c" * (1 << 20))
        self.assertEqual(method.buffered, LIMIT)

    def test_too_long_request_line(self) -> None:
        """A request line that does not end within 8 KiB is refused with 414."""
        data = b"GET /" + b"p" * LIMIT + b" HTTP/1.1\r\nHost: a.test\r\n\r\n"
        answer = (
            b"HTTP/1.1 414 URI Too Long\r\nContent-Length: 0\r\n"
            b"Connection: close\r\nX-Shardtcp-Reason: uri_too_long\r\n\r\n"
        )
        self.assertRefused(HttpHostMethod, data, "uri_too_long", answer, "http")


class AuthorityTests(SynchronousTestCase):
    """``parse_authority``, shared by CONNECT targets, Host fields and absolute-form targets."""

    def test_forms(self) -> None:
        """Hosts come back canonical, ports as integers, a missing port as None."""
        self.assertEqual(parse_authority("A.test", require_port=False), ("a.test", None))
        self.assertEqual(parse_authority("a.test:80", require_port=True), ("a.test", 80))
        self.assertEqual(parse_authority("[::FFFF:192.0.2.1]:1", require_port=True), ("[::ffff:c000:201]", 1))

    def test_port_required(self) -> None:
        """With require_port, a missing or empty port is an error."""
        for text in ("a.test", "a.test:", "[::1]", "[::1]:"):
            with self.subTest(text=text):
                self.assertRaises(ValueError, parse_authority, text, require_port=True)


class DetectorTests(SynchronousTestCase):
    """The Detector picks the method from the first bytes, on one port."""

    def test_registered(self) -> None:
        """The three preamble methods are registered by name next to sni."""
        self.assertEqual(
            {name: METHODS[name] for name in ("connect", "line", "http-host")},
            {"connect": ConnectMethod, "line": LineMethod, "http-host": HttpHostMethod},
        )

    def test_interface(self) -> None:
        """Every registered method provides IIdentifyMethod, and its name is its key."""
        for name, method_class in METHODS.items():
            with self.subTest(method=name):
                self.assertTrue(verifyClass(IIdentifyMethod, method_class))
                instance = method_class(LIMIT)
                self.assertTrue(verifyObject(IIdentifyMethod, instance))
                self.assertEqual(instance.name, name)

    def test_one_port(self) -> None:
        """With identify = sni, connect, http-host, line, each kind of first bytes finds its method."""
        cases = [
            (client_hello("api.example.test"), "sni", "api.example.test"),
            (CURL_CONNECT, "connect", "api.example.test:443"),
            (CURL_GET, "http-host", "api.example.test"),
            (b"SHARD api\r\n", "line", "api"),
        ]
        for data, method, name in cases:
            for feed in FEEDS:
                with self.subTest(method=method, feed=feed.__name__):
                    found = feed(Detector(ALL), data)
                    self.assertEqual((found.method, found.name), (method, name))

    def test_preamble_limit(self) -> None:
        """The Detector builds preamble methods with its max_preamble bound."""
        detector = Detector(ALL, max_preamble=64)
        error = self.assertRaises(IdentifyError, detector.feed, b"GET /" + b"x" * 100)
        self.assertEqual(error.reason, "uri_too_long")

    def test_short_prefixes_undecided(self) -> None:
        """Prefixes of a method token wait for more bytes instead of deciding."""
        for prefix in (b"C", b"CONNECT", b"S", b"SHARD", b"G", b"GET", b"P", b"PU", b"O", b"OPTIONS", b"D", b"T", b"H"):
            with self.subTest(prefix=prefix):
                self.assertIsNone(Detector(ALL).feed(prefix))

    def test_unrecognized(self) -> None:
        """Bytes that start no allowed method are refused as unrecognized, as soon as that is certain."""
        for data in (b"X", b"CONNECX", b"GETS", b"SHARD\t", b"get / HTTP/1.1\r\n", b"\r\nGET", b"PROPFIND "):
            with self.subTest(data=data):
                error = self.assertRaises(IdentifyError, Detector(ALL).feed, data)
                self.assertEqual((error.reason, error.protocol), ("unrecognized", "none"))

    def test_only_listed_methods(self) -> None:
        """A method left out of the identify list is not chosen, even when its bytes arrive."""
        cases = [
            (["connect"], CURL_GET),
            (["connect"], b"SHARD api\r\n"),
            (["http-host"], CURL_CONNECT),
            (["http-host", "connect"], b"SHARD api\r\n"),
            (["line"], CURL_GET),
            (["connect", "line"], client_hello()),
        ]
        for identify, data in cases:
            with self.subTest(identify=identify, data=data[:10]):
                error = self.assertRaises(IdentifyError, Detector(identify).feed, data)
                self.assertEqual(error.reason, "unrecognized")
        error = self.assertRaises(IdentifyError, Detector(["sni"]).feed, CURL_GET)
        self.assertEqual(error.reason, "not_tls")

    def test_protocol(self) -> None:
        """The Detector's protocol is "none" while undecided, then the chosen method's."""
        cases = [(b"CONNECT a", 2, "http"), (b"GET /", 2, "http"), (b"SHARD a", 5, "line"), (b"\x16\x03\x01", 0, "tls")]
        for data, undecided, protocol in cases:
            with self.subTest(data=data):
                detector = Detector(ALL)
                self.assertEqual(detector.protocol, "none")
                self.assertIsNone(detector.feed(data[:undecided]))
                self.assertEqual(detector.protocol, "none")
                self.assertIsNone(detector.feed(data[undecided:]))
                self.assertEqual(detector.protocol, protocol)

    def test_connect_consume_counts_from_the_first_byte(self) -> None:
        """Through the Detector, consume counts the bytes seen before the method was chosen."""
        data = CURL_CONNECT + b"\x16\x03\x01"
        detector = Detector(ALL)
        self.assertIsNone(detector.feed(data[:3]))
        found = detector.feed(data[3:])
        self.assertEqual(data[found.consume :], b"\x16\x03\x01")


_FIRST = st.sampled_from([b"", b"CONNECT ", b"SHARD ", b"GET ", b"OPTIONS ", b"\x16\x03\x01", b"C", b"S"])
_CHUNKS = st.lists(st.binary(max_size=64), max_size=40)
_HEADISH = st.lists(
    st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b":", b"Host: ", b"a.test", b"[::1]", b":443", b"HTTP/1.1", b"http://", b"\t", b"\x00", b"*"]),
    max_size=30,
).map(b"".join)


class PropertyTests(SynchronousTestCase):
    """Random input never raises anything but IdentifyError, and answers stay in bounds."""

    def _check(self, feed, chunks) -> None:
        fed = 0
        for chunk in chunks:
            fed += len(chunk)
            try:
                found = feed(chunk)
            except IdentifyError as error:
                self.assertIn(error.reason, REASONS)
                self.assertIn(error.protocol, ("none", "tls", "http", "line"))
                return
            if found is not None:
                self.assertIsInstance(found, Identified)
                self.assertTrue(0 <= found.consume <= fed)
                return

    @_PROPERTY
    @given(first=_FIRST, middle=_HEADISH, chunks=_CHUNKS)
    def test_detector_random(self, first: bytes, middle: bytes, chunks: list) -> None:
        """The Detector with every method fed random bytes raises only IdentifyError, with a known reason."""
        self._check(Detector(ALL).feed, [first + middle] + chunks)

    @_PROPERTY
    @given(method=st.sampled_from([ConnectMethod, LineMethod, HttpHostMethod]), first=_FIRST, middle=_HEADISH, chunks=_CHUNKS)
    def test_methods_random(self, method, first: bytes, middle: bytes, chunks: list) -> None:
        """Each preamble method fed random bytes directly raises only IdentifyError."""
        self._check(method(LIMIT).feed, [first + middle] + chunks)

    @_PROPERTY
    @given(
        data=st.sampled_from([CURL_CONNECT, OPENSSL_CONNECT, CURL_GET, b"SHARD api\r\n", b"SHARD api\n"]),
        tail=st.binary(max_size=32),
        cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    )
    def test_any_split_same_answer(self, data: bytes, tail: bytes, cuts: list) -> None:
        """However a valid preamble (and what follows it) is split into chunks, the answer is the same."""
        whole = Detector(ALL).feed(data + tail)
        stream = data + tail
        points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
        detector = Detector(ALL)
        found = None
        for start, end in zip(points, points[1:]):
            found = detector.feed(stream[start:end])
            if found is not None:
                break
        self.assertEqual(found, whole)
        self.assertLessEqual(found.consume, len(data))
