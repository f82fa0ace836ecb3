# -*- test-case-name: tests.proxy.test_listener -*-
"""
Reading a PROXY header from a trusted load balancer, in front of a connection.

On ``accept_proxy`` listeners every accepted connection first meets a
``ProxyHeaderProtocol``: it refuses a peer outside ``trusted_proxies``,
reads one PROXY v1 or v2 header (``proxyv2.HeaderParser``: bounded, short
reads are fine) within ``peek_timeout``, and only then starts the protocol
behind it, to which it is the transport: ``getPeer``/``getHost`` name the
addresses the header carried, everything else goes to the real transport.
``ProxyHeaderFactory`` puts one in front of each connection of a factory,
as Twisted's ``HAProxyWrappingFactory`` does; unlike it, the protocol
behind never sees the load balancer's address, and a short first read does
not drop the connection.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import directlyProvides, implementer, providedBy

from shardtcp import proxyv2
from shardtcp.net import address_pair, in_networks
from shardtcp.proxy.context import ListenerContext

__all__ = ["ProxyHeaderFactory", "ProxyHeaderProtocol", "MAX_HEADER"]

#: The largest PROXY header accepted from a load balancer.
MAX_HEADER = 4096

#: What builds the protocol behind the header: ``(connection_id, accepted_at)``.
BehindHeader = Callable[[str, float], IProtocol]


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(Protocol):
    """
    One connection from a load balancer, until its PROXY header is read;
    then the transport of the protocol behind it.

    It counts the connection as accepted (``ListenerContext.opened``) and
    refuses, counts and logs as the connection itself would, under the
    connection id the protocol behind goes on with.
    """

    def __init__(self, context: ListenerContext, behind: BehindHeader) -> None:
        self._ctx = context
        self._behind = behind
        self.connection_id = context.new_id()
        self._parser: Optional[proxyv2.HeaderParser] = None
        self._timer = None
        self._inner: Optional[IProtocol] = None
        self._closing = False
        self._received = 0
        self._accepted_at = 0.0
        self._client: Optional[tuple] = None
        self._peer = None
        self._host = None

    # -- the real transport's events ------------------------------------------

    def connectionMade(self) -> None:
        ctx = self._ctx
        config = ctx.config
        transport = self.transport
        directlyProvides(self, providedBy(transport))
        ctx.opened(self)
        self._accepted_at = ctx.clock.seconds()
        peer, host = transport.getPeer(), transport.getHost()
        self._peer, self._host = peer, host
        self._client = address_pair((peer.host, peer.port), (host.host, host.port))[0]
        self._timer = ctx.clock.callLater(config.peek_timeout, self._timed_out)
        if not in_networks(self._client[0], config.trusted_proxies):
            self._refuse("untrusted_proxy", f"{self._client[0]} is not in trusted_proxies")
            return
        self._parser = proxyv2.HeaderParser(accept_v1=True, accept_v2=True, max_size=MAX_HEADER)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._parser is None:
            return
        self._received += len(data)
        try:
            header = self._parser.feed(data)
        except proxyv2.InvalidProxyHeader as e:
            self._refuse("bad_proxy_header", f"invalid PROXY header from {self._client[0]}: {e}")
            return
        if header is not None:
            self._header_read(header, self._parser.rest)

    def readConnectionLost(self) -> None:
        if self._inner is not None:
            half_closeable = IHalfCloseableProtocol(self._inner, None)
            if half_closeable is not None:
                half_closeable.readConnectionLost()
            return
        self._refuse("eof", "client closed its side before identifying a service")

    def writeConnectionLost(self) -> None:
        if self._inner is not None:
            half_closeable = IHalfCloseableProtocol(self._inner, None)
            if half_closeable is not None:
                half_closeable.writeConnectionLost()

    def connectionLost(self, reason) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
            return
        ctx = self._ctx
        self._cancel_timer()
        if not self._closing and ctx.gone_early(self.connection_id, self._client, "proxy-header"):
            ctx.ended_early(self.connection_id, self._client, "client", self._accepted_at)
        ctx.closed(self)

    # -- the header stage -----------------------------------------------------

    def _header_read(self, header: proxyv2.ProxyHeader, rest: bytes) -> None:
        self._parser = None
        self._cancel_timer()
        if (
            header.command == proxyv2.Command.PROXY
            and header.source
            and header.destination
            and header.family in ("INET", "INET6")
        ):
            self._peer = _address(header.source)
            self._host = _address(header.destination)
        inner = self._behind(self.connection_id, self._accepted_at)
        self._inner = inner
        self._ctx.handed_over(self, inner)
        inner.makeConnection(self)
        if rest:
            inner.dataReceived(rest)

    def _refuse(self, reason: str, message: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._parser = None
        self._cancel_timer()
        if self._ctx.refused(self.connection_id, self._client, reason, message):
            self._ctx.ended_early(self.connection_id, self._client, f"refused:{reason}", self._accepted_at)
        self.transport.loseConnection()

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse(
            "peek_timeout",
            f"no complete PROXY header within {self._ctx.config.peek_timeout}s ({self._received} bytes received)",
        )

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- the transport of the protocol behind ---------------------------------

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def writeSequence(self, data) -> None:
        self.transport.writeSequence(data)

    def loseConnection(self) -> None:
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.transport.abortConnection()

    def loseWriteConnection(self) -> None:
        self.transport.loseWriteConnection()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def registerProducer(self, producer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def setTcpNoDelay(self, enabled: bool) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(enabled)

    @property
    def bufferSize(self) -> int:
        return self.transport.bufferSize

    @bufferSize.setter
    def bufferSize(self, size: int) -> None:
        self.transport.bufferSize = size

    @property
    def disconnecting(self) -> bool:
        return self.transport.disconnecting

    def __getattr__(self, name: str):
        # Anything else a transport offers (getHandle, ...) is the real one's.
        transport = self.__dict__.get("transport")
        if transport is None:
            raise AttributeError(name)
        return getattr(transport, name)


class ProxyHeaderFactory(Factory):
    """Puts a ``ProxyHeaderProtocol`` in front of each connection ``behind`` builds."""

    noisy = False

    def __init__(self, context: ListenerContext, behind: BehindHeader) -> None:
        self._context = context
        self._behind = behind

    def buildProtocol(self, addr) -> ProxyHeaderProtocol:
        return ProxyHeaderProtocol(self._context, self._behind)


def _address(address: tuple):
    host, port = address
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)
