"""
Tests for shardtcp.policy: PolicyContext tokens, their size, their checks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import jws, policy
from shardtcp.policy import format_address as policy_format
from shardtcp.policy import (
    MAX_TOKEN_SIZE,
    PolicyContext,
    PolicyError,
    PolicySigner,
    PolicyTooLarge,
    decode_token,
    new_connection_id,
    worst_case_token_size,
)

NOW = 1_700_000_000.75
CONN_ID = "c0nnect10n-1d-0f-24chars"
MAX_V6 = ":".join(["ffff"] * 8)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segments(token: bytes) -> tuple[dict, dict]:
    header, payload, _ = token.split(b".")
    pad = lambda s: s + b"=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(header))),
        json.loads(base64.urlsafe_b64decode(pad(payload))),
    )


class Clock:
    """A settable ``now`` callable."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TokenTestsMixin:
    """Shared setup: a signer and its key, on an injected clock."""

    def setUp(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.keys = {"policy-1": self.key.public_key()}
        self.clock = Clock()
        self.signer = PolicySigner(
            self.key, kid="policy-1", issuer="edge-fra-1", ttl=30, now=self.clock
        )
        self.policy = PolicyContext("tls", ("none",), ("orders:read",))

    def sign(self, **kw) -> bytes:
        args = dict(
            policy=self.policy,
            audience="api-fra-1",
            connection_id=CONN_ID,
            service="api",
            source=("198.51.100.7", 50123),
            destination=("203.0.113.1", 8443),
        )
        args.update(kw)
        return self.signer.sign(**args)

    def decode(self, token, **kw) -> dict:
        args = dict(audience="api-fra-1", now=self.clock)
        args.update(kw)
        return decode_token(token, kw.pop("keys", self.keys), **args)


class PolicyContextTests(SynchronousTestCase):
    """Tests for the PolicyContext value."""

    def test_lists_become_tuples(self) -> None:
        """Lists given for the method and ACL are stored as tuples (hashable)."""
        context = PolicyContext("mtls", ["mtls"], ["a", "b"])
        self.assertEqual(context.authentication_method, ("mtls",))
        self.assertEqual(context.access_control_list, ("a", "b"))
        self.assertEqual(hash(context), hash(PolicyContext("mtls", ("mtls",), ("a", "b"))))

    def test_rejects_unknown_values(self) -> None:
        """Unknown encryption levels and methods, and non-string ACL entries, are refused."""
        self.assertRaises(ValueError, PolicyContext, "ssl", ("none",), ())
        self.assertRaises(ValueError, PolicyContext, "tls", ("password",), ())
        self.assertRaises(ValueError, PolicyContext, "tls", (), ())
        self.assertRaises(TypeError, PolicyContext, "tls", ("none",), (1,))


class SignTests(TokenTestsMixin, SynchronousTestCase):
    """Tests for PolicySigner.sign."""

    def test_header_exactly(self) -> None:
        """The JWS header is exactly {"alg":"EdDSA","kid":...,"typ":"JWT"}, compact."""
        token = self.sign()
        raw = base64.urlsafe_b64decode(token.split(b".")[0] + b"==")
        self.assertEqual(raw, b'{"alg":"EdDSA","kid":"policy-1","typ":"JWT"}')

    def test_claims_exactly(self) -> None:
        """
        The claims are those of SPEC §4, in order, with integer iat/exp
        (iat the integer part of now, exp iat + ttl), and no sub/sni when
        there were none.
        """
        token = self.sign()
        self.assertIsInstance(token, bytes)
        _, claims = _segments(token)
        self.assertEqual(
            list(claims.items()),
            [
                ("iss", "edge-fra-1"),
                ("aud", "api-fra-1"),
                ("iat", 1_700_000_000),
                ("exp", 1_700_000_030),
                ("jti", CONN_ID),
                ("svc", "api"),
                ("src", "198.51.100.7:50123"),
                ("dst", "203.0.113.1:8443"),
                ("enc", "tls"),
                ("amr", ["none"]),
                ("acl", ["orders:read"]),
            ],
        )

    def test_payload_is_compact_json(self) -> None:
        """The payload is JSON without spaces."""
        payload = base64.urlsafe_b64decode(self.sign().split(b".")[1] + b"==")
        self.assertNotIn(b" ", payload)

    def test_optional_claims_and_ipv6(self) -> None:
        """sub and sni appear when given; IPv6 addresses are written [ip]:port, canonical."""
        token = self.sign(
            subject="spiffe://example.test/client",
            sni="api.example.test",
            source=("2001:DB8:0:0::7", 443),
            destination=("::1", 8443),
        )
        _, claims = _segments(token)
        self.assertEqual(claims["sub"], "spiffe://example.test/client")
        self.assertEqual(claims["sni"], "api.example.test")
        self.assertEqual(claims["src"], "[2001:db8::7]:443")
        self.assertEqual(claims["dst"], "[::1]:8443")
        self.assertEqual(list(claims)[-2:], ["sub", "sni"])

    def test_verifies_with_pyjwt(self) -> None:
        """An independent PyJWT decode with the public key accepts the token."""
        claims = jwt.decode(
            self.sign(),
            self.key.public_key(),
            algorithms=["EdDSA"],
            audience="api-fra-1",
            options={"verify_exp": False, "verify_iat": False},
        )
        self.assertEqual(claims["jti"], CONN_ID)

    def test_fractional_ttl_rounds_up(self) -> None:
        """A ttl of 0.5 s still gives exp > iat."""
        signer = PolicySigner(self.key, kid="k", issuer="i", ttl=0.5, now=self.clock)
        token = signer.sign(
            policy=self.policy,
            audience="a",
            connection_id=CONN_ID,
            service="s",
            source=("10.0.0.1", 1),
            destination=("10.0.0.2", 2),
        )
        _, claims = _segments(token)
        self.assertEqual(claims["exp"] - claims["iat"], 1)

    def test_too_large(self) -> None:
        """A token over MAX_TOKEN_SIZE raises PolicyTooLarge (a ValueError)."""
        big = PolicyContext("tls", ("none",), tuple(f"scope:{i:04d}" for i in range(80)))
        e = self.assertRaises(PolicyTooLarge, self.sign, policy=big)
        self.assertIsInstance(e, ValueError)
        self.assertIn(str(MAX_TOKEN_SIZE), str(e))

    def test_bad_inputs(self) -> None:
        """Connection ids outside 16..32 ASCII characters and non-IP hosts are refused."""
        for bad in ["short", "x" * 33, "é" * 20]:
            self.assertRaises(ValueError, self.sign, connection_id=bad)
        self.assertRaises(ValueError, self.sign, source=("example.test", 1))
        self.assertRaises(ValueError, self.sign, source=("10.0.0.1", 70000))

    def test_constructor_checks(self) -> None:
        """The signer refuses a non-Ed25519 key, an empty kid or issuer, and a ttl <= 0."""
        self.assertRaises(TypeError, PolicySigner, object(), kid="k", issuer="i", ttl=1, now=self.clock)
        self.assertRaises(ValueError, PolicySigner, self.key, kid="", issuer="i", ttl=1, now=self.clock)
        self.assertRaises(ValueError, PolicySigner, self.key, kid="k", issuer="", ttl=1, now=self.clock)
        self.assertRaises(ValueError, PolicySigner, self.key, kid="k", issuer="i", ttl=0, now=self.clock)


class WorstCaseTests(TokenTestsMixin, SynchronousTestCase):
    """Tests for worst_case_token_size."""

    def _worst_signer_token(self, *, sni_length, subject_length, acl) -> bytes:
        self.clock.now = 9_999_999_999.0 - 30  # 10-digit iat and exp
        return self.sign(
            policy=PolicyContext("mtls", ("mtls",), acl),
            connection_id="j" * 32,
            source=(MAX_V6, 65535),
            destination=(MAX_V6, 65535),
            sni=None if sni_length is None else "n" * sni_length,
            subject=None if subject_length is None else "s" * subject_length,
            audience="api-fra-1",
            service="api",
        )

    def test_exact_for_signed_token(self) -> None:
        """
        For bounds that fit, the predicted size equals the length of a token
        actually signed with values of those maximal lengths.
        """
        acl = ("orders:read", "orders:write")
        for sni_length, subject_length in [(253, None), (100, 64), (None, None)]:
            predicted = worst_case_token_size(
                issuer="edge-fra-1",
                kid="policy-1",
                service_id="api",
                shard_id="api-fra-1",
                acl=acl,
                sni_length=sni_length,
                subject_length=subject_length,
            )
            token = self._worst_signer_token(
                sni_length=sni_length, subject_length=subject_length, acl=acl
            )
            self.assertEqual(predicted, len(token))

    def test_defaults_exceed_limit(self) -> None:
        """
        With the default bounds (sni 253, sub 256) the worst case is over
        MAX_TOKEN_SIZE, and signing such a token indeed raises PolicyTooLarge.
        """
        predicted = worst_case_token_size(
            issuer="edge-fra-1", kid="policy-1", service_id="api",
            shard_id="api-fra-1", acl=(),
        )
        self.assertGreater(predicted, MAX_TOKEN_SIZE)
        self.assertRaises(
            PolicyTooLarge, self._worst_signer_token, sni_length=253, subject_length=256, acl=()
        )

    def test_shard_key_counted_exactly(self) -> None:
        """
        key_length adds an shk claim of that many characters: the prediction
        equals a token signed with such a key, and None (the default) leaves
        it out; the claim decodes back into PolicyContext.shard_key.
        """
        acl = ("orders:read",)
        for key_length in (1, 63, 253):
            predicted = worst_case_token_size(
                issuer="edge-fra-1", kid="policy-1", service_id="api", shard_id="api-fra-1",
                acl=acl, sni_length=63, subject_length=None, key_length=key_length,
            )
            self.clock.now = 9_999_999_999.0 - 30
            token = self.sign(
                policy=PolicyContext("mtls", ("mtls",), acl, shard_key="k" * key_length),
                connection_id="j" * 32, source=(MAX_V6, 65535), destination=(MAX_V6, 65535),
                sni="n" * 63, audience="api-fra-1", service="api",
            )
            self.assertEqual(predicted, len(token))
            claims = self.decode(token)
            self.assertEqual(PolicyContext.from_claims(claims).shard_key, "k" * key_length)
        without = dict(issuer="i", kid="k", service_id="s", shard_id="h", acl=(), sni_length=None, subject_length=None)
        self.assertEqual(worst_case_token_size(**without), worst_case_token_size(key_length=None, **without))
        self.assertGreater(worst_case_token_size(key_length=1, **without), worst_case_token_size(**without))

    def test_shk_must_be_a_string(self) -> None:
        """A token whose shk is not a string is refused as invalid_claims."""
        claims = {"iss": "i", "aud": "api-fra-1", "iat": 1, "exp": 10**9, "jti": CONN_ID, "svc": "api",
                  "src": "a", "dst": "b", "enc": "tls", "amr": ["none"], "acl": [], "shk": 5}
        e = self.assertRaises(policy.PolicyError, policy.check_claims, claims, audience="api-fra-1", now=lambda: 2)
        self.assertEqual(e.reason, "invalid_claims")
        self.assertIn("'shk'", str(e))

    def test_grows_with_acl(self) -> None:
        """A longer ACL gives a larger worst case, escaped as JSON escapes it."""
        base = dict(issuer="i", kid="k", service_id="s", shard_id="h", sni_length=None, subject_length=None)
        small = worst_case_token_size(acl=["a"], **base)
        self.assertGreater(worst_case_token_size(acl=["a" * 100], **base), small)
        # "é" is written \u00e9 (6 bytes), so it weighs more than "e".
        self.assertGreater(worst_case_token_size(acl=["é"], **base), worst_case_token_size(acl=["e"], **base))


class ConnectionIdTests(SynchronousTestCase):
    """Tests for new_connection_id."""

    def test_shape_and_uniqueness(self) -> None:
        """Ids are 24 URL-safe ASCII characters and do not repeat."""
        ids = {new_connection_id() for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        for value in ids:
            self.assertEqual(len(value), 24)
            self.assertRegex(value, r"\A[A-Za-z0-9_-]{24}\Z")


class DecodeTests(TokenTestsMixin, SynchronousTestCase):
    """Tests for decode_token."""

    def assertReason(self, reason: str, token, **kw) -> PolicyError:
        e = self.assertRaises(PolicyError, self.decode, token, **kw)
        self.assertEqual(e.reason, reason, str(e))
        return e

    def _forge(self, header: dict, claims: dict, signature: bytes = b"") -> bytes:
        head = _b64(json.dumps(header).encode())
        body = _b64(json.dumps(claims).encode())
        return f"{head}.{body}.{_b64(signature)}".encode()

    def _claims(self, **override) -> dict:
        _, claims = _segments(self.sign())
        claims.update(override)
        return {k: v for k, v in claims.items() if v is not None}

    def _sign_claims(self, claims: dict, key=None, kid="policy-1") -> str:
        return jwt.encode(claims, key or self.key, algorithm="EdDSA", headers={"kid": kid})

    def test_round_trip(self) -> None:
        """A token signed by PolicySigner decodes to its claims, bytes or str."""
        token = self.sign(sni="api.example.test")
        claims = self.decode(token)
        self.assertEqual(claims["jti"], CONN_ID)
        self.assertEqual(claims["sni"], "api.example.test")
        self.assertEqual(self.decode(token.decode()), claims)
        self.assertEqual(
            PolicyContext.from_claims(claims), self.policy
        )

    def test_malformed(self) -> None:
        """Garbage and non-JSON tokens are malformed_token."""
        self.assertReason("malformed_token", b"not a token")
        self.assertReason("malformed_token", b"a.b.c")

    def test_too_large(self) -> None:
        """A token over MAX_TOKEN_SIZE is refused before any parsing."""
        self.assertReason("token_too_large", b"a" * (MAX_TOKEN_SIZE + 1))

    def test_unknown_kid(self) -> None:
        """A kid not among the trusted keys is unknown_kid."""
        token = self._sign_claims(self._claims(), kid="policy-9")
        self.assertReason("unknown_kid", token)

    def test_missing_kid(self) -> None:
        """A token without a kid is malformed_token."""
        token = jwt.encode(self._claims(), self.key, algorithm="EdDSA")
        self.assertReason("malformed_token", token)

    def test_bad_signature_other_key_same_kid(self) -> None:
        """A token signed by another key under the trusted kid is invalid_signature."""
        token = self._sign_claims(self._claims(), key=Ed25519PrivateKey.generate())
        self.assertReason("invalid_signature", token)

    def test_tampered_payload(self) -> None:
        """Changing the payload of a signed token breaks its signature."""
        head, _, sig = self.sign().split(b".")
        body = _b64(json.dumps(self._claims(acl=["admin"])).encode()).encode()
        self.assertReason("invalid_signature", b".".join([head, body, sig]))

    def test_alg_none(self) -> None:
        """An unsigned token (alg none) is bad_algorithm."""
        token = self._forge({"alg": "none", "kid": "policy-1", "typ": "JWT"}, self._claims())
        self.assertReason("bad_algorithm", token)

    def test_hs256_with_public_key_as_secret(self) -> None:
        """
        The classic algorithm confusion: an HS256 token whose HMAC key is the
        public key's bytes is bad_algorithm.
        """
        public = self.key.public_key()
        for secret in [
            public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        ]:
            header = {"alg": "HS256", "kid": "policy-1", "typ": "JWT"}
            head = _b64(json.dumps(header).encode())
            body = _b64(json.dumps(self._claims()).encode())
            mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
            self.assertReason("bad_algorithm", f"{head}.{body}.{_b64(mac)}")

    def test_wrong_audience(self) -> None:
        """A token for another shard is wrong_audience; a list aud is refused too."""
        self.assertReason("wrong_audience", self.sign(audience="api-nyc-1"))
        token = self._sign_claims(self._claims(aud=["api-fra-1", "api-nyc-1"]))
        self.assertReason("wrong_audience", token)

    def test_missing_claims(self) -> None:
        """Each required claim, when missing, gives missing_claims naming it."""
        for name in policy.REQUIRED_CLAIMS:
            claims = self._claims()
            del claims[name]
            e = self.assertReason("missing_claims", self._sign_claims(claims))
            self.assertIn(repr(name), e.message)

    def test_invalid_claim_types(self) -> None:
        """Claims of the wrong type or value are invalid_claims."""
        for override in [
            {"iat": "1700000000"},
            {"exp": 1.5e9},
            {"exp": True},
            {"enc": "ssl"},
            {"amr": "none"},
            {"amr": []},
            {"acl": "orders:read"},
            {"acl": [1]},
            {"src": 7},
            {"sni": 7},
        ]:
            e = self.assertReason("invalid_claims", self._sign_claims(self._claims(**override)))
            self.assertIn(repr(next(iter(override))), str(e))

    def test_expiry_with_leeway(self) -> None:
        """
        A token is accepted until exp + leeway and refused as expired from
        then on; the default leeway is 5 s.
        """
        token = self.sign()  # exp = 1_700_000_030
        self.clock.now = 1_700_000_034.9
        self.decode(token)
        self.clock.now = 1_700_000_035
        self.assertReason("expired", token)
        self.clock.now = 1_700_000_029.9
        self.decode(token, leeway=0)
        self.clock.now = 1_700_000_030
        self.assertReason("expired", token, leeway=0)

    def test_leeway_capped(self) -> None:
        """A leeway above 5 s is treated as 5 s."""
        token = self.sign()
        self.clock.now = 1_700_000_036
        self.assertReason("expired", token, leeway=3600)

    def test_issued_in_future(self) -> None:
        """A token issued more than the leeway after now is issued_in_future."""
        token = self.sign()  # iat = 1_700_000_000
        self.clock.now = 1_700_000_000 - 5
        self.decode(token)
        self.clock.now = 1_700_000_000 - 5.5
        self.assertReason("issued_in_future", token)

    def test_uses_injected_clock_not_wall_clock(self) -> None:
        """A token issued in 2001 verifies when now says 2001, although long expired."""
        self.clock.now = 1_000_000_000
        token = self.sign()
        self.decode(token)

    def test_huge_exp_is_a_clean_refusal(self) -> None:
        """
        An exp of 10**400 (or just past year 9999) is invalid_claims, not an
        OverflowError out of the validator; the last second of 9999 is valid.
        """
        self.assertReason("invalid_claims", self._sign_claims(self._claims(exp=10**400)))
        e = self.assertReason("invalid_claims", self._sign_claims(self._claims(exp=253_402_300_800)))
        self.assertIn("'exp'", str(e))
        self.decode(self._sign_claims(self._claims(exp=253_402_300_799)))

    def test_non_canonical_signature(self) -> None:
        """
        A signature re-spelt with spare bits set in its last character (same
        64 bytes) is malformed_token; only the canonical spelling verifies.
        """
        token = self.sign()
        head, body, sig = token.split(b".")
        alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        value = alphabet.index(sig[-1])
        for index, char in enumerate(alphabet):
            if index >> 4 == value >> 4 and index != value:
                self.assertReason("malformed_token", head + b"." + body + b"." + sig[:-1] + bytes([char]))
        self.decode(token)

    def test_parses_once(self) -> None:
        """The token's header and claims are each decoded from JSON once per verification."""
        from shardtcp import jws

        calls = []
        decoder = jws._DECODER
        real = decoder.decode
        decoder.decode = lambda text: calls.append(text) or real(text)
        self.addCleanup(delattr, decoder, "decode")
        self.decode(self.sign())
        self.assertEqual(len(calls), 2)

    def test_signature_and_claims_apart(self) -> None:
        """
        verify_signature accepts a token for another shard; check_claims then
        refuses it as wrong_audience: the two verdicts are separate.
        """
        token = self.sign(audience="api-nyc-1")
        verified = policy.verify_signature(token, {"policy-1": self.key.public_key()})
        self.assertEqual(verified.claims["aud"], "api-nyc-1")
        e = self.assertRaises(
            PolicyError, policy.check_claims, verified.claims, audience="api-fra-1", now=self.clock
        )
        self.assertEqual(e.reason, "wrong_audience")


class FormatAddressTests(SynchronousTestCase):
    """policy.format_address, built on shardtcp.net."""

    def test_forms(self) -> None:
        """IPv4 as ip:port, IPv6 bracketed and canonical, zone dropped, mapped kept as IPv6."""
        self.assertEqual(policy.format_address(("192.0.2.1", 0)), "192.0.2.1:0")
        self.assertEqual(policy.format_address(("2001:DB8::1", 65535)), "[2001:db8::1]:65535")
        self.assertEqual(policy.format_address(("fe80::1%eth0", 1)), "[fe80::1]:1")
        self.assertEqual(policy.format_address(("::ffff:192.0.2.1", 1)), "[::ffff:c000:201]:1")

    def test_ports(self) -> None:
        """65535 and "65535" pass; 65536, -1, True and non-ASCII digit strings are refused."""
        self.assertEqual(policy.format_address(("192.0.2.1", "65535")), "192.0.2.1:65535")
        for port in (65536, -1, True, "65536", "\u0669\u0660", "\u00b2", 1.0):
            self.assertRaises(ValueError, policy.format_address, ("192.0.2.1", port))
        self.assertRaises(ValueError, policy.format_address, ("example.test", 1))


class PiecewiseClaimsTests(TokenTestsMixin, SynchronousTestCase):
    """PolicySigner.sign writes the claims JSON piece by piece: the same bytes as json.dumps of the dict."""

    def expected(self, policy, *, audience="api-fra-1", service="api", subject=None, sni=None,
                 source=("198.51.100.7", 50123), destination=("203.0.113.1", 8443)) -> bytes:
        claims = {
            "iss": "edge-fra-1", "aud": audience, "iat": int(NOW), "exp": int(NOW) + 30, "jti": CONN_ID,
            "svc": service, "src": policy_format(source), "dst": policy_format(destination),
            "enc": policy.encryption_level, "amr": list(policy.authentication_method),
            "acl": list(policy.access_control_list),
        }
        if subject is not None:
            claims["sub"] = subject
        if sni is not None:
            claims["sni"] = sni
        if policy.shard_key is not None:
            claims["shk"] = policy.shard_key
        return jws.sign(claims, self.key, kid="policy-1")

    def test_same_bytes(self) -> None:
        """Every optional claim, escapes, non-ASCII text and IPv6: byte for byte the dict's token."""
        cases = [
            (self.policy, {}),
            (self.policy, {"sni": "api.example.com"}),
            (PolicyContext("mtls", ("mtls",), ("a", 'quote"d', "back\\slash"), shard_key="tenant-\u00e9"),
             {"subject": "CN=J\u00fcrgen,O=\u201cx\u201d", "sni": "api.example.com", "service": "s\n1",
              "source": ("2001:db8::7", 1), "destination": ("2001:DB8::1", 65535)}),
            (PolicyContext("none", ("none",), ()), {"audience": "\U0001f600"}),
        ]
        for policy_, kw in cases:
            token = self.sign(policy=policy_, **kw)
            self.assertEqual(token, self.expected(policy_, **kw))
            # the second time comes from the policy's remembered JSON
            self.assertEqual(self.sign(policy=policy_, **kw), token)

    def test_policy_cache_bounded(self) -> None:
        """At POLICY_CACHE_SIZE policies the signer forgets them all; tokens stay the same."""
        self.patch(policy, "POLICY_CACHE_SIZE", 2)
        policies = [PolicyContext("tls", ("none",), (f"acl-{i}",)) for i in range(3)]
        for p in policies[:2]:
            self.sign(policy=p)
        self.assertEqual(len(self.signer._policies), 2)
        self.assertEqual(self.sign(policy=policies[2]), self.expected(policies[2]))
        self.assertEqual(len(self.signer._policies), 1)

    def test_other_types_take_the_dict_path(self) -> None:
        """A claim value that is not text still signs as json.dumps writes it."""
        token = self.sign(audience=7)
        self.assertEqual(token, self.expected(self.policy, audience=7))
        self.assertTrue(policy._all_text("a", None, "b"))
        self.assertFalse(policy._all_text("a", 1))
        self.assertFalse(policy._all_text(b"a"))


class AdmitGrantTests(SynchronousTestCase):
    """admit() builds each distinct grant once and shares it."""

    def setUp(self) -> None:
        from shardtcp.model import PolicyConfig, ServiceConfig

        self.service = lambda **policy_fields: ServiceConfig(id="s", policy=PolicyConfig(**policy_fields))
        self.patch(policy, "_GRANTED", {})

    def test_shared_while_equal(self) -> None:
        """
        Two connections with the same facts and ACL get the very same
        PolicyContext; another encryption, authentication or ACL gets its own,
        with the values it stands for.
        """
        first = policy.admit(self.service(acl=("a",)), policy.PASSTHROUGH_TLS)
        self.assertIs(policy.admit(self.service(acl=("a",)), policy.TLSFacts(encryption="tls")), first)
        self.assertEqual(first, policy.PolicyContext("tls", ("none",), ("a",)))
        others = [
            policy.admit(self.service(acl=("b",)), policy.PASSTHROUGH_TLS),
            policy.admit(self.service(acl=("a",)), policy.NO_TLS),
            policy.admit(self.service(acl=("a",)), policy.TLSFacts(encryption="mtls", authentication=("mtls",))),
        ]
        self.assertEqual(
            others,
            [
                policy.PolicyContext("tls", ("none",), ("b",)),
                policy.PolicyContext("none", ("none",), ("a",)),
                policy.PolicyContext("mtls", ("mtls",), ("a",)),
            ],
        )

    def test_refusals_not_kept(self) -> None:
        """A refused connection leaves no grant behind; the next allowed one still gets its grant."""
        with self.assertRaises(policy.PolicyRefused):
            policy.admit(self.service(encryption="tls"), policy.NO_TLS)
        self.assertEqual(policy._GRANTED, {})
        self.assertEqual(
            policy.admit(self.service(encryption="tls"), policy.PASSTHROUGH_TLS),
            policy.PolicyContext("tls", ("none",), ()),
        )

    def test_bounded(self) -> None:
        """
        At most GRANTED_CACHE_SIZE grants are kept: the one after the last
        that fits empties the table first, and a forgotten grant is built
        again equal.
        """
        self.patch(policy, "GRANTED_CACHE_SIZE", 3)
        grants = [policy.admit(self.service(acl=(str(i),)), policy.NO_TLS) for i in range(3)]
        self.assertEqual(len(policy._GRANTED), 3)
        policy.admit(self.service(acl=("3",)), policy.NO_TLS)
        self.assertEqual(len(policy._GRANTED), 1)
        again = policy.admit(self.service(acl=("0",)), policy.NO_TLS)
        self.assertIsNot(again, grants[0])
        self.assertEqual(again, grants[0])
