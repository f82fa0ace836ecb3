"""
``twistd shardtcp``: options and the service tree.

``makeService`` validates the configuration first and refuses to start, with
one line per problem and no traceback, when it is not valid.  The tree is:

* the ``ShardResolver`` (a service: it owns the live shard state);
* the ``ThreatIntel`` feed poller and the ``HealthChecker``, when configured;
* one ``ListeningService`` per ``[[listener]]`` (a port that cannot be
  bound fails start-up: under ``twistd -n`` with one line naming the
  listener, the endpoint and the OS error, and exit status 1);
* the admin site on ``[admin].listen``, when configured
  (``build_admin_service``).

Under twistd the root also handles the signals (``shardtcp.lifecycle``):
``SIGHUP`` reloads in place (``ProxyService.reload``, ``shardtcp.reload``),
``SIGTERM``/``SIGINT`` stop gracefully (``stopService`` stops accepting,
``ready`` turns false, connections get ``[proxy] drain_timeout`` to
finish), ``SIGUSR1`` reopens the log file.
"""

from __future__ import annotations

import functools
import gc
import os
import sys

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python import usage
from zope.interface import implementer

from shardtcp.admin.interfaces import IReloader
from shardtcp.config import ConfigError, load_config
from shardtcp.eventloop import adopt as adopt_lean_dispatch
from shardtcp.identify.names import NameTable
from shardtcp.keys import load_private_key
from shardtcp.lifecycle import Drain, SignalHandlers
from shardtcp.metrics import GCPauses, ProxyMetrics, TimedResolver
from shardtcp.model import Config
from shardtcp.proxy.connector import ShardConnector
from shardtcp.proxy.accesslog import AccessLog, AccessLogError, RefusalLimiter
from shardtcp.proxy.context import ListenerContext, shard_line_limiter
from shardtcp.proxy.ksplice import KernelSplicer, PipePool
from shardtcp.proxy.listener import ProxyFactory
from shardtcp.reload import LifecycleMetrics, Reloader, build_parts, listener_context
from shardtcp.resolver import ShardResolver, build_health_service
from shardtcp.resolver.health import health_tls_options
from shardtcp.resolver.service import build_resolver
from shardtcp.resolver.feeds import ThreatIntelError, build_threat_intel


_log = Logger()


class Options(usage.Options):
    """Command-line options of ``twistd shardtcp``."""

    synopsis = "[options]"
    longdesc = (
        "Run the shardtcp proxy: route each TCP connection to the best shard of "
        "its service and hand it a signed PolicyContext in a PROXY v2 header."
    )
    optParameters = [
        ["config", "c", None, "Path of the TOML configuration file (required)."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config PATH is required")


class ListenFailed(Exception):
    """A listener could not listen; the message is one line for operators."""


def _listen_reason(failure: Failure) -> str:
    """The OS error behind a failed listen, else the failure's own message."""
    error = getattr(failure.value, "socketError", None)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return " ".join((failure.getErrorMessage() or failure.type.__name__).split())


class ListeningService(Service):
    """
    Listen on a server endpoint string while running.

    Like ``strports.service`` (a bind failure is raised from
    ``startService``, so twistd refuses to start rather than run without its
    port), but it keeps the listening port, so the bound address is known
    when the configuration asked for port 0.
    """

    def __init__(self, description: str, factory, reactor, label: str = "", backlog: int | None = None) -> None:
        self.description = description
        # The listen queue, given to the endpoint (messages show ``description`` as written).
        self.backlog = backlog
        self.factory = factory
        self._reactor = reactor
        self.label = label or description
        self.port = None

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            try:
                self.listen()
            except ListenFailed:
                self.running = False
                raise

    def listen(self) -> None:
        """Listen now (a reload opens new ports before it commits)."""
        outcome: list = []
        description = self.description
        if self.backlog is not None:
            description = with_backlog(description, self.backlog)
        serverFromString(self._reactor, description).listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"listening on {self.description!r} did not complete at start-up")
        if isinstance(outcome[0], Failure):
            failure = outcome[0]
            raise ListenFailed(
                f"{self.label}: cannot listen on {self.description}: {_listen_reason(failure)}"
            ) from failure.value
        self.port = outcome[0]

    def stopService(self):
        super().stopService()
        return self.stop_listening()

    def stop_listening(self):
        """Close the listening socket (open connections are not touched)."""
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


class AdoptedListeningService(ListeningService):
    """
    Accept on a listening socket bound by another process (a worker's
    socket, bound by its supervisor: ``shardtcp.workers``), given as a file
    descriptor; the descriptor is closed once adopted (the reactor keeps
    its own duplicate).
    """

    def __init__(self, fd: int, description: str, factory, reactor, label: str = "") -> None:
        super().__init__(description, factory, reactor, label=label)
        self.fd = fd

    def listen(self) -> None:
        import socket as _socket

        probe = _socket.socket(fileno=self.fd)
        family = probe.family
        probe.detach()
        try:
            self.port = self._reactor.adoptStreamPort(self.fd, family, self.factory)
        except OSError as e:
            raise ListenFailed(f"{self.label}: cannot adopt the socket of {self.description}: {e.strerror}") from e
        finally:
            import os as _os

            _os.close(self.fd)


@implementer(IReloader)
class ProxyService(MultiService):
    """
    The root of the tree; keeps the shared parts reachable for tests, the
    admin site and reloads.

    ``reload()`` re-reads the configuration file and applies it in place;
    ``ready`` is False once a graceful stop has begun (``/ready`` answers
    503); ``stopService`` drains (see the module docstring).
    """

    def __init__(self, config: Config, resolver: ShardResolver, metrics: ProxyMetrics, reactor=None) -> None:
        super().__init__()
        self.config = config
        self.resolver = resolver
        self.metrics = metrics
        self.factories: dict = {}
        self.threat_intel = None
        self.health = None
        #: The etcd shard source, when ``[registry] kind = "etcd"``.
        self.registry = None
        #: The fleet's shared load and overrides (``LoadSharing``, ``FleetAdmin``), with etcd.
        self.fleet: tuple = ()
        #: The process's kernel splicer (``None``: userspace splice only).
        self.splicer: KernelSplicer | None = None
        #: Called with ``ListenFailed`` instead of raising it, when set.
        self.on_listen_failure = None
        #: ``[log] access``: shared by every listener.
        self.access_log: AccessLog = AccessLog("off")
        self.refusal_lines: RefusalLimiter | None = None
        #: Bounds the lines about failed attempts at shards: shared likewise.
        self.shard_lines = None
        #: What the listeners' connections ask: the resolver, timed for the metrics.
        self.context_resolver = resolver
        #: Set by ``makeService``: handle SIGHUP/SIGTERM/SIGINT/SIGUSR1 once running.
        self.handle_signals = False
        #: Freeze the heap once running (``freeze_heap``) and settle it after
        #: each reload (``settle_heap``): set for the daemon's own tree
        #: only, never in a test process.
        self.settle_heap = False
        self._gc_pauses: GCPauses | None = None
        self._paced: PacedCollector | None = None
        self.lifecycle = LifecycleMetrics(metrics.registry)
        #: Connection sets of listeners removed by a reload, still draining.
        self.retired_connections: list = []
        self.connector = None
        self.parts = None
        self.health_tls = None
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._reloader: Reloader | None = None
        self._drain: Drain | None = None
        self._stopping: Deferred | None = None
        self.signals: SignalHandlers | None = None
        #: Listener name -> listening socket descriptor to adopt instead of binding (a worker's).
        self.listen_fds: dict = {}

    @property
    def ready(self) -> bool:
        """Whether the proxy takes new connections (running, not stopping)."""
        return self.running and self._stopping is None

    @property
    def draining(self) -> bool:
        """Whether a graceful stop is under way."""
        return self._stopping is not None

    def startService(self) -> None:
        try:
            super().startService()
        except ListenFailed as e:
            if self.on_listen_failure is None:
                raise
            self.on_listen_failure(e)
            return
        if self.handle_signals:
            self.signals = SignalHandlers(
                self._reactor, reload=lambda: self.reload(trigger="signal"), stop=self._stop_reactor, close_now=self._close_now,
                reopen=self.reopen_logs,
            )
            # Now for SIGHUP and SIGUSR1; again once the reactor runs, since
            # it installs its own SIGTERM/SIGINT handlers as it starts.
            self.signals.install()
            self._reactor.callWhenRunning(self.signals.install)
        if self.settle_heap:
            self._reactor.callWhenRunning(freeze_heap)
            # The collector's pauses, in the metrics (the daemon's tree only:
            # the hook is process-wide).
            self._gc_pauses = GCPauses(self.metrics)
            self._gc_pauses.install()
            self._paced = PacedCollector(self._reactor)
            self._paced.start()

    def _stop_reactor(self) -> None:
        from twisted.internet.error import ReactorNotRunning

        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass

    def _close_now(self) -> None:
        if self._drain is not None:
            self._drain.close_now()

    def current_health_tls(self, service, shard):
        """Health checks' TLS options, from the parts of the running configuration."""
        return self.health_tls(service, shard)

    def listening_service(self, listener, factory) -> "ListeningService":
        """A (not yet started) listening service for ``listener``."""
        if listener.name in self.listen_fds:
            return AdoptedListeningService(
                self.listen_fds.pop(listener.name), listener.listen, factory, self._reactor,
                label=f"listener {listener.name!r}",
            )
        return ListeningService(
            listener.listen, factory, self._reactor, label=f"listener {listener.name!r}", backlog=listener.backlog
        )

    def open_connections(self) -> list:
        """Every client connection open now, over all listeners (removed ones too)."""
        sets = [f.context.connections for f in self.factories.values()] + self.retired_connections
        return [c for connections in sets for c in connections]

    def reload(self, path: str | None = None, *, trigger: str | None = None) -> Deferred:
        """
        Re-read the configuration (``path``, by default the running one's
        file) and apply it in place (``shardtcp.reload``).  The Deferred
        fires with a summary of what changed (``ReloadSummary.as_dict``), or
        fails with ``ConfigError`` (one line per problem; nothing changed)
        after logging the problems.  With ``trigger`` (``signal``) the
        outcome is counted in ``shardtcp_reloads_total``; the admin API
        counts its own (``api``).
        """
        if self._stopping is not None:
            return self._refused(["the proxy is stopping"], trigger)
        if self._reloader is None:
            self._reloader = Reloader(self, self._reactor)
        try:
            summary = self._reloader.reload(path)
        except ConfigError as e:
            return self._refused(list(e.problems), trigger)
        if trigger is not None:
            self.metrics.record_reload(trigger, True)
        if self.settle_heap:
            # Once the old configuration's objects are let go.
            self._reactor.callLater(0, settle_heap)
        _log.info(
            "configuration reloaded from {path}: {changes}",
            path=summary.path,
            changes=summary.describe(),
            summary=summary.as_dict(),
        )
        return succeed(summary.as_dict())

    def _refused(self, problems: list, trigger: str | None) -> Deferred:
        if trigger is not None:
            self.metrics.record_reload(trigger, False)
        for line in problems:
            _log.error("reload refused: {problem}", problem=line)
        _log.error(
            "configuration not reloaded ({count} problems); still running on the previous one",
            count=len(problems),
        )
        return fail(ConfigError(problems))

    def stopService(self):
        """
        Stop gracefully: stop listening everywhere, then let the open
        connections finish for ``[proxy] drain_timeout`` before closing the
        rest; then stop the other services.  Fires once all of that is done.
        """
        if self._stopping is not None:
            return self._stopping
        if not self.running:
            return succeed(None)
        self._stopping = Deferred()
        stopping = self._stopping
        for service in list(self):
            if isinstance(service, ListeningService):
                service.stop_listening()
        self._drain = Drain(self.open_connections, self._reactor, self.lifecycle)
        d = self._drain.run(self.config.proxy.drain_timeout)
        d.addCallback(lambda _: MultiService.stopService(self))
        d.addBoth(self._stopped)
        d.addBoth(lambda result: (stopping.callback(None), result)[1])
        return stopping

    def _stopped(self, result):
        for lines in (self.refusal_lines, self.shard_lines):
            if lines is not None:
                lines.stop()
        pauses, self._gc_pauses = self._gc_pauses, None
        if pauses is not None:
            pauses.remove()
        paced, self._paced = self._paced, None
        if paced is not None:
            paced.stop()
        return result

    def reopen_logs(self) -> None:
        """Reopen the log files shardtcp owns (``[log] access_file``): SIGUSR1."""
        self.access_log.reopen()

    def listening_port(self, listener: str):
        """The bound port of a listener (``getHost()`` tells its address)."""
        return self.getServiceNamed(f"listener:{listener}").port


def freeze_heap() -> None:
    """
    Take every object alive now out of the cyclic collector's sight
    (``gc.freeze``), once the daemon runs.

    The configuration, the resolver's tables, Twisted and the libraries are
    tens of thousands of long-lived objects; a full collection walks all of
    them (20 ms with a 3-shard configuration on the bench machine, about
    80 ms with 10,000 shards), stalling every connection meanwhile, and
    the collector runs one every so often as connections come and go.
    Frozen objects are still freed by reference counting.  Freezing costs
    no collection: what start-up left as cyclic garbage (little) stays.
    """
    gc.freeze()


#: Seconds between the daemon's own full collections (``PacedCollector``).
FULL_COLLECTION_INTERVAL = 60.0
# Young collections before CPython considers a full one: never, in practice.
_NO_AUTOMATIC_FULL = 1 << 30


class PacedCollector:
    """
    Full collections on a clock instead of on allocation counts, in the
    daemon.

    CPython starts a full collection when the objects that survived young
    collections since the last one reach a quarter of those that survived
    it.  Every shard a connection tries leaves a few such objects (its live
    state is replaced, not changed in place), so a service of thousands of
    shards whose connections spread over them sets off a full collection
    every few thousand connections, each walking all of them (about 25 ms
    at 10,000 shards tried, ``docs/performance.rst``), and every open
    connection waits meanwhile.  While started, automatic full collections
    are off and one runs every ``interval`` seconds instead; young
    collections (which free nearly all of a connection's cyclic garbage)
    run as before.  ``stop`` restores CPython's thresholds.  The pauses are
    in ``shardtcp_gc_pause_seconds``.
    """

    def __init__(self, clock, interval: float = FULL_COLLECTION_INTERVAL, collect=gc.collect) -> None:
        self._clock = clock
        self._interval = interval
        self._collect = collect
        self._saved = None
        self._loop = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> None:
        if self._loop is not None:
            return
        self._saved = gc.get_threshold()
        young, middle = self._saved[:2]
        gc.set_threshold(young, middle, _NO_AUTOMATIC_FULL)
        self._loop = LoopingCall(self._collect)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if loop.running:
            loop.stop()
        gc.set_threshold(*self._saved)


def settle_heap() -> None:
    """
    After a reload: hand the frozen objects back, collect (the old
    configuration's cyclic garbage, once: the pause of one ordinary full
    collection), then freeze what is alive again.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def build_registry(config: Config, reactor):
    """The etcd shard source of an ``etcd`` registry, else None (the file is the registry)."""
    if config.registry.kind != "etcd":
        return None
    from shardtcp.config import read_registered_shard
    from shardtcp.registry.access import etcd_client
    from shardtcp.registry.source import EtcdShardSource

    client = etcd_client(config.registry, reactor)
    return EtcdShardSource(
        config, client, read_registered_shard, clock=reactor, snapshot=config.registry.snapshot
    )


def build_fleet(config: Config, reactor, resolver: ShardResolver, registry, load: tuple | None = None) -> tuple:
    """
    With an etcd registry, ``(LoadSharing, FleetAdmin)``: this proxy's load
    published and the others' counted, and the fleet-wide overrides applied;
    both follow the resolver's shards as they change.  Else ``()``.
    ``load`` replaces what is published and where the others' load goes
    (``(own, apply)``; a supervisor of worker processes).
    """
    if config.registry.kind != "etcd":
        return ()
    from shardtcp.registry.access import etcd_client
    from shardtcp.registry.fleet import FleetAdmin, LoadSharing

    client = etcd_client(config.registry, reactor)
    own, apply = load or (resolver.open_connections, resolver.set_remote_load)
    load = LoadSharing(
        client, config.registry.prefix, config.proxy.id, own, apply,
        clock=reactor, lease_ttl=config.registry.lease_ttl,
    )
    admin = FleetAdmin(client, config.registry.prefix, resolver, clock=reactor)
    resolver.watch(load.reapply)
    resolver.watch(admin.reapply)
    if registry is not None:
        registry.peers = load.status
    return (load, admin)


def build_service(
    config: Config, reactor=None, *, connector: ShardConnector | None = None, listen_fds: dict | None = None,
    control_plane: bool = True, root_type=None, fleet_load: tuple | None = None,
) -> ProxyService:
    """
    Build the service tree for a validated ``config``.

    A worker process (``shardtcp.workers``) passes ``listen_fds`` (listener
    name -> listening socket to adopt rather than bind) and
    ``control_plane=False``: no health checks, no admin site and no fleet
    load publishing, which its supervisor runs once for every worker.
    ``root_type`` replaces ``ProxyService`` and ``fleet_load`` the fleet
    load's ``(own, apply)`` (the supervisor's, ``build_fleet``).
    """
    if reactor is None:
        from twisted.internet import reactor
    metrics = ProxyMetrics()
    registry = build_registry(config, reactor)
    parts = build_parts(config, reactor)
    resolver = build_resolver(config, clock=reactor, source=registry)
    root = (root_type or ProxyService)(config, resolver, metrics, reactor)
    root.listen_fds = dict(listen_fds or {})
    root.parts = parts
    root.health_tls = health_tls_options(parts.upstream_tls)
    root.registry = registry
    if registry is not None:
        # Started before the resolver, so that its snapshot is the first
        # registry the resolver reads when etcd is down at start-up.
        registry.setServiceParent(root)
    resolver.setServiceParent(root)
    root.fleet = build_fleet(config, reactor, resolver, registry, fleet_load) if control_plane else ()
    for part in root.fleet:
        part.setServiceParent(root)
    if registry is not None:
        metrics.watch_registry(registry)
    metrics.watch_shards(resolver.snapshot)
    root.context_resolver = TimedResolver(resolver, metrics, reactor)
    intel = build_threat_intel(config, resolver, reactor, registry=metrics.registry)
    if intel is not None:
        intel.setServiceParent(root)
        # explain (and resolve) admit clients as the connection path does.
        resolver.set_admission(intel.denies)
    root.threat_intel = intel
    health = None
    if control_plane:
        health = build_health_service(config, resolver, reactor, tls_options_for=root.current_health_tls)
    if health is not None:
        health.setServiceParent(root)
    root.health = health
    if connector is None:
        connector = ShardConnector(reactor)
    root.connector = connector
    root.access_log = AccessLog(config.log.access, config.log.access_file)
    root.refusal_lines = RefusalLimiter(reactor)
    root.shard_lines = shard_line_limiter(reactor)
    splicer = build_splicer(config, reactor)
    if splicer is not None:
        PipePoolService(splicer.pool).setServiceParent(root)
    root.splicer = splicer
    for listener in config.listeners:
        context = listener_context(
            config, listener, parts, resolver=root.context_resolver, connector=connector, metrics=metrics,
            clock=reactor, admission=intel.denies if intel is not None else None,
            access=root.access_log, refusal_lines=root.refusal_lines, shard_lines=root.shard_lines, splicer=splicer,
        )
        factory = ProxyFactory(context)
        root.factories[listener.name] = factory
        port_service = root.listening_service(listener, factory)
        port_service.setName(f"listener:{listener.name}")
        port_service.setServiceParent(root)
    admin = None if not control_plane else build_admin_service(
        config, reactor, resolver=resolver, metrics=metrics,
        serving=lambda: root.ready,
        reloader=root,
        feeds=intel.status if intel is not None else None,
        registry=registry.status if registry is not None else None,
    )
    if admin is not None:
        admin.setServiceParent(root)
    return root


#: Server endpoint types whose parsers take a ``backlog=`` option.
_BACKLOG_ENDPOINTS = frozenset({"tcp", "tcp6", "ssl", "unix"})


def with_backlog(description: str, backlog: int) -> str:
    """
    ``description`` with the listener's ``backlog`` as the endpoint's
    ``backlog=`` option, for the endpoint types that take one; a
    ``backlog=`` written in the endpoint string itself is kept as written.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in _BACKLOG_ENDPOINTS or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def build_admin_service(
    config: Config,
    reactor,
    *,
    resolver: ShardResolver,
    metrics: ProxyMetrics,
    serving=None,
    reloader=None,
    feeds=None,
    registry=None,
) -> ListeningService | None:
    """
    The admin site listening on ``[admin].listen`` (None without
    ``[admin]``).  ``serving()`` says whether the proxy takes new
    connections (``/ready``; always True when not given); ``reloader`` is
    the ``shardtcp.admin.IReloader`` behind ``POST /reload``; ``feeds()``
    the threat feeds' status shown in ``/status``.  Raises
    ``shardtcp.admin.AdminError`` when the token or JWKS file is unusable.
    """
    if config.admin is None:
        return None
    from shardtcp.admin import admin_site_for

    site = admin_site_for(
        config,
        resolver=resolver,
        metrics=metrics,
        serving=serving if serving is not None else (lambda: True),
        reloader=reloader,
        feeds=feeds,
        registry=registry,
    )
    service = ListeningService(config.admin.listen, site, reactor, label="admin")
    service.setName("admin")
    return service


def build_splicer(config: Config, reactor) -> KernelSplicer | None:
    """
    The one kernel splicer (and pipe pool) of this process, or ``None``
    when ``[proxy] splice = "userspace"`` or no listener could use it.
    Where ``splice(2)`` does not work the splicer exists but is disabled,
    so every connection takes the userspace path.
    """
    if config.proxy.splice == "userspace":
        return None
    if all(listener.mode == "terminate" for listener in config.listeners):
        return None
    splicer = KernelSplicer(PipePool(config.proxy.max_pipes), reactor=reactor)
    if not splicer.enabled:
        _log.info("kernel splice unavailable here: connections use the userspace splice")
    return splicer


class PipePoolService(Service):
    """Closes the pipes kept for reuse when the proxy stops."""

    def __init__(self, pool: PipePool) -> None:
        self.pool = pool

    def stopService(self):
        super().stopService()
        self.pool.close()


def makeService(options: Options, reactor=None) -> ProxyService:
    """twistd's entry point: load the configuration, build the tree."""
    try:
        config = load_config(options["config"])
    except ConfigError as e:
        for line in e.problems:
            sys.stderr.write(f"shardtcp: {line}\n")
        sys.stderr.write("shardtcp: configuration is not valid; not starting\n")
        raise SystemExit(1)
    from shardtcp.admin import AdminError

    if reactor is None:
        from twisted.internet import reactor
    adopt_lean_dispatch(reactor)
    try:
        if worker_count(config) > 1:
            from shardtcp.workers.supervisor import build_supervisor

            root = build_supervisor(config, reactor)
        else:
            root = build_service(config, reactor)
    except (ThreatIntelError, AccessLogError, AdminError) as e:
        sys.stderr.write(f"shardtcp: {e}\nshardtcp: not starting\n")
        raise SystemExit(1)
    except ConfigError as e:
        for line in e.problems:
            sys.stderr.write(f"shardtcp: {line}\n")
        sys.stderr.write("shardtcp: not starting\n")
        raise SystemExit(1)
    root.handle_signals = True
    root.settle_heap = True
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("nodaemon"):
        root.on_listen_failure = _exit_not_listening
    else:
        root.on_listen_failure = functools.partial(_log_not_listening, parent)
    return root


def worker_count(config: Config) -> int:
    """``[proxy] workers`` as a number of processes (``"auto"``: one per core)."""
    import os

    workers = config.proxy.workers
    if workers == "auto":
        return os.cpu_count() or 1
    return int(workers)


def _exit_not_listening(error: ListenFailed) -> None:
    """
    One line on stderr and exit status 1: no traceback for a port in use.
    twistd has pointed ``sys.stderr`` into its log by now; the operator
    at the terminal reads the process's own stderr.
    """
    stderr = sys.__stderr__ or sys.stderr
    stderr.write(f"shardtcp: {error}; not starting\n")
    stderr.flush()
    raise SystemExit(1)


def _log_not_listening(options, error: ListenFailed) -> None:
    """
    A daemonizing twistd: one critical line in the log file, the same line
    (its first 98 bytes) through twistd's status pipe to the process that
    started it, which prints it and exits 1; the pid file is removed, and
    the daemon exits 1 without a traceback.
    """
    _log.critical("{error}; not starting", error=str(error))
    # The pid file goes first: the starting process exits as soon as it
    # reads the status pipe.
    pidfile = options.get("pidfile") if hasattr(options, "get") else None
    if pidfile:
        try:
            os.unlink(pidfile)
        except OSError:
            pass
    pipe = options.get("statusPipe") if hasattr(options, "get") else None
    if pipe is not None:
        message = f"1 {error}".encode("utf-8", "replace")[:100]
        try:
            os.write(pipe, message)
            os.close(pipe)
        except OSError:
            pass
    raise SystemExit(1)
