"""
Two proxies sharing one etcd: their load adds up against a shard's
capacity, and a fleet-wide drain written by ``shardtcp ctl --etcd`` reaches
both.  A real etcd, two in-process proxies, real TLS clients held open.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.e2e import harness as e2e


def _fleet_toml(url: str, snapshot: str, small: int, big: int) -> str:
    return (
        e2e.listener_toml("passthrough")
        + f'[registry]\nkind = "etcd"\nendpoints = ["{url}"]\nprefix = "/shardtcp"\n'
        f'snapshot = "{snapshot}"\nlease_ttl = "3s"\n'
        + e2e.service_toml((
            # small is far better while it has room; big takes the overflow
            ("small", small, "capacity = 10\nsecurity_score = 100"),
            ("big", big, "capacity = 1000\nsecurity_score = 10\nweight = 0.01"),
        ))
    )


def _open(port: int, ca_path: str):
    """A verified connection through the proxy, kept open; (the client, the shard that answered)."""
    client = e2e.TLSClient(port, e2e.SERVICE_NAME, ca_path)
    client.handshake()
    return client, e2e.parse_hello(client.read_line())["shard"]


class FleetTests(TestCase):
    """What the proxies of a fleet share through etcd."""

    timeout = 120

    async def _fleet(self):
        self.etcd = etcd = e2e.EtcdServer(self)
        await etcd.start()
        self.deployment = d = e2e.Deployment(self)
        small = d.add_shard("small", e2e.FRANKFURT)
        big = d.add_shard("big", e2e.FRANKFURT)
        proxies = []
        for name in ("edge-a", "edge-b"):
            snapshot = os.path.join(d.directory, "state", f"{name}.json")
            d.start_proxy_text(_fleet_toml(etcd.url, snapshot, small.port, big.port), proxy_id=name,
                               name=f"{name}.toml")
            proxies.append(d.proxy)
        # the deployment stops the last one; this stops the first
        self.addCleanup(proxies[0].stopService)
        return proxies

    @staticmethod
    def _total(proxy, shard_id: str) -> int:
        """What ``proxy`` counts on the shard: its own connections plus the others'."""
        info = {i.shard_id: i for i in proxy.resolver.get_shard_info("api")}[shard_id]
        return round(info.load * info.capacity)

    async def test_two_proxies_share_a_shards_capacity(self):
        """20 connections through two proxies, alternating, each seen by the other before the next:
        the capacity-10 shard holds exactly 10 of them (each proxy alone would have put 10 there,
        20 together) and the 10 others overflow to the shard with room."""
        proxies = await self._fleet()
        ports = [p.listening_port("edge").getHost().port for p in proxies]
        clients, answered = [], []
        self.addCleanup(lambda: [c.close() for c in clients])
        for n in range(20):
            client, shard = await deferToThread(_open, ports[n % 2], self.deployment.ca_path)
            clients.append(client)
            answered.append(shard)
            own = sum(p.resolver.open_connections().get("small", 0) for p in proxies)
            # every proxy counts the fleet's connections on small before the next client comes
            await e2e.wait_until(lambda: all(self._total(p, "small") == own for p in proxies), timeout=10)
        self.assertEqual(answered.count("small"), 10)
        self.assertEqual(answered.count("big"), 10)
        self.assertEqual(answered[:10], ["small"] * 10)
        self.assertEqual([p.resolver.open_connections().get("small", 0) for p in proxies], [5, 5])
        # the published record, as another language would read it
        # and /status's registry field shows the peer's published load (5 small + 5 big)
        await e2e.wait_until(
            lambda: proxies[0].registry.status()["peers"].get("edge-b", {}).get("connections") == 10, timeout=5
        )
        status = proxies[0].registry.status()
        self.assertEqual(status["kind"], "etcd")
        self.assertFalse(status["stale"])
        self.assertEqual(status["peers"]["edge-b"]["shards"], 2)
        # connections closed: the shard has room again in both proxies
        for c in clients:
            c.close()
        await e2e.wait_until(lambda: all(self._total(p, "small") == 0 for p in proxies), timeout=10)

    async def test_fleet_drain_reaches_both_proxies(self):
        """``shardtcp ctl --etcd URL drain small`` drains it in both proxies (new connections go to big);
        ``clear`` gives it back to both."""
        proxies = await self._fleet()
        ports = [p.listening_port("edge").getHost().port for p in proxies]

        async def ctl(*words, where=("--etcd", self.etcd.url)):
            child = e2e.spawn(self, [sys.executable, "-m", "shardtcp", "ctl", *where, *words],
                              env=e2e.child_environment(), timeout=30)
            self.assertEqual(await child.ended, 0, child.err)
            return json.loads(child.out)

        def state(proxy):
            return {i.shard_id: i.health.value for i in proxy.resolver.get_shard_info("api")}["small"]

        def weight(proxy):
            return {i.shard_id: i.weight for i in proxy.resolver.get_shard_info("api")}["small"]

        self.assertEqual(await ctl("drain", "small"), {"fleet": {"state": "drain"}, "shard": "small"})
        await e2e.wait_until(lambda: [state(p) for p in proxies] == ["draining", "draining"], timeout=5)
        for port in ports:
            client, shard = await deferToThread(_open, port, self.deployment.ca_path)
            client.close()
            self.assertEqual(shard, "big")
        fleet = ("--fleet", "--config", os.path.join(self.deployment.directory, "edge-a.toml"))
        self.assertEqual(await ctl("weight", "small", "2", where=fleet),
                         {"fleet": {"state": "drain", "weight": 2.0}, "shard": "small"})
        await e2e.wait_until(lambda: [weight(p) for p in proxies] == [2.0, 2.0], timeout=5)
        self.assertEqual(await ctl("ready", "small"), {"fleet": {"state": "ready", "weight": 2.0}, "shard": "small"})
        await e2e.wait_until(lambda: [state(p) for p in proxies] == ["healthy", "healthy"], timeout=5)
        self.assertEqual(await ctl("clear", "small"), {"fleet": None, "shard": "small"})
        await e2e.wait_until(lambda: [weight(p) for p in proxies] == [1.0, 1.0], timeout=5)
        for port in ports:
            client, shard = await deferToThread(_open, port, self.deployment.ca_path)
            client.close()
            self.assertEqual(shard, "small")

    async def test_etcd_down_and_back(self):
        """etcd stopped: both proxies keep routing on what they saw, stale in status and metrics, the
        peer's load still counted; etcd back: in sync again, and a fleet drain written then reaches both."""
        proxies = await self._fleet()
        ports = [p.listening_port("edge").getHost().port for p in proxies]
        held, _ = await deferToThread(_open, ports[1], self.deployment.ca_path)
        self.addCleanup(held.close)
        await e2e.wait_until(lambda: self._total(proxies[0], "small") == 1, timeout=5)
        await self.etcd.stop()
        await e2e.wait_until(lambda: all(p.registry.stale for p in proxies), timeout=10)
        for p in proxies:
            self.assertEqual(p.metrics.value("shardtcp_registry_stale"), 1.0)
            self.assertTrue(p.registry.status()["reason"])  # why, in one line
        self.assertEqual(self._total(proxies[0], "small"), 1)
        for port in ports:
            client, shard = await deferToThread(_open, port, self.deployment.ca_path)
            client.close()
            self.assertEqual(shard, "small")
        await self.etcd.start()
        await e2e.wait_until(lambda: not any(p.registry.stale for p in proxies), timeout=15)
        self.assertEqual([p.metrics.value("shardtcp_registry_stale") for p in proxies], [0.0, 0.0])
        child = e2e.spawn(self, [sys.executable, "-m", "shardtcp", "ctl", "--etcd", self.etcd.url, "drain", "small"],
                          env=e2e.child_environment(), timeout=30)
        self.assertEqual(await child.ended, 0, child.err)
        await e2e.wait_until(
            lambda: all({i.shard_id: i.health.value for i in p.resolver.get_shard_info("api")}["small"]
                        == "draining" for p in proxies),
            timeout=15,
        )


class ProcessFleetTests(TestCase):
    """Two ``twistd -n shardtcp`` processes share a shard's capacity through etcd."""

    timeout = 120

    async def test_two_processes_share_a_shards_capacity(self):
        """
        20 connections through two proxy processes, alternating, each next one
        opened once both proxies' published load (``<prefix>/load/<id>``, read
        from etcd as any language would) counts every connection on the
        capacity-10 shard: it holds exactly 10, the other 10 overflow.
        """
        import re

        from twisted.internet import reactor

        from shardtcp.registry.etcd import EtcdClient

        etcd = e2e.EtcdServer(self)
        await etcd.start()
        d = e2e.Deployment(self)
        small = d.add_shard("small", e2e.FRANKFURT)
        big = d.add_shard("big", e2e.FRANKFURT)
        ports = {}
        for name in ("edge-a", "edge-b"):
            path = os.path.join(d.directory, f"{name}.toml")
            body = _fleet_toml(etcd.url, f"state/{name}.json", small.port, big.port)
            with open(path, "w") as f:
                f.write(
                    f'[proxy]\nid = "{name}"\n[signing]\n'
                    f'private_key = "{os.path.relpath(d.private_key, d.directory)}"\nkid = "policy-1"\n' + body
                )
            child = e2e.spawn(self, [e2e.twistd_binary(), "-n", "--pidfile=", "shardtcp", "--config", path],
                              cwd=d.directory, timeout=110)
            started = await e2e.wait_for(lambda: child.done or b"ProxyFactory starting on" in child.out, 30.0)
            self.assertTrue(started and not child.done, (child.out + child.err).decode(errors="replace"))
            ports[name] = int(re.search(rb"ProxyFactory starting on (\d+)", child.out).group(1))
        client = EtcdClient(reactor, [etcd.url])
        published: dict = {}

        async def read_load() -> None:
            _, kvs = await client.range(b"/shardtcp/load/")
            published.clear()
            for kv in kvs:
                published[kv.key.decode().rsplit("/", 1)[1]] = json.loads(kv.value)

        clients, answered = [], []
        self.addCleanup(lambda: [c.close() for c in clients])
        for n in range(20):
            name = ("edge-a", "edge-b")[n % 2]
            tls, shard = await deferToThread(_open, ports[name], d.ca_path)
            clients.append(tls)
            answered.append(shard)
            on_small = answered.count("small")
            for _ in range(100):
                await read_load()
                if sum(p.get("small", 0) for p in published.values()) == on_small and len(published) == 2:
                    break
                await e2e.wait_for(lambda: False, 0.05)
            # give the other process time to read the report it was just sent
            await e2e.wait_for(lambda: False, 0.3)
        self.assertEqual(answered.count("small"), 10, answered)
        self.assertEqual(answered.count("big"), 10, answered)
        self.assertEqual(answered[:10], ["small"] * 10)


class FanoutBenchTests(TestCase):
    """The fan-out measurement docs/fleet.rst reports runs (small sizes here)."""

    timeout = 120

    async def test_fanout_runs(self):
        """``python -m bench.fanout`` starts its etcd, times every put to every source and prints the figures."""
        child = e2e.spawn(self, [sys.executable, "-m", "bench.fanout", "--proxies", "2", "--shards", "20",
                                 "--puts", "10"], env=e2e.child_environment(), timeout=100)
        self.assertEqual(await child.ended, 0, child.err)
        result = json.loads(child.out)
        self.assertEqual((result["proxies"], result["registered_shards"], result["puts"]), (2, 20, 10))
        figures = result["put_to_all_seen_ms"]
        self.assertTrue(0 < figures["p50"] <= figures["p90"] <= figures["max"] < 5000, figures)
        self.assertGreaterEqual(result["etcd_cpu_seconds"], 0)
