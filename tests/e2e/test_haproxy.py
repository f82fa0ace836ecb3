"""
The two HAProxy examples of docs/operations.rst, run with the real
``haproxy`` binary over loopback: HAProxy in front of shardtcp (sending
PROXY v2 to an ``accept_proxy`` listener) and HAProxy behind it (a shard
receiving shardtcp's PROXY v2 header with ``accept-proxy``).

The HAProxy and shardtcp configurations are the page's own blocks, with
only their addresses and paths replaced, so the page cannot drift from what
works.
"""

from __future__ import annotations

import os
import re
import shutil

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.e2e import harness as e2e
from tests.e2e.harness import SERVICE_NAME, Deployment

OPERATIONS = os.path.join(e2e.REPO_ROOT, "docs", "operations.rst")


def docs_block(name: str) -> str:
    """The code block after ``.. example: <name>`` in docs/operations.rst, dedented."""
    with open(OPERATIONS) as f:
        lines = f.read().splitlines()
    start = lines.index(f".. example: {name}")
    index = start + 1
    while not lines[index].startswith(".. code-block::"):
        index += 1
    index += 1
    block = []
    for line in lines[index:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip("\n") + "\n"


def substituted(text: str, replacements: dict) -> str:
    """``text`` with each key replaced; every key must be there (the page changed otherwise)."""
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"docs/operations.rst no longer has {old!r} in its example")
        text = text.replace(old, new)
    return text


def haproxy_binary() -> str:
    found = shutil.which("haproxy", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise AssertionError("haproxy is not installed (Debian package haproxy, see .ci/run)")
    return found


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed (see .ci/run)")
    return found


class _HeadersApp(Resource):
    """The HTTP application behind HAProxy: answers with the headers HAProxy set."""

    isLeaf = True

    def render_GET(self, request) -> bytes:
        lines = []
        for name in (b"x-forwarded-for", b"x-shardtcp-connection", b"x-shardtcp-name"):
            values = request.requestHeaders.getRawHeaders(name, [])
            lines.append(name + b"=" + b",".join(values))
        return b"\n".join(lines) + b"\n"


class HAProxyTests(TestCase):
    """shardtcp with a real HAProxy on each side."""

    timeout = 90

    async def start_haproxy(self, deployment: Deployment, template: str, replacements: dict, bind: str) -> int:
        """
        Write ``template`` with ``replacements`` and ``bind`` (the page's
        bind address) set to a free loopback port; start ``haproxy -db`` on
        it (retrying when the port was taken meanwhile); its port once it
        accepts.
        """
        haproxy = haproxy_binary()
        for attempt in range(5):
            port = e2e.free_port()
            text = substituted(template, {**replacements, bind: f"127.0.0.1:{port}"})
            path = os.path.join(deployment.directory, f"haproxy-{attempt}.cfg")
            with open(path, "w") as f:
                f.write(text)
            check = await e2e.run_child(self, [haproxy, "-c", "-f", path], timeout=20)
            self.assertEqual(check.status, 0, (check.out + check.err).decode(errors="replace"))
            child = e2e.spawn(self, [haproxy, "-db", "-f", path], cwd=deployment.directory, timeout=80)
            if await e2e.wait_until_accepting(port, 15.0, lambda: not child.done):
                return port
            output = (child.out + child.err).decode(errors="replace")
            if "Address already in use" not in output and "cannot bind" not in output:
                self.fail(f"haproxy did not start:\n{output}")
        self.fail("no free port for haproxy in five attempts")

    async def test_behind_haproxy(self) -> None:
        """
        HAProxy in front, with the page's ``send-proxy-v2`` backend, and
        shardtcp's ``accept_proxy`` listener from the page: a client from
        127.0.0.2 gets a verified TLS connection to the shard through both,
        and the shard's verified token names that client (not HAProxy's
        127.0.0.1).  The same client connecting to shardtcp directly is
        refused (``untrusted_proxy``).
        """
        deployment = Deployment(self, reactor)
        shard = deployment.add_shard("api-fra-1", e2e.FRANKFURT)
        listener = substituted(docs_block("shardtcp-behind"), {"tcp:8443:": "tcp:0:"})
        proxy_port = deployment.start_proxy_text(listener + e2e.service_toml([("api-fra-1", shard.port, "")]))
        port = await self.start_haproxy(
            deployment, docs_block("haproxy-front"), {"127.0.0.1:8443": f"127.0.0.1:{proxy_port}"}, "192.0.2.10:443"
        )

        got = await deferToThread(e2e.plain_tls_exchange, port, deployment.ca_path, source="127.0.0.2", payload=b"via haproxy\n")
        hello = e2e.parse_hello(got["hello"])
        self.assertEqual(hello["shard"], "api-fra-1")
        self.assertEqual(hello["client"], f"127.0.0.2:{got['local'][1]}")
        self.assertEqual(got["echo"], b"via haproxy\n")
        self.assertEqual(got["cn"], "api-fra-1")
        self.assertEqual(len(shard.factory.connections), 1)

        def direct() -> bytes:
            return e2e.exchange_until_close(proxy_port, b"\x16\x03\x01", source="127.0.0.2")

        self.assertEqual(await deferToThread(direct), b"")
        self.assertEqual(deployment.rejected("untrusted_proxy"), 1.0)
        self.assertEqual(len(shard.factory.connections), 1)

    async def test_in_front_of_haproxy(self) -> None:
        """
        HAProxy as the shard, with the page's ``accept-proxy ssl`` bind:
        curl from 127.0.0.2 reaches the application behind HAProxy through
        shardtcp with its certificate verified; HAProxy accepted shardtcp's
        PROXY v2 header (signed PolicyContext TLV included) and took from it
        the client's address, the connection id and the server name; the
        connection id is the one in shardtcp's JSON access line, whose bytes
        are counted both ways.
        """
        deployment = Deployment(self, reactor)
        app = reactor.listenTCP(0, Site(_HeadersApp()), interface="127.0.0.1")
        self.addCleanup(app.stopListening)
        issued = deployment.ca.issue_server([SERVICE_NAME], common_name="haproxy-shard")
        pem = os.path.join(deployment.cert_dir, "haproxy-shard.pem")
        with open(pem, "wb") as f:
            f.write(issued.cert_pem + b"\n" + issued.key_pem)
        port = await self.start_haproxy(
            deployment,
            docs_block("haproxy-behind"),
            {"/etc/haproxy/shard.pem": pem, "127.0.0.1:8080": f"127.0.0.1:{app.getHost().port}"},
            "10.0.1.5:9443",
        )

        access: list = []

        def observe(event) -> None:
            if event.get("log_namespace") == "shardtcp.access":
                access.append(event["access"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        proxy_port = deployment.start_proxy_text(
            e2e.listener_toml()
            + e2e.service_toml([("haproxy-shard", port, "")])
            + '[log]\naccess = "json"\n'
        )
        child = await e2e.run_child(
            self,
            [
                tool("curl"), "-sS", "--max-time", "20", "--cacert", deployment.ca_path,
                "--interface", "127.0.0.2",
                "--resolve", f"{SERVICE_NAME}:{proxy_port}:127.0.0.1",
                f"https://{SERVICE_NAME}:{proxy_port}/",
            ],
            timeout=30,
        )
        self.assertEqual(child.status, 0, child.err.decode(errors="replace"))
        fields = dict(line.split("=", 1) for line in child.out.decode().splitlines())
        self.assertEqual(fields["x-forwarded-for"], "127.0.0.2")
        self.assertEqual(fields["x-shardtcp-name"], SERVICE_NAME)
        self.assertRegex(fields["x-shardtcp-connection"], re.compile(r"^[A-Za-z0-9_-]{24}$"))
        self.assertTrue(await e2e.wait_for(lambda: len(access) == 1, 10.0), access)
        [line] = access
        self.assertEqual(line["id"], fields["x-shardtcp-connection"])
        self.assertEqual((line["shard"], line["service"], line["sni"]), ("haproxy-shard", "api", SERVICE_NAME))
        self.assertTrue(line["client"].startswith("127.0.0.2:"), line)
        self.assertGreater(line["bytes_up"], 0)
        self.assertGreater(line["bytes_down"], 0)
        self.assertIn(line["close"], ("client", "shard"))
