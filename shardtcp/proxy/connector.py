# -*- test-case-name: tests.proxy.test_connector -*-
"""
Connecting to shards.

``ShardConnector`` (an ``IShardConnector``) turns a ``ShardInfo`` into a connected protocol,
bounded by a connect timeout.  IP literals go straight to ``connectTCP``
with a small ``ClientFactory`` when the protocol says when it is connected
(``ConnectedNotice``), else through ``TCP4ClientEndpoint``/``TCP6ClientEndpoint``;
host names through ``HostnameEndpoint`` (which resolves without blocking and
races address families).  How a shard is reached (plain TCP today, TLS origination for
``upstream_tls`` services) is decided here and nowhere else; ``InOrder``
tries a connection's candidates one after the other until one answers.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Optional, Sequence

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionRefusedError,
    NoProtocol,
    TimeoutError as TxTimeoutError,
)
from twisted.internet.interfaces import IStreamClientEndpoint
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
    ``ShardConnector`` then connects it with ``connectTCP`` and a small
    ``ClientFactory`` instead of an endpoint, whose wrapping protocol would
    stand between the transport and the protocol for every event.
    """

    _connected_notice: Optional[Callable[[object], None]] = None

    def announce_connected(self) -> None:
        notice = self._connected_notice
        if notice is not None:
            self._connected_notice = None
            notice(self)


class _DirectFactory(ClientFactory):
    """
    One attempt's factory on the direct path: builds the protocol of
    ``factory``, fires ``deferred`` with it once it is connected (its
    ``announce_connected``) or fails it as the endpoint's would (the
    connector's failure; ``ConnectingCancelledError`` on cancel).
    """

    noisy = False

    def __init__(self, factory) -> None:
        self._factory = factory
        self._connector = None
        self.deferred: defer.Deferred = defer.Deferred(self._cancel)

    def startedConnecting(self, connector) -> None:
        self._connector = connector

    def _cancel(self, deferred: defer.Deferred) -> None:
        connector = self._connector
        deferred.errback(ConnectingCancelledError(connector.getDestination()))
        connector.stopConnecting()

    def buildProtocol(self, addr):
        try:
            protocol = self._factory.buildProtocol(addr)
            if protocol is None:
                raise NoProtocol()
        except BaseException:
            self.deferred.errback()
            return None
        protocol._connected_notice = self.deferred.callback
        return protocol

    def clientConnectionFailed(self, connector, reason) -> None:
        if not self.deferred.called:
            self.deferred.errback(reason)


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
            address = shard.address
            literal = self._literal.get(address.host)
            if literal is None:
                if len(self._literal) >= ENDPOINT_CACHE_SIZE:
                    self._literal.clear()
                literal = self._literal[address.host] = _is_literal(address.host)
            if literal:
                direct = _DirectFactory(factory)
                try:
                    self._reactor.connectTCP(address.host, address.port, direct, timeout=timeout)
                except BaseException:
                    return defer.fail().addErrback(_classify)
                return direct.deferred.addErrback(_classify)
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
