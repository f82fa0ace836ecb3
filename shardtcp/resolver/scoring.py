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
or none for the shard) the resolver uses ``NEUTRAL_LATENCY`` = 0.5, the value
of a shard exactly one reference RTT away: unknown is neither rewarded nor
punished against known shards at a typical distance.

Security factor, the shard's score on the 0..100 scale of the configuration
and the threat-intelligence feeds::

    security = clamp(score / 100, 0, 1)

Load factor, the spare share of the shard's capacity::

    load = 1 - min(1, open / capacity)            (0 when capacity <= 0)

Total, the weighted mean of the three factors (dividing by the weights' sum
keeps it in 0..1 whatever scale the weights are written in)::

    total = (wl · latency + ws · security + wload · load) / (wl + ws + wload)

The resolver then multiplies the total by the shard's own ``weight`` (1.0 by
default), which lets an operator favour or starve one shard without touching
the service's weights; see ``shardtcp.resolver.service``.
"""

from __future__ import annotations

import math

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
