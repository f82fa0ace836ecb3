# -*- test-case-name: tests.registry.test_access -*-
"""
An ``EtcdClient`` for a configuration's ``[registry]``: its endpoints, TLS
(``ca``, ``cert``, ``key``) and etcd auth (``username``, ``password_file``).
"""

from __future__ import annotations

from shardtcp.model import RegistryConfig
from shardtcp.registry.etcd import EtcdClient, EtcdError, tls_agent

#: The longest password file read.
MAX_PASSWORD = 4096


def read_password(path: str) -> str:
    """The first line of ``path``, without its line ending."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PASSWORD + 1)
    except OSError as e:
        raise EtcdError(f"registry.password_file {path}: {e.strerror or e}") from None
    if len(data) > MAX_PASSWORD:
        raise EtcdError(f"registry.password_file {path}: longer than {MAX_PASSWORD} bytes")
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[0] if lines else ""


def etcd_client(registry: RegistryConfig, reactor) -> EtcdClient:
    """The client every registry part of a proxy uses."""
    agent = None
    if registry.ca is not None or registry.cert is not None:
        agent = tls_agent(reactor, registry.ca, registry.cert, registry.key)
    password = read_password(registry.password_file) if registry.password_file else None
    return EtcdClient(reactor, registry.endpoints, agent=agent, username=registry.username, password=password)
