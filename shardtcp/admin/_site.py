# -*- test-case-name: tests.admin.test_resources -*-
"""
The admin site: the resource tree over the collaborators it is given.

``build_admin_site`` takes every collaborator as an argument (the
resolver's ``IResolverControl``, the metrics, a readiness callable, an
``IReloader``, the JWKS document, the token and the listeners to show) and
returns a ``twisted.web.server.Site``; nothing here reaches into the proxy.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import attrs
from twisted.web.resource import Resource
from twisted.web.server import Site

from shardtcp.admin._changes import ReloadResource, ShardsResource
from shardtcp.admin._http import Guard, Leaf, NotFound
from shardtcp.admin._page import render_page
from shardtcp.admin._reading import (
    ExplainResource,
    JWKSResource,
    MetricsResource,
    ReadyResource,
    StatusResource,
    status_document,
)
from shardtcp.model import ConnectionRequest

#: Seconds an idle admin connection is kept (Twisted's default is 12 hours).
ADMIN_IDLE_TIMEOUT = 30

#: The client address the page scores shards for: in no ``[geo]`` network,
#: so the proxy's own place stands for the client.
PAGE_VIEWPOINT = "0.0.0.0"


@attrs.frozen
class ListenerView:
    """What the admin interface shows of a listener."""

    name: str
    listen: str
    mode: str


class PageResource(Leaf):
    """``GET /``: the HTML status page."""

    def __init__(self, document: Callable[[], dict], scores: Callable[[], dict]) -> None:
        super().__init__()
        self._document = document
        self._scores = scores

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", b"default-src 'none'; style-src 'unsafe-inline'")
        return render_page(self._document(), self._scores()).encode("utf-8")


def page_scores(resolver) -> dict:
    """service -> shard -> its factors, scored from ``PAGE_VIEWPOINT``."""
    scores: dict = {}
    for service in resolver.services():
        explanation = resolver.explain(ConnectionRequest(service_id=service.id, client=(PAGE_VIEWPOINT, 0)))
        scores[service.id] = {
            s.shard.shard_id: {
                "latency": s.evaluation.latency,
                "security": s.evaluation.security,
                "load": s.evaluation.load,
                "total": s.evaluation.total,
            }
            for s in explanation.shards
        }
    return scores


class AdminRoot(Resource):
    """``/`` and its children; an unknown path is a one-line 404."""

    def __init__(self, page: PageResource) -> None:
        super().__init__()
        self._page = page

    def getChild(self, path, request):
        if path == b"" and not request.postpath:
            return self._page
        return NotFound()

    def render(self, request):
        return self._page.render(request)


class AdminSite(Site):
    """The admin ``Site``; its log prefix names it in twistd's log."""

    def logPrefix(self) -> str:
        return "shardtcp-admin"


def build_admin_site(
    *,
    resolver,
    metrics,
    serving: Callable[[], bool],
    reloader,
    jwks: bytes,
    token: Optional[bytes],
    listeners: Sequence[ListenerView] = (),
    feeds: Optional[Callable[[], dict]] = None,
    reactor=None,
    registry: Optional[Callable[[], dict]] = None,
) -> AdminSite:
    """
    The admin site over its collaborators; see the module docstring.
    ``serving()`` is True while the proxy takes new connections;
    ``reloader`` (an ``IReloader``) may be None, then ``/reload`` says it
    is not available.  ``token`` None makes the interface read-only.
    ``feeds()``, when given, is the threat feeds' status shown in
    ``/status``, and ``registry()`` the etcd registry's.  ``reactor`` is the HTTP layer's (timeouts, dates); the global one when
    not given.
    """
    guard = Guard(token)
    listeners = tuple(listeners)

    def document() -> dict:
        return status_document(resolver, metrics, listeners, serving, feeds, registry)

    page = PageResource(document, lambda: page_scores(resolver))
    root = AdminRoot(page)
    root.putChild(b"metrics", MetricsResource(metrics))
    root.putChild(b"status", StatusResource(document))
    root.putChild(b"ready", ReadyResource(serving))
    root.putChild(b"explain", ExplainResource(resolver))
    root.putChild(b".well-known", _WellKnown(jwks))
    root.putChild(b"shards", ShardsResource(resolver, guard, metrics))
    root.putChild(b"reload", ReloadResource(reloader, guard, metrics))
    site = AdminSite(root, reactor=reactor, timeout=ADMIN_IDLE_TIMEOUT)
    site.displayTracebacks = False
    return site


class _WellKnown(Resource):
    """``/.well-known/``: only ``jwks.json``."""

    def __init__(self, jwks: bytes) -> None:
        super().__init__()
        self.putChild(b"jwks.json", JWKSResource(jwks))

    def getChild(self, path, request):
        return NotFound()

    def render(self, request):
        return NotFound().render(request)
