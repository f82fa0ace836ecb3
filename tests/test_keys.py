"""
Tests for shardtcp.keys: key files, their modes, JWKS documents.
"""

from __future__ import annotations

import json
import os
import stat

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import keys


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


class GenerateKeypairTests(SynchronousTestCase):
    """Tests for keys.generate_keypair."""

    def test_writes_key_set(self) -> None:
        """
        generate_keypair writes <kid>.pem, <kid>.pub.pem and jwks.json, and
        all three describe the same Ed25519 key.
        """
        out = self.mktemp()
        paths = keys.generate_keypair(out, kid="k1")
        self.assertEqual(paths.private_key, os.path.join(out, "k1.pem"))
        self.assertEqual(paths.public_key, os.path.join(out, "k1.pub.pem"))
        self.assertEqual(paths.jwks, os.path.join(out, "jwks.json"))
        private = keys.load_private_key(paths.private_key)
        with open(paths.public_key, "rb") as f:
            public = serialization.load_pem_public_key(f.read())
        self.assertIsInstance(public, Ed25519PublicKey)
        self.assertEqual(_raw(private.public_key()), _raw(public))
        published = keys.load_jwks(paths.jwks)
        self.assertEqual(list(published), ["k1"])
        self.assertEqual(_raw(published["k1"]), _raw(public))

    def test_private_key_is_pkcs8_pem(self) -> None:
        """The private key file is PKCS#8 PEM ("BEGIN PRIVATE KEY")."""
        paths = keys.generate_keypair(self.mktemp())
        with open(paths.private_key, "rb") as f:
            self.assertTrue(f.read().startswith(b"-----BEGIN PRIVATE KEY-----\n"))

    def test_private_key_mode_0600_despite_umask(self) -> None:
        """
        The private key file has mode 0600 even under a permissive umask, and
        the default kid is policy-1.
        """
        previous = os.umask(0)
        try:
            paths = keys.generate_keypair(self.mktemp())
        finally:
            os.umask(previous)
        self.assertEqual(os.path.basename(paths.private_key), "policy-1.pem")
        self.assertEqual(stat.S_IMODE(os.stat(paths.private_key).st_mode), 0o600)

    def test_private_key_created_with_mode_0600(self) -> None:
        """
        The private key file is created by os.open with mode 0600 and O_EXCL,
        so it is never world-readable, even before its content is written.
        """
        calls = []
        real_open = os.open

        def recording_open(path, flags, mode=0o777, *a, **kw):
            calls.append((path, flags, mode))
            return real_open(path, flags, mode, *a, **kw)

        self.patch(os, "open", recording_open)
        paths = keys.generate_keypair(self.mktemp(), kid="k")
        [(path, flags, mode)] = [c for c in calls if c[0] == paths.private_key]
        self.assertEqual(mode, 0o600)
        self.assertTrue(flags & os.O_CREAT)
        self.assertTrue(flags & os.O_EXCL)

    def test_refuses_to_overwrite_private_key(self) -> None:
        """
        A second run with the same kid raises FileExistsError naming the file
        and leaves the existing key and JWKS untouched.
        """
        out = self.mktemp()
        paths = keys.generate_keypair(out, kid="k1")
        with open(paths.private_key, "rb") as f:
            before = f.read()
        with open(paths.jwks, "rb") as f:
            jwks_before = f.read()
        e = self.assertRaises(FileExistsError, keys.generate_keypair, out, kid="k1")
        self.assertIn("refusing to overwrite", str(e))
        self.assertEqual(e.filename, paths.private_key)
        with open(paths.private_key, "rb") as f:
            self.assertEqual(f.read(), before)
        with open(paths.jwks, "rb") as f:
            self.assertEqual(f.read(), jwks_before)

    def test_rotation_publishes_both_kids(self) -> None:
        """
        A second kid in the same folder is added to jwks.json next to the
        first, which keeps its key.
        """
        out = self.mktemp()
        first = keys.generate_keypair(out, kid="k1")
        first_key = keys.load_private_key(first.private_key).public_key()
        second = keys.generate_keypair(out, kid="k2")
        published = keys.load_jwks(second.jwks)
        self.assertEqual(sorted(published), ["k1", "k2"])
        self.assertEqual(_raw(published["k1"]), _raw(first_key))

    def test_replaces_same_kid_in_jwks(self) -> None:
        """
        When jwks.json already names the kid (its private key was removed),
        the entry is replaced by the new key, not duplicated, and foreign
        entries are kept.
        """
        out = self.mktemp()
        paths = keys.generate_keypair(out, kid="k1")
        with open(paths.jwks) as f:
            document = json.load(f)
        document["keys"].append({"kty": "RSA", "kid": "rsa-1", "n": "x", "e": "AQAB"})
        with open(paths.jwks, "w") as f:
            json.dump(document, f)
        os.unlink(paths.private_key)
        keys.generate_keypair(out, kid="k1")
        new_key = keys.load_private_key(paths.private_key).public_key()
        with open(paths.jwks) as f:
            entries = json.load(f)["keys"]
        self.assertEqual([e["kid"] for e in entries], ["rsa-1", "k1"])
        self.assertEqual(_raw(keys.load_jwks(paths.jwks)["k1"]), _raw(new_key))

    def test_unreadable_existing_jwks_writes_nothing(self) -> None:
        """
        A corrupt existing jwks.json is reported before any key is written.
        """
        out = self.mktemp()
        os.makedirs(out)
        with open(os.path.join(out, "jwks.json"), "w") as f:
            f.write("{not json")
        self.assertRaises(keys.JWKSError, keys.generate_keypair, out, kid="k1")
        self.assertFalse(os.path.exists(os.path.join(out, "k1.pem")))

    def test_rejects_kid_unfit_for_file_name(self) -> None:
        """A kid with a path separator or a leading dot is refused."""
        out = self.mktemp()
        for kid in ["../evil", "a/b", ".hidden", ""]:
            self.assertRaises(ValueError, keys.generate_keypair, out, kid=kid)
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(out), "evil.pem")))


class LoadPrivateKeyTests(SynchronousTestCase):
    """Tests for keys.load_private_key."""

    def _write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_not_found(self) -> None:
        """A missing file raises FileNotFoundError naming the file."""
        path = self.mktemp()
        e = self.assertRaises(FileNotFoundError, keys.load_private_key, path)
        self.assertIn("not found", str(e))
        self.assertEqual(e.filename, path)

    def test_not_pem(self) -> None:
        """A file that is not PEM raises KeyFileError saying so."""
        e = self.assertRaises(
            keys.KeyFileError, keys.load_private_key, self._write(b"\x30\x82garbage")
        )
        self.assertIn("not a PEM file", str(e))

    def test_broken_pem(self) -> None:
        """A PEM block that does not decode raises KeyFileError."""
        path = self._write(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        e = self.assertRaises(keys.KeyFileError, keys.load_private_key, path)
        self.assertIn("not a readable PEM private key", str(e))

    def test_public_key_given(self) -> None:
        """A public key PEM given as the private key is named as such."""
        public = Ed25519PrivateKey.generate().public_key()
        path = self._write(
            public.public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
        )
        e = self.assertRaises(keys.KeyFileError, keys.load_private_key, path)
        self.assertIn("public key", str(e))

    def test_not_ed25519(self) -> None:
        """An EC private key is refused as not Ed25519."""
        key = ec.generate_private_key(ec.SECP256R1())
        path = self._write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        e = self.assertRaises(keys.KeyFileError, keys.load_private_key, path)
        self.assertIn("not an Ed25519 key", str(e))

    def test_encrypted(self) -> None:
        """An encrypted private key is refused with a message saying so."""
        key = Ed25519PrivateKey.generate()
        path = self._write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        e = self.assertRaises(keys.KeyFileError, keys.load_private_key, path)
        self.assertIn("encrypted", str(e))


class JWKTests(SynchronousTestCase):
    """Tests for public_jwk, jwks_document and load_jwks."""

    def test_public_jwk_shape(self) -> None:
        """
        public_jwk gives an OKP/Ed25519 JWK with unpadded base64url x of the
        raw public key and the kid, alg and use members.
        """
        key = Ed25519PrivateKey.generate().public_key()
        jwk = keys.public_jwk(key, "k1")
        self.assertEqual(
            {k: v for k, v in jwk.items() if k != "x"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "k1", "alg": "EdDSA", "use": "sig"},
        )
        self.assertEqual(len(jwk["x"]), 43)
        self.assertNotIn("=", jwk["x"])
        self.assertEqual(
            _raw(keys.load_jwks({"keys": [jwk]})["k1"]), _raw(key)
        )

    def test_public_jwk_of_private_key_has_no_secret(self) -> None:
        """Given a private key, public_jwk publishes only the public half."""
        private = Ed25519PrivateKey.generate()
        jwk = keys.public_jwk(private, "k1")
        self.assertNotIn("d", jwk)
        self.assertEqual(jwk, keys.public_jwk(private.public_key(), "k1"))

    def test_jwks_document_round_trip(self) -> None:
        """jwks_document followed by load_jwks gives back the same keys by kid."""
        original = {
            "a": Ed25519PrivateKey.generate().public_key(),
            "b": Ed25519PrivateKey.generate().public_key(),
        }
        document = keys.jwks_document(original)
        self.assertEqual([k["kid"] for k in document["keys"]], ["a", "b"])
        loaded = keys.load_jwks(json.loads(json.dumps(document)))
        self.assertEqual({k: _raw(v) for k, v in loaded.items()},
                         {k: _raw(v) for k, v in original.items()})

    def test_skips_foreign_key_types(self) -> None:
        """
        Non-OKP entries (RSA) and OKP X25519 entries are skipped; the Ed25519
        entry is still loaded.
        """
        good = keys.public_jwk(Ed25519PrivateKey.generate().public_key(), "ed")
        document = {
            "keys": [
                {"kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"},
                {"kty": "OKP", "crv": "X25519", "kid": "x", "x": good["x"]},
                good,
            ]
        }
        self.assertEqual(list(keys.load_jwks(document)), ["ed"])

    def test_errors_name_the_problem(self) -> None:
        """
        Broken entries raise JWKSError naming the entry and what is wrong:
        missing kid, bad x, wrong length, duplicate kid, private material,
        no usable key, not a JWKS.
        """
        good = keys.public_jwk(Ed25519PrivateKey.generate().public_key(), "k")
        cases = [
            ({"keys": [{**good, "kid": ""}]}, "missing or empty kid"),
            ({"keys": [{**good, "x": "!!!"}]}, "x is not base64url"),
            ({"keys": [{**good, "x": "AAAA"}]}, "x is 3 bytes"),
            ({"keys": [good, good]}, "duplicate kid 'k'"),
            ({"keys": [{**good, "d": "secret"}]}, "private key material"),
            ({"keys": []}, "no Ed25519"),
            ({"nokeys": 1}, "not a JWKS document"),
            ({"keys": ["x"]}, "keys[0]: not an object"),
        ]
        for document, expected in cases:
            e = self.assertRaises(keys.JWKSError, keys.load_jwks, document)
            self.assertIn(expected, str(e))

    def test_x_must_be_canonical(self) -> None:
        """
        A JWK ``x`` re-spelt with spare bits set in its last character (the
        same 32 bytes), or padded with '=', is refused; the canonical one loads.
        """
        key = Ed25519PrivateKey.generate().public_key()
        good = keys.public_jwk(key, "k")
        self.assertEqual(len(good["x"]), 43)
        self.assertIn("k", keys.load_jwks({"keys": [good]}))
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        value = alphabet.index(good["x"][-1])
        respelt = good["x"][:-1] + alphabet[value | 1 if not value & 1 else value & ~1]
        for x in (respelt, good["x"] + "="):
            e = self.assertRaises(keys.JWKSError, keys.load_jwks, {"keys": [{**good, "x": x}]})
            self.assertIn("x is not base64url", str(e))

    def test_load_from_file_errors_name_file(self) -> None:
        """A JWKS file that is not JSON raises JWKSError naming the path."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[]]")
        e = self.assertRaises(keys.JWKSError, keys.load_jwks, path)
        self.assertIn(path, str(e))
        self.assertIn("not valid JSON", str(e))


class AlgorithmNameTests(SynchronousTestCase):
    """Which JWK alg values load_jwks and parse_jwks use."""

    def test_alg_names(self) -> None:
        """
        alg absent, EdDSA or Ed25519 (RFC 9864) is used; ES256, eddsa and
        ed25519 entries are skipped (so a document of only those has no key).
        """
        key = Ed25519PrivateKey.generate()
        base = keys.public_jwk(key, "k")
        for alg in (None, "EdDSA", "Ed25519"):
            entry = {k: v for k, v in base.items() if k != "alg"}
            if alg is not None:
                entry["alg"] = alg
            self.assertEqual(list(keys.load_jwks({"keys": [entry]})), ["k"], alg)
            self.assertEqual(list(keys.parse_jwks(json.dumps({"keys": [entry]}).encode())), ["k"])
        for alg in ("ES256", "eddsa", "ed25519"):
            e = self.assertRaises(
                keys.JWKSError, keys.load_jwks, {"keys": [dict(base, alg=alg)]}
            )
            self.assertIn("no Ed25519", str(e))


class ParseJWKSTests(SynchronousTestCase):
    """keys.parse_jwks: a fetched document's bytes."""

    def test_size_bound(self) -> None:
        """1 MiB of JWKS (padded with spaces) parses; one byte more is refused."""
        key = Ed25519PrivateKey.generate()
        body = json.dumps(keys.jwks_document({"k": key})).encode()
        self.assertEqual(list(keys.parse_jwks(body.ljust(1024 * 1024))), ["k"])
        e = self.assertRaises(
            keys.JWKSError, keys.parse_jwks, body.ljust(1024 * 1024 + 1), "https://k.test/j"
        )
        self.assertEqual(str(e), "https://k.test/j: larger than 1048576 bytes")

    def test_garbage(self) -> None:
        """Not JSON, not an object with a keys list, deeply nested: JWKSError naming the source."""
        for body in (b"<html>", b"[]", b'{"keys": 1}', b"[" * 100_000, b"\xff\xfe"):
            e = self.assertRaises(keys.JWKSError, keys.parse_jwks, body, "src")
            self.assertTrue(str(e).startswith("src: "), str(e))


class _SigningFolder:
    """A keys folder with policy-1 made by generate_keypair, and a signing config."""

    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        self.paths = keys.generate_keypair(self.folder, kid="policy-1")

    def signing(self, jwks=None, kid="policy-1", private_key=None):
        from shardtcp.model import SigningConfig

        return SigningConfig(
            private_key=private_key or self.paths.private_key, kid=kid, jwks=jwks
        )


class ServingJWKSTests(_SigningFolder, SynchronousTestCase):
    """keys.serving_jwks: what /.well-known/jwks.json serves."""

    def test_configured_file_served_as_is(self) -> None:
        """With [signing] jwks, its exact bytes are served (both kids of a rotation)."""
        keys.generate_keypair(self.folder, kid="policy-2")
        with open(self.paths.jwks, "rb") as f:
            expected = f.read()
        served = keys.serving_jwks(self.signing(jwks=self.paths.jwks))
        self.assertEqual(served, expected)
        self.assertEqual(sorted(keys.parse_jwks(served)), ["policy-1", "policy-2"])

    def test_fallback_is_public_half(self) -> None:
        """Without jwks: one key, the active kid, the signing key's public half, no 'd'."""
        served = json.loads(keys.serving_jwks(self.signing(kid="edge-key")))
        self.assertEqual([k["kid"] for k in served["keys"]], ["edge-key"])
        self.assertNotIn("d", served["keys"][0])
        private = keys.load_private_key(self.paths.private_key)
        self.assertEqual(served["keys"][0], keys.public_jwk(private, "edge-key"))

    def test_config_object_accepted(self) -> None:
        """A whole Config (anything with .signing) is accepted as well as its SigningConfig."""

        class Config:
            signing = self.signing(kid="x")

        self.assertEqual(keys.serving_jwks(Config()), keys.serving_jwks(self.signing(kid="x")))

    def test_private_material_never_served(self) -> None:
        """A jwks file holding a private 'd' is refused (JWKSError), not served."""
        with open(self.paths.jwks) as f:
            document = json.load(f)
        document["keys"][0]["d"] = "AAAA"
        with open(self.paths.jwks, "w") as f:
            json.dump(document, f)
        e = self.assertRaises(keys.JWKSError, keys.serving_jwks, self.signing(jwks=self.paths.jwks))
        self.assertIn("private key material", str(e))


class JWKSProblemTests(_SigningFolder, SynchronousTestCase):
    """keys.jwks_problem: check-config's check of [signing] jwks."""

    def problem(self, kid="policy-1", jwks=None):
        return keys.jwks_problem(jwks or self.paths.jwks, self.paths.private_key, kid)

    def test_valid(self) -> None:
        """The file keygen wrote, for its own kid: no problem."""
        self.assertIsNone(self.problem())

    def test_missing_kid(self) -> None:
        """The active kid is absent: one line naming the file, the kid and the kids present."""
        self.assertEqual(
            self.problem(kid="policy-2"),
            f"{self.paths.jwks} has no key with the active kid 'policy-2' (it has: policy-1)",
        )

    def test_other_key_under_the_kid(self) -> None:
        """The kid holds another key: named as not the public half of the private key."""
        other = Ed25519PrivateKey.generate()
        with open(self.paths.jwks, "w") as f:
            json.dump(keys.jwks_document({"policy-1": other}), f)
        line = self.problem()
        self.assertIn("is not the public half of", line)
        self.assertIn(self.paths.private_key, line)
        self.assertNotIn("\n", line)

    def test_unreadable(self) -> None:
        """No file, not JSON: one line naming the file."""
        missing = os.path.join(self.folder, "none.json")
        self.assertEqual(self.problem(jwks=missing), f"{missing}: no such file")
        with open(self.paths.jwks, "w") as f:
            f.write("{")
        line = self.problem()
        self.assertTrue(line.startswith(f"{self.paths.jwks}: not valid JSON"), line)
        self.assertNotIn("\n", line)


class CheckConfigJWKSTests(_SigningFolder, SynchronousTestCase):
    """`shardtcp check-config` with [signing] jwks set."""

    def check(self, kid: str) -> tuple[int, str, str]:
        import contextlib
        import io

        from shardtcp.cli import main

        path = os.path.join(self.folder, "shardtcp.toml")
        with open(path, "w") as f:
            f.write(
                f'[proxy]\nid = "edge-1"\n[signing]\nprivate_key = "{kid}.pem"\n'
                f'kid = "{kid}"\njwks = "jwks.json"\n'
                '[[listener]]\nname = "edge"\nlisten = "tcp:0:interface=127.0.0.1"\n'
                '[service.api]\nnames = ["api.example.test"]\n'
                '[[service.api.shard]]\nid = "api-1"\naddress = "127.0.0.1:9001"\n'
            )
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["check-config", "--no-listen", path])
        return status, out.getvalue(), err.getvalue()

    def test_valid_then_missing_kid(self) -> None:
        """
        jwks holding the active kid: valid (exit 0).  A kid whose key exists
        but is not published: exit 1 and exactly one line, naming signing.jwks.
        """
        status, out, err = self.check("policy-1")
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(out.endswith(": valid\n"))
        # policy-2's key exists, but the JWKS is put back to policy-1 only.
        with open(self.paths.jwks, "rb") as f:
            published = f.read()
        keys.generate_keypair(self.folder, kid="policy-2")
        with open(self.paths.jwks, "wb") as f:
            f.write(published)
        status, out, err = self.check("policy-2")
        self.assertEqual(status, 1)
        self.assertEqual(
            err.splitlines(),
            [
                f"signing.jwks: {self.paths.jwks} has no key with the active kid "
                "'policy-2' (it has: policy-1)"
            ],
        )

    def test_missing_file_one_line(self) -> None:
        """A jwks path that does not exist: exit 1 and one line naming signing.jwks."""
        os.unlink(self.paths.jwks)
        status, out, err = self.check("policy-1")
        self.assertEqual(status, 1)
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("signing.jwks: "), lines)
        self.assertIn(self.paths.jwks, lines[0])
