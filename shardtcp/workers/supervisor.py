# -*- test-case-name: tests.workers.test_supervisor -*-
"""
The supervisor of ``[proxy] workers = N`` (N > 1): the control plane.

``build_supervisor`` builds the same service tree as one process
(``shardtcp.tap.build_service``: resolver, health checks, admin site, the
fleet's load sharing), rooted at a ``SupervisorService``.  Its listeners
bind their sockets (a port that cannot be bound fails start-up as with one
process) but never accept: ``WorkerSet`` hands the sockets to N worker
processes (``shardtcp.workers.child``), which accept from the one shared
queue each socket has.

``WorkerSet`` (pure logic over an ``IWorkerSpawner`` and a clock) keeps N
workers running: a worker that exits unexpectedly is spawned again with the
same index, at once when it ran ``STEADY`` seconds or more, else after a
back-off that starts at ``BACKOFF_FIRST`` and doubles to ``BACKOFF_MAX``.
A reload spawns a new generation; each new worker that says ``Ready``
replaces the old worker of its index, which is sent ``Retire``: it stops
accepting and exits once its connections have ended by themselves (a
reload never cuts an established connection).

The supervisor's resolver is the one the health checks and the admin API
change: every change is sent to the workers (``ShardStateRelay``), and a
worker that starts gets the whole state first.  The workers' load is summed
(``Load`` in, ``PeerLoad`` out): each worker counts the others' open
connections as remote load, so ``capacity`` means the same with N workers.

``/metrics`` sums the supervisor's metrics, every worker's and those of the
workers that exited (``DepartedCounters``: a worker's ``Final`` figures, or
for one that died, the last the supervisor saw; it asks a worker whose
figures are ``SCRAPE_INTERVAL`` old), so a summed counter never goes down.
"""

from __future__ import annotations

import json
import os
import signal as signal_module
import socket
import sys
from typing import Callable, Optional

import attrs
from prometheus_client import Counter
from twisted.application.service import MultiService
from twisted.internet import defer, error, protocol, task
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import Interface, implementer

from shardtcp.model import Health
from shardtcp.tap import ListeningService, ProxyService, build_service, worker_count
from shardtcp.workers import channel
from shardtcp.workers.aggregate import (
    DepartedCounters,
    LoadBoard,
    RemoteLoad,
    WorkerView,
    merge_exposition,
    monotonic,
    workers_status,
)

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "SCRAPE_INTERVAL",
    "STEADY",
    "IWorkerSpawner",
    "ProcessSpawner",
    "ShardStateRelay",
    "SupervisorService",
    "Worker",
    "WorkerSet",
    "build_supervisor",
]

log = Logger(namespace="shardtcp.workers")

#: The first wait before spawning again a worker that died young (seconds).
BACKOFF_FIRST = 0.5
#: The longest such wait.
BACKOFF_MAX = 30.0
#: A worker that ran this long (seconds) is spawned again at once when it exits.
STEADY = 10.0
#: Time given to the workers beyond ``drain_timeout`` before they are killed.
STOP_GRACE = 5.0
#: How long a worker may take to answer ``Metrics`` or ``Status``.
ASK_TIMEOUT = 2.0
#: A worker whose metrics the supervisor has not seen for this long (seconds)
#: is asked for them: what a worker that dies had counted since is lost.
SCRAPE_INTERVAL = 5.0
#: The longest part of a worker's last line on standard error that is kept.
ERROR_LINE_CHARS = 500


class IWorkerSpawner(Interface):
    """Starts worker processes."""

    def spawn(index, generation, fds, channel_protocol, ended):
        """
        Start worker ``index`` of ``generation`` with the listening sockets
        ``fds`` (listener name -> descriptor).  ``channel_protocol`` is the
        AMP protocol of the supervisor's end of its channel;
        ``ended(status, error=None)`` is called once the process has exited
        (``error``: its last line on standard error, if any).  Returns a handle with ``pid``
        and ``signalProcess(name)`` (an ``IProcessTransport``).
        """


@attrs.define(eq=False)
class Worker:
    """One worker process as the supervisor sees it."""

    index: int
    generation: int
    started: float
    #: Unique among every worker this supervisor started (its ``LoadBoard`` key).
    serial: int = 0
    #: starting (spawned), ready (accepting), draining (sent SIGTERM), exited.
    state: str = "starting"
    pid: Optional[int] = None
    process: object = None
    channel: Optional["SupervisorChannel"] = None
    load: dict = attrs.Factory(dict)
    #: Its latest metrics text and when it came (``clock.seconds()``).
    last_text: Optional[str] = None
    last_at: Optional[float] = None
    #: The metrics it sent as it exited (``Final``).
    final_text: Optional[str] = None

    def open_connections(self) -> int:
        return sum(self.load.values())


class WorkerSet:
    """
    N workers kept running (see the module docstring).  ``fds()`` gives the
    listening sockets of the running configuration; ``welcome(worker)`` is
    called when a worker's channel is up (to send it the shard state).
    ``remote`` (a ``RemoteLoad`` over the supervisor's resolver) gets the
    workers' summed load as source ``workers``, and the other proxies' (the
    fleet's, ``set_fleet``) as ``fleet``; each worker is sent both but its own.
    """

    def __init__(
        self, count: int, spawner, clock, *, fds: Callable[[], dict], registry=None,
        welcome: Callable[[Worker], None] = lambda worker: None,
        remote: Optional[RemoteLoad] = None,
    ) -> None:
        self.count = count
        self._spawner = spawner
        self._clock = clock
        self._fds = fds
        self._welcome = welcome
        self._remote = remote
        self.board = LoadBoard()
        #: The other proxies' open connections by shard (etcd load sharing).
        self.fleet: dict = {}
        self._serial = 0
        self.generation = 0
        #: Every worker alive (or being spawned again), all generations.
        self.workers: list[Worker] = []
        self.restarts: dict[int, int] = {}
        #: Index -> how its last worker ended unexpectedly (status, last line on stderr).
        self.last_exit: dict[int, str] = {}
        self._backoff: dict[int, float] = {}
        self._pending: dict[int, object] = {}
        #: What the workers that exited had counted.
        self.departed = DepartedCounters()
        self._scraping = task.LoopingCall(self.scrape)
        self._scraping.clock = clock
        self.stopping = False
        self._all_gone: list[defer.Deferred] = []
        self.restart_counter = Counter(
            "shardtcp_worker_restarts_total", "Workers spawned again after exiting unexpectedly, by index",
            ["index"], registry=registry,
        ) if registry is not None else None

    # -- generations ------------------------------------------------------

    def start(self) -> None:
        """Spawn the first generation."""
        self.generation = 1
        for index in range(self.count):
            self._spawn(index)
        self._scraping.start(SCRAPE_INTERVAL, now=False)

    def replace(self, count: Optional[int] = None) -> None:
        """
        Spawn a new generation of ``count`` workers (by default as many as
        now) on the running configuration's sockets; each old worker is
        retired once the new worker of its index is ready, and at once when
        the new generation has no worker of its index.
        """
        if count is not None:
            self.count = count
        self.generation += 1
        for index in list(self._pending):
            self._pending.pop(index).cancel()
        for old in list(self.workers):
            if old.index >= self.count and old.state != "draining":
                self._retire(old)
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> Worker:
        self._serial += 1
        worker = Worker(index=index, generation=self.generation, started=self._clock.seconds(), serial=self._serial)
        self.workers.append(worker)
        proto = SupervisorChannel(self, worker)
        try:
            worker.process = self._spawner.spawn(
                index, self.generation, self._fds(), proto,
                lambda status, error=None: self._ended(worker, status, error),
            )
        except Exception as e:  # out of descriptors or processes: try again after the back-off
            log.error("worker {index}: cannot spawn: {error}", index=index, error=str(e))
            self._ended(worker, f"not spawned ({e})")
            return worker
        worker.pid = getattr(worker.process, "pid", None)
        log.info(
            "worker {index} (generation {generation}) spawned: pid {pid}",
            index=index, generation=self.generation, pid=worker.pid,
        )
        return worker

    # -- from the channel -------------------------------------------------

    def hello(self, worker: Worker, channel_: "SupervisorChannel", pid: int) -> None:
        worker.channel = channel_
        if worker.pid is None:
            worker.pid = pid
        self._welcome(worker)
        self._send_peer_load()

    def ready(self, worker: Worker) -> None:
        if worker.state != "starting":
            return
        worker.state = "ready"
        log.info("worker {index} (generation {generation}, pid {pid}) ready",
                 index=worker.index, generation=worker.generation, pid=worker.pid)
        if worker.generation != self.generation:
            return
        for old in self.workers:
            if old.index == worker.index and old.generation < worker.generation and old.state != "draining":
                self._retire(old)

    def load(self, worker: Worker, counts: dict) -> None:
        try:
            changed = self.board.update(worker.serial, counts)
        except ValueError as e:
            log.warn("worker {index} (pid {pid}): load ignored: {error}", index=worker.index, pid=worker.pid,
                     error=str(e))
            return
        worker.load = self.board.counts(worker.serial)
        if changed:
            self._send_peer_load()

    def set_fleet(self, counts: dict) -> None:
        """The other proxies' load changed (``LoadSharing``'s ``apply``)."""
        self.fleet = dict(counts)
        if self._remote is not None:
            self._remote.set("fleet", self.fleet)
        self._send_peer_load()

    def channel_lost(self, worker: Worker) -> None:
        worker.channel = None

    def final(self, worker: Worker, text: str) -> None:
        """The worker is exiting: ``text`` is what it counted in all."""
        worker.final_text = text

    # -- metrics ------------------------------------------------------------

    def record(self, worker: Worker, text: str) -> None:
        """A worker's metrics as it answered ``Metrics``."""
        worker.last_text = text
        worker.last_at = self._clock.seconds()

    def _ask_metrics(self, worker: Worker) -> defer.Deferred:
        """Ask ``worker`` for its metrics; fires with whether it answered (recorded)."""
        d = worker.channel.ask(channel.Metrics, ASK_TIMEOUT, self._clock)

        def answered(result) -> bool:
            if worker.final_text is None:
                self.record(worker, result["text"])
            return True

        return d.addCallbacks(answered, lambda f: False)

    def scrape(self) -> None:
        """Ask every worker whose metrics are ``SCRAPE_INTERVAL`` old or more (bounds a crash's loss)."""
        now = self._clock.seconds()
        for worker in self.workers:
            if worker.channel is None or worker.final_text is not None:
                continue
            if worker.last_at is None or now - worker.last_at >= SCRAPE_INTERVAL:
                self._ask_metrics(worker)

    def metrics(self, own: str) -> defer.Deferred:
        """
        ``own`` (the supervisor's exposition) merged with every worker's and
        the departed workers': each worker with a channel is asked; one that
        does not answer in ``ASK_TIMEOUT`` counts with the counters it last
        reported, one that is exiting with its ``Final`` figures.  A text
        that does not parse is left out and logged.
        """
        asked = [
            (worker, self._ask_metrics(worker))
            for worker in self.workers
            if worker.channel is not None and worker.final_text is None
        ]
        d = defer.gatherResults([answer for _, answer in asked])

        def merge(results) -> str:
            answered = {worker.serial for (worker, _), ok in zip(asked, results) if ok}
            texts = [own, self.departed.text]
            for worker in self.workers:
                if worker.final_text is not None:
                    texts.append(worker.final_text)
                elif worker.serial in answered:
                    texts.append(worker.last_text)
                elif worker.last_text is not None:
                    # Its gauges may be stale; its counters only went up since.
                    texts.append(_monotonic_part(worker.last_text))
            return merge_exposition(texts, on_error=_bad_metrics)

        return d.addCallback(merge)

    # -- load ---------------------------------------------------------------

    def totals(self) -> dict:
        """Open connections by shard id, summed over every worker (what this proxy publishes)."""
        return self.board.total()

    def _send_peer_load(self) -> None:
        for worker in self.workers:
            if worker.channel is not None:
                others = _sum_counts((self.board.others(worker.serial), self.fleet))
                worker.channel.send(channel.PeerLoad, counts=others)
        if self._remote is not None:
            self._remote.set("workers", self.board.total())

    def broadcast(self, command, **arguments) -> None:
        """Send a command to every worker whose channel is up."""
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.send(command, **arguments)

    # -- exits and signals ------------------------------------------------

    def _ended(self, worker: Worker, status, error: Optional[str] = None) -> None:
        expected = worker.state == "draining" or self.stopping or worker.generation != self.generation
        previous = worker.state
        worker.state = "exited"
        if worker in self.workers:
            self.workers.remove(worker)
        counted = worker.final_text if worker.final_text is not None else worker.last_text
        if counted is not None:
            try:
                self.departed.add(counted)
            except ValueError as e:
                log.warn("worker {index} (pid {pid}): its metrics are lost: {error}",
                         index=worker.index, pid=worker.pid, error=str(e))
        worker.load = {}
        if self.board.forget(worker.serial):
            self._send_peer_load()
        if expected:
            log.info("worker {index} (generation {generation}, pid {pid}) exited: {status}",
                     index=worker.index, generation=worker.generation, pid=worker.pid, status=status)
            self._check_gone()
            return
        lived = self._clock.seconds() - worker.started
        if lived >= STEADY:
            self._backoff.pop(worker.index, None)
            delay = 0.0
        else:
            delay = self._backoff.get(worker.index, BACKOFF_FIRST)
            self._backoff[worker.index] = min(BACKOFF_MAX, delay * 2)
        self.restarts[worker.index] = self.restarts.get(worker.index, 0) + 1
        if self.restart_counter is not None:
            self.restart_counter.labels(str(worker.index)).inc()
        said = f"; last line on stderr: {error}" if error else ""
        self.last_exit[worker.index] = f"{status}{said}"
        log.warn(
            "worker {index} (pid {pid}, {state}) exited unexpectedly after {lived:.1f} s: {status}{said}; "
            "spawning it again in {delay} s",
            index=worker.index, pid=worker.pid, state=previous, lived=lived, status=status, said=said,
            delay=delay,
        )
        self._pending[worker.index] = self._clock.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        self._pending.pop(index, None)
        if not self.stopping:
            self._spawn(index)

    def _retire(self, worker: Worker) -> None:
        """
        A replaced worker stops accepting and exits once its connections
        have ended (``Retire``); one without a channel gets SIGTERM.
        """
        if worker.channel is None:
            self._terminate(worker)
            return
        worker.state = "draining"
        log.info("worker {index} (generation {generation}, pid {pid}): retiring",
                 index=worker.index, generation=worker.generation, pid=worker.pid)
        worker.channel.send(channel.Retire)

    def _terminate(self, worker: Worker) -> None:
        worker.state = "draining"
        log.info("worker {index} (generation {generation}, pid {pid}): SIGTERM",
                 index=worker.index, generation=worker.generation, pid=worker.pid)
        _signal(worker, "TERM")

    def signal_all(self, name: str) -> None:
        """Send a signal to every worker alive."""
        for worker in list(self.workers):
            _signal(worker, name)

    def stop(self, timeout: float) -> defer.Deferred:
        """
        SIGTERM to every worker (they drain); fires once all have exited,
        killing those still alive after ``timeout`` seconds.
        """
        self.stopping = True
        if self._scraping.running:
            self._scraping.stop()
        for index in list(self._pending):
            self._pending.pop(index).cancel()
        for worker in list(self.workers):
            self._terminate(worker)
        d = defer.Deferred()
        self._all_gone.append(d)
        kill = self._clock.callLater(timeout, self._kill_all)
        d.addBoth(lambda r: (kill.cancel() if kill.active() else None, r)[1])
        self._check_gone()
        return d

    def _kill_all(self) -> None:
        for worker in list(self.workers):
            log.warn("worker {index} (pid {pid}) did not stop in time: SIGKILL", index=worker.index, pid=worker.pid)
            _signal(worker, "KILL")

    def _check_gone(self) -> None:
        if self.stopping and not self.workers:
            waiting, self._all_gone = self._all_gone, []
            for d in waiting:
                d.callback(None)

    def status(self) -> list:
        """
        The ``workers`` list of ``/status``: every worker alive, and each
        index waiting out its back-off (state ``waiting``, pid 0, ``started``
        when it is due to be spawned again).
        """
        views = [
            WorkerView(
                index=w.index, pid=w.pid or 0, generation=w.generation, state=w.state, started=w.started,
                restarts=self.restarts.get(w.index, 0), open_connections=w.open_connections(),
                last_exit=self.last_exit.get(w.index),
            )
            for w in self.workers
        ]
        for index, call in self._pending.items():
            views.append(WorkerView(
                index=index, pid=0, generation=self.generation, state="waiting", started=call.getTime(),
                restarts=self.restarts.get(index, 0), open_connections=0, last_exit=self.last_exit.get(index),
            ))
        return workers_status(views)


def _signal(worker: Worker, name: str) -> None:
    # As a number: signalProcess translates only a few names.
    number = getattr(signal_module, f"SIG{name}")
    try:
        worker.process.signalProcess(number)
    except (error.ProcessExitedAlready, OSError):
        pass


def _monotonic_part(text: str) -> str:
    """``text``'s families that only go up (a text that does not parse as it is: the merge leaves it out)."""
    try:
        return merge_exposition([text], keep=monotonic)
    except ValueError:
        return text


def _bad_metrics(index: int, problem: str) -> None:
    log.warn("metrics of a worker left out: {problem}", problem=problem)


def _sum_counts(loads) -> dict:
    totals: dict = {}
    for counts in loads:
        for shard_id, n in counts.items():
            totals[shard_id] = totals.get(shard_id, 0) + n
    return totals


class SupervisorChannel(channel.GuardedAMP):
    """The supervisor's end of one worker's channel."""

    side = "supervisor channel"

    def __init__(self, workers: WorkerSet, worker: Worker) -> None:
        super().__init__()
        self._workers = workers
        self._worker = worker

    @channel.Hello.responder
    def _hello(self, index: int, generation: int, pid: int):
        self._workers.hello(self._worker, self, pid)
        return {}

    @channel.Ready.responder
    def _ready(self):
        self._workers.ready(self._worker)
        return {}

    @channel.Load.responder
    def _load(self, counts):
        self._workers.load(self._worker, counts if isinstance(counts, dict) else {})
        return {}

    @channel.Final.responder
    def _final(self, text: str):
        self._workers.final(self._worker, text)
        return {}

    def send(self, command, **arguments) -> None:
        """Send without waiting for an answer (the channel may be gone)."""
        try:
            d = self.callRemote(command, **arguments)
        except Exception as e:  # the connection is gone
            log.debug("worker channel: {command} not sent: {error}", command=command.__name__, error=e)
            return
        if d is not None:
            d.addErrback(lambda f: None)

    def ask(self, command, timeout: float, clock) -> defer.Deferred:
        d = self.callRemote(command)
        d.addTimeout(timeout, clock)
        return d

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self._workers.channel_lost(self._worker)


def _stderr_writer(data: bytes) -> None:
    # The supervisor's own standard error, below twistd's redirection of sys.stderr.
    try:
        os.write(2, data)
    except OSError:
        pass


class _WorkerProcess(protocol.ProcessProtocol):
    """
    Tells the ``WorkerSet`` when a worker exits, with its last line on
    standard error (a worker that cannot start says why there).  Its
    standard error always comes through a pipe, whole lines at a time, to
    the supervisor's (``stderr``); with ``log_file`` (twistd writes its log
    to a file) its standard output does too, and both are written to that
    file: the file is the supervisor's, and another writer would overwrite
    it at its own offset.
    """

    def __init__(self, ended: Callable, log_file=None, stderr: Callable[[bytes], None] = _stderr_writer) -> None:
        self._ended = ended
        self._log_file = log_file
        self._stderr = stderr
        self._partial = {1: b"", 2: b""}
        #: The last non-empty line the worker wrote on standard error.
        self.last_error: Optional[str] = None

    def childDataReceived(self, fd: int, data: bytes) -> None:
        data = self._partial.get(fd, b"") + data
        whole, _, rest = data.rpartition(b"\n")
        self._partial[fd] = rest[-65536:]
        if whole:
            self._write(fd, whole + b"\n")

    def _write(self, fd: int, lines: bytes) -> None:
        if fd == 2:
            for line in reversed(lines.splitlines()):
                if line.strip():
                    self.last_error = line.strip()[:ERROR_LINE_CHARS].decode("utf-8", "replace")
                    break
        if self._log_file is not None:
            self._log_file.write(lines)
            self._log_file.flush()
        elif fd == 2:
            self._stderr(lines)

    def processEnded(self, reason) -> None:
        for fd in (1, 2):
            if self._partial.get(fd):
                rest, self._partial[fd] = self._partial[fd], b""
                self._write(fd, rest + b"\n")
        value = reason.value
        status = f"signal {value.signal}" if getattr(value, "signal", None) else f"exit status {value.exitCode}"
        self._ended(status, error=self.last_error)


@implementer(IWorkerSpawner)
class ProcessSpawner:
    """
    Spawns ``python -m shardtcp.workers.child`` with the listening sockets
    and its end of an ``AF_UNIX`` socket pair as inherited descriptors;
    stdout is the supervisor's own and stderr comes through a pipe (its last
    line is logged when the worker exits), unless ``log_file()`` gives
    twistd's log file (then ``_WorkerProcess`` writes both there).

    ``snapshot()`` gives the configuration file's bytes as the supervisor
    last loaded them: the worker reads them from an inherited descriptor
    (``--config-fd``), so a worker started later runs the running
    configuration, not a file edited since and not yet reloaded.
    """

    def __init__(self, reactor, config_path: str, log_file: Callable[[], object] = lambda: None,
                 snapshot: Callable[[], Optional[bytes]] = lambda: None) -> None:
        self._reactor = reactor
        self._path = config_path
        self._log_file = log_file
        self._snapshot = snapshot

    def spawn(self, index, generation, fds, channel_protocol, ended):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_file = self._log_file()
        child_fds = {0: "w", 1: 1, 2: "r", 3: theirs.fileno()}
        if log_file is not None:
            child_fds[1] = "r"
        argv = [
            sys.executable, "-m", "shardtcp.workers.child", "--config", self._path,
            "--index", str(index), "--generation", str(generation), "--channel", "3",
        ]
        for number, (name, fd) in enumerate(sorted(fds.items()), start=4):
            child_fds[number] = fd
            argv += ["--listener", f"{name}={number}"]
        snapshot = self._snapshot()
        held = None
        if snapshot is not None:
            held = os.memfd_create("shardtcp-config")
            os.write(held, snapshot)
            os.lseek(held, 0, os.SEEK_SET)
            number = 4 + len(fds)
            child_fds[number] = held
            argv += ["--config-fd", str(number)]
        try:
            process = self._reactor.spawnProcess(
                _WorkerProcess(ended, log_file), sys.executable, argv, env=dict(os.environ), childFDs=child_fds
            )
        finally:
            theirs.close()
            if held is not None:
                os.close(held)
        factory = protocol.Factory.forProtocol(lambda: channel_protocol)
        self._reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        ours.close()
        return process


class HeldListeningService(ListeningService):
    """Binds and listens like ``ListeningService`` but never accepts: the workers do."""

    def listen(self) -> None:
        super().listen()
        self.port.stopReading()

    def fileno(self) -> int:
        return self.port.fileno()


class ShardStateRelay:
    """
    Sends every change of the supervisor's shard state (health, agent
    reports, operator overrides) to the workers, and the whole state to a
    worker that starts.  It wraps the resolver's setters on that instance:
    the health checker, the admin API and the fleet overrides call them
    without knowing about workers.
    """

    def __init__(self, resolver, send: Callable) -> None:
        self._resolver = resolver
        self._send = send
        #: (kind, shard id) -> (command, arguments), the last of each.
        self.state: dict = {}
        for name in ("set_health", "apply_agent_report", "clear_agent_report", "set_admin_state",
                     "set_weight", "clear_weight", "set_security_score"):
            original = getattr(resolver, name)
            setattr(resolver, name, self._relayed(name, original))

    def _relayed(self, name: str, original: Callable) -> Callable:
        def relayed(shard_id, *args):
            result = original(shard_id, *args)
            key, command, arguments = self._message(name, shard_id, *args)
            # Agent checks report the same thing at every interval: send changes only.
            if self.state.get((key, shard_id)) != (command, arguments):
                self.state[(key, shard_id)] = (command, arguments)
                self._send(command, **arguments)
            return result

        relayed.__name__ = name
        return relayed

    @staticmethod
    def _message(name: str, shard_id: str, *args):
        if name == "set_health":
            return "health", channel.Health, {"shard_id": shard_id, "health": Health(args[0]).value}
        if name == "apply_agent_report":
            report = attrs.asdict(args[0])
            return "agent", channel.Agent, {"shard_id": shard_id, "report": report}
        if name == "clear_agent_report":
            return "agent", channel.Agent, {"shard_id": shard_id, "report": None}
        if name == "set_admin_state":
            return "state", channel.Admin, {"shard_id": shard_id, "what": "state", "value": args[0]}
        if name == "set_weight":
            return "weight", channel.Admin, {"shard_id": shard_id, "what": "weight", "value": args[0]}
        if name == "clear_weight":
            return "weight", channel.Admin, {"shard_id": shard_id, "what": "weight", "value": None}
        return "security", channel.Admin, {"shard_id": shard_id, "what": "security", "value": args[0]}

    def replay(self, worker: Worker) -> None:
        """Send a new worker the state as it is now."""
        for command, arguments in list(self.state.values()):
            worker.channel.send(command, **arguments)


class SupervisorService(ProxyService):
    """
    The root of a supervisor's tree: a ``ProxyService`` whose listeners only
    hold their sockets, with a ``WorkerSet`` running the workers.  A reload
    reloads the control plane in place (``ProxyService.reload``) and spawns
    a new generation; a stop sends SIGTERM to the workers and waits for
    them; SIGUSR1 is passed on.
    """

    workers: WorkerSet
    relay: ShardStateRelay
    #: The configuration file's bytes as last loaded (what workers start from).
    snapshot: Optional[bytes] = None

    def listening_service(self, listener, factory) -> ListeningService:
        return HeldListeningService(
            listener.listen, factory, self._reactor, label=f"listener {listener.name!r}", backlog=listener.backlog
        )

    def held_fds(self) -> dict:
        """Listener name -> the held listening socket, for the running configuration."""
        fds = {}
        for listener in self.config.listeners:
            service = self.getServiceNamed(f"listener:{listener.name}")
            if service.port is not None:
                fds[listener.name] = service.port.fileno()
        return fds

    def startService(self) -> None:
        super().startService()
        if self.running:
            self.workers.start()

    def reload(self, path: Optional[str] = None, *, trigger: Optional[str] = None):
        # Read just before the reload reads it: the new workers start from these bytes.
        snapshot = _read_snapshot(path or self.config.path)
        d = super().reload(path, trigger=trigger)

        def replace(summary):
            self.snapshot = snapshot
            self.workers.replace(worker_count(self.config))
            return summary

        return d.addCallback(replace)

    def stopService(self):
        if self._stopping is not None:
            return self._stopping
        if not self.running:
            return defer.succeed(None)
        self._stopping = stopping = defer.Deferred()
        for service in list(self):
            if isinstance(service, ListeningService) and service.name != "admin":
                service.stop_listening()
        d = self.workers.stop(self.config.proxy.drain_timeout + STOP_GRACE)
        d.addCallback(lambda _: MultiService.stopService(self))
        d.addBoth(self._stopped)
        d.addBoth(lambda result: (stopping.callback(None), result)[1])
        return stopping

    def _close_now(self) -> None:
        # A worker's second SIGTERM closes what it still holds.
        self.workers.signal_all("TERM")

    def reopen_logs(self) -> None:
        super().reopen_logs()
        self.workers.signal_all("USR1")


class _WorkersResource(Resource):
    """An admin page answered from the supervisor's own page (``own``) and its workers'."""

    isLeaf = True

    def __init__(self, own, workers: WorkerSet, clock) -> None:
        super().__init__()
        self._own = own
        self._workers = workers
        self._clock = clock


class WorkersMetricsResource(_WorkersResource):
    """``GET /metrics``: the supervisor's metrics and every worker's, summed."""

    def render_GET(self, request):
        own = self._own.render_GET(request)
        done = _Answer(request)
        d = self._workers.metrics(own.decode("utf-8"))
        d.addCallback(lambda text: done.write(text.encode("utf-8")))
        d.addErrback(done.failed, "metrics of the workers")
        return NOT_DONE_YET


class _Answer:
    """Finishes a deferred admin answer once, unless its client has gone."""

    def __init__(self, request) -> None:
        self._request = request
        self._gone = False
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, _) -> None:
        self._gone = True

    def write(self, body: bytes) -> None:
        if not self._gone:
            self._request.write(body)
            self._request.finish()

    def failed(self, failure, what: str) -> None:
        log.failure(what, failure)
        if not self._gone:
            self._request.setResponseCode(500)
            self._request.write(b"internal error: see the log\n")
            self._request.finish()


class WorkersStatusResource(_WorkersResource):
    """``GET /status``: the supervisor's document with the workers' listeners and the ``workers`` list."""

    def render_GET(self, request):
        document = json.loads(self._own.render_GET(request))
        done = _Answer(request)
        asked = [
            w.channel.ask(channel.Status, ASK_TIMEOUT, self._clock)
            for w in self._workers.workers
            if w.channel is not None
        ]

        def answer(results):
            listeners: dict = {}
            for ok, r in results:
                if ok:
                    try:
                        _add_listeners(listeners, r["status"]["listeners"])
                    except (KeyError, TypeError, AttributeError, ValueError) as e:
                        log.warn("status of a worker left out: {error!r}", error=e)
            for total in listeners.values():
                total["refused"] = dict(sorted(total["refused"].items()))
            for listener in document.get("listeners", []):
                listener.update(listeners.get(listener["name"], {}))
            # The supervisor's own count is nought: a shard's connections are the workers'.
            totals = self._workers.totals()
            for service in document.get("services", {}).values():
                for shard_id, shard in service.get("shards", {}).items():
                    shard["open_connections"] = totals.get(shard_id, 0)
            document["workers"] = self._workers.status()
            done.write((json.dumps(document, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8"))

        d = defer.DeferredList(asked, consumeErrors=True)
        d.addCallback(answer)
        d.addErrback(done.failed, "status of the workers")
        return NOT_DONE_YET


def _add_listeners(listeners: dict, reported: dict) -> None:
    """Add one worker's listener counts to ``listeners`` (checked whole first)."""
    checked = {}
    for name, counts in reported.items():
        refused = {str(reason): int(n) for reason, n in counts.get("refused", {}).items()}
        checked[str(name)] = (int(counts.get("accepted", 0)), int(counts.get("active", 0)), refused)
    for name, (accepted, active, refused) in checked.items():
        total = listeners.setdefault(name, {"accepted": 0, "active": 0, "refused": {}})
        total["accepted"] += accepted
        total["active"] += active
        for reason, n in refused.items():
            total["refused"][reason] = total["refused"].get(reason, 0) + n


def build_supervisor(config, reactor=None, *, spawner=None) -> SupervisorService:
    """The supervisor's tree for a validated ``config`` with ``workers`` > 1."""
    if reactor is None:
        from twisted.internet import reactor
    late: dict = {}
    # With etcd load sharing the supervisor publishes the sum of its workers
    # and hands the other proxies' load on to them.
    fleet_load = (lambda: late["workers"].totals(), lambda counts: late["workers"].set_fleet(counts))
    root = build_service(config, reactor, root_type=SupervisorService, fleet_load=fleet_load)
    root.snapshot = _read_snapshot(config.path)
    if spawner is None:
        spawner = ProcessSpawner(reactor, os.path.abspath(config.path), lambda: _log_file(root),
                                 snapshot=lambda: root.snapshot)
    workers = late["workers"] = WorkerSet(
        worker_count(config), spawner, reactor, fds=root.held_fds, registry=root.metrics.registry,
        welcome=lambda worker: root.relay.replay(worker),
        remote=RemoteLoad(root.resolver.set_remote_load),
    )
    root.workers = workers
    root.relay = ShardStateRelay(root.resolver, workers.broadcast)
    try:
        admin = root.getServiceNamed("admin")
    except KeyError:
        admin = None
    if admin is not None:
        site_root = admin.factory.resource
        site_root.putChild(b"metrics", WorkersMetricsResource(site_root.children[b"metrics"], workers, reactor))
        site_root.putChild(b"status", WorkersStatusResource(site_root.children[b"status"], workers, reactor))
    return root


def _read_snapshot(path: str) -> Optional[bytes]:
    """The file's bytes, or None when it cannot be read (the worker then reads the file itself)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _log_file(root):
    """twistd's log file (None: twistd logs to stdout or syslog)."""
    signals = root.signals
    return signals.log_file if signals is not None else None
