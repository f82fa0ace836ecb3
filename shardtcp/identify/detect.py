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
``shardtcp.identify.preamble``, the shared values in
``shardtcp.identify.types`` (re-exported here); ``METHODS`` lists every
method by name, built here once, read-only.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional, Sequence

from zope.interface import implementer

from shardtcp.identify.clienthello import ClientHelloError, ClientHelloParser, NotTLS
from shardtcp.identify.preamble import HTTP_METHODS, ConnectMethod, HttpHostMethod, LineMethod
from shardtcp.identify.types import (
    AnswerProtocol,
    IIdentifyMethod,
    Identified,
    IdentifyError,
)

__all__ = [
    "METHODS",
    "AnswerProtocol",
    "Detector",
    "IIdentifyMethod",
    "Identified",
    "IdentifyError",
    "SniMethod",
]


@implementer(IIdentifyMethod)
class SniMethod:
    """Identify by the SNI of a TLS ClientHello (bytes are not consumed)."""

    name = "sni"
    protocol = AnswerProtocol.TLS

    def __init__(self, max_size: int) -> None:
        self._parser = ClientHelloParser(max_size=max_size)

    def feed(self, data: bytes) -> Optional[Identified]:
        try:
            info = self._parser.feed(data)
        except ClientHelloError as e:
            protocol = AnswerProtocol.NONE if isinstance(e, NotTLS) else AnswerProtocol.TLS
            raise IdentifyError(getattr(e, "reason", "malformed"), str(e), protocol) from None
        if info is None:
            return None
        return Identified(
            method="sni",
            protocol=AnswerProtocol.TLS,
            name=info.server_name,
            alpn=tuple(info.alpn),
            tls=True,
        )


#: Every identification method by its name in a listener's identify list.
METHODS: Mapping[str, type] = MappingProxyType(
    {
        method.name: method
        for method in (SniMethod, ConnectMethod, LineMethod, HttpHostMethod)
    }
)

_TOKENS = [(b"CONNECT ", "connect"), (b"SHARD ", "line")] + [
    (method + b" ", "http-host") for method in HTTP_METHODS
]


#: The methods that read an HTTP request.
_HTTP_IDENTIFY = frozenset({"connect", "http-host"})


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
        # A port that speaks only HTTP answers anything else as HTTP does
        # (400), like HAProxy and Squid; elsewhere unknown bytes get a close.
        http_only = bool(self._allowed) and set(self._allowed) <= _HTTP_IDENTIFY
        self._undecided = AnswerProtocol.HTTP if http_only else AnswerProtocol.NONE

    @property
    def protocol(self) -> AnswerProtocol:
        """
        How to answer a refusal at this point (a peek timeout, an early
        close): the chosen method's protocol, ``NONE`` while undecided.
        """
        if self._method is not None:
            return self._method.protocol
        return self._undecided

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
                    self._undecided,
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
