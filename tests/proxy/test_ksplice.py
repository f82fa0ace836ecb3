"""
The kernel splice over real loopback TCP sockets and the real reactor:
bytes intact both ways, half-close, prefixes, flow control, resets, the pipe
bound, the idle timeout, no descriptor leak, and taking sockets over from
Twisted transports without the peers noticing.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import socket
import struct

from twisted.internet import defer, protocol, reactor as global_reactor
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from shardtcp.eventloop import IEdgeTriggered, LeanEPollReactor, adopt
from shardtcp.proxy import ksplice
from shardtcp.proxy.ksplice import (
    KernelSplicer,
    PipePool,
    can_detach,
    kernel_splice_available,
)
from shardtcp.proxy.splice import SpliceStats

MIB = 1 << 20


def _listener(rcvbuf: int = 0) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        # Inherited by accepted sockets; fixed sizes turn autotuning off.
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    return srv


def _pair(srv: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connected (connecting side, accepted side) pair through ``srv``."""
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    return c, s


def _so_error(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


@implementer(IReadDescriptor, IWriteDescriptor)
class Peer:
    """
    One end of a test connection driven by the reactor: sends ``payload``
    (then ``shutdown(SHUT_WR)`` unless told not to), reads everything,
    hashes it, and fires ``ended`` with "eof" or "reset".
    """

    def __init__(self, sock, payload=b"", *, shut=True, send_after_eof=False, reading=True, rst_after_send=False):
        self.sock = sock
        sock.setblocking(False)
        self._fd = sock.fileno()
        self.payload = memoryview(payload)
        self.shut = shut
        self.send_after_eof = send_after_eof
        self.reading = reading
        self.rst_after_send = rst_after_send
        self.sha = hashlib.sha256()
        self.received = 0
        self.head = b""
        self.how = None
        self.write_error = None
        self.ended = defer.Deferred()
        self._writing = False

    def fileno(self):
        return self._fd

    def logPrefix(self):
        return "peer"

    def connectionLost(self, reason):
        pass

    def start(self):
        if self.reading:
            global_reactor.addReader(self)
        if not self.send_after_eof:
            self._start_writing()
        return self

    def resume_reading(self):
        self.reading = True
        global_reactor.addReader(self)

    def _start_writing(self):
        if not self._writing:
            self._writing = True
            global_reactor.addWriter(self)

    def doRead(self):
        try:
            data = self.sock.recv(MIB)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self._end("reset")
            return
        if not data:
            self._end("eof")
            return
        self.received += len(data)
        self.sha.update(data)
        if len(self.head) < 4096:
            self.head += data[: 4096 - len(self.head)]

    def _end(self, how):
        global_reactor.removeReader(self)
        self.how = how
        if self.send_after_eof and how == "eof":
            self._start_writing()
        self.ended.callback(how)

    def doWrite(self):
        try:
            n = self.sock.send(self.payload[: 4 * MIB])
        except BlockingIOError:
            return
        except OSError as e:
            self.write_error = e.errno
            self._stop_writing()
            return
        self.payload = self.payload[n:]
        if not len(self.payload):
            self._stop_writing()
            if self.rst_after_send:
                self.reset()
            elif self.shut:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError as e:
                    # Reset by the other end since the last send.
                    self.write_error = e.errno

    def _stop_writing(self):
        self._writing = False
        global_reactor.removeWriter(self)

    def reset(self):
        """Close with a RST."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self):
        global_reactor.removeReader(self)
        global_reactor.removeWriter(self)
        if self.sock.fileno() != -1:
            self.sock.close()


class KernelSpliceTests(TestCase):
    """Real sockets, real reactor."""

    timeout = 60

    def setUp(self):
        if not kernel_splice_available():
            raise SkipTest("splice(2) is not available here")
        # The daemon's reactor: edge-triggered descriptors (the level-
        # triggered variants hide it from the splicer).
        adopt(global_reactor)
        self.srv = _listener()
        self.addCleanup(self.srv.close)
        self.pool = PipePool(max_pipes=64)
        self.addCleanup(self.pool.close)

    def connect(self, splicer=None, *, clock=None, idle_timeout=0.0, prefix_up=b"", prefix_down=b"", shard_srv=None):
        """client <-> (a) proxy (b) <-> shard; returns the two ends and the splice."""
        client, proxy_a = _pair(self.srv)
        proxy_b, shard = _pair(shard_srv or self.srv)
        if splicer is None:
            splicer = KernelSplicer(self.pool, reactor=global_reactor, clock=clock)
        done = defer.Deferred()
        splice = splicer.take_sockets(
            proxy_a,
            proxy_b,
            on_done=done.callback,
            prefix_up=prefix_up,
            prefix_down=prefix_down,
            idle_timeout=idle_timeout,
        )
        self.assertIsNotNone(splice)
        for s in (client, shard):
            self.addCleanup(lambda s=s: s.fileno() != -1 and s.close())
        return client, shard, splice, done

    @defer.inlineCallbacks
    def test_ten_mib_each_way(self):
        """10 MiB each way at once arrive intact (SHA-256), counted, closed cleanly with FINs."""
        up, down = os.urandom(10 * MIB), os.urandom(10 * MIB)
        client_sock, shard_sock, splice, done = self.connect()
        client = Peer(client_sock, up).start()
        shard = Peer(shard_sock, down).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        stats = yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual(shard.sha.hexdigest(), hashlib.sha256(up).hexdigest())
        self.assertEqual(client.sha.hexdigest(), hashlib.sha256(down).hexdigest())
        self.assertEqual((stats.bytes_up, stats.bytes_down), (10 * MIB, 10 * MIB))
        self.assertIn(stats.ended_by, ("client", "shard"))
        self.assertTrue(stats.clean)
        self.assertEqual((client.how, shard.how), ("eof", "eof"))
        self.assertEqual((_so_error(client_sock), _so_error(shard_sock)), (0, 0))
        self.assertIsInstance(stats, SpliceStats)

    @defer.inlineCallbacks
    def _half_close(self, first: str):
        """``first`` sends and half-closes; the other still answers after the EOF."""
        question, answer = os.urandom(300_000), os.urandom(700_000)
        client_sock, shard_sock, splice, done = self.connect()
        if first == "client":
            a, b = Peer(client_sock, question), Peer(shard_sock, answer, send_after_eof=True)
        else:
            a, b = Peer(shard_sock, question), Peer(client_sock, answer, send_after_eof=True)
        a.start(), b.start()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        yield b.ended
        # The first side's EOF reached the other while its own direction stays open.
        self.assertEqual(b.how, "eof")
        self.assertIsNone(a.how)
        stats = yield done
        yield a.ended
        self.assertEqual(b.sha.digest(), hashlib.sha256(question).digest())
        self.assertEqual(a.sha.digest(), hashlib.sha256(answer).digest())
        self.assertEqual(a.how, "eof")
        self.assertEqual(stats.ended_by, "shard" if first == "client" else "client")
        self.assertTrue(stats.clean)
        self.assertEqual((_so_error(client_sock), _so_error(shard_sock)), (0, 0))

    def test_half_close_client_first(self):
        """The client's shutdown(SHUT_WR) reaches the shard; the shard's answer still reaches the client."""
        return self._half_close("client")

    def test_half_close_shard_first(self):
        """The shard's shutdown(SHUT_WR) reaches the client; the client's answer still reaches the shard."""
        return self._half_close("shard")

    @defer.inlineCallbacks
    def test_prefix_first(self):
        """Prefix bytes go out before any spliced byte, each way, and are not counted."""
        up, down = os.urandom(2 * MIB), os.urandom(2 * MIB)
        client_sock, shard_sock, splice, done = self.connect(prefix_up=b"HEADER+early", prefix_down=b"WELCOME")
        client = Peer(client_sock, up).start()
        shard = Peer(shard_sock, down).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        stats = yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual(shard.head[:12], b"HEADER+early")
        self.assertEqual(client.head[:7], b"WELCOME")
        self.assertEqual(shard.sha.digest(), hashlib.sha256(b"HEADER+early" + up).digest())
        self.assertEqual(client.sha.digest(), hashlib.sha256(b"WELCOME" + down).digest())
        self.assertEqual((stats.bytes_up, stats.bytes_down), (len(up), len(down)))

    @defer.inlineCallbacks
    def test_slow_reader(self):
        """
        A shard that does not read stops the client being read: what the
        proxy takes in is bounded by its pipe and the socket buffers, and
        everything arrives once the shard reads.
        """
        shard_srv = _listener(rcvbuf=256 * 1024)
        self.addCleanup(shard_srv.close)
        up = os.urandom(48 * MIB)
        client_sock, shard_sock, splice, done = self.connect(shard_srv=shard_srv)
        client = Peer(client_sock, up).start()
        shard = Peer(shard_sock, reading=False).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        # Wait until the proxy stops taking bytes in.
        last, still = -1, 0
        while still < 5:
            yield deferLater(global_reactor, 0.02, lambda: None)
            if splice.stats.bytes_up == last:
                still += 1
            else:
                last, still = splice.stats.bytes_up, 0
        pipe = splice._sides[0].pipe
        proxy_b = socket.fromfd(splice._sides[1].fd, socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(proxy_b.close)
        bound = (
            pipe.capacity
            + proxy_b.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            + shard_sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            + MIB  # one segment or so beyond the nominal buffer sizes
        )
        self.assertLessEqual(splice.stats.bytes_up, bound)
        self.assertLess(splice.stats.bytes_up, len(up))
        self.assertLessEqual(splice._sides[0].in_pipe, pipe.capacity)
        self.assertGreater(len(client.payload), 0)
        shard.resume_reading()
        yield done
        yield shard.ended
        self.assertEqual(shard.sha.digest(), hashlib.sha256(up).digest())

    @defer.inlineCallbacks
    def _reset_by(self, who: str):
        """
        ``who`` resets once the proxy has read all it sent: the other side
        still gets those bytes (flushed from the pipe), then a clean FIN.
        """
        data = os.urandom(512 * 1024)
        client_sock, shard_sock, splice, done = self.connect()
        resetter_sock, other_sock = (client_sock, shard_sock) if who == "client" else (shard_sock, client_sock)
        other = Peer(other_sock, shut=False, reading=False).start()
        resetter = Peer(resetter_sock, data, shut=False).start()
        self.addCleanup(other.close)
        self.addCleanup(resetter.close)
        read = (lambda: splice.stats.bytes_up) if who == "client" else (lambda: splice.stats.bytes_down)
        while read() < len(data):
            yield deferLater(global_reactor, 0.01, lambda: None)
        resetter.reset()
        while splice._sides[0 if who == "client" else 1].open:
            yield deferLater(global_reactor, 0.01, lambda: None)
        other.resume_reading()
        stats = yield done
        yield other.ended
        self.assertEqual(stats.ended_by, who)
        self.assertFalse(stats.clean)
        self.assertEqual(other.how, "eof")
        self.assertEqual(other.sha.digest(), hashlib.sha256(data).digest())
        self.assertEqual(_so_error(other_sock), 0)

    def test_reset_from_shard(self):
        """A shard's RST ends the splice: the client gets the shard's last bytes and a FIN."""
        return self._reset_by("shard")

    def test_reset_from_client(self):
        """A client's RST ends the splice: the shard gets the client's last bytes and a FIN."""
        return self._reset_by("client")

    @defer.inlineCallbacks
    def test_pool_exhaustion_falls_back(self):
        """
        With pipes for one connection only, a second is refused (``None``,
        its sockets untouched) until the first ends and gives its pipes back.
        Pipes are lent only while bytes pass: none is held after the end.
        """
        self.pool = PipePool(max_pipes=2)
        self.addCleanup(self.pool.close)
        splicer = KernelSplicer(self.pool, reactor=global_reactor)
        client_sock, shard_sock, splice, done = self.connect(splicer)
        self.assertEqual(self.pool.in_use, 2)
        a, b = _pair(self.srv)
        c, d = _pair(self.srv)
        for s in (a, b, c, d):
            self.addCleanup(s.close)
        self.assertIsNone(splicer.take_sockets(b, c, on_done=lambda stats: None))
        self.assertTrue(b.getblocking())
        client = Peer(client_sock, b"x").start()
        shard = Peer(shard_sock, b"y").start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        yield done
        self.assertEqual((self.pool.in_use, self.pool.lent), (0, 0))
        free = self.pool.free
        self.assertIn(free, (1, 2))
        second = defer.Deferred()
        self.assertIsNotNone(splicer.take_sockets(b, c, on_done=second.callback))
        self.assertEqual((self.pool.in_use, self.pool.lent, self.pool.free), (2, 0, free))
        a.close(), d.close()
        yield second

    def test_refused_when_unavailable_or_not_tcp(self):
        """No kernel splice, or a transport that is not plain TCP: ``None``, nothing touched."""
        off = KernelSplicer(self.pool, reactor=global_reactor, enabled=False)
        a, b = _pair(self.srv)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertIsNone(off.take_sockets(a, b, on_done=lambda s: None))
        on = KernelSplicer(self.pool, reactor=global_reactor)
        self.assertIsNone(on.take_transports(StringTransport(), StringTransport(), on_done=lambda s: None))
        self.assertEqual(self.pool.in_use, 0)
        self.assertFalse(can_detach(StringTransport()))

    @defer.inlineCallbacks
    def test_splice_refused_on_first_call(self):
        """
        A kernel that answers EINVAL to the first splice: this connection
        still carries its bytes (copied), later ones are refused.
        """

        def no_splice(*args, **kwargs):
            raise OSError(errno.EINVAL, "Invalid argument")

        splicer = KernelSplicer(self.pool, reactor=global_reactor, splice=no_splice)
        up, down = os.urandom(3 * MIB), os.urandom(MIB)
        client_sock, shard_sock, splice, done = self.connect(splicer, prefix_up=b"H")
        client = Peer(client_sock, up).start()
        shard = Peer(shard_sock, down).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        stats = yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual(shard.sha.digest(), hashlib.sha256(b"H" + up).digest())
        self.assertEqual(client.sha.digest(), hashlib.sha256(down).digest())
        self.assertEqual((stats.bytes_up, stats.bytes_down), (len(up), len(down)))
        self.assertFalse(splicer.enabled)
        a, b = _pair(self.srv)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertIsNone(splicer.take_sockets(a, b, on_done=lambda s: None))

    @defer.inlineCallbacks
    def test_idle_timeout(self):
        """
        A splice quiet for ``idle_timeout`` resets both sides and ends as
        "idle"; traffic postpones it.
        """
        clock = Clock()
        client_sock, shard_sock, splice, done = self.connect(clock=clock, idle_timeout=10)
        client = Peer(client_sock, b"ping", shut=False).start()
        shard = Peer(shard_sock, shut=False).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        clock.advance(6)
        while shard.received < 4:
            yield deferLater(global_reactor, 0.01, lambda: None)
        clock.advance(6)  # 12 s since start, 6 s since the ping
        self.assertFalse(done.called)
        clock.advance(4)
        stats = yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual((stats.ended_by, stats.clean), ("idle", False))
        self.assertEqual((client.how, shard.how), ("reset", "reset"))
        self.assertEqual(clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_shutdowns_when_both_ways_ended(self):
        """
        Both peers half-close: the first drained direction's destination is
        shut for writing, the second's is shut down fully as it closes, and
        the socket whose FINs were both exchanged is closed without another
        shutdown; ``close`` before the EOFs still shuts both sockets down.
        """
        calls = []
        real = ksplice._socket_call

        def record(fd, method, *args):
            calls.append((method, args[0] if method == "shutdown" else None))
            return real(fd, method, *args)

        self.patch(ksplice, "_socket_call", record)
        client_sock, shard_sock, splice, done = self.connect()
        client, shard = Peer(client_sock, b"q" * 1000).start(), Peer(shard_sock, b"a" * 3000).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        stats = yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual((client.how, shard.how), ("eof", "eof"))
        self.assertEqual((client.received, shard.received), (3000, 1000))
        self.assertTrue(stats.clean)
        self.assertEqual(calls, [("shutdown", socket.SHUT_WR), ("shutdown", socket.SHUT_RDWR)])
        del calls[:]
        client_sock, shard_sock, splice, done = self.connect()
        client, shard = Peer(client_sock, shut=False).start(), Peer(shard_sock, shut=False).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        splice.close()
        yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual((client.how, shard.how), ("eof", "eof"))
        self.assertEqual(sorted(calls), [("shutdown", socket.SHUT_RDWR)] * 2)

    @defer.inlineCallbacks
    def test_close_flushes_and_abort_resets(self):
        """``close`` ends both sides with a FIN; ``abort`` with a RST."""
        client_sock, shard_sock, splice, done = self.connect()
        client, shard = Peer(client_sock, shut=False).start(), Peer(shard_sock, shut=False).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        splice.close()
        stats = yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual((client.how, shard.how, stats.ended_by), ("eof", "eof", "closed"))
        client_sock, shard_sock, splice, done = self.connect()
        client, shard = Peer(client_sock, shut=False).start(), Peer(shard_sock, shut=False).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        splice.abort("shutdown")
        stats = yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual((client.how, shard.how, stats.ended_by), ("reset", "reset", "shutdown"))

    @defer.inlineCallbacks
    def test_no_fd_leak(self):
        """
        1000 connections ending every way (FINs, client and shard resets,
        aborts) leave no descriptor open once the pool is closed, and the
        pool keeps at most ``keep_free`` empty pipes meanwhile.
        """
        pool = PipePool(max_pipes=128, keep_free=8)
        splicer = KernelSplicer(pool, reactor=global_reactor)
        # The reactor is running (with its own pipes) before the count.
        yield deferLater(global_reactor, 0, lambda: None)
        gc.collect()
        before = sorted(os.listdir("/proc/self/fd"))
        for batch in range(20):
            waits, peers = [], []
            for i in range(50):
                n = batch * 50 + i
                client_sock, proxy_a = _pair(self.srv)
                proxy_b, shard_sock = _pair(self.srv)
                done = defer.Deferred()
                splice = splicer.take_sockets(proxy_a, proxy_b, on_done=done.callback, prefix_up=b"h")
                self.assertIsNotNone(splice)
                kind = n % 4
                client = Peer(client_sock, b"q" * 1000, rst_after_send=(kind == 1)).start()
                shard = Peer(shard_sock, b"a" * 3000, rst_after_send=(kind == 2)).start()
                if kind == 3:
                    splice.abort("test")
                peers += [client, shard]
                waits.append(done)
            yield defer.gatherResults(waits)
            for p in peers:
                p.close()
            self.assertLessEqual(pool.free, 8)
        self.assertEqual(pool.in_use, 0)
        pool.close()
        splicer.close()
        gc.collect()
        after = sorted(os.listdir("/proc/self/fd"))
        self.assertEqual(after, before, [os.readlink(f"/proc/self/fd/{fd}") for fd in set(after) - set(before) if os.path.exists(f"/proc/self/fd/{fd}")])


class _Recorder(protocol.Protocol):
    """Keeps what Twisted delivered and whether it ever saw the connection end."""

    def __init__(self):
        self.data = b""
        self.lost = False
        self.made = defer.Deferred()

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = True


class DetachTests(TestCase):
    """Taking sockets over from live Twisted TCP transports."""

    timeout = 60

    def setUp(self):
        if not kernel_splice_available():
            raise SkipTest("splice(2) is not available here")
        # The daemon's reactor: edge-triggered descriptors (the level-
        # triggered variants hide it from the splicer).
        adopt(global_reactor)
        self.pool = PipePool(max_pipes=8)
        self.addCleanup(self.pool.close)

    @defer.inlineCallbacks
    def test_take_over_twisted_transports(self):
        """
        Bytes Twisted had buffered for writing go first, bytes it had read
        are passed on as the prefix, nothing in flight is lost, half-close
        is carried both ways, both peers see FINs (no RST), and the old
        transports are inert: their protocols hear nothing more, and writing
        to or closing them does not reach the peers.
        """
        # Client side: Twisted accepts the client.
        accepted = defer.Deferred()
        server_proto = _Recorder()
        server_proto.made.addCallback(accepted.callback)
        port = global_reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: server_proto), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client_sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client_sock.close)
        # Shard side: Twisted connects to the shard.
        shard_srv = _listener()
        self.addCleanup(shard_srv.close)
        upstream = yield protocol.ClientCreator(global_reactor, _Recorder).connectTCP(*shard_srv.getsockname())
        shard_sock, _ = shard_srv.accept()
        self.addCleanup(shard_sock.close)
        down = yield accepted

        client_sock.sendall(b"early")
        while server_proto.data != b"early":
            yield deferLater(global_reactor, 0.01, lambda: None)
        # Written through Twisted, not yet sent when the sockets are taken.
        upstream.transport.write(b"HEADER")
        down.transport.write(b"WELCOME")
        client_sock.sendall(b"in-flight")  # arrives while nobody reads
        done = defer.Deferred()
        splicer = KernelSplicer(self.pool, reactor=global_reactor)
        splice = splicer.take_transports(down.transport, upstream.transport, on_done=done.callback, prefix_up=server_proto.data)
        self.assertIsNotNone(splice)
        self.assertFalse(can_detach(down.transport))
        # The old transports are inert.
        down.transport.write(b"STRAY")
        down.transport.loseConnection()
        upstream.transport.abortConnection()
        gc.collect()

        question, answer = os.urandom(MIB), os.urandom(2 * MIB)
        client = Peer(client_sock, question).start()
        shard = Peer(shard_sock, answer, send_after_eof=True).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        stats = yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual(shard.sha.digest(), hashlib.sha256(b"HEADERearlyin-flight" + question).digest())
        self.assertEqual(client.sha.digest(), hashlib.sha256(b"WELCOME" + answer).digest())
        self.assertEqual((client.how, shard.how), ("eof", "eof"))
        self.assertEqual((_so_error(client_sock), _so_error(shard_sock)), (0, 0))
        self.assertEqual((stats.ended_by, stats.clean), ("shard", True))
        self.assertEqual(stats.bytes_up, len(b"in-flight") + len(question))
        self.assertFalse(server_proto.lost)
        self.assertFalse(upstream.lost)
        self.assertNotIn(down.transport, global_reactor.getReaders())

    @defer.inlineCallbacks
    def test_take_over_from_inside_data_received(self):
        """
        Taking the sockets over from inside the client transport's own
        ``dataReceived`` works: Twisted neither calls the protocol again nor
        logs an error, and the bytes flow both ways.
        """
        shard_srv = _listener()
        self.addCleanup(shard_srv.close)
        upstream = yield protocol.ClientCreator(global_reactor, _Recorder).connectTCP(*shard_srv.getsockname())
        shard_sock, _ = shard_srv.accept()
        self.addCleanup(shard_sock.close)
        done = defer.Deferred()
        splicer = KernelSplicer(self.pool, reactor=global_reactor)
        taken = []

        class TakeOver(_Recorder):
            def dataReceived(self, data):
                taken.append(splicer.take_transports(self.transport, upstream.transport, on_done=done.callback, prefix_up=data))

        server_proto = TakeOver()
        port = global_reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: server_proto), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client_sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client_sock.close)
        client_sock.sendall(b"first")
        while not taken:
            yield deferLater(global_reactor, 0.01, lambda: None)
        self.assertIsNotNone(taken[0])
        question, answer = os.urandom(MIB), os.urandom(MIB)
        client = Peer(client_sock, question).start()
        shard = Peer(shard_sock, answer).start()
        self.addCleanup(client.close)
        self.addCleanup(shard.close)
        yield done
        yield defer.gatherResults([client.ended, shard.ended])
        self.assertEqual(shard.sha.digest(), hashlib.sha256(b"first" + question).digest())
        self.assertEqual(client.sha.digest(), hashlib.sha256(answer).digest())
        self.assertFalse(server_proto.lost)
        self.assertFalse(upstream.lost)

    @defer.inlineCallbacks
    def test_dup_would_end_the_connection(self):
        """
        Why the socket is detached rather than duplicated: Twisted closes a
        transport with shutdown(SHUT_RDWR), which acts on the socket, so the
        peer sees an EOF although a duplicate descriptor is still open.
        """
        accepted = defer.Deferred()
        proto = _Recorder()
        proto.made.addCallback(accepted.callback)
        port = global_reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: proto), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        peer.settimeout(5)
        yield accepted
        dup = os.dup(proto.transport.fileno())
        self.addCleanup(os.close, dup)
        proto.transport.loseConnection()
        while not proto.lost:
            yield deferLater(global_reactor, 0.01, lambda: None)
        self.assertEqual(peer.recv(10), b"")


class _DroppedByReactor:
    """Helpers for a splice whose reactor goes away."""

    @defer.inlineCallbacks
    def test_reactor_shutdown_closes(self):
        """
        The reactor dropping the splice's descriptors (as when it shuts
        down) closes both sockets at once without flushing: each splice's
        ``on_done`` gets "closed", both peers see the end, no pipe stays
        reserved and nothing of the splice stays in the reactor.
        """
        splicer = KernelSplicer(self.pool, reactor=global_reactor)
        ends = [self.connect(splicer) for _ in range(2)]
        peers = []
        for client_sock, shard_sock, _, _ in ends:
            peers += [Peer(client_sock, shut=False).start(), Peer(shard_sock, shut=False).start()]
        for p in peers:
            self.addCleanup(p.close)
        yield deferLater(global_reactor, 0.01, lambda: None)
        self.assertEqual(self.pool.in_use, 4)
        ours = self._ours()
        self.assertTrue(ours)
        for selectable in ours:
            global_reactor.removeReader(selectable)
            global_reactor.removeWriter(selectable)
            global_reactor.removeEdgeTriggered(selectable)
        for selectable in ours:
            selectable.connectionLost(Failure(ConnectionLost()))
        for _, _, splice, done in ends:
            self.assertTrue(done.called)
            stats = yield done
            self.assertEqual(stats.ended_by, "closed")
        yield defer.gatherResults([p.ended for p in peers])
        self.assertEqual(self.pool.in_use, 0)
        self.assertEqual(self._ours(), [])

    def _ours(self):
        watched = global_reactor.getReaders() + global_reactor.getWriters() + global_reactor.getEdgeTriggered()
        return sorted((s for s in set(watched) if isinstance(s, ksplice._Side)), key=lambda s: s.fd)


class EdgeTriggeredOnlyTests(_DroppedByReactor, TestCase):
    """The spliced sockets in the reactor's epoll, edge-triggered."""

    timeout = 60
    connect = KernelSpliceTests.connect

    def setUp(self):
        KernelSpliceTests.setUp(self)

    def test_edge_triggered_on_the_daemons_reactor(self):
        """
        On the daemon's reactor (``LeanEPollReactor``, which the tests'
        reactor has become) the splicer picks the edge-triggered path by
        itself, and ``KernelSpliceTests`` run on it; on Twisted's own epoll
        reactor or another it registers each socket with the reactor.
        """
        self.assertIsInstance(global_reactor, LeanEPollReactor)
        self.assertTrue(KernelSplicer(self.pool, reactor=global_reactor).edge)
        stock = EPollReactor()
        self.addCleanup(stock._poller.close)
        self.addCleanup(stock.waker.connectionLost, None)
        self.assertFalse(KernelSplicer(self.pool, reactor=stock).edge)
        self.assertFalse(KernelSplicer(self.pool, reactor=Clock()).edge)

    @defer.inlineCallbacks
    def test_sockets_watched_once_edge_triggered(self):
        """
        Three live splices are six edge-triggered descriptors of the
        reactor's, none a reader or writer; once the splices end, none is
        left, and the splicer needs no descriptor of its own.
        """
        splicer = KernelSplicer(self.pool, reactor=global_reactor)
        ends = [self.connect(splicer) for _ in range(3)]
        sides = sorted((side for e in ends for side in e[2]._sides), key=lambda s: s.fd)
        self.assertEqual(self._ours(), sides)
        readers = global_reactor.getReaders() + global_reactor.getWriters()
        self.assertFalse(any(side in readers for side in sides))
        self.assertTrue(all(global_reactor._edges[side.fd] is side for side in sides))
        self.assertTrue(verifyObject(IEdgeTriggered, sides[0]))
        peers = []
        for client_sock, shard_sock, _, _ in ends:
            peers += [Peer(client_sock, b"q" * 100).start(), Peer(shard_sock, b"a" * 200).start()]
        for p in peers:
            self.addCleanup(p.close)
        for _, _, _, done in ends:
            stats = yield done
            self.assertEqual((stats.bytes_up, stats.bytes_down), (100, 200))
        self.assertEqual(self._ours(), [])
        self.assertFalse(any(side.fd in global_reactor._edges for side in sides))

    def test_unwatchable_socket_is_the_proxys_trouble(self):
        """
        When the kernel will not watch a socket (out of memory, or the
        epoll watch limit), the splice ends at once as the proxy's trouble
        (``ended_by`` "proxy"), both peers see the connection end, nothing
        stays registered or reserved; the next connection is spliced.
        """
        real = global_reactor.addEdgeTriggered
        calls = []

        def refuse_second(descriptor):
            calls.append(descriptor)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(descriptor)

        self.patch(global_reactor, "addEdgeTriggered", refuse_second)
        client_sock, shard_sock, splice, done = self.connect()
        self.assertTrue(done.called)
        self.assertEqual(self.successResultOf(done).ended_by, "proxy")
        self.assertEqual((self.pool.in_use, self._ours()), (0, []))
        for peer in (client_sock, shard_sock):
            peer.settimeout(5)
            self.assertRaises(ConnectionResetError, peer.recv, 1)
        calls.clear()
        self.patch(global_reactor, "addEdgeTriggered", real)
        client_sock, shard_sock, splice, done = self.connect()
        self.assertEqual(len(self._ours()), 2)
        splice.abort("test")
        self.assertTrue(done.called)

    @defer.inlineCallbacks
    def test_handler_error_closes_that_splice_only(self):
        """
        A bug in one splice's event handling is logged and closes that
        splice (both sockets, "closed"); another splice's bytes go on.
        """
        splicer = KernelSplicer(self.pool, reactor=global_reactor)
        bad = self.connect(splicer)
        good = self.connect(splicer)
        run = ksplice.KernelSplice._run

        def broken(splice):
            if splice is bad[2]:
                raise RuntimeError("splice bug")
            run(splice)

        self.patch(ksplice.KernelSplice, "_run", broken)
        peers = [Peer(bad[0], b"x" * 10, shut=False).start(), Peer(bad[1], shut=False).start()]
        peers += [Peer(good[0], b"q" * 100).start(), Peer(good[1], b"a" * 200).start()]
        for p in peers:
            self.addCleanup(p.close)
        stats = yield bad[3]
        self.assertEqual(stats.ended_by, "closed")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        stats = yield good[3]
        self.assertEqual((stats.bytes_up, stats.bytes_down), (100, 200))
        yield defer.gatherResults([p.ended for p in peers[:2]])
        self.assertEqual(self._ours(), [])

    @defer.inlineCallbacks
    def test_reads_per_wake_up_are_bounded(self):
        """
        With one read per wake-up and a one-page pipe, 64 KiB already
        waiting in the client's socket (one readiness event, no more to
        come) still all reach the shard: a direction that could read on
        goes on at the reactor's next turn instead of waiting for an event.
        """
        self.patch(ksplice, "_MAX_ROUNDS", 1)
        pool = PipePool(max_pipes=3, pipe_size=4096)
        self.addCleanup(pool.close)
        pipe = pool.acquire()
        self.assertEqual(pipe.capacity, 4096)
        pool.release(pipe, empty=True)
        splicer = KernelSplicer(pool, reactor=global_reactor)
        client_sock, proxy_a = _pair(self.srv)
        proxy_b, shard_sock = _pair(self.srv)
        for s in (client_sock, shard_sock):
            self.addCleanup(s.close)
        data = os.urandom(64 * 1024)
        client_sock.sendall(data)
        yield deferLater(global_reactor, 0.05, lambda: None)
        done = defer.Deferred()
        splice = splicer.take_sockets(proxy_a, proxy_b, on_done=done.callback)
        shard = Peer(shard_sock, shut=False).start()
        self.addCleanup(shard.close)
        for _ in range(500):
            if shard.received == len(data):
                break
            yield deferLater(global_reactor, 0.01, lambda: None)
        self.assertEqual(shard.received, len(data))
        self.assertEqual(shard.sha.digest(), hashlib.sha256(data).digest())
        splice.close()
        yield done


class LevelTriggeredTests(_DroppedByReactor, KernelSpliceTests):
    """
    Every test of ``KernelSpliceTests`` again with each socket a reader and
    writer of the reactor's (the path for reactors other than epoll).
    """

    def setUp(self):
        self.patch(ksplice, "_EdgeReactor", None)
        KernelSpliceTests.setUp(self)

    def test_registered_with_the_reactor(self):
        """Here a live splice's sockets are the reactor's readers, and no splicer epoll exists."""
        splicer = KernelSplicer(self.pool, reactor=global_reactor)
        self.assertFalse(splicer.edge)
        client_sock, shard_sock, splice, done = self.connect(splicer)
        readers = global_reactor.getReaders()
        self.assertTrue(all(side in readers for side in splice._sides))
        self.assertFalse(any(side in global_reactor.getEdgeTriggered() for side in splice._sides))
        splice.abort("test")
        self.assertTrue(done.called)
        self.assertFalse(any(side in global_reactor.getReaders() for side in splice._sides))


class LevelTriggeredDetachTests(DetachTests):
    """Taking sockets over from Twisted, level-triggered."""

    def setUp(self):
        self.patch(ksplice, "_EdgeReactor", None)
        DetachTests.setUp(self)


class PythonLoopTests(KernelSpliceTests):
    """
    Every test of ``KernelSpliceTests`` again through the pure-Python loop
    (an install where the C loop, ``shardtcp.proxy._kpump``, was not built).
    """

    def setUp(self):
        self.patch(ksplice, "_kpump", None)
        KernelSpliceTests.setUp(self)


class PythonLoopEdgeTriggeredOnlyTests(EdgeTriggeredOnlyTests):
    """``EdgeTriggeredOnlyTests`` through the pure-Python loop."""

    def setUp(self):
        self.patch(ksplice, "_kpump", None)
        EdgeTriggeredOnlyTests.setUp(self)


class PythonLoopLevelTriggeredTests(LevelTriggeredTests):
    """``LevelTriggeredTests`` through the pure-Python loop."""

    def setUp(self):
        self.patch(ksplice, "_kpump", None)
        LevelTriggeredTests.setUp(self)


class PipePoolTests(TestCase):
    """The pipe bound on its own."""

    def test_bound_and_reuse(self):
        """At most ``max_pipes`` are handed out; an empty pipe comes back for reuse, a used one is closed."""
        pool = PipePool(max_pipes=2, keep_free=1)
        self.addCleanup(pool.close)
        a, b = pool.acquire(), pool.acquire()
        self.assertIsNone(pool.acquire())
        self.assertGreaterEqual(a.capacity, 4096)
        pool.release(a, empty=True)
        pool.release(b, empty=False)
        self.assertRaises(OSError, os.fstat, b.read_fd)
        self.assertEqual((pool.in_use, pool.free), (0, 1))
        self.assertIs(pool.acquire(), a)

    def test_big_pipes_where_allowed(self):
        """Pipes are grown to ``PIPE_SIZE`` when the system allows it."""
        with open("/proc/sys/fs/pipe-max-size") as f:
            if int(f.read()) < ksplice.PIPE_SIZE and os.geteuid() != 0:
                raise SkipTest("pipe-max-size below PIPE_SIZE")
        pool = PipePool(max_pipes=1)
        self.addCleanup(pool.close)
        pipe = pool.acquire()
        self.assertEqual(pipe.capacity, ksplice.PIPE_SIZE)
        pool.release(pipe, empty=False)
