"""
Tests for shardtcp.resolver.ownership and the resolver's ownership step:
key sources, weighted rendezvous order, pinned owners, bounded load, and
the properties SPEC section 10 promises.
"""

from __future__ import annotations

import random
from collections import Counter

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.model import (
    Address,
    Config,
    ConnectionRequest,
    Health,
    ProxyConfig,
    ServiceConfig,
    ShardConfig,
    SigningConfig,
)
from shardtcp.resolver.ownership import (
    MAX_KEY_LENGTH,
    Shard,
    chain,
    key_for,
    key_hash,
    mix64,
    owner_order,
    pinned_owners,
    rendezvous_hash,
    rendezvous_score,
    shard_seed,
    weighted_score,
)
from shardtcp.resolver.service import NoShardKey, ShardResolver

KEYS = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)


def shards(n: int, prefix: str = "s") -> list[Shard]:
    return [Shard(f"{prefix}{i}") for i in range(n)]


def owner(key: str, members: list[Shard], **kw) -> str:
    return chain(key, members, **kw).order[0]


class KeySourceTests(SynchronousTestCase):
    """key_for takes the key from where the service says, bounded."""

    def test_sources(self) -> None:
        """Each source reads its own field, and only it."""
        kw = dict(client_ip="::ffff:192.0.2.7", name="Tenant42.api.example.test:443", line_arg="k-1")
        self.assertEqual(key_for("client-ip", **kw), "192.0.2.7")
        self.assertEqual(key_for("authority", **kw), "tenant42.api.example.test")
        self.assertEqual(key_for("sni-label", **kw), "tenant42")
        self.assertEqual(key_for("line-arg", **kw), "k-1")
        self.assertIsNone(key_for("none", **kw))

    def test_missing_and_bad(self) -> None:
        """No name, an IP literal's label, an over-long or spaced key: no key."""
        self.assertIsNone(key_for("sni-label"))
        self.assertIsNone(key_for("sni-label", name="192.0.2.1"))
        self.assertEqual(key_for("authority", name="[2001:db8::1]:443"), "2001:db8::1")
        self.assertIsNone(key_for("client-ip", client_ip="not-an-ip"))
        self.assertEqual(key_for("line-arg", line_arg="k" * MAX_KEY_LENGTH), "k" * MAX_KEY_LENGTH)
        self.assertIsNone(key_for("line-arg", line_arg="k" * (MAX_KEY_LENGTH + 1)))
        self.assertIsNone(key_for("line-arg", line_arg="a b"))
        self.assertIsNone(key_for("line-arg", line_arg="a\x00"))
        self.assertIsNone(key_for("line-arg", line_arg=""))


class RendezvousTests(SynchronousTestCase):
    """Weighted rendezvous hashing over shards."""

    def test_score_bounds(self) -> None:
        """A zero weight scores 0; a positive one scores above 0; doubling the weight doubles it."""
        self.assertEqual(rendezvous_score(b"k", "s1", 0.0), 0.0)
        one = rendezvous_score(b"k", "s1", 1.0)
        self.assertGreater(one, 0.0)
        self.assertAlmostEqual(rendezvous_score(b"k", "s1", 2.0), 2 * one)
        self.assertNotEqual(one, rendezvous_score(b"k", "s2", 1.0))

    def test_known_answers(self) -> None:
        """
        The hash is pinned: every proxy, and any shard or tool that works
        owners out, must get these very numbers (BLAKE2b-64 personalised
        ``shardtcp key`` / ``shardtcp shard``, then ``mix64``).
        """
        import hashlib

        self.assertEqual(key_hash(b"tenant42"), 0x9A893AC54A4FC349)
        self.assertEqual(
            key_hash(b"tenant42"),
            int.from_bytes(hashlib.blake2b(b"tenant42", digest_size=8, person=b"shardtcp key").digest(), "big"),
        )
        self.assertEqual(shard_seed("api-0"), 0x44B918F659A5922B)
        self.assertEqual(mix64(1), 0x93649591BB8D8C9C)
        self.assertEqual(mix64((1 << 64) - 1), 0x89BA3143CEBE9E87)
        self.assertEqual(rendezvous_hash(0x9A893AC54A4FC349, 0x44B918F659A5922B), 0xF3D445D3BB649133)
        self.assertEqual(weighted_score(0xF3D445D3BB649133, 1.0), 20.529874686800866)
        self.assertEqual(rendezvous_score(b"tenant42", "api-0", 1.0), 20.529874686800866)
        self.assertEqual([s.shard_id for s in owner_order("a", shards(5, "api-"))],
                         ["api-3", "api-0", "api-1", "api-4", "api-2"])

    def test_score_edges(self) -> None:
        """The lowest and highest hashes give finite positive scores (u never reaches 0 or 1)."""
        low, high = weighted_score(0, 1.0), weighted_score((1 << 64) - 1, 1.0)
        self.assertGreater(low, 0.0)
        self.assertLess(low, 0.03)
        self.assertGreater(high, 1e15)
        self.assertLess(high, float("inf"))
        self.assertEqual(weighted_score((1 << 64) - 1, 0.0), 0.0)

    @settings(max_examples=200, deadline=None)
    @given(key=KEYS, order=st.permutations(list(range(8))))
    def test_same_key_same_owner(self, key, order) -> None:
        """The same key gets the same owner order whatever order the shards are listed in."""
        members = shards(8)
        listed = [members[i] for i in order]
        self.assertEqual(
            [s.shard_id for s in owner_order(key, members)],
            [s.shard_id for s in owner_order(key, listed)],
        )

    @settings(max_examples=100, deadline=None)
    @given(key=KEYS, removed=st.integers(0, 9))
    def test_removal_moves_only_its_keys(self, key, removed) -> None:
        """Removing a shard changes a key's owner only if that shard owned it; then to the next owner."""
        members = shards(10)
        before = [s.shard_id for s in owner_order(key, members)]
        gone = members[removed].shard_id
        after = [s.shard_id for s in owner_order(key, [s for s in members if s.shard_id != gone])]
        self.assertEqual(after, [i for i in before if i != gone])

    def test_movement_fractions(self) -> None:
        """
        Over 10,000 keys and 10 shards: removing one moves only its keys
        (about 1/10, within 0.07..0.13); adding an 11th moves only keys to
        it (about 1/11, within 0.06..0.12).
        """
        keys = [f"tenant{i}" for i in range(10_000)]
        ten = shards(10)
        base = {k: owner_order(k, ten)[0].shard_id for k in keys}
        nine = {k: owner_order(k, ten[1:])[0].shard_id for k in keys}
        moved = [k for k in keys if base[k] != nine[k]]
        self.assertTrue(all(base[k] == "s0" for k in moved))
        self.assertEqual(len(moved), sum(1 for k in keys if base[k] == "s0"))
        self.assertTrue(700 <= len(moved) <= 1300, len(moved))
        eleven = {k: owner_order(k, ten + [Shard("s10")])[0].shard_id for k in keys}
        moved = [k for k in keys if base[k] != eleven[k]]
        self.assertTrue(all(eleven[k] == "s10" for k in moved))
        self.assertTrue(600 <= len(moved) <= 1200, len(moved))

    def test_balance(self) -> None:
        """10,000 random keys over 10 equal shards: every shard within ±15 % of the mean (1,000)."""
        rng = random.Random(12)
        keys = {"".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12)) for _ in range(10_000)}
        while len(keys) < 10_000:
            keys.add(f"x{len(keys)}")
        counts = Counter(owner_order(k, shards(10))[0].shard_id for k in keys)
        self.assertEqual(len(counts), 10)
        for shard_id, count in counts.items():
            self.assertTrue(850 <= count <= 1150, (shard_id, count))

    def test_weights(self) -> None:
        """A shard of weight 3 among three of weight 1 owns about half the keys (0.45..0.55); weight 0 owns none."""
        members = [Shard("a", 3.0), Shard("b"), Shard("c"), Shard("d"), Shard("z", 0.0)]
        counts = Counter(owner_order(f"k{i}", members)[0].shard_id for i in range(10_000))
        self.assertTrue(4500 <= counts["a"] <= 5500, counts)
        self.assertEqual(counts["z"], 0)


class PinnedTests(SynchronousTestCase):
    """[service.S.owners]: exact beats glob, longer glob beats shorter."""

    OWNERS = (("tenant*", ("s1",)), ("tenant4*", ("s2", "s3")), ("tenant42", ("s4",)), ("t?", ("s5",)))

    def test_precedence(self) -> None:
        """The exact entry, else the longest glob, else nothing."""
        self.assertEqual(pinned_owners(self.OWNERS, "tenant42"), ("s4",))
        self.assertEqual(pinned_owners(self.OWNERS, "tenant43"), ("s2", "s3"))
        self.assertEqual(pinned_owners(self.OWNERS, "tenant5"), ("s1",))
        self.assertEqual(pinned_owners(self.OWNERS, "tx"), ("s5",))
        self.assertEqual(pinned_owners(self.OWNERS, "other"), ())

    def test_pinned_first_then_rendezvous(self) -> None:
        """Pinned owners lead in their listed order; the rest follow by rendezvous; a pinned id not given is left out."""
        members = shards(6)
        order = [s.shard_id for s in owner_order("tenant43", members, self.OWNERS)]
        self.assertEqual(order[:2], ["s2", "s3"])
        rest = [s.shard_id for s in owner_order("tenant43", [s for s in members if s.shard_id not in ("s2", "s3")])]
        self.assertEqual(order[2:], rest)
        without = [s.shard_id for s in owner_order("tenant43", [s for s in members if s.shard_id != "s2"], self.OWNERS)]
        self.assertEqual(without[0], "s3")

    def test_ineligible_pinned_owner_skipped(self) -> None:
        """A pinned owner that is not eligible is skipped with its reasons; the next pinned owner takes the key."""
        members = shards(6)
        members[2] = Shard("s2", rejected_by=("health: unhealthy",))
        result = chain("tenant43", members, owners=self.OWNERS)
        self.assertEqual(result.owners[0].shard_id, "s2")
        self.assertEqual(result.owners[0].skipped, ("health: unhealthy",))
        self.assertTrue(result.owners[0].pinned)
        self.assertEqual(result.order[0], "s3")
        self.assertNotIn("s2", result.order)


class BoundedLoadTests(SynchronousTestCase):
    """The first owner under bounded_load x its share takes the key."""

    def test_bound_edges(self) -> None:
        """
        4 equal shards, 7 open in all, bounded_load 1.25: bound ceil(1.25 x 8 / 4) = 3.
        The owner at 2 open takes the key; at 3 it is skipped for the next.
        """
        key = "k"
        first, second = [s.shard_id for s in owner_order(key, shards(4))][:2]

        def with_open(n: int) -> list[Shard]:
            members = [attrs.evolve(s, open_connections=0) for s in shards(4)]
            members = [attrs.evolve(s, open_connections=n) if s.shard_id == first else s for s in members]
            rest = 7 - n
            return [attrs.evolve(s, open_connections=rest) if s.shard_id == next(
                i for i in (x.shard_id for x in members) if i not in (first, second)) else s for s in members]

        taken = chain(key, with_open(2), bounded_load=1.25)
        self.assertEqual(taken.order[0], first)
        self.assertEqual(taken.owners[0].bound, 3)
        skipped = chain(key, with_open(3), bounded_load=1.25)
        self.assertEqual(skipped.order[0], second)
        self.assertEqual(skipped.owners[0].skipped, ("bounded_load: 3 open >= bound 3",))
        self.assertEqual(skipped.order[1], first)  # still a retry, after the taker

    def test_hot_key(self) -> None:
        """
        One hot key sending 1,000 connections over 5 shards, none closing:
        no shard ever exceeds ceil(1.25 x (total + 1) / 5), and the key's
        owner holds exactly its bound's worth once it spills.
        """
        opened = Counter()
        for _ in range(1000):
            members = [Shard(f"s{i}", 1.0, opened[f"s{i}"]) for i in range(5)]
            taker = chain("hot", members, bounded_load=1.25).order[0]
            total = sum(opened.values())
            self.assertLess(opened[taker], -(-(1.25 * (total + 1)) // 5))
            opened[taker] += 1
        self.assertEqual(sum(opened.values()), 1000)
        self.assertLessEqual(max(opened.values()), 250)
        self.assertGreaterEqual(min(opened.values()), 150)

    @settings(max_examples=200, deadline=None)
    @given(
        loads=st.lists(st.integers(0, 50), min_size=1, max_size=8),
        bounded=st.floats(1.0, 3.0),
        key=KEYS,
    )
    def test_someone_always_takes(self, loads, bounded, key) -> None:
        """Whatever the loads, some eligible owner is under its bound and takes the key."""
        members = [Shard(f"s{i}", 1.0, n) for i, n in enumerate(loads)]
        result = chain(key, members, bounded_load=bounded)
        self.assertIsNotNone(result.taker)
        taker = result.owners[result.taker]
        self.assertEqual(taker.skipped, ())
        self.assertLess(taker.open_connections, taker.bound)
        self.assertEqual(sorted(result.order), sorted(s.shard_id for s in members))

    def test_nobody_eligible(self) -> None:
        """No eligible shard: no taker, an empty order, every owner skipped with its reasons."""
        result = chain("k", [Shard("a", rejected_by=("draining",))])
        self.assertIsNone(result.taker)
        self.assertEqual(result.order, ())
        self.assertEqual(result.owners[0].skipped, ("draining",))


def keyed_config(n: int = 5, shard_key: str = "sni-label", owners: tuple = ()) -> Config:
    return Config(
        proxy=ProxyConfig(id="edge"),
        signing=SigningConfig(private_key="k.pem", kid="k"),
        services=(
            ServiceConfig(
                id="api",
                names=("*.api.example.test",),
                shard_key=shard_key,
                owners=owners,
                shards=tuple(
                    ShardConfig(id=f"api-{i}", address=Address("127.0.0.1", 9000 + i), slow_start=30.0)
                    for i in range(n)
                ),
            ),
        ),
    )


class ResolverStepTests(SynchronousTestCase):
    """The resolver's ownership step, in resolve and explain."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.resolver = ShardResolver(keyed_config(), clock=self.clock, random=random.Random(1))

    def request(self, key, **kw) -> ConnectionRequest:
        fields = dict(service_id="api", client=("192.0.2.1", 1234), shard_key=key)
        fields.update(kw)
        return ConnectionRequest(**fields)

    def expected(self, key, exclude=()) -> str:
        return owner(key, [Shard(f"api-{i}") for i in range(5) if f"api-{i}" not in exclude])

    def test_resolve_follows_the_owner(self) -> None:
        """resolve puts the key's owner first, every time (no draw), and the other owners after it."""
        for i in range(50):
            key = f"tenant{i}"
            for _ in range(3):
                candidates = self.resolver.resolve(self.request(key), retries=4)
                self.assertEqual(candidates[0].shard.shard_id, self.expected(key))
                self.assertEqual(len(candidates), 5)
                # by default the owner and two more (retries = 2)
                self.assertEqual(len(self.resolver.resolve(self.request(key))), 3)

    @settings(max_examples=100, deadline=None)
    @given(
        key=KEYS,
        ip=st.ip_addresses(v=4).map(str),
        port=st.integers(1, 65535),
        sni=st.one_of(st.none(), KEYS),
        alpn=st.lists(st.sampled_from(["h2", "http/1.1", "x"]), max_size=3).map(tuple),
        listener=KEYS,
    )
    def test_only_the_key_chooses(self, key, ip, port, sni, alpn, listener) -> None:
        """No request field but the key (client, port, SNI, ALPN, listener) changes the owner."""
        candidates = self.resolver.resolve(
            self.request(key, client=(ip, port), sni=sni, alpn=alpn, listener=listener)
        )
        self.assertEqual(candidates[0].shard.shard_id, self.expected(key))

    def test_no_key_refused(self) -> None:
        """A keyed service refuses a request without a key (NoShardKey, reason no-shard-key)."""
        e = self.assertRaises(NoShardKey, self.resolver.resolve, self.request(None))
        self.assertEqual(e.reason, "no-shard-key")
        self.assertIn("sni-label", str(e))

    def test_failover_and_return(self) -> None:
        """
        An unhealthy owner's key goes to its next owner; it comes back as
        soon as the owner is healthy again, even during its slow start (the
        ramp does not reorder owners); other keys never move.
        """
        keys = [f"tenant{i}" for i in range(200)]
        before = {k: self.resolver.resolve(self.request(k))[0].shard.shard_id for k in keys}
        victim = before["tenant0"]
        self.resolver.set_health(victim, Health.UNHEALTHY)
        during = {k: self.resolver.resolve(self.request(k))[0].shard.shard_id for k in keys}
        for k in keys:
            if before[k] == victim:
                self.assertEqual(during[k], self.expected(k, exclude=(victim,)))
            else:
                self.assertEqual(during[k], before[k])
        self.resolver.set_health(victim, Health.HEALTHY)
        self.clock.advance(1)
        ramp = {s.shard_id: s.slow_start_ramp for s in self.resolver.snapshot().services[0].shards}
        self.assertLess(ramp[victim], 0.2)  # still ramping up
        after = {k: self.resolver.resolve(self.request(k))[0].shard.shard_id for k in keys}
        self.assertEqual(after, before)

    def test_explain_owner_chain(self) -> None:
        """explain(key=...) shows the chain: an unhealthy owner skipped with its reason, the next taking the key."""
        key = "tenant7"
        first = self.expected(key)
        self.resolver.set_health(first, Health.UNHEALTHY)
        explanation = self.resolver.explain(self.request(None), key=key)
        self.assertEqual(explanation.key, key)
        owners = explanation.owners.owners
        self.assertEqual(owners[0].shard_id, first)
        self.assertEqual(owners[0].skipped, ("health: unhealthy",))
        self.assertEqual(explanation.owners.order[0], self.expected(key, exclude=(first,)))
        self.assertIsNone(self.resolver.explain(self.request(None)).owners)

    def test_recent_keys_in_snapshot(self) -> None:
        """The snapshot counts distinct recent keys per shard of a keyed service."""
        for i in range(30):
            self.resolver.resolve(self.request(f"k{i % 10}"))
        counts = {s.shard_id: s.recent_keys for s in self.resolver.snapshot().services[0].shards}
        self.assertEqual(sum(counts.values()), 10)
        self.assertEqual(counts, dict(Counter(self.expected(f"k{i}") for i in range(10)) | {
            s: 0 for s in counts if s not in {self.expected(f"k{i}") for i in range(10)}}))
        self.assertEqual(self.resolver.status()["services"]["api"]["shards"]["api-0"]["recent_keys"], counts["api-0"])

    def test_pinned_by_config(self) -> None:
        """[service.S.owners] pins a key: its listed shard takes it, whatever rendezvous says."""
        resolver = ShardResolver(
            keyed_config(owners=(("vip-*", ("api-3", "api-1")),)), clock=self.clock, random=random.Random(1)
        )
        for i in range(20):
            candidates = resolver.resolve(self.request(f"vip-{i}"))
            self.assertEqual([c.shard.shard_id for c in candidates[:2]], ["api-3", "api-1"])

    def test_unkeyed_service_unchanged(self) -> None:
        """A service without shard_key ignores a key and has no recent_keys."""
        resolver = ShardResolver(keyed_config(shard_key="none"), clock=self.clock, random=random.Random(1))
        self.assertEqual(len(resolver.resolve(self.request("tenant1"), retries=4)), 5)
        self.assertIsNone(resolver.explain(self.request("tenant1")).owners)
        self.assertIsNone(resolver.snapshot().services[0].shards[0].recent_keys)
