"""
Helpers shared by the test modules: real ClientHellos, small configurations,
signing keys, and transports that record half-closes.
"""

from __future__ import annotations

import ipaddress
import ssl
from typing import Optional, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from shardtcp.model import (
    Address,
    Config,
    GeoNetwork,
    ListenerConfig,
    Location,
    PolicyConfig,
    ProxyConfig,
    ServiceConfig,
    ShardConfig,
    SigningConfig,
)

FRANKFURT = Location(50.11, 8.68, "eu-central")
NEW_YORK = Location(40.71, -74.0, "us-east")
SINGAPORE = Location(1.35, 103.82, "ap-southeast")


def client_hello(
    server_name: Optional[str] = "api.example.test",
    alpn: Sequence[str] = (),
    maximum_version: Optional[ssl.TLSVersion] = None,
) -> bytes:
    """The first flight of a real TLS client (Python's ssl), as bytes."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if maximum_version is not None:
        context.maximum_version = maximum_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def shard(shard_id: str, location: Location, port: int, **kw) -> ShardConfig:
    return ShardConfig(id=shard_id, address=Address("127.0.0.1", port), location=location, **kw)


def make_config(
    *,
    shards: Sequence[ShardConfig] = (),
    names: Sequence[str] = ("api.example.test",),
    listener: Optional[ListenerConfig] = None,
    policy: Optional[PolicyConfig] = None,
    geo: Sequence[GeoNetwork] = (),
    private_key: str = "unused.pem",
) -> Config:
    if not shards:
        shards = (
            shard("api-fra-1", FRANKFURT, 9001),
            shard("api-nyc-1", NEW_YORK, 9002),
        )
    service = ServiceConfig(
        id="api",
        names=tuple(names),
        shards=tuple(shards),
        policy=policy or PolicyConfig(acl=("orders:read",)),
    )
    return Config(
        proxy=ProxyConfig(id="edge-test-1", location=FRANKFURT),
        signing=SigningConfig(private_key=private_key, kid="policy-1", ttl=30.0),
        listeners=(listener or ListenerConfig(name="edge", listen="tcp:0"),),
        services=(service,),
        geo=tuple(geo),
    )


def geo(cidr: str, location: Location) -> GeoNetwork:
    return GeoNetwork(network=ipaddress.ip_network(cidr), location=location)


def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


class HalfCloseTransport(StringTransport):
    """A StringTransport that also records half-closes and aborts."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class FakeConnector:
    """
    A ShardConnector stand-in: records each attempt and lets the test decide
    its outcome with ``succeed(i)`` or ``fail(i, reason)``.
    """

    def __init__(self) -> None:
        self.attempts: list = []  # (shard, factory, timeout, deferred)

    def connect(self, shard, factory, timeout):
        d = defer.Deferred()
        self.attempts.append((shard, factory, timeout, d))
        return d

    def succeed(self, index: int = -1, peer=("127.0.0.1", 40000)):
        from twisted.internet.address import IPv4Address

        shard, factory, timeout, d = self.attempts[index]
        protocol = factory.buildProtocol(None)
        transport = HalfCloseTransport(
            hostAddress=IPv4Address("TCP", *peer),
            peerAddress=IPv4Address("TCP", shard.address.host, shard.address.port),
        )
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport

    def fail(self, index: int = -1, reason: str = "refused"):
        from shardtcp.proxy.connector import ShardConnectFailed

        self.attempts[index][3].errback(ShardConnectFailed(reason, f"connection {reason}"))


class DirectFakeConnector(FakeConnector):
    """
    A ``FakeConnector`` that also has ``start_direct``: each attempt is a
    real ``DirectAttempt`` (no Deferred), which ``succeed`` connects and
    ``fail`` fails as a Twisted connector would.
    """

    class _Connector:
        """What a ``DirectAttempt`` is told it is connecting through."""

        def __init__(self, shard) -> None:
            self.shard = shard
            self.stopped = 0

        def getDestination(self):
            from twisted.internet.address import IPv4Address

            return IPv4Address("TCP", self.shard.address.host, self.shard.address.port)

        def stopConnecting(self) -> None:
            self.stopped += 1

    def start_direct(self, shard, factory, timeout, succeeded, failed):
        from shardtcp.proxy.connector import DirectAttempt

        attempt = DirectAttempt(factory, succeeded, failed)
        attempt.startedConnecting(self._Connector(shard))
        self.attempts.append((shard, factory, timeout, attempt))
        return attempt

    def succeed(self, index: int = -1, peer=("127.0.0.1", 40000)):
        from twisted.internet.address import IPv4Address

        shard, factory, timeout, attempt = self.attempts[index]
        protocol = attempt.buildProtocol(None)
        transport = HalfCloseTransport(
            hostAddress=IPv4Address("TCP", *peer),
            peerAddress=IPv4Address("TCP", shard.address.host, shard.address.port),
        )
        protocol.makeConnection(transport)
        return protocol, transport

    def fail(self, index: int = -1, reason: str = "refused"):
        from twisted.python.failure import Failure

        from shardtcp.proxy.connector import ShardConnectFailed

        self.attempts[index][3].clientConnectionFailed(None, Failure(ShardConnectFailed(reason, f"connection {reason}")))
