"""
``tap.settle_heap``: the daemon collects what start-up and each reload
left behind, then freezes the live heap, so that the cyclic collector no
longer walks the configuration's objects on every full collection.
"""

from __future__ import annotations

import gc
import weakref

from twisted.trial.unittest import SynchronousTestCase

from shardtcp.tap import freeze_heap, settle_heap
from tests.test_reload import _listener, _Proxy


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def _frozen(case: SynchronousTestCase) -> None:
    case.addCleanup(gc.unfreeze)


class SettleHeapTests(SynchronousTestCase):
    def test_freeze_collects_nothing(self) -> None:
        """Freezing at start-up is no collection: a cycle dropped before it is kept, frozen."""
        _frozen(self)
        # No automatic collection may take the cycle first.
        gc.disable()
        self.addCleanup(gc.enable)
        gc.collect()
        dropped = _Cycle()
        gone = weakref.ref(dropped)
        del dropped
        freeze_heap()
        self.assertIsNotNone(gone())
        self.assertGreater(gc.get_freeze_count(), 0)
        settle_heap()
        self.assertIsNone(gone(), "the next settle collects it")

    def test_collects_then_freezes(self) -> None:
        """Cyclic garbage is collected first; what is alive is frozen after."""
        _frozen(self)
        dead = _Cycle()
        gone = weakref.ref(dead)
        alive = _Cycle()
        del dead
        settle_heap()
        self.assertIsNone(gone(), "cyclic garbage kept")
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertTrue(gc.is_tracked(alive))

    def test_garbage_of_frozen_objects_collected_at_next_settle(self) -> None:
        """
        An object frozen while alive and dropped later (a reload's old
        configuration) is collected by the next settle, not kept forever.
        """
        _frozen(self)
        old = _Cycle()
        gone = weakref.ref(old)
        settle_heap()
        del old
        gc.collect()
        self.assertIsNotNone(gone(), "a frozen cycle is out of the collector's sight")
        settle_heap()
        self.assertIsNone(gone())


class DaemonHeapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = _Proxy(self)
        self.proxy.write(_listener("edge", 7000), [("api-1", 9001, 1.0)])

    def test_daemon_settles_when_running_and_after_reload(self) -> None:
        """
        With ``settle_heap`` set (the daemon's tree), the heap is frozen
        once the reactor runs (no collection then) and settled just after a
        reload.
        """
        from shardtcp.config import load_config
        from shardtcp.tap import build_service

        proxy = self.proxy
        root = proxy.root = build_service(load_config(proxy.path), proxy.reactor, connector=proxy.connector)
        root.settle_heap = True
        root.startService()
        self.addCleanup(root.stopService)
        hooks = [hook[0] for hook in proxy.reactor.whenRunningHooks]
        self.assertIn(freeze_heap, hooks)
        self.assertNotIn(settle_heap, hooks)
        calls = len(proxy.reactor.getDelayedCalls())
        self.assertIsInstance(proxy.reload(), dict)
        later = [c for c in proxy.reactor.getDelayedCalls() if c.func is settle_heap]
        self.assertEqual(len(later), 1)
        self.assertEqual(later[0].getTime(), proxy.reactor.seconds())
        self.assertEqual(len(proxy.reactor.getDelayedCalls()), calls + 1)

    def test_daemon_times_the_collector(self) -> None:
        """
        The daemon's tree hooks ``GCPauses`` into the collector while it
        runs: a collection then is counted in its metrics; once stopped the
        hook is gone.
        """
        from shardtcp.config import load_config
        from shardtcp.metrics import GCPauses
        from shardtcp.tap import build_service

        proxy = self.proxy
        root = proxy.root = build_service(load_config(proxy.path), proxy.reactor, connector=proxy.connector)
        root.settle_heap = True
        root.startService()
        stopped = []
        self.addCleanup(lambda: stopped or root.stopService())
        ours = [hook for hook in gc.callbacks if isinstance(hook, GCPauses)]
        self.assertEqual(len(ours), 1)
        gc.collect()
        self.assertEqual(root.metrics.value("shardtcp_gc_pause_seconds_count", generation="2"), 1.0)
        root.stopService()
        proxy.reactor.advance(60)
        stopped.append(True)
        self.assertEqual([hook for hook in gc.callbacks if isinstance(hook, GCPauses)], [])

    def test_not_in_a_test_tree(self) -> None:
        """A tree built without the flag (tests, tools) never touches the collector."""
        from shardtcp.metrics import GCPauses

        root = self.proxy.start()
        self.addCleanup(root.stopService)
        hooks = [hook[0] for hook in self.proxy.reactor.whenRunningHooks]
        self.assertNotIn(freeze_heap, hooks)
        self.assertNotIn(settle_heap, hooks)
        self.assertEqual([hook for hook in gc.callbacks if isinstance(hook, GCPauses)], [])
        self.proxy.reload()
        self.assertEqual([c for c in self.proxy.reactor.getDelayedCalls() if c.func is settle_heap], [])


class PacedCollectorTests(SynchronousTestCase):
    """``tap.PacedCollector``: full collections on a clock, none on allocation counts."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.saved = gc.get_threshold()
        self.addCleanup(lambda: gc.set_threshold(*self.saved))
        self.runs: list = []

    def paced(self, interval: float = 60.0):
        from shardtcp.tap import PacedCollector

        paced = PacedCollector(self.clock, interval, collect=lambda: self.runs.append(self.clock.seconds()))
        self.addCleanup(paced.stop)
        return paced

    def test_full_collections_every_interval_exactly(self) -> None:
        """One collection at each interval, not a moment before (59.999 s: none; 60 s: one)."""
        paced = self.paced(60.0)
        paced.start()
        self.clock.advance(59.999)
        self.assertEqual(self.runs, [])
        self.clock.advance(0.001)
        self.assertEqual(self.runs, [60.0])
        self.clock.advance(60.0)
        self.assertEqual(self.runs, [60.0, 120.0])

    def test_automatic_full_collections_off_while_started(self) -> None:
        """Started, CPython never starts a full collection itself (young ones as before); stopped, its thresholds are back."""
        paced = self.paced()
        paced.start()
        young, middle, full = gc.get_threshold()
        self.assertEqual((young, middle), self.saved[:2])
        self.assertGreaterEqual(full, 1 << 30)
        paced.stop()
        self.assertEqual(gc.get_threshold(), self.saved)
        self.clock.advance(120.0)
        self.assertEqual(self.runs, [])
        self.assertFalse(paced.running)
        paced.stop()  # twice is harmless

    def test_start_twice_is_one_clock(self) -> None:
        paced = self.paced(10.0)
        paced.start()
        paced.start()
        self.clock.advance(10.0)
        self.assertEqual(self.runs, [10.0])
        paced.stop()
        self.assertEqual(gc.get_threshold(), self.saved)

    def test_daemon_paces_and_restores(self) -> None:
        """The daemon's tree starts it with the heap freeze and stops it with the tree."""
        from shardtcp.config import load_config
        from shardtcp.tap import build_service

        proxy = _Proxy(self)
        proxy.write(_listener("edge", 7000), [("api-1", 9001, 1.0)])
        root = proxy.root = build_service(load_config(proxy.path), proxy.reactor, connector=proxy.connector)
        root.settle_heap = True
        root.startService()
        self.addCleanup(root.stopService)
        self.assertGreaterEqual(gc.get_threshold()[2], 1 << 30)
        self.assertTrue(any(call.getTime() == proxy.reactor.seconds() + 60.0 for call in proxy.reactor.getDelayedCalls()))
        root.stopService()
        proxy.reactor.advance(60)
        self.assertEqual(gc.get_threshold(), self.saved)

