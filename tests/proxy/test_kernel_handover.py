"""
When a connection moves to the kernel splice: at once when no empty-response
retry could follow, else at the first byte from the shard or the first
further byte from the client (either ends the chance of a retry).  A fake
splicer records what it is handed.
"""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.model import ListenerConfig
from shardtcp.proxy.splice import SpliceStats

from tests.proxy.test_listener import Harness
from tests.support import client_hello


@attrs.define
class FakeKernelSplice:
    stats: SpliceStats = attrs.field(factory=SpliceStats)


class FakeSplicer:
    """Takes every connection offered and records the prefixes."""

    def __init__(self) -> None:
        self.taken: list[dict] = []

    def take_transports(self, downstream, upstream, *, on_done, prefix_up=b"", prefix_down=b"", idle_timeout=0.0):
        splice = FakeKernelSplice()
        self.taken.append({"up": prefix_up, "down": prefix_down, "splice": splice, "on_done": on_done})
        return splice


def harness(**listener) -> tuple[Harness, FakeSplicer]:
    h = Harness(ListenerConfig(name="edge", listen="tcp:0", **listener))
    splicer = FakeSplicer()
    h.context.splicer = splicer
    return h, splicer


class HandoverTests(SynchronousTestCase):
    """The kernel splice never takes away a retry the connection could still make."""

    def test_waits_for_the_shard_while_a_retry_is_possible(self) -> None:
        """
        With retries left and the hello held, the header and hello go out
        in userspace; the shard's first bytes hand both sockets over, those
        bytes first to the client, and the byte counts carry over.
        """
        h, splicer = harness()
        protocol, transport = h.connect_client()
        hello = client_hello()
        protocol.dataReceived(hello)
        upstream, up = h.connector.succeed(0)
        self.assertEqual(splicer.taken, [])
        self.assertTrue(up.value().endswith(hello))
        upstream.dataReceived(b"\x16\x03\x03server")
        [taken] = splicer.taken
        self.assertEqual((taken["up"], taken["down"]), (b"", b"\x16\x03\x03server"))
        self.assertEqual(taken["splice"].stats.bytes_down, len(b"\x16\x03\x03server"))
        self.assertEqual(taken["splice"].stats.bytes_up, len(hello))
        self.assertEqual(h.metrics.value("shardtcp_connections_kernel_spliced_total", listener="edge"), 1.0)

    def test_client_speaking_first_hands_over(self) -> None:
        """More bytes from the client before the shard speaks end the retry: they go to the kernel first."""
        h, splicer = harness()
        protocol, transport = h.connect_client()
        hello = client_hello()
        protocol.dataReceived(hello)
        upstream, up = h.connector.succeed(0)
        protocol.dataReceived(b"more")
        [taken] = splicer.taken
        self.assertEqual((taken["up"], taken["down"]), (b"more", b""))
        self.assertEqual(taken["splice"].stats.bytes_up, len(hello) + 4)
        # a silent close now is the shard's close, not a retry
        upstream.readConnectionLost()
        self.assertEqual(len(h.connector.attempts), 1)

    def test_at_once_without_retries(self) -> None:
        """``retries = 0``: nothing could be retried, the kernel takes the sockets with the header."""
        h, splicer = harness(retries=0)
        protocol, transport = h.connect_client()
        hello = client_hello()
        protocol.dataReceived(hello)
        h.connector.succeed(0)
        [taken] = splicer.taken
        self.assertTrue(taken["up"].endswith(hello))
        self.assertTrue(taken["up"].startswith(b"\r\n\r\n\x00\r\nQUIT\n"))
