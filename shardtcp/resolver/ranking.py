# -*- test-case-name: tests.resolver.test_ranking -*-
"""
The ranking pipeline: admission, filters, panic mode, scores, rank order.

``rank`` is the one pipeline behind both ``ShardResolver.resolve`` and
``ShardResolver.explain``, so the two cannot disagree.  It is pure: it
reads the shards' live state at the clock reading it is given and changes
nothing, logs nothing and draws nothing (the draw and its ledger, and the
panic-mode log lines, are the resolver's).  Per-factor details
(``Factors``) are built only when asked for, by ``factors``.

The steps are separate functions (``admit``, ``consider``, ``select``,
``score``) so that a cached ordering can later stand in for one of them
without changing the others.
"""

from __future__ import annotations

import fnmatch
from operator import attrgetter
from typing import Callable, Iterable, Mapping, Optional

import attrs

from shardtcp.model import (
    Health,
    IPAddress,
    Location,
    ServiceConfig,
    ShardInfo,
    Weights,
)
from shardtcp.net import PrefixTable, normalise_network, parse_ip
from shardtcp.resolver import ownership, scoring
from shardtcp.resolver.state import ShardState

#: What a threat feed says of a client address: why it is denied, or None.
ThreatCheck = Callable[[str], Optional[str]]


@attrs.frozen
class ServiceTable:
    """
    What ranking needs of one service, computed once per reload of the
    records.  ``expected_ms`` holds, per shard, the geographic estimate of
    the proxy-to-shard round trip (None without both locations).
    """

    config: ServiceConfig
    shards: tuple[ShardState, ...]
    expected_ms: tuple[Optional[float], ...]
    allow: PrefixTable[None]
    deny: PrefixTable[None]
    allow_summary: str
    regions: tuple[str, ...]  # lower-cased patterns
    regions_text: str  # the patterns as configured, for messages

    @classmethod
    def build(
        cls,
        config: ServiceConfig,
        shards: Iterable[ShardState],
        proxy_location: Optional[Location],
    ) -> "ServiceTable":
        """The table of a service whose shards have these live states."""
        shards = tuple(shards)
        policy = config.policy
        return cls(
            config=config,
            shards=shards,
            expected_ms=tuple(
                expected_rtt_ms(proxy_location, s.config.location) for s in shards
            ),
            allow=PrefixTable((normalise_network(n), None) for n in policy.allow),
            deny=PrefixTable((normalise_network(n), None) for n in policy.deny),
            allow_summary=_summarise_networks(policy.allow),
            regions=tuple(p.lower() for p in policy.regions),
            regions_text=str(list(policy.regions)),
        )


@attrs.frozen
class Settings:
    """The resolver-wide numbers ranking uses."""

    rtt_max_age: float = 60.0
    panic_threshold: float = 0.5


@attrs.frozen
class Client:
    """
    A client as ranking sees it: its address text, the parsed address
    (None when it is not an IP), and where it is taken to be, with
    ``location_source`` ``"geo"``, ``"proxy"`` or ``"unknown"``.
    """

    ip: str
    address: Optional[IPAddress]
    location: Optional[Location]
    location_source: str


def locate(
    ip: str, geo: PrefixTable[Location], proxy_location: Optional[Location]
) -> Client:
    """
    Place a client: the most specific ``[geo]`` network holding it, else the
    proxy's own location, else nowhere.
    """
    address = parse_ip(ip)
    if address is not None:
        hit = geo.lookup(address)
        if hit is not None:
            return Client(ip, address, hit[1], "geo")
    if proxy_location is not None:
        return Client(ip, address, proxy_location, "proxy")
    return Client(ip, address, None, "unknown")


def expected_rtt_ms(
    proxy: Optional[Location], shard: Optional[Location]
) -> Optional[float]:
    """What geography predicts for the proxy-to-shard round trip."""
    if proxy is None or shard is None:
        return None
    return scoring.estimated_rtt_ms(scoring.great_circle_km(proxy, shard))


# ---------------------------------------------------------------------------
# Admission


def admit(
    table: ServiceTable, client: Client, threat: Optional[ThreatCheck] = None
) -> Optional[str]:
    """
    Why the client may not reach the service, or None if it may: not an IP
    address; denied by a threat feed in force (as the connection path checks
    first); in the policy's ``deny`` networks, or in none of ``allow``.
    """
    if client.address is None:
        return f"client address {client.ip!r} is not an IP address"
    if threat is not None:
        why = threat(client.ip)
        if why is not None:
            return why
    hit = table.deny.lookup(client.address)
    if hit is not None:
        return f"policy.deny {hit[0]}"
    if table.allow.lookup(client.address) is None:
        if not table.allow_summary:
            return "policy.allow is empty"
        return f"policy.allow: in none of {table.allow_summary}"
    return None


# ---------------------------------------------------------------------------
# Filters


@attrs.frozen
class Considered:
    """
    One shard at one moment with its filters: ``hard`` reasons (draining,
    the service policy) are never set aside; ``soft`` ones (health checks,
    ejection) are, in panic mode.
    """

    state: ShardState
    info: ShardInfo
    hard: tuple[str, ...]
    soft: tuple[str, ...]
    expected_ms: Optional[float]

    @property
    def reasons(self) -> tuple[str, ...]:
        """Every reason the shard is filtered out, health ones first."""
        return self.soft + self.hard


def policy_reasons(table: ServiceTable, security_score: float, region: str) -> list[str]:
    """Why the service policy refuses a shard; empty if it does not."""
    reasons = []
    minimum = table.config.policy.min_security_score
    if security_score < minimum:
        reasons.append(
            f"min_security_score: {_number(security_score)} < {_number(minimum)}"
        )
    if table.regions:
        lowered = region.lower()
        # A shard with no region cannot show where it is, so it satisfies
        # no residency constraint (fnmatch would let "*" match "").
        if not lowered or not any(
            fnmatch.fnmatchcase(lowered, p) for p in table.regions
        ):
            reasons.append(f"regions: {region or '(none)'} not in {table.regions_text}")
    return reasons


def consider(table: ServiceTable, now: float) -> list[Considered]:
    """Every shard of the service with its filters, in record order."""
    considered = []
    minimum = table.config.policy.min_security_score
    regions = table.regions
    for state, expected in zip(table.shards, table.expected_ms):
        soft = state.sickness(now)
        drains = state.drains()
        security = state.security_score
        if security < minimum or regions:
            location = state.config.location
            hard = drains + policy_reasons(
                table, security, location.region if location is not None else ""
            )
        else:
            hard = drains
        health = (
            Health.UNHEALTHY if soft else Health.DRAINING if drains else Health.HEALTHY
        )
        considered.append(
            Considered(state, state.info(now, health), tuple(hard), tuple(soft), expected)
        )
    return considered


def select(
    considered: list[Considered], panic_threshold: float
) -> tuple[list[Considered], bool, int, int]:
    """
    The eligible shards, whether panic mode is in force, and how many
    shards are healthy and how many pass the hard filters.  In panic mode
    (fewer than ``panic_threshold`` of the shards passing the hard filters
    are healthy) every shard passing the hard filters is eligible.
    """
    passing = [c for c in considered if not c.hard]
    healthy = [c for c in passing if not c.soft]
    panic = bool(passing) and len(healthy) < panic_threshold * len(passing)
    return (passing if panic else healthy), panic, len(healthy), len(passing)


# ---------------------------------------------------------------------------
# Scores


@attrs.frozen
class Ranked:
    """
    One shard's place in a ranking: its filters and its score.

    ``latency``, ``security`` and ``spare`` are the factors in 0..1,
    ``base`` their weighted mean and ``total`` base × effective weight.
    ``measured_ms`` and ``expected_ms`` are the latency inputs the score
    was computed from.  ``reasons`` says why a rejected shard is out;
    ``set_aside`` what panic mode overlooked for an eligible one.
    """

    state: Optional[ShardState]
    info: ShardInfo
    latency: float
    security: float
    spare: float
    base: float
    total: float
    measured_ms: Optional[float]
    expected_ms: Optional[float]
    reasons: tuple[str, ...] = ()
    set_aside: tuple[str, ...] = ()
    #: For explain: the client location scored for and the latency path
    #: worked out (``_latency_path``), so that ``factors`` does not work it
    #: out again.  Not part of the value.
    path: Optional[tuple] = attrs.field(default=None, eq=False, repr=False)

    def rank_key(self) -> tuple:
        """Best first: room, then higher total, fewer connections, id."""
        info = self.info
        return (info.load >= 1.0, -self.total, info.open_connections, info.shard_id)


def _latency_path(
    shard: Optional[Location],
    client: Optional[Location],
    expected: Optional[float],
    measured: Optional[float],
) -> tuple[Optional[float], Optional[float], Optional[float], float]:
    """``(distance_km, geo_rtt_ms, rtt_ms, latency factor)``."""
    distance = geo = None
    if shard is not None and client is not None:
        distance = scoring.great_circle_km(client, shard)
        geo = scoring.estimated_rtt_ms(distance)
    rtt = scoring.path_rtt_ms(geo, expected, measured)
    latency = scoring.latency_factor(rtt) if rtt is not None else scoring.NEUTRAL_LATENCY
    return distance, geo, rtt, latency


def score(
    info: ShardInfo,
    state: Optional[ShardState],
    client: Client,
    weights: Weights,
    expected_ms: Optional[float],
    measured_ms: Optional[float],
    reasons: tuple[str, ...] = (),
    set_aside: tuple[str, ...] = (),
    *,
    keep_path: bool = False,
) -> Ranked:
    """
    Score one shard for a client; the load, weight and security are
    ``info``'s.  With ``keep_path`` the latency path is kept for
    ``factors`` (explain asks for every shard's factors).
    """
    path = _latency_path(info.location, client.location, expected_ms, measured_ms)
    return score_rtt(
        info, state, path[2], weights, expected_ms, measured_ms, set_aside,
        reasons, (client.location, path) if keep_path else None,
    )


def geo_rtt_ms(shard: Optional[Location], client: Optional[Location]) -> Optional[float]:
    """The client-to-shard estimate ``score`` works out (None without both locations)."""
    if shard is None or client is None:
        return None
    return scoring.estimated_rtt_ms(scoring.great_circle_km(client, shard))


def score_rtt(
    info: ShardInfo,
    state: Optional[ShardState],
    rtt_ms: Optional[float],
    weights: Weights,
    expected_ms: Optional[float],
    measured_ms: Optional[float],
    set_aside: tuple[str, ...],
    reasons: tuple[str, ...] = (),
    path: Optional[tuple] = None,
) -> Ranked:
    """
    ``score`` for a client whose path to the shard is already worked out:
    ``rtt_ms`` is ``scoring.path_rtt_ms`` of ``geo_rtt_ms`` (the client's
    estimate to the shard), ``expected_ms`` and ``measured_ms``.  The same
    value, without working out the distance again (the incremental
    orderings keep the estimate per client location and shard).
    """
    latency = scoring.latency_factor(rtt_ms) if rtt_ms is not None else scoring.NEUTRAL_LATENCY
    security = scoring.security_factor(info.security_score)
    spare = scoring.spare_factor(info.load)
    base = scoring.total_score(weights, latency, security, spare)
    return Ranked(
        state, info, latency, security, spare, base, base * info.weight,
        measured_ms, expected_ms, reasons, set_aside, path,
    )


def _score(c: Considered, client: Client, weights: Weights, now: float,
           settings: Settings, reasons: tuple[str, ...], set_aside: tuple[str, ...],
           keep_path: bool = False) -> Ranked:
    return score(
        c.info, c.state, client, weights, c.expected_ms,
        c.state.measured_ms(now, settings.rtt_max_age), reasons, set_aside,
        keep_path=keep_path,
    )


# ---------------------------------------------------------------------------
# The pipeline


@attrs.frozen
class Ranking:
    """
    The outcome of ``rank``.

    ``denied`` is the admission refusal, or None.  ``eligible`` holds the
    eligible shards best first (empty when denied); ``rejected`` the others,
    best first, each with its ``reasons`` (a denied client's shards carry
    the refusal first) and filled only when every shard is scored (explain).
    ``rejections`` maps every shard id to its filter reasons when no shard
    is eligible (for ``NoShardAvailable``) or every shard is scored.
    ``in_rotation`` counts the healthy shards passing the hard filters,
    ``passing`` those passing the hard filters.  ``owners``, for a service
    routing by shard key, is the key's owner chain
    (``shardtcp.resolver.ownership``), set by the resolver's ownership step.
    """

    client: Client
    denied: Optional[str]
    panic: bool
    eligible: tuple[Ranked, ...]
    rejected: tuple[Ranked, ...] = ()
    rejections: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    in_rotation: int = 0
    passing: int = 0
    owners: Optional[ownership.OwnerChain] = None


def rank(
    table: ServiceTable,
    client: Client,
    now: float,
    settings: Settings,
    *,
    threat: Optional[ThreatCheck] = None,
    score_all: bool = False,
) -> Ranking:
    """
    Rank a service's shards for a client at ``now``.

    A client refused by ``admit`` gets no ranking: without ``score_all`` the
    shards are not even looked at; with it (explain) they are all listed as
    rejected, the refusal first among their reasons.  ``score_all`` also
    scores the rejected shards; without it only the eligible ones are.
    """
    denied = admit(table, client, threat)
    if denied is not None and not score_all:
        return Ranking(client, denied, False, ())
    considered = consider(table, now)
    eligible, panic, in_rotation, passing = select(considered, settings.panic_threshold)
    weights = table.config.weights
    if denied is not None:
        refused = (f"denied: {denied}",)
        rejected = [
            _score(c, client, weights, now, settings, refused + c.reasons, (), True)
            for c in considered
        ]
        rejected.sort(key=Ranked.rank_key)
        return Ranking(
            client, denied, panic, (), tuple(rejected),
            {r.info.shard_id: r.reasons for r in rejected}, in_rotation, passing,
        )
    ranked = [
        _score(c, client, weights, now, settings, (), c.soft, score_all) for c in eligible
    ]
    ranked.sort(key=Ranked.rank_key)
    rejections: Mapping[str, tuple[str, ...]] = {}
    rejected: list[Ranked] = []
    if score_all or not ranked:
        rejections = {c.info.shard_id: c.reasons for c in considered}
    if score_all:
        chosen = {id(c) for c in eligible}
        rejected = [
            _score(c, client, weights, now, settings, c.reasons, (), True)
            for c in considered
            if id(c) not in chosen
        ]
        rejected.sort(key=Ranked.rank_key)
    return Ranking(
        client, None, panic, tuple(ranked), tuple(rejected), rejections,
        in_rotation, passing,
    )


# ---------------------------------------------------------------------------
# Details, for explain


@attrs.frozen
class Factors:
    """
    Every input of one shard's score, for ``explain`` and logs.

    The latency path (``distance_km``, ``geo_rtt_ms``, ``measured_rtt_ms``,
    ``expected_rtt_ms``, ``excess_rtt_ms``, ``rtt_ms``, ``latency_source``:
    geo, measured, geo+measured or none); the load (``own_load``,
    ``agent_load``, ``load``); the weight (``weight``,
    ``agent_weight_percent``, ``slow_start_ramp``, ``effective_weight``);
    ``base_total``; and, in an explanation's eligible shards, ``in_draw``
    and ``draw_share`` (the long-run share of first picks among the pool).
    """

    distance_km: Optional[float]
    rtt_ms: Optional[float]
    geo_rtt_ms: Optional[float]
    measured_rtt_ms: Optional[float]
    expected_rtt_ms: Optional[float]
    excess_rtt_ms: Optional[float]
    latency_source: str
    client_location_source: str
    open_connections: int
    capacity: int
    own_load: float
    agent_load: Optional[float]
    load: float
    security_score: float
    weight: float
    agent_weight_percent: Optional[float]
    slow_start_ramp: float
    effective_weight: float
    base_total: float
    at_capacity: bool
    in_draw: Optional[bool] = None
    draw_share: Optional[float] = None

    def as_dict(self) -> dict:
        """The factors by name, as ``Evaluation.details`` carries them."""
        if self.in_draw is None:
            return dict(zip(_FACTOR_NAMES[:-2], _FACTOR_VALUES_BASE(self)))
        return dict(zip(_FACTOR_NAMES, _FACTOR_VALUES(self)))


#: ``Factors``' fields in order, for ``as_dict`` (as ``attrs.asdict`` gives them).
_FACTOR_NAMES = tuple(field.name for field in attrs.fields(Factors))
assert _FACTOR_NAMES[-2:] == ("in_draw", "draw_share")
_FACTOR_VALUES = attrgetter(*_FACTOR_NAMES)
_FACTOR_VALUES_BASE = attrgetter(*_FACTOR_NAMES[:-2])


def factors(
    ranked: Ranked,
    client: Client,
    now: float,
    *,
    in_draw: Optional[bool] = None,
    draw_share: Optional[float] = None,
) -> Factors:
    """
    The details of a ranked shard's score; the latency path from the very
    inputs its score used, the operator and agent weights and agent load
    from its live state.
    """
    info, state = ranked.info, ranked.state
    measured, expected = ranked.measured_ms, ranked.expected_ms
    kept = ranked.path
    if kept is not None and kept[0] is client.location:
        distance, geo, rtt, _ = kept[1]
    else:
        distance, geo, rtt, _ = _latency_path(info.location, client.location, expected, measured)
    if measured is None:
        source = "geo" if geo is not None else "none"
        excess = None
    elif geo is None:
        source, excess = "measured", None
    else:
        source = "geo+measured"
        excess = rtt - geo  # type: ignore[operator]
    capacity = info.capacity
    return Factors(
        distance_km=distance,
        rtt_ms=rtt,
        geo_rtt_ms=geo,
        measured_rtt_ms=measured,
        expected_rtt_ms=expected,
        excess_rtt_ms=excess,
        latency_source=source,
        client_location_source=client.location_source,
        open_connections=info.open_connections,
        capacity=capacity,
        own_load=info.open_connections / capacity if capacity > 0 else 1.0,
        agent_load=state.agent_load if state is not None else None,
        load=info.load,
        security_score=info.security_score,
        weight=state.weight if state is not None else info.weight,
        agent_weight_percent=state.agent_weight_percent if state is not None else None,
        slow_start_ramp=state.ramp(now) if state is not None else 1.0,
        effective_weight=info.weight,
        base_total=ranked.base,
        at_capacity=info.load >= 1.0,
        in_draw=in_draw,
        draw_share=draw_share,
    )


def _summarise_networks(networks: Iterable[object], limit: int = 5) -> str:
    texts = [str(n) for n in networks]
    if len(texts) > limit:
        return ", ".join(texts[:limit]) + f" and {len(texts) - limit} more"
    return ", ".join(texts)


def _number(value: float) -> str:
    """Format a score for messages: 40.0 as 40, 42.5 as 42.5."""
    return f"{value:g}"
