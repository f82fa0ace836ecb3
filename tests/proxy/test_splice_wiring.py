"""
The kernel splicer of a process: ``build_splicer`` per ``[proxy] splice``,
``max_pipes`` and the listeners' modes, and ``PipePoolService`` closing
the pool when the proxy stops.
"""

from __future__ import annotations

import os

import attrs
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.model import ListenerConfig
from shardtcp.proxy.ksplice import PipePool
from shardtcp.tap import PipePoolService, build_splicer

from tests.support import make_config

PLAIN = ListenerConfig(name="edge", listen="tcp:0", mode="plain")
TERMINATE = ListenerConfig(name="tls", listen="tcp:0", mode="terminate")


def _config(listeners, **proxy):
    config = make_config(listener=listeners[0])
    return attrs.evolve(config, listeners=tuple(listeners), proxy=attrs.evolve(config.proxy, **proxy))


class BuildSplicerTests(SynchronousTestCase):
    """One splicer per process, only where a listener can use it."""

    def test_default_builds_a_bounded_pool(self) -> None:
        """By default a splicer exists, its pool bounded by ``max_pipes``."""
        splicer = build_splicer(_config([PLAIN], max_pipes=6), MemoryReactorClock())
        self.assertIsNotNone(splicer)
        self.assertEqual((splicer.pool.max_pipes, splicer.pool.in_use), (6, 0))

    def test_userspace_switch(self) -> None:
        """``splice = "userspace"`` builds none, even for plain listeners."""
        self.assertIsNone(build_splicer(_config([PLAIN], splice="userspace"), MemoryReactorClock()))

    def test_terminate_only(self) -> None:
        """Only terminate listeners: nothing could use a splicer, none is built."""
        self.assertIsNone(build_splicer(_config([TERMINATE]), MemoryReactorClock()))
        self.assertIsNotNone(build_splicer(_config([TERMINATE, PLAIN]), MemoryReactorClock()))


class PipePoolServiceTests(SynchronousTestCase):
    """Stopping the proxy closes the pool's spare pipes."""

    def test_stop_closes_spares_and_later_releases(self) -> None:
        """
        A spare pipe is closed on stop; a pipe released after stop is closed
        rather than kept (no spare left open behind a stopped proxy).
        """
        pool = PipePool(4, pipe_size=65536)
        spare, busy = pool.acquire(), pool.acquire()
        pool.release(spare, empty=True)
        self.assertEqual((pool.free, pool.in_use), (1, 1))
        service = PipePoolService(pool)
        service.startService()
        service.stopService()
        self.assertEqual(pool.free, 0)
        pool.release(busy, empty=True)
        self.assertEqual((pool.free, pool.in_use), (0, 0))
        for fd in (spare.read_fd, spare.write_fd, busy.read_fd, busy.write_fd):
            self.assertRaises(OSError, os.fstat, fd)
