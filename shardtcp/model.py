"""
Value types shared across shardtcp.

Two families live here, both frozen ``attrs`` classes with no behaviour beyond
formatting:

* the validated configuration (``Config`` and what it holds), produced by
  ``shardtcp.config`` from TOML and consumed by everything else;
* the run-time records the resolver and the connection path exchange:
  ``ShardInfo`` (a shard at this moment), ``ConnectionRequest`` (what is known
  of a connection when a shard is chosen) and ``Evaluation`` (why a shard
  scored what it did).

This module imports nothing of the project but ``shardtcp.net`` (which
imports nothing of it): every other module may import it.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import Optional

import attrs
from attrs import field, frozen

# Re-exported from their one owner, so that older imports keep working.
from shardtcp.net import IPAddress, IPNetwork, format_hostport  # noqa: F401


@frozen
class Location:
    """A point on the globe, with the region name used for data residency."""

    lat: float
    lon: float
    region: str = ""


@frozen
class Address:
    """A host (IP literal or DNS name) and TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


# ---------------------------------------------------------------------------
# Configuration


@frozen
class HealthCheckConfig:
    """``health_check`` of one shard: ``kind`` is tcp, tls or agent."""

    kind: str
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    agent_port: Optional[int] = None


@frozen
class ShardConfig:
    """One ``[[service.NAME.shard]]`` entry."""

    id: str
    address: Address
    location: Optional[Location] = None
    capacity: int = 1000
    security_score: float = 100.0
    weight: float = 1.0
    server_name: Optional[str] = None
    health_check: Optional[HealthCheckConfig] = None
    slow_start: float = 30.0

    @property
    def region(self) -> str:
        return self.location.region if self.location is not None else ""


@frozen
class Weights:
    """Per-service weights of the score factors."""

    latency: float = 0.5
    security: float = 0.3
    load: float = 0.2


def _all_networks() -> tuple:
    return (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


@frozen
class PolicyConfig:
    """``[service.NAME.policy]``; the defaults mean "no requirement"."""

    encryption: str = "none"  # none | tls | mtls
    authentication: str = "none"  # none | mtls
    acl: tuple = ()
    allow: tuple = field(factory=_all_networks)  # of IPNetwork
    deny: tuple = ()  # of IPNetwork
    min_security_score: float = 0.0
    regions: tuple = ()  # of glob patterns; empty = any region


@frozen
class ServiceConfig:
    """One ``[service.NAME]`` table."""

    id: str
    names: tuple = ()
    upstream_tls: bool = False
    upstream_ca: Optional[str] = None
    upstream_cert: Optional[str] = None
    upstream_key: Optional[str] = None
    weights: Weights = field(factory=Weights)
    policy: PolicyConfig = field(factory=PolicyConfig)
    shards: tuple = ()  # of ShardConfig
    health_ca: Optional[str] = None  # CA of tls health checks
    shard_key: str = "none"  # none | client-ip | sni-label | authority | line-arg
    bounded_load: float = 1.25
    owners: tuple = ()  # of (key glob, (shard id, ...)), in file order


@frozen
class CertificateConfig:
    """A certificate and key, and the names it serves (terminate mode)."""

    cert: str
    key: str
    names: tuple = ()


@frozen
class PerSourceConfig:
    """``per_source`` of a listener: limits per client address (0 = off)."""

    max_connections: int = 0
    rate: float = 0.0  # new connections per second


@frozen
class ListenerConfig:
    """One ``[[listener]]`` entry."""

    name: str
    listen: str
    mode: str = "passthrough"  # passthrough | terminate | plain
    identify: tuple = ("sni",)
    default_service: Optional[str] = None
    peek_timeout: float = 5.0
    max_client_hello: int = 16384
    accept_proxy: bool = False
    trusted_proxies: tuple = ()  # of IPNetwork
    idle_timeout: float = 0.0
    connect_timeout: float = 5.0
    retries: int = 2
    certificates: tuple = ()  # of CertificateConfig
    default_certificate: Optional[CertificateConfig] = None
    strict_sni: bool = False
    alpn: tuple = ()
    min_tls: str = "1.2"
    client_ca: Optional[str] = None
    require_client_cert: bool = False
    max_connections: int = 0  # 0 = no limit
    backlog: int = 1024
    per_source: PerSourceConfig = field(factory=PerSourceConfig)


@frozen
class ProxyConfig:
    """``[proxy]``."""

    id: str
    location: Optional[Location] = None
    workers: Union[int, str] = 1  # a count, or "auto" (one per core)
    drain_timeout: float = 30.0
    splice: str = "auto"  # auto (kernel splice where it works) | userspace
    max_pipes: int = 4096  # kernel splice pipes per process, two per connection


@frozen
class SigningConfig:
    """``[signing]``: the PolicyContext signing key."""

    private_key: str
    kid: str
    ttl: float = 30.0
    tlv_type: int = 0xE0
    jwks: Optional[str] = None  # served at /.well-known/jwks.json


@frozen
class GeoNetwork:
    """One ``[geo]`` network: clients inside it are at ``location``."""

    network: IPNetwork
    location: Location


@frozen
class FeedSourceConfig:
    """One threat-intelligence feed source: a path or an http(s) URL."""

    source: str
    refresh: float = 60.0


@frozen
class ThreatIntelConfig:
    """``[threat_intel]``."""

    trusted_keys: str
    feeds: tuple = ()  # of FeedSourceConfig
    on_expiry: str = "baseline"  # baseline | distrust
    state_file: Optional[str] = None


@frozen
class AdminConfig:
    """``[admin]``."""

    listen: str
    token_file: Optional[str] = None


@frozen
class RegistryConfig:
    """``[registry]``: where shard records come from."""

    kind: str = "static"  # static | etcd
    endpoints: tuple = ()
    prefix: str = "/shardtcp/"
    snapshot: Optional[str] = None  # last good registry, read at start-up when etcd is down
    lease_ttl: float = 10.0
    ca: Optional[str] = None  # PEM CA of etcd's server certificates (https endpoints)
    cert: Optional[str] = None  # PEM client certificate to etcd, with ``key``
    key: Optional[str] = None
    username: Optional[str] = None  # etcd auth, with ``password_file``
    password_file: Optional[str] = None


@frozen
class ResolverConfig:
    """``[resolver]``: the live-state numbers (all optional)."""

    latency_decay: float = 10.0  # peak-EWMA time constant, seconds
    eject_after: int = 3  # consecutive connect failures that eject a shard
    eject_base: float = 10.0  # first ejection; doubles on each repeat
    eject_max: float = 300.0
    panic_threshold: float = 0.5  # below this share healthy: route among all


@frozen
class LogConfig:
    """``[log]``."""

    access: str = "text"  # text | json | off
    access_file: Optional[str] = None  # absolute; None: twistd's log


@frozen
class Config:
    """A whole validated configuration; paths in it are absolute."""

    proxy: ProxyConfig
    signing: SigningConfig
    listeners: tuple = ()  # of ListenerConfig
    services: tuple = ()  # of ServiceConfig, in file order
    geo: tuple = ()  # of GeoNetwork
    threat_intel: Optional[ThreatIntelConfig] = None
    admin: Optional[AdminConfig] = None
    registry: RegistryConfig = field(factory=RegistryConfig)
    resolver: ResolverConfig = field(factory=ResolverConfig)
    path: Optional[str] = None
    log: LogConfig = field(factory=LogConfig)

    def service(self, service_id: str) -> Optional[ServiceConfig]:
        for service in self.services:
            if service.id == service_id:
                return service
        return None


# ---------------------------------------------------------------------------
# Run-time records


class Health(enum.Enum):
    """A shard's health as the resolver sees it."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


@frozen
class ShardInfo:
    """
    What is known of one shard at one moment (the seed's ShardInfo).

    ``open_connections`` counts the connections this proxy has open, or is
    opening, to the shard; ``load`` is the shard's load in ``0..`` where 1.0
    means at ``capacity``.
    """

    shard_id: str
    service_id: str
    address: Address
    location: Optional[Location]
    capacity: int
    security_score: float
    weight: float = 1.0
    health: Health = Health.HEALTHY
    open_connections: int = 0
    load: float = 0.0
    server_name: Optional[str] = None

    @property
    def region(self) -> str:
        return self.location.region if self.location is not None else ""


@frozen
class ConnectionRequest:
    """
    What is known of a connection when its shard is chosen.

    ``client`` and ``destination`` are ``(ip, port)``: the client as the
    outgoing PROXY header will name it, and the proxy address it reached.
    ``shard_key`` is the connection's key for a service routing by key
    (``shardtcp.resolver.ownership.key_for``), else None.
    """

    service_id: str
    client: tuple
    destination: Optional[tuple] = None
    sni: Optional[str] = None
    alpn: tuple = ()
    listener: str = ""
    shard_key: Optional[str] = None


@frozen
class Evaluation:
    """
    A shard's score for one request, factor by factor, each in ``0..1``.

    ``details`` carries the inputs (distance, open connections...) so that
    logs and ``explain`` can say why.
    """

    shard_id: str
    latency: float
    security: float
    load: float
    total: float
    details: dict = attrs.field(factory=dict, eq=False)
