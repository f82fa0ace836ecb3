"""
The splice between two StringTransports: producers, byte counts, half-close
both ways, loss, idle timeout, and one report when both sides are done.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.proxy.splice import BUFFER_SIZE, DOWNSTREAM, UPSTREAM, Splice

from tests.support import HalfCloseTransport


class Sized(HalfCloseTransport):
    """A transport with a write-buffer size, as TCP transports have."""

    bufferSize = 65536


class Harness:
    """Two transports, a clock and the reports of a started splice."""

    def __init__(self, idle_timeout: float = 0.0, down=None, up=None) -> None:
        self.clock = Clock()
        self.down = down if down is not None else Sized()
        self.up = up if up is not None else Sized()
        self.done: list = []
        self.splice = Splice(
            self.down, self.up, clock=self.clock, on_done=self.done.append, idle_timeout=idle_timeout
        )
        self.splice.start()


class FlowControlTests(SynchronousTestCase):
    """Each side is the other's streaming producer."""

    def test_producers_registered(self) -> None:
        """``start`` makes each transport the other's streaming producer and sets the buffer size."""
        h = Harness()
        self.assertIs(h.down.producer, h.up)
        self.assertIs(h.up.producer, h.down)
        self.assertTrue(h.down.streaming)
        self.assertTrue(h.up.streaming)
        self.assertEqual((h.down.bufferSize, h.up.bufferSize), (BUFFER_SIZE, BUFFER_SIZE))

    def test_full_side_pauses_the_other(self) -> None:
        """When the shard's write buffer is full (it pauses its producer) the client stops being read."""
        h = Harness()
        h.up.producer.pauseProducing()
        self.assertEqual(h.down.producerState, "paused")
        h.up.producer.resumeProducing()
        self.assertEqual(h.down.producerState, "producing")

    def test_transport_without_buffer_size(self) -> None:
        """A transport without ``bufferSize`` is left without one."""
        h = Harness(down=HalfCloseTransport(), up=HalfCloseTransport())
        self.assertFalse(hasattr(h.down, "bufferSize"))


class BytesTests(SynchronousTestCase):
    """Bytes pass unchanged and are counted per direction."""

    def test_both_ways_counted(self) -> None:
        """Client bytes reach the shard, shard bytes the client; stats count each way."""
        h = Harness()
        h.splice.data(DOWNSTREAM, b"ping")
        h.splice.data(DOWNSTREAM, b"!")
        h.splice.data(UPSTREAM, b"pong-pong")
        self.assertEqual(h.up.value(), b"ping!")
        self.assertEqual(h.down.value(), b"pong-pong")
        self.assertEqual((h.splice.stats.bytes_up, h.splice.stats.bytes_down), (5, 9))


class HalfCloseTests(SynchronousTestCase):
    """An EOF from one side is a half-close of the other; both EOFs close both."""

    def test_client_eof_first(self) -> None:
        """
        The client's EOF shuts the shard's write side only; the reply still
        reaches the client; the shard's EOF then closes both and reports once.
        """
        h = Harness()
        h.splice.read_closed(DOWNSTREAM)
        self.assertTrue(h.up.write_closed)
        self.assertFalse(h.up.disconnecting or h.down.disconnecting)
        h.splice.data(UPSTREAM, b"reply")
        self.assertEqual(h.down.value(), b"reply")
        h.splice.read_closed(UPSTREAM)
        self.assertTrue(h.down.disconnecting and h.up.disconnecting)
        self.assertIsNone(h.down.producer)
        self.assertEqual(h.done, [])
        h.splice.lost(UPSTREAM, Failure(ConnectionDone()))
        h.splice.lost(DOWNSTREAM, Failure(ConnectionDone()))
        self.assertEqual(len(h.done), 1)
        self.assertEqual(h.done[0].ended_by, "shard")
        self.assertTrue(h.done[0].clean)

    def test_shard_eof_first(self) -> None:
        """The shard's EOF shuts the client's write side; the client may go on sending."""
        h = Harness()
        h.splice.read_closed(UPSTREAM)
        self.assertTrue(h.down.write_closed)
        self.assertFalse(h.up.write_closed)
        h.splice.data(DOWNSTREAM, b"more")
        self.assertEqual(h.up.value(), b"more")
        h.splice.read_closed(DOWNSTREAM)
        self.assertEqual(h.splice.stats.ended_by, "client")

    def test_eof_twice_once(self) -> None:
        """A repeated EOF from the same side is not passed on twice (and does not close both)."""
        h = Harness()
        h.splice.read_closed(DOWNSTREAM)
        h.splice.read_closed(DOWNSTREAM)
        self.assertFalse(h.down.disconnecting)

    def test_without_half_close(self) -> None:
        """A transport that cannot half-close is closed instead once flushed."""
        h = Harness(up=StringTransport())
        h.splice.read_closed(DOWNSTREAM)
        self.assertTrue(h.up.disconnecting)
        self.assertTrue(h.down.disconnecting)
        self.assertEqual(h.splice.stats.ended_by, "client")

    def test_eof_after_other_side_lost(self) -> None:
        """An EOF towards a side already lost does nothing more to it."""
        h = Harness()
        h.splice.lost(UPSTREAM, Failure(ConnectionDone()))
        h.splice.read_closed(DOWNSTREAM)
        self.assertFalse(h.up.write_closed)


class LossTests(SynchronousTestCase):
    """A side lost outright closes the other."""

    def test_shard_dies(self) -> None:
        """A shard reset closes the client (flushing), marks the end unclean, reports once both are gone."""
        h = Harness()
        h.splice.lost(UPSTREAM, Failure(ConnectionLost()))
        self.assertTrue(h.down.disconnecting)
        self.assertFalse(h.down.aborted)
        self.assertIsNone(h.down.producer)
        self.assertEqual(h.done, [])
        h.splice.lost(DOWNSTREAM, Failure(ConnectionDone()))
        h.splice.lost(DOWNSTREAM, Failure(ConnectionDone()))
        self.assertEqual(len(h.done), 1)
        self.assertEqual(h.done[0].ended_by, "shard")
        self.assertFalse(h.done[0].clean)

    def test_client_leaves_cleanly(self) -> None:
        """A client's clean close ends the splice as ended by the client, clean."""
        h = Harness()
        h.splice.lost(DOWNSTREAM, Failure(ConnectionDone()))
        self.assertTrue(h.up.disconnecting)
        h.splice.lost(UPSTREAM, None)
        self.assertEqual((h.done[0].ended_by, h.done[0].clean), ("client", True))


class EndingTests(SynchronousTestCase):
    """Closing and aborting from the owner, and the idle timeout."""

    def test_close(self) -> None:
        """``close`` closes both sides gently and names why."""
        h = Harness()
        h.splice.close("shutdown")
        self.assertTrue(h.down.disconnecting and h.up.disconnecting)
        self.assertFalse(h.down.aborted or h.up.aborted)
        self.assertEqual(h.splice.stats.ended_by, "shutdown")

    def test_abort(self) -> None:
        """``abort`` drops both sides at once."""
        h = Harness()
        h.splice.abort("why")
        self.assertTrue(h.down.aborted and h.up.aborted)
        self.assertEqual(h.splice.stats.ended_by, "why")

    def test_idle_timeout(self) -> None:
        """Silence for ``idle_timeout`` aborts both sides; activity pushes the deadline back."""
        h = Harness(idle_timeout=10.0)
        h.clock.advance(6)
        h.splice.data(DOWNSTREAM, b"x")
        h.clock.advance(6)
        self.assertFalse(h.down.aborted)
        h.clock.advance(4.5)
        self.assertTrue(h.down.aborted and h.up.aborted)
        self.assertEqual(h.splice.stats.ended_by, "idle")
        self.assertFalse(h.splice.stats.clean)

    def test_idle_timer_cancelled_when_done(self) -> None:
        """Once both sides are gone no idle timer is left on the clock."""
        h = Harness(idle_timeout=10.0)
        h.splice.lost(DOWNSTREAM, Failure(ConnectionDone()))
        h.splice.lost(UPSTREAM, Failure(ConnectionDone()))
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(len(h.done), 1)
