"""
``[proxy] workers = 2`` with a real ``twistd -n shardtcp``: a supervisor
and two worker processes on one shared accept queue, reaching verifying
shards; a worker killed and replaced; capacity counted across workers; a
rolling reload on SIGHUP; a graceful stop on SIGTERM; ``/status`` and
``/metrics`` over both workers.

Which worker takes a connection is up to the kernel, so the tests that
need a given worker stop the other one (SIGSTOP): the connection then
waits in the shared queue for the one still running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.e2e import harness as e2e
from tests.e2e.harness import Deployment, parse_hello


TOKEN = "workers-admin-token"


def _config(deployment: Deployment, port: int, admin_port: int, shards, *, drain: str = "30s") -> str:
    """A plain ``SHARD <service>`` listener, the admin API and (id, weight, extra) shards of ``api``."""
    text = (
        f'[proxy]\nid = "edge-workers"\nworkers = 2\ndrain_timeout = "{drain}"\n'
        f'[signing]\nprivate_key = "{deployment.private_key}"\nkid = "policy-1"\n'
        f'[admin]\nlisten = "tcp:{admin_port}:interface=127.0.0.1"\ntoken_file = "admin.token"\n'
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
    with open(path + ".new", "w") as f:
        f.write(text)
    os.replace(path + ".new", path)


def _one_connection(port: int) -> str:
    """Open a connection, name the service, return the shard id of the verified hello line, close."""
    sock, shard = _held(port)
    sock.close()
    return shard


def _held(port: int) -> tuple:
    """A connection left open: (socket, shard id of its hello line)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"SHARD api\r\n")
    head = b""
    while b"\n" not in head:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"closed before the hello line: {head!r}")
        head += data
    return sock, parse_hello(head.split(b"\n", 1)[0])["shard"]


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = f.read()
    except OSError:
        return False
    match = re.search(r"^State:\s+(\S)", state, re.M)
    return match is not None and match.group(1) != "Z"


class WorkersTests(TestCase):
    timeout = 120

    async def start(self, deployment: Deployment, shards, *, drain: str = "30s"):
        """Start ``twistd -n shardtcp`` with two workers; (child, port, admin port, path) once both are ready."""
        twistd = e2e.twistd_binary()
        path = os.path.join(deployment.directory, "shardtcp.toml")
        with open(os.path.join(deployment.directory, "admin.token"), "w") as f:
            f.write(TOKEN + "\n")
        for attempt in range(5):
            port, admin_port = e2e.free_port(), e2e.free_port()
            _write(path, _config(deployment, port, admin_port, shards, drain=drain))
            argv = [twistd, "-n", "--pidfile", os.path.join(deployment.directory, "twistd.pid"),
                    "shardtcp", "--config", path]
            child = e2e.spawn(self, argv, cwd=deployment.directory, timeout=100)
            self._pids = set()
            self.addCleanup(self._kill_workers)
            if await e2e.wait_until_accepting(admin_port, 20.0, lambda: not child.done):
                self.child, self.admin_port = child, admin_port
                await self.wait_workers(2)
                return child, port, admin_port, path
            if "Address already in use" not in (child.out + child.err).decode(errors="replace"):
                self.fail(f"twistd did not start:\n{(child.out + child.err).decode(errors='replace')}")
        self.fail("no free port could be bound in five attempts")

    _pids: set = set()

    def _kill_workers(self) -> None:
        for pid in self._pids:
            if _alive(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)

    async def status(self) -> dict:
        document = json.loads(await deferToThread(_get, self.admin_port, "/status"))
        self._pids = set(self._pids) | {w["pid"] for w in document["workers"] if w["pid"]}
        return document

    async def wait_workers(self, count: int, predicate=lambda workers: True, timeout: float = 20.0) -> list:
        """The ``workers`` of /status once ``count`` are ready and ``predicate(workers)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            workers = (await self.status())["workers"]
            ready = [w for w in workers if w["state"] == "ready"]
            if len(ready) == count and len(workers) == count and predicate(workers):
                return workers
            if time.monotonic() > deadline:
                self.fail(f"workers not as expected: {workers}\n{self.output()[-3000:]}")
            await e2e.wait_for(lambda: False, 0.1)

    def output(self) -> str:
        return (self.child.out + self.child.err).decode(errors="replace")

    async def through(self, pid: int, others: list, call, *args):
        """Run ``call(*args)`` in a thread while every worker of ``others`` is stopped (SIGSTOP)."""
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            return await deferToThread(call, *args)
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)

    async def test_both_workers_serve_and_are_counted(self):
        """
        With each worker stopped in turn, a connection still reaches a
        verified shard (the other worker took it from the shared queue);
        one connection held through each worker shows in /status as one
        open connection per worker pid and a shard load of 2; /metrics sums
        the workers' accepted connections (4) under one sample.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="hello")
        child, port, admin_port, _ = await self.start(deployment, [("api-a", 1.0, "")])
        workers = await self.wait_workers(2)
        pids = [w["pid"] for w in workers]
        self.assertEqual(len(set(pids)), 2)
        self.assertTrue(all(_alive(p) for p in pids))
        self.assertEqual(await self.through(pids[0], [pids[1]], _one_connection, port), "api-a")
        self.assertEqual(await self.through(pids[1], [pids[0]], _one_connection, port), "api-a")
        first, _ = await self.through(pids[0], [pids[1]], _held, port)
        second, _ = await self.through(pids[1], [pids[0]], _held, port)
        try:
            await self.wait_workers(2, lambda ws: sorted(w["open_connections"] for w in ws) == [1, 1])
            status = await self.status()
            self.assertEqual(status["services"]["api"]["shards"]["api-a"]["open_connections"], 2)
            metrics = (await deferToThread(_get, admin_port, "/metrics")).decode()
            accepted = [l for l in metrics.splitlines() if l.startswith('shardtcp_connections_accepted_total{listener="edge"}')]
            self.assertEqual(accepted, ['shardtcp_connections_accepted_total{listener="edge"} 4.0'])
        finally:
            first.close()
            second.close()

    async def test_killed_worker_is_replaced(self):
        """
        kill -9 of one worker while a client loop runs: /status shows a new
        pid for its index with one restart, /metrics counts it, the summed
        accepted connections are not lower than just before the kill (and
        lack at most 5 of all the loop made), and no connection of the loop
        failed.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        child, port, admin_port, _ = await self.start(deployment, [("api-a", 1.0, "")])
        workers = await self.wait_workers(2)
        victim = workers[0]
        results: list = []
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
        try:
            await e2e.wait_for(lambda: len(results) >= 20, 10.0)
            asked = len(results)
            before = _accepted((await deferToThread(_get, admin_port, "/metrics")).decode())
            killed = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)
            # Connections made while that reading was taken: the killed
            # worker's share of them may be missing from every later sum.
            unread = len(results) - asked + 1
            replaced = await self.wait_workers(
                2, lambda ws: victim["pid"] not in [w["pid"] for w in ws] and any(w["restarts"] == 1 for w in ws)
            )
            count = len(results)
            await e2e.wait_for(lambda: len(results) >= count + 20, 10.0)
        finally:
            stop.set()
            await running
        # Only a connection the killed worker held (open at the kill) may have failed.
        failed = [r for r in results if r[1].startswith("error")]
        self.assertEqual([r for r in failed if not r[0] <= killed <= r[2]], [])
        self.assertLessEqual(len(failed), 1)
        self.assertGreater(len(results), 40)
        self.assertEqual({w["index"]: w["restarts"] for w in replaced}, {victim["index"]: 1, 1 - victim["index"]: 0})
        metrics = (await deferToThread(_get, admin_port, "/metrics")).decode()
        self.assertIn(f'shardtcp_worker_restarts_total{{index="{victim["index"]}"}} 1.0', metrics)
        # The dead worker's counts up to the last scrape (the /metrics just
        # before the kill) stay in the sum: only those it accepted between
        # that scrape and the kill can be missing from every connection made.
        self.assertGreaterEqual(before, 20)
        self.assertGreaterEqual(_accepted(metrics), before)
        self.assertGreaterEqual(_accepted(metrics), len(results) - unread)
        self.assertIn("exited unexpectedly", self.output())

    async def test_capacity_counts_every_worker(self):
        """
        Shard api-a (capacity 1, weight 100) holds one connection taken
        through worker 0; a connection through worker 1 then goes to api-b:
        the capacity is one in total, not one per worker.  Once the first
        closes, api-a takes a connection through worker 1 again.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="hello")
        deployment.add_plain_shard("api-b", behaviour="hello")
        child, port, _, _ = await self.start(
            deployment, [("api-a", 100.0, "capacity = 1"), ("api-b", 1.0, "")]
        )
        pids = [w["pid"] for w in await self.wait_workers(2)]
        held, shard = await self.through(pids[0], [pids[1]], _held, port)
        try:
            self.assertEqual(shard, "api-a")
            # Worker 1 hears of worker 0's load within a Load interval.
            await self.wait_workers(2, lambda ws: sum(w["open_connections"] for w in ws) == 1)
            await e2e.wait_for(lambda: False, 0.3)
            other = await self.through(pids[1], [pids[0]], _one_connection, port)
            self.assertEqual(other, "api-b")
        finally:
            held.close()
        await self.wait_workers(2, lambda ws: sum(w["open_connections"] for w in ws) == 0)
        await e2e.wait_for(lambda: False, 0.3)
        self.assertEqual(await self.through(pids[1], [pids[0]], _one_connection, port), "api-a")

    async def test_sighup_rolls_a_new_generation(self):
        """
        SIGHUP with a file that replaces shard api-a by api-b while
        a client loop runs: a second generation of two workers with new
        pids replaces the first (whose processes exit), no connection of
        the loop fails, and after the switch api-b takes the connections.
        A broken file on SIGHUP changes nothing (same pids, logged).
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        deployment.add_plain_shard("api-b", behaviour="source:0")
        child, port, admin_port, path = await self.start(deployment, [("api-a", 1.0, "")])
        old = [w["pid"] for w in await self.wait_workers(2)]
        results: list = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    results.append((time.monotonic(), _one_connection(port)))
                except Exception as e:
                    results.append((time.monotonic(), f"error: {e!r}"))

        running = deferToThread(loop)
        try:
            await e2e.wait_for(lambda: len(results) >= 20, 10.0)
            _write(path, _config(deployment, port, admin_port, [("api-b", 1.0, "")]))
            child.signal("HUP")
            workers = await self.wait_workers(
                2, lambda ws: all(w["generation"] == 2 for w in ws), timeout=30.0
            )
            switched = time.monotonic()
            self.assertTrue(await e2e.wait_for(lambda: not any(_alive(p) for p in old), 35.0))
            await e2e.wait_for(lambda: sum(1 for t, _ in list(results) if t > switched) >= 20, 10.0)
        finally:
            stop.set()
            await running
        self.assertEqual([r for r in results if r[1].startswith("error")], [])
        self.assertTrue(set(old).isdisjoint(w["pid"] for w in workers))
        after = [shard for t, shard in results if t > switched]
        self.assertGreaterEqual(len(after), 20)
        self.assertEqual(set(after), {"api-b"})
        with open(path, "a") as f:
            f.write('[[service.api.shard]]\nid = "api-x"\naddress = "no port here"\n')
        child.signal("HUP")
        await e2e.wait_for(lambda: "configuration not reloaded" in self.output(), 15.0)
        self.assertRegex(self.output(), r"reload refused: service\.api\.shard\[1\]\.address: ")
        same = await self.wait_workers(2)
        self.assertEqual(sorted(w["pid"] for w in same), sorted(w["pid"] for w in workers))

    async def test_reload_never_cuts_an_established_connection(self):
        """
        With drain_timeout 1 s, a connection held through each old worker
        across a SIGHUP still echoes 3 s after the new generation is ready
        (a replaced worker is retired, not drained to a deadline); the old
        workers accept nothing more and exit once those connections close.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="hello")
        child, port, admin_port, path = await self.start(deployment, [("api-a", 1.0, "")], drain="1s")
        old = [w["pid"] for w in await self.wait_workers(2)]
        held = [
            (await self.through(old[0], [old[1]], _held, port))[0],
            (await self.through(old[1], [old[0]], _held, port))[0],
        ]
        try:
            _write(path, _config(deployment, port, admin_port, [("api-a", 2.0, "")], drain="1s"))
            child.signal("HUP")
            expected = [(1, "draining"), (1, "draining"), (2, "ready"), (2, "ready")]
            deadline = time.monotonic() + 30.0
            while True:
                workers = (await self.status())["workers"]
                if sorted((w["generation"], w["state"]) for w in workers) == expected:
                    break
                self.assertLess(time.monotonic(), deadline, workers)
                await e2e.wait_for(lambda: False, 0.1)
            await e2e.wait_for(lambda: False, 3.0)
            for sock in held:
                sock.sendall(b"still here\n")
                self.assertEqual(await deferToThread(_recv_line, sock), b"still here\n")
            self.assertTrue(all(_alive(p) for p in old))
            status = await self.status()
            self.assertEqual(sorted((w["generation"], w["state"]) for w in status["workers"]), expected)
            # New connections go to the new generation only.
            for _ in range(4):
                self.assertEqual(await deferToThread(_one_connection, port), "api-a")
        finally:
            for sock in held:
                sock.close()
        self.assertTrue(await e2e.wait_for(lambda: not any(_alive(p) for p in old), 10.0))
        self.assertNotIn("close=shutdown", self.output())
        # The two held connections (11 bytes up: "still here\\n") ended by themselves, after the reload.
        held_lines = [l for l in self.output().splitlines() if "shardtcp.access" in l and " up=11 " in l]
        self.assertEqual(len(held_lines), 2, held_lines)
        self.assertFalse(any("close=drain" in l for l in held_lines), held_lines)

    async def test_counters_do_not_go_down_across_a_reload(self):
        """
        Six connections through the two workers: /metrics counts 6 accepted.
        After SIGHUP, once the first generation has exited (each sent its
        final figures), the count is still exactly 6 (not lower, not
        doubled); the gauge of open connections is 0; one more connection
        makes 7.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        child, port, admin_port, path = await self.start(deployment, [("api-a", 1.0, "")])
        old = [w["pid"] for w in await self.wait_workers(2)]
        for n in range(3):
            self.assertEqual(await self.through(old[0], [old[1]], _one_connection, port), "api-a")
            self.assertEqual(await self.through(old[1], [old[0]], _one_connection, port), "api-a")

        async def sample(name: str) -> float:
            text = (await deferToThread(_get, admin_port, "/metrics")).decode()
            found = re.findall(rf'^{name}{{listener="edge"}} (\S+)$', text, re.M)
            self.assertEqual(len(found), 1, text[-3000:])
            return float(found[0])

        accepted = "shardtcp_connections_accepted_total"
        before = await sample(accepted)
        self.assertEqual(before, 6.0)
        child.signal("HUP")
        await self.wait_workers(2, lambda ws: all(w["generation"] == 2 for w in ws), timeout=30.0)
        self.assertTrue(await e2e.wait_for(lambda: not any(_alive(p) for p in old), 20.0))
        self.assertEqual(await sample(accepted), before)
        self.assertEqual(await sample("shardtcp_connections_active"), 0.0)
        self.assertEqual(await deferToThread(_one_connection, port), "api-a")
        self.assertEqual(await sample(accepted), before + 1)

    async def test_respawn_runs_the_running_configuration_or_is_shown_waiting(self):
        """
        The file edited (api-a replaced by api-b) but not reloaded: a killed
        worker comes back with the configuration the supervisor runs, so a
        connection through it still reaches api-a.  With the signing key
        moved away, a killed worker cannot start: the supervisor keeps
        serving; /status lists its index as waiting with its exit status
        and the worker's last line on stderr, and counts the attempts; once
        the key is back, the next attempt starts it.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        deployment.add_plain_shard("api-b", behaviour="source:0")
        child, port, admin_port, path = await self.start(deployment, [("api-a", 1.0, "")])
        workers = await self.wait_workers(2)
        _write(path, _config(deployment, port, admin_port, [("api-b", 1.0, "")]))
        os.kill(workers[0]["pid"], signal.SIGKILL)
        workers = await self.wait_workers(2, lambda ws: workers[0]["pid"] not in [w["pid"] for w in ws])
        pids = [w["pid"] for w in workers]
        for n in range(2):
            self.assertEqual(await self.through(pids[0], [pids[1]], _one_connection, port), "api-a")
            self.assertEqual(await self.through(pids[1], [pids[0]], _one_connection, port), "api-a")
        key = str(deployment.private_key)
        os.rename(key, key + ".away")
        os.kill(pids[0], signal.SIGKILL)

        async def waiting() -> list:
            deadline = time.monotonic() + 20.0
            while True:
                found = [w for w in (await self.status())["workers"]
                         if w["state"] == "waiting" and w["restarts"] >= 3]
                if found:
                    return found
                self.assertLess(time.monotonic(), deadline, self.output()[-3000:])
                await e2e.wait_for(lambda: False, 0.2)

        entry = (await waiting())[0]
        self.assertEqual(entry["index"], workers[0]["index"])
        self.assertEqual(entry["pid"], 0)
        self.assertRegex(entry["last_exit"], r"^exit status 1; last line on stderr: worker \d: .*private_key")
        self.assertRegex(self.output(), r"exited unexpectedly after \d+\.\d s: exit status 1; last line on stderr: ")
        self.assertEqual(await deferToThread(_one_connection, port), "api-a")
        os.rename(key + ".away", key)
        await self.wait_workers(2, timeout=20.0)
        self.assertNotIn("Traceback", self.output())

    async def test_admin_drain_and_sigusr1_reach_every_worker(self):
        """
        POST /shards/api-a/drain on the supervisor's admin API: a connection
        through either worker then goes to api-b (each worker applied it),
        /status shows api-a drained; after POST /reload the new generation
        of workers keeps it drained; SIGUSR1 to the supervisor is passed on
        to both workers (each logs it).
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        deployment.add_plain_shard("api-b", behaviour="source:0")
        child, port, admin_port, _ = await self.start(deployment, [("api-a", 100.0, ""), ("api-b", 1.0, "")])
        pids = [w["pid"] for w in await self.wait_workers(2)]

        def drain() -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{admin_port}/shards/api-a/drain", data=b"", method="POST",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status

        self.assertEqual(await deferToThread(drain), 200)
        await e2e.wait_for(lambda: False, 0.3)
        for n in range(3):
            self.assertEqual(await self.through(pids[0], [pids[1]], _one_connection, port), "api-b")
            self.assertEqual(await self.through(pids[1], [pids[0]], _one_connection, port), "api-b")
        status = await self.status()
        self.assertEqual(status["services"]["api"]["shards"]["api-a"]["admin_state"], "drain")
        # POST /reload starts a new generation, which is told of the drain as it starts.

        def reload() -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{admin_port}/reload", data=b"", method="POST",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status

        self.assertEqual(await deferToThread(reload), 200)
        pids = [w["pid"] for w in await self.wait_workers(2, lambda ws: all(w["generation"] == 2 for w in ws))]
        for n in range(3):
            self.assertEqual(await self.through(pids[0], [pids[1]], _one_connection, port), "api-b")
            self.assertEqual(await self.through(pids[1], [pids[0]], _one_connection, port), "api-b")
        before = self.output().count("SIGUSR1")
        os.kill(child.transport.pid, signal.SIGUSR1)
        # The supervisor's own line and one per worker.
        self.assertTrue(await e2e.wait_for(lambda: self.output().count("SIGUSR1") >= before + 3, 10.0),
                        self.output()[-2000:])

    async def test_workers_leave_with_their_supervisor(self):
        """kill -9 of the supervisor: both workers notice their channel closed, drain and exit."""
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        child, port, _, _ = await self.start(deployment, [("api-a", 1.0, "")])
        pids = [w["pid"] for w in await self.wait_workers(2)]
        child.signal("KILL")
        await child.ended
        self.assertTrue(await e2e.wait_for(lambda: not any(_alive(p) for p in pids), 20.0))
        self.assertEqual(self.output().count("channel to the supervisor lost; draining"), 2, self.output()[-2000:])

    async def test_daemonised_with_a_log_file(self):
        """
        Daemonised twistd with --logfile: the workers' own lines land whole
        in twistd's log file (each worker's "ProxyFactory starting" line), a
        connection works, and SIGTERM to the pid in the pidfile ends the
        supervisor and both workers.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        path = os.path.join(deployment.directory, "shardtcp.toml")
        with open(os.path.join(deployment.directory, "admin.token"), "w") as f:
            f.write(TOKEN + "\n")
        port, self.admin_port = e2e.free_port(), e2e.free_port()
        _write(path, _config(deployment, port, self.admin_port, [("api-a", 1.0, "")]))
        pidfile = os.path.join(deployment.directory, "twistd.pid")
        logfile = os.path.join(deployment.directory, "twistd.log")
        child = e2e.spawn(self, [e2e.twistd_binary(), "--pidfile", pidfile, "--logfile", logfile,
                                 "shardtcp", "--config", path], cwd=deployment.directory, timeout=60)
        self.assertEqual(await child.ended, 0, (child.out + child.err).decode(errors="replace"))
        self.assertTrue(await e2e.wait_for(lambda: os.path.exists(pidfile), 10.0))
        with open(pidfile) as f:
            pid = int(f.read())
        self._pids = {pid}
        self.addCleanup(self._kill_workers)

        def log() -> str:
            with open(logfile) as f:
                return f.read()

        self.assertTrue(await e2e.wait_for(lambda: log().count(f"ProxyFactory starting on {port}") == 3, 30.0), log())
        self.assertEqual(await deferToThread(_one_connection, port), "api-a")
        workers = [w["pid"] for w in (await self.status())["workers"]]
        self.assertEqual(len(workers), 2)
        os.kill(pid, signal.SIGTERM)
        self.assertTrue(await e2e.wait_for(lambda: not any(_alive(p) for p in [pid, *workers]), 20.0))
        self.assertNotIn("Traceback", log())

    async def test_port_in_use_one_line_exit_1(self):
        """
        With the listener's port held by another socket, the supervisor
        exits 1 with the one line a single process prints, no traceback,
        and never spawns a worker.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        path = os.path.join(deployment.directory, "shardtcp.toml")
        _write(path, _config(deployment, port, e2e.free_port(), [("api-a", 1.0, "")]))
        with open(os.path.join(deployment.directory, "admin.token"), "w") as f:
            f.write(TOKEN + "\n")
        child = e2e.spawn(self, [e2e.twistd_binary(), "-n", "--pidfile=", "shardtcp", "--config", path],
                          cwd=deployment.directory, timeout=60)
        self.assertEqual(await child.ended, 1)
        output = (child.out + child.err).decode(errors="replace")
        self.assertIn(
            f"shardtcp: listener 'edge': cannot listen on tcp:{port}:interface=127.0.0.1: "
            "Address already in use; not starting\n", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("spawned", output)

    async def test_health_checks_run_once_per_shard(self):
        """
        A shard with a TCP health check every 1 s (±15 %), watched for 6 s
        with two workers: it is checked 4 to 9 times (once per interval by
        the supervisor alone; three checking processes would make 15 or more).
        """
        from twisted.internet import protocol as tprotocol

        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="source:0")
        checks: list = []

        class Counted(tprotocol.Protocol):
            def connectionMade(self) -> None:
                checks.append(time.monotonic())
                self.transport.loseConnection()

        listening = reactor.listenTCP(0, tprotocol.Factory.forProtocol(Counted), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        deployment.shards["api-h"] = e2e.Shard("api-h", e2e.FRANKFURT, listening.getHost().port)
        child, port, _, _ = await self.start(
            deployment, [("api-a", 1.0, ""), ("api-h", 1.0, 'health_check = { kind = "tcp", interval = "1s" }')]
        )
        await self.wait_workers(2)
        start = time.monotonic()
        await e2e.wait_for(lambda: False, 6.0)
        seen = [t for t in checks if start <= t < start + 6.0]
        self.assertTrue(4 <= len(seen) <= 9, seen)

    async def test_sigterm_drains_every_worker(self):
        """
        SIGTERM with one connection held through each worker: /ready turns
        503, both connections still echo, new connections are refused; once
        they close, every worker exits and twistd exits 0.
        """
        deployment = Deployment(self, reactor)
        deployment.add_plain_shard("api-a", behaviour="hello")
        child, port, admin_port, _ = await self.start(deployment, [("api-a", 1.0, "")])
        pids = [w["pid"] for w in await self.wait_workers(2)]
        held = [
            (await self.through(pids[0], [pids[1]], _held, port))[0],
            (await self.through(pids[1], [pids[0]], _held, port))[0],
        ]
        try:
            child.signal("TERM")

            def not_ready() -> bool:
                try:
                    _get(admin_port, "/ready")
                except urllib.error.HTTPError as e:
                    return e.code == 503
                except OSError:
                    return False
                return False

            self.assertTrue(await deferToThread(_poll, not_ready, 10.0))
            self.assertTrue(await deferToThread(_poll, lambda: _refused(port), 10.0))
            for sock in held:
                sock.sendall(b"ping\n")
                self.assertEqual(await deferToThread(_recv_line, sock), b"ping\n")
            self.assertTrue(all(_alive(p) for p in pids))
        finally:
            for sock in held:
                sock.close()
        self.assertEqual(await child.ended, 0)
        self.assertFalse(any(_alive(p) for p in pids))


def _accepted(metrics: str) -> float:
    """The summed accepted connections of listener edge in a /metrics text."""
    found = re.findall(r'^shardtcp_connections_accepted_total\{listener="edge"\} (\S+)$', metrics, re.M)
    assert len(found) == 1, metrics[-2000:]
    return float(found[0])


def _poll(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def _recv_line(sock) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _children(pid: int) -> list:
    """The pids whose parent is ``pid``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except OSError:
                continue
    return sorted(found)


class FleetWorkersTests(TestCase):
    """A supervisor with two workers in a fleet on etcd."""

    timeout = 120

    async def test_supervisor_publishes_the_sum_and_workers_count_the_fleet(self):
        """
        One connection held through each worker on shard small (capacity
        10): etcd holds ``{"small": 2}`` under this proxy's id (the sum,
        published once, by the supervisor).  Another proxy's load of 8 on
        small, written to etcd, then fills it: the next connection, through
        either worker, goes to big.
        """
        from tests.e2e.test_fleet import _fleet_toml, _open

        from shardtcp.registry.etcd import EtcdClient

        etcd = e2e.EtcdServer(self)
        await etcd.start()
        d = Deployment(self)
        small = d.add_shard("small", e2e.FRANKFURT)
        big = d.add_shard("big", e2e.FRANKFURT)
        path = os.path.join(d.directory, "edge-w.toml")
        admin_port = e2e.free_port()
        with open(path, "w") as f:
            f.write(
                f'[proxy]\nid = "edge-w"\nworkers = 2\n[signing]\n'
                f'private_key = "{os.path.relpath(d.private_key, d.directory)}"\nkid = "policy-1"\n'
                f'[admin]\nlisten = "tcp:{admin_port}:interface=127.0.0.1"\n'
                + _fleet_toml(etcd.url, "state/edge-w.json", small.port, big.port)
            )
        child = e2e.spawn(self, [e2e.twistd_binary(), "-n", "--pidfile=", "shardtcp", "--config", path],
                          cwd=d.directory, timeout=110)
        output = lambda: (child.out + child.err).decode(errors="replace")  # noqa: E731
        started = await e2e.wait_for(lambda: child.done or output().count(" ready") >= 2, 40.0)
        self.assertTrue(started and not child.done, output())
        port = int(re.search(r"ProxyFactory starting on (\d+)", output()).group(1))
        pids = _children(child.transport.pid)
        self.assertEqual(len(pids), 2, pids)

        def cleanup() -> None:
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)

        self.addCleanup(cleanup)
        client = EtcdClient(reactor, [etcd.url])

        async def published() -> dict:
            _, kvs = await client.range(b"/shardtcp/load/")
            return {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value) for kv in kvs}

        held = []
        self.addCleanup(lambda: [c.close() for c in held])

        async def through(worker: int):
            os.kill(pids[1 - worker], signal.SIGSTOP)
            try:
                tls, shard = await deferToThread(_open, port, d.ca_path)
            finally:
                os.kill(pids[1 - worker], signal.SIGCONT)
            held.append(tls)
            return shard

        self.assertEqual(await through(0), "small")
        self.assertEqual(await through(1), "small")
        seen: dict = {}
        for _ in range(100):
            seen = await published()
            if seen.get("edge-w") == {"small": 2}:
                break
            await e2e.wait_for(lambda: False, 0.1)
        self.assertEqual(seen, {"edge-w": {"small": 2}})
        await client.put(b"/shardtcp/load/edge-x", b'{"small": 8}')

        def small_load() -> float:
            document = json.loads(_get(admin_port, "/status"))
            return document["services"]["api"]["shards"]["small"]["load"]

        # The supervisor counts 2 + 8 of 10; the workers hear of it in the same turn.
        self.assertTrue(await deferToThread(_poll, lambda: small_load() == 1.0, 20.0))
        await e2e.wait_for(lambda: False, 0.3)
        self.assertEqual(await through(0), "big")
        self.assertEqual(await through(1), "big")
