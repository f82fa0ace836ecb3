# -*- test-case-name: tests.config.test_checks -*-
"""
Checks that span tables of a configuration, run on the model once every
table has been read: what a listener can route to, the PolicyContext size
bound, health-check trust, the published JWKS against the signing key,
per-source limits, admin exposure and shard-key owners.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator, Optional

from shardtcp.config._reader import Reader, join
from shardtcp.config._values import ID, sni_length
from shardtcp.model import Config, PerSourceConfig, ProxyConfig, SigningConfig

#: The largest PolicyContext TLV value a shard will accept (HAProxy's limit).
POLICY_TLV_LIMIT = 1024

#: The longest ``shk`` claim each key source can produce (SPEC section 10):
#: an IPv6 address, a DNS label, a DNS name, a bounded line word.
KEY_LENGTHS = {"client-ip": 39, "sni-label": 63, "authority": 253, "line-arg": 253}

#: Signature of ``shardtcp.policy.worst_case_token_size``.
TokenSizer = Callable[..., int]

def glob_problem(pattern: str) -> Optional[str]:
    """
    Why a ``[service.S.owners]`` key glob is not well formed, or None: it
    must not be empty, and every ``[`` opens a class that ``]`` closes with
    at least one character in it (``fnmatch`` would silently take a lone
    ``[`` literally).
    """
    if not pattern:
        return "a key glob must not be empty"
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            end = pattern.find("]", j)
            if end < 0:
                return f"key glob {pattern!r}: '[' at {i} is never closed"
            if end == i + 1:
                return f"key glob {pattern!r}: empty class at {i}"
            i = end
        i += 1
    return None


def check_owners(reader: Reader, config: Config) -> None:
    """
    ``[service.S.owners]``: every glob well formed, only with a
    ``shard_key``, and (with the static registry, where every shard is in
    the file) naming shards of the service itself.
    """
    for service in config.services:
        path = join(join("service", service.id), "owners")
        if service.owners and service.shard_key == "none":
            reader.add(path, 'owners need a shard_key other than "none"')
        ids = {shard.id for shard in service.shards}
        for pattern, owners in service.owners:
            problem = glob_problem(pattern)
            if problem is not None:
                reader.add(join(path, pattern), problem)
            if config.registry.kind != "static":
                continue
            for index, shard_id in enumerate(owners):
                if shard_id not in ids:
                    reader.add(
                        f"{join(path, pattern)}[{index}]",
                        f"no shard {shard_id!r} in service {service.id!r}",
                    )


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


def check_per_source(reader: Reader, config: Config) -> None:
    """
    ``per_source`` is counted at accept, before a byte is read: on an
    ``accept_proxy`` listener that is the load balancer's address, which
    would put every client under one limit.  Refuse the combination.
    """
    for index, listener in enumerate(config.listeners):
        if listener.accept_proxy and listener.per_source != PerSourceConfig():
            reader.add(
                f"listener[{index}].per_source",
                "not available with accept_proxy = true (it would count the load balancer's address, "
                "not the clients'); use max_connections, or limit per source at the load balancer",
            )


def _on_loopback(description: str) -> bool:
    """Whether a server endpoint description listens on loopback (or a UNIX socket) only."""
    from shardtcp.config._endpoints import split_endpoint
    from shardtcp.net import parse_ip

    try:
        parts = split_endpoint(description)
    except ValueError:
        return True  # reported as a bad endpoint already
    if parts.kind == "unix":
        return True
    address = parse_ip(parts.interface())
    return address is not None and address.is_loopback


def check_admin_exposure(reader: Reader, config: Config) -> None:
    """An admin endpoint beyond loopback needs a token (SPEC section 6)."""
    admin = config.admin
    if admin is None or admin.token_file or not admin.listen:
        return
    if not _on_loopback(admin.listen):
        reader.add(
            "admin.token_file",
            f"required when admin.listen ({admin.listen}) is not on loopback: "
            "anyone who reaches it could drain shards and reload",
        )


def run_checks(reader: Reader, config: Config, token_size: Optional[TokenSizer]) -> None:
    """Every cross-table check, in a fixed order."""
    check_listener_routes(reader, config)
    check_per_source(reader, config)
    check_admin_exposure(reader, config)
    check_signing_jwks(reader, config.signing)
    check_owners(reader, config)
    check_token_sizes(
        reader, config.proxy, config.signing, config.services, config.listeners, token_size
    )



def check_signing_jwks(reader: Reader, signing: SigningConfig) -> None:
    """
    ``[signing] jwks``, when set and files are checked, must publish the
    public half of the signing key under the active kid: shards trusting it
    would otherwise refuse every connection.
    """
    if not signing.jwks or not reader.check_files or not signing.private_key:
        return
    if any(p.startswith(("signing.jwks:", "signing.private_key:")) for p in reader.problems):
        # Already reported (unreadable file): one line per problem.
        return
    from shardtcp.keys import jwks_problem

    problem = jwks_problem(signing.jwks, signing.private_key, signing.kid)
    if problem is not None:
        reader.add("signing.jwks", problem)


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
    # The policy module's own sizer depends on the shard only through the
    # length of its id as JSON writes it; ids here are plain ASCII (``ID``),
    # so shards with ids of one length share one answer: one call per
    # length rather than per shard (10,000 shards, a few lengths).
    by_length = token_size is default_token_size()
    by_sni = any("sni" in listener.identify for listener in listeners)
    client_certificates = any(listener.client_ca for listener in listeners)
    for service in services:
        bounds: dict[str, Any] = {}
        lengths = [n for n in map(sni_length, service.names) if n is not None]
        bounds["sni_length"] = max(lengths) if by_sni and lengths else None
        bounds["key_length"] = KEY_LENGTHS.get(service.shard_key)
        if not client_certificates:
            bounds["subject_length"] = None
        # Otherwise the subject bound is the policy module's own default.
        extra = {k: v for k, v in bounds.items() if accepted is None or k in accepted}
        sizes: dict[int, int] = {}
        for shard in service.shards:
            if not shard.id:
                continue
            plain = by_length and ID.fullmatch(shard.id) is not None
            size = sizes.get(len(shard.id)) if plain else None
            if size is None:
                size = token_size(
                    issuer=proxy.id,
                    kid=signing.kid,
                    service_id=service.id,
                    shard_id=shard.id,
                    acl=service.policy.acl,
                    **extra,
                )
                if plain:
                    sizes[len(shard.id)] = size
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
