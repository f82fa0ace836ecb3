"""
Active health checks: one ``HealthChecker`` service per process checks
every shard whose record has a ``health_check``, and tells the resolver.

Kinds
=====

``tcp``
    Connect to the shard's address within ``timeout``, send a PROXY v2
    LOCAL header (``proxyv2.local_header()``: shards expect a PROXY header
    before anything else, and LOCAL tells them "a check, no client"), close.
    Passes when the connect succeeds.
``tls``
    The same connect and LOCAL header, then a TLS handshake on that
    connection, verified exactly as the connection path verifies upstream
    TLS: the service's ``health_ca`` when set, else its ``upstream_ca``
    (the system's trust store when neither is set), the shard's ``server_name`` (default its host) checked with
    service-identity, the proxy's ``upstream_cert`` presented when set.
    Passes when the handshake completes and verifies.
``agent``
    HAProxy's agent-check: connect to ``agent_port`` on the shard's host,
    send nothing (the agent is a separate small text service, not the
    shard's PROXY-protocol port), read one line of at most 128 bytes within
    ``timeout``, and parse it (``shardtcp.resolver.agent`` documents the
    format: ``up 37%``, ``drain``, ``down``, ``weight 50``...). Passes when
    the line parses and does not say down/fail/stopped. Its drain, load and
    weight go to the resolver with every reply.

Every check's connect time (a TCP handshake: one round trip) is a latency
sample for the shard's peak-EWMA (``ShardResolver.record_rtt``).

Rise and fall
=============

Every shard starts HEALTHY (as in HAProxy: a proxy that starts does not
refuse traffic while its first checks run; passive ejection covers a shard
that is dead from the start). ``fall`` failed checks in a row make it
UNHEALTHY; then ``rise`` passing checks in a row make it HEALTHY again,
which starts its slow start. An agent's explicit ``down`` (``fail``,
``stopped``) makes it UNHEALTHY at once: an explicit statement is not
noise. A shard whose check is removed from its record is HEALTHY again.

Timing
======

The first check of each shard runs at a random moment within its first
``interval``, so that shards loaded together are not checked together.
After that, checks start ``interval · (1 ± jitter)`` apart (jitter 15 % by
default, drawn from the injected random source), or as soon as the previous
check ends when it took longer. A check that has not finished after
``timeout`` fails. So a shard that stops answering is out of rotation after
at most ``fall · interval · (1 + jitter) + timeout`` seconds, and back in
after at most ``rise · interval · (1 + jitter) + timeout``.

Everything that touches the network is injected, so tests run in memory:
``reactor`` (time, and the default endpoints), ``endpoint_factory(host,
port, timeout)`` returning an ``IStreamClientEndpoint``, and
``tls_options_for(service, shard)`` returning client TLS options (the
connection path's ``UpstreamTLS.options_for`` has that signature, so the
service tree can share it and its cache).
"""

from __future__ import annotations

import random as _random
from typing import Callable, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shardtcp.model import Config, Health, HealthCheckConfig, ServiceConfig, ShardConfig
from shardtcp.proxyv2 import local_header
from shardtcp.upstream import UpstreamTLS, endpoint_for_address
from shardtcp.resolver.agent import MAX_REPLY, AgentReplyError, AgentReport, parse_agent_reply
from shardtcp.resolver.service import ShardResolver, UnknownShard

log = Logger()

#: Default spread of the check interval, as a share of it (±15 %).
DEFAULT_JITTER = 0.15

EndpointFactory = Callable[[str, int, float], IStreamClientEndpoint]
TLSOptionsFor = Callable[[ServiceConfig, ShardConfig], object]


@attrs.frozen
class CheckResult:
    """
    The outcome of one check: ``ok``, a short ``reason`` for logs and
    status, the connect time in seconds (``rtt``, None when the connect did
    not complete) and the agent's parsed reply, if any.
    """

    ok: bool
    reason: str
    rtt: Optional[float] = None
    report: Optional[AgentReport] = None


def default_endpoint_factory(reactor) -> EndpointFactory:
    """Plain TCP client endpoints, chosen as the connection path chooses them."""

    def endpoint(host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        return endpoint_for_address(reactor, host, port, timeout)

    return endpoint


def DefaultTLSOptions():
    """
    Client TLS options for ``tls`` checks, built as the connection path
    builds them for upstream TLS.  The service tree passes its own
    ``health_tls_options(UpstreamTLS())`` to share one cache; this default
    keeps the checker usable on its own.
    """
    return health_tls_options(UpstreamTLS())


def health_tls_options(upstream: UpstreamTLS) -> TLSOptionsFor:
    """
    ``tls_options_for`` for checks: a service's ``health_ca`` is the trust
    of its checks; without one, checks verify as the connection path does
    (sharing ``upstream``'s cache).  Options with a ``health_ca`` get their
    own cache, so they never stand in for the connection path's.
    """
    own = UpstreamTLS()

    def options_for(service: ServiceConfig, shard):
        if service.health_ca is None:
            return upstream.options_for(service, shard)
        return own.options_for(attrs.evolve(service, upstream_ca=service.health_ca), shard)

    return options_for


def _describe(failure: Failure) -> str:
    message = failure.getErrorMessage()
    name = getattr(failure.type, "__name__", "error")
    return f"{name}: {message}" if message else name


# ---------------------------------------------------------------------------
# One check in flight


@implementer(IHandshakeListener)
class _ProbeProtocol(Protocol):
    """Relays a check connection's events to its ``_Probe``."""

    def __init__(self, probe: "_Probe") -> None:
        self._probe = probe

    def connectionMade(self) -> None:
        self._probe.connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._probe.received(data)

    def handshakeCompleted(self) -> None:
        self._probe.handshake_completed()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._probe.lost(reason)


class _ProbeFactory(Factory):
    noisy = False

    def __init__(self, probe: "_Probe") -> None:
        self._probe = probe

    def buildProtocol(self, addr) -> _ProbeProtocol:
        return _ProbeProtocol(self._probe)


class _Probe:
    """
    One check: connect, then what its kind asks; ``result`` fires once with
    a ``CheckResult`` (never errbacks), at the latest after ``timeout``.
    Cancelling ``result`` aborts the check.
    """

    def __init__(self, kind: str, clock, timeout: float, tls_options=None) -> None:
        self.kind = kind
        self._clock = clock
        self._timeout = timeout
        self._tls_options = tls_options
        self._started = clock.seconds()
        self._connecting: Optional[Deferred] = None
        self._transport = None
        self._buffer = b""
        self._rtt: Optional[float] = None
        self._done = False
        self.result: Deferred = Deferred(self._cancel)
        self._timer: Optional[IDelayedCall] = clock.callLater(timeout, self._timed_out)

    def start(self, endpoint: IStreamClientEndpoint) -> None:
        try:
            d = endpoint.connect(_ProbeFactory(self))
        except Exception as e:
            self._finish(False, f"connect failed: {e}")
            return
        if not self._done:
            self._connecting = d
        d.addCallbacks(self._connect_done, self._connect_failed)

    def _connect_done(self, protocol):
        self._connecting = None
        return protocol

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        self._finish(False, "connect failed: " + _describe(failure))

    def connected(self, transport) -> None:
        if self._done:
            transport.abortConnection()
            return
        self._transport = transport
        self._rtt = self._clock.seconds() - self._started
        if self.kind == "agent":
            return
        transport.write(local_header())
        if self.kind == "tcp":
            self._finish(True, "connected")
            transport.loseConnection()
            return
        try:
            transport.startTLS(self._tls_options)
        except Exception as e:
            self._finish(False, f"TLS could not start: {e}")
            transport.abortConnection()

    def handshake_completed(self) -> None:
        self._finish(True, "TLS handshake verified")
        if self._transport is not None:
            self._transport.loseConnection()

    def received(self, data: bytes) -> None:
        if self.kind != "agent" or self._done:
            return
        self._buffer += data
        line, newline, _ = self._buffer.partition(b"\n")
        if newline:
            self._agent_line(line)
            if self._transport is not None:
                self._transport.loseConnection()
        elif len(self._buffer) >= MAX_REPLY:
            self._finish(False, f"agent reply longer than {MAX_REPLY} bytes")
            if self._transport is not None:
                self._transport.abortConnection()

    def lost(self, reason: Failure) -> None:
        if self._done:
            return
        if self.kind == "agent":
            if self._buffer:
                # HAProxy's agents may end their line by closing.
                self._agent_line(self._buffer)
            else:
                self._finish(False, "agent closed without a reply")
        elif self.kind == "tls":
            self._finish(False, "TLS handshake failed: " + _describe(reason))
        else:
            self._finish(False, "connection lost: " + _describe(reason))

    def _agent_line(self, line: bytes) -> None:
        try:
            report = parse_agent_reply(line)
        except AgentReplyError as e:
            shown = line[:MAX_REPLY].decode("ascii", "replace")
            self._finish(False, f"agent reply {shown!r}: {e}")
            return
        text = line.decode("ascii").strip()
        if report.alive:
            self._finish(True, f"agent: {text}", report)
        else:
            self._finish(False, f"agent: {text}", report)

    def _timed_out(self) -> None:
        self._timer = None
        self._finish(False, f"timed out after {self._timeout:g}s")
        self._abort()

    def _cancel(self, _: Deferred) -> None:
        self._finish(False, "cancelled")
        self._abort()

    def _abort(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        if self._transport is not None:
            self._transport.abortConnection()

    def _finish(self, ok: bool, reason: str, report: Optional[AgentReport] = None) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.result.callback(CheckResult(ok, reason, self._rtt, report))


# ---------------------------------------------------------------------------
# The service


@attrs.define(eq=False)
class _Watched:
    """One checked shard: its records, verdict and schedule."""

    service: ServiceConfig
    shard: ShardConfig
    check: HealthCheckConfig
    verdict: Health = Health.HEALTHY
    streak: int = 0
    checks: int = 0
    failures: int = 0
    last: Optional[CheckResult] = None
    last_at: Optional[float] = None
    next_at: Optional[float] = None
    call: Optional[IDelayedCall] = None
    probe: Optional[_Probe] = None

    def key(self) -> tuple:
        """What, when changed by a reload, restarts the shard's checks."""
        s = self.service
        return (
            self.shard.address,
            self.shard.server_name,
            self.check,
            s.upstream_ca,
            s.health_ca,
            s.upstream_cert,
            s.upstream_key,
        )

    def stop(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.result.cancel()


class HealthChecker(Service):
    """
    Checks every shard that has a ``health_check`` and reports to the
    resolver: ``set_health`` on each rise/fall transition, ``record_rtt``
    with each connect time, ``apply_agent_report`` with each agent reply.

    It follows the resolver's records (``ShardResolver.watch``): shards that
    gain a check start being checked, shards that lose theirs stop and are
    HEALTHY again, shards whose address or check changed start afresh.
    ``random`` (anything with ``random()``) spreads the checks; it need not
    be cryptographic.
    """

    name = "health-checks"

    def __init__(
        self,
        resolver: ShardResolver,
        reactor=None,
        *,
        endpoint_factory: Optional[EndpointFactory] = None,
        tls_options_for: Optional[TLSOptionsFor] = None,
        random=None,
        jitter: float = DEFAULT_JITTER,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be within [0, 1), not {jitter!r}")
        self._resolver = resolver
        self._reactor = reactor
        self._endpoint_factory = endpoint_factory or default_endpoint_factory(reactor)
        self._tls_options_for = tls_options_for or DefaultTLSOptions()
        self._random = random if random is not None else _random.Random()
        self._jitter = jitter
        self._watched: dict[str, _Watched] = {}
        self._unwatch: Optional[Callable[[], None]] = None

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:
        """Start checking, and follow the resolver's records."""
        super().startService()
        self._unwatch = self._resolver.watch(self._sync)
        self._sync()

    def stopService(self):
        """Stop every check; checks in flight are aborted."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        for watched in self._watched.values():
            watched.stop()
        self._watched = {}
        return super().stopService()

    def _sync(self) -> None:
        if not self.running:
            return
        wanted: dict[str, tuple[ServiceConfig, ShardConfig, HealthCheckConfig]] = {}
        present: set[str] = set()
        for service in self._resolver.services():
            for shard in service.shards:
                present.add(shard.id)
                if shard.health_check is not None:
                    wanted[shard.id] = (service, shard, shard.health_check)
        for shard_id in list(self._watched):
            if shard_id not in wanted:
                self._watched.pop(shard_id).stop()
                if shard_id in present:
                    self._forget(shard_id)
        for shard_id, (service, shard, check) in wanted.items():
            watched = self._watched.get(shard_id)
            if watched is None:
                watched = _Watched(service, shard, check)
                self._watched[shard_id] = watched
                self._schedule(watched, self._random.random() * check.interval)
                continue
            old_key = watched.key()
            watched.service, watched.shard, watched.check = service, shard, check
            if watched.key() != old_key:
                watched.stop()
                watched.streak = 0
                self._schedule(watched, self._random.random() * check.interval)

    def _forget(self, shard_id: str) -> None:
        """A shard without a check is healthy unless ejected."""
        try:
            self._resolver.set_health(shard_id, Health.HEALTHY)
        except UnknownShard:
            return
        self._resolver.clear_agent_report(shard_id)

    # -- running checks -----------------------------------------------------

    def _jittered(self, interval: float) -> float:
        spread = self._jitter * (2.0 * self._random.random() - 1.0)
        return interval * (1.0 + spread)

    def _schedule(self, watched: _Watched, delay: float) -> None:
        watched.next_at = self._reactor.seconds() + delay
        watched.call = self._reactor.callLater(delay, self._run, watched)

    def _run(self, watched: _Watched) -> None:
        watched.call = None
        watched.next_at = None
        started = self._reactor.seconds()
        probe = self._start_probe(watched)
        watched.probe = probe
        probe.result.addCallback(self._completed, watched, probe, started)

    def _start_probe(self, watched: _Watched) -> _Probe:
        check, shard = watched.check, watched.shard
        tls_options = None
        if check.kind == "tls":
            try:
                tls_options = self._tls_options_for(watched.service, shard)
            except Exception as e:
                probe = _Probe(check.kind, self._reactor, check.timeout)
                probe._finish(False, f"TLS options: {e}")
                return probe
        probe = _Probe(check.kind, self._reactor, check.timeout, tls_options)
        port = check.agent_port if check.kind == "agent" else shard.address.port
        assert port is not None
        try:
            endpoint = self._endpoint_factory(shard.address.host, port, check.timeout)
        except Exception as e:
            probe._finish(False, f"no endpoint: {e}")
            return probe
        probe.start(endpoint)
        return probe

    def _completed(
        self, result: CheckResult, watched: _Watched, probe: _Probe, started: float
    ) -> None:
        if watched.probe is not probe or self._watched.get(watched.shard.id) is not watched:
            return  # stopped, or replaced by a reload meanwhile
        watched.probe = None
        now = self._reactor.seconds()
        shard_id = watched.shard.id
        watched.checks += 1
        watched.last, watched.last_at = result, now
        if not result.ok:
            watched.failures += 1
        if result.rtt is not None:
            self._resolver.record_rtt(shard_id, result.rtt)
        if result.report is not None:
            self._resolver.apply_agent_report(shard_id, result.report)
        self._judge(watched, result)
        delay = max(0.0, self._jittered(watched.check.interval) - (now - started))
        self._schedule(watched, delay)

    def _judge(self, watched: _Watched, result: CheckResult) -> None:
        check = watched.check
        old = watched.verdict
        if result.report is not None and not result.report.alive:
            watched.verdict, watched.streak = Health.UNHEALTHY, 0
        elif result.ok:
            if old is Health.UNHEALTHY:
                watched.streak += 1
                if watched.streak >= check.rise:
                    watched.verdict, watched.streak = Health.HEALTHY, 0
            else:
                watched.streak = 0
        else:
            if old is Health.HEALTHY:
                watched.streak += 1
                if watched.streak == 1:
                    log.info(
                        "health check of shard {shard} failed: {reason}",
                        shard=watched.shard.id,
                        reason=result.reason,
                    )
                if watched.streak >= check.fall:
                    watched.verdict, watched.streak = Health.UNHEALTHY, 0
            else:
                watched.streak = 0
        if watched.verdict is old:
            return
        if watched.verdict is Health.UNHEALTHY:
            log.warn(
                "shard {shard} is down ({kind} check: {reason})",
                shard=watched.shard.id,
                kind=check.kind,
                reason=result.reason,
            )
        else:
            log.info(
                "shard {shard} is up again ({kind} check: {reason})",
                shard=watched.shard.id,
                kind=check.kind,
                reason=result.reason,
            )
        try:
            self._resolver.set_health(watched.shard.id, watched.verdict)
        except UnknownShard:
            pass

    # -- status -------------------------------------------------------------

    def status(self) -> dict:
        """
        Return each checked shard's check state as plain JSON types: kind,
        verdict, the current streak, counters, the last result and when the
        next check is due.
        """
        shards = {}
        for shard_id, w in self._watched.items():
            last = w.last
            shards[shard_id] = {
                "kind": w.check.kind,
                "interval": w.check.interval,
                "rise": w.check.rise,
                "fall": w.check.fall,
                "verdict": w.verdict.value,
                "streak": w.streak,
                "checks": w.checks,
                "failures": w.failures,
                "last_ok": None if last is None else last.ok,
                "last_reason": None if last is None else last.reason,
                "last_rtt_ms": (
                    None if last is None or last.rtt is None else last.rtt * 1000.0
                ),
                "last_at": w.last_at,
                "next_at": w.next_at,
            }
        return {"shards": shards}


def build_health_service(
    config: Config, resolver: ShardResolver, reactor=None, **hooks
) -> Optional[HealthChecker]:
    """
    Return the ``HealthChecker`` for a configuration, or None when nothing
    can ever need checking (static records, and no shard has a
    ``health_check``). ``hooks`` go to ``HealthChecker``:
    ``endpoint_factory``, ``tls_options_for``, ``random``, ``jitter``.
    """
    if config.registry.kind == "static" and not any(
        shard.health_check is not None
        for service in config.services
        for shard in service.shards
    ):
        return None
    return HealthChecker(resolver, reactor, **hooks)
