# -*- test-case-name: tests.proxy.test_listener -*-
"""
One client connection's life on Twisted: the adapter around the machine.

``ProxyFactory`` is built once per ``[[listener]]`` with everything its
connections need (``ListenerContext``).  ``ProxyConnection`` is a thin
protocol: it feeds its transport's events to a ``ConnectionMachine``
(``shardtcp.proxy.machine``, where the states and decisions live) and does
what the machine asks (timers, terminating TLS, connecting to shards in
order, writing the header from ``shardtcp.proxy.header``, splicing).  For
``accept_proxy`` listeners a ``ProxyHeaderProtocol``
(``shardtcp.proxy.inbound``) reads the load balancer's PROXY header in
front of it.

Every refusal is answered in the client's own protocol (``refusal``), logged
with its reason and counted; nothing a client sends can raise out of here.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    ILoggingContext,
    IProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer, implementer_only

from shardtcp.net import address_pair, format_address
from shardtcp.policy import PolicyTooLarge, TLSFacts
from shardtcp.proxy.connector import ConnectedNotice, InOrder, ProxyConnectFailed, ShardConnectFailed
from shardtcp.proxy.context import ListenerContext, log
from shardtcp.proxy.header import build_header
from shardtcp.proxy.inbound import ProxyHeaderFactory
from shardtcp.proxy.limits import LISTENER_FULL, SOURCE_CONNECTIONS, SOURCE_RATE
from shardtcp.proxy.machine import ConnectionMachine, IConnectionEffects, State
from shardtcp.proxy.splice import DOWNSTREAM, UPSTREAM, Splice, SpliceSideMixin, SpliceStats
from shardtcp.proxy.tls import handshake_facts
from shardtcp.tlslayer import HalfCloseTLSFactory

#: A connect timeout that fires later than this share of connect_timeout
#: (and at least ``LATE_TIMEOUT_MIN`` seconds) after it was due is the
#: busy proxy's fault, not the shard's.
LATE_TIMEOUT = 0.25
LATE_TIMEOUT_MIN = 0.25

__all__ = ["LATE_TIMEOUT", "LATE_TIMEOUT_MIN", "ListenerContext", "ProxyConnection", "ProxyFactory", "UpstreamProtocol"]


# IHalfCloseableProtocol: the shard's EOF (FIN) arrives as
# ``readConnectionLost`` and the splice passes it on as a half-close of the
# client side, while the client may still send to the shard.
@implementer_only(IProtocol, ILoggingContext, IHandshakeListener, IHalfCloseableProtocol)
class UpstreamProtocol(ConnectedNotice, SpliceSideMixin, Protocol):
    """
    The shard side of a connection.

    For ``upstream_tls`` services, ``start_tls`` begins TLS on the same
    connection after the PROXY header went out in clear (as HAProxy's
    ``send-proxy-v2`` on an ``ssl`` server does) and fires once the shard's
    certificate has been verified, or fails when it is not.  The TLS layer
    is the half-closeable one: the shard's ``close_notify`` is its
    half-close, and ``transport.loseWriteConnection`` sends ours.
    """

    _side = UPSTREAM
    _handshake: Optional[Deferred] = None
    # The ProxyConnection to tell when the shard speaks first or closes
    # without a byte (``empty_response``); None once it has spoken.
    _watcher = None

    def connectionMade(self) -> None:
        if self._handshake is not None:
            # The TLS layer of ``start_tls`` connecting this protocol again.
            return
        _no_delay(self.transport)
        wrapper = getattr(self.transport, "protocol", None)
        if getattr(wrapper, "_wrappedProtocol", None) is self:
            # Twisted's client endpoint wrapper (shards by host name) has
            # readConnectionLost but declares only the last interface it
            # copies (IHandshakeListener): declare the half-close on it too.
            alsoProvides(wrapper, IHalfCloseableProtocol)
        self.announce_connected()

    def attach(self, splice: Splice) -> None:
        """From now on, this side's events go to ``splice``."""
        self._splice = splice

    def start_tls(self, options, clock=None) -> Deferred:
        raw = self.transport
        self._handshake = Deferred(lambda _: self.transport.abortConnection())
        tls = HalfCloseTLSFactory(options, True, _OneProtocol(self), clock=clock).buildProtocol(raw.getPeer())
        # The TLS layer takes the socket's events; this protocol is its inside.
        raw.protocol = tls
        tls.makeConnection(raw)
        return self._handshake

    def handshakeCompleted(self) -> None:
        d, self._handshake = self._handshake, None
        if d is not None:
            d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        watcher = self._watcher
        if watcher is not None:
            self._watcher = None
            if watcher._shard_spoke(self, data):
                return
        if self._splice is not None:
            self._splice.data(UPSTREAM, data)

    def readConnectionLost(self) -> None:
        watcher = self._watcher
        if watcher is not None and watcher._shard_silent(self):
            return
        SpliceSideMixin.readConnectionLost(self)

    def connectionLost(self, reason) -> None:
        d, self._handshake = self._handshake, None
        if d is not None:
            d.errback(reason)
            return
        watcher = self._watcher
        if watcher is not None and watcher._shard_silent(self):
            return
        if self._splice is not None:
            self._splice.lost(UPSTREAM, reason)


_UPSTREAM_FACTORY = Factory.forProtocol(UpstreamProtocol)
_UPSTREAM_FACTORY.noisy = False


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class _TerminatedClient(Protocol):
    """
    The application side of a client's terminated TLS: plaintext events go
    to the owning ``ProxyConnection``.
    """

    def __init__(self, owner: "ProxyConnection") -> None:
        self._owner = owner

    def handshakeCompleted(self) -> None:
        self._owner._handshake_done()

    def dataReceived(self, data: bytes) -> None:
        self._owner._client_data(data)

    def readConnectionLost(self) -> None:
        self._owner._client_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self._owner._client_lost(reason)


class _OneProtocol(Factory):
    """A factory handing out one prepared protocol (the TLS layer's inside)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr) -> Protocol:
        return self._protocol


@implementer(IHalfCloseableProtocol, IConnectionEffects)
class ProxyConnection(SpliceSideMixin, Protocol):
    """
    One client connection: transport events in, the machine's wishes out.

    When the listener terminates TLS, the raw transport's events go to the
    TLS layer and the plaintext comes back through ``_TerminatedClient``;
    ``self._client`` is then the TLS layer, which the splice and the
    refusals write to instead of the raw transport.  Once spliced, events go
    straight to the ``Splice``.

    ``connection_id`` and ``accepted_at`` are given when a protocol in front
    (the PROXY-header reader) accepted and counted the connection: the
    identification deadline then runs from ``accepted_at``.
    """

    _side = DOWNSTREAM

    def __init__(
        self,
        context: ListenerContext,
        *,
        connection_id: Optional[str] = None,
        accepted_at: Optional[float] = None,
    ) -> None:
        self._ctx = context
        self.connection_id = connection_id if connection_id is not None else context.new_id()
        self.machine: Optional[ConnectionMachine] = None
        self._accepted_at = accepted_at
        self._start = 0.0
        self._timer = None
        self._attempts: Optional[InOrder] = None
        self._attempt_started = 0.0
        self._connect_seconds = 0.0
        self._lease = None
        self._upstream: Optional[UpstreamProtocol] = None
        self._shard: Optional[str] = None
        self._client = None
        self._tls = None
        # when the shard connection was asked for, and when it was ready
        self._connect_at: Optional[float] = None
        self._connected_at: Optional[float] = None
        self._client_closed = False
        self._candidate = None
        # bytes written to the shard with the header (held while peeking)
        self._held_up = 0
        # The shard's PROXY header, held back to go out with the first
        # payload bytes in one send (shards without upstream TLS only).
        self._header = b""
        # whether this connection may move to the kernel splice
        self._kernel_ok = False
        # the shard connection whose empty close could still be retried
        self._watched: Optional[UpstreamProtocol] = None
        #: Why the proxy itself ended this connection (``close``), or None.
        self.close_reason: Optional[str] = None
        #: Set when a graceful stop began while this connection was open.
        self.draining = False

    @property
    def end_reason(self) -> Optional[str]:
        """The close reason the access line gives instead of the side that closed."""
        return self.close_reason

    @end_reason.setter
    def end_reason(self, reason: Optional[str]) -> None:
        self.close_reason = reason

    @property
    def state(self) -> str:
        """The machine's state, by name."""
        return self.machine.state.value if self.machine is not None else State.ACCEPTED.value

    @property
    def client(self) -> Optional[tuple]:
        """``(ip, port)`` of the client, as the PROXY header names it."""
        return self.machine.client if self.machine is not None else None

    @property
    def destination(self) -> Optional[tuple]:
        return self.machine.destination if self.machine is not None else None

    # -- raw transport events -------------------------------------------------

    def connectionMade(self) -> None:
        ctx = self._ctx
        transport = self.transport
        self._client = transport
        _no_delay(transport)
        peek = ctx.config.peek_timeout
        if self._accepted_at is None:
            ctx.opened(self)
            self._start = ctx.clock.seconds()
        else:
            self._start = self._accepted_at
            peek = max(0.0, peek - (ctx.clock.seconds() - self._accepted_at))
        client, destination = _addresses(transport)
        self.machine = ConnectionMachine(ctx, self, client, destination)
        self.machine.start(peek)

    def dataReceived(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.dataReceived(data)
        elif self._splice is not None:
            if self._watched is not None and self._client_spoke(data):
                return
            self._splice.data(DOWNSTREAM, data)
        else:
            self.machine.data(data)

    def readConnectionLost(self) -> None:
        if self._tls is not None:
            self._tls.readConnectionLost()
        else:
            self._client_eof()

    def connectionLost(self, reason) -> None:
        if self._tls is not None:
            self._tls.connectionLost(reason)
        else:
            self._client_lost(reason)

    # -- client events, plaintext or pre-TLS ----------------------------------

    def _client_data(self, data: bytes) -> None:
        if self._splice is not None:
            self._splice.data(DOWNSTREAM, data)
        else:
            self.machine.data(data)

    def _client_eof(self) -> None:
        if self._splice is not None:
            self._client_closed = True
            self._splice.read_closed(DOWNSTREAM)
        else:
            self.machine.eof()

    def _client_lost(self, reason) -> None:
        if self._splice is not None:
            self._splice.lost(DOWNSTREAM, reason)
        else:
            self.machine.lost(reason)

    def _handshake_done(self) -> None:
        if self.machine.state is not State.HANDSHAKING:
            return
        encryption, authentication, subject, alpn, ssl_info = handshake_facts(self._tls.getHandle())
        self._client = self._tls
        self.machine.handshake_done(
            TLSFacts(encryption=encryption, authentication=authentication, subject=subject, alpn=alpn, ssl=ssl_info)
        )

    # -- IConnectionEffects ---------------------------------------------------

    def start_timer(self, seconds: float) -> None:
        self._timer = self._ctx.clock.callLater(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self.machine.timed_out()

    def cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def pause_client(self) -> None:
        self._client.pauseProducing()

    def tls_creator(self, server_name: Optional[str], require_cert: bool):
        return self._ctx.server_tls.creator_for(server_name, require_cert=require_cert)

    def start_tls(self, creator, buffered: bytes) -> None:
        ctx = self._ctx
        factory = HalfCloseTLSFactory(creator, False, _OneProtocol(_TerminatedClient(self)), clock=ctx.clock)
        tls = factory.buildProtocol(self.transport.getPeer())
        self._tls = tls
        tls.makeConnection(self.transport)
        machine = self.machine
        if machine.state is State.HANDSHAKING:
            tls.dataReceived(buffered)
        if machine.state is State.HANDSHAKING:
            self.transport.resumeProducing()

    def connect(self, candidates) -> None:
        self._connect_at = self._ctx.clock.seconds()
        self._attempts = InOrder(
            candidates,
            self._attempt,
            succeeded=self._succeeded,
            failed=self._attempt_failed,
            exhausted=self._exhausted,
        )
        self._attempts.start()

    def stop_connecting(self) -> None:
        attempts, self._attempts = self._attempts, None
        if attempts is not None:
            attempts.cancel()
        self._release_lease()

    def refuse(self, reason: str, message: str, answer: Optional[bytes]) -> None:
        if self._ctx.refused(self.connection_id, self.machine.client, reason, message):
            self._access(f"refused:{reason}", 0, 0)
        client = self._client
        if answer is None:
            client.abortConnection()
            return
        if answer:
            client.write(answer)
        client.loseConnection()

    def gone(self, previous: State, reason) -> None:
        ctx = self._ctx
        if self.close_reason is not None:
            ctx.metrics.rejected.labels(ctx.config.name, self.close_reason).inc()
            log.info(
                "connection {id} from {client} closed by {reason} while {state}",
                id=self.connection_id,
                client=format_address(self.machine.client),
                reason=self.close_reason,
                state=previous.value,
            )
        elif previous is State.HANDSHAKING:
            why = reason.getErrorMessage() if reason is not None else "closed"
            ctx.metrics.rejected.labels(ctx.config.name, "tls_handshake").inc()
            if ctx.may_log("tls_handshake", self.machine.client):
                log.info(
                    "connection {id} from {client}: TLS handshake failed: {why}",
                    id=self.connection_id,
                    client=format_address(self.machine.client),
                    why=why,
                )
                self._access("refused:tls_handshake", 0, 0)
        elif previous is not State.CLOSED:
            if ctx.gone_early(self.connection_id, self.machine.client, previous.value):
                self._access(self.end_reason or "client", 0, 0)
        ctx.closed(self)

    def splice(self, payload: bytes, reply: bytes, client_eof: bool) -> None:
        ctx = self._ctx
        upstream, self._upstream = self._upstream, None
        header, self._header = self._header, b""
        first = header + payload if payload else header
        ctx.child(ctx.metrics.spliced, ctx.config.name, self.machine.service, self._shard).inc()
        # A held-back header means a plain shard connection; the client's is
        # plain unless this listener terminates TLS (then ``_tls`` is set).
        retryable = (
            self.machine.holds_bytes
            and not client_eof
            and self._attempts is not None
            and self._attempts.remaining > 0
        )
        # Kernel splice needs plain sockets both ways: a held-back header
        # means a plain shard connection, and ``_tls`` is set when this
        # listener terminates the client's TLS.
        self._kernel_ok = bool(header) and self._tls is None and ctx.splicer is not None
        if self._kernel_ok and not retryable:
            # Bytes the client sent with its preamble are bytes up.
            if self._kernel_take_over(upstream, first, reply, len(payload), 0) is not None:
                self._attempts = None
                return
        if first:
            upstream.transport.write(first)
        if reply:
            self._client.write(reply)
        splice = Splice(
            self._client,
            upstream.transport,
            clock=ctx.clock,
            on_done=self._spliced_done,
            idle_timeout=ctx.config.idle_timeout,
        )
        # Bytes the client sent with its preamble (after a SHARD line, a
        # CONNECT request) went to the shard above: they are bytes up.
        splice.stats.bytes_up = self._held_up = len(payload)
        self._splice = splice
        upstream.attach(splice)
        splice.start()
        if self.machine.holds_bytes and not client_eof:
            # Until the shard's first byte, an empty close may be retried:
            # the shard's transport must not stop the client when it is
            # lost (Twisted stops a lost transport's producer before its
            # protocol hears of it), so it gets the client through a shim.
            upstream._watcher = self
            self._watched = upstream
            up = upstream.transport
            up.unregisterProducer()
            up.registerProducer(_WatchedClient(self._client, upstream), True)
        else:
            self._attempts = None
        if client_eof:
            splice.read_closed(DOWNSTREAM)
        self._client.resumeProducing()

    # -- one attempt at a shard -----------------------------------------------

    def _attempt(self, candidate):
        """
        Connect to ``candidate``'s shard, write its header, verify its TLS:
        a Deferred, or a direct attempt (no Deferred on the way) reporting
        to ``self._attempts`` when the connector has one for this shard.
        """
        ctx = self._ctx
        shard = candidate.shard
        self._lease = ctx.resolver.lease(shard.shard_id)
        self._attempt_started = ctx.clock.seconds()
        connector = ctx.connector
        start_direct = getattr(connector, "start_direct", None)
        if start_direct is not None:
            attempts = self._attempts

            def connected(upstream) -> None:
                try:
                    result = self._connected(upstream, candidate)
                except BaseException:
                    attempts.lost(candidate, Failure())
                    return
                if isinstance(result, Deferred):
                    attempts.follow(candidate, result)
                else:
                    attempts.won(candidate, result)

            def failed(failure: Failure) -> None:
                attempts.lost(candidate, failure)

            attempt = start_direct(shard, _UPSTREAM_FACTORY, ctx.config.connect_timeout, connected, failed)
            if attempt is not None:
                return attempt
        d = connector.connect(shard, _UPSTREAM_FACTORY, ctx.config.connect_timeout)
        d.addCallback(self._connected, candidate)
        return d

    def _connected(self, upstream: UpstreamProtocol, candidate):
        ctx = self._ctx
        machine = self.machine
        shard = candidate.shard
        if not machine.connecting:
            self._abandon(upstream)
            return None
        identified = machine.identified
        try:
            header = build_header(
                ctx.signer,
                ctx.tlv_type,
                shard_id=shard.shard_id,
                connection_id=self.connection_id,
                service=machine.service,
                policy=machine.policy,
                client=machine.client,
                destination=machine.destination,
                name=identified.name,
                sni=identified.name if identified.method == "sni" else None,
                tls=machine.facts,
            )
        except PolicyTooLarge as e:
            self._abandon(upstream)
            machine.header_refused(str(e))
            return None
        # The TCP connect time is the latency sample; a TLS handshake on top
        # would add the shard's CPU time to its distance.
        self._connect_seconds = ctx.clock.seconds() - self._attempt_started
        # The service's configuration as the shards were chosen under it.
        service = machine.service_config
        if not service.upstream_tls:
            self._header = header
            return upstream
        upstream.transport.write(header)
        d = upstream.start_tls(ctx.upstream_tls.options_for(service, shard), ctx.clock)
        d.addTimeout(ctx.config.connect_timeout, ctx.clock)
        d.addErrback(self._upstream_tls_failed, upstream, candidate)
        return d

    def _upstream_tls_failed(self, failure: Failure, upstream: UpstreamProtocol, candidate):
        if upstream.transport is not None and upstream.connected:
            upstream.transport.abortConnection()
        if not self.machine.connecting:
            return failure
        why = failure.getErrorMessage() or failure.type.__name__
        log.warn(
            "security: shard {shard} ({address}) failed TLS verification: {why}",
            shard=candidate.shard.shard_id,
            address=str(candidate.shard.address),
            why=why,
            security_event="upstream_tls_verification",
        )
        raise ShardConnectFailed("tls_verify", f"TLS verification failed: {why}")

    def _attempt_failed(self, candidate, failure: Failure) -> bool:
        """Note a failed attempt; whether to try the next candidate."""
        self._release_lease()
        if not self.machine.connecting:
            # The client went away and cancelled the attempt.
            return False
        ctx = self._ctx
        shard = candidate.shard
        fault = self._proxy_fault(failure)
        if fault is not None:
            kind, why = fault
            # Not the shard's failure: no record_connect_result, no ejection.
            ctx.metrics.proxy_errors.labels(kind).inc()
            log.error(
                "connection {id}: the proxy itself failed to reach shard {shard} ({address}): {why}; "
                "not counted against the shard",
                id=self.connection_id,
                shard=shard.shard_id,
                address=str(shard.address),
                why=why,
                proxy_fault=kind,
            )
            self._attempts = None
            self.machine.overloaded(f"the proxy is overloaded ({kind}): {why}")
            return False
        ctx.resolver.record_connect_result(shard.shard_id, False)
        reason = getattr(failure.value, "reason", "error")
        ctx.metrics.upstream_failures.labels(self.machine.service, shard.shard_id, reason).inc()
        # Bounded per shard and in all (a dead service with every
        # connection trying it); the metric counts every failure.
        if ctx.shard_lines.allow_key(reason, f"shard {shard.shard_id}"):
            log.warn(
                "connection {id}: shard {shard} ({address}) failed: {why}",
                id=self.connection_id,
                shard=shard.shard_id,
                address=str(shard.address),
                why=failure.getErrorMessage(),
            )
        return True

    def _proxy_fault(self, failure: Failure) -> Optional[tuple]:
        """
        ``(kind, why)`` when a failed attempt is the proxy's own fault: an
        errno of the proxy's own socket (``ProxyConnectFailed``), or a
        connect timeout that fired late (``timeout_late``): more than
        ``LATE_TIMEOUT`` (a share of connect_timeout, at least
        ``LATE_TIMEOUT_MIN``) after it was due.  A timer runs late only when
        the reactor was too busy to run it, and then it was too busy to see
        the shard's answer too; a timeout on time counts against the shard.
        """
        value = failure.value
        if isinstance(value, ProxyConnectFailed):
            return value.kind, str(value)
        if getattr(value, "reason", None) == "timeout":
            timeout = self._ctx.config.connect_timeout
            late = self._ctx.clock.seconds() - self._attempt_started - timeout
            if late > max(LATE_TIMEOUT_MIN, LATE_TIMEOUT * timeout):
                return "timeout_late", f"connect timeout fired {late:.3f}s late: the proxy was too busy"
        return None

    def _shard_spoke(self, upstream: UpstreamProtocol, data: bytes) -> bool:
        """
        The shard's first byte: no retry from now on.  True when ``data``
        went to the kernel splice with both sockets (see ``_settle``).
        """
        return self._settle(upstream, down=data)

    def _client_spoke(self, data: bytes) -> bool:
        """
        The client sent more before the shard's first byte: a retry could no
        longer replay everything, so none will happen.  True when ``data``
        went to the kernel splice with both sockets (see ``_settle``).
        """
        upstream, self._watched = self._watched, None
        upstream._watcher = None
        return self._settle(upstream, up=data)

    def _settle(self, upstream: UpstreamProtocol, up: bytes = b"", down: bytes = b"") -> bool:
        """
        No retry from now on: hand both sockets to the kernel splice when
        this connection may use it (``up`` and ``down`` first, each way) and
        say so; else couple the shard to the client directly (the caller
        passes the bytes on).
        """
        self._watched = None
        self._attempts = None
        self.machine.shard_spoke()
        ctx = self._ctx
        splice = self._splice
        if self._kernel_ok and isinstance(splice, Splice):
            kernel = self._kernel_take_over(
                upstream, up, down, splice.stats.bytes_up + len(up), splice.stats.bytes_down + len(down)
            )
            if kernel is not None:
                splice.detach()
                upstream._splice = None
                return True
        transport = upstream.transport
        transport.unregisterProducer()
        transport.registerProducer(self._client, True)
        return False

    def _kernel_take_over(self, upstream: UpstreamProtocol, up: bytes, down: bytes, counted_up: int,
                          counted_down: int):
        """
        Hand both sockets to the kernel splice, ``up`` and ``down`` (bytes
        already read and not yet forwarded) first; ``counted_up`` and
        ``counted_down`` are bytes already moved or to be counted as moved.
        The kernel splice, or None when it cannot take them (no pipes).
        """
        ctx = self._ctx
        kernel = ctx.splicer.take_transports(
            self._client,
            upstream.transport,
            on_done=self._spliced_done,
            prefix_up=up,
            prefix_down=down,
            idle_timeout=ctx.config.idle_timeout,
        )
        if kernel is None:
            return None
        kernel.stats.bytes_up += counted_up
        kernel.stats.bytes_down += counted_down
        ctx.child(ctx.metrics.kernel_spliced, ctx.config.name).inc()
        self._splice = kernel
        self._kernel_taken()
        return kernel

    def _kernel_taken(self) -> None:
        """
        The kernel splice owns both sockets now: drop what only the
        userspace phase needed (the inert transports, the candidate and
        its ranking, kept for an empty-response retry), so that an idle
        spliced connection holds little besides its record and the splice.
        """
        self._client = None
        self.transport = None
        self._candidate = None
        self._upstream = None

    def _shard_silent(self, upstream: UpstreamProtocol) -> bool:
        """
        The shard closed before sending a byte: when nothing of the client's
        went after the held bytes (and it has not closed), undo the splice
        and try the next candidate (as HAProxy's ``retry-on
        empty-response``); the close counts as the shard's failure either
        way.  False: the close goes on to the client as usual.
        """
        self._watched = None
        upstream._watcher = None
        splice, attempts, candidate = self._splice, self._attempts, self._candidate
        self._attempts = None
        if splice is None or splice.stats.ended_by or splice.stats.bytes_up > self._held_up or self._client_closed:
            # The proxy or the client ended it, or the client said more:
            # an ordinary close, not the shard's failure.
            return False
        ctx = self._ctx
        shard = candidate.shard
        ctx.resolver.record_connect_result(shard.shard_id, False)
        ctx.metrics.upstream_failures.labels(self.machine.service, shard.shard_id, "empty_response").inc()
        if attempts is None or not self.machine.empty_response():
            return False
        log.warn(
            "connection {id}: shard {shard} ({address}) closed before answering; trying the next shard",
            id=self.connection_id,
            shard=shard.shard_id,
            address=str(shard.address),
        )
        splice.detach()
        self._splice = None
        self._upstream = None
        upstream._splice = None
        if upstream.transport is not None:
            upstream.transport.abortConnection()
        self._release_lease()
        self._attempts = attempts
        attempts.advance()
        return True

    def _exhausted(self, candidates) -> None:
        self._attempts = None
        self.machine.unreachable([c.shard.shard_id for c in candidates])

    def _succeeded(self, candidate, upstream: Optional[UpstreamProtocol]) -> None:
        """The shard is connected (and verified): record it, then splice."""
        if upstream is None:
            # Abandoned on the way (the client left, or no header).
            return
        ctx = self._ctx
        machine = self.machine
        if not machine.connecting:
            self._abandon(upstream)
            return
        shard_id = candidate.shard.shard_id
        elapsed = ctx.clock.seconds() - self._attempt_started
        ctx.resolver.record_connect_result(shard_id, True, self._connect_seconds)
        ctx.child(ctx.metrics.connect_seconds, machine.service).observe(elapsed)
        self._connected_at = ctx.clock.seconds()
        self._shard = shard_id
        self._upstream = upstream
        self._candidate = candidate
        machine.ready()

    def _abandon(self, upstream: UpstreamProtocol) -> None:
        """Drop a shard connection this client no longer needs."""
        upstream.transport.abortConnection()
        self._release_lease()

    def _release_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()

    # -- the end --------------------------------------------------------------

    def close(self, reason: str) -> None:
        """
        End this connection now, on the proxy's own behalf (a drain's
        deadline: ``reason`` ``"shutdown"``).  A spliced connection is
        aborted on both sides and logged as ``closed by <reason>``; one not
        spliced yet is aborted and logged with ``reason`` and its state.
        """
        if self.close_reason is not None:
            return
        self.close_reason = reason
        if self._splice is not None:
            self._splice.abort(reason)
            return
        client = self._client if self._client is not None else self.transport
        if client is not None:
            client.abortConnection()

    def _spliced_done(self, stats: SpliceStats) -> None:
        ctx = self._ctx
        name = ctx.config.name
        ctx.child(ctx.metrics.bytes, name, "up").inc(stats.bytes_up)
        ctx.child(ctx.metrics.bytes, name, "down").inc(stats.bytes_down)
        ctx.child(ctx.metrics.ended, name, stats.ended_by or "closed").inc()
        self._release_lease()
        close = self.end_reason or stats.ended_by or "closed"
        if self.draining and self.close_reason is None and close != "shutdown":
            # ended by itself while the proxy drained: say both
            close = f"drain:{close}"
        self._access(close, stats.bytes_up, stats.bytes_down)
        self.machine.finished()
        ctx.closed(self)

    def _access(self, close: str, bytes_up: int, bytes_down: int) -> None:
        """Write this connection's access line (once, at its end)."""
        ctx = self._ctx
        if not ctx.access.enabled:
            return
        machine = self.machine
        identified = machine.identified
        connect_at, connected_at = self._connect_at, self._connected_at
        ctx.ended(
            {
                "id": self.connection_id,
                "client": format_address(machine.client),
                "listener": ctx.config.name,
                "service": machine.service,
                "shard": self._shard,
                "sni": identified.name if identified is not None and identified.method == "sni" else None,
                "bytes_up": bytes_up,
                "bytes_down": bytes_down,
                "peek": None if connect_at is None else connect_at - self._start,
                "connect": None if connected_at is None or connect_at is None else connected_at - connect_at,
                "total": ctx.clock.seconds() - self._start,
                "close": close,
            }
        )


@implementer(IPushProducer)
class _WatchedClient:
    """
    The client transport as the producer of a shard that has not spoken
    yet: pausing and resuming pass through; stopping waits until the shard's
    protocol has decided whether its empty close is retried.
    """

    __slots__ = ("_client", "_upstream")

    def __init__(self, client, upstream: UpstreamProtocol) -> None:
        self._client = client
        self._upstream = upstream

    def pauseProducing(self) -> None:
        self._client.pauseProducing()

    def resumeProducing(self) -> None:
        self._client.resumeProducing()

    def stopProducing(self) -> None:
        if self._upstream._watcher is None:
            self._client.stopProducing()


def _addresses(transport) -> tuple[tuple, tuple]:
    """
    ``(client, destination)`` of an accepted connection, as the PROXY
    header names them (``address_pair``).

    A Twisted TCP server transport on an IPv4 socket already holds the
    client's ``(ip, port)`` from accept, and the kernel's dotted quads are
    canonical and of one family: the pair is read straight from the socket,
    without building two address objects and parsing them back.
    """
    if type(transport) is tcp.Server:
        client = transport.client
        if len(client) == 2:
            return client, transport.socket.getsockname()
    peer, host = transport.getPeer(), transport.getHost()
    return address_pair((peer.host, peer.port), (host.host, host.port))


def _no_delay(transport) -> None:
    """
    Turn Nagle's algorithm off: a relay must not hold a small segment back
    waiting for an ACK the peer may delay by 40 ms.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


_LIMIT_MESSAGES = {
    LISTENER_FULL: "the listener is at max_connections; closed at accept",
    SOURCE_CONNECTIONS: "the source is at per_source.max_connections; closed at accept",
    SOURCE_RATE: "the source is over per_source.rate; closed at accept",
}


class ProxyFactory(Factory):
    """
    Builds a ``ProxyConnection`` per accepted client, sharing ``context``.

    On ``accept_proxy`` listeners each connection gets a
    ``ProxyHeaderProtocol`` in front (built by a ``ProxyHeaderFactory``
    wrapping this factory, as Twisted's ``HAProxyWrappingFactory`` does),
    and the connection behind it starts once the header has been read.
    """

    noisy = False

    def __init__(self, context: ListenerContext) -> None:
        self.set_context(context)

    def set_context(self, context: ListenerContext) -> None:
        """
        Build the connections accepted from now on with ``context`` (a
        reload); connections already open keep the context they were built
        with.
        """
        self.context = context
        self._front = ProxyHeaderFactory(context, self.behind_header) if context.config.accept_proxy else None

    def buildProtocol(self, addr):
        limits = self.context.limits
        if limits is not None:
            return self._admitted(addr, limits)
        if self._front is not None:
            return self._front.buildProtocol(addr)
        return ProxyConnection(self.context)

    def _admitted(self, addr, limits):
        """
        The protocol for a client ``limits`` admits, else None: Twisted then
        closes the accepted socket at once, before reading a byte of it.
        """
        host = getattr(addr, "host", "")
        reason = limits.admit(host)
        if reason is not None:
            self.context.refused("-", (host, getattr(addr, "port", 0)), reason, _LIMIT_MESSAGES[reason])
            return None
        if self._front is not None:
            protocol = self._front.buildProtocol(addr)
        else:
            protocol = ProxyConnection(self.context)
        limits.bind(protocol, host)
        return protocol

    def behind_header(self, connection_id: str, accepted_at: float) -> ProxyConnection:
        """The connection that goes on once a PROXY header has been read."""
        return ProxyConnection(self.context, connection_id=connection_id, accepted_at=accepted_at)
