"""
Reload and graceful stop of a real ``twistd shardtcp`` process, driven by
real signals: SIGHUP ten times under a client loop, a bad file on SIGHUP,
SIGTERM with downloads in flight (long and short ``drain_timeout``), and a
daemonised twistd with a pidfile and a log file (SIGHUP, SIGUSR1, SIGTERM).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading
import time

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from shardtcp.example.shard import pattern_sha256
from tests.e2e import harness as e2e
from tests.e2e.harness import Deployment, parse_hello

MIB = 1024 * 1024


def _config(deployment: Deployment, port: int, shards, *, drain: str = "30s") -> str:
    """
    A plain ``SHARD <service>`` listener on ``port`` and service ``api``
    with (id, weight, extra) shards.  The service ranks by security score
    alone (all equal): measured connect times on loopback would otherwise
    put one shard ahead of the draw's band by chance, and shard weights
    only share connections among shards within it.
    """
    text = (
        f'[proxy]\nid = "edge-life"\ndrain_timeout = "{drain}"\n'
        f'[signing]\nprivate_key = "{deployment.private_key}"\nkid = "policy-1"\n'
        f'[[listener]]\nname = "edge"\nlisten = "tcp:{port}:interface=127.0.0.1"\nmode = "plain"\n'
        'identify = ["line"]\nconnect_timeout = "2s"\n'
        '[service.api]\nnames = ["api.example.test"]\n'
        "[service.api.weights]\nlatency = 0.0\nsecurity = 1.0\nload = 0.0\n"
    )
    for shard_id, weight, extra in shards:
        text += (
            f'[[service.api.shard]]\nid = "{shard_id}"\naddress = "127.0.0.1:{deployment.shards[shard_id].port}"\n'
            f'weight = {weight}\nslow_start = "0s"\n{extra}\n'
        )
    return text


def _write(path: str, text: str) -> None:
    # Written aside and renamed, as an operator's tooling would: a SIGHUP
    # never reads half a file.
    with open(path + ".new", "w") as f:
        f.write(text)
    os.replace(path + ".new", path)


def _one_connection(port: int) -> str:
    """Open a connection, name the service, return the shard id of the hello line."""
    data = e2e.exchange_until_close(port, b"SHARD api\r\n", timeout=10)
    return parse_hello(data.split(b"\n", 1)[0])["shard"]


class _Twistd(TestCase):
    timeout = 120

    async def start(self, deployment: Deployment, shards, *, drain: str = "30s", daemon: bool = False):
        """
        Start ``twistd [-n] shardtcp`` on a free port (retrying when another
        process takes it first); return (child, port, config path).
        """
        twistd = e2e.twistd_binary()
        path = os.path.join(deployment.directory, "shardtcp.toml")
        for attempt in range(5):
            port = e2e.free_port()
            _write(path, _config(deployment, port, shards, drain=drain))
            pidfile = os.path.join(deployment.directory, "twistd.pid")
            argv = [twistd] + ([] if daemon else ["-n"])
            argv += ["--pidfile", pidfile]
            if daemon:
                argv += ["--logfile", os.path.join(deployment.directory, "twistd.log")]
            argv += ["shardtcp", "--config", path]
            child = e2e.spawn(self, argv, cwd=deployment.directory, timeout=100)
            if daemon:
                status = await child.ended
                self.assertEqual(status, 0, (child.out + child.err).decode(errors="replace"))
                pid = await self.daemon_pid(pidfile)
                alive = lambda: _alive(pid)  # noqa: E731
            else:
                alive = lambda: not child.done  # noqa: E731
            if await e2e.wait_until_accepting(port, 20.0, alive):
                return child, port, path
            output = (child.out + child.err).decode(errors="replace")
            if daemon:
                output += _read(os.path.join(deployment.directory, "twistd.log"))
            if "Address already in use" not in output:
                self.fail(f"twistd did not start:\n{output}")
        self.fail("no free port could be bound in five attempts")

    async def daemon_pid(self, pidfile: str) -> int:
        self.assertTrue(await e2e.wait_for(lambda: _read(pidfile).strip().isdigit(), 10.0), "no pidfile")
        pid = int(_read(pidfile))

        def kill_leftover() -> None:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

        self.addCleanup(kill_leftover)
        return pid

    async def wait_output(self, child, text: bytes, count: int = 1, timeout: float = 15.0) -> None:
        ok = await e2e.wait_for(lambda: (child.out + child.err).count(text) >= count or child.done, timeout)
        output = (child.out + child.err).decode(errors="replace")
        # Without the per-connection lines: the rest says what went wrong.
        shown = "\n".join(l for l in output.splitlines() if "shardtcp.connection" not in l)
        self.assertTrue(ok and (child.out + child.err).count(text) >= count, f"no {count}x {text!r} in:\n{shown[-3000:]}")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaps counts as gone)."""
    state = _read(f"/proc/{pid}/status")
    if not state:
        return False
    match = re.search(r"^State:\s+(\S)", state, re.M)
    return match is not None and match.group(1) != "Z"


class ReloadTests(_Twistd):
    """SIGHUP to ``twistd -n shardtcp``."""

    async def test_ten_reloads_under_load(self):
        """
        Ten SIGHUPs while a client loop opens connections back to back: not
        one connection fails, every reload is logged, and each new weight
        takes effect at once: after reload i the shard weighted 20 against 1
        (A on odd i, B on even i) takes at least 75 % of the connections
        (about 95 % expected), and after the tenth, which adds shard C at
        20 against A and B at 1, C, never reached before, takes them.
        """
        deployment = Deployment(self, reactor)
        for shard_id in ("api-a", "api-b", "api-c"):
            deployment.add_plain_shard(shard_id, behaviour="source:0")
        child, port, path = await self.start(deployment, [("api-a", 1.0, ""), ("api-b", 1.0, "")])

        results: list = []  # (started, shard id or error, ended)
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    shard = _one_connection(port)
                except Exception as e:
                    shard = f"error: {e!r}"
                results.append((started, shard, time.monotonic()))

        running = deferToThread(loop)
        phases = []  # (reload applied at, next SIGHUP sent at, expected shard)
        try:
            for i in range(1, 11):
                if i == 10:
                    shards, expected = [("api-a", 1.0, ""), ("api-b", 1.0, ""), ("api-c", 20.0, "")], "api-c"
                elif i % 2:
                    shards, expected = [("api-a", 20.0, ""), ("api-b", 1.0, "")], "api-a"
                else:
                    shards, expected = [("api-a", 1.0, ""), ("api-b", 20.0, "")], "api-b"
                _write(path, _config(deployment, port, shards))
                sent = time.monotonic()
                if phases:
                    phases[-1][1] = sent
                child.signal("HUP")
                await self.wait_output(child, b"configuration reloaded from", count=i)
                applied = time.monotonic()
                phases.append([applied, None, expected])
                await e2e.wait_for(lambda: sum(1 for r in list(results) if r[0] > applied) >= 20, 15.0)
        finally:
            stop.set()
            await running
        phases[-1][1] = time.monotonic()
        failures = [r for r in results if r[1].startswith("error")]
        self.assertEqual(failures, [])
        self.assertGreater(len(results), 200)
        for applied, until, expected in phases:
            served = [shard for started, shard, _ in results if applied < started and started + 0.001 < until]
            self.assertGreaterEqual(len(served), 20, (applied, until, expected))
            self.assertGreaterEqual(served.count(expected), 0.75 * len(served), (expected, served))
        # Every connection that was over before the tenth SIGHUP was sent (one
        # still opening then may already be routed by the new file).
        before_c = [shard for _, shard, ended in results if ended < phases[-2][1]]
        self.assertGreater(len(before_c), 150)
        self.assertNotIn("api-c", before_c)
        output = (child.out + child.err).decode(errors="replace")
        self.assertIn("shards added api-c", output)
        self.assertNotIn("Traceback", output)
        self.assertFalse(child.done)

    async def test_bad_file_keeps_running(self):
        """
        SIGHUP with a broken file: the proxy logs the problem line (naming
        the key) and that it runs on, stays alive and keeps serving on the
        previous configuration; SIGINT then stops it with exit status 0.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        child, port, path = await self.start(deployment, [("api-a", 1.0, "")])
        with open(path, "a") as f:
            f.write('[[service.api.shard]]\nid = "api-x"\naddress = "no port here"\n')
        child.signal("HUP")
        await self.wait_output(child, b"configuration not reloaded")
        output = (child.out + child.err).decode(errors="replace")
        self.assertRegex(output, r"reload refused: service\.api\.shard\[1\]\.address: ")
        self.assertFalse(child.done)
        self.assertEqual(await deferToThread(_one_connection, port), "api-a")
        # Ctrl-C stops it as gracefully as SIGTERM does.
        child.signal("INT")
        self.assertEqual(await child.ended, 0)
        self.assertIn(b"SIGINT: stopping gracefully", child.out)


def _download(port: int, size: int, chunk_delay: float, results: list, connected: threading.Event) -> None:
    """
    Read a ``source:N`` download through the proxy at a bounded pace;
    append (shard, payload bytes, sha256 hex, how it ended).
    """
    digest = hashlib.sha256()
    count = 0
    head = b""
    shard = None
    how = "eof"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(b"SHARD api\r\n")
            while True:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    how = "reset"
                    break
                if not data:
                    break
                if shard is None:
                    head += data
                    if b"\n" not in head:
                        continue
                    line, data = head.split(b"\n", 1)
                    shard = parse_hello(line)["shard"]
                    connected.set()
                digest.update(data)
                count += len(data)
                time.sleep(chunk_delay)
    except Exception as e:
        how = f"error: {e!r}"
    results.append((shard, count, digest.hexdigest(), how))


class DrainTests(_Twistd):
    """SIGTERM to ``twistd -n shardtcp`` with ten downloads in flight."""

    async def downloads(self, drain: str, size: int, chunk_delay: float):
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour=f"source:{size}")
        child, port, _ = await self.start(deployment, [("api-a", 1.0, "")], drain=drain)
        results: list = []
        events = [threading.Event() for _ in range(10)]
        running = [deferToThread(_download, port, size, chunk_delay, results, ev) for ev in events]
        self.assertTrue(await e2e.wait_for(lambda: all(ev.is_set() for ev in events), 20.0), "downloads did not start")
        sent = time.monotonic()
        child.signal("TERM")
        # The listener closes at once: a new connection is refused.
        refused = await e2e.wait_for(lambda: _refused(port), 5.0)
        for d in running:
            await d
        await child.ended
        elapsed = time.monotonic() - sent
        return child, results, refused, elapsed

    async def test_downloads_complete_within_drain_timeout(self):
        """
        With drain_timeout 30 s, ten 20 MiB downloads (about 2 s each at the
        clients' pace) in flight at SIGTERM all complete with every byte
        (count and SHA-256), a new connection during the drain is refused,
        and twistd exits 0 having logged 10 finished, 0 closed.
        """
        size = 20 * MIB
        child, results, refused, elapsed = await self.downloads("30s", size, 0.004)
        output = (child.out + child.err).decode(errors="replace")
        self.assertTrue(refused, "a new connection was accepted during the drain")
        self.assertEqual(len(results), 10)
        for shard, count, digest, how in results:
            self.assertEqual((shard, count, digest, how), ("api-a", size, pattern_sha256(size), "eof"))
        self.assertEqual(child.status, 0, output)
        self.assertRegex(output, r"drained: 1\d connections finished, 0 closed")
        self.assertNotIn("closed by shutdown", output)
        self.assertNotIn("Traceback", output)

    async def test_short_drain_cuts_at_deadline(self):
        """
        With drain_timeout 1 s and downloads that would take about 20 s,
        every download is cut short after about 1 s (not before, and well
        before they could finish), each connection is logged as closed by
        shutdown, the summary counts 10 closed, and twistd exits 0.
        """
        size = 20 * MIB
        child, results, refused, elapsed = await self.downloads("1s", size, 0.05)
        output = (child.out + child.err).decode(errors="replace")
        self.assertTrue(refused)
        self.assertEqual(len(results), 10)
        for shard, count, digest, how in results:
            self.assertEqual(shard, "api-a")
            self.assertLess(count, size)
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 8.0)
        self.assertEqual(output.count("close=shutdown"), 10, output[-3000:])
        self.assertRegex(output, r"drained: \d+ connections finished, 10 closed")
        self.assertEqual(child.status, 0, output)


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # Queued on the listening socket as it closed: not yet a plain
        # refusal; the next try tells.
        return False


class DaemonTests(_Twistd):
    """``twistd shardtcp`` daemonised, with a pidfile and a log file."""

    async def test_hup_usr1_term(self):
        """
        The daemon survives SIGHUP (and reloads); after the log file is
        moved away, SIGUSR1 makes it write to a new file at the same path;
        SIGTERM stops it and removes its pidfile.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        _, port, _ = await self.start(deployment, [("api-a", 1.0, "")], daemon=True)
        directory = deployment.directory
        pidfile = os.path.join(directory, "twistd.pid")
        logfile = os.path.join(directory, "twistd.log")
        pid = int(_read(pidfile))

        os.kill(pid, signal.SIGHUP)
        self.assertTrue(await e2e.wait_for(lambda: "configuration reloaded" in _read(logfile), 10.0), _read(logfile))
        self.assertTrue(_alive(pid))
        self.assertEqual(await deferToThread(_one_connection, port), "api-a")

        os.rename(logfile, logfile + ".old")
        os.kill(pid, signal.SIGUSR1)
        self.assertTrue(await e2e.wait_for(lambda: "log file" in _read(logfile), 10.0), _read(logfile + ".old")[-2000:])
        os.kill(pid, signal.SIGHUP)
        self.assertTrue(await e2e.wait_for(lambda: "configuration reloaded" in _read(logfile), 10.0))
        self.assertEqual(_read(logfile + ".old").count("configuration reloaded"), 1)

        os.kill(pid, signal.SIGTERM)
        self.assertTrue(await e2e.wait_for(lambda: not os.path.exists(pidfile), 15.0), _read(logfile)[-2000:])
        self.assertTrue(await e2e.wait_for(lambda: not _alive(pid), 10.0))
        log = _read(logfile)
        self.assertIn("drained: 0 connections finished, 0 closed", log)
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)


class DaemonBindFailureTests(_Twistd):
    """A daemonising twistd whose listener cannot bind."""

    async def test_port_in_use_one_line_no_traceback(self):
        """
        With the listener's port held by another socket, ``twistd shardtcp``
        (daemonising) exits 1 and prints the listener, the endpoint and the
        reason; its log file has that line once and no traceback, and no
        pidfile is left behind.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        path = os.path.join(deployment.directory, "shardtcp.toml")
        _write(path, _config(deployment, port, [("api-a", 1.0, "")]))
        pidfile = os.path.join(deployment.directory, "twistd.pid")
        logfile = os.path.join(deployment.directory, "twistd.log")
        argv = [e2e.twistd_binary(), "--pidfile", pidfile, "--logfile", logfile, "shardtcp", "--config", path]
        child = e2e.spawn(self, argv, cwd=deployment.directory, timeout=60)
        status = await child.ended
        output = (child.out + child.err).decode(errors="replace")
        self.assertEqual(status, 1, output)
        expected = f"listener 'edge': cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use"
        self.assertIn(expected, output)
        self.assertTrue(await e2e.wait_for(lambda: "not starting" in _read(logfile), 10.0), _read(logfile))
        log = _read(logfile)
        self.assertEqual(log.count(expected + "; not starting"), 1, log)
        self.assertNotIn("Traceback", log)
        self.assertFalse(os.path.exists(pidfile))
