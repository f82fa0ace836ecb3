# -*- test-case-name: tests.proxy.test_connector -*-
"""
Connecting to shards.

``ShardConnector`` (an ``IShardConnector``) turns a ``ShardInfo`` into a connected protocol,
bounded by a connect timeout.  IP literals, when the protocol says when it
is connected (``ConnectedNotice``), are connected directly: on a real
reactor by a non-blocking connect of the connector's own (``_Connecting``),
on another (tests' in-memory reactors) by ``connectTCP`` with a small
``ClientFactory``; else through ``TCP4ClientEndpoint``/``TCP6ClientEndpoint``;
host names through ``HostnameEndpoint`` (which resolves without blocking and
races address families).  How a shard is reached (plain TCP today, TLS origination for
``upstream_tls`` services) is decided here and nowhere else; ``InOrder``
tries a connection's candidates one after the other until one answers.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Callable, Optional, Sequence

from twisted.internet import defer, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionRefusedError,
    NoProtocol,
    TimeoutError as TxTimeoutError,
)
from twisted.internet.error import getConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from shardtcp.model import ShardInfo
from shardtcp.net import ip_literal
from shardtcp.upstream import endpoint_for_address


class ShardConnectFailed(Exception):
    """A connection attempt to a shard failed; ``reason`` is a metrics slug."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProxyConnectFailed(ShardConnectFailed):
    """
    A connection attempt failed because of the proxy itself (out of file
    descriptors, buffers, memory or local ports), not because of the shard:
    it must not count against the shard.  ``kind`` is a metrics label.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__("proxy_" + kind, message)
        self.kind = kind


#: How many shard addresses' endpoints a connector keeps (all of them
#: are forgotten when it is full: they are cheap to build again).
ENDPOINT_CACHE_SIZE = 4096

#: errno of a local failure -> the ``ProxyConnectFailed`` kind.
PROXY_ERRNOS = {
    errno.EMFILE: "fds",
    errno.ENFILE: "fds",
    errno.ENOBUFS: "memory",
    errno.ENOMEM: "memory",
    errno.EADDRNOTAVAIL: "ports",
}


def proxy_errno(value: BaseException) -> Optional[int]:
    """The errno of ``value`` when it is one of the proxy's own failures."""
    number = getattr(value, "osError", None)  # Twisted's ConnectError
    if number is None and isinstance(value, OSError):
        number = value.errno
    return number if number in PROXY_ERRNOS else None


class IShardConnector(Interface):
    """How the connection path reaches a shard."""

    def connect(shard, factory, timeout):
        """
        Connect ``factory`` to ``shard`` (a ``ShardInfo``); a Deferred that
        fires with the connected protocol or fails with
        ``ShardConnectFailed``, within ``timeout`` seconds.
        """


class ConnectedNotice:
    """
    A protocol that tells its connector when it is connected: its
    ``connectionMade`` calls ``announce_connected()`` (after its own set-up).
    ``ShardConnector`` then connects it directly (``DirectAttempt``) instead
    of through an endpoint, whose wrapping protocol would stand between the
    transport and the protocol for every event.
    """

    _connected_notice: Optional[Callable[[object], None]] = None

    def announce_connected(self) -> None:
        notice = self._connected_notice
        if notice is not None:
            self._connected_notice = None
            notice(self)


class DirectAttempt(ClientFactory):
    """
    One attempt on the direct path that reports without a Deferred:
    ``succeeded(protocol)`` once the protocol announced it is connected, or
    ``failed(failure)`` with the failure ``ShardConnector.connect``'s
    Deferred would carry (classified, a ``ShardConnectFailed``), once.
    ``cancel()`` fails it at once as cancelling that Deferred would.
    """

    noisy = False

    def __init__(self, factory, succeeded: Callable[[object], None], failed: Callable[[Failure], None]) -> None:
        self._factory = factory
        self._succeeded = succeeded
        self._failed = failed
        self._connector = None
        self.settled = False

    def startedConnecting(self, connector) -> None:
        self._connector = connector

    def cancel(self) -> None:
        """Give up on the attempt (no-op once it has reported)."""
        if self.settled:
            return
        connector = self._connector
        self.fail(Failure(ConnectingCancelledError(connector.getDestination())))
        connector.stopConnecting()

    def buildProtocol(self, addr):
        try:
            protocol = self._factory.buildProtocol(addr)
            if protocol is None:
                raise NoProtocol()
        except BaseException:
            self.fail(Failure())
            return None
        protocol._connected_notice = self._connected
        return protocol

    def _connected(self, protocol) -> None:
        if not self.settled:
            self.settled = True
            self._succeeded(protocol)

    def clientConnectionFailed(self, connector, reason) -> None:
        if not self.settled:
            self.fail(reason)

    def fail(self, failure: Failure) -> None:
        """Report ``failure``, classified, unless the attempt already reported."""
        if self.settled:
            return
        self.settled = True
        try:
            failure = _classify(failure)
        except BaseException:
            failure = Failure()
        self._failed(failure)


_STILL_CONNECTING = (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN)


class _Connecting:
    """
    A non-blocking connect to an IP literal, for a ``DirectAttempt``: the
    socket is the reactor's writer until the connect completes, then it
    becomes a Twisted TCP transport of the attempt's protocol.

    ``connectTCP`` does the same through a connector, a client transport
    that first waits a reactor turn before connecting, a second timer and
    the factory's start and stop: on a proxy that opens a connection to a
    shard for every client, that is about a twentieth of a connection's
    cost.  The transport is a ``tcp.Server`` (the class Twisted itself
    wraps an adopted connected socket in), which serves a protocol exactly
    as a client transport does; its peer is the shard.  Failures are those
    ``connectTCP`` reports (``ConnectError`` and its kinds, with the
    errno), so ``_classify`` tells the proxy's own (no descriptors, no
    ports) from the shard's.  ``getDestination`` and ``stopConnecting``
    are what ``DirectAttempt.cancel`` asks of its connector.
    """

    __slots__ = ("_reactor", "_sock", "_attempt", "_peer", "_timer")

    def __init__(self, reactor, attempt: "DirectAttempt", host: str, port: int, timeout: float) -> None:
        self._reactor = reactor
        self._attempt = attempt
        self._timer = None
        six = ":" in host
        self._peer = (host, port, 0, 0) if six else (host, port)
        try:
            sock = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            self._sock = None
            attempt.fail(_connect_failure(e.errno or 0))
            return
        self._sock = sock
        sock.setblocking(False)
        attempt.startedConnecting(self)
        failed = sock.connect_ex(self._peer)
        if failed not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._close()
            attempt.fail(_connect_failure(failed))
            return
        reactor.addWriter(self)
        self._timer = reactor.callLater(timeout, self._timed_out)

    # -- what the reactor asks of a writer

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def logPrefix(self) -> str:
        return "shard-connect"

    def doRead(self) -> None:
        # Only a stale event (a descriptor number closed and reused within
        # one wake-up) reaches a writer as a read: nothing to do.
        return None

    def doWrite(self) -> None:
        sock = self._sock
        if sock is None:
            return
        failed = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not failed:
            # Writable says the connect is over; a second connect says how
            # (as Twisted's own client does): a stale event finds it still
            # in progress, and the wait goes on.
            failed = sock.connect_ex(self._peer)
            if failed in _STILL_CONNECTING:
                return
            if failed == errno.EISCONN:
                failed = 0
        self._stop()
        if failed:
            self._close()
            self._attempt.fail(_connect_failure(failed))
            return
        self._sock = None
        peer = self._peer
        attempt = self._attempt
        protocol = attempt.buildProtocol(self.getDestination())
        if protocol is None:
            # The attempt has reported why.
            sock.close()
            return
        transport = tcp.Server(sock, protocol, peer, None, 0, self._reactor)
        transport.repstr = f"<{protocol.__class__.__name__} to {peer[0]}:{peer[1]}>"
        protocol.makeConnection(transport)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor dropped the writer: a refused or reset connect
        # (epoll's error and hang-up), or the reactor shutting down.
        sock = self._sock
        if sock is None:
            return
        self._stop(reactor_removed=True)
        failed = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._close()
        self._attempt.fail(_connect_failure(failed) if failed else reason)

    # -- what DirectAttempt asks of its connector

    def getDestination(self):
        host, port = self._peer[0], self._peer[1]
        return IPv6Address("TCP", host, port) if len(self._peer) == 4 else IPv4Address("TCP", host, port)

    def stopConnecting(self) -> None:
        if self._sock is not None:
            self._stop()
            self._close()

    # -- inside

    def _timed_out(self) -> None:
        self._timer = None
        if self._sock is None:
            return
        self._stop()
        self._close()
        self._attempt.fail(Failure(TxTimeoutError(self._peer[0], self._peer[1])))

    def _stop(self, reactor_removed: bool = False) -> None:
        if not reactor_removed:
            self._reactor.removeWriter(self)
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _connect_failure(number: int) -> Failure:
    """The failure ``connectTCP`` reports for a connect that failed with ``number`` (an errno)."""
    return Failure(getConnectError((number, os.strerror(number))))


@implementer(IShardConnector)
class ShardConnector:
    """
    Open connections to shards.

    ``endpoint_factory(shard, timeout)`` may be given to decide how a shard is
    reached (tests use it to connect in memory; TLS origination wraps the
    plain endpoint).
    """

    def __init__(
        self,
        reactor,
        *,
        endpoint_factory: Optional[Callable[[ShardInfo, float], IStreamClientEndpoint]] = None,
    ) -> None:
        self._reactor = reactor
        self._endpoint_factory = endpoint_factory or self._plain_endpoint
        self._plain = endpoint_factory is None
        # A real posix reactor: shards at IP literals are connected by
        # ``_Connecting``; in-memory reactors (tests) record ``connectTCP``.
        self._raw = isinstance(reactor, PosixReactorBase)
        # (host, port, timeout) -> its plain endpoint: an endpoint holds no
        # state of a connection, so one per shard address serves them all.
        self._endpoints: dict = {}
        # host -> whether it is an IP literal (the direct path's condition)
        self._literal: dict = {}

    def _plain_endpoint(self, shard: ShardInfo, timeout: float) -> IStreamClientEndpoint:
        key = (shard.address.host, shard.address.port, timeout)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= ENDPOINT_CACHE_SIZE:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = endpoint_for_address(self._reactor, *key)
        return endpoint

    def start_direct(
        self,
        shard: ShardInfo,
        factory,
        timeout: float,
        succeeded: Callable[[object], None],
        failed: Callable[[Failure], None],
    ) -> Optional[DirectAttempt]:
        """
        ``connect`` without a Deferred, where it would take the direct path
        (a ``ConnectedNotice`` protocol, a shard at an IP literal, plain
        endpoints): the ``DirectAttempt`` reporting to ``succeeded`` or
        ``failed`` (perhaps before this returns); None elsewhere, and the
        caller uses ``connect``.
        """
        if not (self._plain and _announces(factory)):
            return None
        address = shard.address
        literal = self._literal.get(address.host)
        if literal is None:
            if len(self._literal) >= ENDPOINT_CACHE_SIZE:
                self._literal.clear()
            literal = self._literal[address.host] = _is_literal(address.host)
        if not literal:
            return None
        attempt = DirectAttempt(factory, succeeded, failed)
        try:
            if self._raw:
                _Connecting(self._reactor, attempt, address.host, address.port, timeout)
            else:
                self._reactor.connectTCP(address.host, address.port, attempt, timeout=timeout)
        except BaseException:
            attempt.fail(Failure())
        return attempt

    def connect(self, shard: ShardInfo, factory, timeout: float) -> defer.Deferred:
        """
        Connect ``factory`` to ``shard``; fire with the connected protocol,
        or fail with ``ShardConnectFailed`` (refused, timed out, ...).
        The attempt is cancelled after ``timeout`` seconds whatever the
        endpoint does.
        """
        if self._plain and _announces(factory):
            # The direct path, as ``start_direct``, behind a Deferred whose
            # cancellation cancels the attempt.
            attempt = None
            d = defer.Deferred(lambda _: attempt.cancel() if attempt is not None else None)
            attempt = self.start_direct(shard, factory, timeout, d.callback, d.errback)
            if attempt is not None:
                return d
        endpoint = self._endpoint_factory(shard, timeout)
        d = endpoint.connect(factory)
        if not (self._plain and type(endpoint) in _SELF_TIMED):
            d.addTimeout(timeout, self._reactor)
        d.addErrback(_classify)
        return d


def _is_literal(host: str) -> bool:
    try:
        ip_literal(host)
    except ValueError:
        return False
    return True


def _announces(factory) -> bool:
    """Whether ``factory`` builds ``ConnectedNotice`` protocols (``Factory.forProtocol``)."""
    kind = getattr(factory, "protocol", None)
    return isinstance(kind, type) and issubclass(kind, ConnectedNotice)


# Plain TCP endpoints hand their timeout to ``connectTCP``, whose own timer
# fails the attempt with TimeoutError: a second timer would be redundant.
_SELF_TIMED = (TCP4ClientEndpoint, TCP6ClientEndpoint)


def _classify(failure):
    if failure.check(ShardConnectFailed):
        return failure
    number = proxy_errno(failure.value)
    if number is not None:
        raise ProxyConnectFailed(PROXY_ERRNOS[number], f"the proxy's own socket failed: {os.strerror(number)}")
    if failure.check(ConnectionRefusedError):
        raise ShardConnectFailed("refused", "connection refused")
    if failure.check(defer.TimeoutError, TxTimeoutError, defer.CancelledError):
        raise ShardConnectFailed("timeout", "connect timed out")
    if failure.check(ConnectError):
        raise ShardConnectFailed("connect_error", failure.getErrorMessage() or "connect error")
    # TLS verification failures and the like are classified by their origin.
    name = getattr(failure.type, "__name__", "error")
    raise ShardConnectFailed("error", f"{name}: {failure.getErrorMessage()}")


class InOrder:
    """
    Try a connection's candidates in order, one attempt at a time.

    ``attempt(candidate)`` starts one attempt and returns a Deferred that
    fires with the connected result or fails (with ``ShardConnectFailed``,
    ideally).  After a failure ``failed(candidate, failure)`` is told; when
    it returns True the next candidate is tried, and when none is left
    ``exhausted(candidates)`` is called.  The first success goes to
    ``succeeded(candidate, result)``.  ``cancel()`` cancels the attempt in
    progress (its failure is still reported to ``failed``, which decides
    whether to go on).  No Deferred of its own: one per attempt is enough.

    An attempt may also return an object with ``cancel()`` (a
    ``DirectAttempt``) instead of a Deferred and report itself, with
    ``won(candidate, result)`` or ``lost(candidate, failure)``, or hand
    over to a Deferred with ``follow(candidate, d)``.
    """

    __slots__ = ("_candidates", "_attempt", "_succeeded", "_failed", "_exhausted", "_pending", "_index", "_reports")

    def __init__(
        self,
        candidates: Sequence,
        attempt: Callable[[object], defer.Deferred],
        *,
        succeeded: Callable[[object, object], None],
        failed: Callable[[object, Failure], bool],
        exhausted: Callable[[Sequence], None],
    ) -> None:
        self._candidates = candidates
        self._attempt = attempt
        self._succeeded = succeeded
        self._failed = failed
        self._exhausted = exhausted
        self._pending = None
        self._index = 0
        # attempts reported so far (``won``/``lost``)
        self._reports = 0

    def start(self) -> None:
        """Begin with the first candidate."""
        self._next()

    def cancel(self) -> None:
        """Cancel the attempt in progress, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    @property
    def remaining(self) -> int:
        """How many candidates are left after the one being tried."""
        return len(self._candidates) - self._index - 1

    def advance(self) -> None:
        """
        Give up on the candidate that succeeded (its shard closed without
        answering) and try the next, or report ``exhausted``.
        """
        self._index += 1
        if self._index < len(self._candidates):
            self._next()
        else:
            self._exhausted(self._candidates)

    def _next(self) -> None:
        candidate = self._candidates[self._index]
        reports = self._reports
        d = self._attempt(candidate)
        if isinstance(d, defer.Deferred):
            self.follow(candidate, d)
        elif self._reports == reports:
            # A direct attempt (anything with ``cancel()``): it reports
            # through ``won``/``lost`` itself, unless it already has.
            self._pending = d

    def follow(self, candidate, d: defer.Deferred) -> None:
        """The attempt at ``candidate`` goes on as ``d``: its result is the attempt's."""
        self._pending = d
        d.addCallbacks(self._won, self._lost, callbackArgs=(candidate,), errbackArgs=(candidate,))

    def won(self, candidate, result) -> None:
        """A direct attempt at ``candidate`` succeeded with ``result``."""
        self._won(result, candidate)

    def lost(self, candidate, failure: Failure) -> None:
        """A direct attempt at ``candidate`` failed with ``failure``."""
        self._lost(failure, candidate)

    def _won(self, result, candidate) -> None:
        self._pending = None
        self._reports += 1
        self._succeeded(candidate, result)

    def _lost(self, failure: Failure, candidate) -> None:
        self._pending = None
        self._reports += 1
        if not self._failed(candidate, failure):
            return
        self._index += 1
        if self._index < len(self._candidates):
            self._next()
        else:
            self._exhausted(self._candidates)
