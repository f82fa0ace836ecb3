"""
The pieces of one connection's work inside shardtcp, timed in this process
through public APIs only: ClientHello parse, PolicyContext signing (and the
bare Ed25519 signature in it), PROXY v2 encode, and the shard side
(``proxyv2.parse``, ``ShardVerifier.verify_bytes``, bare Ed25519
verification).  CPU microseconds per operation (``time.process_time``),
best of a few batches.  ``ShardVerifier.verify_bytes`` is timed over
distinct headers, since a verifier refuses a ``jti`` it has seen.
"""

from __future__ import annotations

import ssl
import time
from typing import Any, Callable

from bench.lab import SERVICE_NAME, BenchError, Lab
from bench.report import fmt, table


def _per_call(fn: Callable[[], Any], quick: bool) -> float:
    number = 1
    for _ in range(30):
        t0 = time.process_time()
        for _ in range(number):
            fn()
        if time.process_time() - t0 >= 0.2 or number >= 1 << 22:
            break
        number *= 2
    best = float("inf")
    for _ in range(2 if quick else 3):
        t0 = time.process_time()
        for _ in range(number):
            fn()
        best = min(best, (time.process_time() - t0) / number)
    return best * 1e6


def client_hello(name: str) -> bytes:
    """The first flight of Python's own TLS client for ``name``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def run(lab: Lab, settings: dict) -> dict:
    from shardtcp import proxyv2
    from shardtcp.backend import ShardVerifier
    from shardtcp.identify.clienthello import ClientHelloParser
    from shardtcp.keys import load_private_key
    from shardtcp.policy import PolicyContext, PolicySigner, new_connection_id

    quick = settings["quick"]
    out: dict = {}
    hello = client_hello(SERVICE_NAME)
    out["client_hello_bytes"] = len(hello)
    info = ClientHelloParser(max_size=16384).feed(hello)
    if info is None or info.server_name != SERVICE_NAME:
        raise BenchError(f"ClientHelloParser did not find the server name in a whole hello: {info!r}")
    out["clienthello_parse"] = _per_call(lambda: ClientHelloParser(max_size=16384).feed(hello), quick)

    key = load_private_key(lab.keys.private_key)
    signer = PolicySigner(key, kid=lab.keys.kid, issuer="edge-bench-1", ttl=30.0, now=time.time)
    policy = PolicyContext(encryption_level="tls", authentication_method=("none",), access_control_list=("orders:read",))
    src, dst = ("198.51.100.7", 51515), ("127.0.0.1", 8443)

    def sign(connection_id: str) -> bytes:
        return signer.sign(policy=policy, audience="bench-shard-1", connection_id=connection_id, service="api",
                           source=src, destination=dst, sni=SERVICE_NAME)

    fixed_id = new_connection_id()
    token = sign(fixed_id)
    signing_input = token.rsplit(b".", 1)[0]
    out["policy_sign"] = _per_call(lambda: sign(fixed_id), quick)
    # The signature as PolicySigner makes it (libsodium through PyNaCl when
    # installed), and OpenSSL's through cryptography for comparison.
    from shardtcp import jws

    backend = jws.Signer(key, kid=lab.keys.kid)
    out["ed25519_backend"] = backend.backend
    if backend.backend == "libsodium":
        from nacl.bindings import crypto_sign, crypto_sign_seed_keypair
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        secret = crypto_sign_seed_keypair(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))[1]
        out["ed25519_sign"] = _per_call(lambda: crypto_sign(signing_input, secret), quick)
    else:
        out["ed25519_sign"] = _per_call(lambda: key.sign(signing_input), quick)
    out["ed25519_sign_openssl"] = _per_call(lambda: key.sign(signing_input), quick)

    def header(connection_id: str, token: bytes) -> Any:
        return proxyv2.ProxyHeader(
            command=proxyv2.Command.PROXY, source=src, destination=dst,
            tlvs=((proxyv2.PP2_TYPE_AUTHORITY, SERVICE_NAME.encode()),
                  (proxyv2.PP2_TYPE_UNIQUE_ID, connection_id.encode()),
                  (0xE0, token)))

    fixed = header(fixed_id, token)
    encoded = proxyv2.encode(fixed)
    out["proxyv2_header_bytes"] = len(encoded)
    out["proxyv2_encode"] = _per_call(lambda: proxyv2.encode(fixed), quick)
    out["proxyv2_parse"] = _per_call(lambda: proxyv2.parse(encoded, require_crc32c=True), quick)

    public = {lab.keys.kid: key.public_key()}
    headers = []
    for _ in range(500 if quick else 1000):
        cid = new_connection_id()
        headers.append(proxyv2.encode(header(cid, sign(cid))))
    best = float("inf")
    for _ in range(2 if quick else 3):
        verifier = ShardVerifier("bench-shard-1", public)
        t0 = time.process_time()
        for data in headers:
            verifier.verify_bytes(data)
        best = min(best, (time.process_time() - t0) / len(headers))
    out["verify_bytes"] = best * 1e6
    signature = key.sign(signing_input)
    public_key = key.public_key()
    out["ed25519_verify"] = _per_call(lambda: public_key.verify(signature, signing_input), quick)
    return out


def report(r: dict) -> str:
    rows = [
        ["``ClientHelloParser.feed``, one whole hello", fmt(r["clienthello_parse"])],
        ["``PolicySigner.sign``", fmt(r["policy_sign"])],
        [f"  of which the Ed25519 signature ({r.get('ed25519_backend', 'openssl')})", fmt(r["ed25519_sign"])],
        ["  (the same signature by OpenSSL, through cryptography)", fmt(r.get("ed25519_sign_openssl"))],
        ["``proxyv2.encode``", fmt(r["proxyv2_encode"])],
        ["shard side: ``proxyv2.parse``", fmt(r["proxyv2_parse"])],
        ["shard side: ``ShardVerifier.verify_bytes``", fmt(r["verify_bytes"])],
        ["  of which the Ed25519 verification", fmt(r["ed25519_verify"])],
    ]
    return table(f"Per-connection pieces, CPU µs per operation (ClientHello {r['client_hello_bytes']} bytes, "
                 f"PROXY header {r['proxyv2_header_bytes']} bytes)", ["operation", "µs"], rows)
