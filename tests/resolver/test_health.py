"""
Tests for shardtcp.resolver.health and shardtcp.resolver.agent: the agent
reply format, each kind of check over an in-memory network, rise/fall and
jitter on an injected clock, and the scenarios of issue 4 §8 (a shard that
stops answering leaves and comes back through slow start; an agent's drain;
a load report that cannot hide connections). No sockets, no wall clock.
"""

from __future__ import annotations

import os
import random
from typing import Callable, Optional, Union

import attrs
from OpenSSL import SSL
from twisted.internet import ssl as tssl
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from shardtcp import proxyv2
from shardtcp.model import (
    Address,
    Config,
    ConnectionRequest,
    Health,
    HealthCheckConfig,
    Location,
    ProxyConfig,
    RegistryConfig,
    ServiceConfig,
    ShardConfig,
    SigningConfig,
)
from shardtcp.example.pki import CertificateAuthority
from shardtcp.resolver.agent import MAX_REPLY, AgentReplyError, AgentReport, parse_agent_reply
from shardtcp.resolver.health import (
    DEFAULT_JITTER,
    DefaultTLSOptions,
    HealthChecker,
    build_health_service,
)
from shardtcp.resolver.service import ShardResolver

NEW_YORK = Location(40.71, -74.0, "us-east")
CLIENT = "198.51.100.7"
HOST = "127.0.0.1"


# ---------------------------------------------------------------------------
# The agent reply format


class AgentReplyTests(SynchronousTestCase):
    """parse_agent_reply: the documented words, and nothing else."""

    def test_examples(self) -> None:
        """The issue's examples parse to what the format says."""
        self.assertEqual(parse_agent_reply(b"up 37%\n"), AgentReport("up", None, 0.37, None))
        self.assertEqual(parse_agent_reply(b"drain\r\n"), AgentReport("up", "drain"))
        self.assertEqual(parse_agent_reply(b"down"), AgentReport("down"))
        self.assertEqual(parse_agent_reply(b"weight 50"), AgentReport(weight_percent=50.0))

    def test_combined_and_separators(self) -> None:
        """Words combine, separated by spaces, tabs or commas, in any case."""
        report = parse_agent_reply("UP,\tReady, 80%, weight 75%")
        self.assertEqual(report, AgentReport("up", "ready", 0.8, 75.0))
        self.assertTrue(report.alive)

    def test_down_words(self) -> None:
        """down, fail and stopped make the report not alive; maint drains."""
        for word in ("down", "fail", "stopped"):
            self.assertFalse(parse_agent_reply(word).alive)
        self.assertEqual(parse_agent_reply("maint").administrative, "maint")

    def test_description(self) -> None:
        """Text after # is a description, never parsed."""
        report = parse_agent_reply(b"down # disk 100% full, weight 0\n")
        self.assertEqual((report.operational, report.load, report.description),
                         ("down", None, "disk 100% full, weight 0"))

    def test_weight_capped(self) -> None:
        """A weight above 100% is read as 100%: an agent cannot raise its share."""
        self.assertEqual(parse_agent_reply("weight 250").weight_percent, 100.0)
        self.assertEqual(parse_agent_reply("weight 12.5%").weight_percent, 12.5)

    def test_refused(self) -> None:
        """Every malformed reply is refused with a reason."""
        bad = {
            b"": "empty reply",
            b"  # only a comment": "empty reply",
            b"up down": "both 'up' and 'down'",
            b"drain ready": "both 'drain' and 'ready'",
            b"up 50% 60%": "load given twice",
            b"101%": "load 101% is above 100%",
            b"weight": "weight without a number",
            b"weight heavy": "weight 'heavy' is not a number",
            b"weight 5 weight 6": "weight given twice",
            b"upp": "unknown word 'upp'",
            b"-5%": "unknown word '-5%'",
            b"up\nup": "reply holds more than one line",
            "up \u00e9".encode(): "reply is not ASCII",
            b"up " + b" " * MAX_REPLY: f"reply longer than {MAX_REPLY} bytes",
        }
        for line, reason in bad.items():
            error = self.assertRaises(AgentReplyError, parse_agent_reply, line)
            self.assertEqual(str(error), reason, line)


# ---------------------------------------------------------------------------
# An in-memory network


class FakeTransport:
    """A client transport in memory: records writes, reports its closing."""

    def __init__(self, protocol: Protocol, peer: "Peer") -> None:
        self.protocol = protocol
        self.peer = peer
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.tls_options = None
        self.written_before_tls: Optional[bytes] = None

    @property
    def value(self) -> bytes:
        return b"".join(self.written)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def loseConnection(self) -> None:
        self._close(ConnectionDone())

    def abortConnection(self) -> None:
        self.aborted = True
        self._close(ConnectionAborted())

    def _close(self, reason: Exception) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(reason))

    def startTLS(self, options) -> None:
        self.tls_options = options
        self.written_before_tls = self.value
        if self.peer.tls == "ok":
            self.protocol.handshakeCompleted()
        elif self.peer.tls == "fail":
            self.closed = True
            self.protocol.connectionLost(
                Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
            )


@attrs.define
class Peer:
    """
    How one host:port behaves: ``mode`` accept, refuse or hang; a connect
    ``delay`` (clock seconds); a ``reply`` written once connected (bytes, or
    a callable returning them); ``close`` after the reply; ``tls`` ok, fail
    or hang for the handshake.
    """

    mode: str = "accept"
    delay: float = 0.0
    reply: Union[bytes, Callable[[], bytes], None] = None
    close: bool = False
    tls: str = "ok"


class FakeNetwork:
    """Peers by (host, port), and every connection attempt made to them."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.peers: dict[tuple[str, int], Peer] = {}
        self.attempts: list[tuple[str, int, float, float]] = []
        self.transports: list[FakeTransport] = []

    def peer(self, port: int, host: str = HOST) -> Peer:
        return self.peers.setdefault((host, port), Peer())

    def endpoint(self, host: str, port: int, timeout: float) -> "FakeEndpoint":
        return FakeEndpoint(self, host, port, timeout)

    def to(self, port: int) -> list[FakeTransport]:
        return [t for t in self.transports if t.peer is self.peer(port)]

    def attempts_to(self, port: int) -> list[float]:
        return [when for _, p, _, when in self.attempts if p == port]


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    def __init__(self, network: FakeNetwork, host: str, port: int, timeout: float) -> None:
        self.network, self.host, self.port, self.timeout = network, host, port, timeout

    def connect(self, factory) -> Deferred:
        network = self.network
        network.attempts.append((self.host, self.port, self.timeout, network.clock.seconds()))
        peer = network.peer(self.port, self.host)
        pending = []
        d: Deferred = Deferred(lambda _: [c.cancel() for c in pending if c.active()])
        if peer.mode == "refuse":
            d.errback(ConnectionRefusedError())
        elif peer.mode == "accept":

            def complete() -> None:
                protocol = factory.buildProtocol(None)
                transport = FakeTransport(protocol, peer)
                network.transports.append(transport)
                protocol.makeConnection(transport)
                d.callback(protocol)
                reply = peer.reply() if callable(peer.reply) else peer.reply
                if reply is not None and not transport.closed:
                    protocol.dataReceived(reply)
                if peer.close:
                    transport.loseConnection()

            if peer.delay:
                pending.append(network.clock.callLater(peer.delay, complete))
            else:
                complete()
        return d


# ---------------------------------------------------------------------------
# Set-up


def checked(
    shard_id: str,
    port: int,
    kind: str = "tcp",
    *,
    interval: float = 2.0,
    timeout: float = 1.0,
    rise: int = 2,
    fall: int = 3,
    agent_port: Optional[int] = None,
    capacity: int = 1000,
    **kw,
) -> ShardConfig:
    return ShardConfig(
        id=shard_id,
        address=Address(HOST, port),
        location=NEW_YORK,
        capacity=capacity,
        security_score=90.0,
        health_check=HealthCheckConfig(
            kind=kind, interval=interval, timeout=timeout, rise=rise, fall=fall,
            agent_port=agent_port,
        ),
        **kw,
    )


def config_for(shards, **service) -> Config:
    return Config(
        proxy=ProxyConfig(id="edge-test-1", location=NEW_YORK),
        signing=SigningConfig(private_key="/nonexistent/policy.pem", kid="policy-1"),
        services=(ServiceConfig(id="api", names=("api.example.test",), shards=tuple(shards),
                                **service),),
    )


def run_for(clock: Clock, seconds: float, step: float = 0.01) -> None:
    """Advance ``clock`` by ``seconds`` in steps of ``step``."""
    end = clock.seconds() + seconds
    while clock.seconds() + step < end:
        clock.advance(step)
    clock.advance(max(0.0, end - clock.seconds()))


class Rig:
    """A resolver and a health checker sharing one clock and fake network."""

    def __init__(self, case: SynchronousTestCase, shards, seed: int = 1, **checker) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.network = FakeNetwork(self.clock)
        self.config = config_for(shards)
        self.resolver = ShardResolver(self.config, clock=self.clock, random=random.Random(seed))
        checker.setdefault("endpoint_factory", self.network.endpoint)
        checker.setdefault("random", random.Random(seed + 1))
        self.checker = HealthChecker(self.resolver, self.clock, **checker)
        self.checker.startService()
        case.addCleanup(self.stop)

    def stop(self) -> None:
        if self.checker.running:
            self.checker.stopService()

    def info(self, shard_id: str):
        return {i.shard_id: i for i in self.resolver.get_shard_info("api")}[shard_id]

    def health(self, shard_id: str) -> Health:
        return self.info(shard_id).health

    def run_for(self, seconds: float, step: float = 0.01) -> None:
        """
        Let ``seconds`` pass in small steps (``Clock.advance`` runs every
        call that falls due at the final time, which would hide timeouts).
        """
        run_for(self.clock, seconds, step)

    def step_until(self, predicate, limit: float, step: float = 0.05) -> float:
        """Advance in small steps until ``predicate()``; return the time taken."""
        start = self.clock.seconds()
        while not predicate():
            if self.clock.seconds() - start > limit:
                raise AssertionError(f"not reached within {limit} s")
            self.clock.advance(step)
        return self.clock.seconds() - start

    def first(self) -> str:
        request = ConnectionRequest(service_id="api", client=(CLIENT, 5000))
        return self.resolver.resolve(request)[0].shard.shard_id


# ---------------------------------------------------------------------------
# The kinds of check


class TCPCheckTests(SynchronousTestCase):
    """tcp: connect, send a LOCAL header, close."""

    def test_sends_local_header_and_closes(self) -> None:
        """
        A tcp check connects to the shard's own port with the check's
        timeout, writes exactly one PROXY v2 LOCAL header, and closes
        cleanly.
        """
        rig = Rig(self, [checked("s1", 9001)])
        rig.run_for(2.0)
        [(host, port, timeout, _)] = rig.network.attempts
        self.assertEqual((host, port, timeout), (HOST, 9001, 1.0))
        [transport] = rig.network.transports
        self.assertEqual(transport.value, proxyv2.local_header())
        header, rest = proxyv2.parse(transport.value)
        self.assertEqual((header.command, rest), (proxyv2.Command.LOCAL, b""))
        self.assertTrue(transport.closed)
        self.assertFalse(transport.aborted)
        status = rig.checker.status()["shards"]["s1"]
        self.assertEqual((status["last_ok"], status["last_reason"]), (True, "connected"))

    def test_refused_and_timeout(self) -> None:
        """
        A refused connect fails at once; one that hangs fails after the
        timeout, and its attempt is cancelled.
        """
        rig = Rig(self, [checked("s1", 9001), checked("s2", 9002)])
        rig.network.peer(9001).mode = "refuse"
        rig.network.peer(9002).mode = "hang"
        rig.run_for(3.5)
        status = rig.checker.status()["shards"]
        self.assertEqual(status["s1"]["last_ok"], False)
        self.assertTrue(status["s1"]["last_reason"].startswith("connect failed: "), status)
        self.assertEqual(status["s2"]["last_reason"], "timed out after 1s")
        self.assertEqual(rig.network.transports, [])

    def test_connect_time_is_latency_sample(self) -> None:
        """A check's connect time reaches the resolver's measured latency."""
        rig = Rig(self, [checked("s1", 9001)])
        rig.network.peer(9001).delay = 0.05
        rig.run_for(2.1)
        explanation = rig.resolver.explain(ConnectionRequest("api", (CLIENT, 1)))
        measured = explanation.shards[0].evaluation.details["measured_rtt_ms"]
        self.assertAlmostEqual(measured, 50.0)
        self.assertAlmostEqual(rig.checker.status()["shards"]["s1"]["last_rtt_ms"], 50.0)


class AgentCheckTests(SynchronousTestCase):
    """agent: connect to agent_port, send nothing, read one line."""

    def rig(self, reply, close=False) -> Rig:
        rig = Rig(self, [checked("s1", 9001, "agent", agent_port=9101)])
        rig.network.peer(9101).reply = reply
        rig.network.peer(9101).close = close
        return rig

    def test_reads_a_line_sending_nothing(self) -> None:
        """
        The check connects to agent_port (not the shard's port), writes
        nothing, not even a PROXY header, and applies the reply.
        """
        rig = self.rig(b"up 40% weight 50\n")
        rig.run_for(2.0)
        self.assertEqual([a[1] for a in rig.network.attempts], [9101])
        [transport] = rig.network.transports
        self.assertEqual(transport.value, b"")
        self.assertTrue(transport.closed)
        info = rig.info("s1")
        self.assertEqual((info.load, info.weight, info.health), (0.4, 0.5, Health.HEALTHY))
        self.assertEqual(rig.checker.status()["shards"]["s1"]["last_reason"], "agent: up 40% weight 50")

    def test_line_ended_by_close(self) -> None:
        """An agent that closes instead of writing a newline is understood."""
        rig = self.rig(b"up 25%", close=True)
        rig.run_for(2.0)
        self.assertEqual(rig.info("s1").load, 0.25)
        self.assertTrue(rig.checker.status()["shards"]["s1"]["last_ok"])

    def test_bad_replies_fail(self) -> None:
        """
        Garbage, an over-long line, silence then close, and silence until
        the timeout are failed checks, each with its reason.
        """
        cases = [
            (b"hello there\n", False, "agent reply 'hello there': unknown word 'hello'"),
            (b"u" * 200, False, "agent reply longer than 128 bytes"),
            (None, True, "agent closed without a reply"),
            (None, False, "timed out after 1s"),
        ]
        for reply, close, reason in cases:
            rig = self.rig(reply, close)
            rig.run_for(2.0)
            rig.run_for(1.0)
            status = rig.checker.status()["shards"]["s1"]
            self.assertEqual((status["last_ok"], status["last_reason"]), (False, reason))
            rig.stop()

    def test_down_is_immediate(self) -> None:
        """
        An explicit "down" makes the shard UNHEALTHY at the first reply,
        without waiting for fall (3) checks; "up" needs rise (2) replies.
        """
        rig = self.rig(b"down # maintenance\n")
        rig.run_for(2.0)
        self.assertEqual(rig.health("s1"), Health.UNHEALTHY)
        rig.network.peer(9101).reply = b"up\n"
        taken = rig.step_until(lambda: rig.health("s1") is Health.HEALTHY, 10)
        interval = 2.0
        self.assertTrue(
            interval * (1 - DEFAULT_JITTER) <= taken <= 2 * interval * (1 + DEFAULT_JITTER),
            taken,
        )


class TLSCheckTests(SynchronousTestCase):
    """tls: the LOCAL header in clear, then a verified handshake."""

    def rig(self, outcome: str, **checker) -> Rig:
        shard = checked("s1", 9001, "tls", server_name="s1.shards.test")
        rig = Rig(self, [shard], **checker)
        rig.network.peer(9001).tls = outcome
        return rig

    def test_handshake_passes(self) -> None:
        """
        The check asks tls_options_for(service, shard) for its options,
        writes the LOCAL header before starting TLS with them, and passes
        when the handshake completes.
        """
        asked = []
        options = object()

        def tls_options_for(service, shard):
            asked.append((service.id, shard.id, shard.server_name))
            return options

        rig = self.rig("ok", tls_options_for=tls_options_for)
        rig.run_for(2.0)
        self.assertEqual(asked, [("api", "s1", "s1.shards.test")])
        [transport] = rig.network.transports
        self.assertIs(transport.tls_options, options)
        self.assertEqual(transport.written_before_tls, proxyv2.local_header())
        status = rig.checker.status()["shards"]["s1"]
        self.assertEqual((status["last_ok"], status["last_reason"]), (True, "TLS handshake verified"))

    def test_failed_handshake_and_options(self) -> None:
        """
        A handshake that fails verification fails the check; so does a
        hook that cannot build options, without connecting at all.
        """
        rig = self.rig("fail", tls_options_for=lambda service, shard: object())
        rig.run_for(2.0)
        status = rig.checker.status()["shards"]["s1"]
        self.assertFalse(status["last_ok"])
        self.assertIn("TLS handshake failed: Error", status["last_reason"])
        rig.stop()

        def broken(service, shard):
            raise OSError("no such file: shards-ca.pem")

        rig = self.rig("ok", tls_options_for=broken)
        rig.run_for(2.0)
        status = rig.checker.status()["shards"]["s1"]
        self.assertEqual(status["last_reason"], "TLS options: no such file: shards-ca.pem")
        self.assertEqual(rig.network.attempts, [])

    def test_handshake_timeout(self) -> None:
        """A handshake that never completes fails after the timeout, aborted."""
        rig = self.rig("hang", tls_options_for=lambda service, shard: object())
        rig.run_for(3.0)
        status = rig.checker.status()["shards"]["s1"]
        self.assertEqual(status["last_reason"], "timed out after 1s")
        self.assertTrue(rig.network.transports[0].aborted)


# -- real TLS, in memory -----------------------------------------------------


class _Relay(Protocol):
    """What the pump delivers to: whatever protocol is on top right now."""

    def __init__(self, top: Protocol) -> None:
        self.top = top

    def makeConnection(self, transport) -> None:
        self.top.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.top.dataReceived(data)

    def connectionLost(self, reason) -> None:
        self.top.connectionLost(reason)


class _Raw:
    """The bytes-level side of a TLSPipe, for the TLS layer to write through."""

    def __init__(self, pipe: "TLSPipe") -> None:
        self._pipe = pipe

    def write(self, data: bytes) -> None:
        iosim.FakeTransport.write(self._pipe, data)

    def writeSequence(self, data) -> None:
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        iosim.FakeTransport.loseConnection(self._pipe)

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)


class TLSPipe(iosim.FakeTransport):
    """An in-memory transport whose startTLS inserts a real TLS layer."""

    def __init__(self, protocol: Protocol, isServer: bool, clock: Clock) -> None:
        self.relay = _Relay(protocol)
        super().__init__(self.relay, isServer)
        self._clock = clock
        self._tls: Optional[TLSMemoryBIOProtocol] = None

    def startTLS(self, options, beNormal=True) -> None:
        factory = TLSMemoryBIOFactory(options, not self.isServer, None, clock=self._clock)
        tls = TLSMemoryBIOProtocol(factory, self.relay.top, False)
        self.relay.top = tls
        self._tls = tls
        tls.makeConnection(_Raw(self))

    def write(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.write(data)
        else:
            super().write(data)

    def loseConnection(self) -> None:
        if self._tls is not None:
            self._tls.loseConnection()
        else:
            super().loseConnection()


@implementer(IHandshakeListener)
class LocalThenTLSShard(Protocol):
    """A shard's first steps: read the PROXY header in clear, then TLS."""

    def __init__(self, options) -> None:
        self.options = options
        self.parser = proxyv2.HeaderParser()
        self.header = None
        self.handshakes = 0

    def dataReceived(self, data: bytes) -> None:
        if self.header is not None:
            return
        self.header = self.parser.feed(data)
        if self.header is None:
            return
        self.transport.startTLS(self.options)
        if self.parser.rest:
            self.transport.relay.top.dataReceived(self.parser.rest)

    def handshakeCompleted(self) -> None:
        self.handshakes += 1


class RealTLSCheckTests(SynchronousTestCase):
    """
    DefaultTLSOptions verifies as upstream TLS does: the service's CA and
    the shard's server_name, with a real handshake pumped in memory.
    """

    def setUp(self) -> None:
        self.ca = CertificateAuthority()
        directory = self.mktemp()
        os.makedirs(directory)
        self.ca_path = self.ca.write(directory)

    def check(self, certificate_names: list[str], upstream_ca: Optional[str], **service) -> dict:
        issued = self.ca.issue_server(certificate_names)
        server_options = tssl.PrivateCertificate.loadPEM(issued.cert_pem + issued.key_pem).options()
        clock = Clock()
        shard = checked("s1", 9001, "tls", server_name="s1.shards.test")
        servers: list[LocalThenTLSShard] = []
        pumps: list[iosim.IOPump] = []

        @implementer(IStreamClientEndpoint)
        class PipeEndpoint:
            def connect(self, factory) -> Deferred:
                server = LocalThenTLSShard(server_options)
                servers.append(server)
                client = factory.buildProtocol(None)
                server_pipe = TLSPipe(server, True, clock)
                client_pipe = TLSPipe(client, False, clock)
                pumps.append(iosim.connect(server_pipe.relay, server_pipe,
                                           client_pipe.relay, client_pipe, greet=False))
                d: Deferred = Deferred()
                d.callback(client)
                return d

        config = config_for([shard], **({"upstream_tls": True, "upstream_ca": upstream_ca} | service))
        resolver = ShardResolver(config, clock=clock)
        checker = HealthChecker(
            resolver, clock, endpoint_factory=lambda host, port, timeout: PipeEndpoint(),
            random=random.Random(1), tls_options_for=DefaultTLSOptions(),
        )
        checker.startService()
        self.addCleanup(checker.stopService)
        while checker.status()["shards"]["s1"]["last_ok"] is None:
            clock.advance(0.01)
            for pump in pumps:
                pump.flush()
        self.assertEqual(servers[0].header.command, proxyv2.Command.LOCAL)
        return checker.status()["shards"]["s1"] | {"handshakes": servers[0].handshakes}

    def test_right_name_and_ca(self) -> None:
        """A certificate for the server_name from the service's CA passes."""
        status = self.check(["s1.shards.test"], self.ca_path)
        self.assertEqual((status["last_ok"], status["last_reason"]), (True, "TLS handshake verified"))
        self.assertEqual(status["handshakes"], 1)

    def test_wrong_name(self) -> None:
        """A certificate for another name fails the check."""
        status = self.check(["s2.shards.test"], self.ca_path)
        self.assertFalse(status["last_ok"])
        self.assertTrue(status["last_reason"].startswith("TLS handshake failed"), status)

    def test_health_ca_of_a_passthrough_service(self) -> None:
        """
        A passthrough service (no upstream_tls, so no upstream_ca) gives its
        tls checks their own trust with health_ca: a shard certified by a
        private CA passes, where the system trust store alone fails it.
        """
        status = self.check(["s1.shards.test"], None, upstream_tls=False, health_ca=self.ca_path)
        self.assertEqual((status["last_ok"], status["last_reason"]), (True, "TLS handshake verified"))

    def test_health_ca_is_the_checks_trust(self) -> None:
        """With both set, health_ca (not upstream_ca) is what a check verifies with."""
        other = CertificateAuthority()
        folder = self.mktemp()
        os.makedirs(folder)
        status = self.check(["s1.shards.test"], other.write(folder), health_ca=self.ca_path)
        self.assertEqual((status["last_ok"], status["last_reason"]), (True, "TLS handshake verified"))

    def test_untrusted_without_ca(self) -> None:
        """Without upstream_ca the system's trust store decides: a private CA fails."""
        status = self.check(["s1.shards.test"], None)
        self.assertFalse(status["last_ok"])
        self.assertTrue(status["last_reason"].startswith("TLS handshake failed"), status)


# ---------------------------------------------------------------------------
# Timing


class TimingTests(SynchronousTestCase):
    """First checks spread across the interval; later ones jittered."""

    def test_first_checks_spread(self) -> None:
        """
        Ten shards loaded together are first checked at ten different
        moments within the first interval.
        """
        shards = [checked(f"s{i}", 9000 + i) for i in range(10)]
        rig = Rig(self, shards)
        start = rig.clock.seconds()
        scheduled = [call.getTime() - start for call in rig.clock.getDelayedCalls()]
        self.assertEqual(len(set(scheduled)), 10)
        self.assertTrue(all(0 <= t < 2.0 for t in scheduled), scheduled)
        rig.run_for(1.999)
        firsts = [rig.network.attempts_to(9000 + i)[0] - start for i in range(10)]
        self.assertTrue(all(0 <= t < 2.0 for t in firsts), firsts)
        self.assertGreater(max(firsts) - min(firsts), 1.0)

    def test_interval_jittered(self) -> None:
        """
        Successive checks of one shard start interval × (1 ± 15%) apart, and
        not all the same gap; a check that hangs until its timeout does not
        push the next one later.
        """
        rig = Rig(self, [checked("s1", 9001)])
        rig.run_for(60)
        rig.network.peer(9001).mode = "hang"
        rig.run_for(60)
        times = rig.network.attempts_to(9001)
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertGreater(len(gaps), 40)
        for gap in gaps:
            self.assertTrue(2.0 * 0.85 - 1e-6 <= gap <= 2.0 * 1.15 + 0.1 + 1e-6, gap)
        self.assertGreater(len({round(g, 3) for g in gaps}), 10)

    def test_jitter_bounds_checked(self) -> None:
        """A jitter outside [0, 1) is refused."""
        resolver = ShardResolver(config_for([checked("s1", 9001)]), clock=Clock())
        self.assertRaises(ValueError, HealthChecker, resolver, Clock(), jitter=1.0)


# ---------------------------------------------------------------------------
# Scenarios (issue 4 §8)


class ScenarioTests(SynchronousTestCase):
    """The live behaviours of issue 4, end to end on an injected clock."""

    def test_stops_answering_leaves_returns_and_ramps(self) -> None:
        """
        Of three equal shards, ny-2 stops answering (its connects hang): it
        leaves rotation within fall × interval × (1 + jitter) + timeout, and
        no connection is sent to it after that. When it answers again it is
        back within rise × interval × (1 + jitter), at 10% of its weight,
        55% after 15 s of its 30 s slow start (taking about 0.55/2.55 of the
        new connections then), and 100% at the end.
        """
        check = dict(interval=2.0, timeout=1.0, rise=2, fall=3)
        rig = Rig(self, [checked(f"ny-{i}", 9000 + i, **check) for i in (1, 2, 3)])
        rig.run_for(10)
        self.assertEqual({rig.health(f"ny-{i}") for i in (1, 2, 3)}, {Health.HEALTHY})

        rig.network.peer(9002).mode = "hang"
        left = rig.step_until(lambda: rig.health("ny-2") is Health.UNHEALTHY, 20)
        bound = 3 * 2.0 * (1 + DEFAULT_JITTER) + 1.0
        self.assertTrue(2 * 2.0 * (1 - DEFAULT_JITTER) <= left <= bound + 0.05, left)
        self.assertNotIn("ny-2", {rig.first() for _ in range(200)})

        rig.network.peer(9002).mode = "accept"
        back = rig.step_until(lambda: rig.health("ny-2") is Health.HEALTHY, 20)
        self.assertTrue(back <= 2 * 2.0 * (1 + DEFAULT_JITTER) + 0.05, back)
        start_weight = rig.info("ny-2").weight
        self.assertTrue(0.1 <= start_weight <= 0.1 + 0.9 * 0.05 / 30 + 1e-9, start_weight)

        rig.run_for(15)
        self.assertAlmostEqual(rig.info("ny-2").weight, start_weight + 0.45)
        counts = {"ny-1": 0, "ny-2": 0, "ny-3": 0}
        for _ in range(510):
            shard_id = rig.first()
            rig.resolver.lease(shard_id).release()
            counts[shard_id] += 1
        # 0.55 / 2.55 of 510 is 110.
        self.assertTrue(95 <= counts["ny-2"] <= 125, counts)
        rig.run_for(15)
        self.assertEqual(rig.info("ny-2").weight, 1.0)

    def test_agent_drain_keeps_existing(self) -> None:
        """
        An agent answering "drain" stops new connections to its shard at
        the next check; the five connections it holds stay counted and end
        normally; "ready" brings it back.
        """
        shards = [
            checked("ny-1", 9001, "agent", agent_port=9101),
            checked("ny-2", 9002, "agent", agent_port=9102),
        ]
        rig = Rig(self, shards)
        rig.network.peer(9101).reply = b"up\n"
        rig.network.peer(9102).reply = b"up\n"
        rig.run_for(3)
        leases = [rig.resolver.lease("ny-1") for _ in range(5)]
        self.assertIn("ny-1", {rig.first() for _ in range(40)})

        rig.network.peer(9101).reply = b"drain\n"
        rig.run_for(2.0 * (1 + DEFAULT_JITTER))
        self.assertEqual(rig.health("ny-1"), Health.DRAINING)
        self.assertEqual({rig.first() for _ in range(100)}, {"ny-2"})
        self.assertEqual(rig.info("ny-1").open_connections, 5)
        for lease in leases:
            lease.release()
        self.assertEqual(rig.info("ny-1").open_connections, 0)

        rig.network.peer(9101).reply = b"ready\n"
        rig.run_for(2.0 * (1 + DEFAULT_JITTER))
        self.assertEqual(rig.health("ny-1"), Health.HEALTHY)
        self.assertIn("ny-1", {rig.first() for _ in range(40)})

    def test_load_report_cannot_hide_connections(self) -> None:
        """
        A shard whose agent reports "up 0%" while this proxy holds 90 of its
        100 connections still counts as 0.9 loaded.
        """
        rig = Rig(self, [checked("ny-1", 9001, "agent", agent_port=9101, capacity=100)])
        rig.network.peer(9101).reply = b"up 0%\n"
        for _ in range(90):
            rig.resolver.lease("ny-1")
        rig.run_for(2.0)
        self.assertEqual(rig.info("ny-1").load, 0.9)
        shard = rig.resolver.explain(ConnectionRequest("api", (CLIENT, 1))).shards[0]
        self.assertEqual(
            (shard.evaluation.details["agent_load"], shard.evaluation.details["own_load"]),
            (0.0, 0.9),
        )
        self.assertAlmostEqual(shard.evaluation.load, 0.1)


# ---------------------------------------------------------------------------
# Lifecycle


class LifecycleTests(SynchronousTestCase):
    """Following reloads, stopping cleanly, and building the service."""

    def test_follows_records(self) -> None:
        """
        A shard that gains a check is checked; one that loses it stops being
        checked and is HEALTHY again with its agent's state forgotten; one
        whose address changes is checked at the new address.
        """
        from tests.resolver.test_resolver import ChangingSource

        clock = Clock()
        network = FakeNetwork(clock)
        network.peer(9101).reply = b"down drain 50%\n"
        plain = ShardConfig(id="p1", address=Address(HOST, 9005), location=NEW_YORK)
        agent = checked("a1", 9001, "agent", agent_port=9101)
        config = config_for([agent, plain])
        source = ChangingSource(config.services)
        resolver = ShardResolver(config, source, clock=clock, random=random.Random(1))
        resolver.startService()
        checker = HealthChecker(resolver, clock, endpoint_factory=network.endpoint,
                                random=random.Random(2))
        checker.startService()
        self.addCleanup(checker.stopService)
        run_for(clock, 2.0)
        info = {i.shard_id: i for i in resolver.get_shard_info("api")}
        self.assertEqual((info["a1"].health, info["a1"].load), (Health.UNHEALTHY, 0.5))

        tcp_check = HealthCheckConfig(kind="tcp")
        source.change([ServiceConfig(id="api", shards=(
            attrs.evolve(agent, health_check=None),
            attrs.evolve(plain, health_check=tcp_check),
        ))])
        self.assertEqual(set(checker.status()["shards"]), {"p1"})
        info = {i.shard_id: i for i in resolver.get_shard_info("api")}
        self.assertEqual((info["a1"].health, info["a1"].load), (Health.HEALTHY, 0.0))
        run_for(clock, 2.0)
        self.assertIn(9005, [port for _, port, _, _ in network.attempts])

        source.change([ServiceConfig(id="api", shards=(
            attrs.evolve(plain, address=Address(HOST, 9006), health_check=tcp_check),
        ))])
        run_for(clock, 2.0)
        self.assertIn(9006, [port for _, port, _, _ in network.attempts])
        resolver.stopService()

    def test_stop_cancels_everything(self) -> None:
        """
        Stopping aborts a check in flight and leaves nothing scheduled; a
        late answer changes nothing.
        """
        rig = Rig(self, [checked("s1", 9001), checked("s2", 9002)])
        rig.network.peer(9001).delay = 0.5
        rig.network.peer(9001).mode = "accept"
        rig.step_until(lambda: rig.network.attempts_to(9001), 2.0, step=0.01)
        rig.checker.stopService()
        self.assertEqual(rig.clock.getDelayedCalls(), [])
        self.assertEqual(rig.checker.status()["shards"], {})
        rig.run_for(5)
        self.assertEqual(rig.network.to(9001), [])
        self.assertEqual(len(rig.network.attempts_to(9001)), 1)
        self.assertEqual(rig.health("s1"), Health.HEALTHY)

    def test_build_health_service(self) -> None:
        """
        No checker is built when static records have no health_check; one
        is when a shard has a check, or when the registry can add shards.
        """
        plain = ShardConfig(id="p1", address=Address(HOST, 9005))
        resolver = ShardResolver(config_for([plain]), clock=Clock())
        self.assertIsNone(build_health_service(config_for([plain]), resolver, Clock()))
        config = config_for([checked("s1", 9001)])
        checker = build_health_service(config, ShardResolver(config, clock=Clock()), Clock(),
                                       jitter=0.1)
        self.assertIsInstance(checker, HealthChecker)
        self.assertEqual(checker.name, "health-checks")
        etcd = attrs.evolve(config_for([plain]), registry=RegistryConfig(kind="etcd"))
        self.assertIsInstance(build_health_service(etcd, resolver, Clock()), HealthChecker)
