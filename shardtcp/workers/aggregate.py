# -*- test-case-name: tests.workers.test_aggregate -*-
"""
What a supervisor adds up from its worker processes (SPEC 8), as pure values:
their Prometheus expositions (``merge_exposition``), their open connections
per shard (``LoadBoard``), the remote load each process hands its resolver
(``RemoteLoad``), the counters of workers that have exited
(``DepartedCounters``), and the workers' lines of ``/status``
(``workers_status``).

Nothing here does I/O or keeps time: the supervisor feeds in what the
workers reported and sends on what comes out.
"""

from __future__ import annotations

import math
from typing import Callable, Collection, Iterable, Mapping, Optional, Sequence

import attrs
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

#: shardtcp's families that every process reports for the same shared state
#: (a shard's configuration, health and rotation as each resolver sees it,
#: the registry's freshness, the last threat feed): the same value N times,
#: so a sum would be N times too big.  ``merge_exposition`` takes their
#: maximum.
MAX_FAMILIES = frozenset(
    {
        "shardtcp_shard_capacity_connections",
        "shardtcp_shard_load_ratio",
        "shardtcp_shard_healthy",
        "shardtcp_shard_in_rotation",
        "shardtcp_shard_draining",
        "shardtcp_shard_security_score",
        "shardtcp_shard_weight",
        "shardtcp_registry_stale",
        "shardtcp_registry_changes",
        "shardtcp_feed_seq",
        "shardtcp_feed_expires_at_seconds",
    }
)

#: Gauge families whose name ends so hold a time or a constant 1 with labels:
#: their maximum is kept, never their sum.
MAX_SUFFIXES = ("_timestamp_seconds", "_info")

#: ``prometheus_client`` puts a counter's or histogram's creation time in a
#: ``<name>_created`` gauge.  The summed counter never goes down (the
#: supervisor keeps what exited workers counted), so it counts from the
#: earliest of those times: their minimum is kept.
MIN_SUFFIXES = ("_created",)

#: The family types whose samples only go up (a summary's quantiles aside).
MONOTONIC_TYPES = frozenset({"counter", "histogram", "summary"})


def monotonic(name: str, kind: str) -> bool:
    """
    Whether a family's samples never go down while its process lives: a
    counter, a histogram (buckets, ``_count``, ``_sum``), a summary's
    ``_count`` and ``_sum``, and the ``_created`` gauge that dates one of
    them.  What ``DepartedCounters`` keeps of a worker that exited.
    """
    return kind in MONOTONIC_TYPES or (kind == "gauge" and name.endswith(MIN_SUFFIXES))

# The order of a family's samples within one label set, as generate_latest
# writes them: the value (gauge, counter, untyped), buckets, count, sum.
_SUFFIX_RANK = {"": 0, "_total": 0, "_bucket": 1, "_count": 2, "_sum": 3}


def _sample_key(family: str, name: str, labels: Mapping[str, str]) -> tuple:
    """Where a sample goes in its family: by label set, then as generate_latest orders it."""
    suffix = name[len(family):] if name.startswith(family) else name
    rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
    le = labels.get("le")
    try:
        bound = math.inf if le is None else float(le)
    except ValueError:
        bound = math.inf
    return (rest, _SUFFIX_RANK.get(suffix, 4), suffix, bound, tuple(sorted(labels.items())))


class _Families:
    """A collector that hands ``generate_latest`` the merged families."""

    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)


def merge_exposition(
    texts: Sequence[str], *, maximum: Collection[str] = MAX_FAMILIES,
    keep: Optional[Callable[[str, str], bool]] = None,
    on_error: Optional[Callable[[int, str], None]] = None,
) -> str:
    """
    One Prometheus text exposition from several processes' (each one
    ``generate_latest`` output, one per worker).

    Samples with the same name and label set are summed: counters, gauges
    that count (open connections), histogram buckets, ``_sum`` and
    ``_count``, a summary's ``_sum`` and ``_count``.  A sample in only some
    texts is kept as it is.  Each family gets one ``HELP`` (the first text's)
    and one ``TYPE``; families come in name order, a family's samples by
    label set, buckets by bound, so the output does not depend on which
    worker reported a series first.

    A sum would be wrong for a gauge that states one thing rather than
    counting, so these keep the largest value instead: a gauge family whose
    name ends in ``_timestamp_seconds`` or ``_info`` (labels carried by a
    constant 1), and every family named in ``maximum`` (by default
    ``MAX_FAMILIES``: shardtcp's series of state every process sees alike).
    A gauge family whose name ends in ``_created`` (a counter's creation
    time) keeps the smallest value: the sum counts from the earliest start
    (``MIN_SUFFIXES``).
    A summary's quantiles cannot be combined from quantiles, so they are
    left out.  Sample timestamps and exemplars are dropped: a sum has no
    single time.  With ``keep``, only the families for which
    ``keep(name, type)`` is true are kept (``monotonic``: what outlives a
    worker).

    Raises ``ValueError`` naming the input (``texts[i]``) when a text does
    not parse, repeats a sample, or gives a family another type than an
    earlier text did.  With ``on_error``, such a text is left out whole
    instead and ``on_error(i, message)`` is called.
    """
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    values: dict[str, dict[tuple, list]] = {}
    for index, text in enumerate(texts):
        try:
            parsed = _checked(text, index, types, keep)
        except ValueError as e:
            if on_error is None:
                raise
            on_error(index, str(e))
            continue
        for family in parsed:
            name = family.name
            types.setdefault(name, family.type)
            helps.setdefault(name, family.documentation)
            gauge = family.type in ("gauge", "unknown")
            smallest = gauge and name.endswith(MIN_SUFFIXES)
            biggest = name in maximum or (gauge and name.endswith(MAX_SUFFIXES))
            samples = values.setdefault(name, {})
            for sample in family.samples:
                if family.type == "summary" and "quantile" in sample.labels:
                    continue
                labels = tuple(sorted(sample.labels.items()))
                slot = samples.get((sample.name, labels))
                if slot is None:
                    samples[(sample.name, labels)] = [sample.name, dict(labels), sample.value]
                elif smallest:
                    slot[2] = min(slot[2], sample.value)
                elif biggest:
                    slot[2] = max(slot[2], sample.value)
                else:
                    slot[2] += sample.value
    families = []
    for name in sorted(values):
        metric = Metric(name, helps[name], types[name])
        ordered = sorted(values[name].values(), key=lambda s: _sample_key(name, s[0], s[1]))
        for sample_name, labels, value in ordered:
            metric.add_sample(sample_name, labels, value)
        families.append(metric)
    return generate_latest(_Families(families)).decode("utf-8")


def _checked(text: str, index: int, types: Mapping[str, str], keep) -> list:
    """
    ``text``'s families (those ``keep`` wants), checked whole before any is
    added: it parses, repeats no sample, types no family unlike ``types``.
    """
    where = f"metrics input {index}"
    try:
        parsed = list(text_string_to_metric_families(text))
    except Exception as e:
        # The parser's message names the bad token, not the line or text.
        raise ValueError(f"{where} is not a Prometheus text exposition: {e}") from None
    kept = []
    seen: set = set()
    mine: dict[str, str] = {}
    for family in parsed:
        if keep is not None and not keep(family.name, family.type):
            continue
        name = family.name
        known = types.get(name) or mine.setdefault(name, family.type)
        if known != family.type:
            raise ValueError(f"{where}: {name} is a {family.type}, an earlier input had a {known}")
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key in seen:
                raise ValueError(f"{where}: the sample {sample.name}{dict(key[1])} appears twice")
            seen.add(key)
        kept.append(family)
    return kept


class DepartedCounters:
    """
    What the workers that exited had counted: one exposition holding the
    sum of their last figures, of the families that only go up
    (``monotonic``: counters, histograms, summaries' ``_count`` and
    ``_sum``); their gauges leave with them.  The supervisor merges it into
    every later ``/metrics``, so a summed counter does not go down when a
    worker is retired, drained or replaced.

    It holds one merged exposition however many workers exit: its size is
    that of the label sets ever seen, as one process's registry would be.
    """

    def __init__(self) -> None:
        #: The merged exposition ("" before any worker exited).
        self.text = ""
        #: How many workers' figures were added.
        self.added = 0

    def add(self, text: str) -> None:
        """
        Add one worker's last exposition (its gauges left out).  Raises
        ``ValueError`` (and changes nothing) for a text that does not parse
        or does not agree with what was added before.
        """
        self.text = merge_exposition([self.text, text], keep=monotonic)
        self.added += 1


def _counts(counts: Mapping[str, int], whose: str) -> dict[str, int]:
    """``counts`` checked (shard id -> int >= 0), with its zeros dropped."""
    checked = {}
    for shard_id, n in counts.items():
        if not isinstance(shard_id, str):
            raise ValueError(f"{whose}: shard id {shard_id!r} is not a string")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{whose}: the count of {shard_id} must be an integer from 0, not {n!r}")
        if n:
            checked[shard_id] = n
    return checked


class LoadBoard:
    """
    Each worker's open connections per shard id, as it last reported them,
    and their sums: ``total()`` for the supervisor's status, and
    ``others(worker)``, the remote load that worker's resolver counts beside
    its own, so ``capacity`` means the same with 1 or N workers.

    ``version`` goes up by one at each change, and ``on_change()`` (when
    given) is called after it, so the supervisor sends the workers new
    figures only when there are some.  An update costs the shards it names
    and the shards the worker had.
    """

    def __init__(self, on_change: Optional[Callable[[], None]] = None) -> None:
        self._workers: dict[int, dict[str, int]] = {}
        self._total: dict[str, int] = {}
        self._on_change = on_change
        #: How many changes so far.
        self.version = 0

    def update(self, worker: int, counts: Mapping[str, int]) -> bool:
        """
        Replace ``worker``'s counts with ``counts``; whether anything changed.
        Raises ``ValueError`` (and changes nothing) for a worker that is not
        an integer from 0 or a count that is not an integer from 0.
        """
        if isinstance(worker, bool) or not isinstance(worker, int) or worker < 0:
            raise ValueError(f"a worker is an integer from 0, not {worker!r}")
        new = _counts(counts, f"worker {worker}")
        old = self._workers.get(worker)
        self._workers[worker] = new
        if old == new or (old is None and not new):
            return False
        self._apply(old or {}, new)
        return True

    def forget(self, worker: int) -> bool:
        """Drop ``worker`` (it exited); whether its counts changed the sums."""
        old = self._workers.pop(worker, None)
        if not old:
            return False
        self._apply(old, {})
        return True

    def _apply(self, old: dict[str, int], new: dict[str, int]) -> None:
        for shard_id in old.keys() | new.keys():
            n = self._total.get(shard_id, 0) + new.get(shard_id, 0) - old.get(shard_id, 0)
            if n:
                self._total[shard_id] = n
            else:
                self._total.pop(shard_id, None)
        self.version += 1
        if self._on_change is not None:
            self._on_change()

    def counts(self, worker: int) -> dict[str, int]:
        """``worker``'s own counts (empty when it never reported)."""
        return dict(self._workers.get(worker, {}))

    def total(self) -> dict[str, int]:
        """Every worker's counts summed by shard id; shards with none left out."""
        return dict(self._total)

    def others(self, worker: int) -> dict[str, int]:
        """Every worker's counts but ``worker``'s, summed by shard id; zeros left out."""
        total = dict(self._total)
        for shard_id, n in self._workers.get(worker, {}).items():
            left = total[shard_id] - n
            if left:
                total[shard_id] = left
            else:
                del total[shard_id]
        return total


class RemoteLoad:
    """
    The load a process's resolver counts beside its own, from several named
    sources (``"fleet"``: the other proxies' counts from etcd;
    ``"workers"``: this proxy's other workers'), summed by shard id and
    handed to ``apply`` (the resolver's ``set_remote_load``) at each
    ``set`` or ``clear``.

    ``set`` hands the sum on even when the source's counts did not change:
    ``LoadSharing.reapply`` sets the same counts again after the resolver's
    shards changed, and a shard that just appeared must get them.
    """

    def __init__(self, apply: Callable[[dict], None]) -> None:
        self._apply = apply
        self._sources: dict[str, dict[str, int]] = {}

    def set(self, source: str, counts: Mapping[str, int]) -> None:
        """Replace ``source``'s counts (``ValueError`` for a count not an integer from 0)."""
        self._sources[source] = _counts(counts, f"remote load {source!r}")
        self._push()

    def sink(self, source: str) -> Callable[[Mapping[str, int]], None]:
        """A one-argument ``set`` for ``source``, to give where an ``apply`` is asked for."""
        return lambda counts: self.set(source, counts)

    def clear(self, source: str) -> None:
        """Forget ``source`` (it stopped); nothing is handed on for one never set."""
        if self._sources.pop(source, None) is not None:
            self._push()

    def reapply(self) -> None:
        """Hand the sum on again (after the resolver's shards changed)."""
        self._push()

    def total(self) -> dict[str, int]:
        """Every source's counts summed by shard id."""
        total: dict[str, int] = {}
        for counts in self._sources.values():
            for shard_id, n in counts.items():
                total[shard_id] = total.get(shard_id, 0) + n
        return total

    def _push(self) -> None:
        self._apply(self.total())


#: A worker's states, in the order of its life; ``waiting``: an index whose
#: worker exited unexpectedly, waiting out its back-off.
WORKER_STATES = ("starting", "ready", "draining", "exited", "waiting")


def _state(instance, attribute, value) -> None:
    if value not in WORKER_STATES:
        raise ValueError(f"a worker's state is one of {', '.join(WORKER_STATES)}, not {value!r}")


@attrs.frozen
class WorkerView:
    """
    One worker as the supervisor sees it: its slot (``index``), its process
    id, the ``generation`` that started it (one more at each reload that
    replaces the workers), its state, when it started (seconds since the
    epoch; for a ``waiting`` index, when it is due to be spawned again), how
    many times its slot was restarted, its open connections, and how the
    last worker of its index that exited unexpectedly ended (its status and
    last line on standard error), if one did.
    """

    index: int
    pid: int
    generation: int
    state: str = attrs.field(validator=_state)
    started: float
    restarts: int
    open_connections: int
    last_exit: Optional[str] = None


def workers_status(entries: Iterable[WorkerView]) -> list[dict]:
    """The workers' lines of ``GET /status``: plain JSON values, by generation then slot."""
    return [
        {
            "index": int(w.index),
            "pid": int(w.pid),
            "generation": int(w.generation),
            "state": w.state,
            "started": float(w.started),
            "restarts": int(w.restarts),
            "open_connections": int(w.open_connections),
            "last_exit": None if w.last_exit is None else str(w.last_exit),
        }
        for w in sorted(entries, key=lambda w: (w.generation, w.index))
    ]
