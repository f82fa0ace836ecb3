"""
The configuration file: TOML in, validated ``shardtcp.model.Config`` out.

``load_config`` reads a file and ``parse_config`` checks an already decoded
TOML document (SPEC §3).  Neither stops at the first mistake: every problem
found is collected, each as ``"key.path: message"`` (``listener[1].listen``,
``service.api.shard[2].address``, 0-based indexes), and raised together in one
``ConfigError``, so that ``shardtcp check-config`` can list them all at once.

Relative paths are resolved against the configuration file's folder and stored
absolute.  With ``check_files=False`` no file named by the configuration is
opened, which lets an example or a configuration meant for another machine be
checked for shape alone.

This module imports only ``shardtcp.model`` of the project, except for one
optional check: when ``shardtcp.policy`` offers ``worst_case_token_size``, the
largest PolicyContext each (service, shard) pair could produce is checked
against the 1024-byte TLV limit of SPEC §4.
"""

from __future__ import annotations

import difflib
import inspect
import ipaddress
import math
import os
import re
import socket
import tomllib
from typing import Any, Callable, Iterator, Optional, Sequence

import attrs

from shardtcp.model import (
    Address,
    AdminConfig,
    CertificateConfig,
    Config,
    FeedSourceConfig,
    GeoNetwork,
    HealthCheckConfig,
    IPNetwork,
    ListenerConfig,
    Location,
    PolicyConfig,
    ProxyConfig,
    RegistryConfig,
    ResolverConfig,
    ServiceConfig,
    ShardConfig,
    SigningConfig,
    ThreatIntelConfig,
    Weights,
)

__all__ = [
    "ConfigError",
    "POLICY_TLV_LIMIT",
    "check_config",
    "load_config",
    "parse_config",
    "parse_duration",
]

#: The largest PolicyContext TLV value a shard will accept (HAProxy's limit).
POLICY_TLV_LIMIT = 1024

#: Signature of ``shardtcp.policy.worst_case_token_size``.
TokenSizer = Callable[..., int]


class ConfigError(Exception):
    """
    A configuration could not be used; ``problems`` lists every reason found,
    each as ``"key.path: message"``.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


# ---------------------------------------------------------------------------
# Durations

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """
    Convert a duration such as ``"250ms"``, ``"5s"``, ``"1.5s"``, ``"2m"`` or
    ``"1h"`` to seconds.

    Bare numbers (``30``, ``"30"``) are refused so that a unit is never
    guessed; so are negative values.  Raises ``ValueError``.
    """
    if not isinstance(text, str):
        raise ValueError(f'expected a duration string like "30s", got {_show(text)}')
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            'expected a duration like "250ms", "5s", "2m" or "1h", '
            f"got {_show(text)}"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


# ---------------------------------------------------------------------------
# Entry points


def load_config(path: str, *, check_files: bool = True) -> Config:
    """
    Read, parse and validate the TOML configuration at ``path``.

    Raises ``ConfigError`` listing every problem found; a TOML syntax error
    is a single problem ``"PATH: line L, column C: message"``.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (byte {e.start})"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_syntax_problem(path, text, e)]) from None
    absolute = os.path.abspath(path)
    config = parse_config(data, os.path.dirname(absolute), check_files=check_files)
    return attrs.evolve(config, path=absolute)


def parse_config(
    data: dict,
    base_dir: str,
    *,
    check_files: bool = True,
    token_size: Optional[TokenSizer] = None,
) -> Config:
    """
    Validate a decoded TOML document and build the ``Config`` it describes.

    ``base_dir`` is the folder relative paths are resolved against.
    ``token_size`` computes the worst-case PolicyContext size of a (service,
    shard) pair, taking the keywords of
    ``shardtcp.policy.worst_case_token_size`` (which is used when it is not
    given and that function exists; without either the size is not checked).
    Raises ``ConfigError`` listing every problem found.
    """
    reader = _Reader(os.path.abspath(base_dir), check_files)
    config = _read_config(reader, data, token_size)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


def check_config(path: str) -> list[str]:
    """
    The problems of the configuration at ``path``, files included; an empty
    list when it is valid.  This is what ``shardtcp check-config`` prints.
    """
    try:
        load_config(path, check_files=True)
    except ConfigError as e:
        return list(e.problems)
    return []


_SYNTAX_POSITION = re.compile(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)")


def _syntax_problem(path: str, text: str, error: tomllib.TOMLDecodeError) -> str:
    """Turn a TOML decoding error into one ``PATH: line L, column C: ...``."""
    message = str(error)
    match = _SYNTAX_POSITION.fullmatch(message)
    if match is None:
        return f"{path}: {message}"
    if match.group(2) is not None:
        line, column = int(match.group(2)), int(match.group(3))
    else:
        lines = text.split("\n")
        line, column = len(lines), len(lines[-1]) + 1
    return f"{path}: line {line}, column {column}: {match.group(1)}"


# ---------------------------------------------------------------------------
# Small validators


def _show(value: Any) -> str:
    """A short rendering of a configuration value for an error message."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text


def _key(name: str) -> str:
    """A key as it would be written in TOML (quoted unless it is bare)."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _join(path: str, key: str) -> str:
    return f"{path}.{_key(key)}" if path else _key(key)


_ID = re.compile(r"[A-Za-z0-9_.-]+")
# Letters, digits, hyphens and underscores, no hyphen at either end: the
# host syntax the ClientHello parser and the service-name table accept.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_MAX_NAME = 253


def _dns_name_problem(name: str) -> Optional[str]:
    """Why ``name`` (lowercase) is not a DNS name or ``*.`` wildcard, or None."""
    if not name.isascii():
        return f"{_show(name)} is not ASCII; write the IDNA (xn--) form"
    host = name[2:] if name.startswith("*.") else name
    if len(host) > _MAX_NAME or not all(_LABEL.fullmatch(p) for p in host.split(".")):
        return f"{_show(name)} is not a DNS name or *.wildcard"
    return None


def _canonical_service_name(name: str) -> tuple[str, Optional[str]]:
    """
    A service name in the form the service-name table compares (lowercase,
    no trailing dot, IPv6 compressed in brackets) and why it is unusable, or
    None.  Names are DNS names, ``*.`` wildcards or IP literals, each
    optionally with ``:port`` (``[v6]:port`` for IPv6).
    """
    name = name.lower()
    port: Optional[str] = None
    if name.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", name)
        if match is None:
            return name, f"{_show(name)}: expected [ipv6] or [ipv6]:port"
        host, port = match.groups()
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            return name, f"{_show(host)} in brackets is not an IPv6 address"
    elif name.count(":") > 1:
        try:
            return f"[{ipaddress.IPv6Address(name).compressed}]", None
        except ValueError:
            return name, f"{_show(name)} is not a DNS name, IP address or host:port"
    else:
        host, sep, port_text = name.partition(":")
        port = port_text if sep else None
        if host.endswith("."):
            host = host[:-1]
        problem = _dns_name_problem(host)
        if problem is not None:
            return name, problem
    if port is not None:
        if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            return name, f"{_show(name)}: the port must be a number in 1..65535"
        return f"{host}:{int(port)}", None
    return host, None


def _sni_length(name: str) -> Optional[int]:
    """
    The longest server name that selects the canonical service ``name``
    through SNI, or None when SNI cannot select it (names with a port are
    only matched by preambles).  A wildcard matches exactly one more label.
    """
    if name.startswith("[") or ":" in name:
        return None
    if name.startswith("*."):
        return min(_MAX_NAME, 64 + len(name) - 2)
    return len(name)


def _parse_address(text: str) -> Address | str:
    """``host:port`` or ``[v6]:port`` as an ``Address``, or why not (a str)."""
    expected = f"expected host:port or [ipv6]:port, got {_show(text)}"
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]+)\]:([0-9]+)", text)
        if match is None:
            return expected
        host, port_text = match.groups()
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{_show(host)} in brackets is not an IPv6 address"
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            return expected
        if ":" in host:
            return f"an IPv6 address must be written [addr]:port, got {_show(text)}"
        if not host.isascii() or len(host) > _MAX_NAME or not all(
            _LABEL.fullmatch(p) for p in host.lower().split(".")
        ):
            return f"{_show(host)} is not an IP address or host name"
    port = int(port_text)
    if not 1 <= port <= 65535:
        return f"port must be between 1 and 65535, got {_show(text)}"
    return Address(host=host, port=port)


def _endpoint_problem(description: str, check_files: bool) -> Optional[str]:
    """
    Why ``description`` is not a usable Twisted server endpoint string, or
    None.  Nothing is bound: the endpoint is built against a MemoryReactor.
    """
    from twisted.internet.endpoints import _parse, serverFromString
    from twisted.internet.testing import MemoryReactor

    prefix = "not a Twisted server endpoint description"
    try:
        args, kw = _parse(description)
    except Exception as e:
        return f"{prefix}: {e}"
    kind = args[0] if args else ""
    try:
        if kind in ("tcp", "tcp6", "ssl"):
            port = args[1] if len(args) > 1 else kw.get("port")
            if port is None or not str(port).isdigit() or int(port) > 65535:
                return f"{prefix}: {kind} needs a port 0..65535, got {_show(description)}"
        if kind == "ssl" and not check_files:
            # ssl: reads its certificate files while it is parsed.
            return None
        if kind == "systemd":
            # Building it looks up descriptors inherited from systemd, which
            # only exist under systemd; check the options instead.
            domain = kw.get("domain", "")
            if not domain or not hasattr(socket, "AF_" + domain):
                return f"{prefix}: systemd needs domain=INET, INET6 or UNIX"
            if ("index" in kw) == ("name" in kw):
                return f"{prefix}: systemd needs exactly one of index= or name="
            if "index" in kw and not kw["index"].isdigit():
                return f"{prefix}: systemd index must be a number"
            return None
        serverFromString(MemoryReactor(), description)
    except (ValueError, TypeError, KeyError, IndexError, OSError) as e:
        return f"{prefix} ({_show(description)}): {e}"
    return None


# ---------------------------------------------------------------------------
# The reader: typed access to TOML tables that records problems


class _Reader:
    """
    Reads values out of TOML tables, recording a problem for each bad one.

    Every getter takes the table, the table's key path and the key, and
    returns the value converted (or ``default`` when it is absent or bad), so
    that reading can go on and find further problems.
    """

    def __init__(self, base_dir: str, check_files: bool) -> None:
        self.base_dir = base_dir
        self.check_files = check_files
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}" if path else message)

    # -- structure ---------------------------------------------------------

    def table(self, path: str, value: Any, known: Sequence[str]) -> Optional[dict]:
        """``value`` if it is a table; unknown keys in it are reported."""
        if not isinstance(value, dict):
            self.add(path, f"expected a table, got {_show(value)}")
            return None
        for key in value:
            if key not in known:
                message = "unknown key"
                close = difflib.get_close_matches(str(key), list(known), n=1)
                if close:
                    message += f"; did you mean {close[0]!r}?"
                self.add(_join(path, str(key)), message)
        return value

    def sub_table(
        self, table: dict, path: str, key: str, known: Sequence[str]
    ) -> Optional[dict]:
        """The table under ``key``, or None when absent or not a table."""
        if key not in table:
            return None
        return self.table(_join(path, key), table[key], known)

    def array_of_tables(
        self, table: dict, path: str, key: str, known: Sequence[str]
    ) -> Iterator[tuple[str, dict]]:
        """Yield ``(path, table)`` for each entry of the array under ``key``."""
        if key not in table:
            return
        here = _join(path, key)
        value = table[key]
        if not isinstance(value, (list, tuple)):
            self.add(here, f"expected an array of tables ([[{here}]]), got {_show(value)}")
            return
        for index, entry in enumerate(value):
            entry_path = f"{here}[{index}]"
            checked = self.table(entry_path, entry, known)
            if checked is not None:
                yield entry_path, checked

    # -- scalars -----------------------------------------------------------

    def _present(self, table: dict, path: str, key: str, required: bool) -> bool:
        """Whether ``key`` is in ``table``; its absence is reported when required."""
        if key in table:
            return True
        if required:
            self.add(_join(path, key), "required")
        return False

    def string(
        self,
        table: dict,
        path: str,
        key: str,
        default: Any = None,
        *,
        required: bool = False,
        nonempty: bool = True,
    ) -> Any:
        if not self._present(table, path, key, required):
            return default
        value = table[key]
        if not isinstance(value, str):
            self.add(_join(path, key), f"expected a string, got {_show(value)}")
            return default
        if nonempty and not value:
            self.add(_join(path, key), "must not be empty")
            return default
        return value

    def boolean(self, table: dict, path: str, key: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            self.add(_join(path, key), f"expected true or false, got {_show(value)}")
            return default
        return value

    def integer(
        self,
        table: dict,
        path: str,
        key: str,
        default: Any,
        *,
        minimum: Optional[int] = None,
        maximum: Optional[int] = None,
        required: bool = False,
    ) -> Any:
        if not self._present(table, path, key, required):
            return default
        value = table[key]
        here = _join(path, key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(here, f"expected an integer, got {_show(value)}")
            return default
        if not self._in_range(here, value, minimum, maximum, False):
            return default
        return value

    def number(
        self,
        table: dict,
        path: str,
        key: str,
        default: Any,
        *,
        minimum: Optional[float] = None,
        maximum: Optional[float] = None,
        positive: bool = False,
        required: bool = False,
    ) -> Any:
        if not self._present(table, path, key, required):
            return default
        value = table[key]
        here = _join(path, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.add(here, f"expected a number, got {_show(value)}")
            return default
        if not math.isfinite(value):
            self.add(here, f"expected a finite number, got {_show(value)}")
            return default
        if not self._in_range(here, value, minimum, maximum, positive):
            return default
        return float(value)

    def _in_range(
        self,
        path: str,
        value: float,
        minimum: Optional[float],
        maximum: Optional[float],
        positive: bool,
    ) -> bool:
        if positive and value <= 0:
            self.add(path, f"must be greater than 0, got {_show(value)}")
            return False
        if minimum is not None and maximum is not None:
            if not minimum <= value <= maximum:
                self.add(path, f"must be between {minimum} and {maximum}, got {_show(value)}")
                return False
        elif minimum is not None and value < minimum:
            self.add(path, f"must be at least {minimum}, got {_show(value)}")
            return False
        elif maximum is not None and value > maximum:
            self.add(path, f"must be at most {maximum}, got {_show(value)}")
            return False
        return True

    def duration(
        self,
        table: dict,
        path: str,
        key: str,
        default: float,
        *,
        positive: bool = False,
        maximum: Optional[float] = None,
    ) -> float:
        if key not in table:
            return default
        here = _join(path, key)
        try:
            seconds = parse_duration(table[key])
        except ValueError as e:
            self.add(here, str(e))
            return default
        if positive and seconds <= 0:
            self.add(here, f"must be longer than 0s, got {_show(table[key])}")
            return default
        if maximum is not None and seconds > maximum:
            self.add(here, f"must be at most {maximum:g}s, got {_show(table[key])}")
            return default
        return seconds

    def choice(
        self, table: dict, path: str, key: str, choices: Sequence[str], default: Any,
        *, required: bool = False,
    ) -> Any:
        if not self._present(table, path, key, required):
            return default
        value = table[key]
        if value not in choices:
            self.add(_join(path, key), f"expected one of {_choices(choices)}, got {_show(value)}")
            return default
        return value

    # -- lists -------------------------------------------------------------

    def string_list(self, table: dict, path: str, key: str) -> Optional[list[tuple[str, str]]]:
        """``[(item_path, string), ...]`` for the list under ``key``, or None."""
        if key not in table:
            return None
        here = _join(path, key)
        value = table[key]
        if not isinstance(value, (list, tuple)):
            self.add(here, f"expected a list of strings, got {_show(value)}")
            return None
        items = []
        for index, item in enumerate(value):
            item_path = f"{here}[{index}]"
            if not isinstance(item, str):
                self.add(item_path, f"expected a string, got {_show(item)}")
            elif not item:
                self.add(item_path, "must not be empty")
            else:
                items.append((item_path, item))
        return items

    def networks(self, table: dict, path: str, key: str) -> Optional[tuple]:
        """The CIDR list under ``key`` as ip_network objects, or None if absent."""
        items = self.string_list(table, path, key)
        if items is None:
            return None
        return tuple(
            network
            for item_path, text in items
            if (network := self.network(item_path, text)) is not None
        )

    def network(self, path: str, text: Any) -> Optional[IPNetwork]:
        if not isinstance(text, str):
            self.add(path, f"expected a CIDR string like \"10.0.0.0/8\", got {_show(text)}")
            return None
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            self.add(path, f"not a valid network {_show(text)}: {e}")
            return None

    # -- files and endpoints ---------------------------------------------

    def path(
        self,
        table: dict,
        path: str,
        key: str,
        *,
        required: bool = False,
        readable: bool = True,
    ) -> Optional[str]:
        """
        The absolute path under ``key``; when ``readable`` and files are
        checked, the file must exist and be readable.
        """
        value = self.string(table, path, key, required=required)
        if value is None:
            return None
        absolute = self.absolute(value)
        if readable:
            self.readable(_join(path, key), absolute)
        return absolute

    def absolute(self, value: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    def readable(self, path: str, filename: str) -> bool:
        """Report when ``filename`` cannot be read (only when checking files)."""
        if not self.check_files:
            return True
        try:
            with open(filename, "rb") as f:
                f.read(1)
        except OSError as e:
            self.add(path, f"cannot read {filename}: {e.strerror or e}")
            return False
        return True

    def endpoint(self, table: dict, path: str, key: str, *, required: bool) -> Optional[str]:
        value = self.string(table, path, key, required=required)
        if value is None:
            return None
        problem = _endpoint_problem(value, self.check_files)
        if problem is not None:
            self.add(_join(path, key), problem)
            return None
        return value

    def location(self, table: dict, path: str, key: str) -> Optional[Location]:
        here = _join(path, key)
        location = self.sub_table(table, path, key, ("lat", "lon", "region"))
        if location is None:
            return None
        return self.location_fields(location, here)

    def location_fields(self, table: dict, path: str) -> Location:
        lat = self.number(table, path, "lat", 0.0, minimum=-90, maximum=90, required=True)
        lon = self.number(table, path, "lon", 0.0, minimum=-180, maximum=180, required=True)
        region = self.string(table, path, "region", "", nonempty=False)
        return Location(lat=lat, lon=lon, region=region)


def _choices(choices: Sequence[str]) -> str:
    quoted = [f'"{c}"' for c in choices]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


# ---------------------------------------------------------------------------
# The sections of SPEC §3

_TOP_KEYS = (
    "proxy", "signing", "listener", "service", "geo", "threat_intel", "admin", "registry",
    "resolver",
)
_LISTENER_KEYS = (
    "name", "listen", "mode", "identify", "default_service", "peek_timeout",
    "max_client_hello", "accept_proxy", "trusted_proxies", "idle_timeout",
    "connect_timeout", "retries", "certificates", "default_certificate", "strict_sni",
    "alpn", "min_tls", "client_ca", "require_client_cert",
)
# Keys that only mean something where the proxy itself speaks TLS.
_TERMINATE_ONLY = (
    "certificates", "default_certificate", "strict_sni", "alpn", "min_tls",
    "client_ca", "require_client_cert",
)
_SERVICE_KEYS = (
    "names", "upstream_tls", "upstream_ca", "upstream_cert", "upstream_key",
    "weights", "policy", "shard",
)
_POLICY_KEYS = (
    "encryption", "authentication", "acl", "allow", "deny", "min_security_score", "regions",
)
_SHARD_KEYS = (
    "id", "address", "location", "capacity", "security_score", "weight", "server_name",
    "health_check", "slow_start",
)
_HEALTH_KEYS = ("kind", "interval", "timeout", "rise", "fall", "agent_port")
_MODES = ("passthrough", "terminate", "plain")
_IDENTIFIERS = ("sni", "connect", "line", "http-host")
_DAY = 86400.0


def _read_config(reader: _Reader, data: Any, token_size: Optional[TokenSizer]) -> Config:
    top = reader.table("", data, _TOP_KEYS)
    if top is None:
        return Config(proxy=ProxyConfig(id=""), signing=SigningConfig(private_key="", kid=""))

    proxy = _read_proxy(reader, top)
    signing = _read_signing(reader, top)
    registry = _read_registry(reader, top)
    services = _read_services(reader, top, registry)
    listeners = _read_listeners(reader, top, {s.id for s in services})
    geo = _read_geo(reader, top)
    threat_intel = _read_threat_intel(reader, top)
    admin = _read_admin(reader, top)
    resolver = _read_resolver(reader, top)
    _check_token_sizes(reader, proxy, signing, services, listeners, token_size)
    return Config(
        proxy=proxy,
        signing=signing,
        listeners=listeners,
        services=services,
        geo=geo,
        threat_intel=threat_intel,
        admin=admin,
        registry=registry,
        resolver=resolver,
    )


def _read_resolver(reader: _Reader, top: dict) -> ResolverConfig:
    keys = ("latency_decay", "eject_after", "eject_base", "eject_max", "panic_threshold")
    table = reader.sub_table(top, "", "resolver", keys)
    if table is None:
        return ResolverConfig()
    base = reader.duration(table, "resolver", "eject_base", 10.0, maximum=_DAY)
    longest = reader.duration(table, "resolver", "eject_max", 300.0, maximum=_DAY)
    if longest < base:
        reader.add("resolver.eject_max", f"must be at least eject_base ({base:g}s)")
    return ResolverConfig(
        latency_decay=reader.duration(table, "resolver", "latency_decay", 10.0, positive=True, maximum=_DAY),
        eject_after=reader.integer(table, "resolver", "eject_after", 3, minimum=1, maximum=1000),
        eject_base=base,
        eject_max=longest,
        panic_threshold=reader.number(table, "resolver", "panic_threshold", 0.5, minimum=0.0, maximum=1.0),
    )


def _read_proxy(reader: _Reader, top: dict) -> ProxyConfig:
    if "proxy" not in top:
        reader.add("proxy", "required ([proxy] with an id)")
        return ProxyConfig(id="")
    table = reader.table("proxy", top["proxy"], ("id", "location"))
    if table is None:
        return ProxyConfig(id="")
    proxy_id = reader.string(table, "proxy", "id", "", required=True)
    return ProxyConfig(id=proxy_id, location=reader.location(table, "proxy", "location"))


def _read_signing(reader: _Reader, top: dict) -> SigningConfig:
    if "signing" not in top:
        reader.add("signing", "required ([signing] with private_key and kid)")
        return SigningConfig(private_key="", kid="")
    table = reader.table("signing", top["signing"], ("private_key", "kid", "ttl", "tlv_type"))
    if table is None:
        return SigningConfig(private_key="", kid="")
    private_key = reader.path(table, "signing", "private_key", required=True, readable=False)
    if private_key is not None and reader.check_files:
        _check_signing_key(reader, "signing.private_key", private_key)
    kid = reader.string(table, "signing", "kid", "", required=True)
    ttl = reader.duration(table, "signing", "ttl", 30.0, positive=True, maximum=_DAY)
    tlv_type = reader.integer(table, "signing", "tlv_type", 0xE0)
    if tlv_type is not None and not 0xE0 <= tlv_type <= 0xEF:
        reader.add("signing.tlv_type", f"must be in 0xE0..0xEF, got {tlv_type:#x}")
        tlv_type = 0xE0
    return SigningConfig(private_key=private_key or "", kid=kid, ttl=ttl, tlv_type=tlv_type)


def _check_signing_key(reader: _Reader, path: str, filename: str) -> None:
    """The PolicyContext key must be an unencrypted Ed25519 PEM private key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        with open(filename, "rb") as f:
            pem = f.read()
    except OSError as e:
        reader.add(path, f"cannot read {filename}: {e.strerror or e}")
        return
    try:
        key = load_pem_private_key(pem, password=None)
    except TypeError:
        reader.add(path, f"{filename} is encrypted; shardtcp needs an unencrypted key")
        return
    except (ValueError, UnsupportedAlgorithm) as e:
        reader.add(path, f"{filename} is not a PEM private key: {e}")
        return
    if not isinstance(key, Ed25519PrivateKey):
        reader.add(path, f"{filename} is not an Ed25519 key ({type(key).__name__})")


def _read_registry(reader: _Reader, top: dict) -> RegistryConfig:
    table = reader.sub_table(top, "", "registry", ("kind", "endpoints", "prefix"))
    if table is None:
        return RegistryConfig()
    kind = reader.choice(table, "registry", "kind", ("static", "etcd"), "static")
    if kind != "etcd":
        for key in ("endpoints", "prefix"):
            if key in table:
                reader.add(f"registry.{key}", 'only with kind = "etcd"')
        return RegistryConfig(kind=kind)
    endpoints = ("http://127.0.0.1:2379",)
    items = reader.string_list(table, "registry", "endpoints")
    if items is not None:
        for item_path, url in items:
            if not re.fullmatch(r"https?://[^/\s]+/?", url):
                reader.add(item_path, f"expected an http(s)://host:port URL, got {_show(url)}")
        if table["endpoints"] == []:
            reader.add("registry.endpoints", "must not be empty")
        endpoints = tuple(url for _, url in items) or endpoints
    prefix = reader.string(table, "registry", "prefix", "/shardtcp/")
    return RegistryConfig(kind=kind, endpoints=endpoints, prefix=prefix)


# -- services -----------------------------------------------------------------


def _read_services(reader: _Reader, top: dict, registry: RegistryConfig) -> tuple:
    if "service" not in top:
        return ()
    services_table = top["service"]
    if not isinstance(services_table, dict):
        reader.add("service", f"expected tables [service.NAME], got {_show(services_table)}")
        return ()
    services = []
    name_owner: dict[str, str] = {}
    shard_owner: dict[str, str] = {}
    for service_id, value in services_table.items():
        path = _join("service", service_id)
        if not _ID.fullmatch(service_id):
            reader.add(path, f"service id {_show(service_id)} may only use A-Z a-z 0-9 _ . -")
        table = reader.table(path, value, _SERVICE_KEYS)
        if table is None:
            continue
        services.append(
            _read_service(reader, service_id, path, table, registry, name_owner, shard_owner)
        )
    return tuple(services)


def _read_service(
    reader: _Reader,
    service_id: str,
    path: str,
    table: dict,
    registry: RegistryConfig,
    name_owner: dict[str, str],
    shard_owner: dict[str, str],
) -> ServiceConfig:
    names = []
    for item_path, written in reader.string_list(table, path, "names") or ():
        name, problem = _canonical_service_name(written)
        if problem is not None:
            reader.add(item_path, problem)
            continue
        owner = name_owner.get(name)
        if owner == service_id:
            reader.add(item_path, f"{_show(name)} is listed twice")
            continue
        if owner is not None:
            reader.add(
                item_path,
                f"{_show(name)} is a name of both service {owner!r} and service {service_id!r}",
            )
            continue
        name_owner[name] = service_id
        names.append(name)

    upstream_tls = reader.boolean(table, path, "upstream_tls", False)
    upstream = {
        key: reader.path(table, path, key)
        for key in ("upstream_ca", "upstream_cert", "upstream_key")
    }
    if not upstream_tls:
        for key in upstream:
            if key in table:
                reader.add(_join(path, key), "only with upstream_tls = true")
    if ("upstream_cert" in table) != ("upstream_key" in table):
        missing = "upstream_key" if "upstream_cert" in table else "upstream_cert"
        reader.add(_join(path, missing), "required with " + (
            "upstream_cert" if missing == "upstream_key" else "upstream_key"))

    weights = _read_weights(reader, table, path)
    policy = _read_policy(reader, table, path)

    shards = []
    for shard_path, shard_table in reader.array_of_tables(table, path, "shard", _SHARD_KEYS):
        shard = _read_shard(reader, shard_path, shard_table)
        if shard.id:
            owner = shard_owner.get(shard.id)
            if owner is not None:
                reader.add(
                    _join(shard_path, "id"),
                    f"shard id {shard.id!r} is already used in {owner}; shard ids "
                    "must be unique across the file (they are the tokens' aud)",
                )
            else:
                shard_owner[shard.id] = shard_path
        shards.append(shard)
    if registry.kind == "static" and not table.get("shard"):
        reader.add(
            _join(path, "shard"),
            "at least one [[shard]] is required with the static registry",
        )

    return ServiceConfig(
        id=service_id,
        names=tuple(names),
        upstream_tls=upstream_tls,
        upstream_ca=upstream["upstream_ca"],
        upstream_cert=upstream["upstream_cert"],
        upstream_key=upstream["upstream_key"],
        weights=weights,
        policy=policy,
        shards=tuple(shards),
    )


def _read_weights(reader: _Reader, table: dict, path: str) -> Weights:
    weights_table = reader.sub_table(table, path, "weights", ("latency", "security", "load"))
    if weights_table is None:
        return Weights()
    here = _join(path, "weights")
    default = Weights()
    values = {
        key: reader.number(weights_table, here, key, getattr(default, key), minimum=0)
        for key in ("latency", "security", "load")
    }
    if sum(values.values()) <= 0:
        reader.add(here, "the weights must add up to more than 0")
        return default
    return Weights(**values)


def _read_policy(reader: _Reader, table: dict, path: str) -> PolicyConfig:
    policy_table = reader.sub_table(table, path, "policy", _POLICY_KEYS)
    if policy_table is None:
        return PolicyConfig()
    here = _join(path, "policy")
    default = PolicyConfig()
    encryption = reader.choice(policy_table, here, "encryption", ("none", "tls", "mtls"), "none")
    authentication = reader.choice(policy_table, here, "authentication", ("none", "mtls"), "none")
    acl = tuple(s for _, s in reader.string_list(policy_table, here, "acl") or ())
    allow = reader.networks(policy_table, here, "allow")
    deny = reader.networks(policy_table, here, "deny")
    min_score = reader.number(
        policy_table, here, "min_security_score", 0.0, minimum=0, maximum=100
    )
    regions = tuple(s for _, s in reader.string_list(policy_table, here, "regions") or ())
    return PolicyConfig(
        encryption=encryption,
        authentication=authentication,
        acl=acl,
        allow=default.allow if allow is None else allow,
        deny=deny or (),
        min_security_score=min_score,
        regions=regions,
    )


def _read_shard(reader: _Reader, path: str, table: dict) -> ShardConfig:
    shard_id = reader.string(table, path, "id", "", required=True)
    if shard_id and not _ID.fullmatch(shard_id):
        reader.add(_join(path, "id"), f"shard id {_show(shard_id)} may only use A-Z a-z 0-9 _ . -")
        shard_id = ""
    address = Address(host="", port=0)
    text = reader.string(table, path, "address", None, required=True)
    if text is not None:
        parsed = _parse_address(text)
        if isinstance(parsed, str):
            reader.add(_join(path, "address"), parsed)
        else:
            address = parsed
    server_name = reader.string(table, path, "server_name")
    if server_name is not None:
        server_name = server_name.lower()
        problem = _dns_name_problem(server_name)
        if problem is None and server_name.startswith("*."):
            problem = f"{_show(server_name)}: a wildcard cannot be checked against a certificate"
        if problem is not None:
            reader.add(_join(path, "server_name"), problem)
            server_name = None
    return ShardConfig(
        id=shard_id,
        address=address,
        location=reader.location(table, path, "location"),
        capacity=reader.integer(table, path, "capacity", 1000, minimum=1),
        security_score=reader.number(table, path, "security_score", 100.0, minimum=0, maximum=100),
        weight=reader.number(table, path, "weight", 1.0, positive=True),
        server_name=server_name,
        health_check=_read_health_check(reader, table, path),
        slow_start=reader.duration(table, path, "slow_start", 30.0),
    )


def _read_health_check(reader: _Reader, table: dict, path: str) -> Optional[HealthCheckConfig]:
    check = reader.sub_table(table, path, "health_check", _HEALTH_KEYS)
    if check is None:
        return None
    here = _join(path, "health_check")
    kind = reader.choice(check, here, "kind", ("tcp", "tls", "agent"), "tcp", required=True)
    agent_port = reader.integer(check, here, "agent_port", None, minimum=1, maximum=65535)
    if kind == "agent" and "agent_port" not in check:
        reader.add(_join(here, "agent_port"), 'required with kind = "agent"')
    elif kind != "agent" and "agent_port" in check:
        reader.add(_join(here, "agent_port"), 'only with kind = "agent"')
        agent_port = None
    return HealthCheckConfig(
        kind=kind,
        interval=reader.duration(check, here, "interval", 2.0, positive=True),
        timeout=reader.duration(check, here, "timeout", 1.0, positive=True),
        rise=reader.integer(check, here, "rise", 2, minimum=1),
        fall=reader.integer(check, here, "fall", 3, minimum=1),
        agent_port=agent_port,
    )


# -- listeners ----------------------------------------------------------------


def _read_listeners(reader: _Reader, top: dict, service_ids: set[str]) -> tuple:
    listeners = []
    seen: dict[str, str] = {}
    for path, table in reader.array_of_tables(top, "", "listener", _LISTENER_KEYS):
        listener = _read_listener(reader, path, table, service_ids)
        if listener.name:
            if listener.name in seen:
                reader.add(
                    _join(path, "name"),
                    f"{listener.name!r} is already the name of {seen[listener.name]}",
                )
            else:
                seen[listener.name] = path
        listeners.append(listener)
    return tuple(listeners)


def _read_listener(
    reader: _Reader, path: str, table: dict, service_ids: set[str]
) -> ListenerConfig:
    name = reader.string(table, path, "name", "", required=True)
    listen = reader.endpoint(table, path, "listen", required=True) or ""
    mode = reader.choice(table, path, "mode", _MODES, "passthrough")
    default_service = reader.string(table, path, "default_service")
    if default_service is not None and default_service not in service_ids:
        message = f"no service {default_service!r}"
        close = difflib.get_close_matches(default_service, sorted(service_ids), n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        reader.add(_join(path, "default_service"), message)

    identify = _read_identify(reader, table, path, mode, default_service)

    accept_proxy = reader.boolean(table, path, "accept_proxy", False)
    trusted = reader.networks(table, path, "trusted_proxies")
    if accept_proxy and not table.get("trusted_proxies"):
        reader.add(_join(path, "trusted_proxies"), "required with accept_proxy = true")
    if not accept_proxy and "trusted_proxies" in table:
        reader.add(_join(path, "trusted_proxies"), "only with accept_proxy = true")
        trusted = None

    if mode != "terminate":
        for key in _TERMINATE_ONLY:
            if key in table:
                reader.add(
                    _join(path, key),
                    f'only on mode = "terminate" listeners (this one is {mode!r})',
                )
        tls = {}
    else:
        tls = _read_termination(reader, table, path)

    return ListenerConfig(
        name=name,
        listen=listen,
        mode=mode,
        identify=identify,
        default_service=default_service,
        peek_timeout=reader.duration(table, path, "peek_timeout", 5.0),
        max_client_hello=reader.integer(
            table, path, "max_client_hello", 16384, minimum=512, maximum=65536
        ),
        accept_proxy=accept_proxy,
        trusted_proxies=trusted or (),
        idle_timeout=reader.duration(table, path, "idle_timeout", 0.0),
        connect_timeout=reader.duration(table, path, "connect_timeout", 5.0),
        retries=reader.integer(table, path, "retries", 2, minimum=0, maximum=10),
        **tls,
    )


def _read_identify(
    reader: _Reader, table: dict, path: str, mode: str, default_service: Optional[str]
) -> tuple:
    here = _join(path, "identify")
    if "identify" not in table:
        if mode == "plain":
            reader.add(here, f"required on plain listeners (any of {_choices(_IDENTIFIERS[1:])})")
            return ()
        return ("sni",)
    items = reader.string_list(table, path, "identify")
    if items is None:
        return ("sni",) if mode != "plain" else ()
    identify: list[str] = []
    for item_path, value in items:
        if value not in _IDENTIFIERS:
            reader.add(item_path, f"expected one of {_choices(_IDENTIFIERS)}, got {_show(value)}")
        elif value in identify:
            reader.add(item_path, f"{value!r} is listed twice")
        elif value == "sni" and mode == "plain":
            reader.add(item_path, '"sni" is not possible on plain listeners (there is no TLS)')
        else:
            identify.append(value)
    if not table["identify"] and default_service is None:
        reader.add(here, "empty: list a way to identify the service, or set default_service")
    return tuple(identify)


def _read_termination(reader: _Reader, table: dict, path: str) -> dict:
    """The TLS-termination keys of a terminate listener, as ListenerConfig keywords."""
    certificates = []
    for cert_path, cert_table in reader.array_of_tables(
        table, path, "certificates", ("names", "cert", "key")
    ):
        names = []
        for item_path, name in reader.string_list(cert_table, cert_path, "names") or ():
            name = name.lower()
            problem = _dns_name_problem(name)
            if problem is not None:
                reader.add(item_path, problem)
            else:
                names.append(name)
        certificates.append(
            CertificateConfig(
                cert=reader.path(cert_table, cert_path, "cert", required=True) or "",
                key=reader.path(cert_table, cert_path, "key", required=True) or "",
                names=tuple(names),
            )
        )
    default_certificate = None
    default_table = reader.sub_table(table, path, "default_certificate", ("cert", "key"))
    if default_table is not None:
        here = _join(path, "default_certificate")
        default_certificate = CertificateConfig(
            cert=reader.path(default_table, here, "cert", required=True) or "",
            key=reader.path(default_table, here, "key", required=True) or "",
        )
    if not table.get("certificates") and "default_certificate" not in table:
        reader.add(
            _join(path, "certificates"),
            "a terminate listener needs certificates or a default_certificate",
        )

    alpn = []
    for item_path, protocol in reader.string_list(table, path, "alpn") or ():
        if len(protocol.encode("utf-8")) > 255:
            reader.add(item_path, "an ALPN protocol name is at most 255 bytes")
        else:
            alpn.append(protocol)

    client_ca = reader.path(table, path, "client_ca")
    require_client_cert = reader.boolean(table, path, "require_client_cert", False)
    if require_client_cert and "client_ca" not in table:
        reader.add(_join(path, "client_ca"), "required with require_client_cert = true")
    return dict(
        certificates=tuple(certificates),
        default_certificate=default_certificate,
        strict_sni=reader.boolean(table, path, "strict_sni", False),
        alpn=tuple(alpn),
        min_tls=reader.choice(table, path, "min_tls", ("1.2", "1.3"), "1.2"),
        client_ca=client_ca,
        require_client_cert=require_client_cert,
    )


# -- geo, threat intelligence, admin -------------------------------------------


def _read_geo(reader: _Reader, top: dict) -> tuple:
    geo = reader.sub_table(top, "", "geo", ("networks",))
    if geo is None:
        return ()
    networks = []
    known = ("cidr", "lat", "lon", "region")
    for path, table in reader.array_of_tables(geo, "geo", "networks", known):
        network = None
        if "cidr" not in table:
            reader.add(_join(path, "cidr"), "required")
        else:
            network = reader.network(_join(path, "cidr"), table["cidr"])
        location = reader.location_fields(table, path)
        if network is not None:
            networks.append(GeoNetwork(network=network, location=location))
    return tuple(networks)


def _is_url(source: str) -> bool:
    return re.match(r"https?://", source, re.IGNORECASE) is not None


def _read_threat_intel(reader: _Reader, top: dict) -> Optional[ThreatIntelConfig]:
    table = reader.sub_table(
        top, "", "threat_intel", ("trusted_keys", "feeds", "on_expiry", "state_file")
    )
    if table is None:
        return None
    trusted_keys = reader.path(table, "threat_intel", "trusted_keys", required=True)
    feeds = []
    for path, feed in reader.array_of_tables(table, "threat_intel", "feeds", ("source", "refresh")):
        source = reader.string(feed, path, "source", required=True)
        if source is not None and _is_url(source):
            if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", source, re.IGNORECASE):
                reader.add(_join(path, "source"), f"not a valid URL: {_show(source)}")
        elif source is not None:
            # A feed file may not exist yet; it is read at each refresh.
            source = reader.absolute(source)
        refresh = reader.duration(feed, path, "refresh", 60.0, positive=True)
        if source is not None:
            feeds.append(FeedSourceConfig(source=source, refresh=refresh))
    state_file = reader.path(table, "threat_intel", "state_file", readable=False)
    if state_file is not None and reader.check_files:
        folder = os.path.dirname(state_file)
        if not os.path.isdir(folder):
            reader.add("threat_intel.state_file", f"folder {folder} does not exist")
    return ThreatIntelConfig(
        trusted_keys=trusted_keys or "",
        feeds=tuple(feeds),
        on_expiry=reader.choice(
            table, "threat_intel", "on_expiry", ("baseline", "distrust"), "baseline"
        ),
        state_file=state_file,
    )


def _read_admin(reader: _Reader, top: dict) -> Optional[AdminConfig]:
    table = reader.sub_table(top, "", "admin", ("listen", "token_file"))
    if table is None:
        return None
    return AdminConfig(
        listen=reader.endpoint(table, "admin", "listen", required=True) or "",
        token_file=reader.path(table, "admin", "token_file"),
    )


# -- PolicyContext size ---------------------------------------------------------


def _default_token_size() -> Optional[TokenSizer]:
    """``shardtcp.policy.worst_case_token_size`` when that module offers it."""
    try:
        from shardtcp.policy import worst_case_token_size
    except ImportError:
        return None
    return worst_case_token_size


def _check_token_sizes(
    reader: _Reader,
    proxy: ProxyConfig,
    signing: SigningConfig,
    services: tuple,
    listeners: tuple,
    token_size: Optional[TokenSizer],
) -> None:
    """
    Refuse a policy whose PolicyContext could outgrow its TLV (SPEC §4).

    The per-connection claims are bounded by what this configuration allows:
    ``sni`` is only set when a listener identifies by SNI, and then is one of
    the service's names (a wildcard adds one label); ``sub`` only exists when
    a terminate listener asks for client certificates.
    """
    if token_size is None:
        token_size = _default_token_size()
    if token_size is None:
        return
    accepted = _keywords(token_size)
    by_sni = any("sni" in listener.identify for listener in listeners)
    client_certificates = any(listener.client_ca for listener in listeners)
    for service in services:
        bounds: dict[str, Any] = {}
        lengths = [n for n in map(_sni_length, service.names) if n is not None]
        bounds["sni_length"] = max(lengths) if by_sni and lengths else None
        if not client_certificates:
            bounds["subject_length"] = None
        # Otherwise the subject bound is the policy module's own default.
        extra = {k: v for k, v in bounds.items() if accepted is None or k in accepted}
        for shard in service.shards:
            if not shard.id:
                continue
            size = token_size(
                issuer=proxy.id,
                kid=signing.kid,
                service_id=service.id,
                shard_id=shard.id,
                acl=service.policy.acl,
                **extra,
            )
            if size > POLICY_TLV_LIMIT:
                reader.add(
                    _join(_join(_join("service", service.id), "policy"), "acl"),
                    f"the PolicyContext for shard {shard.id!r} could reach {size} bytes, "
                    f"over the {POLICY_TLV_LIMIT}-byte limit",
                )


def _keywords(function: Callable[..., Any]) -> Optional[set[str]]:
    """The keyword names ``function`` accepts, or None when it takes any."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
