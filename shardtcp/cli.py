"""
The ``shardtcp`` command: everything an operator does besides running the
proxy (``twistd shardtcp``).

Subcommands: ``check-config``, ``keygen``, ``explain``, ``decode-header``,
``sign-feed``, ``init-example``, ``example-shards``, ``demo`` and ``ctl``.  Each
returns an exit status; none prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def _cmd_check_config(args) -> int:
    from shardtcp.config import ConfigError, config_notes, listen_problems, load_config

    try:
        config = load_config(args.path, check_files=True)
        problems = [] if args.no_listen else listen_problems(config)
    except ConfigError as e:
        config, problems = None, e.problems
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 1
    # Notes do not make the file invalid: they go with the verdict.
    for line in config_notes(config):
        print(line)
    print(f"{args.path}: valid")
    return 0


def _cmd_keygen(args) -> int:
    from shardtcp.keys import generate_keypair

    try:
        paths = generate_keypair(args.out, kid=args.kid)
    except (OSError, ValueError) as e:
        print(f"shardtcp keygen: {e}", file=sys.stderr)
        return 1
    for label in ("private_key", "public_key", "jwks"):
        value = getattr(paths, label, None)
        if value:
            print(f"{label}: {value}")
    return 0


def _cmd_explain(args) -> int:
    """
    Rank a service's shards for a client as the running proxy would: the
    same ``[resolver]`` tuning and the threat feeds in force.  Exit 1 when
    the client would be refused admission (a threat feed, the policy's
    access rules) or the configuration is bad, 2 when ``--client`` is not
    an IP address (a usage error, as argparse's), else 0.
    """
    from shardtcp.config import ConfigError, load_config
    from shardtcp.keys import JWKSError
    from shardtcp.model import ConnectionRequest
    from shardtcp.net import parse_ip
    from shardtcp.resolver.feeds import ThreatIntelError
    from shardtcp.resolver.service import build_resolver

    if parse_ip(args.client) is None:
        print(f"shardtcp explain: --client {args.client!r} is not an IP address", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, check_files=False)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 1
    if config.service(args.service) is None:
        print(f"shardtcp explain: unknown service {args.service!r}", file=sys.stderr)
        return 1
    clock = _frozen_clock()
    resolver = build_resolver(config, clock=clock)
    try:
        intel = _feeds_in_force(config, resolver, clock)
    except (JWKSError, OSError, ThreatIntelError) as e:
        print(f"shardtcp explain: threat_intel: {e}", file=sys.stderr)
        return 1
    request = ConnectionRequest(
        service_id=args.service, client=(args.client, 0), sni=args.sni, listener="explain"
    )
    try:
        explanation = resolver.explain(request, key=args.key)
    finally:
        if intel is not None:
            intel.stopService()
    if args.json:
        print(json.dumps(explanation_json(explanation), indent=2))
    else:
        print(format_explanation(explanation))
    return 1 if explanation.denied is not None else 0


def _frozen_clock():
    """A clock for offline use: the time now, standing still."""
    import time

    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(time.time())
    return clock


def _feeds_in_force(config, resolver, clock):
    """
    Apply the threat feeds the proxy has in force to ``resolver`` (their
    deny networks and security scores), without writing anything: the
    feeds remembered in the state file when there is one (the proxy records
    each feed it accepts there), else the local feed files read now.  HTTP
    sources are not fetched.  Returns the started ``ThreatIntel``, or None.
    """
    settings = config.threat_intel
    if settings is None:
        return None
    from shardtcp.keys import load_jwks
    from shardtcp.resolver.feeds import FeedState, FeedValidator, ThreatIntel

    validator = FeedValidator(
        load_jwks(settings.trusted_keys), now=clock.seconds, state=FeedState(settings.state_file)
    )
    if settings.state_file is not None:
        sources = ()
    else:
        sources = tuple(
            s for s in settings.feeds if not s.source.lower().startswith(("http://", "https://"))
        )
    intel = ThreatIntel(validator, sources, resolver, reactor=clock, on_expiry=settings.on_expiry)
    intel.startService()
    resolver.set_admission(intel.denies)
    return intel


def explanation_json(explanation) -> dict:
    """A JSON-ready form of a resolver ``Explanation`` (also used by admin)."""
    loc = explanation.client_location
    return {
        "service": explanation.request.service_id,
        "client": explanation.request.client[0],
        "client_location": None
        if loc is None
        else {"lat": loc.lat, "lon": loc.lon, "region": loc.region},
        "location_source": explanation.location_source,
        "denied": explanation.denied,
        "panic": getattr(explanation, "panic", False),
        "shards": [
            {
                "shard": s.shard.shard_id,
                "address": str(s.shard.address),
                "region": s.shard.region,
                "health": s.shard.health.value,
                "eligible": not s.rejected_by,
                "rejected_by": list(s.rejected_by),
                "set_aside": list(getattr(s, "set_aside", ())),
                "total": round(s.evaluation.total, 4),
                "latency": round(s.evaluation.latency, 4),
                "security": round(s.evaluation.security, 4),
                "load": round(s.evaluation.load, 4),
                "details": {k: _jsonable(v) for k, v in s.evaluation.details.items()},
            }
            for s in explanation.shards
        ],
        **_owners_json(explanation),
    }


def _owners_json(explanation) -> dict:
    """``key`` and ``owners`` (the owner chain) of a keyed explanation, else nothing."""
    chain = getattr(explanation, "owners", None)
    if chain is None:
        return {}
    return {
        "key": chain.key,
        "owners": [
            {
                "shard": o.shard_id,
                "pinned": o.pinned,
                "takes": i == chain.taker,
                "skipped": list(o.skipped),
                "open_connections": o.open_connections,
                "bound": o.bound,
            }
            for i, o in enumerate(chain.owners)
        ],
    }


def format_owners(chain) -> list[str]:
    """The owner chain of a key, one line per owner, as ``explain --key`` prints it."""
    lines = [f"owners of key {chain.key!r}:"]
    for i, o in enumerate(chain.owners):
        if i == chain.taker:
            state = "takes it"
        elif o.skipped:
            state = "skipped: " + "; ".join(o.skipped)
        else:
            state = "next"
        pinned = " (pinned)" if o.pinned else ""
        bound = f" {o.open_connections}/{o.bound} open" if o.bound is not None else ""
        lines.append(f"  {i + 1:<3}{o.shard_id:<20}{state}{pinned}{bound}")
    if chain.taker is None:
        lines.append("  no owner is eligible")
    return lines


def _jsonable(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return str(value)


def format_explanation(explanation) -> str:
    """The ranking as an operator reads it, factor by factor."""
    req = explanation.request
    loc = explanation.client_location
    where = "unknown" if loc is None else f"{loc.lat:.2f},{loc.lon:.2f} {loc.region}".strip()
    lines = [
        f"service {req.service_id}, client {req.client[0]} at {where} ({explanation.location_source})"
    ]
    if explanation.denied:
        lines.append(f"DENIED: {explanation.denied}")
    if getattr(explanation, "panic", False):
        lines.append("PANIC: too few healthy shards; routing among all of them")
    lines.append(
        f"{'rank':<5}{'shard':<20}{'region':<14}{'total':>7}{'latency':>9}{'security':>9}{'load':>7}  notes"
    )
    rank = 0
    for s in explanation.shards:
        e = s.evaluation
        if s.rejected_by:
            label = "-"
            notes = "rejected: " + "; ".join(s.rejected_by)
        else:
            rank += 1
            label = str(rank)
            d = e.details
            notes = ", ".join(
                f"{k}={_jsonable(d[k])}"
                for k in (
                    "distance_km",
                    "rtt_ms",
                    "latency_source",
                    "measured_rtt_ms",
                    "open_connections",
                    "capacity",
                    "agent_load",
                    "slow_start_ramp",
                )
                if d.get(k) is not None
            )
        lines.append(
            f"{label:<5}{s.shard.shard_id:<20}{s.shard.region or '-':<14}"
            f"{e.total:>7.3f}{e.latency:>9.3f}{e.security:>9.3f}{e.load:>7.3f}  {notes}"
        )
    if getattr(explanation, "owners", None) is not None:
        lines.extend(format_owners(explanation.owners))
    return "\n".join(lines)


def _cmd_decode_header(args) -> int:
    from shardtcp.headerdump import decode_header_file

    return decode_header_file(args.file, jwks=args.jwks, audience=args.audience)


def _cmd_sign_feed(args) -> int:
    from shardtcp.keys import KeyFileError
    from shardtcp.resolver.feeds import FeedRejected, sign_feed_file

    try:
        token = sign_feed_file(args.feed, args.key, args.kid)
    except FeedRejected as e:
        print(f"shardtcp sign-feed: {args.feed}: {e}", file=sys.stderr)
        return 1
    except (KeyFileError, OSError, ValueError) as e:
        print(f"shardtcp sign-feed: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(token.decode("ascii") + "\n")
    return 0


def _cmd_init_example(args) -> int:
    from shardtcp.example.kit import CONFIG_NAME, twistd_plugin_problem, write_example_files

    try:
        written = write_example_files(args.dir)
    except (OSError, ValueError) as e:
        print(f"shardtcp init-example: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    config = os.path.join(args.dir, CONFIG_NAME)
    print(
        "example files ready; run the example's shards, then the proxy:\n"
        f"  shardtcp example-shards --config {config} &\n"
        f"  twistd -n shardtcp --config {config}"
    )
    problem = twistd_plugin_problem()
    if problem is not None:
        print(f"shardtcp init-example: warning: {problem}", file=sys.stderr)
    return 0


def _cmd_example_shards(args) -> int:
    from shardtcp.example.kit import run_example_shards

    return run_example_shards(args.config)


def _cmd_register(args) -> int:
    from shardtcp.config import parse_duration, read_registered_shard
    from shardtcp.registry.register import run_registration

    record: dict = {"address": args.address}
    if args.location:
        parts = args.location.split(",")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            record["location"] = {"lat": float(parts[0]), "lon": float(parts[1])}
        except ValueError:
            print(f"shardtcp register: --location: expected LAT,LON[,REGION], got {args.location!r}", file=sys.stderr)
            return 2
        if len(parts) == 3:
            record["location"]["region"] = parts[2]
    for key in ("capacity", "security_score", "weight", "server_name"):
        value = getattr(args, key)
        if value is not None:
            record[key] = value
    _, problem = read_registered_shard(args.service, args.id, record)
    if problem is not None:
        print(f"shardtcp register: {problem}", file=sys.stderr)
        return 1
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as e:
        print(f"shardtcp register: --ttl: {e}", file=sys.stderr)
        return 2
    if not 2 <= ttl <= 3600:
        print("shardtcp register: --ttl: must be between 2s and 1h", file=sys.stderr)
        return 2
    endpoints = [url.strip() for url in args.endpoints.split(",") if url.strip()]
    access = None
    if args.ca or args.cert or args.username:
        from shardtcp.model import RegistryConfig
        from shardtcp.registry.access import read_password
        from shardtcp.registry.etcd import EtcdError

        if (args.cert is None) != (args.key is None):
            print("shardtcp register: --cert and --key go together", file=sys.stderr)
            return 2
        if (args.username is None) != (args.password_file is None):
            print("shardtcp register: --username and --password-file go together", file=sys.stderr)
            return 2
        if args.password_file:
            try:
                read_password(args.password_file)
            except EtcdError as e:
                print(f"shardtcp register: {e}", file=sys.stderr)
                return 1
        access = RegistryConfig(
            kind="etcd", endpoints=tuple(endpoints), prefix=args.prefix, ca=args.ca, cert=args.cert,
            key=args.key, username=args.username, password_file=args.password_file,
        )
    return run_registration(
        endpoints, prefix=args.prefix, service=args.service, shard_id=args.id, record=record, ttl=int(ttl),
        access=access,
    )


def _cmd_demo(args) -> int:
    from shardtcp.example.demo import run_demo

    return run_demo(port=args.port, workdir=args.workdir, check=args.check)


#: ``shardtcp ctl`` actions and the arguments each takes.
CTL_ACTIONS = {"status": (), "reload": (), "drain": ("ID",), "ready": ("ID",), "weight": ("ID", "W"), "clear": ("ID",)}

#: The ``shardtcp ctl`` actions that ``--etcd`` / ``--fleet`` write fleet-wide.
FLEET_ACTIONS = ("drain", "ready", "weight", "clear")


def _ctl_fleet(args, fail) -> int:
    """drain/ready/weight/clear as ``<prefix>/admin/<shard-id>`` in etcd (SPEC 9)."""
    from shardtcp.admin.client import AdminClientError, FleetClient

    if args.action not in FLEET_ACTIONS:
        return fail(f"{args.action} is not a fleet-wide action (those are: {', '.join(FLEET_ACTIONS)})")
    endpoints = [url for item in args.etcd or () for url in item.split(",") if url]
    prefix = args.prefix
    if args.fleet:
        if args.config is None:
            return fail("--fleet reads [registry] from --config PATH")
        from shardtcp.config import ConfigError, load_config

        try:
            config = load_config(args.config, check_files=False)
        except ConfigError as e:
            return fail(f"{args.config}: {e.problems[0] if e.problems else 'not valid'}")
        if config.registry.kind != "etcd":
            return fail(f'{args.config}: [registry] kind is not "etcd"')
        endpoints = endpoints or list(config.registry.endpoints)
        prefix = prefix or config.registry.prefix
        registry = config.registry
        secure = {"ca": registry.ca, "cert": registry.cert, "key": registry.key, "username": registry.username}
        if registry.password_file:
            from shardtcp.registry.access import read_password
            from shardtcp.registry.etcd import EtcdError

            try:
                secure["password"] = read_password(registry.password_file)
            except EtcdError as e:
                return fail(str(e))
    else:
        secure = {}
    for url in endpoints:
        if not url.startswith(("http://", "https://")):
            return fail(f"--etcd {url!r} is not an http:// or https:// URL")
    try:
        client = FleetClient(endpoints, prefix or "/shardtcp/", **secure)
        return _ctl_shard_change(client, args, fail)
    except AdminClientError as e:
        return fail(str(e))


def _ctl_shard_change(client, args, fail) -> int:
    """drain/ready/clear ID or weight ID W through ``client``; the answer printed as JSON."""
    if args.action == "weight":
        try:
            weight = float(args.args[1])
        except ValueError:
            return fail(f"weight {args.args[1]!r} is not a number")
        result = client.weight(args.args[0], weight)
    elif args.action == "reload":
        result = client.reload()
    else:
        result = getattr(client, args.action)(args.args[0])
    print(json.dumps(result, sort_keys=True))
    return 0


def _cmd_ctl(args) -> int:
    """
    The admin API from the command line.  The URL and token come from
    ``--admin``/``--token-file``, else from the ``[admin]`` table of
    ``--config``.  Exit 0 when the call succeeded, 1 otherwise, with one
    line on stderr.
    """
    from shardtcp.admin import AdminError, read_token
    from shardtcp.admin.client import AdminClient, AdminClientError, admin_url, format_status

    def fail(line: str) -> int:
        print(f"shardtcp ctl: {line}", file=sys.stderr)
        return 1

    wanted = CTL_ACTIONS[args.action]
    if len(args.args) != len(wanted):
        usage = " ".join((args.action,) + wanted)
        return fail(f"usage: shardtcp ctl [--admin URL] [--token-file F] [--config PATH] {usage}")
    if args.etcd or args.fleet:
        return _ctl_fleet(args, fail)
    if args.action == "clear":
        return fail("clear removes a fleet-wide override: give --etcd URL or --fleet")
    url, token_file = args.admin, args.token_file
    if args.config is not None and (url is None or token_file is None):
        from shardtcp.config import ConfigError, load_config

        try:
            config = load_config(args.config, check_files=False)
        except ConfigError as e:
            return fail(f"{args.config}: {e.problems[0] if e.problems else 'not valid'}")
        if config.admin is None:
            if url is None:
                return fail(f"{args.config} has no [admin] table; give --admin URL")
        else:
            try:
                url = url or admin_url(config.admin.listen)
            except AdminClientError as e:
                return fail(str(e))
            token_file = token_file or config.admin.token_file
    if url is None:
        return fail("give --admin URL or --config PATH")
    if not url.startswith(("http://", "https://")):
        return fail(f"--admin {url!r} is not an http:// or https:// URL")
    token = None
    if token_file is not None:
        try:
            token = read_token(token_file).decode("ascii")
        except AdminError as e:
            return fail(str(e))
    client = AdminClient(url, token)
    try:
        if args.action == "status":
            document = client.status()
            print(json.dumps(document, indent=2) if args.json else format_status(document))
            return 0
        return _ctl_shard_change(client, args, fail)
    except AdminClientError as e:
        return fail(str(e))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardtcp",
        description="shardtcp: a secure layer-4 proxy. Run it with: twistd -n shardtcp --config PATH",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("path")
    p.add_argument(
        "--no-listen",
        action="store_true",
        help="do not try to bind the listening ports (by default each is bound and released)",
    )
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("keygen", help="write an Ed25519 signing key pair and a JWKS file")
    p.add_argument("--out", required=True, help="folder to write into")
    p.add_argument("--kid", default="policy-1", help="key id (default: policy-1)")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("explain", help="show how the resolver would rank the shards for a client")
    p.add_argument("--config", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--client", required=True, help="client IP address")
    p.add_argument("--sni", default=None)
    p.add_argument("--key", default=None, help="shard key: show its owner chain (services with shard_key)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("decode-header", help="parse a captured PROXY header and verify its PolicyContext")
    p.add_argument("file", help="raw bytes or hex; - for standard input")
    p.add_argument("--jwks", default=None, help="JWKS file to verify the PolicyContext with")
    p.add_argument("--audience", default=None, help="also require this shard id as 'aud'")
    p.set_defaults(func=_cmd_decode_header)

    p = sub.add_parser("sign-feed", help="sign a threat-intelligence feed (JSON claims) as a compact JWS")
    p.add_argument("--key", required=True, help="Ed25519 private key (PEM)")
    p.add_argument("--kid", required=True, help="key id written into the JWS header")
    p.add_argument("feed", help="JSON file with iss, iat, exp, seq, shards, deny")
    p.set_defaults(func=_cmd_sign_feed)

    p = sub.add_parser(
        "init-example", help="create the keys, certificates and feed that etc/shardtcp.toml names (examples only)"
    )
    p.add_argument(
        "dir",
        nargs="?",
        default="etc",
        help="the folder of the example configuration (default: etc); shardtcp.toml is written there when missing",
    )
    p.set_defaults(func=_cmd_init_example)

    p = sub.add_parser(
        "example-shards",
        help="run the reference shards the example configuration names, until Ctrl-C (examples only)",
    )
    p.add_argument("--config", default="etc/shardtcp.toml", help="the example configuration (default: etc/shardtcp.toml)")
    p.set_defaults(func=_cmd_example_shards)

    p = sub.add_parser("register", help="keep one shard registered in etcd while this runs (SPEC 9)")
    p.add_argument("--endpoints", required=True, help="etcd client URLs, comma-separated")
    p.add_argument("--prefix", default="/shardtcp", help="the registry's key prefix (default /shardtcp)")
    p.add_argument("--service", required=True, help="the service the shard belongs to")
    p.add_argument("--id", required=True, help="the shard's id (unique across services)")
    p.add_argument("--address", required=True, help="HOST:PORT the proxy connects to")
    p.add_argument("--location", help="LAT,LON[,REGION]")
    p.add_argument("--capacity", type=int)
    p.add_argument("--security-score", dest="security_score", type=float)
    p.add_argument("--weight", type=float)
    p.add_argument("--server-name", dest="server_name")
    p.add_argument("--ttl", default="10s", help="the lease's time to live (default 10s)")
    p.add_argument("--ca", help="https etcd: the CA (PEM) its certificate must chain to")
    p.add_argument("--cert", help="https etcd: this client's certificate (PEM), with --key")
    p.add_argument("--key", help="https etcd: this client's private key (PEM)")
    p.add_argument("--username", help="etcd auth: the user, with --password-file")
    p.add_argument("--password-file", dest="password_file", help="etcd auth: a file whose first line is the password")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("demo", help="start local verifying shards and a proxy in front of them")
    p.add_argument("--port", type=int, default=8443, help="proxy port on 127.0.0.1 (default 8443; 0 = any)")
    p.add_argument("--workdir", default=None, help="where to write keys, certificates and config")
    p.add_argument("--check", action="store_true", help="exit after the self-check (status 0 = all verified)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "ctl",
        help="call the admin API: status | reload | drain ID | ready ID | weight ID W",
        description="Call a running proxy's admin API. Defaults come from the [admin] table of --config. "
        "With --etcd or --fleet, drain/ready/weight/clear are written to etcd for every proxy (SPEC 9).",
    )
    p.add_argument("--etcd", action="append", default=None, metavar="URL",
                   help="fleet-wide: write the override to this etcd (repeat or comma-separate)")
    p.add_argument("--fleet", action="store_true", help="fleet-wide: etcd endpoints and prefix from --config's [registry]")
    p.add_argument("--prefix", default=None, help="fleet-wide: the registry prefix (default /shardtcp/)")
    p.add_argument("--admin", default=None, metavar="URL", help="the admin API, e.g. http://127.0.0.1:9901")
    p.add_argument("--token-file", default=None, metavar="F", help="the bearer token for changes")
    p.add_argument("--config", default=None, metavar="PATH", help="read --admin and --token-file from its [admin]")
    p.add_argument("--json", action="store_true", help="status: print the JSON document")
    p.add_argument("action", choices=sorted(CTL_ACTIONS))
    p.add_argument("args", nargs="*", metavar="ARG")
    p.set_defaults(func=_cmd_ctl)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)
