"""
Tests for shardtcp.net: every function, each rule at both edges.
"""

from __future__ import annotations

import ast
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from twisted.trial.unittest import SynchronousTestCase

from shardtcp import net
from shardtcp.net import (
    PrefixTable,
    address_pair,
    format_address,
    format_hostport,
    in_networks,
    normalise_network,
    parse_ip,
    parse_network,
    parse_port,
)


class FormatTests(SynchronousTestCase):
    """format_hostport and format_address."""

    def test_hostport(self) -> None:
        """IPv4 and names as host:port, IPv6 bracketed."""
        self.assertEqual(format_hostport("192.0.2.1", 443), "192.0.2.1:443")
        self.assertEqual(format_hostport("2001:db8::1", 0), "[2001:db8::1]:0")
        self.assertEqual(format_hostport("::ffff:192.0.2.1", 65535), "[::ffff:192.0.2.1]:65535")
        self.assertEqual(format_hostport("shard.example.test", 8443), "shard.example.test:8443")

    def test_address(self) -> None:
        """A (host, port) pair is formatted; None or an empty pair is '?'."""
        self.assertEqual(format_address(("2001:db8::1", 80)), "[2001:db8::1]:80")
        self.assertEqual(format_address(("192.0.2.1", 80)), "192.0.2.1:80")
        self.assertEqual(format_address(None), "?")
        self.assertEqual(format_address(()), "?")


class ParsePortTests(SynchronousTestCase):
    """parse_port: 1 to 5 ASCII digits, 0 to 65535."""

    def test_range_edges(self) -> None:
        """0 and 65535 are ports; 65536 and 99999 are not."""
        self.assertEqual(parse_port("0"), 0)
        self.assertEqual(parse_port("65535"), 65535)
        self.assertEqual(parse_port("08443"), 8443)
        for text in ("65536", "99999"):
            e = self.assertRaises(ValueError, parse_port, text)
            self.assertIn("out of range", str(e))

    def test_length_edges(self) -> None:
        """Five digits are read; six (even 000080) and 5,000 are refused without int()."""
        self.assertEqual(parse_port("00080"), 80)
        self.assertRaises(ValueError, parse_port, "000080")
        e = self.assertRaises(ValueError, parse_port, "9" * 5000)
        self.assertLess(len(str(e)), 100)

    def test_not_ascii_digits(self) -> None:
        """Superscripts, Arabic-Indic and full-width digits, signs, spaces and '' are refused."""
        for text in ("\u00b2", "\u0669\u0660\u0660\u0661", "\uff18\uff10", "+80", "-1", " 80", "80 ", "", "8_0"):
            self.assertRaises(ValueError, parse_port, text)

    def test_not_text(self) -> None:
        """An int or None is a ValueError too, not a TypeError."""
        self.assertRaises(ValueError, parse_port, 80)
        self.assertRaises(ValueError, parse_port, None)


class ParseIPTests(SynchronousTestCase):
    """parse_ip."""

    def test_literals(self) -> None:
        """IPv4 and IPv6 literals parse; names, ports, CIDR and junk give None."""
        self.assertEqual(parse_ip("192.0.2.1"), IPv4Address("192.0.2.1"))
        self.assertEqual(parse_ip("2001:DB8::1"), IPv6Address("2001:db8::1"))
        for text in ("example.test", "192.0.2.1:80", "10.0.0.0/8", "", "1.2.3", "010.0.0.1", None, 7, b"1.2.3.4"):
            self.assertIsNone(parse_ip(text), text)

    def test_mapped_unwrapped(self) -> None:
        """::ffff:a.b.c.d is the IPv4 address; ::a.b.c.d (compatible) and 64:ff9b:: stay IPv6."""
        self.assertEqual(parse_ip("::ffff:192.0.2.1"), IPv4Address("192.0.2.1"))
        self.assertEqual(parse_ip("::ffff:c000:201"), IPv4Address("192.0.2.1"))
        self.assertEqual(parse_ip("::192.0.2.1").version, 6)
        self.assertEqual(parse_ip("64:ff9b::192.0.2.1").version, 6)

    def test_zone_dropped(self) -> None:
        """An IPv6 zone is dropped (the address remains); IPv4 has no zone; an empty zone is junk."""
        address = parse_ip("fe80::1%eth0")
        self.assertEqual(address, IPv6Address("fe80::1"))
        self.assertEqual(str(address), "fe80::1")
        self.assertIsNone(parse_ip("192.0.2.1%eth0"))
        self.assertIsNone(parse_ip("fe80::1%"))

    def test_length_bound(self) -> None:
        """Text of 64 characters is still looked at; 65 is not."""
        padded = "0:0:0:0:0:ffff:" + "1.2.3.4"
        self.assertEqual(parse_ip(padded), IPv4Address("1.2.3.4"))
        long_zone = "fe80::1%" + "z" * (64 - len("fe80::1%"))
        self.assertEqual(len(long_zone), 64)
        self.assertEqual(parse_ip(long_zone), IPv6Address("fe80::1"))
        self.assertIsNone(parse_ip(long_zone + "z"))


class NetworkTests(SynchronousTestCase):
    """normalise_network and parse_network."""

    def test_normalise_mapped(self) -> None:
        """A mapped range of /96 or longer becomes IPv4; shorter or other IPv6 ranges stay."""
        self.assertEqual(normalise_network(IPv6Network("::ffff:0:0/96")), IPv4Network("0.0.0.0/0"))
        self.assertEqual(
            normalise_network(IPv6Network("::ffff:10.0.0.0/104")), IPv4Network("10.0.0.0/8")
        )
        self.assertEqual(
            normalise_network(IPv6Network("::ffff:192.0.2.1/128")), IPv4Network("192.0.2.1/32")
        )
        self.assertEqual(normalise_network(IPv6Network("::/95")), IPv6Network("::/95"))
        self.assertEqual(normalise_network(IPv6Network("2001:db8::/32")), IPv6Network("2001:db8::/32"))
        self.assertEqual(normalise_network(IPv4Network("10.0.0.0/8")), IPv4Network("10.0.0.0/8"))

    def test_cidr(self) -> None:
        """CIDR of both families, /0 to the full length, and bare addresses parse."""
        self.assertEqual(parse_network("10.0.0.0/8"), IPv4Network("10.0.0.0/8"))
        self.assertEqual(parse_network("0.0.0.0/0"), IPv4Network("0.0.0.0/0"))
        self.assertEqual(parse_network("192.0.2.1/32"), IPv4Network("192.0.2.1/32"))
        self.assertEqual(parse_network("192.0.2.1"), IPv4Network("192.0.2.1/32"))
        self.assertEqual(parse_network("2001:db8::/32"), IPv6Network("2001:db8::/32"))
        self.assertEqual(parse_network("::1/128"), IPv6Network("::1/128"))
        self.assertEqual(parse_network("::ffff:10.0.0.0/104"), IPv4Network("10.0.0.0/8"))

    def test_prefix_edges(self) -> None:
        """/32 and /128 are the longest; /33, /129, /08 and '/' are refused."""
        for text in ("10.0.0.0/33", "::/129", "10.0.0.0/08", "10.0.0.0/", "10.0.0.0/8/8", "10.0.0.0/1000"):
            self.assertRaises(ValueError, parse_network, text)

    def test_host_bits(self) -> None:
        """Host bits set are refused: 10.0.0.1/8, 2001:db8::1/32."""
        for text in ("10.0.0.1/8", "2001:db8::1/32"):
            self.assertRaises(ValueError, parse_network, text)

    def test_netmask_and_zone_refused(self) -> None:
        """Netmask and host-mask forms and zones are refused; only CIDR."""
        for text in (
            "10.0.0.0/255.0.0.0",
            "10.0.0.0/0.255.255.255",
            "fe80::1%eth0/128",
            "fe80::1%eth0",
            "2001:db8::/ffff:ffff::",
        ):
            e = self.assertRaises(ValueError, parse_network, text)
            self.assertNotIn("\n", str(e))

    def test_not_text(self) -> None:
        """Non-strings, non-ASCII digits and overlong text are refused with a short message."""
        for value in (None, 10, ["10.0.0.0/8"], "10.0.0.0/\u0668", "\u0661.0.0.0/8", "1" * 5000):
            e = self.assertRaises(ValueError, parse_network, value)
            self.assertLess(len(str(e)), 120)

    def test_in_networks(self) -> None:
        """Addresses in, out, mapped, zoned and not addresses at all."""
        networks = [parse_network("10.0.0.0/8"), parse_network("2001:db8::/32")]
        self.assertTrue(in_networks("10.255.255.255", networks))
        self.assertFalse(in_networks("11.0.0.0", networks))
        self.assertTrue(in_networks("::ffff:10.0.0.1", networks))
        self.assertTrue(in_networks("2001:db8::1", networks))
        self.assertFalse(in_networks("2001:db9::1", networks))
        self.assertFalse(in_networks("not-an-ip", networks))
        self.assertFalse(in_networks("10.0.0.1", []))
        self.assertTrue(in_networks("fe80::1%eth0", [parse_network("fe80::/10")]))


class AddressPairTests(SynchronousTestCase):
    """address_pair: one family for a PROXY header's two addresses."""

    def test_same_family_unchanged(self) -> None:
        """Two IPv4 or two IPv6 addresses are returned as given."""
        pair = (("192.0.2.1", 1), ("192.0.2.2", 2))
        self.assertEqual(address_pair(*pair), pair)
        pair6 = (("2001:db8::1", 1), ("2001:db8::2", 2))
        self.assertEqual(address_pair(*pair6), pair6)

    def test_mapped_unmapped(self) -> None:
        """A mapped source beside IPv4 (or beside another mapped address) is unmapped."""
        self.assertEqual(
            address_pair(("::ffff:192.0.2.1", 1), ("192.0.2.2", 2)),
            (("192.0.2.1", 1), ("192.0.2.2", 2)),
        )
        self.assertEqual(
            address_pair(("::ffff:192.0.2.1", 1), ("::ffff:192.0.2.2", 2)),
            (("192.0.2.1", 1), ("192.0.2.2", 2)),
        )
        self.assertEqual(
            address_pair(("192.0.2.1", 1), ("::ffff:192.0.2.2", 2)),
            (("192.0.2.1", 1), ("192.0.2.2", 2)),
        )

    def test_mixed_mapped_up(self) -> None:
        """IPv4 beside real IPv6 is mapped into IPv6, whichever side it is on."""
        self.assertEqual(
            address_pair(("192.0.2.1", 1), ("2001:db8::2", 2)),
            (("::ffff:192.0.2.1", 1), ("2001:db8::2", 2)),
        )
        self.assertEqual(
            address_pair(("2001:db8::1", 1), ("192.0.2.2", 2)),
            (("2001:db8::1", 1), ("::ffff:192.0.2.2", 2)),
        )
        self.assertEqual(
            address_pair(("::ffff:192.0.2.1", 1), ("2001:db8::2", 2)),
            (("::ffff:192.0.2.1", 1), ("2001:db8::2", 2)),
        )


class PrefixTableTests(SynchronousTestCase):
    """PrefixTable: longest-prefix match."""

    def test_longest_prefix_wins(self) -> None:
        """The most specific network answers, whatever the order given; edges of each range."""
        table = PrefixTable(
            [
                (parse_network("10.0.0.0/8"), "wide"),
                (parse_network("10.1.0.0/16"), "narrow"),
                (parse_network("10.1.2.3/32"), "host"),
            ]
        )
        self.assertEqual(len(table), 3)
        self.assertEqual(table.lookup(IPv4Address("10.1.2.3"))[1], "host")
        self.assertEqual(table.lookup(IPv4Address("10.1.2.4"))[1], "narrow")
        self.assertEqual(table.lookup(IPv4Address("10.1.255.255"))[1], "narrow")
        self.assertEqual(table.lookup(IPv4Address("10.2.0.0"))[1], "wide")
        self.assertEqual(table.lookup(IPv4Address("10.0.0.0"))[0], IPv4Network("10.0.0.0/8"))
        self.assertIsNone(table.lookup(IPv4Address("11.0.0.0")))
        self.assertIsNone(table.lookup(IPv4Address("9.255.255.255")))

    def test_first_duplicate_wins(self) -> None:
        """The same network twice keeps the first value and counts once."""
        table = PrefixTable([(parse_network("10.0.0.0/8"), "a"), (parse_network("10.0.0.0/8"), "b")])
        self.assertEqual((len(table), table.lookup(IPv4Address("10.0.0.1"))[1]), (1, "a"))

    def test_families_apart(self) -> None:
        """IPv4 and IPv6 tables do not meet: ::/0 holds no IPv4 address, 0.0.0.0/0 no IPv6."""
        table = PrefixTable([(parse_network("::/0"), "v6")])
        self.assertIsNone(table.lookup(IPv4Address("0.0.0.0")))
        self.assertEqual(table.lookup(IPv6Address("::"))[1], "v6")
        table = PrefixTable([(parse_network("0.0.0.0/0"), "v4")])
        self.assertIsNone(table.lookup(IPv6Address("2001:db8::1")))

    def test_mapped(self) -> None:
        """
        A mapped network given as IPv6 is stored as IPv4, and a mapped
        address is looked up as IPv4: they meet either way.
        """
        table = PrefixTable([(IPv6Network("::ffff:10.0.0.0/104"), "mapped")])
        self.assertEqual(table.lookup(IPv4Address("10.9.9.9"))[1], "mapped")
        self.assertEqual(table.lookup(IPv6Address("::ffff:10.9.9.9"))[1], "mapped")
        table = PrefixTable([(IPv4Network("10.0.0.0/8"), "v4")])
        self.assertEqual(table.lookup(IPv6Address("::ffff:10.9.9.9"))[1], "v4")
        self.assertIsNone(table.lookup(IPv6Address("::10.9.9.9")))

    def test_lookup_bits(self) -> None:
        """lookup_bits takes the family and integer value as they are."""
        table = PrefixTable([(parse_network("2001:db8::/32"), "doc"), (parse_network("10.0.0.0/8"), "ten")])
        self.assertEqual(table.lookup_bits(6, int(IPv6Address("2001:db8:ffff::1")))[1], "doc")
        self.assertIsNone(table.lookup_bits(6, int(IPv6Address("2001:db9::"))))
        self.assertEqual(table.lookup_bits(4, 10 << 24)[1], "ten")
        self.assertIsNone(table.lookup_bits(4, (10 << 24) - 1))

    def test_empty_and_zero_length(self) -> None:
        """An empty table finds nothing; a /0 finds everything of its family."""
        empty: PrefixTable[str] = PrefixTable(())
        self.assertEqual(len(empty), 0)
        self.assertIsNone(empty.lookup(IPv4Address("10.0.0.1")))
        table = PrefixTable([(parse_network("0.0.0.0/0"), "all")])
        self.assertEqual(table.lookup(IPv4Address("255.255.255.255"))[1], "all")


class LayeringTests(SynchronousTestCase):
    """net sits on the lowest floor."""

    def test_imports_nothing_of_the_project(self) -> None:
        """The module's source imports nothing of shardtcp."""
        with open(net.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                self.assertEqual(node.level, 0)
                self.assertFalse((node.module or "").startswith("shardtcp"), node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    self.assertFalse(alias.name.startswith("shardtcp"), alias.name)


class IPLiteralTests(SynchronousTestCase):
    """ip_literal and canonical_ip: ipaddress's answers, remembered, errors never remembered."""

    def test_values(self) -> None:
        """The same values as ipaddress.ip_address, one object per text while remembered."""
        self.assertEqual(net.ip_literal("192.0.2.1"), IPv4Address("192.0.2.1"))
        self.assertEqual(net.ip_literal("2001:db8::1"), IPv6Address("2001:db8::1"))
        self.assertIs(net.ip_literal("192.0.2.77"), net.ip_literal("192.0.2.77"))
        self.assertEqual(net.canonical_ip("2001:DB8:0::1"), "2001:db8::1")
        self.assertEqual(net.canonical_ip("::ffff:192.0.2.1"), "::ffff:c000:201")
        self.assertEqual(net.canonical_ip("192.0.2.1"), "192.0.2.1")

    def test_refused(self) -> None:
        """Not an address, or not text: ValueError every time (nothing cached)."""
        for bad in ("192.0.2.256", "", "example.com", "192.0.2.1%eth0"):
            for _ in range(2):
                self.assertRaises(ValueError, net.ip_literal, bad)
                self.assertRaises(ValueError, net.canonical_ip, bad)
        self.assertRaises(ValueError, net.ip_literal, b"192.0.2.1")
        self.assertRaises(ValueError, net.ip_literal, None)

    def test_bounded(self) -> None:
        """At most IP_CACHE_SIZE texts are remembered."""
        for i in range(net.IP_CACHE_SIZE + 10):
            net.ip_literal(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        self.assertEqual(net._ip_literal.cache_info().currsize, net.IP_CACHE_SIZE)
