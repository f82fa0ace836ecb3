"""
Tests for shardtcp.jws: every rule of the strict compact-JWS verifier, each
at both of its edges (the last value accepted and the first refused).
"""

from __future__ import annotations

import json

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import jws
from shardtcp.jws import JWSError, b64url_decode, b64url_encode

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
KEYS = {"k1": KEY.public_key()}
HEADER = {"alg": "EdDSA", "kid": "k1", "typ": "JWT"}
CLAIMS = {"iss": "proxy-1", "n": 1}
ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def raw(header: bytes, payload: bytes, key=KEY, signature: bytes | None = None) -> bytes:
    """A token of exactly these header and payload bytes, signed by ``key``."""
    signing_input = b64url_encode(header) + b"." + b64url_encode(payload)
    if signature is None:
        signature = key.sign(signing_input)
    return signing_input + b"." + b64url_encode(signature)


def token(header=HEADER, claims=CLAIMS, key=KEY) -> bytes:
    return raw(json.dumps(header).encode(), json.dumps(claims).encode(), key)


def variants(segment: bytes) -> list[bytes]:
    """Every other spelling of ``segment``'s last character."""
    return [segment[:-1] + bytes([c]) for c in ALPHABET if c != segment[-1]]


class VerifyTestsMixin:
    def assertRefused(self, reason: str, data: bytes, **kw) -> JWSError:
        e = self.assertRaises(JWSError, jws.verify, data, kw.pop("keys", KEYS), max_size=kw.pop("max_size", 4096))
        self.assertEqual(e.reason, reason, str(e))
        return e

    def accept(self, data: bytes, **kw) -> jws.Verified:
        return jws.verify(data, kw.pop("keys", KEYS), max_size=kw.pop("max_size", 4096))


class SizeTests(VerifyTestsMixin, SynchronousTestCase):
    """The size bound, checked before anything is parsed."""

    def test_at_bound_accepted(self) -> None:
        """A token of exactly max_size bytes is accepted."""
        data = token()
        self.assertEqual(self.accept(data, max_size=len(data)).claims, CLAIMS)

    def test_over_bound_refused_before_parsing(self) -> None:
        """One byte over the bound is too_large, even for bytes that are no token at all."""
        data = token()
        self.assertRefused("too_large", data, max_size=len(data) - 1)
        self.assertRefused("too_large", b"\xff" * 11, max_size=10)
        self.assertRefused("malformed", b"\xff" * 10, max_size=10)


class StructureTests(VerifyTestsMixin, SynchronousTestCase):
    """Three segments of the base64url alphabet."""

    def test_segment_count(self) -> None:
        """Three segments are accepted; two or four are malformed."""
        data = token()
        self.accept(data)
        head, body, sig = data.split(b".")
        self.assertRefused("malformed", head + b"." + body)
        self.assertRefused("malformed", data + b".AAAA")

    def test_empty_header_or_payload(self) -> None:
        """An empty header or payload segment is malformed."""
        head, body, sig = token().split(b".")
        self.assertRefused("malformed", b"." + body + b"." + sig)
        self.assertRefused("malformed", head + b".." + sig)

    def test_alphabet(self) -> None:
        """'+', '/', '=' and whitespace are not base64url: malformed."""
        head, body, sig = token().split(b".")
        for bad in (b"+", b"/", b"=", b" "):
            self.assertRefused("malformed", head + b"." + body + b"." + sig[:-1] + bad)
        self.assertRefused("malformed", head + b"." + body + b"." + sig + b"==")


class CanonicalTests(VerifyTestsMixin, SynchronousTestCase):
    """One spelling per token: no set bits after the last byte."""

    def reasons(self, head: bytes, body: bytes, sig: bytes, which: int) -> dict:
        """How each other spelling of one segment's last character is refused."""
        counts: dict = {}
        parts = [head, body, sig]
        for other in variants(parts[which]):
            changed = list(parts)
            changed[which] = other
            e = self.assertRaises(JWSError, jws.verify, b".".join(changed), KEYS, max_size=4096)
            counts[e.reason] = counts.get(e.reason, 0) + 1
        return counts

    def test_signature_variants_refused(self) -> None:
        """
        The signature (86 characters, 4 spare bits) has one accepted spelling:
        the 60 last characters with spare bits set (15 of which decode to the
        very same bytes) are malformed, the 3 others are other signatures.
        """
        head, body, sig = token().split(b".")
        self.assertEqual(len(sig) % 4, 2)
        self.accept(head + b"." + body + b"." + sig)
        self.assertEqual(
            self.reasons(head, body, sig, 2), {"malformed": 60, "invalid_signature": 3}
        )

    def test_payload_with_two_spare_bits(self) -> None:
        """
        A payload of length 3 mod 4 (2 spare bits): the 48 spellings with
        spare bits set are malformed, the 15 others break the signature.
        """
        payload = b'{"a":1}'
        while len(b64url_encode(payload)) % 4 != 3:
            payload += b" "
        head, body, sig = raw(json.dumps(HEADER).encode(), payload).split(b".")
        self.accept(head + b"." + body + b"." + sig)
        self.assertEqual(
            self.reasons(head, body, sig, 1), {"malformed": 48, "invalid_signature": 15}
        )

    def test_length_one_mod_four(self) -> None:
        """A segment of length 1 mod 4 is malformed (it cannot encode whole bytes)."""
        head, body, sig = token().split(b".")
        self.assertRefused("malformed", head + b"." + body + b"." + sig + b"AAA")

    def test_decode_edges(self) -> None:
        """b64url_decode: 'QQ' is b'A', 'QR' is refused; 'QUE' is b'AA', 'QUF' refused."""
        self.assertEqual(b64url_decode(b"QQ"), b"A")
        self.assertRaises(ValueError, b64url_decode, b"QR")
        self.assertEqual(b64url_decode("QUE"), b"AA")
        self.assertRaises(ValueError, b64url_decode, "QUF")
        self.assertEqual(b64url_decode(b"QUFB"), b"AAA")
        self.assertRaises(ValueError, b64url_decode, b"QUFBQ")
        self.assertRaises(ValueError, b64url_decode, b"QQ==")
        self.assertRaises(ValueError, b64url_decode, "Q\u0661")
        self.assertEqual(b64url_decode(b""), b"")

    def test_encode_round_trip(self) -> None:
        """Every length from 0 to 9 bytes round-trips, without padding."""
        for n in range(10):
            data = bytes(range(250, 250 - n, -1))
            encoded = b64url_encode(data)
            self.assertNotIn(b"=", encoded)
            self.assertEqual(b64url_decode(encoded), data)


class HeaderTests(VerifyTestsMixin, SynchronousTestCase):
    """alg, typ, crit and kid."""

    def test_alg(self) -> None:
        """EdDSA is accepted; none (any case) is unsigned; anything else bad_algorithm."""
        self.accept(token())
        for alg in ("none", "NONE", "None"):
            self.assertRefused("unsigned", token(dict(HEADER, alg=alg)))
        for alg in ("HS256", "ES256", "eddsa", "EdDSA ", 5, None):
            self.assertRefused("bad_algorithm", token(dict(HEADER, alg=alg)))
        self.assertRefused("bad_algorithm", token({"kid": "k1"}))

    def test_typ(self) -> None:
        """typ absent or JWT is accepted; any other typ is malformed."""
        self.accept(token({"alg": "EdDSA", "kid": "k1"}))
        self.accept(token(dict(HEADER, typ="JWT")))
        for typ in ("jwt", "JOSE", "at+jwt", None, 1):
            self.assertRefused("malformed", token(dict(HEADER, typ=typ)))

    def test_crit(self) -> None:
        """A header with crit is malformed, even an empty one."""
        self.assertRefused("malformed", token(dict(HEADER, crit=["exp"])))
        self.assertRefused("malformed", token(dict(HEADER, crit=[])))

    def test_kid(self) -> None:
        """A kid is required (no_kid), must be trusted (unknown_kid), and at most 256 characters."""
        for header in ({"alg": "EdDSA"}, dict(HEADER, kid=""), dict(HEADER, kid=7)):
            self.assertRefused("no_kid", token(header))
        self.assertRefused("unknown_kid", token(dict(HEADER, kid="k2")))
        long_ok, too_long = "k" * 256, "k" * 257
        keys = {long_ok: KEY.public_key(), too_long: KEY.public_key()}
        self.accept(token(dict(HEADER, kid=long_ok)), keys=keys)
        self.assertRefused("unknown_kid", token(dict(HEADER, kid=too_long)), keys=keys)

    def test_header_not_object(self) -> None:
        """A header that is JSON but not an object is malformed."""
        self.assertRefused("malformed", raw(b'["EdDSA"]', b"{}"))

    def test_untrusted_key_type(self) -> None:
        """A trusted key that is not Ed25519 is a programming error, not a verdict."""
        ec = generate_private_key(SECP256R1()).public_key()
        self.assertRaises(TypeError, jws.verify, token(), {"k1": ec}, max_size=4096)


class SignatureTests(VerifyTestsMixin, SynchronousTestCase):
    """The Ed25519 signature."""

    def test_empty(self) -> None:
        """An empty signature is unsigned."""
        head, body, _ = token().split(b".")
        self.assertRefused("unsigned", head + b"." + body + b".")

    def test_length(self) -> None:
        """64 bytes verify; 63 or 65 bytes are invalid_signature."""
        header, payload = json.dumps(HEADER).encode(), b"{}"
        good = raw(header, payload)
        self.accept(good)
        signature = b64url_decode(good.split(b".")[2])
        for other in (signature[:63], signature + b"\0"):
            self.assertRefused("invalid_signature", raw(header, payload, signature=other))

    def test_other_key(self) -> None:
        """A token signed by another key under the trusted kid is invalid_signature."""
        self.assertRefused("invalid_signature", token(key=OTHER))

    def test_tampered(self) -> None:
        """Changing the claims after signing breaks the signature."""
        head, _, sig = token().split(b".")
        body = b64url_encode(json.dumps(dict(CLAIMS, n=2)).encode())
        self.assertRefused("invalid_signature", head + b"." + body + b"." + sig)


class JSONTests(VerifyTestsMixin, SynchronousTestCase):
    """Strict JSON with bounded numbers, in the header and in the claims."""

    def test_duplicate_keys(self) -> None:
        """A repeated key in the header or the claims is malformed."""
        self.assertRefused(
            "malformed", raw(b'{"alg":"EdDSA","alg":"none","kid":"k1"}', b"{}")
        )
        self.assertRefused("malformed", raw(json.dumps(HEADER).encode(), b'{"a":1,"a":2}'))
        self.accept(raw(json.dumps(HEADER).encode(), b'{"a":1,"b":{"a":2}}'))

    def test_constants_and_encoding(self) -> None:
        """NaN, Infinity and non-UTF-8 claims are malformed; claims may be any JSON value."""
        for payload in (b'{"a":NaN}', b'{"a":-Infinity}', b'{"a":"\xff"}', b"{"):
            self.assertRefused("malformed", raw(json.dumps(HEADER).encode(), payload))
        self.assertEqual(self.accept(raw(json.dumps(HEADER).encode(), b"[1]")).claims, [1])

    def test_integer_bounds(self) -> None:
        """+-(2**63 - 1) are accepted; 2**63, -2**63 and 10**400 are invalid_claims."""
        header = json.dumps(HEADER).encode()
        for value in (2**63 - 1, -(2**63 - 1), 0):
            self.assertEqual(self.accept(raw(header, b'{"exp":%d}' % value)).claims, {"exp": value})
        for value in (2**63, -(2**63), 10**400):
            self.assertRefused("invalid_claims", raw(header, b'{"exp":%d}' % value))
        self.assertRefused("invalid_claims", raw(header, b'{"exp":' + b"9" * 5000 + b"}"), max_size=10_000)

    def test_integer_bounds_in_header(self) -> None:
        """An out-of-range integer in the header is malformed."""
        self.assertRefused("malformed", raw(b'{"alg":"EdDSA","kid":"k1","x":%d}' % 2**63, b"{}"))

    def test_float_bounds(self) -> None:
        """1e308 is accepted; 1e309 (infinite as a float) is invalid_claims."""
        header = json.dumps(HEADER).encode()
        self.assertEqual(self.accept(raw(header, b'{"s":1e308}')).claims, {"s": 1e308})
        self.assertRefused("invalid_claims", raw(header, b'{"s":1e309}'))


class NumericDateTests(SynchronousTestCase):
    """numeric_date bounds."""

    def test_edges(self) -> None:
        """0 and MAX_NUMERIC_DATE are dates; -1, MAX + 1, bools and floats are not."""
        self.assertTrue(jws.numeric_date(0))
        self.assertTrue(jws.numeric_date(jws.MAX_NUMERIC_DATE))
        for value in (-1, jws.MAX_NUMERIC_DATE + 1, 10**400, True, 1.0, "1", None):
            self.assertFalse(jws.numeric_date(value), value)


class SignTests(SynchronousTestCase):
    """The signer."""

    def test_round_trip(self) -> None:
        """sign's token verifies and gives back its claims, in order."""
        data = jws.sign({"b": 1, "a": "x"}, KEY, kid="k1")
        verified = jws.verify(data, KEYS, max_size=4096)
        self.assertEqual(list(verified.claims), ["b", "a"])
        self.assertEqual((verified.kid, verified.header), ("k1", HEADER))

    def test_same_bytes_as_pyjwt(self) -> None:
        """The token is byte for byte what PyJWT writes (Ed25519 is deterministic)."""
        claims = {"iss": "p", "aud": "s", "exp": 5, "acl": ["a", "é"]}
        self.assertEqual(
            jws.sign(claims, KEY, kid="k1"),
            jwt.encode(claims, KEY, algorithm="EdDSA", headers={"kid": "k1"}).encode(),
        )

    def test_refuses(self) -> None:
        """Non-Ed25519 keys, empty kids and NaN are refused."""
        ec = generate_private_key(SECP256R1())
        self.assertRaises(TypeError, jws.sign, {}, ec, kid="k1")
        self.assertRaises(ValueError, jws.sign, {}, KEY, kid="")
        self.assertRaises(ValueError, jws.sign, {"a": float("nan")}, KEY, kid="k1")

    def test_layering(self) -> None:
        """jws imports nothing of the project."""
        import ast

        with open(jws.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                self.assertFalse((node.module or "").startswith("shardtcp"), node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    self.assertFalse(alias.name.startswith("shardtcp"), alias.name)


class SignerTests(SynchronousTestCase):
    """jws.Signer: the header prepared once, the same token as jws.sign."""

    def test_same_token(self) -> None:
        """sign_json of the claims' JSON gives jws.sign's bytes, header included."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        signer = jws.Signer(key, kid="k-1")
        token = signer.sign_json(b'{"a":1}')
        self.assertEqual(token, jws.sign({"a": 1}, key, kid="k-1"))
        self.assertTrue(token.startswith(b"eyJhbGciOiJFZERTQSIsImtpZCI6ImstMSIsInR5cCI6IkpXVCJ9.eyJhIjoxfQ."))

    def test_backends_agree(self) -> None:
        """libsodium (the default) and OpenSSL sign the same bytes: Ed25519 is deterministic."""
        key = Ed25519PrivateKey.generate()
        fast, slow = jws.Signer(key, kid="k-1"), jws.Signer(key, kid="k-1", sodium=False)
        self.assertEqual((fast.backend, slow.backend), ("libsodium", "openssl"))
        for payload in (b"{}", b'{"a":"' + b"x" * 900 + b'"}'):
            token = fast.sign_json(payload)
            self.assertEqual(token, slow.sign_json(payload))
            signature = b64url_decode(token.rsplit(b".", 1)[1])
            key.public_key().verify(signature, token.rsplit(b".", 1)[0])

    def test_signing_buffer_grows(self) -> None:
        """
        A libsodium signer's output buffer fits signing inputs up to its
        size and grows for longer ones: payloads just under, at and over
        the first buffer, then a short one again, all sign as OpenSSL does.
        """
        key = Ed25519PrivateKey.generate()
        fast, slow = jws.Signer(key, kid="k-1"), jws.Signer(key, kid="k-1", sodium=False)
        room = jws._SIGNED_BUFFER - jws.SIGNATURE_SIZE - len(fast.sign_json(b"{}").rsplit(b".", 1)[0])
        # base64url: 3 payload bytes per 4 characters of signing input
        for size in (room * 3 // 4 - 3, room * 3 // 4, room * 3 // 4 + 3, 4000, 1):
            payload = b'{"a":"' + b"x" * size + b'"}'
            self.assertEqual(fast.sign_json(payload), slow.sign_json(payload), size)
        self.assertGreater(len(fast._signed), jws._SIGNED_BUFFER)

    def test_b64url_encode(self) -> None:
        """b64url_encode is unpadded base64url for every length modulo 3, URL alphabet only."""
        import base64

        for data in (b"", b"\xfb", b"\xfb\xff", b"\xfb\xff\xfe", bytes(range(256))):
            self.assertEqual(jws.b64url_encode(data), base64.urlsafe_b64encode(data).rstrip(b"="))
        self.assertEqual(jws.b64url_encode(b"\xfb\xff"), b"-_8")

    def test_without_pynacl(self) -> None:
        """Where PyNaCl cannot be imported, the signer uses OpenSSL and signs the same token."""
        key = Ed25519PrivateKey.generate()
        expected = jws.Signer(key, kid="k-1").sign_json(b"{}")
        self.patch(jws, "_sodium_keypair", None)
        signer = jws.Signer(key, kid="k-1")
        self.assertEqual(signer.backend, "openssl")
        self.assertEqual(signer.sign_json(b"{}"), expected)

    def test_refused(self) -> None:
        """A key that is not Ed25519, or an empty kid, at construction."""
        from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.assertRaises(TypeError, jws.Signer, generate_private_key(SECP256R1()), kid="k")
        self.assertRaises(ValueError, jws.Signer, Ed25519PrivateKey.generate(), kid="")
