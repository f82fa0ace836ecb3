"""
Tests for shardtcp.backend.RemoteKeySet: a shard's trusted keys fetched from
a JWKS URL and kept fresh, with a fake HTTP agent on a MemoryReactorClock,
then over real loopback HTTP and HTTPS servers, and the key rotation of
docs/keys.rst run step by step.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from shardtcp import jws, proxyv2
from shardtcp.backend import (
    MAX_JWKS_RESPONSE,
    IKeySource,
    RemoteKeySet,
    ShardVerifier,
    StaticKeySource,
    VerificationError,
    VerifyingFactory,
)
from shardtcp.cli import main as cli_main
from shardtcp.config import load_config
from shardtcp.keys import jwks_document, load_private_key, public_jwk, serving_jwks
from shardtcp.policy import PolicyContext, PolicySigner
from shardtcp.proxyv2 import PP2_TYPE_UNIQUE_ID, Command, ProxyHeader

URL = "http://keys.example.test/.well-known/jwks.json"
SHARD = "api-1"
CLIENT = ("198.51.100.7", 50123)
PROXY_ADDR = ("203.0.113.1", 8443)
POLICY = PolicyContext("tls", ("none",), ("read",))


def _jwks(**keys) -> bytes:
    return json.dumps(jwks_document(keys)).encode()


class _BodyTransport(StringTransport):
    """The transport a response body protocol gets; records stopProducing."""

    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class _Response:
    """An IResponse enough for RemoteKeySet: code, length, deliverBody."""

    def __init__(self, code: int, body: bytes, length, chunk: int, finish: bool) -> None:
        self.code = code
        self.length = length
        self._body = body
        self._chunk = chunk
        self._finish = finish
        self.transport = _BodyTransport()
        self.protocol: Optional[Protocol] = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        for start in range(0, len(self._body), self._chunk):
            if self.transport.stopped:
                break
            protocol.dataReceived(self._body[start : start + self._chunk])
        if self._finish:
            protocol.connectionLost(Failure(ResponseDone()))


@implementer(IAgent)
class FakeAgent:
    """Records each request; the test answers it (or not) by hand."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Deferred]] = []
        self.cancelled = 0

    def request(self, method, uri, headers=None, bodyProducer=None) -> Deferred:
        def cancel(d: Deferred) -> None:
            self.cancelled += 1

        d: Deferred = Deferred(cancel)
        self.requests.append((method, uri, d))
        return d

    @property
    def pending(self) -> Deferred:
        return self.requests[-1][2]

    def respond(
        self,
        body: bytes,
        code: int = 200,
        *,
        length=None,
        chunk: int = 65536,
        finish: bool = True,
    ) -> _Response:
        response = _Response(
            code, body, len(body) if length is None else length, chunk, finish
        )
        self.pending.callback(response)
        return response


class _Fixture:
    """A RemoteKeySet on a fake agent and a memory clock, and a key pair."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.agent = FakeAgent()
        self.key1 = Ed25519PrivateKey.generate()
        self.key2 = Ed25519PrivateKey.generate()

    def key_set(self, **kw) -> RemoteKeySet:
        kw.setdefault("min_interval", 30)
        kw.setdefault("refresh_interval", 300)
        kw.setdefault("timeout", 10)
        return RemoteKeySet(URL, reactor=self.reactor, agent=self.agent, **kw)

    def started(self, **kw) -> RemoteKeySet:
        """A started key set whose first fetch returned policy-1."""
        key_set = self.key_set(**kw)
        key_set.startService()
        self.addCleanup(key_set.stopService)
        self.agent.respond(_jwks(**{"policy-1": self.key1}))
        self.assertEqual(set(key_set.keys), {"policy-1"})
        return key_set

    def assertKeptPolicy1(self, key_set: RemoteKeySet) -> None:
        self.assertEqual(set(key_set.keys), {"policy-1"})
        self.assertEqual(
            jws.b64url_encode(key_set.key_for("policy-1").public_bytes_raw()),
            jws.b64url_encode(self.key1.public_key().public_bytes_raw()),
        )


class InterfaceTests(_Fixture, SynchronousTestCase):
    """The key sources provide IKeySource; RemoteKeySet is a service."""

    def test_interfaces(self) -> None:
        """verifyObject passes for both sources and IService for RemoteKeySet."""
        self.assertTrue(verifyObject(IKeySource, self.key_set()))
        self.assertTrue(verifyObject(IService, self.key_set()))
        self.assertTrue(verifyObject(IKeySource, StaticKeySource({"k": self.key1.public_key()})))

    def test_url_and_bounds_checked(self) -> None:
        """Only http(s) URLs; a CA only with https; intervals must be positive."""
        for url in ("ftp://x/jwks.json", "file:///etc/jwks.json", "keys/jwks.json"):
            with self.assertRaises(ValueError):
                RemoteKeySet(url, reactor=self.reactor, agent=self.agent)
        with self.assertRaises(ValueError) as caught:
            RemoteKeySet(URL, reactor=self.reactor, ca="/no/ca.pem")
        self.assertIn("only used with https", str(caught.exception))
        with self.assertRaises(ValueError):
            self.key_set(min_interval=0)
        with self.assertRaises(ValueError):
            self.key_set(max_size=0)

    def test_request(self) -> None:
        """Start fetches the URL once with GET; nothing is trusted before the answer."""
        key_set = self.key_set()
        key_set.startService()
        self.addCleanup(key_set.stopService)
        self.assertEqual([(m, u) for m, u, _ in self.agent.requests], [(b"GET", URL.encode())])
        self.assertIsNone(key_set.key_for("policy-1"))
        self.agent.respond(_jwks(**{"policy-1": self.key1}))
        self.assertKeptPolicy1(key_set)
        self.assertEqual((key_set.stats["fetches"], key_set.stats["fetched"]), (1, 1))


class RefetchBoundTests(_Fixture, SynchronousTestCase):
    """An unknown kid refetches at most once per min_interval."""

    def test_edges(self) -> None:
        """
        With min_interval 30 after a fetch at t=0: an unknown kid at 29.75
        fetches nothing (counted refetch_limited), at exactly 30.0 it fetches.
        """
        key_set = self.started()
        self.reactor.advance(29.75)
        key_set.unknown_kid("policy-2")
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(key_set.stats["refetch_limited"], 1)
        self.reactor.advance(0.25)
        self.assertEqual(self.reactor.seconds(), 30.0)
        key_set.unknown_kid("policy-2")
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.respond(_jwks(**{"policy-1": self.key1, "policy-2": self.key2}))
        self.assertEqual(set(key_set.keys), {"policy-1", "policy-2"})

    def test_bound_counts_from_last_fetch_of_any_kind(self) -> None:
        """A periodic refresh at t=300 also restarts the interval: 329.75 no, 330 yes."""
        key_set = self.started()
        self.reactor.advance(300)
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.respond(_jwks(**{"policy-1": self.key1}))
        self.reactor.advance(29.75)
        key_set.unknown_kid("x")
        self.assertEqual(len(self.agent.requests), 2)
        self.reactor.advance(0.25)
        key_set.unknown_kid("x")
        self.assertEqual(len(self.agent.requests), 3)

    def test_no_second_fetch_while_one_is_in_flight(self) -> None:
        """Unknown kids while a fetch is unanswered add no request, however late."""
        key_set = self.key_set()
        key_set.startService()
        self.addCleanup(key_set.stopService)
        self.reactor.advance(9.5)
        for _ in range(100):
            key_set.unknown_kid("policy-2")
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(key_set.stats["unknown_kid"], 100)

    def test_forged_kid_flood(self) -> None:
        """
        Tokens with a fresh forged kid every 10 ms for 100 s, through the
        verifier: 10,000 refusals (unknown_kid), and only the fetches at
        0, 30, 60 and 90 s.
        """
        key_set = self.started()
        verifier = ShardVerifier(SHARD, key_set, now=self.reactor.seconds)
        attacker = Ed25519PrivateKey.generate()
        refused = 0
        for i in range(10_000):
            token = jws.sign({"aud": SHARD}, attacker, kid=f"forged-{i}")
            header = _header(token, f"conn-{i:012d}-abcdef")
            try:
                verifier.verify(header)
            except VerificationError as e:
                self.assertEqual(e.reason, "unknown_kid")
                refused += 1
            if self.agent.requests[-1][2].called is False:
                self.agent.respond(_jwks(**{"policy-1": self.key1}))
            self.reactor.advance(0.01)
        self.assertEqual(refused, 10_000)
        self.assertEqual(len(self.agent.requests), 4)
        self.assertEqual(key_set.stats["fetches"], 4)


class KeepLastGoodTests(_Fixture, SynchronousTestCase):
    """A failed fetch never changes the trusted keys."""

    def assertFailedKeeping(self, key_set: RemoteKeySet, reason: str) -> None:
        self.assertEqual(key_set.stats[f"failed_{reason}"], 1)
        self.assertEqual(key_set.stats["fetched"], 1)
        self.assertKeptPolicy1(key_set)
        self.assertEqual(self.flushLoggedErrors(), [])

    def refetch(self, key_set: RemoteKeySet) -> None:
        self.reactor.advance(300)
        self.assertEqual(len(self.agent.requests), 2)

    def test_http_500(self) -> None:
        """A 500 answer: failed_status, keys kept, body not read."""
        key_set = self.started()
        self.refetch(key_set)
        response = self.agent.respond(b"oops", code=500)
        self.assertTrue(response.transport.stopped)
        self.assertFailedKeeping(key_set, "status")

    def test_connection_refused(self) -> None:
        """A connection error: failed_connect, keys kept."""
        key_set = self.started()
        self.refetch(key_set)
        self.agent.pending.errback(Failure(ConnectionRefusedError()))
        self.assertFailedKeeping(key_set, "connect")

    def test_timeout_before_headers(self) -> None:
        """No answer within timeout (10 s): cancelled at 10.0, not at 9.75; keys kept."""
        key_set = self.started()
        self.refetch(key_set)
        self.reactor.advance(9.75)
        self.assertEqual(self.agent.cancelled, 0)
        self.reactor.advance(0.25)
        self.assertEqual(self.agent.cancelled, 1)
        self.assertFailedKeeping(key_set, "timeout")
        # The next unknown kid may fetch again once min_interval has passed.
        self.reactor.advance(20)
        key_set.unknown_kid("k")
        self.assertEqual(len(self.agent.requests), 3)

    def test_timeout_during_body(self) -> None:
        """Headers then a body that never ends: stopped at the timeout, keys kept."""
        key_set = self.started()
        self.refetch(key_set)
        response = self.agent.respond(b'{"keys": [', finish=False)
        self.reactor.advance(10)
        self.assertTrue(response.transport.stopped)
        self.assertFailedKeeping(key_set, "timeout")

    def test_garbage(self) -> None:
        """Bodies that are not a usable JWKS: failed_invalid each time, keys kept."""
        key_set = self.started()
        bodies = [
            b"<html>maintenance</html>",
            b'{"keys": []}',
            b'{"keys": {"kid": "x"}}',
            json.dumps({"keys": [{"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}]}).encode(),
            json.dumps({"keys": [dict(public_jwk(self.key2, "p2"), x="AAAA")]}).encode(),
            b"[" * 100_000,
        ]
        for count, body in enumerate(bodies, start=1):
            self.reactor.advance(300)
            self.agent.respond(body)
            self.assertEqual(key_set.stats["failed_invalid"], count)
            self.assertKeptPolicy1(key_set)

    def test_oversize_declared(self) -> None:
        """Content-Length max_size + 1: refused before reading; max_size itself is read."""
        key_set = self.started(max_size=2000)
        self.refetch(key_set)
        response = self.agent.respond(b"", length=2001, finish=False)
        self.assertTrue(response.transport.stopped)
        self.assertFailedKeeping(key_set, "oversize")
        body = _jwks(**{"policy-2": self.key2}).ljust(2000)
        self.reactor.advance(300)
        self.agent.respond(body, length=2000)
        self.assertEqual(set(key_set.keys), {"policy-2"})

    def test_oversize_streamed(self) -> None:
        """
        No Content-Length and 1 MiB + 1 bytes: the transfer is stopped at the
        bound; exactly 1 MiB of a valid JWKS padded with spaces is accepted.
        """
        key_set = self.started()
        self.assertEqual(key_set.max_size, MAX_JWKS_RESPONSE)
        self.refetch(key_set)
        body = _jwks(**{"policy-2": self.key2}).ljust(MAX_JWKS_RESPONSE + 1)
        response = self.agent.respond(body, length=UNKNOWN_LENGTH, finish=False)
        self.assertTrue(response.transport.stopped)
        self.assertFailedKeeping(key_set, "oversize")
        self.reactor.advance(300)
        self.agent.respond(body[:MAX_JWKS_RESPONSE], length=UNKNOWN_LENGTH)
        self.assertEqual(set(key_set.keys), {"policy-2"})

    def test_good_fetch_replaces_whole_set(self) -> None:
        """A good answer without policy-1 retires it: policy-1 unknown afterwards."""
        key_set = self.started()
        self.refetch(key_set)
        self.agent.respond(_jwks(**{"policy-2": self.key2}))
        self.assertIsNone(key_set.key_for("policy-1"))
        self.assertIsNotNone(key_set.key_for("policy-2"))

    def test_stop(self) -> None:
        """stopService cancels the fetch in flight and the refresh timer, quietly."""
        key_set = self.key_set()
        key_set.startService()
        key_set.stopService()
        self.assertEqual(self.agent.cancelled, 1)
        self.reactor.advance(3600)
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(key_set.stats["failed_timeout"], 0)


def _header(token: bytes, connection_id: str) -> ProxyHeader:
    """The header the proxy sends, encoded with its CRC32C and parsed back."""
    header = ProxyHeader(
        command=Command.PROXY,
        source=CLIENT,
        destination=PROXY_ADDR,
        tlvs=((PP2_TYPE_UNIQUE_ID, connection_id.encode()), (0xE0, token)),
    )
    parsed, rest = proxyv2.parse(proxyv2.encode(header), require_crc32c=True)
    assert rest == b""
    return parsed


class VerifierTests(_Fixture, SynchronousTestCase):
    """ShardVerifier over a RemoteKeySet, and the Ed25519 algorithm name."""

    def sign(self, key, kid: str, connection_id: str, alg: Optional[str] = None) -> bytes:
        signer = PolicySigner(key, kid=kid, issuer="edge-1", ttl=30, now=self.reactor.seconds)
        token = signer.sign(
            policy=POLICY,
            audience=SHARD,
            connection_id=connection_id,
            service="api",
            source=CLIENT,
            destination=PROXY_ADDR,
        )
        if alg is None:
            return token
        # Re-sign the same claims under a header naming another alg.
        claims = token.split(b".")[1]
        head = jws.b64url_encode(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
        signing_input = head + b"." + claims
        return signing_input + b"." + jws.b64url_encode(key.sign(signing_input))

    def test_unknown_kid_refused_now_next_connection_accepted(self) -> None:
        """
        A token under a kid published after the last fetch is refused
        (unknown_kid) while the fetch it caused is in flight; once the answer
        arrives, the next connection with that kid is accepted.
        """
        self.reactor.advance(1_700_000_000)
        key_set = self.started()
        verifier = ShardVerifier(SHARD, key_set, now=self.reactor.seconds)
        self.reactor.advance(60)
        with self.assertRaises(VerificationError) as caught:
            verifier.verify(_header(self.sign(self.key2, "policy-2", "conn-0000000000000001"), "conn-0000000000000001"))
        self.assertEqual(caught.exception.reason, "unknown_kid")
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.respond(_jwks(**{"policy-1": self.key1, "policy-2": self.key2}))
        conn = verifier.verify(_header(self.sign(self.key2, "policy-2", "conn-0000000000000002"), "conn-0000000000000002"))
        self.assertEqual(conn.connection_id, "conn-0000000000000002")
        self.assertEqual(len(self.agent.requests), 2)

    def test_ed25519_names(self) -> None:
        """
        A JWK with alg Ed25519 (RFC 9864) is trusted, and a token whose
        header says alg Ed25519 verifies, as does EdDSA; "ed25519" and
        "ES256" are bad_algorithm.
        """
        self.reactor.advance(1_700_000_000)
        key_set = self.key_set()
        key_set.startService()
        self.addCleanup(key_set.stopService)
        jwk = dict(public_jwk(self.key1, "policy-1"), alg="Ed25519")
        self.agent.respond(json.dumps({"keys": [jwk]}).encode())
        verifier = ShardVerifier(SHARD, key_set, now=self.reactor.seconds)
        for n, alg in enumerate(("Ed25519", "EdDSA", None)):
            cid = f"conn-ok-{n:012d}"
            verifier.verify(_header(self.sign(self.key1, "policy-1", cid, alg), cid))
        for n, alg in enumerate(("ed25519", "ES256")):
            cid = f"conn-bad-{n:012d}"
            with self.assertRaises(VerificationError) as caught:
                verifier.verify(_header(self.sign(self.key1, "policy-1", cid, alg), cid))
            self.assertEqual(caught.exception.reason, "bad_algorithm")

    def test_factory_runs_the_key_set(self) -> None:
        """VerifyingFactory starts a stopped RemoteKeySet when it starts and stops it after."""
        key_set = self.key_set()
        factory = VerifyingFactory(
            Factory.forProtocol(Protocol), ShardVerifier(SHARD, key_set), reactor=self.reactor
        )
        factory.doStart()
        self.assertTrue(key_set.running)
        self.assertEqual(len(self.agent.requests), 1)
        factory.doStop()
        self.assertFalse(key_set.running)
        self.assertEqual(self.agent.cancelled, 1)


# -- over real sockets ---------------------------------------------------------


class _JWKSResource(Resource):
    """Serves what the admin site serves: serving_jwks of the current config."""

    isLeaf = True

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.requests = 0

    def render_GET(self, request) -> bytes:
        self.requests += 1
        request.setHeader(b"content-type", b"application/json")
        return serving_jwks(self.config)


def _self_signed(directory: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files in ``directory``."""
    from cryptography.hazmat.primitives.asymmetric import ec
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwks test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


CONFIG = """\
[proxy]
id = "edge-1"

[signing]
private_key = "keys/{kid}.pem"
kid = "{kid}"
jwks = "keys/jwks.json"

[[listener]]
name = "edge"
listen = "tcp:0:interface=127.0.0.1"

[service.api]
names = ["api.example.test"]

[[service.api.shard]]
id = "api-1"
address = "127.0.0.1:9001"
"""


def _keygen(directory: str, kid: str) -> None:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        status = cli_main(["keygen", "--out", directory, "--kid", kid])
    if status != 0:
        raise AssertionError(f"keygen {kid} exited {status}")


class LoopbackTests(TestCase):
    """RemoteKeySet against real twisted.web servers on 127.0.0.1, port 0."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        _keygen(os.path.join(self.folder, "keys"), "policy-1")
        self.config_path = os.path.join(self.folder, "shardtcp.toml")
        self.write_config("policy-1")
        self.resource = _JWKSResource(self.reload())

    def write_config(self, kid: str) -> None:
        with open(self.config_path, "w") as f:
            f.write(CONFIG.format(kid=kid))

    def reload(self):
        """Load and check the configuration, as check-config and a reload do."""
        config = load_config(self.config_path, check_files=True)
        if hasattr(self, "resource"):
            self.resource.config = config
        return config

    def listen(self, tls=None) -> str:
        return self.listen_port(tls)[0]

    def listen_port(self, tls=None):
        site = Site(self.resource)
        if tls is None:
            port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
            scheme = "http"
        else:
            port = self.reactor.listenSSL(0, site, tls, interface="127.0.0.1")
            scheme = "https"
        self.addCleanup(port.stopListening)
        return f"{scheme}://127.0.0.1:{port.getHost().port}/.well-known/jwks.json", port

    def signer(self, config) -> PolicySigner:
        return PolicySigner(
            load_private_key(config.signing.private_key),
            kid=config.signing.kid,
            issuer=config.proxy.id,
            ttl=config.signing.ttl,
            now=self.reactor.seconds,
        )

    def connect(self, verifier: ShardVerifier, config, n: int):
        """Sign a connection as the proxy does and verify it as the shard does."""
        cid = f"rotation-conn-{n:010d}"
        token = self.signer(config).sign(
            policy=POLICY, audience=SHARD, connection_id=cid, service="api",
            source=CLIENT, destination=PROXY_ADDR,
        )
        return verifier.verify(_header(token, cid))

    @defer.inlineCallbacks
    def test_https_with_ca(self):
        """
        Over HTTPS verified with the test's own CA the keys arrive; the same
        URL with a CA that did not sign the server's certificate fails and
        trusts nothing.
        """
        from twisted.internet.ssl import PrivateCertificate

        cert, key = _self_signed(self.folder)
        with open(cert, "rb") as c, open(key, "rb") as k:
            tls = PrivateCertificate.loadPEM(c.read() + k.read()).options()
        url = self.listen(tls)
        good = RemoteKeySet(url, ca=cert)
        self.assertTrue((yield good.refresh()))
        self.assertEqual(set(good.keys), {"policy-1"})
        other = os.path.join(self.folder, "other")
        os.makedirs(other)
        wrong_ca, _ = _self_signed(other)
        bad = RemoteKeySet(url, ca=wrong_ca)
        self.assertFalse((yield bad.refresh()))
        self.assertEqual(bad.keys, {})
        self.assertEqual(bad.stats["failed_connect"], 1)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_failed_server_keeps_keys(self):
        """A server that goes away: the fetch fails and the keys stay."""
        url, port = self.listen_port()
        key_set = RemoteKeySet(url, timeout=5)
        self.assertTrue((yield key_set.refresh()))
        yield port.stopListening()
        self.assertFalse((yield key_set.refresh()))
        self.assertEqual(set(key_set.keys), {"policy-1"})
        self.assertEqual(key_set.stats["failed_connect"], 1)

    @defer.inlineCallbacks
    def test_rotation(self):
        """
        docs/keys.rst step by step: keygen policy-2 merges into the JWKS,
        reload, the shards fetch, switch kid, reload, retire policy-1,
        reload, the shards fetch.  Connections verify before, during and
        after the switch; a token under the retired policy-1 is refused
        (unknown_kid) at the end, and check-config's JWKS check passes at
        every step.
        """
        url = self.listen()
        shards = [RemoteKeySet(url, min_interval=30, refresh_interval=300) for _ in range(3)]
        verifiers = [ShardVerifier(SHARD, s) for s in shards]
        for s in shards:
            s.startService()
            self.addCleanup(s.stopService)

        def wait_for_shards():
            return defer.gatherResults([s.refresh() for s in shards])

        yield wait_for_shards()
        n = 0
        old_config = self.resource.config
        for v in verifiers:
            n += 1
            self.assertEqual(self.connect(v, old_config, n).shard_id, SHARD)

        # 1. Publish the next key beside the active one.
        _keygen(os.path.join(self.folder, "keys"), "policy-2")
        # 2. Reload (the proxy still signs with policy-1).
        config = self.reload()
        self.assertEqual(config.signing.kid, "policy-1")
        self.assertEqual(
            sorted(k["kid"] for k in json.loads(serving_jwks(config))["keys"]),
            ["policy-1", "policy-2"],
        )
        # 3. Wait for the shards to fetch.
        yield wait_for_shards()
        for v in verifiers:
            self.assertEqual(set(v.keys.keys), {"policy-1", "policy-2"})
            n += 1
            self.connect(v, config, n)
        # 4. Switch kid and reload: new connections carry policy-2 ...
        self.write_config("policy-2")
        new_config = self.reload()
        self.assertEqual(new_config.signing.kid, "policy-2")
        for v in verifiers:
            n += 1
            self.assertEqual(self.connect(v, new_config, n).claims["iss"], "edge-1")
            # ... and tokens signed just before the switch still verify.
            n += 1
            self.connect(v, config, n)
        # 5. Later, retire policy-1: drop it from the JWKS, reload, shards fetch.
        jwks_path = new_config.signing.jwks
        with open(jwks_path) as f:
            document = json.load(f)
        document["keys"] = [k for k in document["keys"] if k["kid"] != "policy-1"]
        with open(jwks_path, "w") as f:
            json.dump(document, f)
        self.reload()
        yield wait_for_shards()
        for v in verifiers:
            n += 1
            self.connect(v, new_config, n)
            n += 1
            with self.assertRaises(VerificationError) as caught:
                self.connect(v, old_config, n)
            self.assertEqual(caught.exception.reason, "unknown_kid")


class ShardProcessTests(SynchronousTestCase):
    """``python -m shardtcp.example.shard --jwks-url`` as a process."""

    def setUp(self) -> None:
        import http.server
        import threading

        self.key = Ed25519PrivateKey.generate()
        body = _jwks(**{"policy-1": self.key})
        self.served: list[str] = []
        served = self.served

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()

        def stop() -> None:
            self.server.shutdown()
            self.server.server_close()
            thread.join(10)

        self.addCleanup(stop)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"

    def test_fetches_and_verifies(self) -> None:
        """
        The shard fetches the URL at start and then accepts a connection
        signed with policy-1: its greeting names the client's address.
        """
        import signal
        import socket
        import subprocess
        import sys
        import time

        folder = self.mktemp()
        os.makedirs(folder)
        port_file = os.path.join(folder, "port")
        process = subprocess.Popen(
            [sys.executable, "-m", "shardtcp.example.shard", "--id", SHARD,
             "--jwks-url", self.url, "--port-file", port_file],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def stop() -> None:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stderr.close()

        self.addCleanup(stop)
        deadline = time.monotonic() + 20
        while not (os.path.exists(port_file) and self.served):
            if process.poll() is not None:
                self.fail(f"shard exited early: {process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                self.fail("shard did not listen and fetch")
            time.sleep(0.05)
        with open(port_file) as f:
            port = int(f.read())
        self.assertEqual(self.served[0], "/.well-known/jwks.json")
        signer = PolicySigner(self.key, kid="policy-1", issuer="edge-1", ttl=30, now=time.time)
        received = b""
        # The fetch may still be on its way when the request was served:
        # a refused connection (unknown_kid) is closed at once; try again.
        for attempt in range(100):
            cid = f"process-conn-{attempt:010d}"
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                token = signer.sign(
                    policy=POLICY, audience=SHARD, connection_id=cid, service="api",
                    source=sock.getsockname(), destination=sock.getpeername(),
                )
                header = ProxyHeader(
                    command=Command.PROXY,
                    source=sock.getsockname(),
                    destination=sock.getpeername(),
                    tlvs=((PP2_TYPE_UNIQUE_ID, cid.encode()), (0xE0, token)),
                )
                sock.sendall(proxyv2.encode(header))
                sock.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := sock.recv(65536):
                    received += chunk
            if received:
                break
            time.sleep(0.05)
        self.assertTrue(received.startswith(b"SHARD api-1 client=127.0.0.1:"), received)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=20), 0)

    def test_bad_url(self) -> None:
        """An ftp:// --jwks-url, or --jwks-ca without --jwks-url: exit 2 with the reason."""
        import subprocess
        import sys

        for args, expected in (
            (["--jwks-url", "ftp://127.0.0.1/jwks.json"], b"only http and https"),
            (["--jwks", "x.json", "--jwks-ca", "ca.pem"], b"--jwks-ca goes with --jwks-url"),
        ):
            result = subprocess.run(
                [sys.executable, "-m", "shardtcp.example.shard", "--id", SHARD, *args],
                capture_output=True,
                timeout=30,
            )
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertIn(expected, result.stderr)
