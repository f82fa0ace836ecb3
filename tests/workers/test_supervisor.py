"""
The supervisor's logic in memory: ``WorkerSet`` over a fake spawner and a
``Clock`` (spawning, the respawn back-off at both edges, the generation
switch of a reload, signals to every worker, a stop), the load passed
between workers, and ``ShardStateRelay``.
"""

from __future__ import annotations

import os
import signal

from prometheus_client import CollectorRegistry
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from shardtcp.model import Health
from shardtcp.workers import channel, supervisor
from shardtcp.workers.aggregate import RemoteLoad
from shardtcp.workers.supervisor import (
    BACKOFF_FIRST,
    ASK_TIMEOUT,
    BACKOFF_MAX,
    SCRAPE_INTERVAL,
    STEADY,
    IWorkerSpawner,
    ProcessSpawner,
    ShardStateRelay,
    WorkerSet,
)


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list = []
        self.exited = False

    def signalProcess(self, number) -> None:
        if self.exited:
            raise error.ProcessExitedAlready()
        self.signals.append(signal.Signals(number).name[len("SIG"):])


class FakeSpawner:
    """Records each spawn; ``exit(i)`` ends the i-th process spawned."""

    def __init__(self) -> None:
        self.spawned: list = []  # (index, generation, fds, process, ended)
        self._pid = 1000

    def spawn(self, index, generation, fds, channel_protocol, ended):
        self._pid += 1
        process = FakeProcess(self._pid)
        self.spawned.append((index, generation, dict(fds), process, ended))
        return process

    def exit(self, n: int, status: str = "exit status 1") -> None:
        process, ended = self.spawned[n][3], self.spawned[n][4]
        process.exited = True
        ended(status)


class FakeChannel:
    """Records what is sent; answers Metrics with ``text`` (None: never answers)."""

    def __init__(self, text=None) -> None:
        self.sent: list = []
        self.text = text
        self.asked = 0

    def send(self, command, **arguments) -> None:
        self.sent.append((command, arguments))

    def ask(self, command, timeout, clock):
        self.asked += 1
        if self.text is None:
            return defer.Deferred().addTimeout(timeout, clock)
        return defer.succeed({"text": self.text})


def _set(count: int = 2, **kw):
    spawner, clock, registry = FakeSpawner(), Clock(), CollectorRegistry()
    workers = WorkerSet(count, spawner, clock, fds=lambda: {"edge": 7}, registry=registry, **kw)
    return workers, spawner, clock, registry


class SpawnTests(SynchronousTestCase):
    def test_start_spawns_every_index(self) -> None:
        """start() spawns indexes 0..N-1 of generation 1, each with the listening sockets."""
        workers, spawner, _, _ = _set(3)
        workers.start()
        self.assertEqual([(i, g, fds) for i, g, fds, _, _ in spawner.spawned], [(i, 1, {"edge": 7}) for i in range(3)])
        self.assertEqual([w["state"] for w in workers.status()], ["starting"] * 3)
        self.assertEqual([w["pid"] for w in workers.status()], [1001, 1002, 1003])

    def test_process_spawner_provides_interface(self) -> None:
        """ProcessSpawner is an IWorkerSpawner."""
        self.assertTrue(verifyObject(IWorkerSpawner, ProcessSpawner(None, "/x.toml")))


class RespawnTests(SynchronousTestCase):
    def test_young_death_waits_first_backoff(self) -> None:
        """A worker dead just before STEADY seconds is spawned again after exactly BACKOFF_FIRST."""
        workers, spawner, clock, registry = _set()
        workers.start()
        clock.advance(STEADY - 0.001)
        spawner.exit(0)
        self.assertEqual(len(spawner.spawned), 2)
        clock.advance(BACKOFF_FIRST - 0.001)
        self.assertEqual(len(spawner.spawned), 2)
        clock.advance(0.001)
        self.assertEqual(len(spawner.spawned), 3)
        self.assertEqual(spawner.spawned[2][:2], (0, 1))
        self.assertEqual(workers.restarts, {0: 1})
        self.assertEqual(registry.get_sample_value("shardtcp_worker_restarts_total", {"index": "0"}), 1.0)

    def test_steady_worker_respawns_at_once(self) -> None:
        """A worker that ran STEADY seconds is spawned again with no wait."""
        workers, spawner, clock, _ = _set()
        workers.start()
        clock.advance(STEADY)
        spawner.exit(1)
        clock.advance(0)
        self.assertEqual(spawner.spawned[-1][:2], (1, 1))
        self.assertEqual(len(spawner.spawned), 3)

    def test_backoff_doubles_to_max_and_resets(self) -> None:
        """Deaths at start-up wait 0.5, 1, 2 ... 16, then 30, 30 s; a steady run resets it to 0.5."""
        workers, spawner, clock, _ = _set(1)
        workers.start()
        waits = []
        for _ in range(8):
            spawner.exit(len(spawner.spawned) - 1)
            before = len(spawner.spawned)
            waited = 0.0
            while len(spawner.spawned) == before:
                clock.advance(0.25)
                waited += 0.25
            waits.append(waited)
        self.assertEqual(waits, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX, BACKOFF_MAX])
        clock.advance(STEADY)
        spawner.exit(len(spawner.spawned) - 1)
        clock.advance(0)
        before = len(spawner.spawned)
        spawner.exit(before - 1)
        clock.advance(BACKOFF_FIRST - 0.01)
        self.assertEqual(len(spawner.spawned), before)
        clock.advance(0.01)
        self.assertEqual(len(spawner.spawned), before + 1)
        self.assertEqual(workers.restarts, {0: 10})


class GenerationTests(SynchronousTestCase):
    def test_new_generation_replaces_index_by_index(self) -> None:
        """
        replace() spawns generation 2; a new worker's Ready sends SIGTERM
        to the old worker of its index only; old workers exiting then are
        not restarts and are not spawned again.
        """
        workers, spawner, clock, _ = _set()
        workers.start()
        old = [w for w in workers.workers]
        for w in old:
            workers.ready(w)
        workers.replace()
        self.assertEqual([(i, g) for i, g, *_ in spawner.spawned[2:]], [(0, 2), (1, 2)])
        new = [w for w in workers.workers if w.generation == 2]
        workers.ready(new[1])
        self.assertEqual([spawner.spawned[n][3].signals for n in range(4)], [[], ["TERM"], [], []])
        workers.ready(new[0])
        self.assertEqual(spawner.spawned[0][3].signals, ["TERM"])
        spawner.exit(0)
        spawner.exit(1)
        clock.advance(60)
        self.assertEqual(len(spawner.spawned), 4)
        self.assertEqual(workers.restarts, {})
        self.assertEqual([(w["index"], w["generation"]) for w in workers.status()], [(0, 2), (1, 2)])

    def test_replaced_worker_with_channel_is_retired(self) -> None:
        """An old worker whose channel is up is sent Retire (not SIGTERM) once its successor is ready."""
        workers, spawner, _, _ = _set(1)
        workers.start()
        old_channel = FakeChannel()
        workers.hello(workers.workers[0], old_channel, 1001)
        workers.ready(workers.workers[0])
        workers.replace()
        workers.ready(workers.workers[1])
        self.assertEqual(spawner.spawned[0][3].signals, [])
        self.assertEqual(old_channel.sent[-1], (channel.Retire, {}))
        self.assertEqual([w["state"] for w in workers.status()], ["draining", "ready"])

    def test_fewer_workers_after_reload(self) -> None:
        """replace(1) spawns one worker; the old worker 1, which has no successor, gets SIGTERM at once."""
        workers, spawner, _, _ = _set(2)
        workers.start()
        workers.replace(1)
        self.assertEqual([(i, g) for i, g, *_ in spawner.spawned[2:]], [(0, 2)])
        self.assertEqual([s[3].signals for s in spawner.spawned], [[], ["TERM"], []])
        workers.ready(workers.workers[-1])
        self.assertEqual(spawner.spawned[0][3].signals, ["TERM"])

    def test_more_workers_after_reload(self) -> None:
        """replace(3) spawns indexes 0, 1 and 2 of generation 2; later restarts keep three."""
        workers, spawner, _, _ = _set(2)
        workers.start()
        workers.replace(3)
        self.assertEqual([(i, g) for i, g, *_ in spawner.spawned[2:]], [(0, 2), (1, 2), (2, 2)])
        self.assertEqual(workers.count, 3)

    def test_old_worker_dying_early_is_not_respawned(self) -> None:
        """An old-generation worker that dies before its successor is ready is not spawned again."""
        workers, spawner, clock, _ = _set()
        workers.start()
        workers.replace()
        spawner.exit(0)
        clock.advance(60)
        self.assertEqual(len(spawner.spawned), 4)


class SpawnFailureTests(SynchronousTestCase):
    def test_failed_spawn_is_retried_after_backoff(self) -> None:
        """A spawn that raises (no descriptors left) is logged, counted and tried again after BACKOFF_FIRST."""
        workers, spawner, clock, _ = _set(1)
        real = spawner.spawn
        calls = []

        def failing(*args):
            calls.append(args[0])
            if len(calls) == 1:
                raise OSError(24, "Too many open files")
            return real(*args)

        spawner.spawn = failing
        workers.start()
        self.assertEqual(workers.workers, [])
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        clock.advance(BACKOFF_FIRST)
        self.assertEqual(calls, [0, 0])
        self.assertEqual([w["index"] for w in workers.status()], [0])
        self.assertEqual(workers.restarts, {0: 1})


class SignalTests(SynchronousTestCase):
    def test_signal_all(self) -> None:
        """signal_all sends the signal to every worker alive, skipping one already gone."""
        workers, spawner, _, _ = _set(3)
        workers.start()
        spawner.spawned[2][3].exited = True
        workers.signal_all("USR1")
        self.assertEqual([s[3].signals for s in spawner.spawned], [["USR1"], ["USR1"], []])

    def test_stop_waits_then_kills(self) -> None:
        """
        stop(t) sends SIGTERM to all; nothing is spawned again as they exit;
        one still alive at exactly t gets SIGKILL (not before); the Deferred
        fires once the last has exited.
        """
        workers, spawner, clock, _ = _set()
        workers.start()
        d = workers.stop(35.0)
        self.assertEqual([s[3].signals for s in spawner.spawned], [["TERM"], ["TERM"]])
        spawner.exit(0)
        clock.advance(34.999)
        self.assertNoResult(d)
        self.assertEqual(spawner.spawned[1][3].signals, ["TERM"])
        clock.advance(0.001)
        self.assertEqual(spawner.spawned[1][3].signals, ["TERM", "KILL"])
        spawner.exit(1, "signal 9")
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(spawner.spawned), 2)

    def test_stop_cancels_pending_respawn(self) -> None:
        """A respawn waiting out its back-off does not happen once stopping."""
        workers, spawner, clock, _ = _set()
        workers.start()
        spawner.exit(0)
        d = workers.stop(5.0)
        spawner.exit(1)
        self.assertIsNone(self.successResultOf(d))
        clock.advance(60)
        self.assertEqual(len(spawner.spawned), 2)


class LoadTests(SynchronousTestCase):
    def test_peer_load_is_the_others_sum(self) -> None:
        """Each worker gets the other workers' counts; on_load gets the total; a gone worker's load drops."""
        totals = []
        workers, spawner, _, _ = _set(3, remote=RemoteLoad(totals.append))
        workers.start()
        channels = [FakeChannel() for _ in range(3)]
        for w, c in zip(workers.workers, channels):
            workers.hello(w, c, w.pid)
        for c in channels:
            c.sent.clear()
        workers.load(workers.workers[0], {"a": 2, "b": 1})
        workers.load(workers.workers[1], {"a": 1, "c": 0})
        self.assertEqual(channels[0].sent[-1], (channel.PeerLoad, {"counts": {"a": 1}}))
        self.assertEqual(channels[1].sent[-1], (channel.PeerLoad, {"counts": {"a": 2, "b": 1}}))
        self.assertEqual(channels[2].sent[-1], (channel.PeerLoad, {"counts": {"a": 3, "b": 1}}))
        self.assertEqual(totals[-1], {"a": 3, "b": 1})
        spawner.exit(0)
        self.assertEqual(totals[-1], {"a": 1})
        self.assertEqual(channels[2].sent[-1], (channel.PeerLoad, {"counts": {"a": 1}}))

    def test_fleet_load_reaches_every_worker(self) -> None:
        """
        The other proxies' load (set_fleet) is added to each worker's
        PeerLoad and to the supervisor's remote load; what this proxy
        publishes (totals) stays its workers' sum alone.
        """
        totals = []
        workers, spawner, _, _ = _set(2, remote=RemoteLoad(totals.append))
        workers.start()
        channels = [FakeChannel(), FakeChannel()]
        for w, c in zip(workers.workers, channels):
            workers.hello(w, c, w.pid)
        workers.load(workers.workers[0], {"a": 1})
        workers.set_fleet({"a": 4, "b": 2})
        self.assertEqual(channels[0].sent[-1], (channel.PeerLoad, {"counts": {"a": 4, "b": 2}}))
        self.assertEqual(channels[1].sent[-1], (channel.PeerLoad, {"counts": {"a": 5, "b": 2}}))
        self.assertEqual(totals[-1], {"a": 5, "b": 2})
        self.assertEqual(workers.totals(), {"a": 1})

    def test_bad_load_is_ignored(self) -> None:
        """A Load with a negative count changes nothing and sends nothing."""
        workers, spawner, _, _ = _set(2)
        workers.start()
        c = FakeChannel()
        workers.hello(workers.workers[1], c, 1)
        c.sent.clear()
        workers.load(workers.workers[0], {"a": -1})
        self.assertEqual((workers.totals(), c.sent), ({}, []))

    def test_status_lists_open_connections(self) -> None:
        """status() shows each worker's open connections and restarts."""
        workers, spawner, _, _ = _set()
        workers.start()
        workers.load(workers.workers[1], {"a": 2, "b": 3})
        self.assertEqual([w["open_connections"] for w in workers.status()], [0, 5])


class FakeResolver:
    def __init__(self) -> None:
        self.calls: list = []

    def set_health(self, shard_id, health):
        self.calls.append(("set_health", shard_id, health))

    def apply_agent_report(self, shard_id, report):
        self.calls.append(("apply_agent_report", shard_id, report))

    def clear_agent_report(self, shard_id):
        self.calls.append(("clear_agent_report", shard_id))

    def set_admin_state(self, shard_id, state):
        self.calls.append(("set_admin_state", shard_id, state))

    def set_weight(self, shard_id, weight):
        self.calls.append(("set_weight", shard_id, weight))

    def clear_weight(self, shard_id):
        self.calls.append(("clear_weight", shard_id))

    def set_security_score(self, shard_id, score):
        self.calls.append(("set_security_score", shard_id, score))


class RelayTests(SynchronousTestCase):
    def test_changes_are_applied_and_sent(self) -> None:
        """Each setter still reaches the resolver, and its message goes to the workers."""
        resolver, sent = FakeResolver(), []
        ShardStateRelay(resolver, lambda command, **kw: sent.append((command, kw)))
        resolver.set_health("a", Health.UNHEALTHY)
        resolver.set_admin_state("a", "drain")
        resolver.set_weight("b", 2.5)
        resolver.clear_weight("b")
        resolver.clear_agent_report("c")
        self.assertEqual([c[0] for c in resolver.calls],
                         ["set_health", "set_admin_state", "set_weight", "clear_weight", "clear_agent_report"])
        self.assertEqual(sent, [
            (channel.Health, {"shard_id": "a", "health": "unhealthy"}),
            (channel.Admin, {"shard_id": "a", "what": "state", "value": "drain"}),
            (channel.Admin, {"shard_id": "b", "what": "weight", "value": 2.5}),
            (channel.Admin, {"shard_id": "b", "what": "weight", "value": None}),
            (channel.Agent, {"shard_id": "c", "report": None}),
        ])

    def test_repeats_are_not_sent(self) -> None:
        """The same report twice (agent checks repeat) is applied twice but sent once; a change is sent."""
        from shardtcp.resolver.agent import AgentReport

        resolver, sent = FakeResolver(), []
        ShardStateRelay(resolver, lambda command, **kw: sent.append((command, kw)))
        resolver.apply_agent_report("a", AgentReport(load=0.5))
        resolver.apply_agent_report("a", AgentReport(load=0.5))
        resolver.apply_agent_report("a", AgentReport(load=0.6))
        self.assertEqual(len(resolver.calls), 3)
        self.assertEqual([kw["report"]["load"] for _, kw in sent], [0.5, 0.6])

    def test_replay_sends_the_latest_of_each(self) -> None:
        """A new worker gets the last change of each kind per shard, not the history."""
        resolver = FakeResolver()
        relay = ShardStateRelay(resolver, lambda command, **kw: None)
        resolver.set_health("a", Health.UNHEALTHY)
        resolver.set_health("a", Health.HEALTHY)
        resolver.set_weight("a", 3.0)

        class W:
            channel = FakeChannel()

        relay.replay(W)
        self.assertEqual(W.channel.sent, [
            (channel.Health, {"shard_id": "a", "health": "healthy"}),
            (channel.Admin, {"shard_id": "a", "what": "weight", "value": 3.0}),
        ])


def _exposition(accepted: float, active: float, seconds: float = 0.0) -> str:
    """A worker's metrics: a counter, a gauge and a one-bucket histogram."""
    return (
        "# HELP shardtcp_connections_accepted_total Client connections accepted\n"
        "# TYPE shardtcp_connections_accepted_total counter\n"
        f'shardtcp_connections_accepted_total{{listener="edge"}} {accepted}\n'
        "# HELP shardtcp_connections_active Client connections open now\n"
        "# TYPE shardtcp_connections_active gauge\n"
        f'shardtcp_connections_active{{listener="edge"}} {active}\n'
        "# HELP shardtcp_upstream_connect_seconds Connect time\n"
        "# TYPE shardtcp_upstream_connect_seconds histogram\n"
        f'shardtcp_upstream_connect_seconds_bucket{{le="+Inf",service="api"}} {accepted}\n'
        f'shardtcp_upstream_connect_seconds_count{{service="api"}} {accepted}\n'
        f'shardtcp_upstream_connect_seconds_sum{{service="api"}} {seconds}\n'
    )


def _summed(workers, clock=None) -> dict:
    """/metrics of a supervisor with no metrics of its own: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    d = workers.metrics("")
    if clock is not None:
        clock.advance(ASK_TIMEOUT)
    text = SynchronousTestCase().successResultOf(d)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


ACCEPTED = ("shardtcp_connections_accepted_total", (("listener", "edge"),))
ACTIVE = ("shardtcp_connections_active", (("listener", "edge"),))
COUNT = ("shardtcp_upstream_connect_seconds_count", (("service", "api"),))
SUM = ("shardtcp_upstream_connect_seconds_sum", (("service", "api"),))


class DepartedMetricsTests(SynchronousTestCase):
    def _two(self):
        workers, spawner, clock, _ = _set(2)
        workers.start()
        channels = [FakeChannel(_exposition(3, 2, 0.5)), FakeChannel(_exposition(5, 1, 1.0))]
        for w, c in zip(workers.workers, channels):
            workers.hello(w, c, w.pid)
            workers.ready(w)
        return workers, spawner, clock, channels

    def test_counters_survive_a_retire_and_a_crash(self):
        """
        Workers counting 3 and 5 sum to 8.  A reload retires worker 0, which
        sends Final (4 counted) and exits; worker 1 then dies (its last
        answer, 5, is what is kept).  The new generation's 1 and 0 make the
        sum 4 + 5 + 1 + 0 = 10 exactly, histogram _count and _sum alike; the
        open-connections gauge is the live workers' alone (7 + 0), the dead
        ones' 2 and 1 gone with them.
        """
        workers, spawner, clock, channels = self._two()
        first = _summed(workers)
        self.assertEqual((first[ACCEPTED], first[ACTIVE], first[COUNT], first[SUM]), (8.0, 3.0, 8.0, 1.5))
        workers.replace()
        new = [FakeChannel(_exposition(1, 7, 0.25)), FakeChannel(_exposition(0, 0))]
        for w, c in zip(workers.workers[2:], new):
            workers.hello(w, c, w.pid)
        workers.ready(workers.workers[2])
        self.assertEqual(channels[0].sent[-1], (channel.Retire, {}))
        workers.final(workers.workers[0], _exposition(4, 0, 0.75))
        during = _summed(workers)
        self.assertEqual((during[ACCEPTED], during[ACTIVE]), (4.0 + 5 + 1 + 0, 0.0 + 1 + 7 + 0))
        self.assertEqual(channels[0].asked, 1)
        spawner.exit(0, "exit status 0")
        spawner.exit(1, "signal 9")
        self.assertEqual(workers.departed.added, 2)
        after = _summed(workers)
        self.assertEqual((after[ACCEPTED], after[ACTIVE], after[COUNT], after[SUM]), (10.0, 7.0, 10.0, 0.75 + 1.0 + 0.25))

    def test_worker_that_does_not_answer_keeps_its_counters(self):
        """
        A worker that does not answer within ASK_TIMEOUT counts with the
        counters it last reported (no dip), not with its gauge.
        """
        workers, spawner, clock, channels = self._two()
        _summed(workers)
        channels[1].text = None
        later = _summed(workers, clock)
        self.assertEqual((later[ACCEPTED], later[ACTIVE]), (8.0, 2.0))

    def test_dead_worker_never_scraped_adds_nothing(self):
        """A worker that dies before its metrics were ever seen adds nothing (and nothing fails)."""
        workers, spawner, clock, channels = self._two()
        spawner.exit(0)
        self.assertEqual((workers.departed.added, workers.departed.text), (0, ""))
        self.assertEqual(_summed(workers)[ACCEPTED], 5.0)

    def test_scrape_every_interval(self):
        """
        A worker not asked for SCRAPE_INTERVAL seconds is asked then (not a
        moment before), so a crash loses at most that much; one asked
        meanwhile by /metrics is not asked again until its figures are that
        old.  What it counted after its last answer is lost when it dies.
        """
        workers, spawner, clock, channels = self._two()
        clock.advance(SCRAPE_INTERVAL - 0.001)
        self.assertEqual([c.asked for c in channels], [0, 0])
        clock.advance(0.001)
        self.assertEqual([c.asked for c in channels], [1, 1])
        clock.advance(1.0)
        _summed(workers)
        self.assertEqual([c.asked for c in channels], [2, 2])
        clock.advance(SCRAPE_INTERVAL - 1.0)
        self.assertEqual([c.asked for c in channels], [2, 2])
        clock.advance(SCRAPE_INTERVAL)
        self.assertEqual([c.asked for c in channels], [3, 3])
        channels[0].text = _exposition(9, 0)
        spawner.exit(0)
        self.assertEqual(_summed(workers)[ACCEPTED], 3.0 + 5.0)

    def test_bad_metrics_left_out_and_logged(self):
        """A worker whose text does not parse is left out of /metrics (logged); the others count."""
        workers, spawner, clock, channels = self._two()
        channels[0].text = "shardtcp_x{ 1\n"
        events = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(_summed(workers)[ACCEPTED], 5.0)
        self.assertTrue(any("metrics of a worker left out" in e.get("log_format", "") for e in events))
        spawner.exit(0)
        self.assertEqual(workers.departed.added, 0)
        self.assertEqual(_summed(workers)[ACCEPTED], 5.0)


class _Ended:
    """A process's end as processEnded receives it."""

    def __init__(self, code=None, signal_=None) -> None:
        self.value = type("V", (), {"exitCode": code, "signal": signal_})()


class WorkerProcessTests(SynchronousTestCase):
    def test_stderr_lines_forwarded_whole_and_last_kept(self) -> None:
        """
        stderr comes out whole lines at a time to the supervisor's stderr;
        stdout (inherited) is not touched; at the exit the unfinished last
        line is flushed and handed on with the status as the last error,
        cut to 500 characters.
        """
        written, ended = [], []
        proto = supervisor._WorkerProcess(lambda status, error=None: ended.append((status, error)),
                                          stderr=written.append)
        proto.childDataReceived(2, b"Traceback (most recent call last):\n  File")
        self.assertEqual(written, [b"Traceback (most recent call last):\n"])
        proto.childDataReceived(2, b' "x.py"\n\n')
        proto.childDataReceived(2, b"OSError: " + b"e" * 600)
        proto.processEnded(_Ended(code=1))
        self.assertEqual(written[1:], [b'  File "x.py"\n\n', b"OSError: " + b"e" * 600 + b"\n"])
        self.assertEqual(ended, [("exit status 1", ("OSError: " + "e" * 600)[:500])])

    def test_log_file_gets_both(self) -> None:
        """With twistd's log file, stdout and stderr lines go there and nothing to stderr; a signal is named."""
        import io

        class File(io.BytesIO):
            def flush(self) -> None:
                pass

        log_file, written, ended = File(), [], []
        proto = supervisor._WorkerProcess(lambda status, error=None: ended.append((status, error)), log_file,
                                          stderr=written.append)
        proto.childDataReceived(1, b"a line\n")
        proto.childDataReceived(2, b"worker 0: cannot start: no such file\n")
        proto.processEnded(_Ended(signal_=9))
        self.assertEqual(log_file.getvalue(), b"a line\nworker 0: cannot start: no such file\n")
        self.assertEqual(written, [])
        self.assertEqual(ended, [("signal 9", "worker 0: cannot start: no such file")])

    def test_spawner_pipes_stderr(self) -> None:
        """The spawned worker's stderr is a pipe to the supervisor; stdout is inherited unless logging to a file."""
        from twisted.internet.testing import MemoryReactor

        calls = []

        class Reactor(MemoryReactor):
            def spawnProcess(self, proto, executable, args, env=None, childFDs=None, **kw):
                calls.append(dict(childFDs))
                return FakeProcess(1)

            def adoptStreamConnection(self, fd, family, factory):
                pass

        spawner = ProcessSpawner(Reactor(), "/x.toml")
        spawner.spawn(0, 1, {}, None, lambda status, error=None: None)
        self.assertEqual((calls[0][1], calls[0][2]), (1, "r"))

    def test_snapshot_passed_on_a_descriptor(self) -> None:
        """
        With a snapshot, the worker gets ``--config-fd N`` (after the
        listeners) on a descriptor holding exactly those bytes from the
        start; the supervisor's copy is closed once spawned.
        """
        from twisted.internet.testing import MemoryReactor

        seen = []

        class Reactor(MemoryReactor):
            def spawnProcess(self, proto, executable, args, env=None, childFDs=None, **kw):
                fd = childFDs[int(args[args.index("--config-fd") + 1])]
                seen.append((args[args.index("--listener") + 1], args[args.index("--config-fd") + 1],
                             os.read(fd, 100), fd))
                return FakeProcess(1)

            def adoptStreamConnection(self, fd, family, factory):
                pass

        spawner = ProcessSpawner(Reactor(), "/x.toml", snapshot=lambda: b"[proxy]\nworkers = 2\n")
        spawner.spawn(0, 1, {"edge": 0}, None, lambda status, error=None: None)
        self.assertEqual(seen[0][:3], ("edge=4", "5", b"[proxy]\nworkers = 2\n"))
        self.assertRaises(OSError, os.fstat, seen[0][3])


class CannotStartTests(SynchronousTestCase):
    def test_worker_that_exits_at_once(self) -> None:
        """
        A worker that exits at once every time: each attempt is logged once
        with its exit status and last stderr line, counted, and waited for
        (0.5, 1, 2 s ...); meanwhile /status lists its index as waiting
        (pid 0, due time, restarts, last exit) beside the worker that runs.
        """
        events = []
        from twisted.logger import formatEvent, globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        workers, spawner, clock, registry = _set(2)
        workers.start()
        for attempt in range(3):
            n = len(spawner.spawned) - 1 if attempt else 0
            spawner.spawned[n][4]("exit status 1", error="worker 0: cannot start: no key")
            status = workers.status()
            self.assertEqual([(w["index"], w["state"], w["pid"]) for w in status], [(0, "waiting", 0), (1, "starting", 1002)])
            self.assertEqual(status[0]["restarts"], attempt + 1)
            self.assertEqual(status[0]["started"], clock.seconds() + BACKOFF_FIRST * 2 ** attempt)
            self.assertEqual(status[0]["last_exit"], "exit status 1; last line on stderr: worker 0: cannot start: no key")
            clock.advance(BACKOFF_FIRST * 2 ** attempt)
            self.assertEqual([w["state"] for w in workers.status()], ["starting", "starting"])
        lines = [formatEvent(e) for e in events if "exited unexpectedly" in e.get("log_format", "")]
        self.assertEqual(len(lines), 3)
        self.assertIn("exit status 1; last line on stderr: worker 0: cannot start: no key; spawning it again in 2.0 s",
                      lines[2])
        self.assertEqual(registry.get_sample_value("shardtcp_worker_restarts_total", {"index": "0"}), 3.0)
