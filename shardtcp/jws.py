# -*- test-case-name: tests.test_jws -*-
"""
Compact JWS (RFC 7515) signed with EdDSA over Ed25519, strictly: the one
signer and verifier of PolicyContext tokens (SPEC §4) and of
threat-intelligence feeds (SPEC §5), so both obey the same rules.

A token ``verify`` accepts:

* is at most ``max_size`` bytes, checked before anything is parsed;
* is three segments of canonical base64url: the URL-safe alphabet only, no
  ``=``, no length of 1 modulo 4 and no set bits after the last byte, so a
  token has exactly one spelling;
* has a header that is a JSON object with ``alg`` ``EdDSA`` (or
  ``Ed25519``, the fully-specified name of RFC 9864), a ``kid``
  naming one of the trusted keys, ``typ`` absent or ``JWT``, and no
  ``crit`` (no extension is understood, so none may be required);
* carries a 64-byte Ed25519 signature over its first two segments that
  verifies with that key;
* has a header and claims in strict JSON (UTF-8, no duplicate keys, no
  NaN or Infinity), whose integers lie within +-(2**63 - 1) and whose
  floats are finite, so no later comparison or arithmetic can overflow.

The token is read once: the header is decoded and checked before the
signature, the claims are decoded after it.

PyJWT is not used underneath.  Its decoder accepts ``=`` padding (on
purpose; releases allowed by ``PyJWT>=2.8`` also accept set spare bits),
duplicate JSON keys and numbers of any size, and a verifier that must see
the ``kid`` first parses the header twice (``get_unverified_header`` then
``decode``).  The primitive PyJWT would call is cryptography's Ed25519,
which this module calls directly (``Signer``, which signs each
connection's token, uses libsodium's Ed25519 through PyNaCl when it is
installed: the same signatures for less CPU), and ``sign`` writes the bytes PyJWT
writes (header keys sorted, compact separators, ASCII), so tokens stay
interchangeable with PyJWT and other JOSE libraries.

It imports nothing of the project.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any, Mapping, Union

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

try:
    # libsodium's Ed25519 gives the same signatures (Ed25519 is
    # deterministic) at less than half the CPU of the OpenSSL build in
    # ``cryptography``: it signs once per connection.
    from nacl._sodium import ffi as _sodium_ffi, lib as _sodium_lib
    from nacl.bindings import crypto_sign_seed_keypair as _sodium_keypair
except ImportError:  # pragma: no cover - PyNaCl is a dependency
    _sodium_ffi = _sodium_lib = None
    _sodium_keypair = None

__all__ = [
    "ALGORITHM",
    "ALGORITHMS",
    "MAX_INTEGER",
    "MAX_NUMERIC_DATE",
    "REASONS",
    "SIGNATURE_SIZE",
    "TYPE",
    "JWSError",
    "Verified",
    "b64url_decode",
    "b64url_encode",
    "header_json",
    "numeric_date",
    "sign",
    "verify",
]

#: The signature algorithm ``sign`` writes.
ALGORITHM = "EdDSA"

#: The ``alg`` values ``verify`` accepts: both name Ed25519 signatures here.
#: RFC 9864 deprecates the polymorphic ``EdDSA`` for the fully-specified
#: ``Ed25519``; issuers that follow it must still verify.  ``sign`` keeps
#: writing ``EdDSA`` (SPEC §4), which every deployed verifier knows.
ALGORITHMS = (ALGORITHM, "Ed25519")

#: The only ``typ`` accepted when a header carries one.
TYPE = "JWT"

#: The size of an Ed25519 signature, in bytes.
SIGNATURE_SIZE = 64

#: The largest magnitude of an integer in a header or in claims.
MAX_INTEGER = 2**63 - 1

#: The latest time ``numeric_date`` accepts: 9999-12-31T23:59:59Z.
MAX_NUMERIC_DATE = 253_402_300_799

#: Every ``JWSError.reason``.
REASONS = (
    "too_large",  # longer than the caller's bound
    "malformed",  # not three canonical base64url segments of JSON objects, or a bad typ/crit
    "unsigned",  # alg "none" (any case), or an empty signature
    "bad_algorithm",  # any alg but EdDSA or Ed25519
    "no_kid",  # the header names no key
    "unknown_kid",  # no trusted key of that kid
    "invalid_signature",  # the signature does not verify with that key
    "invalid_claims",  # a number in the claims is out of range
)

_MAX_KID = 256
_STRUCTURE = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SEXTET = {byte: value for value, byte in enumerate(_ALPHABET)}
# Bits of the last character that carry no data, by segment length mod 4.
_SPARE_BITS = {0: 0, 2: 0x0F, 3: 0x03}


class JWSError(Exception):
    """
    A token was refused; ``reason`` is one of ``REASONS``, ``message``
    says what exactly (for logs; it never echoes more than a short excerpt).
    """

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message or reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@attrs.frozen
class Verified:
    """A token whose signature verified: its header, claims and key id."""

    header: dict
    claims: Any
    kid: str


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def b64url_encode(data: bytes) -> bytes:
    """The canonical base64url of ``data``: URL-safe alphabet, no padding."""
    # base64.urlsafe_b64encode's own steps, without its two Python frames.
    return _b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


_b2a_base64 = binascii.b2a_base64
# The signer's first output buffer: a PolicyContext token and its signature.
_SIGNED_BUFFER = 2048
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _canonical(segment: bytes) -> bool:
    # The alphabet is checked by the caller.
    spare = _SPARE_BITS.get(len(segment) % 4)
    if spare is None:
        return False
    return not spare or not _SEXTET[segment[-1]] & spare


def b64url_decode(segment: Union[bytes, str]) -> bytes:
    """
    Decode canonical base64url: the URL-safe alphabet only, no padding, and
    no set bits after the last byte.  Anything else raises ``ValueError``,
    so that one byte string has exactly one accepted spelling.
    """
    if isinstance(segment, str):
        if not segment.isascii():
            raise ValueError("base64url is ASCII")
        segment = segment.encode("ascii")
    if segment.strip(_ALPHABET) or not _canonical(segment):
        raise ValueError("not canonical base64url")
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


class _OutOfRange(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        # Two parsers could pick different values: refuse the ambiguity.
        raise ValueError("duplicate key in a JSON object")
    return result


def _bounded_int(text: str) -> int:
    # 19 digits and a sign hold every value within MAX_INTEGER; checking the
    # length first keeps a 4,000-digit number from costing anything.
    if len(text) > 20 or not -MAX_INTEGER <= (value := int(text)) <= MAX_INTEGER:
        raise _OutOfRange(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfRange(f"number {text[:24]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys,
    parse_int=_bounded_int,
    parse_float=_finite_float,
    parse_constant=_no_constant,
)


def _json(data: bytes, what: str, out_of_range: str) -> Any:
    try:
        return _DECODER.decode(data.decode("utf-8"))
    except _OutOfRange as e:
        raise JWSError(out_of_range, f"{what}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise JWSError("malformed", f"{what} is not valid JSON: {_show(str(e), 120)}") from None


def header_json(kid: str, typ: str = TYPE) -> bytes:
    """The JSON of the header ``sign`` writes: ``alg``, ``kid``, ``typ``, sorted."""
    return json.dumps(
        {"alg": ALGORITHM, "kid": kid, "typ": typ}, separators=(",", ":"), sort_keys=True
    ).encode("ascii")


class Signer:
    """
    ``sign`` for one key and ``kid``, with the header's base64url prepared
    once: ``sign_json`` takes the claims already serialised.
    """

    __slots__ = ("_prefix", "_sign", "_sodium_key", "_signed", "_signature_view")

    def __init__(self, private_key: Ed25519PrivateKey, *, kid: str, sodium: bool = True) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"tokens are signed with Ed25519, not {type(private_key).__name__}")
        if not isinstance(kid, str) or not kid:
            raise ValueError("kid must be a non-empty string")
        self._prefix = b64url_encode(header_json(kid)) + b"."
        self._sign = private_key.sign
        self._sodium_key = None
        if sodium and _sodium_keypair is not None:
            seed = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            self._sodium_key = _sodium_keypair(seed)[1]
            # One output buffer per signer (signature, then the message),
            # grown when a message does not fit: no allocation per token.
            self._signed = _sodium_ffi.new("unsigned char[]", _SIGNED_BUFFER)
            self._signature_view = _sodium_ffi.buffer(self._signed, SIGNATURE_SIZE)

    @property
    def backend(self) -> str:
        """Which Ed25519 implementation signs: ``libsodium`` or ``openssl``."""
        return "openssl" if self._sodium_key is None else "libsodium"

    def sign_json(self, payload: bytes) -> bytes:
        """The compact JWS of the claims JSON ``payload`` (not checked here)."""
        signing_input = self._prefix + b64url_encode(payload)
        if self._sodium_key is not None:
            size = len(signing_input)
            if size + SIGNATURE_SIZE > len(self._signed):
                self._signed = _sodium_ffi.new("unsigned char[]", size + SIGNATURE_SIZE)
                self._signature_view = _sodium_ffi.buffer(self._signed, SIGNATURE_SIZE)
            if _sodium_lib.crypto_sign(
                self._signed, _sodium_ffi.NULL, signing_input, size, self._sodium_key
            ):  # pragma: no cover - libsodium's Ed25519 signing does not fail
                raise RuntimeError("libsodium failed to sign")
            signature = self._signature_view[:]
        else:
            signature = self._sign(signing_input)
        return signing_input + b"." + b64url_encode(signature)


def sign(claims: Mapping[str, Any], private_key: Ed25519PrivateKey, *, kid: str) -> bytes:
    """
    The compact JWS (ASCII bytes) of ``claims``, header
    ``{"alg":"EdDSA","kid":kid,"typ":"JWT"}``, the claims in their own order.

    Raises ``TypeError`` for a key that is not Ed25519 and ``ValueError``
    for an empty ``kid`` or claims JSON cannot carry (NaN, Infinity).
    """
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"tokens are signed with Ed25519, not {type(private_key).__name__}")
    if not isinstance(kid, str) or not kid:
        raise ValueError("kid must be a non-empty string")
    payload = json.dumps(dict(claims), separators=(",", ":"), allow_nan=False).encode("ascii")
    return Signer(private_key, kid=kid, sodium=False).sign_json(payload)


def verify(
    token: bytes, keys: Mapping[str, Ed25519PublicKey], *, max_size: int
) -> Verified:
    """
    Check ``token`` by the rules in this module's docstring and return its
    header and claims, or raise ``JWSError``.

    Checks run cheapest and least trusting first: size, structure and
    base64url, header (``alg``, then ``crit`` and ``typ``, then ``kid``),
    signature, claims.  ``keys`` maps kids to trusted public keys.
    """
    if len(token) > max_size:
        raise JWSError("too_large", f"token of {len(token)} bytes exceeds {max_size}")
    if _STRUCTURE.fullmatch(token) is None:
        raise JWSError("malformed", "not a compact JWS (three base64url segments separated by '.')")
    first = token.index(b".")
    last = token.rindex(b".")
    header_b64 = token[:first]
    payload_b64 = token[first + 1 : last]
    signature_b64 = token[last + 1 :]
    if not (_canonical(header_b64) and _canonical(payload_b64) and _canonical(signature_b64)):
        raise JWSError("malformed", "a JWS segment is not canonical base64url")
    header = _json(
        base64.urlsafe_b64decode(header_b64 + b"=" * (-len(header_b64) % 4)),
        "the JWS header",
        "malformed",
    )
    if not isinstance(header, dict):
        raise JWSError("malformed", "the JWS header is not a JSON object")
    alg = header.get("alg")
    if isinstance(alg, str) and alg.lower() == "none":
        raise JWSError("unsigned", 'alg "none": the token is not signed')
    if alg not in ALGORITHMS:
        raise JWSError("bad_algorithm", f"alg {_show(alg)} is not {' or '.join(ALGORITHMS)}")
    if not signature_b64:
        raise JWSError("unsigned", "the token has an empty signature")
    if "crit" in header:
        # RFC 7515 §4.1.11: extensions not understood must not be ignored;
        # none is understood here.
        raise JWSError("malformed", "the JWS header has a 'crit' parameter")
    typ = header.get("typ", TYPE)
    if typ != TYPE:
        raise JWSError("malformed", f"typ {_show(typ)} is not {TYPE}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JWSError("no_kid", "the JWS header names no kid")
    key = keys.get(kid) if len(kid) <= _MAX_KID else None
    if key is None:
        raise JWSError("unknown_kid", f"no trusted key named {_show(kid)}")
    if not isinstance(key, Ed25519PublicKey):
        raise TypeError(f"trusted key {kid!r} is {type(key).__name__}, not Ed25519")
    signature = base64.urlsafe_b64decode(signature_b64 + b"=" * (-len(signature_b64) % 4))
    if len(signature) != SIGNATURE_SIZE:
        raise JWSError(
            "invalid_signature", f"signature of {len(signature)} bytes, Ed25519 uses {SIGNATURE_SIZE}"
        )
    try:
        key.verify(signature, token[:last])
    except InvalidSignature:
        raise JWSError("invalid_signature", f"the signature does not verify with key {kid!r}") from None
    claims = _json(
        base64.urlsafe_b64decode(payload_b64 + b"=" * (-len(payload_b64) % 4)),
        "the claims",
        "invalid_claims",
    )
    return Verified(header=header, claims=claims, kid=kid)


def numeric_date(value: Any) -> bool:
    """
    Whether ``value`` is a NumericDate as shardtcp writes them: an integer
    (not a bool) from 0 to ``MAX_NUMERIC_DATE``, safe to add to a float.
    """
    return type(value) is int and 0 <= value <= MAX_NUMERIC_DATE
