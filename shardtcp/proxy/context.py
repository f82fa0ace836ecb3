# -*- test-case-name: tests.proxy.test_listener -*-
"""
What the connections of one listener share, and how they are counted.

``ListenerContext`` is built once per ``[[listener]]`` by ``shardtcp.tap``
and handed to every protocol of that listener (the connection adapter and
the PROXY-header wrapper in front of it).  Its ``opened``/``closed``/
``refused`` methods are the one place a connection is counted and its
refusal logged, whichever of those protocols ends it.
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
from shardtcp.proxy.connector import IShardConnector
from shardtcp.proxy.ksplice import KernelSplicer
from shardtcp.proxy.tls import ServerTLS
from shardtcp.resolver.interfaces import IResolver
from shardtcp.upstream import UpstreamTLS

__all__ = ["ListenerContext", "log"]

log = Logger(namespace="shardtcp.connection")


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
    # kernel splice for passthrough and plain connections (None: userspace)
    splicer: Optional[KernelSplicer] = None
    # Metric children by (metric, label values): ``labels()`` takes a lock
    # and builds its key on every call, once per connection and event.
    _children: dict = attrs.field(factory=dict, init=False, repr=False)

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
        name = self.config.name
        self.child(self.metrics.accepted, name).inc()
        self.child(self.metrics.active, name).inc()

    def handed_over(self, before: object, after: object) -> None:
        """The connection counted as ``before`` goes on as ``after``."""
        self.connections.discard(before)
        self.connections.add(after)

    def closed(self, protocol: object) -> None:
        """``protocol``'s client connection is gone (counted once)."""
        if protocol in self.connections:
            self.connections.discard(protocol)
            self.child(self.metrics.active, self.config.name).dec()

    def refused(self, connection_id: str, client: Optional[tuple], reason: str, message: str) -> None:
        """Count and log a refusal."""
        self.metrics.rejected.labels(self.config.name, reason).inc()
        log.info(
            "connection {id} from {client} refused ({reason}): {message}",
            id=connection_id,
            client=format_address(client),
            reason=reason,
            message=message,
        )

    def gone_early(self, connection_id: str, client: Optional[tuple], state: str) -> None:
        """Count and log a client that left before being spliced."""
        self.metrics.rejected.labels(self.config.name, "client_gone").inc()
        log.info(
            "connection {id} from {client} closed by the client while {state}",
            id=connection_id,
            client=format_address(client),
            state=state,
        )
