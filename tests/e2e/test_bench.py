"""
``python bench/run.py``, as README.rst and docs/performance.rst tell a
reader to run it: here its quickest run (``--quick --only micro``), which
measures the per-connection codecs in process, writes every figure as
JSON and ends with the issue 10 goals table.  The longer runs (wrk,
HAProxy, callgrind) share its driver, report and goals table.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.trial.unittest import TestCase

from tests.e2e import harness as e2e


class BenchRunTests(TestCase):
    timeout = 180

    async def _bench(self, *args: str):
        """``python bench/run.py ARGS --json FILE``, which must exit 0: the child and the JSON it wrote."""
        out = os.path.abspath(self.mktemp())
        child = e2e.spawn(
            self, [sys.executable, os.path.join(e2e.REPO_ROOT, "bench", "run.py"), *args, "--json", out],
            env=e2e.child_environment(), cwd=e2e.REPO_ROOT, timeout=170,
        )
        self.assertEqual(await child.ended, 0, child.err[-2000:])
        with open(out) as f:
            return child, json.load(f)

    async def test_quick_micro_run(self) -> None:
        """
        The run exits 0, its JSON holds positive timings for each codec on
        the connection path, the ClientHello and header sizes it measured,
        and its output ends with the goals table, every goal it did not
        measure said so.
        """
        child, results = await self._bench("--quick", "--only", "micro", "--rounds", "2")
        micro = results["micro"]
        for key in ("clienthello_parse", "policy_sign", "ed25519_sign", "proxyv2_encode", "proxyv2_parse",
                    "verify_bytes", "ed25519_verify"):
            self.assertGreater(micro[key], 0, key)
            self.assertLess(micro[key], 100_000, key)
        self.assertEqual(micro["client_hello_bytes"], 517)
        self.assertGreater(micro["proxyv2_header_bytes"], 16)
        self.assertTrue(results["settings"]["quick"])
        self.assertEqual(results["settings"]["rounds"], 2)
        text = child.out.decode()
        self.assertIn("Issue 10 goals in this run", text)
        goals = text[text.index("Issue 10 goals in this run"):]
        self.assertIn("1. CPU/GiB client -> shard <= HAProxy with splice", goals)
        self.assertIn("5. memory per idle spliced connection <= 4 KiB", goals)
        rows = [line for line in goals.splitlines() if line[:1].isdigit()]
        self.assertGreaterEqual(len(rows), 12)
        # The micro run measures no goal: each row says so rather than guess.
        self.assertEqual([row for row in rows if not row.rstrip().endswith("not measured")], [])

    async def test_bulk_rounds(self) -> None:
        """
        ``python bench/run.py --only bulk_plain --rounds N`` (here quick,
        N = 2): every proxy's CPU per GiB in each of the two rounds, each
        way, the median kept, and goal 1 judged, not left unmeasured.
        """
        child, results = await self._bench("--quick", "--only", "bulk_plain", "--rounds", "2")
        bulk = results["bulk_plain"]
        self.assertEqual((bulk["rounds"], bulk["mib"]), (2, 256))
        for name in ("shardtcp", "haproxy", "haproxy-splice", "portforward"):
            for direction in ("up", "down"):
                row = bulk["targets"][name][direction]
                rounds = row["rounds_cpu_s_per_gib"]
                self.assertEqual(len(rounds), 2, (name, direction))
                self.assertTrue(all(value > 0 for value in rounds), (name, direction))
                self.assertIn(row["cpu_s_per_gib"]["total"], rounds)
        goals = child.out.decode()
        for label in ("client -> shard", "shard -> client"):
            [line] = [line for line in goals.splitlines() if line.startswith(f"1. CPU/GiB {label}")]
            self.assertRegex(line, r"(met|missed by [0-9.]+x)\s*$")

    async def test_rounds_below_one_refused(self) -> None:
        """``--rounds 0`` is refused before anything starts: exit status 2 and the reason."""
        child = e2e.spawn(
            self, [sys.executable, os.path.join(e2e.REPO_ROOT, "bench", "run.py"), "--only", "micro", "--rounds", "0"],
            env=e2e.child_environment(), cwd=e2e.REPO_ROOT, timeout=60,
        )
        self.assertEqual(await child.ended, 2)
        self.assertIn(b"--rounds must be at least 1", child.err)
        self.assertEqual(child.out, b"")


class KernelSpliceMicroTests(TestCase):
    timeout = 180

    async def test_every_mode_moves_every_byte(self) -> None:
        """
        ``python bench/ksplice_micro.py --mode all --rounds 2`` (here 20 MiB
        a run): the kernel splice, the userspace splice, the bare Python
        loop and HAProxy with splice each move every byte both ways (the
        kernel splice twice: through its C loop and its pure-Python one), and
        each row gives the proxy's CPU per GiB and both rounds.
        """
        child = e2e.spawn(
            self, [sys.executable, os.path.join(e2e.REPO_ROOT, "bench", "ksplice_micro.py"), "--gib", "0.02",
                   "--mode", "all", "--rounds", "2"],
            env=e2e.child_environment(), cwd=e2e.REPO_ROOT, timeout=170,
        )
        self.assertEqual(await child.ended, 0, child.err[-2000:])
        lines = child.out.decode().splitlines()
        self.assertTrue(lines[0].startswith("mode"), lines)
        rows = [line.split() for line in lines[1:]]
        self.assertEqual([(r[0], r[1]) for r in rows],
                         [(m, d) for m in ("kernel", "python", "userspace", "floor", "haproxy") for d in ("up", "down")])
        for row in rows:
            self.assertEqual(row[2], "0.02", row)
            self.assertGreater(float(row[3]), 0.0, row)
            self.assertGreaterEqual(float(row[5]), 0.0, row)  # user s/GiB
            if row[0] != "haproxy":  # HAProxy's user time comes in 10 ms ticks: too coarse for 20 MiB
                self.assertLessEqual(float(row[5]), float(row[4]) + 0.05, row)  # a part of the rusage total
            self.assertEqual(len(row), 9, row)  # six columns and two rounds: nothing cut short or lost
