# -*- test-case-name: tests.admin.test_client -*-
"""
The client side of the admin API, for ``shardtcp ctl``: plain ``urllib``,
one request per call, every failure turned into ``AdminClientError`` with
one line to print.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from typing import Optional
from urllib.parse import quote

#: The most of an answer read (a /status of 10,000 shards fits).
MAX_ANSWER = 64 * 1024 * 1024


class AdminClientError(Exception):
    """A call failed; the message is one line for the operator."""


def admin_url(listen: str) -> str:
    """
    The URL of an ``[admin].listen`` endpoint description: ``tcp:PORT``
    with its interface (an unset or wildcard interface is reached on
    loopback); ``ssl:`` gives ``https``.
    """
    from shardtcp.config._endpoints import split_endpoint

    try:
        parts = split_endpoint(listen)
    except ValueError as e:
        raise AdminClientError(f"admin.listen {listen!r}: {e}") from None
    if parts.kind not in ("tcp", "tcp6", "ssl"):
        raise AdminClientError(f"admin.listen {listen!r}: give --admin URL for a {parts.kind or 'bare'} endpoint")
    port = parts.port_text()
    host = parts.interface() or "127.0.0.1"
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if parts.kind == "ssl" else "http"
    return f"{scheme}://{host}:{port}"


class AdminClient:
    """Calls the admin API at ``base`` (``http://host:port``) with an optional bearer ``token``."""

    def __init__(self, base: str, token: Optional[str] = None, timeout: float = 10.0) -> None:
        self._base = base.rstrip("/")
        self._token = token
        self._timeout = timeout

    def _call(self, method: str, path: str, body: Optional[bytes] = None) -> bytes:
        request = urllib.request.Request(self._base + path, data=body, method=method)
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as answer:
                return answer.read(MAX_ANSWER)
        except urllib.error.HTTPError as e:
            text = e.read(4096).decode("utf-8", "replace").strip()
            first = " / ".join(line for line in text.splitlines() if line.strip())[:500]
            raise AdminClientError(f"{method} {path}: {e.code} {first or e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise AdminClientError(f"cannot reach the admin API at {self._base}: {why}") from None

    def _json(self, method: str, path: str, body: Optional[bytes] = None) -> dict:
        data = self._call(method, path, body)
        try:
            return json.loads(data)
        except ValueError:
            raise AdminClientError(f"{method} {path}: the answer is not JSON") from None

    def status(self) -> dict:
        return self._json("GET", "/status")

    def reload(self) -> dict:
        return self._json("POST", "/reload", b"")

    def drain(self, shard_id: str) -> dict:
        return self._json("POST", f"/shards/{quote(shard_id, safe='')}/drain", b"")

    def ready(self, shard_id: str) -> dict:
        return self._json("POST", f"/shards/{quote(shard_id, safe='')}/ready", b"")

    def weight(self, shard_id: str, weight: float) -> dict:
        body = json.dumps({"weight": weight}).encode("ascii")
        return self._json("PUT", f"/shards/{quote(shard_id, safe='')}/weight", body)


def format_status(document: dict) -> str:
    """``/status`` as a few lines an operator reads in a terminal."""
    state = "serving" if document.get("ready", True) else "draining"
    registry = document.get("registry", {})
    lines = [f"{state}; workers {document.get('workers', 1)}; registry {registry.get('kind', '?')}"
             f"{' (stale)' if registry.get('stale') else ''}"]
    for listener in document.get("listeners", []):
        refused = sum(listener.get("refused", {}).values())
        lines.append(
            f"listener {listener['name']} {listener['listen']} ({listener['mode']}): "
            f"{listener['active']} open, {listener['accepted']} accepted, {refused} refused"
        )
    for service_id, service in document.get("services", {}).items():
        lines.append(f"service {service_id}: {service['in_rotation']} of {len(service['shards'])} in rotation"
                     f"{' PANIC' if service.get('panic') else ''}")
        for shard_id, shard in service["shards"].items():
            state = shard.get("admin_state") or shard.get("agent_state") or "-"
            lines.append(
                f"  {shard_id:<20} {shard['health']:<10} {state:<6} "
                f"{shard['open_connections']}/{shard['capacity']} open, weight {shard['weight']:g}, "
                f"security {shard['security_score']:g}, {shard.get('region') or '-'}"
            )
    return "\n".join(lines)


class FleetClient:
    """
    Writes fleet-wide operator overrides, ``<prefix>/admin/<shard-id>``
    (SPEC 9), to etcd's JSON gateway; every proxy of the fleet applies them.
    Plain ``urllib``; the endpoints are tried in turn.
    """

    def __init__(
        self,
        endpoints,
        prefix: str = "/shardtcp/",
        timeout: float = 10.0,
        *,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        username: Optional[str] = None,
        password: Optional[str] = None,
    ) -> None:
        self._endpoints = [url.rstrip("/") for url in endpoints]
        if not self._endpoints:
            raise AdminClientError("give at least one etcd endpoint")
        self._prefix = prefix.rstrip("/") + "/admin/"
        self._timeout = timeout
        # https endpoints: verified against ``ca`` (else the system's
        # roots), with the client certificate when etcd asks for one
        self._context = None
        if ca is not None or cert is not None or any(u.startswith("https:") for u in self._endpoints):
            try:
                self._context = ssl.create_default_context(cafile=ca)
                if cert is not None:
                    self._context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as e:
                raise AdminClientError(f"etcd TLS: {e}") from None
        self._username = username
        self._password = password
        self._token: Optional[str] = None

    def _authenticate(self) -> None:
        """An etcd auth token for ``username``/``password`` (once per client)."""
        answer = self._post("/v3/auth/authenticate", {"name": self._username, "password": self._password or ""},
                            token=None)
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise AdminClientError("etcd auth: no token in the answer")
        self._token = token

    def _call(self, path: str, document: dict) -> dict:
        if self._username is not None and self._token is None:
            self._authenticate()
        return self._post(path, document, token=self._token)

    def _post(self, path: str, document: dict, *, token: Optional[str]) -> dict:
        body = json.dumps(document).encode("ascii")
        problems = []
        for base in self._endpoints:
            request = urllib.request.Request(base + path, data=body, method="POST")
            request.add_header("Content-Type", "application/json")
            if token:
                request.add_header("Authorization", token)
            try:
                with urllib.request.urlopen(request, timeout=self._timeout, context=self._context) as answer:
                    data = answer.read(MAX_ANSWER)
            except urllib.error.HTTPError as e:
                raise AdminClientError(f"etcd {base}{path}: {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError) as e:
                problems.append(f"{base}: {getattr(e, 'reason', e)}")
                continue
            try:
                return json.loads(data)
            except ValueError:
                raise AdminClientError(f"etcd {base}{path}: the answer is not JSON") from None
        raise AdminClientError("cannot reach etcd: " + "; ".join(problems))

    def _key(self, shard_id: str) -> str:
        return base64.b64encode((self._prefix + shard_id).encode("utf-8")).decode("ascii")

    def override(self, shard_id: str) -> dict:
        """The shard's fleet-wide override now ({} when none)."""
        answer = self._call("/v3/kv/range", {"key": self._key(shard_id)})
        for kv in answer.get("kvs", []):
            try:
                document = json.loads(base64.b64decode(kv.get("value", "")))
            except ValueError:
                return {}
            return document if isinstance(document, dict) else {}
        return {}

    def _write(self, shard_id: str, change: dict) -> dict:
        document = {k: v for k, v in self.override(shard_id).items() if k in ("state", "weight")}
        document.update(change)
        value = base64.b64encode(json.dumps(document, sort_keys=True).encode("utf-8")).decode("ascii")
        self._call("/v3/kv/put", {"key": self._key(shard_id), "value": value})
        return {"shard": shard_id, "fleet": document}

    def drain(self, shard_id: str) -> dict:
        return self._write(shard_id, {"state": "drain"})

    def ready(self, shard_id: str) -> dict:
        return self._write(shard_id, {"state": "ready"})

    def weight(self, shard_id: str, weight: float) -> dict:
        if not weight >= 0:
            raise AdminClientError(f"weight must not be negative, not {weight!r}")
        return self._write(shard_id, {"weight": weight})

    def clear(self, shard_id: str) -> dict:
        """Delete the override: every proxy goes back to the shard's own state and weight."""
        self._call("/v3/kv/deleterange", {"key": self._key(shard_id)})
        return {"shard": shard_id, "fleet": None}
