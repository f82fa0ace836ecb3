# -*- test-case-name: tests.proxy.test_listener -*-
"""
The PROXY v2 header a shard receives: connection facts in, bytes out.

One function, ``build_header``, turns what the proxy knows of a connection
into the header written first on the shard connection: the addresses, the
ALPN, AUTHORITY, UNIQUE_ID and SSL TLVs, and the PolicyContext signed for
that one shard (its ``aud``).  It does no I/O; it raises ``PolicyTooLarge``
when the token would not fit the TLV.
"""

from __future__ import annotations

from typing import Optional

from shardtcp import proxyv2
from shardtcp.policy import PolicyContext, PolicySigner, TLSFacts

__all__ = ["build_header"]


def build_header(
    signer: PolicySigner,
    tlv_type: int,
    *,
    shard_id: str,
    connection_id: str,
    service: str,
    policy: PolicyContext,
    client: tuple,
    destination: tuple,
    name: Optional[str],
    sni: Optional[str],
    tls: TLSFacts,
) -> bytes:
    """
    The PROXY v2 header for ``shard_id``.

    ``name`` is the identified server name (the AUTHORITY TLV), ``sni`` the
    same name when it came from a ClientHello (the token's ``sni`` claim),
    ``tls`` what the client's encryption was.
    """
    token = signer.sign(
        policy=policy,
        audience=shard_id,
        connection_id=connection_id,
        service=service,
        source=client,
        destination=destination,
        subject=tls.subject,
        sni=sni,
    )
    tlvs = []
    if tls.alpn:
        tlvs.append((proxyv2.PP2_TYPE_ALPN, tls.alpn.encode("ascii", "replace")))
    if name:
        tlvs.append((proxyv2.PP2_TYPE_AUTHORITY, name.encode("utf-8")))
    tlvs.append((proxyv2.PP2_TYPE_UNIQUE_ID, connection_id.encode("ascii")))
    if tls.ssl is not None:
        tlvs.append((proxyv2.PP2_TYPE_SSL, tls.ssl.to_bytes()))
    tlvs.append((tlv_type, token))
    # No ProxyHeader value on the way: the same bytes and checks.
    return proxyv2.encode_proxy(client, destination, tlvs)
