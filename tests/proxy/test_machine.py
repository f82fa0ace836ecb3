"""
The connection machine driven without sockets, timers or a reactor: events
in, the effects it asks for recorded.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, Optional

import attrs
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from shardtcp.identify.clienthello import AlertDescription, tls_alert
from shardtcp.identify.names import NameTable
from shardtcp.model import ConnectionRequest, ListenerConfig, PolicyConfig
from shardtcp.policy import TLSFacts
from shardtcp.proxy.listener import ProxyConnection
from shardtcp.proxy.machine import EARLY_DATA_ALLOWANCE, ConnectionMachine, IConnectionEffects, State
from shardtcp.resolver import ShardResolver

from tests.support import client_hello, make_config

CLIENT = ("198.51.100.7", 51515)
PROXY = ("127.0.0.1", 8443)


@implementer(IConnectionEffects)
class Recorder:
    """Records every effect asked for; ``creator`` is what ``tls_creator`` gives."""

    def __init__(self, creator: object = "creator") -> None:
        self.calls: list = []
        self.creator = creator

    def names(self) -> list:
        return [call[0] for call in self.calls]

    def last(self, name: str) -> tuple:
        return [call for call in self.calls if call[0] == name][-1]

    def start_timer(self, seconds):
        self.calls.append(("start_timer", seconds))

    def cancel_timer(self):
        self.calls.append(("cancel_timer",))

    def pause_client(self):
        self.calls.append(("pause_client",))

    def tls_creator(self, server_name, require_cert):
        self.calls.append(("tls_creator", server_name, require_cert))
        return self.creator

    def start_tls(self, creator, buffered):
        self.calls.append(("start_tls", creator, buffered))

    def connect(self, candidates):
        self.calls.append(("connect", [c.shard.shard_id for c in candidates]))

    def stop_connecting(self):
        self.calls.append(("stop_connecting",))

    def refuse(self, reason, message, answer):
        self.calls.append(("refuse", reason, message, answer))

    def gone(self, previous, reason):
        self.calls.append(("gone", previous, reason))

    def splice(self, payload, reply, client_eof):
        self.calls.append(("splice", payload, reply, client_eof))


@attrs.define
class Rules:
    """The listener facts a machine reads, as a ``ListenerContext`` gives them."""

    config: ListenerConfig
    names: NameTable
    resolver: ShardResolver
    admission: Optional[Callable[[str], Optional[str]]] = None
    terminates: bool = False
    asks_client_cert: bool = False


def machine(
    listener: Optional[ListenerConfig] = None,
    *,
    policy: Optional[PolicyConfig] = None,
    creator: object = "creator",
    **rules_kw,
) -> tuple[ConnectionMachine, Recorder]:
    listener = listener or ListenerConfig(name="edge", listen="tcp:0")
    config = make_config(listener=listener, policy=policy)
    clock = MemoryReactorClock()
    rules = Rules(
        config=listener,
        names=NameTable((s.id, s.names) for s in config.services),
        resolver=ShardResolver(config, clock=clock),
        **rules_kw,
    )
    effects = Recorder(creator)
    return ConnectionMachine(rules, effects, CLIENT, PROXY), effects


def started(*a, **kw) -> tuple[ConnectionMachine, Recorder]:
    m, fx = machine(*a, **kw)
    m.start(5.0)
    fx.calls.clear()
    return m, fx


def connecting(*a, **kw) -> tuple[ConnectionMachine, Recorder]:
    m, fx = started(*a, **kw)
    m.data(client_hello())
    fx.calls.clear()
    return m, fx


class InterfaceTests(SynchronousTestCase):
    """The seam between the machine and its adapter."""

    def test_adapter_and_recorder_provide_effects(self) -> None:
        """The Twisted adapter and this test's recorder both provide IConnectionEffects."""
        verifyClass(IConnectionEffects, ProxyConnection)
        verifyObject(IConnectionEffects, Recorder())

    def test_machine_holds_no_transport(self) -> None:
        """A machine has only the slots it declares: no transport or reactor can hide in it."""
        m, _ = machine()
        self.assertFalse(hasattr(m, "__dict__"))
        self.assertFalse(any("transport" in name or "reactor" in name for name in ConnectionMachine.__slots__))


class StartTests(SynchronousTestCase):
    """accepted -> peeking, or closed when a threat feed denies the client."""

    def test_start_peeks_with_timer(self) -> None:
        """``start`` asks for the identification timer and enters peeking."""
        m, fx = machine()
        self.assertIs(m.state, State.ACCEPTED)
        m.start(3.5)
        self.assertIs(m.state, State.PEEKING)
        self.assertEqual(fx.calls, [("start_timer", 3.5)])

    def test_threat_feed_denies(self) -> None:
        """A client the admission callable denies is refused with no answer; later bytes are dropped."""
        m, fx = machine(admission=lambda ip: f"listed {ip}")
        m.start(5.0)
        self.assertIs(m.state, State.CLOSED)
        self.assertEqual(fx.last("refuse"), ("refuse", "threat_denied", "listed 198.51.100.7", b""))
        fx.calls.clear()
        m.data(client_hello())
        self.assertEqual(fx.calls, [])

    def test_start_twice_ignored(self) -> None:
        """A second ``start`` changes nothing."""
        m, fx = started()
        m.start(5.0)
        self.assertEqual(fx.calls, [])
        self.assertIs(m.state, State.PEEKING)


class PeekingTests(SynchronousTestCase):
    """peeking -> connecting, or a refusal in the client's protocol."""

    def test_hello_byte_by_byte(self) -> None:
        """
        Only the last byte of a ClientHello completes it: the timer is
        cancelled, the client paused and the candidates (1 + retries)
        handed to ``connect``; passthrough TLS is stated as ``tls``.
        """
        m, fx = started(ListenerConfig(name="edge", listen="tcp:0", retries=0))
        hello = client_hello("api.example.test")
        for i in range(len(hello) - 1):
            m.data(hello[i : i + 1])
        self.assertEqual(fx.calls, [])
        self.assertEqual(m.buffered, len(hello) - 1)
        m.data(hello[-1:])
        self.assertEqual(fx.names(), ["cancel_timer", "pause_client", "connect"])
        self.assertEqual(len(fx.last("connect")[1]), 1)
        self.assertIs(m.state, State.CONNECTING)
        self.assertEqual(m.service, "api")
        self.assertEqual(m.facts.encryption, "tls")
        self.assertEqual(m.policy.access_control_list, ("orders:read",))

    def test_retries_bound_candidates(self) -> None:
        """``retries = 1`` hands over two candidates, the best first."""
        m, fx = started(ListenerConfig(name="edge", listen="tcp:0", retries=1))
        m.data(client_hello())
        self.assertEqual(fx.last("connect")[1], ["api-fra-1", "api-nyc-1"])

    def test_garbage(self) -> None:
        """Bytes of no known protocol are refused as not_tls with no answer."""
        m, fx = started()
        m.data(b"GET / HTTP/1.1\r\n\r\n")
        self.assertIs(m.state, State.CLOSED)
        self.assertEqual(fx.names(), ["cancel_timer", "stop_connecting", "refuse"])
        self.assertEqual(fx.last("refuse")[1], "not_tls")
        self.assertEqual(fx.last("refuse")[3], b"")

    def test_unknown_name(self) -> None:
        """An SNI no service lists: unrecognized_name alert."""
        m, fx = started()
        m.data(client_hello("other.example.test"))
        self.assertEqual(fx.last("refuse")[1], "unknown_service")
        self.assertEqual(fx.last("refuse")[3], tls_alert(AlertDescription.unrecognized_name))

    def test_no_name_no_default(self) -> None:
        """No SNI and no default_service: no_service."""
        m, fx = started()
        m.data(client_hello(None))
        self.assertEqual(fx.last("refuse")[1], "no_service")

    def test_no_name_default(self) -> None:
        """No SNI with default_service: that service."""
        m, fx = started(ListenerConfig(name="edge", listen="tcp:0", default_service="api"))
        m.data(client_hello(None))
        self.assertIs(m.state, State.CONNECTING)
        self.assertEqual(m.service, "api")

    def test_denied_by_allow_list(self) -> None:
        """A client outside the service's allow list: denied, access_denied alert."""
        m, fx = started(policy=PolicyConfig(allow=(ipaddress.ip_network("10.0.0.0/8"),)))
        m.data(client_hello())
        self.assertEqual(fx.last("refuse")[1], "denied")
        self.assertEqual(fx.last("refuse")[3], tls_alert(AlertDescription.access_denied))

    def test_policy_refused(self) -> None:
        """A service requiring mTLS is refused to passthrough TLS (policy_encryption)."""
        m, fx = started(policy=PolicyConfig(encryption="mtls"))
        m.data(client_hello())
        self.assertEqual(fx.last("refuse")[1], "policy_encryption")
        self.assertNotIn("connect", fx.names())

    def test_line_preamble_by_service_id(self) -> None:
        """A ``SHARD <id>`` line names the service by id; the line is not forwarded."""
        m, fx = started(ListenerConfig(name="edge", listen="tcp:0", identify=("line",)))
        m.data(b"SHARD api\r\nhello")
        self.assertEqual(m.service, "api")
        self.assertEqual(m.facts.encryption, "none")
        m.ready()
        self.assertEqual(fx.last("splice"), ("splice", b"hello", b"", False))

    def test_peek_timeout(self) -> None:
        """The timer firing while peeking refuses with peek_timeout and a handshake_failure alert."""
        m, fx = started()
        m.data(client_hello()[:20])
        m.timed_out()
        refusal = fx.last("refuse")
        self.assertEqual(refusal[1], "peek_timeout")
        self.assertIn("(20 bytes received)", refusal[2])
        self.assertEqual(refusal[3], tls_alert(AlertDescription.handshake_failure))

    def test_eof_while_peeking(self) -> None:
        """EOF before identifying: refused as eof."""
        m, fx = started()
        m.data(client_hello()[:20])
        m.eof()
        self.assertEqual(fx.last("refuse")[1], "eof")
        self.assertIs(m.state, State.CLOSED)

    def test_lost_while_peeking(self) -> None:
        """The client gone while peeking: timer and attempts stopped, ``gone`` told the state."""
        m, fx = started()
        m.lost("reason")
        self.assertEqual(fx.calls, [("stop_connecting",), ("cancel_timer",), ("gone", State.PEEKING, "reason")])
        self.assertIs(m.state, State.CLOSED)

    def test_lost_after_refusal(self) -> None:
        """The close that follows a refusal is reported as gone from closed (counted once)."""
        m, fx = started()
        m.data(b"\x00garbage")
        fx.calls.clear()
        m.lost(None)
        self.assertEqual(fx.last("gone"), ("gone", State.CLOSED, None))
        self.assertNotIn("refuse", fx.names())


class ConnectingTests(SynchronousTestCase):
    """connecting -> spliced, or closed."""

    def test_ready_splices_buffered_bytes(self) -> None:
        """``ready`` splices the hello and the bytes that came while connecting, once."""
        m, fx = started()
        hello = client_hello()
        m.data(hello)
        fx.calls.clear()
        m.data(b"early")
        m.ready()
        self.assertIs(m.state, State.SPLICED)
        self.assertEqual(fx.calls, [("splice", hello + b"early", b"", False)])
        self.assertEqual(m.buffered, 0)
        m.ready()
        self.assertEqual(len(fx.calls), 1)

    def test_eof_while_connecting_is_carried(self) -> None:
        """A half-close while connecting reaches the splice, not a refusal."""
        m, fx = connecting()
        m.eof()
        self.assertEqual(fx.calls, [])
        m.ready()
        self.assertEqual(fx.last("splice")[3], True)

    def test_too_much_while_connecting(self) -> None:
        """More than max_client_hello + the allowance while connecting: too_large, closed without an answer."""
        m, fx = connecting(ListenerConfig(name="edge", listen="tcp:0", max_client_hello=1024))
        m.data(b"x" * (1024 + EARLY_DATA_ALLOWANCE - len(client_hello())))
        self.assertIs(m.state, State.CONNECTING)
        m.data(b"x")
        self.assertEqual(fx.last("refuse")[1:4:2], ("too_large", b""))
        self.assertIn("stop_connecting", fx.names())

    def test_unreachable(self) -> None:
        """Every candidate failed: shard_unreachable names them, internal_error alert."""
        m, fx = connecting()
        m.unreachable(["api-fra-1", "api-nyc-1"])
        refusal = fx.last("refuse")
        self.assertEqual(refusal[1], "shard_unreachable")
        self.assertIn("tried api-fra-1, api-nyc-1", refusal[2])
        self.assertEqual(refusal[3], tls_alert(AlertDescription.internal_error))

    def test_header_refused(self) -> None:
        """A token too large for the TLV refuses the connection as token_too_large."""
        m, fx = connecting()
        m.header_refused("too big")
        self.assertEqual(fx.last("refuse")[1:3], ("token_too_large", "too big"))

    def test_lost_while_connecting(self) -> None:
        """The client gone while connecting stops the attempt and reports the state."""
        m, fx = connecting()
        m.lost("reason")
        self.assertEqual(fx.names(), ["stop_connecting", "cancel_timer", "gone"])
        self.assertIs(fx.last("gone")[1], State.CONNECTING)
        self.assertFalse(m.connecting)

    def test_timer_ignored_once_identified(self) -> None:
        """A late timer while connecting refuses nothing."""
        m, fx = connecting()
        m.timed_out()
        self.assertEqual(fx.calls, [])


class SplicedTests(SynchronousTestCase):
    """spliced -> closed, and nothing else."""

    def test_finished(self) -> None:
        """Once spliced, only ``finished`` moves on; refusals and loss are the splice's business."""
        m, fx = connecting()
        m.ready()
        fx.calls.clear()
        m.unreachable(["x"])
        m.lost(None)
        m.data(b"late")
        self.assertEqual(fx.calls, [])
        self.assertIs(m.state, State.SPLICED)
        m.finished()
        self.assertIs(m.state, State.CLOSED)

    def test_finished_only_from_spliced(self) -> None:
        """``finished`` before splicing changes nothing."""
        m, _ = connecting()
        m.finished()
        self.assertIs(m.state, State.CONNECTING)

    def test_illegal_move_raises(self) -> None:
        """The transition table refuses a move it does not list."""
        m, _ = started()
        with self.assertRaises(RuntimeError):
            m._go(State.SPLICED)


class TerminateTests(SynchronousTestCase):
    """peeking -> handshaking -> connecting on terminating listeners."""

    def test_handshake_then_connect(self) -> None:
        """
        An SNI on a terminating listener asks for the name's creator, hands
        the TLS layer the buffered hello, and after the handshake connects
        with the handshake's facts; refusals are then a plain close.
        """
        m, fx = started(terminates=True)
        hello = client_hello()
        m.data(hello)
        self.assertEqual(
            fx.calls,
            [
                ("cancel_timer",),
                ("pause_client",),
                ("tls_creator", "api.example.test", False),
                ("start_timer", 5.0),
                ("start_tls", "creator", hello),
            ],
        )
        self.assertIs(m.state, State.HANDSHAKING)
        self.assertEqual(m.answer_protocol, "none")
        fx.calls.clear()
        m.data(b"early")
        m.handshake_done(TLSFacts(encryption="mtls", authentication=("mtls",), subject="c"))
        self.assertEqual(fx.names(), ["cancel_timer", "pause_client", "connect"])
        self.assertEqual(m.policy.encryption_level, "mtls")
        m.ready()
        # Plaintext is forwarded whole: nothing was consumed from it.
        self.assertEqual(fx.last("splice")[1], b"early")

    def test_no_certificate(self) -> None:
        """No creator for the name: no_certificate, answered with a TLS alert."""
        m, fx = started(terminates=True, creator=None)
        m.data(client_hello())
        self.assertEqual(fx.last("refuse")[1], "no_certificate")
        self.assertEqual(fx.last("refuse")[3], tls_alert(AlertDescription.unrecognized_name))

    def test_mtls_without_client_ca(self) -> None:
        """A service wanting mTLS on a listener that cannot ask for certificates: policy_authentication."""
        m, fx = started(terminates=True, policy=PolicyConfig(authentication="mtls"))
        m.data(client_hello())
        self.assertEqual(fx.last("refuse")[1], "policy_authentication")
        self.assertNotIn("tls_creator", fx.names())

    def test_mtls_asks_for_certificate(self) -> None:
        """A service wanting mTLS gets a creator that requires a client certificate."""
        m, fx = started(terminates=True, asks_client_cert=True, policy=PolicyConfig(authentication="mtls"))
        m.data(client_hello())
        self.assertEqual(fx.last("tls_creator"), ("tls_creator", "api.example.test", True))

    def test_handshake_timeout_aborts(self) -> None:
        """The timer firing mid-handshake refuses as handshake_timeout with an abort (answer None)."""
        m, fx = started(terminates=True)
        m.data(client_hello())
        m.timed_out()
        self.assertEqual(fx.last("refuse")[1], "handshake_timeout")
        self.assertIsNone(fx.last("refuse")[3])

    def test_lost_while_handshaking(self) -> None:
        """A handshake that fails (the TLS layer loses the connection) is reported from handshaking."""
        m, fx = started(terminates=True)
        m.data(client_hello())
        m.lost("bad certificate")
        self.assertEqual(fx.last("gone"), ("gone", State.HANDSHAKING, "bad certificate"))

    def test_refused_after_handshake_closes_plainly(self) -> None:
        """A refusal after the handshake says nothing in clear inside TLS."""
        m, fx = started(terminates=True)
        m.data(client_hello())
        m.handshake_done(TLSFacts(encryption="tls"))
        m.unreachable(["api-fra-1"])
        self.assertEqual(fx.last("refuse")[3], b"")

    def test_handshake_done_ignored_elsewhere(self) -> None:
        """A handshake completing after a refusal changes nothing."""
        m, fx = started(terminates=True)
        m.data(client_hello())
        m.timed_out()
        fx.calls.clear()
        m.handshake_done(TLSFacts(encryption="tls"))
        self.assertEqual(fx.calls, [])


class ShardKeyTests(SynchronousTestCase):
    """A service routing by shard key: the key reaches the resolver and the token, or the connection is refused."""

    def keyed(self, shard_key: str, identify=("sni",)) -> tuple[ConnectionMachine, Recorder]:
        listener = ListenerConfig(name="edge", listen="tcp:0", identify=identify)
        config = make_config(listener=listener, names=("*.api.example.test", "api.example.test"))
        service = attrs.evolve(config.services[0], shard_key=shard_key)
        config = attrs.evolve(config, services=(service,))
        rules = Rules(
            config=listener,
            names=NameTable((s.id, s.names) for s in config.services),
            resolver=ShardResolver(config, clock=MemoryReactorClock()),
        )
        effects = Recorder()
        m = ConnectionMachine(rules, effects, CLIENT, PROXY)
        m.start(5.0)
        effects.calls.clear()
        return m, effects

    def test_sni_label_signed(self) -> None:
        """The SNI's first label is the key: the owner is connected first and the policy carries shk."""
        m, fx = self.keyed("sni-label")
        m.data(client_hello("tenant42.api.example.test"))
        self.assertEqual(m.state, State.CONNECTING)
        self.assertEqual(m.policy.shard_key, "tenant42")
        owner = m._rules.resolver.explain(
            ConnectionRequest(service_id="api", client=CLIENT), key="tenant42"
        ).owners.order[0]
        self.assertEqual(fx.last("connect")[1][0], owner)

    def test_no_key_refused(self) -> None:
        """A SHARD line without a key to a line-arg service: no_shard_key, answered ERR; with one, shk is its key."""
        m, fx = self.keyed("line-arg", identify=("line",))
        m.data(b"SHARD api\r\n")
        reason, message, answer = fx.last("refuse")[1:]
        self.assertEqual(reason, "no_shard_key")
        self.assertIn("line-arg", message)
        self.assertEqual(answer, b"ERR no_shard_key\r\n")
        m, fx = self.keyed("line-arg", identify=("line",))
        m.data(b"SHARD api tenant9\r\n")
        self.assertEqual(m.policy.shard_key, "tenant9")

    def test_unkeyed_policy(self) -> None:
        """A service without shard_key signs no shk."""
        m, fx = self.keyed("none")
        m.data(client_hello("tenant42.api.example.test"))
        self.assertIsNone(m.policy.shard_key)


class ServiceConfigTests(SynchronousTestCase):
    """The service's configuration the shards were chosen under is kept for the adapter."""

    def test_set_with_the_candidates(self) -> None:
        """
        None until the shards are chosen; then the resolver's ServiceConfig
        of the routed service, the one the adapter connects with (its
        upstream_tls), and it stays while connecting and spliced.
        """
        m, fx = started()
        self.assertIsNone(m.service_config)
        m.data(client_hello())
        self.assertEqual(fx.calls[-1][0], "connect")
        self.assertIs(m.service_config, m._rules.resolver.service_config("api"))
        self.assertEqual((m.service_config.id, m.service_config.upstream_tls), ("api", False))

    def test_not_set_when_refused(self) -> None:
        """A connection refused before any shard was chosen has none."""
        m, fx = started()
        m.data(client_hello("nobody.example.test"))
        self.assertEqual(fx.calls[-1][:2], ("refuse", "unknown_service"))
        self.assertIsNone(m.service_config)
