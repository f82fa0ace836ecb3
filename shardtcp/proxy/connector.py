"""
Connecting to shards.

``ShardConnector`` turns a ``ShardInfo`` into a connected protocol through a
Twisted client endpoint, bounded by a connect timeout.  IP literals go
through ``TCP4ClientEndpoint``/``TCP6ClientEndpoint``; host names through
``HostnameEndpoint`` (which resolves without blocking and races address
families).  How a shard is reached (plain TCP today, TLS origination for
``upstream_tls`` services) is decided here and nowhere else.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionRefusedError, TimeoutError as TxTimeoutError
from twisted.internet.interfaces import IStreamClientEndpoint

from shardtcp.model import ShardInfo
from shardtcp.upstream import endpoint_for_address


class ShardConnectFailed(Exception):
    """A connection attempt to a shard failed; ``reason`` is a metrics slug."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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

    def _plain_endpoint(self, shard: ShardInfo, timeout: float) -> IStreamClientEndpoint:
        return endpoint_for_address(self._reactor, shard.address.host, shard.address.port, timeout)

    def connect(self, shard: ShardInfo, factory, timeout: float) -> defer.Deferred:
        """
        Connect ``factory`` to ``shard``; fire with the connected protocol,
        or fail with ``ShardConnectFailed`` (refused, timed out, ...).
        The attempt is cancelled after ``timeout`` seconds whatever the
        endpoint does.
        """
        endpoint = self._endpoint_factory(shard, timeout)
        d = endpoint.connect(factory)
        d.addTimeout(timeout, self._reactor)
        d.addErrback(_classify)
        return d


def _classify(failure):
    if failure.check(ShardConnectFailed):
        return failure
    if failure.check(ConnectionRefusedError):
        raise ShardConnectFailed("refused", "connection refused")
    if failure.check(defer.TimeoutError, TxTimeoutError, defer.CancelledError):
        raise ShardConnectFailed("timeout", "connect timed out")
    if failure.check(ConnectError):
        raise ShardConnectFailed("connect_error", failure.getErrorMessage() or "connect error")
    # TLS verification failures and the like are classified by their origin.
    name = getattr(failure.type, "__name__", "error")
    raise ShardConnectFailed("error", f"{name}: {failure.getErrorMessage()}")
