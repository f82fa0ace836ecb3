"""
The admin interface end to end: a real ``twistd -n shardtcp`` with an
admin listener, driven with curl and ``shardtcp ctl``; ``shardtcp ctl``
reloading through a real socket; and the status page in a real headless
Chromium, watching a shard go down when its agent says so and a drain done
through the API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import urllib.request

from twisted.internet import protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from shardtcp.keys import load_jwks
from tests.e2e import harness as e2e
from tests.e2e.harness import FRANKFURT, NEW_YORK, Deployment, listener_toml, service_toml

TOKEN = "e2e-admin-token-0123456789"
_STARTING = re.compile(rb"(ProxyFactory|shardtcp-admin) starting on (\d+)")


def _write_token(deployment: Deployment) -> str:
    path = os.path.join(deployment.directory, "admin.token")
    with open(path, "w") as f:
        f.write(TOKEN + "\n")
    return path


def _ports(output: bytes) -> dict:
    return {kind.decode(): int(port) for kind, port in _STARTING.findall(output)}


class _Curl:
    """curl as an operator types it; returns (status code, body)."""

    def __init__(self, case: TestCase, port: int) -> None:
        self._case = case
        self._base = f"http://127.0.0.1:{port}"

    async def __call__(self, method: str, path: str, body: str = None, token: str = None) -> tuple[int, bytes]:
        argv = ["curl", "-sS", "-X", method, "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"]
        if token is not None:
            argv += ["-H", f"Authorization: Bearer {token}"]
        if body is not None:
            argv += ["--data-binary", body]
        child = await e2e.run_child(self._case, argv + [self._base + path])
        self._case.assertEqual(child.status, 0, child.err.decode(errors="replace"))
        data, _, code = child.out.rpartition(b"\n")
        return int(code), data


class AdminTwistdTests(TestCase):
    """The admin listener of a real ``twistd -n shardtcp`` process."""

    timeout = 120

    async def test_curl_and_ctl(self):
        """
        twistd logs the admin port it bound (port 0 in the file); curl
        reads /metrics (the connection made through the proxy is counted,
        with connect and resolve times), /status, /ready, /explain and the
        JWKS; a drain without the token is 401 and changes nothing, with
        it the shard drains; ``shardtcp ctl`` (token from the config's
        ``[admin]``) reads the status,
        sets a weight and refuses a bad one with one line and exit 1.
        """
        e2e.require_binary("curl")
        deployment = Deployment(self, reactor)
        deployment.add_shard("api-fra-1", FRANKFURT)
        deployment.add_shard("api-nyc-1", NEW_YORK)
        _write_token(deployment)
        config = deployment.write_config()
        with open(config, "a") as f:
            f.write('\n[admin]\nlisten = "tcp:0:interface=127.0.0.1"\ntoken_file = "admin.token"\n')
        child = e2e.spawn(
            self,
            [e2e.twistd_binary(), "-n", "--pidfile", os.path.join(deployment.directory, "twistd.pid"),
             "shardtcp", "--config", config],
            cwd=deployment.directory,
            timeout=100,
        )
        started = await e2e.wait_for(lambda: child.done or len(_ports(child.out)) == 2, 30.0)
        self.assertTrue(started and not child.done, (child.out + child.err).decode(errors="replace"))
        ports = _ports(child.out)
        edge, admin = ports["ProxyFactory"], ports["shardtcp-admin"]
        curl = _Curl(self, admin)

        served = await deferToThread(e2e.plain_tls_exchange, edge, deployment.ca_path)
        self.assertTrue(served["hello"].startswith(b"SHARD "), served)

        code, body = await curl("GET", "/metrics")
        self.assertEqual(code, 200)
        text = body.decode()
        self.assertIn('shardtcp_connections_accepted_total{listener="edge"} 1.0', text)
        self.assertIn('shardtcp_upstream_connect_seconds_count{service="api"} 1.0', text)
        self.assertIn('shardtcp_resolve_seconds_count{service="api"} 1.0', text)
        self.assertIn('shardtcp_shard_healthy{health="healthy",service="api",shard="api-fra-1"} 1.0', text)
        # The daemon times its garbage collector's pauses, by generation.
        for generation in "012":
            self.assertIsNotNone(
                re.search(r'shardtcp_gc_pause_seconds_count\{generation="%s"\} [0-9.]+' % generation, text),
                text[:2000],
            )

        code, body = await curl("GET", "/ready")
        self.assertEqual((code, body), (200, b"ready\n"))

        code, body = await curl("GET", "/explain?service=api&client=127.0.0.2")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["shards"][0]["shard"], "api-nyc-1")
        code, body = await curl("GET", "/explain?service=api&client=somewhere")
        self.assertEqual((code, body), (400, b"client 'somewhere' is not an IP address\n"))

        code, body = await curl("GET", "/.well-known/jwks.json")
        self.assertEqual(code, 200)
        jwks_path = os.path.join(deployment.directory, "served-jwks.json")
        with open(jwks_path, "wb") as f:
            f.write(body)
        self.assertEqual(set(load_jwks(jwks_path)), set(load_jwks(deployment.jwks)))
        self.assertEqual(
            [k.public_bytes_raw() for k in load_jwks(jwks_path).values()],
            [k.public_bytes_raw() for k in load_jwks(deployment.jwks).values()],
        )

        code, _ = await curl("POST", "/shards/api-fra-1/drain", token="not-the-token")
        self.assertEqual(code, 401)
        code, body = await curl("GET", "/status")
        document = json.loads(body)
        self.assertIsNone(document["services"]["api"]["shards"]["api-fra-1"]["admin_state"])
        self.assertEqual((document["workers"], document["draining"]), (1, False))
        self.assertEqual(document["listeners"][0]["accepted"], 1)

        code, body = await curl("POST", "/shards/api-fra-1/drain", token=TOKEN)
        self.assertEqual((code, json.loads(body)), (200, {"shard": "api-fra-1", "admin_state": "drain"}))
        code, body = await curl("GET", "/status")
        self.assertEqual(json.loads(body)["services"]["api"]["shards"]["api-fra-1"]["admin_state"], "drain")

        # The file says port 0, so the URL is given; the token comes from the file's [admin].
        ctl = [sys.executable, "-m", "shardtcp", "ctl", "--config", config, "--admin", f"http://127.0.0.1:{admin}"]
        status = await e2e.run_child(self, ctl + ["status"], env=e2e.child_environment())
        self.assertEqual(status.status, 0, status.err.decode(errors="replace"))
        self.assertIn(b"api-fra-1", status.out)
        self.assertRegex(status.out.decode(), r"api-fra-1 +draining +drain ")
        weight = await e2e.run_child(self, ctl + ["weight", "api-nyc-1", "3"], env=e2e.child_environment())
        self.assertEqual((weight.status, json.loads(weight.out)), (0, {"shard": "api-nyc-1", "weight": 3.0}))
        bad = await e2e.run_child(self, ctl + ["weight", "api-nyc-1", "1001"], env=e2e.child_environment())
        self.assertEqual(bad.status, 1)
        self.assertEqual(bad.err, b"shardtcp ctl: PUT /shards/api-nyc-1/weight: 400 weight must be from 0 to 1000\n")
        ready = await e2e.run_child(self, ctl + ["ready", "api-fra-1"], env=e2e.child_environment())
        self.assertEqual(ready.status, 0, ready.err)
        code, body = await curl("GET", "/status")
        shards = json.loads(body)["services"]["api"]["shards"]
        self.assertEqual((shards["api-fra-1"]["admin_state"], shards["api-nyc-1"]["weight"]), ("ready", 3.0))

        await child.stop()
        log = child.out.decode(errors="replace")
        self.assertIn("refused, wrong token", log)
        self.assertRegex(log, r"admin: 127\.0\.0\.1:\d+ set shard api-fra-1 to drain")
        self.assertRegex(log, r"admin: 127\.0\.0\.1:\d+ set the weight of shard api-nyc-1 to 3")


class _Agent(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(self.factory.reply.encode("ascii") + b"\n")
        self.transport.loseConnection()


class AgentServer(protocol.Factory):
    """A shard's agent: answers every check with ``reply``."""

    protocol = _Agent
    noisy = False

    def __init__(self) -> None:
        self.reply = "up"


def _chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or a failure saying how to install them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise AssertionError(
            "the status page test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        )
    return browser, driver


class StatusPageBrowserTests(TestCase):
    """The status page in a real headless Chromium."""

    timeout = 120

    def start_browser(self):
        browser, driver_path = _chromium()
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            self.fail("the status page test needs selenium: pip install -e '.[test]'")
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                         f"--user-data-dir={os.path.abspath(self.mktemp())}"):
            options.add_argument(argument)
        return webdriver.Chrome(service=Service(driver_path), options=options)

    async def test_page_in_chromium(self):
        """
        The page loads and shows both shards healthy with the traffic
        picture; the Frankfurt shard's agent then answers "down" and the
        page, refreshing itself, shows it unhealthy; a drain of the New
        York shard through the API then shows on the page.
        """
        deployment = Deployment(self, reactor)
        fra = deployment.add_shard("api-fra-1", FRANKFURT)
        nyc = deployment.add_shard("api-nyc-1", NEW_YORK)
        agent = AgentServer()
        agent_port = reactor.listenTCP(0, agent, interface="127.0.0.1")
        self.addCleanup(agent_port.stopListening)
        _write_token(deployment)
        check = (f'health_check = {{ kind = "agent", interval = "200ms", timeout = "1s", rise = 1, fall = 1, '
                 f"agent_port = {agent_port.getHost().port} }}")
        body = listener_toml() + service_toml([
            ("api-fra-1", fra.port, 'location = { lat = 50.11, lon = 8.68, region = "eu-central" }\n' + check),
            ("api-nyc-1", nyc.port, 'location = { lat = 40.71, lon = -74.0, region = "us-east" }'),
        ]) + '\n[admin]\nlisten = "tcp:0:interface=127.0.0.1"\ntoken_file = "admin.token"\n'
        deployment.start_proxy_text(body)
        admin = deployment.proxy.getServiceNamed("admin").port.getHost().port
        url = f"http://127.0.0.1:{admin}/"

        driver = await deferToThread(self.start_browser)
        self.addCleanup(lambda: deferToThread(driver.quit))

        def attribute(shard: str, name: str) -> str:
            from selenium.webdriver.common.by import By

            return driver.find_element(By.CSS_SELECTOR, f'tr.shard[data-shard="{shard}"]').get_attribute(name)

        def wait_for_page(shard: str, name: str, value: str, refresh: bool, limit: float = 20.0) -> str:
            """Poll the page (reloading it, or letting it refresh itself) until the attribute has ``value``."""
            deadline = time.monotonic() + limit
            seen = None
            while time.monotonic() < deadline:
                try:
                    seen = attribute(shard, name)
                except Exception:  # the page is being replaced by its own refresh
                    seen = None
                if seen == value:
                    return seen
                time.sleep(0.2)
                if refresh:
                    driver.refresh()
            return seen

        def load():
            from selenium.webdriver.common.by import By

            driver.get(url)
            circles = driver.find_elements(By.CSS_SELECTOR, "svg#traffic circle.traffic-shard")
            return (driver.title, attribute("api-fra-1", "data-health"), attribute("api-nyc-1", "data-health"),
                    sorted(c.get_attribute("data-shard") for c in circles),
                    driver.find_element(By.ID, "service-api").text)

        title, fra_health, nyc_health, circles, heading = await deferToThread(load)
        self.assertEqual(title, "shardtcp status")
        self.assertEqual((fra_health, nyc_health), ("healthy", "healthy"))
        self.assertEqual(circles, ["api-fra-1", "api-nyc-1"])
        self.assertIn("2 of 2 shards in rotation", heading)

        agent.reply = "down # disk full"
        seen = await deferToThread(wait_for_page, "api-fra-1", "data-health", "unhealthy", False)
        self.assertEqual(seen, "unhealthy")

        def drain() -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{admin}/shards/api-nyc-1/drain", data=b"", method="POST",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status

        self.assertEqual(await deferToThread(drain), 200)
        seen = await deferToThread(wait_for_page, "api-nyc-1", "data-admin", "drain", True)
        self.assertEqual(seen, "drain")

        def state_cell() -> str:
            from selenium.webdriver.common.by import By

            return driver.find_element(By.CSS_SELECTOR, 'tr.shard[data-shard="api-nyc-1"] td.state').text

        self.assertEqual(await deferToThread(state_cell), "operator: drain")


class CtlReloadTests(TestCase):
    """``shardtcp ctl reload`` over a real socket, against an admin site with a scripted reloader."""

    timeout = 60

    async def test_reload(self):
        """
        A reload that applies prints its summary (exit 0); one refused for
        a bad configuration prints the problem lines on one line (exit 1);
        without the token it is 401, exit 1, and the reloader is not called.
        """
        from twisted.internet.defer import fail, succeed
        from zope.interface import implementer

        from shardtcp.admin import IReloader
        from shardtcp.config import ConfigError
        from tests.admin.support import TOKEN as SITE_TOKEN, AdminFixture

        @implementer(IReloader)
        class Scripted:
            def __init__(self) -> None:
                self.outcomes = [{"changed": ["service.api"]}, ConfigError(["a.b: bad", "c.d: worse"])]
                self.calls = 0

            def reload(self):
                self.calls += 1
                outcome = self.outcomes.pop(0)
                return fail(outcome) if isinstance(outcome, Exception) else succeed(outcome)

        reloader = Scripted()
        fixture = AdminFixture(reloader=reloader)
        port = reactor.listenTCP(0, fixture.site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        token_file = self.mktemp()
        with open(token_file, "wb") as f:
            f.write(SITE_TOKEN)
        base = [sys.executable, "-m", "shardtcp", "ctl", "--admin", f"http://127.0.0.1:{port.getHost().port}"]

        unauthorized = await e2e.run_child(self, base + ["reload"])
        self.assertEqual((unauthorized.status, reloader.calls), (1, 0))
        self.assertEqual(
            unauthorized.err, b"shardtcp ctl: POST /reload: 401 a valid Authorization: Bearer token is required\n"
        )
        applied = await e2e.run_child(self, base + ["--token-file", token_file, "reload"])
        self.assertEqual((applied.status, applied.out), (0, b'{"changed": ["service.api"]}\n'), applied.err)
        refused = await e2e.run_child(self, base + ["--token-file", token_file, "reload"])
        self.assertEqual((refused.status, refused.out), (1, b""))
        self.assertEqual(refused.err, b"shardtcp ctl: POST /reload: 400 a.b: bad / c.d: worse\n")
        self.assertEqual(reloader.calls, 2)
