"""
A reference shard: a small TCP (or TLS) server behind ``shardtcp.backend``.

It is what ``shardtcp demo`` and the end-to-end tests run as "a real shard".
Every connection must open with a PROXY v2 header carrying a PolicyContext
that ``backend.ShardVerifier`` accepts; only then does the application
protocol below see it, with the verified facts at hand.  What the
application does is chosen by a *behaviour*:

``hello``
    writes one line describing what it was told about the connection
    (:func:`hello_line`), then echoes every byte; when the client half-closes
    it writes ``BYE <bytes received> <sha256 hex of them>`` and closes.
``sink``
    reads and hashes everything without answering; on half-close writes
    ``SINK <bytes received> <sha256 hex>`` and closes (bulk upload tests).
``source:N``
    writes the hello line, then ``N`` bytes of :func:`pattern_bytes`
    through a producer (memory stays flat whatever ``N``), then closes
    (bulk download tests).
``die-after:N``
    like ``hello``, but aborts the connection once ``N`` bytes have been
    received: a shard dying mid-stream.
``http``
    reads one HTTP/1.x request head and answers ``200`` with the hello line
    as its body, then closes: what ``curl`` shows (the example's shards).

The stack of one connection is ``VerifyingProtocol`` (the PROXY header, in
clear) → optionally TLS → the behaviour's protocol.  Half-close is carried
through both layers: ``VerifyingProtocol`` relays ``readConnectionLost``
when the protocol above it provides ``IHalfCloseableProtocol``, and
:class:`HalfCloseTLSProtocol` turns a TLS ``close_notify`` into
``readConnectionLost`` (Twisted's own TLS layer answers a ``close_notify``
by closing the whole connection, which would lose the ``BYE`` reply).

Run one as a process with ``python -m shardtcp.example.shard --help``.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import sys
import tempfile
from collections import Counter
from typing import Any, Callable, NoReturn, Optional, Sequence

import attrs
from OpenSSL import SSL
from twisted.internet import defer, ssl
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IHandshakeListener,
    INegotiated,
    IProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from zope.interface import implementer

from shardtcp import backend
from shardtcp.registry.etcd import EtcdClient
from shardtcp.backend import RemoteKeySet, ShardVerifier, VerifiedConnection, VerifyingFactory
from shardtcp.policy import format_address
from shardtcp.tlslayer import HalfCloseTLSFactory, HalfCloseTLSProtocol  # noqa: F401 (re-exported)

__all__ = [
    "Behaviour",
    "HalfCloseTLSFactory",
    "HalfCloseTLSProtocol",
    "ShardFactory",
    "hello_line",
    "main",
    "parse_behaviour",
    "pattern_bytes",
    "pattern_sha256",
    "shard_factory",
]

log = Logger()

BEHAVIOURS = ("hello", "sink", "source:N", "die-after:N", "http")

# Longest request head the http behaviour reads before giving up.
_MAX_REQUEST_HEAD = 65536

# The download pattern is byte i = i % 251 (a prime, so the pattern does not
# line up with power-of-two buffer sizes and a misplaced chunk shows).  Chunks
# are a whole number of periods long, so every chunk but the last is _BLOCK.
_PERIOD = 251
_BLOCK = bytes(i % _PERIOD for i in range(_PERIOD * 256))


def pattern_bytes(length: int, offset: int = 0) -> bytes:
    """
    ``length`` bytes of the ``source:N`` pattern, starting ``offset`` bytes
    into it: byte ``i`` of the stream is ``i % 251``.
    """
    start = offset % _PERIOD
    out = bytearray()
    while len(out) < length:
        out += _BLOCK[start : start + length - len(out)]
        start = 0
    return bytes(out)


def pattern_sha256(length: int) -> str:
    """The SHA-256 (hex) of the first ``length`` bytes of the pattern, in flat memory."""
    digest = hashlib.sha256()
    remaining = length
    while remaining > 0:
        chunk = _BLOCK[: min(remaining, len(_BLOCK))]
        digest.update(chunk)
        remaining -= len(chunk)
    return digest.hexdigest()


@attrs.frozen
class Behaviour:
    """
    What the shard application does: ``kind`` is ``hello``, ``sink``,
    ``source`` or ``die-after``; ``count`` is the byte count of the last two.
    """

    kind: str
    count: Optional[int] = None

    def __str__(self) -> str:
        return self.kind if self.count is None else f"{self.kind}:{self.count}"


def parse_behaviour(text: str) -> Behaviour:
    """
    Parse a behaviour name (``hello``, ``sink``, ``http``, ``source:N``,
    ``die-after:N`` with ``N`` a non-negative integer); ``ValueError`` if it
    is none of them.
    """
    if text in ("hello", "sink", "http"):
        return Behaviour(text)
    kind, sep, count = text.partition(":")
    if sep and kind in ("source", "die-after") and count.isdigit():
        return Behaviour(kind, int(count))
    raise ValueError(f"unknown behaviour {text!r}: expected one of {', '.join(BEHAVIOURS)}")


def hello_line(shard_id: str, verified: VerifiedConnection) -> bytes:
    """
    The line a ``hello`` shard writes first, e.g.::

        SHARD api-fra-1 client=192.0.2.7:50123 service=api sni=api.example.test enc=tls amr=none acl=orders:read sub=-

    ``client`` is ``ip:port`` (``[ip]:port`` for IPv6); ``sni`` and ``sub``
    are ``-`` when absent; ``amr`` and ``acl`` are comma-joined (an empty
    ``acl`` leaves ``acl=`` empty).  A connection routed by shard key ends
    the line with ``shk=<key>``.
    """
    policy = verified.policy
    fields = [
        f"SHARD {shard_id}",
        f"client={format_address(verified.client)}",
        f"service={verified.service}",
        f"sni={verified.sni if verified.sni is not None else '-'}",
        f"enc={policy.encryption_level}",
        f"amr={','.join(policy.authentication_method)}",
        f"acl={','.join(policy.access_control_list)}",
        f"sub={verified.subject if verified.subject is not None else '-'}",
    ]
    if verified.shard_key is not None:
        fields.append(f"shk={verified.shard_key}")
    return (" ".join(fields) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------
# The application protocols


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class _ShardProtocol(Protocol):
    """
    What every behaviour shares: the verified facts, the count and SHA-256
    of every byte received, the bookkeeping in the factory's ``connections``
    and ``counts``, and half-close handling (subclasses say what to do).
    """

    def __init__(self, shard_id: str, connections: list, counts: Counter) -> None:
        self.shard_id = shard_id
        self._connections = connections
        self._counts = counts
        self.verified: Optional[VerifiedConnection] = None
        self.received = 0
        self._digest = hashlib.sha256()

    def connectionMade(self) -> None:
        self.verified = backend.verified_connection(self.transport)
        if self.verified is None:
            # Only reachable when the factory is used without VerifyingFactory.
            log.error("shard {shard}: connection without a verified header", shard=self.shard_id)
            self.transport.abortConnection()
            return
        self._connections.append(self.verified)
        self._counts["connections"] += 1
        log.info(
            "shard {shard} accepted {connection_id} from {client} for {service}",
            shard=self.shard_id,
            connection_id=self.verified.connection_id,
            client=format_address(self.verified.client),
            service=self.verified.service,
        )
        if INegotiated.providedBy(self.transport):
            # Behind TLS: speak once the handshake is done, so that a
            # behaviour closing at once (source:0) does not cut it short.
            self._tls_pending = True
            return
        self.started()

    _tls_pending = False

    def handshakeCompleted(self) -> None:
        if self._tls_pending:
            self._tls_pending = False
            self.started()

    def _write(self, data: bytes) -> None:
        self._counts["bytes_sent"] += len(data)
        self.transport.write(data)

    def _close_with(self, line: bytes) -> None:
        self._write(line)
        self.transport.loseConnection()

    def _summary(self) -> str:
        return f"{self.received} {self._digest.hexdigest()}"

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self._counts["bytes_received"] += len(data)
        self._digest.update(data)
        self.received_data(data)

    def readConnectionLost(self) -> None:
        self._counts["half_closed"] += 1
        self.end_of_input()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.verified is not None:
            self._counts["closed"] += 1
            log.info(
                "shard {shard}: {connection_id} closed after {received} bytes",
                shard=self.shard_id,
                connection_id=self.verified.connection_id,
                received=self.received,
            )
        self.stopped()

    # What subclasses fill in.

    def started(self) -> None:
        """The connection is verified and counted."""

    def received_data(self, data: bytes) -> None:
        """``data`` arrived (already counted and hashed)."""

    def end_of_input(self) -> None:
        """The client half-closed: it will send nothing more."""
        self.transport.loseConnection()

    def stopped(self) -> None:
        """The connection is gone."""


class HelloProtocol(_ShardProtocol):
    """``hello``: a line about the connection, an echo, and ``BYE`` on half-close."""

    def started(self) -> None:
        assert self.verified is not None
        self._write(hello_line(self.shard_id, self.verified))

    def received_data(self, data: bytes) -> None:
        # No flow control: echo is for functional tests with clients that
        # read; bulk transfers use sink and source.
        self._write(data)

    def end_of_input(self) -> None:
        self._close_with(f"BYE {self._summary()}\n".encode("ascii"))


class SinkProtocol(_ShardProtocol):
    """``sink``: silent reading, then ``SINK`` on half-close."""

    def end_of_input(self) -> None:
        self._close_with(f"SINK {self._summary()}\n".encode("ascii"))


class DyingProtocol(HelloProtocol):
    """``die-after:N``: ``hello`` until ``N`` bytes have arrived, then an abort."""

    def __init__(self, shard_id: str, connections: list, counts: Counter, limit: int) -> None:
        super().__init__(shard_id, connections, counts)
        self._limit = limit
        self._dead = False

    def started(self) -> None:
        super().started()
        if self._limit == 0:
            self._die()

    def received_data(self, data: bytes) -> None:
        if self._dead:
            return
        before = self.received - len(data)
        # Echo what arrived before the limit, then go.
        super().received_data(data[: max(0, self._limit - before)])
        if self.received >= self._limit:
            self._die()

    def end_of_input(self) -> None:
        if not self._dead:
            super().end_of_input()

    def _die(self) -> None:
        self._dead = True
        self._counts["aborted"] += 1
        log.info("shard {shard}: dying as asked", shard=self.shard_id)
        self.transport.abortConnection()


class HTTPProtocol(_ShardProtocol):
    """
    ``http``: one request, answered ``200 OK`` with the hello line as a
    ``text/plain`` body, then a close (``Connection: close``).  A head
    longer than 64 KiB, or input ending before the head does, is answered
    by a close.
    """

    _head = b""
    _answered = False

    def received_data(self, data: bytes) -> None:
        if self._answered:
            return
        self._head += data
        if b"\r\n\r\n" in self._head or b"\n\n" in self._head:
            self._answered = True
            assert self.verified is not None
            body = hello_line(self.shard_id, self.verified)
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode("ascii")
            self._close_with(head + body)
        elif len(self._head) > _MAX_REQUEST_HEAD:
            self._answered = True
            self.transport.loseConnection()


@implementer(IPushProducer)
class SourceProtocol(_ShardProtocol):
    """
    ``source:N``: the hello line, then ``N`` pattern bytes, then a close.

    It is its own streaming producer: it writes while the transport lets it
    and stops when paused, so a slow reader costs no memory here.  Input is
    counted and dropped; a half-close changes nothing (the client may well
    have nothing to send).
    """

    def __init__(self, shard_id: str, connections: list, counts: Counter, length: int) -> None:
        super().__init__(shard_id, connections, counts)
        self._remaining = length
        self._paused = False
        self._producing = False
        self._stopped = False

    def started(self) -> None:
        assert self.verified is not None
        self._write(hello_line(self.shard_id, self.verified))
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def end_of_input(self) -> None:
        pass

    def stopped(self) -> None:
        self._stopped = True

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._producing:
            # Resumed from inside our own write: the loop below carries on.
            return
        self._producing = True
        try:
            while not self._paused and not self._stopped and self._remaining > 0:
                chunk = _BLOCK[: min(self._remaining, len(_BLOCK))]
                self._remaining -= len(chunk)
                self._write(chunk)
        finally:
            self._producing = False
        if self._remaining == 0 and not self._stopped:
            self._stopped = True
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self._stopped = True


@implementer(IHandshakeListener)
class _HandshakeThenClose(Protocol):
    """What a TLS shard runs for a health check: the handshake, then a close."""

    @classmethod
    def factory(cls) -> Factory:
        factory = Factory.forProtocol(cls)
        factory.noisy = False
        return factory

    def handshakeCompleted(self) -> None:
        self.transport.loseConnection()


class _ShardApplicationFactory(Factory):
    """Builds the behaviour's protocol for each verified connection."""

    def __init__(
        self, shard_id: str, behaviour: Behaviour, connections: list, counts: Counter
    ) -> None:
        self._shard_id = shard_id
        self._behaviour = behaviour
        self._connections = connections
        self._counts = counts

    noisy = False

    def logPrefix(self) -> str:
        return f"shard {self._shard_id}"

    def buildProtocol(self, addr: IAddress) -> IProtocol:
        b = self._behaviour
        args = (self._shard_id, self._connections, self._counts)
        if b.kind == "hello":
            return HelloProtocol(*args)
        if b.kind == "sink":
            return SinkProtocol(*args)
        if b.kind == "http":
            return HTTPProtocol(*args)
        if b.kind == "source":
            assert b.count is not None
            return SourceProtocol(*args, b.count)
        assert b.kind == "die-after" and b.count is not None
        return DyingProtocol(*args, b.count)


class ShardFactory(VerifyingFactory):
    """
    The factory of a reference shard: a ``VerifyingFactory`` over
    (optionally) half-closeable TLS over the behaviour's protocol.

    Besides the ``stats`` of ``VerifyingFactory`` (accepted, and refused by
    reason), it keeps for tests to assert on: ``connections``, the
    ``VerifiedConnection`` of every connection the application saw, in
    order; and ``counts``, a ``Counter`` of ``connections``, ``closed``,
    ``half_closed``, ``aborted``, ``bytes_received`` and ``bytes_sent``
    (application bytes, before TLS).
    """

    noisy = False

    def __init__(
        self,
        shard_id: str,
        verifier: ShardVerifier,
        *,
        tls: Any = None,
        reactor: Any = None,
        behaviour: str = "hello",
        timeout: Optional[float] = 5.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.shard_id = shard_id
        self.behaviour = parse_behaviour(behaviour)
        self.connections: list[VerifiedConnection] = []
        self.counts: Counter[str] = Counter()
        application: Factory = _ShardApplicationFactory(
            shard_id, self.behaviour, self.connections, self.counts
        )
        local_factory = None
        if tls is not None:
            application = HalfCloseTLSFactory(tls, False, application, clock=reactor)
            # Health checks of kind "tls" handshake after their LOCAL header.
            local_factory = HalfCloseTLSFactory(tls, False, _HandshakeThenClose.factory(), clock=reactor)
        super().__init__(application, verifier, timeout=timeout, reactor=reactor, local_factory=local_factory)

    @property
    def active(self) -> int:
        """How many verified connections are open now."""
        return self.counts["connections"] - self.counts["closed"]


def shard_factory(
    shard_id: str,
    verifier: ShardVerifier,
    *,
    tls: Any = None,
    reactor: Any = None,
    behaviour: str = "hello",
) -> ShardFactory:
    """
    A reference shard's factory, ready for ``endpoint.listen``.

    ``tls`` is an ``IOpenSSLServerConnectionCreator`` (such as
    ``CertificateOptions``) to speak TLS after the PROXY header, or ``None``
    for plain TCP; ``reactor`` supplies the clock of the header timeout and
    of TLS write batching; ``behaviour`` is one of ``hello``, ``sink``,
    ``source:N`` and ``die-after:N``.
    """
    return ShardFactory(shard_id, verifier, tls=tls, reactor=reactor, behaviour=behaviour)


# ---------------------------------------------------------------------------
# Running one as a process


class _ShardTLSOptions(ssl.CertificateOptions):
    """
    ``CertificateOptions`` that declines ALPN properly.

    Twisted's ALPN selection callback answers an empty protocol name when
    the client offers protocols the server does not list (or the server
    lists none), which OpenSSL turns into a fatal ``internal_error`` alert:
    every client offering ALPN (curl offers ``h2,http/1.1``) is refused.
    Without ALPN protocols of its own, a server must simply not negotiate.
    """

    _alpn_fixed = None

    def getContext(self):
        context = super().getContext()
        # The context is made once and reused; OpenSSL refuses a new
        # callback on a context that has made connections.
        if context is not self._alpn_fixed:
            if not self._acceptableProtocols:
                context.set_alpn_select_callback(lambda connection, offered: SSL.NO_OVERLAPPING_PROTOCOLS)
            self._alpn_fixed = context
        return context


def tls_options(cert: str, key: str, client_ca: Optional[str] = None) -> ssl.CertificateOptions:
    """
    Server TLS options for a shard from PEM files, asking for (and
    requiring) client certificates signed by ``client_ca`` when given.
    """
    with open(cert, "rb") as f:
        cert_pem = f.read()
    with open(key, "rb") as f:
        key_pem = f.read()
    private = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    kwargs = {}
    if client_ca is not None:
        with open(client_ca, "rb") as f:
            authority = ssl.Certificate.loadPEM(f.read())
        kwargs = {"verify": True, "caCerts": [authority.original], "requireCertificate": True}
    return _ShardTLSOptions(privateKey=private.privateKey.original, certificate=private.original, **kwargs)


_tls_options = tls_options


def _write_port_file(path: str, port: int) -> None:
    """Write ``port`` to ``path`` atomically, so a reader never sees half of it."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".port-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{port}\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def owned_keys(globs: Optional[Sequence[str]]) -> Optional[Callable[[str], bool]]:
    """
    The ``owns_key`` predicate of ``--owns-key`` globs (``fnmatch``, case
    sensitive): a key is owned when any glob matches it.  None without globs.
    """
    if not globs:
        return None
    patterns = tuple(globs)
    return lambda key: any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shardtcp.example.shard",
        description="Run a reference shard that accepts only connections shardtcp vouches for.",
    )
    parser.add_argument("--id", required=True, help="this shard's id (the tokens' aud)")
    parser.add_argument(
        "--listen",
        default="tcp:0:interface=127.0.0.1",
        help="server endpoint string (default: %(default)s)",
    )
    trusted = parser.add_mutually_exclusive_group(required=True)
    trusted.add_argument("--jwks", help="JWKS file of the trusted policy-signing keys")
    trusted.add_argument(
        "--jwks-url",
        help="http(s) URL of the trusted keys' JWKS (the proxy's /.well-known/jwks.json), "
        "fetched at start, every 5 minutes, and on an unknown kid at most every 30 s",
    )
    parser.add_argument("--jwks-ca", help="with an https --jwks-url: the CA (PEM) to verify it with")
    parser.add_argument("--cert", help="TLS certificate (PEM); with --key, speak TLS after the header")
    parser.add_argument("--key", help="TLS private key (PEM)")
    parser.add_argument("--client-ca", help="with --cert: require a client certificate from this CA")
    parser.add_argument(
        "--behaviour",
        default="hello",
        help="hello | sink | http | source:N | die-after:N (default: %(default)s)",
    )
    parser.add_argument(
        "--tlv-type",
        default="0xE0",
        help="type of the PolicyContext TLV, 0xE0..0xEF (default: %(default)s)",
    )
    parser.add_argument("--port-file", help="write the bound port number here once listening")
    parser.add_argument(
        "--owns-key",
        action="append",
        metavar="GLOB",
        help="own only shard keys matching this glob (repeatable); others are refused "
        "as foreign_key, connections without a key as no_shard_key",
    )
    parser.add_argument(
        "--register",
        metavar="URL[,URL]",
        help="register this shard in etcd (these client URLs) while it runs, "
        "under <prefix>/shards/<service>/<id>; needs --service",
    )
    parser.add_argument("--service", help="with --register: the service this shard belongs to")
    parser.add_argument("--prefix", default="/shardtcp", help="with --register: the registry prefix")
    parser.add_argument(
        "--advertise", help="with --register: HOST:PORT the proxies connect to (default 127.0.0.1:<bound port>)"
    )
    parser.add_argument("--ttl", type=int, default=10, help="with --register: the lease TTL in seconds")
    return parser


def _build(parser: argparse.ArgumentParser, options: argparse.Namespace) -> tuple[ShardFactory, Any]:
    """Turn parsed options into a factory; exits through ``parser.error`` on bad input."""
    from twisted.internet import reactor

    if (options.cert is None) != (options.key is None):
        parser.error("--cert and --key go together")
    if options.client_ca is not None and options.cert is None:
        parser.error("--client-ca needs --cert and --key")
    if options.register and not options.service:
        parser.error("--register needs --service")
    if options.register and not 2 <= options.ttl <= 3600:
        parser.error("--ttl must be 2..3600 seconds")
    try:
        parse_behaviour(options.behaviour)
        tlv_type = int(options.tlv_type, 0)
        owns_key = owned_keys(options.owns_key)
        if options.jwks_url is not None:
            # The factory starts fetching when it starts listening.
            key_set = RemoteKeySet(options.jwks_url, reactor=reactor, ca=options.jwks_ca)
            verifier = ShardVerifier(options.id, key_set, tlv_type=tlv_type, owns_key=owns_key)
        else:
            if options.jwks_ca is not None:
                parser.error("--jwks-ca goes with --jwks-url")
            verifier = ShardVerifier.from_jwks(
                options.id, options.jwks, tlv_type=tlv_type, owns_key=owns_key
            )
        tls = (
            _tls_options(options.cert, options.key, options.client_ca)
            if options.cert is not None
            else None
        )
    except (OSError, ValueError) as e:
        parser.error(str(e))
    except Exception as e:  # pyOpenSSL's errors for unreadable PEM
        parser.error(f"{type(e).__name__}: {e}")
    factory = shard_factory(
        options.id, verifier, tls=tls, reactor=reactor, behaviour=options.behaviour
    )
    return factory, reactor


async def _serve(reactor: Any, factory: ShardFactory, options: argparse.Namespace) -> None:
    """Listen, announce the port, and run until the reactor stops."""
    port = await serverFromString(reactor, options.listen).listen(factory)
    address = port.getHost()
    reactor.addSystemEventTrigger("before", "shutdown", port.stopListening)
    log.info(
        "shard {shard} listening on {address} ({behaviour}, {tls})",
        shard=options.id,
        address=f"{address.host}:{address.port}",
        behaviour=options.behaviour,
        tls="TLS" if options.cert else "plain",
    )
    if options.port_file:
        _write_port_file(options.port_file, address.port)
    if options.register:
        registration = backend.Registration(
            EtcdClient(reactor, [u.strip() for u in options.register.split(",") if u.strip()]),
            prefix=options.prefix,
            service=options.service,
            shard_id=options.id,
            record={"address": options.advertise or f"127.0.0.1:{address.port}"},
            ttl=options.ttl,
            clock=reactor,
        )
        registration.startService()
        # Revoked on the way out: the proxies drop this shard at once.
        reactor.addSystemEventTrigger("before", "shutdown", registration.stopService)
    # Run until SIGTERM/SIGINT stops the reactor; react then exits with 0.
    await defer.Deferred()


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """
    Run one reference shard until SIGTERM or SIGINT (exit status 0), logging
    to stderr.  Bad arguments exit with status 2; a listen failure with 1.
    """
    from twisted.internet.task import react

    parser = _parser()
    options = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stderr)], redirectStandardIO=False
    )
    factory, reactor = _build(parser, options)
    react(lambda r: defer.ensureDeferred(_serve(r, factory, options)), (), reactor)
    raise AssertionError("react returned")  # pragma: no cover


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy, so that log
    # namespaces and classes are the same as when the module is imported.
    from shardtcp.example.shard import main as _main

    _main()
