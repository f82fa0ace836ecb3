"""
Connection rate driven by ``wrk`` with ``Connection: close``: every request
is a new TCP connection and a full TLS handshake through the target.

Targets, side by side in one run: direct, shardtcp passthrough (SNI peek +
PROXY v2 with the signed PolicyContext), HAProxy (``req.ssl_sni`` +
``send-proxy-v2``) and Twisted's stock ``portforward`` (no peek, no header).
The backend is HAProxy terminating TLS and answering ``200``; the targets
that send a PROXY header reach its ``accept-proxy`` port, so the header is
checked by a real receiver.  Reported: requests (= connections) per second,
latency, and the proxy's CPU from ``/proc`` in microseconds per connection.

CPU time on a shared machine moves with its load (fewer connections per
wake-up when the proxy is starved), so where ``valgrind`` is installed the
run also counts the instructions shardtcp and ``portforward`` execute per
connection: each started again under ``callgrind`` with counting off, 20
connections to warm up, then counting on for a fixed number of sequential
connections (TLS handshake + GET + close).  Instruction counts repeat within
a few per cent whatever the load.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Optional

from bench import clients, measure, targets
from bench.lab import SERVICE_NAME, BenchError, Lab, bin_path, free_port, say
from bench.report import fmt, ratio, table

TARGETS = ("direct", "shardtcp", "haproxy", "portforward")


def run(lab: Lab, settings: dict) -> dict:
    seconds = settings["wrk_seconds"]
    concurrency = settings["wrk_connections"]
    backend = targets.start_https_backend(lab)
    port = free_port()
    config = targets.shardtcp_config(lab, [targets.listener("edge", port, "passthrough")],
                                     [targets.Shard("bench-shard-1", f"127.0.0.1:{backend.proxied}")])
    shardtcp, _ = targets.start_shardtcp(lab, "shardtcp-passthrough", config, port)
    found = {
        "direct": targets.Target("direct", backend.plain, None),
        "shardtcp": shardtcp,
        "haproxy": targets.start_haproxy_sni(lab, backend.proxied),
        "portforward": targets.start_portforward(lab, "portforward-https", backend.plain),
    }
    rounds = settings["rounds"]
    results: dict = {"seconds": seconds, "connections": concurrency, "rounds": rounds, "targets": {}}
    for name in TARGETS:
        clients.wrk(found[name].port, 1, concurrency)  # warm up, and prove the path works
    # Rounds interleave the targets, so that a change in the machine's load
    # falls on all of them; each target keeps its median round.
    kept: dict = {name: [] for name in TARGETS}
    for round_ in range(rounds):
        for name in TARGETS:
            target = found[name]
            before = measure.cpu(target.pid) if target.pid else None
            r = clients.wrk(target.port, seconds, concurrency)
            used = measure.cpu(target.pid) - before if target.pid else None
            if target.process is not None:
                lab.alive(name, target.process)
            if r.socket_errors or r.non_2xx or r.requests < 10:
                raise BenchError(f"wrk through {name}: {r.requests} requests, {r.socket_errors} socket errors, "
                                 f"{r.non_2xx} non-2xx answers")
            row = {"requests": r.requests, "conn_s": r.rate, "p50_ms": r.latency_p50_ms, "p99_ms": r.latency_p99_ms}
            if used is not None:
                row["cpu_us_per_conn"] = measure.per(used, r.requests, 1e6)
            kept[name].append(row)
            say(f"wrk {name} (round {round_ + 1}/{rounds}): {r.rate:.0f} connections/s"
                + (f", proxy {row['cpu_us_per_conn']['total']:.0f} µs CPU per connection" if used else ""))
    for name, rows in kept.items():
        key = (lambda row: row["cpu_us_per_conn"]["total"]) if found[name].pid else (lambda row: -row["conn_s"])
        results["targets"][name] = sorted(rows, key=key)[len(rows) // 2]
    results["by_round"] = [
        {"shardtcp/portforward": ratio(kept["shardtcp"][i]["cpu_us_per_conn"]["total"],
                                       kept["portforward"][i]["cpu_us_per_conn"]["total"]),
         "shardtcp/haproxy": ratio(kept["shardtcp"][i]["cpu_us_per_conn"]["total"],
                                   kept["haproxy"][i]["cpu_us_per_conn"]["total"])}
        for i in range(rounds)
    ]
    for name in ("shardtcp", "haproxy", "portforward"):
        lab.stop(found[name].process)
    t = results["targets"]
    cpu = {n: t[n]["cpu_us_per_conn"]["total"] for n in ("shardtcp", "haproxy", "portforward")}
    results["ratios"] = {
        "shardtcp/portforward": ratio(cpu["shardtcp"], cpu["portforward"]),
        "shardtcp/haproxy": ratio(cpu["shardtcp"], cpu["haproxy"]),
    }
    results["instructions"] = instructions(lab, config, backend, 100 if settings["quick"] else 300)
    return results


# -- instruction counts ----------------------------------------------------

WARM_UP = 20


def _one_connection(lab: Lab, port: int) -> None:
    """One TLS handshake, ``GET /`` with ``Connection: close``, the answer to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        with lab.client_context.wrap_socket(raw, server_hostname=SERVICE_NAME) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while len(answer) < 65536:
                data = tls.recv(4096)
                if not data:
                    break
                answer += data
    if b" 200 " not in answer.split(b"\r\n", 1)[0] + b" ":
        raise BenchError(f"no 200 answer through 127.0.0.1:{port}: {answer[:80]!r}")


def _counted(lab: Lab, name: str, twistd_args: list, port: int, count: int) -> float:
    """Instructions per connection of ``twistd -n ARGS`` under callgrind, over ``count`` connections."""
    out = lab.path(f"{name}.callgrind")
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, bin_path("twistd"), "-n", "--pidfile=", "--logfile", lab.path(f"{name}.log"),
            *twistd_args]
    process = lab.spawn(name, argv)
    try:
        lab.wait_listening(name, process, port, timeout=300.0)
        for _ in range(WARM_UP):
            _one_connection(lab, port)
        control = shutil.which("callgrind_control")
        subprocess.run([control, "-i", "on", str(process.pid)], check=True, capture_output=True, timeout=60)
        for _ in range(count):
            _one_connection(lab, port)
        time.sleep(0.5)  # the last close's events
        subprocess.run([control, "-i", "off", str(process.pid)], check=True, capture_output=True, timeout=60)
        subprocess.run([control, "-d", str(process.pid)], check=True, capture_output=True, timeout=60)
        lab.alive(name, process)
    finally:
        lab.stop(process)
    total = 0
    for path in glob.glob(out + "*"):
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
    if not total:
        raise BenchError(f"callgrind counted nothing for {name}: {lab.output(name)}")
    return total / count


def instructions(lab: Lab, config: str, backend, count: int) -> Optional[dict]:
    """Instructions per connection of shardtcp and portforward, or None without valgrind."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        say("valgrind not installed: no instruction counts")
        return None
    port = free_port()
    config = config.replace(f'"tcp:{_listen_port(config)}:', f'"tcp:{port}:', 1)
    path = os.path.join(lab.workdir, "shardtcp-counted.toml")
    with open(path, "w") as f:
        f.write(config)
    found = {"connections": count}
    found["shardtcp"] = _counted(lab, "shardtcp-counted", ["shardtcp", "--config", path], port, count)
    port = free_port()
    found["portforward"] = _counted(
        lab, "portforward-counted",
        ["portforward", "--port", f"tcp:{port}:interface=127.0.0.1", "--host", "127.0.0.1",
         "--dest_port", str(backend.plain)], port, count)
    found["shardtcp/portforward"] = ratio(found["shardtcp"], found["portforward"])
    say(f"callgrind: shardtcp {found['shardtcp']:,.0f}, portforward {found['portforward']:,.0f} "
        f"instructions per connection")
    return found


def _listen_port(config: str) -> str:
    return config.split('listen = "tcp:', 1)[1].split(":", 1)[0]


def report(r: dict) -> str:
    t = r["targets"]
    rows = [
        ["connections/s"] + [fmt(t[n]["conn_s"], ".0f") for n in TARGETS],
        ["latency p50 ms"] + [fmt(t[n]["p50_ms"], ".2f") for n in TARGETS],
        ["latency p99 ms"] + [fmt(t[n]["p99_ms"], ".2f") for n in TARGETS],
        ["proxy CPU µs/connection"] + [fmt(t[n].get("cpu_us_per_conn", {}).get("total"), ".0f") for n in TARGETS],
        ["  of which user / sys"] + [
            "-" if "cpu_us_per_conn" not in t[n]
            else f"{t[n]['cpu_us_per_conn']['user']:.0f} / {t[n]['cpu_us_per_conn']['sys']:.0f}" for n in TARGETS],
        ["connections measured"] + [str(t[n]["requests"]) for n in TARGETS],
    ]
    out = table(f"Connection rate: wrk, {r['connections']} connections, {r['seconds']:.0f} s, "
                "TLS handshake + GET + Connection: close", ["", *TARGETS], rows)
    ra = r["ratios"]
    out += (f"\n\nproxy CPU per connection (median of {r.get('rounds', 1)} round{'' if r.get('rounds', 1) == 1 else 's'}): "
            f"shardtcp/portforward {ra['shardtcp/portforward']:.2f}, shardtcp/haproxy {ra['shardtcp/haproxy']:.2f}")
    if len(r.get("by_round", ())) > 1:
        out += "; by round, shardtcp/portforward " + ", ".join(
            f"{each['shardtcp/portforward']:.2f}" for each in r["by_round"])
    counted = r.get("instructions")
    if counted:
        out += (f"\n\ninstructions per connection (callgrind, {counted['connections']} sequential connections): "
                f"shardtcp {counted['shardtcp']:,.0f}, portforward {counted['portforward']:,.0f}, "
                f"shardtcp/portforward {counted['shardtcp/portforward']:.2f}")
    return out
