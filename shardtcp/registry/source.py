# -*- test-case-name: tests.registry.test_source -*-
"""
Shard records from etcd, merged with the configuration file's (SPEC 9).

``EtcdShardSource`` is an ``IShardSource``: the resolver reads its
``services()`` and re-reads them when it announces a change, exactly as it
does for the file, so live state (health, leases, slow start) stays keyed by
shard id across changes and a shard that reappears keeps its history.

It follows ``<prefix>/shards/<service>/<shard-id>`` with an initial range,
then a watch from the next revision; a compacted revision means a full
re-read; a broken connection means a retry with exponential backoff and
jitter.  It is fail-static: while etcd cannot be reached the last registry
seen stays in force (``stale`` says so, with one log line per transition),
every change is written atomically to ``snapshot``, and at start-up that
snapshot is the registry until etcd answers.  An error from etcd never
empties the registry: only etcd's own word (a delete, or a full re-read)
removes a shard.
"""

from __future__ import annotations

import json
import os
import random as _random
from typing import Callable, Iterable, Optional

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from shardtcp.keys import write_atomically
from shardtcp.model import Config, ServiceConfig, ShardConfig
from shardtcp.registry.etcd import EtcdClient
from shardtcp.registry.follow import Follower
from shardtcp.resolver.sources import IShardSource

log = Logger(namespace="shardtcp.registry")

#: Reads one registered record: ``(service id, shard id, JSON document)`` ->
#: ``(ShardConfig, None)`` or ``(None, one-line problem)``.
ParseShard = Callable[[str, str, object], tuple]

#: The largest snapshot file read back at start-up.
MAX_SNAPSHOT = 64 * 1024 * 1024


def shards_prefix(prefix: str) -> bytes:
    """The etcd key prefix of registered shards, ``<prefix>/shards/``."""
    return (prefix.rstrip("/") + "/shards/").encode("utf-8")


@implementer(IShardSource)
class EtcdShardSource(Follower):
    """The configuration's services, with the shards registered in etcd added."""

    def __init__(
        self,
        config: Config,
        client: EtcdClient,
        parse_shard: ParseShard,
        *,
        clock: IReactorTime,
        snapshot: Optional[str] = None,
        backoff: tuple[float, float] = (0.5, 10.0),
        random: Optional[_random.Random] = None,
    ) -> None:
        super().__init__(
            client, shards_prefix(config.registry.prefix), clock=clock, backoff=backoff, random=random
        )
        self._file_services = tuple(config.services)
        self._file_ids = {shard.id for s in self._file_services for shard in s.shards}
        self._service_ids = {s.id for s in self._file_services}
        self._parse = parse_shard
        self._snapshot = snapshot
        # key -> raw value, as etcd holds them (what the snapshot keeps)
        self._raw: dict[bytes, bytes] = {}
        # (service id, shard id) -> the parsed record
        self._records: dict[tuple[str, str], ShardConfig] = {}
        self._callbacks: dict[object, Callable[[], None]] = {}
        self._merged: tuple[ServiceConfig, ...] = self._file_services
        self._refused: set[bytes] = set()
        # key -> (raw value, what _record made of it): a change re-reads one record, not all
        self._parsed: dict[bytes, tuple] = {}
        self.changes = 0
        #: ``LoadSharing.status`` when the proxy shares its load: the peers in ``status()``.
        self.peers: Optional[Callable[[], dict]] = None

    # -- IShardSource --------------------------------------------------------

    def services(self) -> Iterable[ServiceConfig]:
        """The file's services, each with its registered shards after its own."""
        return self._merged

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every change; return an idempotent unsubscribe."""
        token = object()
        self._callbacks[token] = callback

        def unsubscribe() -> None:
            self._callbacks.pop(token, None)

        return unsubscribe

    def replace_config(self, config: Config) -> None:
        """Take a reloaded file's services; the registered shards stay."""
        self._file_services = tuple(config.services)
        self._file_ids = {shard.id for s in self._file_services for shard in s.shards}
        self._service_ids = {s.id for s in self._file_services}
        self._refused.clear()
        self._parsed.clear()
        self._rebuild()

    # -- the registry --------------------------------------------------------

    def status(self) -> dict:
        """What ``/status`` says of the registry."""
        return {
            "kind": "etcd",
            "stale": self.stale,
            "reason": self.stale_reason if self.stale else None,
            "revision": self.revision,
            "registered_shards": len(self._records),
            "changes": self.changes,
            "peers": self.peers() if self.peers is not None else {},
        }

    def _record(self, key: bytes, value: bytes) -> Optional[tuple[tuple[str, str], ShardConfig]]:
        """Parse one registered key; None (logged once) when it is not usable."""
        rest = key[len(self._prefix):].decode("utf-8", "replace")
        service_id, _, shard_id = rest.partition("/")
        problem = None
        if not service_id or not shard_id or "/" in shard_id:
            problem = "expected <prefix>/shards/<service>/<shard-id>"
        elif service_id not in self._service_ids:
            problem = f"no service {service_id!r} in the configuration"
        elif shard_id in self._file_ids:
            problem = f"shard id {shard_id!r} is already in the configuration file"
        else:
            try:
                document = json.loads(value)
            except ValueError:
                document = None
                problem = "the value is not JSON"
            if problem is None:
                shard, problem = self._parse(service_id, shard_id, document)
                if shard is not None:
                    return (service_id, shard_id), shard
        if key not in self._refused:
            self._refused.add(key)
            log.warn(
                "registry: ignoring {key}: {problem}",
                key=key.decode("utf-8", "replace"),
                problem=problem,
            )
        return None

    def _rebuild(self) -> None:
        records: dict[tuple[str, str], ShardConfig] = {}
        cache: dict[bytes, tuple] = {}
        for key in sorted(self._raw):
            value = self._raw[key]
            known = self._parsed.get(key)
            if known is not None and known[0] == value:
                parsed = known[1]
            else:
                parsed = self._record(key, value)
            cache[key] = (value, parsed)
            if parsed is not None:
                records[parsed[0]] = parsed[1]
        self._parsed = cache
        self._records = records
        by_service: dict[str, list[ShardConfig]] = {}
        for (service_id, _), shard in sorted(records.items()):
            by_service.setdefault(service_id, []).append(shard)
        self._merged = tuple(
            attrs.evolve(s, shards=s.shards + tuple(by_service.get(s.id, ())))
            if s.id in by_service
            else s
            for s in self._file_services
        )

    def _changed(self) -> None:
        self.changes += 1
        self._rebuild()
        self._write_snapshot()
        for callback in list(self._callbacks.values()):
            callback()

    def _replace(self, revision: int, kvs: list) -> None:
        raw = {kv.key: kv.value for kv in kvs}
        self.revision = revision
        if raw != self._raw:
            self._raw = raw
            self._changed()
        elif not os.path.exists(self._snapshot or ""):
            self._write_snapshot()

    def _on_events(self, revision: int, events: list) -> None:
        for event in events:
            if event.kind == "delete":
                self._raw.pop(event.kv.key, None)
                self._refused.discard(event.kv.key)
            else:
                self._raw[event.kv.key] = event.kv.value
                self._refused.discard(event.kv.key)
        self.revision = max(self.revision, revision)
        self._changed()

    # -- the snapshot --------------------------------------------------------

    def _write_snapshot(self) -> None:
        if not self._snapshot:
            return
        document = {
            "revision": self.revision,
            "shards": {
                key.decode("utf-8", "replace"): value.decode("utf-8", "replace")
                for key, value in sorted(self._raw.items())
            },
        }
        try:
            folder = os.path.dirname(os.path.abspath(self._snapshot))
            os.makedirs(folder, exist_ok=True)
            write_atomically(self._snapshot, (json.dumps(document, indent=1) + "\n").encode("utf-8"), mode=0o600)
        except OSError as e:
            log.error("registry: cannot write the snapshot {path}: {error}", path=self._snapshot, error=str(e))

    def _load_snapshot(self) -> None:
        if not self._snapshot or not os.path.exists(self._snapshot):
            return
        try:
            with open(self._snapshot, "rb") as f:
                data = f.read(MAX_SNAPSHOT + 1)
            if len(data) > MAX_SNAPSHOT:
                raise ValueError(f"larger than {MAX_SNAPSHOT} bytes")
            document = json.loads(data)
            shards = document["shards"]
            raw = {str(k).encode("utf-8"): str(v).encode("utf-8") for k, v in shards.items()}
            revision = int(document.get("revision", 0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("registry: ignoring the snapshot {path}: {error}", path=self._snapshot, error=str(e))
            return
        self._raw = raw
        self.revision = revision
        self._rebuild()
        log.info(
            "registry: started from the snapshot {path} ({count} registered shards, revision {revision})",
            path=self._snapshot,
            count=len(self._records),
            revision=revision,
        )

    # -- following etcd ------------------------------------------------------

    def replaced(self, revision: int, kvs: list) -> None:
        self._replace(revision, kvs)

    def changed(self, revision: int, events: list) -> None:
        self._on_events(revision, events)

    def stale_changed(self, stale: bool, reason: str) -> None:
        if stale:
            log.warn(
                "registry: etcd unreachable ({reason}); routing on the last registry seen "
                "({count} registered shards)",
                reason=reason,
                count=len(self._records),
            )
        else:
            log.info(
                "registry: in sync with etcd at revision {revision} ({count} registered shards)",
                revision=self.revision,
                count=len(self._records),
            )

    def startService(self) -> None:
        # The snapshot is the registry until etcd answers.
        self._load_snapshot()
        super().startService()
