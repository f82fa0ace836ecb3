# -*- test-case-name: tests.resolver.test_resolver -*-
"""
The ShardResolver: which shard should take this connection, right now.

It owns the records and the live state (``shardtcp.resolver.state``) and
runs the one ranking pipeline (``shardtcp.resolver.ranking``) for both
``resolve`` and ``explain``; it provides ``IResolver`` to the connection
path and ``IResolverControl`` to the health checker, the threat feeds and
the admin interface, whose ``/status`` is rendered from ``snapshot()`` by
``shardtcp.status``.

The resolver knows no protocol. The connection path hands it a
``ConnectionRequest`` (service id, client address) and gets back the
eligible shards, the one to connect to first and the retry order after it;
it then takes a ``Lease`` on the one it connects to, reports how the
connect went (``record_connect_result``), and releases the lease when the
connection ends.

How a shard is chosen, for one request:

1. **Access.** A client address that is not an IP, or that a threat feed
   in force denies (``set_admission``), is refused; then the address is
   checked against the service policy's ``deny`` then ``allow`` networks. Deny wins over allow; an address in no
   allow network is denied. A denied client gets ``AccessDenied`` before any
   shard is looked at.
2. **Filters**, of two kinds.

   *Hard filters* are never set aside. A shard is dropped while it drains:
   the operator's ``drain`` (``set_admin_state``), its agent's ``drain`` or
   ``maint``, or ``set_health(DRAINING)``; an operator's ``ready`` overrides
   the agent's drain, not the operator's own. It is dropped when its current
   security score is below ``min_security_score``, and when ``regions`` is
   set and the shard's region matches none of its patterns (``fnmatch``
   globs, case-insensitive; a shard without a region matches no pattern).

   *Health filters*: a shard is dropped when its active health check calls
   it UNHEALTHY (``shardtcp.resolver.health``), and while passive outlier
   detection has it ejected after consecutive connect failures
   (``shardtcp.resolver.outlier``).

   **Panic mode** (Envoy's panic threshold): when fewer than
   ``panic_threshold`` (50 %) of the shards that pass the hard filters also
   pass the health filters, the health filters are set aside and the
   resolver routes among all of those shards rather than overload the few
   left, or refuse everyone when none is left. Entering and leaving panic
   mode are logged once per transition. Nothing left after the hard
   filters: ``NoShardAvailable``, whose message says why each shard was
   dropped.
3. **Score.** Each remaining shard gets the latency, security and load
   factors and their weighted mean, the *base* score (see
   ``shardtcp.resolver.scoring`` for the formulas), multiplied by the
   shard's effective weight (operator weight × agent weight % × slow-start
   ramp) into its *total*. Latency starts from the great-circle distance
   between the client and the shard and adds the shard's measured excess
   delay (its peak-EWMA connect time beyond what its distance from the
   proxy predicts). The client's location comes from ``[geo]`` (longest
   prefix wins); a client in no geo network is placed at the proxy's own
   location, since the proxy-to-shard leg is then the only part of the path
   known; with neither, or without a shard location, the latency factor
   rests on the measurement alone, or is a neutral 0.5. Load is
   ``max(open leases / capacity, agent-reported load)``.
4. **Rank.** Shards with spare capacity come first, then shards at or over
   capacity (load >= 1), so that a full shard never takes a connection while
   another has room, whatever the weights. Within each group: higher total
   first, then fewer open connections, then shard id. This is the retry
   order, and ``explain``'s order.
5. **Draw.** The first candidate is drawn among the best few with a
   cryptographically secure random source (power of two choices on a
   fair-share ledger, ``shardtcp.resolver.choice``); the others follow in
   rank order, at most ``retries`` of them. Only the service, the client's
   address and the shards' live state shape the draw: SNI, ALPN, preamble,
   listener and ports do not.

``resolve`` runs these steps on orderings kept up to date as shards change
(``shardtcp.resolver.shortlist``), so its cost does not grow with the
number of shards; ``explain`` runs them over every shard
(``ranking.rank``), the reference the orderings are tested against.

Shard keys (SPEC section 10): for a service with a ``shard_key``, step 5
is replaced by ownership (``shardtcp.resolver.ownership``; each key's
owners kept per service by ``shardtcp.resolver.ownercache``): the eligible
shards are ordered for the request's key by weighted rendezvous hashing,
after the owners ``[service.S.owners]`` pins, and the first owner under
its bounded load comes first, the other eligible owners after it in
chain order.  No draw: only the key chooses.  A request without a key to
such a service is refused with ``NoShardKey``.

Anti-herding: ``open_connections`` counts leases, and the connection path
takes its lease as soon as it picks a shard, before the connect completes.
The very next ``resolve`` therefore already sees that connection in the load
factor; and the draw's ledger counts every pick at once, so even connections
that end immediately spread over equal shards instead of all landing on the
shard that was best an instant earlier.

Slow start: a shard that comes back (its health check passes ``rise``
times after failing, its ejection ends) or is added by a reload of the
records ramps its weight from 10 % to 100 % in 20 steps over its ``slow_start``
(30 s by default; 0 disables). Shards present when the resolver starts are
at full weight.

IPv4-mapped IPv6 clients (``::ffff:a.b.c.d``) are treated as their IPv4
address for geo and access matching; configured networks inside
``::ffff:0:0/96`` are likewise turned into their IPv4 form, so either
spelling of a rule matches either spelling of an address.

Live state (health, admin and agent state, security-score and weight
overrides, leases, connect counters, ejections, measured latency, the draw's
ledger) is kept per shard id and survives reloads of the records, so shard
ids must be unique across services.
"""

from __future__ import annotations

import secrets
from collections import Counter, OrderedDict
from typing import Callable, Iterable, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from shardtcp.loglimit import ShardLineLimiter
from shardtcp.model import (
    Config,
    ConnectionRequest,
    Evaluation,
    Health,
    Location,
    ServiceConfig,
    ShardInfo,
)
from shardtcp.net import PrefixTable, normalise_network
from shardtcp.resolver import choice, ownercache, ownership, ranking, scoring, shortlist
from shardtcp.resolver.agent import AgentReport
from shardtcp.resolver.interfaces import IResolver, IResolverControl
from shardtcp.resolver.outlier import OutlierPolicy
from shardtcp.resolver.snapshot import ResolverSnapshot, ServiceSnapshot, ShardSnapshot
from shardtcp.resolver.sources import IShardSource, StaticShardSource
from shardtcp.resolver.state import ADMIN_STATES, ConnectStats, Lease, ShardState

__all__ = [
    "ADMIN_STATES",
    "AccessDenied",
    "Candidate",
    "ConnectStats",
    "DEFAULT_RETRIES",
    "Explanation",
    "Lease",
    "NoShardAvailable",
    "NoShardKey",
    "ResolverError",
    "ShardExplanation",
    "ShardResolver",
    "UnknownService",
    "UnknownShard",
    "build_resolver",
]

log = Logger()

# How many [geo] locations get their orderings built at start and reload.
_WARM_LOCATIONS = 4

# How many client addresses ``resolve`` remembers the location of.
_LOCATED_KEPT = 4096

#: How many shards ``resolve`` offers after the first, unless told.
DEFAULT_RETRIES = 2

# How many shard ids and distinct reasons a NoShardAvailable message lists
# before it summarises: the message goes into logs once per refused
# connection, so it must stay bounded whatever the number of shards.
_IDS_SHOWN = 3
_GROUPS_SHOWN = 5
# How many distinct recent keys per keyed service the status counts: a
# bounded picture, whatever the number of keys clients send.
_RECENT_KEYS = 4096


# ---------------------------------------------------------------------------
# Errors


class ResolverError(Exception):
    """
    The resolver could not offer a shard.

    ``reason`` is a short, stable slug for logs and metrics labels.
    """

    reason = "resolver-error"


class UnknownService(ResolverError):
    """No service has this id."""

    reason = "unknown-service"

    def __init__(self, service_id: str) -> None:
        super().__init__(f"unknown service {service_id!r}")
        self.service_id = service_id


class UnknownShard(ResolverError):
    """No shard has this id (in any service)."""

    reason = "unknown-shard"

    def __init__(self, shard_id: str) -> None:
        super().__init__(f"unknown shard {shard_id!r}")
        self.shard_id = shard_id


class AccessDenied(ResolverError):
    """
    The service policy's ``allow``/``deny`` networks refuse the client.

    ``rule`` names the rule that decided, e.g. ``"policy.deny 10.0.0.0/8"``.
    """

    reason = "access-denied"

    def __init__(self, service_id: str, client: str, rule: str) -> None:
        super().__init__(
            f"client {client} may not reach service {service_id!r}: {rule}"
        )
        self.service_id = service_id
        self.client = client
        self.rule = rule


class NoShardAvailable(ResolverError):
    """
    Every shard of the service was filtered out.

    ``rejections`` maps each shard id to the reasons it was dropped; the
    message summarises them, grouping shards dropped for the same reasons.
    """

    reason = "no-shard-available"

    def __init__(
        self, service_id: str, rejections: dict[str, tuple[str, ...]]
    ) -> None:
        super().__init__(_summarise_rejections(service_id, rejections))
        self.service_id = service_id
        self.rejections = dict(rejections)


class NoShardKey(ResolverError):
    """The service routes by shard key and the request carries none."""

    reason = "no-shard-key"

    def __init__(self, service_id: str, source: str) -> None:
        super().__init__(
            f"service {service_id!r} routes by shard key ({source}) and the "
            "connection has none"
        )
        self.service_id = service_id
        self.source = source


def _summarise_rejections(
    service_id: str, rejections: dict[str, tuple[str, ...]]
) -> str:
    if not rejections:
        return f"no shard available for service {service_id!r}: it has no shards"
    groups: dict[tuple[str, ...], list[str]] = {}
    for shard_id, reasons in rejections.items():
        groups.setdefault(reasons, []).append(shard_id)
    parts = []
    for reasons, ids in list(groups.items())[:_GROUPS_SHOWN]:
        shown = ", ".join(ids[:_IDS_SHOWN])
        if len(ids) > _IDS_SHOWN:
            shown += f" and {len(ids) - _IDS_SHOWN} more"
        parts.append(f"{shown} ({'; '.join(reasons)})")
    if len(groups) > _GROUPS_SHOWN:
        parts.append(f"{len(groups) - _GROUPS_SHOWN} more kinds of rejection")
    return f"no shard available for service {service_id!r}: " + ", ".join(parts)


# ---------------------------------------------------------------------------
# Results


@attrs.frozen
class Candidate:
    """
    An eligible shard and its score for one request.

    ``evaluation`` (and ``factors``, its typed details) are worked out when
    first asked for, from the inputs the ranking used: ``resolve`` itself
    does not build them.
    """

    shard: ShardInfo
    ranked: ranking.Ranked = attrs.field(repr=False)
    client: ranking.Client = attrs.field(repr=False)
    at: float = attrs.field(repr=False)

    @property
    def factors(self) -> ranking.Factors:
        """Every input of the score."""
        return ranking.factors(self.ranked, self.client, self.at)

    @property
    def evaluation(self) -> Evaluation:
        """The score factor by factor, with ``details``."""
        return _evaluation(self.ranked, self.factors)


def _evaluation(ranked: ranking.Ranked, factors: ranking.Factors) -> Evaluation:
    return Evaluation(
        shard_id=ranked.info.shard_id,
        latency=ranked.latency,
        security=ranked.security,
        load=ranked.spare,
        total=ranked.total,
        details=factors.as_dict(),
    )


@attrs.frozen
class ShardExplanation:
    """
    One shard's part in an explanation.

    ``rejected_by`` lists why the shard would not be chosen, e.g.
    ``("health: unhealthy",)``, ``("min_security_score: 40 < 50",)`` or
    ``("regions: us-east not in ['eu-*']",)``,
    ``("ejected until 2026-01-01T12:00:10Z (3 consecutive failures)",)``,
    or for a client refused admission ``("denied: policy.deny ...", ...)``;
    empty means eligible. ``set_aside`` lists the health reasons that panic
    mode set aside for an eligible shard.

    ``factors`` holds each input of the score (``shardtcp.resolver.ranking.
    Factors``); ``evaluation.details`` the same by name.
    """

    shard: ShardInfo
    evaluation: Evaluation
    rejected_by: tuple[str, ...] = ()
    set_aside: tuple[str, ...] = ()
    factors: Optional[ranking.Factors] = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class Explanation:
    """
    The ranking the resolver would make for a request, without side effects.

    ``location_source`` says where ``client_location`` came from: ``"geo"``,
    ``"proxy"`` (the proxy's own location stood in) or ``"unknown"``.
    ``denied`` is the admission refusal (not an IP address, a threat feed
    in force, the policy's access rules), or None; when it is set no shard
    is eligible and every shard's ``rejected_by`` starts with it. ``shards``
    holds the eligible shards in rank order (the pool the first candidate is
    drawn from is marked ``in_draw``), then the rejected ones. ``panic``
    says whether panic mode is in force for the service.  For a service
    routing by shard key, ``key`` is the key explained and ``owners`` its
    owner chain: who takes it, and why each owner before it was skipped.
    """

    request: ConnectionRequest
    client_location: Optional[Location]
    location_source: str
    denied: Optional[str]
    shards: tuple[ShardExplanation, ...]
    panic: bool = False
    key: Optional[str] = None
    owners: Optional[ownership.OwnerChain] = None


# ---------------------------------------------------------------------------
# The resolver


@implementer(IResolver, IResolverControl)
class ShardResolver(Service):
    """
    Chooses shards for connections; see the module docstring for the rules.

    Records come from ``source`` (by default the configuration's own
    services). While the service runs it follows the source's change
    notifications; before it starts, and after it stops, it uses the records
    it last read. Geo networks and the proxy's location come from ``config``.

    ``clock`` (an ``IReactorTime``) times ejections, slow starts and
    latency samples; it defaults to the global reactor, imported only when
    first needed. ``random`` is the draw's random source (anything with a
    ``random()`` method; ``choice.SystemRandom()``, the operating system's
    CSPRNG, by default; tests inject
    a seeded ``random.Random``). ``outlier`` holds the ejection and panic
    numbers, ``rtt_decay`` the peak-EWMA's τ in seconds, ``rtt_max_age`` how
    long a measurement stays in use without a new sample, and ``band`` the
    width of the draw's pool on the 0..1 base score. ``admission``, when
    given (or set later with ``set_admission``), says why a threat feed in
    force denies a client address, or None.
    """

    def __init__(
        self,
        config: Config,
        source: Optional[IShardSource] = None,
        *,
        clock: Optional[IReactorTime] = None,
        random: Optional[choice.RandomSource] = None,
        outlier: Optional[OutlierPolicy] = None,
        rtt_decay: float = 10.0,
        rtt_max_age: float = 60.0,
        band: float = choice.DEFAULT_BAND,
        admission: Optional[ranking.ThreatCheck] = None,
    ) -> None:
        self._config = config
        self._source: IShardSource = (
            source if source is not None else StaticShardSource(config)
        )
        self._clock = clock
        self._random: choice.RandomSource = (
            random if random is not None else choice.SystemRandom()
        )
        self._outlier = outlier if outlier is not None else OutlierPolicy()
        # Bounds the ejection and return lines of each service (``_shard_lines``).
        self._lines: Optional[ShardLineLimiter] = None
        self._rtt_decay = rtt_decay
        self._rtt_max_age = rtt_max_age
        self._band = band
        self._admission = admission
        self._settings = ranking.Settings(
            rtt_max_age=rtt_max_age, panic_threshold=self._outlier.panic_threshold
        )
        self._proxy_location = config.proxy.location
        self._geo: PrefixTable[Location] = PrefixTable(
            (normalise_network(g.network), g.location) for g in config.geo
        )
        self._states: dict[str, ShardState] = {}
        self._tables: dict[str, ranking.ServiceTable] = {}
        self._indexes: dict[str, shortlist.ServiceIndex] = {}
        # Where client addresses are placed ([geo] does not change while
        # the resolver lives); bounded, emptied when full.
        self._located: dict[str, ranking.Client] = {}
        # service id -> client address -> the policy's verdict (bounded).
        self._verdicts: dict[str, dict[str, Optional[str]]] = {}
        self._panic: dict[str, bool] = {}
        # service id -> recent key -> the shard that took it (bounded)
        self._recent_keys: dict[str, OrderedDict[str, str]] = {}
        # keyed service id -> (index, weights version, owners kept per key)
        self._owner_caches: dict[str, tuple[object, int, ownercache.OwnerCache]] = {}
        self._watchers: dict[object, Callable[[], None]] = {}
        self._unsubscribe: Optional[Callable[[], None]] = None
        self._loaded = False
        # Bad records at construction are a configuration error: fail loudly.
        self._apply(self._source.services())
        self._loaded = True

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:
        """Follow the source's changes, and catch up on any made meanwhile."""
        super().startService()
        self._unsubscribe = self._source.subscribe(self.reload)
        self.reload()

    def stopService(self) -> None:
        """Stop following the source; say which ejection lines were held back."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        lines, self._lines = self._lines, None
        if lines is not None:
            lines.stop()
        return super().stopService()

    def reload(self) -> None:
        """
        Read the source's records again.

        Invalid records (duplicate shard ids, negative weights) are logged
        and ignored, keeping the previous records: a bad registry update must
        not take routing down. After a good reload, ``watch`` callbacks run.
        """
        try:
            self._apply(self._source.services())
        except ValueError as e:
            log.error(
                "shard records rejected, keeping the previous ones: {error}",
                error=str(e),
            )
            return
        log.info(
            "shard records loaded: {services} services, {shards} shards",
            services=len(self._tables),
            shards=len(self._states),
        )
        if self.running:
            self._warm()
        for callback in list(self._watchers.values()):
            try:
                callback()
            except Exception:
                log.failure("a shard-records watcher failed")

    def _warm(self) -> None:
        """
        Build each service's orderings now, for clients placed at the
        proxy's location (or nowhere) and at the first ``_WARM_LOCATIONS``
        distinct ``[geo]`` locations, so that the first connections after a
        start or a reload do not pay for it (about 80 ms per location at
        10,000 shards) while others wait.  Other locations are built at
        their first connection.
        """
        now = self._now()
        locations: list[Optional[Location]] = [self._proxy_location]
        for g in self._config.geo:
            if len(locations) > _WARM_LOCATIONS:
                break
            if g.location not in locations:
                locations.append(g.location)
        for index in self._indexes.values():
            for row in index.refresh(now):
                self._note_ejection_ended(row.state, now)
            for location in locations:
                index.bucket(location)

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """
        Call ``callback()`` after every successful reload of the records
        (the health checker follows shards coming and going this way).
        Return a function that cancels the watch; calling it twice is
        harmless.
        """
        token = object()
        self._watchers[token] = callback
        return lambda: self._watchers.pop(token, None)

    def replace_config(self, config: Config) -> None:
        """
        Take a reloaded configuration in place (SIGHUP, ``POST /reload``):
        its ``[geo]`` networks, the proxy's location, the ``[resolver]``
        tuning and, for a static registry, its records.  Live state stays
        per shard id, as on any reload of the records.  Raises
        ``ValueError`` and changes nothing when the records are invalid.
        """
        services = tuple(config.services)
        _check_records(services)
        tuning = config.resolver
        self._config = config
        self._proxy_location = config.proxy.location
        self._geo = PrefixTable(
            (normalise_network(g.network), g.location) for g in config.geo
        )
        self._rtt_decay = tuning.latency_decay
        self._outlier = _outlier_policy(tuning)
        self._settings = ranking.Settings(
            rtt_max_age=self._rtt_max_age, panic_threshold=self._outlier.panic_threshold
        )
        if isinstance(self._source, StaticShardSource):
            self._source = StaticShardSource(config)
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = self._source.subscribe(self.reload)
        elif hasattr(self._source, "replace_config"):
            # A registry merges the file's services with its own shards.
            self._source.replace_config(config)
        self.reload()

    def _apply(self, services: Iterable[ServiceConfig]) -> None:
        """Rebuild the per-service tables, reusing each shard's live state."""
        services = tuple(services)
        # Checked before any state is touched: a bad update changes nothing.
        _check_records(services)
        tables: dict[str, ranking.ServiceTable] = {}
        states: dict[str, ShardState] = {}
        for service in services:
            if service.id in tables:
                raise ValueError(f"service {service.id!r} appears twice")
            # Validate the weights now rather than on the first connection.
            scoring.total_score(service.weights, 0.0, 0.0, 0.0)
            shard_states = []
            for shard in service.shards:
                if shard.id in states:
                    raise ValueError(f"shard id {shard.id!r} appears twice")
                if shard.weight < 0:
                    raise ValueError(f"shard {shard.id!r} has a negative weight")
                state = self._states.get(shard.id)
                if state is None:
                    state = ShardState(config=shard, service_id=service.id)
                    if self._loaded:
                        # A shard added while running starts cold.
                        state.back_since = self._now()
                else:
                    state.config = shard
                    state.service_id = service.id
                states[shard.id] = state
                shard_states.append(state)
            tables[service.id] = ranking.ServiceTable.build(
                service, shard_states, self._proxy_location
            )
        # Shards gone from the records lose their state here; leases still
        # held on them release harmlessly into the orphaned object.
        self._tables = tables
        self._states = states
        self._indexes = {
            sid: shortlist.ServiceIndex(table, self._settings) for sid, table in tables.items()
        }
        self._panic = {sid: on for sid, on in self._panic.items() if sid in tables}
        self._verdicts = {}

    def _now(self) -> float:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        return self._clock.seconds()  # type: ignore[union-attr]

    # -- records ------------------------------------------------------------

    def _table(self, service_id: str) -> ranking.ServiceTable:
        table = self._tables.get(service_id)
        if table is None:
            raise UnknownService(service_id)
        return table

    def _state(self, shard_id: str) -> ShardState:
        state = self._states.get(shard_id)
        if state is None:
            raise UnknownShard(shard_id)
        return state

    def services(self) -> tuple[ServiceConfig, ...]:
        """Return the current records of every service."""
        return tuple(table.config for table in self._tables.values())

    def service_config(self, service_id: str) -> ServiceConfig:
        """Return a service's current record; raise ``UnknownService``."""
        return self._table(service_id).config

    def get_shard_info(self, service_id: str) -> list[ShardInfo]:
        """
        Return every shard of a service as it stands now, in record order.

        Includes the shards that ``resolve`` would filter out. ``health`` is
        the effective one (UNHEALTHY when the check fails or the shard is
        ejected, DRAINING when it drains), ``load`` the combined load and
        ``weight`` the effective weight.
        """
        now = self._now()
        return [state.info(now) for state in self._table(service_id).shards]

    # -- live inputs --------------------------------------------------------

    def set_admission(self, admission: Optional[ranking.ThreatCheck]) -> None:
        """
        Say which threat feeds are in force: ``admission(ip)`` returns why a
        feed denies the client address, or None (``ThreatIntel.denies``).
        ``resolve`` and ``explain`` both refuse such a client.
        """
        self._admission = admission

    def set_health(self, shard_id: str, health: Health) -> None:
        """
        Set a shard's health as its active check sees it.

        UNHEALTHY takes it out of rotation (panic mode aside); DRAINING stops
        new connections; HEALTHY after UNHEALTHY starts its slow start.
        """
        state = self._state(shard_id)
        if state.health is health:
            return
        log.info(
            "shard {shard} health {old} -> {new}",
            shard=shard_id,
            old=state.health.value,
            new=health.value,
        )
        if state.health is Health.UNHEALTHY and health is Health.HEALTHY:
            state.back_since = self._now()
        state.health = health

    def set_admin_state(self, shard_id: str, admin_state: Optional[str]) -> None:
        """
        Set the operator's override: ``"drain"`` (no new connections, the
        existing ones kept), ``"ready"`` (take connections even when the
        shard's agent asks for a drain; a failing health check still takes
        it out) or None (no override). The admin API's drain/ready.
        """
        if admin_state is not None and admin_state not in ADMIN_STATES:
            raise ValueError(
                f"admin state must be one of {ADMIN_STATES} or None, "
                f"not {admin_state!r}"
            )
        state = self._state(shard_id)
        if state.admin_state != admin_state:
            log.info(
                "shard {shard} admin state {old} -> {new}",
                shard=shard_id,
                old=state.admin_state or "none",
                new=admin_state or "none",
            )
            state.admin_state = admin_state

    def apply_agent_report(self, shard_id: str, report: AgentReport) -> None:
        """
        Take in what a shard's agent said (see ``shardtcp.resolver.agent``):
        its drain/maint/ready word, load and weight percentage. Whether it is
        up or down is the health checker's business (``set_health``).
        """
        state = self._states.get(shard_id)
        if state is None:
            return
        admin = state.agent_admin
        if report.administrative in ("drain", "maint"):
            admin = report.administrative
        elif report.administrative == "ready":
            admin = None
        if admin != state.agent_admin:
            log.info(
                "shard {shard} agent state {old} -> {new}",
                shard=shard_id,
                old=state.agent_admin or "ready",
                new=admin or "ready",
            )
            state.agent_admin = admin
        state.agent_load = report.load
        if report.weight_percent is not None:
            state.agent_weight_percent = min(100.0, max(0.0, report.weight_percent))

    def clear_agent_report(self, shard_id: str) -> None:
        """Forget what the shard's agent said (its check was removed)."""
        state = self._states.get(shard_id)
        if state is not None:
            state.agent_admin = None
            state.agent_load = None
            state.agent_weight_percent = None

    def set_security_score(self, shard_id: str, score: Optional[float]) -> None:
        """
        Override a shard's security score (0..100), or with None go back to
        the baseline from its record.
        """
        self._state(shard_id).security_override = score

    def set_weight(self, shard_id: str, weight: float) -> None:
        """
        Override a shard's weight; the override outlives record reloads.
        """
        if weight < 0:
            raise ValueError(f"weight must not be negative, not {weight!r}")
        self._state(shard_id).weight_override = weight

    def clear_weight(self, shard_id: str) -> None:
        """Drop a shard's weight override: its record's weight again."""
        self._state(shard_id).weight_override = None

    def open_connections(self) -> dict[str, int]:
        """This proxy's own open connections by shard id (shards with any)."""
        return {sid: s.open_connections for sid, s in self._states.items() if s.open_connections > 0}

    def set_remote_load(self, counts: dict[str, int]) -> None:
        """
        Take the other proxies' open connections by shard id (the fleet's
        shared load, ``shardtcp.registry.fleet``); a shard not named has
        none.  Each shard's load, and so its load factor and capacity
        check in ``resolve`` and ``explain``, counts them with its own.
        """
        for shard_id, state in self._states.items():
            remote = max(0, int(counts.get(shard_id, 0)))
            if state.remote_connections != remote:
                state.remote_connections = remote

    def lease(self, shard_id: str) -> Lease:
        """
        Count one connection against a shard until the lease is released.

        Take it as soon as a candidate is picked, before connecting: the next
        ``resolve`` then already counts it (the anti-herding rule).
        """
        return Lease(self._state(shard_id))

    def record_connect_result(
        self, shard_id: str, ok: bool, seconds: Optional[float] = None
    ) -> None:
        """
        Note the outcome of a connect to a shard, and how long it took.

        Successful connects' durations feed the shard's measured latency;
        consecutive failures eject it (``shardtcp.resolver.outlier``). A
        report about a shard that left the records meanwhile is ignored.
        """
        state = self._states.get(shard_id)
        if state is None:
            return
        stats = state.stats
        now = self._now()
        if ok:
            stats = ConnectStats(
                ok=stats.ok + 1,
                failed=stats.failed,
                consecutive_failures=0,
                last_seconds=seconds if seconds is not None else stats.last_seconds,
                last_at=now,
            )
            if seconds is not None:
                self._observe_rtt(state, seconds, now, stats)
            else:
                state.stats = stats
        else:
            state.stats = ConnectStats(
                ok=stats.ok,
                failed=stats.failed + 1,
                consecutive_failures=stats.consecutive_failures + 1,
                last_seconds=stats.last_seconds,
                last_at=now,
            )
        outlier = state.outlier
        # A success after a success changes nothing in the tracker.
        duration = outlier.record(ok, now, self._outlier) if not ok or outlier.consecutive else None
        if duration is not None:
            # The ramp starts when the ejection ends.
            state.back_since = state.outlier.ejected_until
            state.ejection_open = True
            # A service whose shards all fail ejects one per connection or
            # so: its lines are bounded (10 per service and reason, 100 in
            # all per 10 s), the rest counted in a summary.  Metrics and
            # the status page show every ejection.
            if self._shard_lines().allow_key("ejected", f"service {state.service_id}"):
                log.warn(
                    "shard {shard} ejected for {seconds:g}s after {failures} "
                    "consecutive connect failures (ejection {run} in a row)",
                    shard=shard_id,
                    seconds=duration,
                    failures=state.outlier.consecutive,
                    run=state.outlier.ejections,
                )

    def record_rtt(self, shard_id: str, seconds: float) -> None:
        """
        Feed one round-trip sample (a health check's connect time) into the
        shard's measured latency.
        """
        state = self._states.get(shard_id)
        if state is not None:
            self._observe_rtt(state, seconds, self._now())

    def _observe_rtt(
        self, state: ShardState, seconds: float, now: float,
        stats: Optional[ConnectStats] = None,
    ) -> None:
        """Fold a sample into the measured latency (and write ``stats`` with it)."""
        sample = max(0.0, seconds) * 1000.0
        # ``state.measured_ms(now, self._rtt_max_age)``, inline.
        previous, at = state.rtt_ms, state.rtt_at
        if previous is None or at is None or now - at > self._rtt_max_age:
            previous = None
        value = scoring.peak_ewma(
            previous, at if previous is not None else None, sample, now, self._rtt_decay,
        )
        state.take_sample(value, now, stats)

    def connect_stats(self, shard_id: str) -> ConnectStats:
        """Return what ``record_connect_result`` has gathered for a shard."""
        return self._state(shard_id).stats

    # -- choosing -----------------------------------------------------------

    def locate_client(self, ip: str) -> tuple[Optional[Location], str]:
        """
        Return where a client is taken to be, and how that was decided.

        ``(location, "geo")`` from the most specific ``[geo]`` network;
        otherwise ``(proxy location, "proxy")``; otherwise
        ``(None, "unknown")``.
        """
        client = ranking.locate(ip, self._geo, self._proxy_location)
        return client.location, client.location_source

    def _locate(self, ip: str) -> ranking.Client:
        """``ranking.locate``, remembered for the last few thousand addresses."""
        located = self._located
        client = located.get(ip)
        if client is None:
            if len(located) >= _LOCATED_KEPT:
                located.clear()
            client = located[ip] = ranking.locate(ip, self._geo, self._proxy_location)
        return client

    def _admit(
        self, service_id: str, table: ranking.ServiceTable, client: ranking.Client
    ) -> Optional[str]:
        """
        ``ranking.admit``, with the policy's verdict on each address
        remembered until the records change (the threat feeds, which
        change on their own, are asked every time).
        """
        if client.address is not None and self._admission is not None:
            why = self._admission(client.ip)
            if why is not None:
                return why
        verdicts = self._verdicts.get(service_id)
        if verdicts is None:
            verdicts = self._verdicts[service_id] = {}
        ip = client.ip
        try:
            return verdicts[ip]
        except KeyError:
            pass
        if len(verdicts) >= _LOCATED_KEPT:
            verdicts.clear()
        denied = verdicts[ip] = ranking.admit(table, client, None)
        return denied

    def _note_ejections_ended(self, table: ranking.ServiceTable, now: float) -> None:
        for state in table.shards:
            self._note_ejection_ended(state, now)

    def _note_ejection_ended(self, state: ShardState, now: float) -> None:
        if state.ejection_open and not state.outlier.ejected(now):
            state.ejection_open = False
            # Bounded as the ejection lines are: thousands of shards may
            # come back at once.
            if self._shard_lines().allow_key("back", f"service {state.service_id}"):
                log.info(
                    "shard {shard} back from ejection (slow start {seconds:g}s)",
                    shard=state.config.id,
                    seconds=state.config.slow_start,
                )

    def _shard_lines(self) -> ShardLineLimiter:
        """The bound on ejection and return lines (made on first use, with the resolver's clock)."""
        lines = self._lines
        if lines is None:
            self._now()  # the clock, when none was given
            lines = self._lines = ShardLineLimiter(self._clock, log=log)
        return lines

    def _rank(
        self, request: ConnectionRequest, *, score_all: bool, key: Optional[str] = None
    ) -> tuple[ranking.Ranking, float]:
        """
        The reference pipeline, ``ranking.rank`` over every shard:
        ``explain`` runs it, and ``resolve``'s incremental orderings
        (``shortlist``) are tested against it.
        """
        table = self._table(request.service_id)
        client = ranking.locate(request.client[0], self._geo, self._proxy_location)
        now = self._now()
        self._note_ejections_ended(table, now)
        result = ranking.rank(
            table, client, now, self._settings,
            threat=self._admission, score_all=score_all,
        )
        result = _own(table.config, result, key if key is not None else request.shard_key)
        return result, now

    def _note_panic(self, service_id: str, panic: bool, healthy: int, total: int) -> None:
        if self._panic.get(service_id, False) == panic:
            return
        self._panic[service_id] = panic
        if panic:
            log.warn(
                "service {service} in panic mode: only {healthy} of {total} "
                "shards in rotation, routing among all {total}",
                service=service_id,
                healthy=healthy,
                total=total,
            )
        else:
            log.info(
                "service {service} out of panic mode: {healthy} of {total} "
                "shards in rotation",
                service=service_id,
                healthy=healthy,
                total=total,
            )

    def _entries(self, eligible: tuple[ranking.Ranked, ...]) -> list[choice.Entry]:
        return [
            choice.Entry(
                item=r,
                base=r.base,
                weight=max(0.0, r.total),
                full=r.info.load >= 1.0,
                ledger=r.state.ledger if r.state is not None else 0.0,
            )
            for r in eligible
        ]

    def evaluate_shard(
        self, shard_info: ShardInfo, request: ConnectionRequest
    ) -> Evaluation:
        """
        Score one shard for a request (with the weights of the shard's
        service), whether or not the filters would let it through. The
        load, weight and security score are taken from ``shard_info``; the
        measured latency from the shard's live state.
        """
        table = self._table(shard_info.service_id)
        client = ranking.locate(request.client[0], self._geo, self._proxy_location)
        now = self._now()
        state = self._states.get(shard_info.shard_id)
        ranked = ranking.score(
            shard_info,
            state,
            client,
            table.config.weights,
            ranking.expected_rtt_ms(self._proxy_location, shard_info.location),
            state.measured_ms(now, self._rtt_max_age) if state is not None else None,
        )
        return _evaluation(ranked, ranking.factors(ranked, client, now))

    def resolve(
        self, request: ConnectionRequest, retries: int = DEFAULT_RETRIES
    ) -> list[Candidate]:
        """
        Return the shards to try for a request: first the one to connect
        to, drawn among the best few, then at most ``retries`` others in
        rank order (the retry order; pass the listener's ``retries``).

        Raises ``UnknownService``, ``AccessDenied`` (checked before any
        shard: not an IP, a threat feed in force, the policy's access rules)
        or ``NoShardAvailable``. Take a ``lease`` on the candidate actually
        used. Only the request's service, client address and (for a service
        routing by shard key) shard key are read.

        The cost does not grow with the number of shards: the service's
        orderings are kept up to date incrementally (``shortlist``), and
        give what ``ranking.rank`` would give for the same state.
        """
        service_id = request.service_id
        table = self._table(service_id)
        index = self._indexes[service_id]
        client = self._locate(request.client[0])
        now = self._now()
        for row in index.refresh(now):
            if row.state.ejection_open:
                self._note_ejection_ended(row.state, now)
        denied = self._admit(service_id, table, client)
        if denied is not None:
            raise AccessDenied(service_id, request.client[0], denied)
        bucket = index.bucket(client.location)
        if self._panic.get(service_id, False) is not index.panic:
            self._note_panic(service_id, index.panic, index.healthy, index.passing)
        retries = max(0, retries)
        source = table.config.shard_key
        if source != "none":
            # Routing by shard key: the key's owners among the eligible
            # shards, in owner order; no draw.
            if request.shard_key is None:
                raise NoShardKey(service_id, source)
            return self._by_key(table.config, request.shard_key, index, bucket, client, now, retries)
        drawn = index.draw(bucket, self._band, self._random)
        if drawn is None:
            raise NoShardAvailable(service_id, index.rejections())
        first, ledger = drawn
        assert first.state is not None
        first.state.ledger = ledger
        index.drawn(first.state)
        ordered = [Candidate(first.info, first, client, now)]
        for r in index.leading(bucket, retries + 1):
            if r is not first and len(ordered) <= retries:
                ordered.append(Candidate(r.info, r, client, now))
        return ordered

    def _by_key(
        self,
        config: ServiceConfig,
        key: str,
        index: shortlist.ServiceIndex,
        bucket: shortlist.Bucket,
        client,
        now: float,
        retries: int,
    ) -> list[Candidate]:
        """
        The eligible shards in the key's owner order (at most ``1 +
        retries``): ``ownership.chain``'s order, from the owners kept for
        the key over all members (``ownercache``), the ones not eligible
        now skipped, the bounded load checked against the eligible totals
        the index keeps.  Only the owners walked are read.
        """
        panic = index.panic
        count = index.passing if panic else index.healthy
        if not count:
            raise NoShardAvailable(config.id, index.rejections())
        total_open, total_weight = index.totals.of(panic)
        bounded_load = config.bounded_load
        cache = self._owner_cache(config, index)
        shard_at = bucket.ranked.get
        owners = cache.owners_of(key)
        members = len(cache.ids)
        taker: Optional[ranking.Ranked] = None
        skipped: list[ranking.Ranked] = []
        after: list[ranking.Ranked] = []
        i = 0
        while True:
            if i == len(owners):
                if i >= members:
                    break
                owners = cache.owners_of(key, at_least=4 * i)
            r = shard_at(owners[i])
            i += 1
            if r is None or (r.set_aside and not panic):
                continue
            if taker is None:
                # The operator's weight (the slow-start ramp must not move
                # keys) and the live open connections, the fleet's.
                state = r.state
                bound = ownership.bound(state.weight, total_open, total_weight, count, bounded_load)
                if state.open_connections + state.remote_connections >= bound:
                    skipped.append(r)
                    continue
                taker = r
            else:
                after.append(r)
            if len(skipped) + len(after) >= retries:
                break
        if taker is None:
            # Only rounding leaves every eligible owner at its bound: the
            # first one takes the key rather than nobody.
            taker = skipped.pop(0)
        order = [taker, *skipped, *after][: 1 + retries]
        recent = self._recent_keys.get(config.id)
        if recent is None:
            recent = self._recent_keys[config.id] = OrderedDict()
        recent[key] = taker.info.shard_id
        recent.move_to_end(key)
        while len(recent) > _RECENT_KEYS:
            recent.popitem(last=False)
        return [Candidate(r.info, r, client, now) for r in order]

    def _owner_cache(
        self, config: ServiceConfig, index: shortlist.ServiceIndex
    ) -> ownercache.OwnerCache:
        """
        The owners kept for a keyed service's keys, for its members and
        operator weights as they are now: kept across reloads that change
        neither, started anew when either changes.
        """
        version = index.totals.weights_version
        kept = self._owner_caches.get(config.id)
        if kept is not None and kept[0] is index and kept[1] == version:
            return kept[2]
        states = [row.state for row in index.rows()]
        ids = [state.config.id for state in states]
        weights = [state.weight for state in states]
        if kept is not None and kept[2].fits(ids, weights, config.owners):
            cache = kept[2]
        else:
            cache = ownercache.OwnerCache(ids, weights, config.owners)
        for service_id in [s for s in self._owner_caches if s not in self._tables]:
            del self._owner_caches[service_id]
        self._owner_caches[config.id] = (index, version, cache)
        return cache

    def owner_cache(self, service_id: str) -> Optional[ownercache.OwnerCache]:
        """
        The owners a keyed service keeps per key (``ownercache``), with its
        hit and miss counts; None before its first keyed ``resolve``.
        """
        kept = self._owner_caches.get(service_id)
        return kept[2] if kept is not None else None

    def explain(self, request: ConnectionRequest, key: Optional[str] = None) -> Explanation:
        """
        Return the ranking ``resolve`` would make, with every shard's score
        and reasons for rejection, without raising for denied clients or
        empty rankings, and without drawing. A client ``resolve`` would
        refuse is shown ``denied``, with no shard eligible. For a service
        routing by shard key, ``key`` (else the request's ``shard_key``)
        gives the owner chain. Raises ``UnknownService`` only.
        """
        result, now = self._rank(request, score_all=True, key=key)
        client = result.client
        members = choice.pool(self._entries(result.eligible), self._band)
        share = {id(m.item): s for m, s in zip(members, choice.shares(members))}
        shards = []
        for r in result.eligible:
            factors = ranking.factors(
                r, client, now, in_draw=id(r) in share, draw_share=share.get(id(r), 0.0)
            )
            shards.append(
                ShardExplanation(r.info, _evaluation(r, factors), (), r.set_aside, factors)
            )
        for r in result.rejected:
            factors = ranking.factors(r, client, now)
            shards.append(
                ShardExplanation(r.info, _evaluation(r, factors), r.reasons, (), factors)
            )
        return Explanation(
            request=request,
            client_location=client.location,
            location_source=client.location_source,
            denied=result.denied,
            shards=tuple(shards),
            panic=result.panic,
            key=result.owners.key if result.owners is not None else None,
            owners=result.owners,
        )

    # -- status -------------------------------------------------------------

    def snapshot(self) -> ResolverSnapshot:
        """
        The live state of every service and shard now, as a frozen value
        (``shardtcp.status.render_status`` turns it into the admin
        ``/status`` document).
        """
        now = self._now()
        services = []
        for service_id, table in self._tables.items():
            index = self._indexes[service_id]
            for row in index.refresh(now):
                self._note_ejection_ended(row.state, now)
            panic = index.panic
            keyed = table.config.shard_key != "none"
            taken = Counter(self._recent_keys.get(service_id, {}).values()) if keyed else None
            shards = []
            for row in index.rows():
                shards.append(self._shard_snapshot(row, now, panic, taken))
            services.append(
                ServiceSnapshot(
                    service_id=service_id,
                    panic=panic,
                    in_rotation=index.healthy,
                    eligible_by_policy=index.passing,
                    shards=tuple(shards),
                )
            )
        return ResolverSnapshot(time=now, services=tuple(services))

    def _shard_snapshot(
        self, row: shortlist.Row, now: float, panic: bool, taken: Optional[Counter]
    ) -> ShardSnapshot:
        """
        One shard's part of the snapshot, from its row in the service's
        index (its filters and info as ``ranking.consider`` gives them at
        ``now``).  Kept on the row and given again while the row is not
        read again (its state written, or time changing its filters, info
        or measurement), panic mode and its recent keys stay as they were,
        and no slow-start ramp or ejection run is under way, the only
        other readings that move with the clock.
        """
        state, info = row.state, row.info
        recent = taken.get(info.shard_id, 0) if taken is not None else None
        key = (row.version, panic, recent)
        kept = row.kept
        if kept is not None and kept[0] == key:
            return kept[1]
        outlier = state.outlier
        ejected = outlier.ejected(now)
        ramp = state.ramp(now)
        snapshot = ShardSnapshot(
            shard_id=info.shard_id,
            address=str(info.address),
            region=info.region,
            health=info.health.value,
            check_health=state.health.value,
            admin_state=state.admin_state,
            agent_state=state.agent_admin,
            agent_load=state.agent_load,
            agent_weight_percent=state.agent_weight_percent,
            eligible=not row.hard and (panic or not row.soft),
            rejected_by=row.soft + row.hard,
            ejected=ejected,
            ejected_until=outlier.ejected_until if ejected else None,
            ejections=outlier.run_length(now, self._outlier),
            total_ejections=outlier.total_ejections,
            consecutive_failures=outlier.consecutive,
            open_connections=info.open_connections,
            capacity=info.capacity,
            load=info.load,
            security_score=info.security_score,
            security_baseline=state.config.security_score,
            security_source=(
                "feed" if state.security_override is not None else "baseline"
            ),
            weight=state.weight,
            weight_overridden=state.weight_override is not None,
            slow_start_ramp=ramp,
            effective_weight=info.weight,
            rtt_ms=row.measured_ms,
            rtt_samples=state.rtt_samples,
            connects_ok=state.stats.ok,
            connects_failed=state.stats.failed,
            recent_keys=recent,
        )
        until = outlier.ejected_until
        steady = ramp >= 1.0 and (
            until is None or now - until >= self._outlier.reset_after
        )
        row.kept = (key, snapshot) if steady else None
        return snapshot

    def status(self) -> dict:
        """
        The live state of every service and shard as plain JSON types, for
        the admin interface's ``/status``: ``render_status(snapshot())``.
        """
        from shardtcp.status import render_status

        return render_status(self.snapshot())


def _own(
    config: ServiceConfig, result: ranking.Ranking, key: Optional[str]
) -> ranking.Ranking:
    """
    The ownership step: for a service routing by shard key, a request with
    a key and a client admitted, the ranking with the key's owner chain
    over its eligible shards (the rejected ones, scored for explain only,
    skipped with their reasons).  Otherwise the ranking unchanged.
    """
    if config.shard_key == "none" or key is None or result.denied is not None:
        return result
    def member(r: ranking.Ranked, reasons: tuple[str, ...]) -> ownership.Shard:
        # The operator's weight: the slow-start ramp must not move keys.
        weight = r.state.weight if r.state is not None else r.info.weight
        remote = r.state.remote_connections if r.state is not None else 0
        return ownership.Shard(r.info.shard_id, weight, r.info.open_connections + remote, reasons)

    shards = [member(r, ()) for r in result.eligible]
    shards += [member(r, r.reasons or ("not eligible",)) for r in result.rejected]
    chain = ownership.chain(
        key, shards, owners=config.owners, bounded_load=config.bounded_load
    )
    return attrs.evolve(result, owners=chain)


def _check_records(services: tuple) -> None:
    """Raise ``ValueError`` for records the resolver cannot take."""
    service_ids: set = set()
    shard_ids: set = set()
    for service in services:
        if service.id in service_ids:
            raise ValueError(f"service {service.id!r} appears twice")
        service_ids.add(service.id)
        scoring.total_score(service.weights, 0.0, 0.0, 0.0)
        for shard in service.shards:
            if shard.id in shard_ids:
                raise ValueError(f"shard id {shard.id!r} appears twice")
            shard_ids.add(shard.id)
            if shard.weight < 0:
                raise ValueError(f"shard {shard.id!r} has a negative weight")


def _outlier_policy(tuning) -> OutlierPolicy:
    """The ejection and panic numbers of a ``[resolver]`` table."""
    return OutlierPolicy(
        consecutive_failures=tuning.eject_after,
        base_ejection=tuning.eject_base,
        max_ejection=tuning.eject_max,
        panic_threshold=tuning.panic_threshold,
    )


def build_resolver(
    config: Config, *, clock: IReactorTime, source: Optional[IShardSource] = None
) -> ShardResolver:
    """
    The ``ShardResolver`` of a configuration, tuned by its ``[resolver]``
    table: the one the proxy runs and the one ``shardtcp explain`` asks.
    """
    tuning = config.resolver
    return ShardResolver(
        config,
        clock=clock,
        source=source,
        rtt_decay=tuning.latency_decay,
        outlier=_outlier_policy(tuning),
    )
