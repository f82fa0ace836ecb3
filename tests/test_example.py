"""
The example a newcomer runs first: ``etc/shardtcp.toml``, ``shardtcp
init-example``, ``shardtcp example-shards``, the README's "Running it"
commands and the demo's printed ``twistd`` command, run as real processes
over loopback where the promise is about processes.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from typing import Callable, Optional

import jwt
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from shardtcp import keys as keymod
from shardtcp.cli import main
from shardtcp.config import load_config
from shardtcp.example import kit
from shardtcp.policy import PolicyContext, PolicySigner
from tests.e2e.harness import REPO_ROOT, free_port, twistd_binary

BIN = os.path.dirname(sys.executable)
EXAMPLE = os.path.join(REPO_ROOT, "etc", "shardtcp.toml")
README = os.path.join(REPO_ROOT, "README.rst")


def running_it_commands() -> list:
    """
    The shell commands of README.rst's "Running it" section, in order: the
    lines of its literal blocks that start with a command, without their
    trailing ``# comment``.
    """
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index("\nRunning it\n")
    end = text.index("\n----", start + 20)
    section = text[start:end]
    # Drop the heading line before the next section's underline.
    section = section[: section.rfind("\n")]
    commands = []
    for line in section.splitlines():
        if not line.startswith("    ") or line.startswith("     "):
            continue
        command = line.strip()
        if command.split(" ", 1)[0] not in ("shardtcp", "twistd", "curl"):
            continue
        command = re.sub(r"\s+#.*$", "", command)
        commands.append(command)
    return commands


def run_main(*argv: str) -> int:
    """``shardtcp ARGV`` in this process, its output swallowed; the exit status."""
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        return main(list(argv))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


class Processes:
    """Background processes of one test, logged to files, stopped at cleanup."""

    def __init__(self, case: SynchronousTestCase, folder: str, env: Optional[dict] = None) -> None:
        self.folder = folder
        self.env = env
        self.running: list = []
        case.addCleanup(self.stop_all)

    def start(self, name: str, argv: list) -> str:
        """Start ``argv`` in the folder; return the path of its combined output."""
        log_path = os.path.join(self.folder, f"{name}.log")
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                argv,
                cwd=self.folder,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.running.append(process)
        return log_path

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def program(name: str) -> str:
    """The path of ``name`` (shardtcp, twistd) next to the running interpreter."""
    if name == "twistd":
        return twistd_binary()
    return os.path.join(BIN, name)


class ExampleFilesTests(SynchronousTestCase):
    """init-example writes what etc/shardtcp.toml names, and the two agree."""

    def setUp(self):
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.config_path = os.path.join(self.folder, "shardtcp.toml")
        shutil.copyfile(EXAMPLE, self.config_path)
        self.assertEqual(run_main("init-example", self.folder), 0)
        self.config = load_config(self.config_path)

    def test_package_carries_the_example(self):
        """The configuration the package carries is etc/shardtcp.toml, byte for byte."""
        self.assertEqual(kit.example_config_text(), read(EXAMPLE))

    def test_init_example_writes_the_configuration_when_missing(self):
        """In an empty folder init-example writes shardtcp.toml too, and it is valid there."""
        folder = os.path.abspath(self.mktemp())
        self.assertEqual(run_main("init-example", folder), 0)
        self.assertEqual(read(os.path.join(folder, "shardtcp.toml")), read(EXAMPLE))
        self.assertEqual(run_main("check-config", os.path.join(folder, "shardtcp.toml")), 0)

    def test_shards_accept_the_proxy_tokens(self):
        """
        A token signed with the configured key and kid verifies against the
        keys/jwks.json the shards are given, for every shard (no
        ``unknown_kid``).
        """
        signer = PolicySigner(
            keymod.load_private_key(self.config.signing.private_key),
            kid=self.config.signing.kid,
            issuer=self.config.proxy.id,
            ttl=30,
            now=time.time,
        )
        keys = jwt.PyJWKSet.from_json(read(os.path.join(self.folder, "keys", "jwks.json")))
        by_kid = {key.key_id: key for key in keys.keys}
        self.assertIn(self.config.signing.kid, by_kid)
        for service in self.config.services:
            for shard in service.shards:
                token = signer.sign(
                    policy=PolicyContext("tls", ("none",), ()),
                    audience=shard.id,
                    connection_id="A" * 24,
                    service=service.id,
                    source=("127.0.0.1", 5000),
                    destination=("127.0.0.1", 8443),
                )
                kid = jwt.get_unverified_header(token)["kid"]
                claims = jwt.decode(token, by_kid[kid].key, algorithms=["EdDSA"], audience=shard.id)
                self.assertEqual(claims["aud"], shard.id)

    def test_listeners_take_local_clients(self):
        """
        No listener of the example waits for a PROXY header a local client
        never sends, and no service originates TLS to shards that the
        passthrough listener hands the client's own TLS.
        """
        for listener in self.config.listeners:
            self.assertFalse(listener.accept_proxy, listener.name)
        self.assertIn("passthrough", [listener.mode for listener in self.config.listeners])
        self.assertEqual([s.id for s in self.config.services if s.upstream_tls], [])

    def test_certificates_cover_what_clients_ask_for(self):
        """
        The terminate listener's certificates carry the names they are
        listed for, and each TLS shard's certificate carries its service's
        names (the client verifies it through the passthrough listener).
        """
        from cryptography import x509

        def names(path):
            cert = x509.load_pem_x509_certificate(open(path, "rb").read())
            return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName
            )

        for listener in self.config.listeners:
            for entry in listener.certificates:
                self.assertEqual(sorted(names(entry.cert)), sorted(entry.names))
        api = self.config.service("api")
        for shard in api.shards:
            found = names(os.path.join(self.folder, "certs", f"{shard.id}.pem"))
            for name in api.names:
                if ":" not in name:
                    self.assertIn(name, found)

    def test_health_checks_are_ones_the_reference_shards_answer(self):
        """Every configured health check is one a reference shard passes (tcp: no agent runs)."""
        kinds = {
            shard.id: shard.health_check.kind
            for service in self.config.services
            for shard in service.shards
            if shard.health_check is not None
        }
        self.assertEqual(set(kinds.values()), {"tcp"}, kinds)

    def test_plugin_hint(self):
        """The hint names the fix when twistd cannot see the plugin, and is silent when it can."""

        class Maker:
            tapname = "shardtcp"

        self.assertIsNone(kit.twistd_plugin_problem(plugins=lambda: [Maker()]))
        hint = kit.twistd_plugin_problem(plugins=lambda: [])
        self.assertIn("Unknown command: shardtcp", hint)
        self.assertIn("pip install -e .", hint)
        self.assertIsNone(kit.twistd_plugin_problem())


class ExampleShardsStartTests(SynchronousTestCase):
    """example-shards: what it listens on, and how it refuses to start."""

    def setUp(self):
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.config_path = os.path.join(self.folder, "shardtcp.toml")
        shutil.copyfile(EXAMPLE, self.config_path)

    def test_one_shard_per_configured_shard(self):
        """Each shard of the configuration listens on its address; TLS where init-example wrote its certificate."""
        from twisted.internet.testing import MemoryReactor

        run_main("init-example", self.folder)
        reactor = MemoryReactor()
        started = kit.start_example_shards(self.config_path, reactor)
        self.assertEqual([(s, tls) for s, _, tls in started], [("api-fra-1", True), ("api-ams-1", True), ("web-1", False)])
        self.assertEqual([(port, host) for port, _, _, host in reactor.tcpServers], [(9001, "127.0.0.1"), (9002, "127.0.0.1"), (8001, "127.0.0.1")])

    def test_without_init_example(self):
        """Before init-example, the error names the missing JWKS and the command that writes it."""
        from twisted.internet.testing import MemoryReactor

        with self.assertRaises(kit.ExampleShardsError) as caught:
            kit.start_example_shards(self.config_path, MemoryReactor())
        self.assertIn(f"run `shardtcp init-example {self.folder}` first", str(caught.exception))

    def test_port_in_use(self):
        """A port in use is one line naming the shard and address; ports already opened are closed."""
        from twisted.internet.error import CannotListenError
        from twisted.internet.testing import MemoryReactor

        run_main("init-example", self.folder)

        stopped = []

        class Port:
            def __init__(self, number):
                self.number = number

            def stopListening(self):
                stopped.append(self.number)

        class Busy(MemoryReactor):
            def listenTCP(self, port, factory, backlog=50, interface=""):
                if port == 9002:
                    raise CannotListenError(interface, port, OSError(98, "Address already in use"))
                return Port(port)

        with self.assertRaises(kit.ExampleShardsError) as caught:
            kit.start_example_shards(self.config_path, Busy())
        self.assertEqual(
            str(caught.exception), "shard api-ams-1: cannot listen on 127.0.0.1:9002: Address already in use"
        )
        self.assertEqual(stopped, [9001])


def rewrite_ports(text: str, ports: dict) -> str:
    """Replace each fixed port of the example (``ports`` maps old to new) wherever it appears."""
    return re.sub(r"\b(\d{4})\b", lambda m: str(ports.get(int(m.group(1)), m.group(1))), text)


class RunningItTests(SynchronousTestCase):
    """README's "Running it", command by command, through a real twistd."""

    timeout = 120

    def setUp(self):
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.base, "etc"))
        fixed = (8443, 9443, 9080, 9901, 9001, 9002, 8001)
        self.ports = {port: free_port() for port in fixed}
        with open(os.path.join(self.base, "etc", "shardtcp.toml"), "w") as f:
            f.write(rewrite_ports(read(EXAMPLE), self.ports))
        self.processes = Processes(self, self.base)

    def argv(self, command: str) -> list:
        """A README command as argv: ports rewritten, programs from this interpreter's folder."""
        words = shlex.split(rewrite_ports(command, self.ports))
        if words[-1] == "&":
            words.pop()
        if words[0] in ("shardtcp", "twistd"):
            words[0] = program(words[0])
        return words

    def test_every_client_command_gets_a_verified_connection(self):
        """
        In a fresh folder with a copy of etc/shardtcp.toml (ports moved to
        free ones): ``init-example``, ``example-shards`` in the background,
        ``twistd -n shardtcp`` in the foreground; then every curl command of
        "Running it" prints the shard's verified line (``SHARD <id> ...
        service=...``) and each shard logs one accepted connection per
        command.
        """
        commands = running_it_commands()
        setup = [c for c in commands if not c.startswith("curl ")]
        clients = [c for c in commands if c.startswith("curl ")]
        self.assertEqual(
            [c.split()[:2] for c in setup[:3]],
            [["shardtcp", "init-example"], ["shardtcp", "example-shards"], ["twistd", "-n"]],
            setup,
        )
        self.assertGreaterEqual(len(clients), 4, clients)
        done = subprocess.run(self.argv(setup[0]), cwd=self.base, capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        shards_log = self.processes.start("shards", self.argv(setup[1]))
        wait_until(lambda: read(shards_log).count(" listening on ") == 3, 30, f"shards: {shards_log}")
        proxy_log = self.processes.start("proxy", self.argv(setup[2]))
        for old in (8443, 9443, 9080):
            wait_until(lambda: accepting(self.ports[old]), 30, f"proxy port {old}: {proxy_log}")
        for command in clients:
            done = subprocess.run(self.argv(command), cwd=self.base, capture_output=True, timeout=30)
            out = done.stdout.decode(errors="replace")
            self.assertEqual(done.returncode, 0, f"{command}\n{out}\n{done.stderr.decode(errors='replace')}")
            self.assertRegex(out, r"^SHARD [a-z0-9-]+ client=127\.0\.0\.1:\d+ service=\w+ ", command)
        wait_until(
            lambda: len(re.findall(r"shard \S+ accepted ", read(shards_log))) == len(clients),
            10,
            f"one accepted line per client command in {shards_log}",
        )


class DemoTests(SynchronousTestCase):
    """The demo's printed twistd command works while the demo runs."""

    timeout = 120

    def test_printed_twistd_command_runs_beside_the_demo(self):
        """
        ``shardtcp demo --port 0`` prints a ``twistd -n shardtcp`` command;
        run while the demo runs, that proxy starts, listens on the port the
        demo printed, and routes a TLS client to a demo shard that verifies
        the connection.
        """
        from shardtcp.example.demo import probe

        base = os.path.abspath(self.mktemp())
        workdir = os.path.join(base, "work")
        os.makedirs(base)
        processes = Processes(self, base)
        demo_log = processes.start("demo", [program("shardtcp"), "demo", "--port", "0", "--workdir", workdir])
        wait_until(lambda: "Press Ctrl-C" in read(demo_log), 60, f"the demo: {demo_log}")
        text = read(demo_log)
        command = re.search(r"^\s+(twistd -n shardtcp --config \S+)\s*$", text, re.M)
        self.assertIsNotNone(command, text)
        port = int(re.search(r"a second proxy, on 127\.0\.0\.1:(\d+)", text).group(1))
        argv = shlex.split(command.group(1))
        proxy_log = processes.start("proxy", [program("twistd")] + argv[1:])
        wait_until(lambda: accepting(port), 30, f"the printed twistd command: {proxy_log}")
        line = probe(port, os.path.join(workdir, "certs", "ca.pem"))
        self.assertRegex(line, r"^SHARD api-[a-z]+-1 client=127\.0\.0\.1:\d+ service=api ")


_INSTALLED = r"""
import os, sys
checkout = os.path.realpath(sys.argv[1])
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != checkout]
import shardtcp
assert os.path.realpath(shardtcp.__file__).startswith(os.path.realpath(sys.argv[2])), shardtcp.__file__
from shardtcp.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _ignore_build_litter(directory, names):
    return {
        n
        for n in names
        if n in (".git", ".venv", "build", "dist", "__pycache__", ".hypothesis", "dropin.cache")
        or n.endswith(".egg-info")
        or n.startswith("_trial_temp")
    }


class InstalledExampleTests(SynchronousTestCase):
    """An installed copy (no checkout at hand) produces a working example."""

    timeout = 300

    def copy_checkout(self) -> str:
        source = os.path.join(os.path.abspath(self.mktemp()), "source")
        shutil.copytree(REPO_ROOT, source, ignore=_ignore_build_litter)
        return source

    def pip(self, *args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "--no-input", "--disable-pip-version-check", *args],
            capture_output=True,
            timeout=240,
        )
        if done.returncode != 0:
            text = (done.stdout + done.stderr).decode(errors="replace")
            if "No matching distribution found for setuptools" in text or "Could not fetch URL" in text:
                raise SkipTest(f"pip cannot fetch the build backend (offline?):\n{text[-2000:]}")
            self.fail(f"pip {' '.join(args)} failed:\n{text}")

    def test_installed_copy_writes_a_valid_example(self):
        """
        From a ``pip install --target`` copy, run elsewhere with the checkout
        off ``sys.path``: ``init-example DIR`` writes DIR/shardtcp.toml and
        its files, ``check-config`` calls it valid, and ``example-shards``
        starts the shards it names.
        """
        source = self.copy_checkout()
        target = os.path.join(os.path.dirname(source), "installed")
        self.pip("install", "--no-deps", "--target", target, source)
        elsewhere = os.path.join(os.path.dirname(source), "elsewhere")
        os.makedirs(elsewhere)
        env = dict(os.environ, PYTHONPATH=target)

        def shardtcp(*argv):
            return subprocess.run(
                [sys.executable, "-c", _INSTALLED, REPO_ROOT, target, *argv],
                cwd=elsewhere,
                env=env,
                capture_output=True,
                timeout=60,
            )

        done = shardtcp("init-example", "example")
        self.assertEqual(done.returncode, 0, done.stderr)
        config = os.path.join(elsewhere, "example", "shardtcp.toml")
        self.assertEqual(read(config), read(EXAMPLE))
        with open(config, "w") as f:
            f.write(rewrite_ports(read(EXAMPLE), {p: free_port() for p in (9001, 9002, 8001)}))
        done = shardtcp("check-config", config)
        self.assertEqual(done.returncode, 0, done.stderr)
        processes = Processes(self, elsewhere, env)
        log = processes.start("shards", [sys.executable, "-c", _INSTALLED, REPO_ROOT, target, "example-shards", "--config", config])
        wait_until(lambda: read(log).count(" listening on ") == 3, 30, f"shards: {log}")

    def test_plain_editable_install_gives_twistd_the_plugin(self):
        """
        A plain ``pip install -e .`` (no compat mode) into a fresh
        environment lets twistd, started in another folder, find
        ``shardtcp``: ``twistd shardtcp --help`` lists ``--config``.
        """
        source = self.copy_checkout()
        base = os.path.dirname(source)
        env_dir = os.path.join(base, "env")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True, timeout=60)
        python = os.path.join(env_dir, "bin", "python")
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            check=True,
        ).stdout.decode().strip()
        # The dependencies come from this environment's site-packages, as a
        # plain path: .pth files in it (this checkout's own install) are not
        # processed from there.
        import twisted

        with open(os.path.join(site, "deps.pth"), "w") as f:
            f.write(os.path.dirname(os.path.dirname(twisted.__file__)) + "\n")
        self.pip("--python", python, "install", "--no-deps", "-e", source)
        elsewhere = os.path.join(base, "elsewhere")
        os.makedirs(elsewhere)
        done = subprocess.run(
            [python, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
             "shardtcp", "--help"],
            cwd=elsewhere,
            capture_output=True,
            timeout=60,
        )
        text = (done.stdout + done.stderr).decode(errors="replace")
        self.assertEqual(done.returncode, 0, text)
        self.assertIn("--config", text)
