# -*- test-case-name: tests.admin.test_page -*-
"""
The status page at ``/``: one server-rendered HTML document a person reads
at a glance, with no script and no external asset.

``render_page`` is a pure function of the ``/status`` document and the
per-shard scores; every value from the configuration or the network is
escaped.  The page refreshes itself every few seconds.
"""

from __future__ import annotations

import math
from html import escape
from typing import Mapping

#: Seconds between the page's own refreshes.
REFRESH_SECONDS = 3

#: Circles drawn per region (the busiest shards); the rest are counted.
SVG_SHARDS_PER_REGION = 12

#: Shard rows shown per service: those needing attention first (not
#: healthy, draining, ejected), then the busiest; the rest are counted and
#: ``/status`` has every one.  A page of 10,000 rows is read by nobody and
#: costs the proxy's one thread a second to build.
PAGE_SHARDS_PER_SERVICE = 200

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff}th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left}
th{background:#eee;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.healthy{color:#176317}.unhealthy{color:#b00020;font-weight:600}.draining{color:#a05a00;font-weight:600}
.bar{display:inline-block;width:8em;height:.8em;background:#e4e4e4;vertical-align:middle;position:relative}
.bar span{display:block;height:100%;background:#3a78c2}.bar span.full{background:#b00020}
.state{font-size:.9em;color:#555}.banner{padding:.4em .8em;background:#fff3cd;border:1px solid #e0c36a;display:inline-block}
"""

_HEALTH_COLOUR = {"healthy": "#2e8b57", "unhealthy": "#b00020", "draining": "#d08000"}


def _e(value) -> str:
    return escape(str(value), quote=True)


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _draining(shard: Mapping) -> bool:
    admin = shard.get("admin_state")
    return admin == "drain" or (admin != "ready" and shard.get("agent_state") in ("drain", "maint"))


def _state_text(shard: Mapping) -> str:
    parts = []
    if shard.get("admin_state"):
        parts.append(f"operator: {shard['admin_state']}")
    if shard.get("agent_state"):
        parts.append(f"agent: {shard['agent_state']}")
    if shard.get("ejected"):
        parts.append("ejected")
    return ", ".join(parts) or "-"


def _bar(load: float) -> str:
    width = max(0.0, min(1.0, load)) * 100
    full = " full" if load >= 1.0 else ""
    return f'<span class="bar" title="{load * 100:.0f}%"><span class="{full.strip()}" style="width:{width:.1f}%"></span></span>'


def _listeners(document: Mapping) -> list[str]:
    out = ["<h2>Listeners</h2>", '<table id="listeners"><tr><th>name</th><th>listen</th><th>mode</th>'
           "<th>open</th><th>accepted</th><th>refused</th></tr>"]
    for listener in document.get("listeners", []):
        refused = sum(listener.get("refused", {}).values())
        out.append(
            f'<tr data-listener="{_e(listener["name"])}"><td>{_e(listener["name"])}</td><td>{_e(listener["listen"])}</td>'
            f'<td>{_e(listener["mode"])}</td><td class="n">{int(listener["active"])}</td>'
            f'<td class="n">{int(listener["accepted"])}</td><td class="n">{int(refused)}</td></tr>'
        )
    out.append("</table>")
    return out


def _services(document: Mapping, scores: Mapping) -> list[str]:
    out = ["<h2>Services</h2>"]
    for service_id, service in document.get("services", {}).items():
        panic = ' <span class="unhealthy">PANIC: routing among all shards</span>' if service.get("panic") else ""
        out.append(
            f'<h3 id="service-{_e(service_id)}">{_e(service_id)} '
            f'<span class="state">{int(service["in_rotation"])} of {len(service["shards"])} shards in rotation</span>{panic}</h3>'
        )
        # A service routing by shard key: how many of its recent keys each shard took.
        keyed = any(shard.get("recent_keys") is not None for shard in service["shards"].values())
        out.append(
            '<table class="shards"><tr><th>shard</th><th>region</th><th>address</th><th>health</th><th>state</th>'
            "<th>load</th><th>open / capacity</th><th>latency</th><th>security</th><th>spare</th><th>total</th>"
            "<th>weight</th><th>security score</th>" + ("<th>recent keys</th>" if keyed else "") + "</tr>"
        )
        service_scores = scores.get(service_id, {})
        shown_shards = _shown(service["shards"])
        for shard_id, shard in shown_shards:
            health = shard["health"]
            shown = "draining" if _draining(shard) and health == "healthy" else health
            factors = service_scores.get(shard_id, {})
            out.append(
                f'<tr class="shard" id="shard-{_e(shard_id)}" data-shard="{_e(shard_id)}" data-health="{_e(health)}" '
                f'data-admin="{_e(shard.get("admin_state") or "")}" data-draining="{"yes" if _draining(shard) else "no"}">'
                f"<td>{_e(shard_id)}</td><td>{_e(shard.get('region') or '-')}</td><td>{_e(shard['address'])}</td>"
                f'<td class="health {_e(shown)}">{_e(shown)}</td><td class="state">{_e(_state_text(shard))}</td>'
                f"<td>{_bar(float(shard['load']))} {float(shard['load']) * 100:.0f}%</td>"
                f'<td class="n">{int(shard["open_connections"])} / {int(shard["capacity"])}</td>'
                f'<td class="n">{_number(factors.get("latency"))}</td><td class="n">{_number(factors.get("security"))}</td>'
                f'<td class="n">{_number(factors.get("load"))}</td><td class="n">{_number(factors.get("total"))}</td>'
                f'<td class="n">{_number(shard.get("effective_weight"), 2)}</td>'
                f'<td class="n">{_number(shard.get("security_score"), 0)}</td>'
                + (f'<td class="n keys">{int(shard.get("recent_keys") or 0)}</td>' if keyed else "")
                + "</tr>"
            )
        out.append("</table>")
        hidden = len(service["shards"]) - len(shown_shards)
        if hidden > 0:
            out.append(
                f'<p class="state more">{hidden} more shard{"s" if hidden != 1 else ""} not shown; '
                f'<a href="/status">/status</a> lists all {len(service["shards"])}.</p>'
            )
    return out


def _attention(shard: Mapping) -> bool:
    """Whether a shard needs a person's eye: not healthy, draining or ejected."""
    return shard.get("health") != "healthy" or _draining(shard) or bool(shard.get("ejected"))


def _shown(shards: Mapping) -> list:
    """
    The rows of a service's table: every shard when they fit, else those
    needing attention, then the busiest, up to ``PAGE_SHARDS_PER_SERVICE``,
    in the document's order.
    """
    items = list(shards.items())
    if len(items) <= PAGE_SHARDS_PER_SERVICE:
        return items
    ranked = sorted(
        range(len(items)),
        key=lambda i: (not _attention(items[i][1]), -float(items[i][1].get("load") or 0.0), i),
    )
    keep = sorted(ranked[:PAGE_SHARDS_PER_SERVICE])
    return [items[i] for i in keep]


def _refusals(document: Mapping) -> list[str]:
    totals: dict[str, int] = {}
    for listener in document.get("listeners", []):
        for reason, count in listener.get("refused", {}).items():
            totals[reason] = totals.get(reason, 0) + int(count)
    out = ["<h2>Refusals by reason</h2>"]
    if not any(totals.values()):
        out.append("<p>none so far</p>")
        return out
    out.append('<table id="refusals"><tr><th>reason</th><th>connections</th></tr>')
    for reason, count in sorted(totals.items(), key=lambda item: (-item[1], item[0])):
        if count:
            out.append(f'<tr><td>{_e(reason)}</td><td class="n">{count}</td></tr>')
    out.append("</table>")
    return out


def traffic_svg(document: Mapping) -> str:
    """
    Where traffic goes: one column per region, one circle per shard whose
    area grows with its open connections, coloured by health.  At most
    ``SVG_SHARDS_PER_REGION`` circles per region, the busiest first.
    """
    regions: dict[str, list] = {}
    for service in document.get("services", {}).values():
        for shard_id, shard in service["shards"].items():
            regions.setdefault(shard.get("region") or "(no region)", []).append((shard_id, shard))
    totals = {region: sum(int(s["open_connections"]) for _, s in shards) for region, shards in regions.items()}
    hidden: dict[str, int] = {}
    for region, shards in regions.items():
        if len(shards) > SVG_SHARDS_PER_REGION:
            shards.sort(key=lambda item: -int(item[1]["open_connections"]))
            hidden[region] = len(shards) - SVG_SHARDS_PER_REGION
            del shards[SVG_SHARDS_PER_REGION:]
    column, row, top = 170, 70, 40
    tallest = max((len(v) for v in regions.values()), default=0) + (1 if hidden else 0)
    width = max(column * len(regions), column)
    height = top + row * max(tallest, 1) + 10
    most = max((s["open_connections"] for v in regions.values() for _, s in v), default=0) or 1
    parts = [
        f'<svg id="traffic" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="open connections by region and shard">'
    ]
    for index, (region, shards) in enumerate(sorted(regions.items())):
        x = index * column + column // 2
        total = totals[region]
        parts.append(
            f'<text x="{x}" y="16" text-anchor="middle" font-weight="600">{_e(region)}</text>'
            f'<text x="{x}" y="32" text-anchor="middle" font-size="11">{total} open</text>'
        )
        for place, (shard_id, shard) in enumerate(shards):
            y = top + row * place + row // 2
            open_now = int(shard["open_connections"])
            radius = 4 + 22 * math.sqrt(open_now / most)
            colour = _HEALTH_COLOUR.get("draining" if _draining(shard) else shard["health"], "#777")
            parts.append(
                f'<circle class="traffic-shard" data-shard="{_e(shard_id)}" data-open="{open_now}" cx="{x - 30}" '
                f'cy="{y}" r="{radius:.1f}" fill="{colour}" fill-opacity="0.75"><title>{_e(shard_id)}: '
                f"{open_now} open</title></circle>"
                f'<text x="{x}" y="{y + 4}" font-size="11">{_e(shard_id)} ({open_now})</text>'
            )
        if region in hidden:
            y = top + row * len(shards) + row // 2
            parts.append(f'<text x="{x}" y="{y}" text-anchor="middle" font-size="11">and {hidden[region]} more</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_page(document: Mapping, scores: Mapping) -> str:
    """
    The page for a ``/status`` document; ``scores`` maps service -> shard
    -> ``{"latency", "security", "load", "total"}``, each shard scored from
    the proxy's own place.
    """
    ready = document.get("ready", True)
    banner = "" if ready else '<p class="banner" id="draining">draining: not taking new connections</p>'
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        "<title>shardtcp status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>shardtcp</h1>",
        f'<p class="state">workers: {int(document.get("workers", 1))}; registry: '
        f'{_e(document.get("registry", {}).get("kind", "static"))}; '
        f'{"serving" if ready else "draining"}; refreshes every {REFRESH_SECONDS}s</p>',
        banner,
    ]
    body += _listeners(document)
    body += _services(document, scores)
    body += _refusals(document)
    body += ["<h2>Where traffic goes</h2>", traffic_svg(document), "</body></html>"]
    return "\n".join(body)
