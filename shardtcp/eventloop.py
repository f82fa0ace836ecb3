# -*- test-case-name: tests.test_eventloop -*-
"""
A leaner event dispatch for Twisted's epoll reactor.

Twisted's ``EPollReactor`` hands every ready descriptor to
``_doReadOrWrite`` through ``log.callWithLogger``, which pushes a legacy
logging context (the ``system`` field of ``twisted.python.log.msg``
calls) around each event: half a dozen Python calls and two dictionaries
per event, on a path a short proxied connection takes about ten times.
shardtcp logs through ``twisted.logger`` with structured fields and never
reads that context, so its daemon dispatches events directly.  What an
event does is unchanged: ``_doReadOrWrite`` still decides between read,
write and disconnect, and still turns an exception in a handler into a
logged failure and a lost connection.  The one visible difference is in
the twistd log file: a legacy ``log.msg`` from inside an event handler
(Twisted's own ``Unhandled Error`` reports among them) shows ``[-]``
instead of the protocol's prefix.

It also takes descriptors edge-triggered (``addEdgeTriggered``): their
``edgeEvent`` is called with the epoll event mask each time the descriptor
becomes readable, writable or sees its peer's shutdown, in the same
``epoll_wait`` as every other descriptor.  The kernel splice drives its sockets this way:
one system call and one Python call per wake-up, instead of a second epoll
of its own polled from a reader of the reactor's.

``adopt(reactor)`` switches an installed ``EPollReactor`` (exactly that
class, not a subclass with its own ideas) to ``LeanEPollReactor``; any
other reactor is left alone.
"""

from __future__ import annotations

from select import EPOLLET, EPOLLIN, EPOLLOUT, EPOLLRDHUP

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IFileDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

_log = Logger()

# epoll_wait takes its timeout in milliseconds as a C int.
_LONGEST_SLEEP = 2147483.0

# How an edge-triggered descriptor is watched: every readiness change, once.
EDGE_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET


class IEdgeTriggered(IFileDescriptor):
    """A descriptor the reactor watches edge-triggered (``addEdgeTriggered``)."""

    def edgeEvent(events: int) -> None:
        """
        The descriptor became ready: ``events`` is the epoll mask (in,
        out, peer shutdown, hang-up, error).  Each readiness is told once;
        what is not used up now is not told again.
        """


class LeanEPollReactor(EPollReactor):
    """
    ``EPollReactor`` dispatching ready descriptors without a log context,
    and working out each sleep inline.
    """

    def __init__(self) -> None:
        self._edges: dict[int, IEdgeTriggered] = {}
        self._gone: set[int] = set()
        super().__init__()

    def mainLoop(self) -> None:
        # Twisted's loop (timed calls due, then sleep until the next one or
        # an event), with ``timeout()`` and the shared failure handler's
        # two calls per turn folded in, and ``runUntilCurrent`` called only
        # when it has something to do.  The order per turn and the handling
        # of an exception (logged, the loop goes on) are Twisted's.
        while self._started:
            try:
                pending = self._pendingTimedCalls
                now = self.seconds() if pending else 0.0
                if (
                    self.threadCallQueue
                    or self._newTimedCalls
                    or self._justStopped
                    or (pending and pending[0].time <= now)
                ):
                    self.runUntilCurrent()
                    if self._newTimedCalls:
                        self._insertNewDelayedCalls()
                    pending = self._pendingTimedCalls
                    now = self.seconds() if pending else 0.0
                if not self.running:
                    sleep = 0.0
                elif pending:
                    sleep = pending[0].time - now
                    sleep = 0.0 if sleep < 0.0 else _LONGEST_SLEEP if sleep > _LONGEST_SLEEP else sleep
                else:
                    sleep = None
                self.doPoll(sleep)
            except BaseException:
                _log.failure("Unexpected error in main loop")
        _log.info("Main loop terminated.")

    def doPoll(self, timeout):
        edges = self._edges
        try:
            ready = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables) + len(edges))
        except InterruptedError:
            return
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        # Descriptors removed while this batch is handled: their events
        # later in it are stale, whoever has the number now (a socket
        # closed by one event and its number reused by a socket opened in
        # another must not get the old socket's hang-up).  Nothing is lost
        # by skipping them: a level-triggered descriptor still ready is
        # reported again, and an edge-triggered one added meanwhile is
        # polled as it is added.
        gone = self._gone
        if gone:
            gone.clear()
        for fd, event in ready:
            if fd in gone:
                continue
            watched = edges.get(fd)
            if watched is not None:
                try:
                    watched.edgeEvent(event)
                except BaseException:
                    self._edgeFailed(fd)
                continue
            selectable = selectables.get(fd)
            # A descriptor removed by an earlier event of this batch.
            if selectable is not None:
                dispatch(selectable, fd, event)

    doIteration = doPoll

    def _remove(self, xer, primary, other, selectables, event, antievent):
        # Twisted's removal, noting a descriptor that left the epoll.
        fd = xer.fileno()
        if fd == -1:
            fd = next((number for number, known in selectables.items() if known is xer), -1)
        EPollReactor._remove(self, xer, primary, other, selectables, event, antievent)
        if fd != -1 and fd not in selectables:
            self._gone.add(fd)

    # -- edge-triggered descriptors ---------------------------------------

    def addEdgeTriggered(self, descriptor: IEdgeTriggered) -> None:
        """
        Watch ``descriptor`` edge-triggered (``EDGE_EVENTS``): its
        ``edgeEvent(events)`` is called at each change of readiness.  It
        is told ``connectionLost`` when the reactor drops every descriptor
        (shutting down, ``removeAll``) or when ``edgeEvent`` raises (the
        error is logged, the descriptor dropped).  Raises ``OSError`` when
        the kernel refuses to watch it.
        """
        fd = descriptor.fileno()
        self._poller.register(fd, EDGE_EVENTS)
        self._edges[fd] = descriptor

    def removeEdgeTriggered(self, descriptor: IEdgeTriggered) -> None:
        """
        Stop watching ``descriptor``, before it is closed (while
        ``fileno()`` still gives its number); nothing if not watched.
        """
        fd = descriptor.fileno()
        if self._edges.get(fd) is descriptor:
            self._dropEdge(fd)

    def _dropEdge(self, fd: int) -> None:
        del self._edges[fd]
        self._gone.add(fd)
        try:
            self._poller.unregister(fd)
        except (OSError, ValueError):
            # Already closed: the kernel dropped it from the epoll itself.
            pass

    def getEdgeTriggered(self) -> list:
        """The descriptors watched edge-triggered."""
        return list(self._edges.values())

    def _edgeFailed(self, fd: int) -> None:
        failure = Failure()
        _log.failure("Unhandled error in an edge-triggered descriptor", failure)
        descriptor = self._edges.get(fd)
        if descriptor is not None:
            self._dropEdge(fd)
            descriptor.connectionLost(failure)

    def removeAll(self):
        watched = list(self._edges.values())
        for fd in list(self._edges):
            self._dropEdge(fd)
        return super().removeAll() + watched


def adopt(reactor) -> bool:
    """
    Give ``reactor`` the lean dispatch if it is Twisted's own epoll
    reactor; say whether it now has it.
    """
    if type(reactor) is EPollReactor:
        reactor._edges = {}
        reactor._gone = set()
        reactor.__class__ = LeanEPollReactor
    return type(reactor) is LeanEPollReactor
