"""
Helpers of the end-to-end tests: real shards, a real proxy and real TLS
clients over loopback sockets.

``Deployment`` is one test's world in a temporary folder: a policy signing
key and its JWKS (``shardtcp.keys``), a certificate authority
(``shardtcp.example.pki``), reference shards (``shardtcp.example.shard``) listening on
port 0 and verifying every PROXY v2 header against that JWKS, a TOML
configuration naming them, and the proxy built from it with
``shardtcp.tap.build_service`` on the test's reactor.  Its cleanup waits for
every connection to end, closes what is left, stops the proxy and the shards.

The clients are blocking (run them with ``deferToThread``):

* ``TLSClient`` drives Python's ``ssl`` through ``MemoryBIO`` over a socket
  it pumps itself, so a test controls every byte on the wire: the
  ClientHello sent one byte at a time or re-framed into several records, a
  ``close_notify`` followed by ``shutdown(SHUT_WR)``.
* ``plain_tls_exchange`` is an ordinary ``ssl.SSLSocket`` client.

Configurations are written by ``Deployment.write_config`` (from dicts) or
``Deployment.start_proxy_text`` (hand-written TOML, with ``listener_toml``
and ``service_toml``); ``EdgeFixture`` adds the edge, client and foreign
certificate authorities that terminating listeners need.  Shards run in
process (``add_shard``, ``add_plain_shard``) or as child processes
(``add_shard_process``) that a test may kill.

Every child process (``twistd``, ``openssl``, ``curl``, ``pip``, a shard)
goes through ``spawn`` or ``run_child``: a ``ChildProcess`` of the reactor,
killed after its timeout and stopped in cleanup.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import ssl
import sys
import time
from typing import Callable, Optional, Sequence

import attrs
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer, protocol, tcp
from twisted.internet import ssl as tssl
from twisted.internet.task import deferLater

from shardtcp import keys as keymod
from shardtcp.backend import ShardVerifier
from shardtcp.config import load_config
from shardtcp.example.pki import CertificateAuthority
from shardtcp.example.shard import ShardFactory, shard_factory, tls_options
from shardtcp.tap import ProxyService, build_service

SERVICE_NAME = "api.example.test"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@attrs.frozen
class Place:
    """Where a shard (or a client network) stands."""

    lat: float
    lon: float
    region: str


FRANKFURT = Place(50.11, 8.68, "eu-central")
AMSTERDAM = Place(52.37, 4.90, "eu-west")
NEW_YORK = Place(40.71, -74.0, "us-east")
SINGAPORE = Place(1.35, 103.82, "ap-southeast")

# [geo] of every deployment: 127.0.0.2 is in New York, 127.0.0.3 in Singapore;
# 127.0.0.1 is unknown, so the proxy's own place (Frankfurt) stands for it.
GEO = (("127.0.0.2/32", NEW_YORK), ("127.0.0.3/32", SINGAPORE))


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0,
    then closed).  Another process may take it before it is used again:
    callers that listen on it must be ready to retry.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` on the reactor until it holds (True) or ``timeout`` passes (False)."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await deferLater(reactor, interval, lambda: None)


@attrs.define
class Shard:
    """A shard of the deployment; ``factory`` is None for one that refuses connections."""

    shard_id: str
    place: Place
    port: int
    factory: Optional[ShardFactory] = None
    listening: object = None
    cert_pem: bytes = b""
    cert_der: bytes = b""


class Deployment:
    """
    Shards, a configuration and a proxy for one test, in ``case.mktemp()``.

    Everything started here is stopped by a cleanup registered at
    construction; it runs after the test's own cleanups.
    """

    def __init__(self, case, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._case = case
        self._reactor = reactor
        self.directory = os.path.abspath(case.mktemp())
        os.makedirs(self.directory)
        key_paths = keymod.generate_keypair(os.path.join(self.directory, "keys"), kid="policy-1")
        self.jwks = key_paths.jwks
        self.private_key = key_paths.private_key
        self.ca = CertificateAuthority("shardtcp e2e CA")
        self.cert_dir = os.path.join(self.directory, "certs")
        os.makedirs(self.cert_dir)
        self.ca_path = self.ca.write(self.cert_dir, "ca")
        self.shards: dict[str, Shard] = {}
        self.proxy: Optional[ProxyService] = None
        self.config_path: Optional[str] = None
        self._authorities: dict[str, tuple[CertificateAuthority, str]] = {}
        case.addCleanup(lambda: defer.ensureDeferred(self._shut_down()))

    # -- certificates -----------------------------------------------------

    def authority(self, stem: str, name: Optional[str] = None) -> tuple[CertificateAuthority, str]:
        """
        Another certificate authority of this deployment (the edge's own
        certificates, client certificates, someone else's), made on first
        use and written to ``<directory>/<stem>.pem``: (the CA, that path).
        """
        if stem not in self._authorities:
            ca = CertificateAuthority(name or f"shardtcp e2e {stem}")
            self._authorities[stem] = (ca, ca.write(self.directory, stem))
        return self._authorities[stem]

    def issue_server(self, stem: str, ca: CertificateAuthority, names: Sequence[str], **kw) -> tuple[str, str]:
        """A server certificate from ``ca`` written as ``<stem>.pem`` / ``<stem>.key`` beside the configuration."""
        return ca.issue_server(list(names), **kw).write(self.directory, stem)

    def issue_client(self, ca: CertificateAuthority, **kw) -> tuple[str, str]:
        """The ``orders-client`` certificate (SAN URI ``spiffe://example.test/orders``) from ``ca``."""
        issued = ca.issue_client("orders-client", uri="spiffe://example.test/orders", **kw)
        return issued.write(self.directory, f"client-{id(issued)}")

    # -- shards -----------------------------------------------------------

    def add_shard(
        self, shard_id: str, place: Place, behaviour: str = "hello", *, alpn: Optional[list] = None,
        names: Sequence[str] = (),
    ) -> Shard:
        """
        Start a verifying TLS reference shard on 127.0.0.1:0, with the TLS
        options ``shardtcp.example.shard.tls_options`` gives (as the demo).
        With ``alpn`` (a list), the shard instead negotiates ``http/1.1``
        when offered and appends every offered ALPN list to ``alpn``.
        ``names`` are further names its certificate holds.
        """
        issued = self.ca.issue_server(
            [SERVICE_NAME, f"*.{SERVICE_NAME}", f"{shard_id}.shards.test", *names], common_name=shard_id
        )
        cert_path, key_path = issued.write(self.cert_dir, shard_id)
        if alpn is None:
            options = tls_options(cert_path, key_path)
        else:
            private = tssl.PrivateCertificate.loadPEM(issued.cert_pem + b"\n" + issued.key_pem)
            options = RecordingALPNOptions(
                alpn, privateKey=private.privateKey.original, certificate=private.original
            )
        return self._listen_shard(
            shard_id, place, behaviour, options, issued.cert_pem, issued.cert.public_bytes(serialization.Encoding.DER)
        )

    def _listen_shard(
        self, shard_id: str, place: Place, behaviour: str, options, cert_pem: bytes = b"", cert_der: bytes = b""
    ) -> Shard:
        """Listen with a reference shard verifying against this deployment's JWKS; record it."""
        verifier = ShardVerifier.from_jwks(shard_id, self.jwks)
        factory = shard_factory(shard_id, verifier, tls=options, reactor=self._reactor, behaviour=behaviour)
        listening = self._reactor.listenTCP(0, factory, interface="127.0.0.1")
        shard = Shard(
            shard_id=shard_id,
            place=place,
            port=listening.getHost().port,
            factory=factory,
            listening=listening,
            cert_pem=cert_pem,
            cert_der=cert_der,
        )
        self.shards[shard_id] = shard
        return shard

    def add_plain_shard(
        self,
        shard_id: str,
        place: Place = FRANKFURT,
        behaviour: str = "hello",
        *,
        tls_names: Optional[Sequence[str]] = None,
        ca: Optional[CertificateAuthority] = None,
    ) -> Shard:
        """
        Start a verifying reference shard on 127.0.0.1:0 that speaks plain
        TCP after the PROXY header, or, with ``tls_names``, TLS with a
        certificate for those names from ``ca`` (default: the deployment's).
        """
        options = None
        cert_pem = b""
        if tls_names:
            issued = (ca or self.ca).issue_server(list(tls_names), common_name=shard_id)
            cert_path, key_path = issued.write(self.cert_dir, shard_id)
            options = tls_options(cert_path, key_path)
            cert_pem = issued.cert_pem
        return self._listen_shard(shard_id, place, behaviour, options, cert_pem)

    async def add_shard_process(
        self, shard_id: str, place: Place = FRANKFURT, timeout: float = 20.0, *, extra: Sequence[str] = ()
    ) -> tuple:
        """
        Start a TLS reference shard as a child process (``python -m
        shardtcp.example.shard``), so that a test can kill it; returns
        (its ``ChildProcess``, its port) once it listens.  Stopped in cleanup.
        ``extra`` arguments are appended (``--listen``, ``--behaviour``...).
        """
        cert, key = self.ca.issue_server(
            [SERVICE_NAME, f"*.{SERVICE_NAME}", f"{shard_id}.shards.test"], common_name=shard_id
        ).write(self.cert_dir, shard_id)
        port_file = os.path.join(self.directory, f"{shard_id}.port")
        if os.path.exists(port_file):
            os.remove(port_file)  # a restarted shard writes it again
        child = spawn(
            self._case,
            [sys.executable, "-m", "shardtcp.example.shard", "--id", shard_id, "--jwks", self.jwks,
             "--cert", cert, "--key", key, "--port-file", port_file, *extra],
            timeout=600.0,
        )
        if not await wait_for(lambda: child.done or os.path.exists(port_file), timeout):
            raise RuntimeError(f"shard {shard_id} did not start")
        if child.done:
            raise RuntimeError(f"shard {shard_id} ended: {child.err.decode(errors='replace')}")
        # The port file may exist before it has been written to the end.
        if not await wait_for(lambda: _read_port(port_file) is not None, timeout):
            raise RuntimeError(f"shard {shard_id} wrote no port")
        port = _read_port(port_file)
        self.shards[shard_id] = Shard(shard_id=shard_id, place=place, port=port)
        return child, port

    def add_refusing_shard(self, shard_id: str, place: Place) -> Shard:
        """A shard in the configuration whose port refuses connections (nothing listens)."""
        shard = Shard(shard_id=shard_id, place=place, port=free_port())
        self.shards[shard_id] = shard
        return shard

    # -- configuration and proxy -----------------------------------------

    def write_config(
        self,
        listeners: Sequence[dict] = ({"name": "edge"},),
        port: int = 0,
        name: str = "shardtcp.toml",
    ) -> str:
        """
        Write the proxy's configuration: one ``api`` service (names
        ``api.example.test`` and ``*.api.example.test``) with every shard
        added so far, the ``[geo]`` of ``GEO``, and ``listeners`` (dicts of
        listener keys; ``listen`` defaults to ``tcp:<port>:interface=127.0.0.1``,
        ``mode`` to passthrough, ``connect_timeout`` to 2 s).
        """
        lines = [
            "[proxy]",
            'id = "edge-e2e-1"',
            f"location = {{ lat = {FRANKFURT.lat}, lon = {FRANKFURT.lon}, region = {_toml_string(FRANKFURT.region)} }}",
            "",
            "[signing]",
            f"private_key = {_toml_string(os.path.relpath(self.private_key, self.directory))}",
            'kid = "policy-1"',
            'ttl = "30s"',
            "",
        ]
        for listener in listeners:
            entry = {
                "listen": f"tcp:{port}:interface=127.0.0.1",
                "mode": "passthrough",
                "identify": ["sni"],
                "connect_timeout": "2s",
                **listener,
            }
            lines.append("[[listener]]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in entry.items()]
            lines.append("")
        lines += [
            "[service.api]",
            f"names = [{_toml_string(SERVICE_NAME)}, {_toml_string('*.' + SERVICE_NAME)}]",
            "",
            "[service.api.policy]",
            'acl = ["orders:read", "orders:write"]',
            "min_security_score = 50",
            "",
        ]
        for shard in self.shards.values():
            p = shard.place
            lines += [
                "[[service.api.shard]]",
                f"id = {_toml_string(shard.shard_id)}",
                f'address = "127.0.0.1:{shard.port}"',
                f"location = {{ lat = {p.lat}, lon = {p.lon}, region = {_toml_string(p.region)} }}",
                "capacity = 100",
                "security_score = 90",
                "",
            ]
        lines.append("[geo]")
        lines.append("networks = [")
        for cidr, p in GEO:
            lines.append(
                f"  {{ cidr = {_toml_string(cidr)}, lat = {p.lat}, lon = {p.lon}, region = {_toml_string(p.region)} }},"
            )
        lines.append("]")
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.config_path = path
        return path

    def start_proxy(self, listeners: Sequence[dict] = ({"name": "edge"},)) -> ProxyService:
        """Write the configuration, build the proxy with ``build_service`` and start it."""
        path = self.write_config(listeners)
        self.proxy = build_service(load_config(path), self._reactor)
        self.proxy.startService()
        return self.proxy

    def start_proxy_text(self, body: str, proxy_id: str = "edge-t", name: str = "proxy.toml") -> int:
        """
        Build and start the proxy from a configuration written by hand:
        ``[proxy]`` and ``[signing]`` (this deployment's key) followed by
        ``body``, relative paths resolved against ``directory``.  Returns
        the port of the listener named ``edge``.
        """
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(
                f"[proxy]\nid = {_toml_string(proxy_id)}\n[signing]\n"
                f"private_key = {_toml_string(os.path.relpath(self.private_key, self.directory))}\n"
                'kid = "policy-1"\n' + body
            )
        self.config_path = path
        self.proxy = build_service(load_config(path), self._reactor)
        self.proxy.startService()
        return self.port("edge")

    def rejected(self, reason: str, listener: str = "edge") -> float:
        """How many connections the in-process proxy refused for ``reason`` on ``listener``."""
        return self.metric("shardtcp_connections_rejected_total", listener=listener, reason=reason)

    def port(self, listener: str = "edge") -> int:
        """The bound port of one of the in-process proxy's listeners."""
        assert self.proxy is not None
        return self.proxy.listening_port(listener).getHost().port

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the in-process proxy's metrics (0.0 when absent)."""
        assert self.proxy is not None
        return self.proxy.metrics.value(name, **labels)

    def proxy_connections(self) -> int:
        """Client connections the in-process proxy holds now, over all listeners."""
        if self.proxy is None:
            return 0
        return sum(len(f.context.connections) for f in self.proxy.factories.values())

    def shard_connections(self) -> int:
        """Verified connections the shards hold now."""
        return sum(s.factory.active for s in self.shards.values() if s.factory is not None)

    # -- teardown ---------------------------------------------------------

    def _our_ports(self) -> set:
        ports = {s.port for s in self.shards.values()}
        if self.proxy is not None:
            for listener in self.proxy.factories:
                port = self.proxy.listening_port(listener)
                if port is not None:
                    ports.add(port.getHost().port)
        return ports

    async def _shut_down(self) -> None:
        # Connections should end by themselves; whatever is left after a
        # grace period (a test that failed half-way) is aborted, so that one
        # failure does not leave the reactor dirty for the next test.
        await wait_for(lambda: self.proxy_connections() == 0 and self.shard_connections() == 0, 5.0)
        ports = self._our_ports()
        leftovers = [
            s
            for s in set(self._reactor.getReaders()) | set(self._reactor.getWriters())
            if isinstance(s, tcp.Connection)
            and (s.getHost().port in ports or s.getPeer().port in ports)
        ]
        for connection in leftovers:
            connection.abortConnection()
        if leftovers:
            await deferLater(self._reactor, 0.05, lambda: None)
        if self.proxy is not None and self.proxy.running:
            await self.proxy.stopService()
        for shard in self.shards.values():
            if shard.listening is not None:
                await shard.listening.stopListening()


def _read_port(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isascii() and text.isdigit() else None


def listener_toml(mode: str = "passthrough", extra: str = "", *, name: str = "edge", connect_timeout: str = "2s") -> str:
    """One ``[[listener]]`` on 127.0.0.1:0, as TOML text, with ``extra`` lines appended."""
    return (
        f'[[listener]]\nname = {_toml_string(name)}\nlisten = "tcp:0:interface=127.0.0.1"\n'
        f'mode = {_toml_string(mode)}\nconnect_timeout = {_toml_string(connect_timeout)}\n{extra}\n'
    )


def service_toml(shards: Sequence[tuple], *, policy: str = "", upstream: str = "", service: str = "api",
                 names: Sequence[str] = (SERVICE_NAME, "*." + SERVICE_NAME)) -> str:
    """
    A ``[service.<service>]`` as TOML text; ``shards`` are (id, port,
    extra TOML lines) on 127.0.0.1.
    """
    text = f"[service.{service}]\nnames = {_toml_value(list(names))}\n{upstream}\n"
    if policy:
        text += f"[service.{service}.policy]\n{policy}\n"
    for shard_id, port, extra in shards:
        text += (
            f"[[service.{service}.shard]]\nid = {_toml_string(shard_id)}\n"
            f'address = "127.0.0.1:{port}"\n{extra}\n'
        )
    return text


class EdgeFixture:
    """
    A ``Deployment`` for tests that write their configuration by hand
    (terminate, preamble), with the certificates those configurations name: the edge's own (``api.pem``, ``default.pem``, from
    ``server-ca.pem``), client certificates (``client-ca.pem``) and
    someone else's CA; shards use the deployment's CA (``shard_ca_path``).
    """

    def __init__(self, case) -> None:
        self.deployment = Deployment(case)
        self.server_ca, self.server_ca_path = self.deployment.authority("server-ca", "edge CA")
        self.client_ca, self.client_ca_path = self.deployment.authority("client-ca", "clients CA")
        self.other_ca, _ = self.deployment.authority("other-ca", "someone else's CA")
        self.shard_ca_path = self.deployment.ca_path
        self.deployment.issue_server("api", self.server_ca, [SERVICE_NAME, f"*.{SERVICE_NAME}"])
        self.deployment.issue_server("default", self.server_ca, ["default.example.test"])

    @property
    def shards(self) -> dict:
        """The shard factories by id (what each shard verified)."""
        return {k: s.factory for k, s in self.deployment.shards.items()}

    @property
    def service(self):
        """The running proxy (``ProxyService``)."""
        return self.deployment.proxy

    def start_shard(self, shard_id: str, *, tls_names=None, behaviour: str = "hello") -> int:
        return self.deployment.add_plain_shard(shard_id, behaviour=behaviour, tls_names=tls_names).port

    def client_cert(self, ca=None, **kw):
        return self.deployment.issue_client(ca or self.client_ca, **kw)

    def proxy(self, text: str) -> int:
        return self.deployment.start_proxy_text(text)

    def rejected(self, reason: str) -> float:
        return self.deployment.rejected(reason)


def terminate_listener_toml(extra: str = "") -> str:
    """A terminating ``edge`` listener with the ``api.pem`` certificate for the service's names."""
    return listener_toml(
        mode="terminate",
        extra='certificates = [ { names = ["api.example.test", "*.api.example.test"], cert = "api.pem", key = "api.key" } ]\n'
        + extra,
    )


def tls_client(port, *, server_name: Optional[str] = SERVICE_NAME, cafile=None, cert=None, alpn=None, source="127.0.0.1"):
    """
    Handshake through the proxy and return (the peer certificate's CN,
    negotiated ALPN, the first line read).
    """
    result = plain_tls_exchange(port, cafile, server_name=server_name, cert=cert, alpn=alpn or (), source=source)
    return result["cn"], result["alpn"], result["hello"]


class RecordingALPNOptions(tssl.CertificateOptions):
    """
    Server TLS options that record the ALPN list of every ClientHello (the
    shard's view of it, after the proxy) and pick ``http/1.1`` when offered.
    """

    def __init__(self, offered: list, **kw) -> None:
        super().__init__(**kw)
        self.offered = offered

    def getContext(self):
        context = super().getContext()
        context.set_alpn_select_callback(self._select)
        return context

    def _select(self, connection, offered: list):
        self.offered.append(list(offered))
        return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


class BufferWatch:
    """
    Sample, every ``interval`` seconds, how many bytes the proxy's sockets
    hold in Twisted's write buffers (the client side of its listeners and
    its connections to the shards), and keep the peak: what the proxy holds
    for a connection beyond one read per direction.

    It reads ``FileDescriptor``'s buffer fields, which Twisted has kept
    for many years; ``peak`` is what the tests assert on.
    """

    def __init__(self, deployment: "Deployment", interval: float = 0.005) -> None:
        from twisted.internet.task import LoopingCall

        self._deployment = deployment
        self._reactor = deployment._reactor
        self.peak = 0
        self.samples = 0
        self._interval = interval
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self._reactor

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    @staticmethod
    def _held(connection) -> int:
        return len(connection.dataBuffer) - connection.offset + connection._tempDataLen

    def sample(self) -> None:
        proxy_ports = set()
        if self._deployment.proxy is not None:
            for name in self._deployment.proxy.factories:
                proxy_ports.add(self._deployment.port(name))
        shard_ports = {s.port for s in self._deployment.shards.values()}
        held = 0
        for c in set(self._reactor.getReaders()) | set(self._reactor.getWriters()):
            if isinstance(c, tcp.Server) and c.getHost().port in proxy_ports:
                held += self._held(c)
            elif isinstance(c, tcp.Client) and c.getPeer().port in shard_ports:
                held += self._held(c)
        self.samples += 1
        self.peak = max(self.peak, held)


def count_reads(factory) -> list:
    """
    Record the size of every read the connections of ``factory`` see, in
    order, by wrapping ``buildProtocol`` on this one instance: the list is
    the TCP segmentation as the proxy experienced it.
    """
    reads: list = []
    build = factory.buildProtocol

    def counting_build(addr):
        proto = build(addr)
        received = proto.dataReceived

        def data_received(data: bytes) -> None:
            reads.append(len(data))
            received(data)

        proto.dataReceived = data_received
        return proto

    factory.buildProtocol = counting_build
    return reads


# ---------------------------------------------------------------------------
# Blocking TLS clients (run them in a thread)


class ClosedByPeer(Exception):
    """The connection ended; ``data`` is what had arrived, ``clean`` whether TLS closed with close_notify."""

    def __init__(self, data: bytes, clean: bool) -> None:
        super().__init__(f"closed ({'close_notify' if clean else 'no close_notify'}) after {len(data)} bytes")
        self.data = data
        self.clean = clean


class TLSClient:
    """
    Python ``ssl`` over ``MemoryBIO`` on a socket this object pumps, so
    that a test decides how each byte goes on the wire.

    ``server_name`` None sends no SNI (the certificate chain is still
    verified against ``ca_path``, the host name is not).
    """

    def __init__(
        self,
        port: int,
        server_name: Optional[str],
        ca_path: str,
        *,
        source: str = "127.0.0.1",
        alpn: Sequence[str] = (),
        timeout: float = 15.0,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local = self.sock.getsockname()
        context = ssl.create_default_context(cafile=ca_path)
        if server_name is None:
            context.check_hostname = False
        if alpn:
            context.set_alpn_protocols(list(alpn))
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname=server_name)
        self._plain = bytearray()
        self._eof = False
        self._clean = False
        self.hello: Optional[bytes] = None
        self.cert: Optional[dict] = None
        self.cert_der: Optional[bytes] = None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "TLSClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def client_hello(self) -> bytes:
        """The first flight (the ClientHello records), not yet sent."""
        if self.hello is None:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            self.hello = self._out.read()
        return self.hello

    def _flush(self) -> None:
        pending = self._out.read()
        if pending:
            self.sock.sendall(pending)

    def _pull(self) -> bool:
        """Read one chunk from the socket into TLS; False at EOF."""
        data = self.sock.recv(262144)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    def handshake(self, send_hello: Optional[Callable[[socket.socket, bytes], None]] = None) -> None:
        """
        Complete the handshake, sending the ClientHello with
        ``send_hello(sock, hello)`` (default: at once); raises
        ``ssl.SSLError`` (e.g. an alert) or ``ClosedByPeer``.  The peer's
        certificate is kept in ``cert`` and ``cert_der``.
        """
        hello = self.client_hello()
        if send_hello is None:
            self.sock.sendall(hello)
        else:
            send_hello(self.sock, hello)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._pull():
                    try:
                        self.tls.do_handshake()
                    except ssl.SSLWantReadError:
                        pass
                    raise ClosedByPeer(b"", False)
        self._flush()
        self.cert = self.tls.getpeercert()
        self.cert_der = self.tls.getpeercert(binary_form=True)

    def send(self, data: bytes, chunk: int = 65536) -> None:
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            self.tls.write(view[start : start + chunk])
            self._flush()

    def _decrypt_available(self) -> None:
        """Move every decrypted byte into the buffer; note the end of the stream."""
        while not self._eof:
            try:
                data = self.tls.read(262144)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self._end(clean=True)
                return
            except ssl.SSLEOFError:
                self._end(clean=False)
                return
            if not data:
                # SSLObject.read answers a close_notify with b"".
                self._end(clean=True)
                return
            self._plain += data

    def _end(self, clean: bool) -> None:
        self._eof = True
        self._clean = clean

    def _fill(self, enough: Callable[[], bool]) -> None:
        """Read until ``enough()`` holds; ``ClosedByPeer`` (with what is buffered) if the stream ends first."""
        while True:
            self._decrypt_available()
            if enough():
                return
            if self._eof:
                data = bytes(self._plain)
                self._plain.clear()
                raise ClosedByPeer(data, self._clean)
            self._flush()  # e.g. key updates
            if not self._pull():
                self._decrypt_available()
                if not self._eof:
                    self._end(clean=False)

    def recv_some(self) -> bytes:
        """At least one byte of application data (raises ``ClosedByPeer`` at the end)."""
        self._fill(lambda: bool(self._plain))
        out = bytes(self._plain)
        self._plain.clear()
        return out

    def read_line(self) -> bytes:
        """One line of application data, with its newline."""
        self._fill(lambda: b"\n" in self._plain)
        line, _, rest = bytes(self._plain).partition(b"\n")
        self._plain[:] = rest
        return line + b"\n"

    def read_exactly(self, count: int) -> bytes:
        self._fill(lambda: len(self._plain) >= count)
        out = bytes(self._plain[:count])
        del self._plain[:count]
        return out

    def read_to_end(self) -> tuple[bytes, bool]:
        """Everything until the connection ends: (data, ended with close_notify)."""
        try:
            self._fill(lambda: False)
        except ClosedByPeer as e:
            return e.data, e.clean
        raise AssertionError("unreachable")

    def close_notify(self) -> None:
        """Send a TLS close_notify (this side will write no more); reading goes on."""
        try:
            self.tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLSyscallError):
            pass
        self._flush()


def half_close_exchange(port: int, ca_path: str, payload: bytes, *, source: str = "127.0.0.1") -> dict:
    """
    Handshake, read the shard's hello line, send ``payload``, then a TLS
    ``close_notify`` and ``shutdown(SHUT_WR)``, and read to the end: the
    hello line, what came back, whether it ended with close_notify, the
    peer certificate (DER) and the client's address.
    """
    with TLSClient(port, SERVICE_NAME, ca_path, source=source) as client:
        client.handshake()
        line = client.read_line()
        client.send(payload)
        client.close_notify()
        client.sock.shutdown(socket.SHUT_WR)
        data, clean = client.read_to_end()
        return {"hello": line, "data": data, "clean": clean, "der": client.cert_der, "local": client.local}


def send_bytewise(pause: float = 0.001) -> Callable[[socket.socket, bytes], None]:
    """A ``send_hello`` that sends one byte per segment (TCP_NODELAY is on), ``pause`` apart."""

    def send(sock: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
            time.sleep(pause)

    return send


def common_name(cert: dict) -> Optional[str]:
    """The subject CN of a certificate as ``getpeercert()`` gives it."""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def plain_tls_exchange(
    port: int,
    ca_path: Optional[str],
    *,
    server_name: Optional[str] = SERVICE_NAME,
    source: str = "127.0.0.1",
    payload: bytes = b"",
    cert: Optional[tuple] = None,
    alpn: Sequence[str] = (),
    timeout: float = 15.0,
) -> dict:
    """
    An ordinary ``ssl.SSLSocket`` client: connect, read the shard's hello
    line, send ``payload`` and read its echo.  ``ca_path`` None verifies
    nothing; ``cert`` is a client (certificate, key) pair.  Returns the
    hello line, the echo, the peer certificate (dict, DER and subject CN),
    the negotiated ALPN, the TLS version and the client's address.
    """
    context = ssl.create_default_context(cafile=ca_path)
    if server_name is None or ca_path is None:
        context.check_hostname = False
    if ca_path is None:
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(*cert)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as raw:
        local = raw.getsockname()
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            reader = tls.makefile("rb")
            hello = reader.readline()
            echo = b""
            if payload:
                tls.sendall(payload)
                echo = reader.read(len(payload))
            reader.close()
            der = tls.getpeercert(binary_form=True)
            return {
                "hello": hello,
                "echo": echo,
                "cert": tls.getpeercert(),
                "der": der,
                "cn": der_common_name(der) if der else None,
                "alpn": tls.selected_alpn_protocol(),
                "local": local,
                "version": tls.version(),
            }


def der_common_name(der: bytes) -> Optional[str]:
    """The subject CN of a DER certificate (readable even when nothing was verified)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return names[0].value if names else None


def exchange_until_close(port: int, data: bytes, *, source: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """
    Send ``data`` on a plain socket and read until the proxy closes
    cleanly; a reset raises ``ConnectionResetError``.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(data)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, str]:
    """
    Send ``data`` on a plain socket and read until the proxy closes:
    (bytes received, "eof" or "reset").
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return received, "eof"
                received += chunk
        except ConnectionResetError:
            return received, "reset"


def parse_hello(line: bytes) -> dict:
    """The fields of a shard's hello line (``SHARD id key=value ...``)."""
    text = line.decode("utf-8").strip()
    words = text.split(" ")
    if len(words) < 2 or words[0] != "SHARD":
        raise ValueError(f"not a hello line: {text!r}")
    fields = {"shard": words[1]}
    for word in words[2:]:
        key, _, value = word.partition("=")
        fields[key] = value
    return fields


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# Child processes


def openssl_binary() -> Optional[str]:
    return shutil.which("openssl")


def twistd_binary() -> str:
    """``twistd`` next to the running interpreter (the virtualenv's)."""
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(candidate):
        return candidate
    found = shutil.which("twistd")
    if found is None:
        raise FileNotFoundError("no twistd next to the interpreter or on PATH")
    return found


def child_environment(**extra: str) -> dict:
    """The environment of a child: ours, with this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    path = [REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(extra)
    return env


class ChildProcess(protocol.ProcessProtocol):
    """
    A child of the reactor whose output is collected; ``ended`` fires with
    its exit code (or ``-signal``).  ``until``, when given, closes the
    child's stdin once that text has appeared on its stdout.
    """

    def __init__(self, stdin: bytes = b"", until: Optional[bytes] = None) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.done = False
        self.status: Optional[int] = None
        self._stdin = stdin
        self._until = until
        self._stdin_closed = False

    def connectionMade(self) -> None:
        if self._stdin:
            self.transport.write(self._stdin)
        if self._until is None:
            self.transport.closeStdin()
            self._stdin_closed = True

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if not self._stdin_closed and self._until is not None and self._until in self.out:
            self._stdin_closed = True
            self.transport.closeStdin()

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.done = True
        code = getattr(reason.value, "exitCode", None)
        signal_number = getattr(reason.value, "signal", None)
        self.status = code if code is not None else -(signal_number or 0)
        self.ended.callback(self.status)

    def signal(self, name: str) -> None:
        if not self.done:
            try:
                self.transport.signalProcess(name)
            except Exception:
                pass

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns when the child is reaped."""
        if self.done:
            return
        self.signal("TERM")
        if not await wait_for(lambda: self.done, grace):
            self.signal("KILL")
            await wait_for(lambda: self.done, 5.0)


def spawn(case, argv: Sequence[str], *, stdin: bytes = b"", until: Optional[bytes] = None,
          env: Optional[dict] = None, cwd: Optional[str] = None, timeout: float = 30.0) -> ChildProcess:
    """
    Start ``argv`` as a child process; it is stopped in cleanup (SIGTERM,
    then SIGKILL), and killed after ``timeout`` seconds if still running.
    """
    from twisted.internet import reactor

    child = ChildProcess(stdin, until)
    reactor.spawnProcess(child, argv[0], list(argv), env=env if env is not None else child_environment(), path=cwd)
    killer = reactor.callLater(timeout, child.signal, "KILL")

    async def cleanup() -> None:
        if killer.active():
            killer.cancel()
        await child.stop()

    case.addCleanup(lambda: defer.ensureDeferred(cleanup()))
    child.ended.addBoth(lambda result: (killer.cancel() if killer.active() else None, result)[1])
    return child


def require_binary(name: str) -> str:
    """The path of ``name`` on PATH, or ``SkipTest`` saying it is not installed."""
    from twisted.trial.unittest import SkipTest

    found = shutil.which(name)
    if found is None:
        raise SkipTest(f"{name} is not installed")
    return found


async def run_child(case, argv: Sequence[str], *, stdin: bytes = b"", timeout: float = 20.0,
                    env: Optional[dict] = None, cwd: Optional[str] = None) -> ChildProcess:
    """
    Run ``argv`` (its program looked up on PATH) to the end with ``stdin``
    as its input; killed after ``timeout`` seconds.  Returns the ended
    ``ChildProcess`` (``status``, ``out``, ``err``).
    """
    program = argv[0] if os.path.isabs(argv[0]) else require_binary(argv[0])
    child = spawn(case, [program, *argv[1:]], stdin=stdin, env=env, cwd=cwd, timeout=timeout)
    await child.ended
    return child


def s_client_argv(port: int, ca_path: str, server_name: Optional[str], *extra: str) -> list:
    """``openssl s_client`` to 127.0.0.1:``port``, verifying against ``ca_path`` (fatally)."""
    argv = [openssl_binary(), "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", ca_path, "-verify_return_error"]
    if server_name is None:
        argv.append("-noservername")
    else:
        argv += ["-servername", server_name, "-verify_hostname", server_name]
    return argv + list(extra)


_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)


def first_certificate(output: bytes) -> Optional[bytes]:
    """The first PEM certificate in ``openssl s_client`` output (the server's own)."""
    match = _PEM.search(output)
    return match.group(0) if match else None


def pem_body(pem: bytes) -> bytes:
    """A PEM certificate without whitespace, for comparing two copies."""
    return b"".join(pem.split())


async def wait_until_accepting(port: int, timeout: float, alive: Callable[[], bool]) -> bool:
    """Poll 127.0.0.1:``port`` until it accepts a connection, while ``alive()``."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1)
        try:
            connected = await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
        except Exception:
            await deferLater(reactor, 0.1, lambda: None)
            continue
        connected.transport.abortConnection()
        await deferLater(reactor, 0.01, lambda: None)
        return True
    return False


class EtcdServer:
    """
    A real single-member etcd on loopback ports, its data in ``case.mktemp()``.

    ``start()`` waits until it answers; ``stop()`` ends it (SIGTERM) and
    ``start()`` again brings the same data back; ``kill()`` is SIGKILL.  It
    is stopped in cleanup.  ``etcd`` missing from PATH fails the test: CI
    installs Debian's ``etcd-server``.
    """

    def __init__(self, case) -> None:
        self._case = case
        self.binary = shutil.which("etcd") or "/usr/bin/etcd"
        if not os.path.exists(self.binary):
            case.fail("etcd is not installed (Debian package etcd-server)")
        self.data_dir = os.path.abspath(case.mktemp())
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.child: Optional[ChildProcess] = None
        #: More etcd flags for ``start()`` (auth token settings, a TLS listener).
        self.extra_args: list = []
        case.addCleanup(lambda: defer.ensureDeferred(self.stop()))

    async def start(self, timeout: float = 15.0) -> None:
        """Start etcd and wait until ``/health`` answers."""
        from twisted.internet import reactor

        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            self.binary,
            "--name", "shardtcp-test",
            "--data-dir", self.data_dir,
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"shardtcp-test={peer}",
            *self.extra_args,
        ]
        self.child = spawn(self._case, argv, timeout=600.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.child.done:
                raise AssertionError(f"etcd exited: {self.child.err[-2000:]!r}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.5) as s:
                    s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                    if b'"health":"true"' in s.recv(4096):
                        return
            except OSError:
                pass
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError("etcd did not become healthy in time")

    async def stop(self) -> None:
        """SIGTERM etcd and wait for it to end."""
        child, self.child = self.child, None
        if child is not None and not child.done:
            await child.stop()

    async def kill(self) -> None:
        """SIGKILL etcd and wait for it to end."""
        child, self.child = self.child, None
        if child is not None and not child.done:
            child.signal("KILL")
            await child.ended


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> float:
    """Poll ``predicate()`` until true; the seconds it took.  AssertionError after ``timeout``."""
    from twisted.internet import reactor

    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, interval, lambda: None)
    return time.monotonic() - start
