"""
The kernel splice's inner loop in C (``shardtcp.proxy._kpump``) on its
own, over real loopback sockets and a real pipe: what it moves and every
state bit it reports; and the splicer's use of it (its refusals handed to
the Python loop).  ``test_ksplice``, ``test_ksplice_pipes`` and
``test_ksplice_idle`` run every splice test through both loops.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import socket
import sysconfig

from twisted.internet import defer, reactor as global_reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from shardtcp.eventloop import adopt
from shardtcp.proxy import ksplice
from shardtcp.proxy.ksplice import (
    _ST_AGAIN,
    _ST_EDGE,
    _ST_EOF,
    _ST_ERR_IN,
    _ST_ERR_OUT,
    _ST_MOVED,
    _ST_RD,
    _ST_STALLED,
    _ST_TRIED_IN,
    _ST_TRIED_OUT,
    _ST_WR,
    KernelSplicer,
    PipePool,
    kernel_splice_available,
)

from . import test_ksplice as _ksplice_tests
from .test_ksplice import MIB, Peer, _listener, _pair


def _buildable() -> bool:
    """Whether this machine could build the extension (a compiler and Python's headers)."""
    include = sysconfig.get_paths().get("include") or ""
    return bool(shutil.which(sysconfig.get_config_var("CC") or "cc") or shutil.which("cc")) and os.path.exists(
        os.path.join(include, "Python.h")
    )


class BuiltTests(SynchronousTestCase):
    def test_built_where_it_can_be(self):
        """On Linux with a compiler and Python's headers the install built the C loop, and the splicer takes it."""
        if not os.uname().sysname == "Linux" or not _buildable():
            raise SkipTest("no compiler or Python headers here: the Python loop is the one in use")
        self.assertIsNotNone(ksplice._kpump, "shardtcp.proxy._kpump was not built: pip install -e . builds it")
        splicer = KernelSplicer(PipePool(max_pipes=2), reactor=global_reactor)
        self.assertIs(splicer._fast, ksplice._kpump)

    def test_a_given_splice_takes_the_python_loop(self):
        """A ``splice`` handed to the splicer (a test's) is called by the Python loop: no C loop then."""
        splicer = KernelSplicer(PipePool(max_pipes=2), reactor=global_reactor, splice=os.splice)
        self.assertIsNone(splicer._fast)


class PumpTests(SynchronousTestCase):
    """``_kpump.pump`` between two loopback TCP connections and one pipe."""

    def setUp(self):
        if ksplice._kpump is None:
            raise SkipTest("shardtcp.proxy._kpump is not built here")
        if not kernel_splice_available():
            raise SkipTest("splice(2) is not available here")
        self.pump = ksplice._kpump
        srv = _listener()
        self.addCleanup(srv.close)
        # sender -> src (read by the pump); dst (written by the pump) -> receiver
        self.sender, self.src = _pair(srv)
        self.dst, self.receiver = _pair(srv)
        for s in (self.sender, self.src, self.dst, self.receiver):
            self.addCleanup(s.close)
        for s in (self.src, self.dst, self.receiver):
            s.setblocking(False)
        self.sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.addCleanup(os.close, self.r)
        self.addCleanup(os.close, self.w)
        self.capacity = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def call(self, in_pipe, state, reads=16, *, src=None, dst=None, capacity=None):
        return self.pump(
            self.src.fileno() if src is None else src,
            self.w,
            self.r,
            self.dst.fileno() if dst is None else dst,
            in_pipe,
            self.capacity if capacity is None else capacity,
            state,
            reads,
        )

    def received(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self.receiver.recv(MIB)
            except BlockingIOError:
                return b"".join(chunks)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def test_moves_bytes_through_and_reports_drained_source(self):
        """Bytes waiting in the source reach the destination; an EAGAIN from the empty source clears RD, WR stays."""
        self.sender.sendall(b"hello, shard")
        in_pipe, got, state, error = self.call(0, _ST_RD | _ST_WR | _ST_EDGE)
        self.assertEqual((in_pipe, got, error), (0, 12, 0))
        self.assertEqual(state, _ST_WR | _ST_EDGE | _ST_MOVED | _ST_TRIED_IN | _ST_TRIED_OUT)
        self.assertEqual(self.received(), b"hello, shard")

    def test_nothing_to_do(self):
        """Not readable, nothing in the pipe: no call, nothing reported but what was given."""
        self.sender.sendall(b"x")
        self.assertEqual(self.call(0, _ST_WR), (0, 0, _ST_WR, 0))
        self.assertEqual(self.received(), b"")

    def test_eof(self):
        """The sender's FIN: EOF reported, no byte counted; given EOF, no read is tried again."""
        self.sender.sendall(b"last")
        self.sender.shutdown(socket.SHUT_WR)
        in_pipe, got, state, error = self.call(0, _ST_RD | _ST_WR | _ST_EDGE)
        self.assertEqual((in_pipe, got, error), (0, 4, 0))
        self.assertTrue(state & _ST_EOF)
        self.assertTrue(state & _ST_RD)
        self.assertEqual(self.received(), b"last")
        # Given EOF and an empty pipe it stops at once.
        self.assertEqual(self.call(0, _ST_RD | _ST_WR | _ST_EOF), (0, 0, _ST_RD | _ST_WR | _ST_EOF, 0))

    def test_not_writable_keeps_bytes_in_the_pipe_then_stalls(self):
        """
        Without WR the bytes stay in the pipe; a further read that finds no
        more bytes says STALLED (not "drained": bytes are in the pipe) and
        keeps RD.  Once written out, STALLED clears and the next EAGAIN
        clears RD.
        """
        self.sender.sendall(b"abc")
        in_pipe, got, state, error = self.call(0, _ST_RD | _ST_EDGE)
        self.assertEqual((in_pipe, got, error), (3, 3, 0))
        self.assertEqual(state, _ST_RD | _ST_STALLED | _ST_EDGE | _ST_MOVED | _ST_TRIED_IN)
        self.assertEqual(self.received(), b"")
        in_pipe, got, state, error = self.call(3, _ST_RD | _ST_WR | _ST_STALLED | _ST_EDGE)
        self.assertEqual((in_pipe, got, error), (0, 0, 0))
        self.assertEqual(state, _ST_WR | _ST_EDGE | _ST_MOVED | _ST_TRIED_OUT)
        self.assertEqual(self.received(), b"abc")

    def test_destination_full_clears_wr(self):
        """A destination that takes no more (its peer not reading): EAGAIN clears WR, the rest stays in the pipe."""
        self.dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        payload = os.urandom(4 * MIB)
        sent = 0
        self.sender.setblocking(False)
        total_got = 0
        in_pipe = 0
        state = _ST_RD | _ST_WR | _ST_EDGE
        for _ in range(64):
            try:
                sent += self.sender.send(payload[sent:])
            except BlockingIOError:
                pass
            in_pipe, got, state, error = self.call(in_pipe, state | _ST_RD | _ST_WR)
            self.assertEqual(error, 0)
            total_got += got
            if not state & _ST_WR:
                break
        self.assertFalse(state & _ST_WR)
        self.assertGreater(in_pipe, 0)
        # What left the pipe went out in order; the rest is still in it.
        received = self.received()
        self.assertLessEqual(len(received), total_got - in_pipe)
        self.assertEqual(received, payload[: len(received)])
        self.assertEqual(os.read(self.r, 16), payload[total_got - in_pipe : total_got - in_pipe + 16])

    def test_level_triggered_short_write_clears_wr(self):
        """Without EDGE a write that leaves bytes in the pipe clears WR (the reactor says when to go on)."""
        small = _listener(rcvbuf=4096)
        self.addCleanup(small.close)
        dst, receiver = _pair(small)
        self.addCleanup(dst.close)
        self.addCleanup(receiver.close)
        dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        dst.setblocking(False)
        in_pipe = 0
        for _ in range(100):
            try:
                in_pipe += os.write(self.w, b"z" * (self.capacity - in_pipe))
            except BlockingIOError:
                pass
            in_pipe, got, state, error = self.call(in_pipe, _ST_WR, dst=dst.fileno())
            self.assertEqual((got, error), (0, 0))
            if state & _ST_MOVED and in_pipe:
                break
        self.assertGreater(in_pipe, 0)
        self.assertEqual(state, _ST_MOVED | _ST_TRIED_OUT)

    def test_reads_bound(self):
        """With reads used up and the source still readable: AGAIN, RD kept; with reads 0 no read at all."""
        self.sender.sendall(b"a" * 1000)
        self.assertEqual(self.call(0, _ST_RD | _ST_WR | _ST_EDGE, 0), (0, 0, _ST_RD | _ST_WR | _ST_EDGE | _ST_AGAIN, 0))
        in_pipe, got, state, error = self.call(0, _ST_RD | _ST_WR | _ST_EDGE, 1)
        self.assertEqual((in_pipe, got, error), (0, 1000, 0))
        self.assertTrue(state & _ST_AGAIN)
        self.assertTrue(state & _ST_RD)
        self.assertEqual(self.received(), b"a" * 1000)

    def test_full_pipe_reads_nothing(self):
        """A pipe holding ``capacity`` bytes and a destination not writable: no read, no progress."""
        self.sender.sendall(b"more")
        self.assertEqual(self.call(self.capacity, _ST_RD | _ST_EDGE), (self.capacity, 0, _ST_RD | _ST_EDGE, 0))

    def test_write_error(self):
        """A destination whose peer reset: ERR_OUT with the errno, bytes stay counted in the pipe."""
        self.receiver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.receiver.close()
        self.sender.sendall(b"to nowhere")
        in_pipe, got, state, error = self.call(0, _ST_RD | _ST_WR | _ST_EDGE)
        self.assertIn(error, (errno.EPIPE, errno.ECONNRESET))
        self.assertTrue(state & _ST_ERR_OUT)
        self.assertFalse(state & _ST_ERR_IN)
        self.assertEqual(in_pipe, got)

    def test_read_error(self):
        """A source that is not a socket (closed number): ERR_IN with EBADF, nothing moved."""
        closed = socket.socket()
        number = closed.fileno()
        closed.close()
        in_pipe, got, state, error = self.call(0, _ST_RD | _ST_WR | _ST_EDGE, src=number)
        self.assertEqual((in_pipe, got, error), (0, 0, errno.EBADF))
        self.assertEqual(state, _ST_RD | _ST_WR | _ST_EDGE | _ST_ERR_IN)

    def test_bad_arguments(self):
        """Eight integers, ``0 <= in_pipe <= capacity``, or an exception (no system call made)."""
        with self.assertRaises(TypeError):
            self.pump(1, 2, 3)
        with self.assertRaises(TypeError):
            self.pump("a", 2, 3, 4, 0, 10, 0, 1)
        with self.assertRaises(ValueError):
            self.call(self.capacity + 1, _ST_WR)
        with self.assertRaises(ValueError):
            self.call(-1, _ST_WR)
        with self.assertRaises(ValueError):
            self.call(0, _ST_WR, capacity=0)
        # exactly the capacity is accepted
        self.assertEqual(self.call(self.capacity, 0)[0], self.capacity)


class SplicerRefusalTests(TestCase):
    """The splicer's answers to what the C loop reports, with a stand-in loop."""

    timeout = 30
    connect = _ksplice_tests.KernelSpliceTests.connect

    def setUp(self):
        _ksplice_tests.KernelSpliceTests.setUp(self)

    def _start(self, fast, up_size=3 * MIB, down_size=MIB):
        splicer = KernelSplicer(self.pool, reactor=global_reactor)
        splicer._fast = fast
        client_sock, shard_sock, splice, done = self.connect(splicer)
        up, down = os.urandom(up_size), os.urandom(down_size)
        client = Peer(client_sock, up).start()
        shard = Peer(shard_sock, down).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        return splicer, up, down, client, shard, done

    @defer.inlineCallbacks
    def _check_copied(self, fast, *, disabled=True):
        splicer, up, down, client, shard, done = self._start(fast)
        stats = yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual(shard.sha.digest(), hashlib.sha256(up).digest())
        self.assertEqual(client.sha.digest(), hashlib.sha256(down).digest())
        self.assertEqual((stats.bytes_up, stats.bytes_down), (len(up), len(down)))
        self.assertEqual(splicer.enabled, not disabled)
        self.assertEqual((self.pool.in_use, self.pool.lent), (0, 0))

    def test_read_refused_as_unsupported(self):
        """ERR_IN with EINVAL before any splice worked: the connection copies every byte, the splicer turns off."""
        calls = []

        def refusing(src, pipe_w, pipe_r, dst, in_pipe, capacity, state, reads):
            calls.append(state)
            return in_pipe, 0, state | _ST_ERR_IN, errno.EINVAL

        return self._check_copied(refusing).addCallback(lambda _: self.assertTrue(calls))

    def test_write_refused_as_unsupported(self):
        """
        ERR_OUT with EINVAL after bytes reached the pipe: they are read back
        out of the pipe and sent, then the connection copies.  A splice
        into the pipe had worked, so the splicer stays on for the next.
        """
        real = ksplice._kpump
        if real is None:
            raise SkipTest("shardtcp.proxy._kpump is not built here")

        def no_out(src, pipe_w, pipe_r, dst, in_pipe, capacity, state, reads):
            # Read only (no WR), then say the write was refused.
            in_pipe, got, state, error = real(src, pipe_w, pipe_r, dst, in_pipe, capacity, state & ~_ST_WR, reads)
            return in_pipe, got, state | _ST_ERR_OUT, errno.EINVAL

        return self._check_copied(no_out, disabled=False)

    @defer.inlineCallbacks
    def test_real_errors_fail_the_side(self):
        """ERR_IN with ECONNRESET: that side failed, the connection ends not clean, nothing copied."""

        real = ksplice._kpump
        if real is None:
            raise SkipTest("shardtcp.proxy._kpump is not built here")

        def reset(src, pipe_w, pipe_r, dst, in_pipe, capacity, state, reads):
            if state & _ST_RD and not state & _ST_EOF and reads:
                # A read: the connection was reset.
                return in_pipe, 0, state | _ST_ERR_IN, errno.ECONNRESET
            return real(src, pipe_w, pipe_r, dst, in_pipe, capacity, state, reads)

        splicer, up, down, client, shard, done = self._start(reset, MIB, MIB)
        stats = yield done
        self.assertFalse(stats.clean)
        self.assertIn(stats.ended_by, ("client", "shard"))
        self.assertTrue(splicer.enabled)
        self.assertEqual((self.pool.in_use, self.pool.lent), (0, 0))
