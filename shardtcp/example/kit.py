# -*- test-case-name: tests.test_example -*-
"""
The files and the shards behind ``etc/shardtcp.toml``, the example
configuration: ``shardtcp init-example`` and ``shardtcp example-shards``.

:func:`write_example_files` creates everything that configuration names
(keys, certificates, a signed feed, the admin token), and the configuration
itself where it is missing, so an installed copy without the checkout can
run the example too.  :func:`run_example_shards` starts one reference shard
per ``[[service.*.shard]]`` on its configured address, verifying with the
JWKS ``init-example`` wrote, until SIGINT or SIGTERM.

These are example secrets for a laptop: never deploy them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
import time
from importlib import resources
from typing import Callable, Iterable, Optional, TextIO

from shardtcp import keys as keymod
from shardtcp.example.pki import CertificateAuthority

#: The example configuration as the package carries it (a copy of
#: ``etc/shardtcp.toml``; a test keeps the two identical).
CONFIG_NAME = "shardtcp.toml"
#: The key id the example configuration signs with.
KID = "policy-1"
#: What the example's shards answer: an HTTP response whose body is the
#: verified hello line, so curl shows it.
BEHAVIOUR = "http"


def example_config_text() -> str:
    """The example configuration the package carries."""
    return resources.files("shardtcp.example").joinpath(CONFIG_NAME).read_text("utf-8")


def write_example_files(directory: str, *, now: Optional[float] = None) -> list:
    """
    Create every file the example configuration names, inside
    ``directory``: ``shardtcp.toml`` itself (when missing), the policy
    signing key ``keys/policy-1.pem`` and the shards' ``keys/jwks.json``,
    the edge, clients and shards CAs with their certificates (one per
    shard, valid for the names clients ask for, and one client certificate
    to try mTLS with), the feed signing key's JWKS and a signed sample feed,
    the admin token and the state folder.  Existing files are left alone.
    Returns the paths written.
    """
    from shardtcp.resolver.feeds import sign_feed

    now = time.time() if now is None else now
    written = []
    os.makedirs(directory, exist_ok=True)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(config_path):
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(example_config_text())
        written.append(config_path)
    keys_dir = os.path.join(directory, "keys")
    certs_dir = os.path.join(directory, "certs")
    for folder in (keys_dir, certs_dir, os.path.join(directory, "feeds"), os.path.join(directory, "state")):
        os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(keys_dir, f"{KID}.pem")):
        paths = keymod.generate_keypair(keys_dir, kid=KID)
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
        written += edge.issue_server(["www.example.test", "example.test"]).write(certs_dir, "www")
        written += edge.issue_server(["default.example.test"]).write(certs_dir, "default")
    clients = ca_files("clients-ca", "shardtcp example clients CA")
    if clients is not None:
        written += clients.issue_client("orders-client", uri="spiffe://example.test/orders").write(certs_dir, "client")
    shards = ca_files("shards-ca", "shardtcp example shards CA")
    if shards is not None:
        # api shards get the client's own TLS through the passthrough
        # listener, so their certificates carry the names clients ask for.
        for shard_id in ("api-fra-1", "api-ams-1"):
            names = ["api.example.test", "*.api.example.test", f"{shard_id}.shards.test"]
            written += shards.issue_server(names, common_name=shard_id).write(certs_dir, shard_id)
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


class ExampleShardsError(Exception):
    """The example's shards cannot start; the message says why, in one line."""


def _interface(host: str) -> str:
    """An IP literal to listen on for a configured shard host."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as e:
        raise ExampleShardsError(f"cannot resolve {host!r}: {e}") from e


def start_example_shards(config_path: str, reactor) -> list:
    """
    Listen with one reference shard per shard of ``config_path``; return
    ``(shard_id, listening_port, tls)`` triples.  A shard speaks TLS when
    ``certs/<id>.pem`` and ``.key`` exist next to the configuration (as
    ``init-example`` writes them for the api shards); it trusts the
    ``keys/jwks.json`` written there.  Raises ``ExampleShardsError``,
    having closed what it opened, when one cannot start.
    """
    from twisted.internet.error import CannotListenError

    from shardtcp.backend import ShardVerifier
    from shardtcp.config import ConfigError, load_config
    from shardtcp.example.shard import shard_factory, tls_options

    folder = os.path.dirname(os.path.abspath(config_path))
    jwks = os.path.join(folder, "keys", "jwks.json")
    try:
        # The shards need none of the proxy's own files, only the JWKS.
        config = load_config(config_path, check_files=False)
    except ConfigError as e:
        raise ExampleShardsError(f"{config_path} is not valid:\n  " + "\n  ".join(e.problems)) from e
    if not os.path.exists(jwks):
        raise ExampleShardsError(f"{jwks} is missing: run `shardtcp init-example {folder}` first")
    started: list = []
    try:
        for service in config.services:
            for shard in service.shards:
                try:
                    verifier = ShardVerifier.from_jwks(shard.id, jwks, tlv_type=config.signing.tlv_type)
                except (OSError, ValueError) as e:
                    raise ExampleShardsError(f"{jwks}: {e} (run: shardtcp init-example {folder})") from e
                cert = os.path.join(folder, "certs", f"{shard.id}.pem")
                key = os.path.join(folder, "certs", f"{shard.id}.key")
                tls = tls_options(cert, key) if os.path.exists(cert) and os.path.exists(key) else None
                factory = shard_factory(shard.id, verifier, tls=tls, reactor=reactor, behaviour=BEHAVIOUR)
                try:
                    port = reactor.listenTCP(
                        shard.address.port, factory, interface=_interface(shard.address.host)
                    )
                except CannotListenError as e:
                    reason = e.socketError.strerror if getattr(e.socketError, "strerror", None) else e.socketError
                    raise ExampleShardsError(f"shard {shard.id}: cannot listen on {shard.address}: {reason}") from e
                started.append((shard.id, port, tls is not None))
    except BaseException:
        for _, port, _ in started:
            port.stopListening()
        raise
    return started


def run_example_shards(config_path: str, *, out: Optional[TextIO] = None) -> int:
    """
    The ``example-shards`` subcommand: start the shards, log to ``out``
    (one ``listening`` line per shard, then one ``accepted`` line per
    verified connection), run until SIGINT or SIGTERM; return the exit
    status (0 when stopped by a signal, 1 when the shards cannot start).
    """
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    out = sys.stderr if out is None else out
    try:
        started = start_example_shards(config_path, reactor)
    except ExampleShardsError as e:
        print(f"shardtcp example-shards: {e}", file=out)
        return 1
    globalLogBeginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)
    for shard_id, port, tls in started:
        address = port.getHost()
        print(
            f"shard {shard_id} listening on {address.host}:{address.port} ({BEHAVIOUR}, {'TLS' if tls else 'plain'})",
            file=out,
        )
    out.flush()
    reactor.run()
    return 0


def twistd_plugin_problem(plugins: Optional[Callable[[], Iterable]] = None) -> Optional[str]:
    """
    ``None`` when twistd, run by this Python, finds the ``shardtcp``
    plugin; else a line saying what to do.  twistd finds plugins by
    scanning ``sys.path`` for ``twisted/plugins`` folders, so an install
    that reaches the package through an import hook (an editable install
    made without a ``.pth`` path) hides it.  ``plugins`` lists the
    ``IServiceMaker`` plugins (default: Twisted's plugin scan).
    """
    if plugins is None:
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        def plugins():
            return getPlugins(IServiceMaker)

    if any(getattr(maker, "tapname", None) == "shardtcp" for maker in plugins()):
        return None
    return (
        "twistd cannot find the shardtcp plugin from this installation and will say "
        "'Unknown command: shardtcp': reinstall with `pip install -e .` from a current checkout "
        "(or `pip install .`), or run twistd with the checkout on PYTHONPATH"
    )
