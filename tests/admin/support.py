"""
Helpers of the admin tests: a real admin ``Site`` over a real resolver,
driven with whole HTTP requests through a ``StringTransport``.
"""

from __future__ import annotations

import json
from typing import Optional

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from shardtcp.admin import IReloader, ListenerView, build_admin_site
from shardtcp.metrics import ProxyMetrics
from shardtcp.resolver import ShardResolver
from tests.support import FRANKFURT, NEW_YORK, make_config, shard

TOKEN = b"s3cret-token"
JWKS = b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "policy-1"}]}\n'


@attrs.frozen
class Response:
    """One HTTP answer: status code, headers (lower-case names), body."""

    code: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def parse_response(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
    return Response(int(status.split()[1]), headers, body)


@implementer(IReloader)
class FakeReloader:
    """An ``IReloader`` whose reloads a test fires by hand."""

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def reload(self) -> Deferred:
        d = Deferred()
        self.pending.append(d)
        return d


class AdminFixture:
    """A resolver with shards api-fra-1 and api-nyc-1, metrics, and the admin site over them."""

    def __init__(self, *, token: Optional[bytes] = TOKEN, reloader=None, feeds=None) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_800_000_000)
        self.config = make_config(
            shards=(
                shard("api-fra-1", FRANKFURT, 9001, capacity=10),
                shard("api-nyc-1", NEW_YORK, 9002, capacity=10),
            )
        )
        self.resolver = ShardResolver(self.config, clock=self.clock)
        self.metrics = ProxyMetrics()
        self.metrics.watch_shards(self.resolver.snapshot)
        self.serving = True
        self.reloader = reloader if reloader is not None else FakeReloader()
        self.site = build_admin_site(
            resolver=self.resolver,
            metrics=self.metrics,
            serving=lambda: self.serving,
            reloader=self.reloader,
            jwks=JWKS,
            token=token,
            listeners=(ListenerView(name="edge", listen="tcp:8443:interface=127.0.0.1", mode="passthrough"),),
            feeds=feeds,
            reactor=self.clock,
        )

    def start(self, method: str, path: str, body: bytes = b"", headers: Optional[dict] = None,
              peer: str = "127.0.0.9") -> StringTransport:
        """Send one HTTP/1.0 request; the transport collects the answer."""
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40001),
                                   hostAddress=IPv4Address("TCP", "127.0.0.1", 9901))
        channel = self.site.buildProtocol(transport.getPeer())
        channel.makeConnection(transport)
        transport.protocol = channel
        lines = [f"{method} {path} HTTP/1.0", "Host: admin", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return transport

    def request(self, method: str, path: str, body: bytes = b"", headers: Optional[dict] = None,
                token: Optional[bytes] = None, peer: str = "127.0.0.9") -> Response:
        """Send one request and parse its (complete) answer."""
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = "Bearer " + token.decode()
        return parse_response(self.start(method, path, body, headers, peer).value())

    def shard(self, shard_id: str) -> dict:
        """The shard's entry in /status."""
        return self.resolver.status()["services"]["api"]["shards"][shard_id]
