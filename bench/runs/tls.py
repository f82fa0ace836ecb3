"""
The TLS passthrough runs kept from the first bench, so that figures stay
comparable with the history in ``docs/performance.rst``: bulk throughput
over one TLS connection, short TLS connections with a 64-byte echo (one at
a time and several at a time), and the proxy's memory with many idle
connections held open.  Targets: direct, shardtcp (passthrough, SNI peek,
PROXY v2 with the signed PolicyContext) and HAProxy (``req.ssl_sni``,
``send-proxy-v2``), in front of the bench backend speaking TLS.
"""

from __future__ import annotations

import time

from bench import clients, measure, targets
from bench.lab import BenchError, Lab, free_port, say
from bench.report import fmt, ratio, table

TARGETS = ("direct", "shardtcp", "haproxy")
PROXIES = ("shardtcp", "haproxy")
GIB = 1024 ** 3


def run(lab: Lab, settings: dict) -> dict:
    backend = targets.start_backend(lab, "backend-tls", tls=True)
    port = free_port()
    shardtcp, _ = targets.start_shardtcp(
        lab, "shardtcp-tls",
        targets.shardtcp_config(lab, [targets.listener("edge", port, "passthrough")],
                                [targets.Shard("bench-shard-1", f"127.0.0.1:{backend.port}")]),
        port)
    found = {"direct": backend, "shardtcp": shardtcp, "haproxy": targets.start_haproxy_sni(lab, backend.port)}
    context = lab.client_context
    idle = {n: measure.rss_kib(found[n].pid) for n in PROXIES}
    for name, target in found.items():
        clients.echo(name, target.port, context)
    results: dict = {"bulk_mib": settings["tls_bulk_mib"], "rounds": settings["rounds"], "bulk": {}, "connect": {},
                     "memory": {}}
    size = settings["tls_bulk_mib"] * clients.MIB
    for direction in ("up", "down"):
        for _ in range(settings["rounds"]):
            for name in TARGETS:
                target = found[name]
                before: list = []
                seconds = clients.bulk(target.port, context, direction, size,
                                       on_start=lambda: before.append(measure.cpu(target.pid) if target.pid else None))
                row = {"mib_s": settings["tls_bulk_mib"] / seconds}
                if target.pid:
                    lab.alive(name, target.process)
                    row["cpu_s_per_gib"] = measure.per(measure.cpu(target.pid) - before[0], size / GIB)
                kept = results["bulk"].setdefault(name, {}).get(direction)
                if kept is None or row["mib_s"] > kept["mib_s"]:
                    results["bulk"][name][direction] = row
        say(f"bulk TLS {direction}: " + ", ".join(
            f"{n} {results['bulk'][n][direction]['mib_s']:.0f} MiB/s" for n in TARGETS))

    for name in TARGETS:
        for _ in range(20):  # warm up
            clients.one_request(found[name].port, context, b"w" * clients.ECHO_SIZE)
    for mode, concurrency in (("one at a time", 1), (f"{settings['concurrency']} at a time", settings["concurrency"])):
        for name in TARGETS:
            target = found[name]
            before = measure.cpu(target.pid) if target.pid else None
            row = clients.echo_connections(target.port, context, settings["connections"], concurrency,
                                           settings["time_limit"])
            if target.pid:
                lab.alive(name, target.process)
                row["cpu_ms_per_conn"] = measure.per(measure.cpu(target.pid) - before, row["connections"], 1e3)
            results["connect"].setdefault(mode, {})[name] = row
        say(f"TLS echo connections {mode}: " + ", ".join(
            f"{n} {results['connect'][mode][n]['conn_s']:.0f}/s" for n in TARGETS))

    for name in PROXIES:
        results["memory"][name] = _hold(found[name], context, settings["hold"])
        results["memory"][name]["rss_idle_start_kib"] = idle[name]
        say(f"memory {name}: {results['memory'][name]['kib_per_conn']:.1f} KiB per held connection")
    for name in PROXIES:
        lab.stop(found[name].process)
    lab.stop(backend.process)
    return results


def _hold(target: targets.Target, context, count: int, time_limit: float = 60.0) -> dict:
    """RSS of the proxy before, while holding ``count`` open connections, and after."""
    time.sleep(1.0)  # let connections of earlier runs finish closing
    before = measure.rss_kib(target.pid)
    held: list = []
    try:
        t0 = time.perf_counter()
        for _ in range(count):
            if time.perf_counter() - t0 > time_limit:
                raise BenchError(f"only {len(held)} of {count} connections opened through {target.name} "
                                 f"in {time_limit:.0f}s")
            sock = clients.connect(target.port, context)
            held.append(sock)
            sock.sendall(clients.OP.pack(b"H", 0))
        time.sleep(1.0)
        during = measure.rss_kib(target.pid)
    except OSError as e:
        raise BenchError(f"holding connection {len(held) + 1} through {target.name}: {e}") from e
    finally:
        for sock in held:
            sock.close()
    time.sleep(2.0)
    return {"held": len(held), "rss_before_kib": before, "rss_held_kib": during,
            "rss_after_kib": measure.rss_kib(target.pid), "kib_per_conn": (during - before) / len(held)}


def report(r: dict) -> str:
    b = r["bulk"]
    head = ["", *TARGETS, "shardtcp/direct", "shardtcp/haproxy"]
    rows = []
    for d, label in (("up", "client -> shard"), ("down", "shard -> client")):
        rows.append([f"{label}, MiB/s"] + [fmt(b[n][d]["mib_s"], ".0f") for n in TARGETS]
                    + [fmt(ratio(b["shardtcp"][d]["mib_s"], b[o][d]["mib_s"]), ".2f") for o in ("direct", "haproxy")])
        cpu = {n: b[n][d]["cpu_s_per_gib"]["total"] for n in PROXIES}
        rows.append([f"{label}, proxy CPU s/GiB", "-", fmt(cpu["shardtcp"], ".2f"), fmt(cpu["haproxy"], ".2f"), "-",
                     fmt(ratio(cpu["shardtcp"], cpu["haproxy"]), ".2f")])
    out = [table(f"TLS bulk: {r['bulk_mib']} MiB over one TLS connection, best of {r['rounds']}", head, rows)]
    rows = []
    # One at a time first, whatever order the figures were stored in (JSON).
    for mode in sorted(r["connect"], key=lambda m: 1 if m.startswith("one") else int(m.split()[0])):
        c = r["connect"][mode]
        rows.append([f"{mode}: connections/s"] + [fmt(c[n]["conn_s"], ".0f") for n in TARGETS]
                    + [fmt(ratio(c["shardtcp"]["conn_s"], c[o]["conn_s"]), ".2f") for o in ("direct", "haproxy")])
        for key, label in (("ttfb_p50_ms", "first byte p50 ms"), ("ttfb_p99_ms", "first byte p99 ms")):
            rows.append([f"{mode}: {label}"] + [fmt(c[n][key], ".2f") for n in TARGETS]
                        + [fmt(ratio(c["shardtcp"][key], c[o][key]), ".2f") for o in ("direct", "haproxy")])
        cpu = {n: c[n]["cpu_ms_per_conn"]["total"] for n in PROXIES}
        rows.append([f"{mode}: proxy CPU ms/connection", "-", fmt(cpu["shardtcp"], ".2f"), fmt(cpu["haproxy"], ".2f"),
                     "-", fmt(ratio(cpu["shardtcp"], cpu["haproxy"]), ".1f")])
        rows.append([f"{mode}: connections"] + [
            f"{c[n]['connections']}{'*' if c[n]['stopped_by_time_limit'] else ''}" for n in TARGETS])
    out.append(table("TLS connections: handshake, 64-byte echo, close", head, rows))
    if any(c[n]["stopped_by_time_limit"] for c in r["connect"].values() for n in TARGETS):
        out.append("\n\\* stopped by the time limit before all connections were made")
    m = r["memory"]
    rows = []
    for key, label, spec in (("rss_idle_start_kib", "idle, at start", "d"), ("rss_before_kib", "before holding", "d"),
                             ("rss_held_kib", f"with {m['shardtcp']['held']} held", "d"),
                             ("rss_after_kib", "after they closed", "d"), ("kib_per_conn", "per held connection", ".1f")):
        rows.append([label] + [fmt(m[n][key], spec) for n in PROXIES]
                    + [fmt(ratio(m["shardtcp"][key], m["haproxy"][key]), ".2f")])
    out.append(table("Proxy memory, resident set KiB", ["", *PROXIES, "shardtcp/haproxy"], rows))
    return "\n\n".join(out)
