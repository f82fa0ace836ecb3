"""
The processes a bench run measures, and their configurations.

direct
    no proxy: the client reaches the backend itself.
shardtcp
    ``twistd -n shardtcp --config FILE`` from a TOML file written here (the
    SPEC's configuration keys only), logging one line per connection to a
    file as a deployed proxy does.
haproxy, haproxy-splice
    ``haproxy -db -f FILE``, TCP mode, one thread (shardtcp runs on one),
    ``send-proxy-v2``; the splice variant adds ``option splice-request`` and
    ``option splice-response``.
portforward
    ``twistd -n portforward``: Twisted's stock port forwarder, the floor of
    what a Python proxy on Twisted costs (no peek, no header, no logging).

Every target is started through ``Lab.spawn``, so ``Lab.close`` stops it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Iterable, Optional

import attrs

from bench.lab import SERVICE_NAME, BenchError, Lab, bin_path, free_port, readline_bounded

# What a client of a plain shardtcp listener sends first (consumed by the proxy).
PLAIN_PREAMBLE = f"SHARD {SERVICE_NAME}\n".encode()
ECHO_NAME = "echo.localhost"
ECHO_PREAMBLE = f"SHARD {ECHO_NAME}\n".encode()


@attrs.frozen
class Target:
    """A place the client connects to; ``pid`` is the proxy's (``None`` for direct)."""

    name: str
    port: int
    pid: Optional[int]
    process: Optional[subprocess.Popen] = attrs.field(default=None, eq=False, repr=False)
    preamble: bytes = b""


@attrs.frozen
class Shard:
    """One ``[[service.api.shard]]`` table of a generated configuration."""

    id: str
    address: str
    lat: float = 50.11
    lon: float = 8.68


def haproxy_path() -> str:
    path = shutil.which("haproxy")
    if path is None:
        raise BenchError("haproxy is not installed (apt-get install haproxy): the runs compare against it")
    return path


# -- the bench backend (TLS or plain) --------------------------------------


def start_backend(lab: Lab, name: str, tls: bool) -> Target:
    """``bench/backend.py`` as a process; its pid is the backend's, not a proxy's."""
    argv = [sys.executable, os.path.join(os.path.dirname(__file__), "backend.py")]
    if tls:
        argv += ["--cert", lab.cert, "--key", lab.key]
    process = lab.spawn(name, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = readline_bounded(process, 30.0)
    if not line.startswith("PORT "):
        raise BenchError(f"{name} did not start ({line!r}): {lab.output(name)}")
    return Target("direct", int(line.split()[1]), None, process)


# -- an HTTPS backend for wrk ----------------------------------------------

_HTTPS_BACKEND = """\
global
    maxconn 4000
    nbthread 1

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend https
    bind 127.0.0.1:{plain} ssl crt {crt}
    bind 127.0.0.1:{proxied} accept-proxy ssl crt {crt}
    http-request return status 200 content-type text/plain string "ok"
"""


@attrs.frozen
class HttpsBackend:
    """HAProxy answering ``200 ok`` over HTTPS: ``plain`` port, and ``proxied`` port that requires a PROXY header."""

    plain: int
    proxied: int


def start_https_backend(lab: Lab) -> HttpsBackend:
    plain, proxied = free_port(), free_port()
    config = _write(lab, "https-backend.cfg", _HTTPS_BACKEND.format(plain=plain, proxied=proxied, crt=lab.cert_and_key))
    process = _start_haproxy(lab, "https-backend", config)
    lab.wait_listening("https-backend", process, plain)
    lab.wait_listening("https-backend", process, proxied)
    return HttpsBackend(plain, proxied)


# -- shardtcp ----------------------------------------------------------------


def shardtcp_config(lab: Lab, listeners: Iterable[str], shards: Iterable[Shard], echo: Optional[str] = None) -> str:
    """
    A configuration for ``twistd shardtcp`` / ``shardtcp check-config``:
    the bench's signing key, the given ``[[listener]]`` tables and one
    service ``api`` named ``SERVICE_NAME`` with ``shards``; with ``echo``
    (a shard's ``host:port``) also a service ``echo`` named ``ECHO_NAME``.
    """
    parts = [
        "[proxy]",
        'id = "edge-bench-1"',
        'location = { lat = 50.11, lon = 8.68, region = "eu-central" }',
        "",
        "[signing]",
        f'private_key = "{lab.keys.private_key}"',
        f'kid = "{lab.keys.kid}"',
        'ttl = "30s"',
        "",
    ]
    parts.extend(listeners)
    parts += [
        "[service.api]",
        f'names = ["{SERVICE_NAME}"]',
        "",
        "[service.api.policy]",
        'acl = ["orders:read"]',
        "",
    ]
    for shard in shards:
        parts += [
            "[[service.api.shard]]",
            f'id = "{shard.id}"',
            f'address = "{shard.address}"',
            f'location = {{ lat = {shard.lat}, lon = {shard.lon}, region = "eu-central" }}',
            "capacity = 100000",
            "security_score = 90",
            "",
        ]
    if echo is not None:
        parts += ["[service.echo]", f'names = ["{ECHO_NAME}"]', "",
                  "[[service.echo.shard]]", 'id = "echo-1"', f'address = "{echo}"', ""]
    parts += [
        "[geo]",
        'networks = [ { cidr = "198.51.100.0/24", lat = 40.71, lon = -74.0, region = "us-east" } ]',
        "",
    ]
    return "\n".join(parts)


def listener(name: str, port: int, mode: str) -> str:
    """A ``[[listener]]`` table: passthrough routes on the SNI, plain on a ``SHARD`` line (``PLAIN_PREAMBLE``)."""
    lines = [
        "[[listener]]",
        f'name = "{name}"',
        f'listen = "tcp:{port}:interface=127.0.0.1:backlog=1024"',
        f'mode = "{mode}"',
        'connect_timeout = "5s"',
    ]
    if mode == "plain":
        lines += ['identify = ["line"]']
    else:
        lines += ['identify = ["sni"]']
    return "\n".join(lines) + "\n"


def many_shards(count: int) -> list[Shard]:
    """``count`` shards on distinct loopback addresses, spread over Europe and beyond."""
    if not 1 <= count <= 40_000:
        raise BenchError(f"{count} shards is outside 1..40000")
    # Port 9 on addresses of 127.3.0.0/16, where nothing listens: a
    # connection that gets that far is refused at once.
    return [Shard(f"api-{i}", f"127.3.{i // 250}.{i % 250 + 1}:9", 40 + i % 20, -10 + i % 40) for i in range(count)]


def start_shardtcp(lab: Lab, name: str, config_text: str, port: int, timeout: float = 30.0,
                   nofile: int = 0) -> tuple[Target, float]:
    """
    ``twistd -n shardtcp --config FILE``; returns the target and the seconds
    until ``port`` listened.  With ``nofile``, under ``prlimit`` with that
    many descriptors allowed (soft and hard).
    """
    config = _write(lab, f"{name}.toml", config_text)
    argv = [bin_path("twistd"), "-n", "--pidfile=", "--logfile", lab.path(f"{name}.log"),
            "shardtcp", "--config", config]
    if nofile:
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise BenchError("prlimit (util-linux) is needed to raise the proxy's descriptor limit")
        argv = [prlimit, f"--nofile={nofile}:{nofile}", *argv]
    process = lab.spawn(name, argv)
    seconds = lab.wait_listening(name, process, port, timeout)
    return Target("shardtcp", port, process.pid, process), seconds


# -- HAProxy -----------------------------------------------------------------

# SNI peeked as shardtcp does, PROXY v2 with the TLVs shardtcp also sends
# (UNIQUE_ID, CRC32C), no logging.
_HAPROXY_SNI = """\
global
    maxconn 4000
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend edge
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    unique-id-format %{{+X}}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid
    use_backend api if {{ req.ssl_sni -i {name} }}

backend api
    server bench-shard-1 127.0.0.1:{backend} send-proxy-v2 proxy-v2-options crc32c,unique-id
"""

_HAPROXY_PLAIN = """\
global
    maxconn 4000
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
{splice}
frontend edge
    bind 127.0.0.1:{port}
    unique-id-format %{{+X}}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid
    default_backend api

backend api
    server bench-shard-1 127.0.0.1:{backend} send-proxy-v2 proxy-v2-options crc32c,unique-id
"""

_SPLICE = "    option splice-request\n    option splice-response\n"


def start_haproxy_sni(lab: Lab, backend_port: int) -> Target:
    port = free_port()
    config = _write(lab, "haproxy-sni.cfg", _HAPROXY_SNI.format(port=port, name=SERVICE_NAME, backend=backend_port))
    process = _start_haproxy(lab, "haproxy-sni", config)
    lab.wait_listening("haproxy-sni", process, port)
    return Target("haproxy", port, process.pid, process)


def start_haproxy_plain(lab: Lab, backend_port: int, splice: bool) -> Target:
    name = "haproxy-splice" if splice else "haproxy"
    port = free_port()
    text = _HAPROXY_PLAIN.format(port=port, backend=backend_port, splice=_SPLICE if splice else "")
    process = _start_haproxy(lab, f"{name}-plain", _write(lab, f"{name}-plain.cfg", text))
    lab.wait_listening(f"{name}-plain", process, port)
    return Target(name, port, process.pid, process)


def _start_haproxy(lab: Lab, name: str, config: str) -> subprocess.Popen:
    haproxy = haproxy_path()
    check = subprocess.run([haproxy, "-c", "-q", "-f", config], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise BenchError(f"haproxy refuses {config}: {(check.stderr or check.stdout).strip()}")
    return lab.spawn(name, [haproxy, "-db", "-f", config])


# -- Twisted's portforward ---------------------------------------------------


def start_portforward(lab: Lab, name: str, backend_port: int) -> Target:
    """``twistd -n portforward``: Twisted's ``ProxyFactory``, forwarding to ``backend_port``."""
    port = free_port()
    argv = [bin_path("twistd"), "-n", "--pidfile=", "--logfile", lab.path(f"{name}.log"),
            "portforward", "--port", f"tcp:{port}:interface=127.0.0.1:backlog=1024",
            "--host", "127.0.0.1", "--dest_port", str(backend_port)]
    process = lab.spawn(name, argv)
    lab.wait_listening(name, process, port)
    return Target("portforward", port, process.pid, process)


def _write(lab: Lab, filename: str, text: str) -> str:
    path = lab.path(filename)
    with open(path, "w") as f:
        f.write(text)
    return path
