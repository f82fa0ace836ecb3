# -*- test-case-name: tests.test_status -*-
"""
The resolver's status as plain JSON types, for the admin ``/status``.

``render_status`` is a pure function of a ``ResolverSnapshot``: the same
snapshot always renders to the same document, and rendering touches no
live state.
"""

from __future__ import annotations

from operator import attrgetter

import attrs

from shardtcp.resolver.snapshot import ResolverSnapshot, ShardSnapshot

#: A shard's fields in the document, in ``ShardSnapshot``'s order, and one
#: getter for all of them (a status of thousands of shards is rendered on
#: the reactor thread).
_FIELDS = tuple(f.name for f in attrs.fields(ShardSnapshot) if f.name != "shard_id")
_VALUES = attrgetter(*_FIELDS)


def _shard(shard: ShardSnapshot) -> dict:
    document = dict(zip(_FIELDS, _VALUES(shard)))
    document["rejected_by"] = list(shard.rejected_by)
    return document


def render_status(snapshot: ResolverSnapshot) -> dict:
    """
    ``{"time": ..., "services": {id: {"panic", "in_rotation",
    "eligible_by_policy", "shards": {id: {...}}}}}``, every value a JSON
    type; the shard fields are ``ShardSnapshot``'s.
    """
    return {
        "time": snapshot.time,
        "services": {
            service.service_id: {
                "panic": service.panic,
                "in_rotation": service.in_rotation,
                "eligible_by_policy": service.eligible_by_policy,
                "shards": {s.shard_id: _shard(s) for s in service.shards},
            }
            for service in snapshot.services
        },
    }
