"""
One client connection's life: identify, resolve, connect, header, splice.

``ProxyFactory`` is built once per ``[[listener]]`` with everything its
connections need (``ListenerContext``); ``ProxyConnection`` is the state
machine of one connection:

``proxy-header``
    (``accept_proxy`` listeners) a PROXY v1/v2 header from a trusted load
    balancer is read first; its source becomes the client;
``peeking``
    bytes are buffered and fed to the ``Detector`` (bounded by
    ``max_client_hello`` and ``peek_timeout``) until the service is known;
``handshaking``
    (``terminate`` listeners) the client's TLS is being terminated with the
    certificate chosen for its SNI (see ``shardtcp.proxy.tls``);
``connecting``
    the client is paused; the resolver's candidates are tried in order
    (``1 + retries`` of them), each bounded by ``connect_timeout``, each with
    the same buffered bytes;
``spliced``
    the PROXY v2 header and the buffered bytes have been written to the
    shard, and a ``Splice`` moves bytes both ways until both sides close;
``closed``
    refused or finished.

Every refusal is answered in the client's own protocol (``refusal``), logged
with its reason and counted; nothing a client sends can raise out of here.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, Optional

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shardtcp import proxyv2
from shardtcp.identify.detect import Detector, IdentifyError, Identified
from shardtcp.identify.names import NameTable
from shardtcp.model import ConnectionRequest, ListenerConfig, ServiceConfig, format_hostport
from shardtcp.policy import PolicyContext, PolicySigner, PolicyTooLarge, new_connection_id
from shardtcp.proxy.connector import ShardConnectFailed, ShardConnector
from shardtcp.proxy.refusal import refusal_bytes
from shardtcp.proxy.tls import ServerTLS, handshake_facts
from shardtcp.upstream import UpstreamTLS
from shardtcp.proxy.splice import DOWNSTREAM, UPSTREAM, Splice, SpliceSideMixin, SpliceStats
from shardtcp.tlslayer import HalfCloseTLSFactory
from shardtcp.resolver import AccessDenied, NoShardAvailable, ResolverError, UnknownService

log = Logger(namespace="shardtcp.connection")

_ENC_RANK = {"none": 0, "tls": 1, "mtls": 2}


@attrs.define
class TLSFacts:
    """What the client side's encryption was, as the PolicyContext states it."""

    encryption: str = "none"  # none | tls | mtls
    authentication: tuple = ("none",)
    subject: Optional[str] = None
    alpn: Optional[str] = None  # negotiated, when terminated
    ssl: Optional[proxyv2.SSLInfo] = None  # for the SSL TLV, when terminated


class PolicyRefused(Exception):
    """The service's policy refuses this connection; ``reason`` is a slug."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def admit(service: ServiceConfig, facts: TLSFacts) -> PolicyContext:
    """
    Check the service's encryption and authentication requirements against
    what the client side actually had, and return the PolicyContext granted.
    """
    policy = service.policy
    if _ENC_RANK[facts.encryption] < _ENC_RANK[policy.encryption]:
        raise PolicyRefused(
            "policy_encryption",
            f"service {service.id!r} requires encryption {policy.encryption!r}, client has {facts.encryption!r}",
        )
    if policy.authentication != "none" and policy.authentication not in facts.authentication:
        raise PolicyRefused(
            "policy_authentication",
            f"service {service.id!r} requires authentication {policy.authentication!r}",
        )
    return PolicyContext(
        encryption_level=facts.encryption,
        authentication_method=tuple(facts.authentication),
        access_control_list=tuple(policy.acl),
    )


@attrs.define
class ListenerContext:
    """Everything the connections of one listener share."""

    config: ListenerConfig
    names: NameTable
    resolver: object  # ShardResolver
    signer: PolicySigner
    connector: ShardConnector
    metrics: object  # ProxyMetrics
    clock: object  # IReactorTime
    tlv_type: int = 0xE0
    # client ip -> reason string when a threat feed denies it, else None
    admission: Optional[Callable[[str], Optional[str]]] = None
    connections: set = attrs.field(factory=set)
    new_id: Callable[[], str] = new_connection_id
    server_tls: Optional[ServerTLS] = None  # terminate listeners
    upstream_tls: UpstreamTLS = attrs.field(factory=UpstreamTLS)

    def resolver_has(self, service_id: str) -> bool:
        """Whether ``service_id`` names a service (line preambles may)."""
        try:
            self.resolver.service_config(service_id)
        except ResolverError:
            return False
        return True


def _address_pair(peer, host) -> tuple:
    """
    The (source, destination) pair for the PROXY header, in one family:
    v4-mapped IPv6 addresses are unmapped when both are, and a lone IPv4
    address is mapped when the other side is IPv6.
    """
    src = (peer.host, peer.port)
    dst = (host.host, host.port)
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s.version == 6 and s.ipv4_mapped is not None and (d.version == 4 or d.ipv4_mapped is not None):
        src = (str(s.ipv4_mapped), src[1])
        s = s.ipv4_mapped
    if d.version == 6 and d.ipv4_mapped is not None and s.version == 4:
        dst = (str(d.ipv4_mapped), dst[1])
        d = d.ipv4_mapped
    if s.version != d.version:
        if s.version == 4:
            src = ("::ffff:" + src[0], src[1])
        else:
            dst = ("::ffff:" + dst[0], dst[1])
    return src, dst


@implementer(IHandshakeListener)
class UpstreamProtocol(SpliceSideMixin, Protocol):
    """
    The shard side of a connection.

    For ``upstream_tls`` services, ``start_tls`` begins TLS on the same
    connection after the PROXY header went out in clear (as HAProxy's
    ``send-proxy-v2`` on an ``ssl`` server does) and fires once the shard's
    certificate has been verified, or fails when it is not.
    """

    _side = UPSTREAM
    _handshake: Optional[Deferred] = None

    def connectionMade(self) -> None:
        _no_delay(self.transport)

    def start_tls(self, options) -> Deferred:
        self._handshake = Deferred(lambda _: self.transport.abortConnection())
        self.transport.startTLS(options)
        return self._handshake

    def handshakeCompleted(self) -> None:
        d, self._handshake = self._handshake, None
        if d is not None:
            d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        if self._splice is not None:
            self._splice.data(UPSTREAM, data)

    def connectionLost(self, reason) -> None:
        d, self._handshake = self._handshake, None
        if d is not None:
            d.errback(reason)
        elif self._splice is not None:
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


@implementer(IHalfCloseableProtocol)
class ProxyConnection(SpliceSideMixin, Protocol):
    """
    One client connection; see the module docstring for its states.

    The raw transport's events arrive here.  When the listener terminates
    TLS, they are handed to the TLS layer, and the plaintext comes back
    through ``_TerminatedClient`` to ``_client_data``/``_client_eof``/
    ``_client_lost``; ``self._client`` is then the TLS layer, which the
    splice and the refusals write to instead of the raw transport.
    """

    _side = DOWNSTREAM

    def __init__(self, context: ListenerContext) -> None:
        self._ctx = context
        self.state = "new"
        self.connection_id = context.new_id()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._detector: Optional[Detector] = None
        self._identified: Optional[Identified] = None
        self._proxy_parser: Optional[proxyv2.HeaderParser] = None
        self._timer = None
        self._pending = None
        self._lease = None
        self._client_eof_seen = False
        self._client = None
        self._tls = None
        self._service: Optional[str] = None
        self._shard: Optional[str] = None
        self._start = 0.0
        self._connect_seconds = 0.0
        self.facts = TLSFacts()
        self.client = None  # (ip, port) as the PROXY header names it
        self.destination = None

    # -- raw transport events ---------------------------------------------

    def connectionMade(self) -> None:
        ctx = self._ctx
        cfg = ctx.config
        self._client = self.transport
        _no_delay(self.transport)
        ctx.connections.add(self)
        ctx.metrics.accepted.labels(cfg.name).inc()
        ctx.metrics.active.labels(cfg.name).inc()
        self._start = ctx.clock.seconds()
        self.client, self.destination = _address_pair(self.transport.getPeer(), self.transport.getHost())
        self._timer = ctx.clock.callLater(cfg.peek_timeout, self._peek_timed_out)
        if cfg.accept_proxy:
            if not _in_networks(self.client[0], cfg.trusted_proxies):
                self._refuse("untrusted_proxy", f"{self.client[0]} is not in trusted_proxies", "none")
                return
            self.state = "proxy-header"
            self._proxy_parser = proxyv2.HeaderParser(accept_v1=True, accept_v2=True, max_size=4096)
            return
        self._start_peeking()

    def dataReceived(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.dataReceived(data)
        elif self.state == "proxy-header":
            self._proxy_header_data(data)
        else:
            self._client_data(data)

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

    # -- a PROXY header from a trusted load balancer ----------------------

    def _proxy_header_data(self, data: bytes) -> None:
        try:
            header = self._proxy_parser.feed(data)
        except proxyv2.InvalidProxyHeader as e:
            self._refuse("bad_proxy_header", f"invalid PROXY header from {self.client[0]}: {e}", "none")
            return
        if header is None:
            return
        rest = self._proxy_parser.rest
        self._proxy_parser = None
        if header.command == proxyv2.Command.PROXY and header.source and header.destination:
            if header.family in ("INET", "INET6"):
                self.client, self.destination = _address_pair(
                    _Addr(*header.source), _Addr(*header.destination)
                )
        if self._start_peeking() and rest:
            self._client_data(rest)

    # -- plaintext (or pre-TLS) client events -----------------------------

    def _start_peeking(self) -> bool:
        ctx = self._ctx
        if ctx.admission is not None:
            why = ctx.admission(self.client[0])
            if why is not None:
                self._refuse("threat_denied", why, "none")
                return False
        self.state = "peeking"
        cfg = ctx.config
        self._detector = Detector(cfg.identify, max_client_hello=cfg.max_client_hello)
        return True

    def _client_data(self, data: bytes) -> None:
        if self.state == "spliced":
            self._splice.data(DOWNSTREAM, data)
            return
        if self.state == "peeking":
            self._buffer.append(data)
            self._buffered += len(data)
            try:
                identified = self._detector.feed(data)
            except IdentifyError as e:
                self._refuse(e.reason, str(e), e.protocol)
                return
            if identified is not None:
                self._cancel_timer()
                self._client.pauseProducing()
                self._identified = identified
                self._on_identified(identified)
            return
        if self.state in ("connecting", "handshaking"):
            # Bytes in flight when the client was paused, or (terminated
            # TLS) early application data.
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered > self._ctx.config.max_client_hello + 262144:
                self._refuse("too_large", "client sent too much before the shard was connected", "none")
        # closed: dropped

    def _client_eof(self) -> None:
        if self.state == "spliced":
            self._splice.read_closed(DOWNSTREAM)
        elif self.state in ("peeking", "proxy-header"):
            protocol = self._detector.protocol if self._detector is not None else "none"
            self._refuse("eof", "client closed its side before identifying a service", protocol)
        elif self.state in ("connecting", "handshaking"):
            # Carried across once spliced: the shard still answers.
            self._client_eof_seen = True

    def _client_lost(self, reason) -> None:
        ctx = self._ctx
        if self.state == "spliced":
            self._splice.lost(DOWNSTREAM, reason)
            return
        previous, self.state = self.state, "closed"
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        self._release_lease()
        self._cancel_timer()
        if previous == "handshaking":
            why = reason.getErrorMessage() if reason is not None else "closed"
            ctx.metrics.rejected.labels(ctx.config.name, "tls_handshake").inc()
            log.info(
                "connection {id} from {client}: TLS handshake failed: {why}",
                id=self.connection_id,
                client=_fmt(self.client),
                why=why,
            )
        elif previous != "closed":
            ctx.metrics.rejected.labels(ctx.config.name, "client_gone").inc()
            log.info(
                "connection {id} from {client} closed by the client while {state}",
                id=self.connection_id,
                client=_fmt(self.client),
                state=previous,
            )
        self._finish()

    # -- routing ----------------------------------------------------------

    def _on_identified(self, identified: Identified) -> None:
        ctx = self._ctx
        cfg = ctx.config
        name = identified.name
        if name:
            service_id = ctx.names.lookup(name)
            if service_id is None and identified.method == "line" and ctx.resolver_has(name):
                service_id = name
            if service_id is None:
                self._refuse("unknown_service", f"no service is named {name!r}", identified.protocol)
                return
        elif cfg.default_service:
            service_id = cfg.default_service
        else:
            self._refuse("no_service", f"no server name ({identified.method}) and no default_service", identified.protocol)
            return
        self._service = service_id
        if ctx.server_tls is not None and identified.method == "sni":
            self._terminate(identified)
            return
        if identified.tls:
            # TLS passed through end to end.
            self.facts.encryption = "tls"
        self._resolve_and_connect()

    def _terminate(self, identified: Identified) -> None:
        """Start the client's TLS with the certificate for its SNI."""
        ctx = self._ctx
        try:
            service = ctx.resolver.service_config(self._service)
        except ResolverError as e:
            self._refuse("unknown_service", str(e), "tls")
            return
        wants_mtls = service.policy.authentication == "mtls" or service.policy.encryption == "mtls"
        if wants_mtls and not ctx.server_tls.asks_client_cert:
            self._refuse(
                "policy_authentication",
                f"service {service.id!r} requires mTLS but listener {ctx.config.name!r} has no client_ca",
                "tls",
            )
            return
        creator = ctx.server_tls.creator_for(identified.name, require_cert=wants_mtls)
        if creator is None:
            self._refuse("no_certificate", f"no certificate for server name {identified.name!r}", "tls")
            return
        inner = _TerminatedClient(self)
        factory = HalfCloseTLSFactory(creator, False, _OneProtocol(inner), clock=ctx.clock)
        tls = factory.buildProtocol(self.transport.getPeer())
        buffered = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        self.state = "handshaking"
        self._tls = tls
        self._timer = ctx.clock.callLater(ctx.config.peek_timeout, self._handshake_timed_out)
        tls.makeConnection(self.transport)
        if self.state == "handshaking":
            tls.dataReceived(buffered)
        if self.state == "handshaking":
            self.transport.resumeProducing()

    def _handshake_done(self) -> None:
        if self.state != "handshaking":
            return
        self._cancel_timer()
        encryption, authentication, subject, alpn, ssl_info = handshake_facts(self._tls.getHandle())
        self.facts = TLSFacts(
            encryption=encryption, authentication=authentication, subject=subject, alpn=alpn, ssl=ssl_info
        )
        self._client = self._tls
        self._client.pauseProducing()
        self._resolve_and_connect()

    def _resolve_and_connect(self) -> None:
        ctx = self._ctx
        cfg = ctx.config
        identified = self._identified
        protocol = self._answer_protocol()
        request = ConnectionRequest(
            service_id=self._service,
            client=self.client,
            destination=self.destination,
            sni=identified.name if identified.method == "sni" else None,
            alpn=identified.alpn,
            listener=cfg.name,
        )
        try:
            candidates = ctx.resolver.resolve(request)
            self._policy = admit(ctx.resolver.service_config(self._service), self.facts)
        except AccessDenied as e:
            self._refuse("denied", str(e), protocol)
            return
        except UnknownService as e:
            self._refuse("unknown_service", str(e), protocol)
            return
        except NoShardAvailable as e:
            self._refuse("no_shard", str(e), protocol)
            return
        except PolicyRefused as e:
            self._refuse(e.reason, str(e), protocol)
            return
        except ResolverError as e:
            self._refuse("internal", str(e), protocol)
            return
        self._candidates = candidates[: 1 + cfg.retries]
        self.state = "connecting"
        self._attempt(0)

    def _attempt(self, index: int) -> None:
        ctx = self._ctx
        candidate = self._candidates[index]
        shard = candidate.shard
        self._lease = ctx.resolver.lease(shard.shard_id)
        started = ctx.clock.seconds()
        d = ctx.connector.connect(shard, _UPSTREAM_FACTORY, ctx.config.connect_timeout)
        self._pending = d
        d.addCallbacks(
            self._connected,
            self._connect_failed,
            callbackArgs=(index, candidate, started),
            errbackArgs=(index, candidate),
        )

    def _connect_failed(self, failure, index: int, candidate) -> None:
        ctx = self._ctx
        self._pending = None
        self._release_lease()
        shard = candidate.shard
        reason = getattr(failure.value, "reason", "error")
        if self.state != "connecting":
            # The client went away and cancelled the attempt.
            return
        ctx.resolver.record_connect_result(shard.shard_id, False)
        ctx.metrics.upstream_failures.labels(self._service, shard.shard_id, reason).inc()
        log.warn(
            "connection {id}: shard {shard} ({address}) failed: {why}",
            id=self.connection_id,
            shard=shard.shard_id,
            address=str(shard.address),
            why=failure.getErrorMessage(),
        )
        if index + 1 < len(self._candidates):
            self._attempt(index + 1)
        else:
            tried = ", ".join(c.shard.shard_id for c in self._candidates)
            self._refuse(
                "shard_unreachable",
                f"no shard of {self._service!r} could be reached (tried {tried})",
                self._answer_protocol(),
            )

    def _connected(self, upstream: UpstreamProtocol, index: int, candidate, started: float) -> None:
        ctx = self._ctx
        self._pending = None
        shard = candidate.shard
        if self.state != "connecting":
            self._abandon(upstream)
            return
        try:
            header = self._header(shard.shard_id)
        except PolicyTooLarge as e:
            self._abandon(upstream)
            self._refuse("token_too_large", str(e), self._answer_protocol())
            return
        upstream.transport.write(header)
        # The TCP connect time is the latency sample; a TLS handshake on top
        # would add the shard's CPU time to its distance.
        self._connect_seconds = ctx.clock.seconds() - started
        service = ctx.resolver.service_config(self._service)
        if not service.upstream_tls:
            self._ready(upstream, candidate, started)
            return
        d = upstream.start_tls(ctx.upstream_tls.options_for(service, shard))
        d.addTimeout(ctx.config.connect_timeout, ctx.clock)
        self._pending = d
        d.addCallbacks(
            lambda _: self._ready(upstream, candidate, started),
            self._upstream_tls_failed,
            errbackArgs=(upstream, index, candidate),
        )

    def _upstream_tls_failed(self, failure, upstream, index: int, candidate) -> None:
        self._pending = None
        if upstream.transport is not None and upstream.connected:
            upstream.transport.abortConnection()
        if self.state != "connecting":
            self._release_lease()
            return
        why = failure.getErrorMessage() or failure.type.__name__
        log.warn(
            "security: shard {shard} ({address}) failed TLS verification: {why}",
            shard=candidate.shard.shard_id,
            address=str(candidate.shard.address),
            why=why,
            security_event="upstream_tls_verification",
        )
        self._connect_failed(Failure(ShardConnectFailed("tls_verify", f"TLS verification failed: {why}")), index, candidate)

    def _ready(self, upstream: UpstreamProtocol, candidate, started: float) -> None:
        """The shard is connected (and verified): send the bytes, splice."""
        ctx = self._ctx
        self._pending = None
        shard = candidate.shard
        if self.state != "connecting":
            self._abandon(upstream)
            return
        elapsed = ctx.clock.seconds() - started
        ctx.resolver.record_connect_result(shard.shard_id, True, self._connect_seconds)
        ctx.metrics.connect_seconds.labels(self._service).observe(elapsed)
        self._shard = shard.shard_id
        identified = self._identified
        payload = b"".join(self._buffer)
        if self._tls is None:
            payload = payload[identified.consume :]
        self._buffer, self._buffered = [], 0
        if payload:
            upstream.transport.write(payload)
        if identified.reply_when_connected:
            self._client.write(identified.reply_when_connected)
        splice = Splice(
            self._client,
            upstream.transport,
            clock=ctx.clock,
            on_done=self._spliced_done,
            idle_timeout=ctx.config.idle_timeout,
        )
        self._splice = splice
        upstream._splice = splice
        self.state = "spliced"
        # What only the choice needed: keep idle connections small.
        self._detector = None
        self._candidates = None
        ctx.metrics.spliced.labels(ctx.config.name, self._service, shard.shard_id).inc()
        splice.start()
        if self._client_eof_seen:
            splice.read_closed(DOWNSTREAM)
        self._client.resumeProducing()

    def _header(self, shard_id: str) -> bytes:
        """The PROXY v2 header for ``shard_id``, PolicyContext signed for it."""
        ctx = self._ctx
        identified = self._identified
        facts = self.facts
        sni = identified.name if identified.method == "sni" else None
        token = ctx.signer.sign(
            policy=self._policy,
            audience=shard_id,
            connection_id=self.connection_id,
            service=self._service,
            source=self.client,
            destination=self.destination,
            subject=facts.subject,
            sni=sni,
        )
        tlvs = []
        if facts.alpn:
            tlvs.append((proxyv2.PP2_TYPE_ALPN, facts.alpn.encode("ascii", "replace")))
        if identified.name:
            tlvs.append((proxyv2.PP2_TYPE_AUTHORITY, identified.name.encode("utf-8")))
        tlvs.append((proxyv2.PP2_TYPE_UNIQUE_ID, self.connection_id.encode("ascii")))
        if facts.ssl is not None:
            tlvs.append((proxyv2.PP2_TYPE_SSL, facts.ssl.to_bytes()))
        tlvs.append((ctx.tlv_type, token))
        return proxyv2.encode(
            proxyv2.ProxyHeader(
                command=proxyv2.Command.PROXY,
                source=self.client,
                destination=self.destination,
                tlvs=tuple(tlvs),
            )
        )

    def _answer_protocol(self) -> str:
        """
        How a refusal is answered now: in the identified protocol, except
        once the proxy speaks TLS with the client (an alert or status line
        in clear would be garbage inside it; a close says enough).
        """
        return "none" if self._tls is not None else self._identified.protocol

    def _abandon(self, upstream: UpstreamProtocol) -> None:
        """Drop a shard connection this client no longer needs."""
        upstream.transport.abortConnection()
        self._release_lease()

    # -- endings ----------------------------------------------------------

    def _spliced_done(self, stats: SpliceStats) -> None:
        ctx = self._ctx
        name = ctx.config.name
        ctx.metrics.bytes.labels(name, "up").inc(stats.bytes_up)
        ctx.metrics.bytes.labels(name, "down").inc(stats.bytes_down)
        ctx.metrics.ended.labels(name, stats.ended_by or "closed").inc()
        self._release_lease()
        log.info(
            "connection {id} {client} -> {service}/{shard} closed by {ended_by}: "
            "{bytes_up} bytes up, {bytes_down} down, {duration:.3f}s",
            id=self.connection_id,
            client=_fmt(self.client),
            service=self._service,
            shard=self._shard,
            ended_by=stats.ended_by,
            bytes_up=stats.bytes_up,
            bytes_down=stats.bytes_down,
            duration=ctx.clock.seconds() - self._start,
        )
        self.state = "closed"
        self._finish()

    def _refuse(self, reason: str, message: str, protocol: str) -> None:
        """Answer, log, count and close; the connection never reaches a shard."""
        if self.state in ("closed", "spliced"):
            return
        ctx = self._ctx
        handshaking = self.state == "handshaking"
        self.state = "closed"
        self._cancel_timer()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        self._release_lease()
        ctx.metrics.rejected.labels(ctx.config.name, reason).inc()
        log.info(
            "connection {id} from {client} refused ({reason}): {message}",
            id=self.connection_id,
            client=_fmt(self.client),
            reason=reason,
            message=message,
        )
        self._buffer = []
        if handshaking:
            self._client.abortConnection()
            return
        answer = refusal_bytes(reason, protocol)
        if answer:
            self._client.write(answer)
        self._client.loseConnection()

    def _peek_timed_out(self) -> None:
        self._timer = None
        protocol = self._detector.protocol if self._detector is not None else "none"
        what = "PROXY header" if self.state == "proxy-header" else "ClientHello or preamble"
        self._refuse(
            "peek_timeout",
            f"no complete {what} within {self._ctx.config.peek_timeout}s ({self._buffered} bytes received)",
            protocol,
        )

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._refuse("handshake_timeout", f"TLS handshake not done within {self._ctx.config.peek_timeout}s", "none")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _release_lease(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def _finish(self) -> None:
        ctx = self._ctx
        if self in ctx.connections:
            ctx.connections.discard(self)
            ctx.metrics.active.labels(ctx.config.name).dec()


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


@attrs.frozen
class _Addr:
    host: str
    port: int


def _in_networks(ip: str, networks) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == n.version and address in n for n in networks)


def _fmt(address) -> str:
    return format_hostport(*address) if address else "?"


class ProxyFactory(Factory):
    """Builds a ``ProxyConnection`` per accepted client, sharing ``context``."""

    noisy = False

    def __init__(self, context: ListenerContext) -> None:
        self.context = context

    def buildProtocol(self, addr) -> ProxyConnection:
        return ProxyConnection(self.context)
