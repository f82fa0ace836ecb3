"""
Tests for shardtcp.resolver.scoring: the score factors as pure functions.
"""

from __future__ import annotations

import math

from twisted.trial.unittest import SynchronousTestCase

from shardtcp.model import Location, Weights
from shardtcp.resolver import scoring
from shardtcp.resolver.scoring import (
    estimated_rtt_ms,
    great_circle_km,
    latency_factor,
    load_factor,
    security_factor,
    total_score,
)

from tests.support import FRANKFURT, NEW_YORK, SINGAPORE


class GreatCircleTests(SynchronousTestCase):
    """great_circle_km is the haversine distance on a 6371.0088 km sphere."""

    def test_frankfurt_new_york(self) -> None:
        """Frankfurt to New York is about 6200 km (within 1%)."""
        distance = great_circle_km(FRANKFURT, NEW_YORK)
        self.assertTrue(
            abs(distance - 6200) <= 62, f"{distance} km is not within 1% of 6200"
        )

    def test_frankfurt_singapore(self) -> None:
        """Frankfurt to Singapore is about 10260 km (within 1%)."""
        distance = great_circle_km(FRANKFURT, SINGAPORE)
        self.assertTrue(abs(distance - 10260) <= 102.6, f"{distance} km")

    def test_symmetric(self) -> None:
        """The distance from a to b equals the distance from b to a."""
        self.assertAlmostEqual(
            great_circle_km(NEW_YORK, SINGAPORE),
            great_circle_km(SINGAPORE, NEW_YORK),
            places=6,
        )

    def test_same_point(self) -> None:
        """A point is at distance zero from itself."""
        self.assertEqual(great_circle_km(FRANKFURT, FRANKFURT), 0.0)

    def test_antipodes(self) -> None:
        """Antipodal points are half the Earth's circumference apart."""
        distance = great_circle_km(Location(0.0, 0.0), Location(0.0, 180.0))
        self.assertAlmostEqual(distance, math.pi * scoring.EARTH_RADIUS_KM, places=6)

    def test_quarter_meridian(self) -> None:
        """Equator to pole is a quarter of the circumference."""
        distance = great_circle_km(Location(0.0, 10.0), Location(90.0, 10.0))
        self.assertAlmostEqual(
            distance, math.pi * scoring.EARTH_RADIUS_KM / 2, places=6
        )


class RttTests(SynchronousTestCase):
    """estimated_rtt_ms is 2 * 1.5 * d / 200 + 1 ms."""

    def test_zero_distance_is_base(self) -> None:
        """At zero distance only the 1 ms base remains."""
        self.assertEqual(estimated_rtt_ms(0.0), 1.0)

    def test_known_distance(self) -> None:
        """1000 km of great circle is 2 * 1.5 * 1000 / 200 + 1 = 16 ms."""
        self.assertAlmostEqual(estimated_rtt_ms(1000.0), 16.0)

    def test_negative_distance_is_zero(self) -> None:
        """A negative distance counts as zero rather than a negative RTT."""
        self.assertEqual(estimated_rtt_ms(-50.0), 1.0)


class LatencyFactorTests(SynchronousTestCase):
    """latency_factor is 1 / (1 + rtt / 50), in (0, 1]."""

    def test_reference_is_half(self) -> None:
        """At the 50 ms reference RTT the factor is exactly one half."""
        self.assertEqual(latency_factor(50.0), 0.5)

    def test_zero_is_one(self) -> None:
        """A zero RTT scores 1, the best."""
        self.assertEqual(latency_factor(0.0), 1.0)

    def test_monotonic(self) -> None:
        """The factor strictly decreases as the RTT grows, and stays positive."""
        rtts = [0.0, 1.0, 5.0, 16.0, 50.0, 94.0, 155.0, 231.0, 1000.0, 1e6]
        factors = [latency_factor(rtt) for rtt in rtts]
        for nearer, farther in zip(factors, factors[1:]):
            self.assertGreater(nearer, farther)
        self.assertGreater(factors[-1], 0.0)
        self.assertLessEqual(factors[0], 1.0)

    def test_nearer_city_scores_higher(self) -> None:
        """From Frankfurt, New York (~94 ms) beats Singapore (~155 ms)."""
        to_ny = latency_factor(estimated_rtt_ms(great_circle_km(FRANKFURT, NEW_YORK)))
        to_sg = latency_factor(estimated_rtt_ms(great_circle_km(FRANKFURT, SINGAPORE)))
        self.assertAlmostEqual(to_ny, 1 / (1 + 94.036 / 50), places=3)
        self.assertAlmostEqual(to_sg, 1 / (1 + 154.876 / 50), places=3)
        self.assertGreater(to_ny, to_sg)


class SecurityAndLoadTests(SynchronousTestCase):
    """security_factor and load_factor map their inputs onto 0..1."""

    def test_security_scale(self) -> None:
        """A score of 90 is 0.9; scores outside 0..100 are clamped."""
        self.assertEqual(security_factor(90.0), 0.9)
        self.assertEqual(security_factor(150.0), 1.0)
        self.assertEqual(security_factor(-5.0), 0.0)

    def test_load(self) -> None:
        """The load factor is the spare share of capacity, never below 0."""
        self.assertEqual(load_factor(0, 100), 1.0)
        self.assertEqual(load_factor(25, 100), 0.75)
        self.assertEqual(load_factor(100, 100), 0.0)
        self.assertEqual(load_factor(150, 100), 0.0)

    def test_no_capacity(self) -> None:
        """A shard without capacity has no spare share."""
        self.assertEqual(load_factor(0, 0), 0.0)


class TotalScoreTests(SynchronousTestCase):
    """total_score is the weighted mean of the factors."""

    def test_weighted_mean(self) -> None:
        """With 0.5/0.3/0.2, factors 1, 0.5, 0 give 0.5 + 0.15 + 0 = 0.65."""
        self.assertAlmostEqual(
            total_score(Weights(0.5, 0.3, 0.2), 1.0, 0.5, 0.0), 0.65
        )

    def test_divided_by_sum(self) -> None:
        """Weights 5/3/2 give the same total as 0.5/0.3/0.2."""
        self.assertAlmostEqual(
            total_score(Weights(5, 3, 2), 0.8, 0.6, 0.4),
            total_score(Weights(0.5, 0.3, 0.2), 0.8, 0.6, 0.4),
        )
        self.assertAlmostEqual(
            total_score(Weights(5, 3, 2), 0.8, 0.6, 0.4),
            (5 * 0.8 + 3 * 0.6 + 2 * 0.4) / 10,
        )

    def test_single_weight_selects_factor(self) -> None:
        """A lone non-zero weight makes the total equal that factor."""
        self.assertEqual(total_score(Weights(1, 0, 0), 0.3, 0.9, 0.7), 0.3)
        self.assertEqual(total_score(Weights(0, 1, 0), 0.3, 0.9, 0.7), 0.9)
        self.assertEqual(total_score(Weights(0, 0, 1), 0.3, 0.9, 0.7), 0.7)

    def test_weights_change_the_winner(self) -> None:
        """
        A near, weak shard beats a far, strong one when latency weighs most,
        and loses when security weighs most.
        """
        near_weak = (0.9, 0.2, 1.0)
        far_strong = (0.3, 1.0, 1.0)
        latency_first = Weights(0.8, 0.1, 0.1)
        security_first = Weights(0.1, 0.8, 0.1)
        self.assertGreater(
            total_score(latency_first, *near_weak),
            total_score(latency_first, *far_strong),
        )
        self.assertLess(
            total_score(security_first, *near_weak),
            total_score(security_first, *far_strong),
        )

    def test_all_zero(self) -> None:
        """All-zero weights give 0.0 rather than dividing by zero."""
        self.assertEqual(total_score(Weights(0, 0, 0), 1.0, 1.0, 1.0), 0.0)

    def test_negative_weight_refused(self) -> None:
        """A negative weight is an error, not a reward for a bad factor."""
        self.assertRaises(ValueError, total_score, Weights(-1, 1, 1), 1.0, 1.0, 1.0)


class CombinedLoadTests(SynchronousTestCase):
    """combined_load: a report can raise the load, never lower it."""

    def test_report_never_lowers(self) -> None:
        """90 of 100 open and a report of 0% is 0.9; a report of 95% is 0.95."""
        self.assertEqual(scoring.combined_load(90, 100, 0.0), 0.9)
        self.assertEqual(scoring.combined_load(90, 100, None), 0.9)
        self.assertEqual(scoring.combined_load(10, 100, 0.95), 0.95)

    def test_clamps_and_no_capacity(self) -> None:
        """Reports are read within 0..1; no capacity means full."""
        self.assertEqual(scoring.combined_load(0, 100, 7.0), 1.0)
        self.assertEqual(scoring.combined_load(0, 100, -1.0), 0.0)
        self.assertEqual(scoring.combined_load(0, 0, None), 1.0)

    def test_spare_factor(self) -> None:
        """spare_factor is 1 - min(1, load), a negative load counting as 0."""
        self.assertEqual(scoring.spare_factor(0.25), 0.75)
        self.assertEqual(scoring.spare_factor(3.0), 0.0)
        self.assertEqual(scoring.spare_factor(-1.0), 1.0)
        self.assertEqual(scoring.spare_factor(0.25), load_factor(25, 100))


class PeakEwmaTests(SynchronousTestCase):
    """peak_ewma follows peaks at once and decays with τ."""

    def test_first_and_higher_replace(self) -> None:
        """A first sample, and any sample above the value, replace it."""
        self.assertEqual(scoring.peak_ewma(None, None, 12.0, 0.0, 10.0), 12.0)
        self.assertEqual(scoring.peak_ewma(12.0, 0.0, 30.0, 0.0, 10.0), 30.0)

    def test_lower_blends_by_elapsed_time(self) -> None:
        """
        A lower sample Δt after the last moves the value by 1 - e^(-Δt/τ):
        not at all at Δt = 0, by 1 - 1/e at Δt = τ.
        """
        self.assertEqual(scoring.peak_ewma(30.0, 5.0, 10.0, 5.0, 10.0), 30.0)
        self.assertAlmostEqual(
            scoring.peak_ewma(30.0, 5.0, 10.0, 15.0, 10.0),
            30.0 * math.exp(-1) + 10.0 * (1 - math.exp(-1)),
        )
        self.assertAlmostEqual(scoring.peak_ewma(30.0, 0.0, 10.0, 1000.0, 10.0), 10.0)

    def test_zero_tau(self) -> None:
        """τ <= 0 keeps only the latest sample."""
        self.assertEqual(scoring.peak_ewma(30.0, 0.0, 10.0, 0.0, 0.0), 10.0)


class PathRttTests(SynchronousTestCase):
    """path_rtt_ms: geography plus the shard's measured excess."""

    def test_cases(self) -> None:
        """
        Nothing measured: geography. Nothing placed: the measurement.
        Both: geography plus max(0, measured - expected); without an
        expected value the base 1 ms stands in.
        """
        self.assertEqual(scoring.path_rtt_ms(None, None, None), None)
        self.assertEqual(scoring.path_rtt_ms(20.0, 5.0, None), 20.0)
        self.assertEqual(scoring.path_rtt_ms(None, None, 7.0), 7.0)
        self.assertEqual(scoring.path_rtt_ms(20.0, 5.0, 45.0), 60.0)
        self.assertEqual(scoring.path_rtt_ms(20.0, 5.0, 2.0), 20.0)
        self.assertEqual(scoring.path_rtt_ms(20.0, None, 11.0), 30.0)

    def test_unplaced_client(self) -> None:
        """When geo = expected (client at the proxy), rtt = max of the two."""
        for measured in (0.5, 3.0, 80.0):
            self.assertEqual(scoring.path_rtt_ms(3.0, 3.0, measured), max(3.0, measured))


class SlowStartFactorTests(SynchronousTestCase):
    """slow_start_factor ramps from 0.1 to 1 in 20 equal steps."""

    def test_ramp(self) -> None:
        """0.1 at the start, 0.55 halfway (the 11th step's start), 1 at the end and after."""
        self.assertAlmostEqual(scoring.slow_start_factor(100.0, 100.0, 30.0), 0.1)
        self.assertAlmostEqual(scoring.slow_start_factor(100.0, 115.0, 30.0), 0.55)
        self.assertEqual(scoring.slow_start_factor(100.0, 130.0, 30.0), 1.0)
        self.assertEqual(scoring.slow_start_factor(100.0, 500.0, 30.0), 1.0)

    def test_steps_at_both_edges(self) -> None:
        """
        20 steps over 30 s: the factor holds through each step (1.5 s) and
        moves at its end, not a moment before; the last step gives way to 1
        at the ramp's end.
        """
        f = scoring.slow_start_factor
        self.assertEqual(scoring.SLOW_START_STEPS, 20)
        self.assertAlmostEqual(f(100.0, 101.4999, 30.0), 0.1)
        self.assertAlmostEqual(f(100.0, 101.5, 30.0), 0.145)
        self.assertAlmostEqual(f(100.0, 102.9999, 30.0), 0.145)
        self.assertAlmostEqual(f(100.0, 129.9999, 30.0), 0.1 + 0.9 * 19 / 20)
        self.assertEqual(f(100.0, 130.0, 30.0), 1.0)

    def test_next_change(self) -> None:
        """``slow_start_next`` is the next step's start (the ramp's end in the last); None without a ramp under way."""
        n = scoring.slow_start_next
        self.assertAlmostEqual(n(100.0, 100.0, 30.0), 101.5)
        self.assertAlmostEqual(n(100.0, 101.4999, 30.0), 101.5)
        self.assertAlmostEqual(n(100.0, 101.5, 30.0), 103.0)
        self.assertAlmostEqual(n(100.0, 129.0, 30.0), 130.0)
        self.assertIsNone(n(100.0, 130.0, 30.0))
        self.assertIsNone(n(None, 5.0, 30.0))
        self.assertIsNone(n(5.0, 5.0, 0.0))
        self.assertIsNone(n(10.0, 5.0, 30.0))
        # The factor is constant from any moment until the next change.
        for now in (100.0, 100.7, 114.2, 128.6):
            nxt = n(100.0, now, 30.0)
            self.assertEqual(scoring.slow_start_factor(100.0, now, 30.0), scoring.slow_start_factor(100.0, nxt - 1e-9, 30.0))
            self.assertNotEqual(scoring.slow_start_factor(100.0, now, 30.0), scoring.slow_start_factor(100.0, nxt, 30.0))

    def test_no_ramp(self) -> None:
        """No start, a disabled ramp, or a start in the future: 1."""
        self.assertEqual(scoring.slow_start_factor(None, 5.0, 30.0), 1.0)
        self.assertEqual(scoring.slow_start_factor(5.0, 5.0, 0.0), 1.0)
        self.assertEqual(scoring.slow_start_factor(10.0, 5.0, 30.0), 1.0)


class EjectionSecondsTests(SynchronousTestCase):
    """ejection_seconds doubles per repeat up to the maximum."""

    def test_doubling(self) -> None:
        """10, 20, 40, 80, 160, then 300 (the cap), even far along."""
        self.assertEqual(
            [scoring.ejection_seconds(n, 10.0, 300.0) for n in range(1, 8)],
            [10, 20, 40, 80, 160, 300, 300],
        )
        self.assertEqual(scoring.ejection_seconds(10_000, 10.0, 300.0), 300.0)
