"""
The service-name table: which service a connection's name selects.

A connection is identified by a name (the TLS server name, the ``host:port``
of an HTTP CONNECT, a ``Host:`` header); each service lists the names that
select it (``[service.<id>] names``). ``NameTable`` answers that lookup on
the per-connection path with a few dictionary probes, whatever the size of
the table. ``valid_pattern`` and ``NameTable.conflicts`` are the checks the
configuration checker runs on the same lists, so the table never has to
guess.

Matching rules:

* names are compared case-insensitively, and a single trailing dot (the
  fully qualified form) is ignored;
* ``*.example.test`` matches exactly one more label: ``a.example.test``,
  but neither ``a.b.example.test`` nor ``example.test``;
* an exact name wins over a wildcard;
* a name may carry a port (``host:port``, ``[v6]:port``), as CONNECT
  preambles do. Looking up ``host:port`` tries, in order: the exact
  ``host:port`` entry, the exact ``host`` entry, a wildcard with that
  port, a wildcard without a port. A name without a port never matches an
  entry that has one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Optional

from shardtcp.net import parse_port

__all__ = [
    "MAX_DNS_NAME",
    "NameTable",
    "canonical_name",
    "dns_name_problem",
    "is_dns_name",
    "valid_pattern",
]

#: The longest DNS name, in characters, without the trailing dot.
MAX_DNS_NAME = 253

# The one DNS-name grammar of shardtcp: labels of letters, digits, hyphens
# and underscores (underscores are not LDH, but real clients send them and
# refusing them would break routing for names that resolve fine), 1 to 63
# characters, no hyphen at either end.
_LABEL_TEXT = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_LABEL = re.compile(_LABEL_TEXT)
_DNS_NAME = re.compile(rf"(?:{_LABEL_TEXT}\.)*{_LABEL_TEXT}")


def is_dns_name(host: str) -> bool:
    """
    Whether ``host`` (lowercase, without a trailing dot) is a DNS name by
    shardtcp's one grammar: dot-separated labels of ``a-z``, ``0-9``, ``-``
    and ``_``, 1 to 63 characters each, no hyphen at either end, at most
    ``MAX_DNS_NAME`` characters in all.  The ClientHello parser, the
    preamble parsers, the name table and the configuration all ask this.
    """
    return len(host) <= MAX_DNS_NAME and _DNS_NAME.fullmatch(host) is not None


def dns_name_problem(host: str) -> Optional[str]:
    """
    Why ``host`` (lowercase, without a trailing dot) is not a DNS name by
    ``is_dns_name``'s grammar, in a short phrase fit for one line, or None.
    """
    if not isinstance(host, str):
        return f"a host name must be text, not {type(host).__name__}"
    if not host:
        return "empty host"
    if not host.isascii():
        return "not ASCII; write internationalized names in their xn-- form"
    if len(host) > MAX_DNS_NAME:
        return f"longer than {MAX_DNS_NAME} characters"
    for label in host.split("."):
        if not _LABEL.fullmatch(label):
            return f"label {label[:64]!r} is not a DNS label"
    return None


class _InvalidName(ValueError):
    """A name that cannot be a table entry; its message is the reason."""


def _split_port(name: str) -> tuple[str, Optional[str], bool]:
    """
    Split ``name`` into its host, its port text (or ``None``) and whether
    the host is an IPv6 literal. Raises ``_InvalidName``.
    """
    if name.startswith("["):
        end = name.find("]")
        if end < 0:
            raise _InvalidName("'[' without a closing ']'")
        rest = name[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _InvalidName(f"unexpected {rest!r} after ']'")
        return name[1:end], (rest[1:] if rest else None), True
    if name.count(":") == 1:
        host, port = name.split(":")
        return host, port, False
    if ":" in name:
        return name, None, True
    return name, None, False


def _parse(name: str) -> tuple[str, Optional[int], bool]:
    """
    Validate ``name`` and bring it to its canonical form: ``(host, port,
    wildcard)`` with ``host`` lowercased, without trailing dot or ``*.``
    (IPv6 literals compressed and bracketed). Raises ``_InvalidName``.
    """
    if not name:
        raise _InvalidName("empty name")
    if not name.isascii():
        raise _InvalidName("not ASCII; write internationalized names in their xn-- form")
    host, port_text, is_ipv6 = _split_port(name.lower())
    port: Optional[int] = None
    if port_text is not None:
        try:
            port = parse_port(port_text)
        except ValueError:
            port = 0
        if not port:
            raise _InvalidName(f"port {port_text[:12]!r} is not a number in 1..65535")
    if is_ipv6:
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise _InvalidName(f"{host!r} is not an IPv6 address") from None
        return f"[{address.compressed}]", port, False
    wildcard = host.startswith("*.") or host == "*"
    if wildcard:
        host = host[2:]
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise _InvalidName("a wildcard needs a domain after '*.'" if wildcard else "empty host")
    if "*" in host:
        raise _InvalidName("'*' is only allowed as the whole leftmost label")
    problem = dns_name_problem(host)
    if problem is not None:
        raise _InvalidName(problem)
    return host, port, wildcard


def _key(host: str, port: Optional[int]) -> str:
    return host if port is None else f"{host}:{port}"


def _canonical(name: str) -> str:
    """
    The form in which two entries are the same entry: canonical when
    ``name`` is valid, else merely lowercased, so that ``conflicts`` still
    sees duplicates among names ``valid_pattern`` reports anyway.
    """
    try:
        host, port, wildcard = _parse(name)
    except _InvalidName:
        lowered = name.lower()
        return lowered[:-1] if lowered.endswith(".") else lowered
    return ("*." if wildcard else "") + _key(host, port)


def canonical_name(name: str) -> str:
    """
    A configured service name in the form the table compares: lowercase,
    no trailing dot, ``*.`` kept, IPv6 compressed in brackets, the port
    without leading zeros.  Raises ``ValueError`` saying why a name is not
    usable (the same reason ``valid_pattern`` gives).
    """
    host, port, wildcard = _parse(name)
    return ("*." if wildcard else "") + _key(host, port)


def valid_pattern(name: str) -> Optional[str]:
    """
    Check a configured service name: ``None`` when it is usable, else the
    reason it is not (for ``check-config``).

    Usable names are DNS names (letters, digits, ``-``, ``_``), ``*.``
    followed by a DNS name, or IP literals, each optionally followed by
    ``:port`` (IPv6 literals with a port written ``[v6]:port``).
    """
    try:
        _parse(name)
    except _InvalidName as error:
        return str(error)
    return None


def _pairs(
    services: Iterable[tuple[str, Iterable[str]]],
) -> list[tuple[str, str]]:
    """Flatten ``(service, names)`` pairs into ``(canonical name, service)``."""
    return [
        (_canonical(name), service_id)
        for service_id, names in services
        for name in names
    ]


class NameTable:
    """
    Map connection names to service ids, for routing.

    Built once from the configuration's ``(service_id, names)`` pairs; an
    invalid name or a name listed by two services raises ``ValueError``, so
    the checks ``valid_pattern`` and ``conflicts`` report must pass first.
    """

    def __init__(self, services: Iterable[tuple[str, Iterable[str]]]) -> None:
        services = [(service_id, list(names)) for service_id, names in services]
        clashes = self.conflicts(services)
        if clashes:
            raise ValueError(
                "; ".join(
                    f"{name!r} is listed by services {a!r} and {b!r}"
                    for name, a, b in clashes
                )
            )
        self._exact: dict[str, str] = {}
        # Wildcards keyed by the domain under the '*' (with ":port" when
        # they carry one), so matching one label is a single probe.
        self._wildcard: dict[str, str] = {}
        for service_id, names in services:
            for name in names:
                try:
                    host, port, wildcard = _parse(name)
                except _InvalidName as error:
                    raise ValueError(
                        f"service {service_id!r}: name {name!r}: {error}"
                    ) from None
                table = self._wildcard if wildcard else self._exact
                table[_key(host, port)] = service_id

    def lookup(self, name: str) -> Optional[str]:
        """
        The id of the service ``name`` selects, or ``None``.

        Never raises: a name that could not be in the table (malformed,
        or a wildcard pattern itself) simply selects nothing.
        """
        try:
            host, port_text, is_ipv6 = _split_port(name.lower())
        except _InvalidName:
            return None
        port: Optional[int] = None
        if port_text is not None:
            try:
                port = parse_port(port_text)
            except ValueError:
                return None
        if is_ipv6:
            try:
                host = f"[{ipaddress.IPv6Address(host).compressed}]"
            except ValueError:
                return None
        elif host.endswith("."):
            host = host[:-1]
        if port is not None:
            found = self._exact.get(f"{host}:{port}")
            if found is not None:
                return found
        found = self._exact.get(host)
        if found is not None or is_ipv6:
            return found
        label, dot, parent = host.partition(".")
        # Only the label under the '*' is not compared against a
        # validated entry, so only it needs checking here.
        if not dot or not _LABEL.fullmatch(label):
            return None
        if port is not None:
            found = self._wildcard.get(f"{parent}:{port}")
            if found is not None:
                return found
        return self._wildcard.get(parent)

    @staticmethod
    def conflicts(
        services: Iterable[tuple[str, Iterable[str]]],
    ) -> list[tuple[str, str, str]]:
        """
        Names listed by two different services, compared as the table
        compares them (case, trailing dot, IPv6 spelling): one
        ``(name, first service, other service)`` per clash, in listing
        order, ``name`` in canonical form. A service repeating its own
        name is no conflict.
        """
        owner: dict[str, str] = {}
        found: list[tuple[str, str, str]] = []
        reported: set[tuple[str, str]] = set()
        for name, service_id in _pairs(services):
            first = owner.setdefault(name, service_id)
            if first != service_id and (name, service_id) not in reported:
                reported.add((name, service_id))
                found.append((name, first, service_id))
        return found
