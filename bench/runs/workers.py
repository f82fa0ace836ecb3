"""
Worker processes (``[proxy] workers``, SPEC section 8): 1 and 2 workers
side by side, once shardtcp has them.

Until then this run proves that they are not there: it asks
``shardtcp check-config`` about a configuration with ``workers = 2`` and
reports the run as not available with the answer it got.  When the key is
accepted the run fails loudly, so that this module is replaced by a real
measurement instead of reporting "not available" forever.
"""

from __future__ import annotations

import subprocess

from bench import targets
from bench.lab import BenchError, Lab, bin_path


def run(lab: Lab, settings: dict) -> dict:
    text = targets.shardtcp_config(lab, [targets.listener("edge", 1, "passthrough")],
                                   [targets.Shard("bench-shard-1", "127.0.0.1:1")])
    text = text.replace('id = "edge-bench-1"\n', 'id = "edge-bench-1"\nworkers = 2\n', 1)
    path = lab.path("workers.toml")
    with open(path, "w") as f:
        f.write(text)
    done = subprocess.run([bin_path("shardtcp"), "check-config", path], capture_output=True, text=True, timeout=60)
    answer = (done.stdout + done.stderr).strip().splitlines()
    if done.returncode == 0:
        raise BenchError("check-config accepts [proxy] workers now: write the workers run (bench/runs/workers.py)")
    return {"available": False, "reason": "; ".join(line for line in answer if "workers" in line) or answer[-1]}


def report(r: dict) -> str:
    return ("Worker processes (1 and 2 workers)\n~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~\n\n"
            f"not available: shardtcp has no worker processes yet (check-config: {r['reason']})")
