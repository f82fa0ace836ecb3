"""
Tests for ``shardtcp.config._values``: shard addresses and service names
whose ports are not ASCII digits, or not a port at all, are one problem line
each (``str.isdigit`` and ``int`` accept other scripts' digits).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from shardtcp.config._values import canonical_service_name, parse_address
from shardtcp.model import Address


class AddressTests(SynchronousTestCase):
    """parse_address answers an Address or a one-line reason, never raises."""

    def test_not_ascii_ports(self) -> None:
        """Superscripts, Arabic-Indic digits and 5,000 digits are not ports."""
        for port in ("²", "٩٠٠١", "9" * 5000, "-1", "+80", " 80"):
            for host in ("127.0.0.1", "[::1]", "shard.test"):
                reason = parse_address(f"{host}:{port}")
                self.assertIsInstance(reason, str, (host, port))
                self.assertNotIn("\n", reason)
                self.assertLess(len(reason), 200)

    def test_edges(self) -> None:
        """1 and 65535 are shard ports; 0 and 65536 are not."""
        self.assertEqual(parse_address("127.0.0.1:1"), Address("127.0.0.1", 1))
        self.assertEqual(parse_address("[::1]:65535"), Address("::1", 65535))
        self.assertIsInstance(parse_address("127.0.0.1:0"), str)
        self.assertIsInstance(parse_address("127.0.0.1:65536"), str)

    def test_zone_refused(self) -> None:
        """An IPv6 zone is not an address here."""
        self.assertIsInstance(parse_address("[fe80::1%eth0]:80"), str)


class ServiceNameTests(SynchronousTestCase):
    """Service names with a port read the port as ASCII digits."""

    def test_ports(self) -> None:
        """api.test:8443 is canonical; ² , Arabic-Indic digits and 5,000 digits are refused."""
        self.assertEqual(canonical_service_name("API.test:08443"), ("api.test:8443", None))
        self.assertEqual(canonical_service_name("[::1]:443"), ("[::1]:443", None))
        for port in ("²", "٩٠٠١", "9" * 5000, "0", "65536"):
            for host in ("api.test", "[::1]"):
                _, problem = canonical_service_name(f"{host}:{port}")
                self.assertIsNotNone(problem, (host, port))
                self.assertNotIn("\n", problem)
