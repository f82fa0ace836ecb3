"""
Tests for shardtcp.headerdump (``shardtcp decode-header``): the signature and
the claims get separate verdicts.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import keys, proxyv2
from shardtcp.headerdump import describe
from shardtcp.policy import PolicyContext, PolicySigner

NOW = 1_700_000_000.0
CONN_ID = "A" * 24


class DescribeTests(SynchronousTestCase):
    """describe() on captured headers."""

    def setUp(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.jwks = keys.jwks_document({"policy-1": self.key.public_key()})

    def capture(self, key=None, source=("192.0.2.7", 5000)) -> bytes:
        signer = PolicySigner(key or self.key, kid="policy-1", issuer="edge-1", ttl=30, now=lambda: NOW)
        token = signer.sign(
            policy=PolicyContext("tls", ("none",), ()),
            audience="api-fra-1",
            connection_id=CONN_ID,
            service="api",
            source=source,
            destination=("127.0.0.1", 8443),
        )
        return proxyv2.encode(
            proxyv2.ProxyHeader(
                source=("192.0.2.7", 5000),
                destination=("127.0.0.1", 8443),
                tlvs=((0x05, CONN_ID.encode()), (0xE0, token)),
            )
        )

    def test_valid(self) -> None:
        """A token for its own audience: signature valid, binding valid, all checks pass."""
        lines, ok = describe(self.capture(), jwks=self.jwks, now=lambda: NOW)
        self.assertTrue(ok, lines)
        self.assertIn("signature valid (kid 'policy-1')", lines)
        self.assertIn("binding valid (src, dst, jti)", lines)
        self.assertIn("version 2, command PROXY, family INET, transport STREAM", lines)

    def test_other_audience_keeps_a_valid_signature(self) -> None:
        """
        Checked for another audience, the signature is still reported valid
        and the audience is what fails, never 'signature NOT valid'.
        """
        lines, ok = describe(self.capture(), jwks=self.jwks, audience="api-nyc-1", now=lambda: NOW)
        self.assertFalse(ok)
        self.assertIn("signature valid (kid 'policy-1')", lines)
        self.assertFalse([line for line in lines if line.startswith("signature NOT valid")], lines)
        self.assertIn("claims NOT valid: wrong_audience: token is not for 'api-nyc-1'", lines)

    def test_other_key(self) -> None:
        """A token signed by another key under the trusted kid: signature NOT valid."""
        lines, ok = describe(self.capture(key=Ed25519PrivateKey.generate()), jwks=self.jwks, now=lambda: NOW)
        self.assertFalse(ok)
        self.assertTrue([line for line in lines if line.startswith("signature NOT valid: invalid_signature")], lines)

    def test_binding_mismatch(self) -> None:
        """A valid token bound to another source: signature valid, binding refused."""
        lines, ok = describe(self.capture(source=("192.0.2.8", 5000)), jwks=self.jwks, now=lambda: NOW)
        self.assertFalse(ok)
        self.assertIn("signature valid (kid 'policy-1')", lines)
        self.assertIn("src '192.0.2.8:5000' does not match the header's 192.0.2.7:5000", lines)
