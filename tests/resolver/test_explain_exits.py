"""
``shardtcp explain``'s exit statuses as docs/resolver.rst states them:
0 for a ranking, 1 for a denied client, an unknown service or a bad
configuration, 2 for a --client that is not an IP address.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from tests.test_cli import GOOD, run_cli


class ExplainExitTests(SynchronousTestCase):
    """The exit statuses not covered by tests.test_cli."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_unknown_service_exits_1(self) -> None:
        """An unknown --service is one line on stderr naming it, and exit 1; a known one exits 0."""
        path = self.write("ok.toml", GOOD)
        status, out, err = run_cli("explain", "--config", path, "--service", "nope", "--client", "10.1.1.1")
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(err.strip().splitlines(), ["shardtcp explain: unknown service 'nope'"])
        status, _, _ = run_cli("explain", "--config", path, "--service", "api", "--client", "10.1.1.1")
        self.assertEqual(status, 0)

    def test_bad_configuration_exits_1(self) -> None:
        """A configuration that does not parse gives its problems on stderr and exit 1."""
        path = self.write("bad.toml", "[proxy\n")
        status, out, err = run_cli("explain", "--config", path, "--service", "api", "--client", "10.1.1.1")
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertIn("bad.toml", err)
