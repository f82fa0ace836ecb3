# -*- test-case-name: tests.admin.test_resources -*-
"""
Small helpers the admin resources share: plain-text and JSON answers, the
caller's address, and the bearer-token guard.
"""

from __future__ import annotations

import hmac
import json
from typing import Optional

from twisted.logger import Logger
from twisted.web.resource import Resource

log = Logger(namespace="shardtcp.admin")

#: The largest request body a change may carry (a weight, a small JSON).
MAX_BODY = 1024


def text(request, code: int, line: str) -> bytes:
    """Answer ``code`` with one line of plain text."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return (line.rstrip("\n") + "\n").encode("utf-8")


def lines(request, code: int, problems) -> bytes:
    """Answer ``code`` with one problem per line."""
    return text(request, code, "\n".join(problems))


def as_json(request, document, code: int = 200, content_type: bytes = b"application/json") -> bytes:
    """Answer ``code`` with ``document`` as JSON."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Cache-Control", b"no-store")
    # Compact: indenting costs several times the encoding for a /status of
    # thousands of shards, all of it on the reactor thread.
    return (json.dumps(document, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def who(request) -> str:
    """The caller's address as ``host:port``, for the log of changes."""
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_body(request) -> Optional[bytes]:
    """The request body, or None when it is larger than ``MAX_BODY``."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data = content.read(MAX_BODY + 1)
    return None if len(data) > MAX_BODY else data


class Guard:
    """
    Decides whether a request may change something: it must carry
    ``Authorization: Bearer <token>`` with the configured token, compared
    in constant time.  Without a configured token every change is refused
    (the admin endpoint is then read-only).
    """

    def __init__(self, token: Optional[bytes]) -> None:
        self._token = token

    def refusal(self, request, action: str) -> Optional[bytes]:
        """None when ``request`` may go on; else the answer to send (401 or 403)."""
        if self._token is None:
            log.warn("admin: {who} asked to {action}: refused, no admin.token_file configured",
                     who=who(request), action=action)
            return text(request, 403, "changes are disabled: no admin.token_file is configured")
        header = request.getHeader(b"authorization") or b""
        scheme, _, presented = header.partition(b" ")
        presented = presented.strip()
        if scheme.lower() != b"bearer" or not hmac.compare_digest(presented, self._token):
            log.warn("admin: {who} asked to {action}: refused, {why}",
                     who=who(request), action=action,
                     why="no bearer token" if not presented else "wrong token")
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="shardtcp"')
            return text(request, 401, "a valid Authorization: Bearer token is required")
        return None


def allowed_methods(resource) -> list[bytes]:
    """The methods ``resource`` has a ``render_<METHOD>`` for (HEAD with GET)."""
    methods = {name[len("render_"):] for name in dir(resource) if name.startswith("render_")}
    # Resource defines render_HEAD for everyone, in terms of render_GET.
    methods.discard("HEAD")
    if "GET" in methods:
        methods.add("HEAD")
    return [m.encode("ascii") for m in sorted(methods)]


class Leaf(Resource):
    """
    A resource without children (anything below it is a 404) that answers
    a method it does not handle with 405 and an ``Allow`` header, whatever
    the method (Twisted answers 501 for methods beyond GET, HEAD, POST).
    """

    isLeaf = False

    def getChild(self, path, request):
        return NotFound()

    def render(self, request):
        method = request.method.decode("ascii", "replace")
        if method == "HEAD":
            handler = getattr(self, "render_GET", None)
        else:
            handler = getattr(self, f"render_{method}", None)
        if handler is None:
            allowed = allowed_methods(self)
            request.setHeader(b"Allow", b", ".join(allowed))
            return text(request, 405, f"method {method[:20]} not allowed here; allowed: "
                        f"{', '.join(m.decode() for m in allowed)}")
        return handler(request)


class NotFound(Resource):
    """404 with one line, for every method."""

    isLeaf = True

    def render(self, request):
        return text(request, 404, f"no such admin resource: {request.path.decode('latin-1')[:200]}")
