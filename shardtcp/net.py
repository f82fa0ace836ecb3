# -*- test-case-name: tests.test_net -*-
"""
Addresses and networks, in one place.

Every part of shardtcp that reads an IP address, matches it against
networks or prints ``host:port`` does it through this module, so that all of
them agree on the same rules:

* a client arriving as IPv4-mapped IPv6 (``::ffff:a.b.c.d``) is the IPv4
  client ``a.b.c.d``, and IPv4-mapped networks are stored as IPv4;
* networks are written in CIDR notation only (``10.0.0.0/8``), with no host
  bits set, no netmask form and no zone;
* a zone (``fe80::1%eth0``) is no part of an address's identity: it is
  dropped from addresses and refused in networks;
* ports are ASCII decimal digits, 0 to 65535;
* ``host:port`` is ``[ip]:port`` for IPv6.

It imports nothing of the project.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Generic, Iterable, Optional, TypeVar, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

V = TypeVar("V")

MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")

# How many distinct address texts ``ip_literal`` remembers: a connection's
# addresses are parsed by several parts (the PROXY pair, the signed claims,
# the header's address block, the shard's endpoint), and clients repeat.
IP_CACHE_SIZE = 4096

# The longest text worth handing to ``ipaddress``: an IPv6 address with an
# embedded IPv4 tail and a prefix is under 50 characters.
_MAX_TEXT = 64
_ASCII_DIGITS = frozenset("0123456789")


def format_hostport(host: str, port: int) -> str:
    """
    Format an address as ``ip:port``, or ``[ip]:port`` for IPv6 (the form of
    the PolicyContext's ``src``/``dst`` claims and of configuration).
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def format_address(address: Optional[tuple]) -> str:
    """``(host, port)`` as ``host:port``, or ``?`` when unknown (for logs)."""
    return format_hostport(address[0], address[1]) if address else "?"


def parse_port(text: str) -> int:
    """
    A TCP port written as 1 to 5 ASCII digits, 0 to 65535.

    ``str.isdigit`` accepts superscripts and other scripts' digits, and
    ``int`` reads Arabic-Indic digits as a port: neither is a port here.
    Raises ``ValueError`` with a message fit for one line.
    """
    if not isinstance(text, str):
        raise ValueError(f"port must be text of ASCII digits, not {type(text).__name__}")
    if not text or len(text) > 5 or not set(text) <= _ASCII_DIGITS:
        raise ValueError(f"port must be 0 to 65535 in ASCII digits, not {text[:12]!r}")
    port = int(text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0..65535")
    return port


@functools.lru_cache(maxsize=IP_CACHE_SIZE)
def _ip_literal(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def ip_literal(text: str) -> IPAddress:
    """
    ``ipaddress.ip_address(text)`` for an address text, remembered for the
    last ``IP_CACHE_SIZE`` distinct texts (the values are immutable, so
    sharing them is safe).  Raises ``ValueError`` for a text that is not an
    IP literal (never remembered) and for anything but ``str``.
    """
    if type(text) is not str:
        raise ValueError(f"an IP literal must be text, not {type(text).__name__}")
    return _ip_literal(text)


@functools.lru_cache(maxsize=IP_CACHE_SIZE)
def canonical_ip(text: str) -> str:
    """
    The canonical text of the IP literal ``text`` (``str(ip_literal(text))``),
    remembered like ``ip_literal``; an IPv4-mapped address stays IPv6.
    ``ValueError`` when ``text`` is not an IP literal.
    """
    return str(ip_literal(text))


def parse_ip(text: object) -> Optional[IPAddress]:
    """
    An IP address from its text, IPv4-mapped IPv6 unwrapped to IPv4; None
    when ``text`` is not an IP literal.

    An IPv6 zone (``fe80::1%eth0``, as the socket layer reports a
    link-local peer) is checked and dropped: networks carry no zone, so a
    link-local client is matched by its address alone, never let through
    a deny list for its zone.
    """
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


def normalise_network(network: IPNetwork) -> IPNetwork:
    """``network``, with an IPv4-mapped IPv6 range given as the IPv4 range."""
    if (
        network.version == 6
        and network.prefixlen >= MAPPED_V4.prefixlen
        and network.subnet_of(MAPPED_V4)  # type: ignore[arg-type]
    ):
        return ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
        )
    return network


def parse_network(text: object) -> IPNetwork:
    """
    A network in CIDR notation (``10.0.0.0/8``, ``2001:db8::/32``), with no
    host bits set, normalised as ``normalise_network`` does.

    A bare address is its own /32 or /128.  Netmask forms
    (``10.0.0.0/255.0.0.0``), host masks and zones are refused.  Raises
    ``ValueError`` with a message fit for one line.
    """
    if not isinstance(text, str):
        raise ValueError(f"a network must be a CIDR string, not {type(text).__name__}")
    if len(text) > _MAX_TEXT or not text.isascii():
        raise ValueError(f"{text[:_MAX_TEXT]!r} is not a CIDR network")
    if "%" in text:
        raise ValueError(f"{text!r}: a network cannot carry a zone")
    address, slash, length = text.partition("/")
    if slash and (
        not length
        or not set(length) <= _ASCII_DIGITS
        or len(length) > 3
        or (length[0] == "0" and length != "0")
    ):
        raise ValueError(f"{text!r}: the prefix length must be a number (CIDR notation only)")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    return normalise_network(network)


def in_networks(ip: object, networks: Iterable[IPNetwork]) -> bool:
    """Whether the address text ``ip`` lies in any of ``networks``."""
    address = parse_ip(ip)
    if address is None:
        return False
    return any(address.version == n.version and address in n for n in networks)


def address_pair(src: tuple, dst: tuple) -> tuple[tuple, tuple]:
    """
    The ``(source, destination)`` pair of a PROXY header, in one family.

    IPv4-mapped addresses are unmapped when the other side is IPv4 (or
    mapped too), and a lone IPv4 address is mapped when the other side is
    IPv6: a PROXY v2 header has one family for both.
    """
    s = ip_literal(src[0])
    d = ip_literal(dst[0])
    if s.version == 6 and s.ipv4_mapped is not None and (d.version == 4 or d.ipv4_mapped is not None):
        s = s.ipv4_mapped
        src = (str(s), src[1])
    if d.version == 6 and d.ipv4_mapped is not None and s.version == 4:
        d = d.ipv4_mapped
        dst = (str(d), dst[1])
    if s.version != d.version:
        if s.version == 4:
            src = ("::ffff:" + src[0], src[1])
        else:
            dst = ("::ffff:" + dst[0], dst[1])
    return src, dst


class PrefixTable(Generic[V]):
    """
    Longest-prefix match of addresses against networks.

    One dictionary per (family, prefix length) keyed by the network bits,
    longest prefixes first: a lookup costs one dictionary probe per distinct
    prefix length, whatever the number of networks.  When the same network
    is given twice the first entry wins (file order).  Networks are stored
    as ``normalise_network`` gives them and ``lookup`` unwraps IPv4-mapped
    addresses, so a mapped client meets its IPv4 networks.
    """

    def __init__(self, entries: Iterable[tuple[IPNetwork, V]]) -> None:
        tables: dict[int, dict[int, dict[int, tuple[IPNetwork, V]]]] = {4: {}, 6: {}}
        count = 0
        for network, value in entries:
            network = normalise_network(network)
            by_length = tables[network.version].setdefault(network.prefixlen, {})
            key = int(network.network_address) >> (network.max_prefixlen - network.prefixlen)
            if key not in by_length:
                by_length[key] = (network, value)
                count += 1
        self._lengths = {
            version: tuple((length, table[length]) for length in sorted(table, reverse=True))
            for version, table in tables.items()
        }
        self._count = count

    def __len__(self) -> int:
        return self._count

    def lookup(self, address: IPAddress) -> Optional[tuple[IPNetwork, V]]:
        """The most specific ``(network, value)`` holding ``address``, or None."""
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return self.lookup_bits(address.version, int(address))

    def lookup_bits(self, version: int, bits: int) -> Optional[tuple[IPNetwork, V]]:
        """
        ``lookup`` for an address given as its family and integer value, as
        is (a mapped address must be unwrapped by the caller).
        """
        width = 32 if version == 4 else 128
        for length, table in self._lengths[version]:
            hit = table.get(bits >> (width - length))
            if hit is not None:
                return hit
        return None
