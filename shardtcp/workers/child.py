# -*- test-case-name: tests.workers.test_child -*-
"""
A worker process: ``python -m shardtcp.workers.child --config F --index I
--generation G --channel FD --listener NAME=FD ...``, spawned by the
supervisor (``shardtcp.workers.supervisor``), never by hand.

It builds the proxy of one process (``shardtcp.tap.build_service``) on the
listening sockets it inherited, without health checks, admin site or fleet
load publishing (``control_plane=False``); the shard state those decide
comes over the channel (``WorkerChannel``).  It reports its open
connections by shard (``Load``, when they change, at most every
``LOAD_INTERVAL``) and counts the other workers' as remote load.

``Retire`` (a reload replaced this worker): stop accepting, exit once the
last connection has ended by itself.  However it stops (retired, drained,
its supervisor gone), it sends its metrics (``Final``) once its
connections have ended, so the supervisor keeps its counters.  Signals: SIGTERM/SIGINT drain as one
process does (stop accepting, let the connections finish within
``drain_timeout``; a second one closes them);
SIGUSR1 reopens the log files; SIGHUP is the supervisor's business.  A
worker whose channel is lost (its supervisor is gone) drains and exits.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from shardtcp.model import Health
from shardtcp.workers import channel

log = Logger(namespace="shardtcp.workers")

#: How long an exiting worker waits for the supervisor to take its ``Final`` metrics.
FINAL_TIMEOUT = 2.0


class WorkerChannel(channel.GuardedAMP):
    """The worker's end of its channel; applies what the supervisor sends."""

    side = "worker channel"

    def __init__(self, root, *, on_lost=None, remote_load=None, on_retire=None) -> None:
        super().__init__()
        self._root = root
        self._on_lost = on_lost
        self._on_retire = on_retire
        #: Called with the other workers' load (by default: the resolver's remote load).
        self._remote_load = remote_load or root.resolver.set_remote_load
        self.lost = False

    def _apply(self, what: str, call, *args) -> dict:
        from shardtcp.resolver.service import ResolverError

        try:
            call(*args)
        except (ResolverError, ValueError, TypeError) as e:
            log.info("worker: {what} not applied: {error}", what=what, error=str(e))
        return {}

    @channel.PeerLoad.responder
    def _peer_load(self, counts):
        self._remote_load(counts if isinstance(counts, dict) else {})
        return {}

    @channel.Health.responder
    def _health(self, shard_id: str, health: str):
        return self._apply("health", lambda: self._root.resolver.set_health(shard_id, Health(health)))

    @channel.Agent.responder
    def _agent(self, shard_id: str, report):
        from shardtcp.resolver.agent import AgentReport

        resolver = self._root.resolver
        if report is None:
            return self._apply("agent report", resolver.clear_agent_report, shard_id)
        return self._apply("agent report", lambda: resolver.apply_agent_report(shard_id, AgentReport(**report)))

    @channel.Admin.responder
    def _admin(self, shard_id: str, what: str, value):
        resolver = self._root.resolver
        if what == "state":
            return self._apply("admin state", resolver.set_admin_state, shard_id, value)
        if what == "weight":
            if value is None:
                return self._apply("weight", resolver.clear_weight, shard_id)
            return self._apply("weight", lambda: resolver.set_weight(shard_id, float(value)))
        if what == "security":
            return self._apply("security score", resolver.set_security_score, shard_id, value)
        log.info("worker: unknown admin change {what!r}", what=what)
        return {}

    @channel.Retire.responder
    def _retire(self):
        if self._on_retire is not None:
            self._on_retire()
        return {}

    @channel.Metrics.responder
    def _metrics(self):
        return {"text": self._root.metrics.render().decode("utf-8")}

    @channel.Status.responder
    def _status(self):
        root = self._root
        refusals = root.metrics.refusals()
        listeners = {
            name: {
                "accepted": int(root.metrics.value("shardtcp_connections_accepted_total", listener=name)),
                "active": int(root.metrics.value("shardtcp_connections_active", listener=name)),
                "refused": {reason: int(n) for reason, n in refusals.get(name, {}).items()},
            }
            for name in root.factories
        }
        return {"status": {"pid": os.getpid(), "open": len(root.open_connections()), "listeners": listeners}}

    def send(self, command, **arguments) -> None:
        if self.lost:
            return
        d = self.callRemote(command, **arguments)
        if d is not None:
            d.addErrback(lambda f: None)

    def final(self, clock, timeout: float = FINAL_TIMEOUT) -> defer.Deferred:
        """
        Send the supervisor this worker's metrics as they are now (``Final``)
        and fire once it has them, or after ``timeout`` seconds, or at once
        without a channel: the process exits next.
        """
        if self.lost:
            return defer.succeed(None)
        d = self.callRemote(channel.Final, text=self._root.metrics.render().decode("utf-8"))
        d.addTimeout(timeout, clock)
        d.addErrback(lambda f: log.info("worker: final metrics not delivered: {error}", error=f.getErrorMessage()))
        return d

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self.lost = True
        if self._on_lost is not None:
            self._on_lost()


class LoadReporter:
    """Sends ``Load`` when this worker's open connections by shard changed, at most every ``interval``."""

    def __init__(self, resolver, link: WorkerChannel, clock, interval: float = channel.LOAD_INTERVAL) -> None:
        self._resolver = resolver
        self._link = link
        self._last: dict = {}
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = clock
        self._interval = interval

    def start(self) -> None:
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def tick(self) -> None:
        counts = self._resolver.open_connections()
        if counts != self._last:
            self._last = counts
            self._link.send(channel.Load, counts=counts)


class Retirement:
    """
    ``Retire``: stop accepting on every listener now, and stop the process
    once no connection is open (looked at every ``interval`` seconds).
    """

    def __init__(self, root, clock, stop, interval: float = 0.2) -> None:
        self._root = root
        self._stop = stop
        self._loop = task.LoopingCall(self._check)
        self._loop.clock = clock
        self._interval = interval
        self.retiring = False

    def __call__(self) -> None:
        from shardtcp.tap import ListeningService

        if self.retiring or self._root.draining:
            return
        self.retiring = True
        for service in list(self._root):
            if isinstance(service, ListeningService):
                service.stop_listening()
        log.info("worker retiring: no longer accepting; {count} open connections may finish",
                 count=len(self._root.open_connections()))
        self._loop.start(self._interval, now=True)

    def _check(self) -> None:
        if not self._root.open_connections():
            self._loop.stop()
            self._stop()


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shardtcp-worker", description="A shardtcp worker (spawned by its supervisor).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--config-fd", type=int, default=None, help="the file's bytes as the supervisor loaded them")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--generation", type=int, required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[], help="NAME=FD")
    return parser.parse_args(argv)


def worker_line(index: int):
    """
    twistd's log line format with ``worker <index>`` after the time, so
    that the supervisor's log tells the workers apart.
    """
    from twisted.logger import formatEventAsClassicLogText

    tag = f" worker {index}"

    def format_event(event) -> str:
        line = formatEventAsClassicLogText(event)
        if not line:
            return line
        time, sep, rest = line.partition(" ")
        return f"{time}{tag}{sep}{rest}"

    return format_event


def _start_logging(index: int) -> None:
    # stdout is the supervisor's, or a pipe to it when twistd logs to a file.
    from twisted.logger import FileLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo([FileLogObserver(sys.stdout, worker_line(index))], redirectStandardIO=False)


def main(argv=None, reactor=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if reactor is None:
        from twisted.internet import reactor
    _start_logging(args.index)
    from shardtcp.config import ConfigError
    from shardtcp.lifecycle import SignalHandlers
    from shardtcp.eventloop import adopt
    from shardtcp.tap import ListenFailed, build_service

    adopt(reactor)
    fds = {}
    for item in args.listener:
        name, _, fd = item.rpartition("=")
        fds[name] = int(fd)
    try:
        config = load_snapshot(args.config, args.config_fd)
        root = build_service(config, reactor, listen_fds=fds, control_plane=False)
    except ConfigError as e:
        for line in e.problems:
            _fatal(f"worker {args.index}: {line}")
        return 1
    except Exception as e:  # one line, then the supervisor's back-off
        _fatal(f"worker {args.index}: cannot start: {e}")
        return 1

    def supervisor_gone() -> None:
        if not root.draining:
            log.warn("worker {index}: channel to the supervisor lost; draining", index=args.index)
            _stop(reactor)

    link = WorkerChannel(root, on_lost=supervisor_gone, on_retire=Retirement(root, reactor, lambda: _stop(reactor)))
    reactor.adoptStreamConnection(args.channel, socket.AF_UNIX, protocol.Factory.forProtocol(lambda: link))
    os.close(args.channel)
    try:
        root.settle_heap = True
        root.startService()
    except ListenFailed as e:
        _fatal(f"worker {args.index}: {e}")
        return 1
    # Drain (or finish retiring), then hand the supervisor the final figures.
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.maybeDeferred(root.stopService).addBoth(
            lambda result: link.final(reactor).addBoth(lambda _: result)
        )
    )
    signals = SignalHandlers(
        reactor,
        reload=lambda: log.info("worker {index}: SIGHUP is handled by the supervisor", index=args.index),
        stop=lambda: _stop(reactor),
        close_now=root._close_now,
        reopen=root.reopen_logs,
    )
    signals.install()
    reactor.callWhenRunning(signals.install)
    reporter = LoadReporter(root.resolver, link, reactor)

    def running() -> None:
        link.send(channel.Hello, index=args.index, generation=args.generation, pid=os.getpid())
        link.send(channel.Ready)
        reporter.start()

    reactor.callWhenRunning(running)
    reactor.run()
    return 0


def load_snapshot(path: str, fd=None):
    """
    The configuration at ``path``; with ``fd``, from the bytes read there
    (the supervisor's copy of the file as it last loaded it), relative
    paths still resolved against ``path``'s folder.  ``ConfigError`` lists
    the problems.
    """
    import tomllib

    import attrs

    from shardtcp.config import ConfigError, load_config, parse_config

    if fd is None:
        return load_config(path)
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    absolute = os.path.abspath(path)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([f"{absolute} (as loaded by the supervisor): {e}"]) from None
    return attrs.evolve(parse_config(data, os.path.dirname(absolute)), path=absolute)


def _fatal(line: str) -> None:
    """
    A reason this worker cannot start, on standard error: the supervisor
    keeps a worker's last line there and logs it with the exit status.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _stop(reactor) -> None:
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


if __name__ == "__main__":
    sys.exit(main())
