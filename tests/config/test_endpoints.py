"""
Tests for ``shardtcp.config._endpoints``: endpoint strings read without
Twisted's private parser, ports as ASCII digits, ``ssl:`` files resolved
against the configuration's folder, and ports in use found before start-up.
"""

from __future__ import annotations

import os
import socket

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.config import ConfigError, listen_problems, parse_config
from shardtcp.config._endpoints import listen_problem, split_endpoint
from shardtcp.example.pki import CertificateAuthority
from tests.config.test_sections import minimal, no_size


class SplitTests(SynchronousTestCase):
    """split_endpoint reads the grammar serverFromString reads."""

    def test_same_as_twisted(self) -> None:
        """Arguments, keywords, escapes and '=' inside values land where Twisted puts them."""
        description = r"ssl:8443:privateKey=/a\:b/k.pem:interface=\:\:1:extraCertChain=x=y"
        parts = split_endpoint(description)
        self.assertEqual(parts.args, ["ssl", "8443"])
        self.assertEqual(
            parts.kw, {"privateKey": "/a:b/k.pem", "interface": "::1", "extraCertChain": "x=y"}
        )
        self.assertEqual(split_endpoint(parts.unparse()), parts)

    def test_trailing_backslash(self) -> None:
        """A trailing backslash is a ValueError (Twisted's parser raises RuntimeError)."""
        with self.assertRaises(ValueError):
            split_endpoint("tcp:80\\")

    def test_rewritten_description_builds(self) -> None:
        """An unparsed description still builds the same endpoint in Twisted."""
        parts = split_endpoint(r"tcp6:8080:interface=\:\:1")
        reactor = MemoryReactor()
        serverFromString(reactor, parts.unparse()).listen(object())
        [(port, _, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (8080, "::1"))


class _Config:
    def folder(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def problems(self, data: dict, folder: str, check_files: bool = True) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            parse_config(data, folder, check_files=check_files, token_size=no_size)
        return caught.exception.problems


class PortTests(_Config, SynchronousTestCase):
    """Ports in endpoint strings are ASCII digits, as shardtcp.net reads them."""

    def test_unicode_digits(self) -> None:
        """Arabic-Indic and superscript digits are not a port (int() would take the first)."""
        for port in ("٩٠٠١", "²", "9" * 5000):
            data = minimal()
            data["listener"][0]["listen"] = f"tcp:{port}:interface=127.0.0.1"
            [problem] = self.problems(data, self.folder(), check_files=False)
            self.assertTrue(problem.startswith("listener[0].listen: "), problem)
            self.assertIn("needs a port 0..65535", problem)
            self.assertNotIn("\n", problem)

    def test_edges(self) -> None:
        """0 and 65535 are ports, 65536 is not."""
        data = minimal()
        folder = self.folder()
        for good in ("tcp:0", "tcp:65535"):
            data["listener"][0]["listen"] = good
            parse_config(data, folder, check_files=False, token_size=no_size)
        data["listener"][0]["listen"] = "tcp:65536"
        [problem] = self.problems(data, folder, check_files=False)
        self.assertIn("out of range", problem)


class SSLTests(_Config, SynchronousTestCase):
    """ssl: endpoints read their files relative to the configuration, bounded."""

    def setUp(self) -> None:
        self.dir = self.folder()
        ca = CertificateAuthority()
        issued = ca.issue_server(["proxy.test"])
        os.makedirs(os.path.join(self.dir, "certs"))
        with open(os.path.join(self.dir, "certs", "admin.pem"), "wb") as f:
            f.write(issued.cert_pem + issued.key_pem)
        with open(os.path.join(self.dir, "hostname"), "w") as f:
            f.write("not a key\n")

    def config(self, listen: str):
        data = minimal()
        data["signing"]["private_key"] = "/dev/null"  # not what is tested here
        # An admin endpoint beyond loopback needs its token file.
        with open(os.path.join(self.dir, "admin.token"), "w") as f:
            f.write("t0ken\n")
        data["admin"] = {"listen": listen, "token_file": "admin.token"}
        return data

    def admin_problems(self, listen: str) -> list[str]:
        problems = self.problems(self.config(listen), self.dir)
        return [p for p in problems if p.startswith("admin.")]

    def test_relative_private_key(self) -> None:
        """privateKey=certs/admin.pem is the file beside the configuration, stored absolute."""
        data = self.config("ssl:0:privateKey=certs/admin.pem")
        data["signing"]["private_key"] = "keys/policy.pem"
        config = parse_config(data, self.dir, check_files=False, token_size=no_size)
        absolute = os.path.join(self.dir, "certs", "admin.pem").replace(":", "\\:")
        self.assertEqual(config.admin.listen, f"ssl:0:privateKey={absolute}")
        # The file is found although the working directory is elsewhere.
        self.assertNotEqual(os.getcwd(), self.dir)
        self.assertEqual(self.admin_problems("ssl:0:privateKey=certs/admin.pem"), [])

    def test_not_a_key(self) -> None:
        """A privateKey that is not PEM (OpenSSL.crypto.Error) is one line."""
        [problem] = self.admin_problems("ssl:0:privateKey=hostname")
        self.assertTrue(problem.startswith("admin.listen: not a Twisted server endpoint"), problem)
        self.assertNotIn("\n", problem)

    def test_unbounded_file(self) -> None:
        """privateKey=/dev/zero is refused before Twisted reads it."""
        [problem] = self.admin_problems("ssl:0:privateKey=/dev/zero")
        self.assertEqual(problem, "admin.listen: ssl privateKey: /dev/zero is not a regular file")

    def test_missing(self) -> None:
        """A missing certKey names the key and the absolute file."""
        [problem] = self.admin_problems("ssl:0:privateKey=certs/admin.pem:certKey=none.pem")
        self.assertIn("ssl certKey: cannot read " + os.path.join(self.dir, "none.pem"), problem)


class ListenTests(_Config, SynchronousTestCase):
    """check-config tries each port: a port in use is a problem before start-up."""

    def hold(self) -> int:
        held = socket.socket()
        self.addCleanup(held.close)
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        return held.getsockname()[1]

    def test_port_in_use(self) -> None:
        """A port another socket listens on is named with the OS error."""
        port = self.hold()
        problem = listen_problem(f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual(
            problem, f"cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use"
        )

    def test_free_port_is_released(self) -> None:
        """A free port passes, and is free again afterwards."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        self.assertIsNone(listen_problem(f"tcp:{port}:interface=127.0.0.1"))
        self.assertIsNone(listen_problem(f"tcp:{port}:interface=127.0.0.1"))

    def test_not_tried(self) -> None:
        """Port 0, unix sockets and systemd descriptors are not bound."""
        for description in ("tcp:0", "unix:/nonexistent/folder/s.sock", "systemd:domain=INET:index=0"):
            self.assertIsNone(listen_problem(description))

    def test_config_paths(self) -> None:
        """listen_problems names the listener or admin key."""
        port = self.hold()
        data = minimal()
        data["listener"][0]["listen"] = f"tcp:{port}:interface=127.0.0.1"
        data["admin"] = {"listen": f"tcp:{port}:interface=127.0.0.1"}
        config = parse_config(data, self.folder(), check_files=False, token_size=no_size)
        problems = listen_problems(config)
        self.assertEqual(
            [p.split(": ", 1)[0] for p in problems], ["listener[0].listen", "admin.listen"]
        )


class SamePortTests(_Config, SynchronousTestCase):
    """Two endpoints of one configuration on the same port."""

    def test_same_port_twice(self) -> None:
        """The second listener on a port is named, though each port alone is free."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        data = minimal()
        data["listener"].append({"name": "again", "listen": f"tcp:{port}:interface=127.0.0.1"})
        data["listener"][0]["listen"] = f"tcp:{port}:interface=127.0.0.1"
        config = parse_config(data, self.folder(), check_files=False, token_size=no_size)
        self.assertEqual(
            listen_problems(config), ["listener[1].listen: the same port as listener[0].listen"]
        )


class PublicTwistedOnlyTests(SynchronousTestCase):
    """The package builds endpoints through public Twisted APIs only."""

    def test_no_private_or_test_only_imports(self) -> None:
        """No module of shardtcp.config imports endpoints._parse or twisted.internet.testing."""
        import ast

        import shardtcp.config

        folder = os.path.dirname(shardtcp.config.__file__)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    imported = {a.name for a in node.names}
                    self.assertNotEqual(node.module, "twisted.internet.testing", name)
                    if node.module == "twisted.internet.endpoints":
                        self.assertEqual(
                            {n for n in imported if n.startswith("_")}, set(), name
                        )
