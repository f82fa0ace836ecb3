"""
Tests for the shape of shardtcp.identify: the shared types, the method table
built explicitly without an import cycle, the answering protocol as an enum,
and the one DNS-name grammar every parser asks.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass

import shardtcp.identify
from shardtcp.identify import detect, names, preamble, types
from shardtcp.identify.clienthello import ClientHelloError, _host_name
from shardtcp.identify.detect import METHODS, Detector, SniMethod
from shardtcp.identify.names import MAX_DNS_NAME, NameTable, dns_name_problem, is_dns_name, valid_pattern
from shardtcp.identify.preamble import ConnectMethod, HttpHostMethod, LineMethod, parse_authority
from shardtcp.identify.types import AnswerProtocol, IIdentifyMethod, Identified, IdentifyError

PACKAGE = os.path.dirname(shardtcp.identify.__file__)


def project_imports(module) -> set:
    """The shardtcp modules a module's source imports."""
    with open(module.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shardtcp"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("shardtcp"))
    return found


class MethodTableTests(SynchronousTestCase):
    """METHODS is built once, explicitly, and read-only."""

    def test_every_method(self) -> None:
        """The four methods, by name, each providing IIdentifyMethod."""
        self.assertEqual(
            dict(METHODS),
            {"sni": SniMethod, "connect": ConnectMethod, "line": LineMethod, "http-host": HttpHostMethod},
        )
        for name, method in METHODS.items():
            self.assertEqual(method.name, name)
            self.assertTrue(verifyClass(IIdentifyMethod, method))
            self.assertIsInstance(method.protocol, AnswerProtocol)

    def test_read_only(self) -> None:
        """Nothing can register itself into the table at import time or later."""
        def register() -> None:
            METHODS["x"] = SniMethod  # type: ignore[index]

        self.assertRaises(TypeError, register)

    def test_no_import_cycle(self) -> None:
        """
        preamble and the types import nothing of detect; detect imports the
        parsers: the arrows point one way.
        """
        self.assertNotIn("shardtcp.identify.detect", project_imports(preamble))
        self.assertEqual(project_imports(types), set())
        self.assertIn("shardtcp.identify.preamble", project_imports(detect))

    def test_preamble_imports_alone(self) -> None:
        """A fresh interpreter can import preamble first, without detect being loaded."""
        code = (
            "import sys, shardtcp.identify.preamble as p; "
            "assert 'shardtcp.identify.detect' not in sys.modules; "
            "assert p.LineMethod(64).feed(b'SHARD api\\n').name == 'api'"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class AnswerProtocolTests(SynchronousTestCase):
    """The answering protocol is an enum whose members are their strings."""

    def test_members(self) -> None:
        """tls, http, line, none, equal to their string values."""
        self.assertEqual([p.value for p in AnswerProtocol], ["tls", "http", "line", "none"])
        self.assertEqual(AnswerProtocol.HTTP, "http")
        self.assertEqual(f"{AnswerProtocol.LINE}", "line")

    def test_converted(self) -> None:
        """Identified and IdentifyError turn strings into members and refuse others."""
        self.assertIs(Identified(method="line", protocol="line").protocol, AnswerProtocol.LINE)
        self.assertIs(IdentifyError("r", "m").protocol, AnswerProtocol.NONE)
        self.assertIs(IdentifyError("r", "m", "tls").protocol, AnswerProtocol.TLS)
        self.assertRaises(ValueError, IdentifyError, "r", "m", "smtp")
        self.assertRaises(ValueError, Identified, method="x", protocol="smtp")

    def test_detector_answers(self) -> None:
        """The detector's protocol is NONE while undecided, then the method's."""
        detector = Detector(["line", "http-host"])
        self.assertIs(detector.protocol, AnswerProtocol.NONE)
        self.assertIsNone(detector.feed(b"SHA"))
        self.assertIs(detector.protocol, AnswerProtocol.NONE)
        self.assertIsNone(detector.feed(b"RD "))
        self.assertIs(detector.protocol, AnswerProtocol.LINE)
        error = self.assertRaises(IdentifyError, Detector(["line"]).feed, b"\x00\x01")
        self.assertIs(error.protocol, AnswerProtocol.NONE)

    def test_reexported(self) -> None:
        """detect still offers the types the connection path imports from it."""
        self.assertIs(detect.Identified, Identified)
        self.assertIs(detect.IdentifyError, IdentifyError)
        self.assertIs(detect.IIdentifyMethod, IIdentifyMethod)


class DNSGrammarTests(SynchronousTestCase):
    """One DNS-name grammar, at both edges, asked by every parser."""

    def test_label_length(self) -> None:
        """A 63-character label is a label; 64 is not; an empty label is not."""
        self.assertTrue(is_dns_name("a" * 63 + ".test"))
        self.assertFalse(is_dns_name("a" * 64 + ".test"))
        self.assertFalse(is_dns_name("a..test"))
        self.assertFalse(is_dns_name(""))
        self.assertIn("not a DNS label", dns_name_problem("a" * 64 + ".test"))

    def test_name_length(self) -> None:
        """253 characters is a name; 254 is not."""
        longest = ".".join(["a" * 63] * 3 + ["a" * 61])
        self.assertEqual(len(longest), MAX_DNS_NAME)
        self.assertTrue(is_dns_name(longest))
        self.assertIsNone(dns_name_problem(longest))
        self.assertFalse(is_dns_name(longest + "a"))
        self.assertIn("longer than 253", dns_name_problem(longest + "a"))

    def test_characters(self) -> None:
        """Letters, digits, '_' and inner '-' only; no leading or trailing '-', no non-ASCII."""
        for good in ("a", "a-b", "_srv.example.test", "xn--bcher-kva.test", "1.2.3.4", "0"):
            self.assertTrue(is_dns_name(good), good)
            self.assertIsNone(dns_name_problem(good), good)
        for bad in ("-a", "a-", "a b", "a*", "bücher.test", "a.", ".a", "a:1", "\u0661"):
            self.assertFalse(is_dns_name(bad), bad)
            self.assertIsNotNone(dns_name_problem(bad), bad)
        self.assertIn("not ASCII", dns_name_problem("bücher.test"))
        self.assertIsNotNone(dns_name_problem(None))

    def test_parsers_agree(self) -> None:
        """
        The ClientHello parser, the preamble parser, the name table and the
        configured-name check accept and refuse the same host names.
        """
        longest = ".".join(["a" * 63] * 3 + ["a" * 61])
        samples = ["api.example.test", "a" * 63 + ".test", "a" * 64 + ".test", longest, longest + "a",
                   "-a.test", "a-.test", "_x.test", "a..test", "a b.test"]
        for host in samples:
            expected = is_dns_name(host)
            try:
                _host_name(host.encode())
                by_hello = True
            except ClientHelloError:
                by_hello = False
            try:
                parse_authority(host, require_port=False)
                by_preamble = True
            except ValueError:
                by_preamble = False
            by_config = valid_pattern(host) is None
            self.assertEqual((by_hello, by_preamble, by_config), (expected,) * 3, host)


class NamePortTests(SynchronousTestCase):
    """Ports in configured names are ASCII digits only (shardtcp.net.parse_port)."""

    def test_port_edges(self) -> None:
        """api:1 and api:65535 are names; api:0, api:65536, api:² and Arabic-Indic digits are not."""
        self.assertIsNone(valid_pattern("api.test:1"))
        self.assertIsNone(valid_pattern("api.test:65535"))
        for name in ("api.test:0", "api.test:65536", "api.test:\u00b2", "api.test:\u0669\u0660\u0660\u0661", "api.test:"):
            self.assertIsNotNone(valid_pattern(name), name)

    def test_table_keeps_ascii_ports(self) -> None:
        """
        A table built from 'api.test:9001' finds that name, not its
        Arabic-Indic spelling, and a 5,000-digit port selects nothing
        rather than raising.
        """
        table = NameTable([("svc", ["api.test:9001"])])
        self.assertEqual(table.lookup("api.test:9001"), "svc")
        self.assertIsNone(table.lookup("api.test:\u0669\u0660\u0660\u0661"))
        self.assertIsNone(table.lookup("api.test:" + "9" * 5000))

    def test_canonical_name(self) -> None:
        """canonical_name gives the table's form, and valid_pattern's reason when unusable."""
        from shardtcp.identify.names import canonical_name

        self.assertEqual(canonical_name("API.Example.Test."), "api.example.test")
        self.assertEqual(canonical_name("*.Example.test:0443"), "*.example.test:443")
        self.assertEqual(canonical_name("[2001:DB8::0:1]:8443"), "[2001:db8::1]:8443")
        self.assertEqual(canonical_name("2001:db8::1"), "[2001:db8::1]")
        for bad in ("a..b", "api.test:65536", "*", "a*.test", ""):
            e = self.assertRaises(ValueError, canonical_name, bad)
            self.assertEqual(str(e), valid_pattern(bad))
