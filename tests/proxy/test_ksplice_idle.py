"""
The kernel splices' idle timeouts, watched by their splicer with one heap
and one timer: each splice still ends at its own quiet deadline, to the
tick; ended splices leave no timer behind.  Real loopback sockets, a
``Clock`` for time.
"""

from __future__ import annotations

from twisted.internet import defer, reactor as global_reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, TestCase

from shardtcp.eventloop import adopt
from shardtcp.proxy import ksplice
from shardtcp.proxy.ksplice import KernelSplicer, PipePool, kernel_splice_available

from tests.proxy.test_ksplice import Peer, _listener, _pair


class IdleSweepTests(TestCase):
    """Many splices, one timer."""

    timeout = 60

    def setUp(self):
        if not kernel_splice_available():
            raise SkipTest("splice(2) is not available here")
        # The daemon's reactor: edge-triggered descriptors (the level-
        # triggered variants hide it from the splicer).
        adopt(global_reactor)
        self.srv = _listener()
        self.addCleanup(self.srv.close)
        self.pool = PipePool(max_pipes=16)
        self.addCleanup(self.pool.close)
        self.clock = Clock()
        self.splicer = KernelSplicer(self.pool, reactor=global_reactor, clock=self.clock)

    def connect(self, idle_timeout: float):
        client, proxy_a = _pair(self.srv)
        proxy_b, shard = _pair(self.srv)
        for s in (client, shard):
            self.addCleanup(lambda s=s: s.fileno() != -1 and s.close())
        done = defer.Deferred()
        splice = self.splicer.take_sockets(proxy_a, proxy_b, on_done=done.callback, idle_timeout=idle_timeout)
        self.assertIsNotNone(splice)
        return client, shard, splice, done

    @defer.inlineCallbacks
    def test_each_ends_at_its_own_deadline(self):
        """
        Three splices (idle timeouts 10, 10 and 4 s) share one delayed call.
        The 4 s one ends at 4 s and not at 3.99; a ping at 6 s keeps its
        sender's splice until 16 s while the quiet one ends at 10 s, not at
        9.99; each ends as "idle", unclean; then no delayed call is left.
        """
        a = self.connect(10)
        b = self.connect(10)
        c = self.connect(4)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(3.99)
        self.assertFalse(c[3].called)
        self.clock.advance(0.01)
        stats = yield c[3]
        self.assertEqual((stats.ended_by, stats.clean), ("idle", False))
        self.assertFalse(a[3].called or b[3].called)
        self.clock.advance(2)  # 6 s
        shard = Peer(a[1], shut=False).start()
        self.addCleanup(shard.close)
        a[0].sendall(b"ping")
        while shard.received < 4:
            yield deferLater(global_reactor, 0.01, lambda: None)
        self.clock.advance(3.99)  # 9.99 s
        self.assertFalse(a[3].called or b[3].called)
        self.clock.advance(0.01)  # 10 s
        stats = yield b[3]
        self.assertEqual(stats.ended_by, "idle")
        self.assertFalse(a[3].called)
        self.clock.advance(5.99)  # 15.99 s
        self.assertFalse(a[3].called)
        self.clock.advance(0.01)  # 16 s
        stats = yield a[3]
        self.assertEqual((stats.ended_by, stats.bytes_up), ("idle", 4))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.pool.in_use, 0)

    @defer.inlineCallbacks
    def test_ended_splices_leave_the_heap(self):
        """
        Splices that end by themselves are forgotten: with one still
        watched the heap stays bounded (at most twice the live ones plus
        64), and when the last ends its timer is cancelled at once.
        """
        keep = self.connect(30)
        for _ in range(100):
            client, shard, splice, done = self.connect(30)
            splice.close()
            client.close(), shard.close()
            yield done
        self.assertLessEqual(len(self.splicer._idle), 2 * 1 + 64)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        keep[2].abort("test")
        yield keep[3]
        self.assertEqual((self.splicer._idle, self.clock.getDelayedCalls()), ([], []))


class LevelTriggeredIdleSweepTests(IdleSweepTests):
    """The same idle deadlines with each socket a reader of the reactor's (no splicer epoll)."""

    def setUp(self):
        self.patch(ksplice, "_EdgeReactor", None)
        IdleSweepTests.setUp(self)
        self.assertFalse(self.splicer.edge)
