"""
Plain-TCP bulk transfer, both directions, one connection at a time.

Targets (interleaved, ``rounds`` times; each keeps its median round):
direct, shardtcp (a ``plain`` listener; the client names the
service in a ``SHARD`` line, and the proxy still writes the PROXY v2 header
with the signed PolicyContext), HAProxy without and with ``option splice-request`` /
``option splice-response``, and Twisted's ``portforward``.  Reported: MiB/s
(noisy on a small machine) and the proxy's CPU seconds per GiB moved, from
``/proc`` (the steadier figure).
"""

from __future__ import annotations

import attrs

from bench import clients, measure, targets
from bench.lab import Lab, free_port, say
from bench.report import fmt, ratio, table

TARGETS = ("direct", "shardtcp", "haproxy", "haproxy-splice", "portforward")
GIB = 1024 ** 3


def run(lab: Lab, settings: dict) -> dict:
    size = settings["bulk_mib"] * clients.MIB
    rounds = settings["rounds"]
    backend = targets.start_backend(lab, "backend-plain", tls=False)
    port = free_port()
    shardtcp, _ = targets.start_shardtcp(
        lab, "shardtcp-plain",
        targets.shardtcp_config(lab, [targets.listener("plain", port, "plain")],
                                [targets.Shard("bench-shard-1", f"127.0.0.1:{backend.port}")]),
        port)
    found = {
        "direct": backend,
        "shardtcp": attrs.evolve(shardtcp, preamble=targets.PLAIN_PREAMBLE),
        "haproxy": targets.start_haproxy_plain(lab, backend.port, splice=False),
        "haproxy-splice": targets.start_haproxy_plain(lab, backend.port, splice=True),
        "portforward": targets.start_portforward(lab, "portforward-plain", backend.port),
    }
    for name, target in found.items():
        clients.echo(name, target.port, None, target.preamble)
    results: dict = {"mib": settings["bulk_mib"], "rounds": rounds, "targets": {n: {} for n in TARGETS}}
    for direction in ("up", "down"):
        # Rounds interleave the targets; each keeps its median round (by
        # proxy CPU per GiB; for direct, by rate), every round listed.
        kept: dict = {name: [] for name in TARGETS}
        for _ in range(rounds):
            for name in TARGETS:
                target = found[name]
                before: list = []
                seconds = clients.bulk(
                    target.port, None, direction, size,
                    on_start=lambda: before.append(measure.cpu(target.pid) if target.pid else None),
                    preamble=target.preamble)
                row = {"mib_s": settings["bulk_mib"] / seconds}
                if target.pid:
                    lab.alive(name, target.process)
                    row["cpu_s_per_gib"] = measure.per(measure.cpu(target.pid) - before[0], size / GIB)
                kept[name].append(row)
        for name, rows in kept.items():
            key = (lambda r: r["cpu_s_per_gib"]["total"]) if found[name].pid else (lambda r: -r["mib_s"])
            ordered = sorted(rows, key=key)
            results["targets"][name][direction] = dict(ordered[len(ordered) // 2])
            if found[name].pid:
                results["targets"][name][direction]["rounds_cpu_s_per_gib"] = [
                    r["cpu_s_per_gib"]["total"] for r in rows]
        say("bulk plain " + direction + ": " + ", ".join(
            f"{n} {results['targets'][n][direction]['mib_s']:.0f} MiB/s" for n in TARGETS))
    for name in TARGETS[1:]:
        lab.stop(found[name].process)
    lab.stop(backend.process)
    t = results["targets"]
    results["ratios"] = {
        f"shardtcp/{other} {d}": ratio(t["shardtcp"][d]["cpu_s_per_gib"]["total"], t[other][d]["cpu_s_per_gib"]["total"])
        for other in ("haproxy", "haproxy-splice", "portforward") for d in ("up", "down")
    }
    return results


def report(r: dict) -> str:
    t = r["targets"]
    rows = []
    for d, label in (("up", "client -> shard"), ("down", "shard -> client")):
        rows.append([f"{label}, MiB/s"] + [fmt(t[n][d]["mib_s"], ".0f") for n in TARGETS])
        rows.append([f"{label}, proxy CPU s/GiB"]
                    + [fmt(t[n][d].get("cpu_s_per_gib", {}).get("total"), ".2f") for n in TARGETS])
        rows.append(["  of which user / sys (ticks)"] + [
            "-" if "cpu_s_per_gib" not in t[n][d]
            else f"{t[n][d]['cpu_s_per_gib']['user']:.2f} / {t[n][d]['cpu_s_per_gib']['sys']:.2f}" for n in TARGETS])
        rows.append(["  every round"] + [
            " ".join(f"{v:.2f}" for v in t[n][d]["rounds_cpu_s_per_gib"]) if "rounds_cpu_s_per_gib" in t[n][d]
            else "-" for n in TARGETS])
    out = table(f"Plain TCP bulk: {r['mib']} MiB over one connection, median of {r['rounds']} "
                f"round{'' if r['rounds'] == 1 else 's'}",
                ["", *TARGETS], rows)
    ra = r["ratios"]
    return out + "\n\nproxy CPU per GiB, up / down: " + "; ".join(
        f"shardtcp/{o} {ra[f'shardtcp/{o} up']:.2f} / {ra[f'shardtcp/{o} down']:.2f}"
        for o in ("haproxy", "haproxy-splice", "portforward"))
