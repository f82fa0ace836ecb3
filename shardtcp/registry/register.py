# -*- test-case-name: tests.registry.test_etcd -*-
"""
Keeping one shard registered in etcd while it runs (SPEC 9).

``Registration`` is a service: started, it grants a lease of ``ttl``
seconds, writes ``<prefix>/shards/<service>/<id>`` under it and refreshes the
lease every third of its life; stopped, it revokes the lease so the shard
disappears at once.  A shard that dies without stopping disappears when the
lease runs out.  When etcd cannot be reached it keeps trying (with backoff),
and when it finds its lease gone (etcd restarted, or the shard was paused
past its TTL) it registers again under a new one.

It imports only the etcd client, so ``shardtcp.backend`` can offer it to
shards without bringing in the proxy.
"""

from __future__ import annotations

import json
from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from shardtcp.registry.etcd import EtcdClient

log = Logger(namespace="shardtcp.registry")


def shard_key(prefix: str, service: str, shard_id: str) -> bytes:
    """``<prefix>/shards/<service>/<shard-id>`` as etcd key bytes."""
    return f"{prefix.rstrip('/')}/shards/{service}/{shard_id}".encode("utf-8")


class Registration(Service):
    """
    One shard's record in etcd, kept alive under a lease.

    ``record`` holds the keys of a ``[[service.S.shard]]`` table without
    ``id`` (``address``, ``location``, ``capacity``, ``security_score``,
    ``weight``, ``server_name``, ...).
    """

    def __init__(
        self,
        client: EtcdClient,
        *,
        prefix: str,
        service: str,
        shard_id: str,
        record: dict,
        ttl: int = 10,
        clock: IReactorTime,
    ) -> None:
        if ttl < 2:
            raise ValueError("a registration lease needs a TTL of at least 2 seconds")
        self._client = client
        self._key = shard_key(prefix, service, shard_id)
        self._value = json.dumps(dict(record, id=shard_id), sort_keys=True).encode("utf-8")
        self._ttl = int(ttl)
        self._clock = clock
        self.lease: Optional[int] = None
        self.registered = False
        self._sleep = None
        self._pending = None

    def startService(self) -> None:
        super().startService()
        self._keep()

    def stopService(self):
        super().stopService()
        if self._sleep is not None:
            self._sleep.cancel()
        if self._pending is not None:
            self._pending.cancel()
        lease, self.lease = self.lease, None
        self.registered = False
        if lease is None:
            return None
        d = self._client.revoke(lease)
        d.addErrback(lambda f: log.warn("registry: revoking the lease failed: {e}", e=f.getErrorMessage()))
        return d

    def _track(self, d):
        """Remember the call in flight, so that stopping cancels it."""
        self._pending = d

        def done(result):
            self._pending = None
            return result

        return d.addBoth(done)

    @inlineCallbacks
    def _keep(self):
        failures = 0
        while self.running:
            try:
                if self.lease is None:
                    lease = yield self._track(self._client.grant(self._ttl))
                    yield self._track(self._client.put(self._key, self._value, lease=lease))
                    if not self.running:
                        yield self._client.revoke(lease)
                        return
                    self.lease = lease
                    self.registered = True
                    log.info("registry: registered {key} (lease {lease}, ttl {ttl}s)",
                             key=self._key.decode(), lease=lease, ttl=self._ttl)
                else:
                    remaining = yield self._track(self._client.keepalive(self.lease))
                    if remaining <= 0:
                        log.warn("registry: lease {lease} is gone; registering again", lease=self.lease)
                        self.lease = None
                        self.registered = False
                        continue
                failures = 0
                wait = self._ttl / 3
            except CancelledError:
                return
            except Exception as e:
                failures += 1
                wait = min(self._ttl / 3, 0.25 * (2 ** min(failures, 8)))
                log.warn("registry: etcd: {error}; retrying in {wait:.1f}s", error=str(e), wait=wait)
            if not self.running:
                return
            self._sleep = deferLater(self._clock, wait, lambda: None)
            try:
                yield self._sleep
            except CancelledError:
                return
            finally:
                self._sleep = None


def run_registration(
    endpoints: list[str], *, prefix: str, service: str, shard_id: str, record: dict, ttl: int,
    access=None,
) -> int:
    """
    ``shardtcp register``: keep one shard registered until SIGINT or SIGTERM,
    then revoke its lease (the shard disappears at once) and return 0.
    ``access`` (a ``RegistryConfig``) gives TLS and auth to etcd.
    """
    import signal
    import sys

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    if access is None:
        client = EtcdClient(reactor, endpoints)
    else:
        # TLS and auth to etcd, as a proxy's [registry] gives them
        from shardtcp.registry.access import etcd_client

        client = etcd_client(access, reactor)
    registration = Registration(
        client,
        prefix=prefix,
        service=service,
        shard_id=shard_id,
        record=record,
        ttl=ttl,
        clock=reactor,
    )
    reactor.callWhenRunning(registration.startService)
    reactor.addSystemEventTrigger("before", "shutdown", registration.stopService)

    def stop(signum, frame) -> None:
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reactor.run(installSignalHandlers=False)
    return 0
