"""
Worker processes (``[proxy] workers``, SPEC section 8): shardtcp with 1 and
with 2 workers side by side, driven by ``wrk`` with ``Connection: close``
(every request a new TCP connection and TLS handshake, passthrough with SNI
peek and PROXY v2) against the HTTPS backend ``connrate`` uses.

Reported per setting: connections per second, latency, and the proxy's CPU
from ``/proc`` in microseconds per connection, summed over every process of
the proxy (with 2 workers: the supervisor and both workers), and how the
connections were shared between the workers (from each worker's own CPU).
On a 2-core machine wrk and the backend share the cores with the proxy, so
the rate says less than the CPU per connection.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

from bench import clients, measure, targets
from bench.lab import BenchError, Lab, free_port, say
from bench.report import fmt, ratio, table

SETTINGS = (1, 2)


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (a supervisor's workers)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(name))
    return sorted(found)


def _wait_ready(admin_port: int, count: int, timeout: float = 60.0) -> None:
    """Wait until ``/status`` lists ``count`` ready workers (workers start in a few seconds)."""
    deadline = time.monotonic() + timeout
    workers: list = []
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status", timeout=5) as response:
                workers = json.load(response)["workers"]
        except OSError:
            workers = []
        if isinstance(workers, list) and sum(1 for w in workers if w["state"] == "ready") == count:
            return
        time.sleep(0.1)
    raise BenchError(f"{count} workers not ready within {timeout:.0f} s: {workers}")


def _cpu(pids: list[int]) -> dict:
    return {pid: measure.cpu(pid) for pid in pids}


def run(lab: Lab, settings: dict) -> dict:
    seconds = settings["wrk_seconds"]
    concurrency = settings["wrk_connections"]
    backend = targets.start_https_backend(lab)
    results: dict = {"seconds": seconds, "connections": concurrency, "settings": {}}
    for workers in SETTINGS:
        port = free_port()
        text = targets.shardtcp_config(lab, [targets.listener("edge", port, "passthrough")],
                                       [targets.Shard("bench-shard-1", f"127.0.0.1:{backend.proxied}")])
        text = text.replace('id = "edge-bench-1"\n', f'id = "edge-bench-1"\nworkers = {workers}\n', 1)
        admin_port = free_port()
        text += f'\n[admin]\nlisten = "tcp:{admin_port}:interface=127.0.0.1"\n'
        target, _ = targets.start_shardtcp(lab, f"shardtcp-workers-{workers}", text, port)
        if workers > 1:
            _wait_ready(admin_port, workers)
        clients.wrk(target.port, 1, concurrency)  # warm up; the workers have started by now
        pids = [target.pid] + _children(target.pid)
        if len(pids) != (1 if workers == 1 else 1 + workers):
            raise BenchError(f"workers = {workers}: expected {workers} worker processes, found pids {pids[1:]}")
        before = _cpu(pids)
        r = clients.wrk(target.port, seconds, concurrency)
        after = _cpu(pids)
        lab.alive(f"shardtcp-workers-{workers}", target.process)
        if r.socket_errors or r.non_2xx or r.requests < 10:
            raise BenchError(f"wrk through {workers} workers: {r.requests} requests, {r.socket_errors} socket "
                             f"errors, {r.non_2xx} non-2xx answers")
        used = {pid: after[pid] - before[pid] for pid in pids}
        total = sum(used.values(), measure.Cpu(0.0, 0.0, 0.0))
        row = {
            "requests": r.requests, "conn_s": r.rate, "p50_ms": r.latency_p50_ms, "p99_ms": r.latency_p99_ms,
            "cpu_us_per_conn": measure.per(total, r.requests, 1e6),
            "supervisor_cpu_s": used[target.pid].total,
            "worker_cpu_s": [used[pid].total for pid in pids[1:]],
        }
        results["settings"][str(workers)] = row
        say(f"wrk, {workers} worker(s): {r.rate:.0f} connections/s, "
            f"proxy {row['cpu_us_per_conn']['total']:.0f} µs CPU per connection")
        lab.stop(target.process)
    s = results["settings"]
    results["ratios"] = {
        "cpu 2/1": ratio(s["2"]["cpu_us_per_conn"]["total"], s["1"]["cpu_us_per_conn"]["total"]),
        "rate 2/1": ratio(s["2"]["conn_s"], s["1"]["conn_s"]),
    }
    return results


def report(r: dict) -> str:
    s = r["settings"]
    names = [str(n) for n in SETTINGS]
    rows = [
        ["connections/s"] + [fmt(s[n]["conn_s"], ".0f") for n in names],
        ["latency p50 ms"] + [fmt(s[n]["p50_ms"], ".2f") for n in names],
        ["latency p99 ms"] + [fmt(s[n]["p99_ms"], ".2f") for n in names],
        ["proxy CPU µs/connection (all processes)"] + [fmt(s[n]["cpu_us_per_conn"]["total"], ".0f") for n in names],
        ["  of which user / sys"] + [
            f"{s[n]['cpu_us_per_conn']['user']:.0f} / {s[n]['cpu_us_per_conn']['sys']:.0f}" for n in names],
        ["supervisor CPU s"] + ["-" if n == "1" else fmt(s[n]["supervisor_cpu_s"], ".2f") for n in names],
        ["workers' CPU s"] + [
            "-" if n == "1" else " / ".join(f"{c:.2f}" for c in s[n]["worker_cpu_s"]) for n in names],
        ["connections measured"] + [str(s[n]["requests"]) for n in names],
    ]
    out = table(f"Worker processes: wrk, {r['connections']} connections, {r['seconds']:.0f} s, "
                "TLS passthrough + Connection: close", ["workers", *names], rows)
    ra = r["ratios"]
    return out + (f"\n\n2 workers / 1 worker: proxy CPU per connection {fmt(ra['cpu 2/1'], '.2f')}, "
                  f"connections/s {fmt(ra['rate 2/1'], '.2f')}")
