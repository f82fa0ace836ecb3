"""
Retry on an empty response: a shard that accepts and closes before sending
a byte, while nothing has reached the client and the client's bytes are
still held, is replaced by the next candidate (bounded by ``retries``), and
its close counts as its failure.  The machine alone, then the adapter.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import proxyv2
from shardtcp.identify.clienthello import AlertDescription, tls_alert
from shardtcp.model import ListenerConfig
from shardtcp.proxy.machine import State

from tests.proxy.test_listener import Harness
from tests.proxy.test_machine import connecting, started
from tests.support import client_hello


class MachineTests(SynchronousTestCase):
    """The machine keeps the spliced bytes until the shard speaks."""

    def test_empty_response_goes_back_to_connecting(self) -> None:
        """
        After ``ready``, an empty response pauses the client, returns to
        connecting, and the next ``ready`` splices exactly the same bytes.
        """
        m, fx = connecting()
        m.ready()
        payload = fx.last("splice")[1]
        self.assertTrue(payload.startswith(b"\x16\x03"))
        fx.calls.clear()
        self.assertTrue(m.empty_response())
        self.assertIs(m.state, State.CONNECTING)
        self.assertEqual(fx.names(), ["pause_client"])
        m.ready()
        self.assertEqual(fx.last("splice")[1:], (payload, b"", False))
        self.assertIs(m.state, State.SPLICED)

    def test_not_after_the_shard_spoke(self) -> None:
        """Once the shard has sent a byte, its close is the client's business."""
        m, fx = connecting()
        m.ready()
        m.shard_spoke()
        self.assertFalse(m.empty_response())
        self.assertIs(m.state, State.SPLICED)

    def test_not_after_a_reply(self) -> None:
        """A CONNECT's 200 already reached the client: nothing is held, no retry."""
        from shardtcp.model import ListenerConfig as L

        m, fx = started(L(name="edge", listen="tcp:0", mode="plain", identify=("connect",)))
        m.data(b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
        m.ready()
        self.assertTrue(fx.last("splice")[2].startswith(b"HTTP/1.1 200"))
        self.assertFalse(m.holds_bytes)
        self.assertFalse(m.empty_response())

    def test_held_once(self) -> None:
        """A second empty response needs a second ``ready``: held bytes are used once per splice."""
        m, fx = connecting()
        m.ready()
        self.assertTrue(m.empty_response())
        self.assertFalse(m.empty_response())
        m.finished()  # not spliced: ignored
        self.assertIs(m.state, State.CONNECTING)


class AdapterTests(SynchronousTestCase):
    """The Twisted adapter tries the next shard with the same bytes."""

    def test_next_shard_gets_the_same_bytes(self) -> None:
        """
        The first shard closes (FIN) without a byte: the client sees
        nothing, the second shard gets a fresh header and the same hello,
        the first shard's close is recorded as its failure, the client is
        resumed and bytes then flow both ways.
        """
        h = Harness()
        protocol, transport = h.connect_client()
        hello = client_hello()
        protocol.dataReceived(hello)
        first = h.connector.attempts[0][0].shard_id
        upstream, up = h.connector.succeed(0)
        upstream.readConnectionLost()
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.assertTrue(up.aborted)
        self.assertEqual(len(h.connector.attempts), 2)
        second = h.connector.attempts[1][0].shard_id
        self.assertNotEqual(first, second)
        self.assertEqual(transport.producerState, "paused")
        upstream2, up2 = h.connector.succeed(1)
        header, rest = proxyv2.parse(up2.value())
        self.assertEqual(rest, hello)
        self.assertEqual(h.verifier(second).verify(header).shard_id, second)
        self.assertEqual(h.resolver.connect_stats(first).failed, 1)
        self.assertEqual(h.resolver.connect_stats(second).failed, 0)
        self.assertEqual(
            h.metrics.value(
                "shardtcp_upstream_connect_failures_total", service="api", shard=first, reason="empty_response"
            ),
            1.0,
        )
        self.assertEqual(transport.producerState, "producing")
        self.assertIs(transport.producer, up2)
        upstream2.dataReceived(b"server hello")
        self.assertEqual(transport.value(), b"server hello")
        infos = {i.shard_id: i.open_connections for i in h.resolver.get_shard_info("api")}
        self.assertEqual(infos, {first: 0, second: 1})

    def test_reset_does_not_stop_the_client(self) -> None:
        """
        A shard that resets: Twisted stops the lost transport's producer
        before its protocol hears of it; that must not close the client
        while the retry is still possible.
        """
        h = Harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        upstream, up = h.connector.succeed(0)
        up.producer.stopProducing()
        upstream.connectionLost(Failure(ConnectionLost()))
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(h.connector.attempts), 2)

    def test_bounded_by_retries(self) -> None:
        """
        retries = 1: two shards closing empty are tried (2 attempts, not 3);
        then the client gets the internal_error alert, refused as
        shard_unreachable.
        """
        h = Harness(listener=ListenerConfig(name="edge", listen="tcp:0", retries=1))
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        for index in (0, 1):
            upstream, _ = h.connector.succeed(index)
            upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.connector.attempts), 2)
        self.assertEqual(transport.value(), tls_alert(AlertDescription.internal_error))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.rejected("shard_unreachable"), 1.0)

    def test_no_retry_once_client_sent_more(self) -> None:
        """Bytes the client sent after the splice are not held: the close reaches the client, uncounted."""
        h = Harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        upstream, up = h.connector.succeed(0)
        protocol.dataReceived(b"more")
        upstream.readConnectionLost()
        self.assertTrue(transport.write_closed)
        self.assertEqual(len(h.connector.attempts), 1)
        self.assertEqual(h.resolver.connect_stats(h.connector.attempts[0][0].shard_id).failed, 0)

    def test_no_retry_when_client_left(self) -> None:
        """The client leaving closes the shard: not the shard's failure, nothing retried."""
        h = Harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        upstream, up = h.connector.succeed(0)
        protocol.connectionLost(Failure(ConnectionLost()))
        upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.connector.attempts), 1)
        self.assertEqual(h.resolver.connect_stats(h.connector.attempts[0][0].shard_id).failed, 0)
