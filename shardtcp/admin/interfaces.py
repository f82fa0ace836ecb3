"""
The seams of the admin interface: what it asks of the rest of the process.

The admin site never reaches into the proxy's objects; it is handed a
resolver (``IResolverControl``), the metrics, a readiness callable and an
``IReloader``.  ``IReloader`` is the one the lifecycle code provides (the
same reload ``SIGHUP`` runs).
"""

from __future__ import annotations

from zope.interface import Interface


class IReloader(Interface):
    """Reloads the running configuration from its file."""

    def reload():
        """
        Validate the configuration file and apply it in place.

        Returns a ``Deferred`` that fires with a summary of what changed (a
        dict of JSON types) or fails with ``shardtcp.config.ConfigError``
        whose ``problems`` are the lines to show; on failure the running
        configuration stays as it was.
        """
