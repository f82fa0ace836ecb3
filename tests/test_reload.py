"""
Reload in place and graceful stop, in memory: which listeners keep their
sockets, which shards keep their live state, what a refused reload leaves,
how the drain counts and closes, and what the signal handlers do.
"""

from __future__ import annotations

import json
import os

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import keys
from shardtcp.config import ConfigError, load_config
from shardtcp.lifecycle import SHUTDOWN, SignalHandlers, twistd_log_file
from shardtcp.proxy.accesslog import ACCESS_FIELDS
from shardtcp.reload import summarise
from shardtcp.tap import build_service
from tests.support import FakeConnector, HalfCloseTransport

_SHARD = """
[[service.api.shard]]
id = "{id}"
address = "127.0.0.1:{port}"
weight = {weight}
"""


def _listener(name: str, port: int, mode: str = "plain") -> str:
    return (
        f'[[listener]]\nname = "{name}"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f'mode = "{mode}"\nidentify = ["line"]\n'
    )


class _Proxy:
    """A proxy built from a file in a temporary folder, on a MemoryReactorClock."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.directory = os.path.abspath(case.mktemp())
        os.makedirs(self.directory)
        paths = keys.generate_keypair(os.path.join(self.directory, "keys"), kid="policy-1")
        self.key = os.path.relpath(paths.private_key, self.directory)
        self.path = os.path.join(self.directory, "shardtcp.toml")
        self.reactor = MemoryReactorClock()
        self.connector = FakeConnector()
        self.root = None

    def write(self, listeners: str, shards, *, kid: str = "policy-1", extra: str = "") -> None:
        text = (
            f'[proxy]\nid = "edge-1"\n{extra}\n[signing]\nprivate_key = "{self.key}"\nkid = "{kid}"\n'
            + listeners
            + '[service.api]\nnames = ["api.example.test"]\n'
            + "".join(_SHARD.format(id=i, port=p, weight=w) for i, p, w in shards)
        )
        with open(self.path, "w") as f:
            f.write(text)

    def start(self):
        self.root = build_service(load_config(self.path), self.reactor, connector=self.connector)
        self.root.startService()
        return self.root

    def reload(self):
        results: list = []
        self.root.reload(trigger="signal").addBoth(results.append)
        return results[0]

    def connect(self, listener: str = "edge", port: int = 50000):
        """A client connection accepted on ``listener`` now."""
        protocol = self.root.factories[listener].buildProtocol(None)
        transport = HalfCloseTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 7000),
            peerAddress=IPv4Address("TCP", "127.0.0.1", port),
        )
        protocol.makeConnection(transport)
        return protocol, transport

    def metric(self, name: str, **labels) -> float:
        return self.root.metrics.value(name, **labels)


def _collect_log(case) -> list:
    events: list = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def _texts(events: list) -> list:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events]


class ReloadTests(SynchronousTestCase):
    """``ProxyService.reload`` applied to a running tree."""

    def setUp(self) -> None:
        self.proxy = _Proxy(self)
        self.proxy.write(
            _listener("edge", 7000) + _listener("old", 7001),
            [("api-1", 9001, 1.0), ("api-2", 9002, 1.0)],
        )
        self.root = self.proxy.start()

    def test_listeners_kept_added_removed(self) -> None:
        """
        ``edge`` (same name, same endpoint) keeps its very port object and
        gets a new context; ``old`` stops listening; ``new`` listens; the
        summary says so, and only one listen call was made by the reload.
        """
        edge_port = self.root.listening_port("edge")
        old_service = self.root.getServiceNamed("listener:old")
        old_context = self.root.factories["edge"].context
        listens = len(self.proxy.reactor.tcpServers)
        self.proxy.write(_listener("edge", 7000) + _listener("new", 7002), [("api-1", 9001, 1.0)])
        summary = self.proxy.reload()
        self.assertIsInstance(summary, dict)
        self.assertEqual(summary["listeners"], {"kept": ["edge"], "added": ["new"], "removed": ["old"], "rebound": []})
        self.assertIs(self.root.listening_port("edge"), edge_port)
        self.assertIsNot(self.root.factories["edge"].context, old_context)
        self.assertIs(self.root.factories["edge"].context.connections, old_context.connections)
        self.assertFalse(old_service.running)
        self.assertIsNone(old_service.port)
        self.assertNotIn("old", self.root.factories)
        self.assertEqual([s[0] for s in self.proxy.reactor.tcpServers[listens:]], [7002])
        self.assertTrue(self.root.getServiceNamed("listener:new").running)

    def test_rebound_listener_gets_a_new_socket(self) -> None:
        """A listener whose endpoint changed listens on the new one; the old port is closed."""
        before = self.root.getServiceNamed("listener:edge")
        self.proxy.write(_listener("edge", 7005) + _listener("old", 7001), [("api-1", 9001, 1.0)])
        summary = self.proxy.reload()
        self.assertEqual(summary["listeners"]["rebound"], ["edge"])
        self.assertEqual(summary["listeners"]["kept"], ["old"])
        self.assertFalse(before.running)
        self.assertEqual(self.proxy.reactor.tcpServers[-1][0], 7005)
        self.assertIsNot(self.root.getServiceNamed("listener:edge"), before)

    def test_open_connection_keeps_its_context(self) -> None:
        """
        A connection accepted before the reload keeps the old context (old
        signer, old listener rules); one accepted after gets the new one;
        both are in the listener's one connection set.
        """
        before, _ = self.proxy.connect()
        old_context = before._ctx
        self.proxy.write(_listener("edge", 7000), [("api-1", 9001, 1.0)], kid="policy-2")
        summary = self.proxy.reload()
        self.assertEqual(summary["signing"], {"kid": "policy-2", "changed": True})
        after, _ = self.proxy.connect(port=50001)
        self.assertIs(before._ctx, old_context)
        self.assertEqual(old_context.signer.kid, "policy-1")
        self.assertEqual(after._ctx.signer.kid, "policy-2")
        self.assertEqual(set(self.root.open_connections()), {before, after})

    def test_removed_listener_connections_still_drain(self) -> None:
        """A connection of a removed listener is still counted as open until it ends."""
        conn, _ = self.proxy.connect("old")
        self.proxy.write(_listener("edge", 7000), [("api-1", 9001, 1.0)])
        self.proxy.reload()
        self.assertEqual(self.root.open_connections(), [conn])
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.root.open_connections(), [])

    def test_shard_state_kept_per_id(self) -> None:
        """
        api-1 keeps its operator drain and its connect counters across the
        reload and takes its new weight; api-2 is gone; api-3 is new.
        """
        resolver = self.root.resolver
        resolver.set_admin_state("api-1", "drain")
        resolver.record_connect_result("api-1", True, 0.01)
        self.proxy.write(
            _listener("edge", 7000) + _listener("old", 7001), [("api-1", 9001, 3.0), ("api-3", 9003, 1.0)]
        )
        summary = self.proxy.reload()
        self.assertEqual(summary["shards"], {"added": ["api-3"], "removed": ["api-2"], "changed": ["api-1"]})
        self.assertEqual(summary["services"], {"added": [], "removed": [], "changed": ["api"]})
        shards = {s.shard_id: s for s in resolver.snapshot().services[0].shards}
        self.assertEqual(set(shards), {"api-1", "api-3"})
        self.assertEqual(shards["api-1"].admin_state, "drain")
        self.assertEqual(shards["api-1"].connects_ok, 1)
        self.assertEqual(shards["api-1"].weight, 3.0)
        self.assertEqual(shards["api-3"].connects_ok, 0)

    def test_bad_file_changes_nothing(self) -> None:
        """
        An invalid file fails the reload with ``ConfigError`` naming the
        key; the configuration, listeners and shards stay; the refusal is
        logged line by line and counted.
        """
        events = _collect_log(self)
        config = self.root.config
        with open(self.proxy.path, "a") as f:
            f.write('\n[[service.api.shard]]\nid = "api-9"\naddress = "nowhere"\n')
        result = self.proxy.reload()
        self.assertIsInstance(result, Failure)
        self.assertIsInstance(result.value, ConfigError)
        self.assertTrue(any(p.startswith("service.api.shard[2].address") for p in result.value.problems))
        self.assertIs(self.root.config, config)
        self.assertEqual(set(self.root.factories), {"edge", "old"})
        self.assertEqual({s.id for s in self.root.resolver.services()[0].shards}, {"api-1", "api-2"})
        self.assertEqual(self.proxy.metric("shardtcp_reloads_total", trigger="signal", result="failed"), 1.0)
        self.assertEqual(self.proxy.metric("shardtcp_reloads_total", trigger="signal", result="ok"), 0.0)
        lines = _texts(events)
        self.assertTrue(any(l.startswith("reload refused: service.api.shard[2].address") for l in lines), lines)
        self.assertTrue(any("still running on the previous one" in l for l in lines), lines)

    def test_good_reload_counted(self) -> None:
        """A reload that changes nothing succeeds, says so and counts once."""
        summary = self.proxy.reload()
        self.assertFalse(summary["changed"])
        self.assertEqual(self.proxy.metric("shardtcp_reloads_total", trigger="signal", result="ok"), 1.0)

    def test_unbindable_new_listener_refuses_everything(self) -> None:
        """
        When a new listener cannot listen, the reload is refused naming
        it; the new shard is not taken either, and nothing else changed.
        """
        from twisted.internet.error import CannotListenError

        self.proxy.write(
            _listener("edge", 7000) + _listener("old", 7001) + _listener("bad", 7009),
            [("api-1", 9001, 1.0), ("api-2", 9002, 1.0), ("api-3", 9003, 1.0)],
        )
        original = self.proxy.reactor.listenTCP

        def refuse(port, factory, backlog=50, interface=""):
            if port == 7009:
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))
            return original(port, factory, backlog, interface)

        self.proxy.reactor.listenTCP = refuse
        result = self.proxy.reload()
        self.assertIsInstance(result.value, ConfigError)
        self.assertEqual(len(result.value.problems), 1)
        self.assertTrue(result.value.problems[0].startswith("listener[2].listen: "), result.value.problems)
        self.assertIn("Address already in use", result.value.problems[0])
        self.assertNotIn("bad", self.root.factories)
        self.assertEqual({s.id for s in self.root.resolver.services()[0].shards}, {"api-1", "api-2"})

    def test_access_log_reopened_on_change(self) -> None:
        """
        A changed ``[log]`` takes effect on reload: connections accepted
        afterwards write their lines to the new file, while a connection
        already open keeps the log it started with; the summary says so.
        An unchanged ``[log]`` keeps the very same log object.
        """
        open_before, _ = self.proxy.connect()
        old_log = self.root.access_log
        same = self.proxy.reload()
        self.assertEqual(same["access_log"], {"changed": False})
        self.assertIs(self.root.access_log, old_log)
        path = os.path.join(self.proxy.directory, "access.log")
        self.proxy.write(
            _listener("edge", 7000) + _listener("old", 7001),
            [("api-1", 9001, 1.0), ("api-2", 9002, 1.0)],
            extra=f'\n[log]\naccess = "json"\naccess_file = "{path}"\n',
        )
        summary = self.proxy.reload()
        self.assertEqual(summary["access_log"], {"changed": True})
        self.assertTrue(summary["changed"])
        self.assertIsNot(self.root.access_log, old_log)
        self.assertEqual(self.root.access_log.file.path, path)
        self.assertIs(self.root.factories["edge"].context.access, self.root.access_log)
        self.assertIs(open_before._ctx.access, old_log)
        self.root.factories["edge"].context.ended(dict.fromkeys(ACCESS_FIELDS, "-") | {"service": "api"})
        with open(path) as f:
            line = json.loads(f.readline())
        self.assertEqual(line["service"], "api")

    def test_access_log_that_cannot_open_refuses(self) -> None:
        """
        A new ``access_file`` that cannot be opened (a folder) refuses the
        whole reload naming it; the running log and shards stay.
        """
        old_log = self.root.access_log
        folder = os.path.join(self.proxy.directory, "a-folder")
        os.makedirs(folder)
        self.proxy.write(
            _listener("edge", 7000) + _listener("old", 7001),
            [("api-1", 9001, 1.0)],
            extra=f'\n[log]\naccess_file = "{folder}"\n',
        )
        result = self.proxy.reload()
        self.assertIsInstance(result.value, ConfigError)
        self.assertEqual(len(result.value.problems), 1)
        self.assertTrue(result.value.problems[0].startswith(f"log.access_file: cannot open {folder}"),
                        result.value.problems)
        self.assertIs(self.root.access_log, old_log)
        self.assertEqual({s.id for s in self.root.resolver.services()[0].shards}, {"api-1", "api-2"})

    def test_source_counts_carry_over(self) -> None:
        """
        A listener kept across a reload keeps its per-source counts: with
        ``per_source.max_connections = 1`` a source holding one connection
        is still refused after a reload of the same limit, and raising the
        limit to 2 admits exactly one more (the second over it refused).
        Connections opened before the reload release their count.
        """
        limited = _listener("edge", 7000) + "[listener.per_source]\nmax_connections = {n}\n"
        shards = [("api-1", 9001, 1.0)]
        self.proxy.write(limited.format(n=1), shards)
        self.proxy.reload()
        factory = self.root.factories["edge"]
        client = IPv4Address("TCP", "192.0.2.7", 40000)
        first = factory.buildProtocol(client)
        self.assertIsNotNone(first)
        self.assertIsNone(factory.buildProtocol(client))
        self.proxy.reload()
        self.assertIsNone(self.root.factories["edge"].buildProtocol(client))
        self.proxy.write(limited.format(n=2), shards)
        self.proxy.reload()
        second = self.root.factories["edge"].buildProtocol(client)
        self.assertIsNotNone(second)
        self.assertIsNone(self.root.factories["edge"].buildProtocol(client))
        # The connection from before the reloads ends: its count is returned.
        first._ctx.closed(first)
        self.assertIsNotNone(self.root.factories["edge"].buildProtocol(client))

    def test_reload_refused_while_stopping(self) -> None:
        """Once a graceful stop has begun, a reload is refused."""
        self.root.stopService()
        result = self.proxy.reload()
        self.assertEqual(result.value.problems, ["the proxy is stopping"])


class CertificateReloadTests(SynchronousTestCase):
    """A terminating listener's certificates across reloads."""

    def test_certificates_reloaded_or_refused(self) -> None:
        """
        A reload rebuilds the kept terminating listener's certificates (a
        new ``ServerTLS``, read from the files again, in the context of new
        connections); a certificate file that no longer holds a certificate
        refuses the reload naming the listener, and the running one stays.
        """
        from shardtcp.example.pki import CertificateAuthority

        proxy = _Proxy(self)
        ca = CertificateAuthority("reload test CA")
        ca.issue_server(["api.example.test"]).write(proxy.directory, "api")
        listener = (
            _listener("edge", 7000, mode="terminate").replace('identify = ["line"]\n', "")
            + 'certificates = [ { names = ["api.example.test"], cert = "api.pem", key = "api.key" } ]\n'
        )
        proxy.write(listener, [("api-1", 9001, 1.0)])
        root = proxy.start()
        first = root.factories["edge"].context.server_tls
        ca.issue_server(["api.example.test"]).write(proxy.directory, "api")
        summary = proxy.reload()
        self.assertEqual(summary["listeners"]["kept"], ["edge"])
        second = root.factories["edge"].context.server_tls
        self.assertIsNot(second, first)
        with open(os.path.join(proxy.directory, "api.pem"), "w") as f:
            f.write("not a certificate\n")
        result = proxy.reload()
        self.assertIsInstance(result.value, ConfigError)
        self.assertTrue(result.value.problems[0].startswith("listener[0].certificates: "), result.value.problems)
        self.assertIs(root.factories["edge"].context.server_tls, second)


class ThreatIntelReloadTests(SynchronousTestCase):
    """The feed poller across reloads: started, kept, restarted, stopped."""

    def test_started_restarted_stopped(self) -> None:
        """
        Adding ``[threat_intel]`` starts a poller (and its admission check);
        reloading the same file keeps that very poller; changing it builds a
        new one (its series registered again without a clash); removing it
        stops the poller and the admission check.
        """
        proxy = _Proxy(self)
        shards = [("api-1", 9001, 1.0)]
        intel = '[threat_intel]\ntrusted_keys = "keys/jwks.json"\non_expiry = "{}"\n'
        proxy.write(_listener("edge", 7000), shards)
        root = proxy.start()
        self.assertIsNone(root.threat_intel)
        proxy.write(_listener("edge", 7000) + intel.format("baseline"), shards)
        self.assertEqual(proxy.reload()["threat_intel"], "started")
        first = root.threat_intel
        self.assertTrue(first.running)
        self.assertEqual(proxy.reload()["threat_intel"], "unchanged")
        self.assertIs(root.threat_intel, first)
        proxy.write(_listener("edge", 7000) + intel.format("distrust"), shards)
        self.assertEqual(proxy.reload()["threat_intel"], "restarted")
        second = root.threat_intel
        self.assertIsNot(second, first)
        self.assertFalse(first.running)
        self.assertTrue(second.running)
        self.assertIn(b"shardtcp_feed_accepted_total", root.metrics.render())
        self.assertIs(root.factories["edge"].context.admission.__self__, second)
        proxy.write(_listener("edge", 7000), shards)
        self.assertEqual(proxy.reload()["threat_intel"], "stopped")
        self.assertIsNone(root.threat_intel)
        self.assertFalse(second.running)
        self.assertIsNone(root.factories["edge"].context.admission)
        self.assertNotIn(b"shardtcp_feed_accepted_total", root.metrics.render())


class SummariseTests(SynchronousTestCase):
    """``summarise`` alone."""

    def test_nothing_changed(self) -> None:
        """The same configuration: every listener kept, nothing else."""
        proxy = _Proxy(self)
        proxy.write(_listener("edge", 7000), [("api-1", 9001, 1.0)])
        config = load_config(proxy.path)
        summary = summarise(config, config)
        self.assertFalse(summary.changed)
        self.assertEqual(summary.listeners_kept, ("edge",))
        self.assertEqual(summary.describe(), "nothing changed")


class DrainTests(SynchronousTestCase):
    """``stopService``: stop accepting, wait up to drain_timeout, then close."""

    def setUp(self) -> None:
        self.proxy = _Proxy(self)
        self.proxy.write(_listener("edge", 7000), [("api-1", 9001, 1.0)], extra='drain_timeout = "2s"')
        self.root = self.proxy.start()
        self.events = _collect_log(self)

    def test_connection_finishing_in_time(self) -> None:
        """
        The stop waits for an open connection; readiness is false at once
        and the port is closed; when the connection ends by itself before
        the deadline the stop completes, counting it as finished.
        """
        conn, transport = self.proxy.connect()
        edge = self.root.getServiceNamed("listener:edge")
        self.assertTrue(self.root.ready)
        done: list = []
        self.root.stopService().addBoth(done.append)
        self.assertFalse(self.root.ready)
        self.assertTrue(self.root.draining)
        self.assertIsNone(edge.port)
        self.assertTrue(conn.draining)
        self.proxy.reactor.advance(1.9)
        self.assertEqual(done, [])
        self.assertFalse(transport.aborted)
        conn.connectionLost(Failure(ConnectionDone()))
        self.proxy.reactor.advance(0.05)
        self.assertEqual(done, [None])
        self.assertEqual(self.proxy.metric("shardtcp_shutdown_connections_total", outcome="finished"), 1.0)
        self.assertEqual(self.proxy.metric("shardtcp_shutdown_connections_total", outcome="closed"), 0.0)
        self.assertFalse(self.root.running)

    def test_connection_closed_at_deadline(self) -> None:
        """
        A connection still open at drain_timeout is closed with reason
        ``shutdown`` (not before: at 1.95 s it is untouched), logged so,
        and counted as closed.
        """
        conn, transport = self.proxy.connect()
        done: list = []
        self.root.stopService().addBoth(done.append)
        self.proxy.reactor.advance(1.95)
        self.assertFalse(transport.aborted)
        self.proxy.reactor.advance(0.1)
        self.assertTrue(transport.aborted)
        self.assertEqual(conn.close_reason, SHUTDOWN)
        self.assertEqual(done, [])
        conn.connectionLost(Failure(ConnectionLost()))
        self.proxy.reactor.advance(0.05)
        self.assertEqual(done, [None])
        self.assertEqual(self.proxy.metric("shardtcp_shutdown_connections_total", outcome="closed"), 1.0)
        self.assertEqual(self.proxy.metric("shardtcp_connections_rejected_total", listener="edge", reason="shutdown"), 1.0)
        lines = _texts(self.events)
        self.assertTrue(any("closed by shutdown while peeking" in l for l in lines), lines)
        self.assertTrue(any(l.startswith("drained: 0 connections finished, 1 closed") for l in lines), lines)

    def test_spliced_connection_ends_by_shutdown(self) -> None:
        """A spliced connection cut at the deadline ends with ``ended_by`` shutdown."""
        conn, transport = self.proxy.connect()
        conn.dataReceived(b"SHARD api\r\n")
        upstream, upstream_transport = self.proxy.connector.succeed()
        self.assertEqual(conn.state, "spliced")
        done: list = []
        self.root.stopService().addBoth(done.append)
        self.proxy.reactor.advance(2.05)
        self.assertTrue(transport.aborted)
        self.assertTrue(upstream_transport.aborted)
        conn.connectionLost(Failure(ConnectionLost()))
        upstream.connectionLost(Failure(ConnectionLost()))
        self.proxy.reactor.advance(0.05)
        self.assertEqual(done, [None])
        self.assertEqual(self.proxy.metric("shardtcp_connections_ended_total", listener="edge", ended_by="shutdown"), 1.0)
        lines = _texts(self.events)
        self.assertTrue(any("close=shutdown" in l and "api/api-1" in l for l in lines), lines)

    def test_spliced_connection_finishing_during_the_drain(self) -> None:
        """
        A spliced connection that ends by itself during the drain keeps its
        own side in the access line, marked as ended while draining
        (``close=drain:client``); it is counted as finished, not closed.
        """
        conn, transport = self.proxy.connect()
        conn.dataReceived(b"SHARD api\r\n")
        upstream, upstream_transport = self.proxy.connector.succeed()
        upstream.dataReceived(b"hello\n")
        done: list = []
        self.root.stopService().addBoth(done.append)
        self.proxy.reactor.advance(0.5)
        conn.connectionLost(Failure(ConnectionLost()))
        upstream.connectionLost(Failure(ConnectionLost()))
        self.proxy.reactor.advance(0.05)
        self.assertEqual(done, [None])
        self.assertFalse(transport.aborted)
        lines = _texts(self.events)
        self.assertTrue(any("close=drain:client" in l and "api/api-1" in l for l in lines), lines)
        self.assertEqual(self.proxy.metric("shardtcp_shutdown_connections_total", outcome="finished"), 1.0)

    def test_second_signal_closes_now(self) -> None:
        """``close_now`` (a second SIGTERM) closes what is open before the deadline."""
        conn, transport = self.proxy.connect()
        self.root.stopService()
        self.proxy.reactor.advance(0.5)
        self.root._close_now()
        self.assertTrue(transport.aborted)

    def test_no_connections(self) -> None:
        """With nothing open the stop completes at once, counting nothing."""
        done: list = []
        self.root.stopService().addBoth(done.append)
        self.assertEqual(done, [None])
        self.assertEqual(self.proxy.metric("shardtcp_shutdown_connections_total", outcome="finished"), 0.0)


class _Signals:
    """A stand-in for the ``signal`` module that records handlers."""

    SIGHUP, SIGTERM, SIGINT, SIGUSR1 = 1, 15, 2, 10

    def __init__(self, usr1=None) -> None:
        import signal

        self.Signals = signal.Signals
        self.handlers = {self.SIGUSR1: usr1}

    def getsignal(self, number):
        return self.handlers.get(number)

    def signal(self, number, handler):
        self.handlers[number] = handler


class _Reactor:
    def callFromThread(self, f, *a):
        f(*a)


class SignalHandlerTests(SynchronousTestCase):
    """``SignalHandlers`` with a recorded signal module."""

    def make(self, usr1=None):
        self.calls: list = []
        signals = _Signals(usr1)
        handlers = SignalHandlers(
            _Reactor(),
            reload=lambda: self.calls.append("reload"),
            stop=lambda: self.calls.append("stop"),
            close_now=lambda: self.calls.append("close_now"),
            signals=signals,
        )
        handlers.install()
        return handlers, signals

    def test_hup_reloads(self) -> None:
        """SIGHUP asks for a reload, and nothing else."""
        _, signals = self.make()
        signals.handlers[signals.SIGHUP](1, None)
        self.assertEqual(self.calls, ["reload"])

    def test_term_twice(self) -> None:
        """The first SIGTERM stops; a second (or SIGINT) closes the rest."""
        _, signals = self.make()
        signals.handlers[signals.SIGTERM](15, None)
        self.assertEqual(self.calls, ["stop"])
        signals.handlers[signals.SIGINT](2, None)
        self.assertEqual(self.calls, ["stop", "close_now"])

    def test_usr1_reopens_twistd_log_file(self) -> None:
        """
        The LogFile held by twistd's SIGUSR1 handler is found and reopened
        at its path: lines after a rename go to a new file.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        log_file = LogFile.fromFullPath(os.path.join(directory, "twistd.log"))
        self.addCleanup(log_file.close)

        def rotateLog(signal, frame):
            log_file.rotate()

        self.assertIs(twistd_log_file(rotateLog), log_file)
        handlers, signals = self.make(usr1=rotateLog)
        log_file.write("before\n")
        log_file.flush()
        os.rename(log_file.path, log_file.path + ".moved")
        signals.handlers[signals.SIGUSR1](10, None)
        log_file.write("after\n")
        log_file.flush()
        with open(log_file.path) as f:
            self.assertIn("after\n", f.read())
        with open(log_file.path + ".moved") as f:
            self.assertNotIn("after", f.read())

    def test_no_log_file(self) -> None:
        """Without a log file (stdout), SIGUSR1 does nothing harmful."""
        self.assertIsNone(twistd_log_file(None))
        handlers, signals = self.make()
        signals.handlers[signals.SIGUSR1](10, None)
        self.assertIsNone(handlers.log_file)
