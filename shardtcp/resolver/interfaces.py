"""
The seams of the resolver: what the connection path may ask of it.

The connection path holds an ``IResolver`` and nothing more, so a resolver
backed by another source (a file, etcd, a test double) drops in without the
connection path knowing.  ``IResolverControl`` is what the health checker,
the threat feeds and the admin interface use.
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

    def resolve(request, retries=2):
        """
        The candidates for a ``ConnectionRequest``, the one to try first
        first, then at most ``retries`` more in the retry order.  Raises
        ``UnknownService``, ``AccessDenied``, ``NoShardKey`` (a service
        routing by shard key, a request without one) or ``NoShardAvailable``.
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


class IResolverControl(Interface):
    """
    What the health checker, the threat feeds and the admin interface ask
    of the resolver: the records, the live inputs, and read-only views.
    """

    def services():
        """The current ``ServiceConfig`` of every service, in record order."""

    def watch(callback):
        """
        Call ``callback()`` after every successful reload of the records;
        return a function that cancels the watch.
        """

    def get_shard_info(service_id):
        """Every shard of a service as it stands now (``ShardInfo``)."""

    def set_health(shard_id, health):
        """Set a shard's health as its active check sees it."""

    def set_admin_state(shard_id, admin_state):
        """The operator's ``"drain"``, ``"ready"``, or None for no override."""

    def set_weight(shard_id, weight):
        """Override a shard's weight."""

    def set_security_score(shard_id, score):
        """Override a shard's security score; None goes back to the record's."""

    def set_admission(admission):
        """
        The threat feeds in force: ``admission(ip)`` says why a client is
        denied, or None.
        """

    def apply_agent_report(shard_id, report):
        """Take in what a shard's agent said (an ``AgentReport``)."""

    def clear_agent_report(shard_id):
        """Forget what a shard's agent said."""

    def record_rtt(shard_id, seconds):
        """Feed one round-trip sample into a shard's measured latency."""

    def explain(request, key=None):
        """
        The ranking ``resolve`` would make for a ``ConnectionRequest``,
        every shard with its factors and its reasons for rejection, without
        side effects; a refused client is shown ``denied``.  For a service
        routing by shard key, ``key`` (else the request's) gives the owner
        chain.
        """

    def snapshot():
        """The live state of every service and shard, a ``ResolverSnapshot``."""
