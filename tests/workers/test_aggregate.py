"""
The supervisor's sums over its workers: merged expositions, the load board,
the remote load and the workers' status lines.
"""

from __future__ import annotations

import json

import attrs
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.metrics import ProxyMetrics
from shardtcp.workers.aggregate import (
    MAX_FAMILIES,
    DepartedCounters,
    LoadBoard,
    RemoteLoad,
    WorkerView,
    merge_exposition,
    monotonic,
    workers_status,
)

FIRST = """\
# HELP app_requests_total Requests
# TYPE app_requests_total counter
app_requests_total{listener="a"} 2.0
app_requests_total{listener="b"} 1.0
# HELP app_open Open now
# TYPE app_open gauge
app_open{listener="a"} 4.0
# HELP app_seconds Time
# TYPE app_seconds histogram
app_seconds_bucket{le="0.1",service="s"} 1.0
app_seconds_bucket{le="1.0",service="s"} 2.0
app_seconds_bucket{le="+Inf",service="s"} 2.0
app_seconds_count{service="s"} 2.0
app_seconds_sum{service="s"} 0.75
# HELP app_start_timestamp_seconds Start
# TYPE app_start_timestamp_seconds gauge
app_start_timestamp_seconds 100.0
# HELP app_build_info Build
# TYPE app_build_info gauge
app_build_info{version="1.2"} 1.0
# HELP app_latency Latency
# TYPE app_latency summary
app_latency{quantile="0.5"} 0.2
app_latency_count 3.0
app_latency_sum 0.5
"""

SECOND = """\
# HELP app_requests_total Other words
# TYPE app_requests_total counter
app_requests_total{listener="a"} 5.0
app_requests_total{listener="c"} 7.0
# HELP app_open Open now
# TYPE app_open gauge
app_open{listener="a"} 1.0
# HELP app_seconds Time
# TYPE app_seconds histogram
app_seconds_bucket{le="0.1",service="s"} 0.0
app_seconds_bucket{le="1.0",service="s"} 1.0
app_seconds_bucket{le="+Inf",service="s"} 3.0
app_seconds_count{service="s"} 3.0
app_seconds_sum{service="s"} 12.5
# HELP app_start_timestamp_seconds Start
# TYPE app_start_timestamp_seconds gauge
app_start_timestamp_seconds 250.0
# HELP app_build_info Build
# TYPE app_build_info gauge
app_build_info{version="1.2"} 1.0
# HELP app_latency Latency
# TYPE app_latency summary
app_latency_count 1.0
app_latency_sum 0.25
# HELP shardtcp_shard_capacity_connections Configured capacity of the shard
# TYPE shardtcp_shard_capacity_connections gauge
shardtcp_shard_capacity_connections{service="api",shard="s1"} 100.0
"""

THIRD = """\
# HELP app_seconds Time
# TYPE app_seconds histogram
app_seconds_bucket{le="0.1",service="r"} 1.0
app_seconds_bucket{le="1.0",service="r"} 1.0
app_seconds_bucket{le="+Inf",service="r"} 1.0
app_seconds_count{service="r"} 1.0
app_seconds_sum{service="r"} 0.01
# HELP shardtcp_shard_capacity_connections Configured capacity of the shard
# TYPE shardtcp_shard_capacity_connections gauge
shardtcp_shard_capacity_connections{service="api",shard="s1"} 100.0
"""

MERGED = """\
# HELP app_build_info Build
# TYPE app_build_info gauge
app_build_info{version="1.2"} 1.0
# HELP app_latency Latency
# TYPE app_latency summary
app_latency_count 4.0
app_latency_sum 0.75
# HELP app_open Open now
# TYPE app_open gauge
app_open{listener="a"} 5.0
# HELP app_requests_total Requests
# TYPE app_requests_total counter
app_requests_total{listener="a"} 7.0
app_requests_total{listener="b"} 1.0
app_requests_total{listener="c"} 7.0
# HELP app_seconds Time
# TYPE app_seconds histogram
app_seconds_bucket{le="0.1",service="r"} 1.0
app_seconds_bucket{le="1.0",service="r"} 1.0
app_seconds_bucket{le="+Inf",service="r"} 1.0
app_seconds_count{service="r"} 1.0
app_seconds_sum{service="r"} 0.01
app_seconds_bucket{le="0.1",service="s"} 1.0
app_seconds_bucket{le="1.0",service="s"} 3.0
app_seconds_bucket{le="+Inf",service="s"} 5.0
app_seconds_count{service="s"} 5.0
app_seconds_sum{service="s"} 13.25
# HELP app_start_timestamp_seconds Start
# TYPE app_start_timestamp_seconds gauge
app_start_timestamp_seconds 250.0
# HELP shardtcp_shard_capacity_connections Configured capacity of the shard
# TYPE shardtcp_shard_capacity_connections gauge
shardtcp_shard_capacity_connections{service="api",shard="s1"} 100.0
"""


def values(text: str) -> dict:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class MergeExpositionTests(SynchronousTestCase):
    """``merge_exposition``: sums, maxima, order and refusals."""

    def test_merged_text_exactly(self):
        """Counters, gauges, histogram buckets, _count and _sum and a summary's _count and _sum
        are summed per label set; a label set in one input only (listener b, c, service r) is kept;
        timestamps, _info and MAX_FAMILIES keep the maximum; quantiles are left out; the first
        HELP wins; families by name, samples by label set and bucket bound."""
        self.assertEqual(merge_exposition([FIRST, SECOND, THIRD]), MERGED)

    def test_input_order_does_not_change_the_output(self):
        """The same inputs in another order give the same bytes but for the HELP of the first."""
        merged = merge_exposition([THIRD, FIRST, SECOND])
        self.assertEqual(merged, MERGED)
        self.assertEqual(
            merge_exposition([SECOND, FIRST, THIRD]),
            MERGED.replace("# HELP app_requests_total Requests", "# HELP app_requests_total Other words"),
        )

    def test_output_parses_back(self):
        """The merged text round-trips through prometheus_client's parser to the same values."""
        merged = merge_exposition([FIRST, SECOND, THIRD])
        self.assertEqual(merge_exposition([merged]), merged)
        self.assertEqual(values(merged)[("app_seconds_bucket", (("le", "+Inf"), ("service", "s")))], 5.0)

    def test_one_and_no_inputs(self):
        """One input comes out with its values; none gives an empty exposition."""
        self.assertEqual(merge_exposition([]), "")
        self.assertEqual(
            merge_exposition(["# TYPE x gauge\nx 3\n"]), "# HELP x \n# TYPE x gauge\nx 3.0\n"
        )

    def test_max_rule_edges(self):
        """Only gauges ending in _timestamp_seconds or _info, and names in ``maximum``,
        take the maximum, and gauges ending in _created the minimum: a gauge ending in
        _timestamp (no _seconds) is summed, and so is a counter named like a timestamp;
        an empty ``maximum`` sums MAX_FAMILIES too."""
        a = "# TYPE t_timestamp gauge\nt_timestamp 4\n# TYPE c_created gauge\nc_created 9\n" \
            "# TYPE n_timestamp_seconds counter\nn_timestamp_seconds_total 2\n"
        b = "# TYPE t_timestamp gauge\nt_timestamp 6\n# TYPE c_created gauge\nc_created 7\n" \
            "# TYPE n_timestamp_seconds counter\nn_timestamp_seconds_total 3\n"
        merged = values(merge_exposition([a, b]))
        self.assertEqual(merged[("t_timestamp", ())], 10.0)
        self.assertEqual(merged[("c_created", ())], 7.0)
        self.assertEqual(merged[("n_timestamp_seconds_total", ())], 5.0)
        self.assertEqual(values(merge_exposition([SECOND, THIRD], maximum=()))[
            ("shardtcp_shard_capacity_connections", (("service", "api"), ("shard", "s1")))], 200.0)
        self.assertEqual(values(merge_exposition([a, b], maximum={"t_timestamp"}))[("t_timestamp", ())], 6.0)

    def test_max_families_are_shardtcp_families(self):
        """Every name in MAX_FAMILIES is a family a shardtcp registry really exposes, so a
        renamed metric cannot silently fall back to being summed."""
        from shardtcp.metrics import RegistryCollector, ShardCollector
        from shardtcp.resolver.feeds import _FeedMetrics

        metrics = ProxyMetrics()
        _FeedMetrics(metrics.registry)
        names = {f.name for f in metrics.registry.collect()}
        names |= {f.name for f in RegistryCollector(attrs.make_class("S", ["stale", "changes"])(False, 0)).collect()}
        empty = attrs.make_class("Snapshot", ["services"])(())
        names |= {f.name for f in ShardCollector(lambda: empty).collect()}
        self.assertEqual(sorted(MAX_FAMILIES - names), [])

    def test_real_proxy_metrics(self):
        """Two ProxyMetrics renders merge into their sums (the connection path's families)."""
        a, b = ProxyMetrics(), ProxyMetrics()
        a.accepted.labels("tls").inc(2)
        b.accepted.labels("tls").inc(3)
        b.accepted.labels("plain").inc()
        a.active.labels("tls").set(4)
        b.active.labels("tls").set(1)
        a.connect_seconds.labels("api").observe(0.003)
        b.connect_seconds.labels("api").observe(0.3)
        merged = values(merge_exposition([a.render().decode(), b.render().decode()]))
        self.assertEqual(merged[("shardtcp_connections_accepted_total", (("listener", "tls"),))], 5.0)
        self.assertEqual(merged[("shardtcp_connections_accepted_total", (("listener", "plain"),))], 1.0)
        self.assertEqual(merged[("shardtcp_connections_active", (("listener", "tls"),))], 5.0)
        bucket = "shardtcp_upstream_connect_seconds_bucket"
        self.assertEqual(merged[(bucket, (("le", "0.0025"), ("service", "api")))], 0.0)
        self.assertEqual(merged[(bucket, (("le", "0.005"), ("service", "api")))], 1.0)
        self.assertEqual(merged[(bucket, (("le", "0.25"), ("service", "api")))], 1.0)
        self.assertEqual(merged[(bucket, (("le", "0.5"), ("service", "api")))], 2.0)
        self.assertEqual(merged[("shardtcp_upstream_connect_seconds_count", (("service", "api"),))], 2.0)
        self.assertAlmostEqual(merged[("shardtcp_upstream_connect_seconds_sum", (("service", "api"),))], 0.303)
        created = ("shardtcp_connections_accepted_created", (("listener", "tls"),))
        self.assertEqual(merged[created], min(values(a.render().decode())[created],
                                              values(b.render().decode())[created]))

    def test_label_values_escaped(self):
        """Quotes, backslashes and newlines in label values and HELP come out escaped and parse back."""
        text = '# HELP x a \\\\ b\\nc\n# TYPE x gauge\nx{p="q\\"r\\\\s\\nt"} 1\n'
        merged = merge_exposition([text, text])
        self.assertEqual(merged, '# HELP x a \\\\ b\\nc\n# TYPE x gauge\nx{p="q\\"r\\\\s\\nt"} 2.0\n')
        self.assertEqual(values(merged), {("x", (("p", 'q"r\\s\nt'),)): 2.0})

    def test_bad_input_named(self):
        """A text that does not parse is refused with a ValueError naming its place in the list."""
        e = self.assertRaises(ValueError, merge_exposition, [FIRST, "x{ 1\n"])
        self.assertIn("metrics input 1 is not a Prometheus text exposition", str(e))
        e = self.assertRaises(ValueError, merge_exposition, ["x abc\n", FIRST])
        self.assertIn("metrics input 0 is not", str(e))

    def test_type_conflict_named(self):
        """A family typed differently by two inputs is refused, naming the later input."""
        e = self.assertRaises(ValueError, merge_exposition,
                              ["# TYPE x gauge\nx 1\n", "# TYPE y gauge\ny 1\n", "# TYPE x counter\nx_total 1\n"])
        self.assertEqual(str(e), "metrics input 2: x is a counter, an earlier input had a gauge")

    def test_repeated_sample_named(self):
        """A sample given twice in one text is refused (it would be counted twice); the same
        sample in two texts is not a repeat."""
        e = self.assertRaises(ValueError, merge_exposition, ["x 1\n", "x 1\nx 2\n"])
        self.assertEqual(str(e), "metrics input 1: the sample x{} appears twice")
        self.assertEqual(merge_exposition(["x 1\n", "x 2\n"]), "# HELP x \n# TYPE x untyped\nx 3.0\n")


class SkipBadInputTests(SynchronousTestCase):
    def test_bad_input_left_out_whole(self):
        """With on_error, a text that does not parse, or whose second family clashes in type
        or repeats a sample, is left out whole (none of its samples count) and named."""
        errors = []
        clash = "# TYPE app_open gauge\napp_open 100\n# TYPE app_seconds gauge\napp_seconds 9\n"
        merged = merge_exposition([FIRST, "x{ 1\n", clash, "app_open 1\napp_open 2\n", SECOND, THIRD],
                                  on_error=lambda i, e: errors.append((i, e)))
        self.assertEqual(merged, MERGED)
        self.assertEqual([i for i, _ in errors], [1, 2, 3])
        self.assertEqual(errors[1][1], "metrics input 2: app_seconds is a gauge, an earlier input had a histogram")


class MonotonicTests(SynchronousTestCase):
    def test_only_families_that_go_up(self):
        """keep=monotonic keeps counters, histograms, a summary's _count and _sum and _created
        gauges; gauges, timestamps, _info and untyped samples go."""
        text = FIRST + "# TYPE c_created gauge\nc_created 5\n# TYPE u untyped\nu 3\n"
        kept = values(merge_exposition([text], keep=monotonic))
        self.assertEqual(sorted({name for name, _ in kept}), [
            "app_latency_count", "app_latency_sum", "app_requests_total", "app_seconds_bucket",
            "app_seconds_count", "app_seconds_sum", "c_created",
        ])
        self.assertFalse(monotonic("app_open", "gauge"))
        self.assertFalse(monotonic("g", "gaugehistogram"))
        self.assertTrue(monotonic("x_created", "gauge"))

    def test_departed_sums_exactly_and_stays_one_exposition(self):
        """Each added text's counters are summed into one exposition, gauges dropped; a
        hundred more additions of the same text grow the values, not the text's lines."""
        departed = DepartedCounters()
        self.assertEqual(departed.text, "")
        departed.add(FIRST)
        departed.add(SECOND)
        got = values(departed.text)
        self.assertEqual(got[("app_requests_total", (("listener", "a"),))], 7.0)
        self.assertEqual(got[("app_seconds_bucket", (("le", "+Inf"), ("service", "s")))], 5.0)
        self.assertEqual(got[("app_latency_count", ())], 4.0)
        self.assertNotIn(("app_open", (("listener", "a"),)), got)
        self.assertNotIn(("shardtcp_shard_capacity_connections", (("service", "api"), ("shard", "s1"))), got)
        lines = departed.text.count("\n")
        for _ in range(100):
            departed.add(FIRST)
        self.assertEqual(departed.text.count("\n"), lines)
        self.assertEqual(values(departed.text)[("app_requests_total", (("listener", "a"),))], 207.0)
        self.assertEqual(departed.added, 102)

    def test_departed_refuses_bad_text_unchanged(self):
        """A text that does not parse is refused with ValueError and the total is unchanged."""
        departed = DepartedCounters()
        departed.add(FIRST)
        before = departed.text
        self.assertRaises(ValueError, departed.add, "x{ 1\n")
        self.assertEqual((departed.text, departed.added), (before, 1))


class LoadBoardTests(SynchronousTestCase):
    """``LoadBoard``: each worker's counts, their sums and the change signal."""

    def setUp(self) -> None:
        self.calls: list = []
        self.board = LoadBoard(on_change=lambda: self.calls.append(self.board.version))

    def test_sums_and_others(self):
        """total() sums every worker; others(w) leaves w out; zero sums are dropped."""
        self.board.update(0, {"a": 2, "b": 1})
        self.board.update(1, {"a": 3, "c": 0})
        self.board.update(2, {"b": 4})
        self.assertEqual(self.board.total(), {"a": 5, "b": 5})
        self.assertEqual(self.board.others(0), {"a": 3, "b": 4})
        self.assertEqual(self.board.others(1), {"a": 2, "b": 5})
        self.assertEqual(self.board.others(2), {"a": 5, "b": 1})
        self.assertEqual(self.board.others(7), {"a": 5, "b": 5})
        self.assertEqual(self.board.counts(1), {"a": 3})

    def test_update_replaces(self):
        """An update replaces the worker's counts: a shard it no longer names drops to the others'."""
        self.board.update(0, {"a": 2, "b": 1})
        self.board.update(1, {"a": 1})
        self.board.update(0, {"b": 3})
        self.assertEqual(self.board.total(), {"a": 1, "b": 3})
        self.board.update(1, {})
        self.assertEqual(self.board.total(), {"b": 3})

    def test_forget(self):
        """A forgotten worker stops counting; forgetting an unknown one changes nothing."""
        self.board.update(0, {"a": 2})
        self.board.update(1, {"a": 1})
        self.assertTrue(self.board.forget(0))
        self.assertEqual(self.board.total(), {"a": 1})
        self.assertFalse(self.board.forget(0))
        self.assertFalse(self.board.forget(5))
        self.assertEqual(self.board.counts(0), {})

    def test_change_signal_only_on_change(self):
        """version and on_change move at a real change only: not for the same counts again,
        not for a first report of nothing, not for zeros, not for forgetting a worker with none."""
        self.assertTrue(self.board.update(0, {"a": 1}))
        self.assertFalse(self.board.update(0, {"a": 1}))
        self.assertFalse(self.board.update(1, {}))
        self.assertFalse(self.board.update(2, {"a": 0}))
        self.assertFalse(self.board.forget(1))
        self.assertEqual((self.board.version, self.calls), (1, [1]))
        self.assertTrue(self.board.update(0, {"a": 2}))
        self.assertTrue(self.board.forget(0))
        self.assertEqual((self.board.version, self.calls), (3, [1, 2, 3]))
        self.assertEqual(LoadBoard().update(0, {"a": 1}), True)

    def test_bad_counts_refused_whole(self):
        """A negative, fractional, boolean or textual count, a non-string shard id and a bad
        worker are refused with ValueError and change nothing; 0 is the smallest count taken."""
        self.board.update(0, {"a": 2})
        for counts in ({"a": 1, "b": -1}, {"a": 1.0}, {"a": True}, {"a": "1"}, {1: 1}):
            self.assertRaises(ValueError, self.board.update, 0, counts)
        for worker in (-1, True, "0", 1.0):
            self.assertRaises(ValueError, self.board.update, worker, {"a": 1})
        self.assertEqual((self.board.total(), self.board.version), ({"a": 2}, 1))
        e = self.assertRaises(ValueError, self.board.update, 3, {"a": -1})
        self.assertEqual(str(e), "worker 3: the count of a must be an integer from 0, not -1")
        self.board.update(0, {"a": 0})
        self.assertEqual(self.board.total(), {})


class RemoteLoadTests(SynchronousTestCase):
    """``RemoteLoad``: named sources summed into one set_remote_load call."""

    def setUp(self) -> None:
        self.applied: list = []
        self.remote = RemoteLoad(self.applied.append)

    def test_sources_summed_on_each_change(self):
        """Each set hands on the sum of every source; clear drops one source."""
        self.remote.set("fleet", {"a": 3, "b": 1})
        self.remote.set("workers", {"a": 2, "c": 4})
        self.remote.set("fleet", {"a": 1})
        self.remote.clear("workers")
        self.assertEqual(self.applied, [{"a": 3, "b": 1}, {"a": 5, "b": 1, "c": 4}, {"a": 3, "c": 4}, {"a": 1}])

    def test_same_counts_handed_on_again(self):
        """Setting the same counts again hands them on again (new shards must get them);
        reapply does too; clearing a source never set does not."""
        self.remote.set("fleet", {"a": 1})
        self.remote.set("fleet", {"a": 1})
        self.remote.reapply()
        self.remote.clear("workers")
        self.assertEqual(self.applied, [{"a": 1}] * 3)

    def test_sink(self):
        """sink(source) is a one-argument setter for that source."""
        sink = self.remote.sink("workers")
        self.remote.set("fleet", {"a": 1})
        sink({"a": 2})
        self.assertEqual(self.applied[-1], {"a": 3})
        self.assertEqual(self.remote.total(), {"a": 3})

    def test_bad_counts_refused(self):
        """A negative count is refused and the source keeps its counts; 0 is taken and dropped."""
        self.remote.set("fleet", {"a": 1})
        e = self.assertRaises(ValueError, self.remote.set, "fleet", {"a": -1})
        self.assertEqual(str(e), "remote load 'fleet': the count of a must be an integer from 0, not -1")
        self.assertEqual(self.remote.total(), {"a": 1})
        self.remote.set("fleet", {"a": 0})
        self.assertEqual(self.applied[-1], {})


class WorkersStatusTests(SynchronousTestCase):
    """``workers_status``: the workers' lines of /status."""

    def test_sorted_json_safe(self):
        """Entries come out as plain dicts (JSON round-trips them unchanged), by generation then index."""
        views = [
            WorkerView(1, 402, 2, "ready", 1700000010.5, 0, 3),
            WorkerView(0, 401, 2, "starting", 1700000010, 1, 0),
            WorkerView(1, 302, 1, "draining", 1700000000.25, 0, 7),
            WorkerView(0, 301, 1, "exited", 1700000000, 2, 0, "exit status 1; last line on stderr: no key"),
        ]
        status = workers_status(views)
        self.assertEqual([(s["generation"], s["index"]) for s in status], [(1, 0), (1, 1), (2, 0), (2, 1)])
        self.assertEqual(status[1], {"index": 1, "pid": 302, "generation": 1, "state": "draining",
                                     "started": 1700000000.25, "restarts": 0, "open_connections": 7,
                                     "last_exit": None})
        self.assertEqual(status[0]["last_exit"], "exit status 1; last line on stderr: no key")
        self.assertEqual(json.loads(json.dumps(status)), status)
        self.assertIs(type(status[2]["started"]), float)
        self.assertEqual(workers_status([]), [])

    def test_state_vocabulary(self):
        """Only starting, ready, draining, exited and waiting are states; a view is frozen."""
        for state in ("starting", "ready", "draining", "exited", "waiting"):
            WorkerView(0, 1, 0, state, 0.0, 0, 0)
        e = self.assertRaises(ValueError, WorkerView, 0, 1, 0, "Ready", 0.0, 0, 0)
        self.assertIn("not 'Ready'", str(e))
        view = WorkerView(0, 1, 0, "ready", 0.0, 0, 0)
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, view, "state", "exited")
