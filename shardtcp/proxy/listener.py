"""
One client connection's life: identify, resolve, connect, header, splice.

``ProxyFactory`` is built once per ``[[listener]]`` with everything its
connections need (``ListenerContext``); ``ProxyConnection`` is the state
machine of one connection:

``peeking``
    bytes are buffered and fed to the ``Detector`` (bounded by
    ``max_client_hello`` and ``peek_timeout``) until the service is known;
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
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from shardtcp import proxyv2
from shardtcp.identify.detect import Detector, IdentifyError, Identified
from shardtcp.identify.names import NameTable
from shardtcp.model import ConnectionRequest, ListenerConfig, ServiceConfig, format_hostport
from shardtcp.policy import PolicyContext, PolicySigner, PolicyTooLarge, new_connection_id
from shardtcp.proxy.connector import ShardConnectFailed, ShardConnector
from shardtcp.proxy.refusal import refusal_bytes
from shardtcp.proxy.splice import DOWNSTREAM, UPSTREAM, Splice, SpliceSideMixin, SpliceStats
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


class UpstreamProtocol(SpliceSideMixin, Protocol):
    """The shard side of a spliced connection."""

    _side = UPSTREAM

    def dataReceived(self, data: bytes) -> None:
        self._splice.data(UPSTREAM, data)

    def connectionLost(self, reason) -> None:
        if self._splice is not None:
            self._splice.lost(UPSTREAM, reason)


_UPSTREAM_FACTORY = Factory.forProtocol(UpstreamProtocol)
_UPSTREAM_FACTORY.noisy = False


@implementer(IHalfCloseableProtocol)
class ProxyConnection(SpliceSideMixin, Protocol):
    """One client connection; see the module docstring for its states."""

    _side = DOWNSTREAM

    def __init__(self, context: ListenerContext) -> None:
        self._ctx = context
        self.state = "new"
        self.connection_id = context.new_id()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._detector: Optional[Detector] = None
        self._identified: Optional[Identified] = None
        self._peek_timer = None
        self._pending = None
        self._lease = None
        self._client_eof = False
        self._service: Optional[str] = None
        self._shard: Optional[str] = None
        self._refused_reason: Optional[str] = None
        self._start = 0.0
        self.facts = TLSFacts()
        self.client = None  # (ip, port) as the PROXY header names it
        self.destination = None

    # -- connection events ------------------------------------------------

    def connectionMade(self) -> None:
        ctx = self._ctx
        cfg = ctx.config
        ctx.connections.add(self)
        ctx.metrics.accepted.labels(cfg.name).inc()
        ctx.metrics.active.labels(cfg.name).inc()
        self._start = ctx.clock.seconds()
        self.client, self.destination = _address_pair(self.transport.getPeer(), self.transport.getHost())
        if ctx.admission is not None:
            why = ctx.admission(self.client[0])
            if why is not None:
                self._refuse("threat_denied", why, "none")
                return
        self.state = "peeking"
        self._detector = Detector(cfg.identify, max_client_hello=cfg.max_client_hello)
        self._peek_timer = ctx.clock.callLater(cfg.peek_timeout, self._peek_timed_out)

    def dataReceived(self, data: bytes) -> None:
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
                self._cancel_peek_timer()
                self.transport.pauseProducing()
                self._identified = identified
                self._route(identified)
            return
        if self.state == "connecting":
            # Bytes already in flight when the client was paused.
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered > self._ctx.config.max_client_hello + 262144:
                self._refuse("too_large", "client sent too much before the shard was connected", "none")
            return
        # closed: drop silently

    def readConnectionLost(self) -> None:
        if self.state == "spliced":
            self._splice.read_closed(DOWNSTREAM)
        elif self.state == "peeking":
            protocol = "tls" if self._buffer and self._buffer[0][:1] == b"\x16" else "none"
            self._refuse("eof", "client closed its side before identifying a service", protocol)
        elif self.state == "connecting":
            # Carried across once spliced: the shard still answers.
            self._client_eof = True

    def connectionLost(self, reason) -> None:
        ctx = self._ctx
        if self.state == "spliced":
            self._splice.lost(DOWNSTREAM, reason)
            return
        previous, self.state = self.state, "closed"
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        self._release_lease()
        self._cancel_peek_timer()
        if previous != "closed":
            ctx.metrics.rejected.labels(ctx.config.name, "client_gone").inc()
            log.info(
                "connection {id} from {client} closed by the client while {state}",
                id=self.connection_id,
                client=_fmt(self.client),
                state=previous,
            )
        self._finish()

    # -- routing ----------------------------------------------------------

    def _route(self, identified: Identified) -> None:
        ctx = self._ctx
        cfg = ctx.config
        name = identified.name
        if name:
            service_id = ctx.names.lookup(name)
            if service_id is None:
                self._refuse("unknown_service", f"no service is named {name!r}", identified.protocol)
                return
        elif cfg.default_service:
            service_id = cfg.default_service
        else:
            self._refuse("no_service", f"no server name ({identified.method}) and no default_service", identified.protocol)
            return
        self._service = service_id
        if identified.tls and self.facts.encryption == "none":
            # TLS passed through end to end.
            self.facts.encryption = "tls"
        request = ConnectionRequest(
            service_id=service_id,
            client=self.client,
            destination=self.destination,
            sni=name if identified.method == "sni" else None,
            alpn=identified.alpn,
            listener=cfg.name,
        )
        try:
            candidates = ctx.resolver.resolve(request)
            self._policy = admit(ctx.resolver.service_config(service_id), self.facts)
        except AccessDenied as e:
            self._refuse("denied", str(e), identified.protocol)
            return
        except UnknownService as e:
            self._refuse("unknown_service", str(e), identified.protocol)
            return
        except NoShardAvailable as e:
            self._refuse("no_shard", str(e), identified.protocol)
            return
        except PolicyRefused as e:
            self._refuse(e.reason, str(e), identified.protocol)
            return
        except ResolverError as e:
            self._refuse(getattr(e, "reason", "internal"), str(e), identified.protocol)
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
            callbackArgs=(candidate, started),
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
                self._identified.protocol,
            )

    def _connected(self, upstream: UpstreamProtocol, candidate, started: float) -> None:
        ctx = self._ctx
        self._pending = None
        shard = candidate.shard
        if self.state != "connecting":
            upstream.transport.abortConnection()
            self._release_lease()
            return
        elapsed = ctx.clock.seconds() - started
        ctx.resolver.record_connect_result(shard.shard_id, True, elapsed)
        ctx.metrics.connect_seconds.labels(self._service).observe(elapsed)
        try:
            header = self._header(shard.shard_id)
        except PolicyTooLarge as e:
            upstream.transport.abortConnection()
            self._release_lease()
            self._refuse("token_too_large", str(e), self._identified.protocol)
            return
        self._shard = shard.shard_id
        identified = self._identified
        payload = b"".join(self._buffer)[identified.consume :]
        self._buffer = []
        self._buffered = 0
        upstream.transport.write(header + payload)
        if identified.reply_when_connected:
            self.transport.write(identified.reply_when_connected)
        splice = Splice(
            self.transport,
            upstream.transport,
            clock=ctx.clock,
            on_done=self._spliced_done,
            idle_timeout=ctx.config.idle_timeout,
        )
        self._splice = splice
        upstream._splice = splice
        self.state = "spliced"
        ctx.metrics.spliced.labels(ctx.config.name, self._service, shard.shard_id).inc()
        splice.start()
        if self._client_eof:
            splice.read_closed(DOWNSTREAM)
        self.transport.resumeProducing()

    def _header(self, shard_id: str) -> bytes:
        """The PROXY v2 header for ``shard_id``, PolicyContext signed for it."""
        ctx = self._ctx
        identified = self._identified
        facts = self.facts
        token = ctx.signer.sign(
            policy=self._policy,
            audience=shard_id,
            connection_id=self.connection_id,
            service=self._service,
            source=self.client,
            destination=self.destination,
            subject=facts.subject,
            sni=identified.name if identified.method == "sni" else None,
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
        self.state = "closed"
        self._refused_reason = reason
        self._cancel_peek_timer()
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
        answer = refusal_bytes(reason, protocol)
        if answer:
            self.transport.write(answer)
        self._buffer = []
        self.transport.loseConnection()

    def _peek_timed_out(self) -> None:
        self._peek_timer = None
        protocol = "tls" if self._buffer and self._buffer[0][:1] == b"\x16" else "none"
        self._refuse(
            "peek_timeout",
            f"no complete ClientHello or preamble within {self._ctx.config.peek_timeout}s "
            f"({self._buffered} bytes received)",
            protocol,
        )

    def _cancel_peek_timer(self) -> None:
        if self._peek_timer is not None and self._peek_timer.active():
            self._peek_timer.cancel()
        self._peek_timer = None

    def _release_lease(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def _finish(self) -> None:
        ctx = self._ctx
        if self in ctx.connections:
            ctx.connections.discard(self)
            ctx.metrics.active.labels(ctx.config.name).dec()


def _fmt(address) -> str:
    return format_hostport(*address) if address else "?"


class ProxyFactory(Factory):
    """Builds a ``ProxyConnection`` per accepted client, sharing ``context``."""

    noisy = False

    def __init__(self, context: ListenerContext) -> None:
        self.context = context

    def buildProtocol(self, addr) -> ProxyConnection:
        return ProxyConnection(self.context)
