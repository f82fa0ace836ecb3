"""
``shardtcp demo``: a proxy and three verifying shards on loopback, in one
process, so that a newcomer sees a routed, verified connection at once.

It writes into a work folder: a policy signing key and its JWKS
(``keygen``), a demo CA and one TLS certificate per shard, and a
configuration (``demo.toml``) for the proxy.  The shards are reference
shards (``shardtcp.example.shard``) in three regions that accept a connection
only with a valid PROXY v2 header and PolicyContext, and answer with a line
saying what they verified.  ``[geo]`` places 127.0.0.2 in New York and
127.0.0.3 in Singapore, so the source address picks the region.

The demo then connects through the proxy itself, prints what the shards
said, and prints the commands to try by hand.  With ``--check`` it exits
after that self-check (0 when every connection was routed and verified).
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import tempfile
from typing import Optional

from shardtcp import keys as keymod
from shardtcp.backend import ShardVerifier
from shardtcp.config import load_config
from shardtcp.example.pki import CertificateAuthority
from shardtcp.example.shard import shard_factory, tls_options

SHARDS = (
    # id, lat, lon, region, demo source address placed there by [geo]
    ("api-fra-1", 50.11, 8.68, "eu-central", "127.0.0.1"),
    ("api-nyc-1", 40.71, -74.0, "us-east", "127.0.0.2"),
    ("api-sgp-1", 1.35, 103.82, "ap-southeast", "127.0.0.3"),
)
SERVICE_NAME = "api.example.test"

_CONFIG = """\
# Written by `shardtcp demo`. Run it yourself with:
#   twistd -n shardtcp --config {path}
# (the demo's shards must be running: they live in the demo process).
[proxy]
id = "edge-demo-1"
location = {{ lat = 50.11, lon = 8.68, region = "eu-central" }}

[signing]
private_key = "keys/policy-1.pem"
kid = "policy-1"
ttl = "30s"

[[listener]]
name = "edge"
listen = "tcp:{port}:interface=127.0.0.1"
mode = "passthrough"
identify = ["sni"]
connect_timeout = "2s"

[service.api]
names = ["{name}", "*.{name}"]

[service.api.policy]
acl = ["orders:read", "orders:write"]
min_security_score = 50

{shards}
[geo]
networks = [
  {{ cidr = "127.0.0.2/32", lat = 40.71, lon = -74.0, region = "us-east" }},
  {{ cidr = "127.0.0.3/32", lat = 1.35, lon = 103.82, region = "ap-southeast" }},
]
"""

_SHARD = """\
[[service.api.shard]]
id = "{id}"
address = "127.0.0.1:{port}"
location = {{ lat = {lat}, lon = {lon}, region = "{region}" }}
capacity = 100
security_score = 90
"""


def prepare(workdir: str, reactor, port: int = 0) -> tuple:
    """
    Write keys, certificates and the configuration into ``workdir`` and start
    the shards; return ``(config_path, ca_path, shard_factories)``.
    """
    key_dir = os.path.join(workdir, "keys")
    os.makedirs(key_dir, exist_ok=True)
    if not os.path.exists(os.path.join(key_dir, "policy-1.pem")):
        keymod.generate_keypair(key_dir, kid="policy-1")
    jwks = os.path.join(key_dir, "jwks.json")
    ca = CertificateAuthority("shardtcp demo CA")
    cert_dir = os.path.join(workdir, "certs")
    os.makedirs(cert_dir, exist_ok=True)
    ca_path = ca.write(cert_dir, "ca")
    factories = {}
    shard_blocks = []
    for shard_id, lat, lon, region, _ in SHARDS:
        issued = ca.issue_server([SERVICE_NAME, f"*.{SERVICE_NAME}", f"{shard_id}.shards.test"], common_name=shard_id)
        cert, key = issued.write(cert_dir, shard_id)
        options = tls_options(cert, key)
        verifier = ShardVerifier.from_jwks(shard_id, jwks)
        factory = shard_factory(shard_id, verifier, tls=options, reactor=reactor)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        factories[shard_id] = factory
        shard_blocks.append(
            _SHARD.format(id=shard_id, port=listening.getHost().port, lat=lat, lon=lon, region=region)
        )
    config_path = os.path.join(workdir, "demo.toml")
    with open(config_path, "w") as f:
        f.write(_CONFIG.format(path=config_path, port=port, name=SERVICE_NAME, shards="\n".join(shard_blocks)))
    return config_path, ca_path, factories


def probe(port: int, ca_path: str, source: str = "127.0.0.1", timeout: float = 10.0) -> str:
    """
    Connect through the proxy as a TLS client from ``source``, check the
    shard's certificate against the demo CA, and return the shard's first
    line.  Blocking: run it in a thread.
    """
    context = ssl.create_default_context(cafile=ca_path)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as raw:
        with context.wrap_socket(raw, server_hostname=SERVICE_NAME) as tls:
            line = b""
            while not line.endswith(b"\n"):
                chunk = tls.recv(4096)
                if not chunk:
                    break
                line += chunk
            return line.decode("utf-8", "replace").strip()


def run_demo(port: int = 8443, workdir: Optional[str] = None, check: bool = False) -> int:
    """The ``demo`` subcommand; returns the exit status."""
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from shardtcp.tap import build_service

    workdir = workdir or tempfile.mkdtemp(prefix="shardtcp-demo-")
    os.makedirs(workdir, exist_ok=True)
    config_path, ca_path, _ = prepare(workdir, reactor, port)
    config = load_config(config_path)
    service = build_service(config, reactor)
    try:
        service.startService()
    except Exception as e:  # a port in use, typically
        print(f"shardtcp demo: cannot start the proxy: {e}", file=sys.stderr)
        return 1
    bound = service.listening_port("edge").getHost().port
    if not check:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    outcome = {"status": 0}

    def self_check():
        lines = []
        for _, _, _, region, source in SHARDS:
            try:
                lines.append((region, source, probe(bound, ca_path, source)))
            except OSError as e:
                lines.append((region, source, f"FAILED: {e}"))
        return lines

    def report(results):
        print(f"\nshardtcp demo: proxy on 127.0.0.1:{bound}, work folder {workdir}\n")
        for region, source, line in results:
            print(f"  client {source:<10} (placed in {region:<12}) -> {line}")
            if not line.startswith("SHARD "):
                outcome["status"] = 1
        print(
            "\nTry it yourself:\n"
            f"  openssl s_client -connect 127.0.0.1:{bound} -servername {SERVICE_NAME} "
            f"-CAfile {ca_path} -quiet\n"
            f"  shardtcp explain --config {config_path} --service api --client 127.0.0.2\n"
            f"  twistd -n shardtcp --config {config_path}   # the same proxy, run by twistd\n"
        )
        if check:
            reactor.stop()
        else:
            print("Press Ctrl-C to stop.\n")
        sys.stdout.flush()

    def failed(failure):
        print(f"shardtcp demo: self-check failed: {failure.getErrorMessage()}", file=sys.stderr)
        outcome["status"] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: deferToThread(self_check).addCallbacks(report, failed))
    reactor.run()
    return outcome["status"]


def write_example_files(directory: str, *, now=None) -> list:
    """
    Create every file ``etc/shardtcp.toml`` names, inside ``directory``:
    the policy signing key and shards' JWKS, the edge, clients and shards
    CAs with their certificates (and one client certificate to try mTLS
    with), the feed signing key's JWKS and a signed sample feed, the admin
    token and the state folder.  Existing files are left alone.  Returns
    the paths written.  These are example secrets for a laptop: never
    deploy them.
    """
    import secrets
    import shutil
    import time

    from shardtcp.resolver.feeds import sign_feed

    now = time.time() if now is None else now
    written = []
    keys_dir = os.path.join(directory, "keys")
    certs_dir = os.path.join(directory, "certs")
    for folder in (keys_dir, certs_dir, os.path.join(directory, "feeds"), os.path.join(directory, "state")):
        os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(keys_dir, "policy.pem")):
        paths = keymod.generate_keypair(keys_dir, kid="policy")
        written += [paths.private_key, paths.jwks]
    feed_dir = os.path.join(keys_dir, "feed")
    if not os.path.exists(os.path.join(feed_dir, "feed-1.pem")):
        os.makedirs(feed_dir, exist_ok=True)
        feed_paths = keymod.generate_keypair(feed_dir, kid="feed-1")
        shutil.copyfile(feed_paths.jwks, os.path.join(keys_dir, "feed-jwks.json"))
        written.append(os.path.join(keys_dir, "feed-jwks.json"))

    def ca_files(stem: str, common_name: str):
        if os.path.exists(os.path.join(certs_dir, f"{stem}.pem")):
            return None
        ca = CertificateAuthority(common_name)
        written.append(ca.write(certs_dir, stem))
        return ca

    edge = ca_files("edge-ca", "shardtcp example edge CA")
    if edge is not None:
        written += edge.issue_server(["api.example.test", "*.api.example.test"]).write(certs_dir, "api")
        written += edge.issue_server(["default.example.test"]).write(certs_dir, "default")
    clients = ca_files("clients-ca", "shardtcp example clients CA")
    if clients is not None:
        written += clients.issue_client("orders-client", uri="spiffe://example.test/orders").write(certs_dir, "client")
    shards = ca_files("shards-ca", "shardtcp example shards CA")
    if shards is not None:
        written += shards.issue_client("edge-fra-1").write(certs_dir, "proxy")
        for shard_id in ("api-fra-1", "api-ams-1"):
            written += shards.issue_server([f"{shard_id}.shards.test"], common_name=shard_id).write(certs_dir, shard_id)
    feed_path = os.path.join(directory, "feeds", "threat.jws")
    if not os.path.exists(feed_path):
        claims = {
            "iss": "example-intel",
            "iat": int(now),
            "exp": int(now) + 7 * 86400,
            "seq": 1,
            "shards": {"api-ams-1": 70},
            "deny": ["192.0.2.0/24"],
        }
        token = sign_feed(claims, keymod.load_private_key(os.path.join(feed_dir, "feed-1.pem")), "feed-1")
        with open(feed_path, "wb") as f:
            f.write(token + b"\n")
        written.append(feed_path)
    token_path = os.path.join(directory, "admin.token")
    if not os.path.exists(token_path):
        keymod.write_atomically(token_path, (secrets.token_urlsafe(32) + "\n").encode("ascii"), mode=0o600)
        written.append(token_path)
    return [str(p) for p in written]
