# -*- test-case-name: tests.proxy.test_ksplice -*-
"""
Kernel splice: move a connection's bytes with ``splice(2)``, below Twisted.

Once the PROXY header is written, a passthrough or plain connection only
copies bytes.  ``KernelSplice`` does that through one pipe per direction
(socket -> pipe -> socket, the bytes never reach Python), driven by the
reactor through two raw file descriptors.  It keeps the contract of the
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
instead.  A splice keeps bare descriptors, not ``socket`` objects.

Taking a socket over from Twisted (``detach_transport``).  A
``tcp.Connection`` closes its socket in ``connectionLost`` with
``shutdown(SHUT_RDWR)`` (``loseConnection``), which acts on the socket, not
on the descriptor: keeping an ``os.dup`` and letting Twisted close its own
copy sends the peer a FIN in the middle of the connection.
``abortConnection`` sets ``SO_LINGER {1, 0}`` on the shared socket, so the
dup's eventual close would reset the peer instead of ending cleanly.  Instead the transport is removed from the reactor, its unsent
write buffer is taken out (it becomes the head of the prefix), and its
socket object gives up the descriptor with ``socket.detach()``; the
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
import socket
import struct
from typing import Callable, Optional

import attrs
from twisted.internet.tcp import Connection as _TCPConnection
from twisted.internet.interfaces import IReactorFDSet, IReactorTime, IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shardtcp.proxy.splice import DOWNSTREAM, UPSTREAM, IdleTimeout, SpliceStats

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
        if splice(b.fileno(), w, 1, flags=_SPLICE_FLAGS) != 1:
            return False
        if splice(r, a.fileno(), 1, flags=_SPLICE_FLAGS) != 1:
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
    family, kind, proto = transport.socket.family, transport.socket.type, transport.socket.proto
    fd, pending = _detach(transport)
    # Family, type and protocol given: otherwise three getsockopt calls.
    sock = socket.socket(family, kind, proto, fileno=fd)
    sock.setblocking(False)
    return sock, pending


def _detach(transport) -> tuple[int, bytes]:
    """
    ``detach_transport`` for a transport ``can_detach`` accepted, giving the
    bare descriptor (Twisted's sockets are already non-blocking).
    """
    transport.stopReading()
    transport.stopWriting()
    pending = bytes(transport.dataBuffer[transport.offset :]) + b"".join(transport._tempDataBuffer)
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    if transport.producer is not None:
        transport.unregisterProducer()
    fd = transport.socket.detach()
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
    return fd, pending


def _socket_call(fd: int, method: str, *args) -> None:
    """
    Call a ``socket`` method on a bare descriptor (``shutdown``,
    ``setsockopt``): a splice keeps descriptors, not ``socket`` objects, to
    stay small.  Neither call depends on the address family.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        getattr(sock, method)(*args)
    finally:
        sock.detach()


# -- the pump -------------------------------------------------------------


class KernelSplicer:
    """
    Builds ``KernelSplice``s, or says no (``None``) so that the caller uses
    the userspace ``Splice``.

    ``enabled`` defaults to ``kernel_splice_available()``.  A splice call
    refused as unsupported (``EINVAL``, ``ENOSYS``) before any has worked
    disables the splicer: that connection finishes by copying, the next ones
    are refused.
    """

    def __init__(
        self,
        pool: PipePool,
        *,
        reactor: IReactorFDSet,
        clock: Optional[IReactorTime] = None,
        enabled: Optional[bool] = None,
        splice: Optional[Callable[..., int]] = None,
    ) -> None:
        self.pool = pool
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self.enabled = kernel_splice_available() if enabled is None else enabled
        self._splice = splice if splice is not None else getattr(os, "splice", None)
        self._proven = False
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
        down_fd, down_pending = _detach(downstream)
        up_fd, up_pending = _detach(upstream)
        return self._start(
            down_fd,
            up_fd,
            on_done=on_done,
            prefix_up=up_pending + prefix_up if up_pending else prefix_up,
            prefix_down=down_pending + prefix_down if down_pending else prefix_down,
            idle_timeout=idle_timeout,
        )

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
        on success the splice owns their descriptors (the ``socket``
        objects are detached from them) and will close them.
        """
        if not self.enabled:
            return None
        if not self.pool.reserve(2):
            return None
        downstream.setblocking(False)
        upstream.setblocking(False)
        return self._start(
            downstream.detach(),
            upstream.detach(),
            on_done=on_done,
            prefix_up=prefix_up,
            prefix_down=prefix_down,
            idle_timeout=idle_timeout,
        )

    def _start(self, down_fd: int, up_fd: int, **kw) -> "KernelSplice":
        splice = KernelSplice(down_fd, up_fd, splicer=self, **kw)
        splice.start()
        return splice

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

    # Called by the splices.
    def _splice_worked(self) -> None:
        self._proven = True

    def _splice_unsupported(self, error: OSError) -> None:
        if not self._proven and self.enabled:
            self.enabled = False
            log.warn(
                "kernel splice refused ({error}): using the userspace splice",
                error=os.strerror(error.errno or 0),
            )


_PREFIXES = ("ksplice-client", "ksplice-shard")


@implementer(IReadDescriptor, IWriteDescriptor)
class _Side:
    """
    One socket of a kernel splice, as the reactor sees it, and the bytes
    moving out of it: the direction from this side (``index``) to the other
    (``1 - index``), through ``pipe`` while one is lent.
    """

    # Slots keep an idle spliced connection small: two of these and the
    # ``KernelSplice`` are all it holds besides its two descriptors.
    __slots__ = (
        "_owner", "index", "fd", "open", "reading", "writing",
        "pipe", "pending", "in_pipe", "eof", "final", "drained", "dead", "stalled", "copy", "tried", "tried_out",
        "ended",
    )

    def __init__(self, owner: "KernelSplice", index: int, fd: int, prefix: bytes) -> None:
        self._owner = owner
        self.index = index
        self.fd = fd
        self.open = True
        self.reading = False
        self.writing = False
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

    def connectionLost(self, reason: Failure) -> None:
        # Only the reactor calls this (shutting down, removeAll).
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
        downstream: int,
        upstream: int,
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
        # flag here (True while watched), so that ``_touch`` stays cheap.
        if self._idle_timeout > 0:
            self._last_activity = self._splicer._clock.seconds()
            self._idle_call = True
            self._splicer._idle_add(self)

    def _stop_idle(self) -> None:
        if self._idle_call is not None:
            self._idle_call = None
            self._splicer._idle_drop()

    def start(self) -> None:
        self._start_idle()
        for d in self._sides:
            self._flush(d)
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
            self._flush(d)
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

    # -- reactor events ---------------------------------------------------

    def _readable(self, index: int) -> None:
        d = self._sides[index]
        if d.eof or self._done:
            self._update()
            return
        if d.copy:
            self._copy_in(d)
        else:
            pipe = d.pipe
            if pipe is None:
                pipe = self._splicer.pool.lend() if d.pending is None else None
                if pipe is None:
                    # No pipe to be had (the system's descriptors or pipe
                    # budget): this read goes through userspace.
                    self._copy_in(d)
                else:
                    d.pipe = pipe
            if pipe is not None:
                room = pipe.capacity - d.in_pipe
                if room > 0:
                    self._splice_in(d, room)
        if not self._done:
            self._flush(d)
            self._update()

    def _writable(self, index: int) -> None:
        # ``index`` is the destination: flush the direction into it.
        if self._done:
            return
        self._flush(self._sides[1 - index])
        self._update()

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

    def _splice_in(self, d: _Side, room: int) -> None:
        try:
            n = self._splicer._splice(d.fd, d.pipe.write_fd, room, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            # Level-triggered readiness said there are bytes: with bytes in
            # the pipe, the pipe is full by slot count before byte count.
            if d.in_pipe:
                d.stalled = True
            return
        except InterruptedError:
            return
        except OSError as e:
            if e.errno in _UNSUPPORTED and not d.tried:
                self._fall_back(d, e)
                self._copy_in(d)
                return
            self._side_failed(d.index, e)
            return
        if not d.tried:
            d.tried = True
            self._splicer._splice_worked()
        if n == 0:
            self._eof(d)
            return
        d.in_pipe += n
        self._count(d.index, n)

    def _copy_in(self, d: _Side) -> None:
        if d.pending is not None or d.in_pipe:
            return
        try:
            data = os.read(d.fd, _COPY_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._side_failed(d.index, e)
            return
        if not data:
            self._eof(d)
            return
        d.pending = memoryview(data)
        self._count(d.index, len(data))

    def _fall_back(self, d: _Side, error: OSError) -> None:
        d.copy = True
        d.tried = True
        self._splicer._splice_unsupported(error)

    def _flush(self, d: _Side) -> None:
        """Send what ``d`` holds to the other side; finish it if drained."""
        if d.dead or d.drained:
            return
        dst = self._sides[1 - d.index]
        while d.pending is not None:
            try:
                n = os.write(dst.fd, d.pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._side_failed(dst.index, e)
                return
            self._touch()
            if n >= len(d.pending):
                d.pending = None
            else:
                d.pending = d.pending[n:]
        if d.in_pipe:
            try:
                n = self._splicer._splice(d.pipe.read_fd, dst.fd, d.in_pipe, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _UNSUPPORTED and not d.tried_out:
                    self._drain_pipe_to_memory(d, e)
                    self._flush(d)
                    return
                self._side_failed(dst.index, e)
                return
            d.tried_out = True
            d.in_pipe -= n
            d.stalled = False
            self._touch()
            if d.in_pipe:
                return
        if d.pipe is not None:
            # Drained: the pipe goes back until the next bytes.
            self._splicer.pool.give_back(d.pipe, empty=True)
            d.pipe = None
        if d.eof:
            self._drained(d)

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

    def _count(self, side: int, n: int) -> None:
        if side == DOWNSTREAM:
            self.stats.bytes_up += n
        else:
            self.stats.bytes_down += n
        self._touch()

    def _touch(self) -> None:
        if self._idle_call is not None:
            self._last_activity = self._splicer._clock.seconds()

    # -- endings ----------------------------------------------------------

    def _eof(self, d: _Side) -> None:
        # Called only when a read returned 0: the peer's FIN.
        d.eof = True
        d.ended |= 1
        if all(x.eof for x in self._sides) and not self.stats.ended_by:
            self.stats.ended_by = _NAMES[d.index]

    def _drained(self, d: _Side) -> None:
        """Everything from ``d`` reached the other side: pass the end on."""
        d.drained = True
        dst = other = self._sides[1 - d.index]
        if d.final == "close" or (other.eof and (other.drained or other.dead)):
            self._close_side(dst, reset=False)
        else:
            try:
                _socket_call(dst.fd, "shutdown", socket.SHUT_WR)
            except OSError as e:
                self._side_failed(dst.index, e)
                return
            dst.ended |= 2
        if other.drained and other.eof:
            # Both directions ended: close what is still open.
            for side in self._sides:
                self._close_side(side, reset=False)
        if not any(side.open for side in self._sides):
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
            self._flush(out)
        if not any(s.open for s in self._sides):
            self._finish()

    def _close_side(self, side: _Side, *, reset: bool) -> None:
        if not side.open:
            return
        self._set(side, read=False, write=False)
        side.open = False
        d_in = self._sides[1 - side.index]
        d_in.dead = d_in.dead or not d_in.drained
        try:
            if reset:
                _socket_call(side.fd, "setsockopt", socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            elif side.ended != 3:
                _socket_call(side.fd, "shutdown", socket.SHUT_RDWR)
        except OSError:
            pass
        os.close(side.fd)

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        for side in self._sides:
            self._close_side(side, reset=False)
        pool = self._splicer.pool
        for d in self._sides:
            if d.pipe is not None:
                pool.give_back(d.pipe, empty=d.in_pipe == 0)
                d.pipe = None
        pool.unreserve(2)
        self._stop_idle()
        self._on_done(self.stats)

    # -- reactor registration ---------------------------------------------

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
