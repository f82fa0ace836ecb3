"""
What a shard uses to accept connections from shardtcp.

Every connection shardtcp opens to a shard starts with a PROXY v2 header
carrying the client's address and a signed PolicyContext (SPEC §4).  This
module checks that header and hands the shard application a connection whose
``getPeer()`` is the real client and whose verified facts are at hand:

* ``ShardVerifier`` decides, for one parsed header, whether the connection
  is acceptable, and returns a ``VerifiedConnection`` or raises
  ``VerificationError`` with a reason slug;
* ``ReplayCache`` remembers the connection ids already accepted;
* ``IKeySource`` is where the verifier finds the trusted keys:
  ``StaticKeySource`` (a dict, or a JWKS file) or ``RemoteKeySet`` (a JWKS
  URL fetched and kept fresh, see its docstring);
* ``VerifyingFactory`` wraps a shard's own Twisted factory: it reads and
  verifies the header, then builds the application's protocol with the
  client's address and passes every later byte on unchanged.

A shard application reaches the verified facts through its transport::

    class Orders(Protocol):
        def connectionMade(self):
            conn = verified_connection(self.transport)
            if "orders:read" not in conn.policy.access_control_list: ...

``verified_connection`` also works behind ``TLSMemoryBIOFactory`` (a TLS
endpoint's protocol is a wrapper whose own ``transport`` is ours).

This module imports ``proxyv2``, ``policy``, ``keys`` and ``net`` only,
never the proxy.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from typing import Any, Callable, Mapping, Optional, Union

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.application.service import IService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import Interface, alsoProvides, directlyProvides, implementer, providedBy

from shardtcp import proxyv2
from shardtcp.keys import JWKSError, load_jwks, parse_jwks
from shardtcp.net import format_hostport
from shardtcp.policy import (
    MAX_LEEWAY,
    PolicyContext,
    PolicyError,
    decode_token,
)
from shardtcp.proxyv2 import (
    PP2_TYPE_CRC32C,
    PP2_TYPE_UNIQUE_ID,
    Command,
    InvalidProxyHeader,
    ProxyHeader,
    SSLInfo,
)
# A Twisted shard adds a Registration to its service tree to be found by
# proxies through etcd (SPEC 9); re-exported so a shard needs this module only.
from shardtcp.registry.register import Registration

__all__ = [
    "DEFAULT_TLV_TYPE",
    "Registration",
    "IKeySource",
    "RemoteKeySet",
    "KeyOwnership",
    "ReplayCache",
    "StaticKeySource",
    "ShardVerifier",
    "VerificationError",
    "VerifiedConnection",
    "VerifiedTransport",
    "VerifyingFactory",
    "VerifyingProtocol",
    "verified_connection",
]

log = Logger()

DEFAULT_TLV_TYPE = 0xE0

# What a PROXY header from shardtcp can reasonably weigh: addresses, a token
# of at most 1 KiB, a connection id, the authority, ALPN and SSL facts.
DEFAULT_MAX_HEADER_SIZE = 8192


class VerificationError(Exception):
    """
    A connection's PROXY header was refused.

    ``reason`` is a short slug for logs and counters; ``message`` says what
    exactly was wrong.  Slugs: those of ``proxyv2.InvalidProxyHeader``
    (``bad_crc``, ``missing_crc``, ``too_large``...), those of
    ``policy.PolicyError`` (``unknown_kid``, ``invalid_signature``,
    ``wrong_audience``, ``expired``...), and ``local``, ``no_addresses``,
    ``unix_family``, ``not_stream``,
    ``duplicate_tlv``, ``missing_policy``, ``missing_unique_id``,
    ``invalid_unique_id``, ``source_mismatch``, ``destination_mismatch``,
    ``jti_mismatch``, ``replay``, ``replay_cache_full``.
    """

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message or reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@attrs.frozen
class VerifiedConnection:
    """
    What a shard may rely on about one accepted connection.

    ``client`` and ``destination`` are the header's ``(ip, port)`` pairs
    (the original client, and the proxy address it reached);
    ``connection_id``, ``service``, ``sni``, ``subject`` and ``policy`` come
    from the signed token, whose full claims are in ``claims``.  ``alpn``
    and ``ssl`` come from the header's ALPN and SSL TLVs: covered by the
    CRC32C but not by the signature, so trust them only as far as the hop
    from the proxy is trusted.
    """

    client: tuple
    destination: tuple
    connection_id: str
    service: str
    shard_id: str
    sni: Optional[str]
    subject: Optional[str]
    policy: PolicyContext
    claims: dict = attrs.field(eq=False, repr=False)
    header: ProxyHeader = attrs.field(eq=False, repr=False)
    alpn: Optional[bytes] = None
    ssl: Optional[SSLInfo] = None

    @property
    def shard_key(self) -> Optional[str]:
        """The shard key the connection was routed by (``shk``), or None."""
        return self.policy.shard_key


class ReplayCache:
    """
    The connection ids (``jti``) accepted recently, each kept until its
    token can no longer be accepted (its ``exp`` plus the verifier's leeway).

    Bounded by ``max_entries``.  Entries whose time has passed are dropped
    first, soonest-expiring first.  When the cache is still full of live
    entries, a new id is *refused* (``replay_cache_full``) rather than an
    old one forgotten: forgetting would let that old header be replayed,
    while refusing costs only the new connection, and can only happen under
    a flood far beyond ``max_entries`` connections per token lifetime, which
    the operator sizes.

    ``now`` returns seconds since the epoch (default: ``time.time``); use
    the same clock as the verifier.
    """

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        now: Optional[Callable[[], float]] = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries!r}")
        self._max = max_entries
        self._now = now if now is not None else time.time
        self._until: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        self._purge(self._now())
        return len(self._until)

    def __contains__(self, jti: object) -> bool:
        self._purge(self._now())
        return jti in self._until

    def _purge(self, now: float) -> None:
        expiries, until = self._expiries, self._until
        while expiries and expiries[0][0] <= now:
            _, jti = heapq.heappop(expiries)
            until.pop(jti, None)

    def check_and_remember(self, jti: str, until: float) -> None:
        """
        Remember ``jti`` until ``until`` (seconds since the epoch), or raise
        ``VerificationError``: ``replay`` if it is already remembered,
        ``replay_cache_full`` if there is no room.
        """
        now = self._now()
        self._purge(now)
        if jti in self._until:
            raise VerificationError(
                "replay", f"connection id {jti!r} was already accepted"
            )
        if until <= now:
            # Nothing to remember: no token can be accepted for it any more.
            return
        if len(self._until) >= self._max:
            raise VerificationError(
                "replay_cache_full",
                f"{self._max} connection ids are remembered and none has expired",
            )
        self._until[jti] = until
        heapq.heappush(self._expiries, (until, jti))


def _is_connection_id(value: bytes) -> bool:
    return 16 <= len(value) <= 32 and value.isascii() and value.decode().isprintable()


# -- where the trusted keys come from ----------------------------------------


class IKeySource(Interface):
    """
    The policy-signing public keys a ``ShardVerifier`` trusts, by kid.

    A static JWKS file and a fetched JWKS URL are interchangeable behind it.
    """

    def key_for(kid: str) -> Optional[Ed25519PublicKey]:
        """The trusted key named ``kid``, or ``None``."""

    def unknown_kid(kid: str) -> None:
        """
        Told that a token named ``kid`` and no trusted key has that name; a
        source that can learn new keys may look again (rate-limited: anyone
        can send a token with a made-up kid).  Returns at once.
        """


@implementer(IKeySource)
class StaticKeySource:
    """Keys fixed at construction (or replaced with ``set_keys``)."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        self.set_keys(keys)

    @classmethod
    def from_jwks(cls, jwks_path_or_dict: Union[str, Mapping[str, Any]]) -> "StaticKeySource":
        """The Ed25519 keys of a JWKS file or document."""
        return cls(load_jwks(jwks_path_or_dict))

    def set_keys(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        if not keys:
            raise ValueError("at least one trusted key is needed")
        self._keys = dict(keys)

    def key_for(self, kid: str) -> Optional[Ed25519PublicKey]:
        return self._keys.get(kid)

    def unknown_kid(self, kid: str) -> None:
        pass


class _Lookup(Mapping):
    """
    The ``Mapping`` the token verifier reads keys from, over an
    ``IKeySource``; remembers the last kid it did not find, so the verifier
    can report it without parsing the token again.
    """

    def __init__(self, source: IKeySource) -> None:
        self._source = source
        self.missing: Optional[str] = None

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        key = self._source.key_for(kid)
        if key is None:
            self.missing = kid
            raise KeyError(kid)
        return key

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


#: The largest JWKS response ``RemoteKeySet`` reads.
MAX_JWKS_RESPONSE = 1024 * 1024


class _FetchFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message


class _BoundedBody(Protocol):
    """
    Collects a response body of at most ``limit`` bytes, then fires
    ``done`` with it; a longer body (declared or actual) stops the transfer
    and fails ``done`` with ``oversize``.  Cancelling ``done`` (a timeout)
    stops the transfer too.
    """

    def __init__(self, limit: int, declared: Any) -> None:
        self._limit = limit
        self._declared = declared
        self._parts: list[bytes] = []
        self._size = 0
        self.done: Deferred = Deferred(lambda d: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionMade(self) -> None:
        if isinstance(self._declared, int) and self._declared > self._limit:
            self._fail(f"Content-Length {self._declared} exceeds {self._limit} bytes")

    def _fail(self, message: str) -> None:
        if not self.done.called:
            self._stop()
            self.done.errback(_FetchFailed("oversize", message))

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._fail(f"body exceeds {self._limit} bytes")
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(_FetchFailed("transfer", f"body lost: {reason.getErrorMessage()}"))


class _Discard(Protocol):
    """Stops a response body from being read at all."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def jwks_agent(reactor: Any, ca: Optional[str] = None) -> IAgent:
    """
    A ``twisted.web.client.Agent`` for JWKS URLs: https verified against
    the PEM CA certificate(s) in ``ca`` when given, else the system's trust
    store; http as is.  No redirects are followed (a JWKS URL is fixed
    configuration; a redirect is reported as a failed fetch).
    """
    if ca is None:
        return Agent(reactor)
    with open(ca, "rb") as f:
        pem = f.read()
    authorities = [Certificate.loadPEM(block) for block in _pem_blocks(pem)]
    if not authorities:
        raise ValueError(f"{ca}: no PEM certificate")
    trust = trustRootFromCertificates(authorities)
    return Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))


def _pem_blocks(pem: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    blocks = []
    for part in pem.split(end)[:-1]:
        start = part.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            blocks.append(part[start:] + end + b"\n")
    return blocks


@implementer(IKeySource)
class RemoteKeySet(Service):
    """
    The trusted keys of a JWKS URL, fetched at start, every
    ``refresh_interval`` seconds, and when a token names a kid not known
    yet (a rotation published between two refreshes).

    The guarantees, each tested:

    * an unknown kid causes a fetch only when the last fetch began at least
      ``min_interval`` seconds ago (exactly ``min_interval`` is enough) and
      none is in flight: a flood of forged kids costs at most one fetch per
      ``min_interval``;
    * a failed fetch (connection error, ``timeout`` seconds passed, a status
      other than 200, a body over ``max_size`` bytes, or a body that is not
      a JWKS with at least one Ed25519 key) changes nothing: the last good
      keys stay trusted.  (PyJWT's ``PyJWKClient`` empties its cache when a
      fetch fails, pyjwt#1162, so one bad answer from the key server makes
      every shard refuse every connection; this class does not.)  A
      successful fetch replaces the keys as a whole, which is how a
      retired key stops being trusted;
    * a connection whose kid is unknown is refused at once (``unknown_kid``)
      even while the fetch it caused is in flight; the connections after the
      fetch see the new key.  Holding connections until the fetch ends would
      let forged kids pin connections and memory for up to ``timeout``
      each, and a rotation done as docs/keys.rst says never depends on it:
      shards fetch the new key before the proxy signs with it.

    ``agent`` is an ``IAgent`` (default: ``jwks_agent(reactor, ca)``);
    ``reactor`` gives the clock.  ``stats`` counts ``fetches``,
    ``fetched`` (successes), ``failed_<reason>`` (``connect``, ``timeout``,
    ``status``, ``oversize``, ``transfer``, ``invalid``), ``unknown_kid`` and
    ``refetch_limited``.  ``keys`` is the current kid → key mapping (empty
    until the first good fetch; every token is ``unknown_kid`` until then).
    """

    def __init__(
        self,
        url: str,
        *,
        reactor: Any = None,
        agent: Optional[IAgent] = None,
        ca: Optional[str] = None,
        min_interval: float = 30.0,
        refresh_interval: float = 300.0,
        timeout: float = 10.0,
        max_size: int = MAX_JWKS_RESPONSE,
    ) -> None:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme not in ("http", "https"):
            raise ValueError(f"JWKS URL {url!r}: only http and https URLs are fetched")
        if ca is not None and scheme != "https":
            raise ValueError(f"JWKS URL {url!r}: a CA is only used with https")
        if not min_interval > 0 or not refresh_interval > 0 or not timeout > 0:
            raise ValueError("min_interval, refresh_interval and timeout must be positive")
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, not {max_size!r}")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.url = url
        self._reactor = reactor
        self._agent = agent if agent is not None else jwks_agent(reactor, ca)
        self.min_interval = float(min_interval)
        self.refresh_interval = float(refresh_interval)
        self.timeout = float(timeout)
        self.max_size = max_size
        self.keys: dict[str, Ed25519PublicKey] = {}
        self.stats: Counter[str] = Counter()
        self._last_fetch: Optional[float] = None
        self._in_flight: Optional[Deferred] = None
        self._loop: Optional[LoopingCall] = None

    # IKeySource

    def key_for(self, kid: str) -> Optional[Ed25519PublicKey]:
        return self.keys.get(kid)

    def unknown_kid(self, kid: str) -> None:
        self.stats["unknown_kid"] += 1
        if self._in_flight is not None:
            return
        now = self._reactor.seconds()
        if self._last_fetch is not None and now - self._last_fetch < self.min_interval:
            self.stats["refetch_limited"] += 1
            return
        log.info("JWKS: unknown kid {kid!r}, fetching {url}", kid=kid[:64], url=self.url)
        self.refresh()

    # IService

    def startService(self) -> None:
        Service.startService(self)
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self._reactor
        self._loop.start(self.refresh_interval, now=True)

    def stopService(self) -> Any:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._in_flight is not None:
            self._in_flight.cancel()
        return None

    # fetching

    def refresh(self) -> Deferred:
        """
        Fetch the JWKS now, or join the fetch in flight; the ``Deferred``
        fires with ``True`` when that fetch's keys were taken, ``False``
        when it failed, and never fails.  Not rate-limited: this is what
        the refresh timer calls, and what a shard's owner may call.
        """
        if self._in_flight is not None:
            return self._follow(self._in_flight)
        self._last_fetch = self._reactor.seconds()
        self.stats["fetches"] += 1
        d = self._fetch()
        d.addTimeout(self.timeout, self._reactor)
        d.addCallbacks(self._fetched, self._failed)
        self._in_flight = d

        def done(result: bool) -> bool:
            self._in_flight = None
            return result

        d.addBoth(done)
        return self._follow(d)

    @staticmethod
    def _follow(d: Deferred) -> Deferred:
        # Each caller gets its own Deferred, fired with the fetch's outcome:
        # a caller's callbacks must not change the stored chain, and
        # cancelling the stored one (at stop) must not reach into a caller's.
        mine: Deferred = Deferred()

        def tell(result: bool) -> bool:
            mine.callback(result)
            return result

        d.addBoth(tell)
        return mine

    def _fetch(self) -> Deferred:
        d = self._agent.request(
            b"GET", self.url.encode("ascii"), Headers({b"Accept": [b"application/json"]})
        )

        def got_response(response: IResponse) -> Deferred:
            if response.code != 200:
                # Drop the body unread; the status says enough.
                response.deliverBody(_Discard())
                raise _FetchFailed("status", f"HTTP status {response.code}")
            body = _BoundedBody(self.max_size, response.length)
            response.deliverBody(body)
            return body.done

        d.addCallback(got_response)
        return d

    def _fetched(self, data: bytes) -> bool:
        try:
            keys = parse_jwks(data, self.url)
        except JWKSError as e:
            return self._failed(Failure(_FetchFailed("invalid", str(e))))
        old = set(self.keys)
        self.keys = keys
        self.stats["fetched"] += 1
        if set(keys) != old:
            log.info(
                "JWKS: {url} now trusts kids {kids}",
                url=self.url,
                kids=sorted(keys),
                added=sorted(set(keys) - old),
                removed=sorted(old - set(keys)),
            )
        return True

    def _failed(self, failure: Failure) -> bool:
        if failure.check(_FetchFailed):
            reason, message = failure.value.reason, failure.value.message
        elif failure.check(CancelledError) and not self.running:
            return False
        elif failure.check(CancelledError, TimeoutError):
            reason, message = "timeout", f"no complete answer within {self.timeout:g}s"
        else:
            reason, message = "connect", failure.getErrorMessage()
        self.stats[f"failed_{reason}"] += 1
        log.warn(
            "JWKS: fetching {url} failed ({reason}: {message}); keeping the "
            "{count} keys already trusted",
            url=self.url,
            reason=reason,
            message=message[:200],
            count=len(self.keys),
        )
        return False


#: What a shard owns: a predicate on a shard key, or a set of keys.
KeyOwnership = Union[Callable[[str], bool], "set[str]", "frozenset[str]"]


def _key_predicate(owns: Optional[KeyOwnership]) -> Optional[Callable[[str], bool]]:
    if owns is None:
        return None
    if isinstance(owns, (set, frozenset)):
        keys = frozenset(owns)
        return keys.__contains__
    if not callable(owns):
        raise TypeError(f"owns_key must be a callable or a set, not {type(owns).__name__}")
    return owns


def _check_key(key: Any, owns: Callable[[str], bool]) -> None:
    """Refuse a connection without a shard key, or with one not owned."""
    if key is None:
        raise VerificationError("no_shard_key", "the token carries no shard key (shk)")
    if not owns(key):
        shown = key if len(key) <= 64 else key[:64] + "..."
        raise VerificationError("foreign_key", f"shard key {shown!r} is not owned by this shard")


class ShardVerifier:
    """
    Decides whether a PROXY header from shardtcp admits a connection to the
    shard ``shard_id`` (SPEC §4).

    ``keys`` are the trusted policy-signing public keys: an ``IKeySource``
    (``StaticKeySource``, ``RemoteKeySet``) or a mapping of kid to key (see
    ``from_jwks``).  A token naming a kid the source does not know is
    refused (``unknown_kid``) and the source told, so a ``RemoteKeySet``
    can fetch again for the connections that follow.  ``tlv_type`` is the PolicyContext TLV's type (the
    proxy's ``signing.tlv_type``); ``leeway`` the clock skew allowed, at
    most 5 s; ``now`` the clock (default ``time.time``).  Without a
    ``replay_cache``, one is made on the same clock.

    ``owns_key`` (a predicate on a key, or a set of keys) makes the shard
    refuse a connection whose token carries a shard key (``shk``, SPEC
    section 10) it does not own (``foreign_key``), or none at all
    (``no_shard_key``).
    """

    def __init__(
        self,
        shard_id: str,
        keys: Union[IKeySource, Mapping[str, Ed25519PublicKey]],
        *,
        tlv_type: int = DEFAULT_TLV_TYPE,
        leeway: float = MAX_LEEWAY,
        now: Optional[Callable[[], float]] = None,
        replay_cache: Optional[ReplayCache] = None,
        owns_key: Optional[KeyOwnership] = None,
    ) -> None:
        if not isinstance(shard_id, str) or not shard_id:
            raise ValueError("shard_id must be a non-empty string")
        if not IKeySource.providedBy(keys):
            keys = StaticKeySource(keys)
        if not 0xE0 <= tlv_type <= 0xEF:
            raise ValueError(f"tlv_type must be in 0xE0..0xEF, not {tlv_type:#x}")
        if not 0 <= leeway <= MAX_LEEWAY:
            raise ValueError(f"leeway must be within 0..{MAX_LEEWAY:g} s, not {leeway!r}")
        self.shard_id = shard_id
        self.keys: IKeySource = keys
        self._tlv_type = tlv_type
        self._leeway = float(leeway)
        self._now = now if now is not None else time.time
        self._replay = (
            replay_cache if replay_cache is not None else ReplayCache(now=self._now)
        )
        self._owns_key = _key_predicate(owns_key)

    def set_keys(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        """
        Trust ``keys`` (kid -> key) from now on, in place of the key source
        (after reloading a JWKS file during a rotation).
        """
        self.keys = StaticKeySource(keys)

    @classmethod
    def from_jwks(
        cls,
        shard_id: str,
        jwks_path_or_dict: Union[str, Mapping[str, Any]],
        **kw: Any,
    ) -> "ShardVerifier":
        """A verifier trusting the Ed25519 keys of a JWKS file or document."""
        return cls(shard_id, load_jwks(jwks_path_or_dict), **kw)

    def verify(self, header: ProxyHeader) -> VerifiedConnection:
        """
        Accept ``header`` or raise ``VerificationError``.

        Accepted only when: the command is PROXY (LOCAL raises ``local``:
        health checks are for the caller to recognise first), the family
        byte says INET or INET6 over STREAM, a CRC32C TLV is present (its value was checked by
        the parser), the PolicyContext and UNIQUE_ID TLVs are present once
        each, the token verifies (trusted kid, signature, ``aud`` = this
        shard, not expired, claims complete), its ``src``/``dst`` are the
        header's addresses, its ``jti`` is the UNIQUE_ID, and that id was not
        accepted before.  The id is remembered only once all else passed.
        """
        if header.command != Command.PROXY:
            raise VerificationError("local", "LOCAL header: no client connection")
        # The family and transport are those the header's family byte
        # declares, not guesses from the address text: a UNIX path may be
        # spelt like an IP address.
        family = header.family
        if family == "UNIX":
            raise VerificationError(
                "unix_family", "header family UNIX: SPEC §4 allows INET or INET6 only"
            )
        if header.source is None or header.destination is None or family not in ("INET", "INET6"):
            raise VerificationError(
                "no_addresses", f"header family {family} has no IP addresses"
            )
        if header.transport != "STREAM":
            raise VerificationError(
                "not_stream",
                f"header transport {header.transport}: SPEC §4 allows STREAM only",
            )
        counts = Counter(tlv_type for tlv_type, _ in header.tlvs)
        if counts[PP2_TYPE_CRC32C] == 0:
            raise VerificationError("missing_crc", "header has no CRC32C TLV")
        for tlv_type in (self._tlv_type, PP2_TYPE_UNIQUE_ID, PP2_TYPE_CRC32C):
            if counts[tlv_type] > 1:
                raise VerificationError(
                    "duplicate_tlv", f"TLV 0x{tlv_type:02X} appears {counts[tlv_type]} times"
                )
        token = header.get(self._tlv_type)
        if token is None:
            raise VerificationError(
                "missing_policy", f"no PolicyContext TLV (0x{self._tlv_type:02X})"
            )
        unique_id = header.get(PP2_TYPE_UNIQUE_ID)
        if unique_id is None:
            raise VerificationError("missing_unique_id", "no UNIQUE_ID TLV")
        if not _is_connection_id(unique_id):
            raise VerificationError(
                "invalid_unique_id", "UNIQUE_ID is not 16 to 32 printable ASCII characters"
            )
        lookup = _Lookup(self.keys)
        try:
            claims = decode_token(
                token, lookup, audience=self.shard_id, now=self._now, leeway=self._leeway
            )
        except PolicyError as e:
            if e.reason == "unknown_kid" and lookup.missing is not None:
                self.keys.unknown_kid(lookup.missing)
            raise VerificationError(e.reason, e.message) from None
        # The decoder wrote these from the family's raw bytes, already in
        # canonical form: no need to parse them again.
        source = format_hostport(*header.source)
        if claims["src"] != source:
            raise VerificationError(
                "source_mismatch", f"token src {claims['src']!r}, header source {source!r}"
            )
        destination = format_hostport(*header.destination)
        if claims["dst"] != destination:
            raise VerificationError(
                "destination_mismatch",
                f"token dst {claims['dst']!r}, header destination {destination!r}",
            )
        connection_id = unique_id.decode("ascii")
        if claims["jti"] != connection_id:
            raise VerificationError(
                "jti_mismatch",
                f"token jti {claims['jti']!r}, UNIQUE_ID {connection_id!r}",
            )
        try:
            ssl = header.ssl
        except InvalidProxyHeader as e:
            raise VerificationError(e.reason, str(e)) from None
        if self._owns_key is not None:
            _check_key(claims.get("shk"), self._owns_key)
        self._replay.check_and_remember(connection_id, claims["exp"] + self._leeway)
        return VerifiedConnection(
            client=header.source,
            destination=header.destination,
            connection_id=connection_id,
            service=claims["svc"],
            shard_id=self.shard_id,
            sni=claims.get("sni"),
            subject=claims.get("sub"),
            policy=PolicyContext.from_claims(claims),
            claims=claims,
            header=header,
            alpn=header.alpn,
            ssl=ssl,
        )

    def verify_bytes(self, data: bytes) -> tuple[VerifiedConnection, bytes]:
        """
        Parse a PROXY v2 header at the start of ``data`` (its CRC32C
        required and checked) and verify it; return the connection and the
        bytes after the header.  Raises ``VerificationError``, with the
        parser's reason when the header does not parse.
        """
        try:
            header, rest = proxyv2.parse(data, require_crc32c=True)
        except InvalidProxyHeader as e:
            raise VerificationError(e.reason, str(e)) from None
        return self.verify(header), rest


def _twisted_address(address: tuple) -> Union[IPv4Address, IPv6Address]:
    host, port = address
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


def verified_connection(transport: object) -> Optional[VerifiedConnection]:
    """
    The ``VerifiedConnection`` behind ``transport``, or ``None``.

    Follows ``.transport`` from wrapper to wrapped (as from a
    ``TLSMemoryBIOProtocol`` to the ``VerifiedTransport`` beneath it) until
    one carries ``verified``.
    """
    for _ in range(16):
        if transport is None:
            return None
        found = getattr(transport, "verified", None)
        if isinstance(found, VerifiedConnection):
            return found
        transport = getattr(transport, "transport", None)
    return None


class VerifiedTransport:
    """
    The transport a shard application's protocol gets: the real connection,
    seen as the client's.

    ``getPeer()`` is the client the header named and ``getHost()`` the
    address it reached; ``verified`` is the ``VerifiedConnection``.  Every
    other operation (writes, half-close, producers, ``getHandle``...) goes to
    the real transport, which this object provides the interfaces of.
    """

    def __init__(
        self, transport: ITransport, verified: VerifiedConnection
    ) -> None:
        self.transport = transport
        self.verified = verified
        self._peer = _twisted_address(verified.client)
        self._host = _twisted_address(verified.destination)
        directlyProvides(self, providedBy(transport))

    def getPeer(self) -> IAddress:
        return self._peer

    def getHost(self) -> IAddress:
        return self._host

    @property
    def disconnecting(self) -> bool:
        return getattr(self.transport, "disconnecting", False)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def writeSequence(self, data: Any) -> None:
        self.transport.writeSequence(data)

    def loseConnection(self) -> None:
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def loseWriteConnection(self) -> None:
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)  # type: ignore[attr-defined]

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.transport.stopProducing()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not found on this object; "transport" itself
        # is missing only mid-construction, where delegating would recurse.
        if name == "transport":
            raise AttributeError(name)
        return getattr(self.transport, name)

    def __repr__(self) -> str:
        return f"<VerifiedTransport {self.verified.connection_id} peer={self._peer}>"


class VerifyingProtocol(Protocol):
    """
    One connection to the shard, until and after its header is verified.

    Until the header is complete it buffers at most the factory's
    ``max_header_size``; it then verifies it, builds the application's
    protocol for the client's address and relays everything to it.
    Half-close is relayed when, and only when, that protocol supports it:
    this object provides ``IHalfCloseableProtocol`` from then on, so the
    reactor keeps its usual behaviour (a full close on EOF) otherwise.
    """

    def __init__(self, factory: "VerifyingFactory", addr: IAddress) -> None:
        self.factory = factory
        self._addr = addr
        self._parser = proxyv2.HeaderParser(
            max_size=factory.max_header_size, require_crc32c=True
        )
        self._timeout: Optional[IDelayedCall] = None
        self._finished = False
        self.wrappedProtocol: Optional[IProtocol] = None

    def logPrefix(self) -> str:
        return "VerifyingProtocol"

    def connectionMade(self) -> None:
        self._timeout = self.factory.schedule_timeout(self._timed_out)

    def _cancel_timeout(self) -> None:
        if self._timeout is not None:
            if self._timeout.active():
                self._timeout.cancel()
            self._timeout = None

    def _timed_out(self) -> None:
        self._timeout = None
        self._refuse(
            "timeout", f"no complete PROXY header within {self.factory.timeout:g}s"
        )

    def _refuse(self, reason: str, message: str) -> None:
        self._finished = True
        self._cancel_timeout()
        self.factory.stats[reason] += 1
        log.warn(
            "refused connection from {peer}: {reason}: {message}",
            peer=self._addr,
            reason=reason,
            message=message,
            shard=self.factory.verifier.shard_id,
        )
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._finished:
            return
        try:
            header = self._parser.feed(data)
        except InvalidProxyHeader as e:
            self._refuse(e.reason, str(e))
            return
        if header is None:
            return
        self._cancel_timeout()
        if header.command == Command.LOCAL:
            self._local()
            return
        try:
            verified = self.factory.verifier.verify(header)
        except VerificationError as e:
            self._refuse(e.reason, e.message)
            return
        self._start(verified, self._parser.rest)

    def _local(self) -> None:
        if not self.factory.allow_local:
            self._refuse("local", "LOCAL headers are not accepted here")
            return
        self._finished = True
        self.factory.stats["health_check"] += 1
        log.debug("health check from {peer}", peer=self._addr)
        local_factory = self.factory.local_factory
        if local_factory is None:
            self.transport.loseConnection()
            return
        # The checker goes on (e.g. a TLS handshake): hand the connection, with
        # its real peer and no verified facts, to the health factory.
        protocol = local_factory.buildProtocol(self._addr)
        if protocol is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self.transport)
        rest = self._parser.rest
        if rest:
            protocol.dataReceived(rest)

    def _start(self, verified: VerifiedConnection, rest: bytes) -> None:
        wrapped_factory = self.factory.wrappedFactory
        try:
            protocol = wrapped_factory.buildProtocol(_twisted_address(verified.client))
        except Exception:
            log.failure(
                "application factory failed to build a protocol for {connection_id}",
                connection_id=verified.connection_id,
            )
            self._refuse("application_error", "buildProtocol raised")
            return
        if protocol is None:
            self._refuse(
                "refused_by_application", "the application factory returned no protocol"
            )
            return
        self._finished = True
        self.factory.stats["accepted"] += 1
        log.debug(
            "accepted {connection_id} from {client} for {service}",
            connection_id=verified.connection_id,
            client=verified.client,
            service=verified.service,
        )
        self.wrappedProtocol = protocol
        if IHalfCloseableProtocol.providedBy(protocol):
            alsoProvides(self, IHalfCloseableProtocol)
        protocol.makeConnection(VerifiedTransport(self.transport, verified))
        if rest:
            protocol.dataReceived(rest)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_timeout()
        protocol, self.wrappedProtocol = self.wrappedProtocol, None
        if protocol is not None:
            protocol.connectionLost(reason)
        elif not self._finished:
            self._finished = True
            self.factory.stats["incomplete"] += 1
            log.info(
                "connection from {peer} closed before a complete PROXY header",
                peer=self._addr,
                reason="incomplete",
            )

    # IHalfCloseableProtocol, declared only once the application's protocol
    # provides it (see _start).

    def readConnectionLost(self) -> None:
        protocol = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if protocol is not None:
            protocol.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        protocol = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if protocol is not None:
            protocol.writeConnectionLost()


class VerifyingFactory(Factory):
    """
    Wraps a shard application's factory so that it only ever sees connections
    whose PROXY header ``verifier`` accepted.

    The application's ``buildProtocol`` is called once the header is
    verified, with the client's address; its protocol's transport is a
    ``VerifiedTransport`` (``self.transport.verified``, or
    ``verified_connection(self.transport)`` from behind TLS).  The bytes
    after the header reach it unchanged.

    When the verifier's key source is a service (a ``RemoteKeySet``) not
    yet running, the factory starts it when it starts listening and stops
    it when it stops.

    A connection without a complete header within ``timeout`` seconds
    (``None``: no limit), with a header over ``max_header_size`` bytes, or
    with a header the verifier refuses is closed, logged, and counted in
    ``stats`` under its reason slug.  A LOCAL header (a health check) is
    counted as ``health_check`` and the connection closed cleanly: the
    application never sees it; with ``local_factory`` the connection is
    handed to that factory instead (a TLS shard answers a checker's TLS
    handshake this way); with ``allow_local=False`` it is refused as
    ``local``.  ``stats`` also counts ``accepted`` connections and
    ``incomplete`` ones (closed by the peer before a complete header), so
    a shard can export it as is.
    """

    protocol = VerifyingProtocol  # type: ignore[assignment]

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        verifier: ShardVerifier,
        *,
        timeout: Optional[float] = 5.0,
        reactor: Any = None,
        allow_local: bool = True,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        local_factory: Optional[IProtocolFactory] = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.wrappedFactory = wrappedFactory
        self.verifier = verifier
        self.timeout = timeout
        self._reactor = reactor
        self.allow_local = allow_local
        self.max_header_size = max_header_size
        self.local_factory = local_factory
        self.stats: Counter[str] = Counter()
        self._owned_source: Any = None

    def logPrefix(self) -> str:
        inner = getattr(self.wrappedFactory, "logPrefix", None)
        name = inner() if callable(inner) else type(self.wrappedFactory).__name__
        return f"{name} (verified PROXY)"

    def doStart(self) -> None:
        self.wrappedFactory.doStart()
        Factory.doStart(self)

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        Factory.doStop(self)

    def startFactory(self) -> None:
        # A key source that is a service (RemoteKeySet) fetches while the
        # shard listens; one already running belongs to its owner.
        source = self.verifier.keys
        if IService.providedBy(source) and not source.running:
            source.startService()
            self._owned_source = source

    def stopFactory(self) -> None:
        source, self._owned_source = self._owned_source, None
        if source is not None:
            source.stopService()

    def schedule_timeout(self, call: Callable[[], None]) -> Optional[IDelayedCall]:
        """Arrange for ``call`` after ``timeout`` seconds (none without one)."""
        if self.timeout is None:
            return None
        return self._reactor.callLater(self.timeout, call)

    def buildProtocol(self, addr: IAddress) -> VerifyingProtocol:
        return VerifyingProtocol(self, addr)
