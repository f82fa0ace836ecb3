"""
``shardtcp decode-header``: read a captured PROXY header and say what it
holds, TLV by TLV, and whether its PolicyContext verifies.

The capture may be raw bytes (as written on the wire, possibly followed by
application bytes) or hex (whitespace ignored).  With ``--jwks`` the token's
signature is checked with the key its ``kid`` names, and its binding to the
header (``src``/``dst`` against the addresses, ``jti`` against UNIQUE_ID) is
checked too.  The signature and the claims are reported apart: a token
signed by a trusted key but meant for another shard says so, rather than
calling its signature invalid.  Expiry is reported against the current time
but does not fail the check, since captures are usually looked at after the
fact.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from typing import Optional

from shardtcp import proxyv2
from shardtcp import jws
from shardtcp.policy import PolicyError, check_claims, format_address, verify_signature

_TLV_NAMES = {
    proxyv2.PP2_TYPE_ALPN: "ALPN",
    proxyv2.PP2_TYPE_AUTHORITY: "AUTHORITY",
    proxyv2.PP2_TYPE_CRC32C: "CRC32C",
    proxyv2.PP2_TYPE_NOOP: "NOOP",
    proxyv2.PP2_TYPE_UNIQUE_ID: "UNIQUE_ID",
    proxyv2.PP2_TYPE_SSL: "SSL",
    proxyv2.PP2_TYPE_NETNS: "NETNS",
}


def read_capture(data: bytes) -> bytes:
    """Raw bytes as they are, or hex decoded."""
    if data.startswith(proxyv2.SIGNATURE[:4]) or data.startswith(b"PROXY "):
        return data
    text = b"".join(data.split())
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return data


def _show_address(address: tuple) -> str:
    # A UNIX header carries paths, shown as they are.
    try:
        return format_address(address)
    except ValueError:
        return repr(address[0])


def _b64json(part: str) -> dict:
    padded = part + "=" * (-len(part) % 4)
    return json.loads(base64.urlsafe_b64decode(padded))


def describe(data: bytes, *, jwks: Optional[str] = None, audience: Optional[str] = None, now=time.time) -> tuple[list, bool]:
    """
    Lines describing the header in ``data``, and whether all checks passed.
    """
    lines = []
    try:
        header, rest = proxyv2.parse(data, accept_v1=True)
    except proxyv2.InvalidProxyHeader as e:
        return [f"invalid PROXY header: {e}"], False
    ok = True
    lines.append(
        f"version {header.version}, command {header.command.name}, "
        f"family {header.family}, transport {header.transport}"
    )
    if header.source is not None:
        lines.append(f"source {_show_address(header.source)}")
        lines.append(f"destination {_show_address(header.destination)}")
    token = None
    for tlv_type, value in header.tlvs:
        name = _TLV_NAMES.get(tlv_type, f"0x{tlv_type:02X}")
        if tlv_type == proxyv2.PP2_TYPE_SSL:
            ssl_info = proxyv2.SSLInfo.from_bytes(value)
            lines.append(f"TLV {name}: {ssl_info}")
        elif tlv_type == proxyv2.PP2_TYPE_CRC32C:
            lines.append(f"TLV {name}: {value.hex()} (matches)")
        elif 0xE0 <= tlv_type <= 0xEF and value.count(b".") == 2:
            token = value
            lines.append(f"TLV {name}: PolicyContext, {len(value)} bytes")
        else:
            lines.append(f"TLV {name}: {value.decode('utf-8', 'replace')!r}")
    if rest:
        lines.append(f"{len(rest)} bytes follow the header")
    if token is None:
        lines.append("no PolicyContext TLV")
        return lines, ok and jwks is None
    try:
        head_b64, claims_b64, _ = token.decode("ascii").split(".")
        jose = _b64json(head_b64)
        claims = _b64json(claims_b64)
    except (ValueError, UnicodeDecodeError) as e:
        lines.append(f"PolicyContext is not a readable JWS: {e}")
        return lines, False
    if not isinstance(jose, dict) or not isinstance(claims, dict):
        lines.append("PolicyContext is not a readable JWS: header or claims not a JSON object")
        return lines, False
    lines.append("token header " + json.dumps(jose, sort_keys=True))
    lines.append("claims " + json.dumps(claims, sort_keys=True))
    exp = claims.get("exp")
    if jws.numeric_date(exp):
        left = exp - now()
        lines.append(f"expires {'in' if left >= 0 else 'since'} {abs(left):.0f}s")
    if jwks is None:
        return lines, ok
    from shardtcp.keys import load_jwks

    try:
        keys = load_jwks(jwks)
        verify_signature(token, keys)
    except (PolicyError, ValueError, OSError) as e:
        lines.append(f"signature NOT valid: {e}")
        return lines, False
    lines.append(f"signature valid (kid {jose.get('kid')!r})")
    # Time is judged at issue, since captures are read after the fact.
    iat = claims.get("iat")
    try:
        check_claims(
            claims,
            audience=audience or str(claims.get("aud", "")),
            now=lambda: float(iat if jws.numeric_date(iat) else now()),
        )
    except PolicyError as e:
        lines.append(f"claims NOT valid: {e}")
        ok = False
    if header.source is not None:
        for claim, address in (("src", header.source), ("dst", header.destination)):
            if claims.get(claim) != _show_address(address):
                lines.append(f"{claim} {claims.get(claim)!r} does not match the header's {_show_address(address)}")
                ok = False
    if claims.get("jti") != header.unique_id:
        lines.append(f"jti {claims.get('jti')!r} does not match UNIQUE_ID {header.unique_id!r}")
        ok = False
    if ok:
        lines.append("binding valid (src, dst, jti)")
    return lines, ok


def decode_header_file(path: str, *, jwks: Optional[str] = None, audience: Optional[str] = None) -> int:
    """The ``decode-header`` subcommand; returns the exit status."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
    except OSError as e:
        print(f"shardtcp decode-header: {e}", file=sys.stderr)
        return 1
    lines, ok = describe(read_capture(data), jwks=jwks, audience=audience)
    for line in lines:
        print(line)
    return 0 if ok else 1
