"""
``shardtcp.loglimit``: the bound on lines about shards (the mechanics are
shared with the refusal lines, ``tests.proxy.test_accesslog``).
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.loglimit import LineLimiter, ShardLineLimiter


class ShardLineLimiterTests(SynchronousTestCase):
    def limiter(self, **kw):
        events: list = []
        clock = Clock()
        limiter = ShardLineLimiter(clock, log=Logger(observer=events.append), **kw)
        return clock, limiter, events

    def test_exactly_the_bound_then_summarised(self) -> None:
        """``lines`` lines per key are allowed, the next is not; the summary names the key and the count."""
        clock, limiter, events = self.limiter(lines=3, interval=10.0)
        self.assertEqual([limiter.allow_key("refused", "shard a") for _ in range(5)], [True] * 3 + [False] * 2)
        self.assertTrue(limiter.allow_key("refused", "shard b"))
        self.assertTrue(limiter.allow_key("timeout", "shard a"))
        clock.advance(10)
        [summary] = events
        self.assertEqual(
            formatEvent(summary), "2 lines (refused) about shard a suppressed in the last 10s (over 3 lines per 10s)"
        )
        self.assertEqual((summary["name"], summary["suppressed"]), ("shard a", 2))

    def test_total_and_the_rest(self) -> None:
        """Past ``total_lines`` nothing is written; past ``summary_lines`` keys share one summary line."""
        clock, limiter, events = self.limiter(lines=1, total_lines=2, summary_lines=1)
        allowed = [limiter.allow_key("refused", f"shard {i}") for i in range(5)]
        self.assertEqual(allowed, [True, True, False, False, False])
        clock.advance(10)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "1 lines (refused) about shard 2 suppressed in the last 10s (over 1 lines per 10s)",
                "2 more lines about 2 other shards or services suppressed in the last 10s",
            ],
        )

    def test_stop_says_what_is_held(self) -> None:
        """``stop`` writes the pending summary at once and leaves no timer."""
        clock, limiter, events = self.limiter(lines=1)
        limiter.allow_key("ejected", "service api")
        limiter.allow_key("ejected", "service api")
        limiter.stop()
        self.assertEqual([e["suppressed"] for e in events], [1])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_generic_names(self) -> None:
        """The base class's lines name the key plainly; its default logger is the project's."""
        clock = Clock()
        events: list = []
        limiter = LineLimiter(clock, lines=1, log=Logger(observer=events.append))
        limiter.allow_key("why", "k")
        limiter.allow_key("why", "k")
        clock.advance(10)
        self.assertEqual(formatEvent(events[0]), "1 lines (why) about k suppressed in the last 10s (over 1 lines per 10s)")
        self.assertEqual(LineLimiter(clock)._log.namespace, "shardtcp")
        self.assertEqual(ShardLineLimiter(clock)._log.namespace, "shardtcp.resolver")
