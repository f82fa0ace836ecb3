"""
Connecting to shards: ``InOrder`` tries candidates one at a time, in order.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.proxy.connector import InOrder, ShardConnectFailed

# Connect failures and the reason each keeps (the last is the proxy's own:
# out of descriptors).
_CONNECT_FAILURES = [
    (error.ConnectionRefusedError(), "refused"),
    (error.TimeoutError(), "timeout"),
    (error.ConnectError("no route"), "connect_error"),
    (error.ConnectError(osError=24), "proxy_fds"),
]


class Attempts:
    """Records what ``InOrder`` does; each attempt's Deferred is settled by the test."""

    def __init__(self, go_on: bool = True) -> None:
        self.started: list = []
        self.deferreds: list = []
        self.failed: list = []
        self.succeeded: list = []
        self.exhausted: list = []
        self.go_on = go_on

    def attempt(self, candidate):
        d = defer.Deferred()
        self.started.append(candidate)
        self.deferreds.append(d)
        return d

    def in_order(self, candidates) -> InOrder:
        return InOrder(
            candidates,
            self.attempt,
            succeeded=lambda c, r: self.succeeded.append((c, r)),
            failed=lambda c, f: self.failed.append((c, getattr(f.value, "reason", f.type.__name__))) or self.go_on,
            exhausted=lambda cs: self.exhausted.append(list(cs)),
        )


class InOrderTests(SynchronousTestCase):
    """One attempt at a time; a failure moves on; the first success ends it."""

    def test_first_success(self) -> None:
        """Only the first candidate is tried when it answers."""
        a = Attempts()
        a.in_order(["a", "b"]).start()
        self.assertEqual(a.started, ["a"])
        a.deferreds[0].callback("proto")
        self.assertEqual(a.succeeded, [("a", "proto")])
        self.assertEqual(a.started, ["a"])

    def test_failure_tries_next(self) -> None:
        """A failure is reported, then the next candidate is tried, and its success wins."""
        a = Attempts()
        a.in_order(["a", "b", "c"]).start()
        a.deferreds[0].errback(ShardConnectFailed("refused", "no"))
        self.assertEqual(a.started, ["a", "b"])
        a.deferreds[1].callback("p")
        self.assertEqual(a.failed, [("a", "refused")])
        self.assertEqual(a.succeeded, [("b", "p")])
        self.assertEqual(a.exhausted, [])

    def test_exhausted(self) -> None:
        """When every candidate failed, ``exhausted`` gets them in order."""
        a = Attempts()
        a.in_order(["a", "b"]).start()
        a.deferreds[0].errback(ShardConnectFailed("refused", "no"))
        a.deferreds[1].errback(ShardConnectFailed("timeout", "no"))
        self.assertEqual(a.failed, [("a", "refused"), ("b", "timeout")])
        self.assertEqual(a.exhausted, [["a", "b"]])

    def test_failed_may_stop(self) -> None:
        """When ``failed`` says no, nothing more is tried and nothing is exhausted."""
        a = Attempts(go_on=False)
        a.in_order(["a", "b"]).start()
        a.deferreds[0].errback(ShardConnectFailed("refused", "no"))
        self.assertEqual(a.started, ["a"])
        self.assertEqual(a.exhausted, [])

    def test_cancel(self) -> None:
        """``cancel`` cancels the attempt in progress; its failure goes to ``failed``."""
        a = Attempts(go_on=False)
        attempts = a.in_order(["a", "b"])
        attempts.start()
        attempts.cancel()
        self.assertTrue(a.deferreds[0].called)
        self.assertEqual(a.failed, [("a", "CancelledError")])
        self.assertEqual(a.started, ["a"])
        attempts.cancel()

    def test_synchronous_failures(self) -> None:
        """Attempts that fail at once still go in order, each once."""
        failed: list = []
        attempts = InOrder(
            ["a", "b", "c"],
            lambda c: defer.fail(ShardConnectFailed("refused", c)),
            succeeded=lambda c, r: None,
            failed=lambda c, f: failed.append(c) or True,
            exhausted=lambda cs: failed.append("done"),
        )
        attempts.start()
        self.assertEqual(failed, ["a", "b", "c", "done"])


class InterfaceTests(SynchronousTestCase):
    """The connector seam."""

    def test_shard_connector_provides_interface(self) -> None:
        """``ShardConnector`` provides ``IShardConnector``."""
        from twisted.internet.testing import MemoryReactorClock
        from zope.interface.verify import verifyObject

        from shardtcp.proxy.connector import IShardConnector, ShardConnector

        verifyObject(IShardConnector, ShardConnector(MemoryReactorClock()))


class EndpointCacheTests(SynchronousTestCase):
    """``ShardConnector`` builds one plain endpoint per shard address and timeout."""

    def shard(self, host: str, port: int = 443):
        from shardtcp.model import Address, ShardInfo

        return ShardInfo("s1", "api", Address(host, port), None, 10, 90.0)

    def test_same_address_same_endpoint(self) -> None:
        """Two connections to one shard reuse its endpoint; another port or timeout gets its own."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
        from twisted.internet.testing import MemoryReactorClock

        from shardtcp.proxy.connector import ShardConnector

        connector = ShardConnector(MemoryReactorClock())
        first = connector._plain_endpoint(self.shard("127.0.0.1"), 5.0)
        self.assertIsInstance(first, TCP4ClientEndpoint)
        self.assertIs(connector._plain_endpoint(self.shard("127.0.0.1"), 5.0), first)
        self.assertIsNot(connector._plain_endpoint(self.shard("127.0.0.1", 444), 5.0), first)
        self.assertIsNot(connector._plain_endpoint(self.shard("127.0.0.1"), 6.0), first)
        self.assertIsInstance(connector._plain_endpoint(self.shard("::1"), 5.0), TCP6ClientEndpoint)

    def test_bounded(self) -> None:
        """At ENDPOINT_CACHE_SIZE addresses the cache starts over instead of growing."""
        from twisted.internet.testing import MemoryReactorClock

        from shardtcp.proxy import connector as module

        connector = module.ShardConnector(MemoryReactorClock())
        self.patch(module, "ENDPOINT_CACHE_SIZE", 3)
        first = connector._plain_endpoint(self.shard("127.0.0.1", 1), 5.0)
        connector._plain_endpoint(self.shard("127.0.0.1", 2), 5.0)
        connector._plain_endpoint(self.shard("127.0.0.1", 3), 5.0)
        self.assertEqual(len(connector._endpoints), 3)
        self.assertIs(connector._plain_endpoint(self.shard("127.0.0.1", 1), 5.0), first)
        connector._plain_endpoint(self.shard("127.0.0.1", 4), 5.0)
        self.assertEqual(len(connector._endpoints), 1)
        self.assertIsNot(connector._plain_endpoint(self.shard("127.0.0.1", 1), 5.0), first)


class TimeoutTests(SynchronousTestCase):
    """A plain TCP attempt is bounded by connectTCP's own timer; it fails as ``timeout`` when it fires."""

    def test_one_timer_and_timeout_reason(self) -> None:
        """One delayed call per attempt (connectTCP's), and its firing is classified ``timeout``."""
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.testing import MemoryReactorClock

        from shardtcp.model import Address, ShardInfo
        from shardtcp.proxy.connector import ShardConnector

        reactor = MemoryReactorClock()
        connector = ShardConnector(reactor)
        d = connector.connect(ShardInfo("s1", "api", Address("127.0.0.1", 9), None, 10, 90.0),
                              Factory.forProtocol(Protocol), 5.0)
        [(host, port, factory, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9, 5.0))
        # MemoryReactor does not run connectTCP's timer: the connector's
        # failure after it fired is what a real reactor delivers.
        self.assertEqual(reactor.getDelayedCalls(), [])
        from twisted.internet.error import TimeoutError as TxTimeoutError
        from twisted.python.failure import Failure

        factory.clientConnectionFailed(reactor.connectors[0], Failure(TxTimeoutError()))
        failure = self.failureResultOf(d, ShardConnectFailed)
        self.assertEqual(failure.value.reason, "timeout")

    def test_injected_endpoint_keeps_its_bound(self) -> None:
        """An endpoint from ``endpoint_factory`` gets the connector's timer: it fires at ``timeout``, not before."""
        from twisted.internet import defer as tdefer
        from twisted.internet.testing import MemoryReactorClock

        from shardtcp.model import Address, ShardInfo
        from shardtcp.proxy.connector import ShardConnector

        class Never:
            def connect(self, factory):
                return tdefer.Deferred()

        reactor = MemoryReactorClock()
        connector = ShardConnector(reactor, endpoint_factory=lambda shard, timeout: Never())
        d = connector.connect(ShardInfo("s1", "api", Address("127.0.0.1", 9), None, 10, 90.0), None, 5.0)
        reactor.advance(4.999)
        self.assertNoResult(d)
        reactor.advance(0.001)
        self.assertEqual(self.failureResultOf(d, ShardConnectFailed).value.reason, "timeout")


class DirectSetUp:
    """A memory reactor, a ``ShardConnector`` on it, a factory of announcing protocols."""

    def setUp(self) -> None:
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.testing import MemoryReactorClock

        from shardtcp.proxy.connector import ConnectedNotice, ShardConnector

        class Announcing(ConnectedNotice, Protocol):
            made = 0

            def connectionMade(self) -> None:
                self.made += 1
                self.announce_connected()

        self.reactor = MemoryReactorClock()
        self.connector = ShardConnector(self.reactor)
        self.factory = Factory.forProtocol(Announcing)

    def shard(self, host: str = "127.0.0.1", port: int = 9):
        from shardtcp.model import Address, ShardInfo

        return ShardInfo("s1", "api", Address(host, port), None, 10, 90.0)


class DirectPathTests(DirectSetUp, SynchronousTestCase):
    """
    A factory of ``ConnectedNotice`` protocols and an IP literal: one
    ``connectTCP`` with a small factory, no endpoint; the Deferred fires
    once the protocol is connected, failures are classified as before.
    """

    def connect(self, host: str = "127.0.0.1"):
        d = self.connector.connect(self.shard(host), self.factory, 5.0)
        [(h, port, factory, timeout, bind)] = self.reactor.tcpClients
        self.assertEqual((h, port, timeout, bind), (host, 9, 5.0, None))
        return d, factory

    def test_fires_with_the_connected_protocol(self) -> None:
        """No endpoint is built; the Deferred fires with the protocol after its connectionMade, once."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        d, factory = self.connect()
        self.assertEqual(self.connector._endpoints, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
        self.assertIsInstance(protocol, self.factory.protocol)
        self.assertNoResult(d)
        protocol.makeConnection(StringTransport())
        self.assertIs(self.successResultOf(d), protocol)
        self.assertEqual(protocol.made, 1)
        protocol.announce_connected()  # a second notice goes nowhere (no AlreadyCalledError)

    def test_ipv6_literal_direct(self) -> None:
        """An IPv6 literal takes the direct path too (connectTCP resolves numeric hosts itself)."""
        self.connect("::1")
        self.assertEqual(self.connector._endpoints, {})

    def test_host_name_takes_the_endpoint(self) -> None:
        """A host name still goes through HostnameEndpoint (no connectTCP of the name itself)."""
        from twisted.internet.endpoints import HostnameEndpoint

        self.connector.connect(self.shard("shard.example"), self.factory, 5.0)
        [endpoint] = self.connector._endpoints.values()
        self.assertIsInstance(endpoint, HostnameEndpoint)

    def test_plain_protocol_takes_the_endpoint(self) -> None:
        """A protocol that does not announce itself is connected through the endpoint's wrapper."""
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.internet.protocol import Factory, Protocol

        self.connector.connect(self.shard(), Factory.forProtocol(Protocol), 5.0)
        [endpoint] = self.connector._endpoints.values()
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)

    def test_failures_classified(self) -> None:
        """Refused, timed out, other connect errors and the proxy's own errno keep their reasons."""
        from twisted.python.failure import Failure

        from shardtcp.proxy.connector import ProxyConnectFailed

        for value, reason in _CONNECT_FAILURES:
            self.reactor.tcpClients.clear()
            d, factory = self.connect()
            factory.clientConnectionFailed(None, Failure(value))
            failure = self.failureResultOf(d, ShardConnectFailed)
            self.assertEqual(failure.value.reason, reason)
            self.assertEqual(isinstance(failure.value, ProxyConnectFailed), reason == "proxy_fds")

    def test_no_protocol(self) -> None:
        """A factory that builds nothing fails the attempt (``NoProtocol``, reason ``error``)."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.protocol import Factory

        from shardtcp.proxy.connector import ConnectedNotice

        class Nothing(Factory):
            protocol = type("P", (ConnectedNotice,), {})

            def buildProtocol(self, addr):
                return None

        d = self.connector.connect(self.shard(), Nothing(), 5.0)
        factory = self.reactor.tcpClients[0][2]
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9)))
        failure = self.failureResultOf(d, ShardConnectFailed)
        self.assertEqual(failure.value.reason, "error")
        self.assertIn("NoProtocol", str(failure.value))
        factory.clientConnectionFailed(None, Failure(RuntimeError("late")))  # ignored once failed

    def test_cancel_stops_connecting(self) -> None:
        """Cancelling stops the connector and fails as the endpoint's cancel did; a late failure is ignored."""
        from twisted.internet.error import UserError
        from twisted.python.failure import Failure

        d, factory = self.connect()
        connector = self.reactor.connectors[0]
        stopped = []
        self.patch(connector, "stopConnecting", lambda: stopped.append(True))
        factory.startedConnecting(connector)
        d.cancel()
        self.assertEqual(stopped, [True])
        failure = self.failureResultOf(d, ShardConnectFailed)
        self.assertIn("ConnectingCancelledError", str(failure.value))
        factory.clientConnectionFailed(connector, Failure(UserError()))


class StartDirectTests(DirectSetUp, SynchronousTestCase):
    """
    ``start_direct``: the direct path without a Deferred.  The attempt
    reports once to ``succeeded`` or ``failed``, with the failures
    ``connect``'s Deferred would carry; elsewhere it is None.
    """

    def start(self, host: str = "127.0.0.1", factory=None):
        self.reports: list = []
        attempt = self.connector.start_direct(
            self.shard(host),
            factory or self.factory,
            5.0,
            lambda protocol: self.reports.append(("up", protocol)),
            lambda failure: self.reports.append(("failed", failure)),
        )
        return attempt

    def test_succeeds_once_connected(self) -> None:
        """One connectTCP with the attempt as factory; ``succeeded`` hears the protocol after its connectionMade, once."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        attempt = self.start()
        [(host, port, factory, timeout, bind)] = self.reactor.tcpClients
        self.assertEqual((host, port, factory, timeout, bind), ("127.0.0.1", 9, attempt, 5.0, None))
        self.assertEqual((self.connector._endpoints, self.reactor.getDelayedCalls()), ({}, []))
        protocol = attempt.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
        self.assertEqual(self.reports, [])
        protocol.makeConnection(StringTransport())
        self.assertEqual(self.reports, [("up", protocol)])
        self.assertEqual(protocol.made, 1)
        protocol.announce_connected()
        attempt.clientConnectionFailed(None, Failure(RuntimeError("late")))
        attempt.cancel()
        self.assertEqual(len(self.reports), 1)

    def test_not_direct(self) -> None:
        """A host name, a protocol that does not announce itself, an injected endpoint factory: None, nothing started."""
        from twisted.internet.protocol import Factory, Protocol

        from shardtcp.proxy.connector import ShardConnector

        self.assertIsNone(self.start("shard.example"))
        self.assertIsNone(self.start(factory=Factory.forProtocol(Protocol)))
        self.connector = ShardConnector(self.reactor, endpoint_factory=lambda shard, timeout: None)
        self.assertIsNone(self.start())
        self.assertEqual((self.reactor.tcpClients, self.reports), ([], []))

    def test_failures_classified(self) -> None:
        """Refused, timed out, other connect errors and the proxy's own errno keep their reasons; reported once."""
        from shardtcp.proxy.connector import ProxyConnectFailed

        for value, reason in _CONNECT_FAILURES:
            attempt = self.start()
            attempt.clientConnectionFailed(None, Failure(value))
            attempt.clientConnectionFailed(None, Failure(value))
            [(kind, failure)] = self.reports
            self.assertEqual((kind, failure.value.reason), ("failed", reason))
            self.assertIsInstance(failure.value, ShardConnectFailed)
            self.assertEqual(isinstance(failure.value, ProxyConnectFailed), reason == "proxy_fds")

    def test_connect_raises(self) -> None:
        """connectTCP raising (out of descriptors) fails the attempt before start_direct returns."""
        def refuse(*args, **kw):
            raise OSError(24, "Too many open files")

        self.patch(self.reactor, "connectTCP", refuse)
        attempt = self.start()
        self.assertTrue(attempt.settled)
        [(kind, failure)] = self.reports
        self.assertEqual((kind, failure.value.reason), ("failed", "proxy_fds"))

    def test_no_protocol(self) -> None:
        """A factory that builds nothing fails the attempt (``NoProtocol``, reason ``error``)."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.protocol import Factory

        from shardtcp.proxy.connector import ConnectedNotice

        class Nothing(Factory):
            protocol = type("P", (ConnectedNotice,), {})

            def buildProtocol(self, addr):
                return None

        attempt = self.start(factory=Nothing())
        self.assertIsNone(attempt.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9)))
        [(kind, failure)] = self.reports
        self.assertEqual((kind, failure.value.reason), ("failed", "error"))
        self.assertIn("NoProtocol", str(failure.value))

    def test_cancel_stops_connecting(self) -> None:
        """cancel() stops the connector and fails as cancelling connect's Deferred does; a late failure is ignored."""
        from twisted.internet.error import UserError

        attempt = self.start()
        connector = self.reactor.connectors[0]
        stopped = []
        self.patch(connector, "stopConnecting", lambda: stopped.append(True))
        attempt.startedConnecting(connector)
        attempt.cancel()
        self.assertEqual(stopped, [True])
        [(kind, failure)] = self.reports
        self.assertEqual(kind, "failed")
        self.assertIn("ConnectingCancelledError", str(failure.value))
        attempt.clientConnectionFailed(connector, Failure(UserError()))
        self.assertEqual(len(self.reports), 1)


class Handle:
    """A direct attempt as ``InOrder`` sees it: something to cancel."""

    def __init__(self, on_cancel=None) -> None:
        self.cancelled = 0
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        self.cancelled += 1
        if self._on_cancel is not None:
            self._on_cancel()


class InOrderDirectTests(SynchronousTestCase):
    """Attempts that report themselves (``won``/``lost``/``follow``) instead of returning a Deferred."""

    def setUp(self) -> None:
        self.a = Attempts()
        self.handles: list = []
        self.in_order = None

        def attempt(candidate):
            self.a.started.append(candidate)
            handle = Handle(lambda: self.in_order.lost(candidate, Failure(ShardConnectFailed("error", "cancelled"))))
            self.handles.append(handle)
            return handle

        self.a.attempt = attempt

    def test_won_and_lost(self) -> None:
        """A lost attempt moves on to the next candidate; a won one ends it with its result."""
        self.in_order = self.a.in_order(["a", "b", "c"])
        self.in_order.start()
        self.in_order.lost("a", Failure(ShardConnectFailed("refused", "no")))
        self.assertEqual(self.a.started, ["a", "b"])
        self.in_order.won("b", "proto")
        self.assertEqual((self.a.failed, self.a.succeeded, self.a.exhausted), ([("a", "refused")], [("b", "proto")], []))
        self.in_order.cancel()
        self.assertEqual([h.cancelled for h in self.handles], [0, 0])

    def test_cancel_the_attempt_in_progress(self) -> None:
        """cancel() cancels the direct attempt in progress, once; its failure is reported as any other."""
        self.a.go_on = False
        self.in_order = self.a.in_order(["a", "b"])
        self.in_order.start()
        self.in_order.cancel()
        self.in_order.cancel()
        self.assertEqual([h.cancelled for h in self.handles], [1])
        self.assertEqual(self.a.failed, [("a", "error")])
        self.assertEqual(self.a.started, ["a"])

    def test_reported_before_returning(self) -> None:
        """
        An attempt that fails before it returns (connect raised) is not kept
        as the one in progress: the next candidate's is, and the last
        failure exhausts the candidates.
        """
        in_order = None
        handles = []

        def attempt(candidate):
            handle = Handle()
            handles.append(handle)
            if candidate == "a":
                in_order.lost("a", Failure(ShardConnectFailed("proxy_fds", "no fds")))
            return handle

        self.a.attempt = attempt
        in_order = self.a.in_order(["a", "b"])
        in_order.start()
        in_order.cancel()
        self.assertEqual([h.cancelled for h in handles], [0, 1])
        in_order.lost("b", Failure(ShardConnectFailed("refused", "no")))
        self.assertEqual(self.a.failed, [("a", "proxy_fds"), ("b", "refused")])
        self.assertEqual(self.a.exhausted, [["a", "b"]])

    def test_follow(self) -> None:
        """An attempt handed over to a Deferred (upstream TLS) ends as that Deferred does; cancel() cancels it."""
        self.in_order = self.a.in_order(["a", "b"])
        self.in_order.start()
        d = defer.Deferred()
        self.in_order.follow("a", d)
        self.in_order.cancel()
        self.assertEqual(self.a.failed, [("a", "CancelledError")])
        self.assertEqual(self.a.started, ["a", "b"])
        tls = defer.Deferred()
        self.in_order.follow("b", tls)
        tls.callback("verified")
        self.assertEqual(self.a.succeeded, [("b", "verified")])


class UpstreamInterfacesTests(SynchronousTestCase):
    """The shard side offers the reactor the same interfaces directly and behind Twisted's client endpoint."""

    def test_same_interfaces_as_behind_the_endpoint(self) -> None:
        """
        Connected directly, ``UpstreamProtocol`` provides exactly the
        interfaces the endpoint's wrapping protocol provides around it,
        ``IHalfCloseableProtocol`` included: the shard's EOF arrives as
        ``readConnectionLost`` (a half-close) on both paths.
        """
        from twisted.internet.endpoints import _WrappingProtocol
        from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
        from zope.interface import providedBy
        from zope.interface.verify import verifyObject

        from shardtcp.proxy.listener import UpstreamProtocol

        from twisted.internet.testing import StringTransport

        direct = UpstreamProtocol()
        wrapped = _WrappingProtocol(defer.Deferred(), UpstreamProtocol())
        transport = StringTransport()
        transport.protocol = wrapped
        wrapped.makeConnection(transport)
        self.assertEqual(set(providedBy(direct)), set(providedBy(wrapped)))
        self.assertTrue(IHandshakeListener.providedBy(direct))
        self.assertTrue(verifyObject(IHalfCloseableProtocol, direct))
        self.assertTrue(verifyObject(IHalfCloseableProtocol, wrapped))
