"""
``EtcdShardSource`` in memory: a fake etcd client and an injected clock.
"""

from __future__ import annotations

import json
import random

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from shardtcp.config import read_registered_shard
from shardtcp.registry.etcd import EtcdError, KeyValue, WatchCompacted
from shardtcp.registry.source import EtcdShardSource
from shardtcp.resolver.sources import IShardSource
from tests.registry.test_etcd import config, shard_ids


class FakeWatch:
    def __init__(self, on_events) -> None:
        self.on_events = on_events
        self.done = Deferred()

    def cancel(self) -> None:
        if not self.done.called:
            self.done.callback(None)


class FakeClient:
    """Answers ``range`` from a list of prepared answers; records watches."""

    def __init__(self) -> None:
        self.answers: list = []
        self.watches: list[tuple[int, FakeWatch]] = []
        self.ranges = 0

    def range(self, prefix: bytes):
        self.ranges += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def watch(self, prefix: bytes, start_revision: int, on_events):
        watch = FakeWatch(on_events)
        self.watches.append((start_revision, watch))
        return watch


def kv(shard_id: str, port: int) -> KeyValue:
    return KeyValue(f"/shardtcp/shards/api/{shard_id}".encode(), json.dumps({"address": f"127.0.0.1:{port}"}).encode())


class SourceTests(SynchronousTestCase):
    """The source's reading, watching, compaction and backoff rules."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.client = FakeClient()
        self.source = EtcdShardSource(
            config(), self.client, read_registered_shard, clock=self.clock,
            backoff=(0.5, 10.0), random=random.Random(7),
        )

    def test_interface(self) -> None:
        """It provides IShardSource."""
        self.assertTrue(verifyObject(IShardSource, self.source))

    def test_watch_from_next_revision(self) -> None:
        """After a range at revision R the watch starts at R + 1, and its events are applied."""
        self.client.answers.append((41, [kv("a", 9001)]))
        self.source.startService()
        self.assertEqual(shard_ids(self.source), ["api-file", "a"])
        [(start, watch)] = self.client.watches
        self.assertEqual(start, 42)
        self.assertFalse(self.source.stale)
        from shardtcp.registry.etcd import Event

        watch.on_events(43, [Event("put", kv("b", 9002)), Event("delete", kv("a", 0))])
        self.assertEqual(shard_ids(self.source), ["api-file", "b"])
        self.assertEqual(self.source.revision, 43)

    def test_compaction_rereads(self) -> None:
        """A compacted watch is followed at once by a full re-read, which replaces the records."""
        self.client.answers += [(10, [kv("a", 9001)]), (20, [kv("c", 9003)])]
        self.source.startService()
        [(_, watch)] = self.client.watches
        watch.done.errback(WatchCompacted(15))
        self.assertEqual(self.client.ranges, 2)
        self.assertEqual(shard_ids(self.source), ["api-file", "c"])
        self.assertEqual(self.client.watches[-1][0], 21)
        self.assertFalse(self.source.stale)

    def test_error_keeps_the_registry_and_backs_off(self) -> None:
        """An etcd error never empties the registry; retries back off within [d/2, d], d doubling to 10 s."""
        self.client.answers.append((10, [kv("a", 9001)]))
        self.source.startService()
        self.client.answers += [EtcdError("down")] * 8 + [(30, [kv("a", 9001), kv("d", 9004)])]
        [(_, watch)] = self.client.watches
        watch.done.errback(EtcdError("stream ended"))
        self.assertTrue(self.source.stale)
        self.assertEqual(shard_ids(self.source), ["api-file", "a"])
        ranges = self.client.ranges
        for ceiling in (1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0):
            # not before half the ceiling ...
            self.clock.advance(ceiling / 2 - 0.001)
            self.assertEqual(self.client.ranges, ranges)
            # ... and by the ceiling
            self.clock.advance(ceiling / 2 + 0.001)
            self.assertEqual(self.client.ranges, ranges + 1)
            ranges += 1
            self.assertEqual(shard_ids(self.source), ["api-file", "a"])
            self.assertTrue(self.source.stale)
        self.clock.advance(10.0)
        self.assertFalse(self.source.stale)
        self.assertEqual(shard_ids(self.source), ["api-file", "a", "d"])

    def test_stop_cancels(self) -> None:
        """Stopping ends the watch and the retry timer: nothing is left on the clock."""
        self.client.answers.append(EtcdError("down"))
        self.source.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.source.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
