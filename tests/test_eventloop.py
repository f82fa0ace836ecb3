"""
The lean epoll dispatch (``shardtcp.eventloop``): which reactors it takes
over, and that events still reach readers and writers with Twisted's
semantics (a handler's exception loses that connection only, a peer's
close reaches a reader as a clean end).
"""

from __future__ import annotations

import select
import socket

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from shardtcp.eventloop import IEdgeTriggered, LeanEPollReactor, adopt


def _reactor(case: SynchronousTestCase) -> EPollReactor:
    """A fresh, not running epoll reactor whose descriptors the test closes."""
    reactor = EPollReactor()

    def close() -> None:
        # The test closes its own sockets; the poller and waker are the reactor's.
        reactor._poller.close()
        waker = getattr(reactor, "waker", None)
        if waker is not None and hasattr(waker, "i"):
            waker.connectionLost(None)

    case.addCleanup(close)
    return reactor


class _Side:
    """A reader/writer over one end of a socket pair, recording its events."""

    def __init__(self, sock: socket.socket, *, fail_on_read: bool = False) -> None:
        self.sock = sock
        self.fail_on_read = fail_on_read
        self.read: list[bytes] = []
        self.writes = 0
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "side"

    def doRead(self):
        if self.fail_on_read:
            raise RuntimeError("handler bug")
        data = self.sock.recv(4096)
        if not data:
            return ConnectionDone()
        self.read.append(data)
        return None

    def doWrite(self):
        self.writes += 1
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class AdoptTests(SynchronousTestCase):
    def test_epoll_reactor_adopted(self) -> None:
        """Twisted's own epoll reactor gets the lean dispatch."""
        reactor = _reactor(self)
        self.assertTrue(adopt(reactor))
        self.assertIs(type(reactor), LeanEPollReactor)
        self.assertTrue(adopt(reactor), "adopting twice keeps it")

    def test_other_reactors_untouched(self) -> None:
        """A reactor of another kind (here the in-memory one) is left as it is."""
        for reactor in (MemoryReactorClock(), Clock()):
            kind = type(reactor)
            self.assertFalse(adopt(reactor))
            self.assertIs(type(reactor), kind)

    def test_subclass_untouched(self) -> None:
        """A subclass of the epoll reactor may dispatch its own way: not taken over."""

        class Own(EPollReactor):
            pass

        reactor = Own()
        self.addCleanup(reactor._poller.close)
        if getattr(reactor, "waker", None) is not None and hasattr(reactor.waker, "i"):
            self.addCleanup(reactor.waker.connectionLost, None)
        self.assertFalse(adopt(reactor))
        self.assertIs(type(reactor), Own)


def _closer(case, sock: socket.socket, victim: socket.socket, remove, reused: list) -> _Side:
    """
    A reader of ``sock`` whose read event takes ``victim`` out of the
    reactor (``remove()``), closes it and opens a socket pair whose first
    end gets the freed number and is read by the reactor from then on;
    that end and its peer are appended to ``reused``.
    """
    reactor = case.reactor

    class Closer(_Side):
        def doRead(self):
            number = victim.fileno()
            remove()
            victim.close()
            x, y = socket.socketpair()
            case.addCleanup(x.close)
            case.addCleanup(y.close)
            case.assertEqual(x.fileno(), number)
            x.setblocking(False)
            reused.append((_Side(x), y))
            reactor.addReader(reused[0][0])
            return super().doRead()

    return Closer(sock)


class DispatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = _reactor(self)
        adopt(self.reactor)

    def _pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        return a, b

    def test_read_and_write_events(self) -> None:
        """Bytes waiting reach ``doRead``; a writable descriptor gets ``doWrite``."""
        a, b = self._pair()
        side = _Side(a)
        self.reactor.addReader(side)
        self.reactor.addWriter(side)
        b.send(b"hello")
        self.reactor.doIteration(0)
        self.assertEqual(side.read, [b"hello"])
        self.assertEqual(side.writes, 1)
        self.assertEqual(side.lost, [])

    def test_handler_exception_loses_that_descriptor_only(self) -> None:
        """
        An exception in one handler becomes that descriptor's
        ``connectionLost`` with the error; another descriptor ready in the
        same wake-up is still served.
        """
        a, b = self._pair()
        c, d = self._pair()
        broken, fine = _Side(a, fail_on_read=True), _Side(c)
        self.reactor.addReader(broken)
        self.reactor.addReader(fine)
        b.send(b"x")
        d.send(b"y")
        self.reactor.doIteration(0)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(broken.lost), 1)
        self.assertTrue(broken.lost[0].check(RuntimeError))
        self.assertNotIn(broken, self.reactor.getReaders())
        self.assertEqual(fine.read, [b"y"])
        self.assertEqual(fine.lost, [])

    def test_stale_event_never_reaches_a_reused_number(self) -> None:
        """
        A reader closed by an earlier event of the same wake-up, its
        number taken at once by a new socket the reactor reads: the old
        reader's event is not given to the new one (which would read
        nothing: a spurious read); the new one's own bytes arrive at the
        next wake-up.
        """
        a, b = self._pair()
        r1, r2 = self._pair()
        reactor = self.reactor
        old = _Side(a)
        reused: list = []
        reactor.addReader(_closer(self, r1, a, lambda: reactor.removeReader(old), reused))
        reactor.addReader(old)
        # One wake-up: the closer's event first, then the old reader's.
        r2.send(b"go")
        b.send(b"old")
        reactor.doIteration(0)
        [(new, peer)] = reused
        self.assertEqual((new.read, new.lost, old.read, old.lost), ([], [], [], []))
        peer.send(b"new")
        reactor.doIteration(0)
        self.assertEqual((new.read, new.lost), ([b"new"], []))

    def test_removed_and_added_again_is_served_next_wake_up(self) -> None:
        """
        A reader removed and added back within one wake-up (flow control)
        misses nothing: its bytes are read at the next one.
        """
        a, b = self._pair()
        r1, r2 = self._pair()
        reactor = self.reactor
        reader = _Side(a)

        class Toggle(_Side):
            def doRead(self):
                reactor.removeReader(reader)
                reactor.addReader(reader)
                return super().doRead()

        reactor.addReader(Toggle(r1))
        reactor.addReader(reader)
        r2.send(b"go")
        b.send(b"kept")
        reactor.doIteration(0)
        reactor.doIteration(0)
        self.assertEqual((reader.read, reader.lost), ([b"kept"], []))

    def test_peer_close_is_a_clean_end(self) -> None:
        """The peer's close reaches the reader as ``ConnectionDone``, and it is removed."""
        a, b = self._pair()
        side = _Side(a)
        self.reactor.addReader(side)
        b.close()
        self.reactor.doIteration(0)
        self.assertEqual(len(side.lost), 1)
        self.assertTrue(side.lost[0].check(ConnectionDone))
        self.assertNotIn(side, self.reactor.getReaders())

    def test_removed_in_same_wakeup_not_called(self) -> None:
        """A descriptor removed by an earlier event of the same wake-up gets no event."""
        a, b = self._pair()
        c, d = self._pair()
        second = _Side(c)
        reactor = self.reactor

        class Remover(_Side):
            def doRead(self):
                reactor.removeReader(second)
                return super().doRead()

        first = Remover(a)
        reactor.addReader(first)
        reactor.addReader(second)
        b.send(b"1")
        d.send(b"2")
        reactor.doIteration(0)
        # epoll reports descriptors in the order they became ready.
        self.assertEqual(first.read, [b"1"])
        self.assertEqual(second.read, [])
        self.assertNotIn(second, reactor.getReaders())


@implementer(IEdgeTriggered)
class _Edge:
    """An edge-triggered descriptor over one end of a socket pair, recording what it is told."""

    def __init__(self, sock: socket.socket, *, broken: bool = False) -> None:
        self.sock = sock
        self.broken = broken
        self.events: list[int] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "edge"

    def edgeEvent(self, events: int) -> None:
        if self.broken:
            raise RuntimeError("handler bug")
        self.events.append(events)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class EdgeTriggeredTests(SynchronousTestCase):
    """Descriptors watched edge-triggered in the reactor's own epoll."""

    def setUp(self) -> None:
        self.reactor = _reactor(self)
        adopt(self.reactor)

    _pair = DispatchTests._pair

    def test_provides_the_interface(self) -> None:
        """The test's descriptor is what ``addEdgeTriggered`` asks for."""
        a, _ = self._pair()
        self.assertTrue(verifyObject(IEdgeTriggered, _Edge(a)))

    def test_each_readiness_once(self) -> None:
        """
        Bytes arriving are one event (readable and writable at once);
        with nothing new, no further event however many turns pass; more
        bytes are a new event, and the peer's shutdown one more, with
        ``EPOLLRDHUP``.
        """
        a, b = self._pair()
        edge = _Edge(a)
        self.reactor.addEdgeTriggered(edge)
        self.assertEqual(self.reactor.getEdgeTriggered(), [edge])
        self.assertEqual([r for r in self.reactor.getReaders() if r is not self.reactor.waker], [])
        b.send(b"one")
        self.reactor.doIteration(0)
        self.assertEqual(len(edge.events), 1)
        self.assertTrue(edge.events[0] & select.EPOLLIN and edge.events[0] & select.EPOLLOUT)
        self.reactor.doIteration(0)
        self.reactor.doIteration(0)
        self.assertEqual(len(edge.events), 1)
        b.send(b"two")
        self.reactor.doIteration(0)
        self.assertEqual(len(edge.events), 2)
        b.shutdown(socket.SHUT_WR)
        self.reactor.doIteration(0)
        self.assertEqual(len(edge.events), 3)
        self.assertTrue(edge.events[2] & select.EPOLLRDHUP)
        self.assertEqual(a.recv(100), b"onetwo")
        self.assertEqual(edge.lost, [])

    def test_removed_descriptor_gets_nothing(self) -> None:
        """
        After ``removeEdgeTriggered`` no event reaches the descriptor;
        removing it twice, or removing one never added, is harmless.
        """
        a, b = self._pair()
        c, d = self._pair()
        first, second = _Edge(a), _Edge(c)
        self.reactor.addEdgeTriggered(first)
        self.reactor.removeEdgeTriggered(first)
        self.reactor.removeEdgeTriggered(first)
        self.reactor.removeEdgeTriggered(second)
        b.send(b"x")
        d.send(b"y")
        self.reactor.doIteration(0)
        self.assertEqual((first.events, second.events, self.reactor.getEdgeTriggered()), ([], [], []))

    def test_stale_event_never_reaches_a_reused_number(self) -> None:
        """
        An edge-triggered socket closed by an earlier event of the same
        wake-up, its number taken at once by a new socket the reactor
        reads: the old socket's event (here its peer's close) is given
        neither to the new socket nor to the old descriptor; the new
        socket's own bytes arrive at the next wake-up.
        """
        a, b = self._pair()
        r1, r2 = self._pair()
        reactor = self.reactor
        old = _Edge(a)
        reused: list = []
        reactor.addEdgeTriggered(old)
        reactor.doIteration(0)
        self.assertEqual(old.events, [select.EPOLLOUT])  # writable from the start
        del old.events[:]
        reactor.addReader(_closer(self, r1, a, lambda: reactor.removeEdgeTriggered(old), reused))
        # One wake-up: the reader's event first, then the edge socket's hang-up.
        r2.send(b"go")
        b.send(b"old")
        b.close()
        reactor.doIteration(0)
        [(new, peer)] = reused
        self.assertEqual((new.read, new.lost, old.events, old.lost), ([], [], [], []))
        peer.send(b"new")
        reactor.doIteration(0)
        self.assertEqual((new.read, new.lost), ([b"new"], []))

    def test_handler_error_drops_that_descriptor_only(self) -> None:
        """
        An ``edgeEvent`` that raises: the error is logged, the descriptor
        is no longer watched and is told ``connectionLost`` with the
        error; a reader ready in the same wake-up is still served.
        """
        a, b = self._pair()
        c, d = self._pair()
        broken = _Edge(a, broken=True)
        fine = _Side(c)
        self.reactor.addEdgeTriggered(broken)
        self.reactor.addReader(fine)
        b.send(b"x")
        d.send(b"y")
        self.reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(broken.lost), 1)
        self.assertTrue(broken.lost[0].check(RuntimeError))
        self.assertEqual(self.reactor.getEdgeTriggered(), [])
        self.assertEqual(fine.read, [b"y"])

    def test_remove_all_returns_them(self) -> None:
        """
        ``removeAll`` (what the reactor does as it shuts down) stops
        watching every edge-triggered descriptor and returns them with the
        readers, so each is told ``connectionLost``.
        """
        a, b = self._pair()
        c, d = self._pair()
        first, second = _Edge(a), _Edge(b)
        reader = _Side(c)
        self.reactor.addEdgeTriggered(first)
        self.reactor.addEdgeTriggered(second)
        self.reactor.addReader(reader)
        removed = self.reactor.removeAll()
        self.assertEqual(sorted(map(id, removed)), sorted(map(id, [first, second, reader])))
        self.assertEqual(self.reactor.getEdgeTriggered(), [])
        d.send(b"x")
        a.send(b"y")
        self.reactor.doIteration(0)
        self.assertEqual((first.events, second.events, reader.read), ([], [], []))

    def test_refused_watch_raises(self) -> None:
        """A descriptor the kernel will not watch (here: no longer open) raises ``OSError`` and is not recorded."""
        a, b = self._pair()

        class Closed(_Edge):
            def fileno(self) -> int:
                return 1_000_000

        self.assertRaises(OSError, self.reactor.addEdgeTriggered, Closed(a))
        self.assertEqual(self.reactor.getEdgeTriggered(), [])


class DaemonTests(SynchronousTestCase):
    def test_make_service_adopts_the_reactor(self) -> None:
        """
        ``twistd shardtcp`` switches Twisted's epoll reactor to the lean
        dispatch before it builds anything (here the build then stops on
        an empty admin token file).
        """
        import io
        from contextlib import redirect_stderr

        from shardtcp.tap import makeService
        from tests.admin.test_setup import empty_token_options

        _, options = empty_token_options(self)
        reactor = _reactor(self)
        with redirect_stderr(io.StringIO()), self.assertRaises(SystemExit):
            makeService(options, reactor)
        self.assertIs(type(reactor), LeanEPollReactor)


class MainLoopTests(SynchronousTestCase):
    """One turn of the lean main loop: timed calls, then the sleep it asks epoll for."""

    def setUp(self) -> None:
        self.reactor = _reactor(self)
        adopt(self.reactor)
        self.now = 100.0
        self.reactor.seconds = lambda: self.now
        self.sleeps: list = []
        self.reactor._started = True
        self.reactor.running = True

    def _turns(self, count: int, fail_first: bool = False) -> list:
        reactor = self.reactor

        def poll(sleep) -> None:
            self.sleeps.append(sleep)
            if len(self.sleeps) >= count:
                reactor._started = False
            if fail_first and len(self.sleeps) == 1:
                raise RuntimeError("poll broke")

        reactor.doPoll = poll
        reactor.mainLoop()
        return self.sleeps

    def test_no_timed_call_sleeps_until_an_event(self) -> None:
        """Nothing scheduled: epoll waits without a timeout."""
        self.assertEqual(self._turns(1), [None])

    def test_sleeps_until_the_next_timed_call(self) -> None:
        """A call due in 5 s: a 5 s sleep; one just scheduled counts too."""
        self.reactor.callLater(5, lambda: None)
        self.assertEqual(self._turns(1), [5.0])

    def test_due_call_runs_before_a_zero_sleep(self) -> None:
        """
        A call already due runs first; one it schedules that is already
        past when the loop looks (the clock moved on meanwhile) gives a
        zero sleep, never a negative one.
        """
        ran: list = []

        def due() -> None:
            ran.append("due")
            self.reactor.callLater(1, lambda: None)
            self.now += 5

        self.reactor.callLater(1, due)
        self.now = 102.5
        self.assertEqual(self._turns(1), [0.0])
        self.assertEqual(ran, ["due"])

    def test_longest_sleep(self) -> None:
        """Past epoll's limit (2**31 ms), the sleep is that limit: 2147483 s, and exactly it stays."""
        self.reactor.callLater(10**9, lambda: None)
        self.assertEqual(self._turns(1), [2147483.0])
        self.sleeps.clear()
        self.reactor._started = True
        reactor = _reactor(self)
        adopt(reactor)
        reactor.seconds = lambda: 0.0
        reactor.callLater(2147483.0, lambda: None)
        reactor._started = reactor.running = True
        self.reactor = reactor
        self.assertEqual(self._turns(1), [2147483.0])

    def test_stopping_reactor_does_not_sleep(self) -> None:
        """Once stopping (``running`` false), a turn polls without waiting."""
        self.reactor.running = False
        self.reactor.callLater(5, lambda: None)
        self.assertEqual(self._turns(1), [0.0])

    def test_timed_calls_looked_at_only_when_something_is_due(self) -> None:
        """
        A turn runs ``runUntilCurrent`` only when it has work: a call due
        (at exactly its time, not a moment before), one just scheduled, a
        call from another thread, or the reactor just stopped.
        """
        reactor = self.reactor
        runs: list = []
        real = reactor.runUntilCurrent

        def counted() -> None:
            runs.append(self.now)
            real()

        reactor.runUntilCurrent = counted
        reactor.callLater(5, lambda: None)
        self._turns(1)
        self.assertEqual(runs, [100.0], "a call just scheduled")
        for now, expected in ((104.999, 1), (105.0, 2)):
            self.now = now
            reactor._started = True
            self._turns(len(self.sleeps) + 1)
            self.assertEqual(len(runs), expected, now)
        reactor._started = True
        reactor.threadCallQueue.append((lambda: None, (), {}))
        self._turns(len(self.sleeps) + 1)
        self.assertEqual(len(runs), 3)
        self.assertEqual(reactor.threadCallQueue, [])
        reactor._started = True
        self._turns(len(self.sleeps) + 1)
        self.assertEqual(len(runs), 3, "nothing to do")
        reactor._started = True
        reactor._justStopped = True
        self._turns(len(self.sleeps) + 1)
        self.assertEqual(len(runs), 4)

    def test_error_in_a_turn_is_logged_and_the_loop_goes_on(self) -> None:
        """An exception escaping a turn is logged; the next turn runs."""
        self.assertEqual(self._turns(2, fail_first=True), [None, None])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
