"""
A flow-controlled byte pump between two connected transports.

The splice knows nothing of policy, shards or protocols: it moves bytes from
one side to the other, applies back-pressure, carries half-closes across, and
tells its owner once when both sides are done.  It is the one piece a kernel
``splice(2)`` fast path would replace for passthrough listeners, which is why
it only talks to transports through ``write``, ``loseWriteConnection``,
``loseConnection`` and the producer interfaces.

Flow control: each transport is registered as the streaming producer of the
other, so when one side's kernel buffer and Twisted's write buffer fill up
(``bufferSize``, set to ``BUFFER_SIZE``), the other side stops being read.
The memory held for a connection is therefore bounded by the two write
buffers plus one read per direction, whatever the speed of either peer.

Half-close, decided on purpose (Twisted's ``portforward`` drops it):

* an EOF read from one side becomes a ``shutdown(SHUT_WR)`` of the other
  side, after every byte already read has been written;
* once both sides have sent EOF, both connections are closed;
* a side that is lost outright (reset, error, or a full close we observe as
  such) closes the other side once its pending bytes are flushed.
"""

from __future__ import annotations

from typing import Callable, Optional

import attrs
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

# Read size and write-buffer high-water mark of each spliced transport.
# Twisted's default (64 KiB) costs a read, a send and a pause/resume pair of
# epoll calls per 64 KiB; 128 KiB halves that while keeping the worst case a
# connection can hold (two write buffers plus a read each way) near 0.5 MiB.
BUFFER_SIZE = 128 * 1024

DOWNSTREAM = 0
UPSTREAM = 1
_NAMES = ("client", "shard")


@attrs.define
class SpliceStats:
    """Bytes moved each way and how the splice ended."""

    bytes_up: int = 0  # client -> shard
    bytes_down: int = 0  # shard -> client
    ended_by: str = ""  # "client", "shard", "idle", "closed"
    clean: bool = True


class IdleTimeout:
    """
    The idle timeout both pumps share: ``_start_idle`` arms it, activity
    only moves ``_last_activity`` (cheaper than resetting a timer per
    chunk), and when it fires after ``_idle_timeout`` quiet seconds the pump
    is aborted with ``idle``.  The pump holds ``_clock``, ``_idle_timeout``,
    ``_idle_call``, ``_last_activity``, ``_done``, ``stats`` and ``abort``.
    """

    __slots__ = ()

    def _start_idle(self) -> None:
        if self._idle_timeout > 0:
            self._last_activity = self._clock.seconds()
            self._idle_call = self._clock.callLater(self._idle_timeout, self._check_idle)

    def _stop_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _check_idle(self) -> None:
        self._idle_call = None
        if self._done:
            return
        quiet = self._clock.seconds() - self._last_activity
        if quiet >= self._idle_timeout:
            self.stats.clean = False
            self.abort("idle")
        else:
            self._idle_call = self._clock.callLater(self._idle_timeout - quiet, self._check_idle)


class Splice(IdleTimeout):
    """
    Pump bytes between ``downstream`` (the client's transport) and
    ``upstream`` (the shard's transport).

    The owner routes each side's protocol events to ``data``,
    ``read_closed`` and ``lost``; ``on_done`` is called once with the
    ``SpliceStats`` when both sides are closed.
    """

    def __init__(
        self,
        downstream,
        upstream,
        *,
        clock: IReactorTime,
        on_done: Callable[[SpliceStats], None],
        idle_timeout: float = 0.0,
    ) -> None:
        self._transports = (downstream, upstream)
        self._clock = clock
        self._on_done = on_done
        self._idle_timeout = idle_timeout
        self._idle_call = None
        self._last_activity = 0.0
        self._read_closed = [False, False]
        self._lost = [False, False]
        self._done = False
        self.stats = SpliceStats()

    def start(self) -> None:
        """
        Couple the two transports: each becomes the other's producer.
        """
        down, up = self._transports
        for transport in self._transports:
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = BUFFER_SIZE
        down.registerProducer(up, True)
        up.registerProducer(down, True)
        self._start_idle()

    # -- events from the two protocols ------------------------------------

    def data(self, side: int, data: bytes) -> None:
        """Bytes read from ``side``: write them to the other side."""
        if side == DOWNSTREAM:
            self.stats.bytes_up += len(data)
        else:
            self.stats.bytes_down += len(data)
        if self._idle_call is not None:
            # Cheaper than resetting the timer for every chunk: the timer
            # looks at the last activity when it fires.
            self._last_activity = self._clock.seconds()
        self._transports[1 - side].write(data)

    def read_closed(self, side: int) -> None:
        """``side`` sent EOF: pass it on as a half-close of the other side."""
        if self._read_closed[side]:
            return
        self._read_closed[side] = True
        if all(self._read_closed):
            self.stats.ended_by = self.stats.ended_by or _NAMES[side]
            self._close_both()
            return
        other = self._transports[1 - side]
        if self._lost[1 - side]:
            return
        lose_write = getattr(other, "loseWriteConnection", None)
        if lose_write is None:
            # A transport without half-close (rare): close it once flushed.
            self.stats.ended_by = self.stats.ended_by or _NAMES[side]
            self._close_both()
        else:
            lose_write()

    def lost(self, side: int, reason: Optional[Failure] = None) -> None:
        """``side``'s connection is gone: close the other once flushed."""
        if self._lost[side]:
            return
        self._lost[side] = True
        self._read_closed[side] = True
        if not self.stats.ended_by:
            self.stats.ended_by = _NAMES[side]
            if reason is not None and not _is_clean(reason):
                self.stats.clean = False
        other = self._transports[1 - side]
        if not self._lost[1 - side]:
            _unregister(other)
            other.loseConnection()
        else:
            self._finish()

    def close(self, why: str = "closed") -> None:
        """Close both sides (flushing what is buffered), e.g. on shutdown."""
        if not self.stats.ended_by:
            self.stats.ended_by = why
        self._close_both()

    def abort(self, why: str) -> None:
        """Drop both sides at once, discarding buffered bytes."""
        if not self.stats.ended_by:
            self.stats.ended_by = why
        for side, transport in enumerate(self._transports):
            if not self._lost[side]:
                _unregister(transport)
                transport.abortConnection()

    def detach(self) -> None:
        """
        Forget both sides without closing either (the owner takes them
        back): undo the producer coupling, stop the idle timer, and never
        call ``on_done``.
        """
        self._done = True
        self._stop_idle()
        for transport in self._transports:
            _unregister(transport)

    # -- internals --------------------------------------------------------

    def _close_both(self) -> None:
        for side, transport in enumerate(self._transports):
            if not self._lost[side]:
                _unregister(transport)
                transport.loseConnection()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._stop_idle()
        self._on_done(self.stats)


def _unregister(transport) -> None:
    try:
        transport.unregisterProducer()
    except Exception:
        # Already gone: nothing to undo.
        pass


def _is_clean(reason: Failure) -> bool:
    from twisted.internet.error import ConnectionDone

    return reason.check(ConnectionDone) is not None


@implementer(IHalfCloseableProtocol)
class SpliceSideMixin:
    """
    Protocol plumbing shared by both sides once spliced: forwards events to
    ``self._splice`` as side ``self._side``.
    """

    _splice: Optional[Splice] = None
    _side: int = DOWNSTREAM

    def readConnectionLost(self) -> None:
        if self._splice is not None:
            self._splice.read_closed(self._side)

    def writeConnectionLost(self) -> None:
        # Our shutdown(SHUT_WR) completed; nothing to do until the peer
        # closes its side too.
        pass
