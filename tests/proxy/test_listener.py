"""
The connection path in memory: identify, resolve, connect (with retries),
header, splice, refusals.  No sockets, no wall clock.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import proxyv2
from shardtcp.backend import ShardVerifier
from shardtcp.identify.clienthello import AlertDescription, tls_alert
from shardtcp.identify.names import NameTable
from shardtcp.loglimit import ShardLineLimiter
from shardtcp.metrics import ProxyMetrics
from shardtcp.model import ListenerConfig, PolicyConfig
from shardtcp.policy import PolicySigner
from shardtcp.proxy.listener import ListenerContext, ProxyFactory
from shardtcp.resolver import ShardResolver

from tests.support import (
    NEW_YORK,
    DirectFakeConnector,
    FakeConnector,
    HalfCloseTransport,
    client_hello,
    geo,
    make_config,
)

CLIENT = IPv4Address("TCP", "198.51.100.7", 51515)
PROXY = IPv4Address("TCP", "127.0.0.1", 8443)


class Harness:
    """A listener wired to a fake connector, a memory clock and a real resolver."""

    def __init__(self, listener: ListenerConfig | None = None, **config_kw) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_800_000_000)
        self.key = __import__("tests.support", fromlist=["x"]).signing_key()
        listener = listener or ListenerConfig(name="edge", listen="tcp:0")
        self.config = make_config(listener=listener, **config_kw)
        self.resolver = ShardResolver(self.config, clock=self.clock)
        self.connector = FakeConnector()
        self.metrics = ProxyMetrics()
        self.signer = PolicySigner(
            self.key, kid="policy-1", issuer="edge-test-1", ttl=30.0, now=self.clock.seconds
        )
        self.context = ListenerContext(
            config=listener,
            names=NameTable((s.id, s.names) for s in self.config.services),
            resolver=self.resolver,
            signer=self.signer,
            connector=self.connector,
            metrics=self.metrics,
            clock=self.clock,
        )
        self.factory = ProxyFactory(self.context)

    def verifier(self, shard_id: str) -> ShardVerifier:
        return ShardVerifier(shard_id, {"policy-1": self.key.public_key()}, now=self.clock.seconds)

    def connect_client(self, peer=CLIENT, host=PROXY):
        protocol = self.factory.buildProtocol(peer)
        transport = HalfCloseTransport(hostAddress=host, peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def rejected(self, reason: str) -> float:
        return self.metrics.value("shardtcp_connections_rejected_total", listener="edge", reason=reason)


class RoutingTests(SynchronousTestCase):
    """A ClientHello is routed to the best shard with a verified header."""

    def test_hello_byte_by_byte_routed_with_verified_header(self) -> None:
        """
        A ClientHello fed one byte at a time pauses the client once complete,
        connects to the nearest shard, and the shard receives a PROXY v2
        header whose PolicyContext verifies, followed by the hello unchanged.
        """
        h = Harness(geo=[geo("198.51.100.0/24", NEW_YORK)])
        protocol, transport = h.connect_client()
        hello = client_hello("API.example.test")
        for i in range(len(hello)):
            self.assertEqual(h.connector.attempts, [])
            protocol.dataReceived(hello[i : i + 1])
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(len(h.connector.attempts), 1)
        self.assertEqual(h.connector.attempts[0][0].shard_id, "api-nyc-1")
        self.assertEqual(h.connector.attempts[0][2], 5.0)
        upstream, up_transport = h.connector.succeed()
        header, rest = proxyv2.parse(up_transport.value())
        self.assertEqual(rest, hello)
        self.assertEqual(header.source, ("198.51.100.7", 51515))
        self.assertEqual(header.destination, ("127.0.0.1", 8443))
        self.assertEqual(header.authority, "api.example.test")
        self.assertEqual([t for t, _ in header.tlvs], [0x02, 0x05, 0xE0, 0x03])
        verified = h.verifier("api-nyc-1").verify(header)
        self.assertEqual(verified.service, "api")
        self.assertEqual(verified.sni, "api.example.test")
        self.assertEqual(verified.policy.encryption_level, "tls")
        self.assertEqual(verified.policy.authentication_method, ("none",))
        self.assertEqual(verified.policy.access_control_list, ("orders:read",))
        self.assertEqual(verified.connection_id, protocol.connection_id)
        self.assertEqual(verified.claims["iss"], "edge-test-1")
        self.assertEqual(verified.claims["exp"] - verified.claims["iat"], 30)
        self.assertEqual(transport.producerState, "producing")

    def test_european_client_goes_to_frankfurt(self) -> None:
        """A client in no geo network is placed at the proxy (Frankfurt)."""
        h = Harness(geo=[geo("198.51.100.0/24", NEW_YORK)])
        protocol, _ = h.connect_client(peer=IPv4Address("TCP", "203.0.113.9", 4000))
        protocol.dataReceived(client_hello())
        self.assertEqual(h.connector.attempts[0][0].shard_id, "api-fra-1")

    def test_ipv6_client(self) -> None:
        """An IPv6 client gets an INET6 header with bracketed src/dst claims."""
        h = Harness()
        protocol, _ = h.connect_client(
            peer=IPv6Address("TCP", "2001:db8::7", 5000), host=IPv6Address("TCP", "::1", 8443)
        )
        protocol.dataReceived(client_hello())
        _, up = h.connector.succeed()
        header, _ = proxyv2.parse(up.value())
        self.assertEqual(header.family, "INET6")
        verified = h.verifier(h.connector.attempts[0][0].shard_id).verify(header)
        self.assertEqual(verified.claims["src"], "[2001:db8::7]:5000")
        self.assertEqual(verified.claims["dst"], "[::1]:8443")

    def test_v4_mapped_addresses_unmapped(self) -> None:
        """A dual-stack listener's v4-mapped peer and host become plain IPv4."""
        h = Harness()
        protocol, _ = h.connect_client(
            peer=IPv6Address("TCP", "::ffff:192.0.2.1", 5000),
            host=IPv6Address("TCP", "::ffff:127.0.0.1", 8443),
        )
        protocol.dataReceived(client_hello())
        _, up = h.connector.succeed()
        header, _ = proxyv2.parse(up.value())
        self.assertEqual((header.family, header.source), ("INET", ("192.0.2.1", 5000)))

    def test_retry_next_shard_with_same_bytes(self) -> None:
        """
        A refused connect moves on to the next candidate, which receives the
        same buffered bytes and a token whose ``aud`` is its own id.
        """
        h = Harness()
        protocol, transport = h.connect_client()
        hello = client_hello()
        protocol.dataReceived(hello)
        first = h.connector.attempts[0][0].shard_id
        h.connector.fail(0, "refused")
        self.assertEqual(len(h.connector.attempts), 2)
        second = h.connector.attempts[1][0].shard_id
        self.assertNotEqual(first, second)
        _, up = h.connector.succeed(1)
        header, rest = proxyv2.parse(up.value())
        self.assertEqual(rest, hello)
        self.assertEqual(h.verifier(second).verify(header).shard_id, second)
        self.assertEqual(
            h.metrics.value(
                "shardtcp_upstream_connect_failures_total", service="api", shard=first, reason="refused"
            ),
            1.0,
        )
        # The failed attempt's lease was given back; the live one is held.
        infos = {i.shard_id: i.open_connections for i in h.resolver.get_shard_info("api")}
        self.assertEqual(infos, {first: 0, second: 1})

    def test_all_shards_fail(self) -> None:
        """
        When every candidate fails, the client gets an internal_error alert,
        is closed, and the refusal is counted.
        """
        h = Harness(listener=ListenerConfig(name="edge", listen="tcp:0", retries=1))
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        h.connector.fail(0, "timeout")
        h.connector.fail(1, "refused")
        self.assertEqual(len(h.connector.attempts), 2)
        self.assertEqual(transport.value(), tls_alert(AlertDescription.internal_error))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.rejected("shard_unreachable"), 1.0)
        self.assertEqual(sum(i.open_connections for i in h.resolver.get_shard_info("api")), 0)


class FailedAttemptLineTests(SynchronousTestCase):
    """The lines about failed attempts at shards are bounded per shard; the metric counts every failure."""

    def test_bounded_per_shard_and_summarised(self) -> None:
        """
        With one line per shard per 10 s: each failing shard gets exactly
        one line, every further failure is counted in the metric and, when
        the interval ends, in the summary (exactly).
        """
        h = Harness(listener=ListenerConfig(name="edge", listen="tcp:0", retries=0))
        h.context.shard_lines = ShardLineLimiter(h.clock, lines=1, interval=10.0)
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        failed = []
        for _ in range(6):
            protocol, transport = h.connect_client()
            protocol.dataReceived(client_hello())
            failed.append(h.connector.attempts[-1][0].shard_id)
            h.connector.fail(-1, "refused")
        lines = [e for e in events if "failed: {why}" in e.get("log_format", "")]
        self.assertEqual(sorted(e["shard"] for e in lines), sorted(set(failed)))
        self.assertLess(len(lines), 6)
        total = sum(
            h.metrics.value("shardtcp_upstream_connect_failures_total", service="api", shard=shard, reason="refused")
            for shard in set(failed)
        )
        self.assertEqual(total, 6.0)
        self.assertEqual([e for e in events if "suppressed" in e.get("log_format", "")], [])
        h.clock.advance(10)
        summaries = [e for e in events if "suppressed" in e.get("log_format", "")]
        self.assertEqual(sum(e["suppressed"] for e in summaries), 6 - len(lines))
        self.assertTrue(all(e["reason"] == "refused" and e["name"].startswith("shard ") for e in summaries))

    def test_default_bound(self) -> None:
        """A listener's context bounds these lines by default: 10 per shard and 100 in all per 10 s."""
        limiter = Harness().context.shard_lines
        self.assertIsInstance(limiter, ShardLineLimiter)
        self.assertEqual((limiter._lines, limiter._total, limiter._interval), (10, 100, 10.0))


class RefusalTests(SynchronousTestCase):
    """Bad input gets a bounded, specific answer."""

    def test_garbage(self) -> None:
        """Bytes that are not TLS close the connection without an answer."""
        h = Harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.rejected("not_tls"), 1.0)
        self.assertEqual(h.connector.attempts, [])

    def test_malformed_hello(self) -> None:
        """A TLS record holding a broken ClientHello gets a decode_error alert."""
        h = Harness()
        protocol, transport = h.connect_client()
        hello = bytearray(client_hello())
        hello[5] = 2  # handshake type ServerHello
        protocol.dataReceived(bytes(hello))
        self.assertEqual(transport.value(), tls_alert(AlertDescription.decode_error))
        self.assertEqual(h.rejected("malformed"), 1.0)

    def test_too_large(self) -> None:
        """A ClientHello over max_client_hello is refused as too large."""
        h = Harness(listener=ListenerConfig(name="edge", listen="tcp:0", max_client_hello=1024))
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello(alpn=["x" * 200] * 8))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.rejected("too_large"), 1.0)

    def test_peek_timeout(self) -> None:
        """Half a ClientHello and then silence: refused after peek_timeout."""
        h = Harness(listener=ListenerConfig(name="edge", listen="tcp:0", peek_timeout=2.0))
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello()[:20])
        h.clock.advance(1.9)
        self.assertFalse(transport.disconnecting)
        h.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), tls_alert(AlertDescription.handshake_failure))
        self.assertEqual(h.rejected("peek_timeout"), 1.0)

    def test_unknown_name(self) -> None:
        """An SNI no service lists gets unrecognized_name."""
        h = Harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello("other.example.test"))
        self.assertEqual(transport.value(), tls_alert(AlertDescription.unrecognized_name))
        self.assertEqual(h.rejected("unknown_service"), 1.0)

    def test_no_sni_without_default(self) -> None:
        """No SNI and no default_service: refused with unrecognized_name."""
        h = Harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello(None))
        self.assertEqual(transport.value(), tls_alert(AlertDescription.unrecognized_name))
        self.assertEqual(h.rejected("no_service"), 1.0)

    def test_no_sni_with_default(self) -> None:
        """No SNI with default_service set: routed to that service, no AUTHORITY TLV."""
        h = Harness(listener=ListenerConfig(name="edge", listen="tcp:0", default_service="api"))
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello(None))
        _, up = h.connector.succeed()
        header, _ = proxyv2.parse(up.value())
        self.assertIsNone(header.authority)
        verified = h.verifier(h.connector.attempts[0][0].shard_id).verify(header)
        self.assertIsNone(verified.sni)
        self.assertEqual(verified.service, "api")

    def test_denied_client(self) -> None:
        """A client outside the service's allow list gets access_denied."""
        h = Harness(policy=PolicyConfig(allow=(__import__("ipaddress").ip_network("10.0.0.0/8"),)))
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        self.assertEqual(transport.value(), tls_alert(AlertDescription.access_denied))
        self.assertEqual(h.rejected("denied"), 1.0)

    def test_mtls_required_refused_in_passthrough(self) -> None:
        """A service requiring mtls cannot be reached through passthrough."""
        h = Harness(policy=PolicyConfig(encryption="mtls"))
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        self.assertEqual(transport.value(), tls_alert(AlertDescription.access_denied))
        self.assertEqual(h.rejected("policy_encryption"), 1.0)

    def test_client_gone_while_connecting(self) -> None:
        """A client that leaves during the connect cancels it and frees its lease."""
        h = Harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        d = h.connector.attempts[0][3]
        protocol.connectionLost(None)
        # Cancelled (no canceller here, so it fired with CancelledError,
        # handled; a direct attempt stopped its connector), and no further
        # shard was tried.
        if isinstance(d, defer.Deferred):
            self.assertTrue(d.called)
        else:
            self.assertEqual((d.settled, d._connector.stopped), (True, 1))
        self.assertEqual(len(h.connector.attempts), 1)
        self.assertEqual(sum(i.open_connections for i in h.resolver.get_shard_info("api")), 0)
        self.assertEqual(
            h.metrics.value("shardtcp_connections_active", listener="edge"), 0.0
        )


class SpliceTests(SynchronousTestCase):
    """Once connected, bytes flow both ways with flow control and half-close."""

    def spliced(self, **kw):
        h = Harness(**kw)
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        upstream, up = h.connector.succeed()
        up.clear()
        return h, protocol, transport, upstream, up

    def test_bytes_both_ways_and_producers(self) -> None:
        """
        Each transport is the other's producer (the client is the shard's
        directly once the shard has spoken); bytes pass unchanged.
        """
        h, protocol, transport, upstream, up = self.spliced()
        self.assertIs(transport.producer, up)
        protocol.dataReceived(b"ping")
        upstream.dataReceived(b"pong")
        self.assertIs(up.producer, transport)
        self.assertEqual(up.value(), b"ping")
        self.assertEqual(transport.value(), b"pong")

    def test_client_half_close(self) -> None:
        """
        The client's EOF half-closes the shard side; the shard's reply still
        reaches the client; the shard's close then closes the client.
        """
        h, protocol, transport, upstream, up = self.spliced()
        protocol.readConnectionLost()
        self.assertTrue(up.write_closed)
        self.assertFalse(transport.disconnecting)
        upstream.dataReceived(b"reply")
        self.assertEqual(transport.value(), b"reply")
        upstream.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertTrue(up.disconnecting)

    def test_shard_half_close(self) -> None:
        """
        The shard's EOF half-closes the client side (its bytes first): the
        client's bytes still reach the shard; the client's EOF then closes
        both.
        """
        h, protocol, transport, upstream, up = self.spliced()
        upstream.dataReceived(b"reply")
        upstream.readConnectionLost()
        self.assertEqual(transport.value(), b"reply")
        self.assertTrue(transport.write_closed)
        self.assertFalse(transport.disconnecting)
        self.assertFalse(up.disconnecting)
        protocol.dataReceived(b"more")
        self.assertEqual(up.value(), b"more")
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertTrue(up.disconnecting)

    def test_shard_half_close_bounded_by_idle_timeout(self) -> None:
        """A client that never closes after the shard's EOF is dropped at the idle timeout, not before."""
        h, protocol, transport, upstream, up = self.spliced(
            listener=ListenerConfig(name="edge", listen="tcp:0", idle_timeout=10.0)
        )
        upstream.dataReceived(b"reply")
        upstream.readConnectionLost()
        self.assertTrue(transport.write_closed)
        h.clock.advance(9.9)
        self.assertFalse(transport.aborted)
        h.clock.advance(0.2)
        self.assertTrue(transport.aborted)
        self.assertTrue(up.aborted)

    def test_shard_dies(self) -> None:
        """A shard that dies (after answering) closes the client promptly and frees the lease."""
        h, protocol, transport, upstream, up = self.spliced()
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        upstream.dataReceived(b"answer")
        upstream.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.assertEqual(sum(i.open_connections for i in h.resolver.get_shard_info("api")), 0)
        self.assertEqual(h.metrics.value("shardtcp_connections_ended_total", listener="edge", ended_by="shard"), 1.0)

    def test_idle_timeout(self) -> None:
        """With idle_timeout set, a silent spliced connection is dropped; activity defers it."""
        h, protocol, transport, upstream, up = self.spliced(
            listener=ListenerConfig(name="edge", listen="tcp:0", idle_timeout=10.0)
        )
        h.clock.advance(6)
        protocol.dataReceived(b"x")
        h.clock.advance(6)
        self.assertFalse(transport.aborted)
        h.clock.advance(5)
        self.assertTrue(transport.aborted)
        self.assertTrue(up.aborted)

    def test_eof_while_connecting_is_carried(self) -> None:
        """A client that half-closes before the shard connects still gets its answer."""
        h = Harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        protocol.readConnectionLost()
        upstream, up = h.connector.succeed()
        self.assertTrue(up.write_closed)
        upstream.dataReceived(b"answer")
        self.assertEqual(transport.value(), b"answer")


class AdmissionTests(SynchronousTestCase):
    """Who may connect at all: threat feeds and trusted load balancers."""

    def test_threat_feed_denies_at_accept(self):
        """A client a feed denies is closed at accept: no byte read, none written."""
        h = Harness()
        h.context.admission = lambda ip: f"feed denies {ip}" if ip == "198.51.100.7" else None
        protocol, transport = h.connect_client()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(client_hello())
        self.assertEqual(h.connector.attempts, [])
        self.assertEqual(h.rejected("threat_denied"), 1.0)

    def test_proxy_v2_from_trusted_load_balancer(self):
        """
        With accept_proxy, a PROXY v2 header from a trusted network names the
        client: the shard's header and token carry that source, and the
        bytes after the header are routed as usual.
        """
        import ipaddress

        listener = ListenerConfig(
            name="edge",
            listen="tcp:0",
            accept_proxy=True,
            trusted_proxies=(ipaddress.ip_network("198.51.100.0/24"),),
        )
        h = Harness(listener=listener)
        protocol, transport = h.connect_client()
        inbound = proxyv2.encode(
            proxyv2.ProxyHeader(source=("203.0.113.5", 40000), destination=("192.0.2.1", 443))
        )
        hello = client_hello()
        data = inbound + hello
        for i in range(0, len(data), 7):
            protocol.dataReceived(data[i : i + 7])
        _, up = h.connector.succeed()
        header, rest = proxyv2.parse(up.value())
        self.assertEqual(rest, hello)
        self.assertEqual(header.source, ("203.0.113.5", 40000))
        self.assertEqual(header.destination, ("192.0.2.1", 443))
        verified = h.verifier(h.connector.attempts[0][0].shard_id).verify(header)
        self.assertEqual(verified.claims["src"], "203.0.113.5:40000")

    def test_untrusted_load_balancer_refused(self):
        """accept_proxy from outside trusted_proxies: closed before reading anything."""
        import ipaddress

        listener = ListenerConfig(
            name="edge", listen="tcp:0", accept_proxy=True, trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),)
        )
        h = Harness(listener=listener)
        protocol, transport = h.connect_client()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.rejected("untrusted_proxy"), 1.0)

    def test_bad_proxy_header_refused(self):
        """A trusted peer sending a broken PROXY header is refused and counted."""
        import ipaddress

        listener = ListenerConfig(
            name="edge", listen="tcp:0", accept_proxy=True, trusted_proxies=(ipaddress.ip_network("198.51.100.0/24"),)
        )
        h = Harness(listener=listener)
        protocol, transport = h.connect_client()
        protocol.dataReceived(b"\x16\x03\x01\x02\x00")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.rejected("bad_proxy_header"), 1.0)


class KernelSpliceFallbackTests(SynchronousTestCase):
    """
    A listener with a kernel splicer whose transports it cannot take (not
    plain Twisted TCP) splices in userspace, with the header and the
    ClientHello first on the shard connection.
    """

    def test_untakeable_transports_use_the_userspace_splice(self) -> None:
        """
        The splicer says no without touching anything: no pipe taken, the
        kernel-spliced counter stays 0, the shard gets header + hello, and
        bytes flow through the userspace splice both ways.
        """
        from shardtcp.proxy.ksplice import KernelSplicer, PipePool

        h = Harness()
        pool = PipePool(4)
        h.context.splicer = KernelSplicer(pool, reactor=h.clock, enabled=True)
        protocol, transport = h.connect_client()
        hello = client_hello()
        protocol.dataReceived(hello)
        upstream, up = h.connector.succeed()
        _, rest = proxyv2.parse(up.value())
        self.assertEqual(rest, hello)
        self.assertEqual((pool.in_use, pool.free), (0, 0))
        self.assertEqual(h.metrics.value("shardtcp_connections_kernel_spliced_total", listener="edge"), 0.0)
        up.clear()
        protocol.dataReceived(b"ping")
        upstream.dataReceived(b"pong")
        self.assertEqual((up.value(), transport.value()), (b"ping", b"pong"))


class AcceptedAddressTests(SynchronousTestCase):
    """How a connection's (client, destination) pair is read at accept."""

    def test_tcp_server_over_ipv4(self) -> None:
        """
        A Twisted TCP server transport on an IPv4 socket: the pair is the
        accepted client address and the socket's own, exactly what
        getPeer/getHost name.
        """
        import socket

        from twisted.internet import tcp
        from twisted.internet.protocol import Protocol

        from shardtcp.proxy import listener as listener_module

        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname())
        self.addCleanup(client.close)
        accepted, address = server.accept()
        transport = tcp.Server(accepted, Protocol(), address, None, 1, MemoryReactorClock())
        self.addCleanup(accepted.close)
        pair = listener_module._addresses(transport)
        self.assertEqual(pair, (client.getsockname(), server.getsockname()))
        peer, host = transport.getPeer(), transport.getHost()
        self.assertEqual(pair, ((peer.host, peer.port), (host.host, host.port)))

    def test_other_transports(self) -> None:
        """
        Any other transport goes through getPeer/getHost and address_pair:
        an IPv4 client of an IPv6 destination is mapped, a mapped client of
        an IPv4 destination unmapped.
        """
        from twisted.internet.testing import StringTransport

        from shardtcp.proxy import listener as listener_module

        mixed = StringTransport(
            hostAddress=IPv6Address("TCP", "2001:db8::1", 443), peerAddress=IPv4Address("TCP", "192.0.2.7", 5000)
        )
        self.assertEqual(
            listener_module._addresses(mixed), (("::ffff:192.0.2.7", 5000), ("2001:db8::1", 443))
        )
        mapped = StringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 443), peerAddress=IPv6Address("TCP", "::ffff:192.0.2.7", 5000)
        )
        self.assertEqual(listener_module._addresses(mapped), (("192.0.2.7", 5000), ("192.0.2.1", 443)))


class _Direct:
    """The same tests, with a connector whose attempts report directly (``start_direct``, no Deferred)."""

    def setUp(self) -> None:
        import sys

        self.patch(sys.modules[__name__], "FakeConnector", DirectFakeConnector)
        super().setUp()

    def test_attempts_are_direct(self) -> None:
        """The harness's connector really takes the direct path: its attempt is a DirectAttempt."""
        from shardtcp.proxy.connector import DirectAttempt

        h = Harness()
        protocol, _ = h.connect_client()
        protocol.dataReceived(client_hello("api.example.test"))
        self.assertIsInstance(h.connector.attempts[0][3], DirectAttempt)


class DirectRoutingTests(_Direct, RoutingTests):
    __doc__ = RoutingTests.__doc__ + " (direct attempts)"


class DirectRefusalTests(_Direct, RefusalTests):
    __doc__ = RefusalTests.__doc__ + " (direct attempts)"


class DirectSpliceTests(_Direct, SpliceTests):
    __doc__ = SpliceTests.__doc__ + " (direct attempts)"
