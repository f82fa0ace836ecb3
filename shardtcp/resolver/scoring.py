"""
The score factors of a shard, as pure functions.

Every function here is a plain computation on numbers and value types: no
state, no clock, no I/O, so the resolver, ``explain`` and the tests all agree
on what a score means. Each factor lies in ``0..1`` where 1 is best.

Formulas
========

Distance (haversine on a spherical Earth, mean radius R = 6371.0088 km)::

    h = sin²((lat2 - lat1) / 2) + cos(lat1) · cos(lat2) · sin²((lon2 - lon1) / 2)
    d = 2 · R · asin(√h)                                            [km]

Estimated round-trip time from distance. Light in fibre covers about
200 km/ms, and real paths run about 1.5 times the great circle (routing
detours, cable layout); a fixed 1 ms stands for switching and the last hops::

    rtt = 2 · 1.5 · d / 200 + 1                                     [ms]

Latency factor, a smooth decreasing curve that halves at a reference RTT of
50 ms (a neighbouring region) and never reaches zero, so that a far shard
stays usable when it is the only one::

    latency = 1 / (1 + rtt / 50)                  in (0, 1]; 0.98 at d = 0

When the distance cannot be known (no location for the client nor the proxy,
or none for the shard) and nothing was measured, the resolver uses
``NEUTRAL_LATENCY`` = 0.5, the value of a shard exactly one reference RTT
away: unknown is neither rewarded nor punished against known shards at a
typical distance.

Measured latency
----------------

The proxy measures how long a TCP connect to each shard takes (the
connection path's connects, and the health checks' connects): one
handshake, so about one round trip from the proxy to the shard. The samples
feed a peak-EWMA per shard (``peak_ewma``), with decay time τ (10 s by
default). A sample at or above the current value replaces it at once, so a
slowdown shows immediately; a lower one is blended in as time passes::

    w = e^(-Δt / τ)                               Δt: time since the last sample
    value = sample                                when sample >= value
    value = value · w + sample · (1 - w)          otherwise

How it combines with geography (``path_rtt_ms``). Geography estimates the
client-to-shard round trip, ``geo = rtt(d(client, shard))``; it is what
ranks shards for clients all over the world, and it stays the base of the
estimate. The measurement is of another path, proxy to shard, so it is
compared with what geography predicts for that same path,
``expected = rtt(d(proxy, shard))`` (``BASE_RTT_MS`` when the proxy's or the
shard's location is unknown). What the shard takes beyond that prediction
is its *excess*: a congested link, a full accept queue, a detour. The excess
is the shard's own, so every client's path to it pays it::

    excess = max(0, measured - expected)
    rtt    = geo + excess                         measured and geo known
    rtt    = measured                             measured, but no geo
    rtt    = geo                                  nothing measured yet

For a client in no ``[geo]`` network the proxy's location stands in, so
``geo = expected`` and ``rtt = max(expected, measured)``: the measurement
decides whenever it is the worse of the two.

Why not ``geo(client, proxy) + measured``, the literal path through the
proxy? Because the unmeasured shards would then be ranked by one model (the
direct client-to-shard estimate) and the measured ones by another, so a
shard's rank would jump when its first sample arrived, whatever its real
speed. With the excess, a shard measured exactly as fast as its distance
predicts keeps exactly its geographic rank. And a measurement can only push
traffic away, never pull it in: a connect answered suspiciously fast (by a
SYN proxy or a local load balancer in front of a far shard, say) cannot make
a far shard look near.

Security factor, the shard's score on the 0..100 scale of the configuration
and the threat-intelligence feeds::

    security = clamp(score / 100, 0, 1)

Load factor, the spare share of the shard's capacity. A shard's load
combines this proxy's own count of open connections with the load its
health-check agent reports (``combined_load``); the report can raise the
load but never lower it below the proxy's own count, so a shard that lies
about being idle cannot pull in traffic::

    load   = max(open / capacity, reported)       (1 when capacity <= 0)
    factor = 1 - min(1, load)                     (spare_factor)

Total, the weighted mean of the three factors (dividing by the weights' sum
keeps it in 0..1 whatever scale the weights are written in)::

    total = (wl · latency + ws · security + wload · load) / (wl + ws + wload)

The resolver then multiplies the total by the shard's effective weight::

    effective weight = weight · agent weight% / 100 · slow-start ramp

``weight`` is the operator's (1.0 by default, or the admin override); the
agent's percentage can only lower it; the slow-start ramp
(``slow_start_factor``) rises from 0.1 to 1 over ``slow_start`` seconds
after a shard comes back, in 20 equal steps::

    ramp = 0.1 + 0.9 · floor(20 · (now - since) / slow_start) / 20     while it lasts, else 1

Passive ejection lasts ``base · 2^(n-1)`` seconds for the n-th ejection in a
row, at most ``maximum`` (``ejection_seconds``). See
``shardtcp.resolver.service`` for how these inputs are gathered and
``shardtcp.resolver.choice`` for how a shard is drawn among the best.
"""

from __future__ import annotations

import math
from typing import Optional

from shardtcp.model import Location, Weights

#: Mean Earth radius (IUGG), in kilometres.
EARTH_RADIUS_KM = 6371.0088

#: Speed of light in optical fibre, in kilometres per millisecond.
FIBRE_KM_PER_MS = 200.0

#: How much longer a real network path is than the great circle.
PATH_STRETCH = 1.5

#: Fixed round-trip cost of switching and the last hops, in milliseconds.
BASE_RTT_MS = 1.0

#: The RTT at which the latency factor is one half, in milliseconds.
REFERENCE_RTT_MS = 50.0

#: The latency factor used when no distance can be computed.
NEUTRAL_LATENCY = 0.5

#: Where the slow-start ramp begins, as a share of the full weight.
SLOW_START_FLOOR = 0.1
#: The ramp's steps: a shard's weight changes ``SLOW_START_STEPS`` times
#: over its ``slow_start`` (every 1.5 s at the default 30 s), so that the
#: resolver reads a ramping shard again at each step rather than at every
#: connection (``shortlist``: thousands of shards back from an ejection at
#: once must not cost each connection a reading of all of them).
SLOW_START_STEPS = 20


def great_circle_km(a: Location, b: Location) -> float:
    """
    Return the great-circle distance between two points, in kilometres.

    Uses the haversine formula, which stays accurate for small distances
    (unlike the spherical law of cosines).
    """
    lat1 = math.radians(a.lat)
    lat2 = math.radians(b.lat)
    dlat = lat2 - lat1
    dlon = math.radians(b.lon - a.lon)
    h = (
        math.sin(dlat / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    )
    # Rounding can push h a hair above 1 for antipodal points.
    h = min(1.0, max(0.0, h))
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


def estimated_rtt_ms(distance_km: float) -> float:
    """
    Estimate the round-trip time over ``distance_km`` of great circle.

    ``2 * PATH_STRETCH * d / FIBRE_KM_PER_MS + BASE_RTT_MS``; a negative
    distance counts as zero.
    """
    return 2 * PATH_STRETCH * max(0.0, distance_km) / FIBRE_KM_PER_MS + BASE_RTT_MS


def latency_factor(rtt_ms: float) -> float:
    """
    Map a round-trip time to a factor in ``(0, 1]``, 1 being closest.

    ``1 / (1 + rtt / REFERENCE_RTT_MS)``: strictly decreasing in the RTT, one
    half at the reference RTT. A negative RTT counts as zero.
    """
    return 1.0 / (1.0 + max(0.0, rtt_ms) / REFERENCE_RTT_MS)


def security_factor(score: float) -> float:
    """Map a 0..100 security score to ``0..1``, clamping out-of-range scores."""
    return min(1.0, max(0.0, score / 100.0))


def load_factor(open_connections: int, capacity: int) -> float:
    """
    Return the spare share of a shard's capacity, in ``0..1``.

    A shard without capacity (``capacity <= 0``) has no spare share at all.
    """
    if capacity <= 0:
        return 0.0
    return 1.0 - min(1.0, max(0, open_connections) / capacity)


def total_score(
    weights: Weights, latency: float, security: float, load: float
) -> float:
    """
    Return the weighted mean of the three factors.

    Weights must not be negative (a negative weight would reward a bad
    factor). When they are all zero the factors say nothing and the total is
    0.0 for every shard, which leaves the resolver's tie-breaks (fewest open
    connections, then shard id) to decide.
    """
    if weights.latency < 0 or weights.security < 0 or weights.load < 0:
        raise ValueError(f"negative weight in {weights!r}")
    total_weight = weights.latency + weights.security + weights.load
    if total_weight == 0:
        return 0.0
    return (
        weights.latency * latency
        + weights.security * security
        + weights.load * load
    ) / total_weight


def spare_factor(load: float) -> float:
    """
    Return the load factor of a shard whose load is ``load`` (1.0 = at
    capacity): ``1 - min(1, load)``, a negative load counting as zero.
    """
    return 1.0 - min(1.0, max(0.0, load))


def combined_load(
    open_connections: int, capacity: int, reported: Optional[float] = None
) -> float:
    """
    Return a shard's load: ``max(open / capacity, reported)``.

    ``open / capacity`` is this proxy's own count; ``reported`` is what the
    shard's agent said (``0..1``), or None. The report can only raise the
    load: a shard claiming to be idle while this proxy holds 90 of its 100
    connections is 0.9 loaded. A shard without capacity is full (1.0).
    """
    own = max(0, open_connections) / capacity if capacity > 0 else 1.0
    if reported is None:
        return own
    return max(own, min(1.0, max(0.0, reported)))


def peak_ewma(
    value: Optional[float],
    last_at: Optional[float],
    sample: float,
    now: float,
    tau: float,
) -> float:
    """
    Fold ``sample`` (taken at ``now``) into a peak-sensitive moving average.

    A first sample, or one at or above ``value``, replaces the value at
    once. A lower one is blended with weight ``1 - e^(-Δt/τ)``, Δt being the
    time since the previous sample (``last_at``): samples close together
    move the value little, a sample after a long quiet spell almost replaces
    it. ``tau <= 0`` keeps only the latest sample.
    """
    if value is None or last_at is None or sample >= value:
        return sample
    if tau <= 0:
        return sample
    w = math.exp(-max(0.0, now - last_at) / tau)
    return value * w + sample * (1.0 - w)


def path_rtt_ms(
    geo_ms: Optional[float],
    expected_ms: Optional[float],
    measured_ms: Optional[float],
) -> Optional[float]:
    """
    Combine the geographic estimate with the measurement (see "Measured
    latency" above).

    ``geo_ms`` is the client-to-shard estimate, ``expected_ms`` the
    geographic estimate of the proxy-to-shard path that was measured (None:
    ``BASE_RTT_MS`` stands in), ``measured_ms`` the shard's peak-EWMA.
    Returns None when neither geography nor measurement says anything.
    """
    if measured_ms is None:
        return geo_ms
    if geo_ms is None:
        return measured_ms
    expected = expected_ms if expected_ms is not None else BASE_RTT_MS
    return geo_ms + max(0.0, measured_ms - expected)


def _ramp_step(since: Optional[float], now: float, duration: float) -> Optional[int]:
    """The step (0 to ``SLOW_START_STEPS - 1``) of a ramp under way at ``now``; None when none is."""
    if since is None or duration <= 0 or now < since or now >= since + duration:
        return None
    return min(int((now - since) * SLOW_START_STEPS / duration), SLOW_START_STEPS - 1)


def slow_start_factor(
    since: Optional[float], now: float, duration: float
) -> float:
    """
    Return the slow-start share of a shard's weight, in ``[0.1, 1]``.

    ``since`` is when the shard came back (None: it never left). The ramp
    rises from ``SLOW_START_FLOOR`` at ``since`` to 1 at ``since +
    duration`` in ``SLOW_START_STEPS`` equal steps (the line from the floor
    to 1, taken at the start of each step); before ``since`` (the shard is
    not back yet) and after the ramp, or when ``duration <= 0``, the factor
    is 1.
    """
    step = _ramp_step(since, now, duration)
    if step is None:
        return 1.0
    return SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * step / SLOW_START_STEPS


def slow_start_next(since: Optional[float], now: float, duration: float) -> Optional[float]:
    """
    When ``slow_start_factor`` next changes after ``now``: the start of the
    ramp's next step, or its end; None when no ramp is under way at
    ``now``.
    """
    step = _ramp_step(since, now, duration)
    if step is None:
        return None
    return since + (step + 1) * duration / SLOW_START_STEPS


def ejection_seconds(ejections: int, base: float, maximum: float) -> float:
    """
    Return how long the ``ejections``-th ejection in a row lasts:
    ``base · 2^(ejections - 1)``, at most ``maximum``.
    """
    if ejections <= 1:
        return min(base, maximum)
    # Cap the exponent: 2.0 ** 2000 would overflow long after the maximum.
    return min(maximum, base * 2.0 ** min(ejections - 1, 64))
