# -*- test-case-name: tests.fuzz.test_fuzz -*-
"""
The fuzz targets: one function per parser or verifier, taking one input
(bytes) and raising ``AssertionError`` when the input breaks a promise.

The same functions serve the Hypothesis tests (``tests.fuzz.test_fuzz``,
run by ``trial tests``) and the longer coverage-guided run
(``python -m tests.fuzz.run TARGET``, with atheris).  What every target
checks: only the module's documented exception types escape, within a
bounded time (``within``); the ClientHello and PROXY parsers also give the
same answer however the input is split; the shard verifier and the feed
validator never accept anything but what the trusted key signed.

Each target imports only the public names listed in ``PUBLIC_NAMES``, so
that it keeps working while the modules behind them are reshaped.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import struct
import tempfile
from typing import Callable, Iterator, Optional

import google_crc32c
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shardtcp import proxyv2
from shardtcp.backend import ShardVerifier, VerificationError
from shardtcp.config import ConfigError, load_config
from shardtcp.identify.clienthello import ClientHelloError, ClientHelloParser
from shardtcp.identify.detect import Detector, IdentifyError
from shardtcp.keys import generate_keypair
from shardtcp.policy import PolicyContext, PolicySigner
from shardtcp.proxyv2 import HeaderParser, InvalidProxyHeader, ProxyHeader
from shardtcp.resolver.agent import AgentReplyError, parse_agent_reply
from shardtcp.resolver.feeds import FeedRejected, FeedState, FeedValidator, sign_feed

# The preamble methods (connect, line, http-host) are part of what a
# Detector may choose; importing their module makes sure they are there.
importlib.import_module("shardtcp.identify.preamble")

#: The public names each target depends on (also listed in docs/security.rst).
PUBLIC_NAMES = {
    "clienthello": ["shardtcp.identify.clienthello.ClientHelloParser", "ClientHelloError"],
    "detect": ["shardtcp.identify.detect.Detector", "IdentifyError", "shardtcp.identify.preamble"],
    "proxy": ["shardtcp.proxyv2.HeaderParser", "InvalidProxyHeader"],
    "verifier": [
        "shardtcp.backend.ShardVerifier", "VerificationError",
        "shardtcp.policy.PolicySigner", "PolicyContext",
        "shardtcp.proxyv2.ProxyHeader", "encode", "PP2_TYPE_*",
    ],
    "feeds": ["shardtcp.resolver.feeds.FeedValidator", "FeedState", "FeedRejected", "sign_feed"],
    "config": ["shardtcp.config.load_config", "ConfigError", "shardtcp.keys.generate_keypair"],
    "agent": ["shardtcp.resolver.agent.parse_agent_reply", "AgentReplyError"],
}


class TookTooLong(AssertionError):
    """A target spent longer on one input than its bound."""


_ALARM = True


def use_alarm(enabled: bool) -> None:
    """
    Whether ``within`` arms ``SIGALRM`` (the default); the atheris runner
    turns it off because libFuzzer bounds each input with that signal itself.
    """
    global _ALARM
    _ALARM = enabled


@contextlib.contextmanager
def within(seconds: float, what: str) -> Iterator[None]:
    """
    Fail with ``TookTooLong`` if the block runs longer than ``seconds``
    (wall clock, by ``SIGALRM``: only in the main thread, where trial and
    the fuzz runner call the targets).  A hang is a finding like a crash.
    """
    if not _ALARM:
        yield
        return

    def expired(signum, frame):
        raise TookTooLong(f"{what}: still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


#: Per-input bound for the pure parsers, and for the config loader (which
#: reads files the configuration names).
PARSER_SECONDS = 2.0
CONFIG_SECONDS = 5.0


def _cuts(data: bytes, control: bytes) -> list[bytes]:
    """Split ``data`` into chunks whose sizes ``control`` chooses (1..16 bytes, then the rest)."""
    chunks, start = [], 0
    for byte in control:
        if start >= len(data):
            break
        size = byte % 16 + 1
        chunks.append(data[start : start + size])
        start += size
    if start < len(data):
        chunks.append(data[start:])
    return chunks


def _split(data: bytes) -> tuple[bytes, bytes]:
    """The first byte chooses how much of the input is control bytes for ``_cuts``."""
    if not data:
        return b"", b""
    n = data[0] % 8
    return data[1 : 1 + n], data[1 + n :]


def _feed_all(feed: Callable[[bytes], object], chunks: list[bytes], errors: tuple) -> tuple:
    """Feed chunks until an answer: ("ok", result), ("error", reason) or ("more", None)."""
    try:
        for chunk in chunks:
            result = feed(chunk)
            if result is not None:
                return ("ok", result)
    except errors as e:
        return ("error", type(e).__name__, getattr(e, "reason", None))
    return ("more", None)


# ---------------------------------------------------------------------------
# ClientHello


def clienthello(data: bytes) -> None:
    """
    ``ClientHelloParser.feed`` raises only ``ClientHelloError``, and the
    answer (info, error type and reason, or "more") is the same for the
    whole input in one call and split into small chunks.
    """
    control, body = _split(data)
    with within(PARSER_SECONDS, "ClientHelloParser"):
        whole = _feed_all(ClientHelloParser(max_size=16384).feed, [body], (ClientHelloError,))
        pieces = _feed_all(ClientHelloParser(max_size=16384).feed, _cuts(body, control), (ClientHelloError,))
    assert whole == pieces, f"one call gave {whole!r}, chunks gave {pieces!r}"


# ---------------------------------------------------------------------------
# Preamble detector

_METHOD_SETS = (
    ("sni",),
    ("connect",),
    ("line",),
    ("http-host",),
    ("sni", "connect", "http-host", "line"),
    ("connect", "http-host", "line"),
    ("sni", "line"),
    ("sni", "http-host"),
)


def detect(data: bytes) -> None:
    """``Detector.feed`` raises only ``IdentifyError``, whatever the methods and the split."""
    control, body = _split(data)
    methods = _METHOD_SETS[data[0] % len(_METHOD_SETS)] if data else ("sni",)
    with within(PARSER_SECONDS, "Detector"):
        detector = Detector(methods, max_client_hello=16384, max_preamble=8192)
        _feed_all(detector.feed, _cuts(body, control), (IdentifyError,))


# ---------------------------------------------------------------------------
# PROXY v1/v2


def proxy(data: bytes) -> None:
    """
    ``HeaderParser.feed`` raises only ``InvalidProxyHeader`` (v1 and v2,
    with and without a required CRC32C), and gives the same header or the
    same refusal for the input in one call and in chunks.
    """
    control, body = _split(data)
    mode = data[0] if data else 0
    options = dict(
        accept_v1=bool(mode & 0x10) or not mode & 0x20,
        accept_v2=bool(mode & 0x20) or not mode & 0x10,
        require_crc32c=bool(mode & 0x40),
    )
    with within(PARSER_SECONDS, "HeaderParser"):
        whole = _feed_all(HeaderParser(**options).feed, [body], (InvalidProxyHeader,))
        pieces = _feed_all(HeaderParser(**options).feed, _cuts(body, control), (InvalidProxyHeader,))
    assert whole == pieces, f"one call gave {whole!r}, chunks gave {pieces!r}"


# ---------------------------------------------------------------------------
# Shard verifier

#: A fixed, test-only signing key, so that the seed corpus can hold a
#: header signed by it.
_FUZZ_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
_KID = "fuzz-1"
SHARD = "api-fuzz-1"
NOW = 1_800_000_000.0
CLIENT = ("203.0.113.7", 40000)
PROXY_ADDRESS = ("198.51.100.1", 443)
CONNECTION_ID = "0123456789abcdef0123456789abcdef"
TLV_POLICY = 0xE0
_ORIGINAL_TOKEN: Optional[bytes] = None


def genuine_token() -> bytes:
    """The PolicyContext token the trusted key signed for the one genuine connection."""
    global _ORIGINAL_TOKEN
    if _ORIGINAL_TOKEN is None:
        signer = PolicySigner(_FUZZ_KEY, kid=_KID, issuer="edge-fuzz", ttl=30, now=lambda: NOW)
        _ORIGINAL_TOKEN = signer.sign(
            policy=PolicyContext(
                encryption_level="tls", authentication_method=("mtls",), access_control_list=("orders:read",)
            ),
            audience=SHARD,
            connection_id=CONNECTION_ID,
            service="api",
            source=CLIENT,
            destination=PROXY_ADDRESS,
            sni="api.example.test",
        )
    return _ORIGINAL_TOKEN


def genuine_tlvs() -> list:
    """The TLVs of the genuine header, CRC32C last (its value filled in by ``with_crc``)."""
    return [
        (proxyv2.PP2_TYPE_ALPN, b"h2"),
        (proxyv2.PP2_TYPE_AUTHORITY, b"api.example.test"),
        (proxyv2.PP2_TYPE_UNIQUE_ID, CONNECTION_ID.encode()),
        (TLV_POLICY, genuine_token()),
        (proxyv2.PP2_TYPE_CRC32C, b"\0\0\0\0"),
    ]


def with_crc(wire: bytes) -> bytes:
    """
    ``wire`` with its trailing CRC32C TLV value recomputed (what an
    attacker who edits a header can always do), when it ends in one.
    """
    if len(wire) < 23 or wire[-7:-4] != bytes([proxyv2.PP2_TYPE_CRC32C, 0, 4]):
        return wire
    zeroed = wire[:-4] + b"\0\0\0\0"
    return zeroed[:-4] + struct.pack("!I", google_crc32c.value(zeroed))


def genuine_wire() -> bytes:
    """The genuine header on the wire, as the proxy would send it."""
    header = ProxyHeader(command=proxyv2.Command.PROXY, source=CLIENT, destination=PROXY_ADDRESS, tlvs=genuine_tlvs())
    return with_crc(proxyv2.encode(header, crc32c=False))


def fresh_verifier() -> ShardVerifier:
    """A shard that trusts only the fuzz key, on a clock stopped at ``NOW`` (with an empty replay cache)."""
    return ShardVerifier(SHARD, {_KID: _FUZZ_KEY.public_key()}, now=lambda: NOW)


def _check_verified(wire: bytes) -> None:
    """Verify ``wire`` with a fresh verifier; anything accepted must be the genuine connection."""
    verifier = fresh_verifier()
    try:
        verified, _rest = verifier.verify_bytes(wire)
    except VerificationError:
        return
    header = verified.header
    problems = []
    if wire[12] & 0x0F != 0x01 or wire[13] not in (0x11, 0x21):
        problems.append(f"version/command {wire[12]:#04x}, family/transport {wire[13]:#04x}: not PROXY over STREAM INET/INET6")
    if (verified.client, verified.destination) != (CLIENT, PROXY_ADDRESS):
        problems.append(f"addresses {verified.client} -> {verified.destination}")
    if verified.connection_id != CONNECTION_ID or header.get(proxyv2.PP2_TYPE_UNIQUE_ID) != CONNECTION_ID.encode():
        problems.append(f"connection id {verified.connection_id!r}")
    if header.get(TLV_POLICY) != genuine_token():
        problems.append("a token other than the one signed")
    if verified.shard_id != SHARD or verified.service != "api":
        problems.append(f"shard {verified.shard_id!r}, service {verified.service!r}")
    assert not problems, "forged header accepted: " + "; ".join(problems) + f"\nwire: {wire.hex()}"
    # The same connection id a second time is a replay.
    try:
        verifier.verify_bytes(wire)
    except VerificationError as e:
        assert e.reason == "replay", f"second use refused as {e.reason!r}, not replay"
    else:
        raise AssertionError(f"the same header was accepted twice\nwire: {wire.hex()}")


def apply_edits(base: bytes, edits: bytes) -> bytes:
    """
    Edit ``base`` by ``edits``, read three bytes at a time: (op, position
    high, position low) then, for a write, one value byte.  op % 4: 0
    overwrite a byte, 1 insert a byte, 2 delete a byte, 3 truncate.
    """
    out = bytearray(base)
    i = 0
    while i + 3 <= len(edits) and out:
        op, position = edits[i] % 4, ((edits[i + 1] << 8) | edits[i + 2]) % (len(out) + 1)
        i += 3
        if op in (0, 1):
            if i >= len(edits):
                break
            value = edits[i]
            i += 1
            if op == 0 and position < len(out):
                out[position] = value
            else:
                out.insert(position, value)
        elif op == 2 and position < len(out):
            del out[position]
        elif op == 3:
            del out[max(position, 1):]
    return bytes(out)


def verifier(data: bytes) -> None:
    """
    ``ShardVerifier.verify_bytes`` raises only ``VerificationError``, and
    accepts nothing but the header the proxy signed: the first byte picks
    the input as raw bytes (even) or as edits of the genuine header whose
    CRC32C is then recomputed (odd).
    """
    if data and data[0] % 2:
        wire = with_crc(apply_edits(genuine_wire(), data[1:]))
    else:
        wire = data[1:]
    with within(PARSER_SECONDS, "ShardVerifier"):
        _check_verified(wire)


# ---------------------------------------------------------------------------
# Feeds

FEED_KID = "intel-fuzz-1"
_FEED_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
FEED_CLAIMS = {
    "iss": "intel.example",
    "iat": int(NOW) - 60,
    "exp": int(NOW) + 3600,
    "seq": 42,
    "shards": {"api-fra-1": 35, "api-nyc-1": 90.5},
    "deny": ["203.0.113.0/24", "2001:db8::/48"],
}
_GENUINE_FEED: Optional[bytes] = None


def feed_key() -> Ed25519PrivateKey:
    """The trusted feed key (test-only)."""
    return _FEED_KEY


def genuine_feed() -> bytes:
    """The one feed the trusted key signed."""
    global _GENUINE_FEED
    if _GENUINE_FEED is None:
        _GENUINE_FEED = sign_feed(FEED_CLAIMS, _FEED_KEY, FEED_KID)
    return _GENUINE_FEED


def feed_validator(now: float = NOW) -> FeedValidator:
    """A validator trusting only the feed key, with no history, at ``now``."""
    return FeedValidator({FEED_KID: _FEED_KEY.public_key()}, now=lambda: now, state=FeedState(None))


def feeds(data: bytes) -> None:
    """
    ``FeedValidator.validate`` raises only ``FeedRejected``, and accepts
    nothing but the very bytes the trusted key signed (surrounding
    whitespace aside): the first byte picks raw bytes (even) or edits of
    the genuine feed (odd).
    """
    if data and data[0] % 2:
        raw = apply_edits(genuine_feed(), data[1:])
    else:
        raw = data[1:]
    with within(PARSER_SECONDS, "FeedValidator"):
        try:
            feed = feed_validator().validate(raw)
        except FeedRejected:
            return
    assert raw.strip() == genuine_feed(), f"forged feed accepted: {raw!r}"
    assert feed.seq == FEED_CLAIMS["seq"] and feed.issuer == FEED_CLAIMS["iss"]


# ---------------------------------------------------------------------------
# Configuration


_CONFIG_DIRECTORY: Optional[str] = None


def config_directory() -> str:
    """
    A folder (removed at exit) holding ``keys/policy-1.pem`` and
    ``keys/policy-1.jwks.json``, so that a configuration naming them can
    load completely; each input is written there as ``shardtcp.toml``.
    """
    global _CONFIG_DIRECTORY
    if _CONFIG_DIRECTORY is None:
        import atexit
        import shutil

        directory = tempfile.mkdtemp(prefix="shardtcp-fuzz-")
        atexit.register(shutil.rmtree, directory, True)
        generate_keypair(os.path.join(directory, "keys"), kid="policy-1")
        _CONFIG_DIRECTORY = directory
    return _CONFIG_DIRECTORY


def config(data: bytes) -> None:
    """
    ``load_config`` on the input as a TOML file returns a configuration
    or raises ``ConfigError``, and nothing else, within ``CONFIG_SECONDS``;
    each problem it lists is one line.
    """
    path = os.path.join(config_directory(), "shardtcp.toml")
    with open(path, "wb") as f:
        f.write(data)
    with within(CONFIG_SECONDS, "load_config"):
        try:
            load_config(path)
        except ConfigError as e:
            for problem in getattr(e, "problems", ()):
                assert "\n" not in str(problem), f"a problem spans several lines: {problem!r}"


# ---------------------------------------------------------------------------
# Agent replies


def agent(data: bytes) -> None:
    """``parse_agent_reply`` raises only ``AgentReplyError``, given bytes or the same as text."""
    with within(PARSER_SECONDS, "parse_agent_reply"):
        try:
            parse_agent_reply(data)
        except AgentReplyError:
            pass
        try:
            parse_agent_reply(data.decode("utf-8", "surrogateescape"))
        except AgentReplyError:
            pass


#: Every target by name (the names of the corpus folders).
TARGETS: dict[str, Callable[[bytes], None]] = {
    "clienthello": clienthello,
    "detect": detect,
    "proxy": proxy,
    "verifier": verifier,
    "feeds": feeds,
    "config": config,
    "agent": agent,
}
