"""
Tests for ``shardtcp.metrics``: the plain-number families the connection
path updates write what ``prometheus_client``'s own metrics write.
"""

from __future__ import annotations

import types

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import metrics as prometheus_metrics
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.metrics import PlainCounter, PlainGauge, PlainHistogram, ProxyMetrics

WALL = 1795870000.125

_TWINS = {PlainCounter: Counter, PlainGauge: Gauge, PlainHistogram: Histogram}


def twin_registry(metrics: ProxyMetrics) -> tuple[CollectorRegistry, dict]:
    """
    A registry of ``prometheus_client`` metrics with the names, help texts,
    labels and buckets of ``metrics``' families, registered in the same
    order: name -> the twin.
    """
    registry = CollectorRegistry()
    twins = {}
    for attribute, family in vars(metrics).items():
        kind = _TWINS.get(type(family))
        if kind is None:
            if isinstance(family, Counter):
                twins[attribute] = Counter(
                    family._name, family._documentation, family._labelnames, registry=registry
                )
            continue
        kw = {"buckets": family._bounds} if kind is Histogram else {}
        twins[attribute] = kind(family._name, family._documentation, family._labelnames, registry=registry, **kw)
    return registry, twins


def play(target) -> None:
    """One sequence of connection-path events, on ``target``'s families by attribute name."""
    target("accepted", "edge").inc()
    target("accepted", "edge").inc()
    target("accepted", "plain").inc(3)
    target("active", "edge").inc()
    target("active", "edge").inc()
    target("active", "edge").dec()
    target("active", "plain").set(7)
    target("rejected", "edge", "no_shard").inc()
    target("rejected", "edge", "client_gone").inc()
    target("spliced", "edge", "api", "shard-1").inc()
    target("kernel_spliced", "edge").inc()
    target("upstream_failures", "api", "shard-2", "refused").inc()
    target("proxy_errors", "fds").inc()
    target("bytes", "edge", "up").inc(517)
    target("bytes", "edge", "down").inc(0)
    target("bytes", "edge", "down").inc(123456789)
    target("ended", "edge", "client").inc()
    # on a bound, between bounds, above the last finite bound
    for seconds in (0.0005, 0.0031, 5, 7.25, 0.0):
        target("connect_seconds", "api").observe(seconds)
    target("resolve_seconds", "api").observe(0.00001)
    target("resolve_seconds", "api").observe(0.0003)
    # label values that are not text are written as text
    target("upstream_failures", "api", 7, "timeout").inc()
    target("reloads", "signal", "ok").inc()


class PlainFamilyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(prometheus_metrics, "time", types.SimpleNamespace(time=lambda: WALL))

    def both(self) -> tuple[ProxyMetrics, CollectorRegistry, dict]:
        metrics = ProxyMetrics(wall=lambda: WALL)
        registry, twins = twin_registry(metrics)
        return metrics, registry, twins

    def test_exposition_byte_identical(self) -> None:
        """
        After the same events, the proxy's registry renders byte for byte
        what prometheus_client's Counter/Gauge/Histogram of the same names,
        labels and buckets render (``_created`` included).
        """
        metrics, registry, twins = self.both()
        self.assertEqual(generate_latest(metrics.registry), generate_latest(registry))  # empty families
        play(lambda name, *values: getattr(metrics, name).labels(*values))
        play(lambda name, *values: twins[name].labels(*values))
        ours = generate_latest(metrics.registry)
        self.assertEqual(ours, generate_latest(registry))
        # the comparison saw real series
        self.assertIn(b'shardtcp_connections_accepted_total{listener="edge"} 2.0\n', ours)
        self.assertIn(b'shardtcp_connections_active{listener="edge"} 1.0\n', ours)
        self.assertIn(b'shardtcp_bytes_total{direction="down",listener="edge"} 1.23456789e+08\n', ours)
        self.assertIn(b'shardtcp_upstream_connect_seconds_bucket{le="0.0005",service="api"} 2.0\n', ours)
        self.assertIn(b'shardtcp_upstream_connect_seconds_bucket{le="5.0",service="api"} 4.0\n', ours)
        self.assertIn(b'shardtcp_upstream_connect_seconds_bucket{le="+Inf",service="api"} 5.0\n', ours)
        self.assertIn(b'shardtcp_upstream_connect_failures_total{reason="timeout",service="api",shard="7"} 1.0\n', ours)
        self.assertIn(b'shardtcp_connections_accepted_created{listener="edge"} 1.795870000125e+09\n', ours)

    def test_exposition_identical_without_created(self) -> None:
        """With prometheus_client's ``_created`` series switched off, both leave them out alike."""
        metrics, registry, twins = self.both()
        self.patch(prometheus_metrics, "_use_created", False)
        play(lambda name, *values: getattr(metrics, name).labels(*values))
        play(lambda name, *values: twins[name].labels(*values))
        ours = generate_latest(metrics.registry)
        self.assertEqual(ours, generate_latest(registry))
        self.assertNotIn(b"_created", ours)
        self.assertIn(b'shardtcp_connections_accepted_total{listener="edge"} 2.0\n', ours)

    def test_sample_values_and_refusals(self) -> None:
        """``value`` and ``refusals`` read the plain families as they read prometheus_client's."""
        metrics, _, _ = self.both()
        play(lambda name, *values: getattr(metrics, name).labels(*values))
        self.assertEqual(metrics.value("shardtcp_connections_accepted_total", listener="plain"), 3.0)
        self.assertEqual(metrics.value("shardtcp_upstream_connect_seconds_count", service="api"), 5.0)
        self.assertEqual(metrics.refusals(), {"edge": {"no_shard": 1.0, "client_gone": 1.0}})

    def test_same_child(self) -> None:
        """A child is built once per label values, given by position, by name or as non-text."""
        metrics = ProxyMetrics(wall=lambda: WALL)
        child = metrics.upstream_failures.labels("api", "7", "refused")
        self.assertIs(metrics.upstream_failures.labels("api", "7", "refused"), child)
        self.assertIs(metrics.upstream_failures.labels("api", 7, "refused"), child)
        self.assertIs(metrics.upstream_failures.labels(service="api", shard="7", reason="refused"), child)

    def test_bad_use_refused_alike(self) -> None:
        """Wrong label counts or names and a negative counter step raise ValueError, as there."""
        metrics, _, twins = self.both()
        for family in (metrics.accepted, twins["accepted"]):
            with self.assertRaises(ValueError):
                family.labels("a", "b")
            with self.assertRaises(ValueError):
                family.labels()
            with self.assertRaises(ValueError):
                family.labels(name="a")
            with self.assertRaises(ValueError):
                family.labels("edge").inc(-1)
        self.assertEqual(metrics.value("shardtcp_connections_accepted_total", listener="edge"), 0.0)

    def test_histogram_buckets_checked(self) -> None:
        """Unsorted or too few buckets are refused when the family is built."""
        with self.assertRaises(ValueError):
            PlainHistogram("h", "h", ["a"], buckets=(2, 1), registry=None)
        with self.assertRaises(ValueError):
            PlainHistogram("h", "h", ["a"], buckets=(float("inf"),), registry=None)
        one = PlainHistogram("h", "h", ["a"], buckets=(1,), registry=None)
        self.assertEqual(one._bounds, (1.0, float("inf")))

    def test_prometheus_client_version_compared(self) -> None:
        """The twins come from the installed prometheus_client (the comparison is not vacuous)."""
        self.assertTrue(prometheus_client.Counter is Counter)
        metrics, _, twins = self.both()
        self.assertIsInstance(twins["accepted"], Counter)
        self.assertIsInstance(metrics.accepted, PlainCounter)
