"""
Routing by shard key over loopback with real clients: ``openssl s_client
-servername tenantN.api.example.test`` through a passthrough listener keyed
by ``sni-label``, curl through CONNECT keyed by ``authority``; an owner
killed and brought back.
"""

from __future__ import annotations

import re

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from shardtcp.model import Health
from shardtcp.resolver.ownership import Shard, owner_order
from tests.e2e.harness import FRANKFURT, Deployment, listener_toml, run_child, s_client_argv, wait_for

_LINE = re.compile(r"^SHARD (\S+) .* shk=(\S+)$", re.M)
API = ("api-a", "api-b", "api-c")
TUN = ("tun-a", "tun-b", "tun-c")
KEYS = [f"tenant{i}" for i in range(12)]
CHECK = 'health_check = { kind = "tcp", interval = "200ms", timeout = "200ms", rise = 2, fall = 2 }\nslow_start = "2s"'


def owner(key: str, ids) -> str:
    """The shard the ownership function gives ``key`` among ``ids`` (all equal weight)."""
    return owner_order(key, [Shard(i) for i in ids])[0].shard_id


class ShardKeyTests(TestCase):
    """Keys land on their owners, move with a dead owner only, and come back."""

    timeout = 120

    def setUp(self):
        self.deployment = Deployment(self, reactor)

    async def s_client(self, port: int, key: str) -> tuple[str, str]:
        """(the shard's id, the shk it was told) for one ``openssl s_client`` to ``key``'s name."""
        name = f"{key}.api.example.test"
        child = await run_child(self, s_client_argv(port, self.deployment.ca_path, name, "-quiet"))
        match = _LINE.search(child.out.decode("utf-8", "replace"))
        self.assertIsNotNone(match, (key, child.out, child.err))
        return match.group(1), match.group(2)

    async def curl(self, port: int, key: str) -> tuple[str, str]:
        """(the shard's id, the shk it was told) for one curl through CONNECT to ``key``'s name."""
        child = await run_child(
            self,
            ["curl", "-s", "--http0.9", "-p", "-x", f"http://127.0.0.1:{port}",
             "--cacert", self.deployment.ca_path, f"https://{key}.tun.example.test/"],
        )
        match = _LINE.search(child.out.decode("utf-8", "replace"))
        self.assertIsNotNone(match, (key, child.out, child.err))
        return match.group(1), match.group(2)

    async def test_keys_follow_their_owners(self):
        """
        Every key reaches the shard the ownership function names, which is
        told the key (shk) in its signed token: the SNI's first label through
        the passthrough listener, the whole authority (port dropped) through
        CONNECT.  A killed owner's keys go to their next owner and the other
        keys stay; once it is back (healthy again, still in slow start) its
        keys return to it.
        """
        api = {}
        for shard_id in API:
            api[shard_id] = await self.deployment.add_shard_process(shard_id, extra=["--behaviour", "source:0"])
        for shard_id in TUN:
            self.deployment.add_shard(shard_id, FRANKFURT, "source:0", names=["*.tun.example.test"])
        tun_ports = {i: self.deployment.shards[i].port for i in TUN}
        body = (
            listener_toml("passthrough", 'identify = ["sni"]')
            + listener_toml("plain", 'identify = ["connect"]', name="tunnel")
            + '[service.api]\nnames = ["*.api.example.test"]\nshard_key = "sni-label"\n'
            + "".join(
                f'[[service.api.shard]]\nid = "{i}"\naddress = "127.0.0.1:{api[i][1]}"\n{CHECK}\n' for i in API
            )
            + '[service.tun]\nnames = ["*.tun.example.test"]\nshard_key = "authority"\n'
            + "".join(f'[[service.tun.shard]]\nid = "{i}"\naddress = "127.0.0.1:{tun_ports[i]}"\n' for i in TUN)
        )
        port = self.deployment.start_proxy_text(body)
        tunnel = self.deployment.port("tunnel")
        resolver = self.deployment.proxy.resolver

        def health(shard_id):
            return {i.shard_id: i.health for i in resolver.get_shard_info("api")}[shard_id]

        self.assertTrue(await wait_for(lambda: all(health(i) == Health.HEALTHY for i in API), 10))

        before = {}
        for key in KEYS:
            shard_id, shk = await self.s_client(port, key)
            self.assertEqual((shard_id, shk), (owner(key, API), key))
            before[key] = shard_id
        self.assertGreater(len(set(before.values())), 1, before)
        for key in KEYS[:6]:
            authority = f"{key}.tun.example.test"
            shard_id, shk = await self.curl(tunnel, key)
            self.assertEqual((shard_id, shk), (owner(authority, TUN), authority))

        victim = before[KEYS[0]]
        victim_port = api[victim][1]
        api[victim][0].signal("KILL")
        await api[victim][0].ended
        self.assertTrue(await wait_for(lambda: health(victim) == Health.UNHEALTHY, 10))
        rest = [i for i in API if i != victim]
        for key in KEYS:
            shard_id, _ = await self.s_client(port, key)
            if before[key] == victim:
                self.assertEqual(shard_id, owner(key, rest), key)
            else:
                self.assertEqual(shard_id, before[key], key)

        await self.deployment.add_shard_process(
            victim, extra=["--behaviour", "source:0", "--listen", f"tcp:{victim_port}:interface=127.0.0.1"]
        )
        self.assertTrue(await wait_for(lambda: health(victim) == Health.HEALTHY, 10))
        ramp = {s.shard_id: s.slow_start_ramp for s in resolver.snapshot().services[0].shards}
        self.assertLess(ramp[victim], 1.0)
        for key in KEYS:
            shard_id, _ = await self.s_client(port, key)
            self.assertEqual(shard_id, before[key], key)
        counts = {s.shard_id: s.recent_keys for s in resolver.snapshot().services[0].shards}
        self.assertEqual(sum(counts.values()), len(KEYS))
