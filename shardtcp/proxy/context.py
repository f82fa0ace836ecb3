# -*- test-case-name: tests.proxy.test_listener -*-
"""
What the connections of one listener share, and how they are counted.

``ListenerContext`` is built once per ``[[listener]]`` by ``shardtcp.tap``
and handed to every protocol of that listener (the connection adapter and
the PROXY-header wrapper in front of it).  Its ``opened``/``closed``/
``refused`` methods are the one place a connection is counted and its
refusal logged, whichever of those protocols ends it; refusal lines go
through a ``RefusalLimiter`` (the counters do not), and each connection's
end is written once to the ``AccessLog``.
"""

from __future__ import annotations

from typing import Callable, Optional

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shardtcp.identify.names import NameTable
from shardtcp.metrics import ProxyMetrics
from shardtcp.model import ListenerConfig
from shardtcp.net import format_address
from shardtcp.policy import PolicySigner, new_connection_id
from shardtcp.loglimit import ShardLineLimiter
from shardtcp.proxy.accesslog import AccessLog, RefusalLimiter
from shardtcp.proxy.connector import IShardConnector
from shardtcp.proxy.limits import AdmissionLimits
from shardtcp.proxy.ksplice import KernelSplicer
from shardtcp.proxy.tls import ServerTLS
from shardtcp.resolver.interfaces import IResolver
from shardtcp.upstream import UpstreamTLS

__all__ = ["ListenerContext", "log"]

log = Logger(namespace="shardtcp.connection")


def shard_line_limiter(clock: IReactorTime) -> ShardLineLimiter:
    """The bound on lines about failed attempts at shards, written as the connections' own lines."""
    return ShardLineLimiter(clock, log=log)


@attrs.define
class ListenerContext:
    """Everything the connections of one listener share."""

    config: ListenerConfig
    names: NameTable
    resolver: IResolver
    signer: PolicySigner
    connector: IShardConnector
    metrics: ProxyMetrics
    clock: IReactorTime
    tlv_type: int = 0xE0
    # client ip -> reason string when a threat feed denies it, else None
    admission: Optional[Callable[[str], Optional[str]]] = None
    # the protocols of this listener's open connections
    connections: set = attrs.field(factory=set)
    new_id: Callable[[], str] = new_connection_id
    server_tls: Optional[ServerTLS] = None  # terminate listeners
    upstream_tls: UpstreamTLS = attrs.field(factory=UpstreamTLS)
    # one line per connection at its end ([log] access)
    access: AccessLog = attrs.field(factory=AccessLog)
    # bounds refusal lines; shared by every listener when given by tap
    refusal_lines: Optional[RefusalLimiter] = None
    # bounds the lines about failed attempts at shards (by shard); shared
    # with the refusal lines' owner when given by tap
    shard_lines: Optional[ShardLineLimiter] = None
    # max_connections and per_source, checked by the factory at accept
    limits: Optional[AdmissionLimits] = None
    # this listener's accepted/active series, bound once (not per connection)
    _accepted: object = attrs.field(init=False, default=None, repr=False)
    _active: object = attrs.field(init=False, default=None, repr=False)
    _refused: dict = attrs.field(init=False, factory=dict, repr=False)  # reason -> bound child

    # kernel splice for passthrough and plain connections (None: userspace)
    splicer: Optional[KernelSplicer] = None
    # Metric children by (metric, label values): ``labels()`` takes a lock
    # and builds its key on every call, once per connection and event.
    _children: dict = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.refusal_lines is None:
            self.refusal_lines = RefusalLimiter(self.clock)
        if self.shard_lines is None:
            self.shard_lines = shard_line_limiter(self.clock)
        name = self.config.name
        self._accepted = self.metrics.accepted.labels(name)
        self._active = self.metrics.active.labels(name)

    @property
    def terminates(self) -> bool:
        """Whether this listener terminates clients' TLS."""
        return self.server_tls is not None

    @property
    def asks_client_cert(self) -> bool:
        """Whether this listener can ask clients for a certificate."""
        return self.server_tls is not None and self.server_tls.asks_client_cert

    def child(self, metric, *values: str):
        """``metric.labels(*values)``, bound on first use and kept."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # -- counting -------------------------------------------------------------

    def opened(self, protocol: object) -> None:
        """A client connection was accepted; ``protocol`` holds it."""
        self.connections.add(protocol)
        self._accepted.inc()
        self._active.inc()

    def _count_refusal(self, reason: str) -> None:
        # Reasons are a fixed vocabulary, so the cache stays small.
        child = self._refused.get(reason)
        if child is None:
            child = self._refused[reason] = self.metrics.rejected.labels(self.config.name, reason)
        child.inc()

    def handed_over(self, before: object, after: object) -> None:
        """The connection counted as ``before`` goes on as ``after``."""
        self.connections.discard(before)
        self.connections.add(after)
        if self.limits is not None:
            self.limits.moved(before, after)

    def closed(self, protocol: object) -> None:
        """``protocol``'s client connection is gone (counted once)."""
        if protocol in self.connections:
            self.connections.discard(protocol)
            self._active.dec()
        if self.limits is not None:
            self.limits.release(protocol)

    def refused(self, connection_id: str, client: Optional[tuple], reason: str, message: str) -> bool:
        """
        Count a refusal and log it unless its lines are over their bound;
        whether it was logged (the access line follows the same answer).
        """
        self._count_refusal(reason)
        if not self.may_log(reason, client):
            return False
        log.info(
            "connection {id} from {client} refused ({reason}): {message}",
            id=connection_id,
            client=format_address(client),
            reason=reason,
            message=message,
        )
        return True

    def may_log(self, reason: str, client: Optional[tuple]) -> bool:
        """Whether a line about an early end for ``reason`` is within its bound."""
        return self.refusal_lines.allow(reason, client[0] if client else None)

    def ended(self, fields: dict) -> None:
        """Write a connection's access line (``ACCESS_FIELDS``)."""
        self.access.write(fields)

    def ended_early(self, connection_id: str, client: Optional[tuple], close: str, started: float) -> None:
        """The access line of a connection that ended before it had a service."""
        if not self.access.enabled:
            return
        self.access.write(
            {
                "id": connection_id,
                "client": format_address(client) if client else None,
                "listener": self.config.name,
                "service": None,
                "shard": None,
                "sni": None,
                "bytes_up": 0,
                "bytes_down": 0,
                "peek": None,
                "connect": None,
                "total": self.clock.seconds() - started,
                "close": close,
            }
        )

    def gone_early(self, connection_id: str, client: Optional[tuple], state: str) -> bool:
        """Count a client that left before being spliced; whether it was logged."""
        self._count_refusal("client_gone")
        if not self.may_log("client_gone", client):
            return False
        log.info(
            "connection {id} from {client} closed by the client while {state}",
            id=connection_id,
            client=format_address(client),
            state=state,
        )
        return True
