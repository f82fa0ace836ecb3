"""
``twistd shardtcp``: options and the service tree.

``makeService`` validates the configuration first and refuses to start, with
one line per problem and no traceback, when it is not valid.  The tree is:

* the ``ShardResolver`` (a service: it owns the live shard state);
* the ``ThreatIntel`` feed poller and the ``HealthChecker``, when configured;
* one ``ListeningService`` per ``[[listener]]`` (a port that cannot be
  bound fails start-up: under ``twistd -n`` with one line naming the
  listener, the endpoint and the OS error, and exit status 1);
* later: the admin site.
"""

from __future__ import annotations

import sys

from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python import usage

from shardtcp.config import ConfigError, load_config
from shardtcp.identify.names import NameTable
from shardtcp.keys import load_private_key
from shardtcp.metrics import ProxyMetrics
from shardtcp.model import Config
from shardtcp.policy import PolicySigner
from shardtcp.proxy.connector import ShardConnector
from shardtcp.proxy.context import ListenerContext
from shardtcp.proxy.ksplice import KernelSplicer, PipePool
from shardtcp.proxy.listener import ProxyFactory
from shardtcp.proxy.tls import ServerTLS
from shardtcp.upstream import UpstreamTLS
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

    def __init__(self, description: str, factory, reactor, label: str = "") -> None:
        self.description = description
        self.factory = factory
        self._reactor = reactor
        self.label = label or description
        self.port = None

    def startService(self) -> None:
        super().startService()
        outcome: list = []
        serverFromString(self._reactor, self.description).listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"listening on {self.description!r} did not complete at start-up")
        if isinstance(outcome[0], Failure):
            self.running = False
            failure = outcome[0]
            raise ListenFailed(
                f"{self.label}: cannot listen on {self.description}: {_listen_reason(failure)}"
            ) from failure.value
        self.port = outcome[0]

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


class ProxyService(MultiService):
    """The root of the tree; keeps the shared parts reachable for tests."""

    def __init__(self, config: Config, resolver: ShardResolver, metrics: ProxyMetrics) -> None:
        super().__init__()
        self.config = config
        self.resolver = resolver
        self.metrics = metrics
        self.factories: dict = {}
        self.threat_intel = None
        self.health = None
        #: The process's kernel splicer (``None``: userspace splice only).
        self.splicer: KernelSplicer | None = None
        #: Called with ``ListenFailed`` instead of raising it, when set.
        self.on_listen_failure = None

    def startService(self) -> None:
        try:
            super().startService()
        except ListenFailed as e:
            if self.on_listen_failure is None:
                raise
            self.on_listen_failure(e)

    def listening_port(self, listener: str):
        """The bound port of a listener (``getHost()`` tells its address)."""
        return self.getServiceNamed(f"listener:{listener}").port


def build_service(config: Config, reactor=None, *, connector: ShardConnector | None = None) -> ProxyService:
    """Build the service tree for a validated ``config``."""
    if reactor is None:
        from twisted.internet import reactor
    metrics = ProxyMetrics()
    resolver = build_resolver(config, clock=reactor)
    root = ProxyService(config, resolver, metrics)
    resolver.setServiceParent(root)
    intel = build_threat_intel(config, resolver, reactor, registry=metrics.registry)
    if intel is not None:
        intel.setServiceParent(root)
        # explain (and resolve) admit clients as the connection path does.
        resolver.set_admission(intel.denies)
    root.threat_intel = intel
    upstream_tls = UpstreamTLS()
    health = build_health_service(
        config, resolver, reactor, tls_options_for=health_tls_options(upstream_tls)
    )
    if health is not None:
        health.setServiceParent(root)
    root.health = health
    signer = PolicySigner(
        load_private_key(config.signing.private_key),
        kid=config.signing.kid,
        issuer=config.proxy.id,
        ttl=config.signing.ttl,
        now=reactor.seconds,
    )
    names = NameTable((s.id, s.names) for s in config.services)
    if connector is None:
        connector = ShardConnector(reactor)
    splicer = build_splicer(config, reactor)
    if splicer is not None:
        PipePoolService(splicer.pool).setServiceParent(root)
    root.splicer = splicer
    for listener in config.listeners:
        context = ListenerContext(
            config=listener,
            names=names,
            resolver=resolver,
            signer=signer,
            connector=connector,
            metrics=metrics,
            clock=reactor,
            tlv_type=config.signing.tlv_type,
            server_tls=ServerTLS(listener) if listener.mode == "terminate" else None,
            upstream_tls=upstream_tls,
            admission=intel.denies if intel is not None else None,
            splicer=splicer if listener.mode != "terminate" else None,
        )
        factory = ProxyFactory(context)
        root.factories[listener.name] = factory
        port_service = ListeningService(
            listener.listen, factory, reactor, label=f"listener {listener.name!r}"
        )
        port_service.setName(f"listener:{listener.name}")
        port_service.setServiceParent(root)
    return root


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
    try:
        root = build_service(config, reactor)
    except ThreatIntelError as e:
        sys.stderr.write(f"shardtcp: {e}\nshardtcp: not starting\n")
        raise SystemExit(1)
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("nodaemon"):
        root.on_listen_failure = _exit_not_listening
    else:
        root.on_listen_failure = _log_not_listening
    return root


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


def _log_not_listening(error: ListenFailed) -> None:
    """
    A daemonizing twistd hands the exception's first 100 bytes to the
    process that started it (which exits 1); the log file gets all of it.
    """
    _log.critical("{error}; not starting", error=str(error))
    raise error
