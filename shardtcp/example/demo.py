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
said, and prints the commands to try by hand, among them a ``twistd``
command for a second proxy (``twistd.toml``: the same configuration on
another free port) in front of the same shards, which works while the demo
runs.  With ``--check`` it exits
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
# Written by `shardtcp demo` for {role}.
# Run a proxy by hand, while the demo runs (its shards live in the demo
# process), with:  twistd -n shardtcp --config {twistd_path}
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
    the shards; return ``(config_path, ca_path, shard_factories,
    shard_ports)``, the last two keyed by shard id.
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
    shard_ports = {}
    shard_blocks = []
    for shard_id, lat, lon, region, _ in SHARDS:
        issued = ca.issue_server([SERVICE_NAME, f"*.{SERVICE_NAME}", f"{shard_id}.shards.test"], common_name=shard_id)
        cert, key = issued.write(cert_dir, shard_id)
        options = tls_options(cert, key)
        verifier = ShardVerifier.from_jwks(shard_id, jwks)
        factory = shard_factory(shard_id, verifier, tls=options, reactor=reactor)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        factories[shard_id] = factory
        shard_ports[shard_id] = listening.getHost().port
        shard_blocks.append(
            _SHARD.format(id=shard_id, port=listening.getHost().port, lat=lat, lon=lon, region=region)
        )
    config_path = os.path.join(workdir, "demo.toml")
    _write_config(config_path, "the demo's own proxy", port, shard_blocks)
    return config_path, ca_path, factories, shard_ports


def _write_config(path: str, role: str, port: int, shard_blocks: list) -> None:
    twistd_path = os.path.join(os.path.dirname(path), "twistd.toml")
    with open(path, "w") as f:
        f.write(
            _CONFIG.format(
                role=role,
                twistd_path=twistd_path,
                port=port,
                name=SERVICE_NAME,
                shards="\n".join(shard_blocks),
            )
        )


def write_twistd_config(workdir: str, shard_ports: dict, port: Optional[int] = None) -> tuple:
    """
    Write ``twistd.toml`` into ``workdir``: the demo's configuration with
    the listener on ``port`` (default: a port free now), so that a proxy
    run by hand does not collide with the demo's own.  ``shard_ports`` maps
    shard ids to their listening ports.  Returns ``(path, port)``.
    """
    if port is None:
        with socket.socket() as probe_socket:
            probe_socket.bind(("127.0.0.1", 0))
            port = probe_socket.getsockname()[1]
    blocks = []
    for shard_id, lat, lon, region, _ in SHARDS:
        blocks.append(_SHARD.format(id=shard_id, port=shard_ports[shard_id], lat=lat, lon=lon, region=region))
    path = os.path.join(workdir, "twistd.toml")
    _write_config(path, "a proxy run by hand beside the demo's own", port, blocks)
    return path, port


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
    config_path, ca_path, _, shard_ports = prepare(workdir, reactor, port)
    config = load_config(config_path)
    service = build_service(config, reactor)
    try:
        service.startService()
    except Exception as e:  # a port in use, typically
        print(f"shardtcp demo: cannot start the proxy: {e}", file=sys.stderr)
        return 1
    bound = service.listening_port("edge").getHost().port
    twistd_path, twistd_port = write_twistd_config(workdir, shard_ports)
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
            f"  twistd -n shardtcp --config {twistd_path}\n"
            f"      (a second proxy, on 127.0.0.1:{twistd_port}, in front of the same shards; "
            "it needs the demo running)\n"
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

