"""
Connecting to shards: ``InOrder`` tries candidates one at a time, in order.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.proxy.connector import InOrder, ShardConnectFailed


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
