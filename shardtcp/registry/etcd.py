# -*- test-case-name: tests.registry.test_etcd -*-
"""
A small etcd v3 client over its JSON gateway (``/v3/...``), inside the reactor.

It speaks the few calls a registry needs: ``range`` over a prefix, ``put``
(optionally under a lease), ``delete``, lease ``grant`` / ``keepalive`` /
``revoke``, and a streaming ``watch`` from a revision.  Keys and values are
bytes; the gateway's base64 and its int64-as-string numbers stay in here.

Every call is bounded: a timeout per request, a size bound on every answer
(and on each line of a watch stream), and the endpoints tried in turn, so one
dead member of a cluster costs one timeout.  It imports nothing of the
project, so the shard side (``shardtcp.backend``) can use it too.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable, Optional, Sequence

import attrs
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, returnValue, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

log = Logger(namespace="shardtcp.registry")

#: The largest answer (or watch line) taken from etcd: a range of a few
#: thousand shard records fits many times over.
MAX_ANSWER = 16 * 1024 * 1024


class EtcdError(Exception):
    """etcd could not be reached, or answered with an error."""


class EtcdAuthError(EtcdError):
    """etcd refused the call's credentials (no token, or one it no longer knows)."""


class WatchCompacted(EtcdError):
    """The watch's start revision was compacted away; re-read everything."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


@attrs.frozen
class KeyValue:
    """One key as etcd holds it."""

    key: bytes
    value: bytes
    mod_revision: int = 0
    lease: int = 0


@attrs.frozen
class Event:
    """A change seen by a watch: ``kind`` is ``"put"`` or ``"delete"``."""

    kind: str
    kv: KeyValue


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key under ``prefix``."""
    ending = bytearray(prefix)
    while ending:
        if ending[-1] < 0xFF:
            ending[-1] += 1
            return bytes(ending)
        ending.pop()
    return b"\0"  # every key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _kv(raw: dict) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(raw.get("key", "")),
        value=base64.b64decode(raw.get("value", "")),
        mod_revision=int(raw.get("mod_revision", 0)),
        lease=int(raw.get("lease", 0)),
    )


@implementer(IBodyProducer)
class _JSONBody:
    """A request body already in memory."""

    def __init__(self, document: dict) -> None:
        self._data = json.dumps(document).encode("utf-8")
        self.length = len(self._data)

    def startProducing(self, consumer) -> Deferred:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Collect(Protocol):
    """Collects a response body up to ``MAX_ANSWER`` bytes."""

    def __init__(self, done: Deferred) -> None:
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_ANSWER:
            self.transport.stopProducing()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if self._size > MAX_ANSWER:
            self._done.errback(EtcdError(f"answer larger than {MAX_ANSWER} bytes"))
        elif reason is None or reason.check(ResponseDone):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(EtcdError(f"answer cut short: {reason.getErrorMessage()}"))


class _Lines(Protocol):
    """Splits a watch stream into JSON documents, one per line."""

    def __init__(self, on_document: Callable[[dict], None], done: Deferred) -> None:
        self._on_document = on_document
        self._done = done
        self._buffer = b""
        self._failed: Optional[Exception] = None

    def dataReceived(self, data: bytes) -> None:
        if self._failed is not None:
            return
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self._document(line)
                if self._failed is not None:
                    return
        if len(self._buffer) > MAX_ANSWER:
            self._fail(EtcdError(f"watch line longer than {MAX_ANSWER} bytes"))

    def _document(self, line: bytes) -> None:
        try:
            document = json.loads(line)
        except ValueError:
            self._fail(EtcdError("watch stream is not JSON"))
            return
        try:
            self._on_document(document)
        except Exception as e:  # a compaction or error ends the stream
            self._fail(e)

    def _fail(self, error: Exception) -> None:
        self._failed = error
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:
        if self._buffer.strip() and self._failed is None:
            self._document(self._buffer)
        if self._done.called:
            return
        if self._failed is not None:
            self._done.errback(self._failed)
        else:
            self._done.errback(EtcdError("watch stream ended"))


class EtcdClient:
    """
    Calls to an etcd cluster's JSON gateway.

    ``endpoints`` are client URLs (``http://127.0.0.1:2379``); each call tries
    them in order, starting from the last one that answered.  ``agent`` may
    be any ``IAgent`` (for TLS to etcd, one built with a policy for its CA
    and client certificate); ``token`` is an etcd auth token sent as the
    ``Authorization`` header.  With ``username`` and ``password`` the client
    gets its token from ``/v3/auth/authenticate`` before its first call, and
    again (once per call) when etcd says the token is no longer valid, as
    after an etcd restart or when its simple token expired.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoints: Sequence[str],
        *,
        agent=None,
        timeout: float = 5.0,
        token: Optional[str] = None,
        username: Optional[str] = None,
        password: Optional[str] = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._reactor = reactor
        self._endpoints = [url.rstrip("/") for url in endpoints]
        self._agent = agent if agent is not None else Agent(reactor)
        self._timeout = timeout
        self._token = token
        self._current = 0
        self._credentials = (username, password or "") if username else None
        #: How many tokens the client obtained (for tests and logs).
        self.authentications = 0

    @inlineCallbacks
    def authenticate(self):
        """A new token for the client's username and password."""
        assert self._credentials is not None
        name, password = self._credentials
        self._token = None
        answer = yield self._call_once("/v3/auth/authenticate", {"name": name, "password": password})
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdAuthError("authenticate answered no token")
        self._token = token
        self.authentications += 1
        returnValue(token)

    def _headers(self) -> Headers:
        headers = Headers({b"Content-Type": [b"application/json"]})
        if self._token:
            headers.addRawHeader(b"Authorization", self._token.encode("ascii"))
        return headers

    def _request(self, url: str, document: dict) -> Deferred:
        d = self._agent.request(b"POST", url.encode("ascii"), self._headers(), _JSONBody(document))
        d.addTimeout(self._timeout, self._reactor)
        return d

    @inlineCallbacks
    def call(self, path: str, document: dict):
        """
        POST ``document`` to ``path`` on the first endpoint that answers,
        authenticating first (and once more on a refused token) when the
        client has credentials.
        """
        if self._credentials is None:
            answer = yield self._call_once(path, document)
            returnValue(answer)
        if self._token is None:
            yield self.authenticate()
        try:
            answer = yield self._call_once(path, document)
        except EtcdAuthError:
            yield self.authenticate()
            answer = yield self._call_once(path, document)
        returnValue(answer)

    @inlineCallbacks
    def _call_once(self, path: str, document: dict):
        errors = []
        for step in range(len(self._endpoints)):
            index = (self._current + step) % len(self._endpoints)
            url = self._endpoints[index] + path
            try:
                response = yield self._request(url, document)
                done: Deferred = Deferred()
                response.deliverBody(_Collect(done))
                body = yield done
            except CancelledError:
                raise
            except Exception as e:
                errors.append(f"{self._endpoints[index]}: {e.__class__.__name__} {e}".strip())
                continue
            self._current = index
            try:
                answer = json.loads(body) if body else {}
            except ValueError:
                raise EtcdError(f"{path}: answer is not JSON")
            if response.code != 200 or not isinstance(answer, dict) or "error" in answer:
                message = answer.get("error") or answer.get("message") if isinstance(answer, dict) else None
                code = answer.get("code") if isinstance(answer, dict) else None
                if path != "/v3/auth/authenticate" and (
                    response.code == 401 or code == 16 or "auth token" in str(message or "")
                ):
                    raise EtcdAuthError(f"{path}: HTTP {response.code} {message or ''}".strip())
                raise EtcdError(f"{path}: HTTP {response.code} {message or ''}".strip())
            returnValue(answer)
        raise EtcdError("no etcd endpoint answered: " + "; ".join(errors))

    @inlineCallbacks
    def range(self, prefix: bytes):
        """``(revision, [KeyValue])`` of every key under ``prefix``."""
        answer = yield self.call(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        )
        revision = int(answer.get("header", {}).get("revision", 0))
        returnValue((revision, [_kv(raw) for raw in answer.get("kvs", [])]))

    @inlineCallbacks
    def put(self, key: bytes, value: bytes, lease: int = 0):
        """Write ``key``; under ``lease`` it disappears when the lease ends."""
        document: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            document["lease"] = str(lease)
        answer = yield self.call("/v3/kv/put", document)
        returnValue(int(answer.get("header", {}).get("revision", 0)))

    def delete(self, key: bytes) -> Deferred:
        """Delete ``key``."""
        return self.call("/v3/kv/deleterange", {"key": _b64(key)})

    @inlineCallbacks
    def grant(self, ttl: int):
        """A new lease of ``ttl`` seconds; its id."""
        answer = yield self.call("/v3/lease/grant", {"TTL": int(ttl)})
        lease = int(answer.get("ID", 0))
        if not lease:
            raise EtcdError("lease grant answered no lease id")
        returnValue(lease)

    @inlineCallbacks
    def keepalive(self, lease: int):
        """Refresh ``lease``; its remaining TTL, 0 when it no longer exists."""
        answer = yield self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        returnValue(int(result.get("TTL", 0)))

    def revoke(self, lease: int) -> Deferred:
        """End ``lease`` now: every key under it disappears."""
        return self.call("/v3/lease/revoke", {"ID": str(lease)})

    def compact(self, revision: int) -> Deferred:
        """Compact the key history up to ``revision`` (for tests and operators)."""
        return self.call("/v3/kv/compaction", {"revision": str(revision)})

    def watch(
        self, prefix: bytes, start_revision: int, on_events: Callable[[int, list], None]
    ) -> "Watch":
        """
        Follow every change under ``prefix`` from ``start_revision`` on.

        ``on_events(revision, [Event])`` is called for each batch.  The
        returned ``Watch``'s ``done`` fails with ``WatchCompacted`` when the
        revision is gone, with ``EtcdError`` when the stream breaks, and
        fires with None after ``cancel()``.
        """
        watch = Watch(on_events)
        document = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        url = self._endpoints[self._current] + "/v3/watch"
        d = self._agent.request(b"POST", url.encode("ascii"), self._headers(), _JSONBody(document))
        d.addTimeout(self._timeout, self._reactor)
        d.addCallbacks(watch._started, watch._failed)
        return watch


class Watch:
    """A running watch; ``done`` fires when it ends, ``cancel()`` ends it."""

    def __init__(self, on_events: Callable[[int, list], None]) -> None:
        self._on_events = on_events
        self.done: Deferred = Deferred()
        self._lines: Optional[_Lines] = None
        self._cancelled = False

    def _started(self, response) -> None:
        if self._cancelled:
            response.deliverBody(Protocol())
            return
        if response.code != 200:
            self._failed(Failure(EtcdError(f"watch: HTTP {response.code}")))
            return
        self._lines = _Lines(self._document, self.done)
        response.deliverBody(self._lines)

    def _failed(self, failure: Failure) -> None:
        if not self.done.called:
            if self._cancelled:
                self.done.callback(None)
            else:
                self.done.errback(EtcdError(f"watch: {failure.getErrorMessage()}"))

    def _document(self, document: dict) -> None:
        result = document.get("result")
        if not isinstance(result, dict):
            if "error" in document:
                raise EtcdError(f"watch: {document['error']}")
            return
        if result.get("compact_revision") and result.get("canceled"):
            raise WatchCompacted(int(result["compact_revision"]))
        if result.get("canceled"):
            raise EtcdError(f"watch canceled: {result.get('cancel_reason', '')}")
        events = [
            Event("delete" if raw.get("type") == "DELETE" else "put", _kv(raw.get("kv", {})))
            for raw in result.get("events", [])
        ]
        revision = int(result.get("header", {}).get("revision", 0))
        if events:
            self._on_events(revision, events)

    def cancel(self) -> None:
        """Stop following; ``done`` fires with None."""
        self._cancelled = True
        if not self.done.called:
            self.done.callback(None)
        if self._lines is not None and self._lines.transport is not None:
            self._lines.transport.stopProducing()


@implementer(IPolicyForHTTPS)
class EtcdTLSPolicy:
    """
    TLS to etcd: its server certificates verified against ``trust`` (a
    ``Certificate`` of the CA, or the platform's roots when None) for the
    endpoint's host name, and ``client`` (a ``PrivateCertificate``) shown
    when etcd asks for a client certificate.
    """

    def __init__(self, trust=None, client=None) -> None:
        self._trust = trust
        self._client = client

    def creatorForNetloc(self, hostname: bytes, port: int):
        return optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self._trust, clientCertificate=self._client
        )


def tls_agent(reactor, ca: Optional[str] = None, cert: Optional[str] = None, key: Optional[str] = None) -> Agent:
    """An ``Agent`` for https etcd endpoints: ``ca`` (PEM) to trust, ``cert``/``key`` (PEM) to show."""
    trust = None
    if ca is not None:
        with open(ca, "rb") as f:
            trust = Certificate.loadPEM(f.read())
    client = None
    if cert is not None and key is not None:
        with open(cert, "rb") as f, open(key, "rb") as g:
            client = PrivateCertificate.loadPEM(f.read() + b"\n" + g.read())
    return Agent(reactor, contextFactory=EtcdTLSPolicy(trust, client))
