"""
How shards are reached: plain client endpoints and client TLS options.

Shared by the connection path (``shardtcp.proxy``) and the health checker
(``shardtcp.resolver.health``), so that a ``tls`` health check verifies a
shard exactly as a client connection to it would.
"""

from __future__ import annotations

import ipaddress

from twisted.internet import ssl as tssl
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

from shardtcp.model import ServiceConfig


def endpoint_for_address(reactor, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A plain TCP client endpoint for ``host:port``."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


class UpstreamTLS:
    """
    Client TLS options for shards of ``upstream_tls`` services, built once
    per (service, server name): the shard's certificate is checked against
    ``upstream_ca`` and its name (``server_name``, default the host) with
    service-identity; the proxy presents ``upstream_cert`` when set.
    """

    def __init__(self) -> None:
        self._cache: dict = {}

    def options_for(self, service: ServiceConfig, shard):
        """Options for ``shard`` (a ``ShardInfo`` or ``ShardConfig``)."""
        name = shard.server_name or shard.address.host
        key = (service.id, name)
        options = self._cache.get(key)
        if options is None:
            trust = None
            if service.upstream_ca:
                with open(service.upstream_ca, "rb") as f:
                    trust = tssl.trustRootFromCertificates(
                        [tssl.Certificate.loadPEM(pem) for pem in _split_pem(f.read())]
                    )
            client_cert = None
            if service.upstream_cert and service.upstream_key:
                with open(service.upstream_cert, "rb") as c, open(service.upstream_key, "rb") as k:
                    client_cert = tssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
            options = tssl.optionsForClientTLS(name, trustRoot=trust, clientCertificate=client_cert)
            self._cache[key] = options
        return options


def _split_pem(data: bytes) -> list:
    marker = b"-----END CERTIFICATE-----"
    parts = []
    for chunk in data.split(marker):
        if b"-----BEGIN CERTIFICATE-----" in chunk:
            parts.append(chunk[chunk.index(b"-----BEGIN CERTIFICATE-----") :] + marker + b"\n")
    return parts
