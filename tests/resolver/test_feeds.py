"""
Tests for shardtcp.resolver.feeds: signed threat-intelligence feeds, from
signing through validation and the state file to their effect on the
resolver and on admission.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from shardtcp import keys
from shardtcp.model import (
    Config,
    FeedSourceConfig,
    PolicyConfig,
    ProxyConfig,
    ServiceConfig,
    SigningConfig,
    ThreatIntelConfig,
)
from shardtcp.model import ConnectionRequest
from shardtcp.resolver import ShardResolver
from shardtcp.resolver.feeds import (
    MAX_FEED_SIZE,
    REASONS,
    FeedRejected,
    FeedState,
    FeedStateError,
    FeedValidator,
    ThreatIntel,
    ThreatIntelError,
    build_threat_intel,
    parse_claims,
    sign_feed,
    sign_feed_file,
)
from tests.support import FRANKFURT, NEW_YORK, SINGAPORE, shard

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
REFRESH = 60.0

INTEL_KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
ATTACKER_KEY = Ed25519PrivateKey.generate()
TRUSTED = {"intel-1": INTEL_KEY.public_key(), "intel-2": OTHER_KEY.public_key()}


def claims(**changes) -> dict:
    """Valid feed claims, issued at NOW for an hour, with ``changes``."""
    base = {
        "iss": "intel.example",
        "iat": NOW,
        "exp": NOW + 3600,
        "seq": 1,
        "shards": {},
        "deny": [],
    }
    base.update(changes)
    return base


def feed(key=INTEL_KEY, kid: str = "intel-1", **changes) -> bytes:
    """A feed signed with ``key`` under ``kid``."""
    return sign_feed(claims(**changes), key, kid)


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def raw_token(header: dict, payload: bytes, signature: bytes) -> bytes:
    """A compact JWS assembled by hand, with whatever header and signature."""
    return b".".join(
        [b64(json.dumps(header).encode()), b64(payload), b64(signature)]
    )


def clock_at(now: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(now)
    return clock


def make_config(min_score: float = 50.0) -> Config:
    """
    One service with shards in Frankfurt, New York and Singapore; the proxy
    stands in Frankfurt, so an unplaced client prefers api-fra-1.
    """
    service = ServiceConfig(
        id="api",
        names=("api.example.test",),
        policy=PolicyConfig(min_security_score=min_score),
        shards=(
            shard("api-fra-1", FRANKFURT, 9001, security_score=90.0),
            shard("api-nyc-1", NEW_YORK, 9002, security_score=80.0),
            shard("api-sg-1", SINGAPORE, 9003, security_score=70.0),
        ),
    )
    return Config(
        proxy=ProxyConfig(id="edge-test-1", location=FRANKFURT),
        signing=SigningConfig(private_key="/nonexistent/policy.pem", kid="policy-1"),
        services=(service,),
    )


def scores(resolver: ShardResolver) -> dict:
    return {i.shard_id: i.security_score for i in resolver.get_shard_info("api")}


BASELINE = {"api-fra-1": 90.0, "api-nyc-1": 80.0, "api-sg-1": 70.0}


def best(resolver: ShardResolver) -> str:
    request = ConnectionRequest(service_id="api", client=("10.9.9.9", 40000))
    return resolver.resolve(request)[0].shard.shard_id


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------
# Schema


class ParseClaimsTests(SynchronousTestCase):
    """Tests for parse_claims, the schema shared by signing and acceptance."""

    def assertInvalid(self, claim_set, reason: str = "invalid_claims") -> FeedRejected:
        with self.assertRaises(FeedRejected) as caught:
            parse_claims(claim_set)
        self.assertEqual(caught.exception.reason, reason)
        return caught.exception

    def test_valid(self) -> None:
        """Valid claims become a Feed with sorted scores and parsed networks."""
        result = parse_claims(
            claims(
                seq=7,
                shards={"b": 40, "a": 12.5},
                deny=["203.0.113.0/24", "2001:db8::/32", "192.0.2.1"],
            )
        )
        self.assertEqual(result.issuer, "intel.example")
        self.assertEqual((result.issued_at, result.expires_at, result.seq), (NOW, NOW + 3600, 7))
        self.assertEqual(result.shards, (("a", 12.5), ("b", 40.0)))
        self.assertEqual(
            result.deny,
            (
                ipaddress.ip_network("203.0.113.0/24"),
                ipaddress.ip_network("2001:db8::/32"),
                ipaddress.ip_network("192.0.2.1/32"),
            ),
        )

    def test_unknown_claims_ignored(self) -> None:
        """Claims outside the schema are ignored, for forward compatibility."""
        self.assertEqual(parse_claims(claims(note="hello", nbf=1)).seq, 1)

    def test_missing_claims(self) -> None:
        """Every one of the six claims is required; the message names the gap."""
        for name in ("iss", "iat", "exp", "seq", "shards", "deny"):
            claim_set = claims()
            del claim_set[name]
            error = self.assertInvalid(claim_set)
            self.assertIn(name, error.message)

    def test_not_an_object(self) -> None:
        """Claims that are not a JSON object are malformed."""
        self.assertInvalid(["iss"], reason="malformed")

    def test_bad_values(self) -> None:
        """Each schema violation is refused as invalid_claims."""
        bad = [
            {"iss": ""},
            {"iss": 5},
            {"iss": "line\nbreak"},
            {"iss": "x" * 257},
            {"iat": "now"},
            {"iat": True},
            {"exp": 1.5e9},
            {"exp": NOW},
            {"exp": NOW - 1},
            {"seq": -1},
            {"seq": 1.0},
            {"seq": True},
            {"seq": 2**63},
            {"shards": []},
            {"shards": {"": 10}},
            {"shards": {"a": 101}},
            {"shards": {"a": -0.5}},
            {"shards": {"a": "50"}},
            {"shards": {"a": True}},
            {"shards": {"a": float("nan")}},
            {"deny": "203.0.113.0/24"},
            {"deny": [24]},
            {"deny": ["203.0.113.0/33"]},
            {"deny": ["not-a-network"]},
        ]
        for changes in bad:
            with self.assertRaises(FeedRejected, msg=repr(changes)) as caught:
                parse_claims(claims(**changes))
            self.assertEqual(caught.exception.reason, "invalid_claims", changes)

    def test_host_bits(self) -> None:
        """A network with host bits set is refused, not silently widened."""
        error = self.assertInvalid(claims(deny=["203.0.113.7/24"]))
        self.assertIn("deny[0]", error.message)

    def test_mapped_networks_become_ipv4(self) -> None:
        """An IPv4-mapped IPv6 network is kept in its IPv4 form."""
        result = parse_claims(claims(deny=["::ffff:203.0.113.0/120"]))
        self.assertEqual(result.deny, (ipaddress.ip_network("203.0.113.0/24"),))


# ---------------------------------------------------------------------------
# Signing


class SignFeedTests(SynchronousTestCase):
    """Tests for sign_feed and sign_feed_file (``shardtcp sign-feed``)."""

    def test_header(self) -> None:
        """The JWS header is exactly alg EdDSA, the kid, and typ JWT."""
        token = feed(kid="intel-1")
        header = json.loads(base64.urlsafe_b64decode(token.split(b".")[0] + b"=="))
        self.assertEqual(header, {"alg": "EdDSA", "kid": "intel-1", "typ": "JWT"})

    def test_round_trip(self) -> None:
        """A signed feed validates with the matching public key."""
        validator = FeedValidator(TRUSTED, now=lambda: NOW)
        result = validator.validate(feed(seq=3, shards={"a": 20}))
        self.assertEqual((result.seq, result.kid, result.scores), (3, "intel-1", {"a": 20.0}))

    def test_refuses_invalid_claims(self) -> None:
        """sign_feed refuses claims that acceptance would refuse."""
        with self.assertRaises(FeedRejected) as caught:
            sign_feed(claims(deny=["10.0.0.1/8"]), INTEL_KEY, "intel-1")
        self.assertEqual(caught.exception.reason, "invalid_claims")

    def test_refuses_other_keys(self) -> None:
        """Only Ed25519 keys and non-empty kids sign feeds."""
        with self.assertRaises(TypeError):
            sign_feed(claims(), INTEL_KEY.public_key(), "intel-1")
        with self.assertRaises(ValueError):
            sign_feed(claims(), INTEL_KEY, "")

    def _files(self, claim_set) -> tuple[str, str]:
        folder = self.mktemp()
        paths = keys.generate_keypair(folder, kid="intel-1")
        feed_path = os.path.join(folder, "feed.json")
        with open(feed_path, "w") as f:
            if isinstance(claim_set, str):
                f.write(claim_set)
            else:
                json.dump(claim_set, f)
        return feed_path, paths

    def test_sign_file(self) -> None:
        """sign_feed_file signs the JSON file's claims with the PEM key."""
        feed_path, paths = self._files(claims(seq=9, deny=["198.51.100.0/24"]))
        token = sign_feed_file(feed_path, paths.private_key, "intel-1", now=lambda: NOW)
        validator = FeedValidator(keys.load_jwks(paths.jwks), now=lambda: NOW)
        result = validator.validate(token)
        self.assertEqual(result.seq, 9)
        self.assertEqual(result.deny, (ipaddress.ip_network("198.51.100.0/24"),))

    def test_sign_file_missing_exp(self) -> None:
        """A JSON file without exp is refused, naming the claim."""
        claim_set = claims()
        del claim_set["exp"]
        feed_path, paths = self._files(claim_set)
        with self.assertRaises(FeedRejected) as caught:
            sign_feed_file(feed_path, paths.private_key, "intel-1", now=lambda: NOW)
        self.assertEqual(caught.exception.reason, "invalid_claims")
        self.assertIn("exp", caught.exception.message)

    def test_sign_file_expired(self) -> None:
        """A feed whose exp has already passed is not signed."""
        feed_path, paths = self._files(claims())
        with self.assertRaises(FeedRejected) as caught:
            sign_feed_file(feed_path, paths.private_key, "intel-1", now=lambda: NOW + 3600)
        self.assertEqual(caught.exception.reason, "expired")

    def test_sign_file_bad_json(self) -> None:
        """A file that is not JSON (or repeats a key) is refused as malformed."""
        for text in ('{"iss": ', '{"seq": 1, "seq": 2}'):
            feed_path, paths = self._files(text)
            with self.assertRaises(FeedRejected) as caught:
                sign_feed_file(feed_path, paths.private_key, "intel-1", now=lambda: NOW)
            self.assertEqual(caught.exception.reason, "malformed")

    def test_sign_file_bad_key(self) -> None:
        """A key file holding a public key is a KeyFileError."""
        feed_path, paths = self._files(claims())
        with self.assertRaises(keys.KeyFileError):
            sign_feed_file(feed_path, paths.public_key, "intel-1", now=lambda: NOW)

    def test_sign_file_missing(self) -> None:
        """A missing feed file is an OSError."""
        with self.assertRaises(OSError):
            sign_feed_file(self.mktemp(), self.mktemp(), "intel-1", now=lambda: NOW)


# ---------------------------------------------------------------------------
# Validation


class FeedValidatorTests(SynchronousTestCase):
    """Tests for FeedValidator.validate: every refusal has its reason."""

    def setUp(self) -> None:
        self.now = NOW
        self.state = FeedState(None)
        self.validator = FeedValidator(TRUSTED, now=lambda: self.now, state=self.state)

    def assertRejected(self, raw: bytes, reason: str) -> FeedRejected:
        with self.assertRaises(FeedRejected) as caught:
            self.validator.validate(raw)
        self.assertEqual(caught.exception.reason, reason, caught.exception.message)
        return caught.exception

    def test_accepts(self) -> None:
        """A well-formed feed signed by a trusted key is accepted."""
        result = self.validator.validate(feed(seq=5) + b"\n")
        self.assertEqual(result.seq, 5)
        self.assertEqual(result.digest, hashlib.sha256(feed(seq=5)).hexdigest())

    def test_second_trusted_key(self) -> None:
        """Any key of the trusted set may sign, under its own kid."""
        self.assertEqual(self.validator.validate(feed(OTHER_KEY, "intel-2")).kid, "intel-2")

    def test_forged_unknown_key(self) -> None:
        """A feed signed by a key with an unknown kid is refused."""
        self.assertRejected(feed(ATTACKER_KEY, "attacker"), "unknown_kid")

    def test_forged_trusted_kid(self) -> None:
        """A feed signed by another key under a trusted kid fails its signature."""
        self.assertRejected(feed(ATTACKER_KEY, "intel-1"), "invalid_signature")

    def test_wrong_trusted_key(self) -> None:
        """A feed signed by one trusted key under the other's kid is refused."""
        self.assertRejected(feed(OTHER_KEY, "intel-1"), "invalid_signature")

    def test_tampered_claims(self) -> None:
        """Changing the claims after signing breaks the signature."""
        header, _, signature = feed(shards={"a": 10}).split(b".")
        payload = b64(json.dumps(claims(shards={"a": 100})).encode())
        self.assertRejected(b".".join([header, payload, signature]), "invalid_signature")

    def test_unsigned(self) -> None:
        """alg none, with or without a signature segment, is refused as unsigned."""
        payload = json.dumps(claims()).encode()
        self.assertRejected(raw_token({"alg": "none"}, payload, b""), "unsigned")
        self.assertRejected(raw_token({"alg": "None", "kid": "intel-1"}, payload, b"x"), "unsigned")

    def test_empty_signature(self) -> None:
        """alg EdDSA with an empty signature is refused as unsigned."""
        payload = json.dumps(claims()).encode()
        self.assertRejected(
            raw_token({"alg": "EdDSA", "kid": "intel-1"}, payload, b""), "unsigned"
        )

    def test_hs256_key_confusion(self) -> None:
        """
        A feed MACed with HS256 using the trusted public key (raw or PEM) as
        the secret is refused for its algorithm: the public key is never
        used as an HMAC secret.
        """
        public = INTEL_KEY.public_key()
        secrets = [
            public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        ]
        for secret in secrets:
            header = b64(json.dumps({"alg": "HS256", "kid": "intel-1", "typ": "JWT"}).encode())
            payload = b64(json.dumps(claims()).encode())
            mac = hmac.new(secret, header + b"." + payload, hashlib.sha256).digest()
            self.assertRejected(header + b"." + payload + b"." + b64(mac), "bad_algorithm")

    def test_other_algorithms(self) -> None:
        """Any alg but EdDSA, or none at all, is bad_algorithm."""
        payload = json.dumps(claims()).encode()
        for header in ({"alg": "ES256", "kid": "intel-1"}, {"kid": "intel-1"}, {"alg": 5}):
            self.assertRejected(raw_token(header, payload, b"s" * 64), "bad_algorithm")

    def test_missing_kid(self) -> None:
        """A header without a kid names no trusted key."""
        payload = json.dumps(claims()).encode()
        self.assertRejected(raw_token({"alg": "EdDSA"}, payload, b"s" * 64), "unknown_kid")

    def test_short_signature(self) -> None:
        """A signature that is not 64 bytes long cannot verify."""
        header, payload, _ = feed().split(b".")
        self.assertRejected(header + b"." + payload + b"." + b64(b"s" * 63), "invalid_signature")

    def test_expired(self) -> None:
        """A feed is refused from the second its exp is reached."""
        token = feed()
        self.now = NOW + 3600 - 1
        self.validator.validate(token)
        self.now = NOW + 3600
        self.assertRejected(token, "expired")

    def test_issued_in_future(self) -> None:
        """iat up to 60 s ahead is tolerated; further ahead is refused."""
        self.validator.validate(feed(iat=NOW + 60, exp=NOW + 3600))
        self.assertRejected(feed(iat=NOW + 61, exp=NOW + 3600), "issued_in_future")

    def test_replayed(self) -> None:
        """Another feed with the last accepted seq of its issuer is a replay."""
        first = self.validator.validate(feed(seq=4))
        self.state.record(first)
        self.assertRejected(feed(seq=4, shards={"api-fra-1": 0}), "replayed")

    def test_same_feed_again(self) -> None:
        """The very feed last accepted may be seen again (unchanged source)."""
        token = feed(seq=4)
        self.state.record(self.validator.validate(token))
        self.assertEqual(self.validator.validate(token).seq, 4)

    def test_rolled_back(self) -> None:
        """A feed with a lower seq than the issuer's last is refused."""
        self.state.record(self.validator.validate(feed(seq=4)))
        self.assertRejected(feed(seq=3), "rolled_back")

    def test_seq_per_issuer(self) -> None:
        """seq grows per issuer: another issuer's history does not count."""
        self.state.record(self.validator.validate(feed(seq=40)))
        self.assertEqual(self.validator.validate(feed(iss="other.example", seq=1)).seq, 1)

    def test_oversized(self) -> None:
        """
        A feed over 1 MiB is refused as too_large, before any parsing: even
        bytes that are not a JWS at all get that reason.
        """
        self.assertRejected(b"x" * (MAX_FEED_SIZE + 1), "too_large")
        big = feed_unchecked(claims(note="p" * 800_000))
        self.assertGreater(len(big), MAX_FEED_SIZE)
        self.assertRejected(big, "too_large")

    def test_signing_refuses_oversized(self) -> None:
        """sign_feed will not produce a feed the proxy would refuse for size."""
        with self.assertRaises(FeedRejected) as caught:
            sign_feed(claims(note="p" * 800_000), INTEL_KEY, "intel-1")
        self.assertEqual(caught.exception.reason, "too_large")

    def test_size_limit_is_inclusive(self) -> None:
        """A feed of exactly max_size bytes is not too large."""
        token = feed()
        validator = FeedValidator(TRUSTED, now=lambda: NOW, max_size=len(token))
        validator.validate(token)
        with self.assertRaises(FeedRejected) as caught:
            validator.validate(token + b"=")
        self.assertEqual(caught.exception.reason, "too_large")

    def test_malformed(self) -> None:
        """Anything that is not a compact JWS of JSON objects is malformed."""
        signature = b"s" * 64
        cases = [
            b"",
            b"not a token",
            b"a.b",
            b"a.b.c.d",
            b'{"payload": "x"}',
            b"a+b.c.d",
            b"eyJ=.e30.c2ln",
            b64(b"not json") + b"." + b64(b"{}") + b"." + b64(signature),
            b64(b'["alg"]') + b"." + b64(b"{}") + b"." + b64(signature),
            b64(b'{"alg":"EdDSA","alg":"none","kid":"intel-1"}') + b"." + b64(b"{}") + b"." + b64(signature),
            b"abcde." + b64(b"{}") + b"." + b64(signature),
        ]
        for raw in cases:
            self.assertRejected(raw, "malformed")

    def test_crit_header(self) -> None:
        """A header with crit extensions is refused (none are understood)."""
        payload = json.dumps(claims()).encode()
        self.assertRejected(
            raw_token({"alg": "EdDSA", "kid": "intel-1", "crit": ["exp"]}, payload, b"s" * 64),
            "malformed",
        )

    def _signed_payload(self, payload: bytes) -> bytes:
        header = b64(json.dumps({"alg": "EdDSA", "kid": "intel-1"}).encode())
        body = b64(payload)
        return header + b"." + body + b"." + b64(INTEL_KEY.sign(header + b"." + body))

    def test_signed_malformed_claims(self) -> None:
        """Correctly signed claims that are not a JSON object are malformed."""
        for payload in (b"[1, 2]", b"not json", b'{"seq": 1, "seq": 2}', b'{"seq": NaN}', b"\xff"):
            self.assertRejected(self._signed_payload(payload), "malformed")

    def test_signed_schema_error(self) -> None:
        """Correctly signed claims that break the schema are invalid_claims."""
        self.assertRejected(feed_unchecked(claims(shards={"a": 150})), "invalid_claims")

    def test_rejects_non_ed25519_trust(self) -> None:
        """Only Ed25519 public keys can be trusted."""
        with self.assertRaises(TypeError):
            FeedValidator({"k": object()}, now=lambda: NOW)

    def test_reasons_are_listed(self) -> None:
        """Every reason raised here is one of REASONS."""
        for reason in ("too_large", "malformed", "unsigned", "bad_algorithm", "unknown_kid",
                       "invalid_signature", "invalid_claims", "expired", "issued_in_future",
                       "replayed", "rolled_back", "unavailable"):
            self.assertIn(reason, REASONS)


def feed_unchecked(claim_set: dict, key=INTEL_KEY, kid: str = "intel-1") -> bytes:
    """Sign claims without the schema check, as a careless publisher could."""
    header = b64(json.dumps({"alg": "EdDSA", "kid": kid, "typ": "JWT"}).encode())
    payload = b64(json.dumps(claim_set).encode())
    return header + b"." + payload + b"." + b64(key.sign(header + b"." + payload))


# ---------------------------------------------------------------------------
# State


class FeedLoosenessTests(SynchronousTestCase):
    """
    Issue 9's looseness in feeds, each refused: non-canonical base64url,
    deny entries that are not CIDR, and numbers too large for a float.
    """

    def setUp(self) -> None:
        self.validator = FeedValidator(TRUSTED, now=lambda: NOW, state=FeedState(None))

    def assertRejected(self, raw: bytes, reason: str) -> FeedRejected:
        with self.assertRaises(FeedRejected) as caught:
            self.validator.validate(raw)
        self.assertEqual(caught.exception.reason, reason, caught.exception.message)
        return caught.exception

    def test_signature_reencodings_refused(self) -> None:
        """
        The 15 re-spellings of the signature's last character that decode to
        the same 64 bytes (set spare bits) are all refused as malformed;
        the canonical spelling is accepted.
        """
        good = feed()
        self.validator.validate(good)
        head, body, sig = good.split(b".")
        alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        value = alphabet.index(sig[-1])
        same_bytes = [c for i, c in enumerate(alphabet) if i >> 4 == value >> 4 and i != value]
        self.assertEqual(len(same_bytes), 15)
        for c in same_bytes:
            self.assertRejected(head + b"." + body + b"." + sig[:-1] + bytes([c]), "malformed")

    def test_deny_zone_and_netmask_refused(self) -> None:
        """Deny entries with a zone or in netmask form are invalid claims; CIDR passes."""
        for entry in ("fe80::1%eth0/128", "10.0.0.0/255.0.0.0", "10.0.0.0/0.255.255.255"):
            with self.assertRaises(FeedRejected) as caught:
                parse_claims(claims(deny=[entry]))
            self.assertEqual(caught.exception.reason, "invalid_claims", entry)
            self.assertIn("deny[0]", caught.exception.message)
        self.assertEqual(
            [str(n) for n in parse_claims(claims(deny=["fe80::1/128", "10.0.0.0/8"])).deny],
            ["fe80::1/128", "10.0.0.0/8"],
        )

    def _signed(self, **changes) -> bytes:
        # sign_feed would refuse these claims: sign them by hand.
        header = b64(b'{"alg":"EdDSA","kid":"intel-1","typ":"JWT"}')
        payload = b64(json.dumps(claims(**changes)).encode())
        signature = b64(INTEL_KEY.sign(header + b"." + payload))
        return header + b"." + payload + b"." + signature

    def test_huge_exp_refused(self) -> None:
        """An exp of 10**400 is invalid_claims, not accepted nor OverflowError; the last date passes."""
        self.assertRejected(self._signed(exp=10**400), "invalid_claims")
        self.assertRejected(self._signed(exp=253_402_300_800), "invalid_claims")
        self.assertEqual(
            self.validator.validate(self._signed(exp=253_402_300_799)).expires_at,
            253_402_300_799,
        )

    def test_huge_score_refused(self) -> None:
        """A score of 10**400 or 1e400 is invalid_claims, not OverflowError; 100 passes."""
        self.assertRejected(self._signed(shards={"a": 10**400}), "invalid_claims")
        self.assertRejected(self._signed(shards={"a": 101}), "invalid_claims")
        raw = self._signed(shards={"a": 100}).split(b".")
        self.assertEqual(self.validator.validate(self._signed(shards={"a": 100})).scores, {"a": 100.0})
        payload = b64(json.dumps(claims(shards={"a": 1})).encode().replace(b'"a": 1', b'"a": 1e400'))
        signature = b64(INTEL_KEY.sign(raw[0] + b"." + payload))
        self.assertRejected(raw[0] + b"." + payload + b"." + signature, "invalid_claims")
        with self.assertRaises(FeedRejected):
            parse_claims(claims(shards={"a": 10**400}))


class FeedStateTests(SynchronousTestCase):
    """Tests for FeedState and its state file."""

    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "feeds.state")
        self.validator = FeedValidator(TRUSTED, now=lambda: NOW)

    def test_missing_file_is_empty(self) -> None:
        """A state file that does not exist yet is an empty state."""
        state = FeedState(self.path)
        self.assertEqual(state.entries(), {})
        self.assertFalse(os.path.exists(self.path))

    def test_record_persists(self) -> None:
        """A recorded feed is in the file, and a new FeedState reads it back."""
        accepted = self.validator.validate(feed(seq=12))
        FeedState(self.path).record(accepted)
        entry = FeedState(self.path).last("intel.example")
        self.assertEqual(
            (entry.seq, entry.digest, entry.expires_at, entry.token),
            (12, accepted.digest, NOW + 3600, accepted.token),
        )
        self.assertEqual(os.listdir(self.folder), ["feeds.state"])

    def test_restart_refuses_old_seq(self) -> None:
        """After a restart, the state file still refuses older and replayed feeds."""
        state = FeedState(self.path)
        state.record(self.validator.validate(feed(seq=5)))
        restarted = FeedValidator(TRUSTED, now=lambda: NOW, state=FeedState(self.path))
        for raw, reason in ((feed(seq=4), "rolled_back"), (feed(seq=5, deny=["192.0.2.0/24"]), "replayed")):
            with self.assertRaises(FeedRejected) as caught:
                restarted.validate(raw)
            self.assertEqual(caught.exception.reason, reason)
        self.assertEqual(restarted.validate(feed(seq=6)).seq, 6)

    def test_memory_only(self) -> None:
        """Without a path the state lives in memory and no file is written."""
        state = FeedState(None)
        state.record(self.validator.validate(feed(seq=2)))
        self.assertEqual(state.last("intel.example").seq, 2)
        self.assertEqual(os.listdir(self.folder), [])

    def test_corrupt_file(self) -> None:
        """A state file that does not parse stops start-up with its path named."""
        for content in (b"{not json", b"[]", b'{"version": 2, "issuers": {}}',
                        b'{"version": 1, "issuers": {"i": {"seq": "5"}}}',
                        b'{"version": 1, "issuers": {"i": {"seq": 5, "digest": "zz", "exp": 1}}}',
                        b""):
            write(self.path, content)
            with self.assertRaises(FeedStateError) as caught:
                FeedState(self.path)
            self.assertIn(self.path, str(caught.exception))

    def test_unreadable_file(self) -> None:
        """A state path that cannot be read (a folder) stops start-up too."""
        with self.assertRaises(FeedStateError):
            FeedState(self.folder)

    def test_failed_write_keeps_memory(self) -> None:
        """
        When the file cannot be written, record raises OSError but the new
        seq is still held in memory, so this process cannot go back.
        """
        state = FeedState(os.path.join(self.folder, "gone", "feeds.state"))
        with self.assertRaises(OSError):
            state.record(self.validator.validate(feed(seq=3)))
        self.assertEqual(state.last("intel.example").seq, 3)

    def test_replace_not_append(self) -> None:
        """A newer feed replaces the issuer's entry, keeping other issuers."""
        state = FeedState(self.path)
        state.record(self.validator.validate(feed(seq=1)))
        state.record(self.validator.validate(feed(iss="b.example", seq=9)))
        state.record(self.validator.validate(feed(seq=2)))
        reloaded = FeedState(self.path)
        self.assertEqual(
            {k: v.seq for k, v in reloaded.entries().items()},
            {"intel.example": 2, "b.example": 9},
        )


# ---------------------------------------------------------------------------
# The service, with file sources


class ThreatIntelFileTests(SynchronousTestCase):
    """Tests for ThreatIntel polling feed files with an injected clock."""

    def setUp(self) -> None:
        self.clock = clock_at(NOW)
        self.folder = self.mktemp()
        os.makedirs(self.folder)
        self.feed_path = os.path.join(self.folder, "threat.jws")
        self.state_path = os.path.join(self.folder, "feeds.state")
        self.resolver = ShardResolver(make_config(), clock=self.clock)
        self.registry = CollectorRegistry()

    def service(self, sources=None, *, on_expiry: str = "baseline", state_path=None, registry=None) -> ThreatIntel:
        state = FeedState(state_path if state_path is not None else self.state_path)
        validator = FeedValidator(TRUSTED, now=self.clock.seconds, state=state)
        if sources is None:
            sources = [FeedSourceConfig(source=self.feed_path, refresh=REFRESH)]
        intel = ThreatIntel(
            validator,
            sources,
            self.resolver,
            reactor=self.clock,
            on_expiry=on_expiry,
            registry=registry,
        )
        self.addCleanup(lambda: intel.running and intel.stopService())
        return intel

    def publish(self, raw: bytes, path=None) -> None:
        write(path or self.feed_path, raw)

    def test_applies_scores_and_deny(self) -> None:
        """An accepted feed changes shard scores and denies its networks."""
        self.publish(feed(shards={"api-fra-1": 40, "api-sg-1": 95}, deny=["203.0.113.0/24"]))
        intel = self.service()
        intel.startService()
        self.assertEqual(scores(self.resolver), {"api-fra-1": 40.0, "api-nyc-1": 80.0, "api-sg-1": 95.0})
        self.assertEqual(intel.denies("203.0.113.9"), "threat feed intel.example seq 1 denies 203.0.113.0/24")
        self.assertIsNone(intel.denies("198.51.100.1"))
        self.assertEqual(intel.accepted, 1)

    def test_lower_score_moves_traffic(self) -> None:
        """
        A feed scoring the best shard below the service's min_security_score
        takes it out of resolve(): traffic moves to the next shard.
        """
        intel = self.service()
        intel.startService()
        self.assertEqual(best(self.resolver), "api-fra-1")
        self.publish(feed(shards={"api-fra-1": 30}))
        self.clock.advance(REFRESH)
        self.assertNotEqual(best(self.resolver), "api-fra-1")
        request = ConnectionRequest(service_id="api", client=("10.9.9.9", 40000))
        rejected = {s.shard.shard_id: s.rejected_by for s in self.resolver.explain(request).shards}
        self.assertEqual(rejected["api-fra-1"], ("min_security_score: 30 < 50",))

    def test_rejections_keep_last_good_feed(self) -> None:
        """
        Forged, unsigned, expired, replayed, rolled-back, oversized and
        malformed feeds are each rejected with their reason and counted;
        the last good feed stays in force throughout.
        """
        good = feed(seq=5, shards={"api-fra-1": 30}, deny=["203.0.113.0/24"])
        self.publish(good)
        intel = self.service(registry=self.registry)
        intel.startService()
        expected_scores = dict(BASELINE, **{"api-fra-1": 30.0})
        bad = [
            (feed(ATTACKER_KEY, "attacker", seq=6), "unknown_kid"),
            (feed(ATTACKER_KEY, "intel-1", seq=6), "invalid_signature"),
            (raw_token({"alg": "none"}, json.dumps(claims(seq=6)).encode(), b""), "unsigned"),
            (feed(seq=6, iat=NOW - 7200, exp=NOW - 1), "expired"),
            (feed(seq=5, shards={}), "replayed"),
            (feed(seq=4, shards={}), "rolled_back"),
            (b"A" * (MAX_FEED_SIZE + 1), "too_large"),
            (b"<html>502 Bad Gateway</html>", "malformed"),
            (feed_unchecked(claims(seq=6, deny=["10.0.0.1/8"])), "invalid_claims"),
        ]
        for raw, reason in bad:
            self.publish(raw)
            self.clock.advance(REFRESH)
            self.assertEqual(intel.rejections[reason], 1, reason)
            self.assertEqual(scores(self.resolver), expected_scores, reason)
            self.assertIsNotNone(intel.denies("203.0.113.1"), reason)
            self.assertEqual(
                self.registry.get_sample_value("shardtcp_feed_rejected_total", {"reason": reason}), 1.0
            )
            status = intel.status()["sources"][0]
            self.assertEqual((status["last_result"], status["last_reason"]), ("rejected", reason))
        self.assertEqual(intel.accepted, 1)
        self.assertEqual(FeedState(self.state_path).last("intel.example").seq, 5)

    def test_reset_when_no_longer_listed(self) -> None:
        """A shard left out of the next feed goes back to its baseline."""
        self.publish(feed(seq=1, shards={"api-fra-1": 30, "api-nyc-1": 20}))
        intel = self.service()
        intel.startService()
        self.publish(feed(seq=2, shards={"api-nyc-1": 60}, deny=["192.0.2.0/24"]))
        self.clock.advance(REFRESH)
        self.assertEqual(scores(self.resolver), dict(BASELINE, **{"api-nyc-1": 60.0}))
        self.assertIsNotNone(intel.denies("192.0.2.1"))
        self.assertEqual(intel.accepted, 2)

    def test_unknown_shards_ignored(self) -> None:
        """Unknown shard ids in a feed are ignored; the known ones apply."""
        self.publish(feed(shards={"nope-1": 0, "api-sg-1": 10}))
        intel = self.service()
        intel.startService()
        self.assertEqual(scores(self.resolver), dict(BASELINE, **{"api-sg-1": 10.0}))
        self.assertEqual(intel.status()["overrides"], {"api-sg-1": 10.0})

    def test_file_reread_on_refresh(self) -> None:
        """The file is read again every refresh, and only then."""
        self.publish(feed(seq=1, shards={"api-fra-1": 60}))
        intel = self.service()
        intel.startService()
        self.publish(feed(seq=2, shards={"api-fra-1": 61}))
        self.clock.advance(REFRESH - 1)
        self.assertEqual(scores(self.resolver)["api-fra-1"], 60.0)
        self.clock.advance(1)
        self.assertEqual(scores(self.resolver)["api-fra-1"], 61.0)

    def test_unchanged_file(self) -> None:
        """An unchanged file is neither a new acceptance nor a rejection."""
        self.publish(feed(seq=1))
        intel = self.service()
        intel.startService()
        self.clock.advance(REFRESH * 3)
        self.assertEqual(intel.accepted, 1)
        self.assertEqual(sum(intel.rejections.values()), 0)
        self.assertEqual(intel.status()["sources"][0]["last_result"], "unchanged")

    def test_missing_file(self) -> None:
        """A feed file that cannot be read is counted as unavailable."""
        intel = self.service()
        intel.startService()
        self.assertEqual(intel.rejections["unavailable"], 1)
        self.assertIn(self.feed_path, intel.status()["sources"][0]["last_message"])

    def test_stop_stops_polling(self) -> None:
        """After stopService no poll runs and no expiry fires."""
        self.publish(feed(seq=1, shards={"api-fra-1": 60}))
        intel = self.service()
        intel.startService()
        intel.stopService()
        self.publish(feed(seq=2, shards={"api-fra-1": 61}))
        self.clock.advance(REFRESH * 100)
        self.assertEqual(scores(self.resolver)["api-fra-1"], 60.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expiry_baseline(self) -> None:
        """
        With on_expiry baseline, an expired feed's scores go back to the
        baselines and its deny networks stop applying, at exp exactly.
        """
        self.publish(feed(shards={"api-fra-1": 30}, deny=["203.0.113.0/24"]))
        intel = self.service(on_expiry="baseline")
        intel.startService()
        self.clock.advance(3600 - 1)
        self.assertEqual(scores(self.resolver)["api-fra-1"], 30.0)
        self.assertIsNotNone(intel.denies("203.0.113.1"))
        self.clock.advance(1)
        self.assertEqual(scores(self.resolver), BASELINE)
        self.assertIsNone(intel.denies("203.0.113.1"))
        self.assertTrue(intel.status()["feeds"][0]["expired"])

    def test_expiry_distrust(self) -> None:
        """
        With on_expiry distrust, an expired feed makes every shard score 0
        (so min_security_score leaves none) and keeps its deny networks,
        until a newer feed arrives.
        """
        self.publish(feed(seq=1, shards={"api-fra-1": 30}, deny=["203.0.113.0/24"]))
        intel = self.service(on_expiry="distrust")
        intel.startService()
        self.clock.advance(3600)
        self.assertEqual(scores(self.resolver), {"api-fra-1": 0.0, "api-nyc-1": 0.0, "api-sg-1": 0.0})
        self.assertIn("on_expiry=distrust", intel.denies("203.0.113.1"))
        self.assertTrue(intel.status()["distrusting"])
        self.publish(feed(seq=2, iat=NOW + 3600, exp=NOW + 7200, shards={"api-nyc-1": 75}))
        self.clock.advance(REFRESH)
        self.assertEqual(scores(self.resolver), dict(BASELINE, **{"api-nyc-1": 75.0}))
        self.assertIsNone(intel.denies("203.0.113.1"))

    def test_newer_feed_moves_expiry(self) -> None:
        """A newer feed's exp replaces the older one's expiry timer."""
        self.publish(feed(seq=1, shards={"api-fra-1": 30}))
        intel = self.service()
        intel.startService()
        self.publish(feed(seq=2, exp=NOW + 7200, shards={"api-fra-1": 31}))
        self.clock.advance(REFRESH)
        self.clock.advance(3600)
        self.assertEqual(scores(self.resolver)["api-fra-1"], 31.0)
        self.clock.advance(3600)
        self.assertEqual(scores(self.resolver)["api-fra-1"], 90.0)

    def test_combination(self) -> None:
        """
        Feeds of two issuers combine: the lowest score for a shard wins and
        the deny networks are the union.
        """
        second = os.path.join(self.folder, "second.jws")
        self.publish(feed(shards={"api-fra-1": 30, "api-nyc-1": 70}, deny=["203.0.113.0/24"]))
        self.publish(feed(OTHER_KEY, "intel-2", iss="b.example", shards={"api-fra-1": 60, "api-nyc-1": 10},
                          deny=["2001:db8::/32"]), second)
        intel = self.service([FeedSourceConfig(self.feed_path, REFRESH), FeedSourceConfig(second, REFRESH)])
        intel.startService()
        self.assertEqual(scores(self.resolver), dict(BASELINE, **{"api-fra-1": 30.0, "api-nyc-1": 10.0}))
        self.assertIn("intel.example", intel.denies("203.0.113.5"))
        self.assertIn("b.example", intel.denies("2001:db8::1"))

    def test_same_issuer_two_sources(self) -> None:
        """
        Two sources of one issuer: the newest feed is in force, and a stale
        mirror is refused as a rollback rather than undoing it.
        """
        mirror = os.path.join(self.folder, "mirror.jws")
        self.publish(feed(seq=2, shards={"api-fra-1": 20}))
        self.publish(feed(seq=1, shards={"api-fra-1": 90}), mirror)
        intel = self.service([FeedSourceConfig(self.feed_path, REFRESH), FeedSourceConfig(mirror, REFRESH)])
        intel.startService()
        self.assertEqual(scores(self.resolver)["api-fra-1"], 20.0)
        self.assertEqual(intel.rejections["rolled_back"], 1)

    def test_denies_addresses(self) -> None:
        """
        denies matches IPv4, IPv4-mapped IPv6 (as IPv4) and IPv6 clients,
        names the most specific network, and passes anything not an IP.
        """
        self.publish(feed(deny=["203.0.113.0/24", "203.0.113.128/25", "2001:db8::/32"]))
        intel = self.service()
        self.assertIsNone(intel.denies("203.0.113.200"))  # nothing before start
        intel.startService()
        self.assertTrue(intel.denies("203.0.113.200").endswith("denies 203.0.113.128/25"))
        self.assertTrue(intel.denies("203.0.113.1").endswith("denies 203.0.113.0/24"))
        self.assertTrue(intel.denies("::ffff:203.0.113.1").endswith("denies 203.0.113.0/24"))
        self.assertIsNotNone(intel.denies("2001:db8:1::7"))
        self.assertIsNotNone(intel.denies("2001:db8:1::7%eth0"))
        self.assertIsNotNone(intel.denies("::FFFF:CB00:7101"))
        for ip in ("203.0.114.1", "2001:db9::1", "::ffff:198.51.100.1", "not-an-ip", ""):
            self.assertIsNone(intel.denies(ip), ip)

    def test_restart_restores_feed(self) -> None:
        """
        A restart applies the feed remembered in the state file at once,
        even when the source is unreachable, and still refuses an older seq.
        """
        self.publish(feed(seq=7, shards={"api-fra-1": 30}, deny=["203.0.113.0/24"]))
        first = self.service()
        first.startService()
        first.stopService()
        self.resolver = ShardResolver(make_config(), clock=self.clock)
        os.unlink(self.feed_path)
        second = self.service()
        second.startService()
        self.assertEqual(scores(self.resolver)["api-fra-1"], 30.0)
        self.assertIsNotNone(second.denies("203.0.113.1"))
        self.assertEqual(second.rejections["unavailable"], 1)
        self.publish(feed(seq=6, shards={}))
        self.clock.advance(REFRESH)
        self.assertEqual(second.rejections["rolled_back"], 1)
        self.assertEqual(scores(self.resolver)["api-fra-1"], 30.0)

    def test_restart_same_feed_is_not_replay(self) -> None:
        """After a restart the unchanged feed file is not counted as a replay."""
        self.publish(feed(seq=7))
        self.service().startService()
        second = self.service()
        second.startService()
        self.assertEqual(sum(second.rejections.values()), 0)
        self.assertEqual(second.status()["sources"][0]["last_result"], "unchanged")

    def test_restart_with_expired_feed_distrusts(self) -> None:
        """
        A restart with on_expiry distrust after the remembered feed expired
        still distrusts: restarting does not lift it.
        """
        self.publish(feed(seq=7))
        first = self.service(on_expiry="distrust")
        first.startService()
        first.stopService()
        self.clock.advance(7200)
        self.resolver = ShardResolver(make_config(), clock=self.clock)
        second = self.service(on_expiry="distrust")
        second.startService()
        self.assertEqual(set(scores(self.resolver).values()), {0.0})
        self.assertEqual(second.rejections["expired"], 1)

    def test_restart_drops_feed_of_removed_key(self) -> None:
        """A remembered feed whose key is no longer trusted is not applied."""
        self.publish(feed(OTHER_KEY, "intel-2", seq=7, shards={"api-fra-1": 30}))
        self.service().startService()
        os.unlink(self.feed_path)
        self.resolver = ShardResolver(make_config(), clock=self.clock)
        state = FeedState(self.state_path)
        intel = ThreatIntel(
            FeedValidator({"intel-1": INTEL_KEY.public_key()}, now=self.clock.seconds, state=state),
            [FeedSourceConfig(self.feed_path, REFRESH)],
            self.resolver,
            reactor=self.clock,
        )
        intel.startService()
        self.addCleanup(intel.stopService)
        self.assertEqual(scores(self.resolver), BASELINE)

    def test_metrics(self) -> None:
        """Accepted feeds are counted and their seq and exp published."""
        self.publish(feed(seq=3))
        intel = self.service(registry=self.registry)
        intel.startService()
        get = self.registry.get_sample_value
        self.assertEqual(get("shardtcp_feed_accepted_total"), 1.0)
        self.assertEqual(get("shardtcp_feed_seq", {"issuer": "intel.example"}), 3.0)
        self.assertEqual(get("shardtcp_feed_expires_at_seconds", {"issuer": "intel.example"}), NOW + 3600.0)
        self.assertEqual(get("shardtcp_feed_rejected_total", {"reason": "expired"}), 0.0)

    def test_status(self) -> None:
        """status() reports sources, feeds, overrides and counters as JSON."""
        self.publish(feed(seq=3, shards={"api-fra-1": 30}, deny=["203.0.113.0/24"]))
        intel = self.service()
        intel.startService()
        status = intel.status()
        json.dumps(status)
        self.assertEqual(status["feeds"][0]["issuer"], "intel.example")
        self.assertEqual(status["feeds"][0]["seq"], 3)
        self.assertEqual(status["feeds"][0]["expires_in"], 3600.0)
        self.assertEqual(status["overrides"], {"api-fra-1": 30.0})
        self.assertEqual(status["deny_networks"], 1)
        self.assertEqual(status["sources"][0]["last_result"], "accepted")
        self.assertEqual(status["state_file"], self.state_path)

    def test_state_write_failure(self) -> None:
        """A state file that cannot be written is counted; the feed applies."""
        self.publish(feed(seq=3, shards={"api-fra-1": 30}))
        intel = self.service(state_path=os.path.join(self.folder, "missing", "feeds.state"))
        intel.startService()
        self.assertEqual(scores(self.resolver)["api-fra-1"], 30.0)
        self.assertEqual(intel.state_write_failures, 1)

    def test_refresh_now(self) -> None:
        """refresh() polls every source at once, without waiting for the timer."""
        intel = self.service()
        intel.startService()
        self.publish(feed(seq=1, shards={"api-fra-1": 33}))
        done = intel.refresh()
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(scores(self.resolver)["api-fra-1"], 33.0)

    def test_bad_on_expiry(self) -> None:
        """on_expiry must be baseline or distrust."""
        with self.assertRaises(ValueError):
            self.service(on_expiry="ignore")


# ---------------------------------------------------------------------------
# build_threat_intel


class BuildThreatIntelTests(SynchronousTestCase):
    """Tests for build_threat_intel, used by the service tree."""

    def setUp(self) -> None:
        self.folder = self.mktemp()
        self.paths = keys.generate_keypair(self.folder, kid="intel-1")
        self.clock = clock_at(NOW)

    def config(self, **settings) -> Config:
        base = make_config()
        return Config(
            proxy=base.proxy,
            signing=base.signing,
            services=base.services,
            threat_intel=ThreatIntelConfig(**settings) if settings else None,
        )

    def test_none_without_section(self) -> None:
        """No [threat_intel]: no service."""
        self.assertIsNone(build_threat_intel(self.config(), object(), self.clock))

    def test_builds(self) -> None:
        """With [threat_intel], a service trusting the JWKS, polling the feeds."""
        feed_path = os.path.join(self.folder, "threat.jws")
        key = keys.load_private_key(self.paths.private_key)
        write(feed_path, sign_feed(claims(shards={"api-fra-1": 11}), key, "intel-1"))
        resolver = ShardResolver(make_config(), clock=self.clock)
        intel = build_threat_intel(
            self.config(
                trusted_keys=self.paths.jwks,
                feeds=(FeedSourceConfig(feed_path, REFRESH),),
                on_expiry="distrust",
                state_file=os.path.join(self.folder, "feeds.state"),
            ),
            resolver,
            self.clock,
            registry=CollectorRegistry(),
        )
        intel.startService()
        self.addCleanup(intel.stopService)
        self.assertEqual(scores(resolver)["api-fra-1"], 11.0)
        self.assertEqual(intel.status()["on_expiry"], "distrust")

    def test_corrupt_state_refuses_to_start(self) -> None:
        """A corrupt state file is an error at build time."""
        state = os.path.join(self.folder, "feeds.state")
        write(state, b"garbage")
        with self.assertRaises(FeedStateError):
            build_threat_intel(
                self.config(trusted_keys=self.paths.jwks, state_file=state), object(), self.clock
            )

    def test_bad_jwks_refuses_to_start(self) -> None:
        """An unreadable trusted_keys JWKS is a ThreatIntelError naming the key."""
        for path in (os.path.join(self.folder, "absent.json"), self.paths.private_key):
            with self.assertRaises(ThreatIntelError) as caught:
                build_threat_intel(self.config(trusted_keys=path), object(), self.clock)
            self.assertIn("threat_intel.trusted_keys", str(caught.exception))


# ---------------------------------------------------------------------------
# http(s) sources with a fake Agent


class FakeBodyTransport:
    """The transport a response body is delivered over."""

    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class FakeResponse:
    """An IResponse whose body the test feeds by hand."""

    def __init__(self, code: int = 200, length=UNKNOWN_LENGTH, phrase: bytes = b"OK") -> None:
        self.code = code
        self.length = length
        self.phrase = phrase
        self.protocol = None
        self.transport = FakeBodyTransport()

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def finish(self, body: bytes = b"") -> None:
        if body:
            self.protocol.dataReceived(body)
        self.protocol.connectionLost(Failure(ResponseDone()))


@implementer(IAgent)
class FakeAgent:
    """An IAgent that records requests and answers when told."""

    def __init__(self) -> None:
        self.requests: list = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        d = defer.Deferred()
        self.requests.append((method, uri, headers, d))
        return d


URL = "https://intel.example.test/feeds/shards.jws"


class ThreatIntelHTTPTests(SynchronousTestCase):
    """Tests for ThreatIntel fetching http(s) sources through an IAgent."""

    def setUp(self) -> None:
        self.clock = clock_at(NOW)
        self.agent = FakeAgent()
        self.resolver = ShardResolver(make_config(), clock=self.clock)

    def service(self, url: str = URL) -> ThreatIntel:
        intel = ThreatIntel(
            FeedValidator(TRUSTED, now=self.clock.seconds),
            [FeedSourceConfig(url, REFRESH)],
            self.resolver,
            reactor=self.clock,
            agent=self.agent,
            fetch_timeout=10.0,
        )
        intel.startService()
        self.addCleanup(intel.stopService)
        return intel

    def respond(self, response: FakeResponse) -> None:
        self.agent.requests[-1][3].callback(response)

    def test_fake_agent_is_an_agent(self) -> None:
        """The fake provides IAgent, so these tests exercise the real seam."""
        verifyObject(IAgent, FakeAgent())

    def test_fetch_and_apply(self) -> None:
        """A 200 response carrying a good feed is applied."""
        self.service()
        method, uri, headers, _ = self.agent.requests[0]
        self.assertEqual((method, uri), (b"GET", URL.encode()))
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-cache"])
        response = FakeResponse()
        self.respond(response)
        token = feed(shards={"api-fra-1": 25})
        response.protocol.dataReceived(token[:10])
        response.finish(token[10:] + b"\n")
        self.assertEqual(scores(self.resolver)["api-fra-1"], 25.0)

    def test_polls_every_refresh(self) -> None:
        """The URL is fetched again every refresh, never twice at once."""
        self.service()
        self.clock.advance(REFRESH * 2)
        self.assertEqual(len(self.agent.requests), 1)  # the first is still pending
        self.respond(FakeResponse(code=304))
        self.clock.advance(REFRESH)
        self.assertEqual(len(self.agent.requests), 2)

    def test_body_over_limit_is_cut_off(self) -> None:
        """
        A body growing past 1 MiB is cut off (the transport is stopped, the
        rest never read) and rejected as too_large; the last feed stays.
        """
        intel = self.service()
        response = FakeResponse()
        self.respond(response)
        response.finish(feed(shards={"api-fra-1": 25}))
        self.clock.advance(REFRESH)
        response = FakeResponse()
        self.respond(response)
        chunk = b"A" * 65536
        for _ in range(MAX_FEED_SIZE // len(chunk)):
            response.protocol.dataReceived(chunk)
        self.assertFalse(response.transport.stopped)
        response.protocol.dataReceived(b"A")
        self.assertTrue(response.transport.stopped)
        self.assertEqual(intel.rejections["too_large"], 1)
        response.protocol.dataReceived(chunk)
        response.finish()
        self.assertEqual(intel.rejections["too_large"], 1)
        self.assertEqual(scores(self.resolver)["api-fra-1"], 25.0)

    def test_declared_length_over_limit(self) -> None:
        """A Content-Length over 1 MiB is refused before the body is read."""
        intel = self.service()
        response = FakeResponse(length=MAX_FEED_SIZE + 1)
        self.respond(response)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(intel.rejections["too_large"], 1)

    def test_http_error(self) -> None:
        """A status other than 200 makes the source unavailable."""
        intel = self.service()
        response = FakeResponse(code=404, phrase=b"Not Found")
        self.respond(response)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(intel.rejections["unavailable"], 1)
        self.assertEqual(intel.status()["sources"][0]["last_message"], "HTTP 404 Not Found")

    def test_connection_failure(self) -> None:
        """A failed connection makes the source unavailable."""
        intel = self.service()
        self.agent.requests[0][3].errback(ConnectionRefusedError("refused"))
        self.assertEqual(intel.rejections["unavailable"], 1)

    def test_timeout(self) -> None:
        """A server that never answers times out after fetch_timeout."""
        intel = self.service()
        self.clock.advance(9.9)
        self.assertEqual(intel.rejections["unavailable"], 0)
        self.clock.advance(0.1)
        self.assertEqual(intel.rejections["unavailable"], 1)
        self.assertIn("10s", intel.status()["sources"][0]["last_message"])

    def test_slow_body_times_out(self) -> None:
        """A body that trickles forever is stopped by the same timeout."""
        intel = self.service()
        response = FakeResponse()
        self.respond(response)
        response.protocol.dataReceived(b"eyJ")
        self.clock.advance(10)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(intel.rejections["unavailable"], 1)

    def test_stop_cancels_fetch(self) -> None:
        """stopService cancels a fetch in flight without counting it."""
        intel = self.service()
        intel.stopService()
        self.assertTrue(self.agent.requests[0][3].called)
        self.assertEqual(sum(intel.rejections.values()), 0)

    def test_credentials_masked(self) -> None:
        """Credentials in a source URL never reach status or logs."""
        intel = self.service("https://user:secret@intel.example.test/f.jws")
        self.assertEqual(intel.status()["sources"][0]["source"], "https://***@intel.example.test/f.jws")


# ---------------------------------------------------------------------------
# A real HTTP server over loopback


class ThreatIntelLoopbackTests(TestCase):
    """ThreatIntel with Twisted's real Agent against a real local server."""

    def setUp(self) -> None:
        from twisted.internet import reactor
        from twisted.web import resource, server

        self.reactor = reactor
        token = feed(shards={"api-fra-1": 22}, exp=int(reactor.seconds()) + 3600,
                     iat=int(reactor.seconds()))

        class Good(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                return token

        class Huge(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                # No Content-Length: chunked, so only the body cap can stop it.
                request.write(b"A" * (2 * MAX_FEED_SIZE))
                request.finish()
                return server.NOT_DONE_YET

        root = resource.Resource()
        root.putChild(b"good.jws", Good())
        root.putChild(b"huge.jws", Huge())
        site = server.Site(root)
        self.server_lost: list = []
        original = site.buildProtocol

        def build(addr):
            protocol = original(addr)
            lost = defer.Deferred()
            self.server_lost.append(lost)
            inner = protocol.connectionLost

            def connectionLost(reason):
                inner(reason)
                lost.callback(None)

            protocol.connectionLost = connectionLost
            return protocol

        site.buildProtocol = build
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def intel(self, path: str) -> ThreatIntel:
        url = f"http://127.0.0.1:{self.port.getHost().port}/{path}"
        self.resolver = ShardResolver(make_config(), clock=Clock())
        return ThreatIntel(
            FeedValidator(TRUSTED, now=self.reactor.seconds),
            [FeedSourceConfig(url, REFRESH)],
            self.resolver,
            reactor=self.reactor,
        )

    @defer.inlineCallbacks
    def test_good_feed(self):
        """A feed served over HTTP by a real server is fetched and applied."""
        intel = self.intel("good.jws")
        yield intel.refresh()
        self.assertEqual(intel.accepted, 1)
        self.assertEqual(scores(self.resolver)["api-fra-1"], 22.0)
        yield defer.gatherResults(self.server_lost)

    @defer.inlineCallbacks
    def test_huge_body_cut_off(self):
        """A 2 MiB chunked body from a real server is cut off as too_large."""
        intel = self.intel("huge.jws")
        yield intel.refresh()
        self.assertEqual(intel.rejections["too_large"], 1)
        self.assertEqual(scores(self.resolver), BASELINE)
        yield defer.gatherResults(self.server_lost)
