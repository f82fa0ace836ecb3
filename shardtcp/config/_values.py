# -*- test-case-name: tests.config.test_sections -*-
"""
The small grammars of a configuration: ids, DNS names, service names and
shard addresses.  Ports and IP literals are read by ``shardtcp.net``; each
function here answers a value or a one-line reason, never raises.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional

from shardtcp.config._reader import show
from shardtcp.model import Address
from shardtcp.net import parse_port

ID = re.compile(r"[A-Za-z0-9_.-]+")
# Letters, digits, hyphens and underscores, no hyphen at either end: the
# host syntax the ClientHello parser and the service-name table accept.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
MAX_NAME = 253


def _ipv6(text: str) -> Optional[str]:
    """The compressed form of the IPv6 literal ``text``, or None."""
    if len(text) > 64 or not text.isascii() or "%" in text:
        return None
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        return None


def dns_name_problem(name: str) -> Optional[str]:
    """Why ``name`` (lowercase) is not a DNS name or ``*.`` wildcard, or None."""
    if not name.isascii():
        return f"{show(name)} is not ASCII; write the IDNA (xn--) form"
    host = name[2:] if name.startswith("*.") else name
    if len(host) > MAX_NAME or not all(_LABEL.fullmatch(p) for p in host.split(".")):
        return f"{show(name)} is not a DNS name or *.wildcard"
    return None


def _port_problem(name: str, port: str, minimum: int = 1) -> tuple[Optional[int], Optional[str]]:
    try:
        number = parse_port(port)
    except ValueError as e:
        return None, f"{show(name)}: {e}"
    if number < minimum:
        return None, f"{show(name)}: the port must be in 1..65535"
    return number, None


def canonical_service_name(name: str) -> tuple[str, Optional[str]]:
    """
    A service name in the form the service-name table compares (lowercase,
    no trailing dot, IPv6 compressed in brackets) and why it is unusable, or
    None.  Names are DNS names, ``*.`` wildcards or IP literals, each
    optionally with ``:port`` (``[v6]:port`` for IPv6).
    """
    name = name.lower()
    port: Optional[str] = None
    if name.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", name, re.DOTALL)
        if match is None:
            return name, f"{show(name)}: expected [ipv6] or [ipv6]:port"
        host, port = match.groups()
        compressed = _ipv6(host)
        if compressed is None:
            return name, f"{show(host)} in brackets is not an IPv6 address"
        host = f"[{compressed}]"
    elif name.count(":") > 1:
        compressed = _ipv6(name)
        if compressed is None:
            return name, f"{show(name)} is not a DNS name, IP address or host:port"
        return f"[{compressed}]", None
    else:
        host, sep, port_text = name.partition(":")
        port = port_text if sep else None
        if host.endswith("."):
            host = host[:-1]
        problem = dns_name_problem(host)
        if problem is not None:
            return name, problem
    if port is not None:
        number, problem = _port_problem(name, port)
        if problem is not None:
            return name, problem
        return f"{host}:{number}", None
    return host, None


def sni_length(name: str) -> Optional[int]:
    """
    The longest server name that selects the canonical service ``name``
    through SNI, or None when SNI cannot select it (names with a port are
    only matched by preambles).  A wildcard matches exactly one more label.
    """
    if name.startswith("[") or ":" in name:
        return None
    if name.startswith("*."):
        return min(MAX_NAME, 64 + len(name) - 2)
    return len(name)


def parse_address(text: str) -> Address | str:
    """``host:port`` or ``[v6]:port`` as an ``Address``, or why not (a str)."""
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]+)\]:(.*)", text, re.DOTALL)
        if match is None:
            return f"expected host:port or [ipv6]:port, got {show(text)}"
        host, port_text = match.groups()
        if _ipv6(host) is None:
            return f"{show(host)} in brackets is not an IPv6 address"
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text:
            return f"expected host:port or [ipv6]:port, got {show(text)}"
        if ":" in host:
            return f"an IPv6 address must be written [addr]:port, got {show(text)}"
        if not host.isascii() or len(host) > MAX_NAME or not all(
            _LABEL.fullmatch(p) for p in host.lower().split(".")
        ):
            return f"{show(host)} is not an IP address or host name"
    port, problem = _port_problem(text, port_text)
    if problem is not None:
        return problem
    return Address(host=host, port=port)
