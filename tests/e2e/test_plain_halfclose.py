"""
A shard's half-close through the proxy, over loopback with real sockets.

The shard here answers the client's first line and then shuts its write side
down (FIN, after a TLS ``close_notify`` when it speaks TLS) while it goes on
reading.  Through the proxy the client must receive the answer and then the
end of the stream, and still be able to send: the shard reads those bytes and
then the client's own EOF.  ``HalfClosingShard`` and ``run_half_close`` are
shared with the passthrough and terminate tests.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from twisted.internet import reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from shardtcp.backend import ShardVerifier, VerifyingFactory
from shardtcp.config import load_config
from shardtcp.example.shard import tls_options
from shardtcp.tap import build_service
from shardtcp.tlslayer import HalfCloseTLSFactory
from tests.e2e.harness import SERVICE_NAME, EdgeFixture, TLSClient, listener_toml, service_toml, wait_for

#: What the client sends first, what the shard answers, what the client sends after the shard's EOF.
FIRST = b"ping\n"
REPLY = b"pong, and that is all from me\n"
LATER = b"still talking after your EOF\n"


@implementer(IHalfCloseableProtocol)
class _ReplyThenEOF(Protocol):
    """Answers the first line with ``REPLY``, half-closes, and keeps reading."""

    def __init__(self, shard: "HalfClosingShard") -> None:
        self._shard = shard

    def dataReceived(self, data: bytes) -> None:
        shard = self._shard
        shard.received += data
        if not shard.replied and b"\n" in shard.received:
            shard.replied = True
            self.transport.write(REPLY)
            self.transport.loseWriteConnection()

    def readConnectionLost(self) -> None:
        self._shard.eof = True
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self._shard.lost = True


class HalfClosingShard:
    """
    A verifying shard (PROXY header checked against the deployment's JWKS)
    serving one ``_ReplyThenEOF`` connection, in clear or, with a
    certificate, over the half-closeable TLS layer.  Records what it read,
    whether it saw the client's EOF, and the end of the connection.
    """

    def __init__(self, case: TestCase, deployment, shard_id: str, cert: Optional[tuple] = None) -> None:
        self.received = b""
        self.replied = False
        self.eof = False
        self.lost = False
        application: Factory = Factory.forProtocol(lambda: _ReplyThenEOF(self))
        if cert is not None:
            application = HalfCloseTLSFactory(tls_options(*cert), False, application, clock=reactor)
        verifier = ShardVerifier.from_jwks(shard_id, deployment.jwks)
        factory = VerifyingFactory(application, verifier, reactor=reactor)
        factory.noisy = False
        self._listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        case.addCleanup(self._listening.stopListening)


def start_proxy(deployment, body: str, splice: str) -> int:
    """Start the in-process proxy with ``[proxy] splice = <splice>`` and ``body``; the ``edge`` port."""
    path = os.path.join(deployment.directory, f"halfclose-{splice}.toml")
    key = os.path.relpath(deployment.private_key, deployment.directory)
    with open(path, "w") as f:
        f.write(
            f'[proxy]\nid = "edge-h"\nsplice = "{splice}"\n'
            f'[signing]\nprivate_key = "{key}"\nkid = "policy-1"\n{body}'
        )
    deployment.config_path = path
    deployment.proxy = build_service(load_config(path), reactor)
    deployment.proxy.startService()
    return deployment.port("edge")


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def plain_client(port: int, preamble: bytes) -> dict:
    """Plain socket: send, read to the proxy's EOF, send again, shut down, read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(preamble + FIRST)
        before = _read_to_eof(sock)
        sock.sendall(LATER)
        sock.shutdown(socket.SHUT_WR)
        after = _read_to_eof(sock)
        return {"before": before, "clean": True, "after": after}


def tls_client(port: int, ca_path: str) -> dict:
    """Python ssl: the same exchange; ``clean`` when the first end came with close_notify."""
    with TLSClient(port, SERVICE_NAME, ca_path, timeout=10) as client:
        client.handshake()
        client.send(FIRST)
        before, clean = client.read_to_end()
        client.send(LATER)
        client.close_notify()
        client.sock.shutdown(socket.SHUT_WR)
        after = _read_to_eof(client.sock)
        return {"before": before, "clean": clean, "after": after}


async def run_half_close(case: TestCase, shard: HalfClosingShard, client, *args) -> None:
    """
    Run ``client(*args)`` in a thread and check both ends: the client got
    ``REPLY`` then EOF (with close_notify where it speaks TLS) and nothing
    after its own EOF; the shard read ``FIRST`` then ``LATER`` then EOF.
    """
    got = await deferToThread(client, *args)
    case.assertEqual(got["before"], REPLY)
    case.assertTrue(got["clean"], "the client's TLS stream did not end with close_notify")
    case.assertEqual(got["after"], b"")
    case.assertTrue(await wait_for(lambda: shard.lost, 5.0), "the shard's connection did not end")
    case.assertEqual(shard.received, FIRST + LATER)
    case.assertTrue(shard.eof, "the client's EOF did not reach the shard as a half-close")


class PlainHalfCloseTests(TestCase):
    """mode = "plain" (a ``SHARD`` line): the shard's FIN is a half-close of the client."""

    timeout = 30

    def setUp(self):
        self.fx = EdgeFixture(self)
        self.shard = HalfClosingShard(self, self.fx.deployment, "api-plain")

    def _start(self, splice: str) -> int:
        return start_proxy(
            self.fx.deployment,
            listener_toml("plain", 'identify = ["line"]\n')
            + service_toml([("api-plain", self.shard.port, "")]),
            splice,
        )

    async def test_userspace_splice(self):
        """The userspace splice carries the shard's half-close to a plain client and keeps relaying up."""
        port = self._start("userspace")
        await run_half_close(self, self.shard, plain_client, port, b"SHARD api\r\n")

    async def test_kernel_splice_or_fallback(self):
        """With ``splice = "auto"`` (kernel splice where it works) the same exchange holds."""
        port = self._start("auto")
        await run_half_close(self, self.shard, plain_client, port, b"SHARD api\r\n")
