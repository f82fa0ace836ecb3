"""
Signed threat-intelligence feeds (SPEC §5): security scores and denied
client networks, published by a trusted party and applied while they last.

A feed is a compact JWS signed with EdDSA (Ed25519) by a key of the
``[threat_intel] trusted_keys`` JWKS, found through the header's ``kid``.
Its claims::

    {"iss": "intel.example", "iat": 1767225600, "exp": 1767229200,
     "seq": 42, "shards": {"api-fra-1": 35}, "deny": ["203.0.113.0/24"]}

The parts, from the bottom up:

* ``parse_claims`` is the schema: one function used both when a feed is
  received and when ``sign_feed`` signs one, so an operator cannot sign a
  feed the proxy would refuse.
* ``FeedValidator.validate`` checks one received document, cheapest and
  least trusting checks first: size (before any parsing), JWS structure,
  algorithm, ``kid``, signature, schema, time, ``seq``.  Each refusal is a
  ``FeedRejected`` whose ``reason`` is a stable slug (``REASONS``).
* ``FeedState`` remembers, per issuer, the last accepted ``seq`` (and that
  feed itself) in a state file written atomically, so that neither a replay
  nor a restart can bring an older feed back.
* ``ThreatIntel`` is the service: it polls each source, applies accepted
  feeds to the ``ShardResolver`` and answers ``denies(ip)`` for the
  connection path.

Rules the service follows (docs/feeds.rst says the same for operators):

* The feed in force for an issuer is the newest one accepted from it,
  whichever source served it.  Feeds of different issuers combine: for a
  shard named by several, the *lowest* score wins (a feed can only make a
  shard look less trustworthy than another feed says, never rescue it);
  deny networks are the union.
* The exact feed last accepted from an issuer may be served again (an
  unchanged file, a mirror, a restart): it is re-applied quietly, not
  counted as a replay.  Any *other* feed must carry a greater ``seq``.
* A rejected feed changes nothing: the last good feed stays in force.
* When an issuer's feed expires, ``on_expiry = "baseline"`` drops it: its
  scores go back to the shards' baselines and its deny networks stop
  applying.  ``"distrust"`` fails closed: while any issuer's last feed has
  expired (and no newer one arrived), every shard scores 0 and that feed's
  deny networks keep applying.
* Unknown claims are ignored, so that feeds can grow new claims; the six
  claims above are all required.

Local files are read synchronously with a size cap: a bounded read of a
local file is shorter than the reactor's other work, and Twisted's own
static file serving does the same.  A feed on a remote filesystem that can
hang belongs behind an http(s) URL, which is fetched with Twisted's
``Agent`` and a size-capped body reader.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
import socket
import time
import urllib.parse
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import TimeoutError as TwistedTimeoutError
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from shardtcp import jws
from shardtcp.keys import JWKSError, load_jwks, load_private_key, write_atomically
from shardtcp.model import Config, FeedSourceConfig
from shardtcp.net import IPNetwork, PrefixTable, parse_network
from shardtcp.resolver.service import UnknownShard

__all__ = [
    "ALGORITHM",
    "FUTURE_LEEWAY",
    "MAX_FEED_SIZE",
    "ON_EXPIRY",
    "REASONS",
    "Feed",
    "FeedRejected",
    "FeedState",
    "FeedStateError",
    "FeedValidator",
    "StateEntry",
    "ThreatIntel",
    "ThreatIntelError",
    "build_threat_intel",
    "parse_claims",
    "sign_feed",
    "sign_feed_file",
]

log = Logger()

#: The largest feed accepted, in bytes, as received (SPEC §5).
MAX_FEED_SIZE = 1024 * 1024

#: The only signature algorithm feeds may use.
ALGORITHM = jws.ALGORITHM

#: How far in the future ``iat`` may lie, in seconds: the publisher's clock
#: and ours may disagree a little, but a feed dated well ahead is suspect.
FUTURE_LEEWAY = 60

#: ``on_expiry`` values.
ON_EXPIRY = ("baseline", "distrust")

#: Every ``FeedRejected.reason``, also the ``reason`` label of
#: ``shardtcp_feed_rejected_total``.
REASONS = (
    "too_large",  # more than MAX_FEED_SIZE bytes
    "malformed",  # not a compact JWS, or its header or claims are not JSON objects
    "unsigned",  # alg "none", or an empty signature
    "bad_algorithm",  # any alg but EdDSA (HS256 and friends included)
    "unknown_kid",  # no trusted key of that kid
    "invalid_signature",  # the signature does not verify with that key
    "invalid_claims",  # a claim is missing or breaks the schema
    "expired",  # exp <= now
    "issued_in_future",  # iat > now + FUTURE_LEEWAY
    "replayed",  # seq equal to the issuer's last, but another feed
    "rolled_back",  # seq lower than the issuer's last
    "unavailable",  # the source could not be read (missing file, HTTP error, timeout)
)

REQUIRED_CLAIMS = ("iss", "iat", "exp", "seq", "shards", "deny")

# Claims are signed by a trusted key but still end up in logs, metric labels
# and refusal messages: keep them printable and short.
_MAX_NAME = 256
_MAX_SEQ = 2**63 - 1
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_STATE_VERSION = 1
_STATE_MAX_SIZE = 64 * 1024 * 1024
_MESSAGE_LIMIT = 300


# ---------------------------------------------------------------------------
# Errors


class FeedRejected(Exception):
    """
    A feed was refused; ``reason`` is one of ``REASONS``, ``message`` says
    what exactly, for logs and for ``shardtcp sign-feed``.
    """

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message or reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class ThreatIntelError(Exception):
    """The threat-intelligence service cannot start (keys or state unusable)."""


class FeedStateError(ThreatIntelError):
    """
    The state file exists but cannot be read or does not hold a valid state.

    Starting anyway would forget the accepted ``seq`` values and let an old
    feed back in, so this stops start-up; the message names the file.
    """


# ---------------------------------------------------------------------------
# The feed and its schema


@attrs.frozen
class Feed:
    """
    One accepted (or, from ``parse_claims``, well-formed) feed.

    ``shards`` is ``((shard_id, score), ...)`` sorted by id; ``deny`` holds
    the networks, IPv4-mapped IPv6 ranges in their IPv4 form.  ``kid``,
    ``digest`` (SHA-256 hex of the compact JWS) and ``token`` are set once
    the feed has been verified.
    """

    issuer: str
    issued_at: int
    expires_at: int
    seq: int
    shards: tuple = ()
    deny: tuple = ()
    kid: str = ""
    digest: str = ""
    token: bytes = attrs.field(default=b"", repr=False)

    @property
    def scores(self) -> dict[str, float]:
        """The shard scores as a dictionary."""
        return dict(self.shards)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _printable_name(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_NAME
        and value.isprintable()
    )


def _invalid(message: str) -> FeedRejected:
    return FeedRejected("invalid_claims", message)


def _parse_network(index: int, text: Any) -> IPNetwork:
    try:
        return parse_network(text)
    except ValueError as e:
        raise _invalid(f"deny[{index}]: {_show(str(e), 120)}") from None


def parse_claims(claims: Any) -> Feed:
    """
    Check a feed's claims against the schema and return them as a ``Feed``.

    ``iss`` a printable non-empty string (at most 256 characters); ``iat``
    and ``exp`` integers (seconds since the epoch) with ``exp > iat``;
    ``seq`` an integer from 0 to 2**63-1; ``shards`` an object mapping
    shard ids (printable non-empty strings) to numbers from 0 to 100;
    ``deny`` a list of CIDR strings without host bits, netmask or zone
    (``shardtcp.net.parse_network``; a bare address is a single host).  Other claims are ignored.  Raises ``FeedRejected`` with
    reason ``invalid_claims``; no time or ``seq`` history is checked here.
    """
    if not isinstance(claims, dict):
        raise FeedRejected("malformed", "the claims are not a JSON object")
    missing = [name for name in REQUIRED_CLAIMS if name not in claims]
    if missing:
        raise _invalid("missing claim(s): " + ", ".join(missing))
    issuer = claims["iss"]
    if not _printable_name(issuer):
        raise _invalid(
            f"iss must be a printable string of 1 to {_MAX_NAME} characters"
        )
    for name in ("iat", "exp"):
        if not jws.numeric_date(claims[name]):
            raise _invalid(
                f"{name} must be an integer from 0 to {jws.MAX_NUMERIC_DATE} "
                "(seconds since the epoch)"
            )
    if claims["exp"] <= claims["iat"]:
        raise _invalid(f"exp {claims['exp']} must be after iat {claims['iat']}")
    seq = claims["seq"]
    if not _is_int(seq) or not 0 <= seq <= _MAX_SEQ:
        raise _invalid("seq must be an integer from 0 to 2**63-1")
    shards = claims["shards"]
    if not isinstance(shards, dict):
        raise _invalid('shards must be an object {"shard-id": score}')
    scores = []
    for shard_id, score in shards.items():
        if not _printable_name(shard_id):
            raise _invalid(f"shards: invalid shard id {_show(shard_id)}")
        # Compared before isfinite: an integer too large for a float would
        # make isfinite raise OverflowError.
        if (
            isinstance(score, bool)
            or not isinstance(score, (int, float))
            or not 0 <= score <= 100
            or not math.isfinite(score)
        ):
            raise _invalid(f"shards[{shard_id!r}] must be a number from 0 to 100, not {_show(score)}")
        scores.append((shard_id, float(score)))
    deny = claims["deny"]
    if not isinstance(deny, list):
        raise _invalid("deny must be a list of CIDR strings")
    networks = tuple(_parse_network(i, text) for i, text in enumerate(deny))
    return Feed(
        issuer=issuer,
        issued_at=claims["iat"],
        expires_at=claims["exp"],
        seq=seq,
        shards=tuple(sorted(scores)),
        deny=networks,
    )


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# Signing


def sign_feed(claims: Mapping[str, Any], private_key: Ed25519PrivateKey, kid: str) -> bytes:
    """
    Sign feed claims as a compact JWS (ASCII bytes), header
    ``{"alg":"EdDSA","kid":kid,"typ":"JWT"}``.

    The claims are checked with ``parse_claims`` first, and the result with
    the size cap, so nothing is signed that the proxy would refuse for its
    form.  Raises ``FeedRejected``, or ``TypeError`` for a key that is not
    Ed25519 and ``ValueError`` for an empty ``kid``.
    """
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"feeds are signed with Ed25519, not {type(private_key).__name__}")
    if not isinstance(kid, str) or not kid:
        raise ValueError("kid must be a non-empty string")
    parse_claims(dict(claims))
    data = jws.sign(claims, private_key, kid=kid)
    if len(data) > MAX_FEED_SIZE:
        raise FeedRejected("too_large", f"the signed feed is {len(data)} bytes, over {MAX_FEED_SIZE}")
    return data


def sign_feed_file(
    feed_json_path: str,
    key_pem_path: str,
    kid: str,
    *,
    now: Optional[Callable[[], float]] = None,
) -> bytes:
    """
    ``shardtcp sign-feed``: sign the claims held in a JSON file.

    The file must hold every claim, ``iat`` and ``exp`` included; a feed
    whose ``exp`` has already passed by ``now()`` (default: the wall clock)
    is refused, since the proxy would refuse it too.  Raises ``OSError``
    (files), ``shardtcp.keys.KeyFileError`` (key), ``FeedRejected``
    (claims) and ``ValueError`` (kid).
    """
    now = now if now is not None else time.time
    with open(feed_json_path, "rb") as f:
        data = f.read(MAX_FEED_SIZE + 1)
    if len(data) > MAX_FEED_SIZE:
        raise FeedRejected("too_large", f"{feed_json_path}: larger than {MAX_FEED_SIZE} bytes")
    claims = _strict_json(data, f"{feed_json_path}")
    feed = parse_claims(claims)
    current = now()
    if feed.expires_at <= current:
        raise FeedRejected(
            "expired", f"exp {feed.expires_at} has already passed (now {int(current)})"
        )
    return sign_feed(claims, load_private_key(key_pem_path), kid)


# ---------------------------------------------------------------------------
# Verification


def _reject_duplicates(pairs: list) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            # Two parsers could pick different values: refuse the ambiguity.
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _strict_json(data: bytes, what: str) -> Any:
    """JSON as RFC 8259 has it: UTF-8, no NaN/Infinity, no duplicate keys."""
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FeedRejected("malformed", f"{what} is not valid JSON: {_show(str(e), 120)}") from None


class FeedValidator:
    """
    Checks received feeds against the trusted keys, the clock and the
    ``FeedState`` (see ``validate``).

    The token is checked by ``shardtcp.jws``, the rules PolicyContext
    tokens obey too (canonical base64url, strict JSON, bounded numbers),
    and each failure maps onto exactly one reason.  ``now``
    returns seconds since the epoch (the reactor's ``seconds`` in service).
    """

    def __init__(
        self,
        trusted_keys: Mapping[str, Ed25519PublicKey],
        *,
        now: Callable[[], float],
        state: Optional["FeedState"] = None,
        max_size: int = MAX_FEED_SIZE,
        leeway: float = FUTURE_LEEWAY,
    ) -> None:
        for kid, key in trusted_keys.items():
            if not isinstance(key, Ed25519PublicKey):
                raise TypeError(f"trusted key {kid!r} is {type(key).__name__}, not Ed25519")
        self._keys = dict(trusted_keys)
        self._now = now
        self.state = state if state is not None else FeedState(None)
        self._max_size = max_size
        self._leeway = leeway

    def validate(self, raw: bytes) -> Feed:
        """
        Return the feed in ``raw`` if it may be applied now; otherwise raise
        ``FeedRejected``.

        In order: at most ``max_size`` bytes (before any parsing;
        surrounding whitespace is then ignored); three base64url segments;
        a header naming ``alg`` EdDSA (``none`` is ``unsigned``, anything
        else ``bad_algorithm``) and a trusted ``kid`` with no ``crit``; a
        valid Ed25519 signature; claims that pass ``parse_claims``; ``exp``
        after now and ``iat`` at most ``leeway`` seconds ahead; and a
        ``seq`` above the issuer's last accepted one, or equal to it for the
        very same feed.  The state is not changed: the caller records the
        feed once it is applied.
        """
        feed = self.verify(raw)
        current = self._now()
        if feed.expires_at <= current:
            raise FeedRejected(
                "expired",
                f"feed of {feed.issuer!r} seq {feed.seq} expired at {feed.expires_at} "
                f"(now {int(current)})",
            )
        if feed.issued_at > current + self._leeway:
            raise FeedRejected(
                "issued_in_future",
                f"feed of {feed.issuer!r} seq {feed.seq} issued at {feed.issued_at}, "
                f"more than {self._leeway:g}s after now ({int(current)})",
            )
        last = self.state.last(feed.issuer)
        if last is not None:
            if feed.seq < last.seq:
                raise FeedRejected(
                    "rolled_back",
                    f"feed of {feed.issuer!r} has seq {feed.seq}, below the last "
                    f"accepted {last.seq}",
                )
            if feed.seq == last.seq and feed.digest != last.digest:
                raise FeedRejected(
                    "replayed",
                    f"feed of {feed.issuer!r} has seq {feed.seq}, already accepted "
                    "for another feed; a new feed needs a greater seq",
                )
        return feed

    def verify(self, raw: bytes) -> Feed:
        """
        Check size, structure, algorithm, key, signature and schema, but not
        time or ``seq``: what a stored feed must still pass at start-up.
        """
        if not isinstance(raw, bytes):
            raise TypeError("a feed is bytes")
        if len(raw) > self._max_size:
            raise FeedRejected("too_large", f"feed of {len(raw)} bytes exceeds {self._max_size}")
        token = raw.strip()
        try:
            verified = jws.verify(token, self._keys, max_size=self._max_size)
        except jws.JWSError as e:
            # A header naming no key names no trusted key.
            reason = "unknown_kid" if e.reason == "no_kid" else e.reason
            raise FeedRejected(reason, e.message) from None
        kid = verified.kid
        feed = parse_claims(verified.claims)
        return attrs.evolve(
            feed, kid=kid, digest=hashlib.sha256(token).hexdigest(), token=token
        )


# ---------------------------------------------------------------------------
# State


@attrs.frozen
class StateEntry:
    """What is remembered of an issuer: its last accepted feed."""

    seq: int
    digest: str
    expires_at: int
    token: bytes = attrs.field(default=b"", repr=False)


class FeedState:
    """
    The last accepted feed of each issuer, kept in a state file.

    ``path`` None keeps it in memory only (a restart forgets it).  The file
    is JSON, ``{"version": 1, "issuers": {"<iss>": {"seq": ..., "digest":
    ..., "exp": ..., "token": "<compact JWS>"}}}``, replaced atomically
    (temporary file, fsync, rename, fsync of the folder) on every change,
    so that a crash leaves the old or the new state, never half of one.

    A missing file is an empty state (first start).  A file that exists but
    cannot be read or parsed raises ``FeedStateError`` from the
    constructor: refusing to start is better than silently forgetting the
    ``seq`` values and accepting an old feed again.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path
        self._entries: dict[str, StateEntry] = {}
        if path is not None:
            self._entries = self._load(path)

    @staticmethod
    def _load(path: str) -> dict[str, StateEntry]:
        try:
            with open(path, "rb") as f:
                data = f.read(_STATE_MAX_SIZE + 1)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise FeedStateError(f"threat_intel.state_file {path}: cannot be read: {e.strerror or e}") from None
        problem = f"threat_intel.state_file {path}: not a valid feed state"
        if len(data) > _STATE_MAX_SIZE:
            raise FeedStateError(f"{problem} (larger than {_STATE_MAX_SIZE} bytes)")
        try:
            document = _strict_json(data, "the state file")
        except FeedRejected as e:
            raise FeedStateError(f"{problem} ({e.message})") from None
        if (
            not isinstance(document, dict)
            or document.get("version") != _STATE_VERSION
            or not isinstance(document.get("issuers"), dict)
        ):
            raise FeedStateError(f'{problem} (expected {{"version": 1, "issuers": {{...}}}})')
        entries = {}
        for issuer, entry in document["issuers"].items():
            if (
                not isinstance(entry, dict)
                or not _is_int(entry.get("seq"))
                or entry["seq"] < 0
                or not isinstance(entry.get("digest"), str)
                or not re.fullmatch(r"[0-9a-f]{64}", entry["digest"])
                or not _is_int(entry.get("exp"))
                or not isinstance(entry.get("token", ""), str)
            ):
                raise FeedStateError(f"{problem} (entry for issuer {_show(issuer)})")
            try:
                token = entry.get("token", "").encode("ascii")
            except UnicodeEncodeError:
                raise FeedStateError(f"{problem} (token of issuer {_show(issuer)})") from None
            entries[issuer] = StateEntry(
                seq=entry["seq"], digest=entry["digest"], expires_at=entry["exp"], token=token
            )
        return entries

    def last(self, issuer: str) -> Optional[StateEntry]:
        """The issuer's last accepted feed, or None."""
        return self._entries.get(issuer)

    def entries(self) -> dict[str, StateEntry]:
        """Every issuer's entry (a copy)."""
        return dict(self._entries)

    def record(self, feed: Feed) -> None:
        """
        Remember ``feed`` as its issuer's last accepted feed, then write the
        file.  Memory is updated even when the write fails (``OSError`` is
        raised then), so this process never goes back.
        """
        entry = StateEntry(
            seq=feed.seq, digest=feed.digest, expires_at=feed.expires_at, token=feed.token
        )
        if self._entries.get(feed.issuer) == entry:
            return
        self._entries[feed.issuer] = entry
        if self.path is not None:
            self._write(self.path)

    def _write(self, path: str) -> None:
        document = {
            "version": _STATE_VERSION,
            "issuers": {
                issuer: {
                    "seq": e.seq,
                    "digest": e.digest,
                    "exp": e.expires_at,
                    "token": e.token.decode("ascii"),
                }
                for issuer, e in sorted(self._entries.items())
            },
        }
        data = (json.dumps(document, indent=1) + "\n").encode("utf-8")
        folder = os.path.dirname(os.path.abspath(path))
        write_atomically(path, data, mode=0o600)
        # The rename itself must reach the disk before we rely on it.
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------------------
# Deny networks


# Client networks to refuse, each with the refusal reason: the most
# specific network names the reason.
_EMPTY_DENY: PrefixTable[str] = PrefixTable(())


# ---------------------------------------------------------------------------
# Fetching


class _BoundedBody(Protocol):
    """
    Collects an HTTP response body of at most ``limit`` bytes.

    Past the limit it stops the transport at once (the rest of the body is
    never read) and fails with ``too_large``.  A body cut short without a
    declared length (``PotentialDataLoss``) is kept: the signature decides
    whether it is whole.
    """

    def __init__(self, limit: int, finished: defer.Deferred) -> None:
        self._limit = limit
        self._finished = finished
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._done = True
            self._chunks = []
            self.transport.stopProducing()
            self._finished.errback(
                FeedRejected("too_large", f"response body exceeds {self._limit} bytes")
            )
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._done:
            return
        self._done = True
        from twisted.web.client import PotentialDataLoss, ResponseDone

        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(reason)

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            if self.transport is not None:
                self.transport.stopProducing()


class _Discard(Protocol):
    """Takes a response body it does not want: stops it at once."""

    def makeConnection(self, transport) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


class _Unavailable(Exception):
    """The source could not be read; the message says why."""


def _is_url(source: str) -> bool:
    return re.match(r"https?://", source, re.IGNORECASE) is not None


def _display(source: str) -> str:
    """A source as logs may show it: credentials in a URL are masked."""
    if not _is_url(source):
        return source
    parts = urllib.parse.urlsplit(source)
    if "@" not in parts.netloc:
        return source
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + host))


def _read_file(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise _Unavailable(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise FeedRejected("too_large", f"{path} is larger than {limit} bytes")
    return data


@attrs.define(eq=False)
class _Source:
    """One configured source and what its polls found."""

    config: FeedSourceConfig
    display: str
    loop: Optional[LoopingCall] = None
    inflight: Optional[defer.Deferred] = None
    last_poll: Optional[float] = None
    last_result: Optional[str] = None  # accepted | unchanged | rejected
    last_reason: Optional[str] = None
    last_message: Optional[str] = None
    issuer: Optional[str] = None
    seq: Optional[int] = None


# ---------------------------------------------------------------------------
# The service


class ThreatIntel(Service):
    """
    Polls the feed sources, applies accepted feeds to the resolver and
    answers ``denies(ip)``; see the module docstring for the rules.

    ``reactor`` provides ``seconds``/``callLater`` (a ``Clock`` in tests);
    ``agent`` (an ``IAgent``) fetches http(s) sources, by default a
    ``twisted.web.client.Agent`` made when first needed; ``registry``, when
    given, receives ``shardtcp_feed_rejected_total{reason}``,
    ``shardtcp_feed_accepted_total``, ``shardtcp_feed_seq{issuer}`` and
    ``shardtcp_feed_expires_at_seconds{issuer}``.

    ``startService`` restores the feeds remembered in the state file (their
    signatures checked again, so a key removed from the JWKS takes its
    feeds with it), schedules their expiry and starts polling each source
    at once and then every ``refresh``.  A poll never overlaps the previous
    one of the same source; a fetch gives up after ``fetch_timeout``.
    """

    name = "threat-intel"

    def __init__(
        self,
        validator: FeedValidator,
        sources: Sequence[FeedSourceConfig],
        resolver: Any,
        *,
        reactor: Any,
        on_expiry: str = "baseline",
        agent: Any = None,
        registry: Any = None,
        fetch_timeout: float = 30.0,
    ) -> None:
        if on_expiry not in ON_EXPIRY:
            raise ValueError(f"on_expiry must be one of {ON_EXPIRY}, not {on_expiry!r}")
        self._validator = validator
        self._state = validator.state
        self._sources = [_Source(config=s, display=_display(s.source)) for s in sources]
        self._resolver = resolver
        self._reactor = reactor
        self._on_expiry = on_expiry
        self._agent = agent
        self._fetch_timeout = fetch_timeout
        self._feeds: dict[str, Feed] = {}  # issuer -> last accepted feed
        self._expired: set[str] = set()  # issuers whose last feed has expired
        self._timers: dict[str, Any] = {}  # issuer -> expiry DelayedCall
        self._overrides: dict[str, float] = {}  # shard id -> score applied
        self._deny = _EMPTY_DENY
        #: Rejected polls by reason (``REASONS``).
        self.rejections: collections.Counter = collections.Counter()
        #: Feeds accepted (new ones; an unchanged feed seen again is not counted).
        self.accepted = 0
        #: State-file writes that failed (the feed was applied anyway).
        self.state_write_failures = 0
        self._metrics = _FeedMetrics(registry) if registry is not None else None

    # -- the connection path ------------------------------------------------

    def denies(self, ip: str) -> Optional[str]:
        """
        Why a feed refuses this client, e.g. ``"threat feed intel.example
        seq 42 denies 203.0.113.0/24"``, or None.  IPv4-mapped IPv6
        addresses are matched as IPv4; anything but an IP address is not
        denied (feeds name IP networks only).
        """
        table = self._deny
        if not len(table):
            return None
        # inet_pton is several times faster than ipaddress, and this runs
        # for every accepted connection.
        try:
            packed = socket.inet_pton(socket.AF_INET, ip)
        except (OSError, ValueError, TypeError):
            try:
                packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
            except (OSError, ValueError, TypeError, AttributeError):
                return None
            if packed[:12] != _MAPPED_PREFIX:
                hit = table.lookup_bits(6, int.from_bytes(packed, "big"))
                return None if hit is None else hit[1]
            packed = packed[12:]
        hit = table.lookup_bits(4, int.from_bytes(packed, "big"))
        return None if hit is None else hit[1]

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._restore()
        for source in self._sources:
            loop = LoopingCall(self._poll, source)
            loop.clock = self._reactor
            source.loop = loop
            done = loop.start(source.config.refresh, now=True)
            done.addErrback(
                lambda f, s=source: log.failure(
                    "threat feed {source}: polling stopped", f, source=s.display
                )
            )

    def stopService(self) -> None:
        super().stopService()
        for source in self._sources:
            if source.loop is not None and source.loop.running:
                source.loop.stop()
            source.loop = None
            if source.inflight is not None:
                source.inflight.cancel()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def _restore(self) -> None:
        now = self._reactor.seconds()
        for issuer, entry in self._state.entries().items():
            if not entry.token:
                continue
            try:
                feed = self._validator.verify(entry.token)
            except FeedRejected as e:
                log.warn(
                    "threat feed of {issuer} seq {seq} from the state file no longer "
                    "verifies ({reason}: {message}); not applied (its seq still counts)",
                    issuer=issuer,
                    seq=entry.seq,
                    reason=e.reason,
                    message=e.message,
                )
                continue
            if feed.issuer != issuer or feed.digest != entry.digest or feed.seq != entry.seq:
                log.warn(
                    "threat feed state entry for {issuer} does not match its token; not applied",
                    issuer=issuer,
                )
                continue
            self._feeds[issuer] = feed
            if feed.expires_at <= now:
                self._expired.add(issuer)
            else:
                self._schedule_expiry(feed)
            self._gauge(feed)
            log.info(
                "threat feed of {issuer} seq {seq} restored from the state file{expired}",
                issuer=issuer,
                seq=feed.seq,
                expired=" (expired)" if issuer in self._expired else "",
            )
        self._rebuild()

    # -- polling ----------------------------------------------------------------

    def refresh(self) -> defer.Deferred:
        """
        Poll every source now (the admin interface's "refresh now"); a
        source already being polled is waited for, not polled twice.  The
        Deferred fires with None once every poll is done; it never fails.
        """
        polls = [
            source.inflight if source.inflight is not None else self._poll(source)
            for source in self._sources
        ]
        d = defer.gatherResults(polls, consumeErrors=True)
        d.addBoth(lambda _: None)
        return d

    def _poll(self, source: _Source) -> defer.Deferred:
        source.last_poll = self._reactor.seconds()
        d = defer.maybeDeferred(self._fetch, source.config.source)
        source.inflight = d
        d.addCallbacks(
            self._received, self._fetch_failed, callbackArgs=(source,), errbackArgs=(source,)
        )
        d.addErrback(
            lambda f: log.failure("threat feed {source}: poll failed", f, source=source.display)
        )

        def finished(_: Any) -> None:
            source.inflight = None
            if self.running:
                # Shards may have joined the resolver since the last poll.
                self._apply_overrides()

        d.addBoth(finished)
        return d

    def _fetch(self, source: str) -> Union[bytes, defer.Deferred]:
        if not _is_url(source):
            return _read_file(source, MAX_FEED_SIZE)
        if self._agent is None:
            from twisted.web.client import Agent

            self._agent = Agent(self._reactor)
        d = self._agent.request(
            b"GET",
            source.encode("ascii"),
            Headers(
                {
                    b"User-Agent": [b"shardtcp-feeds"],
                    b"Accept": [b"application/jose, application/jwt, text/plain"],
                    b"Cache-Control": [b"no-cache"],
                }
            ),
        )
        d.addCallback(self._read_response)
        d.addTimeout(self._fetch_timeout, self._reactor)
        return d

    def _read_response(self, response: Any) -> defer.Deferred:
        if response.code != 200:
            response.deliverBody(_Discard())
            raise _Unavailable(f"HTTP {response.code} {_phrase(response)}")
        length = response.length
        if isinstance(length, int) and length > MAX_FEED_SIZE:
            response.deliverBody(_Discard())
            raise FeedRejected(
                "too_large", f"Content-Length {length} exceeds {MAX_FEED_SIZE} bytes"
            )
        body: Optional[_BoundedBody] = None
        finished: defer.Deferred = defer.Deferred(lambda _: body.cancel())
        body = _BoundedBody(MAX_FEED_SIZE, finished)
        response.deliverBody(body)
        return finished

    def _fetch_failed(self, failure: Failure, source: _Source) -> None:
        if failure.check(FeedRejected):
            self._reject(source, failure.value)
        elif failure.check(defer.CancelledError) and not self.running:
            return
        elif failure.check(TwistedTimeoutError, defer.TimeoutError):
            self._reject(
                source,
                FeedRejected("unavailable", f"no answer within {self._fetch_timeout:g}s"),
            )
        else:
            message = failure.getErrorMessage()
            if failure.check(_Unavailable) is None:
                message = f"{failure.type.__name__}: {message}"
            self._reject(source, FeedRejected("unavailable", message[:_MESSAGE_LIMIT]))

    def _received(self, raw: bytes, source: _Source) -> None:
        try:
            feed = self._validator.validate(raw)
        except FeedRejected as e:
            self._reject(source, e)
            return
        source.issuer = feed.issuer
        source.seq = feed.seq
        current = self._feeds.get(feed.issuer)
        if current is not None and current.digest == feed.digest and feed.issuer not in self._expired:
            source.last_result = "unchanged"
            source.last_reason = source.last_message = None
            log.debug(
                "threat feed {source}: unchanged ({issuer} seq {seq})",
                source=source.display,
                issuer=feed.issuer,
                seq=feed.seq,
            )
            return
        self._install(feed, source)

    def _install(self, feed: Feed, source: _Source) -> None:
        try:
            self._state.record(feed)
        except OSError as e:
            # Memory already holds the new seq, so this process cannot go
            # back; a restart could only return to the previous persisted
            # feed's successors.  Fresher intelligence is worth applying.
            self.state_write_failures += 1
            log.error(
                "threat feed state file {path} could not be written ({error}); "
                "applying {issuer} seq {seq} anyway",
                path=self._state.path,
                error=str(e),
                issuer=feed.issuer,
                seq=feed.seq,
            )
        self._feeds[feed.issuer] = feed
        self._expired.discard(feed.issuer)
        self._schedule_expiry(feed)
        self._rebuild()
        self.accepted += 1
        source.last_result = "accepted"
        source.last_reason = source.last_message = None
        if self._metrics is not None:
            self._metrics.accepted.inc()
        self._gauge(feed)
        known = self._shard_ids()
        unknown = [shard_id for shard_id, _ in feed.shards if shard_id not in known]
        log.info(
            "threat feed {source} accepted: {issuer} seq {seq} (kid {kid}), "
            "{scores} shard scores, {deny} deny networks, expires at {exp}",
            source=source.display,
            issuer=feed.issuer,
            seq=feed.seq,
            kid=feed.kid,
            scores=len(feed.shards),
            deny=len(feed.deny),
            exp=feed.expires_at,
        )
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            log.warn(
                "threat feed {issuer} seq {seq} scores unknown shards, ignored: {shards}",
                issuer=feed.issuer,
                seq=feed.seq,
                shards=shown,
                unknown=unknown,
            )

    def _reject(self, source: _Source, error: FeedRejected) -> None:
        self.rejections[error.reason] += 1
        source.last_result = "rejected"
        source.last_reason = error.reason
        source.last_message = error.message
        if self._metrics is not None:
            self._metrics.rejected.labels(error.reason).inc()
        log.warn(
            "threat feed {source} rejected ({reason}): {message}; the last good feed stays in force",
            source=source.display,
            reason=error.reason,
            message=error.message,
        )

    # -- expiry -----------------------------------------------------------------

    def _schedule_expiry(self, feed: Feed) -> None:
        old = self._timers.pop(feed.issuer, None)
        if old is not None and old.active():
            old.cancel()
        if not self.running:
            return
        delay = max(0.0, feed.expires_at - self._reactor.seconds())
        self._timers[feed.issuer] = self._reactor.callLater(
            delay, self._expire, feed.issuer, feed.digest
        )

    def _expire(self, issuer: str, digest: str) -> None:
        self._timers.pop(issuer, None)
        feed = self._feeds.get(issuer)
        if feed is None or feed.digest != digest:
            return
        self._expired.add(issuer)
        self._rebuild()
        log.warn(
            "threat feed of {issuer} seq {seq} expired and no newer feed was accepted; "
            "on_expiry={mode}: {effect}",
            issuer=issuer,
            seq=feed.seq,
            mode=self._on_expiry,
            effect=(
                "every shard scores 0 and its deny networks stay"
                if self._on_expiry == "distrust"
                else "its scores and deny networks no longer apply"
            ),
        )

    # -- applying ---------------------------------------------------------------

    def _shard_ids(self) -> set[str]:
        return {shard.id for service in self._resolver.services() for shard in service.shards}

    def _desired_overrides(self) -> dict[str, float]:
        desired: dict[str, float] = {}
        for issuer, feed in self._feeds.items():
            if issuer in self._expired:
                continue
            for shard_id, score in feed.shards:
                desired[shard_id] = min(score, desired.get(shard_id, score))
        if self._on_expiry == "distrust" and self._expired:
            for shard_id in self._shard_ids():
                desired[shard_id] = 0.0
        return desired

    def _apply_overrides(self) -> None:
        desired = self._desired_overrides()
        for shard_id in set(self._overrides) - set(desired):
            try:
                self._resolver.set_security_score(shard_id, None)
            except UnknownShard:
                pass
        applied = {}
        for shard_id, score in desired.items():
            try:
                self._resolver.set_security_score(shard_id, score)
            except UnknownShard:
                continue
            applied[shard_id] = score
        self._overrides = applied

    def _rebuild(self) -> None:
        """Recompute the overrides and the deny table from the feeds held."""
        self._apply_overrides()
        distrust = self._on_expiry == "distrust"
        entries = []
        for issuer, feed in self._feeds.items():
            expired = issuer in self._expired
            if expired and not distrust:
                continue
            suffix = " (expired; kept by on_expiry=distrust)" if expired else ""
            for network in feed.deny:
                entries.append(
                    (network, f"threat feed {feed.issuer} seq {feed.seq} denies {network}{suffix}")
                )
        self._deny = PrefixTable(entries) if entries else _EMPTY_DENY

    def _gauge(self, feed: Feed) -> None:
        if self._metrics is not None:
            self._metrics.seq.labels(feed.issuer).set(feed.seq)
            self._metrics.expires.labels(feed.issuer).set(feed.expires_at)

    # -- status -----------------------------------------------------------------

    def status(self) -> dict:
        """What the admin ``/status`` shows of the feeds (JSON-ready)."""
        now = self._reactor.seconds()
        return {
            "on_expiry": self._on_expiry,
            "state_file": self._state.path,
            "state_write_failures": self.state_write_failures,
            "sources": [
                {
                    "source": s.display,
                    "refresh": s.config.refresh,
                    "last_poll": s.last_poll,
                    "last_result": s.last_result,
                    "last_reason": s.last_reason,
                    "last_message": s.last_message,
                    "issuer": s.issuer,
                    "seq": s.seq,
                }
                for s in self._sources
            ],
            "feeds": [
                {
                    "issuer": f.issuer,
                    "seq": f.seq,
                    "kid": f.kid,
                    "issued_at": f.issued_at,
                    "expires_at": f.expires_at,
                    "expires_in": max(0.0, f.expires_at - now),
                    "expired": issuer in self._expired,
                    "shards": len(f.shards),
                    "deny": len(f.deny),
                }
                for issuer, f in sorted(self._feeds.items())
            ],
            "distrusting": self._on_expiry == "distrust" and bool(self._expired),
            "overrides": dict(sorted(self._overrides.items())),
            "deny_networks": len(self._deny),
            "accepted": self.accepted,
            "rejections": dict(sorted(self.rejections.items())),
        }


def _phrase(response: Any) -> str:
    phrase = getattr(response, "phrase", b"") or b""
    return phrase.decode("latin-1", "replace")[:80] if isinstance(phrase, bytes) else str(phrase)[:80]


class _FeedMetrics:
    """The Prometheus series of ``ThreatIntel``, in the registry given."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.rejected = Counter(
            "shardtcp_feed_rejected",
            "Threat-feed polls that brought no good feed, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in REASONS:
            self.rejected.labels(reason)
        self.accepted = Counter(
            "shardtcp_feed_accepted", "Threat feeds accepted", registry=registry
        )
        self.seq = Gauge(
            "shardtcp_feed_seq", "seq of the last accepted feed, by issuer", ["issuer"], registry=registry
        )
        self.expires = Gauge(
            "shardtcp_feed_expires_at_seconds",
            "exp of the last accepted feed, by issuer (seconds since the epoch)",
            ["issuer"],
            registry=registry,
        )


def build_threat_intel(
    config: Config, resolver: Any, reactor: Any, registry: Any = None
) -> Optional[ThreatIntel]:
    """
    The ``ThreatIntel`` service of a configuration, or None without
    ``[threat_intel]``.  Loads the trusted JWKS and the state file now, so
    that a problem with either stops start-up: raises ``ThreatIntelError``
    (``FeedStateError`` for the state file) with a one-line message.
    """
    settings = config.threat_intel
    if settings is None:
        return None
    try:
        keys = load_jwks(settings.trusted_keys)
    except (JWKSError, OSError) as e:
        raise ThreatIntelError(f"threat_intel.trusted_keys: {e}") from None
    state = FeedState(settings.state_file)
    if settings.state_file is None:
        log.warn(
            "threat_intel has no state_file: accepted seq values live in memory only, "
            "so a restart would accept an older feed again"
        )
    validator = FeedValidator(keys, now=reactor.seconds, state=state)
    return ThreatIntel(
        validator,
        settings.feeds,
        resolver,
        reactor=reactor,
        on_expiry=settings.on_expiry,
        registry=registry,
    )
