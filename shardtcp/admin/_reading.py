# -*- test-case-name: tests.admin.test_resources -*-
"""
The read-only admin resources: ``/metrics``, ``/status``, ``/ready``,
``/explain`` and ``/.well-known/jwks.json``.
"""

from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST

from shardtcp.admin._http import Leaf, as_json, text
from shardtcp.model import ConnectionRequest
from shardtcp.net import parse_ip
from shardtcp.status import render_status

#: The longest query value /explain reads (service ids, names, addresses).
MAX_QUERY_VALUE = 253


class MetricsResource(Leaf):
    """``GET /metrics``: the proxy's registry in the Prometheus text format."""

    def __init__(self, metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return self._metrics.render()


class ReadyResource(Leaf):
    """``GET /ready``: 200 while serving, 503 while draining."""

    def __init__(self, serving: Callable[[], bool]) -> None:
        super().__init__()
        self._serving = serving

    def render_GET(self, request):
        if self._serving():
            return text(request, 200, "ready")
        return text(request, 503, "draining")


class StatusResource(Leaf):
    """``GET /status``: the document ``status_document`` builds, as JSON."""

    def __init__(self, document: Callable[[], dict]) -> None:
        super().__init__()
        self._document = document

    def render_GET(self, request):
        return as_json(request, self._document())


def status_document(
    resolver, metrics, listeners, serving: Callable[[], bool], feeds: Optional[Callable[[], dict]] = None,
    registry: Optional[Callable[[], dict]] = None,
) -> dict:
    """
    ``/status``: ``render_status`` of the resolver's snapshot, plus the
    listeners with their counters, refusals by reason, drain state,
    workers, registry freshness and, when given, the threat feeds'
    status (``feeds()``, under ``"threat_intel"``).  ``registry()``, when
    given, is the etcd registry's status (``EtcdShardSource.status``);
    without it the registry is the static file.
    """
    document = render_status(resolver.snapshot())
    refusals = metrics.refusals()
    document["listeners"] = [
        {
            "name": listener.name,
            "listen": listener.listen,
            "mode": listener.mode,
            "accepted": int(metrics.value("shardtcp_connections_accepted_total", listener=listener.name)),
            "active": int(metrics.value("shardtcp_connections_active", listener=listener.name)),
            "refused": {reason: int(n) for reason, n in sorted(refusals.get(listener.name, {}).items())},
        }
        for listener in listeners
    ]
    serving = bool(serving())
    document["ready"] = serving
    document["draining"] = not serving
    document["workers"] = 1
    document["registry"] = registry() if registry is not None else {"kind": "static", "stale": False}
    if feeds is not None:
        document["threat_intel"] = feeds()
    return document


#: The query parameters of ``/explain`` (``key``: a shard key, for services routing by key).
_EXPLAIN_PARAMETERS = (b"service", b"client", b"sni", b"key")


class ExplainResource(Leaf):
    """
    ``GET /explain?service=S&client=IP[&sni=N][&key=K]``: the ranking the resolver
    would make now (``ShardResolver.explain``, the pipeline ``resolve``
    runs), as the JSON ``shardtcp explain --json`` prints.  Bad input is a
    400 with one line.
    """

    def __init__(self, resolver) -> None:
        super().__init__()
        self._resolver = resolver

    def render_GET(self, request):
        from shardtcp.cli import explanation_json
        from shardtcp.resolver.service import UnknownService

        args = request.args
        values = {}
        for name in _EXPLAIN_PARAMETERS:
            given = args.get(name, [])
            if len(given) > 1:
                return text(request, 400, f"give {name.decode()} once")
            if given:
                try:
                    value = given[0].decode("utf-8")
                except UnicodeDecodeError:
                    return text(request, 400, f"{name.decode()} is not UTF-8")
                if len(value) > MAX_QUERY_VALUE or not value.isprintable():
                    return text(request, 400, f"{name.decode()} is too long or not printable")
                values[name.decode()] = value
        unknown = sorted(k.decode("utf-8", "replace") for k in args if k not in _EXPLAIN_PARAMETERS)
        if unknown:
            return text(request, 400, f"unknown query parameter {unknown[0][:40]!r}: use service, client, sni, key")
        for required in ("service", "client"):
            if not values.get(required):
                return text(request, 400, f"{required} is required: /explain?service=S&client=IP[&sni=NAME]")
        if parse_ip(values["client"]) is None:
            return text(request, 400, f"client {values['client']!r} is not an IP address")
        explanation_request = ConnectionRequest(
            service_id=values["service"], client=(values["client"], 0), sni=values.get("sni"), listener="explain"
        )
        try:
            explanation = self._resolver.explain(explanation_request, key=values.get("key"))
        except UnknownService:
            return text(request, 400, f"unknown service {values['service']!r}")
        return as_json(request, explanation_json(explanation))


class JWKSResource(Leaf):
    """``GET /.well-known/jwks.json``: the policy-signing public keys."""

    def __init__(self, document: bytes) -> None:
        super().__init__()
        self._document = document

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"application/jwk-set+json")
        request.setHeader(b"Cache-Control", b"max-age=60")
        return self._document
