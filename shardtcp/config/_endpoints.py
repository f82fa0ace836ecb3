# -*- test-case-name: tests.config.test_endpoints -*-
"""
Twisted server endpoint strings in a configuration, checked through public
Twisted APIs only.

``split_endpoint`` reads the description grammar of
``twisted.internet.endpoints.serverFromString`` (``:`` between arguments,
``key=value`` for keywords, ``\\`` escaping the next character), so that a
port can be checked as ASCII digits and the files an ``ssl:`` endpoint names
can be resolved against the configuration's folder and read with a bound
before Twisted reads them.  ``check_endpoint`` then builds the endpoint
without binding; ``listen_problem`` tries to bind, then releases the port.
"""

from __future__ import annotations

import socket
from typing import Callable, Optional

import attrs

from shardtcp.config._reader import FileProblem, one_line, read_file, show
from shardtcp.net import parse_port

#: The keywords of ``ssl:`` that name files, and Twisted's default private key.
SSL_FILE_KEYS = ("privateKey", "certKey", "extraCertChain", "dhParameters")
_SSL_DEFAULT_KEY = "server.pem"
_PREFIX = "not a Twisted server endpoint description"


@attrs.frozen
class EndpointParts:
    """A description split into ``(keyword or None, value)`` items, in order."""

    items: tuple

    @property
    def args(self) -> list:
        return [value for name, value in self.items if name is None]

    @property
    def kw(self) -> dict:
        return {name: value for name, value in self.items if name is not None}

    @property
    def kind(self) -> str:
        args = self.args
        return args[0] if args else ""

    def port_text(self) -> Optional[str]:
        args = self.args
        return args[1] if len(args) > 1 else self.kw.get("port")

    def interface(self) -> str:
        return self.kw.get("interface", "::" if self.kind == "tcp6" else "")

    def replace(self, name: str, value: str) -> "EndpointParts":
        items = [(n, value if n == name else v) for n, v in self.items]
        if name not in self.kw:
            items.append((name, value))
        return EndpointParts(tuple(items))

    def unparse(self) -> str:
        return ":".join(
            _escape(value) if name is None else f"{_escape(name)}={_escape(value)}"
            for name, value in self.items
        )


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def split_endpoint(description: str) -> EndpointParts:
    """
    Split ``description`` as ``serverFromString`` does: after a ``=`` only a
    ``:`` separates, so further ``=`` belong to the value.  Raises
    ``ValueError`` for a trailing backslash.
    """
    items: list = []
    current = ""
    name: Optional[str] = None
    characters = iter(description)
    for character in characters:
        if character == ":":
            items.append((name, current))
            current, name = "", None
        elif character == "=" and name is None:
            name, current = current, ""
        elif character == "\\":
            escaped = next(characters, None)
            if escaped is None:
                raise ValueError("a backslash at the end escapes nothing")
            current += escaped
        else:
            current += character
    items.append((name, current))
    return EndpointParts(tuple(items))


class _NoReactor:
    """
    Stands in for a reactor while an endpoint is only built, never used:
    building a server endpoint stores its reactor and nothing more.
    """

    def __getattr__(self, name: str):
        raise AttributeError(f"endpoint checking does not run a reactor ({name})")


def check_endpoint(
    description: str,
    check_files: bool,
    absolute: Callable[[str], str],
) -> tuple[Optional[str], Optional[str]]:
    """
    ``(description, None)`` with the ``ssl:`` file paths made absolute
    (through ``absolute``), or ``(None, problem)`` with a one-line reason.
    Nothing is bound.
    """
    from twisted.internet.endpoints import serverFromString

    if "\x00" in description:
        return None, f"{_PREFIX}: it contains a NUL byte"
    try:
        parts = split_endpoint(description)
    except ValueError as e:
        return None, f"{_PREFIX}: {e}"
    kind = parts.kind
    if kind in ("tcp", "tcp6", "ssl"):
        port = parts.port_text()
        try:
            if port is None:
                raise ValueError("no port given")
            parse_port(port)
        except ValueError as e:
            return None, f"{_PREFIX}: {kind} needs a port 0..65535 ({e})"
    if kind == "ssl":
        for name in SSL_FILE_KEYS:
            value = parts.kw.get(name)
            if value is None and name == "privateKey":
                value = _SSL_DEFAULT_KEY
            if value is None:
                continue
            parts = parts.replace(name, absolute(value))
        description = parts.unparse()
        if not check_files:
            # ssl: reads its certificate files while it is built.
            return description, None
        for name in SSL_FILE_KEYS:
            if name in parts.kw:
                try:
                    read_file(parts.kw[name])
                except FileProblem as e:
                    return None, f"ssl {name}: {e}"
    if kind == "systemd":
        # Building it looks up descriptors inherited from systemd, which
        # only exist under systemd; check the options instead.
        kw = parts.kw
        domain = kw.get("domain", "")
        if domain not in ("INET", "INET6", "UNIX"):
            return None, f"{_PREFIX}: systemd needs domain=INET, INET6 or UNIX"
        if ("index" in kw) == ("name" in kw):
            return None, f"{_PREFIX}: systemd needs exactly one of index= or name="
        if "index" in kw and not (kw["index"].isascii() and kw["index"].isdigit()):
            return None, f"{_PREFIX}: systemd index must be a number"
        return description, None
    try:
        serverFromString(_NoReactor(), description)
    except Exception as e:
        # Twisted raises ValueError, TypeError or KeyError for bad options,
        # and OpenSSL's own error for a file that is not a key or
        # certificate; all of them end up as one line here.
        reason = one_line(str(e)) or type(e).__name__
        if len(reason) > 200:
            reason = reason[:197] + "..."
        return None, f"{_PREFIX} ({show(description)}): {reason}"
    return description, None


def listen_address(description: str) -> Optional[tuple[int, str, int]]:
    """
    ``(family, interface, port)`` a TCP-based endpoint would bind, or None
    when it binds no fixed TCP port (port 0, unix, systemd, plugins).
    """
    try:
        parts = split_endpoint(description)
        if parts.kind not in ("tcp", "tcp6", "ssl"):
            return None
        port = parse_port(parts.port_text() or "")
    except ValueError:
        return None
    if port == 0:
        return None
    interface = parts.interface()
    family = socket.AF_INET6 if parts.kind == "tcp6" or ":" in interface else socket.AF_INET
    return family, interface, port


def listen_problem(description: str) -> Optional[str]:
    """
    Why ``description`` could not be listened on now, or None: the port is
    bound as Twisted binds it (``SO_REUSEADDR``), then released at once.
    """
    address = listen_address(description)
    if address is None:
        return None
    family, interface, port = address
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((interface, port))
            probe.listen(1)
    except OSError as e:
        return f"cannot listen on {description}: {e.strerror or e}"
    return None
