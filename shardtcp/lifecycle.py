# -*- test-case-name: tests.test_reload -*-
"""
Graceful stop and the signals of a running proxy (SPEC section 8).

``Drain`` lets the open connections finish for ``[proxy] drain_timeout``
once the listeners have stopped accepting, then closes the rest with the
reason ``"shutdown"`` (``ProxyConnection.close``), counts both outcomes and
logs one summary line.  ``ProxyService.stopService`` (``shardtcp.tap``)
runs it and returns its Deferred, so twistd's shutdown waits for it.

``SignalHandlers`` replaces, under twistd, what the reactor does on
``SIGTERM``/``SIGINT`` (a stop whose exit status re-raises the signal)
and adds ``SIGHUP`` (reload) and ``SIGUSR1`` (reopen the log file):

* ``SIGHUP``: ``ProxyService.reload``; a bad file is logged and the proxy
  runs on;
* ``SIGTERM``/``SIGINT``: a graceful stop (exit status 0 once drained); a
  second one closes what is left at once;
* ``SIGUSR1``: twistd's own handler *renames* its log file, which breaks
  under logrotate (which has renamed it already); this one reopens the
  file at its path instead.

Handlers only note the signal and hand the work to the reactor
(``callFromThread``): nothing runs inside the signal frame.
"""

from __future__ import annotations

import signal
from typing import Callable, Iterable, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.logfile import BaseLogFile

__all__ = ["SHUTDOWN", "Drain", "SignalHandlers", "twistd_log_file"]

log = Logger(namespace="shardtcp.lifecycle")

#: The close reason of connections still open at the drain's deadline.
SHUTDOWN = "shutdown"

# How often the drain looks at what is still open.
_POLL = 0.05
# How long connections closed at the deadline get to be gone.
_AFTER_CLOSE = 5.0


class Drain:
    """
    One graceful stop's wait: ``run(timeout)`` fires (with None) once every
    connection that ``open_connections()`` lists has ended, closing them
    with ``SHUTDOWN`` after ``timeout`` seconds.  ``metrics`` is a
    ``LifecycleMetrics``; ``clock`` an ``IReactorTime``.
    """

    def __init__(self, open_connections: Callable[[], Iterable], clock, metrics) -> None:
        self._open = open_connections
        self._clock = clock
        self._metrics = metrics
        self._done: Optional[Deferred] = None
        self._call = None
        self._deadline = 0.0
        self._closing_until: Optional[float] = None
        self.started_with = 0
        self.closed = 0

    def run(self, timeout: float) -> Deferred:
        """Start waiting; the Deferred fires once nothing is left open."""
        done = self._done = Deferred()
        open_now = list(self._open())
        for connection in open_now:
            # The access log may say that it ended during the drain.
            try:
                connection.draining = True
            except AttributeError:
                pass
        self.started_with = len(open_now)
        self._deadline = self._clock.seconds() + timeout
        log.info(
            "stopping: no longer accepting; {count} open connections may finish within {timeout:g}s",
            count=self.started_with,
            timeout=timeout,
        )
        self._check()
        return done

    def close_now(self) -> None:
        """Close whatever is still open at once (a second stop signal)."""
        if self._done is not None and self._closing_until is None:
            self._deadline = self._clock.seconds()
            self._check()

    def _check(self) -> None:
        self._call = None
        if self._done is None:
            return
        now = self._clock.seconds()
        remaining = list(self._open())
        if remaining and self._closing_until is None and now >= self._deadline:
            self.closed = len(remaining)
            self._closing_until = now + _AFTER_CLOSE
            for connection in remaining:
                _close(connection)
            remaining = list(self._open())
        if not remaining or (self._closing_until is not None and now >= self._closing_until):
            self._finish()
            return
        if self._call is None:
            self._call = self._clock.callLater(_POLL, self._check)

    def _finish(self) -> None:
        done, self._done = self._done, None
        finished = max(0, self.started_with - self.closed)
        self._metrics.shutdown.labels("finished").inc(finished)
        self._metrics.shutdown.labels("closed").inc(self.closed)
        log.info(
            "drained: {finished} connections finished, {closed} closed at the deadline ({reason})",
            finished=finished,
            closed=self.closed,
            reason=SHUTDOWN,
        )
        done.callback(None)


def _close(connection) -> None:
    close = getattr(connection, "close", None)
    if close is not None:
        close(SHUTDOWN)
        return
    # A protocol still reading the load balancer's PROXY header.
    transport = getattr(connection, "transport", None)
    if transport is not None:
        transport.abortConnection()


def twistd_log_file(handler) -> Optional[BaseLogFile]:
    """
    The log file twistd's ``SIGUSR1`` handler rotates, or None (logging to
    stdout or syslog).  twistd offers no other way to reach it: it is held
    by that handler only.
    """
    for cell in getattr(handler, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, BaseLogFile):
            return value
    return None


class SignalHandlers:
    """
    The signal handlers of a proxy run by twistd.  ``reload``, ``stop``
    and ``close_now`` are called in the reactor thread; ``install`` is
    called again once the reactor runs (it replaces the reactor's own
    ``SIGTERM``/``SIGINT`` handlers, installed as the reactor starts).
    """

    def __init__(self, reactor, *, reload: Callable[[], object], stop: Callable[[], None],
                 close_now: Callable[[], None], reopen: Optional[Callable[[], None]] = None,
                 signals=signal) -> None:
        self._reactor = reactor
        self._reopen = reopen
        self._reload = reload
        self._stop = stop
        self._close_now = close_now
        self._signal = signals
        self._stopping = False
        self.log_file: Optional[BaseLogFile] = None

    def install(self) -> None:
        s = self._signal
        if self.log_file is None:
            self.log_file = twistd_log_file(s.getsignal(s.SIGUSR1))
        s.signal(s.SIGHUP, self._on_hup)
        s.signal(s.SIGTERM, self._on_stop)
        s.signal(s.SIGINT, self._on_stop)
        s.signal(s.SIGUSR1, self._on_usr1)

    def _on_hup(self, number, frame) -> None:
        self._reactor.callFromThread(self.hangup)

    def _on_stop(self, number, frame) -> None:
        self._reactor.callFromThread(self.terminate, self._signal.Signals(number).name)

    def _on_usr1(self, number, frame) -> None:
        self._reactor.callFromThread(self.reopen_log)

    def hangup(self) -> None:
        """SIGHUP: reload (problems are logged by the reload itself)."""
        log.info("SIGHUP: reloading the configuration")
        d = self._reload()
        if isinstance(d, Deferred):
            d.addErrback(lambda _: None)

    def terminate(self, name: str) -> None:
        """SIGTERM/SIGINT: stop gracefully; a second one closes the rest now."""
        if self._stopping:
            log.info("{signal} again: closing the remaining connections now", signal=name)
            self._close_now()
            return
        self._stopping = True
        log.info("{signal}: stopping gracefully", signal=name)
        self._stop()

    def reopen_log(self) -> None:
        """SIGUSR1: reopen the log files at their paths (after logrotate moved them)."""
        if self._reopen is not None:
            # shardtcp's own files ([log] access_file)
            self._reopen()
        if self.log_file is None:
            log.info("SIGUSR1: not logging to a file, nothing to reopen")
            return
        self.log_file.reopen()
        log.info("SIGUSR1: log file {path} reopened", path=self.log_file.path)
