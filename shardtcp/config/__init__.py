# -*- test-case-name: tests.config -*-
"""
The configuration file: TOML in, validated ``shardtcp.model.Config`` out.

``load_config`` reads a file and ``parse_config`` checks an already decoded
TOML document (SPEC section 3).  Neither stops at the first mistake: every
problem found is collected as one line ``"key.path: message"``
(``listener[1].listen``, ``service.api.shard[2].address``, 0-based indexes)
and raised together in one ``ConfigError``, so that ``shardtcp check-config``
can list them all at once.  Nothing but ``ConfigError`` escapes them.

Relative paths are resolved against the configuration file's folder and
stored absolute.  With ``check_files=False`` no file named by the
configuration is opened, which lets an example or a configuration meant for
another machine be checked for shape alone.

The package: ``_reader`` (bounded reads, TOML, typed access), ``_values``
(names and addresses), ``_endpoints`` (Twisted endpoint strings),
``_sections`` (one reader per table), ``_checks`` (checks across tables).
"""

from __future__ import annotations

import os
from typing import Optional

import attrs

from shardtcp.config._checks import (
    POLICY_TLV_LIMIT,
    TokenSizer,
    default_token_size,
    health_trust_notes,
    run_checks,
)
from shardtcp.config._endpoints import listen_address, listen_problem
from shardtcp.config._reader import (
    ConfigError,
    Reader,
    parse_duration,
    read_document,
    read_file,
    FileProblem,
)
from shardtcp.config._sections import parse_rate, read_config, read_registered_shard
from shardtcp.model import Config

__all__ = [
    "ConfigError",
    "FileProblem",
    "POLICY_TLV_LIMIT",
    "check_config",
    "config_notes",
    "default_token_size",
    "listen_problems",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_rate",
    "read_file",
    "read_registered_shard",
]


def load_config(path: str, *, check_files: bool = True) -> Config:
    """
    Read, parse and validate the TOML configuration at ``path``.

    Raises ``ConfigError`` listing every problem found; a TOML syntax error
    is a single problem ``"PATH: line L, column C: message"``.
    """
    data = read_document(path)
    absolute = os.path.abspath(path)
    config = parse_config(data, os.path.dirname(absolute), check_files=check_files)
    return attrs.evolve(config, path=absolute)


def parse_config(
    data: dict,
    base_dir: str,
    *,
    check_files: bool = True,
    token_size: Optional[TokenSizer] = None,
) -> Config:
    """
    Validate a decoded TOML document and build the ``Config`` it describes.

    ``base_dir`` is the folder relative paths are resolved against.
    ``token_size`` computes the worst-case PolicyContext size of a (service,
    shard) pair, taking the keywords of
    ``shardtcp.policy.worst_case_token_size`` (which is used when it is not
    given and that function exists; without either the size is not checked).
    Raises ``ConfigError`` listing every problem found.
    """
    reader = Reader(os.path.abspath(base_dir), check_files)
    config = read_config(reader, data)
    run_checks(reader, config, token_size)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


def listen_problems(config: Config) -> list[str]:
    """
    One line per listening endpoint of ``config`` that cannot be bound now
    (the port is in use, the address is not local...).  Each port is bound
    and released at once; port 0 and non-TCP endpoints are not tried.
    """
    problems = []
    endpoints = [(f"listener[{i}].listen", l.listen) for i, l in enumerate(config.listeners)]
    if config.admin is not None:
        endpoints.append(("admin.listen", config.admin.listen))
    taken: dict = {}
    for path, description in endpoints:
        address = listen_address(description)
        if address is not None and address in taken:
            # Each probe releases its port, so two listeners on one port
            # would both pass; the second bind at start-up would not.
            problems.append(f"{path}: the same port as {taken[address]}")
            continue
        if address is not None:
            taken[address] = path
        problem = listen_problem(description)
        if problem is not None:
            problems.append(f"{path}: {problem}")
    return problems


def config_notes(config: Config) -> list[str]:
    """Lines worth an operator's attention that do not make ``config`` invalid."""
    return health_trust_notes(config)


def check_config(path: str, *, try_listen: bool = True) -> list[str]:
    """
    The problems of the configuration at ``path``, files included; an empty
    list when it is valid.  This is what ``shardtcp check-config`` prints.
    With ``try_listen``, every listening port is also bound and released, so
    that a port in use is a problem here rather than at start-up.
    """
    try:
        config = load_config(path, check_files=True)
    except ConfigError as e:
        return list(e.problems)
    return listen_problems(config) if try_listen else []
