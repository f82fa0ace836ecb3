"""
The supervisor's service tree in memory (``build_supervisor`` over a
``MemoryReactorClock`` and a fake spawner): SIGUSR1 reopens the
supervisor's own files and reaches every worker; a second SIGTERM reaches
every worker still there, retiring ones too.  The signal handlers are the
ones twistd's root installs (``SignalHandlers``), called as the signals
would call them.
"""

from __future__ import annotations

import os
import signal

from twisted.internet.testing import MemoryReactorClock
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import keys
from shardtcp.config import load_config
from shardtcp.workers import supervisor
from shardtcp.workers.supervisor import build_supervisor
from tests.workers.test_supervisor import FakeChannel, FakeSpawner


class _HeldPort:
    """What a held listener needs of its port without a socket."""

    def fileno(self) -> int:
        return 7

    def stopListening(self):
        return None


def _held_listen(service) -> None:
    service.port = _HeldPort()


class SignalTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        paths = keys.generate_keypair(os.path.join(directory, "keys"), kid="policy-1")
        self.access = os.path.join(directory, "access.log")
        path = os.path.join(directory, "shardtcp.toml")
        with open(path, "w") as f:
            f.write(
                f'[proxy]\nid = "edge-1"\nworkers = 2\n[signing]\nprivate_key = "{paths.private_key}"\n'
                f'kid = "policy-1"\n[log]\naccess_file = "{self.access}"\n'
                '[admin]\nlisten = "tcp:0:interface=127.0.0.1"\n'
                '[[listener]]\nname = "edge"\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "plain"\n'
                'identify = ["line"]\n'
                '[service.api]\nnames = ["api.example.test"]\n'
                '[[service.api.shard]]\nid = "api-a"\naddress = "127.0.0.1:1"\n'
            )
        # The handlers install themselves for real: put trial's back afterwards.
        for number in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
        self.patch(supervisor.HeldListeningService, "listen", _held_listen)
        self.spawner = FakeSpawner()
        self.reactor = MemoryReactorClock()
        self.root = build_supervisor(load_config(path), self.reactor, spawner=self.spawner)
        self.root.handle_signals = True
        self.root.startService()
        self.log_path = os.path.join(directory, "twistd.log")
        self.root.signals.log_file = LogFile.fromFullPath(self.log_path)
        self.addCleanup(self.root.signals.log_file.close)

    def _stop(self):
        d = self.root.stopService()
        for n in range(len(self.spawner.spawned)):
            if not self.spawner.spawned[n][3].exited:
                self.spawner.exit(n, "exit status 0")
        self.successResultOf(d)

    def test_sigusr1_reopens_own_files_and_reaches_every_worker(self) -> None:
        """
        SIGUSR1: the access log and twistd's log file, moved away as
        logrotate does, are opened again at their paths, and each of the
        two workers is sent SIGUSR1 exactly once.
        """
        self.assertEqual([(i, g, fds) for i, g, fds, _, _ in self.spawner.spawned], [(0, 1, {"edge": 7}), (1, 1, {"edge": 7})])
        os.rename(self.access, self.access + ".1")
        os.rename(self.log_path, self.log_path + ".1")
        self.root.signals.reopen_log()
        self.assertTrue(os.path.exists(self.access))
        self.assertTrue(os.path.exists(self.log_path))
        self.assertEqual([s[3].signals for s in self.spawner.spawned], [["USR1"], ["USR1"]])
        self._stop()

    def test_second_sigterm_reaches_every_worker(self) -> None:
        """
        The first SIGTERM stops the reactor (whose shutdown stops the tree:
        SIGTERM to each worker); a second one sends every worker still there
        SIGTERM again (each closes what it still holds), the retiring worker
        of a replaced generation too; nothing is spawned meanwhile.
        """
        workers = self.root.workers
        for w in workers.workers:
            workers.hello(w, FakeChannel(), w.pid)
            workers.ready(w)
        workers.replace()
        workers.ready(workers.workers[2])
        self.assertEqual(workers.workers[0].state, "draining")
        self.root.signals.terminate("SIGTERM")
        self.assertTrue(self.reactor.hasStopped)
        d = self.root.stopService()
        self.assertEqual([s[3].signals for s in self.spawner.spawned], [["TERM"]] * 4)
        self.spawner.exit(3, "exit status 0")
        self.root.signals.terminate("SIGTERM")
        self.assertEqual([s[3].signals for s in self.spawner.spawned],
                         [["TERM", "TERM"], ["TERM", "TERM"], ["TERM", "TERM"], ["TERM"]])
        self.assertNoResult(d)
        for n in range(3):
            self.spawner.exit(n, "exit status 0")
        self.successResultOf(d)
        self.assertEqual(len(self.spawner.spawned), 4)
