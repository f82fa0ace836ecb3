"""The ctl side: URLs from [admin].listen, the status summary, and ctl's usage errors."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from shardtcp.admin.client import AdminClientError, admin_url, format_status
from shardtcp.cli import main
from tests.admin.support import AdminFixture


class AdminURLTests(SynchronousTestCase):
    """admin_url."""

    def test_urls(self) -> None:
        """Interfaces are kept; wildcard interfaces are reached on loopback; ssl is https."""
        cases = {
            "tcp:9901:interface=127.0.0.1": "http://127.0.0.1:9901",
            "tcp:9901": "http://127.0.0.1:9901",
            "tcp:port=9902:interface=0.0.0.0": "http://127.0.0.1:9902",
            "tcp6:9901:interface=\\:\\:1": "http://[::1]:9901",
            "tcp6:9901": "http://[::1]:9901",
            "ssl:9443:privateKey=k.pem:interface=127.0.0.1": "https://127.0.0.1:9443",
        }
        for listen, url in cases.items():
            self.assertEqual(admin_url(listen), url, listen)

    def test_unix(self) -> None:
        """A UNIX socket endpoint asks for --admin."""
        with self.assertRaises(AdminClientError) as caught:
            admin_url("unix:/run/admin.sock")
        self.assertIn("give --admin URL for a unix endpoint", str(caught.exception))


class FormatStatusTests(SynchronousTestCase):
    """format_status."""

    def test_lines(self) -> None:
        """One line for the proxy, one per listener, one per service and one per shard."""
        admin = AdminFixture()
        admin.resolver.set_admin_state("api-nyc-1", "drain")
        text = format_status(admin.request("GET", "/status").json())
        lines = text.splitlines()
        self.assertEqual(lines[0], "serving; workers 1; registry static")
        self.assertEqual(lines[1], "listener edge tcp:8443:interface=127.0.0.1 (passthrough): 0 open, 0 accepted, 0 refused")
        self.assertEqual(lines[2], "service api: 1 of 2 in rotation")
        self.assertTrue(lines[3].startswith("  api-fra-1            healthy    -      0/10 open, weight 1"), lines[3])
        self.assertTrue(lines[4].startswith("  api-nyc-1            draining   drain  0/10 open"), lines[4])


class CtlUsageTests(SynchronousTestCase):
    """shardtcp ctl's own errors: one line, exit 1."""

    def run_ctl(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = main(["ctl", *argv])
        return status, out.getvalue(), err.getvalue()

    def test_errors(self) -> None:
        """Missing arguments, no URL, a bad URL, a bad weight, a missing config: exit 1 with one line."""
        missing = self.mktemp()
        cases = [
            (("drain",), "shardtcp ctl: usage: shardtcp ctl [--admin URL] [--token-file F] [--config PATH] drain ID\n"),
            (("weight", "a"), "shardtcp ctl: usage: shardtcp ctl [--admin URL] [--token-file F] [--config PATH] weight ID W\n"),
            (("status",), "shardtcp ctl: give --admin URL or --config PATH\n"),
            (("--admin", "ftp://x", "status"), "shardtcp ctl: --admin 'ftp://x' is not an http:// or https:// URL\n"),
            (("--admin", "http://127.0.0.1:1", "weight", "a", "heavy"), "shardtcp ctl: weight 'heavy' is not a number\n"),
            (("--admin", "http://127.0.0.1:1", "--token-file", missing, "drain", "a"), None),
            (("--config", missing, "status"), None),
        ]
        for argv, line in cases:
            status, out, err = self.run_ctl(*argv)
            self.assertEqual((status, out), (1, ""), argv)
            self.assertEqual(err.count("\n"), 1, argv)
            if line is not None:
                self.assertEqual(err, line, argv)
        self.assertIn("admin.token_file: cannot read", self.run_ctl(
            "--admin", "http://127.0.0.1:1", "--token-file", missing, "drain", "a")[2])
