# -*- test-case-name: tests.registry.test_source -*-
"""
Following every key under an etcd prefix, the one way the registry does it.

A ``Follower`` reads the prefix (``replaced``), then watches from the next
revision (``changed``).  A compacted revision means reading everything
again at once; a broken connection means a retry after a backoff doubling
from ``backoff[0]`` to ``backoff[1]`` seconds, drawn from its upper half so
that proxies that lost etcd together do not come back together.  While it
cannot reach etcd it is ``stale`` and keeps what it saw: an error never
empties what a subclass holds.  Stopping cancels whatever is in flight.
"""

from __future__ import annotations

import random as _random
from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from shardtcp.registry.etcd import EtcdClient, WatchCompacted

log = Logger(namespace="shardtcp.registry")


class Follower(Service):
    """Follows ``prefix``; subclasses say what a full read and a change mean."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: bytes,
        *,
        clock: IReactorTime,
        backoff: tuple[float, float] = (0.5, 10.0),
        random: Optional[_random.Random] = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._clock = clock
        self._backoff = backoff
        self._random = random or _random.SystemRandom()
        self._watch = None
        self._sleep = None
        self._pending = None
        self._failures = 0
        self.revision = 0
        self.stale = True
        self.stale_reason = "not synchronised yet"

    # -- what subclasses give ----------------------------------------------

    def replaced(self, revision: int, kvs: list) -> None:
        """Everything under the prefix at ``revision`` (``KeyValue`` list)."""
        raise NotImplementedError

    def changed(self, revision: int, events: list) -> None:
        """A batch of ``Event`` s seen by the watch, up to ``revision``."""
        raise NotImplementedError

    def stale_changed(self, stale: bool, reason: str) -> None:
        """Told once per transition between in sync and stale."""

    # -- following ------------------------------------------------------------

    def _set_stale(self, stale: bool, reason: str = "") -> None:
        was = self.stale
        if stale == was and (not stale or reason == self.stale_reason):
            return
        self.stale, self.stale_reason = stale, reason
        if stale != was:
            self.stale_changed(stale, reason)

    def startService(self) -> None:
        super().startService()
        self._follow()

    def stopService(self):
        super().stopService()
        for pending in (self._watch, self._sleep, self._pending):
            if pending is not None:
                pending.cancel()
        return None

    def _delay(self) -> float:
        base, ceiling = self._backoff
        delay = min(ceiling, base * (2 ** min(self._failures, 16)))
        return delay / 2 + self._random.random() * delay / 2

    @inlineCallbacks
    def _follow(self):
        while self.running:
            try:
                self._pending = self._client.range(self._prefix)
                revision, kvs = yield self._pending
                self._pending = None
                if not self.running:
                    return
                self.replaced(revision, kvs)
                self._failures = 0
                self._set_stale(False)
                self._watch = self._client.watch(self._prefix, revision + 1, self.changed)
                yield self._watch.done
                self._watch = None
            except WatchCompacted as e:
                self._watch = None
                log.info(
                    "registry: {prefix}: {error}; reading it again",
                    prefix=self._prefix.decode("utf-8", "replace"),
                    error=str(e),
                )
                continue
            except CancelledError:
                return
            except Exception as e:
                self._watch = None
                self._pending = None
                if not self.running:
                    return
                self._set_stale(True, str(e) or e.__class__.__name__)
                self._failures += 1
                self._sleep = deferLater(self._clock, self._delay(), lambda: None)
                try:
                    yield self._sleep
                except CancelledError:
                    return
                finally:
                    self._sleep = None
