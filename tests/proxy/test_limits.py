"""
Admission limits at accept (``max_connections``, ``per_source``), the
listen backlog, and the proxy's own failures kept off the shards.  In
memory: no sockets, no wall clock.
"""

from __future__ import annotations

import errno

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectBindError, ConnectionRefusedError
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.config import ConfigError
from shardtcp.config._reader import Reader
from shardtcp.config._checks import check_per_source
from shardtcp.identify.clienthello import AlertDescription, tls_alert
from shardtcp.model import ListenerConfig, PerSourceConfig
from shardtcp.proxy.connector import ProxyConnectFailed, ShardConnector
from shardtcp.proxy.limits import AdmissionLimits, source_key
from shardtcp.proxy.listener import LATE_TIMEOUT, LATE_TIMEOUT_MIN, ProxyConnection
from shardtcp.tap import with_backlog

from tests.proxy.test_listener import CLIENT, Harness
from tests.support import client_hello, make_config


def limits(max_connections=0, source_max=0, rate=0.0, clock=None):
    clock = clock or MemoryReactorClock()
    return AdmissionLimits(max_connections, PerSourceConfig(max_connections=source_max, rate=rate), clock), clock


class SourceKeyTests(SynchronousTestCase):
    """Which source a client address counts against."""

    def test_ipv4_per_address(self) -> None:
        """IPv4 counts per address; neighbours are separate sources."""
        self.assertEqual(source_key("192.0.2.1"), "192.0.2.1")
        self.assertNotEqual(source_key("192.0.2.1"), source_key("192.0.2.2"))

    def test_ipv6_per_64(self) -> None:
        """IPv6 counts per /64: the first and last address of a /64 agree, the next /64 differs."""
        self.assertEqual(source_key("2001:db8:0:1::"), "2001:db8:0:1::/64")
        self.assertEqual(source_key("2001:db8:0:1:ffff:ffff:ffff:ffff"), "2001:db8:0:1::/64")
        self.assertEqual(source_key("2001:db8:0:2::"), "2001:db8:0:2::/64")

    def test_ipv4_mapped(self) -> None:
        """An IPv4-mapped IPv6 address counts as its IPv4 address."""
        self.assertEqual(source_key("::ffff:192.0.2.1"), "192.0.2.1")


class AdmissionLimitsTests(SynchronousTestCase):
    """The counting and the token bucket, each bound at both edges."""

    def test_off_by_default(self) -> None:
        """Zero everywhere is no limit at all."""
        self.assertFalse(limits()[0].enabled)
        self.assertTrue(limits(max_connections=1)[0].enabled)
        self.assertTrue(limits(rate=1.0)[0].enabled)

    def test_max_connections_edges(self) -> None:
        """Exactly max_connections are admitted, max+1 is refused; a release admits one more."""
        lim, _ = limits(max_connections=3)
        for i in range(3):
            self.assertIsNone(lim.admit(f"192.0.2.{i}"))
            lim.bind(i, f"192.0.2.{i}")
        self.assertEqual(lim.admit("192.0.2.9"), "listener_full")
        lim.release(1)
        self.assertIsNone(lim.admit("192.0.2.9"))
        self.assertEqual(lim.admit("192.0.2.10"), "listener_full")

    def test_release_once(self) -> None:
        """Releasing a holder twice (or an unknown one) does not free a second slot."""
        lim, _ = limits(max_connections=1)
        lim.admit("192.0.2.1")
        lim.bind("a", "192.0.2.1")
        lim.release("a")
        lim.release("a")
        lim.release("never")
        self.assertEqual(lim.open, 0)

    def test_source_connections_edges(self) -> None:
        """Per source, exactly max are open at once; another source is not affected."""
        lim, _ = limits(source_max=2)
        for i in range(2):
            self.assertIsNone(lim.admit("2001:db8::1"))
            lim.bind(i, "2001:db8::1")
        # Same /64, another address: same source.
        self.assertEqual(lim.admit("2001:db8::ffff"), "source_connections")
        self.assertIsNone(lim.admit("2001:db8:0:1::1"))
        lim.release(0)
        self.assertIsNone(lim.admit("2001:db8::2"))

    def test_rate_edges(self) -> None:
        """
        "20/s": 20 connections at one instant are admitted and the 21st is
        refused; a token comes back exactly 1/20 s later, not before.
        """
        lim, clock = limits(rate=20.0)
        for i in range(20):
            self.assertIsNone(lim.admit("192.0.2.1"), i)
        self.assertEqual(lim.admit("192.0.2.1"), "source_rate")
        clock.advance(0.049)
        self.assertEqual(lim.admit("192.0.2.1"), "source_rate")
        clock.advance(0.001)
        self.assertIsNone(lim.admit("192.0.2.1"))
        self.assertEqual(lim.admit("192.0.2.1"), "source_rate")
        # Another source has its own bucket.
        self.assertIsNone(lim.admit("192.0.2.2"))

    def test_rate_per_minute(self) -> None:
        """"600/m" is 10/s: a burst of 10, then one every 0.1 s sustained."""
        lim, clock = limits(rate=600 / 60)
        self.assertEqual([lim.admit("192.0.2.1") for _ in range(11)], [None] * 10 + ["source_rate"])
        admitted = 0
        for _ in range(100):
            clock.advance(0.1)
            admitted += lim.admit("192.0.2.1") is None
            admitted += lim.admit("192.0.2.1") is None
        self.assertEqual(admitted, 100)

    def test_slow_rate_burst_of_one(self) -> None:
        """Below 1/s the bucket still holds one connection: "30/m" admits one, then one per 2 s."""
        lim, clock = limits(rate=0.5)
        self.assertIsNone(lim.admit("192.0.2.1"))
        self.assertEqual(lim.admit("192.0.2.1"), "source_rate")
        clock.advance(1.999)
        self.assertEqual(lim.admit("192.0.2.1"), "source_rate")
        clock.advance(0.001)
        self.assertIsNone(lim.admit("192.0.2.1"))

    def test_table_bounded(self) -> None:
        """
        10,000 sources, each opening and closing one connection, 1 ms apart:
        the table holds only the sources of the last refill time (1 s at
        "1/s"), never all of them; a source with an open connection stays.
        """
        lim, clock = limits(source_max=5, rate=1.0)
        lim.admit("198.51.100.1")
        lim.bind("held", "198.51.100.1")
        peak = 0
        for i in range(10_000):
            ip = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
            self.assertIsNone(lim.admit(ip))
            lim.bind(i, ip)
            lim.release(i)
            peak = max(peak, lim.sources)
            clock.advance(0.001)
        self.assertLessEqual(peak, 1002)
        self.assertGreater(peak, 900)
        clock.advance(1.0)
        lim.admit("192.0.2.200")
        self.assertEqual(lim.sources, 2)  # the held one and the newest
        # The held source still counts its open connection.
        for _ in range(4):
            self.assertIsNone(lim.admit("198.51.100.1"))
            clock.advance(1.0)
        self.assertEqual(lim.admit("198.51.100.1"), "source_connections")

    def test_table_without_rate(self) -> None:
        """Without a rate a source is forgotten as soon as its last connection closes."""
        lim, _ = limits(source_max=1)
        lim.admit("192.0.2.1")
        lim.bind("a", "192.0.2.1")
        self.assertEqual(lim.sources, 1)
        lim.release("a")
        self.assertEqual(lim.sources, 0)


def limited(max_connections=0, **per_source) -> Harness:
    listener = ListenerConfig(
        name="edge",
        listen="tcp:0",
        max_connections=max_connections,
        per_source=PerSourceConfig(**per_source),
    )
    h = Harness(listener=listener)
    h.context.limits = AdmissionLimits(listener.max_connections, listener.per_source, h.clock)
    return h


class FactoryTests(SynchronousTestCase):
    """The factory refuses at accept: no protocol, nothing read, counted."""

    def test_listener_full_at_accept(self) -> None:
        """
        With max_connections = 2 the third accepted socket gets no protocol
        (Twisted closes it unread); closing one admits the next.
        """
        h = limited(max_connections=2)
        first, t1 = h.connect_client()
        h.connect_client(peer=IPv4Address("TCP", "198.51.100.8", 1))
        self.assertIsNone(h.factory.buildProtocol(IPv4Address("TCP", "198.51.100.9", 1)))
        self.assertEqual(h.rejected("listener_full"), 1.0)
        first.connectionLost(None)
        self.assertIsInstance(h.factory.buildProtocol(IPv4Address("TCP", "198.51.100.9", 1)), ProxyConnection)

    def test_per_source_at_accept(self) -> None:
        """
        per_source max_connections = 1: a second connection from the same
        IPv6 /64 is refused and counted; another /64 is admitted.
        """
        listener = ListenerConfig(name="edge", listen="tcp:0", per_source=PerSourceConfig(max_connections=1))
        h = Harness(listener=listener)
        h.context.limits = AdmissionLimits(0, listener.per_source, h.clock)
        a = IPv6Address("TCP", "2001:db8::1", 1)
        h.connect_client(peer=a)
        self.assertIsNone(h.factory.buildProtocol(IPv6Address("TCP", "2001:db8::2", 1)))
        self.assertEqual(h.rejected("source_connections"), 1.0)
        self.assertIsNotNone(h.factory.buildProtocol(IPv6Address("TCP", "2001:db8:1::1", 1)))

    def test_refused_source_rate_counted(self) -> None:
        """Over the rate: refused as source_rate, counted once per refusal."""
        listener = ListenerConfig(name="edge", listen="tcp:0", per_source=PerSourceConfig(rate=2.0))
        h = Harness(listener=listener)
        h.context.limits = AdmissionLimits(0, listener.per_source, h.clock)
        built = [h.factory.buildProtocol(CLIENT) for _ in range(5)]
        self.assertEqual([b is not None for b in built], [True, True, False, False, False])
        self.assertEqual(h.rejected("source_rate"), 3.0)

    def test_released_when_refused_later(self) -> None:
        """A connection refused later (not TLS) gives its slot back."""
        h = limited(max_connections=1)
        protocol, transport = h.connect_client()
        protocol.dataReceived(b"\x00garbage")
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.assertIsNotNone(h.factory.buildProtocol(CLIENT))

    def test_accept_proxy_released_after_hand_over(self) -> None:
        """On an accept_proxy listener the slot follows the hand-over and is freed at the end."""
        import ipaddress

        listener = ListenerConfig(
            name="edge", listen="tcp:0", max_connections=1, accept_proxy=True,
            trusted_proxies=(ipaddress.ip_network("0.0.0.0/0"),),
        )
        h = Harness(listener=listener)
        h.context.limits = AdmissionLimits(1, listener.per_source, h.clock)
        front, transport = h.connect_client()
        front.dataReceived(b"PROXY TCP4 203.0.113.5 127.0.0.1 1000 8443\r\n\x00bad")
        self.assertIsNone(h.factory.buildProtocol(CLIENT))
        front.connectionLost(None)
        self.assertIsNotNone(h.factory.buildProtocol(CLIENT))


class BacklogTests(SynchronousTestCase):
    """``backlog`` reaches the listening port."""

    def test_with_backlog(self) -> None:
        """tcp, tcp6, ssl and unix get backlog=; an explicit one and other kinds are left alone."""
        self.assertEqual(with_backlog("tcp:0:interface=127.0.0.1", 64), "tcp:0:interface=127.0.0.1:backlog=64")
        self.assertEqual(with_backlog("unix:/tmp/s", 5), "unix:/tmp/s:backlog=5")
        self.assertEqual(with_backlog("tcp:0:backlog=9", 64), "tcp:0:backlog=9")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0", 64), "systemd:domain=INET:index=0")

    def test_listen_uses_backlog(self) -> None:
        """The reactor is asked to listen with the configured backlog."""
        from cryptography.hazmat.primitives import serialization

        from shardtcp.tap import build_service
        from tests.support import signing_key

        key_path = self.mktemp()
        with open(key_path, "wb") as f:
            f.write(signing_key().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ))
        reactor = MemoryReactorClock()
        config = make_config(
            listener=ListenerConfig(name="edge", listen="tcp:0:interface=127.0.0.1", backlog=77),
            private_key=key_path,
        )
        service = build_service(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        (port, factory, backlog, interface) = reactor.tcpServers[0]
        self.assertEqual((backlog, interface), (77, "127.0.0.1"))
        # No limit configured: the factory skips the admission step.
        self.assertIsNone(factory.context.limits)


class PerSourceCheckTests(SynchronousTestCase):
    """check-config refuses per_source where it would count the load balancer."""

    def test_accept_proxy_refused(self) -> None:
        """per_source with accept_proxy is one problem naming the key; without, none."""
        for accept_proxy, expected in ((True, 1), (False, 0)):
            config = make_config(
                listener=ListenerConfig(
                    name="edge", listen="tcp:0", accept_proxy=accept_proxy,
                    per_source=PerSourceConfig(max_connections=3),
                )
            )
            reader = Reader(".", False)
            check_per_source(reader, config)
            self.assertEqual(len(reader.problems), expected, reader.problems)
            if expected:
                self.assertTrue(reader.problems[0].startswith("listener[0].per_source: "))


class _Failing:
    """An endpoint whose connect fails at once with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def connect(self, factory):
        return defer.fail(self.error)


class ProxyFaultTests(SynchronousTestCase):
    """The proxy's own failures are never counted against shards."""

    def harness(self, error: Exception) -> Harness:
        h = Harness()
        h.context.connector = ShardConnector(h.clock, endpoint_factory=lambda shard, timeout: _Failing(error))
        return h

    def test_emfile_never_ejects(self) -> None:
        """
        200 connections whose connect fails with EMFILE ("Too many open
        files", from the proxy's own socket()): each client gets the
        overload answer, no shard has a failure recorded, every attempt is
        on the first choice (nothing was ejected), and proxy_errors counts
        200 of kind "fds".
        """
        h = self.harness(ConnectBindError(errno.EMFILE, "Too many open files"))
        hello = client_hello()
        for _ in range(200):
            protocol, transport = h.connect_client()
            protocol.dataReceived(hello)
            self.assertEqual(transport.value(), tls_alert(AlertDescription.internal_error))
            self.assertTrue(transport.disconnecting)
            protocol.connectionLost(None)
        for info in h.resolver.get_shard_info("api"):
            self.assertEqual(h.resolver.connect_stats(info.shard_id).failed, 0)
        self.assertEqual(h.metrics.value("shardtcp_proxy_errors_total", kind="fds"), 200.0)
        self.assertEqual(h.rejected("proxy_overloaded"), 200.0)
        self.assertEqual(h.rejected("shard_unreachable"), 0.0)

    def test_other_errnos(self) -> None:
        """ENFILE, ENOBUFS, ENOMEM and EADDRNOTAVAIL are the proxy's too, by kind."""
        for number, kind in (
            (errno.ENFILE, "fds"), (errno.ENOBUFS, "memory"), (errno.ENOMEM, "memory"),
            (errno.EADDRNOTAVAIL, "ports"),
        ):
            h = self.harness(ConnectBindError(number, "x"))
            protocol, _ = h.connect_client()
            protocol.dataReceived(client_hello())
            self.assertEqual(h.metrics.value("shardtcp_proxy_errors_total", kind=kind), 1.0, kind)
            self.assertEqual(sum(h.resolver.connect_stats(i.shard_id).failed
                                 for i in h.resolver.get_shard_info("api")), 0)

    def test_refused_still_counts(self) -> None:
        """A refused connect is the shard's failure: recorded, no proxy error."""
        h = self.harness(ConnectionRefusedError())
        protocol, _ = h.connect_client()
        protocol.dataReceived(client_hello())
        failed = sum(h.resolver.connect_stats(i.shard_id).failed for i in h.resolver.get_shard_info("api"))
        self.assertEqual(failed, 2)
        self.assertEqual(h.metrics.value("shardtcp_proxy_errors_total", kind="fds"), 0.0)

    def test_classified(self) -> None:
        """The connector turns the errno into ProxyConnectFailed(kind)."""
        h = self.harness(ConnectBindError(errno.EMFILE, "Too many open files"))
        d = h.context.connector.connect(h.resolver.get_shard_info("api")[0], None, 5.0)
        failure = self.failureResultOf(d, ProxyConnectFailed)
        self.assertEqual((failure.value.kind, failure.value.reason), ("fds", "proxy_fds"))

    def test_late_timeout_is_the_proxys(self) -> None:
        """
        A connect timeout that fires more than LATE_TIMEOUT_MIN after it was
        due (the reactor was stalled) is not counted against the shard; one
        that fires on time, or just within the tolerance, is.
        """
        tolerance = max(LATE_TIMEOUT_MIN, LATE_TIMEOUT * 5.0)
        for late, counted in ((0.0, 1), (tolerance - 0.01, 1), (tolerance + 0.01, 0)):
            h = Harness()
            protocol, transport = h.connect_client()
            protocol.dataReceived(client_hello())
            shard = h.connector.attempts[0][0].shard_id
            # connect_timeout is 5 s: the tolerance is 1.25 s.
            h.clock.advance(5.0 + late)
            h.connector.fail(0, "timeout")
            self.assertEqual(h.resolver.connect_stats(shard).failed, counted, late)
            self.assertEqual(h.metrics.value("shardtcp_proxy_errors_total", kind="timeout_late"), 1.0 - counted)
