"""
``etc/shardtcp.service``: what docs/operations.rst promises of it, checked
by systemd's own ``systemd-analyze verify``, and its ``ExecStart`` command
run as it is written (twistd in the foreground, no pidfile, log on stdout).
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.e2e import harness as e2e

UNIT = os.path.join(e2e.REPO_ROOT, "etc", "shardtcp.service")
SYSUSERS = os.path.join(e2e.REPO_ROOT, "etc", "shardtcp.sysusers.conf")
INSTALLED_TWISTD = "/opt/shardtcp/bin/twistd"
INSTALLED_CONFIG = "/etc/shardtcp/shardtcp.toml"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    with open(UNIT) as f:
        parser.read_file(f)
    return parser


def _systemd_tool(name: str) -> str:
    """A systemd tool; its absence fails the test (Debian package ``systemd``)."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/bin:/bin")
    if found is None:
        raise AssertionError(f"{name} is not installed (Debian package systemd, see .ci/run)")
    return found


class UnitFileTests(SynchronousTestCase):
    """The unit's keys, as docs/operations.rst describes them."""

    def test_promised_keys(self) -> None:
        """
        Each key docs/operations.rst names has the value it says: twistd in
        the foreground without a pidfile, SIGHUP for reload, SIGTERM to
        stop, restarts on failure, and the hardening options.
        """
        service = _unit()["Service"]
        argv = shlex.split(service["ExecStart"])
        self.assertEqual(
            argv,
            [INSTALLED_TWISTD, "-n", "--pidfile=", "--logfile=-", "shardtcp", "--config", INSTALLED_CONFIG],
        )
        expected = {
            "Type": "simple",
            "User": "shardtcp",
            "Group": "shardtcp",
            "ExecReload": "/bin/kill -HUP $MAINPID",
            "KillSignal": "SIGTERM",
            "Restart": "on-failure",
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
            "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
            "LimitNOFILE": "1048576",
            "StateDirectory": "shardtcp",
            "LogsDirectory": "shardtcp",
            "ReadWritePaths": "/var/lib/shardtcp /var/log/shardtcp",
        }
        self.assertEqual({key: service.get(key) for key in expected}, expected)
        self.assertEqual(_unit()["Install"]["WantedBy"], "multi-user.target")

    def test_stop_timeout_above_drain_timeout(self) -> None:
        """
        TimeoutStopSec is above the default ``[proxy] drain_timeout`` (30 s),
        and the unit's comment says it must stay so.
        """
        from shardtcp.model import ProxyConfig

        seconds = int(_unit()["Service"]["TimeoutStopSec"])
        drain = ProxyConfig(id="x", location=None).drain_timeout
        self.assertEqual(drain, 30.0)
        self.assertGreater(seconds, drain)
        with open(UNIT) as f:
            self.assertIn("Must stay above [proxy] drain_timeout", f.read())

    def test_systemd_analyze_verify(self) -> None:
        """
        ``systemd-analyze verify`` finds nothing to say about the unit
        (with ExecStart pointing at this checkout's twistd, since it checks
        that the program exists), and does complain about a broken copy,
        so silence means the unit was read.
        """
        tool = _systemd_tool("systemd-analyze")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        with open(UNIT) as f:
            text = f.read()
        self.assertIn(INSTALLED_TWISTD, text)
        good = os.path.join(folder, "shardtcp.service")
        with open(good, "w") as f:
            f.write(text.replace(INSTALLED_TWISTD, e2e.twistd_binary()))
        result = subprocess.run([tool, "verify", good], capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))

        broken = os.path.join(folder, "broken.service")
        with open(broken, "w") as f:
            f.write(text.replace(INSTALLED_TWISTD, e2e.twistd_binary()).replace("ProtectHome=yes", "ProtectHome=maybe"))
        result = subprocess.run([tool, "verify", broken], capture_output=True, text=True, timeout=60)
        self.assertIn("Failed to parse protect home value", result.stderr)

    def test_sysusers_creates_the_user(self) -> None:
        """
        ``systemd-sysusers`` with ``etc/shardtcp.sysusers.conf`` (the
        command docs/operations.rst gives, here under a scratch root)
        creates the system user and group the unit runs as, with no login
        shell.
        """
        tool = _systemd_tool("systemd-sysusers")
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "etc"))
        result = subprocess.run([tool, f"--root={root}", SYSUSERS], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(os.path.join(root, "etc", "passwd")) as f:
            [entry] = [line.split(":") for line in f.read().splitlines() if line.startswith("shardtcp:")]
        self.assertEqual((entry[5], entry[6]), ("/var/lib/shardtcp", "/usr/sbin/nologin"))
        with open(os.path.join(root, "etc", "group")) as f:
            self.assertTrue(any(line.startswith("shardtcp:") for line in f))


class ExecStartTests(TestCase):
    """The unit's ExecStart command line, run as systemd would run it."""

    timeout = 90

    async def test_exec_start_runs(self) -> None:
        """
        The ExecStart argv (binary and configuration paths swapped for this
        test's) starts a proxy that accepts on its port, writes no pidfile
        in its working directory, logs to stdout, and stops on SIGTERM.
        """
        argv = shlex.split(_unit()["Service"]["ExecStart"])
        deployment = e2e.Deployment(self, reactor)
        deployment.add_shard("api-fra-1", e2e.FRANKFURT)
        workdir = os.path.join(deployment.directory, "run")
        os.makedirs(workdir)
        for attempt in range(5):
            port = e2e.free_port()
            config = deployment.write_config(port=port, name=f"unit-{attempt}.toml")
            run = [e2e.twistd_binary() if a == INSTALLED_TWISTD else config if a == INSTALLED_CONFIG else a for a in argv]
            child = e2e.spawn(self, run, cwd=workdir, timeout=60)
            if await e2e.wait_until_accepting(port, 20.0, lambda: not child.done):
                break
            if b"Address already in use" not in child.out + child.err:
                self.fail(f"ExecStart exited with {child.status}:\n{(child.out + child.err).decode(errors='replace')}")
        else:
            self.fail("no free port could be bound in five attempts")
        self.assertEqual(os.listdir(workdir), [])
        self.assertIn(b"shardtcp", child.out)
        await child.stop()
        self.assertIn(child.status, (0, -15))
        self.assertIn(b"Server Shut Down.", child.out)
