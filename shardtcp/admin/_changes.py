# -*- test-case-name: tests.admin.test_resources -*-
"""
The admin resources that change something, each behind the bearer token:
``POST /shards/<id>/drain``, ``POST /shards/<id>/ready``,
``PUT /shards/<id>/weight`` and ``POST /reload``.

A refused request (no token, a wrong one, a bad value) changes nothing;
every change, and every refusal, is logged with the caller's address.
"""

from __future__ import annotations

import json
import math
from typing import Optional

from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET

from shardtcp.admin._http import Guard, Leaf, NotFound, as_json, lines, log, read_body, text, who

#: The bounds of a weight set through the API (0 takes no new connections).
MIN_WEIGHT = 0.0
MAX_WEIGHT = 1000.0

#: The longest shard id looked up (ids come from the configuration).
MAX_SHARD_ID = 200


class ShardsResource(Leaf):
    """``/shards/<id>/...``: one ``ShardResource`` per known shard id."""

    def __init__(self, resolver, guard: Guard, metrics) -> None:
        super().__init__()
        self._resolver = resolver
        self._guard = guard
        self._metrics = metrics

    def getChild(self, path, request):
        try:
            shard_id = path.decode("utf-8")
        except UnicodeDecodeError:
            return NotFound()
        if not shard_id or len(shard_id) > MAX_SHARD_ID or not _known(self._resolver, shard_id):
            return NotFound()
        return ShardResource(shard_id, self._resolver, self._guard, self._metrics)

    def render(self, request):
        return NotFound().render(request)


def _known(resolver, shard_id: str) -> bool:
    return any(shard.id == shard_id for service in resolver.services() for shard in service.shards)


class ShardResource(Leaf):
    """``/shards/<id>``: its ``drain``, ``ready`` and ``weight`` children."""

    def __init__(self, shard_id: str, resolver, guard: Guard, metrics) -> None:
        super().__init__()
        self.putChild(b"drain", AdminStateResource(shard_id, "drain", resolver, guard, metrics))
        self.putChild(b"ready", AdminStateResource(shard_id, "ready", resolver, guard, metrics))
        self.putChild(b"weight", WeightResource(shard_id, resolver, guard, metrics))

    def render(self, request):
        return NotFound().render(request)


class AdminStateResource(Leaf):
    """``POST /shards/<id>/drain`` or ``/ready``: the operator's override."""

    def __init__(self, shard_id: str, state: str, resolver, guard: Guard, metrics) -> None:
        super().__init__()
        self._shard_id = shard_id
        self._state = state
        self._resolver = resolver
        self._guard = guard
        self._metrics = metrics

    def render_POST(self, request):
        action = f"{self._state} shard {self._shard_id}"
        refusal = self._guard.refusal(request, action)
        if refusal is not None:
            self._metrics.admin_changes.labels(self._state, "unauthorized").inc()
            return refusal
        self._resolver.set_admin_state(self._shard_id, self._state)
        self._metrics.admin_changes.labels(self._state, "done").inc()
        log.info("admin: {who} set shard {shard} to {state}", who=who(request), shard=self._shard_id,
                 state=self._state, admin_action=self._state)
        return as_json(request, {"shard": self._shard_id, "admin_state": self._state})


def parse_weight(body: bytes) -> tuple[Optional[float], Optional[str]]:
    """
    ``(weight, None)`` from a body holding a number or ``{"weight": W}``,
    or ``(None, one line saying what is wrong)``.  The weight must be a
    finite number from ``MIN_WEIGHT`` to ``MAX_WEIGHT``.
    """
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, 'the body must be a number or {"weight": W}'
    if isinstance(value, dict):
        if set(value) != {"weight"}:
            return None, 'the body must be a number or {"weight": W}, and nothing else'
        value = value["weight"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, "weight must be a number"
    if isinstance(value, int) and abs(value) > 10**15:
        return None, f"weight must be from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}"
    weight = float(value)
    if not math.isfinite(weight) or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        return None, f"weight must be from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}"
    return weight, None


class WeightResource(Leaf):
    """``PUT /shards/<id>/weight``: override the shard's weight."""

    def __init__(self, shard_id: str, resolver, guard: Guard, metrics) -> None:
        super().__init__()
        self._shard_id = shard_id
        self._resolver = resolver
        self._guard = guard
        self._metrics = metrics

    def render_PUT(self, request):
        refusal = self._guard.refusal(request, f"set the weight of shard {self._shard_id}")
        if refusal is not None:
            self._metrics.admin_changes.labels("weight", "unauthorized").inc()
            return refusal
        body = read_body(request)
        if body is None:
            self._metrics.admin_changes.labels("weight", "invalid").inc()
            return text(request, 413, "the body is too large for a weight")
        weight, problem = parse_weight(body)
        if problem is not None:
            self._metrics.admin_changes.labels("weight", "invalid").inc()
            log.info("admin: {who} sent a bad weight for shard {shard}: {problem}",
                     who=who(request), shard=self._shard_id, problem=problem)
            return text(request, 400, problem)
        self._resolver.set_weight(self._shard_id, weight)
        self._metrics.admin_changes.labels("weight", "done").inc()
        log.info("admin: {who} set the weight of shard {shard} to {weight:g}", who=who(request),
                 shard=self._shard_id, weight=weight, admin_action="weight")
        return as_json(request, {"shard": self._shard_id, "weight": weight})


class ReloadResource(Leaf):
    """
    ``POST /reload``: run the ``IReloader``; 200 with its summary, or 400
    with the problem lines while the running configuration stays.
    """

    def __init__(self, reloader, guard: Guard, metrics) -> None:
        super().__init__()
        self._reloader = reloader
        self._guard = guard
        self._metrics = metrics

    def render_POST(self, request):
        refusal = self._guard.refusal(request, "reload")
        if refusal is not None:
            self._metrics.admin_changes.labels("reload", "unauthorized").inc()
            return refusal
        if self._reloader is None:
            return text(request, 503, "reload is not available in this process")
        caller = who(request)
        log.info("admin: {who} asked for a reload", who=caller, admin_action="reload")
        finished = []
        request.notifyFinish().addErrback(lambda _: finished.append(True))
        d = self._reloader.reload()
        d.addCallbacks(self._reloaded, self._refused, callbackArgs=(request, caller, finished),
                       errbackArgs=(request, caller, finished))
        return NOT_DONE_YET

    def _reloaded(self, summary, request, caller, finished) -> None:
        self._metrics.record_reload("api", True)
        self._metrics.admin_changes.labels("reload", "done").inc()
        log.info("admin: reload asked by {who} applied: {summary}", who=caller, summary=summary)
        if not finished:
            request.write(as_json(request, summary))
            request.finish()

    def _refused(self, failure: Failure, request, caller, finished) -> None:
        from shardtcp.config import ConfigError

        self._metrics.record_reload("api", False)
        self._metrics.admin_changes.labels("reload", "invalid").inc()
        if failure.check(ConfigError):
            problems = list(failure.value.problems) or ["the configuration is not valid"]
            code = 400
        else:
            problems = [f"reload failed: {failure.getErrorMessage() or failure.type.__name__}"]
            code = 500
        log.warn("admin: reload asked by {who} refused: {problems}", who=caller, problems="; ".join(problems))
        if not finished:
            request.write(lines(request, code, problems))
            request.finish()
