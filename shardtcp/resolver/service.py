"""
The ShardResolver: which shard should take this connection, right now.

The resolver knows no protocol. The connection path hands it a
``ConnectionRequest`` (service id, client address) and gets back the
eligible shards, best first; it then takes a ``Lease`` on the one it
connects to, and releases it when the connection ends.

How a shard is chosen, for one request:

1. **Access.** The client's address is checked against the service policy's
   ``deny`` then ``allow`` networks. Deny wins over allow; an address in no
   allow network is denied. A denied client gets ``AccessDenied`` before any
   shard is looked at.
2. **Filters.** A shard is dropped when it is UNHEALTHY or DRAINING, when its
   current security score is below ``min_security_score``, or when
   ``regions`` is set and the shard's region matches none of its patterns
   (``fnmatch`` globs, case-insensitive; a shard without a region matches
   no pattern). Nothing left: ``NoShardAvailable``,
   whose message says why each shard was dropped.
3. **Score.** Each remaining shard gets the latency, security and load
   factors and their weighted mean (see ``shardtcp.resolver.scoring`` for the
   formulas), multiplied by the shard's ``weight``. Latency is estimated from
   the great-circle distance between the client and the shard. The client's
   location comes from ``[geo]`` (longest prefix wins); a client in no geo
   network is placed at the proxy's own location, since the proxy-to-shard
   leg is then the only part of the path known; with neither, or without a
   shard location, the latency factor is a neutral 0.5.
4. **Rank.** Shards with spare capacity come first, then shards at or over
   capacity (load >= 1), so that a full shard never takes a connection while
   another has room, whatever the weights. Within each group: higher total
   first, then fewer open connections, then shard id, which makes the
   ranking deterministic.

Anti-herding: ``open_connections`` counts leases, and the connection path
takes its lease as soon as it picks a shard, before the connect completes.
The very next ``resolve`` therefore already sees that connection in the load
factor, so a burst of connections spreads instead of all landing on the shard
that was best an instant earlier.

IPv4-mapped IPv6 clients (``::ffff:a.b.c.d``) are treated as their IPv4
address for geo and access matching; configured networks inside
``::ffff:0:0/96`` are likewise turned into their IPv4 form, so either
spelling of a rule matches either spelling of an address.

Live state (health, security-score override, weight override, leases,
connect counters) is kept per shard id and survives reloads of the records,
so shard ids must be unique across services.
"""

from __future__ import annotations

import fnmatch
import ipaddress
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
from shardtcp.resolver import scoring
from shardtcp.resolver.sources import IShardSource, StaticShardSource

log = Logger()

V = TypeVar("V")

_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")

# How many shard ids and distinct reasons a NoShardAvailable message lists
# before it summarises: the message goes into logs once per refused
# connection, so it must stay bounded whatever the number of shards.
_IDS_SHOWN = 3
_GROUPS_SHOWN = 5


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
    ``("regions: us-east not in ['eu-*']",)``; empty means eligible.
    """

    shard: ShardInfo
    evaluation: Evaluation
    rejected_by: tuple[str, ...] = ()


@attrs.frozen
class Explanation:
    """
    The ranking the resolver would make for a request, without side effects.

    ``location_source`` says where ``client_location`` came from: ``"geo"``,
    ``"proxy"`` (the proxy's own location stood in) or ``"unknown"``.
    ``denied`` is the access rule refusing the client, or None; when it is
    set no shard would be chosen, whatever the shards' own ``rejected_by``
    say. ``shards`` holds the eligible shards in choice order, then the
    rejected ones.
    """

    request: ConnectionRequest
    client_location: Optional[Location]
    location_source: str
    denied: Optional[str]
    shards: tuple[ShardExplanation, ...]


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
    """

    config: ShardConfig
    service_id: str
    health: Health = Health.HEALTHY
    security_override: Optional[float] = None
    weight_override: Optional[float] = None
    open_connections: int = 0
    stats: ConnectStats = attrs.field(factory=ConnectStats)

    @property
    def security_score(self) -> float:
        if self.security_override is not None:
            return self.security_override
        return self.config.security_score

    @property
    def weight(self) -> float:
        if self.weight_override is not None:
            return self.weight_override
        return self.config.weight

    def info(self) -> ShardInfo:
        capacity = self.config.capacity
        # A shard without capacity is full from the start.
        load = self.open_connections / capacity if capacity > 0 else 1.0
        return ShardInfo(
            shard_id=self.config.id,
            service_id=self.service_id,
            address=self.config.address,
            location=self.config.location,
            capacity=capacity,
            security_score=self.security_score,
            weight=self.weight,
            health=self.health,
            open_connections=self.open_connections,
            load=load,
            server_name=self.config.server_name,
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

    ``clock`` (an ``IReactorTime``) stamps connect reports; it defaults to
    the global reactor, imported only when first needed.
    """

    def __init__(
        self,
        config: Config,
        source: Optional[IShardSource] = None,
        *,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        self._config = config
        self._source: IShardSource = (
            source if source is not None else StaticShardSource(config)
        )
        self._clock = clock
        self._proxy_location = config.proxy.location
        self._geo: _PrefixTable[Location] = _PrefixTable(
            (_normalise_network(g.network), g.location) for g in config.geo
        )
        self._states: dict[str, _ShardState] = {}
        self._tables: dict[str, _ServiceTable] = {}
        self._unsubscribe: Optional[Callable[[], None]] = None
        # Bad records at construction are a configuration error: fail loudly.
        self._apply(self._source.services())

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
        not take routing down.
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

        Includes the shards that ``resolve`` would filter out.
        """
        return [state.info() for state in self._table(service_id).shards]

    # -- live inputs --------------------------------------------------------

    def set_health(self, shard_id: str, health: Health) -> None:
        """Set a shard's health (from health checks or the admin API)."""
        state = self._state(shard_id)
        if state.health is not health:
            log.info(
                "shard {shard} health {old} -> {new}",
                shard=shard_id,
                old=state.health.value,
                new=health.value,
            )
            state.health = health

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

        A report about a shard that left the records meanwhile is ignored.
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
        else:
            state.stats = ConnectStats(
                ok=stats.ok,
                failed=stats.failed + 1,
                consecutive_failures=stats.consecutive_failures + 1,
                last_seconds=stats.last_seconds,
                last_at=now,
            )

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

    def _rejections(self, table: _ServiceTable, info: ShardInfo) -> tuple[str, ...]:
        """Return why a shard may not take connections; empty if it may."""
        reasons = []
        if info.health is not Health.HEALTHY:
            reasons.append(f"health: {info.health.value}")
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
        return tuple(reasons)

    def _evaluate(
        self,
        weights: Weights,
        info: ShardInfo,
        location: Optional[Location],
        location_source: str,
    ) -> Evaluation:
        if location is not None and info.location is not None:
            distance: Optional[float] = scoring.great_circle_km(location, info.location)
            rtt: Optional[float] = scoring.estimated_rtt_ms(distance)
            latency = scoring.latency_factor(rtt)
        else:
            distance = rtt = None
            latency = scoring.NEUTRAL_LATENCY
        security = scoring.security_factor(info.security_score)
        load = scoring.load_factor(info.open_connections, info.capacity)
        base = scoring.total_score(weights, latency, security, load)
        return Evaluation(
            shard_id=info.shard_id,
            latency=latency,
            security=security,
            load=load,
            total=base * info.weight,
            details={
                "distance_km": distance,
                "rtt_ms": rtt,
                "client_location_source": location_source,
                "open_connections": info.open_connections,
                "capacity": info.capacity,
                "security_score": info.security_score,
                "weight": info.weight,
                "base_total": base,
                "at_capacity": info.load >= 1.0,
            },
        )

    def evaluate_shard(
        self, shard_info: ShardInfo, request: ConnectionRequest
    ) -> Evaluation:
        """
        Score one shard for a request (with the weights of the shard's
        service), whether or not the filters would let it through.
        """
        table = self._table(shard_info.service_id)
        location, source = self.locate_client(request.client[0])
        return self._evaluate(table.config.weights, shard_info, location, source)

    @staticmethod
    def _rank_key(item: tuple) -> tuple:
        """Sort key of ``(info, evaluation, ...)`` items: best first."""
        info, evaluation = item[0], item[1]
        return (
            info.load >= 1.0,
            -evaluation.total,
            info.open_connections,
            info.shard_id,
        )

    def resolve(self, request: ConnectionRequest) -> list[Candidate]:
        """
        Return the eligible shards for a request, best first.

        Raises ``UnknownService``, ``AccessDenied`` (checked before any
        shard) or ``NoShardAvailable``. Take a ``lease`` on the candidate
        actually used.
        """
        table = self._table(request.service_id)
        ip = request.client[0]
        address = _parse_address(ip)
        denied = self._denied(table, ip, address)
        if denied is not None:
            raise AccessDenied(request.service_id, ip, denied)
        location, source = self._locate(address)
        weights = table.config.weights
        eligible = []
        rejections: dict[str, tuple[str, ...]] = {}
        for state in table.shards:
            info = state.info()
            reasons = self._rejections(table, info)
            if reasons:
                rejections[info.shard_id] = reasons
            else:
                eligible.append((info, self._evaluate(weights, info, location, source)))
        if not eligible:
            raise NoShardAvailable(request.service_id, rejections)
        eligible.sort(key=self._rank_key)
        return [Candidate(info, evaluation) for info, evaluation in eligible]

    def explain(self, request: ConnectionRequest) -> Explanation:
        """
        Return the ranking ``resolve`` would make, with every shard's score
        and reasons for rejection, without raising for denied clients or
        empty rankings. Raises ``UnknownService`` only.
        """
        table = self._table(request.service_id)
        ip = request.client[0]
        address = _parse_address(ip)
        location, source = self._locate(address)
        weights = table.config.weights
        eligible = []
        rejected = []
        for state in table.shards:
            info = state.info()
            evaluation = self._evaluate(weights, info, location, source)
            reasons = self._rejections(table, info)
            (rejected if reasons else eligible).append((info, evaluation, reasons))
        eligible.sort(key=self._rank_key)
        rejected.sort(key=self._rank_key)
        return Explanation(
            request=request,
            client_location=location,
            location_source=source,
            denied=self._denied(table, ip, address),
            shards=tuple(
                ShardExplanation(info, evaluation, reasons)
                for info, evaluation, reasons in eligible + rejected
            ),
        )
