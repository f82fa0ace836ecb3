"""
An incremental, bounded parser for the TLS ClientHello.

shardtcp routes TLS connections on what the client says in its first flight
(the server name and the offered ALPN protocols) without terminating TLS, so
it has to read the ClientHello from bytes it only peeks at. This module is
that reader, and nothing else: it knows no sockets, no timers and no
configuration. A connection feeds it whatever arrives
(``ClientHelloParser.feed``) until it returns a ``ClientHelloInfo`` or raises
a ``ClientHelloError``; the caller keeps the bytes it fed and forwards them
untouched.

What the parser promises:

* the result does not depend on how the bytes were split into ``feed`` calls
  (one byte at a time gives the same answer, or the same error, as one call);
* a ClientHello may be fragmented over several TLS handshake records, as
  RFC 8446 section 5.1 allows; any other record type in between is an error;
* memory is bounded by ``max_size``: a declared length that cannot fit is
  refused as soon as it is read, before the bytes it announces arrive;
* every refusal names a specific reason (``str(exc)``), a metric-friendly
  slug (``exc.reason``) and the TLS alert a server would answer with
  (``exc.alert``, ``None`` when the peer does not speak TLS at all).

It also holds the two small TLS facts the connection path needs around it:
``looks_like_tls`` for protocol sniffing on shared ports, and ``tls_alert``
to refuse a TLS client in its own language.  Server names are checked by
the one DNS-name grammar, ``shardtcp.identify.names.is_dns_name``.
"""

from __future__ import annotations

import enum
import struct
from typing import ClassVar, Optional

from attrs import frozen

from shardtcp.identify.names import is_dns_name

__all__ = [
    "AlertDescription",
    "ClientHelloError",
    "ClientHelloInfo",
    "ClientHelloParser",
    "ClientHelloTooLarge",
    "MalformedClientHello",
    "NotTLS",
    "looks_like_tls",
    "split_into_records",
    "tls_alert",
]

# TLS wire constants (RFC 8446 sections 4, 4.2 and 5.1).
_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_MAX_RECORD = 2**14
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_NAME_TYPE_HOST_NAME = 0

# legacy_version, random, session_id length, one cipher suite with its
# length, one compression method with its length: anything shorter than
# this cannot be a ClientHello, so a declared length below it is refused
# before its bytes arrive.
_MIN_CLIENT_HELLO_BODY = 2 + 32 + 1 + 2 + 2 + 1 + 1

# Error messages quote attacker-supplied names; keep them short.
_QUOTE_LIMIT = 64


class AlertDescription(enum.IntEnum):
    """
    TLS alert descriptions (RFC 8446 section 6, RFC 6066, RFC 7301), for
    ``tls_alert`` and for ``ClientHelloError.alert``.
    """

    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    record_overflow = 22
    handshake_failure = 40
    bad_certificate = 42
    unsupported_certificate = 43
    certificate_revoked = 44
    certificate_expired = 45
    certificate_unknown = 46
    illegal_parameter = 47
    unknown_ca = 48
    access_denied = 49
    decode_error = 50
    decrypt_error = 51
    protocol_version = 70
    insufficient_security = 71
    internal_error = 80
    inappropriate_fallback = 86
    user_canceled = 90
    missing_extension = 109
    unsupported_extension = 110
    unrecognized_name = 112
    bad_certificate_status_response = 113
    unknown_psk_identity = 115
    certificate_required = 116
    no_application_protocol = 120


class ClientHelloError(Exception):
    """
    The first bytes of a connection are not a ClientHello shardtcp accepts.

    ``str(exc)`` is a short human reason for logs; ``reason`` is a fixed slug
    for metric labels (one per subclass, so label cardinality stays fixed);
    ``alert`` is the TLS alert to send before closing, or ``None`` when the
    peer is not speaking TLS and should get no TLS bytes at all.
    """

    reason: ClassVar[str] = "invalid"
    default_alert: ClassVar[Optional[AlertDescription]] = AlertDescription.decode_error

    def __init__(
        self, message: str, alert: Optional[AlertDescription] = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.alert: Optional[AlertDescription] = (
            self.default_alert if alert is None else alert
        )

    def __str__(self) -> str:
        return self.message


class NotTLS(ClientHelloError):
    """
    The bytes do not start a TLS handshake record: another protocol, or an
    SSLv2-compatible hello, which shardtcp does not route.
    """

    reason = "not_tls"
    default_alert = None


class MalformedClientHello(ClientHelloError):
    """The bytes start a TLS handshake but break its framing or syntax."""

    reason = "malformed"


class ClientHelloTooLarge(ClientHelloError):
    """
    The ClientHello (with its record headers) would exceed the parser's
    ``max_size``. The alert follows OpenSSL and BoringSSL, which answer an
    over-long handshake message with illegal_parameter.
    """

    reason = "too_large"
    default_alert = AlertDescription.illegal_parameter


@frozen
class ClientHelloInfo:
    """
    What routing needs from a ClientHello.

    ``server_name`` is the first host_name of the server_name extension,
    lowercased and without a trailing dot, or ``None`` without one.
    ``alpn`` lists the offered protocols in the client's order (latin-1
    decoded, so any byte survives). ``supported_versions`` is the extension's
    list as sent, GREASE values included, empty when absent.
    ``length`` is the handshake message's declared body length (the 24-bit
    field, not counting its 4-byte header); ``records`` is how many TLS
    records carried it.
    """

    server_name: Optional[str]
    alpn: tuple[str, ...]
    legacy_version: int
    supported_versions: tuple[int, ...]
    length: int
    records: int


def looks_like_tls(first_bytes: bytes) -> Optional[bool]:
    """
    Say whether a connection's first bytes start a TLS handshake record
    (``16 03 0X``), for choosing between TLS and a plain-text preamble.

    Returns ``None`` while too few bytes are known to say (at most three are
    needed). Agrees with ``ClientHelloParser``: given three bytes or more, it
    is ``False`` exactly when the parser raises ``NotTLS``.
    """
    if not first_bytes:
        return None
    if first_bytes[0] != _CONTENT_HANDSHAKE:
        return False
    if len(first_bytes) < 2:
        return None
    if first_bytes[1] != 3:
        return False
    if len(first_bytes) < 3:
        return None
    return first_bytes[2] & 0xF0 == 0


def tls_alert(description: int, version: int = 0x0303) -> bytes:
    """
    Encode a fatal TLS alert record (``15 03 03 00 02 02 <description>``), to
    refuse a TLS client before closing its connection.

    The record is in plaintext, so it is only meaningful before the
    handshake has set up keys, which is when the proxy refuses.
    """
    if not 0 <= description <= 0xFF:
        raise ValueError(f"alert description {description} is not a byte")
    if not 0 <= version <= 0xFFFF:
        raise ValueError(f"record version {version} does not fit 16 bits")
    return bytes([21, version >> 8, version & 0xFF, 0, 2, 2, description])


def split_into_records(hello_bytes: bytes, sizes: list[int]) -> bytes:
    """
    Re-frame a ClientHello into several handshake records, to test that
    readers of it (this parser, the proxy, shards) handle record
    fragmentation.

    ``hello_bytes`` is one or more complete handshake records, as a client
    sends them. ``sizes`` gives the payload sizes of the leading new
    records; whatever they leave over goes into one last record. The new
    records keep the first record's version.
    """
    payload = bytearray()
    pos = 0
    version = b""
    while pos < len(hello_bytes):
        header = hello_bytes[pos : pos + _RECORD_HEADER]
        if len(header) < _RECORD_HEADER or header[0] != _CONTENT_HANDSHAKE:
            raise ValueError(f"no handshake record header at offset {pos}")
        length = int.from_bytes(header[3:5], "big")
        fragment = hello_bytes[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        if len(fragment) != length:
            raise ValueError(f"record at offset {pos} is truncated")
        version = version or bytes(header[1:3])
        payload += fragment
        pos += _RECORD_HEADER + length
    if not payload:
        raise ValueError("no handshake records given")
    if any(not 1 <= size <= _MAX_RECORD for size in sizes):
        raise ValueError(f"record sizes must be within 1..{_MAX_RECORD}")
    if sum(sizes) > len(payload):
        raise ValueError(
            f"record sizes add up to {sum(sizes)}, more than the"
            f" {len(payload)} handshake bytes"
        )
    rest = len(payload) - sum(sizes)
    if rest > _MAX_RECORD:
        raise ValueError(f"the last record would hold {rest} bytes")
    out = bytearray()
    start = 0
    for size in [*sizes, rest] if rest else sizes:
        out += bytes([_CONTENT_HANDSHAKE]) + version + size.to_bytes(2, "big")
        out += payload[start : start + size]
        start += size
    return bytes(out)


class ClientHelloParser:
    """
    Reassemble and parse one ClientHello from a connection's first bytes.

    Feed it every chunk as it arrives. It keeps only what it must (the
    current record header and the handshake message, both within
    ``max_size``), so a caller that stops reading once ``feed`` returns or
    raises never holds more than ``max_size`` plus one read.

    ``max_size`` bounds the bytes on the wire the ClientHello may take: its
    handshake message plus the header of every record carrying it.
    """

    def __init__(self, max_size: int = 16384) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be positive, not {max_size}")
        self._max_size = max_size
        self._fed = 0
        self._header = bytearray()
        self._record_left = 0
        self._records = 0
        # Wire bytes the hello's records declared so far, headers included.
        self._wire = 0
        # Handshake bytes the records declared so far.
        self._declared = 0
        self._handshake = bytearray()
        # 4 + the handshake body length, once its header has arrived.
        self._expected: Optional[int] = None
        self._result: Optional[ClientHelloInfo] = None
        self._error: Optional[ClientHelloError] = None

    @property
    def buffered(self) -> int:
        """How many bytes have been fed so far, including any past the hello."""
        return self._fed

    def feed(self, data: bytes) -> Optional[ClientHelloInfo]:
        """
        Take the next bytes of the connection.

        Returns ``None`` while more bytes are needed, the ``ClientHelloInfo``
        once the hello is complete (bytes past its last record are ignored),
        and raises a ``ClientHelloError`` subclass as soon as the bytes
        cannot be an acceptable ClientHello. Once it has answered, further
        calls give the same answer again.
        """
        self._fed += len(data)
        if self._error is not None:
            raise self._error
        if self._result is not None:
            return self._result
        try:
            return self._consume(memoryview(data).cast("B"))
        except ClientHelloError as error:
            self._error = error
            raise

    def _consume(self, data: memoryview) -> Optional[ClientHelloInfo]:
        pos = 0
        while pos < len(data):
            if self._record_left == 0:
                take = data[pos : pos + _RECORD_HEADER - len(self._header)]
                pos += len(take)
                self._header += take
                self._check_header_prefix()
                if len(self._header) == _RECORD_HEADER:
                    self._start_record()
                continue
            take = data[pos : pos + self._record_left]
            pos += len(take)
            self._record_left -= len(take)
            had = len(self._handshake)
            self._handshake += take
            if had < _HANDSHAKE_HEADER <= len(self._handshake):
                self._start_handshake()
            if self._record_left == 0 and len(self._handshake) == self._expected:
                self._result = self._parse()
                return self._result
        return None

    def _check_header_prefix(self) -> None:
        """
        Refuse a record header from its first bad byte, so a non-TLS peer is
        told off without waiting for bytes it may never send.
        """
        header = self._header
        first = self._records == 0
        if header[0] != _CONTENT_HANDSHAKE:
            if not first:
                raise MalformedClientHello(
                    f"record type {header[0]} interleaved with the ClientHello",
                    AlertDescription.unexpected_message,
                )
            if header[0] & 0x80:
                # A two-byte SSLv2 record length with the high bit set; the
                # third byte tells an SSLv2 CLIENT-HELLO from other noise.
                if len(header) < 3:
                    return
                if header[2] == 1:
                    raise NotTLS("SSLv2-compatible ClientHello")
            raise NotTLS(f"first byte 0x{header[0]:02x} is not a TLS handshake record")
        error = NotTLS if first else MalformedClientHello
        if len(header) >= 2 and header[1] != 3:
            raise error(f"record version major {header[1]} is not TLS")
        if len(header) >= 3 and header[2] & 0xF0:
            raise error(f"record version 0x03{header[2]:02x} is not TLS")

    def _start_record(self) -> None:
        length = int.from_bytes(self._header[3:5], "big")
        self._header.clear()
        if length > _MAX_RECORD:
            raise MalformedClientHello(
                f"record length {length} exceeds {_MAX_RECORD}",
                AlertDescription.record_overflow,
            )
        if length == 0:
            # RFC 8446 5.1 and RFC 5246 6.2.1 forbid empty handshake fragments.
            raise MalformedClientHello("empty handshake record")
        self._records += 1
        self._record_left = length
        self._declared += length
        self._wire += _RECORD_HEADER + length
        self._check_overrun()
        if self._wire > self._max_size:
            raise ClientHelloTooLarge(
                f"ClientHello records reach {self._wire} bytes, over the"
                f" limit of {self._max_size}"
            )

    def _start_handshake(self) -> None:
        kind = self._handshake[0]
        if kind != _HANDSHAKE_CLIENT_HELLO:
            raise MalformedClientHello(
                f"handshake type {kind} is not ClientHello",
                AlertDescription.unexpected_message,
            )
        length = int.from_bytes(self._handshake[1:4], "big")
        if length < _MIN_CLIENT_HELLO_BODY:
            raise MalformedClientHello(
                f"handshake length {length} is too short for a ClientHello"
            )
        self._expected = _HANDSHAKE_HEADER + length
        self._check_overrun()
        # The fewest wire bytes the whole hello can take: what the records
        # declared so far, plus the rest in as few full records as possible.
        missing = self._expected - self._declared
        more_records = -(-missing // _MAX_RECORD)
        needed = self._wire + missing + more_records * _RECORD_HEADER
        if needed > self._max_size:
            raise ClientHelloTooLarge(
                f"ClientHello of {length} bytes needs at least {needed} bytes"
                f" with its record headers, over the limit of {self._max_size}"
            )

    def _check_overrun(self) -> None:
        # The ClientHello is the client's whole first flight, and a key
        # change (0-RTT) must start on a record boundary, so its last record
        # may hold nothing after it.
        if self._expected is not None and self._declared > self._expected:
            raise MalformedClientHello(
                f"records carry {self._declared - self._expected} bytes past"
                " the end of the ClientHello",
                AlertDescription.unexpected_message,
            )

    def _parse(self) -> ClientHelloInfo:
        # One pass over the body with plain integer offsets: every length is
        # checked against what is left before it is used (this runs once per
        # connection on every SNI listener, so it avoids a call per field).
        data = bytes(self._handshake)
        end = len(data)
        pos = _HANDSHAKE_HEADER
        if end - pos < 2:
            raise MalformedClientHello("legacy_version truncated")
        legacy_version = data[pos] << 8 | data[pos + 1]
        pos += 2
        if legacy_version >> 8 != 3:
            raise MalformedClientHello(
                f"legacy_version 0x{legacy_version:04x} is not TLS",
                AlertDescription.protocol_version,
            )
        if end - pos < 32:
            raise MalformedClientHello("random truncated")
        pos += 32
        if end - pos < 1:
            raise MalformedClientHello("session_id truncated")
        length = data[pos]
        pos += 1
        if end - pos < length:
            raise MalformedClientHello("session_id truncated")
        pos += length
        if length > 32:
            raise MalformedClientHello(
                f"session_id length {length} exceeds 32",
                AlertDescription.illegal_parameter,
            )
        if end - pos < 2:
            raise MalformedClientHello("cipher_suites truncated")
        length = data[pos] << 8 | data[pos + 1]
        pos += 2
        if end - pos < length:
            raise MalformedClientHello("cipher_suites truncated")
        pos += length
        if not length or length % 2:
            raise MalformedClientHello(
                f"cipher_suites length {length} is not a positive even number"
            )
        if end - pos < 1:
            raise MalformedClientHello("compression_methods truncated")
        length = data[pos]
        pos += 1
        if end - pos < length:
            raise MalformedClientHello("compression_methods truncated")
        pos += length
        if not length:
            raise MalformedClientHello("compression_methods list is empty")
        # extension type -> (start, stop) of its data
        extensions: dict[int, tuple[int, int]] = {}
        # Before TLS 1.3 a ClientHello may end without an extensions block.
        if pos < end:
            if end - pos < 2:
                raise MalformedClientHello("extensions truncated")
            length = data[pos] << 8 | data[pos + 1]
            pos += 2
            if end - pos < length:
                raise MalformedClientHello("extensions truncated")
            stop = pos + length
            if stop != end:
                raise MalformedClientHello(f"{end - stop} bytes after the extensions")
            while pos < stop:
                if stop - pos < 2:
                    raise MalformedClientHello("extension type truncated")
                kind = data[pos] << 8 | data[pos + 1]
                if stop - pos < 4:
                    raise MalformedClientHello(f"extension {kind} truncated")
                length = data[pos + 2] << 8 | data[pos + 3]
                pos += 4
                if stop - pos < length:
                    raise MalformedClientHello(f"extension {kind} truncated")
                if kind in extensions:
                    raise MalformedClientHello(
                        f"duplicate extension {kind}",
                        AlertDescription.illegal_parameter,
                    )
                extensions[kind] = (pos, pos + length)
                pos += length

        def extension(kind: int) -> Optional[bytes]:
            found = extensions.get(kind)
            return None if found is None else data[found[0] : found[1]]

        return ClientHelloInfo(
            server_name=_server_name(extension(_EXT_SERVER_NAME)),
            alpn=_alpn(extension(_EXT_ALPN)),
            legacy_version=legacy_version,
            supported_versions=_supported_versions(extension(_EXT_SUPPORTED_VERSIONS)),
            length=self._expected - _HANDSHAKE_HEADER,
            records=self._records,
        )


def _vector(data: bytes, pos: int, size: int, what: str) -> tuple[int, int]:
    """``(start, stop)`` of the vector whose ``size``-byte length is at ``pos``."""
    end = len(data)
    if end - pos < size:
        raise MalformedClientHello(f"{what} truncated")
    length = data[pos] if size == 1 else data[pos] << 8 | data[pos + 1]
    pos += size
    if end - pos < length:
        raise MalformedClientHello(f"{what} truncated")
    return pos, pos + length


def _whole(data: bytes, size: int, what: str) -> tuple[int, int]:
    """The one vector that must fill ``data`` exactly."""
    start, stop = _vector(data, 0, size, what)
    if stop != len(data):
        raise MalformedClientHello(f"{len(data) - stop} bytes after the {what}")
    return start, stop


def _server_name(data: Optional[bytes]) -> Optional[str]:
    if data is None:
        return None
    pos, stop = _whole(data, 2, "server_name list")
    if pos == stop:
        raise MalformedClientHello("server_name list is empty")
    host_name: Optional[bytes] = None
    while pos < stop:
        name_type = data[pos]
        # RFC 6066 defines only host_name, and every name type since has
        # been proposed with the same 16-bit length prefix.
        start, pos = _vector(data, pos + 1, 2, "server_name entry")
        if name_type == _NAME_TYPE_HOST_NAME and host_name is None:
            host_name = data[start:pos]
    if host_name is None:
        return None
    return _host_name(host_name)


def _host_name(raw: bytes) -> str:
    try:
        name = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise MalformedClientHello(
            "server_name is not ASCII", AlertDescription.illegal_parameter
        ) from None
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise MalformedClientHello(
            "server_name is empty", AlertDescription.illegal_parameter
        )
    if not is_dns_name(name):
        shown = name if len(name) <= _QUOTE_LIMIT else name[:_QUOTE_LIMIT] + "..."
        raise MalformedClientHello(
            f"server_name {shown!r} is not a host name",
            AlertDescription.illegal_parameter,
        )
    return name


def _alpn(data: Optional[bytes]) -> tuple[str, ...]:
    if data is None:
        return ()
    pos, stop = _whole(data, 2, "ALPN list")
    if pos == stop:
        raise MalformedClientHello("ALPN list is empty")
    protocols = []
    while pos < stop:
        start, pos = _vector(data, pos, 1, "ALPN protocol name")
        if start == pos:
            raise MalformedClientHello("empty ALPN protocol name")
        protocols.append(data[start:pos].decode("latin-1"))
    return tuple(protocols)


def _supported_versions(data: Optional[bytes]) -> tuple[int, ...]:
    if data is None:
        return ()
    start, stop = _whole(data, 1, "supported_versions list")
    if start == stop or (stop - start) % 2:
        raise MalformedClientHello(
            f"supported_versions length {stop - start} is not a positive"
            " even number"
        )
    # One C call for the whole list, not a generator step per version.
    return struct.unpack_from(f">{(stop - start) // 2}H", data, start)
