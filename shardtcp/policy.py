"""
The PolicyContext: what a shard is told about a connection, signed.

The proxy issues one PolicyContext per connection, a compact JWS (EdDSA over
Ed25519, SPEC §4) carried in the PROXY v2 header's ``tlv_type`` TLV.  This
module holds the value type (``PolicyContext``), the signer used on the
connection path (``PolicySigner``), the size bound that ``check-config``
enforces (``worst_case_token_size``), connection ids, and the verification
(``decode_token``) that ``shardtcp.backend`` builds on.

Tokens are signed and verified by ``shardtcp.jws``, the same strict
compact-JWS rules the threat feeds obey.  It imports nothing of the project
but ``jws`` and ``net``.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from shardtcp import jws
from shardtcp.net import canonical_ip, format_hostport, parse_port

__all__ = [
    "ALGORITHM",
    "ENCRYPTION_LEVELS",
    "AUTHENTICATION_METHODS",
    "MAX_LEEWAY",
    "MAX_TOKEN_SIZE",
    "REQUIRED_CLAIMS",
    "PolicyContext",
    "PolicyError",
    "PolicySigner",
    "PolicyTooLarge",
    "check_claims",
    "decode_token",
    "format_address",
    "new_connection_id",
    "verify_signature",
    "worst_case_token_size",
]

#: The largest PolicyContext TLV value HAProxy's receiver accepts.
MAX_TOKEN_SIZE = 1024

#: The only signature algorithm issued or accepted.
ALGORITHM = jws.ALGORITHM

#: The most clock skew a verifier may allow, in seconds (SPEC §4).
MAX_LEEWAY = 5.0

ENCRYPTION_LEVELS = ("none", "tls", "mtls")
AUTHENTICATION_METHODS = ("none", "mtls")

#: Claims every PolicyContext carries; ``sub`` and ``sni`` are optional.
REQUIRED_CLAIMS = (
    "iss",
    "aud",
    "iat",
    "exp",
    "jti",
    "svc",
    "src",
    "dst",
    "enc",
    "amr",
    "acl",
)

# Connection ids: 16..32 ASCII characters (the UNIQUE_ID TLV, SPEC §4).
_MIN_ID, _MAX_ID = 16, 32

# Length of the base64url of an Ed25519 signature (64 bytes, no padding).
_SIGNATURE_B64_LENGTH = (4 * jws.SIGNATURE_SIZE + 2) // 3


def _check_level(instance: Any, attribute: Any, value: str) -> None:
    if value not in ENCRYPTION_LEVELS:
        raise ValueError(
            f"encryption_level must be one of {ENCRYPTION_LEVELS}, not {value!r}"
        )


def _check_methods(instance: Any, attribute: Any, value: tuple) -> None:
    if not value:
        raise ValueError('authentication_method must not be empty (use ("none",))')
    for method in value:
        if method not in AUTHENTICATION_METHODS:
            raise ValueError(
                f"authentication_method entries must be in "
                f"{AUTHENTICATION_METHODS}, not {method!r}"
            )


def _check_strings(instance: Any, attribute: Any, value: tuple) -> None:
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"{attribute.name} entries must be strings: {item!r}")


@attrs.frozen
class PolicyContext:
    """
    The security facts of one connection, as the shard is to trust them.

    ``encryption_level`` is what the client side actually had (``none``,
    ``tls`` or ``mtls``), ``authentication_method`` how the client
    authenticated (``("none",)`` or ``("mtls",)``), ``access_control_list``
    what the service's policy grants.  Lists given are stored as tuples.
    ``shard_key`` is the key the connection was routed by (the ``shk``
    claim, SPEC section 10), for a service routing by key; else None.
    """

    encryption_level: str = attrs.field(validator=_check_level)
    authentication_method: tuple = attrs.field(
        converter=tuple, validator=_check_methods
    )
    access_control_list: tuple = attrs.field(
        converter=tuple, validator=_check_strings
    )
    shard_key: Optional[str] = None

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> "PolicyContext":
        """The PolicyContext carried by a token's ``enc``/``amr``/``acl`` claims."""
        return cls(
            encryption_level=claims["enc"],
            authentication_method=claims["amr"],
            access_control_list=claims["acl"],
            shard_key=claims.get("shk"),
        )


class PolicyTooLarge(ValueError):
    """
    The signed PolicyContext would exceed ``MAX_TOKEN_SIZE``: the connection
    must be refused rather than sent a header the shard would reject.
    """


class PolicyError(Exception):
    """
    A PolicyContext token was refused.

    ``reason`` is a stable slug for logs and counters (spelt like
    ``shardtcp.proxyv2``'s): ``token_too_large``, ``malformed_token``,
    ``bad_algorithm``, ``unknown_kid``, ``invalid_signature``,
    ``missing_claims``, ``invalid_claims``, ``wrong_audience``, ``expired``,
    ``issued_in_future``.
    """

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message or reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def format_address(address: tuple) -> str:
    """
    ``(ip, port)`` as the ``src``/``dst`` claims spell it: ``ip:port``, or
    ``[ip]:port`` for IPv6, the address in its canonical text form
    (``shardtcp.net.format_hostport``).

    A zone (``fe80::1%eth0``) is dropped: a PROXY v2 header cannot carry one,
    and the claim must match the header.  Raises ``ValueError`` for a host
    that is not an IP literal or a port outside 0..65535.
    """
    host, port = address
    if not isinstance(host, str):
        raise ValueError(f"host must be an IP literal, not {host!r}")
    if "%" in host:
        host = host.split("%", 1)[0]
    # Not net.parse_ip: an IPv4-mapped address stays IPv6 here, because the
    # header it must match carries it that way.
    host = canonical_ip(host)
    if isinstance(port, str):
        port = parse_port(port)
    elif type(port) is not int or not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port!r}")
    return format_hostport(host, port)


def new_connection_id() -> str:
    """
    A fresh, unpredictable connection id: 24 URL-safe ASCII characters
    (144 random bits), used as both ``jti`` and the UNIQUE_ID TLV.
    """
    return secrets.token_urlsafe(18)


def _check_connection_id(connection_id: str) -> None:
    if (
        not isinstance(connection_id, str)
        or not _MIN_ID <= len(connection_id) <= _MAX_ID
        or not connection_id.isascii()
        or not connection_id.isprintable()
    ):
        raise ValueError(
            f"connection id must be {_MIN_ID} to {_MAX_ID} printable ASCII "
            f"characters: {connection_id!r}"
        )


#: How many distinct policies' claims JSON a signer keeps (forgotten all at
#: once when full; a proxy has one per service and client kind).
POLICY_CACHE_SIZE = 1024

# A string as json.dumps writes it (ASCII, escaped), without json.dumps's
# per-call set-up.
_json_text = json.encoder.encode_basestring_ascii


def _compact_json(value: Any) -> bytes:
    # The same serialisation PyJWT uses for payloads: compact, ASCII-escaped.
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def _header_json(kid: str) -> bytes:
    return jws.header_json(kid)


def _b64_length(n: int) -> int:
    """Length of the unpadded base64url encoding of ``n`` bytes."""
    return (4 * n + 2) // 3


def _token_length(header_json: bytes, payload_json: bytes) -> int:
    return (
        _b64_length(len(header_json))
        + 1
        + _b64_length(len(payload_json))
        + 1
        + _SIGNATURE_B64_LENGTH
    )


class PolicySigner:
    """
    Issues the PolicyContext token of each connection (SPEC §4).

    Built once per signing key; ``sign`` runs once per connection, so what
    does not change per connection (the JWS header, the issuer, the lifetime)
    is prepared here.  ``now`` returns seconds since the epoch; ``iat`` is its
    integer part and ``exp`` is ``iat`` plus ``ttl`` rounded up.
    """

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        *,
        kid: str,
        issuer: str,
        ttl: float,
        now: Callable[[], float],
    ) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(
                f"PolicyContext tokens are signed with Ed25519, "
                f"not {type(private_key).__name__}"
            )
        if not isinstance(kid, str) or not kid:
            raise ValueError("kid must be a non-empty string")
        if not isinstance(issuer, str) or not issuer:
            raise ValueError("issuer must be a non-empty string")
        if not ttl > 0:
            raise ValueError(f"ttl must be positive, not {ttl!r}")
        self._key = private_key
        self._kid = kid
        self._issuer = issuer
        self._lifetime = max(1, math.ceil(ttl))
        self._now = now
        self._signer = jws.Signer(private_key, kid=kid)
        # The claims JSON is written piece by piece (what json.dumps of the
        # claims dict writes, byte for byte): the issuer's part once, each
        # policy's enc/amr/acl once.
        self._head = '{"iss":' + _json_text(issuer) + ',"aud":'
        self._policies: dict = {}

    @property
    def kid(self) -> str:
        """The key id named in every token's header."""
        return self._kid

    @property
    def issuer(self) -> str:
        """The ``iss`` of every token."""
        return self._issuer

    def public_key(self) -> Ed25519PublicKey:
        """The public key that verifies this signer's tokens."""
        return self._key.public_key()

    def sign(
        self,
        *,
        policy: PolicyContext,
        audience: str,
        connection_id: str,
        service: str,
        source: tuple,
        destination: tuple,
        subject: Optional[str] = None,
        sni: Optional[str] = None,
    ) -> bytes:
        """
        The compact JWS (ASCII bytes) of one connection's PolicyContext.

        ``audience`` is the chosen shard's id; ``source`` and ``destination``
        are the ``(ip, port)`` pairs the PROXY header will carry;
        ``connection_id`` is the UNIQUE_ID TLV's value.  Raises
        ``PolicyTooLarge`` when the token would exceed ``MAX_TOKEN_SIZE``
        and ``ValueError`` for a malformed connection id or address.
        """
        _check_connection_id(connection_id)
        iat = int(self._now())
        src = format_address(source)
        dst = format_address(destination)
        if _all_text(audience, service, subject, sni, policy.shard_key):
            esc = _json_text
            parts = [
                self._head, esc(audience),
                ',"iat":', str(iat),
                ',"exp":', str(iat + self._lifetime),
                ',"jti":', esc(connection_id),
                ',"svc":', esc(service),
                ',"src":', esc(src),
                ',"dst":', esc(dst),
                self._policy_json(policy),
            ]
            if subject is not None:
                parts += (',"sub":', esc(subject))
            if sni is not None:
                parts += (',"sni":', esc(sni))
            if policy.shard_key is not None:
                parts += (',"shk":', esc(policy.shard_key))
            parts.append("}")
            token = self._signer.sign_json("".join(parts).encode("ascii"))
        else:
            claims: dict[str, Any] = {
                "iss": self._issuer,
                "aud": audience,
                "iat": iat,
                "exp": iat + self._lifetime,
                "jti": connection_id,
                "svc": service,
                "src": src,
                "dst": dst,
                "enc": policy.encryption_level,
                "amr": list(policy.authentication_method),
                "acl": list(policy.access_control_list),
            }
            if subject is not None:
                claims["sub"] = subject
            if sni is not None:
                claims["sni"] = sni
            if policy.shard_key is not None:
                claims["shk"] = policy.shard_key
            token = jws.sign(claims, self._key, kid=self._kid)
        if len(token) > MAX_TOKEN_SIZE:
            raise PolicyTooLarge(
                f"PolicyContext token of {len(token)} bytes exceeds "
                f"{MAX_TOKEN_SIZE} (service {service!r}, shard {audience!r})"
            )
        return token


    def _policy_json(self, policy: PolicyContext) -> str:
        """``,"enc":...,"amr":[...],"acl":[...]`` of ``policy``, written once per policy."""
        text = self._policies.get(policy)
        if text is None:
            if len(self._policies) >= POLICY_CACHE_SIZE:
                self._policies.clear()
            text = self._policies[policy] = (
                ',"enc":' + _compact_json(policy.encryption_level).decode("ascii")
                + ',"amr":' + _compact_json(list(policy.authentication_method)).decode("ascii")
                + ',"acl":' + _compact_json(list(policy.access_control_list)).decode("ascii")
            )
        return text


def _all_text(*values: Any) -> bool:
    """Whether every value is ``str`` or None (what the piecewise claims JSON writes)."""
    for value in values:
        if value is not None and type(value) is not str:
            return False
    return True


def worst_case_token_size(
    *,
    issuer: str,
    kid: str,
    service_id: str,
    shard_id: str,
    acl: Sequence[str],
    sni_length: Optional[int] = 253,
    subject_length: Optional[int] = 256,
    key_length: Optional[int] = None,
) -> int:
    """
    The largest token a signer with these settings can produce, in bytes.

    The per-connection values are taken at their largest: a 32-character
    ``jti``, 10-digit ``iat``/``exp``, IPv6 ``src``/``dst`` of maximal length
    (``[ffff:...:ffff]:65535``), ``enc`` ``mtls``, ``amr`` ``["mtls"]``, an
    ``sni`` of ``sni_length`` characters (by default 253, the longest DNS
    name) and a ``sub`` of ``subject_length`` characters (by default 256);
    ``None`` leaves the claim out, for listeners that can never set it (no
    ``sub`` without client certificates).  ``sni`` and ``sub`` are counted
    as characters JSON writes as themselves, as is an ``shk`` of
    ``key_length`` characters (None, the default: no shard key); a name full of characters JSON
    must escape can still be longer, which ``PolicySigner.sign`` catches per
    connection.

    With both defaults the fixed part alone is about 1200 bytes, over
    ``MAX_TOKEN_SIZE``: a configuration check must pass the bounds that hold
    for the listener at hand rather than rely on the defaults.
    """
    address = "[" + ":".join(["ffff"] * 8) + "]:65535"
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": shard_id,
        "iat": 9_999_999_999,
        "exp": 9_999_999_999,
        "jti": "j" * _MAX_ID,
        "svc": service_id,
        "src": address,
        "dst": address,
        "enc": "mtls",
        "amr": ["mtls"],
        "acl": list(acl),
    }
    if subject_length is not None:
        claims["sub"] = "s" * subject_length
    if sni_length is not None:
        claims["sni"] = "n" * sni_length
    if key_length is not None:
        claims["shk"] = "k" * key_length
    return _token_length(_header_json(kid), _compact_json(claims))


def _claim_error(name: str, expected: str) -> PolicyError:
    return PolicyError("invalid_claims", f"claim {name!r} must be {expected}")


def _check_claim_types(claims: dict) -> None:
    for name in ("iss", "aud", "jti", "svc", "src", "dst"):
        if not isinstance(claims[name], str):
            raise _claim_error(name, "a string")
    for name in ("iat", "exp"):
        if not jws.numeric_date(claims[name]):
            raise _claim_error(
                name, f"an integer from 0 to {jws.MAX_NUMERIC_DATE} (seconds since the epoch)"
            )
    if claims["enc"] not in ENCRYPTION_LEVELS:
        raise _claim_error("enc", f"one of {ENCRYPTION_LEVELS}")
    amr = claims["amr"]
    if (
        not isinstance(amr, list)
        or not amr
        or any(m not in AUTHENTICATION_METHODS for m in amr)
    ):
        raise _claim_error("amr", f"a non-empty list of {AUTHENTICATION_METHODS}")
    acl = claims["acl"]
    if not isinstance(acl, list) or any(not isinstance(a, str) for a in acl):
        raise _claim_error("acl", "a list of strings")
    for name in ("sub", "sni", "shk"):
        if name in claims and not isinstance(claims[name], str):
            raise _claim_error(name, "a string when present")


# The jws module's reasons, spelt as PolicyError spells them.
_REASONS = {
    "too_large": "token_too_large",
    "malformed": "malformed_token",
    "unsigned": "bad_algorithm",
    "no_kid": "malformed_token",
}


def verify_signature(
    token: Union[bytes, str], keys: Mapping[str, Ed25519PublicKey]
) -> jws.Verified:
    """
    Check a token's form and signature only (``shardtcp.jws`` rules, at
    most ``MAX_TOKEN_SIZE`` bytes) and return it verified, claims unchecked.
    Raises ``PolicyError``.
    """
    if isinstance(token, str):
        token = token.encode("ascii", "replace")
    try:
        return jws.verify(token, keys, max_size=MAX_TOKEN_SIZE)
    except jws.JWSError as e:
        raise PolicyError(_REASONS.get(e.reason, e.reason), e.message) from None


def decode_token(
    token: Union[bytes, str],
    keys: Mapping[str, Ed25519PublicKey],
    *,
    audience: str,
    now: Callable[[], float],
    leeway: float = MAX_LEEWAY,
) -> dict:
    """
    Verify a PolicyContext token and return its claims.

    Accepts only tokens ``verify_signature`` accepts (EdDSA, a ``kid``
    naming one of ``keys``, a signature that verifies with it) whose
    claims ``check_claims`` accepts.  Anything else raises ``PolicyError``
    with a reason slug.
    """
    claims = verify_signature(token, keys).claims
    return check_claims(claims, audience=audience, now=now, leeway=leeway)


def check_claims(
    claims: Any,
    *,
    audience: str,
    now: Callable[[], float],
    leeway: float = MAX_LEEWAY,
) -> dict:
    """
    Check the claims of a token whose signature verified and return them.

    Requires every claim of ``REQUIRED_CLAIMS`` with the types SPEC §4
    gives, ``aud`` exactly ``audience``, and a token that has not expired
    by ``now()`` and was not issued in its future, both give or take
    ``leeway`` seconds (capped at ``MAX_LEEWAY``).  Raises ``PolicyError``.
    """
    leeway = min(max(float(leeway), 0.0), MAX_LEEWAY)
    if not isinstance(claims, dict):
        raise PolicyError("malformed_token", "the claims are not a JSON object")
    for name in REQUIRED_CLAIMS:
        if name not in claims:
            raise PolicyError("missing_claims", f"missing claim {name!r}")
    if claims["aud"] != audience:
        raise PolicyError("wrong_audience", f"token is not for {audience!r}")
    _check_claim_types(claims)
    current = now()
    if current >= claims["exp"] + leeway:
        raise PolicyError(
            "expired",
            f"token expired at {claims['exp']} (now {current:.0f}, "
            f"leeway {leeway:g}s)",
        )
    if claims["iat"] > current + leeway:
        raise PolicyError(
            "issued_in_future",
            f"token issued at {claims['iat']}, after now {current:.0f} "
            f"(leeway {leeway:g}s)",
        )
    return claims


# -- admission: what a service's policy grants a connection ------------------

_ENCRYPTION_RANK = {"none": 0, "tls": 1, "mtls": 2}


@attrs.frozen
class TLSFacts:
    """What the client side's encryption was, as the PolicyContext states it."""

    encryption: str = "none"  # none | tls | mtls
    authentication: tuple = ("none",)
    subject: Optional[str] = None
    alpn: Optional[str] = None  # negotiated, when terminated
    ssl: Any = None  # a proxyv2.SSLInfo for the SSL TLV, when terminated


#: A plaintext client, the state of every connection until shown otherwise.
NO_TLS = TLSFacts()

#: A client whose TLS passes through the proxy untouched.
PASSTHROUGH_TLS = TLSFacts(encryption="tls")


class PolicyRefused(Exception):
    """The service's policy refuses this connection; ``reason`` is a slug."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def admit(service: Any, facts: TLSFacts) -> PolicyContext:
    """
    Check a ``ServiceConfig``'s encryption and authentication requirements
    against what the client side actually had, and return the PolicyContext
    granted; raises ``PolicyRefused``.
    """
    policy = service.policy
    if _ENCRYPTION_RANK[facts.encryption] < _ENCRYPTION_RANK[policy.encryption]:
        raise PolicyRefused(
            "policy_encryption",
            f"service {service.id!r} requires encryption {policy.encryption!r}, client has {facts.encryption!r}",
        )
    if policy.authentication != "none" and policy.authentication not in facts.authentication:
        raise PolicyRefused(
            "policy_authentication",
            f"service {service.id!r} requires authentication {policy.authentication!r}",
        )
    # The grant depends on these three values only, and connections of one
    # service and client kind all get the same one: build it once (it is
    # immutable, so sharing it is safe).
    key = (facts.encryption, tuple(facts.authentication), tuple(policy.acl))
    granted = _GRANTED.get(key)
    if granted is None:
        if len(_GRANTED) >= GRANTED_CACHE_SIZE:
            _GRANTED.clear()
        granted = _GRANTED[key] = PolicyContext(
            encryption_level=key[0],
            authentication_method=key[1],
            access_control_list=key[2],
        )
    return granted


#: How many distinct grants ``admit`` keeps (forgotten all at once when
#: full; a proxy has one per service policy and client kind).
GRANTED_CACHE_SIZE = 1024

_GRANTED: dict = {}
