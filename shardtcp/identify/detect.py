"""
Identify the service a connection is for, from its first bytes.

A ``Detector`` is fed the client's bytes as they arrive and answers with an
``Identified`` once it knows the name (or that there is none), or raises an
``IdentifyError``.  It chooses the method from the first bytes among the
listener's ``identify`` list: ``0x16`` is a TLS handshake (``sni``);
``CONNECT `` an HTTP proxy request (``connect``); ``SHARD `` a line preamble
(``line``); another HTTP method token a plain request (``http-host``).

Detectors are pure: no I/O, no clock.  The listener owns the timeout.

The preamble methods (``connect``, ``line``, ``http-host``) live in
``shardtcp.identify.preamble``; importing this module registers them.
"""

from __future__ import annotations

from typing import Optional, Sequence

from attrs import frozen
from zope.interface import Attribute, Interface, implementer

from shardtcp.identify.clienthello import ClientHelloError, ClientHelloParser, NotTLS


@frozen
class Identified:
    """
    What the first bytes said.

    ``name`` is the SNI or preamble name (None when there was none);
    ``protocol`` is how to answer a refusal ("tls", "http", "line");
    ``consume`` is how many leading bytes are the preamble's own and are not
    forwarded; ``reply_when_connected`` is written to the client once the
    shard is connected (CONNECT's 200); ``by_service_id`` says that ``name``
    may also be a service id as it stands (the ``line`` preamble names a
    service, not a host): the router tries it as one when the name table
    selects nothing.
    """

    method: str
    protocol: str
    name: Optional[str] = None
    alpn: tuple = ()
    tls: bool = False
    consume: int = 0
    reply_when_connected: bytes = b""
    by_service_id: bool = False


class IdentifyError(Exception):
    """
    The first bytes identify nothing usable.

    ``reason`` is a metrics slug; ``protocol`` says how to answer ("tls",
    "http", "line", or "none" when the input was not of any known protocol).
    """

    def __init__(self, reason: str, message: str, protocol: str = "none") -> None:
        super().__init__(message)
        self.reason = reason
        self.protocol = protocol


class IIdentifyMethod(Interface):
    """
    One way of identifying the service from a connection's first bytes.

    Implementations are registered in ``METHODS`` under their ``name`` and
    built with one argument, the most bytes they may hold.
    """

    name = Attribute("The method's name in a listener's identify list.")
    protocol = Attribute('How a refusal is answered: "tls", "http" or "line".')

    def feed(data: bytes) -> Optional[Identified]:
        """
        Feed the next bytes; return the ``Identified`` once known, else
        None. Raises ``IdentifyError``, and nothing else, on bad input.
        """


@implementer(IIdentifyMethod)
class _SniMethod:
    """Identify by the SNI of a TLS ClientHello (bytes are not consumed)."""

    name = "sni"
    protocol = "tls"

    def __init__(self, max_size: int) -> None:
        self._parser = ClientHelloParser(max_size=max_size)

    def feed(self, data: bytes) -> Optional[Identified]:
        try:
            info = self._parser.feed(data)
        except ClientHelloError as e:
            protocol = "none" if isinstance(e, NotTLS) else "tls"
            raise IdentifyError(getattr(e, "reason", "malformed"), str(e), protocol) from None
        if info is None:
            return None
        return Identified(
            method="sni", protocol="tls", name=info.server_name, alpn=tuple(info.alpn), tls=True
        )


# Methods registered by name; preamble methods add themselves here.
METHODS: dict = {"sni": _SniMethod}

_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"TRACE ")


_TOKENS = [(b"CONNECT ", "connect"), (b"SHARD ", "line")] + [(m, "http-host") for m in _HTTP_METHODS]


def _classify(prefix: bytes, allowed: Sequence[str]) -> Optional[str]:
    """
    Which of the ``allowed`` methods the first bytes belong to: a method
    name, "" for none, or None while too few bytes have arrived to say.
    """
    if not prefix:
        return None
    if prefix[0] == 0x16:
        return "sni" if "sni" in allowed else ""
    candidates = [(token, method) for token, method in _TOKENS if method in allowed]
    undecided = False
    for token, method in candidates:
        if prefix.startswith(token):
            return method
        if token.startswith(prefix):
            undecided = True
    return None if undecided else ""


class Detector:
    """
    Feed the first bytes of a connection; get an ``Identified``.

    ``methods`` is the listener's ordered ``identify`` list.
    """

    def __init__(self, methods: Sequence[str], *, max_client_hello: int = 16384, max_preamble: int = 8192) -> None:
        self._allowed = tuple(methods)
        self._max_client_hello = max_client_hello
        self._max_preamble = max_preamble
        self._buffer = b""
        self._method = None

    @property
    def protocol(self) -> str:
        """
        How to answer a refusal at this point (a peek timeout, an early
        close): the chosen method's protocol, "none" while undecided.
        """
        return self._method.protocol if self._method is not None else "none"

    def feed(self, data: bytes) -> Optional[Identified]:
        """Feed bytes; return the identification once known, else None."""
        if self._method is None:
            self._buffer += data
            kind = _classify(self._buffer[:8], self._allowed)
            if kind is None:
                return None
            if kind == "" or kind not in METHODS:
                raise IdentifyError(
                    "not_tls" if self._allowed == ("sni",) else "unrecognized",
                    _describe_unexpected(self._buffer, self._allowed),
                    "none",
                )
            factory = METHODS[kind]
            limit = self._max_client_hello if kind == "sni" else self._max_preamble
            self._method = factory(limit)
            data, self._buffer = self._buffer, b""
        return self._method.feed(data)


def _describe_unexpected(prefix: bytes, allowed: Sequence[str]) -> str:
    shown = prefix[:16].hex()
    if tuple(allowed) == ("sni",):
        return f"not a TLS ClientHello (first bytes {shown})"
    return f"first bytes {shown} match none of {', '.join(allowed)}"


# Last, because the preamble methods need the names above: importing the
# module registers connect, line and http-host in METHODS.
import shardtcp.identify.preamble  # noqa: E402,F401
