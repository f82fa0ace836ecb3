"""
Every admin resource over a real ``Site`` and a real ``ShardResolver``,
driven with whole HTTP requests in memory.
"""

from __future__ import annotations

import json

from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from shardtcp.admin import IReloader
from shardtcp.admin._changes import MAX_WEIGHT, MIN_WEIGHT, parse_weight
from shardtcp.config import ConfigError
from shardtcp.metrics import TimedResolver
from shardtcp.model import ConnectionRequest
from shardtcp.resolver.interfaces import IResolver
from tests.admin.support import JWKS, TOKEN, AdminFixture, FakeReloader, parse_response


class _Logged:
    """Collects the ``shardtcp.admin`` log events of a test."""

    def collect_admin_log(self) -> list:
        events: list = []

        def observer(event) -> None:
            if event.get("log_namespace") == "shardtcp.admin":
                events.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events


class ReadingTests(SynchronousTestCase):
    """The read-only resources."""

    def setUp(self) -> None:
        self.admin = AdminFixture()

    def test_metrics(self) -> None:
        """/metrics is the Prometheus text of the proxy's registry, per-shard series read at scrape time."""
        lease = self.admin.resolver.lease("api-fra-1")
        self.admin.metrics.accepted.labels("edge").inc(3)
        response = self.admin.request("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers["content-type"].startswith("text/plain; version="))
        body = response.body.decode()
        self.assertIn('shardtcp_connections_accepted_total{listener="edge"} 3.0', body)
        self.assertIn('shardtcp_shard_open_connections{service="api",shard="api-fra-1"} 1.0', body)
        self.assertIn('shardtcp_shard_open_connections{service="api",shard="api-nyc-1"} 0.0', body)
        self.assertIn('shardtcp_shard_healthy{health="healthy",service="api",shard="api-fra-1"} 1.0', body)
        self.assertIn('shardtcp_shard_load_ratio{service="api",shard="api-fra-1"} 0.1', body)
        lease.release()
        body = self.admin.request("GET", "/metrics").body.decode()
        self.assertIn('shardtcp_shard_open_connections{service="api",shard="api-fra-1"} 0.0', body)

    def test_timed_resolver(self) -> None:
        """TimedResolver provides IResolver, passes resolve through and counts it in shardtcp_resolve_seconds."""
        timed = TimedResolver(self.admin.resolver, self.admin.metrics, self.admin.clock)
        verifyObject(IResolver, timed)
        candidates = timed.resolve(ConnectionRequest(service_id="api", client=("127.0.0.1", 1)))
        self.assertEqual({c.shard.shard_id for c in candidates}, {"api-fra-1", "api-nyc-1"})
        self.assertEqual(self.admin.metrics.value("shardtcp_resolve_seconds_count", service="api"), 1.0)
        self.assertEqual(timed.service_config("api").id, "api")

    def test_status(self) -> None:
        """/status: the resolver's status plus listeners, readiness, workers and registry."""
        self.admin.metrics.rejected.labels("edge", "no_shard").inc(2)
        document = self.admin.request("GET", "/status").json()
        self.assertEqual(sorted(document["services"]["api"]["shards"]), ["api-fra-1", "api-nyc-1"])
        self.assertEqual(
            document["listeners"],
            [{"name": "edge", "listen": "tcp:8443:interface=127.0.0.1", "mode": "passthrough",
              "accepted": 0, "active": 0, "refused": {"no_shard": 2}}],
        )
        self.assertEqual((document["ready"], document["draining"], document["workers"]), (True, False, 1))
        self.assertEqual(document["registry"], {"kind": "static", "stale": False})
        self.admin.serving = False
        document = self.admin.request("GET", "/status").json()
        self.assertEqual((document["ready"], document["draining"]), (False, True))

    def test_status_feeds(self) -> None:
        """With a feeds status source, /status carries it under threat_intel; without, the key is absent."""
        self.assertNotIn("threat_intel", self.admin.request("GET", "/status").json())
        admin = AdminFixture(feeds=lambda: {"on_expiry": "baseline", "sources": []})
        self.assertEqual(admin.request("GET", "/status").json()["threat_intel"],
                         {"on_expiry": "baseline", "sources": []})

    def test_ready(self) -> None:
        """/ready is 200 while serving and 503 while draining."""
        self.assertEqual(self.admin.request("GET", "/ready").code, 200)
        self.admin.serving = False
        response = self.admin.request("GET", "/ready")
        self.assertEqual((response.code, response.body), (503, b"draining\n"))

    def test_jwks(self) -> None:
        """/.well-known/jwks.json is the document given, as application/jwk-set+json."""
        response = self.admin.request("GET", "/.well-known/jwks.json")
        self.assertEqual((response.code, response.body), (200, JWKS))
        self.assertEqual(response.headers["content-type"], "application/jwk-set+json")

    def test_explain(self) -> None:
        """/explain ranks with the resolver's pipeline: a Frankfurt client gets the Frankfurt shard first."""
        response = self.admin.request("GET", "/explain?service=api&client=127.0.0.1")
        self.assertEqual(response.code, 200)
        document = response.json()
        self.assertEqual([s["shard"] for s in document["shards"]], ["api-fra-1", "api-nyc-1"])
        self.assertIsNone(document["denied"])

    def test_explain_key(self) -> None:
        """
        /explain?...&key=K on a service routing by key shows the owner chain,
        the owner first, as ``shardtcp explain --key`` does; without a key
        there is none.
        """
        import attrs

        from shardtcp.resolver import ShardResolver
        from shardtcp.resolver.ownership import Shard, owner_order

        config = self.admin.config
        keyed = attrs.evolve(config, services=(attrs.evolve(config.services[0], shard_key="sni-label"),))
        self.admin.resolver.replace_config(keyed)
        document = self.admin.request("GET", "/explain?service=api&client=127.0.0.1&key=tenant7").json()
        expected = owner_order("tenant7", [Shard("api-fra-1"), Shard("api-nyc-1")])
        self.assertEqual(document["key"], "tenant7")
        self.assertEqual([o["shard"] for o in document["owners"]], [s.shard_id for s in expected])
        document = self.admin.request("GET", "/explain?service=api&client=127.0.0.1").json()
        self.assertNotIn("owners", document)

    def test_explain_drained_shard(self) -> None:
        """A drained shard is shown rejected by /explain, as resolve would skip it."""
        self.admin.resolver.set_admin_state("api-fra-1", "drain")
        document = self.admin.request("GET", "/explain?service=api&client=127.0.0.1").json()
        by_id = {s["shard"]: s for s in document["shards"]}
        self.assertFalse(by_id["api-fra-1"]["eligible"])
        self.assertTrue(by_id["api-nyc-1"]["eligible"])

    def test_explain_errors(self) -> None:
        """Bad /explain input is a 400 with one line naming the problem."""
        cases = {
            "/explain": "service is required: /explain?service=S&client=IP[&sni=NAME]\n",
            "/explain?service=api": "client is required: /explain?service=S&client=IP[&sni=NAME]\n",
            "/explain?service=api&client=nope": "client 'nope' is not an IP address\n",
            "/explain?service=web&client=127.0.0.1": "unknown service 'web'\n",
            "/explain?service=api&service=api&client=127.0.0.1": "give service once\n",
            "/explain?service=api&client=127.0.0.1&owner=1": "unknown query parameter 'owner': use service, client, sni, key\n",
            "/explain?service=api&client=127.0.0.1&key=" + "k" * 254: "key is too long or not printable\n",
            "/explain?service=api&client=127.0.0.1&sni=" + "a" * 254: "sni is too long or not printable\n",
            "/explain?service=%ff&client=127.0.0.1": "service is not UTF-8\n",
        }
        for path, line in cases.items():
            response = self.admin.request("GET", path)
            self.assertEqual((response.code, response.body.decode()), (400, line), path)
        # 253 characters is still accepted.
        ok = self.admin.request("GET", "/explain?service=api&client=127.0.0.1&sni=" + "a" * 253)
        self.assertEqual(ok.code, 200)

    def test_not_found(self) -> None:
        """Unknown paths and shards are a one-line 404."""
        for path in ("/nope", "/metrics/x", "/shards", "/shards/api-xxx-1/drain", "/shards/api-fra-1/other",
                     "/.well-known/other"):
            response = self.admin.request("POST" if path.startswith("/shards") else "GET", path, token=TOKEN)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(response.body.count(b"\n"), 1, path)

    def test_method_not_allowed(self) -> None:
        """A method a resource does not handle is a 405 with an Allow header, whatever the method."""
        response = self.admin.request("GET", "/shards/api-fra-1/drain")
        self.assertEqual((response.code, response.headers["allow"]), (405, "POST"))
        response = self.admin.request("DELETE", "/status")
        self.assertEqual((response.code, response.headers["allow"]), (405, "GET, HEAD"))
        response = self.admin.request("POST", "/shards/api-fra-1/weight", b"2", token=TOKEN)
        self.assertEqual((response.code, response.headers["allow"]), (405, "PUT"))
        self.assertEqual(self.admin.shard("api-fra-1")["weight"], 1.0)


class TokenTests(_Logged, SynchronousTestCase):
    """Changes need the bearer token; a refused change changes nothing."""

    def setUp(self) -> None:
        self.admin = AdminFixture()

    def attempts(self):
        """Requests with no, a malformed, a wrong, a prefix of and a longer token."""
        yield {}
        yield {"Authorization": "Basic " + TOKEN.decode()}
        yield {"Authorization": "Bearer wrong"}
        yield {"Authorization": "Bearer " + TOKEN.decode()[:-1]}
        yield {"Authorization": "Bearer " + TOKEN.decode() + "x"}
        yield {"Authorization": "Bearer"}

    def test_unauthorized_changes_nothing(self) -> None:
        """Every change without the right token is 401 and leaves the shard, weight and config alone."""
        events = self.collect_admin_log()
        before = self.admin.resolver.status()
        for headers in self.attempts():
            for method, path, body in (
                ("POST", "/shards/api-fra-1/drain", b""),
                ("POST", "/shards/api-fra-1/ready", b""),
                ("PUT", "/shards/api-fra-1/weight", b"5"),
                ("POST", "/reload", b""),
            ):
                response = self.admin.request(method, path, body, headers=headers)
                self.assertEqual(response.code, 401, (headers, path))
                self.assertEqual(response.headers["www-authenticate"], 'Bearer realm="shardtcp"')
        self.assertEqual(self.admin.resolver.status(), before)
        self.assertEqual(self.admin.reloader.pending, [])
        self.assertEqual(len(events), 24)
        self.assertTrue(all(e["who"] == "127.0.0.9:40001" for e in events))
        self.assertEqual(
            self.admin.metrics.value("shardtcp_admin_requests_total", action="drain", outcome="unauthorized"), 6.0
        )

    def test_no_token_configured(self) -> None:
        """Without a token file the admin interface is read-only: 403, nothing changed."""
        admin = AdminFixture(token=None)
        response = admin.request("POST", "/shards/api-fra-1/drain", token=TOKEN)
        self.assertEqual(response.code, 403)
        self.assertIsNone(admin.shard("api-fra-1")["admin_state"])

    def test_drain_and_ready(self) -> None:
        """With the token, drain then ready set the operator state; each change is logged with who and what."""
        events = self.collect_admin_log()
        response = self.admin.request("POST", "/shards/api-fra-1/drain", token=TOKEN, peer="127.0.0.7")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.json(), {"shard": "api-fra-1", "admin_state": "drain"})
        self.assertEqual(self.admin.shard("api-fra-1")["admin_state"], "drain")
        self.assertFalse(self.admin.shard("api-fra-1")["eligible"])
        self.assertEqual(
            [(e["who"], e["shard"], e["state"]) for e in events], [("127.0.0.7:40001", "api-fra-1", "drain")]
        )
        response = self.admin.request("POST", "/shards/api-fra-1/ready", token=TOKEN)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.admin.shard("api-fra-1")["admin_state"], "ready")
        self.assertTrue(self.admin.shard("api-fra-1")["eligible"])

    def test_lowercase_scheme(self) -> None:
        """The scheme name is case-insensitive (RFC 9110); the token is not."""
        response = self.admin.request(
            "POST", "/shards/api-fra-1/drain", headers={"Authorization": "bearer " + TOKEN.decode()}
        )
        self.assertEqual(response.code, 200)
        response = self.admin.request(
            "POST", "/shards/api-nyc-1/drain", headers={"Authorization": "Bearer " + TOKEN.decode().upper()}
        )
        self.assertEqual(response.code, 401)
        self.assertIsNone(self.admin.shard("api-nyc-1")["admin_state"])


class WeightTests(_Logged, SynchronousTestCase):
    """PUT /shards/<id>/weight: bounded, validated."""

    def setUp(self) -> None:
        self.admin = AdminFixture()

    def put(self, body: bytes):
        return self.admin.request("PUT", "/shards/api-fra-1/weight", body, token=TOKEN)

    def test_edges_accepted(self) -> None:
        """Both bounds are accepted, as a number or as {"weight": W}, and take effect."""
        self.assertEqual((MIN_WEIGHT, MAX_WEIGHT), (0.0, 1000.0))
        for body, weight in ((b"0", 0.0), (b'{"weight": 1000}', 1000.0), (b" 2.5 ", 2.5), (b"1e3", 1000.0)):
            response = self.put(body)
            self.assertEqual(response.code, 200, body)
            self.assertEqual(response.json(), {"shard": "api-fra-1", "weight": weight})
            self.assertEqual(self.admin.shard("api-fra-1")["weight"], weight)
            self.assertTrue(self.admin.shard("api-fra-1")["weight_overridden"])

    def test_bad_values(self) -> None:
        """Values beyond either bound, or not numbers, are a one-line 400 and change nothing."""
        events = self.collect_admin_log()
        cases = {
            b"-0.001": "weight must be from 0 to 1000",
            b"1000.001": "weight must be from 0 to 1000",
            b"-1": "weight must be from 0 to 1000",
            b"1" + b"0" * 400: "weight must be from 0 to 1000",
            b"NaN": "weight must be from 0 to 1000",
            b"Infinity": "weight must be from 0 to 1000",
            b"true": "weight must be a number",
            b'"5"': "weight must be a number",
            b"": 'the body must be a number or {"weight": W}',
            b"five": 'the body must be a number or {"weight": W}',
            b"\xff": 'the body must be a number or {"weight": W}',
            b'{"weight": 5, "x": 1}': 'the body must be a number or {"weight": W}, and nothing else',
            b'{"w": 5}': 'the body must be a number or {"weight": W}, and nothing else',
            b"[5]": "weight must be a number",
        }
        for body, line in cases.items():
            response = self.put(body)
            self.assertEqual((response.code, response.body.decode()), (400, line + "\n"), body)
        self.assertEqual(self.admin.shard("api-fra-1")["weight"], 1.0)
        self.assertFalse(self.admin.shard("api-fra-1")["weight_overridden"])
        self.assertEqual(len(events), len(cases))

    def test_body_bound(self) -> None:
        """A body over 1024 bytes is refused with 413; 1024 bytes are read."""
        self.assertEqual(self.put(b" " * 1020 + b"7.5").code, 200)
        response = self.put(b" " * 1022 + b"7.5")
        self.assertEqual(response.code, 413)
        self.assertEqual(self.admin.shard("api-fra-1")["weight"], 7.5)

    def test_parse_weight(self) -> None:
        """parse_weight's edges directly: 0 and 1000 in, just beyond out."""
        self.assertEqual(parse_weight(b"0"), (0.0, None))
        self.assertEqual(parse_weight(b"1000"), (1000.0, None))
        self.assertIsNone(parse_weight(b"-1e-9")[0])
        self.assertIsNone(parse_weight(b"1000.0000001")[0])


class ReloadTests(SynchronousTestCase):
    """POST /reload over an IReloader."""

    def setUp(self) -> None:
        self.admin = AdminFixture()

    def test_fake_provides(self) -> None:
        """The fake used here provides IReloader."""
        verifyObject(IReloader, FakeReloader())

    def test_applied(self) -> None:
        """A reload that succeeds answers 200 with its summary and is counted."""
        transport = self.admin.start("POST", "/reload", headers={"Authorization": "Bearer " + TOKEN.decode()})
        self.assertEqual(transport.value(), b"")
        [pending] = self.admin.reloader.pending
        pending.callback({"changed": ["service.api"], "listeners": {"kept": ["edge"]}})
        response = parse_response(transport.value())
        self.assertEqual(response.code, 200)
        self.assertEqual(response.json(), {"changed": ["service.api"], "listeners": {"kept": ["edge"]}})
        self.assertEqual(self.admin.metrics.value("shardtcp_reloads_total", trigger="api", result="ok"), 1.0)

    def test_refused(self) -> None:
        """A bad configuration answers 400 with its problem lines, counted as failed."""
        transport = self.admin.start("POST", "/reload", headers={"Authorization": "Bearer " + TOKEN.decode()})
        problems = ["service.api.shard[0].address: expected host:port", "listener[0].mode: unknown"]
        self.admin.reloader.pending[0].errback(Failure(ConfigError(problems)))
        response = parse_response(transport.value())
        self.assertEqual((response.code, response.body.decode()), (400, "\n".join(problems) + "\n"))
        self.assertEqual(self.admin.metrics.value("shardtcp_reloads_total", trigger="api", result="failed"), 1.0)

    def test_other_failure(self) -> None:
        """A reload that breaks otherwise is a one-line 500."""
        transport = self.admin.start("POST", "/reload", headers={"Authorization": "Bearer " + TOKEN.decode()})
        self.admin.reloader.pending[0].errback(Failure(RuntimeError("disk gone")))
        response = parse_response(transport.value())
        self.assertEqual((response.code, response.body), (500, b"reload failed: disk gone\n"))

    def test_client_gone(self) -> None:
        """A client that leaves before the reload ends gets nothing written; the reload still counts."""
        transport = self.admin.start("POST", "/reload", headers={"Authorization": "Bearer " + TOKEN.decode()})
        transport.loseConnection()
        transport.protocol.connectionLost(Failure(ConnectionError("gone")))
        self.admin.reloader.pending[0].callback({"changed": []})
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.admin.metrics.value("shardtcp_reloads_total", trigger="api", result="ok"), 1.0)

    def test_no_reloader(self) -> None:
        """Without a reloader, /reload says it is not available (503)."""
        admin = AdminFixture()
        admin.site.resource.children[b"reload"]._reloader = None
        response = admin.request("POST", "/reload", token=TOKEN)
        self.assertEqual((response.code, response.body), (503, b"reload is not available in this process\n"))

    def test_summary_json(self) -> None:
        """The summary is sent as JSON exactly as given."""
        transport = self.admin.start("POST", "/reload", headers={"Authorization": "Bearer " + TOKEN.decode()})
        self.admin.reloader.pending[0].callback({"weights": {"api-fra-1": 2.0}})
        self.assertEqual(json.loads(parse_response(transport.value()).body), {"weights": {"api-fra-1": 2.0}})
