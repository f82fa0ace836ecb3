# -*- test-case-name: tests.config.test_sections -*-
"""
The tables of SPEC section 3, one reader function per table: each takes the
decoded TOML, records a problem line per bad value through the ``Reader``
and returns the model value, so that every problem in a file is found in
one pass.  Checks that span tables live in ``_checks``.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Optional

from shardtcp.config._endpoints import check_endpoint
from shardtcp.config._reader import (
    FileProblem,
    Reader,
    choices,
    join,
    read_file,
    show,
)
from shardtcp.config._values import (
    ID,
    canonical_service_name,
    dns_name_problem,
    parse_address,
)
from shardtcp.model import (
    Address,
    AdminConfig,
    CertificateConfig,
    Config,
    FeedSourceConfig,
    GeoNetwork,
    HealthCheckConfig,
    ListenerConfig,
    LogConfig,
    PerSourceConfig,
    PolicyConfig,
    ProxyConfig,
    RegistryConfig,
    ResolverConfig,
    ServiceConfig,
    ShardConfig,
    SigningConfig,
    ThreatIntelConfig,
    Weights,
)

# ---------------------------------------------------------------------------
# Keys

_TOP_KEYS = (
    "proxy", "signing", "listener", "service", "geo", "threat_intel", "admin", "registry",
    "resolver", "log",
)
_LISTENER_KEYS = (
    "name", "listen", "mode", "identify", "default_service", "peek_timeout",
    "max_client_hello", "accept_proxy", "trusted_proxies", "idle_timeout",
    "connect_timeout", "retries", "certificates", "default_certificate", "strict_sni",
    "alpn", "min_tls", "client_ca", "require_client_cert",
    "max_connections", "backlog", "per_source",
)
# Keys that only mean something where the proxy itself speaks TLS.
_TERMINATE_ONLY = (
    "certificates", "default_certificate", "strict_sni", "alpn", "min_tls",
    "client_ca", "require_client_cert",
)
_SERVICE_KEYS = (
    "names", "upstream_tls", "upstream_ca", "upstream_cert", "upstream_key",
    "weights", "policy", "shard", "health_ca", "shard_key", "bounded_load", "owners",
)
_POLICY_KEYS = (
    "encryption", "authentication", "acl", "allow", "deny", "min_security_score", "regions",
)
_SHARD_KEYS = (
    "id", "address", "location", "capacity", "security_score", "weight", "server_name",
    "health_check", "slow_start",
)
_HEALTH_KEYS = ("kind", "interval", "timeout", "rise", "fall", "agent_port")
_MODES = ("passthrough", "terminate", "plain")
_IDENTIFIERS = ("sni", "connect", "line", "http-host")
SHARD_KEYS = ("none", "client-ip", "sni-label", "authority", "line-arg")
ACCESS_LOGS = ("text", "json", "off")
_MAX_WORKERS = 1024
_DAY = 86400.0


def read_config(reader: Reader, data: Any) -> Config:
    """The ``Config`` a decoded document describes; problems go to ``reader``."""
    top = reader.table("", data, _TOP_KEYS)
    if top is None:
        return Config(proxy=ProxyConfig(id=""), signing=SigningConfig(private_key="", kid=""))

    proxy = _read_proxy(reader, top)
    signing = _read_signing(reader, top)
    registry = _read_registry(reader, top)
    services = _read_services(reader, top, registry)
    listeners = _read_listeners(reader, top, {s.id for s in services})
    geo = _read_geo(reader, top)
    threat_intel = _read_threat_intel(reader, top)
    admin = _read_admin(reader, top)
    resolver = _read_resolver(reader, top)
    log = _read_log(reader, top)
    return Config(
        proxy=proxy,
        signing=signing,
        listeners=listeners,
        services=services,
        geo=geo,
        threat_intel=threat_intel,
        admin=admin,
        registry=registry,
        resolver=resolver,
        log=log,
    )


def _read_resolver(reader: Reader, top: dict) -> ResolverConfig:
    keys = ("latency_decay", "eject_after", "eject_base", "eject_max", "panic_threshold")
    table = reader.sub_table(top, "", "resolver", keys)
    if table is None:
        return ResolverConfig()
    base = reader.duration(table, "resolver", "eject_base", 10.0, maximum=_DAY)
    longest = reader.duration(table, "resolver", "eject_max", 300.0, maximum=_DAY)
    if longest < base:
        reader.add("resolver.eject_max", f"must be at least eject_base ({base:g}s)")
    return ResolverConfig(
        latency_decay=reader.duration(table, "resolver", "latency_decay", 10.0, positive=True, maximum=_DAY),
        eject_after=reader.integer(table, "resolver", "eject_after", 3, minimum=1, maximum=1000),
        eject_base=base,
        eject_max=longest,
        panic_threshold=reader.number(table, "resolver", "panic_threshold", 0.5, minimum=0.0, maximum=1.0),
    )


def _read_proxy(reader: Reader, top: dict) -> ProxyConfig:
    if "proxy" not in top:
        reader.add("proxy", "required ([proxy] with an id)")
        return ProxyConfig(id="")
    table = reader.table("proxy", top["proxy"], ("id", "location", "workers", "drain_timeout", "splice", "max_pipes"))
    if table is None:
        return ProxyConfig(id="")
    proxy_id = reader.string(table, "proxy", "id", "", required=True)
    return ProxyConfig(
        id=proxy_id,
        location=reader.location(table, "proxy", "location"),
        workers=_read_workers(reader, table),
        drain_timeout=reader.duration(table, "proxy", "drain_timeout", 30.0, maximum=_DAY),
        splice=reader.choice(table, "proxy", "splice", _SPLICE_MODES, "auto"),
        max_pipes=reader.integer(table, "proxy", "max_pipes", 4096, minimum=2, maximum=_MAX_PIPES),
    )


# How a connection's bytes move once its header is written (issue 10).
_SPLICE_MODES = ("auto", "userspace")
# Two pipes (four descriptors) per kernel-spliced connection.
_MAX_PIPES = 1_000_000


def _read_workers(reader: Reader, table: dict) -> int | str:
    """``workers``: a count of processes, or ``"auto"`` for one per core."""
    value = table.get("workers", 1)
    if value == "auto" and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        reader.add("proxy.workers", f'expected a number of processes or "auto", got {show(value)}')
        return 1
    return reader.integer(table, "proxy", "workers", 1, minimum=1, maximum=_MAX_WORKERS)


def _read_signing(reader: Reader, top: dict) -> SigningConfig:
    if "signing" not in top:
        reader.add("signing", "required ([signing] with private_key and kid)")
        return SigningConfig(private_key="", kid="")
    table = reader.table(
        "signing", top["signing"], ("private_key", "kid", "ttl", "tlv_type", "jwks")
    )
    if table is None:
        return SigningConfig(private_key="", kid="")
    private_key = reader.path(table, "signing", "private_key", required=True, readable=False)
    if private_key is not None and reader.check_files:
        _check_signing_key(reader, "signing.private_key", private_key)
    kid = reader.string(table, "signing", "kid", "", required=True)
    ttl = reader.duration(table, "signing", "ttl", 30.0, positive=True, maximum=_DAY)
    tlv_type = reader.integer(table, "signing", "tlv_type", 0xE0)
    if tlv_type is not None and not 0xE0 <= tlv_type <= 0xEF:
        reader.add("signing.tlv_type", f"must be in 0xE0..0xEF, got {tlv_type:#x}")
        tlv_type = 0xE0
    jwks = reader.path(table, "signing", "jwks")
    return SigningConfig(
        private_key=private_key or "", kid=kid, ttl=ttl, tlv_type=tlv_type, jwks=jwks
    )


_MAX_KEY_BYTES = 64 * 1024


def _check_signing_key(reader: Reader, path: str, filename: str) -> None:
    """The PolicyContext key must be an unencrypted Ed25519 PEM private key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        pem = read_file(filename, _MAX_KEY_BYTES)
    except FileProblem as e:
        reader.add(path, str(e))
        return
    try:
        key = load_pem_private_key(pem, password=None)
    except TypeError:
        reader.add(path, f"{filename} is encrypted; shardtcp needs an unencrypted key")
        return
    except (ValueError, UnsupportedAlgorithm) as e:
        reader.add(path, f"{filename} is not a PEM private key: {e}")
        return
    if not isinstance(key, Ed25519PrivateKey):
        reader.add(path, f"{filename} is not an Ed25519 key ({type(key).__name__})")


def _read_registry(reader: Reader, top: dict) -> RegistryConfig:
    table = reader.sub_table(
        top, "", "registry",
        ("kind", "endpoints", "prefix", "snapshot", "lease_ttl", "ca", "cert", "key", "username", "password_file"),
    )
    if table is None:
        return RegistryConfig()
    kind = reader.choice(table, "registry", "kind", ("static", "etcd"), "static")
    if kind != "etcd":
        for key in ("endpoints", "prefix", "snapshot", "lease_ttl", "ca", "cert", "key", "username", "password_file"):
            if key in table:
                reader.add(f"registry.{key}", 'only with kind = "etcd"')
        return RegistryConfig(kind=kind)
    endpoints = ("http://127.0.0.1:2379",)
    items = reader.string_list(table, "registry", "endpoints")
    if items is not None:
        for item_path, url in items:
            if not re.fullmatch(r"https?://[^/\s]+/?", url):
                reader.add(item_path, f"expected an http(s)://host:port URL, got {show(url)}")
        if table["endpoints"] == []:
            reader.add("registry.endpoints", "must not be empty")
        endpoints = tuple(url for _, url in items) or endpoints
    prefix = reader.string(table, "registry", "prefix", "/shardtcp/")
    if not prefix.startswith("/") or "\0" in prefix:
        reader.add("registry.prefix", f"must start with '/', got {show(prefix)}")
    snapshot = reader.string(table, "registry", "snapshot")
    if snapshot is not None:
        if "\0" in snapshot:
            reader.add("registry.snapshot", "must not contain a NUL byte")
            snapshot = None
        else:
            snapshot = os.path.join(reader.base_dir, snapshot)
    lease_ttl = reader.duration(table, "registry", "lease_ttl", 10.0)
    if not 2.0 <= lease_ttl <= 3600.0:
        reader.add("registry.lease_ttl", f"must be between 2s and 1h, got {lease_ttl:g}s")
        lease_ttl = 10.0
    return RegistryConfig(
        kind=kind, endpoints=endpoints, prefix=prefix, snapshot=snapshot, lease_ttl=lease_ttl,
        **_registry_access(reader, table, endpoints),
    )


def _registry_access(reader: Reader, table: dict, endpoints: tuple) -> dict:
    """``[registry]`` TLS (``ca``, ``cert``, ``key``) and etcd auth (``username``, ``password_file``)."""
    ca = reader.path(table, "registry", "ca")
    cert = reader.path(table, "registry", "cert")
    key = reader.path(table, "registry", "key")
    if (cert is None) != (key is None):
        reader.add("registry.cert" if cert is None else "registry.key", "cert and key go together")
    if (ca is not None or cert is not None) and not all(url.startswith("https://") for url in endpoints):
        reader.add("registry.endpoints", "ca, cert and key need https:// endpoints")
    username = reader.string(table, "registry", "username")
    password_file = reader.path(table, "registry", "password_file")
    if (username is None) != (password_file is None):
        reader.add("registry.username" if username is None else "registry.password_file",
                   "username and password_file go together")
    return {"ca": ca, "cert": cert, "key": key, "username": username, "password_file": password_file}


def read_registered_shard(service_id: str, shard_id: str, document: Any) -> tuple:
    """
    One shard record registered in etcd (SPEC 9): ``(ShardConfig, None)``,
    or ``(None, problem)`` with every problem on one line.

    The record holds the keys of a ``[[service.S.shard]]`` table; its ``id``,
    when present, must be the key's.  Files are not read (a registered
    record names none).
    """
    reader = Reader(base_dir="", check_files=False)
    path = f"shards/{service_id}/{shard_id}"
    table = reader.table(path, document, _SHARD_KEYS)
    if table is None:
        return None, "; ".join(reader.problems)
    table = dict(table)
    if table.setdefault("id", shard_id) != shard_id:
        return None, f"{path}.id: {show(table['id'])} is not the key's shard id"
    shard = _read_shard(reader, path, table)
    if reader.problems:
        return None, "; ".join(reader.problems)
    return shard, None


# -- services -----------------------------------------------------------------


def _read_services(reader: Reader, top: dict, registry: RegistryConfig) -> tuple:
    if "service" not in top:
        return ()
    services_table = top["service"]
    if not isinstance(services_table, dict):
        reader.add("service", f"expected tables [service.NAME], got {show(services_table)}")
        return ()
    services = []
    name_owner: dict[str, str] = {}
    shard_owner: dict[str, str] = {}
    for service_id, value in services_table.items():
        path = join("service", service_id)
        if not ID.fullmatch(service_id):
            reader.add(path, f"service id {show(service_id)} may only use A-Z a-z 0-9 _ . -")
        table = reader.table(path, value, _SERVICE_KEYS)
        if table is None:
            continue
        services.append(
            _read_service(reader, service_id, path, table, registry, name_owner, shard_owner)
        )
    return tuple(services)


def _read_service(
    reader: Reader,
    service_id: str,
    path: str,
    table: dict,
    registry: RegistryConfig,
    name_owner: dict[str, str],
    shard_owner: dict[str, str],
) -> ServiceConfig:
    names = []
    for item_path, written in reader.string_list(table, path, "names") or ():
        name, problem = canonical_service_name(written)
        if problem is not None:
            reader.add(item_path, problem)
            continue
        owner = name_owner.get(name)
        if owner == service_id:
            reader.add(item_path, f"{show(name)} is listed twice")
            continue
        if owner is not None:
            reader.add(
                item_path,
                f"{show(name)} is a name of both service {owner!r} and service {service_id!r}",
            )
            continue
        name_owner[name] = service_id
        names.append(name)

    upstream_tls = reader.boolean(table, path, "upstream_tls", False)
    upstream = {
        key: reader.path(table, path, key)
        for key in ("upstream_ca", "upstream_cert", "upstream_key")
    }
    if not upstream_tls:
        for key in upstream:
            if key in table:
                reader.add(join(path, key), "only with upstream_tls = true")
    if ("upstream_cert" in table) != ("upstream_key" in table):
        missing = "upstream_key" if "upstream_cert" in table else "upstream_cert"
        reader.add(join(path, missing), "required with " + (
            "upstream_cert" if missing == "upstream_key" else "upstream_key"))

    weights = _read_weights(reader, table, path)
    policy = _read_policy(reader, table, path)
    # A health check's own trust: tls checks verify with it, whatever the
    # connection path does (passthrough shards have no upstream_ca).
    health_ca = reader.path(table, path, "health_ca")
    shard_key = reader.choice(table, path, "shard_key", SHARD_KEYS, "none")
    bounded_load = reader.number(table, path, "bounded_load", 1.25, minimum=1.0, maximum=100.0)
    owners = _read_owners(reader, table, path)

    shards = []
    for shard_path, shard_table in reader.array_of_tables(table, path, "shard", _SHARD_KEYS):
        shard = _read_shard(reader, shard_path, shard_table)
        if shard.id:
            owner = shard_owner.get(shard.id)
            if owner is not None:
                reader.add(
                    join(shard_path, "id"),
                    f"shard id {shard.id!r} is already used in {owner}; shard ids "
                    "must be unique across the file (they are the tokens' aud)",
                )
            else:
                shard_owner[shard.id] = shard_path
        shards.append(shard)
    if registry.kind == "static" and not table.get("shard"):
        reader.add(
            join(path, "shard"),
            "at least one [[shard]] is required with the static registry",
        )

    return ServiceConfig(
        id=service_id,
        names=tuple(names),
        upstream_tls=upstream_tls,
        upstream_ca=upstream["upstream_ca"],
        upstream_cert=upstream["upstream_cert"],
        upstream_key=upstream["upstream_key"],
        weights=weights,
        policy=policy,
        shards=tuple(shards),
        health_ca=health_ca,
        shard_key=shard_key,
        bounded_load=bounded_load,
        owners=owners,
    )


def _read_owners(reader: Reader, table: dict, path: str) -> tuple:
    """``[service.S.owners]``: key glob -> shard ids, as ``((glob, ids), ...)``."""
    if "owners" not in table:
        return ()
    here = join(path, "owners")
    owners_table = table["owners"]
    if not isinstance(owners_table, dict):
        reader.add(here, f"expected a table of key glob = [shard ids], got {show(owners_table)}")
        return ()
    owners = []
    for pattern, _ in owners_table.items():
        entry = join(here, pattern)
        if len(pattern) > 253 or not pattern.isprintable():
            reader.add(entry, "a key glob is printable text of at most 253 characters")
            continue
        items = reader.string_list(owners_table, here, pattern)
        if items is None:
            continue
        if not items:
            reader.add(entry, "list at least one shard id")
            continue
        ids: list[str] = []
        for item_path, shard_id in items:
            if not ID.fullmatch(shard_id):
                reader.add(item_path, f"shard id {show(shard_id)} may only use A-Z a-z 0-9 _ . -")
            elif shard_id in ids:
                reader.add(item_path, f"{shard_id!r} is listed twice")
            else:
                ids.append(shard_id)
        owners.append((pattern, tuple(ids)))
    return tuple(owners)


def _read_weights(reader: Reader, table: dict, path: str) -> Weights:
    weights_table = reader.sub_table(table, path, "weights", ("latency", "security", "load"))
    if weights_table is None:
        return Weights()
    here = join(path, "weights")
    default = Weights()
    values = {
        key: reader.number(weights_table, here, key, getattr(default, key), minimum=0)
        for key in ("latency", "security", "load")
    }
    if sum(values.values()) <= 0:
        reader.add(here, "the weights must add up to more than 0")
        return default
    return Weights(**values)


def _read_policy(reader: Reader, table: dict, path: str) -> PolicyConfig:
    policy_table = reader.sub_table(table, path, "policy", _POLICY_KEYS)
    if policy_table is None:
        return PolicyConfig()
    here = join(path, "policy")
    default = PolicyConfig()
    encryption = reader.choice(policy_table, here, "encryption", ("none", "tls", "mtls"), "none")
    authentication = reader.choice(policy_table, here, "authentication", ("none", "mtls"), "none")
    acl = tuple(s for _, s in reader.string_list(policy_table, here, "acl") or ())
    allow = reader.networks(policy_table, here, "allow")
    deny = reader.networks(policy_table, here, "deny")
    min_score = reader.number(
        policy_table, here, "min_security_score", 0.0, minimum=0, maximum=100
    )
    regions = tuple(s for _, s in reader.string_list(policy_table, here, "regions") or ())
    return PolicyConfig(
        encryption=encryption,
        authentication=authentication,
        acl=acl,
        allow=default.allow if allow is None else allow,
        deny=deny or (),
        min_security_score=min_score,
        regions=regions,
    )


def _read_shard(reader: Reader, path: str, table: dict) -> ShardConfig:
    shard_id = reader.string(table, path, "id", "", required=True)
    if shard_id and not ID.fullmatch(shard_id):
        reader.add(join(path, "id"), f"shard id {show(shard_id)} may only use A-Z a-z 0-9 _ . -")
        shard_id = ""
    address = Address(host="", port=0)
    text = reader.string(table, path, "address", None, required=True)
    if text is not None:
        parsed = parse_address(text)
        if isinstance(parsed, str):
            reader.add(join(path, "address"), parsed)
        else:
            address = parsed
    server_name = reader.string(table, path, "server_name")
    if server_name is not None:
        server_name = server_name.lower()
        problem = dns_name_problem(server_name)
        if problem is None and server_name.startswith("*."):
            problem = f"{show(server_name)}: a wildcard cannot be checked against a certificate"
        if problem is not None:
            reader.add(join(path, "server_name"), problem)
            server_name = None
    return ShardConfig(
        id=shard_id,
        address=address,
        location=reader.location(table, path, "location"),
        capacity=reader.integer(table, path, "capacity", 1000, minimum=1),
        security_score=reader.number(table, path, "security_score", 100.0, minimum=0, maximum=100),
        weight=reader.number(table, path, "weight", 1.0, positive=True),
        server_name=server_name,
        health_check=_read_health_check(reader, table, path),
        slow_start=reader.duration(table, path, "slow_start", 30.0),
    )


def _read_health_check(reader: Reader, table: dict, path: str) -> Optional[HealthCheckConfig]:
    check = reader.sub_table(table, path, "health_check", _HEALTH_KEYS)
    if check is None:
        return None
    here = join(path, "health_check")
    kind = reader.choice(check, here, "kind", ("tcp", "tls", "agent"), "tcp", required=True)
    agent_port = reader.integer(check, here, "agent_port", None, minimum=1, maximum=65535)
    if kind == "agent" and "agent_port" not in check:
        reader.add(join(here, "agent_port"), 'required with kind = "agent"')
    elif kind != "agent" and "agent_port" in check:
        reader.add(join(here, "agent_port"), 'only with kind = "agent"')
        agent_port = None
    return HealthCheckConfig(
        kind=kind,
        interval=reader.duration(check, here, "interval", 2.0, positive=True),
        timeout=reader.duration(check, here, "timeout", 1.0, positive=True),
        rise=reader.integer(check, here, "rise", 2, minimum=1),
        fall=reader.integer(check, here, "fall", 3, minimum=1),
        agent_port=agent_port,
    )


# -- listeners ----------------------------------------------------------------


def _read_listeners(reader: Reader, top: dict, service_ids: set[str]) -> tuple:
    listeners = []
    seen: dict[str, str] = {}
    for path, table in reader.array_of_tables(top, "", "listener", _LISTENER_KEYS):
        listener = _read_listener(reader, path, table, service_ids)
        if listener.name:
            if listener.name in seen:
                reader.add(
                    join(path, "name"),
                    f"{listener.name!r} is already the name of {seen[listener.name]}",
                )
            else:
                seen[listener.name] = path
        listeners.append(listener)
    return tuple(listeners)


def _read_listener(
    reader: Reader, path: str, table: dict, service_ids: set[str]
) -> ListenerConfig:
    name = reader.string(table, path, "name", "", required=True)
    listen = read_endpoint(reader, table, path, "listen", required=True) or ""
    mode = reader.choice(table, path, "mode", _MODES, "passthrough")
    default_service = reader.string(table, path, "default_service")
    if default_service is not None and default_service not in service_ids:
        message = f"no service {default_service!r}"
        close = difflib.get_close_matches(default_service, sorted(service_ids), n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        reader.add(join(path, "default_service"), message)

    identify = _read_identify(reader, table, path, mode, default_service)

    accept_proxy = reader.boolean(table, path, "accept_proxy", False)
    trusted = reader.networks(table, path, "trusted_proxies")
    if accept_proxy and not table.get("trusted_proxies"):
        reader.add(join(path, "trusted_proxies"), "required with accept_proxy = true")
    if not accept_proxy and "trusted_proxies" in table:
        reader.add(join(path, "trusted_proxies"), "only with accept_proxy = true")
        trusted = None

    if mode != "terminate":
        for key in _TERMINATE_ONLY:
            if key in table:
                reader.add(
                    join(path, key),
                    f'only on mode = "terminate" listeners (this one is {mode!r})',
                )
        tls = {}
    else:
        tls = _read_termination(reader, table, path)

    return ListenerConfig(
        name=name,
        listen=listen,
        mode=mode,
        identify=identify,
        default_service=default_service,
        peek_timeout=reader.duration(table, path, "peek_timeout", 5.0),
        max_client_hello=reader.integer(
            table, path, "max_client_hello", 16384, minimum=512, maximum=65536
        ),
        accept_proxy=accept_proxy,
        trusted_proxies=trusted or (),
        idle_timeout=reader.duration(table, path, "idle_timeout", 0.0),
        connect_timeout=reader.duration(table, path, "connect_timeout", 5.0),
        retries=reader.integer(table, path, "retries", 2, minimum=0, maximum=10),
        max_connections=reader.integer(
            table, path, "max_connections", 0, minimum=0, maximum=_MAX_CONNECTIONS
        ),
        backlog=reader.integer(table, path, "backlog", 1024, minimum=1, maximum=65535),
        per_source=_read_per_source(reader, table, path),
        **tls,
    )


_MAX_CONNECTIONS = 10_000_000
_RATE = re.compile(r"([0-9]{1,9})/(s|m|h)")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def read_endpoint(
    reader: Reader, table: dict, path: str, name: str, *, required: bool
) -> Optional[str]:
    """A server endpoint string, with ``ssl:`` file paths made absolute."""
    value = reader.string(table, path, name, required=required)
    if value is None:
        return None
    description, problem = check_endpoint(value, reader.check_files, reader.absolute)
    if problem is not None:
        reader.add(join(path, name), problem)
        return None
    return description


def parse_rate(text: Any) -> float:
    """``"N/s"``, ``"N/m"`` or ``"N/h"`` as events per second; raises ``ValueError``."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f'expected a rate like "10/s", "600/m" or "0/s", got {show(text)}')
    return int(match.group(1)) / _RATE_UNITS[match.group(2)]


def _read_per_source(reader: Reader, table: dict, path: str) -> PerSourceConfig:
    per_source = reader.sub_table(table, path, "per_source", ("max_connections", "rate"))
    if per_source is None:
        return PerSourceConfig()
    here = join(path, "per_source")
    rate = 0.0
    if "rate" in per_source:
        try:
            rate = parse_rate(per_source["rate"])
        except ValueError as e:
            reader.add(join(here, "rate"), str(e))
    return PerSourceConfig(
        max_connections=reader.integer(
            per_source, here, "max_connections", 0, minimum=0, maximum=_MAX_CONNECTIONS
        ),
        rate=rate,
    )


def _read_identify(
    reader: Reader, table: dict, path: str, mode: str, default_service: Optional[str]
) -> tuple:
    here = join(path, "identify")
    if "identify" not in table:
        if mode == "plain":
            reader.add(here, f"required on plain listeners (any of {choices(_IDENTIFIERS[1:])})")
            return ()
        return ("sni",)
    items = reader.string_list(table, path, "identify")
    if items is None:
        return ("sni",) if mode != "plain" else ()
    identify: list[str] = []
    for item_path, value in items:
        if value not in _IDENTIFIERS:
            reader.add(item_path, f"expected one of {choices(_IDENTIFIERS)}, got {show(value)}")
        elif value in identify:
            reader.add(item_path, f"{value!r} is listed twice")
        elif value == "sni" and mode == "plain":
            reader.add(item_path, '"sni" is not possible on plain listeners (there is no TLS)')
        else:
            identify.append(value)
    if not table["identify"] and default_service is None:
        reader.add(here, "empty: list a way to identify the service, or set default_service")
    return tuple(identify)


def _read_termination(reader: Reader, table: dict, path: str) -> dict:
    """The TLS-termination keys of a terminate listener, as ListenerConfig keywords."""
    certificates = []
    for cert_path, cert_table in reader.array_of_tables(
        table, path, "certificates", ("names", "cert", "key")
    ):
        names = []
        for item_path, name in reader.string_list(cert_table, cert_path, "names") or ():
            name = name.lower()
            problem = dns_name_problem(name)
            if problem is not None:
                reader.add(item_path, problem)
            else:
                names.append(name)
        certificates.append(
            CertificateConfig(
                cert=reader.path(cert_table, cert_path, "cert", required=True) or "",
                key=reader.path(cert_table, cert_path, "key", required=True) or "",
                names=tuple(names),
            )
        )
    default_certificate = None
    default_table = reader.sub_table(table, path, "default_certificate", ("cert", "key"))
    if default_table is not None:
        here = join(path, "default_certificate")
        default_certificate = CertificateConfig(
            cert=reader.path(default_table, here, "cert", required=True) or "",
            key=reader.path(default_table, here, "key", required=True) or "",
        )
    if not table.get("certificates") and "default_certificate" not in table:
        reader.add(
            join(path, "certificates"),
            "a terminate listener needs certificates or a default_certificate",
        )

    alpn = []
    for item_path, protocol in reader.string_list(table, path, "alpn") or ():
        if len(protocol.encode("utf-8")) > 255:
            reader.add(item_path, "an ALPN protocol name is at most 255 bytes")
        else:
            alpn.append(protocol)

    client_ca = reader.path(table, path, "client_ca")
    require_client_cert = reader.boolean(table, path, "require_client_cert", False)
    if require_client_cert and "client_ca" not in table:
        reader.add(join(path, "client_ca"), "required with require_client_cert = true")
    return dict(
        certificates=tuple(certificates),
        default_certificate=default_certificate,
        strict_sni=reader.boolean(table, path, "strict_sni", False),
        alpn=tuple(alpn),
        min_tls=reader.choice(table, path, "min_tls", ("1.2", "1.3"), "1.2"),
        client_ca=client_ca,
        require_client_cert=require_client_cert,
    )


# -- geo, threat intelligence, admin -------------------------------------------


def _read_log(reader: Reader, top: dict) -> LogConfig:
    table = reader.sub_table(top, "", "log", ("access", "access_file"))
    if table is None:
        return LogConfig()
    access_file = reader.path(table, "log", "access_file", readable=False)
    if access_file is not None and reader.check_files and not os.path.isdir(os.path.dirname(access_file)):
        # Found now rather than at start-up, where it would stop the proxy.
        reader.add("log.access_file", f"the folder {os.path.dirname(access_file)} does not exist")
    return LogConfig(access=reader.choice(table, "log", "access", ACCESS_LOGS, "text"), access_file=access_file)


def _read_geo(reader: Reader, top: dict) -> tuple:
    geo = reader.sub_table(top, "", "geo", ("networks",))
    if geo is None:
        return ()
    networks = []
    known = ("cidr", "lat", "lon", "region")
    for path, table in reader.array_of_tables(geo, "geo", "networks", known):
        network = None
        if "cidr" not in table:
            reader.add(join(path, "cidr"), "required")
        else:
            network = reader.network(join(path, "cidr"), table["cidr"])
        location = reader.location_fields(table, path)
        if network is not None:
            networks.append(GeoNetwork(network=network, location=location))
    return tuple(networks)


def _is_url(source: str) -> bool:
    return re.match(r"https?://", source, re.IGNORECASE) is not None


def _read_threat_intel(reader: Reader, top: dict) -> Optional[ThreatIntelConfig]:
    table = reader.sub_table(
        top, "", "threat_intel", ("trusted_keys", "feeds", "on_expiry", "state_file")
    )
    if table is None:
        return None
    trusted_keys = reader.path(table, "threat_intel", "trusted_keys", required=True)
    feeds = []
    for path, feed in reader.array_of_tables(table, "threat_intel", "feeds", ("source", "refresh")):
        source = reader.string(feed, path, "source", required=True)
        if source is not None and _is_url(source):
            if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", source, re.IGNORECASE):
                reader.add(join(path, "source"), f"not a valid URL: {show(source)}")
        elif source is not None and "\x00" in source:
            reader.add(join(path, "source"), "the path contains a NUL byte")
            source = None
        elif source is not None:
            # A feed file may not exist yet; it is read at each refresh.
            source = reader.absolute(source)
        refresh = reader.duration(feed, path, "refresh", 60.0, positive=True)
        if source is not None:
            feeds.append(FeedSourceConfig(source=source, refresh=refresh))
    state_file = reader.path(table, "threat_intel", "state_file", readable=False)
    if state_file is not None and reader.check_files:
        folder = os.path.dirname(state_file)
        if not os.path.isdir(folder):
            reader.add("threat_intel.state_file", f"folder {folder} does not exist")
    return ThreatIntelConfig(
        trusted_keys=trusted_keys or "",
        feeds=tuple(feeds),
        on_expiry=reader.choice(
            table, "threat_intel", "on_expiry", ("baseline", "distrust"), "baseline"
        ),
        state_file=state_file,
    )


def _read_admin(reader: Reader, top: dict) -> Optional[AdminConfig]:
    table = reader.sub_table(top, "", "admin", ("listen", "token_file"))
    if table is None:
        return None
    return AdminConfig(
        listen=read_endpoint(reader, table, "admin", "listen", required=True) or "",
        token_file=reader.path(table, "admin", "token_file"),
    )

