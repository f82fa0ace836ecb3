"""
Tests for shardtcp.identify.names: the service-name table, its conflict
report and the pattern check used by check-config.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.identify.names import NameTable, valid_pattern

_PROPERTY = settings(database=None, deadline=None)


class LookupTests(SynchronousTestCase):
    """How ``NameTable.lookup`` maps names to services."""

    def test_exact(self) -> None:
        """An exact name selects its service; an unknown one selects none."""
        table = NameTable([("api", ["api.example.test"]), ("web", ["www.example.test"])])
        self.assertEqual(
            [table.lookup(n) for n in ("api.example.test", "www.example.test", "x.example.test")],
            ["api", "web", None],
        )

    def test_case_and_trailing_dot(self) -> None:
        """Case and one trailing dot are ignored, in the table and the name."""
        table = NameTable([("api", ["API.Example.Test."])])
        self.assertEqual(
            [
                table.lookup(n)
                for n in ("api.example.test", "API.EXAMPLE.TEST.", "api.example.test..")
            ],
            ["api", "api", None],
        )

    def test_wildcard_one_label(self) -> None:
        """``*.example.test`` matches exactly one more label."""
        table = NameTable([("api", ["*.example.test"])])
        self.assertEqual(
            [
                table.lookup(n)
                for n in (
                    "a.example.test",
                    "A.Example.Test.",
                    "a.b.example.test",
                    "example.test",
                    ".example.test",
                    "*.example.test",
                    "a b.example.test",
                )
            ],
            ["api", "api", None, None, None, None, None],
        )

    def test_exact_beats_wildcard(self) -> None:
        """An exact name wins over a wildcard, in either listing order."""
        for services in (
            [("api", ["*.example.test"]), ("admin", ["admin.example.test"])],
            [("admin", ["admin.example.test"]), ("api", ["*.example.test"])],
        ):
            table = NameTable(services)
            self.assertEqual(
                (table.lookup("admin.example.test"), table.lookup("other.example.test")),
                ("admin", "api"),
            )

    def test_host_port(self) -> None:
        """
        ``host:port`` tries the exact ``host:port`` entry, then the host; a
        bare host never matches an entry with a port.
        """
        table = NameTable(
            [
                ("tunnel", ["proxy.test:8443"]),
                ("plain", ["proxy.test"]),
                ("only", ["only.test:443"]),
            ]
        )
        self.assertEqual(
            [
                table.lookup(n)
                for n in (
                    "proxy.test:8443",
                    "PROXY.test.:08443",
                    "proxy.test:443",
                    "proxy.test",
                    "only.test:443",
                    "only.test",
                    "only.test:80",
                )
            ],
            ["tunnel", "tunnel", "plain", "plain", "only", None, None],
        )

    def test_wildcard_port_order(self) -> None:
        """
        For ``host:port``: exact ``host:port``, exact host, wildcard with
        port, then wildcard without.
        """
        table = NameTable(
            [
                ("wild443", ["*.x.test:443"]),
                ("exact", ["a.x.test"]),
                ("wild", ["*.x.test"]),
                ("exact443", ["b.x.test:443"]),
            ]
        )
        self.assertEqual(
            [
                table.lookup(n)
                for n in (
                    "a.x.test:443",
                    "b.x.test:443",
                    "c.x.test:443",
                    "c.x.test:80",
                    "c.x.test",
                    "a.x.test",
                )
            ],
            ["exact", "exact443", "wild443", "wild", "wild", "exact"],
        )

    def test_ipv6(self) -> None:
        """IPv6 literals match whatever their spelling, with and without port."""
        table = NameTable(
            [("v6", ["[::1]:443"]), ("host", ["2001:DB8::1"]), ("v4", ["192.0.2.1:443"])]
        )
        self.assertEqual(
            [
                table.lookup(n)
                for n in (
                    "[::1]:443",
                    "[0:0::1]:443",
                    "[::1]:80",
                    "::1",
                    "[2001:db8:0::1]:443",
                    "2001:db8::1",
                    "[2001:db8::1]",
                    "192.0.2.1:443",
                    "192.0.2.1",
                )
            ],
            ["v6", "v6", None, None, "host", "host", "host", "v4", None],
        )

    def test_garbage(self) -> None:
        """Malformed names select nothing and never raise."""
        table = NameTable([("api", ["*.example.test", "example.test"])])
        garbage = (
            "", ":", "[", "[::1", "[zz]:1", "[::1]x",
            "example.test:abc", "example.test:\u00b2", "*", "a:b:c",
        )
        for name in garbage:
            self.assertIsNone(table.lookup(name), name)

    def test_generators(self) -> None:
        """One-shot iterables of services and names are enough."""
        table = NameTable((s, (n for n in names)) for s, names in [("api", ["a.test"])])
        self.assertEqual(table.lookup("a.test"), "api")

    def test_invalid_names_refused(self) -> None:
        """A table is not built from a name ``valid_pattern`` refuses."""
        exc = self.assertRaises(ValueError, NameTable, [("api", ["a..test"])])
        self.assertEqual(str(exc), "service 'api': name 'a..test': label '' is not a DNS label")

    def test_conflicts_refused(self) -> None:
        """A table is not built from names two services claim."""
        exc = self.assertRaises(
            ValueError, NameTable, [("api", ["A.test"]), ("web", ["a.test."])]
        )
        self.assertEqual(str(exc), "'a.test' is listed by services 'api' and 'web'")

    @_PROPERTY
    @given(st.text(max_size=40))
    def test_lookup_never_raises(self, name: str) -> None:
        """Any text at all is looked up without an exception."""
        table = NameTable([("api", ["*.example.test", "example.test:443", "[::1]"])])
        self.assertIn(table.lookup(name), (None, "api"))

    @_PROPERTY
    @given(
        st.lists(
            st.from_regex(r"[a-z0-9](?:[a-z0-9_-]{0,10}[a-z0-9])?", fullmatch=True),
            min_size=1,
            max_size=5,
        ),
        st.booleans(),
    )
    def test_any_spelling(self, labels: list[str], dot: bool) -> None:
        """A listed name is found in any case, with or without a trailing dot."""
        name = ".".join(labels)
        table = NameTable([("svc", [name]), ("wild", ["*." + name])])
        spelled = name.upper() + ("." if dot else "")
        self.assertEqual(
            (table.lookup(spelled), table.lookup("x." + spelled), table.lookup("x.y." + spelled)),
            ("svc", "wild", None),
        )


class ConflictTests(SynchronousTestCase):
    """``NameTable.conflicts`` for check-config."""

    def test_conflicts(self) -> None:
        """
        Names two services list, compared case-insensitively and without
        the trailing dot, are reported once per clashing service, in order.
        """
        services = [
            ("api", ["API.example.test", "*.x.test", "api.example.test"]),
            ("web", ["api.example.test.", "www.test", "api.example.test"]),
            ("admin", ["*.X.test", "api.example.test", "[::1]:443"]),
            ("v6", ["[0::1]:443"]),
        ]
        self.assertEqual(
            NameTable.conflicts(services),
            [
                ("api.example.test", "api", "web"),
                ("*.x.test", "api", "admin"),
                ("api.example.test", "api", "admin"),
                ("[::1]:443", "admin", "v6"),
            ],
        )

    def test_no_conflicts(self) -> None:
        """A service repeating a name, and exact-versus-wildcard, are fine."""
        self.assertEqual(
            NameTable.conflicts(
                [("api", ["a.test", "A.test"]), ("web", ["*.a.test", "a.test:443"])]
            ),
            [],
        )

    def test_invalid_names_still_compared(self) -> None:
        """Duplicates among invalid names are reported too, lowercased."""
        self.assertEqual(
            NameTable.conflicts([("a", ["Bad Name"]), ("b", ["bad name."])]),
            [("bad name", "a", "b")],
        )


class ValidPatternTests(SynchronousTestCase):
    """``valid_pattern``: which configured names are usable, and why not."""

    def test_valid(self) -> None:
        """DNS names, one-label wildcards, ports and IP literals are usable."""
        names = [
            "api.example.test",
            "API.Example.Test.",
            "*.api.example.test",
            "*.test",
            "localhost",
            "_acme.example.test",
            "xn--bcher-kva.test",
            "proxy.test:8443",
            "*.x.test:443",
            "192.0.2.1:443",
            "::1",
            "[::1]",
            "[2001:db8::1]:443",
            "a" * 63 + ".test",
        ]
        self.assertEqual([valid_pattern(n) for n in names], [None] * len(names))

    def test_invalid(self) -> None:
        """Each unusable name gets its specific reason."""
        cases = {
            "": "empty name",
            ".": "empty host",
            ":443": "empty host",
            "*": "a wildcard needs a domain after '*.'",
            "*.": "a wildcard needs a domain after '*.'",
            "a.*.test": "'*' is only allowed as the whole leftmost label",
            "f*.test": "'*' is only allowed as the whole leftmost label",
            "*.*.test": "'*' is only allowed as the whole leftmost label",
            "a..test": "label '' is not a DNS label",
            "-a.test": "label '-a' is not a DNS label",
            "a-.test": "label 'a-' is not a DNS label",
            "a b.test": "label 'a b' is not a DNS label",
            "a" * 64 + ".test": f"label {'a' * 64!r} is not a DNS label",
            ".".join(["a" * 63] * 4): "longer than 253 characters",
            "bücher.test": "not ASCII; write internationalized names in their xn-- form",
            "host:0": "port '0' is not a number in 1..65535",
            "host:65536": "port '65536' is not a number in 1..65535",
            "host:": "port '' is not a number in 1..65535",
            "host:https": "port 'https' is not a number in 1..65535",
            "[::1": "'[' without a closing ']'",
            "[::1]443": "unexpected '443' after ']'",
            "[host]:443": "'host' is not an IPv6 address",
            "1:2:3": "'1:2:3' is not an IPv6 address",
        }
        self.assertEqual({n: valid_pattern(n) for n in cases}, cases)
