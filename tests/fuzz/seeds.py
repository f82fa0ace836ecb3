# -*- test-case-name: tests.fuzz.test_fuzz -*-
"""
The seed inputs of each fuzz target: valid and nearly valid examples a
mutating fuzzer starts from.  They are kept as files in
``tests/fuzz/corpus/<target>/`` (``python -m tests.fuzz.run --write-seeds``
writes them again); the tests check that the files and this module agree.
"""

from __future__ import annotations

import os
import ssl

from tests.fuzz import targets
from tests.support import client_hello as _client_hello

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


_CONFIG = b"""\
[proxy]
id = "edge-fuzz-1"
location = { lat = 50.11, lon = 8.68, region = "eu-central" }

[signing]
private_key = "keys/policy-1.pem"
kid = "policy-1"
ttl = "30s"

[[listener]]
name = "edge"
listen = "tcp:0:interface=127.0.0.1"
mode = "passthrough"
identify = ["sni", "connect", "http-host", "line"]
connect_timeout = "2s"

[service.api]
names = ["api.example.test", "*.api.example.test"]

[service.api.policy]
acl = ["orders:read"]
min_security_score = 50
deny = ["192.0.2.0/24"]

[[service.api.shard]]
id = "api-fra-1"
address = "127.0.0.1:9001"
location = { lat = 50.11, lon = 8.68, region = "eu-central" }
capacity = 100
security_score = 90
health_check = { kind = "tcp", interval = "2s", timeout = "1s", rise = 2, fall = 3 }

[geo]
networks = [
  { cidr = "127.0.0.2/32", lat = 40.71, lon = -74.0, region = "us-east" },
]
"""


def _padding_bits(token: bytes) -> bytes:
    """
    ``token`` with the unused low bits of its signature's last base64url
    character set: the same signature bytes, spelled differently.
    """
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1:])
    other = last ^ 1
    return token[:-1] + alphabet[other : other + 1]


def seeds() -> dict[str, dict[str, bytes]]:
    """Every target's seeds, by target and file name (the first byte is the target's mode byte)."""
    hello = _client_hello("api.example.test", ["h2", "http/1.1"])
    return {
        "clienthello": {
            "tls13-sni-alpn": b"\x00" + hello,
            "tls12-no-sni": b"\x00" + _client_hello(None, maximum_version=ssl.TLSVersion.TLSv1_2),
            "split-3": b"\x03\x00\x04\x01" + hello,
        },
        "detect": {
            "sni": b"\x00" + hello,
            "connect": b"\x01" + b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n",
            "line": b"\x02" + b"SHARD api\r\n",
            "http-host": b"\x03" + b"GET /x HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
            "absolute": b"\x04" + b"GET http://[2001:db8::1]:8080/ HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n\r\n",
        },
        "proxy": {
            "v2-signed": b"\x40" + targets.genuine_wire(),
            "v2-local": b"\x20" + bytes.fromhex("0d0a0d0a000d0a515549540a20000000"),
            "v1-tcp4": b"\x10" + b"PROXY TCP4 203.0.113.5 127.0.0.1 40000 443\r\n",
            "v1-tcp6": b"\x10" + b"PROXY TCP6 2001:db8::1 ::1 40000 443\r\n",
            "v1-unknown": b"\x10" + b"PROXY UNKNOWN\r\n",
        },
        "verifier": {
            "genuine": b"\x00" + targets.genuine_wire(),
            "edit-family": b"\x01" + bytes([0, 0, 13, 0x12]),
        },
        "feeds": {
            "genuine": b"\x00" + targets.genuine_feed(),
            "genuine-padded": b"\x00 " + targets.genuine_feed() + b"\n",
            "padding-bits": b"\x00" + _padding_bits(targets.genuine_feed()),
        },
        "config": {
            "full": _CONFIG,
            "superscript-port": _CONFIG.replace(b'"127.0.0.1:9001"', '"127.0.0.1:\u00b2"'.encode()),
            "huge-score": _CONFIG.replace(b"security_score = 90", b"security_score = 1" + b"0" * 400),
            "nested-arrays": _CONFIG.replace(b'ttl = "30s"', b"ttl = " + b"[" * 1000 + b"]" * 1000),
        },
        "agent": {
            "up-ready": b"up ready 75%\n",
            "drain": b"drain 10% # draining for deploy\r\n",
            "down": b"down, maint\n",
            "load": b"0.25\n",
        },
    }


def write_seeds(root: str = CORPUS) -> list[str]:
    """Write every seed file under ``root``; return their paths."""
    written = []
    for target, files in seeds().items():
        folder = os.path.join(root, target)
        os.makedirs(folder, exist_ok=True)
        for name, data in files.items():
            path = os.path.join(folder, name)
            with open(path, "wb") as f:
                f.write(data)
            written.append(path)
    return written


def read_corpus(target: str, root: str = CORPUS) -> list[bytes]:
    """Every input in ``root/<target>/`` (seeds, and whatever a longer run kept)."""
    folder = os.path.join(root, target)
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out.append(f.read())
    return out
