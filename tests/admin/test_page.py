"""The status page: what it shows, and that it escapes what it shows."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from shardtcp.admin._page import PAGE_SHARDS_PER_SERVICE, REFRESH_SECONDS, render_page, traffic_svg
from tests.admin.support import TOKEN, AdminFixture


def _shard(**kw) -> dict:
    shard = {
        "address": "127.0.0.1:9001", "region": "eu-central", "health": "healthy", "admin_state": None,
        "agent_state": None, "ejected": False, "open_connections": 0, "capacity": 10, "load": 0.0,
        "security_score": 90.0, "effective_weight": 1.0,
    }
    shard.update(kw)
    return shard


def _document(shards: dict, **kw) -> dict:
    document = {
        "services": {"api": {"panic": False, "in_rotation": len(shards), "shards": shards}},
        "listeners": [{"name": "edge", "listen": "tcp:8443", "mode": "passthrough", "accepted": 5, "active": 2,
                       "refused": {"no_shard": 3, "denied": 1}}],
        "ready": True, "workers": 1, "registry": {"kind": "static", "stale": False},
    }
    document.update(kw)
    return document


class PageTests(SynchronousTestCase):
    """render_page and GET /."""

    def test_served(self) -> None:
        """GET / is the HTML page of the live resolver: both shards, their scores, no script, a refresh."""
        admin = AdminFixture()
        admin.request("POST", "/shards/api-nyc-1/drain", token=TOKEN)
        response = admin.request("GET", "/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers["content-type"], "text/html; charset=utf-8")
        self.assertIn("default-src 'none'", response.headers["content-security-policy"])
        page = response.body.decode()
        self.assertIn('data-shard="api-fra-1" data-health="healthy" data-admin="" data-draining="no"', page)
        self.assertIn('data-shard="api-nyc-1" data-health="draining" data-admin="drain" data-draining="yes"', page)
        self.assertIn(f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">', page)
        self.assertNotIn("<script", page)
        self.assertNotIn("http://", page.replace('xmlns="http://www.w3.org/2000/svg"', ""))
        self.assertIn("<svg", page)

    def test_escaped(self) -> None:
        """Every value from the status document is HTML-escaped, in the table and in the SVG."""
        evil = '<script>alert("x")</script>'
        page = render_page(
            _document({evil: _shard(region=evil, address=evil)}),
            {"api": {evil: {"latency": 0.5, "security": 0.9, "load": 1.0, "total": 0.7}}},
        )
        self.assertNotIn("<script", page)
        self.assertIn("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", page)

    def test_load_bar_and_refusals(self) -> None:
        """Load is a bar bounded to 100 %; refusals are summed by reason, largest first."""
        page = render_page(
            _document({"a": _shard(load=0.25, open_connections=5, capacity=20), "b": _shard(load=1.7)}), {}
        )
        self.assertIn('style="width:25.0%"', page)
        self.assertIn('class="full" style="width:100.0%"', page)
        self.assertIn("170%", page)
        self.assertLess(page.index("<td>no_shard</td>"), page.index("<td>denied</td>"))
        self.assertIn('<td class="n">5 / 20</td>', page)

    def test_recent_keys_of_a_keyed_service(self) -> None:
        """A service routing by shard key shows each shard's recent keys; other services show no such column."""
        page = render_page(_document({"a": _shard(recent_keys=7), "b": _shard(recent_keys=0)}), {})
        self.assertIn("<th>recent keys</th>", page)
        self.assertIn('<td class="n keys">7</td>', page)
        self.assertIn('<td class="n keys">0</td>', page)
        plain = render_page(_document({"a": _shard(recent_keys=None)}), {})
        self.assertNotIn("recent keys", plain)

    def test_draining_banner(self) -> None:
        """A draining proxy says so at the top."""
        self.assertIn('id="draining"', render_page(_document({}, ready=False), {}))
        self.assertNotIn('id="draining"', render_page(_document({}), {}))

    def test_svg_by_region(self) -> None:
        """The traffic picture groups shards by region; circle size grows with open connections."""
        svg = traffic_svg(_document({
            "a": _shard(region="eu-central", open_connections=9),
            "b": _shard(region="us-east", open_connections=0, health="unhealthy"),
            "c": _shard(region="eu-central", open_connections=1),
        }))
        self.assertIn(">eu-central</text>", svg)
        self.assertIn(">10 open</text>", svg)
        self.assertIn('data-shard="a" data-open="9" cx="55" cy="75" r="26.0" fill="#2e8b57"', svg)
        self.assertIn('data-shard="c" data-open="1" cx="55" cy="145" r="11.3"', svg)
        self.assertIn('data-shard="b" data-open="0" cx="225" cy="75" r="4.0" fill="#b00020"', svg)


class SVGBoundTests(SynchronousTestCase):
    """The traffic picture stays bounded with many shards."""

    def test_busiest_drawn(self) -> None:
        """With one shard more than SVG_SHARDS_PER_REGION, the idlest is left out and counted."""
        from shardtcp.admin._page import SVG_SHARDS_PER_REGION

        shards = {f"s{i:02d}": _shard(open_connections=i + 1) for i in range(SVG_SHARDS_PER_REGION + 1)}
        svg = traffic_svg(_document(shards))
        self.assertEqual(svg.count("<circle"), SVG_SHARDS_PER_REGION)
        self.assertNotIn('data-shard="s00"', svg)
        self.assertIn('data-shard="s01"', svg)
        self.assertIn(">and 1 more</text>", svg)
        self.assertIn(f">{sum(range(1, SVG_SHARDS_PER_REGION + 2))} open</text>", svg)
        exact = {k: v for k, v in list(shards.items())[:SVG_SHARDS_PER_REGION]}
        svg = traffic_svg(_document(exact))
        self.assertEqual(svg.count("<circle"), SVG_SHARDS_PER_REGION)
        self.assertNotIn("more</text>", svg)


class PageRowBoundTests(SynchronousTestCase):
    """A service with more shards than the page shows."""

    def _rows(self, page: str) -> list:
        return [part.split('"', 1)[0] for part in page.split('<tr class="shard" id="shard-')[1:]]

    def test_exactly_the_bound_all_shown(self) -> None:
        """At exactly ``PAGE_SHARDS_PER_SERVICE`` shards every row is there and nothing is said to be hidden."""
        shards = {f"s{i:05d}": _shard() for i in range(PAGE_SHARDS_PER_SERVICE)}
        page = render_page(_document(shards), {})
        self.assertEqual(self._rows(page), list(shards))
        self.assertNotIn("not shown", page)

    def test_one_over_shows_attention_then_busiest(self) -> None:
        """
        One shard over the bound: the page keeps every shard needing
        attention (unhealthy, draining, ejected, wherever they are in the
        order) and the busiest healthy ones, in the document's order, and
        says how many shards it left out.
        """
        count = PAGE_SHARDS_PER_SERVICE + 1
        shards = {f"s{i:05d}": _shard(load=0.5) for i in range(count)}
        shards["s00000"]["load"] = 0.0  # the one idle shard: left out
        shards[f"s{count - 1:05d}"] = _shard(health="unhealthy", load=0.0)
        shards[f"s{count - 2:05d}"] = _shard(admin_state="drain", load=0.0)
        shards[f"s{count - 3:05d}"] = _shard(ejected=True, load=0.0)
        page = render_page(_document(shards), {})
        rows = self._rows(page)
        self.assertEqual(len(rows), PAGE_SHARDS_PER_SERVICE)
        self.assertEqual(rows, [s for s in shards if s != "s00000"])
        self.assertIn("1 more shard not shown", page)
        self.assertIn(f"/status</a> lists all {count}.", page)
