# -*- test-case-name: tests.config.test_checks -*-
"""
Checks that span tables of a configuration, run on the model once every
table has been read: what a listener can route to, the PolicyContext size
bound, health-check trust, and the keys accepted but not available yet.

``NOT_YET_AVAILABLE`` lists every key whose meaning SPEC section 3 fixes but
this version does not implement: a non-default value there is refused with
``"<path>: not available in this version"``, so nothing is accepted
silently.  An entry is deleted when its feature lands.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator, Optional

from shardtcp.config._reader import Reader, join
from shardtcp.config._values import sni_length
from shardtcp.model import Config, PerSourceConfig, ProxyConfig, SigningConfig

#: The largest PolicyContext TLV value a shard will accept (HAProxy's limit).
POLICY_TLV_LIMIT = 1024

#: Signature of ``shardtcp.policy.worst_case_token_size``.
TokenSizer = Callable[..., int]

#: (table, key) -> the default value; any other value is refused for now.
NOT_YET_AVAILABLE: dict[tuple[str, str], Any] = {
    ("proxy", "workers"): 1,
    ("signing", "jwks"): None,
    ("listener", "max_connections"): 0,
    ("listener", "backlog"): 1024,
    ("listener", "per_source"): PerSourceConfig(),
    ("log", "access"): "text",
    ("service", "shard_key"): "none",
    ("service", "bounded_load"): 1.25,
    ("service", "owners"): (),
    ("registry", "kind"): "static",
}

# Said instead of the plain line where an operator needs to know more.
_NOT_AVAILABLE_WHY = {
    ("registry", "kind"): "the etcd registry is not available in this version",
}

def _tables(config: Config, table: str) -> Iterator[tuple[str, Any]]:
    """``(key path, model value)`` for each instance of ``table`` in ``config``."""
    if table == "listener":
        for index, listener in enumerate(config.listeners):
            yield f"listener[{index}]", listener
    elif table == "service":
        for service in config.services:
            yield join("service", service.id), service
    else:
        yield table, getattr(config, table)


def check_not_yet_available(reader: Reader, config: Config) -> None:
    """Refuse every non-default value of a key listed in ``NOT_YET_AVAILABLE``."""
    for (table, key), default in NOT_YET_AVAILABLE.items():
        for path, value in _tables(config, table):
            if getattr(value, key) != default:
                message = _NOT_AVAILABLE_WHY.get((table, key), "not available in this version")
                reader.add(join(path, key), message)


def routable_services(config: Config, listener) -> list:
    """
    The services ``listener`` can route a connection to: by a name it can
    identify (sni, connect, http-host need the service to have names), by
    the ``SHARD <service>`` line (any service), or its default service.
    """
    by_name = any(i in listener.identify for i in ("sni", "connect", "http-host"))
    by_line = "line" in listener.identify
    return [
        service
        for service in config.services
        if by_line
        or (by_name and service.names)
        or listener.default_service == service.id
    ]


def check_listener_routes(reader: Reader, config: Config) -> None:
    """
    A listener that does not terminate TLS cannot originate it: refuse a
    passthrough or plain listener that can reach an ``upstream_tls`` service.
    """
    for index, listener in enumerate(config.listeners):
        if listener.mode == "terminate":
            continue
        for service in routable_services(config, listener):
            if service.upstream_tls:
                reader.add(
                    f"listener[{index}].mode",
                    f"a {listener.mode} listener can route to service {service.id!r}, "
                    'which has upstream_tls = true; only mode = "terminate" '
                    "listeners can originate TLS to shards",
                )


def health_trust_notes(config: Config) -> list[str]:
    """
    One line per ``tls`` health check with no CA of its own: it verifies
    against the system trust store only, so it fails on every shard whose
    certificate a private CA issued.  These are notes, not problems.
    """
    notes = []
    for service in config.services:
        if service.health_ca or (service.upstream_tls and service.upstream_ca):
            continue
        for index, shard in enumerate(service.shards):
            check = shard.health_check
            if check is not None and check.kind == "tls":
                path = f"{join('service', service.id)}.shard[{index}].health_check"
                notes.append(
                    f"{path}: warning: a tls check with no health_ca verifies shards "
                    f"against the system trust store only; set {join('service', service.id)}"
                    ".health_ca to the CA that issued the shards' certificates"
                )
    return notes


def run_checks(reader: Reader, config: Config, token_size: Optional[TokenSizer]) -> None:
    """Every cross-table check, in a fixed order."""
    check_listener_routes(reader, config)
    check_not_yet_available(reader, config)
    check_token_sizes(
        reader, config.proxy, config.signing, config.services, config.listeners, token_size
    )




def default_token_size() -> Optional[TokenSizer]:
    """``shardtcp.policy.worst_case_token_size`` when that module offers it."""
    try:
        from shardtcp.policy import worst_case_token_size
    except ImportError:
        return None
    return worst_case_token_size


def check_token_sizes(
    reader: Reader,
    proxy: ProxyConfig,
    signing: SigningConfig,
    services: tuple,
    listeners: tuple,
    token_size: Optional[TokenSizer],
) -> None:
    """
    Refuse a policy whose PolicyContext could outgrow its TLV (SPEC §4).

    The per-connection claims are bounded by what this configuration allows:
    ``sni`` is only set when a listener identifies by SNI, and then is one of
    the service's names (a wildcard adds one label); ``sub`` only exists when
    a terminate listener asks for client certificates.
    """
    if token_size is None:
        token_size = default_token_size()
    if token_size is None:
        return
    accepted = _keywords(token_size)
    by_sni = any("sni" in listener.identify for listener in listeners)
    client_certificates = any(listener.client_ca for listener in listeners)
    for service in services:
        bounds: dict[str, Any] = {}
        lengths = [n for n in map(sni_length, service.names) if n is not None]
        bounds["sni_length"] = max(lengths) if by_sni and lengths else None
        if not client_certificates:
            bounds["subject_length"] = None
        # Otherwise the subject bound is the policy module's own default.
        extra = {k: v for k, v in bounds.items() if accepted is None or k in accepted}
        for shard in service.shards:
            if not shard.id:
                continue
            size = token_size(
                issuer=proxy.id,
                kid=signing.kid,
                service_id=service.id,
                shard_id=shard.id,
                acl=service.policy.acl,
                **extra,
            )
            if size > POLICY_TLV_LIMIT:
                reader.add(
                    join(join(join("service", service.id), "policy"), "acl"),
                    f"the PolicyContext for shard {shard.id!r} could reach {size} bytes, "
                    f"over the {POLICY_TLV_LIMIT}-byte limit",
                )


def _keywords(function: Callable[..., Any]) -> Optional[set[str]]:
    """The keyword names ``function`` accepts, or None when it takes any."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
