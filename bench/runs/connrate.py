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
"""

from __future__ import annotations

from bench import clients, measure, targets
from bench.lab import BenchError, Lab, free_port, say
from bench.report import fmt, ratio, table

TARGETS = ("direct", "shardtcp", "haproxy", "portforward")


def run(lab: Lab, settings: dict) -> dict:
    seconds = settings["wrk_seconds"]
    concurrency = settings["wrk_connections"]
    backend = targets.start_https_backend(lab)
    port = free_port()
    shardtcp, _ = targets.start_shardtcp(
        lab, "shardtcp-passthrough",
        targets.shardtcp_config(lab, [targets.listener("edge", port, "passthrough")],
                                [targets.Shard("bench-shard-1", f"127.0.0.1:{backend.proxied}")]),
        port)
    found = {
        "direct": targets.Target("direct", backend.plain, None),
        "shardtcp": shardtcp,
        "haproxy": targets.start_haproxy_sni(lab, backend.proxied),
        "portforward": targets.start_portforward(lab, "portforward-https", backend.plain),
    }
    results: dict = {"seconds": seconds, "connections": concurrency, "targets": {}}
    for name in TARGETS:
        target = found[name]
        clients.wrk(target.port, 1, concurrency)  # warm up, and prove the path works
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
        results["targets"][name] = row
        say(f"wrk {name}: {r.rate:.0f} connections/s"
            + (f", proxy {row['cpu_us_per_conn']['total']:.0f} µs CPU per connection" if used else ""))
    for name in ("shardtcp", "haproxy", "portforward"):
        lab.stop(found[name].process)
    t = results["targets"]
    cpu = {n: t[n]["cpu_us_per_conn"]["total"] for n in ("shardtcp", "haproxy", "portforward")}
    results["ratios"] = {
        "shardtcp/portforward": ratio(cpu["shardtcp"], cpu["portforward"]),
        "shardtcp/haproxy": ratio(cpu["shardtcp"], cpu["haproxy"]),
    }
    return results


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
    return out + (f"\n\nproxy CPU per connection: shardtcp/portforward {ra['shardtcp/portforward']:.2f}, "
                  f"shardtcp/haproxy {ra['shardtcp/haproxy']:.2f}")
