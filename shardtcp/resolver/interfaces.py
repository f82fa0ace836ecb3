"""
The seams of the resolver: what the connection path may ask of it.

The connection path holds an ``IResolver`` and nothing more, so a resolver
backed by another source (a file, etcd, a test double) drops in without the
connection path knowing.
"""

from __future__ import annotations

from zope.interface import Interface


class IResolver(Interface):
    """Chooses shards for connections and hears how the connects went."""

    def service_config(service_id):
        """
        The current ``ServiceConfig`` of ``service_id``; raises
        ``UnknownService``.
        """

    def resolve(request):
        """
        The candidates for a ``ConnectionRequest``, the one to try first
        first, then the retry order.  Raises ``UnknownService``,
        ``AccessDenied`` or ``NoShardAvailable``.
        """

    def lease(shard_id):
        """
        Count one connection against ``shard_id`` until the returned lease
        is released.
        """

    def record_connect_result(shard_id, ok, seconds=None):
        """
        Note how a connect to ``shard_id`` went (and how long it took); a
        report about a shard that has left the records is ignored.
        """
