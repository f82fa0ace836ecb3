"""
The PROXY-header reader in front of a connection: trust, the header stage's
refusals and counting, and the addresses the connection behind it sees.
"""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from shardtcp import proxyv2
from shardtcp.model import ListenerConfig
from shardtcp.proxy.inbound import ProxyHeaderProtocol
from shardtcp.proxy.listener import ProxyConnection

from tests.proxy.test_listener import Harness
from tests.support import client_hello

def harness(**kw) -> Harness:
    listener = ListenerConfig(
        name="edge",
        listen="tcp:0",
        accept_proxy=True,
        trusted_proxies=(ipaddress.ip_network("198.51.100.0/24"),),
        **kw,
    )
    return Harness(listener=listener)


def header(**kw) -> bytes:
    kw.setdefault("source", ("203.0.113.5", 40000))
    kw.setdefault("destination", ("192.0.2.1", 443))
    return proxyv2.encode(proxyv2.ProxyHeader(**kw))


class HeaderStageTests(SynchronousTestCase):
    """Before the header is read, the wrapper alone answers for the connection."""

    def active(self, h: Harness) -> float:
        return h.metrics.value("shardtcp_connections_active", listener="edge")

    def test_counted_from_accept(self) -> None:
        """A connection is accepted and active from its first moment, under the wrapper."""
        h = harness()
        protocol, _ = h.connect_client()
        self.assertIsInstance(protocol, ProxyHeaderProtocol)
        self.assertEqual(h.metrics.value("shardtcp_connections_accepted_total", listener="edge"), 1.0)
        self.assertEqual(self.active(h), 1.0)
        self.assertEqual(h.context.connections, {protocol})

    def test_timeout(self) -> None:
        """No complete header within peek_timeout: refused as peek_timeout, closed, no shard tried."""
        h = harness(peek_timeout=2.0)
        protocol, transport = h.connect_client()
        protocol.dataReceived(header()[:10])
        h.clock.advance(2.0)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.rejected("peek_timeout"), 1.0)
        protocol.connectionLost(None)
        self.assertEqual(self.active(h), 0.0)
        self.assertEqual(h.rejected("client_gone"), 0.0)

    def test_eof(self) -> None:
        """EOF before the header ends: refused as eof."""
        h = harness()
        protocol, transport = h.connect_client()
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.rejected("eof"), 1.0)

    def test_gone(self) -> None:
        """A load balancer that leaves mid-header is counted as client_gone; the timer is stopped."""
        h = harness()
        protocol, _ = h.connect_client()
        protocol.dataReceived(header()[:10])
        protocol.connectionLost(None)
        self.assertEqual(h.rejected("client_gone"), 1.0)
        self.assertEqual(self.active(h), 0.0)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.context.connections, set())


class BehindTests(SynchronousTestCase):
    """Once the header is read, the connection behind goes on with its addresses."""

    def test_addresses_and_hand_over(self) -> None:
        """
        The connection behind sees the header's source and destination, keeps
        the wrapper's connection id, and is the one the listener counts.
        """
        h = harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(header())
        self.assertEqual((protocol.getPeer().host, protocol.getPeer().port), ("203.0.113.5", 40000))
        self.assertEqual(protocol.getHost().host, "192.0.2.1")
        (behind,) = h.context.connections
        self.assertIsInstance(behind, ProxyConnection)
        self.assertEqual(behind.connection_id, protocol.connection_id)
        self.assertEqual(behind.client, ("203.0.113.5", 40000))
        self.assertEqual(h.metrics.value("shardtcp_connections_accepted_total", listener="edge"), 1.0)

    def test_local_keeps_real_addresses(self) -> None:
        """A LOCAL header (a health check) leaves the real peer as the client."""
        h = harness()
        protocol, _ = h.connect_client()
        protocol.dataReceived(proxyv2.encode(proxyv2.ProxyHeader(command=proxyv2.Command.LOCAL)))
        (behind,) = h.context.connections
        self.assertEqual(behind.client, ("198.51.100.7", 51515))

    def test_deadline_runs_from_accept(self) -> None:
        """Identification after the header has what is left of peek_timeout, not a fresh one."""
        h = harness(peek_timeout=5.0)
        protocol, transport = h.connect_client()
        h.clock.advance(3.0)
        protocol.dataReceived(header() + client_hello()[:20])
        h.clock.advance(1.9)
        self.assertFalse(transport.disconnecting)
        h.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.rejected("peek_timeout"), 1.0)

    def test_threat_feed_checks_the_real_client(self) -> None:
        """The threat feed is asked about the header's client, not the load balancer."""
        h = harness()
        asked: list = []
        h.context.admission = lambda ip: asked.append(ip) or "listed"
        protocol, transport = h.connect_client()
        self.assertEqual(asked, [])
        protocol.dataReceived(header())
        self.assertEqual(asked, ["203.0.113.5"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.rejected("threat_denied"), 1.0)

    def test_half_close_and_splice_through(self) -> None:
        """Spliced through the wrapper: bytes flow, the client's EOF half-closes the shard."""
        h = harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(header() + client_hello())
        upstream, up = h.connector.succeed()
        up.clear()
        protocol.dataReceived(b"ping")
        upstream.dataReceived(b"pong")
        self.assertEqual(up.value(), b"ping")
        self.assertEqual(transport.value(), b"pong")
        protocol.readConnectionLost()
        self.assertTrue(up.write_closed)
        upstream.readConnectionLost()
        self.assertTrue(transport.disconnecting)
