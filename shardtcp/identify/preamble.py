"""
Preamble parsers: identify the service from a plain-text first message.

Three methods, each a pure, incremental parser fed the client's first
bytes (no I/O, no clock) and bounded by the byte limit it is built with
(the listener's 8 KiB preamble bound):

``connect`` (``ConnectMethod``)
    An HTTP proxy request, ``CONNECT host:port HTTP/1.1``, header fields
    and a blank line. The whole head is consumed (the shard never sees it);
    ``HTTP/1.1 200 Connection established`` is answered once the shard is
    connected. Bytes after the blank line (a ClientHello sent without
    waiting for the 200) are not consumed: they are the tunnel's first
    bytes and go to the shard.
``line`` (``LineMethod``)
    One line, ``SHARD <service>`` or ``SHARD <service> <key>`` ended by
    CRLF or a bare LF; consumed. The name may be a configured service name
    or a service id (``Identified.by_service_id``); the key, 1 to 253
    printable ASCII characters without spaces, is ``Identified.key`` (the
    ``line-arg`` shard key).
``http-host`` (``HttpHostMethod``)
    A plain HTTP/1.x request, peeked up to the end of its header fields and
    not consumed: the request reaches the shard byte for byte. The
    request-target's authority (absolute-form) or else the ``Host`` field
    names the service.

Choices where RFC 9112 leaves room, all in the direction of refusing what
the shard might read differently from the proxy:

* Line ends: ``connect`` accepts a bare LF as a line end (RFC 9112
  section 2.2 allows it; the head ends at the proxy, so nobody can read it
  otherwise). ``http-host`` requires CRLF, because its head is forwarded
  and a shard that disagreed about where a line ends could see another
  ``Host`` than the one the connection was routed by. A CR not followed by
  LF is an error everywhere.
* Obsolete line folding, whitespace between a field name and its colon,
  and control characters in a field value are errors (400).
* The start line is ``method SP request-target SP HTTP/1.0|HTTP/1.1`` with
  single spaces; no empty lines before it.
* Hosts are DNS names (``shardtcp.identify.names.dns_name_problem``:
  letters, digits, ``-``, ``_``, labels of at most 63 characters, at most
  253 in all; one trailing dot ignored), dotted-quad
  IPv4 addresses or bracketed IPv6 addresses (no zone, no IPvFuture): the
  names a service can list. A name whose last label is all digits must be
  an IPv4 address. Other reg-names are malformed rather than unknown.
  Names are lowercased, IPv6 addresses compressed, ports written without
  leading zeros.
* ``connect``: the port is required (1..65535); header fields are checked
  for syntax and otherwise ignored, ``Host`` included, since the
  request-target is authoritative and common clients (``openssl s_client
  -proxy``) send HTTP/1.0 without one.
* ``http-host``: HTTP/1.1 requires exactly one ``Host`` field (RFC 9112
  section 3.2, even in absolute-form); HTTP/1.0 may omit it. More than
  one, or an invalid value, is malformed. An empty ``Host`` value, or none
  on HTTP/1.0, identifies no name (the listener's ``default_service``
  applies). An absolute-form target (``GET http://h/ HTTP/1.1``, schemes
  http and https) names the service by its authority, and the ``Host``
  field is then only checked (RFC 9112 section 3.2.2); userinfo and an
  empty host are malformed. A ``Host`` port is kept (``host:port``), an
  empty one (``host:``) dropped. Only the first request is seen: later
  requests on the same connection go to the same shard whatever their
  ``Host`` says.

Refusals raise ``IdentifyError`` with protocol ``AnswerProtocol.HTTP``
(``connect``, ``http-host``) or ``LINE``: reasons ``malformed`` (400, ``ERR malformed``),
``uri_too_long`` (414: the limit was reached inside the request line),
``header_too_large`` (431: inside the header fields) and, for ``line``,
``too_large`` when the service name or the key is longer than 253
characters.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable, Optional

from attrs import frozen
from zope.interface import implementer

from shardtcp.identify.names import dns_name_problem
from shardtcp.identify.types import AnswerProtocol, IIdentifyMethod, Identified, IdentifyError
from shardtcp.net import parse_port

__all__ = [
    "CONNECT_ESTABLISHED",
    "HTTP_METHODS",
    "ConnectMethod",
    "HttpHostMethod",
    "LineMethod",
    "parse_authority",
]

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

# The request methods the http-host method routes (RFC 9110 section 9 and
# PATCH); CONNECT is the connect method's.
HTTP_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE")

_LINE_PREFIX = b"SHARD "
_MAX_SERVICE = 253
_SERVICE = re.compile(rb"[A-Za-z0-9_.:-]+")
_SERVICE_BAD = re.compile(rb"[^A-Za-z0-9_.:-]")
_MAX_KEY = 253
_KEY = re.compile(rb"[\x21-\x7e]+")
_KEY_BAD = re.compile(rb"[^\x21-\x7e]")

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than HTAB have no place in a field value
# (RFC 9110 section 5.5); CR and LF cannot reach here.
_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)")

_DIGITS = re.compile(r"[0-9]+")
_DEC_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_DEC_OCTET}(?:\.{_DEC_OCTET}){{3}}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")

# How much of the offending input an error message quotes.
_SHOWN = 48


def _show(data: bytes) -> str:
    """A short, printable quote of client bytes for an error message."""
    shown = repr(bytes(data[:_SHOWN]))
    return shown + ("..." if len(data) > _SHOWN else "")


class _Invalid(ValueError):
    """A host or authority that names nothing; the message says why."""


def _parse_host(text: str) -> str:
    """
    The canonical form of a host (lowercase DNS name without trailing dot,
    IPv4 dotted quad, or ``[compressed IPv6]``); raises ``_Invalid``.
    """
    if text.startswith("["):
        if not text.endswith("]"):
            raise _Invalid("'[' without a closing ']'")
        inner = text[1:-1]
        if not _IPV6_CHARS.fullmatch(inner):
            raise _Invalid(f"{inner!r} is not an IPv6 address (zones and IPvFuture are not accepted)")
        try:
            return f"[{ipaddress.IPv6Address(inner).compressed}]"
        except ValueError:
            raise _Invalid(f"{inner!r} is not an IPv6 address") from None
    host = text.lower()
    if host.endswith("."):
        host = host[:-1]
    problem = dns_name_problem(host)
    if problem is not None:
        raise _Invalid(problem)
    labels = host.split(".")
    # No top-level domain is all digits: such a name is meant as an IPv4
    # address, and one that is not a valid one is refused, not looked up.
    if _DIGITS.fullmatch(labels[-1]) and not _IPV4.fullmatch(host):
        raise _Invalid(f"{host!r} is not an IPv4 address")
    return host


def parse_authority(text: str, *, require_port: bool) -> tuple[str, Optional[int]]:
    """
    Split an authority (``host``, ``host:port``, ``[v6]:port``) into its
    canonical host and its port (None when absent or empty, unless
    ``require_port``). Raises ``ValueError`` saying what is wrong.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _Invalid("'[' without a closing ']'")
        host_text, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _Invalid(f"unexpected {rest[:16]!r} after ']'")
        port_text = rest[1:] if rest else None
    else:
        host_text, colon, port_text = text.partition(":")
        if not colon:
            port_text = None
    host = _parse_host(host_text)
    if not port_text:
        if require_port:
            raise _Invalid("a port is required (host:port)")
        return host, None
    try:
        port = parse_port(port_text)
    except ValueError:
        port = 0
    if not port:
        raise _Invalid(f"port {port_text[:16]!r} is not a number in 1..65535")
    return host, port


def _name(host: str, port: Optional[int]) -> str:
    return host if port is None else f"{host}:{port}"


@frozen
class _RequestHead:
    """An HTTP/1.x request head as far as routing needs it."""

    method: bytes
    target: bytes
    version: bytes
    fields: tuple  # ((lowercased name, value), ...) in order
    length: int  # bytes up to and including the blank line


class _HeadParser:
    """
    Incremental, bounded reader of an HTTP/1.x request head.

    Holds at most ``limit`` bytes: a head that has not ended within them is
    refused (``uri_too_long`` before the end of the request line,
    ``header_too_large`` after it), and bytes past the blank line are
    neither kept nor looked at. Each line is checked as soon as it is
    complete, so a malformed head is refused without waiting for its end:
    ``check_request(method, target)`` runs as soon as the request line has
    ended (raising ``IdentifyError`` to refuse) and what it returns is kept
    as ``checked``.
    """

    def __init__(self, limit: int, *, bare_lf: bool, check_request: Callable[[bytes, bytes], object]) -> None:
        self._limit = limit
        self._bare_lf = bare_lf
        self._check_request = check_request
        self.checked: object = None  # what check_request returned
        self._buffer = bytearray()
        self._line_start = 0
        self._scanned = 0  # no LF before this offset after _line_start
        self._request: Optional[tuple] = None
        self._fields: list = []

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> Optional[_RequestHead]:
        room = self._limit - len(self._buffer)
        self._buffer += data[:room]
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(buffer)
                if len(buffer) >= self._limit:
                    if self._request is None:
                        raise _http_error(
                            "uri_too_long", f"no end of the request line within {self._limit} bytes"
                        )
                    raise _http_error(
                        "header_too_large", f"no end of the header fields within {self._limit} bytes"
                    )
                return None
            line = bytes(buffer[self._line_start : end])
            self._line_start = self._scanned = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            elif not self._bare_lf:
                raise _http_error("malformed", f"line ended by a bare LF: {_show(line)}")
            if b"\r" in line:
                raise _http_error("malformed", f"CR not followed by LF: {_show(line)}")
            if self._request is None:
                self._request = _request_line(line)
                self.checked = self._check_request(*self._request[:2])
            elif line:
                self._fields.append(_field_line(line))
            else:
                method, target, version = self._request
                return _RequestHead(method, target, version, tuple(self._fields), end + 1)


def _http_error(reason: str, message: str) -> IdentifyError:
    return IdentifyError(reason, message, AnswerProtocol.HTTP)


def _request_line(line: bytes) -> tuple:
    """``(method, target, version)`` of a request line, strictly."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise _http_error("malformed", f"request line is not 'method target version': {_show(line)}")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise _http_error("malformed", f"method {_show(method)} is not a token")
    if not _TARGET.fullmatch(target):
        raise _http_error("malformed", f"request-target {_show(target)} has characters outside visible ASCII")
    if not _VERSION.fullmatch(version):
        raise _http_error("malformed", f"version {_show(version)} is not HTTP/1.0 or HTTP/1.1")
    return method, target, version


def _field_line(line: bytes) -> tuple:
    """``(lowercased name, value)`` of a header field line, strictly."""
    if line[:1] in (b" ", b"\t"):
        raise _http_error("malformed", f"obsolete line folding or whitespace before a field: {_show(line)}")
    name, colon, value = line.partition(b":")
    if not colon:
        raise _http_error("malformed", f"header line without ':': {_show(line)}")
    if not _TOKEN.fullmatch(name):
        # Also whitespace before the colon (RFC 9112 section 5.1).
        raise _http_error("malformed", f"field name {_show(name)} is not a token")
    value = value.strip(b" \t")
    if _VALUE_BAD.search(value):
        raise _http_error("malformed", f"control character in field {_show(name)}")
    return name.lower(), value


class _Method:
    """
    What the three preamble methods share: a parser that, once it has
    answered or refused, keeps that answer and holds no further bytes.
    """

    name = ""
    protocol = AnswerProtocol.NONE

    def __init__(self, max_size: int) -> None:
        self._limit = max_size
        self._result: Optional[Identified] = None
        self._error: Optional[IdentifyError] = None

    def feed(self, data: bytes) -> Optional[Identified]:
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise self._error
        try:
            self._result = self._feed(data)
        except IdentifyError as error:
            self._error = error
            raise
        return self._result

    def _feed(self, data: bytes) -> Optional[Identified]:
        raise NotImplementedError


@implementer(IIdentifyMethod)
class ConnectMethod(_Method):
    """
    ``CONNECT host:port HTTP/1.x``: the head is consumed, the name is
    ``host:port`` and ``CONNECT_ESTABLISHED`` is answered once connected.
    """

    name = "connect"
    protocol = AnswerProtocol.HTTP

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self._head = _HeadParser(max_size, bare_lf=True, check_request=self._target_name)

    @property
    def buffered(self) -> int:
        """How many bytes the parser holds (never more than its limit)."""
        return self._head.buffered

    @staticmethod
    def _target_name(method: bytes, target: bytes) -> str:
        if method != b"CONNECT":
            raise _http_error("malformed", f"method {_show(method)} is not CONNECT")
        try:
            host, port = parse_authority(target.decode("ascii"), require_port=True)
        except ValueError as error:
            raise _http_error("malformed", f"CONNECT target {_show(target)}: {error}") from None
        return _name(host, port)

    def _feed(self, data: bytes) -> Optional[Identified]:
        head = self._head.feed(data)
        if head is None:
            return None
        return Identified(
            method=self.name,
            protocol=self.protocol,
            name=self._head.checked,
            consume=head.length,
            reply_when_connected=CONNECT_ESTABLISHED,
        )


@implementer(IIdentifyMethod)
class HttpHostMethod(_Method):
    """
    A plain HTTP/1.x request, peeked and not consumed: the name is the
    absolute-form target's authority, else the ``Host`` field.
    """

    name = "http-host"
    protocol = AnswerProtocol.HTTP

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self._head = _HeadParser(max_size, bare_lf=False, check_request=self._target_name)

    @property
    def buffered(self) -> int:
        """How many bytes the parser holds (never more than its limit)."""
        return self._head.buffered

    def _feed(self, data: bytes) -> Optional[Identified]:
        head = self._head.feed(data)
        if head is None:
            return None
        hosts = [value for name, value in head.fields if name == b"host"]
        if len(hosts) > 1:
            raise _http_error("malformed", f"{len(hosts)} Host fields")
        host_name: Optional[str] = None
        if hosts:
            host_name = self._authority_name(hosts[0], "Host")
        elif head.version == b"HTTP/1.1":
            raise _http_error("malformed", "HTTP/1.1 request without a Host field")
        name = self._head.checked or host_name
        return Identified(method=self.name, protocol=self.protocol, name=name)

    @classmethod
    def _target_name(cls, method: bytes, target: bytes) -> Optional[str]:
        """The absolute-form target's authority as a name, else None."""
        if method not in HTTP_METHODS:
            raise _http_error("malformed", f"method {_show(method)} is not routed by Host")
        if target.startswith(b"/"):
            return None
        if target == b"*":
            if method != b"OPTIONS":
                raise _http_error("malformed", "asterisk-form target with a method other than OPTIONS")
            return None
        absolute = _ABSOLUTE.match(target)
        if absolute is None:
            raise _http_error("malformed", f"request-target {_show(target)} is neither origin nor absolute form")
        scheme, authority = absolute.groups()
        if scheme.lower() not in (b"http", b"https"):
            raise _http_error("malformed", f"scheme {_show(scheme)} is not http or https")
        if b"@" in authority:
            raise _http_error("malformed", "userinfo in the request-target")
        if not authority:
            raise _http_error("malformed", "absolute-form target without a host")
        return cls._authority_name(authority, "request-target")

    @staticmethod
    def _authority_name(value: bytes, where: str) -> Optional[str]:
        if not value:
            return None
        try:
            host, port = parse_authority(value.decode("ascii"), require_port=False)
        except (UnicodeDecodeError, ValueError) as error:
            raise _http_error("malformed", f"{where} {_show(value)}: {error}") from None
        return _name(host, port)


@implementer(IIdentifyMethod)
class LineMethod(_Method):
    """
    ``SHARD <service>``, optionally `` <key>``, and a line end (CRLF or
    LF): consumed; the name is the service as written, a service name or a
    service id, and the key the ``line-arg`` shard key.
    """

    name = "line"
    protocol = AnswerProtocol.LINE

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self._buffer = bytearray()
        # The longest valid line: the prefix, the longest name, a space,
        # the longest key, CRLF.
        self._cap = min(max_size, len(_LINE_PREFIX) + _MAX_SERVICE + 1 + _MAX_KEY + 2)

    @property
    def buffered(self) -> int:
        """How many bytes the parser holds (never more than its limit)."""
        return len(self._buffer)

    def _feed(self, data: bytes) -> Optional[Identified]:
        start = len(self._buffer)
        self._buffer += data[: self._cap - start]
        buffer = self._buffer
        prefix = len(_LINE_PREFIX)
        if buffer[:prefix] != _LINE_PREFIX[: len(buffer)]:
            raise _line_error("malformed", f"not a 'SHARD <service>' line: {_show(buffer)}")
        end = buffer.find(b"\n", max(start, prefix))
        if end >= 0:
            service = bytes(buffer[prefix:end])
            if service.endswith(b"\r"):
                service = service[:-1]
            service, key = _split_line(service)
            if key is not None:
                if len(key) > _MAX_KEY:
                    raise _line_error("too_large", f"key longer than {_MAX_KEY} characters")
                if not _KEY.fullmatch(key):
                    raise _line_error("malformed", f"key {_show(key)} is not 1 to {_MAX_KEY} printable characters")
            if len(service) > _MAX_SERVICE:
                raise _line_error("too_large", f"service name longer than {_MAX_SERVICE} characters")
            if not _SERVICE.fullmatch(service):
                raise _line_error("malformed", f"service {_show(service)} is not [A-Za-z0-9_.:-]{{1,253}}")
            return Identified(
                method=self.name,
                protocol=self.protocol,
                name=service.decode("ascii"),
                consume=end + 1,
                by_service_id=True,
                key=key.decode("ascii") if key is not None else None,
            )
        # Refuse as soon as the line cannot become valid: a character
        # outside the name (a CR is allowed only as the last byte so far).
        pending = bytes(buffer[prefix:])
        body = pending[:-1] if pending.endswith(b"\r") else pending
        body, key = _split_line(body)
        if key is not None:
            if _KEY_BAD.search(key):
                raise _line_error("malformed", f"key {_show(key)} is not 1 to {_MAX_KEY} printable characters")
            if len(key) > _MAX_KEY:
                raise _line_error("too_large", f"key longer than {_MAX_KEY} characters")
        if _SERVICE_BAD.search(body):
            raise _line_error("malformed", f"service {_show(body)} is not [A-Za-z0-9_.:-]{{1,253}}")
        if len(body) > _MAX_SERVICE:
            raise _line_error("too_large", f"service name longer than {_MAX_SERVICE} characters")
        if len(buffer) >= self._cap:
            raise _line_error("too_large", f"no line end within {self._cap} bytes")
        return None


def _split_line(body: bytes) -> tuple[bytes, Optional[bytes]]:
    """``<service>`` or ``<service> <key>``: the service and the key, if any."""
    service, space, key = body.partition(b" ")
    return service, (key if space else None)


def _line_error(reason: str, message: str) -> IdentifyError:
    return IdentifyError(reason, message, AnswerProtocol.LINE)

