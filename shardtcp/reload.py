# -*- test-case-name: tests.test_reload -*-
"""
Reloading the running proxy's configuration in place (SPEC section 8).

``ProxyService.reload`` (``shardtcp.tap``) runs a ``Reloader``: it reads
and validates the file again (``load_config``; listen ports are not probed,
the proxy holds its own), builds every new part (signing key, certificates,
new listening sockets, the feed poller) before changing anything, and only
then swaps them in.  A bad file, an unreadable key or certificate, or a new
port that cannot be bound refuses the whole reload with one line per
problem (``ConfigError``); the running configuration stays.

What a reload changes, and what it keeps:

* a listener whose name and endpoint string are unchanged keeps its socket;
  its factory gets a new ``ListenerContext`` (policies, certificates,
  signer, names) for the connections it accepts from then on;
* a new listener starts listening; a removed one (or one whose endpoint
  changed, "rebound") stops listening while its connections finish;
* services, shards, weights and policies go to the resolver, which keeps
  each shard's live state by id (``ShardResolver.replace_config``); the
  health checker follows the records there as it does for any reload;
* the feed poller is restarted when ``[threat_intel]`` or its trusted keys
  changed;
* established connections keep the context they were accepted with: a
  reload never touches them.

``summarise`` (pure) says what changed; the summary is logged and is what
``reload`` returns (and ``POST /reload`` answers).
"""

from __future__ import annotations

from typing import Optional

import attrs
from prometheus_client import Counter
from twisted.logger import Logger

from shardtcp.config import ConfigError, load_config
from shardtcp.identify.names import NameTable
from shardtcp.keys import load_private_key
from shardtcp.model import Config, ListenerConfig
from shardtcp.policy import PolicySigner
from shardtcp.proxy.accesslog import AccessLog, AccessLogError
from shardtcp.proxy.context import ListenerContext
from shardtcp.proxy.limits import AdmissionLimits
from shardtcp.proxy.listener import ProxyFactory
from shardtcp.proxy.tls import ServerTLS
from shardtcp.resolver.feeds import ThreatIntelError, build_threat_intel
from shardtcp.resolver.health import build_health_service, health_tls_options
from shardtcp.upstream import UpstreamTLS

__all__ = [
    "LifecycleMetrics",
    "Parts",
    "ReloadSummary",
    "Reloader",
    "build_parts",
    "listener_context",
    "summarise",
]

log = Logger(namespace="shardtcp.reload")


# ---------------------------------------------------------------------------
# What changed


@attrs.frozen
class ReloadSummary:
    """What a reload changed; ``as_dict`` is its JSON form."""

    path: str
    listeners_kept: tuple = ()  # same name and endpoint: socket kept
    listeners_added: tuple = ()
    listeners_removed: tuple = ()
    listeners_rebound: tuple = ()  # same name, new endpoint: new socket
    services_added: tuple = ()
    services_removed: tuple = ()
    services_changed: tuple = ()
    shards_added: tuple = ()
    shards_removed: tuple = ()
    shards_changed: tuple = ()
    kid: str = ""
    signing_changed: bool = False
    threat_intel: str = "none"  # none | unchanged | started | stopped | restarted
    access_log_changed: bool = False  # [log] access or access_file

    @property
    def changed(self) -> bool:
        """Whether anything at all differs from the previous configuration."""
        return bool(
            self.listeners_added or self.listeners_removed or self.listeners_rebound
            or self.services_added or self.services_removed or self.services_changed
            or self.shards_added or self.shards_removed or self.shards_changed
            or self.signing_changed or self.threat_intel in ("started", "stopped", "restarted")
            or self.access_log_changed
        )

    def as_dict(self) -> dict:
        """Plain JSON types."""
        return {
            "path": self.path,
            "changed": self.changed,
            "listeners": {
                "kept": list(self.listeners_kept),
                "added": list(self.listeners_added),
                "removed": list(self.listeners_removed),
                "rebound": list(self.listeners_rebound),
            },
            "services": {
                "added": list(self.services_added),
                "removed": list(self.services_removed),
                "changed": list(self.services_changed),
            },
            "shards": {
                "added": list(self.shards_added),
                "removed": list(self.shards_removed),
                "changed": list(self.shards_changed),
            },
            "signing": {"kid": self.kid, "changed": self.signing_changed},
            "threat_intel": self.threat_intel,
            "access_log": {"changed": self.access_log_changed},
        }

    def describe(self) -> str:
        """One line for the log."""
        parts = []
        for label, names in (
            ("listeners added", self.listeners_added),
            ("listeners removed", self.listeners_removed),
            ("listeners rebound", self.listeners_rebound),
            ("services added", self.services_added),
            ("services removed", self.services_removed),
            ("services changed", self.services_changed),
            ("shards added", self.shards_added),
            ("shards removed", self.shards_removed),
            ("shards changed", self.shards_changed),
        ):
            if names:
                parts.append(f"{label} {', '.join(names)}")
        if self.signing_changed:
            parts.append(f"signing key kid {self.kid}")
        if self.threat_intel in ("started", "stopped", "restarted"):
            parts.append(f"threat feeds {self.threat_intel}")
        if self.access_log_changed:
            parts.append("access log reopened")
        return "; ".join(parts) if parts else "nothing changed"


def summarise(old: Config, new: Config, *, threat_intel: str = "none", key_changed: bool = False) -> ReloadSummary:
    """What changes from ``old`` to ``new`` (``threat_intel`` says what the reload did with the feeds)."""
    old_listeners = {l.name: l for l in old.listeners}
    new_listeners = {l.name: l for l in new.listeners}
    old_services = {s.id: s for s in old.services}
    new_services = {s.id: s for s in new.services}
    old_shards = {sh.id: (s.id, sh) for s in old.services for sh in s.shards}
    new_shards = {sh.id: (s.id, sh) for s in new.services for sh in s.shards}
    return ReloadSummary(
        path=new.path or "",
        listeners_kept=tuple(
            n for n, l in new_listeners.items() if n in old_listeners and old_listeners[n].listen == l.listen
        ),
        listeners_added=tuple(n for n in new_listeners if n not in old_listeners),
        listeners_removed=tuple(n for n in old_listeners if n not in new_listeners),
        listeners_rebound=tuple(
            n for n, l in new_listeners.items() if n in old_listeners and old_listeners[n].listen != l.listen
        ),
        services_added=tuple(s for s in new_services if s not in old_services),
        services_removed=tuple(s for s in old_services if s not in new_services),
        services_changed=tuple(s for s, c in new_services.items() if s in old_services and old_services[s] != c),
        shards_added=tuple(sh for sh in new_shards if sh not in old_shards),
        shards_removed=tuple(sh for sh in old_shards if sh not in new_shards),
        shards_changed=tuple(sh for sh, v in new_shards.items() if sh in old_shards and old_shards[sh] != v),
        kid=new.signing.kid,
        signing_changed=key_changed or old.signing != new.signing or old.proxy.id != new.proxy.id,
        threat_intel=threat_intel,
        access_log_changed=old.log != new.log,
    )


# ---------------------------------------------------------------------------
# Counting


class LifecycleMetrics:
    """
    ``shardtcp_shutdown_connections_total{outcome}`` (``finished``: ended
    by themselves during the drain; ``closed``: closed at its deadline).
    """

    OUTCOMES = ("finished", "closed")

    def __init__(self, registry) -> None:
        self.shutdown = Counter(
            "shardtcp_shutdown_connections",
            "Connections open when a graceful stop began, by how they ended",
            ["outcome"],
            registry=registry,
        )
        for outcome in self.OUTCOMES:
            self.shutdown.labels(outcome)
        # Reloads are counted by ProxyMetrics.record_reload (trigger, result).


# ---------------------------------------------------------------------------
# The parts a configuration builds


@attrs.frozen
class Parts:
    """What the listeners' contexts are built from, new on every reload."""

    signer: PolicySigner
    names: NameTable
    upstream_tls: UpstreamTLS
    server_tls: dict  # terminate listener name -> ServerTLS
    key_pem: bytes = attrs.field(default=b"", repr=False)  # to tell a rotated key file


def build_parts(config: Config, clock) -> Parts:
    """
    The signer, the name table and each terminating listener's
    certificates; a key or certificate that cannot be loaded raises
    ``ConfigError`` naming it.
    """
    problems = []
    signer = None
    key_pem = b""
    try:
        with open(config.signing.private_key, "rb") as f:
            key_pem = f.read()
        signer = PolicySigner(
            load_private_key(config.signing.private_key),
            kid=config.signing.kid,
            issuer=config.proxy.id,
            ttl=config.signing.ttl,
            now=clock.seconds,
        )
    except (OSError, ValueError) as e:
        problems.append(f"signing.private_key: {_one_line(e)}")
    server_tls = {}
    for index, listener in enumerate(config.listeners):
        if listener.mode != "terminate":
            continue
        try:
            server_tls[listener.name] = ServerTLS(listener)
        except Exception as e:
            problems.append(f"listener[{index}].certificates: {_one_line(e)}")
    if problems:
        raise ConfigError(problems)
    return Parts(
        signer=signer,
        names=NameTable((s.id, s.names) for s in config.services),
        upstream_tls=UpstreamTLS(),
        server_tls=server_tls,
        key_pem=key_pem,
    )


def listener_context(
    config: Config,
    listener: ListenerConfig,
    parts: Parts,
    *,
    resolver,
    connector,
    metrics,
    clock,
    admission=None,
    connections: Optional[set] = None,
    access=None,
    refusal_lines=None,
    shard_lines=None,
    splicer=None,
    limits: Optional[AdmissionLimits] = None,
) -> ListenerContext:
    """
    The context of ``listener``'s connections; ``connections`` (the set of
    an earlier context of the same listener) carries the open connections
    over a reload, so that they are still counted and drained, and
    ``limits`` (that context's admission limits) carries their counts.
    """
    extra = {} if connections is None else {"connections": connections}
    if access is not None:
        extra["access"] = access
    if refusal_lines is not None:
        extra["refusal_lines"] = refusal_lines
    if shard_lines is not None:
        extra["shard_lines"] = shard_lines
    if splicer is not None and listener.mode != "terminate":
        # kernel splice for passthrough and plain listeners only
        extra["splicer"] = splicer
    if limits is not None:
        # The same listener across a reload: its counts carry over.
        limits.reconfigure(listener.max_connections, listener.per_source)
    else:
        limits = AdmissionLimits(listener.max_connections, listener.per_source, clock)
    if limits.enabled or limits.open:
        extra["limits"] = limits
    return ListenerContext(
        config=listener,
        names=parts.names,
        resolver=resolver,
        signer=parts.signer,
        connector=connector,
        metrics=metrics,
        clock=clock,
        tlv_type=config.signing.tlv_type,
        server_tls=parts.server_tls.get(listener.name),
        upstream_tls=parts.upstream_tls,
        admission=admission,
        **extra,
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


def _file_bytes(path: Optional[str]) -> bytes:
    if path is None:
        return b""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


# ---------------------------------------------------------------------------
# Applying


class Reloader:
    """
    Applies a new configuration to a running ``ProxyService`` (``root``).

    ``root`` provides ``config``, ``resolver``, ``metrics``, ``connector``,
    ``parts``, ``factories``, ``threat_intel``, ``health``,
    ``retired_connections`` (connection sets of listeners removed while
    their connections finish) and ``health_tls`` (replaced here), and
    ``listening_service(listener, factory)`` to make a (not yet started)
    listening service.
    """

    def __init__(self, root, reactor) -> None:
        self._root = root
        self._reactor = reactor
        config = root.config
        self._intel_keys = _file_bytes(config.threat_intel.trusted_keys if config.threat_intel else None)

    def reload(self, path: Optional[str] = None) -> ReloadSummary:
        """
        Read ``path`` (by default the running configuration's file) and
        apply it; raise ``ConfigError`` with one line per problem, having
        changed nothing, when it cannot be applied.
        """
        root = self._root
        old = root.config
        path = path or old.path
        if not path:
            raise ConfigError(["the running configuration was not read from a file"])
        new = load_config(path)
        parts = build_parts(new, self._reactor)
        intel_keys = _file_bytes(new.threat_intel.trusted_keys if new.threat_intel else None)
        intel_action = self._intel_action(old, new, intel_keys)
        if intel_action in ("started", "restarted"):
            # Validates the trusted keys and the state file; the one that
            # runs is built once the old one is out of the registry.
            try:
                build_threat_intel(new, root.resolver, self._reactor, registry=None)
            except ThreatIntelError as e:
                raise ConfigError([str(e)]) from None
        summary = summarise(
            old, new, threat_intel=intel_action, key_changed=parts.key_pem != root.parts.key_pem
        )
        access_log = None
        if summary.access_log_changed:
            # Opened before anything changes: a file that cannot be opened
            # refuses the reload and the running log stays.
            try:
                access_log = AccessLog(new.log.access, new.log.access_file)
            except AccessLogError as e:
                raise ConfigError([str(e)]) from None
        try:
            opened = self._open_listeners(new, parts, summary, access_log or root.access_log)
        except ConfigError:
            if access_log is not None:
                access_log.close()
            raise
        try:
            root.resolver.replace_config(new)
        except ValueError as e:
            for service in opened.values():
                service.stopService()
            if access_log is not None:
                access_log.close()
            raise ConfigError([f"service: {e}"]) from None
        # From here on nothing can refuse the reload.
        if access_log is not None:
            # Connections already open keep writing to the old log through
            # their context; its file is closed when the last of them ends.
            root.access_log = access_log
        self._commit(old, new, parts, opened, summary, intel_keys)
        return summary

    def _intel_action(self, old: Config, new: Config, keys: bytes) -> str:
        if old.threat_intel is None and new.threat_intel is None:
            return "none"
        if old.threat_intel is None:
            return "started"
        if new.threat_intel is None:
            return "stopped"
        if old.threat_intel != new.threat_intel or keys != self._intel_keys:
            return "restarted"
        return "unchanged"

    def _open_listeners(self, new: Config, parts: Parts, summary: ReloadSummary, access: AccessLog) -> dict:
        """Listen on every new endpoint now; on a failure close them all and refuse."""
        root = self._root
        opened: dict = {}
        wanted = set(summary.listeners_added) | set(summary.listeners_rebound)
        problems = []
        for index, listener in enumerate(new.listeners):
            if listener.name not in wanted:
                continue
            # The context is set again at commit time, with the feeds then in force.
            factory = ProxyFactory(
                listener_context(new, listener, parts, resolver=root.context_resolver, connector=root.connector,
                                 metrics=root.metrics, clock=self._reactor,
                                 access=access, refusal_lines=root.refusal_lines, shard_lines=root.shard_lines, splicer=root.splicer)
            )
            service = root.listening_service(listener, factory)
            try:
                service.listen()
            except Exception as e:
                problems.append(f"listener[{index}].listen: {_one_line(e)}")
                continue
            opened[listener.name] = service
        if problems:
            for service in opened.values():
                service.stopService()
            raise ConfigError(problems)
        return opened

    def _commit(self, old: Config, new: Config, parts: Parts, opened: dict, summary: ReloadSummary,
                intel_keys: bytes) -> None:
        root = self._root
        reactor = self._reactor
        root.config = new
        root.parts = parts
        root.health_tls = health_tls_options(parts.upstream_tls)
        self._intel_keys = intel_keys
        self._swap_threat_intel(new, summary.threat_intel)
        if root.health is None:
            health = build_health_service(new, root.resolver, reactor, tls_options_for=root.current_health_tls)
            if health is not None:
                root.health = health
                health.setServiceParent(root)
        admission = root.threat_intel.denies if root.threat_intel is not None else None
        # Listeners: removed (and rebound) ones stop listening first; their
        # open connections finish on the context they have.
        new_names = {l.name for l in new.listeners}
        for listener in old.listeners:
            if listener.name in new_names and listener.name not in summary.listeners_rebound:
                continue
            factory = root.factories.pop(listener.name)
            root.retired_connections.append(factory.context.connections)
            service = root.getServiceNamed(f"listener:{listener.name}")
            service.disownServiceParent()
        for listener in new.listeners:
            if listener.name in opened:
                service = opened[listener.name]
                factory = service.factory
                factory.set_context(
                    listener_context(new, listener, parts, resolver=root.context_resolver, connector=root.connector,
                                     metrics=root.metrics, clock=reactor, admission=admission,
                                     access=root.access_log, refusal_lines=root.refusal_lines, shard_lines=root.shard_lines, splicer=root.splicer)
                )
                root.factories[listener.name] = factory
                service.setName(f"listener:{listener.name}")
                service.setServiceParent(root)
            else:
                factory = root.factories[listener.name]
                factory.set_context(
                    listener_context(new, listener, parts, resolver=root.context_resolver, connector=root.connector,
                                     metrics=root.metrics, clock=reactor, admission=admission,
                                     access=root.access_log, refusal_lines=root.refusal_lines, shard_lines=root.shard_lines, splicer=root.splicer,
                                     connections=factory.context.connections, limits=factory.context.limits)
                )
        root.retired_connections[:] = [c for c in root.retired_connections if c]

    def _swap_threat_intel(self, new: Config, action: str) -> None:
        root = self._root
        if action in ("none", "unchanged"):
            return
        old = root.threat_intel
        if old is not None:
            old.disownServiceParent()
            overrides = old.status().get("overrides", {})
            for shard_id in overrides:
                try:
                    root.resolver.set_security_score(shard_id, None)
                except Exception:
                    pass  # the shard left with this reload
            # The feed series are registered once per registry.
            for collector in _feed_collectors(old):
                try:
                    root.metrics.registry.unregister(collector)
                except KeyError:
                    pass
            root.threat_intel = None
            root.resolver.set_admission(None)
        if action in ("started", "restarted"):
            try:
                intel = build_threat_intel(new, root.resolver, self._reactor, registry=root.metrics.registry)
            except ThreatIntelError as e:
                # Validated a moment ago: only a file changed meanwhile gets here.
                log.critical("threat feeds not restarted: {error}", error=str(e))
                return
            root.threat_intel = intel
            root.resolver.set_admission(intel.denies)
            intel.setServiceParent(root)


def _feed_collectors(intel) -> list:
    """The Prometheus collectors a ``ThreatIntel`` registered (none without a registry)."""
    metrics = getattr(intel, "_metrics", None)
    if metrics is None:
        return []
    return [v for v in vars(metrics).values() if hasattr(v, "collect")]
