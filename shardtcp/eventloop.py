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

``adopt(reactor)`` switches an installed ``EPollReactor`` (exactly that
class, not a subclass with its own ideas) to ``LeanEPollReactor``; any
other reactor is left alone.
"""

from __future__ import annotations

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

_log = Logger()

# epoll_wait takes its timeout in milliseconds as a C int.
_LONGEST_SLEEP = 2147483.0


class LeanEPollReactor(EPollReactor):
    """
    ``EPollReactor`` dispatching ready descriptors without a log context,
    and working out each sleep inline.
    """

    def mainLoop(self) -> None:
        # Twisted's loop (timed calls due, then sleep until the next one or
        # an event), with ``timeout()`` and the shared failure handler's
        # two calls per turn folded in.  The order per turn and the
        # handling of an exception (logged, the loop goes on) are Twisted's.
        while self._started:
            try:
                self.runUntilCurrent()
                if self._newTimedCalls:
                    self._insertNewDelayedCalls()
                if not self.running:
                    sleep = 0.0
                elif self._pendingTimedCalls:
                    sleep = self._pendingTimedCalls[0].time - self.seconds()
                    sleep = 0.0 if sleep < 0.0 else _LONGEST_SLEEP if sleep > _LONGEST_SLEEP else sleep
                else:
                    sleep = None
                self.doPoll(sleep)
            except BaseException:
                _log.failure("Unexpected error in main loop")
        _log.info("Main loop terminated.")

    def doPoll(self, timeout):
        try:
            ready = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except InterruptedError:
            return
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in ready:
            selectable = selectables.get(fd)
            # A descriptor removed by an earlier event of this batch.
            if selectable is not None:
                dispatch(selectable, fd, event)

    doIteration = doPoll


def adopt(reactor) -> bool:
    """
    Give ``reactor`` the lean dispatch if it is Twisted's own epoll
    reactor; say whether it now has it.
    """
    if type(reactor) is EPollReactor:
        reactor.__class__ = LeanEPollReactor
    return type(reactor) is LeanEPollReactor
