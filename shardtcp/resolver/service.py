"""
The ShardResolver: which shard should take this connection, right now.

The resolver knows no protocol. The connection path hands it a
``ConnectionRequest`` (service id, client address) and gets back the
eligible shards, the one to connect to first and the retry order after it;
it then takes a ``Lease`` on the one it connects to, reports how the
connect went (``record_connect_result``), and releases the lease when the
connection ends.

How a shard is chosen, for one request:

1. **Access.** The client's address is checked against the service policy's
   ``deny`` then ``allow`` networks. Deny wins over allow; an address in no
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
   rank order. Only the service, the client's address and the shards' live
   state shape the draw: SNI, ALPN, preamble, listener and ports do not.

Anti-herding: ``open_connections`` counts leases, and the connection path
takes its lease as soon as it picks a shard, before the connect completes.
The very next ``resolve`` therefore already sees that connection in the load
factor; and the draw's ledger counts every pick at once, so even connections
that end immediately spread over equal shards instead of all landing on the
shard that was best an instant earlier.

Slow start: a shard that comes back (its health check passes ``rise``
times after failing, its ejection ends) or is added by a reload of the
records ramps its weight from 10 % to 100 % over its ``slow_start``
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

import datetime
import fnmatch
import ipaddress
import secrets
from typing import Callable, Generic, Iterable, Optional, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shardtcp.model import (
    Config,
    ConnectionRequest,
    Evaluation,
    Health,
    IPAddress,
    IPNetwork,
    Location,
    ServiceConfig,
    ShardConfig,
    ShardInfo,
    Weights,
)
from shardtcp.resolver import choice, scoring
from shardtcp.resolver.agent import AgentReport
from shardtcp.resolver.outlier import OutlierPolicy, OutlierTracker
from shardtcp.resolver.sources import IShardSource, StaticShardSource

log = Logger()

V = TypeVar("V")

_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")

# How many shard ids and distinct reasons a NoShardAvailable message lists
# before it summarises: the message goes into logs once per refused
# connection, so it must stay bounded whatever the number of shards.
_IDS_SHOWN = 3
_GROUPS_SHOWN = 5

#: Operator states accepted by ``set_admin_state``.
ADMIN_STATES = ("drain", "ready")


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
    """An eligible shard and its score for one request."""

    shard: ShardInfo
    evaluation: Evaluation


@attrs.frozen
class ShardExplanation:
    """
    One shard's part in an explanation.

    ``rejected_by`` lists why the shard would not be chosen, e.g.
    ``("health: unhealthy",)``, ``("min_security_score: 40 < 50",)`` or
    ``("regions: us-east not in ['eu-*']",)``,
    ``("ejected until 2026-01-01T12:00:10Z (3 consecutive failures)",)``;
    empty means eligible. ``set_aside`` lists the health reasons that panic
    mode set aside for an eligible shard.

    ``evaluation.details`` holds each input: ``distance_km``, ``geo_rtt_ms``,
    ``measured_rtt_ms``, ``expected_rtt_ms``, ``excess_rtt_ms``, ``rtt_ms``
    and ``latency_source`` (geo, measured, geo+measured or none);
    ``own_load``, ``agent_load`` and ``load``; ``weight``,
    ``agent_weight_percent``, ``slow_start_ramp`` and ``effective_weight``;
    ``base_total``; and for eligible shards ``in_draw`` and ``draw_share``
    (the long-run share of first picks among the pool).
    """

    shard: ShardInfo
    evaluation: Evaluation
    rejected_by: tuple[str, ...] = ()
    set_aside: tuple[str, ...] = ()


@attrs.frozen
class Explanation:
    """
    The ranking the resolver would make for a request, without side effects.

    ``location_source`` says where ``client_location`` came from: ``"geo"``,
    ``"proxy"`` (the proxy's own location stood in) or ``"unknown"``.
    ``denied`` is the access rule refusing the client, or None; when it is
    set no shard would be chosen, whatever the shards' own ``rejected_by``
    say. ``shards`` holds the eligible shards in rank order (the pool the
    first candidate is drawn from is marked ``in_draw``), then the rejected
    ones. ``panic`` says whether panic mode is in force for the service.
    """

    request: ConnectionRequest
    client_location: Optional[Location]
    location_source: str
    denied: Optional[str]
    shards: tuple[ShardExplanation, ...]
    panic: bool = False


@attrs.frozen
class ConnectStats:
    """
    What the connection path reported of its connects to one shard.

    ``last_seconds`` is the duration of the last successful connect, and
    ``last_at`` the clock time of the last report, either way.
    """

    ok: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    last_seconds: Optional[float] = None
    last_at: Optional[float] = None


# ---------------------------------------------------------------------------
# Address matching


def _parse_address(ip: str) -> Optional[IPAddress]:
    """
    Parse a client address; unwrap IPv4-mapped IPv6; None if not an IP.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _normalise_network(network: object) -> IPNetwork:
    """
    Return ``network`` as a network object, IPv4-mapped ranges as IPv4.
    """
    net = ipaddress.ip_network(network, strict=False)  # type: ignore[arg-type]
    if (
        isinstance(net, ipaddress.IPv6Network)
        and net.prefixlen >= _MAPPED_V4.prefixlen
        and net.subnet_of(_MAPPED_V4)
    ):
        return ipaddress.IPv4Network(
            (int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96)
        )
    return net


class _PrefixTable(Generic[V]):
    """
    Longest-prefix match of addresses against networks.

    One dictionary per (family, prefix length) keyed by the network bits:
    a lookup costs one dictionary probe per distinct prefix length, however
    many networks there are. When the same network is given twice the first
    entry wins (file order).
    """

    def __init__(self, entries: Iterable[tuple[IPNetwork, V]]) -> None:
        self._tables: dict[int, dict[int, dict[int, tuple[IPNetwork, V]]]] = {
            4: {},
            6: {},
        }
        for network, value in entries:
            by_length = self._tables[network.version].setdefault(
                network.prefixlen, {}
            )
            key = int(network.network_address) >> (
                network.max_prefixlen - network.prefixlen
            )
            by_length.setdefault(key, (network, value))
        self._lengths = {
            version: sorted(table, reverse=True)
            for version, table in self._tables.items()
        }

    def lookup(self, address: IPAddress) -> Optional[tuple[IPNetwork, V]]:
        """Return the most specific ``(network, value)`` holding ``address``."""
        table = self._tables[address.version]
        bits = int(address)
        width = address.max_prefixlen
        for length in self._lengths[address.version]:
            hit = table[length].get(bits >> (width - length))
            if hit is not None:
                return hit
        return None


# ---------------------------------------------------------------------------
# Per-shard and per-service state


@attrs.define(eq=False)
class _ShardState:
    """
    The live, mutable state of one shard, kept across record reloads.

    Leases hold a reference to this object, so a lease taken before a reload
    still releases the count it added.

    ``health`` is the active health check's verdict (or what ``set_health``
    set); ``admin_state`` the operator's override; ``agent_admin``,
    ``agent_load`` and ``agent_weight_percent`` what the shard's agent last
    said; ``back_since`` when the slow-start ramp began; ``ledger`` the
    draw's fair-share ledger.
    """

    config: ShardConfig
    service_id: str
    health: Health = Health.HEALTHY
    admin_state: Optional[str] = None
    agent_admin: Optional[str] = None
    agent_load: Optional[float] = None
    agent_weight_percent: Optional[float] = None
    security_override: Optional[float] = None
    weight_override: Optional[float] = None
    open_connections: int = 0
    stats: ConnectStats = attrs.field(factory=ConnectStats)
    outlier: OutlierTracker = attrs.field(factory=OutlierTracker)
    ejection_open: bool = False
    rtt_ms: Optional[float] = None
    rtt_at: Optional[float] = None
    rtt_samples: int = 0
    back_since: Optional[float] = None
    ledger: float = 0.0

    @property
    def security_score(self) -> float:
        if self.security_override is not None:
            return self.security_override
        return self.config.security_score

    @property
    def weight(self) -> float:
        """The operator's weight: the admin override, else the record's."""
        if self.weight_override is not None:
            return self.weight_override
        return self.config.weight

    def ramp(self, now: float) -> float:
        return scoring.slow_start_factor(self.back_since, now, self.config.slow_start)

    def effective_weight(self, now: float) -> float:
        agent = (
            self.agent_weight_percent / 100.0
            if self.agent_weight_percent is not None
            else 1.0
        )
        return self.weight * agent * self.ramp(now)

    def load(self) -> float:
        return scoring.combined_load(
            self.open_connections, self.config.capacity, self.agent_load
        )

    def measured_ms(self, now: float, max_age: float) -> Optional[float]:
        """The peak-EWMA connect time, unless its last sample is too old."""
        if self.rtt_ms is None or self.rtt_at is None:
            return None
        if now - self.rtt_at > max_age:
            return None
        return self.rtt_ms

    def drains(self) -> list[str]:
        """Why the shard takes no new connections (hard filters)."""
        reasons = []
        if self.admin_state != "ready":
            if self.health is Health.DRAINING:
                reasons.append("health: draining")
            if self.agent_admin is not None:
                reasons.append(f"agent: {self.agent_admin}")
        if self.admin_state == "drain":
            reasons.append("admin: drain")
        return reasons

    def sickness(self, now: float) -> list[str]:
        """Why the shard is out of rotation (the health filters)."""
        reasons = []
        if self.health is Health.UNHEALTHY:
            reasons.append("health: unhealthy")
        if self.outlier.ejected(now):
            until = self.outlier.ejected_until
            assert until is not None
            reasons.append(
                f"ejected until {_timestamp(until)} "
                f"({self.outlier.consecutive} consecutive failures)"
            )
        return reasons

    def effective_health(self, now: float) -> Health:
        if self.sickness(now):
            return Health.UNHEALTHY
        if self.drains():
            return Health.DRAINING
        return Health.HEALTHY

    def info(self, now: float) -> ShardInfo:
        return ShardInfo(
            shard_id=self.config.id,
            service_id=self.service_id,
            address=self.config.address,
            location=self.config.location,
            capacity=self.config.capacity,
            security_score=self.security_score,
            weight=self.effective_weight(now),
            health=self.effective_health(now),
            open_connections=self.open_connections,
            load=self.load(),
            server_name=self.config.server_name,
        )


def _timestamp(seconds: float) -> str:
    """Clock seconds as UTC ISO 8601, to the second: 2026-01-01T12:00:10Z."""
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.0f}s"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(eq=False)
class _Considered:
    """One shard's state, record, filters and score for one request."""

    state: _ShardState
    info: ShardInfo
    hard: tuple[str, ...]
    soft: tuple[str, ...]
    evaluation: Optional[Evaluation] = None

    @property
    def reasons(self) -> tuple[str, ...]:
        return self.soft + self.hard

    def rank_key(self) -> tuple:
        """Best first: room, then higher total, fewer connections, id."""
        assert self.evaluation is not None
        return (
            self.info.load >= 1.0,
            -self.evaluation.total,
            self.info.open_connections,
            self.info.shard_id,
        )

    def entry(self) -> choice.Entry:
        assert self.evaluation is not None
        return choice.Entry(
            item=self,
            base=self.evaluation.details["base_total"],
            weight=max(0.0, self.evaluation.total),
            full=self.info.load >= 1.0,
            ledger=self.state.ledger,
        )


@attrs.frozen
class _ServiceTable:
    """What ``resolve`` needs of one service, computed once per reload."""

    config: ServiceConfig
    shards: tuple[_ShardState, ...]
    allow: _PrefixTable[None]
    deny: _PrefixTable[None]
    allow_summary: str
    regions: tuple[str, ...]  # lower-cased patterns
    regions_text: str  # the patterns as configured, for messages


def _summarise_networks(networks: Iterable[object], limit: int = 5) -> str:
    texts = [str(n) for n in networks]
    if len(texts) > limit:
        return ", ".join(texts[:limit]) + f" and {len(texts) - limit} more"
    return ", ".join(texts)


def _number(value: float) -> str:
    """Format a score for messages: 40.0 as 40, 42.5 as 42.5."""
    return f"{value:g}"


# ---------------------------------------------------------------------------
# Leases


class Lease:
    """
    One connection (opening or open) counted against a shard.

    Obtained from ``ShardResolver.lease``; ``release()`` ends the count and
    may be called any number of times, so every path that ends a connection
    can call it without coordinating with the others.
    """

    def __init__(self, state: _ShardState) -> None:
        self._state = state
        self._released = False
        state.open_connections += 1

    @property
    def shard_id(self) -> str:
        """The id of the shard this lease counts against."""
        return self._state.config.id

    @property
    def released(self) -> bool:
        """Whether ``release()`` has been called."""
        return self._released

    def release(self) -> None:
        """Stop counting this connection; later calls do nothing."""
        if self._released:
            return
        self._released = True
        self._state.open_connections -= 1

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<Lease {self.shard_id} {state}>"


# ---------------------------------------------------------------------------
# The resolver


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
    ``random()`` method; ``secrets.SystemRandom()`` by default; tests inject
    a seeded ``random.Random``). ``outlier`` holds the ejection and panic
    numbers, ``rtt_decay`` the peak-EWMA's τ in seconds, ``rtt_max_age`` how
    long a measurement stays in use without a new sample, and ``band`` the
    width of the draw's pool on the 0..1 base score.
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
    ) -> None:
        self._config = config
        self._source: IShardSource = (
            source if source is not None else StaticShardSource(config)
        )
        self._clock = clock
        self._random: choice.RandomSource = (
            random if random is not None else secrets.SystemRandom()
        )
        self._outlier = outlier if outlier is not None else OutlierPolicy()
        self._rtt_decay = rtt_decay
        self._rtt_max_age = rtt_max_age
        self._band = band
        self._proxy_location = config.proxy.location
        self._geo: _PrefixTable[Location] = _PrefixTable(
            (_normalise_network(g.network), g.location) for g in config.geo
        )
        self._states: dict[str, _ShardState] = {}
        self._tables: dict[str, _ServiceTable] = {}
        self._panic: dict[str, bool] = {}
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
        """Stop following the source."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
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
        for callback in list(self._watchers.values()):
            try:
                callback()
            except Exception:
                log.failure("a shard-records watcher failed")

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

    def _apply(self, services: Iterable[ServiceConfig]) -> None:
        """Rebuild the per-service tables, reusing each shard's live state."""
        tables: dict[str, _ServiceTable] = {}
        states: dict[str, _ShardState] = {}
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
                    state = _ShardState(config=shard, service_id=service.id)
                    if self._loaded:
                        # A shard added while running starts cold.
                        state.back_since = self._now()
                else:
                    state.config = shard
                    state.service_id = service.id
                states[shard.id] = state
                shard_states.append(state)
            policy = service.policy
            tables[service.id] = _ServiceTable(
                config=service,
                shards=tuple(shard_states),
                allow=_PrefixTable(
                    (_normalise_network(n), None) for n in policy.allow
                ),
                deny=_PrefixTable((_normalise_network(n), None) for n in policy.deny),
                allow_summary=_summarise_networks(policy.allow),
                regions=tuple(p.lower() for p in policy.regions),
                regions_text=str(list(policy.regions)),
            )
        # Shards gone from the records lose their state here; leases still
        # held on them release harmlessly into the orphaned object.
        self._tables = tables
        self._states = states
        self._panic = {sid: on for sid, on in self._panic.items() if sid in tables}

    def _now(self) -> float:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        return self._clock.seconds()  # type: ignore[union-attr]

    # -- records ------------------------------------------------------------

    def _table(self, service_id: str) -> _ServiceTable:
        table = self._tables.get(service_id)
        if table is None:
            raise UnknownService(service_id)
        return table

    def _state(self, shard_id: str) -> _ShardState:
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
            state.stats = ConnectStats(
                ok=stats.ok + 1,
                failed=stats.failed,
                consecutive_failures=0,
                last_seconds=seconds if seconds is not None else stats.last_seconds,
                last_at=now,
            )
            if seconds is not None:
                self._observe_rtt(state, seconds, now)
        else:
            state.stats = ConnectStats(
                ok=stats.ok,
                failed=stats.failed + 1,
                consecutive_failures=stats.consecutive_failures + 1,
                last_seconds=stats.last_seconds,
                last_at=now,
            )
        duration = state.outlier.record(ok, now, self._outlier)
        if duration is not None:
            # The ramp starts when the ejection ends.
            state.back_since = state.outlier.ejected_until
            state.ejection_open = True
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

    def _observe_rtt(self, state: _ShardState, seconds: float, now: float) -> None:
        sample = max(0.0, seconds) * 1000.0
        previous = state.measured_ms(now, self._rtt_max_age)
        state.rtt_ms = scoring.peak_ewma(
            previous, state.rtt_at if previous is not None else None,
            sample, now, self._rtt_decay,
        )
        state.rtt_at = now
        state.rtt_samples += 1

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
        return self._locate(_parse_address(ip))

    def _locate(
        self, address: Optional[IPAddress]
    ) -> tuple[Optional[Location], str]:
        if address is not None:
            hit = self._geo.lookup(address)
            if hit is not None:
                return hit[1], "geo"
        if self._proxy_location is not None:
            return self._proxy_location, "proxy"
        return None, "unknown"

    def _denied(
        self, table: _ServiceTable, ip: str, address: Optional[IPAddress]
    ) -> Optional[str]:
        """Return the rule refusing the client, or None if it may pass."""
        if address is None:
            return f"client address {ip!r} is not an IP address"
        hit = table.deny.lookup(address)
        if hit is not None:
            return f"policy.deny {hit[0]}"
        if table.allow.lookup(address) is None:
            if not table.allow_summary:
                return "policy.allow is empty"
            return f"policy.allow: in none of {table.allow_summary}"
        return None

    def _policy_reasons(self, table: _ServiceTable, info: ShardInfo) -> list[str]:
        """Why the service policy refuses a shard; empty if it does not."""
        reasons = []
        minimum = table.config.policy.min_security_score
        if info.security_score < minimum:
            reasons.append(
                "min_security_score: "
                f"{_number(info.security_score)} < {_number(minimum)}"
            )
        if table.regions:
            region = info.region.lower()
            # A shard with no region cannot show where it is, so it satisfies
            # no residency constraint (fnmatch would let "*" match "").
            if not region or not any(
                fnmatch.fnmatchcase(region, p) for p in table.regions
            ):
                reasons.append(
                    f"regions: {info.region or '(none)'} not in {table.regions_text}"
                )
        return reasons

    def _consider(self, table: _ServiceTable, now: float) -> list[_Considered]:
        """Every shard of a service with its filters, not yet scored."""
        considered = []
        for state in table.shards:
            if state.ejection_open and not state.outlier.ejected(now):
                state.ejection_open = False
                log.info(
                    "shard {shard} back from ejection (slow start {seconds:g}s)",
                    shard=state.config.id,
                    seconds=state.config.slow_start,
                )
            info = state.info(now)
            hard = tuple(state.drains() + self._policy_reasons(table, info))
            considered.append(
                _Considered(state, info, hard, tuple(state.sickness(now)))
            )
        return considered

    def _select(
        self, considered: list[_Considered]
    ) -> tuple[list[_Considered], bool]:
        """
        Return the eligible shards and whether panic mode is in force: when
        fewer than ``panic_threshold`` of the shards passing the hard filters
        are healthy, every one of them is eligible.
        """
        passing = [c for c in considered if not c.hard]
        healthy = [c for c in passing if not c.soft]
        panic = bool(passing) and len(healthy) < (
            self._outlier.panic_threshold * len(passing)
        )
        return (passing if panic else healthy), panic

    def _note_panic(
        self, service_id: str, panic: bool, considered: list[_Considered]
    ) -> None:
        if self._panic.get(service_id, False) == panic:
            return
        self._panic[service_id] = panic
        passing = [c for c in considered if not c.hard]
        healthy = sum(1 for c in passing if not c.soft)
        if panic:
            log.warn(
                "service {service} in panic mode: only {healthy} of {total} "
                "shards in rotation, routing among all {total}",
                service=service_id,
                healthy=healthy,
                total=len(passing),
            )
        else:
            log.info(
                "service {service} out of panic mode: {healthy} of {total} "
                "shards in rotation",
                service=service_id,
                healthy=healthy,
                total=len(passing),
            )

    def _evaluate(
        self,
        weights: Weights,
        info: ShardInfo,
        state: Optional[_ShardState],
        location: Optional[Location],
        location_source: str,
        now: float,
    ) -> Evaluation:
        proxy = self._proxy_location
        distance: Optional[float] = None
        geo_rtt: Optional[float] = None
        expected: Optional[float] = None
        if info.location is not None:
            if location is not None:
                distance = scoring.great_circle_km(location, info.location)
                geo_rtt = scoring.estimated_rtt_ms(distance)
            if proxy is not None:
                expected = scoring.estimated_rtt_ms(
                    scoring.great_circle_km(proxy, info.location)
                )
        measured = (
            state.measured_ms(now, self._rtt_max_age) if state is not None else None
        )
        rtt = scoring.path_rtt_ms(geo_rtt, expected, measured)
        latency = (
            scoring.latency_factor(rtt) if rtt is not None else scoring.NEUTRAL_LATENCY
        )
        if measured is None:
            latency_source = "geo" if geo_rtt is not None else "none"
            excess = None
        elif geo_rtt is None:
            latency_source, excess = "measured", None
        else:
            latency_source = "geo+measured"
            excess = rtt - geo_rtt  # type: ignore[operator]
        security = scoring.security_factor(info.security_score)
        load = scoring.spare_factor(info.load)
        base = scoring.total_score(weights, latency, security, load)
        capacity = info.capacity
        return Evaluation(
            shard_id=info.shard_id,
            latency=latency,
            security=security,
            load=load,
            total=base * info.weight,
            details={
                "distance_km": distance,
                "rtt_ms": rtt,
                "geo_rtt_ms": geo_rtt,
                "measured_rtt_ms": measured,
                "expected_rtt_ms": expected,
                "excess_rtt_ms": excess,
                "latency_source": latency_source,
                "client_location_source": location_source,
                "open_connections": info.open_connections,
                "capacity": capacity,
                "own_load": (
                    info.open_connections / capacity if capacity > 0 else 1.0
                ),
                "agent_load": state.agent_load if state is not None else None,
                "load": info.load,
                "security_score": info.security_score,
                "weight": state.weight if state is not None else info.weight,
                "agent_weight_percent": (
                    state.agent_weight_percent if state is not None else None
                ),
                "slow_start_ramp": state.ramp(now) if state is not None else 1.0,
                "effective_weight": info.weight,
                "base_total": base,
                "at_capacity": info.load >= 1.0,
            },
        )

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
        location, source = self.locate_client(request.client[0])
        return self._evaluate(
            table.config.weights,
            shard_info,
            self._states.get(shard_info.shard_id),
            location,
            source,
            self._now(),
        )

    def _score(
        self,
        table: _ServiceTable,
        considered: Iterable[_Considered],
        location: Optional[Location],
        source: str,
        now: float,
    ) -> None:
        weights = table.config.weights
        for c in considered:
            c.evaluation = self._evaluate(weights, c.info, c.state, location, source, now)

    def resolve(self, request: ConnectionRequest) -> list[Candidate]:
        """
        Return the eligible shards for a request: first the one to connect
        to, drawn among the best few, then the others in rank order (the
        retry order).

        Raises ``UnknownService``, ``AccessDenied`` (checked before any
        shard) or ``NoShardAvailable``. Take a ``lease`` on the candidate
        actually used. Only the request's service and client address are
        read.
        """
        table = self._table(request.service_id)
        ip = request.client[0]
        address = _parse_address(ip)
        denied = self._denied(table, ip, address)
        if denied is not None:
            raise AccessDenied(request.service_id, ip, denied)
        location, source = self._locate(address)
        now = self._now()
        considered = self._consider(table, now)
        eligible, panic = self._select(considered)
        self._note_panic(request.service_id, panic, considered)
        if not eligible:
            raise NoShardAvailable(
                request.service_id,
                {c.info.shard_id: c.reasons for c in considered},
            )
        self._score(table, eligible, location, source, now)
        eligible.sort(key=_Considered.rank_key)
        members = choice.pool([c.entry() for c in eligible], self._band)
        index, ledger = choice.draw(members, self._random)
        first = members[index].item
        assert isinstance(first, _Considered)
        first.state.ledger = ledger
        ordered = [first] + [c for c in eligible if c is not first]
        return [
            Candidate(c.info, c.evaluation)  # type: ignore[arg-type]
            for c in ordered
        ]

    def explain(self, request: ConnectionRequest) -> Explanation:
        """
        Return the ranking ``resolve`` would make, with every shard's score
        and reasons for rejection, without raising for denied clients or
        empty rankings, and without drawing. Raises ``UnknownService`` only.
        """
        table = self._table(request.service_id)
        ip = request.client[0]
        address = _parse_address(ip)
        location, source = self._locate(address)
        now = self._now()
        considered = self._consider(table, now)
        eligible, panic = self._select(considered)
        self._score(table, considered, location, source, now)
        eligible.sort(key=_Considered.rank_key)
        members = choice.pool([c.entry() for c in eligible], self._band)
        share = {
            id(m.item): s for m, s in zip(members, choice.shares(members))
        }
        chosen = {id(c) for c in eligible}
        rejected = sorted(
            (c for c in considered if id(c) not in chosen), key=_Considered.rank_key
        )
        shards = []
        for c in eligible:
            evaluation = c.evaluation
            assert evaluation is not None
            details = dict(evaluation.details)
            details["in_draw"] = id(c) in share
            details["draw_share"] = share.get(id(c), 0.0)
            shards.append(
                ShardExplanation(
                    c.info,
                    attrs.evolve(evaluation, details=details),
                    (),
                    c.soft,
                )
            )
        for c in rejected:
            assert c.evaluation is not None
            shards.append(ShardExplanation(c.info, c.evaluation, c.reasons))
        return Explanation(
            request=request,
            client_location=location,
            location_source=source,
            denied=self._denied(table, ip, address),
            shards=tuple(shards),
            panic=panic,
        )

    # -- status -------------------------------------------------------------

    def status(self) -> dict:
        """
        Return the live state of every service and shard as plain JSON
        types, for the admin interface's ``/status``.

        Per service: ``panic``, ``in_rotation`` (healthy shards passing the
        hard filters) and ``eligible_by_policy``; per shard its health
        (effective, and the check's verdict), admin and agent state,
        ejection, load, connections, security score and its source, weights,
        slow-start ramp, measured latency and connect counters.
        """
        now = self._now()
        services = {}
        for service_id, table in self._tables.items():
            considered = self._consider(table, now)
            eligible, panic = self._select(considered)
            eligible_ids = {c.info.shard_id for c in eligible}
            passing = [c for c in considered if not c.hard]
            shards = {}
            for c in considered:
                state, info = c.state, c.info
                outlier = state.outlier
                shards[info.shard_id] = {
                    "address": str(info.address),
                    "region": info.region,
                    "health": info.health.value,
                    "check_health": state.health.value,
                    "admin_state": state.admin_state,
                    "agent_state": state.agent_admin,
                    "agent_load": state.agent_load,
                    "agent_weight_percent": state.agent_weight_percent,
                    "eligible": info.shard_id in eligible_ids,
                    "rejected_by": list(c.reasons),
                    "ejected": outlier.ejected(now),
                    "ejected_until": (
                        outlier.ejected_until if outlier.ejected(now) else None
                    ),
                    "ejections": outlier.run_length(now, self._outlier),
                    "total_ejections": outlier.total_ejections,
                    "consecutive_failures": outlier.consecutive,
                    "open_connections": info.open_connections,
                    "capacity": info.capacity,
                    "load": info.load,
                    "security_score": info.security_score,
                    "security_baseline": state.config.security_score,
                    "security_source": (
                        "feed" if state.security_override is not None else "baseline"
                    ),
                    "weight": state.weight,
                    "weight_overridden": state.weight_override is not None,
                    "slow_start_ramp": state.ramp(now),
                    "effective_weight": info.weight,
                    "rtt_ms": state.measured_ms(now, self._rtt_max_age),
                    "rtt_samples": state.rtt_samples,
                    "connects_ok": state.stats.ok,
                    "connects_failed": state.stats.failed,
                }
            services[service_id] = {
                "panic": panic,
                "in_rotation": sum(1 for c in passing if not c.soft),
                "eligible_by_policy": len(passing),
                "shards": shards,
            }
        return {"time": now, "services": services}
