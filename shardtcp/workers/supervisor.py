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
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import Interface, implementer

from shardtcp.model import Health
from shardtcp.tap import ListeningService, ProxyService, build_service, worker_count
from shardtcp.workers import channel
from shardtcp.workers.aggregate import LoadBoard, RemoteLoad, WorkerView, merge_exposition, workers_status

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
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


class IWorkerSpawner(Interface):
    """Starts worker processes."""

    def spawn(index, generation, fds, channel_protocol, ended):
        """
        Start worker ``index`` of ``generation`` with the listening sockets
        ``fds`` (listener name -> descriptor).  ``channel_protocol`` is the
        AMP protocol of the supervisor's end of its channel; ``ended(status)``
        is called once the process has exited.  Returns a handle with ``pid``
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
        self._backoff: dict[int, float] = {}
        self._pending: dict[int, object] = {}
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
                index, self.generation, self._fds(), proto, lambda status: self._ended(worker, status)
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

    def _ended(self, worker: Worker, status) -> None:
        expected = worker.state == "draining" or self.stopping or worker.generation != self.generation
        previous = worker.state
        worker.state = "exited"
        if worker in self.workers:
            self.workers.remove(worker)
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
        log.warn(
            "worker {index} (pid {pid}, {state}) exited unexpectedly after {lived:.1f} s: {status}; "
            "spawning it again in {delay} s",
            index=worker.index, pid=worker.pid, state=previous, lived=lived, status=status, delay=delay,
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
        """The ``workers`` list of ``/status``."""
        return workers_status(
            WorkerView(
                index=w.index, pid=w.pid or 0, generation=w.generation, state=w.state, started=w.started,
                restarts=self.restarts.get(w.index, 0), open_connections=w.open_connections(),
            )
            for w in self.workers
        )


def _signal(worker: Worker, name: str) -> None:
    # As a number: signalProcess translates only a few names.
    number = getattr(signal_module, f"SIG{name}")
    try:
        worker.process.signalProcess(number)
    except (error.ProcessExitedAlready, OSError):
        pass


def _sum_counts(loads) -> dict:
    totals: dict = {}
    for counts in loads:
        for shard_id, n in counts.items():
            totals[shard_id] = totals.get(shard_id, 0) + n
    return totals


class SupervisorChannel(amp.AMP):
    """The supervisor's end of one worker's channel."""

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


class _WorkerProcess(protocol.ProcessProtocol):
    """
    Tells the ``WorkerSet`` when a worker exits.  With ``log_file`` (twistd
    writes its log to a file), the worker's output comes through pipes and
    is written there whole lines at a time: the file is the supervisor's,
    and another writer would overwrite it at its own offset.
    """

    def __init__(self, ended: Callable, log_file=None) -> None:
        self._ended = ended
        self._log_file = log_file
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if self._log_file is None:
            return
        data = self._partial.get(fd, b"") + data
        whole, _, rest = data.rpartition(b"\n")
        self._partial[fd] = rest[-65536:]
        if whole:
            self._log_file.write(whole + b"\n")
            self._log_file.flush()

    def processEnded(self, reason) -> None:
        value = reason.value
        status = f"signal {value.signal}" if getattr(value, "signal", None) else f"exit status {value.exitCode}"
        self._ended(status)


@implementer(IWorkerSpawner)
class ProcessSpawner:
    """
    Spawns ``python -m shardtcp.workers.child`` with the listening sockets
    and its end of an ``AF_UNIX`` socket pair as inherited descriptors;
    stdout and stderr are the supervisor's own, unless ``log_file()`` gives
    twistd's log file (then ``_WorkerProcess`` writes their lines there).
    """

    def __init__(self, reactor, config_path: str, log_file: Callable[[], object] = lambda: None) -> None:
        self._reactor = reactor
        self._path = config_path
        self._log_file = log_file

    def spawn(self, index, generation, fds, channel_protocol, ended):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_file = self._log_file()
        child_fds = {0: "w", 1: 1, 2: 2, 3: theirs.fileno()}
        if log_file is not None:
            child_fds.update({1: "r", 2: "r"})
        argv = [
            sys.executable, "-m", "shardtcp.workers.child", "--config", self._path,
            "--index", str(index), "--generation", str(generation), "--channel", "3",
        ]
        for number, (name, fd) in enumerate(sorted(fds.items()), start=4):
            child_fds[number] = fd
            argv += ["--listener", f"{name}={number}"]
        try:
            process = self._reactor.spawnProcess(
                _WorkerProcess(ended, log_file), sys.executable, argv, env=dict(os.environ), childFDs=child_fds
            )
        finally:
            theirs.close()
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
        d = super().reload(path, trigger=trigger)

        def replace(summary):
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


class WorkersMetricsResource(Resource):
    """``GET /metrics``: the supervisor's metrics and every worker's, summed."""

    isLeaf = True

    def __init__(self, own, workers: WorkerSet, clock) -> None:
        super().__init__()
        self._own = own
        self._workers = workers
        self._clock = clock

    def render_GET(self, request):
        own = self._own.render_GET(request)
        asked = [
            w.channel.ask(channel.Metrics, ASK_TIMEOUT, self._clock)
            for w in self._workers.workers
            if w.channel is not None
        ]
        d = defer.DeferredList(asked, consumeErrors=True)

        def answer(results):
            texts = [own.decode("utf-8")] + [r["text"] for ok, r in results if ok]
            request.write(merge_exposition(texts).encode("utf-8"))
            request.finish()

        d.addCallback(answer)
        d.addErrback(lambda f: (log.failure("metrics of the workers", f), request.finish()))
        return NOT_DONE_YET


class WorkersStatusResource(Resource):
    """``GET /status``: the supervisor's document with the workers' listeners and the ``workers`` list."""

    isLeaf = True

    def __init__(self, own, workers: WorkerSet, clock) -> None:
        super().__init__()
        self._own = own
        self._workers = workers
        self._clock = clock

    def render_GET(self, request):
        document = json.loads(self._own.render_GET(request))
        asked = [
            w.channel.ask(channel.Status, ASK_TIMEOUT, self._clock)
            for w in self._workers.workers
            if w.channel is not None
        ]

        def answer(results):
            listeners: dict = {}
            for ok, r in results:
                if ok:
                    for name, counts in r["status"].get("listeners", {}).items():
                        total = listeners.setdefault(name, {"accepted": 0, "active": 0, "refused": {}})
                        total["accepted"] += counts.get("accepted", 0)
                        total["active"] += counts.get("active", 0)
                        for reason, n in counts.get("refused", {}).items():
                            total["refused"][reason] = total["refused"].get(reason, 0) + n
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
            request.write((json.dumps(document, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8"))
            request.finish()

        d = defer.DeferredList(asked, consumeErrors=True)
        d.addCallback(answer)
        d.addErrback(lambda f: (log.failure("status of the workers", f), request.finish()))
        return NOT_DONE_YET


def build_supervisor(config, reactor=None, *, spawner=None) -> SupervisorService:
    """The supervisor's tree for a validated ``config`` with ``workers`` > 1."""
    if reactor is None:
        from twisted.internet import reactor
    late: dict = {}
    # With etcd load sharing the supervisor publishes the sum of its workers
    # and hands the other proxies' load on to them.
    fleet_load = (lambda: late["workers"].totals(), lambda counts: late["workers"].set_fleet(counts))
    root = build_service(config, reactor, root_type=SupervisorService, fleet_load=fleet_load)
    if spawner is None:
        spawner = ProcessSpawner(reactor, os.path.abspath(config.path), lambda: _log_file(root))
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


def _log_file(root):
    """twistd's log file (None: twistd logs to stdout or syslog)."""
    signals = root.signals
    return signals.log_file if signals is not None else None
