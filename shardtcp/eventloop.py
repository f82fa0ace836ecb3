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

It also takes descriptors edge-triggered (``addEdgeTriggered``): a
handler called with the epoll event mask each time the descriptor becomes
readable, writable or sees its peer's shutdown, in the same ``epoll_wait``
as every other descriptor.  The kernel splice drives its sockets this way:
one system call and one Python call per wake-up, instead of a second epoll
of its own polled from a reader of the reactor's.

``adopt(reactor)`` switches an installed ``EPollReactor`` (exactly that
class, not a subclass with its own ideas) to ``LeanEPollReactor``; any
other reactor is left alone.
"""

from __future__ import annotations

from select import EPOLLET, EPOLLIN, EPOLLOUT, EPOLLRDHUP
from typing import Callable

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()

# epoll_wait takes its timeout in milliseconds as a C int.
_LONGEST_SLEEP = 2147483.0

# How an edge-triggered descriptor is watched: every readiness change, once.
EDGE_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET


class LeanEPollReactor(EPollReactor):
    """
    ``EPollReactor`` dispatching ready descriptors without a log context,
    and working out each sleep inline.
    """

    def __init__(self) -> None:
        self._edges: dict[int, Callable[[int], object]] = {}
        self._edgeOwners: dict[int, IReadDescriptor] = {}
        self._edgeGone: set[int] = set()
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
        # Edge-triggered descriptors removed while this batch is handled:
        # their events later in it are stale, whoever has the number now
        # (a socket closed by one event and its number reused by a socket
        # opened in another must not get the old socket's hang-up).
        gone = self._edgeGone
        if gone:
            gone.clear()
        for fd, event in ready:
            if fd in gone:
                continue
            handler = edges.get(fd)
            if handler is not None:
                try:
                    handler(event)
                except BaseException:
                    self._edgeFailed(fd)
                continue
            selectable = selectables.get(fd)
            # A descriptor removed by an earlier event of this batch.
            if selectable is not None:
                dispatch(selectable, fd, event)

    doIteration = doPoll

    # -- edge-triggered descriptors ---------------------------------------

    def addEdgeTriggered(self, fd: int, handler: Callable[[int], object], owner: IReadDescriptor) -> None:
        """
        Watch ``fd`` edge-triggered (``EDGE_EVENTS``): ``handler(events)``
        is called with the epoll mask at each change of readiness, and
        never again for a readiness it was told of.  ``owner`` is told
        ``connectionLost`` when the reactor drops every descriptor
        (shutting down, ``removeAll``) or when ``handler`` raises (the
        error is logged, the descriptor dropped).  Raises ``OSError``
        when the kernel refuses to watch ``fd``.
        """
        self._poller.register(fd, EDGE_EVENTS)
        self._edges[fd] = handler
        self._edgeOwners[fd] = owner

    def removeEdgeTriggered(self, fd: int) -> None:
        """Stop watching ``fd`` (before closing it); nothing if not watched."""
        if self._edges.pop(fd, None) is None:
            return
        del self._edgeOwners[fd]
        self._edgeGone.add(fd)
        try:
            self._poller.unregister(fd)
        except (OSError, ValueError):
            # Already closed: the kernel dropped it from the epoll itself.
            pass

    def getEdgeTriggered(self) -> list:
        """The owners of the descriptors watched edge-triggered."""
        return list(self._edgeOwners.values())

    def _edgeFailed(self, fd: int) -> None:
        failure = Failure()
        _log.failure("Unhandled error in an edge-triggered handler", failure)
        owner = self._edgeOwners.get(fd)
        self.removeEdgeTriggered(fd)
        if owner is not None:
            owner.connectionLost(failure)

    def removeAll(self):
        owners = list(self._edgeOwners.values())
        for fd in list(self._edges):
            self.removeEdgeTriggered(fd)
        return super().removeAll() + owners


def adopt(reactor) -> bool:
    """
    Give ``reactor`` the lean dispatch if it is Twisted's own epoll
    reactor; say whether it now has it.
    """
    if type(reactor) is EPollReactor:
        reactor._edges = {}
        reactor._edgeOwners = {}
        reactor._edgeGone = set()
        reactor.__class__ = LeanEPollReactor
    return type(reactor) is LeanEPollReactor
