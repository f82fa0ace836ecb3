"""
Ed25519 key files and JWKS documents for PolicyContext signing.

The proxy signs each connection's PolicyContext with an Ed25519 private key
(PKCS#8 PEM); shards verify with the matching public keys, published as a JWKS
(RFC 7517, OKP keys of RFC 8037) and selected by ``kid``.  This module writes
such key sets (``shardtcp keygen``), reads them back, and converts between
keys and JWKs.  It knows nothing of connections and imports nothing of the
project but ``shardtcp.jws`` (canonical base64url), so the shard-side library
(``shardtcp.backend``) can use it.

Rotation (docs/keys.rst): run ``generate_keypair`` again in the same folder
with a new ``kid``; the new public key joins ``jwks.json`` next to the old
one, so shards trust both while the proxy switches over.  Remove the old
entry afterwards.  ``serving_jwks`` is the document the admin site serves at
``/.well-known/jwks.json``, and ``jwks_problem`` the check ``check-config``
runs on ``[signing] jwks``.
"""

from __future__ import annotations

import binascii
import errno
import json
import os
import re
import tempfile
from typing import Any, Mapping, Union

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from twisted.logger import Logger

from shardtcp.jws import b64url_decode, b64url_encode

__all__ = [
    "JWKS_FILENAME",
    "JWK_ALGORITHMS",
    "JWKSError",
    "KeyFileError",
    "KeyPaths",
    "generate_keypair",
    "jwks_document",
    "load_jwks",
    "load_private_key",
    "jwks_problem",
    "parse_jwks",
    "public_jwk",
    "serving_jwks",
]

log = Logger()

JWKS_FILENAME = "jwks.json"

# A kid names files, so it must be a plain file-name component.
_KID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")

# A JWKS file is configuration, not bulk data: refuse anything absurdly large.
_MAX_JWKS_SIZE = 1024 * 1024

#: The ``alg`` of a JWK that is used (absent means the same): ``EdDSA`` and
#: its RFC 9864 fully-specified name ``Ed25519``.
JWK_ALGORITHMS = ("EdDSA", "Ed25519")


class KeyFileError(ValueError):
    """A key file exists but does not hold what it should (PEM, Ed25519)."""


class JWKSError(ValueError):
    """A JWKS document is malformed or holds no usable Ed25519 key."""


@attrs.frozen
class KeyPaths:
    """Where ``generate_keypair`` wrote a key set."""

    kid: str
    private_key: str
    public_key: str
    jwks: str


def _check_kid(kid: str) -> None:
    if not isinstance(kid, str) or not _KID_PATTERN.fullmatch(kid):
        raise ValueError(
            f"invalid kid {kid!r}: use 1 to 128 characters of letters, digits, "
            "'.', '_' and '-', not starting with '.' or '-'"
        )


def _b64url(data: bytes) -> str:
    return b64url_encode(data).decode("ascii")


def write_atomically(path: str, data: bytes, mode: int = 0o644) -> None:
    """
    Replace ``path`` with ``data`` so that readers see the old or the new
    content, never a half-written file.
    """
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_private_key(path: str, pem: bytes) -> None:
    """
    Create ``path`` holding ``pem`` with mode 0600 from the first instant.

    ``O_EXCL`` makes the existence check and the creation one step, so an
    existing key is never overwritten, even by a concurrent run.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST,
            "refusing to overwrite an existing private key "
            "(choose another --kid, or remove the file on purpose)",
            path,
        ) from None
    try:
        # The umask may have removed bits but never adds any; make the mode
        # exactly 0600 whatever it was.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(path)
        raise


def _read_jwks_file(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read(_MAX_JWKS_SIZE + 1)
    return _jwks_json(data, path)


def _jwks_json(data: bytes, source: str) -> dict:
    if len(data) > _MAX_JWKS_SIZE:
        raise JWKSError(f"{source}: larger than {_MAX_JWKS_SIZE} bytes")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise JWKSError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JWKSError(f'{source}: not a JWKS document (an object with a "keys" list)')
    return document


def generate_keypair(out_dir: str, kid: str = "policy-1") -> KeyPaths:
    """
    Write a new Ed25519 key set into ``out_dir`` and publish it in the JWKS.

    Writes ``<kid>.pem`` (PKCS#8 PEM private key, mode 0600, created with that
    mode), ``<kid>.pub.pem`` (SubjectPublicKeyInfo PEM) and ``jwks.json``.
    When ``jwks.json`` already exists, the key named ``kid`` is added to it or
    replaces the entry of that name and every other entry is kept, so two
    kids can be published during a rotation.

    Raises ``FileExistsError`` when ``<kid>.pem`` already exists (nothing is
    written then), ``ValueError`` for a kid unfit for a file name, and
    ``JWKSError`` when an existing ``jwks.json`` cannot be read (checked
    before anything is written).
    """
    _check_kid(kid)
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    paths = KeyPaths(
        kid=kid,
        private_key=os.path.join(out_dir, f"{kid}.pem"),
        public_key=os.path.join(out_dir, f"{kid}.pub.pem"),
        jwks=os.path.join(out_dir, JWKS_FILENAME),
    )
    if os.path.lexists(paths.private_key):
        raise FileExistsError(
            errno.EEXIST,
            "refusing to overwrite an existing private key "
            "(choose another --kid, or remove the file on purpose)",
            paths.private_key,
        )
    if os.path.exists(paths.jwks):
        document = _read_jwks_file(paths.jwks)
    else:
        document = {"keys": []}

    private_key = Ed25519PrivateKey.generate()
    public_key = private_key.public_key()
    _write_private_key(
        paths.private_key,
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_atomically(
        paths.public_key,
        public_key.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        ),
    )
    keys = [
        entry
        for entry in document["keys"]
        if not (isinstance(entry, dict) and entry.get("kid") == kid)
    ]
    keys.append(public_jwk(public_key, kid))
    document["keys"] = keys
    write_atomically(
        paths.jwks, (json.dumps(document, indent=2) + "\n").encode("utf-8")
    )
    return paths


def load_private_key(path: str) -> Ed25519PrivateKey:
    """
    Read an unencrypted Ed25519 private key from a PEM file.

    Raises ``FileNotFoundError`` when there is no such file, and
    ``KeyFileError`` (a ``ValueError``) when it is not PEM, cannot be parsed,
    is encrypted, or holds another kind of key.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, "private key file not found", path
        ) from None
    if b"-----BEGIN " not in data:
        raise KeyFileError(f"{path}: not a PEM file (no -----BEGIN line)")
    if b"-----BEGIN PUBLIC KEY-----" in data and b"PRIVATE KEY" not in data:
        raise KeyFileError(f"{path}: holds a public key; a private key is needed")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(
            f"{path}: the private key is encrypted; an unencrypted key is needed"
        ) from None
    except (ValueError, binascii.Error) as e:
        raise KeyFileError(f"{path}: not a readable PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path}: holds a {type(key).__name__.lstrip('_')} key, "
            "not an Ed25519 key"
        )
    return key


def public_jwk(
    public_key: Union[Ed25519PublicKey, Ed25519PrivateKey], kid: str
) -> dict:
    """
    The public JWK (RFC 8037 OKP) of an Ed25519 key, for signature use.

    Given a private key, only its public half is published.
    """
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    if not isinstance(public_key, Ed25519PublicKey):
        raise TypeError(f"not an Ed25519 key: {type(public_key).__name__}")
    raw = public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64url(raw),
        "kid": kid,
        "alg": "EdDSA",
        "use": "sig",
    }


def jwks_document(
    keys: Mapping[str, Union[Ed25519PublicKey, Ed25519PrivateKey]],
) -> dict:
    """A JWKS document (``{"keys": [...]}``) publishing ``keys`` (kid → key)."""
    return {"keys": [public_jwk(key, kid) for kid, key in keys.items()]}


def _jwk_to_key(index: int, entry: Any) -> tuple[str, Ed25519PublicKey] | None:
    """
    The (kid, key) of one JWKS entry, ``None`` for a usable-but-foreign entry
    (another key type or use), or ``JWKSError`` when the entry is broken.
    """
    where = f"keys[{index}]"
    if not isinstance(entry, dict):
        raise JWKSError(f"{where}: not an object")
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JWKSError(f"{where}: missing or empty kid")
    where = f"keys[{index}] (kid {kid!r})"
    if "d" in entry:
        raise JWKSError(
            f"{where}: holds private key material ('d'); publish public keys only"
        )
    if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
        log.warn(
            "JWKS: skipping {where}: kty {kty!r}/crv {crv!r} is not OKP/Ed25519",
            where=where,
            kty=entry.get("kty"),
            crv=entry.get("crv"),
        )
        return None
    if entry.get("use", "sig") != "sig" or entry.get("alg", "EdDSA") not in JWK_ALGORITHMS:
        log.warn(
            "JWKS: skipping {where}: use {use!r}/alg {alg!r} is not sig/EdDSA or Ed25519",
            where=where,
            use=entry.get("use"),
            alg=entry.get("alg"),
        )
        return None
    x = entry.get("x")
    if not isinstance(x, str):
        raise JWKSError(f"{where}: missing x")
    try:
        raw = b64url_decode(x)
    except (ValueError, binascii.Error):
        raise JWKSError(f"{where}: x is not base64url") from None
    if len(raw) != 32:
        raise JWKSError(f"{where}: x is {len(raw)} bytes, an Ed25519 key is 32")
    return kid, Ed25519PublicKey.from_public_bytes(raw)


def load_jwks(
    path_or_dict: Union[str, os.PathLike, Mapping[str, Any]],
) -> dict[str, Ed25519PublicKey]:
    """
    The Ed25519 public keys of a JWKS document, by kid.

    ``path_or_dict`` is a JWKS file's path or the already-parsed document.
    Entries of other key types (RSA, EC, X25519...) or other uses are skipped
    with a logged warning; entries that claim to be Ed25519 but are broken,
    duplicate kids, and private key material are errors (``JWKSError``, whose
    message names the entry), as is a document with no usable key at all.
    """
    if isinstance(path_or_dict, Mapping):
        document = path_or_dict
        source = "JWKS"
        if not isinstance(document.get("keys"), list):
            raise JWKSError('not a JWKS document (an object with a "keys" list)')
    else:
        source = os.fspath(path_or_dict)
        document = _read_jwks_file(source)
    return _document_keys(document, source)


def parse_jwks(data: bytes, source: str = "JWKS") -> dict[str, Ed25519PublicKey]:
    """
    The Ed25519 public keys, by kid, of a JWKS document's bytes (as fetched
    from a URL), with the rules of ``load_jwks``; ``source`` names the
    document in error messages.  At most 1 MiB is accepted.
    """
    return _document_keys(_jwks_json(data, source), source)


def _document_keys(document: Mapping[str, Any], source: str) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    for index, entry in enumerate(document["keys"]):
        try:
            found = _jwk_to_key(index, entry)
        except JWKSError as e:
            raise JWKSError(f"{source}: {e}") from None
        if found is None:
            continue
        kid, key = found
        if kid in keys:
            raise JWKSError(f"{source}: keys[{index}]: duplicate kid {kid!r}")
        keys[kid] = key
    if not keys:
        raise JWKSError(f"{source}: no Ed25519 (OKP) signing key in the document")
    return keys


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def jwks_problem(jwks_path: str, private_key_path: str, kid: str) -> str | None:
    """
    What is wrong with ``[signing] jwks`` for the key the proxy signs with,
    or ``None``: the file must be a readable JWKS whose entry ``kid`` is the
    public half of the private key at ``private_key_path``.  Shards that
    trust this document would otherwise refuse every connection
    (``unknown_kid`` or ``invalid_signature``).  The answer is one line.
    """
    try:
        published = load_jwks(jwks_path)
    except FileNotFoundError:
        return f"{jwks_path}: no such file"
    except OSError as e:
        return f"{jwks_path}: cannot be read ({e.strerror or e})"
    except JWKSError as e:
        return str(e)
    if kid not in published:
        names = ", ".join(sorted(published))
        return f"{jwks_path} has no key with the active kid {kid!r} (it has: {names})"
    try:
        private = load_private_key(private_key_path)
    except (OSError, KeyFileError):
        # The private key's own check reports what is wrong with it.
        return None
    if _raw_public(published[kid]) != _raw_public(private.public_key()):
        return (
            f"{jwks_path}: the key {kid!r} is not the public half of "
            f"{private_key_path}; shards would refuse every token"
        )
    return None


def serving_jwks(config: Any) -> bytes:
    """
    The JSON document to serve at ``/.well-known/jwks.json``.

    ``config`` is a ``Config`` or its ``SigningConfig``.  With ``[signing]
    jwks`` set, that file, once ``load_jwks`` accepts it (so no private
    material and no broken entry is ever served); without it, the public
    half of the signing key under the active kid.  Raises ``JWKSError``,
    ``KeyFileError`` or ``OSError`` when the file or key cannot be used.
    """
    signing = getattr(config, "signing", config)
    if signing.jwks:
        with open(signing.jwks, "rb") as f:
            data = f.read(_MAX_JWKS_SIZE + 1)
        _document_keys(_jwks_json(data, signing.jwks), signing.jwks)
        return data
    private = load_private_key(signing.private_key)
    document = jwks_document({signing.kid: private})
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")
