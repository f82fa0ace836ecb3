"""
Where the resolver's shard records come from.

``IShardSource`` is the seam between the resolver and its registry: the
configuration file today (``StaticShardSource``), a watched file or etcd
later. A source hands out whole ``ServiceConfig`` records and tells its
subscribers when they change; the resolver then reads them all again, so a
source never has to describe a change, only announce it.
"""

from __future__ import annotations

from typing import Callable, Iterable

from zope.interface import Interface, implementer

from shardtcp.model import Config, ServiceConfig


class IShardSource(Interface):
    """A provider of service and shard records."""

    def services() -> Iterable[ServiceConfig]:
        """
        Return the current records of every service, with their shards.

        Shard ids must be unique across all services: the resolver keys a
        shard's live state (health, leases, overrides) by its id.
        """

    def subscribe(callback: Callable[[], None]) -> Callable[[], None]:
        """
        Call ``callback()`` (with no arguments) whenever the records change.

        Return a function that cancels the subscription; calling it more than
        once is harmless.
        """


@implementer(IShardSource)
class StaticShardSource:
    """
    The services of a ``Config``, fixed for the life of the process.

    Its records never change, so subscribers are kept (the interface promises
    an unsubscribe that works) but never called.
    """

    def __init__(self, config: Config) -> None:
        self._services = tuple(config.services)
        # Keyed by a token per subscription, so that the same callback
        # subscribed twice is unsubscribed once per call, never twice.
        self._callbacks: dict[object, Callable[[], None]] = {}

    def services(self) -> Iterable[ServiceConfig]:
        """Return the configuration's services, in file order."""
        return self._services

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Record ``callback``; return an idempotent unsubscribe."""
        token = object()
        self._callbacks[token] = callback

        def unsubscribe() -> None:
            self._callbacks.pop(token, None)

        return unsubscribe
