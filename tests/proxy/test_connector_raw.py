"""
``connector._Connecting``: the non-blocking connect a ``ShardConnector``
on a real reactor makes to a shard at an IP literal, on real loopback
sockets.  The reactor is a real, not running epoll reactor turned by
hand; its timers are a ``Clock`` the test advances.
"""

from __future__ import annotations

import socket

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.model import Address, ShardInfo
from shardtcp.proxy import connector as connector_module
from shardtcp.proxy.connector import ConnectedNotice, DirectAttempt, ProxyConnectFailed, ShardConnector, _Connecting


class _Announcing(ConnectedNotice, Protocol):
    def __init__(self) -> None:
        self.received = b""

    def connectionMade(self) -> None:
        self.announce_connected()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class _Reactor:
    """A real epoll reactor for the descriptors, a ``Clock`` for the timers."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.real = EPollReactor()
        self.clock = Clock()
        case.addCleanup(self._close)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def callLater(self, *args, **kw):
        return self.clock.callLater(*args, **kw)

    def turn(self, until, turns: int = 200) -> None:
        for _ in range(turns):
            if until():
                return
            self.real.doIteration(0.05)
        raise AssertionError("the reactor never got there")

    def _close(self) -> None:
        for selectable in self.real.removeAll():
            try:
                selectable.connectionLost(None)
            except Exception:
                pass
        self.real._poller.close()
        waker = getattr(self.real, "waker", None)
        if waker is not None and hasattr(waker, "i"):
            waker.connectionLost(None)


class ConnectingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = _Reactor(self)
        self.reports: list = []
        self.attempt = DirectAttempt(
            Factory.forProtocol(_Announcing),
            lambda protocol: self.reports.append(("up", protocol)),
            lambda failure: self.reports.append(("failed", failure)),
        )

    def listener(self, family=socket.AF_INET, host="127.0.0.1") -> socket.socket:
        server = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind((host, 0))
        server.listen(8)
        return server

    def free_port(self) -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        return port

    def test_connects_and_carries_bytes(self) -> None:
        """
        The protocol is connected to the shard (its peer is the shard's
        address), ``succeeded`` hears it once, bytes flow both ways, and
        the connect timer is gone.
        """
        server = self.listener()
        port = server.getsockname()[1]
        _Connecting(self.reactor, self.attempt, "127.0.0.1", port, 5.0)
        self.assertEqual(len(self.reactor.clock.getDelayedCalls()), 1)
        self.reactor.turn(lambda: self.reports)
        [(kind, protocol)] = self.reports
        self.assertEqual(kind, "up")
        self.assertEqual(protocol.transport.getPeer(), IPv4Address("TCP", "127.0.0.1", port))
        self.assertEqual(self.reactor.clock.getDelayedCalls(), [])
        accepted, _ = server.accept()
        self.addCleanup(accepted.close)
        host = protocol.transport.getHost()
        self.assertEqual(accepted.getpeername(), (host.host, host.port))
        protocol.transport.write(b"to the shard")
        self.reactor.turn(lambda: not protocol.transport.dataBuffer and not protocol.transport._tempDataBuffer)
        accepted.settimeout(5)
        self.assertEqual(accepted.recv(100), b"to the shard")
        accepted.sendall(b"from the shard")
        self.reactor.turn(lambda: protocol.received == b"from the shard")
        protocol.transport.abortConnection()

    def test_ipv6(self) -> None:
        """An IPv6 literal: the peer is an ``IPv6Address``."""
        server = self.listener(socket.AF_INET6, "::1")
        port = server.getsockname()[1]
        _Connecting(self.reactor, self.attempt, "::1", port, 5.0)
        self.reactor.turn(lambda: self.reports)
        [(kind, protocol)] = self.reports
        self.assertEqual(kind, "up")
        self.assertEqual(protocol.transport.getPeer(), IPv6Address("TCP", "::1", port))
        protocol.transport.abortConnection()

    def test_refused(self) -> None:
        """Nothing listening: one report, refused, the socket closed and the timer gone."""
        connecting = _Connecting(self.reactor, self.attempt, "127.0.0.1", self.free_port(), 5.0)
        self.reactor.turn(lambda: self.reports)
        [(kind, failure)] = self.reports
        self.assertEqual(kind, "failed")
        self.assertEqual(failure.value.reason, "refused")
        self.assertEqual(connecting.fileno(), -1)
        self.assertEqual(self.reactor.clock.getDelayedCalls(), [])
        self.assertNotIn(connecting, self.reactor.real.getWriters())

    def test_timeout(self) -> None:
        """
        No answer within the timeout: one report, timed out, the writer
        removed and the socket closed; just before it, nothing.
        """
        server = self.listener()
        connecting = _Connecting(self.reactor, self.attempt, "127.0.0.1", server.getsockname()[1], 5.0)
        # Before the reactor turns, the connect has not been seen to complete.
        self.reactor.clock.advance(4.999)
        self.assertEqual(self.reports, [])
        self.reactor.clock.advance(0.001)
        [(kind, failure)] = self.reports
        self.assertEqual(kind, "failed")
        self.assertEqual(failure.value.reason, "timeout")
        self.assertEqual(connecting.fileno(), -1)
        self.assertNotIn(connecting, self.reactor.real.getWriters())
        self.reactor.real.doIteration(0)
        self.assertEqual(len(self.reports), 1)

    def test_stale_events_while_connecting(self) -> None:
        """
        A write or a read event that reaches the connect while it is still
        in progress (a stale event: a descriptor number closed and reused
        within one wake-up) changes nothing: no report, still the
        reactor's writer, the timer still set; the timeout then reports
        once, as it would have.
        """
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        # The accept queue holds one: the next connect's SYN is dropped.
        filler = socket.create_connection(server.getsockname(), timeout=5)
        self.addCleanup(filler.close)
        connecting = _Connecting(self.reactor, self.attempt, "127.0.0.1", server.getsockname()[1], 5.0)
        connecting.doWrite()
        connecting.doRead()
        self.assertEqual(self.reports, [])
        self.assertIn(connecting, self.reactor.real.getWriters())
        self.assertEqual(len(self.reactor.clock.getDelayedCalls()), 1)
        self.assertNotEqual(connecting.fileno(), -1)
        self.reactor.clock.advance(5.0)
        [(kind, failure)] = self.reports
        self.assertEqual((kind, failure.value.reason), ("failed", "timeout"))

    def test_cancel(self) -> None:
        """``cancel()`` reports once, stops the connect and its timer."""
        server = self.listener()
        connecting = _Connecting(self.reactor, self.attempt, "127.0.0.1", server.getsockname()[1], 5.0)
        self.attempt.cancel()
        [(kind, failure)] = self.reports
        self.assertEqual(kind, "failed")
        self.assertIn("ConnectingCancelledError", str(failure.value))
        self.assertEqual(connecting.fileno(), -1)
        self.assertEqual(self.reactor.clock.getDelayedCalls(), [])
        self.assertNotIn(connecting, self.reactor.real.getWriters())
        self.reactor.real.doIteration(0)
        self.assertEqual(len(self.reports), 1)

    def test_no_descriptor_is_the_proxys_failure(self) -> None:
        """A socket the system refuses (EMFILE) is the proxy's failure, never the shard's."""

        def refuse(*args, **kw):
            raise OSError(24, "Too many open files")

        self.patch(connector_module.socket, "socket", refuse)
        _Connecting(self.reactor, self.attempt, "127.0.0.1", 9, 5.0)
        [(kind, failure)] = self.reports
        self.assertEqual(kind, "failed")
        self.assertIsInstance(failure.value, ProxyConnectFailed)
        self.assertEqual(failure.value.reason, "proxy_fds")
        self.assertEqual(self.reactor.clock.getDelayedCalls(), [])

    def test_reactor_shutdown(self) -> None:
        """The reactor dropping its writers (shutting down) fails the attempt once."""
        server = self.listener()
        connecting = _Connecting(self.reactor, self.attempt, "127.0.0.1", server.getsockname()[1], 5.0)
        for selectable in self.reactor.real.removeAll():
            from twisted.internet.error import ConnectionLost
            from twisted.python.failure import Failure

            selectable.connectionLost(Failure(ConnectionLost()))
        [(kind, failure)] = self.reports
        self.assertEqual(kind, "failed")
        self.assertEqual(connecting.fileno(), -1)
        self.assertEqual(self.reactor.clock.getDelayedCalls(), [])


class WhichPathTests(SynchronousTestCase):
    def shard(self, host="127.0.0.1", port=9):
        return ShardInfo("s1", "api", Address(host, port), None, 10, 90.0)

    def test_real_reactor_connects_itself(self) -> None:
        """On a real reactor the connector makes its own connect; an in-memory one records ``connectTCP``."""
        real = _Reactor(self)
        self.assertTrue(ShardConnector(real.real)._raw)
        memory = MemoryReactorClock()
        connector = ShardConnector(memory)
        self.assertFalse(connector._raw)
        connector.start_direct(self.shard(), Factory.forProtocol(_Announcing), 5.0, lambda p: None, lambda f: None)
        self.assertEqual(len(memory.tcpClients), 1)
