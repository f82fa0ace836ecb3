# -*- test-case-name: tests.admin -*-
"""
The admin interface on ``[admin].listen`` (SPEC section 6): metrics,
status, explain, readiness, the JWKS, the status page at ``/`` and the
token-guarded changes (drain, ready, weight, reload).

``admin_site_for`` reads what the configuration names (the token file, the
JWKS file or the signing key) and calls ``build_admin_site``, which takes
every collaborator as an argument.  ``shardtcp.admin.client`` is the
other end, used by ``shardtcp ctl``.
"""

from __future__ import annotations

import json
from typing import Callable, Optional, Sequence

from shardtcp.admin._site import AdminSite, ListenerView, build_admin_site
from shardtcp.admin.interfaces import IReloader

__all__ = [
    "AdminError",
    "AdminSite",
    "IReloader",
    "ListenerView",
    "admin_site_for",
    "build_admin_site",
    "jwks_for",
    "read_token",
]

#: The largest token file read.
MAX_TOKEN_BYTES = 4096


class AdminError(Exception):
    """The admin interface cannot be set up; the message is one line."""


def read_token(path: str) -> bytes:
    """The bearer token in ``path`` (surrounding whitespace dropped)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as e:
        raise AdminError(f"admin.token_file: cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_TOKEN_BYTES:
        raise AdminError(f"admin.token_file: {path} is larger than {MAX_TOKEN_BYTES} bytes")
    token = data.strip()
    if not token:
        raise AdminError(f"admin.token_file: {path} is empty")
    if any(b <= 0x20 or b >= 0x7F for b in token):
        raise AdminError(f"admin.token_file: {path} must hold one token of printable ASCII without spaces")
    return token


def jwks_for(signing) -> bytes:
    """
    The JWKS to serve: the ``[signing] jwks`` file when configured (it
    must parse as a JWKS holding the active kid), else one built from the
    signing key's public half.
    """
    from shardtcp.keys import jwks_document, load_private_key

    if signing.jwks:
        try:
            with open(signing.jwks, "rb") as f:
                data = f.read(1024 * 1024 + 1)
            document = json.loads(data)
        except OSError as e:
            raise AdminError(f"signing.jwks: cannot read {signing.jwks}: {e.strerror or e}") from None
        except ValueError as e:
            raise AdminError(f"signing.jwks: {signing.jwks} is not JSON: {e}") from None
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise AdminError(f'signing.jwks: {signing.jwks} has no "keys" list')
        if not any(isinstance(k, dict) and k.get("kid") == signing.kid for k in keys):
            raise AdminError(f"signing.jwks: {signing.jwks} does not hold the active kid {signing.kid!r}")
        return data
    document = jwks_document({signing.kid: load_private_key(signing.private_key)})
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def admin_site_for(
    config,
    *,
    resolver,
    metrics,
    serving: Callable[[], bool],
    reloader: Optional[IReloader] = None,
    feeds: Optional[Callable[[], dict]] = None,
    registry: Optional[Callable[[], dict]] = None,
) -> AdminSite:
    """
    The admin site of a configuration that has an ``[admin]`` table;
    ``feeds`` is the threat feeds' ``status`` when feeds are configured.
    """
    admin = config.admin
    token = read_token(admin.token_file) if admin.token_file else None
    listeners: Sequence[ListenerView] = tuple(
        ListenerView(name=l.name, listen=l.listen, mode=l.mode) for l in config.listeners
    )
    return build_admin_site(
        resolver=resolver,
        metrics=metrics,
        serving=serving,
        reloader=reloader,
        jwks=jwks_for(config.signing),
        token=token,
        listeners=listeners,
        feeds=feeds,
        registry=registry,
    )
