"""
Prometheus metrics of the proxy.

One ``ProxyMetrics`` per process, holding its own ``CollectorRegistry`` (no
global registry: tests build as many as they like and read them back).
Label values are bounded by configuration (listener, service and shard ids)
and by the fixed vocabulary of rejection reasons, never by client input.

Counters are named without ``_total``: ``prometheus_client`` adds it in the
text format.  The per-shard series (open connections, health, score) are
read from the resolver's snapshot when scraped (``ShardCollector``), so the
connection path does not update them; ``TimedResolver`` times ``resolve``.

The series the connection path updates (about a dozen updates per
connection) are ``PlainCounter``/``PlainGauge``/``PlainHistogram``: plain
numbers in each label child, no lock, exported at scrape time by the family
itself as a collector, byte for byte what ``prometheus_client``'s own
``Counter``/``Gauge``/``Histogram`` write for the same events.  The proxy
updates them from the reactor thread only; a scrape reads them there too.
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from typing import Callable, Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import INF, floatToGoString
from zope.interface import implementer

from shardtcp.resolver.interfaces import IResolver

#: Buckets of the resolve-time histogram: a ranking takes microseconds to
#: a few milliseconds (10,000 shards).
RESOLVE_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


def _use_created() -> bool:
    # prometheus_client's own switch (``disable_created_metrics``), read at
    # each scrape as its metrics do.
    return _prometheus_metrics._use_created


class _PlainFamily:
    """
    A labelled metric family whose children keep plain numbers.

    ``labels(*values)`` returns the child (built once per label values and
    kept); ``collect`` builds the family's samples at scrape time in the
    order and form ``prometheus_client``'s wrapper of the same type does.
    ``wall`` gives a child's creation time (the ``_created`` sample).
    """

    _type = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: Optional[CollectorRegistry],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._wall = wall
        # label values as given -> child, and the text values -> child
        self._children: dict = {}
        self._series: dict = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: object, **named: object):
        child = self._children.get(values) if not named else None
        if child is not None:
            return child
        if values and named:
            raise ValueError("Can't pass both *args and **kwargs")
        if named:
            if sorted(named) != sorted(self._labelnames):
                raise ValueError("Incorrect label names")
            key = tuple(str(named[n]) for n in self._labelnames)
        else:
            if len(values) != len(self._labelnames):
                raise ValueError("Incorrect label count")
            key = tuple(str(v) for v in values)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = self._child()
        if not named:
            self._children[values] = child
        return child

    def _child(self):  # pragma: no cover
        raise NotImplementedError

    def _metric(self) -> Metric:
        return Metric(self._name, self._documentation, self._type)

    def describe(self) -> list:
        return [self._metric()]

    def collect(self) -> list:
        metric = self._metric()
        created = _use_created()
        names = self._labelnames
        for key, child in list(self._series.items()):
            child._add_samples(metric, self._name, dict(zip(names, key)), created)
        return [metric]


class _CounterChild:
    __slots__ = ("value", "created")

    def __init__(self, created: float) -> None:
        self.value = 0.0
        self.created = created

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount

    def _add_samples(self, metric: Metric, name: str, labels: dict, created: bool) -> None:
        metric.add_sample(name + "_total", labels, self.value)
        if created:
            metric.add_sample(name + "_created", dict(labels), self.created)


class PlainCounter(_PlainFamily):
    """A labelled counter of plain numbers (``prometheus_client.Counter``'s exposition)."""

    _type = "counter"

    def _child(self) -> _CounterChild:
        return _CounterChild(self._wall())


class _GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def _add_samples(self, metric: Metric, name: str, labels: dict, created: bool) -> None:
        metric.add_sample(name, labels, self.value)


class PlainGauge(_PlainFamily):
    """A labelled gauge of plain numbers (``prometheus_client.Gauge``'s exposition)."""

    _type = "gauge"

    def _child(self) -> _GaugeChild:
        return _GaugeChild()


class _HistogramChild:
    __slots__ = ("_bounds", "_counts", "sum", "created")

    def __init__(self, bounds: tuple, created: float) -> None:
        self._bounds = bounds
        self._counts = [0.0] * len(bounds)
        self.sum = 0.0
        self.created = created

    def observe(self, amount: float) -> None:
        self.sum += amount
        bounds = self._bounds
        # the first bound at or above ``amount`` (none for NaN, as there)
        i = bisect_left(bounds, amount)
        if i < len(bounds) and amount <= bounds[i]:
            self._counts[i] += 1

    def _add_samples(self, metric: Metric, name: str, labels: dict, created: bool) -> None:
        acc = 0.0
        bucket = name + "_bucket"
        for bound, count in zip(self._bounds, self._counts):
            acc += count
            metric.add_sample(bucket, dict(labels, le=floatToGoString(bound)), acc)
        metric.add_sample(name + "_count", dict(labels), acc)
        if self._bounds[0] >= 0:
            metric.add_sample(name + "_sum", dict(labels), self.sum)
        if created:
            metric.add_sample(name + "_created", dict(labels), self.created)


class PlainHistogram(_PlainFamily):
    """A labelled histogram of plain numbers (``prometheus_client.Histogram``'s exposition)."""

    _type = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *, buckets: Sequence[float], **kw):
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if bounds and bounds[-1] != INF:
            bounds.append(INF)
        if len(bounds) < 2:
            raise ValueError("Must have at least two buckets")
        self._bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, **kw)

    def _child(self) -> _HistogramChild:
        return _HistogramChild(self._bounds, self._wall())


class ProxyMetrics:
    """
    The counters, gauges and histograms the connection path updates.

    ``wall`` (default ``time.time``) stamps the ``_created`` sample of the
    series the connection path updates.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None, *, wall: Callable[[], float] = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        counter = _plain(PlainCounter, wall)
        gauge = _plain(PlainGauge, wall)
        histogram = _plain(PlainHistogram, wall)
        self.accepted = counter(
            "shardtcp_connections_accepted", "Client connections accepted", ["listener"], registry=r
        )
        self.active = gauge(
            "shardtcp_connections_active", "Client connections open now", ["listener"], registry=r
        )
        self.rejected = counter(
            "shardtcp_connections_rejected",
            "Client connections refused before splicing, by reason",
            ["listener", "reason"],
            registry=r,
        )
        self.spliced = counter(
            "shardtcp_connections_spliced",
            "Client connections spliced to a shard",
            ["listener", "service", "shard"],
            registry=r,
        )
        self.kernel_spliced = counter(
            "shardtcp_connections_kernel_spliced",
            "Spliced client connections whose bytes the kernel moves (splice(2))",
            ["listener"],
            registry=r,
        )
        self.upstream_failures = counter(
            "shardtcp_upstream_connect_failures",
            "Failed connection attempts to shards, by reason",
            ["service", "shard", "reason"],
            registry=r,
        )
        self.connect_seconds = histogram(
            "shardtcp_upstream_connect_seconds",
            "Time to connect to a shard",
            ["service"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.bytes = counter(
            "shardtcp_bytes", "Bytes spliced, by direction", ["listener", "direction"], registry=r
        )
        self.ended = counter(
            "shardtcp_connections_ended",
            "Spliced connections ended, by the side or event that ended them",
            ["listener", "ended_by"],
            registry=r,
        )

        self.proxy_errors = counter(
            "shardtcp_proxy_errors",
            "Connection attempts to shards that failed because of the proxy itself, by kind",
            ["kind"],
            registry=r,
        )

        self.resolve_seconds = histogram(
            "shardtcp_resolve_seconds",
            "Time the resolver took to rank a service's shards for a connection",
            ["service"],
            buckets=RESOLVE_BUCKETS,
            registry=r,
        )
        self.gc_pauses = histogram(
            "shardtcp_gc_pause_seconds",
            "Time the process stood still in Python's cyclic garbage collector, by generation collected",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=r,
        )
        self.reloads = Counter(
            "shardtcp_reloads",
            "Configuration reloads, by what asked for them and how they ended",
            ["trigger", "result"],
            registry=r,
        )
        self.admin_changes = Counter(
            "shardtcp_admin_requests",
            "Admin API changes asked for, by action and outcome",
            ["action", "outcome"],
            registry=r,
        )

    def record_reload(self, trigger: str, ok: bool) -> None:
        """Count one reload (``trigger``: ``api`` or ``signal``)."""
        self.reloads.labels(trigger, "ok" if ok else "failed").inc()

    def watch_shards(self, snapshot: Callable[[], object]) -> None:
        """
        Publish the per-shard series from ``snapshot()`` (a
        ``ResolverSnapshot``) at each scrape.  They are written by
        ``render`` straight from the snapshot (``ShardCollector.text``),
        not kept in the registry: ``value`` and the other readers of the
        registry then never build them, whatever the number of shards.
        """
        self._shards = ShardCollector(snapshot)

    def watch_registry(self, registry) -> None:
        """
        Publish the etcd registry's freshness at each scrape:
        ``shardtcp_registry_stale`` (1 while routing on the last registry
        seen) and ``shardtcp_registry_changes`` (changes applied so far).
        """
        self.registry.register(RegistryCollector(registry))

    def refusals(self) -> dict[str, dict[str, float]]:
        """Refused connections so far: listener -> reason -> count."""
        table: dict[str, dict[str, float]] = {}
        for family in self.rejected.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    listener = sample.labels["listener"]
                    table.setdefault(listener, {})[sample.labels["reason"]] = sample.value
        return table

    def render(self) -> bytes:
        """The registry in the Prometheus text format, the per-shard series after it."""
        text = generate_latest(self.registry)
        shards = getattr(self, "_shards", None)
        if shards is not None:
            text += shards.text().encode("utf-8")
        return text

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0.0 when absent); for tests and status."""
        result = self.registry.get_sample_value(name, labels)
        return 0.0 if result is None else result


#: Collector pauses: a young collection takes well under a millisecond; a
#: full one over a large heap tens of milliseconds (``docs/performance.rst``).
GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)


class GCPauses:
    """
    Times each run of Python's cyclic garbage collector into
    ``ProxyMetrics.gc_pauses`` (a ``gc.callbacks`` hook): every connection
    stands still while it runs, so a full collection over a large heap is
    latency every open connection sees.  ``install`` and ``remove`` add and
    take away the hook (the daemon's service tree does both).
    """

    def __init__(self, metrics: "ProxyMetrics", clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = 0.0
        # Bound once: the hook runs inside the collector, so it only reads
        # a clock and adds to numbers.
        self._children = tuple(metrics.gc_pauses.labels(str(g)) for g in range(3))

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = self._clock()
        else:
            generation = info.get("generation", 2)
            if 0 <= generation <= 2:
                self._children[generation].observe(self._clock() - self._started)

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


def _plain(kind, wall):
    """``kind`` with ``wall`` given: the constructor ``ProxyMetrics`` uses."""

    def build(name, documentation, labelnames, *, registry, **kw):
        return kind(name, documentation, labelnames, registry=registry, wall=wall, **kw)

    return build


class ShardCollector:
    """
    The per-shard gauges, built from one resolver snapshot per scrape:
    open connections, capacity, load, health (1 healthy, 0 not, with the
    state as a label), in rotation, operator drain, security score and
    effective weight.
    """

    def __init__(self, snapshot: Callable[[], object]) -> None:
        self._snapshot = snapshot
        # (service, shard) -> its label set as written, made once per shard.
        self._labels: dict[tuple[str, str], tuple[str, str]] = {}

    def text(self) -> str:
        """
        The series ``collect`` gives, in the Prometheus text format as
        ``generate_latest`` writes them (labels sorted, values as Go
        prints floats), but written straight from the snapshot: each
        shard's labels escaped once, each distinct value formatted once.
        """
        names = [(name, help_text) for name, help_text, _ in _SHARD_SERIES]
        lines: list[list[str]] = [[] for _ in names]
        values: dict = {}
        labels_of = self._labels
        seen: set = set()

        def number(value) -> str:
            # 0 and -0.0 are equal keys but print differently.
            key = value if value else (value, str(value))
            got = values.get(key)
            if got is None:
                got = values[key] = floatToGoString(value)
            return got

        snapshot = self._snapshot()
        for service in snapshot.services:
            for shard in service.shards:
                key = (service.service_id, shard.shard_id)
                seen.add(key)
                labels = labels_of.get(key)
                if labels is None:
                    pair = f'service="{_escape(key[0])}",shard="{_escape(key[1])}"'
                    labels = labels_of[key] = ("{" + pair + "} ", '",' + pair + "} ")
                plain, after_health = labels
                draining = shard.admin_state == "drain" or (
                    shard.admin_state != "ready" and shard.agent_state in ("drain", "maint")
                )
                health = shard.health
                lines[0].append(plain + number(shard.open_connections))
                lines[1].append(plain + number(shard.capacity))
                lines[2].append(plain + number(shard.load))
                lines[3].append(
                    '{health="' + _escape(health) + after_health
                    + ("1.0" if health == "healthy" else "0.0")
                )
                lines[4].append(plain + ("1.0" if shard.eligible else "0.0"))
                lines[5].append(plain + ("1.0" if draining else "0.0"))
                lines[6].append(plain + number(shard.security_score))
                lines[7].append(plain + number(shard.effective_weight))
        if len(labels_of) > len(seen):
            # Shards gone from the records: forget their labels.
            for key in [k for k in labels_of if k not in seen]:
                del labels_of[key]
        out = []
        for (name, help_text), family in zip(names, lines):
            out.append(f"# HELP {name} {_escape_help(help_text)}\n# TYPE {name} gauge\n")
            for line in family:
                out.append(name)
                out.append(line)
                out.append("\n")
        return "".join(out)

    def describe(self) -> list:
        # No description: the registry must not call collect() (and so the
        # resolver) at registration time.
        return []

    def collect(self):
        families = {
            key: GaugeMetricFamily(
                name, help_text, labels=["service", "shard"] + (["health"] if key == "healthy" else [])
            )
            for name, help_text, key in _SHARD_SERIES
        }
        snapshot = self._snapshot()
        for service in snapshot.services:
            for shard in service.shards:
                key = [service.service_id, shard.shard_id]
                draining = shard.admin_state == "drain" or (
                    shard.admin_state != "ready" and shard.agent_state in ("drain", "maint")
                )
                families["open"].add_metric(key, shard.open_connections)
                families["capacity"].add_metric(key, shard.capacity)
                families["load"].add_metric(key, shard.load)
                families["healthy"].add_metric(key + [shard.health], 1.0 if shard.health == "healthy" else 0.0)
                families["eligible"].add_metric(key, 1.0 if shard.eligible else 0.0)
                families["drain"].add_metric(key, 1.0 if draining else 0.0)
                families["score"].add_metric(key, shard.security_score)
                families["weight"].add_metric(key, shard.effective_weight)
        return list(families.values())


#: The per-shard series: name, help text, key in ``ShardCollector.collect``.
_SHARD_SERIES = (
    ("shardtcp_shard_open_connections", "Connections this proxy holds to the shard", "open"),
    ("shardtcp_shard_capacity_connections", "Configured capacity of the shard", "capacity"),
    ("shardtcp_shard_load_ratio", "Load against capacity (1.0 = full)", "load"),
    ("shardtcp_shard_healthy", "1 when the shard is healthy, else 0", "healthy"),
    ("shardtcp_shard_in_rotation", "1 when the shard may take new connections", "eligible"),
    ("shardtcp_shard_draining", "1 while the shard drains (operator or agent)", "drain"),
    ("shardtcp_shard_security_score", "Security score in force (0..100)", "score"),
    ("shardtcp_shard_weight", "Effective weight (weight x agent % x slow start)", "weight"),
)


def _escape(value: str) -> str:
    """A label value as the text format writes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _escape_help(value: str) -> str:
    """A help text as the text format writes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n")


@implementer(IResolver)
class TimedResolver:
    """
    An ``IResolver`` that times each ``resolve`` of the one it wraps into
    ``shardtcp_resolve_seconds``; everything else passes straight through.
    The histogram's child is bound once per service.
    """

    def __init__(self, resolver, metrics: ProxyMetrics, clock) -> None:
        self._resolver = resolver
        self._histogram = metrics.resolve_seconds
        self._children: dict = {}
        self._clock = clock

    def service_config(self, service_id):
        return self._resolver.service_config(service_id)

    def resolve(self, request, retries=2):
        started = self._clock.seconds()
        try:
            return self._resolver.resolve(request, retries)
        finally:
            child = self._children.get(request.service_id)
            if child is None:
                child = self._children[request.service_id] = self._histogram.labels(request.service_id)
            child.observe(max(0.0, self._clock.seconds() - started))

    def lease(self, shard_id):
        return self._resolver.lease(shard_id)

    def record_connect_result(self, shard_id, ok, seconds=None):
        return self._resolver.record_connect_result(shard_id, ok, seconds)


class RegistryCollector:
    """The etcd registry's two series, read from its source at each scrape."""

    def __init__(self, source) -> None:
        self._source = source

    def collect(self):
        stale = GaugeMetricFamily(
            "shardtcp_registry_stale", "1 while etcd is unreachable and the last registry seen is used"
        )
        stale.add_metric([], 1.0 if self._source.stale else 0.0)
        yield stale
        changes = CounterMetricFamily("shardtcp_registry_changes", "Registry changes applied from etcd")
        changes.add_metric([], float(self._source.changes))
        yield changes
