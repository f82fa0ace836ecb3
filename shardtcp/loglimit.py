# -*- test-case-name: tests.test_loglimit -*-
"""
Bounds on warning lines that a flood could multiply.

``LineLimiter`` is a token bucket of ``lines`` per ``interval`` for each
(reason, key) and one for all keys together; what it suppresses is counted
and said, exactly, in summary lines when the interval ends.  It only
decides about log lines: metrics count every event.  The proxy bounds its
refusal lines with it (``shardtcp.proxy.accesslog.RefusalLimiter``, keyed
by the client's network) and its lines about failing shards (keyed by
shard); the resolver its ejection lines (keyed by service).
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["LineLimiter", "ShardLineLimiter"]


class LineLimiter:
    """
    Token buckets bounding one kind of warning line: ``lines`` per
    ``interval`` seconds for each (reason, key), and ``total_lines`` per
    interval over all of them.

    ``allow_key(reason, key)`` says whether a line may be written now.
    When an interval in which lines were suppressed ends, the keys with the
    most suppressed lines get a summary line each (at most
    ``summary_lines``) and the rest one line together; every count is
    exact.  So under any attack, refusals write at most ``total_lines +
    summary_lines + 1`` lines per interval.  At most ``max_keys`` keys are
    tracked; past that, new sources share one key per reason (``*``), so
    an attacker spreading over many networks cannot grow the table.

    A subclass names its lines: ``one_summary`` and ``rest_summary`` are
    the summary lines' formats, ``key_field`` and ``keys_field`` the names
    under which they carry the key and the count of other keys, and
    ``log_namespace`` that of the logger used when none is given.
    """

    one_summary = (
        "{suppressed} lines ({reason}) about {key} suppressed "
        "in the last {interval:g}s (over {lines} lines per {interval:g}s)"
    )
    rest_summary = "{suppressed} more lines about {keys} others suppressed in the last {interval:g}s"
    key_field = "key"
    keys_field = "keys"
    log_namespace = "shardtcp"

    def __init__(
        self,
        clock: IReactorTime,
        *,
        lines: int = 10,
        interval: float = 10.0,
        total_lines: int = 100,
        summary_lines: int = 10,
        max_keys: int = 4096,
        log: Optional[Logger] = None,
    ) -> None:
        if lines < 1 or total_lines < 1 or interval <= 0:
            raise ValueError("lines and total_lines must be at least 1 and interval positive")
        self._clock = clock
        self._lines = lines
        self._interval = interval
        self._rate = lines / interval
        self._total = total_lines
        self._total_rate = total_lines / interval
        self._summary_lines = summary_lines
        self._max_keys = max_keys
        self._log = log if log is not None else Logger(namespace=self.log_namespace)
        # key -> [tokens, last refill time, suppressed count]
        self._buckets: dict = {}
        self._all = [float(total_lines), clock.seconds()]
        self._flush_call = None
        self._pruned_at = float("-inf")

    def allow_key(self, reason: str, name: str) -> bool:
        """Whether to write a line for ``reason`` about ``name`` now."""
        now = self._clock.seconds()
        key = (reason, name)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys and now - self._pruned_at >= self._interval:
                # At most once an interval: under a spread-out attack the
                # table stays full and a scan per refusal would cost more
                # than the line it saves.
                self._prune(now)
            if len(self._buckets) >= self._max_keys:
                key = (reason, "*")
                bucket = self._buckets.get(key)
            if bucket is None:
                bucket = [float(self._lines), now, 0]
                self._buckets[key] = bucket
        tokens = min(float(self._lines), bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        every = self._all
        total = min(float(self._total), every[0] + (now - every[1]) * self._total_rate)
        every[1] = now
        if tokens >= 1.0 and total >= 1.0:
            bucket[0] = tokens - 1.0
            every[0] = total - 1.0
            return True
        bucket[0] = tokens
        every[0] = total
        bucket[2] += 1
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(self._interval, self._flush)
        return False

    def suppressed(self) -> int:
        """Lines suppressed and not yet summarised."""
        return sum(bucket[2] for bucket in self._buckets.values())

    def _flush(self) -> None:
        """Say what was suppressed, then forget keys that are quiet again."""
        self._flush_call = None
        now = self._clock.seconds()
        held = sorted(
            ((bucket[2], key) for key, bucket in self._buckets.items() if bucket[2]),
            key=lambda item: (-item[0], item[1]),
        )
        for count, (reason, name) in held[: self._summary_lines]:
            self._log.info(
                self.one_summary,
                suppressed=count,
                reason=reason,
                interval=self._interval,
                lines=self._lines,
                **{self.key_field: name},
            )
        rest = held[self._summary_lines :]
        if rest:
            self._log.info(
                self.rest_summary,
                suppressed=sum(count for count, _ in rest),
                interval=self._interval,
                **{self.keys_field: len(rest)},
            )
        for _, key in held:
            self._buckets[key][2] = 0
        self._prune(now)

    def _prune(self, now: float) -> None:
        """Forget keys with nothing to say whose bucket is full again."""
        self._pruned_at = now
        for key in list(self._buckets):
            bucket = self._buckets[key]
            if not bucket[2] and bucket[0] + (now - bucket[1]) * self._rate >= self._lines:
                del self._buckets[key]

    def stop(self) -> None:
        """Write the pending summary now (at shutdown)."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        self._flush()


class ShardLineLimiter(LineLimiter):
    """
    Lines about shards (a failed attempt, an ejection), keyed by shard or
    service: ``allow_key(reason, name)``.
    """

    one_summary = (
        "{suppressed} lines ({reason}) about {name} suppressed "
        "in the last {interval:g}s (over {lines} lines per {interval:g}s)"
    )
    rest_summary = "{suppressed} more lines about {names} other shards or services suppressed in the last {interval:g}s"
    key_field = "name"
    keys_field = "names"
    log_namespace = "shardtcp.resolver"
