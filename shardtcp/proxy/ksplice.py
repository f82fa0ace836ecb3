# -*- test-case-name: tests.proxy.test_ksplice -*-
"""
Kernel splice: move a connection's bytes with ``splice(2)``, below Twisted.

Once the PROXY header is written, a passthrough or plain connection only
copies bytes.  ``KernelSplice`` does that through one pipe per direction
(socket -> pipe -> socket, the bytes never reach Python).  On the
daemon's reactor (``shardtcp.eventloop.LeanEPollReactor``) each spliced
socket is registered once, edge-triggered, in the reactor's own epoll
(``addEdgeTriggered``): an event runs one pump per direction
(``KernelSplice._pump``), a wake-up costs one ``epoll_wait`` and one
Python call before the pump, and flow control costs no ``epoll_ctl``.
The pump's inner loop, ``splice`` into and out of the pipe until
``EAGAIN``, is C (``_kpump.c``, built at install time on Linux); where it
was not built the same loop runs in Python, and all else (prefixes,
copying, ends, errors, pipe loans, counts) is Python for both.  On
another reactor each socket is the reactor's reader and writer as its flow
control needs.  It keeps the contract of the
userspace ``Splice``:

* flow control: a direction reads from its source only while its pipe has
  room and writes while the pipe holds bytes, so a connection holds at most
  a pipe per direction plus the sockets' own buffers;
* half-close: an EOF from one side becomes a ``shutdown(SHUT_WR)`` of the
  other once the pipe is drained; both EOFs close both sockets; a reset or
  error on one side closes the other after flushing what can be flushed;
* the same ``SpliceStats`` (bytes read from each side, who ended it), an
  idle timeout, ``close`` and ``abort``;
* bytes the caller already holds for a side (a prefix per direction) are
  sent before any spliced byte.  They are not counted in the stats, as the
  bytes written before a userspace ``Splice`` starts are not.

``KernelSplicer.take_transports`` returns ``None`` without touching
anything when it cannot take the connection (kernel splice unavailable,
``max_pipes`` reached, a transport that is not plain TCP); the caller then
uses the userspace ``Splice``.  ``PipePool`` counts two pipes per
kernel-spliced connection against ``max_pipes`` but lends a real pipe to
a direction only from the moment its source is readable until the pipe is
drained, then takes it back for reuse: an idle spliced connection holds
its two sockets and no pipe (2 descriptors instead of 6).  When the system
gives no pipe (out of descriptors), that read is copied through userspace
instead.  A splice keeps the two ``socket`` objects it was given (a
``shutdown`` or ``close`` is then one call, with no object made for it).

Taking a socket over from Twisted (``detach_transport``).  A
``tcp.Connection`` closes its socket in ``connectionLost`` with
``shutdown(SHUT_RDWR)`` (``loseConnection``), which acts on the socket, not
on the descriptor: keeping an ``os.dup`` and letting Twisted close its own
copy sends the peer a FIN in the middle of the connection.
``abortConnection`` sets ``SO_LINGER {1, 0}`` on the shared socket, so the
dup's eventual close would reset the peer instead of ending cleanly.
Instead the transport is removed from the reactor, its unsent write buffer
is taken out (it becomes the head of the prefix), and its socket object
moves to the splice, the transport keeping an inert stand-in; the
transport is then marked disconnected, so later ``write``,
``loseConnection`` or ``abortConnection`` calls on it are no-ops and
nothing ever closes the descriptor behind our back.  Twisted never calls the
transport's protocol again (the caller stops routing its events), and the
takeover may happen inside one of the transport's own callbacks.  Read the
addresses first: a client transport's ``getPeer`` asks the socket.  This
reads four attributes of ``twisted.internet.abstract.FileDescriptor``
(``dataBuffer``, ``offset``, ``_tempDataBuffer``, ``_tempDataLen``), stable
for many years; ``can_detach`` refuses a transport that lacks them.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import os
import select
import socket
import struct
from typing import Callable, Optional

import attrs
from twisted.internet.tcp import Connection as _TCPConnection

from twisted.internet.interfaces import IReactorFDSet, IReactorTime, IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

try:
    from shardtcp.eventloop import IEdgeTriggered, LeanEPollReactor as _EdgeReactor
except ImportError:  # no epoll: not Linux
    IEdgeTriggered, _EdgeReactor = IWriteDescriptor, None
from shardtcp.proxy.splice import DOWNSTREAM, UPSTREAM, IdleTimeout, SpliceStats

try:
    # The inner loop in C (``_kpump.c``), built at install time on Linux.
    from shardtcp.proxy._kpump import pump as _kpump
except ImportError:  # not built (no compiler then): the Python loop below
    _kpump = None

log = Logger()

# HAProxy's tune.pipesize default is the system's; 1 MiB lets one splice
# call move a whole TCP receive window on a fast link.
PIPE_SIZE = 1 << 20
DEFAULT_MAX_PIPES = 4096
# Empty pipes kept for reuse: saves pipe2 + fcntl + two closes per pipe.
DEFAULT_KEEP_FREE = 64
# Read size of a direction that fell back to copying through userspace.
_COPY_CHUNK = 128 * 1024

_NAMES = ("client", "shard")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# splice(2) unsupported for these descriptors or by this kernel/sandbox.
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM)


# -- availability ---------------------------------------------------------

_available: Optional[bool] = None


def kernel_splice_available() -> bool:
    """
    Whether ``os.splice`` works here: probed once (a byte through a pipe
    between the two ends of a socket pair) and cached.
    """
    global _available
    if _available is None:
        _available = _probe()
    return _available


def _probe() -> bool:
    splice = getattr(os, "splice", None)
    if splice is None:
        return False
    a = b = None
    r = w = -1
    try:
        a, b = socket.socketpair()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        a.sendall(b"x")
        if splice(b.fileno(), w, 1, None, None, _SPLICE_FLAGS) != 1:
            return False
        if splice(r, a.fileno(), 1, None, None, _SPLICE_FLAGS) != 1:
            return False
        return b.recv(1) == b"x"
    except OSError:
        return False
    finally:
        for s in (a, b):
            if s is not None:
                s.close()
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


# -- pipes ----------------------------------------------------------------


@attrs.frozen
class Pipe:
    """A non-blocking pipe and the bytes it can hold."""

    read_fd: int
    write_fd: int
    capacity: int


class PipePool:
    """
    Bounds kernel-spliced connections by the pipes they may need and lends
    out the pipes themselves only while bytes are in flight.

    A kernel splice ``reserve``\\ s two pipes for its life (``in_use``
    counts reservations, at most ``max_pipes``), but holds a real pipe
    (``lent``) only from its first readable event on a side until that
    pipe is drained: an idle spliced connection holds its two sockets and
    no pipe.  Drained pipes come back empty and a few (``keep_free``) are
    kept for the next loan.  ``acquire``/``release`` reserve and lend one
    pipe at once.
    """

    def __init__(
        self,
        max_pipes: int = DEFAULT_MAX_PIPES,
        *,
        pipe_size: int = PIPE_SIZE,
        keep_free: int = DEFAULT_KEEP_FREE,
    ) -> None:
        self.max_pipes = max_pipes
        self._pipe_size = pipe_size
        self._keep_free = keep_free
        self._free: list[Pipe] = []
        self._closed = False
        self.in_use = 0
        #: Pipes held by splices right now (at most ``in_use``).
        self.lent = 0

    @property
    def free(self) -> int:
        """Empty pipes held for reuse."""
        return len(self._free)

    def reserve(self, count: int) -> bool:
        """Count ``count`` more pipes in use, unless that passes ``max_pipes``."""
        if self.in_use + count > self.max_pipes:
            return False
        self.in_use += count
        return True

    def unreserve(self, count: int) -> None:
        self.in_use -= count

    def lend(self) -> Optional[Pipe]:
        """An empty pipe for a reservation, or ``None`` when the system refuses one."""
        if self._free:
            pipe = self._free.pop()
        else:
            try:
                pipe = self._make()
            except OSError as e:
                log.warn("kernel splice: no pipe: {error}", error=os.strerror(e.errno or 0))
                return None
        self.lent += 1
        return pipe

    def give_back(self, pipe: Pipe, *, empty: bool) -> None:
        """Take a lent pipe back; a pipe that may hold bytes is closed."""
        self.lent -= 1
        if empty and not self._closed and len(self._free) < self._keep_free:
            self._free.append(pipe)
        else:
            _close_pipe(pipe)

    def acquire(self) -> Optional[Pipe]:
        """Reserve and lend one pipe; ``None`` at the bound or without a pipe."""
        if not self.reserve(1):
            return None
        pipe = self.lend()
        if pipe is None:
            self.unreserve(1)
        return pipe

    def release(self, pipe: Pipe, *, empty: bool) -> None:
        """Give back a pipe from ``acquire`` and its reservation."""
        self.give_back(pipe, empty=empty)
        self.unreserve(1)

    def close(self) -> None:
        """
        Close the pipes kept for reuse; pipes in use close on release from
        now on.
        """
        self._closed = True
        free, self._free = self._free, []
        for pipe in free:
            _close_pipe(pipe)

    def _make(self) -> Pipe:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self._pipe_size)
        except OSError:
            # EPERM above /proc/sys/fs/pipe-max-size or the user's pipe
            # budget: the default size still works, only with more calls.
            pass
        try:
            capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        except OSError:
            capacity = 65536
        return Pipe(r, w, capacity)


def _close_pipe(pipe: Pipe) -> None:
    for fd in (pipe.read_fd, pipe.write_fd):
        try:
            os.close(fd)
        except OSError:
            pass


# -- taking sockets over from Twisted ------------------------------------


def can_detach(transport) -> bool:
    """Whether ``detach_transport`` can take ``transport``'s socket."""
    return (
        isinstance(transport, _TCPConnection)
        and bool(transport.connected)
        and not transport.disconnected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnecting", True)
        and not getattr(transport, "_aborting", True)
        and not getattr(transport, "TLS", True)
        and isinstance(getattr(transport, "_tempDataBuffer", None), list)
        and hasattr(transport, "dataBuffer")
        and hasattr(transport, "offset")
        and hasattr(transport, "_tempDataLen")
    )


def detach_transport(transport) -> tuple[socket.socket, bytes]:
    """
    Take the connected socket out of a Twisted TCP transport.

    Returns the socket (non-blocking, now owned by the caller) and the bytes
    written to the transport but not yet sent.  The transport is left inert
    (see the module docstring); its protocol gets no further events.
    """
    if not can_detach(transport):
        raise ValueError("not a plain, open Twisted TCP transport")
    return _detach(transport)


def _detach(transport) -> tuple[socket.socket, bytes]:
    """
    ``detach_transport`` for a transport ``can_detach`` accepted (Twisted's
    sockets are already non-blocking).
    """
    # ``stopReading`` and ``stopWriting``, one call each fewer.
    reactor = transport.reactor
    reactor.removeReader(transport)
    reactor.removeWriter(transport)
    if transport.offset or transport._tempDataBuffer:
        pending = bytes(transport.dataBuffer[transport.offset :]) + b"".join(transport._tempDataBuffer)
        transport.offset = 0
        transport._tempDataBuffer = []
        transport._tempDataLen = 0
    else:
        pending = bytes(transport.dataBuffer)
    transport.dataBuffer = b""
    if transport.producer is not None:
        transport.unregisterProducer()
    # The socket object itself moves to the splice (cheaper than a new one
    # for each shutdown or close later); the inert transport keeps a dummy
    # that owns nothing, so no path left in it can close our descriptor.
    sock = transport.socket
    transport.socket = _GONE
    transport.connected = False
    transport.disconnected = True
    # Nothing calls into the inert transport again: break its reference
    # cycles (its protocol and, for a client transport, its connector) so
    # that reference counting frees it now.  Left to the cyclic collector,
    # a few KiB per connection wait for the next full collection, which
    # with thousands of connections held comes rarely.
    transport.protocol = None
    connector = getattr(transport, "connector", None)
    if connector is not None:
        transport.connector = None
        connector.transport = None
    return sock, pending


class _Gone:
    """What a detached transport holds instead of its socket."""

    __slots__ = ()

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass

    def shutdown(self, how: int) -> None:
        pass

    def setsockopt(self, *args) -> None:
        pass


_GONE = _Gone()


def _socket_call(sock: socket.socket, method: str, *args) -> None:
    """
    Call a ``socket`` method (``shutdown``, ``setsockopt``) on a side's
    socket: the one place the splice's shutdowns and resets go through, so
    that a test can see which were made (a socket's methods cannot be
    patched).
    """
    getattr(sock, method)(*args)


# -- the pump -------------------------------------------------------------


class KernelSplicer:
    """
    Builds ``KernelSplice``s, or says no (``None``) so that the caller uses
    the userspace ``Splice``.

    ``enabled`` defaults to ``kernel_splice_available()``.  A splice call
    refused as unsupported (``EINVAL``, ``ENOSYS``) before any has worked
    disables the splicer: that connection finishes by copying, the next ones
    are refused.

    ``edge`` (default: whether ``reactor`` takes descriptors
    edge-triggered, as ``shardtcp.eventloop.LeanEPollReactor`` does)
    registers each spliced socket once, edge-triggered, with the reactor:
    no reactor call per flow-control change.  Otherwise each socket is a
    reader and writer of the reactor's, registered as its flow control
    needs.
    """

    def __init__(
        self,
        pool: PipePool,
        *,
        reactor: IReactorFDSet,
        clock: Optional[IReactorTime] = None,
        enabled: Optional[bool] = None,
        splice: Optional[Callable[..., int]] = None,
        edge: Optional[bool] = None,
    ) -> None:
        self.pool = pool
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._now = self._clock.seconds
        self.enabled = kernel_splice_available() if enabled is None else enabled
        self._splice = splice if splice is not None else getattr(os, "splice", None)
        # The C loop makes the real system calls; a ``splice`` given here
        # (a test's) is called from the Python loop.
        self._fast = _kpump if splice is None else None
        self._proven = False
        if edge is None:
            edge = _EdgeReactor is not None and isinstance(reactor, _EdgeReactor)
        self.edge = edge
        # Splices that used their reads of a wake-up and go on at the
        # reactor's next turn (edge-triggered), and the call that runs them.
        self._again: list = []
        self._again_call = None
        # The idle timeouts of all its splices: one heap of (due, seq,
        # splice) and one timer, instead of a DelayedCall per connection.
        self._idle: list = []
        self._idle_seq = 0
        self._idle_live = 0
        self._idle_timer = None

    def take_transports(
        self,
        downstream,
        upstream,
        *,
        on_done: Callable[[SpliceStats], None],
        prefix_up: bytes = b"",
        prefix_down: bytes = b"",
        idle_timeout: float = 0.0,
    ) -> Optional["KernelSplice"]:
        """
        Splice the client's transport ``downstream`` and the shard's
        ``upstream`` in the kernel, or return ``None`` having changed
        nothing.

        ``prefix_up`` goes to the shard and ``prefix_down`` to the client
        first, after whatever each transport still had to send.
        ``on_done(stats)`` is called once both sockets are closed, possibly
        before this returns (a peer that was already gone).  A side whose
        EOF Twisted already reported is seen again as an EOF here.
        """
        if not (self.enabled and can_detach(downstream) and can_detach(upstream)):
            return None
        if not self.pool.reserve(2):
            return None
        down, down_pending = _detach(downstream)
        up, up_pending = _detach(upstream)
        splice = KernelSplice(
            down,
            up,
            splicer=self,
            on_done=on_done,
            prefix_up=up_pending + prefix_up if up_pending else prefix_up,
            prefix_down=down_pending + prefix_down if down_pending else prefix_down,
            idle_timeout=idle_timeout,
        )
        splice.start()
        return splice

    def take_sockets(
        self,
        downstream: socket.socket,
        upstream: socket.socket,
        *,
        on_done: Callable[[SpliceStats], None],
        prefix_up: bytes = b"",
        prefix_down: bytes = b"",
        idle_timeout: float = 0.0,
    ) -> Optional["KernelSplice"]:
        """
        As ``take_transports`` for two connected sockets the caller owns;
        on success the splice owns them and will close them.
        """
        if not self.enabled:
            return None
        if not self.pool.reserve(2):
            return None
        downstream.setblocking(False)
        upstream.setblocking(False)
        splice = KernelSplice(
            downstream,
            upstream,
            splicer=self,
            on_done=on_done,
            prefix_up=prefix_up,
            prefix_down=prefix_down,
            idle_timeout=idle_timeout,
        )
        splice.start()
        return splice

    # -- edge-triggered ----------------------------------------------------

    def close(self) -> None:
        """Forget the splices waiting for the reactor's next turn; for a splicer no splice uses any more."""
        call, self._again_call = self._again_call, None
        self._again = []
        if call is not None and call.active():
            call.cancel()

    def again(self, splice: "KernelSplice") -> None:
        """Run ``splice`` again at the reactor's next turn."""
        self._again.append(splice)
        if self._again_call is None:
            self._again_call = self._reactor.callLater(0, self._run_again)

    def _run_again(self) -> None:
        self._again_call = None
        again, self._again = self._again, []
        for splice in again:
            splice._run()

    # -- idle timeouts ---------------------------------------------------

    def _idle_add(self, splice: "KernelSplice") -> None:
        self._idle_live += 1
        self._idle_push(splice)

    def _idle_push(self, splice: "KernelSplice") -> None:
        due = splice._last_activity + splice._idle_timeout
        self._idle_seq += 1
        heapq.heappush(self._idle, (due, self._idle_seq, splice))
        timer = self._idle_timer
        if timer is None:
            self._idle_timer = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._idle_sweep)
        elif due < timer.getTime():
            timer.reset(max(0.0, due - self._clock.seconds()))

    def _idle_drop(self) -> None:
        """A watched splice ended: forget it (at once when none is left)."""
        self._idle_live -= 1
        heap = self._idle
        if self._idle_live == 0:
            heap.clear()
            timer, self._idle_timer = self._idle_timer, None
            if timer is not None and timer.active():
                timer.cancel()
        elif len(heap) > 2 * self._idle_live + 64:
            # Ended splices wait in the heap until their due time: sweep
            # them out once they are the majority, so memory stays bounded.
            heap[:] = [entry for entry in heap if not entry[2]._done]
            heapq.heapify(heap)

    def _idle_sweep(self) -> None:
        """Abort the splices quiet for their idle timeout; look again at the others later."""
        self._idle_timer = None
        now = self._clock.seconds()
        heap = self._idle
        while heap and heap[0][0] <= now:
            splice = heapq.heappop(heap)[2]
            if splice._done:
                continue
            if now >= splice._last_activity + splice._idle_timeout:
                splice.stats.clean = False
                splice.abort("idle")
            else:
                self._idle_push(splice)
        if heap and self._idle_timer is None:
            self._idle_timer = self._clock.callLater(max(0.0, heap[0][0] - now), self._idle_sweep)

    # Called by the splices (which also set ``_proven`` once a splice call worked).
    def _splice_unsupported(self, error: OSError) -> None:
        if not self._proven and self.enabled:
            self.enabled = False
            log.warn(
                "kernel splice refused ({error}): using the userspace splice",
                error=os.strerror(error.errno or 0),
            )


_PREFIXES = ("ksplice-client", "ksplice-shard")

# Edge-triggered registration of a spliced socket: every readiness change,
# once.  A side's ``rd``/``wr`` flag is set by an event and cleared only
# by an EAGAIN that proves the socket not ready (see ``_pump``).
_READY_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_READY_OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
# Splices into a pipe per direction and wake-up: a connection that could
# go on for ever (a fast sender, a fast receiver) yields to the others and
# goes on at the reactor's next turn.
_MAX_ROUNDS = 16
# The state bits of ``_kpump.pump`` (``_kpump.c`` says what each means).
_ST_RD, _ST_WR, _ST_STALLED, _ST_EOF, _ST_EDGE = 1, 2, 4, 8, 16
_ST_AGAIN, _ST_MOVED, _ST_TRIED_IN, _ST_TRIED_OUT, _ST_ERR_IN, _ST_ERR_OUT = 32, 64, 128, 256, 512, 1024
# ``_pump_fast``: no pipe could be lent.
_NO_PIPE = object()


@implementer(IReadDescriptor, IWriteDescriptor, IEdgeTriggered)
class _Side:
    """
    One socket of a kernel splice, as the reactor sees it, and the bytes
    moving out of it: the direction from this side (``index``) to the other
    (``1 - index``), through ``pipe`` while one is lent.
    """

    # Slots keep an idle spliced connection small: two of these and the
    # ``KernelSplice`` are all it holds besides its two sockets.
    __slots__ = (
        "_owner", "index", "sock", "fd", "open", "reading", "writing", "rd", "wr",
        "pipe", "pending", "in_pipe", "eof", "final", "drained", "dead", "stalled", "copy", "tried", "tried_out",
        "ended",
    )

    def __init__(self, owner: "KernelSplice", index: int, sock: socket.socket, prefix: bytes) -> None:
        self._owner = owner
        self.index = index
        self.sock = sock
        self.fd = sock.fileno()
        self.open = True
        # Registered with the reactor (level-triggered path).
        self.reading = False
        self.writing = False
        # Readiness seen and not yet used up (edge-triggered path): a
        # socket is writable until a write says otherwise.
        self.rd = False
        self.wr = True
        # -- the direction out of this side
        self.pipe: Optional[Pipe] = None  # lent while bytes are in it
        self.pending = memoryview(prefix) if prefix else None  # bytes to send before the pipe's
        self.in_pipe = 0
        self.eof = False  # this side gives no more bytes
        self.final = "shutdown"  # what to do to the other side once drained
        self.drained = False  # final action done
        self.dead = False  # the other side is gone: bytes for it are dropped
        self.stalled = False  # the pipe is full by slot count
        self.copy = False  # splice refused: copy through userspace
        self.tried = False  # a splice into a pipe has worked
        self.tried_out = False  # a splice out of a pipe has worked
        # Set when this socket read its peer's FIN and was itself shut for
        # writing: both ways are over, so closing it needs no shutdown first.
        self.ended = 0

    def fileno(self) -> int:
        return self.fd if self.open else -1

    def logPrefix(self) -> str:
        return _PREFIXES[self.index]

    def doRead(self) -> None:
        self._owner._readable(self.index)

    def doWrite(self) -> None:
        self._owner._writable(self.index)

    def edgeEvent(self, events: int) -> None:
        # Edge-triggered: what the socket became ready for, once.
        if events & _READY_IN:
            self.rd = True
        if events & _READY_OUT:
            self.wr = True
        self._owner._run()

    def connectionLost(self, reason: Failure) -> None:
        # Only the reactor calls this (shutting down, removeAll, a handler's
        # error).
        self._owner._reactor_dropped()


class KernelSplice(IdleTimeout):
    """
    A kernel splice between the client's socket and the shard's socket.
    Build it with ``KernelSplicer``; ``stats``, ``close`` and ``abort`` are
    as on the userspace ``Splice``.
    """

    __slots__ = (
        "_splicer", "_on_done", "_idle_timeout", "_idle_call", "_last_activity", "_sides", "_done", "stats",
    )

    def __init__(
        self,
        downstream: socket.socket,
        upstream: socket.socket,
        *,
        splicer: KernelSplicer,
        on_done: Callable[[SpliceStats], None],
        prefix_up: bytes = b"",
        prefix_down: bytes = b"",
        idle_timeout: float = 0.0,
    ) -> None:
        self._splicer = splicer
        self._on_done = on_done
        self._idle_timeout = idle_timeout
        self._idle_call = None
        self._last_activity = 0.0
        # Each side carries the direction out of it: the client's
        # (client -> shard) and the shard's (shard -> client).
        self._sides = (_Side(self, DOWNSTREAM, downstream, prefix_up), _Side(self, UPSTREAM, upstream, prefix_down))
        self._done = False
        self.stats = SpliceStats()

    @property
    def _clock(self) -> IReactorTime:
        return self._splicer._clock

    def _start_idle(self) -> None:
        # The splicer watches the idle timeout; ``_idle_call`` is only a
        # flag here (True while watched), so that activity stays cheap.
        if self._idle_timeout > 0:
            self._last_activity = self._splicer._now()
            self._idle_call = True
            self._splicer._idle_add(self)

    def _stop_idle(self) -> None:
        if self._idle_call is not None:
            self._idle_call = None
            self._splicer._idle_drop()

    def start(self) -> None:
        self._start_idle()
        if self._splicer.edge:
            add = self._splicer._reactor.addEdgeTriggered
            try:
                for side in self._sides:
                    add(side)
            except OSError as e:
                # The kernel would not watch the socket (out of memory, or
                # the user's epoll watch limit): the proxy's trouble.
                log.warn("kernel splice: cannot watch a socket: {error}", error=os.strerror(e.errno or 0))
                self.abort("proxy")
                return
            self._run()
            return
        for d in self._sides:
            self._kick(d)
        self._update()

    # -- public controls --------------------------------------------------

    def close(self, why: str = "closed") -> None:
        """Stop reading, flush what the pipes hold, then close both sides."""
        if self._done:
            return
        if not self.stats.ended_by:
            self.stats.ended_by = why
        for d in self._sides:
            d.eof = True
            d.final = "close"
        for d in self._sides:
            self._kick(d)
        if not self._splicer.edge:
            self._update()

    def abort(self, why: str) -> None:
        """Reset both sides at once, dropping what the pipes hold."""
        if self._done:
            return
        if not self.stats.ended_by:
            self.stats.ended_by = why
        for side in self._sides:
            self._close_side(side, reset=True)
        self._finish()

    # -- events -----------------------------------------------------------

    def _run(self) -> None:
        """Edge-triggered: move what the sides' readiness allows, both ways."""
        if self._done:
            return
        a, b = self._sides
        moved = False
        # A direction with nothing to read and nothing to send has nothing
        # to do (an end is passed on by the pump that saw it).
        if (a.rd and not a.eof) or a.pending is not None or a.in_pipe:
            moved = self._pump(a, b, _MAX_ROUNDS)
        if not self._done and ((b.rd and not b.eof) or b.pending is not None or b.in_pipe):
            moved = self._pump(b, a, _MAX_ROUNDS) or moved
        if moved and self._idle_call is not None:
            self._last_activity = self._splicer._now()

    def _readable(self, index: int) -> None:
        # Level-triggered: one read from ``index``, then what can be sent.
        if self._done:
            return
        sides = self._sides
        d = sides[index]
        if not d.eof:
            o = sides[1 - index]
            d.rd = o.wr = True
            moved = self._pump(d, o, 1)
            d.rd = False
            if moved and self._idle_call is not None:
                self._last_activity = self._splicer._now()
        self._update()

    def _writable(self, index: int) -> None:
        # Level-triggered: ``index`` is the destination of the direction
        # to flush.
        if self._done:
            return
        sides = self._sides
        o = sides[index]
        o.wr = True
        if self._pump(sides[1 - index], o, 0) and self._idle_call is not None:
            self._last_activity = self._splicer._now()
        self._update()

    def _kick(self, d: "_Side") -> None:
        """Send what ``d`` holds (a prefix, a pipe) if its destination takes it."""
        if self._done:
            return
        o = self._sides[1 - d.index]
        if not self._splicer.edge:
            o.wr = True
        self._pump(d, o, 0)

    def _reactor_dropped(self) -> None:
        # The reactor is going away: close without flushing, as Twisted
        # does for its own connections then.
        if self._done:
            return
        if not self.stats.ended_by:
            self.stats.ended_by = "closed"
        for side in self._sides:
            self._close_side(side, reset=False)
        self._finish()

    # -- moving bytes -----------------------------------------------------

    def _pump(self, d: "_Side", o: "_Side", reads: int) -> bool:
        """
        Move bytes from side ``d`` to side ``o`` until neither reading nor
        writing can go on, with at most ``reads`` reads; whether any byte
        moved.  A drained pipe goes back to the pool on the way out.

        Edge-triggered, ``d.rd`` is cleared only by an EAGAIN read from an
        empty pipe (or from the socket, when copying): with bytes in the
        pipe an EAGAIN may mean that the pipe is full by slot count
        (``stalled``), so the read is tried again once some of it went out.
        ``o.wr`` is cleared by an EAGAIN write (level-triggered, also by a
        short one: the reactor says when to go on).  A direction that used
        its reads and could read on goes on at the reactor's next turn.
        """
        if d.drained or d.dead:
            return False
        splicer = self._splicer
        fast = splicer._fast
        if fast is not None and d.pending is None and not d.copy:
            moved = self._pump_fast(fast, d, o, reads)
            if moved is not None and moved is not _NO_PIPE:
                return moved
            # The Python loop copies: a splice was refused as unsupported,
            # or no pipe was to be had (and none is asked for again now).
            lend = moved is None
        else:
            lend = True
        splice = splicer._splice
        moved = False
        while True:
            progress = False
            # -- out, to ``o``
            if o.wr:
                if d.pending is not None:
                    try:
                        n = os.write(o.fd, d.pending)
                    except BlockingIOError:
                        o.wr = False
                        n = 0
                    except InterruptedError:
                        n = 0
                    except OSError as e:
                        self._side_failed(o.index, e)
                        return True
                    if n:
                        progress = moved = True
                        d.pending = None if n >= len(d.pending) else d.pending[n:]
                elif d.in_pipe:
                    try:
                        n = splice(d.pipe.read_fd, o.fd, d.in_pipe, None, None, _SPLICE_FLAGS)
                    except BlockingIOError:
                        o.wr = False
                        n = 0
                    except InterruptedError:
                        n = 0
                    except OSError as e:
                        if e.errno in _UNSUPPORTED and not d.tried_out:
                            self._drain_pipe_to_memory(d, e)
                            continue
                        self._side_failed(o.index, e)
                        return True
                    if n:
                        d.tried_out = True
                        d.in_pipe -= n
                        d.stalled = False
                        progress = moved = True
                        if d.in_pipe and not splicer.edge:
                            o.wr = False
            if d.eof and d.pending is None and not d.in_pipe:
                self._give_back(d)
                self._drained(d)
                return moved
            # -- in, from ``d``
            if d.rd and not d.eof and not d.stalled and d.pending is None:
                if not reads:
                    if splicer.edge:
                        splicer.again(self)
                    break
                reads -= 1
                pipe = d.pipe
                if pipe is None and not d.copy and lend:
                    pipe = d.pipe = splicer.pool.lend()
                if pipe is None:
                    # Copying (splice refused, or no pipe to be had): a
                    # read waits until what it read before is sent.
                    if not d.in_pipe:
                        try:
                            data = os.read(d.fd, _COPY_CHUNK)
                        except BlockingIOError:
                            d.rd = False
                            data = None
                        except InterruptedError:
                            data = None
                        except OSError as e:
                            self._side_failed(d.index, e)
                            return True
                        if data is not None:
                            progress = True
                            if data:
                                d.pending = memoryview(data)
                                moved = True
                                if d.index:
                                    self.stats.bytes_down += len(data)
                                else:
                                    self.stats.bytes_up += len(data)
                            else:
                                self._eof(d)
                elif pipe.capacity > d.in_pipe:
                    try:
                        n = splice(d.fd, pipe.write_fd, pipe.capacity - d.in_pipe, None, None, _SPLICE_FLAGS)
                    except BlockingIOError:
                        if d.in_pipe:
                            d.stalled = True
                        else:
                            d.rd = False
                        n = -1
                    except InterruptedError:
                        n = -1
                    except OSError as e:
                        if e.errno in _UNSUPPORTED and not d.tried:
                            self._fall_back(d, e)
                            if not d.in_pipe:
                                self._give_back(d)
                            continue
                        self._side_failed(d.index, e)
                        return True
                    if n >= 0:
                        progress = True
                        if not d.tried:
                            d.tried = True
                            splicer._proven = True
                        if n:
                            d.in_pipe += n
                            moved = True
                            if d.index:
                                self.stats.bytes_down += n
                            else:
                                self.stats.bytes_up += n
                        else:
                            self._eof(d)
            if not progress:
                break
        if not d.in_pipe:
            self._give_back(d)
        return moved

    def _pump_fast(self, fast, d: "_Side", o: "_Side", reads: int) -> Optional[bool]:
        """
        ``_pump`` by the C loop (``_kpump.pump``) for a direction with no
        prefix to send and not copying: whether any byte moved; ``None``
        when a splice was refused as unsupported and the direction now
        copies, ``_NO_PIPE`` when the system gave no pipe to read into (the
        caller's Python loop goes on, copying).
        """
        splicer = self._splicer
        pipe = d.pipe
        if pipe is None:
            # Nothing in flight: pass an end on, or lend a pipe to read into.
            if d.eof:
                self._drained(d)
                return False
            if not d.rd:
                return False
            if not reads:
                if splicer.edge:
                    splicer.again(self)
                return False
            pipe = d.pipe = splicer.pool.lend()
            if pipe is None:
                return _NO_PIPE
        state = (
            (d.rd and _ST_RD) | (o.wr and _ST_WR) | (d.stalled and _ST_STALLED) | (d.eof and _ST_EOF)
            | (splicer.edge and _ST_EDGE)
        )
        d.in_pipe, got, state, error = fast(d.fd, pipe.write_fd, pipe.read_fd, o.fd, d.in_pipe, pipe.capacity, state, reads)
        d.rd = state & _ST_RD != 0
        o.wr = state & _ST_WR != 0
        d.stalled = state & _ST_STALLED != 0
        if got:
            if d.index:
                self.stats.bytes_down += got
            else:
                self.stats.bytes_up += got
        if state & _ST_TRIED_IN and not d.tried:
            d.tried = True
            splicer._proven = True
        if state & _ST_TRIED_OUT:
            d.tried_out = True
        if state & _ST_EOF and not d.eof:
            self._eof(d)
        if error:
            e = OSError(error, os.strerror(error))
            if state & _ST_ERR_OUT:
                if error in _UNSUPPORTED and not d.tried_out:
                    self._drain_pipe_to_memory(d, e)
                    return None
                self._side_failed(o.index, e)
                return True
            if error in _UNSUPPORTED and not d.tried:
                self._fall_back(d, e)
                if not d.in_pipe:
                    self._give_back(d)
                return None
            self._side_failed(d.index, e)
            return True
        if state & _ST_AGAIN and splicer.edge:
            splicer.again(self)
        if not d.in_pipe:
            self._give_back(d)
            if d.eof:
                self._drained(d)
        return state & _ST_MOVED != 0

    def _give_back(self, d: "_Side") -> None:
        # An empty pipe goes back until the next bytes.
        pipe = d.pipe
        if pipe is not None:
            d.pipe = None
            self._splicer.pool.give_back(pipe, empty=True)

    def _fall_back(self, d: _Side, error: OSError) -> None:
        d.copy = True
        d.tried = True
        self._splicer._splice_unsupported(error)

    def _drain_pipe_to_memory(self, d: _Side, error: OSError) -> None:
        # Splicing out was refused: what is in the pipe goes out by send.
        self._fall_back(d, error)
        chunks = []
        while d.in_pipe:
            try:
                chunk = os.read(d.pipe.read_fd, d.in_pipe)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            d.in_pipe -= len(chunk)
        d.pending = memoryview(b"".join(chunks)) if chunks else None
        pipe, d.pipe = d.pipe, None
        self._splicer.pool.give_back(pipe, empty=d.in_pipe == 0)
        d.in_pipe = 0

    # -- endings ----------------------------------------------------------

    def _eof(self, d: _Side) -> None:
        # Called only when a read returned 0: the peer's FIN.
        d.eof = True
        d.ended |= 1
        if self._sides[1 - d.index].eof and not self.stats.ended_by:
            self.stats.ended_by = _NAMES[d.index]

    def _drained(self, d: _Side) -> None:
        """Everything from ``d`` reached the other side: pass the end on."""
        d.drained = True
        dst = other = self._sides[1 - d.index]
        if d.final == "close" or (other.eof and (other.drained or other.dead)):
            self._close_side(dst, reset=False)
        else:
            try:
                _socket_call(dst.sock, "shutdown", socket.SHUT_WR)
            except OSError as e:
                self._side_failed(dst.index, e)
                return
            dst.ended |= 2
        if other.drained and other.eof:
            # Both directions ended: close what is still open.
            for side in self._sides:
                if side.open:
                    self._close_side(side, reset=False)
        if not (self._sides[0].open or self._sides[1].open):
            self._finish()

    def _side_failed(self, index: int, error: Optional[OSError]) -> None:
        """``index``'s socket failed: close it, flush the other, close it."""
        side = self._sides[index]
        if not side.open:
            return
        if not self.stats.ended_by:
            self.stats.ended_by = _NAMES[index]
            self.stats.clean = False
        self._close_side(side, reset=False)
        into = self._sides[1 - index]  # other -> this side: nowhere to go
        into.dead = True
        into.eof = True
        out = side  # this side -> other: flush, then close
        out.eof = True
        out.final = "close"
        if not self._done:
            self._kick(out)
        if not (self._sides[0].open or self._sides[1].open):
            self._finish()

    def _close_side(self, side: _Side, *, reset: bool) -> None:
        if not side.open:
            return
        if self._splicer.edge:
            self._splicer._reactor.removeEdgeTriggered(side)
        elif side.reading or side.writing:
            self._set(side, read=False, write=False)
        side.open = False
        d_in = self._sides[1 - side.index]
        d_in.dead = d_in.dead or not d_in.drained
        try:
            if reset:
                _socket_call(side.sock, "setsockopt", socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            elif side.ended != 3:
                _socket_call(side.sock, "shutdown", socket.SHUT_RDWR)
        except OSError:
            pass
        side.sock.close()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        for side in self._sides:
            if side.open:
                self._close_side(side, reset=False)
        pool = self._splicer.pool
        for d in self._sides:
            if d.pipe is not None:
                pool.give_back(d.pipe, empty=d.in_pipe == 0)
                d.pipe = None
        pool.unreserve(2)
        self._stop_idle()
        self._on_done(self.stats)

    # -- reactor registration (level-triggered path) ----------------------

    def _update(self) -> None:
        if self._done:
            return
        sides = self._sides
        for side in sides:
            if not side.open:
                continue
            into = sides[1 - side.index]  # other -> side
            # ``side`` itself carries side -> other.  Without a pipe (idle,
            # or copying) a read waits until what it read before is sent.
            read = not side.eof and not side.stalled and (
                (side.pending is None and side.in_pipe == 0) if side.pipe is None
                else side.in_pipe < side.pipe.capacity
            )
            write = not into.dead and not into.drained and (into.pending is not None or into.in_pipe > 0)
            # most events change neither: no call then
            if read != side.reading or write != side.writing:
                self._set(side, read=read, write=write)

    def _set(self, side: _Side, *, read: bool, write: bool) -> None:
        reactor = self._splicer._reactor
        if read != side.reading:
            side.reading = read
            (reactor.addReader if read else reactor.removeReader)(side)
        if write != side.writing:
            side.writing = write
            (reactor.addWriter if write else reactor.removeWriter)(side)


_LINGER_RESET = struct.pack("ii", 1, 0)


__all__ = [
    "DEFAULT_MAX_PIPES",
    "KernelSplice",
    "KernelSplicer",
    "PIPE_SIZE",
    "Pipe",
    "PipePool",
    "can_detach",
    "detach_transport",
    "kernel_splice_available",
]
