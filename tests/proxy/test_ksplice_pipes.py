"""
The kernel splice's pipes: reserved per connection (two, bounded by
``max_pipes``), lent only while bytes are in flight and given back once
drained, and a read copied through userspace when no pipe can be had.
Real loopback sockets and the real reactor.
"""

from __future__ import annotations

import errno
import hashlib
import os

from twisted.internet import defer, reactor as global_reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from shardtcp.eventloop import adopt
from shardtcp.proxy import ksplice
from shardtcp.proxy.ksplice import KernelSplicer, PipePool, kernel_splice_available

from tests.proxy.test_ksplice import MIB, Peer, _listener, _pair


def _pipe_fds() -> int:
    """Pipe descriptors this process holds."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("pipe:"):
                count += 1
        except OSError:
            pass
    return count


class _NoPipes(PipePool):
    """A pool whose system refuses every new pipe (a process out of descriptors)."""

    def _make(self):
        raise OSError(errno.EMFILE, "Too many open files")


class PipeReservationTests(TestCase):
    """``reserve`` at both edges of ``max_pipes``; no pipe is made for it."""

    def test_reserve_bound_both_edges(self):
        """
        Reservations add up to exactly ``max_pipes`` and not one more; one
        given back makes room for exactly one; reserving opens no pipe.
        """
        pool = PipePool(max_pipes=3)
        self.addCleanup(pool.close)
        self.assertTrue(pool.reserve(2))
        self.assertFalse(pool.reserve(2))  # 4 > 3
        self.assertTrue(pool.reserve(1))  # 3 == 3
        self.assertFalse(pool.reserve(1))
        self.assertEqual((pool.in_use, pool.lent, pool.free), (3, 0, 0))
        pool.unreserve(1)
        self.assertTrue(pool.reserve(1))
        self.assertFalse(pool.reserve(1))

    def test_lend_and_give_back(self):
        """
        A lent pipe is counted in ``lent``; given back empty it is kept for
        the next loan (the same pipe), given back with bytes it is closed.
        """
        pool = PipePool(max_pipes=2, keep_free=1)
        self.addCleanup(pool.close)
        pipe = pool.lend()
        self.assertEqual(pool.lent, 1)
        pool.give_back(pipe, empty=True)
        self.assertEqual((pool.lent, pool.free), (0, 1))
        self.assertIs(pool.lend(), pipe)
        pool.give_back(pipe, empty=False)
        self.assertRaises(OSError, os.fstat, pipe.read_fd)
        self.assertEqual((pool.lent, pool.free), (0, 0))


class LazyPipeTests(TestCase):
    """Pipes follow the bytes, not the connections."""

    timeout = 60

    def setUp(self):
        if not kernel_splice_available():
            raise SkipTest("splice(2) is not available here")
        # The daemon's reactor: edge-triggered descriptors (the level-
        # triggered variants hide it from the splicer).
        adopt(global_reactor)
        self.srv = _listener()
        self.addCleanup(self.srv.close)

    def connect(self, splicer, **kw):
        """client <-> proxy <-> shard through ``splicer``; the two ends, the splice, its end."""
        client, proxy_a = _pair(self.srv)
        proxy_b, shard = _pair(self.srv)
        for s in (client, shard, proxy_a, proxy_b):
            self.addCleanup(lambda s=s: s.fileno() != -1 and s.close())
        done = defer.Deferred()
        splice = splicer.take_sockets(proxy_a, proxy_b, on_done=done.callback, **kw)
        return client, shard, splice, done

    @defer.inlineCallbacks
    def test_idle_connections_hold_no_pipe(self):
        """
        Three idle spliced connections reserve six pipes but open none; a
        few bytes through one borrow a pipe that is back, empty, once they
        have passed; the other connections still hold none.
        """
        pool = PipePool(max_pipes=6, keep_free=4)
        self.addCleanup(pool.close)
        splicer = KernelSplicer(pool, reactor=global_reactor)
        # The reactor is running (with its own pipes) before the count.
        yield deferLater(global_reactor, 0, lambda: None)
        before = _pipe_fds()
        ends = [self.connect(splicer) for _ in range(3)]
        self.assertTrue(all(splice is not None for _, _, splice, _ in ends))
        yield deferLater(global_reactor, 0.05, lambda: None)
        self.assertEqual((pool.in_use, pool.lent, pool.free), (6, 0, 0))
        self.assertEqual(_pipe_fds(), before)
        client_sock, shard_sock, splice, done = ends[0]
        shard = Peer(shard_sock, shut=False).start()
        self.addCleanup(shard.close)
        client_sock.sendall(b"ping")
        while shard.received < 4:
            yield deferLater(global_reactor, 0.01, lambda: None)
        self.assertEqual(shard.head, b"ping")
        self.assertEqual((pool.in_use, pool.lent, pool.free), (6, 0, 1))
        self.assertEqual(_pipe_fds(), before + 2)
        self.assertEqual([s._sides[0].pipe for _, _, s, _ in ends], [None, None, None])
        for _, _, s, d in ends:
            s.abort("test")
            yield d
        self.assertEqual((pool.in_use, pool.lent), (0, 0))

    @defer.inlineCallbacks
    def test_pipe_held_while_bytes_wait(self):
        """
        Against a shard that does not read, the client -> shard direction
        keeps its pipe (with bytes in it, ``lent`` 1) and the other
        direction has none; once the shard reads, everything arrives and
        the pipe is back.
        """
        pool = PipePool(max_pipes=2)
        self.addCleanup(pool.close)
        splicer = KernelSplicer(pool, reactor=global_reactor)
        up = os.urandom(16 * MIB)
        client_sock, shard_sock, splice, done = self.connect(splicer)
        client = Peer(client_sock, up).start()
        shard = Peer(shard_sock, reading=False).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        last, still = -1, 0
        while still < 5:
            yield deferLater(global_reactor, 0.02, lambda: None)
            last, still = splice.stats.bytes_up, (still + 1 if splice.stats.bytes_up == last else 0)
        self.assertEqual(pool.lent, 1)
        self.assertGreater(splice._sides[0].in_pipe, 0)
        self.assertIsNotNone(splice._sides[0].pipe)
        self.assertIsNone(splice._sides[1].pipe)
        shard.resume_reading()
        stats = yield done
        yield shard.ended
        self.assertEqual(shard.sha.digest(), hashlib.sha256(up).digest())
        self.assertEqual((stats.bytes_up, pool.in_use, pool.lent), (len(up), 0, 0))

    def test_connections_at_both_edges_of_max_pipes(self):
        """
        ``max_pipes = 4`` takes two connections and refuses the third
        (``None``, its sockets untouched); ``max_pipes = 3`` takes one and
        refuses the second; an ended connection makes room for one more.
        """
        for max_pipes, taken in ((4, 2), (3, 1)):
            pool = PipePool(max_pipes=max_pipes)
            self.addCleanup(pool.close)
            splicer = KernelSplicer(pool, reactor=global_reactor)
            splices = [self.connect(splicer)[2] for _ in range(taken)]
            self.assertNotIn(None, splices)
            self.assertEqual(pool.in_use, 2 * taken)
            a, b = _pair(self.srv)
            c, d = _pair(self.srv)
            for s in (a, b, c, d):
                self.addCleanup(s.close)
            self.assertIsNone(splicer.take_sockets(b, c, on_done=lambda stats: None))
            self.assertTrue(b.getblocking() and c.getblocking())
            self.assertNotEqual(b.fileno(), -1)
            splices[0].abort("test")
            self.assertEqual(pool.in_use, 2 * taken - 2)
            last = splicer.take_sockets(b, c, on_done=lambda stats: None)
            self.assertIsNotNone(last)
            self.assertEqual(pool.in_use, 2 * taken)
            for splice in splices[1:] + [last]:
                splice.abort("test")
            self.assertEqual((pool.in_use, pool.lent), (0, 0))

    @defer.inlineCallbacks
    def test_no_pipe_copies_through_userspace(self):
        """
        When the system gives no pipe (``EMFILE``), a taken connection still
        moves 3 MiB up and 1 MiB down whole, counted, by copying; the
        splicer stays enabled and no pipe is lent.
        """
        pool = _NoPipes(max_pipes=2)
        self.addCleanup(pool.close)
        splicer = KernelSplicer(pool, reactor=global_reactor)
        up, down = os.urandom(3 * MIB), os.urandom(MIB)
        client_sock, shard_sock, splice, done = self.connect(splicer, prefix_up=b"H")
        self.assertIsNotNone(splice)
        client = Peer(client_sock, up).start()
        shard = Peer(shard_sock, down).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        stats = yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual(shard.sha.digest(), hashlib.sha256(b"H" + up).digest())
        self.assertEqual(client.sha.digest(), hashlib.sha256(down).digest())
        self.assertEqual((stats.bytes_up, stats.bytes_down), (len(up), len(down)))
        self.assertTrue(splicer.enabled)
        self.assertEqual((pool.in_use, pool.lent), (0, 0))


class LevelTriggeredLazyPipeTests(LazyPipeTests):
    """The same pipe loans with each socket a reader and writer of the reactor's (no splicer epoll)."""

    def setUp(self):
        self.patch(ksplice, "_EdgeReactor", None)
        LazyPipeTests.setUp(self)


class PythonLoopLazyPipeTests(LazyPipeTests):
    """The pipe loans through the pure-Python loop (an install without ``shardtcp.proxy._kpump``)."""

    def setUp(self):
        self.patch(ksplice, "_kpump", None)
        LazyPipeTests.setUp(self)


class PythonLoopLevelTriggeredLazyPipeTests(LevelTriggeredLazyPipeTests):
    """Level-triggered pipe loans through the pure-Python loop."""

    def setUp(self):
        self.patch(ksplice, "_kpump", None)
        LevelTriggeredLazyPipeTests.setUp(self)
