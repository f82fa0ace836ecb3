"""
The control channel in memory: a supervisor's ``SupervisorChannel`` and a
worker's ``WorkerChannel`` (over a worker tree built with
``control_plane=False``) joined by ``iosim``: shard state, peer load,
metrics and status reach the worker; its load reaches the supervisor,
coalesced by ``LoadReporter``; a lost channel is noticed.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import keys
from shardtcp.config import load_config
from shardtcp.model import Health
from shardtcp.tap import build_service
from shardtcp.workers import channel
from shardtcp.workers.child import LoadReporter, Retirement, WorkerChannel, worker_line
from shardtcp.workers.supervisor import SupervisorChannel, WorkerSet
from tests.workers.test_supervisor import FakeSpawner


def _worker_root(case) -> object:
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    paths = keys.generate_keypair(os.path.join(directory, "keys"), kid="policy-1")
    path = os.path.join(directory, "shardtcp.toml")
    with open(path, "w") as f:
        f.write(
            f'[proxy]\nid = "edge-1"\nworkers = 2\n[signing]\nprivate_key = "{paths.private_key}"\nkid = "policy-1"\n'
            '[admin]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            '[[listener]]\nname = "edge"\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "plain"\nidentify = ["line"]\n'
            '[service.api]\nnames = ["api.example.test"]\n'
            '[[service.api.shard]]\nid = "api-a"\naddress = "127.0.0.1:1"\ncapacity = 10\n'
            '[[service.api.shard]]\nid = "api-b"\naddress = "127.0.0.1:2"\nhealth_check = { kind = "tcp" }\n'
        )
    reactor = MemoryReactorClock()
    root = build_service(load_config(path), reactor, control_plane=False)
    root.startService()
    case.addCleanup(root.stopService)
    return root


def _shard(root, shard_id: str) -> dict:
    return root.resolver.status()["services"]["api"]["shards"][shard_id]


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = _worker_root(self)
        self.workers = WorkerSet(2, FakeSpawner(), Clock(), fds=dict, registry=CollectorRegistry())
        self.workers.start()
        self.worker = self.workers.workers[0]
        self.lost = []
        supervisor_side = SupervisorChannel(self.workers, self.worker)
        self.link = WorkerChannel(self.root, on_lost=lambda: self.lost.append(True))
        self.supervisor_side, self.worker_side, self.pump = iosim.connectedServerAndClient(
            lambda: self.link, lambda: supervisor_side
        )
        self.link.send(channel.Hello, index=0, generation=1, pid=4321)
        self.link.send(channel.Ready)
        self.pump.flush()

    def test_worker_built_without_control_plane(self) -> None:
        """A worker's tree has no health checker and no admin site (the supervisor runs them)."""
        self.assertIsNone(self.root.health)
        self.assertRaises(KeyError, self.root.getServiceNamed, "admin")
        self.assertEqual(self.root.fleet, ())

    def test_hello_and_ready(self) -> None:
        """Hello gives the supervisor the channel; Ready marks the worker ready."""
        self.assertIs(self.worker.channel, self.supervisor_side)
        self.assertEqual(self.worker.state, "ready")

    def test_shard_state_reaches_worker(self) -> None:
        """Health, Admin (state, weight) sent by the supervisor change the worker's resolver."""
        self.supervisor_side.send(channel.Health, shard_id="api-b", health="unhealthy")
        self.supervisor_side.send(channel.Admin, shard_id="api-a", what="state", value="drain")
        self.supervisor_side.send(channel.Admin, shard_id="api-a", what="weight", value=4.0)
        self.pump.flush()
        self.assertEqual(_shard(self.root, "api-b")["health"], Health.UNHEALTHY.value)
        self.assertEqual(_shard(self.root, "api-a")["admin_state"], "drain")
        self.assertEqual(_shard(self.root, "api-a")["weight"], 4.0)
        self.supervisor_side.send(channel.Admin, shard_id="api-a", what="weight", value=None)
        self.pump.flush()
        self.assertEqual(_shard(self.root, "api-a")["weight"], 1.0)

    def test_unknown_shard_is_ignored(self) -> None:
        """A change naming a shard the worker does not know is logged, not fatal: the channel stays up."""
        self.supervisor_side.send(channel.Health, shard_id="nope", health="unhealthy")
        self.pump.flush()
        self.assertFalse(self.lost)
        self.supervisor_side.send(channel.Health, shard_id="api-b", health="unhealthy")
        self.pump.flush()
        self.assertEqual(_shard(self.root, "api-b")["health"], "unhealthy")

    def test_peer_load_is_remote_load(self) -> None:
        """PeerLoad counts toward the shard's load: 5 others' connections of capacity 10 is load 0.5."""
        self.supervisor_side.send(channel.PeerLoad, counts={"api-a": 5})
        self.pump.flush()
        self.assertEqual(_shard(self.root, "api-a")["load"], 0.5)

    def test_metrics_and_status(self) -> None:
        """Metrics answers the worker's Prometheus text; Status its pid and listeners."""
        answers = []
        self.supervisor_side.callRemote(channel.Metrics).addCallback(answers.append)
        self.supervisor_side.callRemote(channel.Status).addCallback(answers.append)
        self.pump.flush()
        self.assertIn("# TYPE shardtcp_connections_accepted_total counter", answers[0]["text"])
        self.assertEqual(answers[1]["status"]["pid"], os.getpid())
        self.assertEqual(answers[1]["status"]["listeners"], {"edge": {"accepted": 0, "active": 0, "refused": {}}})

    def test_load_reporter_coalesces(self) -> None:
        """Two changes within one interval make one Load with the latest counts; no change, no message."""
        clock = Clock()
        reporter = LoadReporter(self.root.resolver, self.link, clock)
        reporter.start()
        first = self.root.resolver.lease("api-a")
        second = self.root.resolver.lease("api-a")
        clock.advance(channel.LOAD_INTERVAL - 0.001)
        self.pump.flush()
        self.assertEqual(self.worker.load, {})
        clock.advance(0.001)
        self.pump.flush()
        self.assertEqual(self.worker.load, {"api-a": 2})
        first.release()
        second.release()
        clock.advance(channel.LOAD_INTERVAL)
        self.pump.flush()
        self.assertEqual(self.worker.load, {})
        reporter.stop()

    def test_lost_channel(self) -> None:
        """The worker notices a lost channel (its supervisor is gone); the supervisor forgets it."""
        self.supervisor_side.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(self.lost, [True])
        self.assertIsNone(self.worker.channel)


class BadMessageTests(SynchronousTestCase):
    """A message that does not parse is refused alone: logged in one line, counted, answered; the channel stays up."""

    def setUp(self) -> None:
        self.root = _worker_root(self)
        self.workers = WorkerSet(2, FakeSpawner(), Clock(), fds=dict, registry=CollectorRegistry())
        self.workers.start()
        self.worker = self.workers.workers[0]
        self.lost = []
        self.supervisor_side = SupervisorChannel(self.workers, self.worker)
        self.link = WorkerChannel(self.root, on_lost=lambda: self.lost.append(True))
        _, _, self.pump = iosim.connectedServerAndClient(lambda: self.link, lambda: self.supervisor_side)
        self.link.send(channel.Hello, index=0, generation=1, pid=4321)
        self.pump.flush()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def _raw(self, sender, box) -> None:
        """Send an AMP box as it is, bypassing the command's own serialisation."""
        box.serialize()
        sender.transport.write(box.serialize())
        self.pump.flush()

    def _refusals(self) -> list:
        return [formatEvent(e) for e in self.events if "refused" in e.get("log_format", "")]

    def test_load_that_is_not_json(self) -> None:
        """
        A Load whose counts are not JSON: the supervisor logs one line
        naming the command, counts it, keeps its load, and the next good
        Load is applied.
        """
        self._raw(self.link, amp.AmpBox(_command=b"Load", **{"counts.n": b"1", "counts.0": b"{nope"}))
        self.assertEqual(self.supervisor_side.refused, 1)
        self.assertEqual(len(self._refusals()), 1)
        self.assertIn("supervisor channel: message Load refused: does not parse: ", self._refusals()[0])
        self.assertEqual(self.lost, [])
        self.link.send(channel.Load, counts={"api-a": 2})
        self.pump.flush()
        self.assertEqual(self.worker.load, {"api-a": 2})

    def test_unknown_command_with_answer(self) -> None:
        """An unknown command that asks for an answer gets an error answer (BAD_MESSAGE), once, bounded."""
        answers = []

        class Nonsense(amp.Command):
            commandName = b"Nonsense" + b"x" * 100
            arguments: list = []
            response: list = []

        self.link.callRemote(Nonsense).addErrback(answers.append)
        self.pump.flush()
        self.assertIsInstance(answers[0].value, amp.UnknownRemoteError)
        self.assertIn(": Nonsense" + "x" * 32 + " refused: unknown command", str(answers[0].value))
        self.assertEqual(self.supervisor_side.refused, 1)
        self.assertEqual(self._refusals(), [
            "supervisor channel: message Nonsense" + "x" * 32 + " refused: unknown command"])
        self.assertEqual(self.lost, [])

    def test_long_problem_is_cut(self) -> None:
        """A problem longer than 200 characters is logged cut to 200 and '...'."""
        self._raw(self.link, amp.AmpBox(_command=b"Hello", index=b"x" * 300, generation=b"1", pid=b"2"))
        self.assertEqual(self.supervisor_side.refused, 1)
        line = self._refusals()[0]
        self.assertTrue(line.startswith("supervisor channel: message Hello refused: does not parse: "), line)
        self.assertEqual(len(line) - len("supervisor channel: message Hello refused: "), 203)
        self.assertTrue(line.endswith("..."))

    def test_weight_that_is_not_a_number(self) -> None:
        """Admin weight "heavy" is not applied (logged); the channel and the weight stay as they were."""
        self.supervisor_side.send(channel.Admin, shard_id="api-a", what="weight", value="heavy")
        self.pump.flush()
        self.assertEqual(_shard(self.root, "api-a")["weight"], 1.0)
        self.assertEqual(self.lost, [])
        self.assertTrue(any("weight not applied" in formatEvent(e) for e in self.events))

    def test_final_reaches_the_supervisor(self) -> None:
        """final() sends the worker's metrics and fires once the supervisor has them."""
        self.root.metrics.accepted.labels("edge").inc(3)
        d = self.link.final(Clock())
        self.pump.flush()
        self.successResultOf(d)
        self.assertIn('shardtcp_connections_accepted_total{listener="edge"} 3.0', self.worker.final_text)

    def test_final_without_supervisor(self) -> None:
        """final() with the channel gone fires at once; with no answer it gives up after its timeout."""
        clock = Clock()
        self.link.lost = True
        self.successResultOf(self.link.final(clock))
        self.link.lost = False
        d = self.link.final(clock, timeout=2.0)
        clock.advance(1.999)
        self.assertNoResult(d)
        clock.advance(0.001)
        self.successResultOf(d)

    def test_load_over_many_shards(self) -> None:
        """A Load of 20,000 shards (far over one AMP value's 65,535 bytes) arrives whole."""
        counts = {f"shard-{n:05d}": n % 7 + 1 for n in range(20000)}
        self.link.send(channel.Load, counts=counts)
        self.pump.flush()
        self.assertEqual(self.workers.totals(), counts)


class RetirementTests(SynchronousTestCase):
    def test_retire_stops_accepting_then_exits_when_idle(self) -> None:
        """
        Retire closes every listening port at once, keeps running while a
        connection is open (however long), and stops the process within one
        look after the last one ends.
        """
        root = _worker_root(self)
        clock, stopped = Clock(), []
        retire = Retirement(root, clock, lambda: stopped.append(True), interval=0.2)
        connection = object()
        connections = root.factories["edge"].context.connections
        connections.add(connection)
        retire()
        self.assertIsNone(root.listening_port("edge"))
        clock.advance(3600)
        self.assertEqual(stopped, [])
        connections.remove(connection)
        clock.advance(0.199)
        self.assertEqual(stopped, [])
        clock.advance(0.001)
        self.assertEqual(stopped, [True])


class LogLineTests(SynchronousTestCase):
    def test_worker_index_after_the_time(self) -> None:
        """A worker's log line is twistd's, with "worker <index>" after the time."""
        event = {"log_format": "hello {who}", "who": "there", "log_time": 0.0, "log_namespace": "x",
                 "log_level": None, "log_system": "sys"}
        line = worker_line(3)(event)
        self.assertRegex(line, r"^\S+ worker 3 \[sys\] hello there\n$")
        self.assertEqual(worker_line(3)({"log_format": None, "log_time": 0.0}), None)


class SnapshotTests(SynchronousTestCase):
    def test_worker_reads_the_supervisors_bytes(self) -> None:
        """
        load_snapshot with a descriptor uses its bytes, not the file as it
        is now (edited since), resolving relative paths against the file's
        folder; bad bytes are one ConfigError line naming the file.
        """
        from shardtcp.config import ConfigError
        from shardtcp.workers.child import load_snapshot

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        keys.generate_keypair(os.path.join(directory, "keys"), kid="policy-1")
        path = os.path.join(directory, "shardtcp.toml")
        text = (
            '[proxy]\nid = "edge-1"\n[signing]\nprivate_key = "keys/policy-1.pem"\nkid = "policy-1"\n'
            '[[listener]]\nname = "edge"\nlisten = "tcp:0"\nmode = "plain"\nidentify = ["line"]\n'
            '[service.api]\nnames = ["api.example.test"]\n'
            '[[service.api.shard]]\nid = "api-a"\naddress = "127.0.0.1:1"\n'
        )
        with open(path, "w") as f:
            f.write(text.replace("api-a", "api-b"))

        def fd_of(data: bytes) -> int:
            read, write = os.pipe()
            os.write(write, data)
            os.close(write)
            return read

        config = load_snapshot(path, fd_of(text.encode()))
        self.assertEqual([s.id for s in config.services[0].shards], ["api-a"])
        self.assertEqual(config.path, path)
        self.assertEqual(config.signing.private_key, os.path.join(directory, "keys", "policy-1.pem"))
        self.assertEqual([s.id for s in load_snapshot(path).services[0].shards], ["api-b"])
        e = self.assertRaises(ConfigError, load_snapshot, path, fd_of(b"[proxy\n"))
        self.assertEqual(len(e.problems), 1)
        self.assertTrue(e.problems[0].startswith(f"{path} (as loaded by the supervisor): "), e.problems)
