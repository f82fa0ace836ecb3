"""
The PROXY protocol (HAProxy's doc/proxy-protocol.txt): encoder and decoder.

This is what shardtcp writes in front of every connection to a shard
(version 2, binary, with TLVs and a CRC32C), what a shard's
``shardtcp.backend`` reads back, and what a listener with ``accept_proxy``
reads from a trusted load balancer (version 1 or 2).

The module is pure: no sockets, no reactor, no logging, and nothing imported
from the rest of shardtcp, so every layer may use it.  Decoding is strict
(anything the specification does not allow is an ``InvalidProxyHeader`` with
a short ``reason`` slug) and bounded (``HeaderParser`` never buffers more
than ``max_size`` bytes of header and fails as soon as the bytes seen so far
cannot begin a valid header).

Choices the specification leaves open, made here on purpose:

* The family byte must be one of the seven values the specification lists,
  for LOCAL headers too: a receiver "ignores" a LOCAL header's family, but a
  header whose layout cannot be known cannot have its TLVs or CRC checked.
  A LOCAL header's address block is skipped; its TLVs are parsed and its
  CRC32C verified like any other.
* A decoded header keeps its family/transport byte: ``ProxyHeader.family``
  and ``ProxyHeader.transport`` report what the sender declared, never a
  guess from the address text (a UNIX path may look like an IP address).
* UNIX addresses decode as ``(path, 0)``.  ``encode`` writes only INET,
  INET6 and UNSPEC, over STREAM.
* The CRC32C TLV is optional in the protocol, so flipping its type byte
  would silently remove the check; ``require_crc32c=True`` refuses headers
  without one (what a shard does, per the product specification).
* TLVs whose meaning is fixed are validated when decoded and when encoded:
  CRC32C (exactly 4 bytes, at most once), AUTHORITY (UTF-8), UNIQUE_ID (at
  most 128 bytes) and SSL (well-formed, see ``SSLInfo``); other types are
  carried as opaque bytes.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
import struct
from typing import Iterable, Literal, Sequence

import attrs
import google_crc32c

# Re-exported: the one ``host:port`` formatter lives in ``shardtcp.net``,
# which, like this module, imports nothing else of the project.
from shardtcp.net import IP_CACHE_SIZE, format_hostport, ip_literal

__all__ = [
    "SIGNATURE",
    "Command",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID",
    "PP2_TYPE_SSL",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_TYPE_NETNS",
    "PP2_CLIENT_SSL",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "InvalidProxyHeader",
    "SSLInfo",
    "ProxyHeader",
    "encode",
    "encode_proxy",
    "local_header",
    "HeaderParser",
    "parse",
    "format_hostport",
]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

# Fixed part of a v2 header: signature, version/command, family, length.
_V2_FIXED = 16
_V2_MAX_BODY = 0xFFFF
# A v1 line is at most 107 bytes, CRLF included (the specification's bound).
_V1_MAX = 107
_UNIQUE_ID_MAX = 128

_FAMILY_UNSPEC = 0x0
_FAMILY_INET = 0x1
_FAMILY_INET6 = 0x2
_FAMILY_UNIX = 0x3
_ADDRESS_LENGTH = {_FAMILY_UNSPEC: 0, _FAMILY_INET: 12, _FAMILY_INET6: 36, _FAMILY_UNIX: 216}
# The only family/transport bytes the specification allows.
_VALID_FAMILY_BYTES = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
_TRANSPORT_STREAM = 0x1
_FAMILY_NAMES = {_FAMILY_UNSPEC: "UNSPEC", _FAMILY_INET: "INET", _FAMILY_INET6: "INET6", _FAMILY_UNIX: "UNIX"}
_TRANSPORT_NAMES = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}

_CRC_PLACEHOLDER = bytes([PP2_TYPE_CRC32C, 0, 4, 0, 0, 0, 0])

_PORT_RE = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_TCP4_CHARS = frozenset(b"0123456789.")
_V1_TCP6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")
_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")


class Command(enum.IntEnum):
    """The v2 command nibble: LOCAL (health checks, no addresses) or PROXY."""

    LOCAL = 0
    PROXY = 1


class InvalidProxyHeader(Exception):
    """
    The bytes received are not (or cannot become) a valid PROXY header.

    ``str()`` is a precise, human-readable reason; ``reason`` is a short slug
    for metrics and logs.  Slugs raised by this module: ``bad_signature``,
    ``bad_version``, ``bad_command``, ``bad_family``, ``bad_length``,
    ``bad_tlv``, ``bad_crc``, ``missing_crc``, ``too_large``, ``truncated``,
    ``bad_v1``.  Callers may raise it with their own slugs (``untrusted``).
    """

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


def _iter_tlvs(data: bytes, *, what: str) -> list[tuple[int, bytes]]:
    """Split a TLV area strictly: a TLV that runs past the end is an error."""
    tlvs = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise InvalidProxyHeader(
                f"{what}: {len(data) - offset} stray byte(s) at offset {offset}, "
                "too short for a TLV header",
                reason="bad_tlv",
            )
        tlv_type = data[offset]
        (length,) = struct.unpack_from("!H", data, offset + 1)
        end = offset + 3 + length
        if end > len(data):
            raise InvalidProxyHeader(
                f"{what}: TLV 0x{tlv_type:02X} at offset {offset} declares {length} "
                f"byte(s) but only {len(data) - offset - 3} remain",
                reason="bad_tlv",
            )
        tlvs.append((tlv_type, data[offset + 3 : end]))
        offset = end
    return tlvs


def _decode_text(value: bytes, encoding: str, what: str) -> str:
    try:
        return value.decode(encoding)
    except UnicodeDecodeError as e:
        raise InvalidProxyHeader(
            f"{what} is not valid {encoding}: {e.reason} at byte {e.start}",
            reason="bad_tlv",
        ) from None


@attrs.frozen
class SSLInfo:
    """
    The value of a ``PP2_TYPE_SSL`` TLV: what the proxy knows of the client's
    TLS session.

    ``client`` holds ``PP2_CLIENT_*`` flags; ``verify`` is 0 when the client
    certificate verified (or none was presented), non-zero otherwise.  The
    text fields are the sub-TLVs, ``None`` when absent.
    """

    client: int = 0
    verify: int = 0
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None

    def to_bytes(self) -> bytes:
        """
        Serialize as a TLV value: ``client`` (u8), ``verify`` (u32, big
        endian), then the sub-TLVs that are set, in the order VERSION, CN,
        CIPHER, SIG_ALG, KEY_ALG.  Raises ``ValueError`` on out-of-range
        values.
        """
        if not 0 <= self.client <= 0xFF:
            raise ValueError(f"SSL client flags {self.client!r} do not fit in one byte")
        if not 0 <= self.verify <= 0xFFFFFFFF:
            raise ValueError(f"SSL verify {self.verify!r} does not fit in 32 bits")
        parts = [struct.pack("!BI", self.client, self.verify)]
        for subtype, text, encoding in self._subfields():
            if text is None:
                continue
            try:
                raw = text.encode(encoding)
            except UnicodeEncodeError:
                raise ValueError(
                    f"SSL sub-TLV 0x{subtype:02X} {text!r} is not {encoding}"
                ) from None
            if len(raw) > _V2_MAX_BODY:
                raise ValueError(f"SSL sub-TLV 0x{subtype:02X} is longer than 65535 bytes")
            parts.append(struct.pack("!BH", subtype, len(raw)) + raw)
        return b"".join(parts)

    def _subfields(self) -> tuple[tuple[int, str | None, str], ...]:
        return (
            (PP2_SUBTYPE_SSL_VERSION, self.version, "ascii"),
            (PP2_SUBTYPE_SSL_CN, self.cn, "utf-8"),
            (PP2_SUBTYPE_SSL_CIPHER, self.cipher, "ascii"),
            (PP2_SUBTYPE_SSL_SIG_ALG, self.sig_alg, "ascii"),
            (PP2_SUBTYPE_SSL_KEY_ALG, self.key_alg, "ascii"),
        )

    @classmethod
    def from_bytes(cls, value: bytes) -> SSLInfo:
        """
        Parse a ``PP2_TYPE_SSL`` TLV value.  Sub-TLVs are parsed strictly;
        unknown sub-types are skipped, and the first of a repeated sub-type
        wins.  Raises ``InvalidProxyHeader`` (reason ``bad_tlv``).
        """
        value = bytes(value)
        if len(value) < 5:
            raise InvalidProxyHeader(
                f"SSL TLV is {len(value)} byte(s), shorter than its 5-byte client/verify prefix",
                reason="bad_tlv",
            )
        client, verify = struct.unpack_from("!BI", value)
        fields: dict[int, bytes] = {}
        for subtype, sub_value in _iter_tlvs(value[5:], what="SSL TLV"):
            fields.setdefault(subtype, sub_value)

        def text(subtype: int, encoding: str, name: str) -> str | None:
            raw = fields.get(subtype)
            if raw is None:
                return None
            return _decode_text(raw, encoding, f"SSL sub-TLV {name}")

        return cls(
            client=client,
            verify=verify,
            version=text(PP2_SUBTYPE_SSL_VERSION, "ascii", "VERSION"),
            cn=text(PP2_SUBTYPE_SSL_CN, "utf-8", "CN"),
            cipher=text(PP2_SUBTYPE_SSL_CIPHER, "ascii", "CIPHER"),
            sig_alg=text(PP2_SUBTYPE_SSL_SIG_ALG, "ascii", "SIG_ALG"),
            key_alg=text(PP2_SUBTYPE_SSL_KEY_ALG, "ascii", "KEY_ALG"),
        )


def _to_address(value: object) -> tuple[str, int] | None:
    """Normalize an ``(ip, port)`` pair (any 2-sequence) to a tuple."""
    if value is None:
        return None
    host, port = value  # type: ignore[misc]
    return (host, port)


def _to_tlvs(value: Iterable[tuple[int, bytes]]) -> tuple[tuple[int, bytes], ...]:
    """Normalize TLVs (any iterable of pairs, bytes-like values) to a tuple of tuples."""
    return tuple((int(tlv_type), bytes(tlv_value)) for tlv_type, tlv_value in value)


@attrs.frozen
class ProxyHeader:
    """
    One PROXY header, as sent or as received.

    ``source`` is the original client, ``destination`` the address it
    reached; both are ``(ip, port)`` or both ``None`` (LOCAL, UNSPEC, v1
    UNKNOWN).  ``tlvs`` are in wire order and, when decoded, include the
    CRC32C TLV.  ``version`` is 1 when decoded from a v1 text line.
    ``family_byte`` is the family/transport byte as received (``None`` for
    a header built in memory); it does not take part in equality.
    """

    command: Command = attrs.field(default=Command.PROXY, converter=Command)
    source: tuple[str, int] | None = attrs.field(default=None, converter=_to_address)
    destination: tuple[str, int] | None = attrs.field(default=None, converter=_to_address)
    tlvs: tuple[tuple[int, bytes], ...] = attrs.field(default=(), converter=_to_tlvs)
    version: int = 2
    family_byte: int | None = attrs.field(default=None, eq=False)

    def get(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of ``tlv_type``, or ``None``."""
        for found_type, value in self.tlvs:
            if found_type == tlv_type:
                return value
        return None

    @property
    def family(self) -> Literal["INET", "INET6", "UNSPEC", "UNIX"]:
        """
        The address family: as the family byte declared it when decoded,
        else that of ``source``/``destination`` (the family ``encode`` writes).
        """
        if self.family_byte is not None:
            return _FAMILY_NAMES[self.family_byte >> 4]  # type: ignore[return-value]
        if self.source is None:
            return "UNSPEC"
        try:
            address = ipaddress.ip_address(self.source[0])
        except ValueError:
            return "UNIX"
        return "INET" if address.version == 4 else "INET6"

    @property
    def transport(self) -> Literal["STREAM", "DGRAM", "UNSPEC"]:
        """
        The transport: as the family byte declared it when decoded, else
        the one ``encode`` writes (STREAM, or UNSPEC without addresses).
        """
        if self.family_byte is not None:
            return _TRANSPORT_NAMES[self.family_byte & 0x0F]  # type: ignore[return-value]
        return "UNSPEC" if self.source is None else "STREAM"

    @property
    def authority(self) -> str | None:
        """The AUTHORITY TLV (the SNI or preamble name), decoded from UTF-8."""
        value = self.get(PP2_TYPE_AUTHORITY)
        if value is None:
            return None
        return _decode_text(value, "utf-8", "AUTHORITY TLV")

    @property
    def unique_id(self) -> str | None:
        """
        The UNIQUE_ID TLV as text.  The protocol makes it opaque bytes:
        non-ASCII bytes become U+FFFD here (use ``get`` for the raw value).
        """
        value = self.get(PP2_TYPE_UNIQUE_ID)
        if value is None:
            return None
        return value.decode("ascii", "replace")

    @property
    def alpn(self) -> bytes | None:
        """The ALPN TLV: the negotiated protocol identifier, as bytes."""
        return self.get(PP2_TYPE_ALPN)

    @property
    def ssl(self) -> SSLInfo | None:
        """The SSL TLV, parsed (``InvalidProxyHeader`` if malformed)."""
        value = self.get(PP2_TYPE_SSL)
        if value is None:
            return None
        return SSLInfo.from_bytes(value)


def _tlv_problem(tlvs: Iterable[tuple[int, bytes]]) -> str | None:
    """
    Say what is wrong with the values of TLVs whose meaning is fixed, or
    ``None``.  Shared by ``encode`` and the decoder, so that neither side
    produces what the other refuses.
    """
    crc_count = 0
    for tlv_type, value in tlvs:
        if tlv_type == PP2_TYPE_CRC32C:
            crc_count += 1
            if len(value) != 4:
                return f"CRC32C TLV is {len(value)} byte(s), not 4"
            if crc_count > 1:
                return "more than one CRC32C TLV"
        elif tlv_type == PP2_TYPE_AUTHORITY:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"AUTHORITY TLV is not valid UTF-8: {e.reason} at byte {e.start}"
        elif tlv_type == PP2_TYPE_UNIQUE_ID:
            if len(value) > _UNIQUE_ID_MAX:
                return f"UNIQUE_ID TLV is {len(value)} bytes, more than {_UNIQUE_ID_MAX}"
        elif tlv_type == PP2_TYPE_SSL:
            try:
                SSLInfo.from_bytes(value)
            except InvalidProxyHeader as e:
                return str(e)
    return None


def _address_block(source, destination) -> tuple[int, bytes]:
    """The family byte and the address block of a source/destination pair."""
    if source is None and destination is None:
        return 0x00, b""
    if source is None or destination is None:
        raise ValueError("source and destination must be both set or both None")
    src_version, src, sport = _packed_address("source", source)
    dst_version, dst, dport = _packed_address("destination", destination)
    if src_version != dst_version:
        raise ValueError("source and destination mix IPv4 and IPv6")
    family = _FAMILY_INET if src_version == 4 else _FAMILY_INET6
    return (family << 4) | _TRANSPORT_STREAM, src + dst + _PORTS.pack(sport, dport)


def _packed_address(name: str, address) -> tuple[int, bytes, int]:
    """``(version, packed address, port)`` of one ``(ip, port)``; ``ValueError`` naming ``name``."""
    host, port = address
    if not isinstance(host, str):
        raise ValueError(f"{name} host must be an IP literal string, not {host!r}")
    try:
        version, raw, scoped = _address_bytes(host)
    except ValueError:
        raise ValueError(f"{name} host {host!r} is not an IP address") from None
    if scoped:
        raise ValueError(f"{name} host {host!r} has a scope id, which v2 cannot carry")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"{name} port {port!r} is not in 0..65535")
    return version, raw, port


_PROXY = int(Command.PROXY)
_PORTS = struct.Struct("!HH")
_TLV_HEAD = struct.Struct("!BH")
_FIXED = struct.Struct("!BBH")
_CRC = struct.Struct("!I")


@functools.lru_cache(maxsize=IP_CACHE_SIZE)
def _address_bytes(host: str) -> tuple[int, bytes, bool]:
    """``(version, packed address, has a scope id)`` of an IP literal; ``ValueError`` if it is none."""
    address = ip_literal(host)
    return address.version, address.packed, bool(getattr(address, "scope_id", None))


def encode(header: ProxyHeader, *, crc32c: bool = True) -> bytes:
    """
    Encode ``header`` as a v2 binary header (``header.version`` is ignored).

    The family follows the addresses: IPv4 pair -> INET, IPv6 pair -> INET6,
    both ``None`` -> UNSPEC with no address block; transport is STREAM.  TLVs
    are written in the given order; with ``crc32c=True`` a CRC32C TLV is
    appended last and filled in.  With ``crc32c=False`` the TLVs are written
    exactly as given, so ``encode(parse(b)[0], crc32c=False) == b`` for a
    header ``b`` this module produced.

    Raises ``ValueError`` on mixed or invalid addresses, a TLV type outside
    0..255, a TLV value over 65535 bytes, a header body over 65535 bytes, an
    invalid value for a TLV of fixed meaning, or a CRC32C TLV already in
    ``header.tlvs`` while ``crc32c=True``.
    """
    return _encode(int(header.command), header.source, header.destination, header.tlvs, crc32c)


def encode_proxy(source: tuple, destination: tuple, tlvs: Sequence[tuple[int, bytes]]) -> bytes:
    """
    ``encode(ProxyHeader(command=Command.PROXY, source=source,
    destination=destination, tlvs=tlvs))``, byte for byte and with the same
    checks, without building the ``ProxyHeader``: the form the connection
    path writes once per shard connection.  ``tlvs`` are ``(type, bytes)``
    pairs; a CRC32C TLV is appended.
    """
    return _encode(_PROXY, source, destination, tlvs, True)


def _encode(command: int, source, destination, tlvs, crc32c: bool) -> bytes:
    family_byte, body = _address_block(source, destination)
    parts = [body]
    head = _TLV_HEAD.pack
    for tlv_type, value in tlvs:
        if not 0 <= tlv_type <= 0xFF:
            raise ValueError(f"TLV type {tlv_type!r} is not in 0..255")
        if len(value) > _V2_MAX_BODY:
            raise ValueError(f"TLV 0x{tlv_type:02X} value is {len(value)} bytes, over 65535")
        if tlv_type == PP2_TYPE_CRC32C and crc32c:
            raise ValueError("header.tlvs already holds a CRC32C TLV; pass crc32c=False")
        parts.append(head(tlv_type, len(value)))
        parts.append(value)
    problem = _tlv_problem(tlvs)
    if problem is not None:
        raise ValueError(problem)
    if crc32c:
        parts.append(_CRC_PLACEHOLDER)
    body = b"".join(parts)
    if len(body) > _V2_MAX_BODY:
        raise ValueError(f"header body is {len(body)} bytes, over 65535")
    data = b"".join((SIGNATURE, _FIXED.pack(0x20 | command, family_byte, len(body)), body))
    if crc32c:
        data = data[:-4] + _CRC.pack(google_crc32c.value(data))
    return data


def local_header() -> bytes:
    """A LOCAL, UNSPEC header with a CRC32C: what health checks send."""
    return encode(ProxyHeader(command=Command.LOCAL))


def _decode_v2(data: bytes, require_crc32c: bool) -> ProxyHeader:
    """Decode one complete v2 header whose fixed 16 bytes were checked."""
    command = Command(data[12] & 0x0F)
    family = data[13] >> 4
    address_length = _ADDRESS_LENGTH[family]
    addresses = data[_V2_FIXED : _V2_FIXED + address_length]
    tlv_start = _V2_FIXED + address_length
    tlvs = _iter_tlvs(data[tlv_start:], what="TLV area")

    # The CRC is checked before the other TLVs' values, so that corruption
    # is reported as such rather than as whatever it happened to break.
    crc_offsets = []
    offset = tlv_start
    for tlv_type, value in tlvs:
        if tlv_type == PP2_TYPE_CRC32C:
            if len(value) != 4:
                raise InvalidProxyHeader(
                    f"CRC32C TLV is {len(value)} byte(s), not 4", reason="bad_tlv"
                )
            crc_offsets.append(offset + 3)
        offset += 3 + len(value)
    if len(crc_offsets) > 1:
        raise InvalidProxyHeader("more than one CRC32C TLV", reason="bad_tlv")
    crc_offset = crc_offsets[0] if crc_offsets else None
    if crc_offset is not None:
        (expected,) = struct.unpack_from("!I", data, crc_offset)
        zeroed = data[:crc_offset] + b"\x00\x00\x00\x00" + data[crc_offset + 4 :]
        actual = google_crc32c.value(zeroed)
        if actual != expected:
            raise InvalidProxyHeader(
                f"CRC32C mismatch: header carries 0x{expected:08X}, content gives 0x{actual:08X}",
                reason="bad_crc",
            )
    elif require_crc32c:
        raise InvalidProxyHeader("header has no CRC32C TLV", reason="missing_crc")

    problem = _tlv_problem(tlvs)
    if problem is not None:
        raise InvalidProxyHeader(problem, reason="bad_tlv")

    source = destination = None
    if command == Command.PROXY:
        if family == _FAMILY_INET:
            sport, dport = struct.unpack_from("!HH", addresses, 8)
            source = (str(ipaddress.IPv4Address(addresses[0:4])), sport)
            destination = (str(ipaddress.IPv4Address(addresses[4:8])), dport)
        elif family == _FAMILY_INET6:
            sport, dport = struct.unpack_from("!HH", addresses, 32)
            source = (str(ipaddress.IPv6Address(addresses[0:16])), sport)
            destination = (str(ipaddress.IPv6Address(addresses[16:32])), dport)
        elif family == _FAMILY_UNIX:
            source = (_unix_path(addresses[0:108]), 0)
            destination = (_unix_path(addresses[108:216]), 0)
    return ProxyHeader(
        command=command,
        source=source,
        destination=destination,
        tlvs=tuple(tlvs),
        version=2,
        family_byte=data[13],
    )


def _unix_path(raw: bytes) -> str:
    # NUL-padded; an abstract-namespace name keeps its leading NUL.
    return raw.rstrip(b"\x00").decode("utf-8", "surrogateescape")


def _v1_port(raw: bytes, what: str) -> int:
    if _PORT_RE.fullmatch(raw) is None or int(raw) > 0xFFFF:
        raise InvalidProxyHeader(f"v1 {what} port {raw!r} is not a port number", reason="bad_v1")
    return int(raw)


def _v1_address(raw: bytes, protocol: bytes, what: str) -> str:
    allowed = _V1_TCP4_CHARS if protocol == b"TCP4" else _V1_TCP6_CHARS
    cls = ipaddress.IPv4Address if protocol == b"TCP4" else ipaddress.IPv6Address
    try:
        if not raw or not set(raw) <= allowed:
            raise ValueError
        return str(cls(raw.decode("ascii")))
    except ValueError:
        raise InvalidProxyHeader(
            f"v1 {what} address {raw!r} is not a valid {protocol.decode()} address",
            reason="bad_v1",
        ) from None


def _decode_v1(line: bytes) -> ProxyHeader:
    """Decode one complete v1 line, CRLF included."""
    if not line.endswith(b"\r\n"):
        raise InvalidProxyHeader("v1 line ends with a bare LF, not CRLF", reason="bad_v1")
    body = line[6:-2]
    if body == b"UNKNOWN" or body.startswith(b"UNKNOWN "):
        # The specification says to ignore whatever follows UNKNOWN.
        return ProxyHeader(command=Command.PROXY, version=1, family_byte=0x00)
    fields = body.split(b" ")
    if fields[0] not in (b"TCP4", b"TCP6"):
        raise InvalidProxyHeader(
            f"v1 protocol {fields[0]!r} is not TCP4, TCP6 or UNKNOWN", reason="bad_v1"
        )
    if len(fields) != 5:
        raise InvalidProxyHeader(
            f"v1 {fields[0].decode()} line has {len(fields) - 1} field(s) after the protocol, "
            "expected 4 separated by single spaces",
            reason="bad_v1",
        )
    protocol, src, dst, sport, dport = fields
    return ProxyHeader(
        command=Command.PROXY,
        source=(_v1_address(src, protocol, "source"), _v1_port(sport, "source")),
        destination=(_v1_address(dst, protocol, "destination"), _v1_port(dport, "destination")),
        version=1,
        family_byte=((_FAMILY_INET if protocol == b"TCP4" else _FAMILY_INET6) << 4) | _TRANSPORT_STREAM,
    )


def _check_v1_prefix(buffer: bytes) -> None:
    """Fail as soon as an incomplete v1 line cannot become a valid one."""
    head = b"PROXY "
    for index, byte in enumerate(buffer[: len(head)]):
        if byte != head[index]:
            raise InvalidProxyHeader(
                f"v1 header must start with 'PROXY ', got {buffer[: index + 1]!r}",
                reason="bad_signature",
            )
    rest = buffer[len(head) :]
    end = len(rest)
    for sep in (b" ", b"\r"):
        found = rest.find(sep)
        if found != -1:
            end = min(end, found)
    protocol = rest[:end]
    if end == len(rest):
        if not any(p.startswith(protocol) for p in _V1_PROTOCOLS):
            raise InvalidProxyHeader(
                f"v1 protocol {protocol!r}... is not TCP4, TCP6 or UNKNOWN", reason="bad_v1"
            )
        return
    if protocol not in _V1_PROTOCOLS:
        raise InvalidProxyHeader(
            f"v1 protocol {protocol!r} is not TCP4, TCP6 or UNKNOWN", reason="bad_v1"
        )
    if protocol == b"UNKNOWN":
        return
    allowed = (_V1_TCP4_CHARS if protocol == b"TCP4" else _V1_TCP6_CHARS) | {ord(" ")}
    tail = rest[end:]
    for index, byte in enumerate(tail):
        if byte == ord("\r") and index == len(tail) - 1:
            continue
        if byte not in allowed:
            raise InvalidProxyHeader(
                f"v1 {protocol.decode()} line has unexpected byte {bytes([byte])!r} "
                f"at offset {len(head) + end + index}",
                reason="bad_v1",
            )


class HeaderParser:
    """
    Incremental PROXY header reader: feed bytes as they arrive until a
    header is complete.

    ``accept_v1``/``accept_v2`` choose the versions; with both, the first
    byte decides (``P`` -> v1, ``\\r`` -> v2).  ``max_size`` bounds the
    header (v1 lines are bounded by 107 bytes in any case).  With
    ``require_crc32c`` a v2 header without a CRC32C TLV (and any v1 line)
    is refused.  Once ``feed`` has raised, it raises the same error again.
    """

    def __init__(
        self,
        *,
        accept_v1: bool = False,
        accept_v2: bool = True,
        max_size: int = 65535 + 16,
        require_crc32c: bool = False,
    ) -> None:
        if not (accept_v1 or accept_v2):
            raise ValueError("accept at least one of v1 and v2")
        if max_size < _V2_FIXED:
            raise ValueError(f"max_size {max_size} is below the 16-byte fixed header")
        self._accept_v1 = accept_v1
        self._accept_v2 = accept_v2
        self._max_size = max_size
        self._require_crc32c = require_crc32c
        self._buffer = bytearray()
        self._version: int | None = None
        self._total: int | None = None
        self._header: ProxyHeader | None = None
        self._rest = b""
        self._error: InvalidProxyHeader | None = None

    @property
    def header(self) -> ProxyHeader | None:
        """The header, once ``feed`` returned it; ``None`` before."""
        return self._header

    @property
    def rest(self) -> bytes:
        """
        Bytes received after the header, to pass on to the application.
        Valid once ``feed`` returned a header (``b""`` before).
        """
        return self._rest

    def feed(self, data: bytes) -> ProxyHeader | None:
        """
        Add received bytes.  Returns the header once complete (the bytes
        after it are in ``rest``), ``None`` while more are needed.  Raises
        ``InvalidProxyHeader`` as soon as the input cannot be a header, and
        ``RuntimeError`` if called again after a header was returned.
        """
        if self._error is not None:
            raise self._error
        if self._header is not None:
            raise RuntimeError("the header is already complete; pass further bytes on directly")
        try:
            return self._feed(bytes(data))
        except InvalidProxyHeader as e:
            self._error = e
            self._buffer.clear()
            raise

    def _feed(self, data: bytes) -> ProxyHeader | None:
        if not data:
            return None
        if self._version is None:
            first = self._buffer[:1] or data[:1]
            if first == b"\r" and self._accept_v2:
                self._version = 2
            elif first == b"P" and self._accept_v1:
                self._version = 1
            else:
                choices = (
                    ("PROXY v1 ('P')", self._accept_v1),
                    ("PROXY v2 ('\\r')", self._accept_v2),
                )
                expected = " or ".join(name for name, on in choices if on)
                note = " (a PROXY v1 header is not accepted here)" if first == b"P" else ""
                raise InvalidProxyHeader(
                    f"first byte {first!r} cannot start {expected}{note}", reason="bad_signature"
                )
        if self._version == 2:
            return self._feed_v2(data)
        return self._feed_v1(data)

    def _feed_v2(self, data: bytes) -> ProxyHeader | None:
        buffer = self._buffer
        if self._total is None:
            take = _V2_FIXED - len(buffer)
            start = len(buffer)
            buffer += data[:take]
            data = data[take:]
            self._check_v2_fixed(start)
            if len(buffer) < _V2_FIXED:
                return None
            (length,) = struct.unpack_from("!H", buffer, 14)
            self._total = _V2_FIXED + length
        need = self._total - len(buffer)
        buffer += data[:need]
        if len(buffer) < self._total:
            return None
        header = _decode_v2(bytes(buffer), self._require_crc32c)
        self._rest = data[need:]
        self._header = header
        buffer.clear()
        return header

    def _check_v2_fixed(self, start: int) -> None:
        """Check the fixed-header bytes from ``start`` that just arrived."""
        buffer = self._buffer
        for index in range(start, min(len(buffer), len(SIGNATURE))):
            if buffer[index] != SIGNATURE[index]:
                raise InvalidProxyHeader(
                    f"byte {index} of the v2 signature is 0x{buffer[index]:02X}, "
                    f"expected 0x{SIGNATURE[index]:02X}",
                    reason="bad_signature",
                )
        if start <= 12 < len(buffer):
            version, command = buffer[12] >> 4, buffer[12] & 0x0F
            if version != 2:
                raise InvalidProxyHeader(
                    f"version nibble is {version}, expected 2", reason="bad_version"
                )
            if command not in (Command.LOCAL, Command.PROXY):
                raise InvalidProxyHeader(
                    f"command nibble is {command}, expected 0 or 1", reason="bad_command"
                )
        if start <= 13 < len(buffer):
            if buffer[13] not in _VALID_FAMILY_BYTES:
                raise InvalidProxyHeader(
                    f"family/transport byte 0x{buffer[13]:02X} is not one the protocol defines",
                    reason="bad_family",
                )
        if len(buffer) == _V2_FIXED:
            (length,) = struct.unpack_from("!H", buffer, 14)
            if _V2_FIXED + length > self._max_size:
                raise InvalidProxyHeader(
                    f"header declares {_V2_FIXED + length} bytes, "
                    f"over the limit of {self._max_size}",
                    reason="too_large",
                )
            needed = _ADDRESS_LENGTH[buffer[13] >> 4]
            if length < needed:
                raise InvalidProxyHeader(
                    f"header declares {length} byte(s) after the fixed part, "
                    f"fewer than the {needed} its address family needs",
                    reason="bad_length",
                )

    def _feed_v1(self, data: bytes) -> ProxyHeader | None:
        buffer = self._buffer
        limit = min(_V1_MAX, self._max_size)
        chunk = data[: limit - len(buffer)]
        newline = chunk.find(b"\n")
        if newline != -1:
            chunk = chunk[: newline + 1]
        buffer += chunk
        _check_v1_prefix(bytes(buffer[:-1] if newline != -1 else buffer))
        if newline == -1:
            if len(buffer) >= limit:
                raise InvalidProxyHeader(
                    f"no CRLF within the first {limit} bytes of a v1 header", reason="too_large"
                )
            return None
        if self._require_crc32c:
            raise InvalidProxyHeader("a v1 header cannot carry a CRC32C", reason="missing_crc")
        header = _decode_v1(bytes(buffer))
        self._rest = data[len(chunk) :]
        self._header = header
        buffer.clear()
        return header


def parse(
    data: bytes, *, accept_v1: bool = False, require_crc32c: bool = False
) -> tuple[ProxyHeader, bytes]:
    """
    Parse a header from the start of ``data``; return it and the bytes that
    follow it.  Raises ``InvalidProxyHeader`` (reason ``truncated`` when the
    data ends before the header does).
    """
    parser = HeaderParser(accept_v1=accept_v1, require_crc32c=require_crc32c)
    header = parser.feed(data)
    if header is None:
        raise InvalidProxyHeader(
            f"data ends after {len(data)} byte(s), inside the header", reason="truncated"
        )
    return header, parser.rest
