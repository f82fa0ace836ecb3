"""
``twistd shardtcp``: options and the service tree.

``makeService`` validates the configuration first and refuses to start, with
one line per problem and no traceback, when it is not valid.  The tree is:

* the ``ShardResolver`` (a service: it owns the live shard state);
* one ``strports`` service per ``[[listener]]`` (a port that cannot be bound
  fails start-up loudly);
* later: health checks, feeds and the admin site, each a service.
"""

from __future__ import annotations

import sys

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.python import usage

from shardtcp.config import ConfigError, load_config
from shardtcp.identify.names import NameTable
from shardtcp.keys import load_private_key
from shardtcp.metrics import ProxyMetrics
from shardtcp.model import Config
from shardtcp.policy import PolicySigner
from shardtcp.proxy.connector import ShardConnector
from shardtcp.proxy.listener import ListenerContext, ProxyFactory
from shardtcp.resolver import ShardResolver


class Options(usage.Options):
    """Command-line options of ``twistd shardtcp``."""

    synopsis = "[options]"
    longdesc = (
        "Run the shardtcp proxy: route each TCP connection to the best shard of "
        "its service and hand it a signed PolicyContext in a PROXY v2 header."
    )
    optParameters = [
        ["config", "c", None, "Path of the TOML configuration file (required)."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config PATH is required")


class ProxyService(MultiService):
    """The root of the tree; keeps the shared parts reachable for tests."""

    def __init__(self, config: Config, resolver: ShardResolver, metrics: ProxyMetrics) -> None:
        super().__init__()
        self.config = config
        self.resolver = resolver
        self.metrics = metrics
        self.factories: dict = {}


def build_service(config: Config, reactor=None, *, connector: ShardConnector | None = None) -> ProxyService:
    """Build the service tree for a validated ``config``."""
    if reactor is None:
        from twisted.internet import reactor
    metrics = ProxyMetrics()
    resolver = ShardResolver(config, clock=reactor)
    root = ProxyService(config, resolver, metrics)
    resolver.setServiceParent(root)
    signer = PolicySigner(
        load_private_key(config.signing.private_key),
        kid=config.signing.kid,
        issuer=config.proxy.id,
        ttl=config.signing.ttl,
        now=reactor.seconds,
    )
    names = NameTable((s.id, s.names) for s in config.services)
    if connector is None:
        connector = ShardConnector(reactor)
    for listener in config.listeners:
        context = ListenerContext(
            config=listener,
            names=names,
            resolver=resolver,
            signer=signer,
            connector=connector,
            metrics=metrics,
            clock=reactor,
            tlv_type=config.signing.tlv_type,
        )
        factory = ProxyFactory(context)
        root.factories[listener.name] = factory
        port_service = strports.service(listener.listen, factory, reactor=reactor)
        port_service.setName(f"listener:{listener.name}")
        port_service.setServiceParent(root)
    return root


def makeService(options: Options, reactor=None) -> ProxyService:
    """twistd's entry point: load the configuration, build the tree."""
    try:
        config = load_config(options["config"])
    except ConfigError as e:
        for line in e.problems:
            sys.stderr.write(f"shardtcp: {line}\n")
        sys.stderr.write("shardtcp: configuration is not valid; not starting\n")
        raise SystemExit(1)
    return build_service(config, reactor)
