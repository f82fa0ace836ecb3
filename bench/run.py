"""
shardtcp's performance bench: the proxy measured side by side with a direct
connection and with HAProxy, in one run, on loopback.

    python bench/run.py [--quick] [--json out.json] [--keep]

What runs (each in its own process, so that none shares the CPU time of
another's interpreter):

``backend``
    this file run with ``--backend``: a threaded TLS server that skips a
    PROXY v2 header when one comes first (it reads the 16 fixed bytes, then
    the length they announce; it does *not* verify shardtcp's signed
    PolicyContext, whose cost is measured on its own in the micro-benchmarks)
    and then serves one of four operations the client names in its first
    nine bytes (``!cQ``): ``U`` read N bytes and answer their count, ``D``
    send N bytes, ``R`` echo N bytes, ``H`` hold the connection until the
    client closes it.
``shardtcp``
    ``twistd -n shardtcp --config ...``, one passthrough listener routing on
    the SNI to that backend, logging to a file as a deployed proxy does.
``haproxy``
    when installed: TCP mode, one thread, routing on the peeked SNI
    (``req.ssl_sni``) to the same backend with ``send-proxy-v2`` (CRC32C and
    UNIQUE_ID TLVs), logging nothing.

The client is this process: Python's ``ssl`` over blocking sockets, the same
code for every target, so the client's and the backend's costs cancel out
in the ratios.  Every target is TLS end to end (shardtcp needs the
ClientHello to route), so the direct case pays the same handshakes.

Measured:

1. bulk throughput, client -> shard (``U``) and shard -> client (``D``), and
   the proxy process's CPU seconds per GiB moved;
2. connection rate and time to first byte of N short connections (TLS
   handshake, one 64-byte request and its echo, close), one at a time and 8
   at a time; and the proxy's CPU milliseconds per connection;
3. the proxy's resident memory idle, with 1000 connections held open, and
   after they closed;
4. in-process micro-benchmarks of the pieces of shardtcp's per-connection
   work, in microseconds per operation.

Every wait is bounded, every loop has a count, and every process started
here is stopped on the way out (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

SERVICE_NAME = "api.bench.test"
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
OP = struct.Struct("!cQ")
CHUNK = 256 * 1024
MIB = 1024 * 1024
ECHO_SIZE = 64

# Hard bounds, whatever the options say.
BACKEND_LIFETIME = 900.0  # seconds a backend process may live
SOCKET_TIMEOUT = 60.0  # any single blocking socket operation
START_TIMEOUT = 30.0  # a process must listen within this
MAX_BACKEND_THREADS = 4096
MAX_BACKEND_ACCEPTS = 1_000_000

# ---------------------------------------------------------------------------
# Small helpers shared by client and backend


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; ``EOFError`` if it closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError(f"peer closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, what: str, timeout: float = START_TIMEOUT) -> None:
    """Return once ``port`` accepts a connection; raise if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} not listening on port {port} after {timeout:.0f}s")


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: Optional[int]) -> tuple[float, float, float]:
    """
    (user, system, total) CPU seconds used so far by ``pid``, all threads;
    zeros for no process.  User and system come from ``/proc/PID/stat`` in
    clock ticks (10 ms); the total from the scheduler's nanosecond counters
    (``/proc/PID/task/*/schedstat``) when the kernel has them.
    """
    if pid is None:
        return 0.0, 0.0, 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[11], fields[12] are utime and stime (the 14th and 15th of stat).
    user, system = int(fields[11]) / _TICK, int(fields[12]) / _TICK
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for task in tasks[:256]:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        total = user + system
    return user, system, total


def _cpu_delta(pid: Optional[int], before: tuple, per: float, unit: str) -> dict:
    """The proxy's CPU used since ``before``, divided by ``per``, as ``proxy_{cpu,user,sys}_<unit>``."""
    if pid is None:
        return {}
    user, system, total = (b - a for a, b in zip(before, cpu_times(pid)))
    return {
        f"proxy_cpu_{unit}": total / per,
        f"proxy_user_{unit}": user / per,
        f"proxy_sys_{unit}": system / per,
    }


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the bench process dies, however it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------
# The backend process


def _backend_connection(raw: socket.socket, context: ssl.SSLContext, slots: threading.BoundedSemaphore) -> None:
    try:
        raw.settimeout(SOCKET_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = raw.recv(1, socket.MSG_PEEK)
        if first == b"\r":
            # PROXY v2: 12-byte signature, version/command, family, length.
            fixed = recv_exact(raw, 16)
            if fixed[:12] != SIGNATURE:
                return
            (length,) = struct.unpack("!H", fixed[14:16])
            recv_exact(raw, length)
        elif first != b"\x16":
            return
        tls = context.wrap_socket(raw, server_side=True)
        op, n = OP.unpack(recv_exact(tls, OP.size))
        if op == b"U":
            buf = memoryview(bytearray(CHUNK))
            got = 0
            while got < n:
                k = tls.recv_into(buf, min(CHUNK, n - got))
                if not k:
                    break
                got += k
            tls.sendall(struct.pack("!Q", got))
        elif op == b"D":
            block = memoryview(bytes(CHUNK))
            sent = 0
            while sent < n:
                k = min(CHUNK, n - sent)
                tls.sendall(block[:k])
                sent += k
        elif op == b"R":
            tls.sendall(recv_exact(tls, n))
        # "H" and after every operation: wait for the client to close,
        # bounded by the socket timeout.
        for _ in range(1_000_000):
            if not tls.recv(CHUNK):
                break
    except (OSError, EOFError, ValueError, struct.error):
        pass
    finally:
        raw.close()
        slots.release()


def run_backend(cert: str, key: str) -> None:
    """
    Serve until stdin closes (the parent went away) or ``BACKEND_LIFETIME``
    passes; print ``PORT n`` once listening.
    """
    threading.stack_size(256 * 1024)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.num_tickets = 0  # the client resumes nothing; don't pay for tickets
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    print(f"PORT {listener.getsockname()[1]}", flush=True)

    def watch_parent() -> None:
        sys.stdin.read()
        os._exit(0)

    def lifetime() -> None:
        time.sleep(BACKEND_LIFETIME)
        os._exit(3)

    threading.Thread(target=watch_parent, daemon=True).start()
    threading.Thread(target=lifetime, daemon=True).start()
    slots = threading.BoundedSemaphore(MAX_BACKEND_THREADS)
    for _ in range(MAX_BACKEND_ACCEPTS):
        raw, _ = listener.accept()
        if not slots.acquire(timeout=SOCKET_TIMEOUT):
            raw.close()
            continue
        threading.Thread(target=_backend_connection, args=(raw, context, slots), daemon=True).start()


# ---------------------------------------------------------------------------
# Setting up: keys, certificates, configurations, processes


class Lab:
    """The processes of one bench run and the files they use; ``close`` stops them all."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}

    # -- files --

    def prepare(self) -> None:
        from shardtcp import keys
        from shardtcp.example.pki import CertificateAuthority

        key_dir = os.path.join(self.workdir, "keys")
        os.makedirs(key_dir, exist_ok=True)
        self.keys = keys.generate_keypair(key_dir, kid="bench-1")
        cert_dir = os.path.join(self.workdir, "certs")
        os.makedirs(cert_dir, exist_ok=True)
        ca = CertificateAuthority("shardtcp bench CA")
        self.ca_path = ca.write(cert_dir, "ca")
        self.cert, self.key = ca.issue_server([SERVICE_NAME], common_name="bench-shard-1").write(cert_dir, "shard")
        self.client_context = ssl.create_default_context(cafile=self.ca_path)

    # -- processes --

    def _spawn(self, name: str, argv: list, **kw: Any) -> subprocess.Popen:
        process = subprocess.Popen(argv, preexec_fn=_die_with_parent, **kw)
        self.processes[name] = process
        self.pids[name] = process.pid
        return process

    def start_backend(self) -> None:
        process = self._spawn(
            "backend",
            [sys.executable, os.path.abspath(__file__), "--backend", "--cert", self.cert, "--key", self.key],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(self.workdir, "backend.log"), "wb"),
            text=True,
        )
        line = _readline_bounded(process, START_TIMEOUT)
        if not line.startswith("PORT "):
            raise RuntimeError(f"backend did not start: {line!r}")
        self.ports["direct"] = int(line.split()[1])

    def start_shardtcp(self) -> None:
        port = free_port()
        config = os.path.join(self.workdir, "shardtcp.toml")
        with open(config, "w") as f:
            f.write(
                _SHARDTCP_CONFIG.format(
                    key=self.keys.private_key, port=port, name=SERVICE_NAME, backend=self.ports["direct"]
                )
            )
        self.shardtcp_config = config
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if os.path.exists(twistd):
            argv = [twistd]
        else:
            argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        argv += ["-n", "--pidfile=", "--logfile", os.path.join(self.workdir, "shardtcp.log"),
                 "shardtcp", "--config", config]
        process = self._spawn(
            "shardtcp",
            argv,
            cwd=_repo_root(),
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.workdir, "shardtcp.out"), "wb"),
            stderr=subprocess.STDOUT,
        )
        wait_listening(port, process, "shardtcp")
        self.ports["shardtcp"] = port

    def start_haproxy(self) -> Optional[str]:
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            return None
        port = free_port()
        config = os.path.join(self.workdir, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(_HAPROXY_CONFIG.format(port=port, name=SERVICE_NAME, backend=self.ports["direct"]))
        check = subprocess.run([haproxy, "-c", "-q", "-f", config], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refuses the bench configuration: {check.stderr.strip()}")
        process = self._spawn(
            "haproxy",
            [haproxy, "-db", "-f", config],
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.workdir, "haproxy.out"), "wb"),
            stderr=subprocess.STDOUT,
        )
        wait_listening(port, process, "haproxy")
        self.ports["haproxy"] = port
        version = subprocess.run([haproxy, "-v"], capture_output=True, text=True, timeout=30).stdout
        return version.splitlines()[0] if version else "haproxy"

    def close(self) -> None:
        for name, process in list(self.processes.items()):
            if process.poll() is None:
                if process.stdin is not None:
                    try:
                        process.stdin.close()
                    except OSError:
                        pass
                process.terminate()
        for name, process in list(self.processes.items()):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.processes.clear()


def _readline_bounded(process: subprocess.Popen, timeout: float) -> str:
    """The first line of ``process``'s stdout, or "" after ``timeout``."""
    result: list = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_SHARDTCP_CONFIG = """\
[proxy]
id = "edge-bench-1"
location = {{ lat = 50.11, lon = 8.68, region = "eu-central" }}

[signing]
private_key = "{key}"
kid = "bench-1"
ttl = "30s"

[[listener]]
name = "edge"
listen = "tcp:{port}:interface=127.0.0.1:backlog=1024"
mode = "passthrough"
identify = ["sni"]
connect_timeout = "5s"

[service.api]
names = ["{name}"]

[service.api.policy]
acl = ["orders:read"]

[[service.api.shard]]
id = "bench-shard-1"
address = "127.0.0.1:{backend}"
location = {{ lat = 50.11, lon = 8.68, region = "eu-central" }}
capacity = 100000
security_score = 90
"""

# One thread (shardtcp is one thread), SNI peeked as shardtcp does, PROXY v2
# with the TLVs shardtcp also sends (UNIQUE_ID, CRC32C), no logging.
_HAPROXY_CONFIG = """\
global
    maxconn 8000
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend edge
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    unique-id-format %{{+X}}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid
    use_backend api if {{ req.ssl_sni -i {name} }}

backend api
    server bench-shard-1 127.0.0.1:{backend} send-proxy-v2 proxy-v2-options crc32c,unique-id
"""


# ---------------------------------------------------------------------------
# Client side measurements


def _connect(context: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return context.wrap_socket(raw, server_hostname=SERVICE_NAME)
    except BaseException:
        raw.close()
        raise


def sanity(context: ssl.SSLContext, port: int) -> None:
    """One echo through ``port``; raises when the path does not work."""
    payload = os.urandom(ECHO_SIZE)
    with _connect(context, port) as tls:
        tls.sendall(OP.pack(b"R", len(payload)) + payload)
        if recv_exact(tls, len(payload)) != payload:
            raise RuntimeError(f"echo through port {port} came back changed")


def bulk(context: ssl.SSLContext, port: int, direction: str, size: int, pid: Optional[int]) -> dict:
    """
    Move ``size`` bytes client -> shard (``up``) or shard -> client
    (``down``) over one connection; the clock runs after the handshake.
    """
    with _connect(context, port) as tls:
        cpu0 = cpu_times(pid)
        t0 = time.perf_counter()
        if direction == "up":
            tls.sendall(OP.pack(b"U", size))
            block = memoryview(bytes(CHUNK))
            sent = 0
            while sent < size:
                k = min(CHUNK, size - sent)
                tls.sendall(block[:k])
                sent += k
            (got,) = struct.unpack("!Q", recv_exact(tls, 8))
        else:
            tls.sendall(OP.pack(b"D", size))
            buf = memoryview(bytearray(CHUNK))
            got = 0
            for _ in range(size):  # bounded: each pass reads at least one byte
                if got >= size:
                    break
                k = tls.recv_into(buf, min(CHUNK, size - got))
                if not k:
                    break
                got += k
        elapsed = time.perf_counter() - t0
        result = {"seconds": elapsed, "mib_s": size / MIB / elapsed}
        result.update(_cpu_delta(pid, cpu0, size / (1024 * MIB), "s_per_gib"))
    if got != size:
        raise RuntimeError(f"bulk {direction} moved {got} of {size} bytes")
    return result


def _one_request(context: ssl.SSLContext, port: int, payload: bytes) -> tuple[float, float]:
    t0 = time.perf_counter()
    with _connect(context, port) as tls:
        tls.sendall(OP.pack(b"R", len(payload)) + payload)
        first = tls.recv(len(payload))
        ttfb = time.perf_counter() - t0
        if not first:
            raise EOFError("no answer")
        if len(first) < len(payload):
            recv_exact(tls, len(payload) - len(first))
    return ttfb, time.perf_counter() - t0


def connection_rate(
    context: ssl.SSLContext, port: int, count: int, concurrency: int, pid: Optional[int], time_limit: float
) -> dict:
    """
    ``count`` short connections, ``concurrency`` at a time; no new one is
    started after ``time_limit`` seconds (a slow target makes fewer).
    """
    payload = b"x" * ECHO_SIZE
    ttfbs: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_worker = [count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)]

    def worker(n: int) -> None:
        mine = []
        for _ in range(n):
            if time.perf_counter() > deadline:
                break
            try:
                mine.append(_one_request(context, port, payload)[0])
            except (OSError, EOFError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
        with lock:
            ttfbs.extend(mine)

    cpu0 = cpu_times(pid)
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in per_worker]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=time_limit + 2 * SOCKET_TIMEOUT)
    elapsed = time.perf_counter() - t0
    cpu = _cpu_delta(pid, cpu0, len(ttfbs) / 1000, "ms_per_conn") if ttfbs else {}
    ttfbs.sort()
    result = {
        "connections": len(ttfbs),
        "errors": len(errors),
        "conn_s": len(ttfbs) / elapsed,
        "ttfb_p50_ms": _percentile(ttfbs, 50) * 1000,
        "ttfb_p99_ms": _percentile(ttfbs, 99) * 1000,
    }
    if len(ttfbs) + len(errors) < count:
        result["stopped_by_time_limit"] = True
    if errors:
        result["first_error"] = errors[0]
    result.update(cpu)
    return result


def _percentile(values: list, p: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[index]


def hold(context: ssl.SSLContext, port: int, pid: int, count: int, time_limit: float = 60.0) -> dict:
    """
    RSS of the proxy ``pid`` before, while holding ``count`` open
    connections (as many as open within ``time_limit`` seconds), and after.
    """
    time.sleep(1.0)  # let connections of earlier tests finish closing
    before = rss_kib(pid)
    held: list = []
    errors = 0
    try:
        t0 = time.perf_counter()
        for _ in range(count):
            if time.perf_counter() - t0 > time_limit:
                break
            try:
                tls = _connect(context, port)
                tls.sendall(OP.pack(b"H", 0))
                held.append(tls)
            except OSError:
                errors += 1
        opened = time.perf_counter() - t0
        time.sleep(1.0)
        during = rss_kib(pid)
    finally:
        for tls in held:
            try:
                tls.close()
            except OSError:
                pass
    time.sleep(2.0)
    after = rss_kib(pid)
    n = len(held)
    return {
        "held": n,
        "errors": errors,
        "open_seconds": opened,
        "rss_before_kib": before,
        "rss_held_kib": during,
        "rss_after_kib": after,
        "kib_per_conn": (during - before) / n if n else float("nan"),
    }


# ---------------------------------------------------------------------------
# Micro-benchmarks inside this process


def _time_op(fn: Callable[[], Any], quick: bool) -> float:
    """Seconds per call of ``fn``: the best of a few timed batches."""
    import timeit

    timer = timeit.Timer(fn)
    number, _ = timer.autorange()  # >= 0.2 s per batch
    if quick:
        number = max(1, number // 2)
    return min(timer.repeat(repeat=2 if quick else 3, number=number)) / number


def _client_hello(name: str) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


_MICRO_SHARD = """\
[[service.api.shard]]
id = "api-{i}"
address = "127.0.0.1:{port}"
location = {{ lat = {lat}, lon = {lon}, region = "eu-central" }}
capacity = 1000
security_score = 90
"""


def _micro_config(workdir: str, key: str, shards: int):
    from shardtcp.config import load_config

    blocks = "\n".join(
        _MICRO_SHARD.format(i=i, port=20000 + i, lat=40 + i % 20, lon=-10 + i % 40) for i in range(shards)
    )
    text = _SHARDTCP_CONFIG.split("[[service.api.shard]]")[0].format(
        key=key, port=1, name=SERVICE_NAME, backend=1
    ) + "\n" + blocks + (
        '\n[geo]\nnetworks = [ { cidr = "198.51.100.0/24", lat = 40.71, lon = -74.0, region = "us-east" } ]\n'
    )
    path = os.path.join(workdir, f"micro-{shards}.toml")
    with open(path, "w") as f:
        f.write(text)
    return load_config(path)


def micro(lab: Lab, quick: bool) -> dict:
    """
    µs per operation of the pieces of shardtcp's per-connection work.

    Each piece is measured on its own and guarded: a piece whose code moved
    or fails is reported as missing (with the error under ``errors``)
    rather than stopping the run.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from twisted.logger import Logger, globalLogBeginner, globalLogPublisher, textFileLogObserver

    # Log as twistd would (formatted into a file), so the in-memory path
    # pays for its log events like the real proxy does.
    devnull = open(os.devnull, "w")
    events = {"n": 0}

    def count(event: dict) -> None:
        events["n"] += 1

    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(devnull), count], discardBuffer=True, redirectStandardIO=False
    )
    out: dict = {"errors": {}}

    def measure(name: str, setup: Callable[[], Callable[[], Any]]) -> None:
        try:
            out[name] = _time_op(setup(), quick) * 1e6
        except Exception as e:  # the code under test is not ours to fix here
            out[name] = None
            out["errors"][name] = f"{type(e).__name__}: {e}"

    hello = _client_hello(SERVICE_NAME)
    out["client_hello_bytes"] = len(hello)

    def parser():
        from shardtcp.identify.clienthello import ClientHelloParser

        return lambda: ClientHelloParser(max_size=16384).feed(hello)

    def detector():
        from shardtcp.identify.detect import Detector

        return lambda: Detector(("sni",), max_client_hello=16384).feed(hello)

    measure("clienthello_parse_us", parser)
    measure("detector_feed_us", detector)

    def names():
        from shardtcp.identify.names import NameTable

        table = NameTable((s.id, s.names) for s in _micro_config(lab.workdir, lab.keys.private_key, 3).services)
        return lambda: table.lookup(SERVICE_NAME)

    measure("names_lookup_us", names)

    def resolve(shards: int):
        def setup():
            from twisted.internet.testing import MemoryReactorClock

            from shardtcp.model import ConnectionRequest
            from shardtcp.resolver import ShardResolver

            request = ConnectionRequest(
                service_id="api",
                client=("198.51.100.7", 51515),
                destination=("127.0.0.1", 8443),
                sni=SERVICE_NAME,
                alpn=(),
                listener="edge",
            )
            clock = MemoryReactorClock()
            clock.advance(time.time())
            resolver = ShardResolver(_micro_config(lab.workdir, lab.keys.private_key, shards), clock=clock)
            return lambda: resolver.resolve(request)

        return setup

    measure("resolve_3_shards_us", resolve(3))
    measure("resolve_30_shards_us", resolve(30))

    def address_pair():
        from twisted.internet.address import IPv4Address

        from shardtcp.proxy.listener import _address_pair

        peer = IPv4Address("TCP", "198.51.100.7", 51515)
        host = IPv4Address("TCP", "127.0.0.1", 8443)
        return lambda: _address_pair(peer, host)

    def connection_id():
        from shardtcp.policy import new_connection_id

        return new_connection_id

    measure("address_pair_us", address_pair)
    measure("new_connection_id_us", connection_id)

    from shardtcp import proxyv2
    from shardtcp.policy import PolicyContext, PolicySigner, new_connection_id

    key = Ed25519PrivateKey.generate()
    signer = PolicySigner(key, kid="bench-1", issuer="edge-bench-1", ttl=30.0, now=time.time)
    policy = PolicyContext(encryption_level="tls", authentication_method=("none",), access_control_list=("orders:read",))
    src, dst = ("198.51.100.7", 51515), ("127.0.0.1", 8443)

    def sign(connection_id: str = "AAAAAAAAAAAAAAAAAAAAAAAA") -> bytes:
        return signer.sign(
            policy=policy,
            audience="bench-shard-1",
            connection_id=connection_id,
            service="api",
            source=src,
            destination=dst,
            sni=SERVICE_NAME,
        )

    token = sign()
    signing_input = token.rsplit(b".", 1)[0]
    measure("policy_sign_us", lambda: sign)
    measure("ed25519_sign_raw_us", lambda: lambda: key.sign(signing_input))

    def header_for(connection_id: str, token: bytes) -> Any:
        return proxyv2.ProxyHeader(
            command=proxyv2.Command.PROXY,
            source=src,
            destination=dst,
            tlvs=(
                (proxyv2.PP2_TYPE_AUTHORITY, SERVICE_NAME.encode()),
                (proxyv2.PP2_TYPE_UNIQUE_ID, connection_id.encode()),
                (0xE0, token),
            ),
        )

    fixed = header_for("AAAAAAAAAAAAAAAAAAAAAAAA", token)
    encoded = proxyv2.encode(fixed)
    out["proxyv2_header_bytes"] = len(encoded)
    measure("proxyv2_encode_us", lambda: lambda: proxyv2.encode(fixed))
    measure("proxyv2_parse_us", lambda: lambda: proxyv2.parse(encoded, require_crc32c=True))

    # The verifier remembers every jti, so each verification needs a header
    # of its own: time passes over distinct headers.
    try:
        from shardtcp.backend import ShardVerifier

        headers = []
        for _ in range(500 if quick else 1000):
            cid = new_connection_id()
            headers.append(proxyv2.encode(header_for(cid, sign(cid))))
        public = {"bench-1": key.public_key()}
        best = float("inf")
        for _ in range(2 if quick else 3):
            verifier = ShardVerifier("bench-shard-1", public)
            t0 = time.perf_counter()
            for data in headers:
                verifier.verify_bytes(data)
            best = min(best, (time.perf_counter() - t0) / len(headers))
        out["verify_bytes_us"] = best * 1e6
    except Exception as e:
        out["verify_bytes_us"] = None
        out["errors"]["verify_bytes_us"] = f"{type(e).__name__}: {e}"
    signature = key.sign(signing_input)
    public_key = key.public_key()
    measure("ed25519_verify_raw_us", lambda: lambda: public_key.verify(signature, signing_input))

    # One log event as the connection path writes it at the end of every
    # connection, formatted as twistd's file observer does.
    logger = Logger(namespace="shardtcp.connection")
    measure(
        "log_event_us",
        lambda: lambda: logger.info(
            "connection {id} {client} -> {service}/{shard} closed by {ended_by}: "
            "{bytes_up} bytes up, {bytes_down} down, {duration:.3f}s",
            id="AAAAAAAAAAAAAAAAAAAAAAAA", client="198.51.100.7:51515", service="api",
            shard="bench-shard-1", ended_by="client", bytes_up=4242, bytes_down=4242, duration=0.0123,
        ),
    )

    # The whole Python path of one connection, without sockets: accept,
    # ClientHello, resolve, sign, header, splice set up, both sides closed.
    try:
        out.update(_in_memory_connection(lab, hello, quick, events))
    except Exception as e:
        out["connection_in_memory_us"] = None
        out["log_events_per_conn"] = None
        out["errors"]["connection_in_memory_us"] = f"{type(e).__name__}: {e}"
    globalLogPublisher.removeObserver(count)
    devnull.close()
    return out


class _MemoryConnector:
    """Connects every attempt at once to an in-memory transport."""

    def __init__(self) -> None:
        self.last = None

    def connect(self, shard, factory, timeout):
        from twisted.internet import defer
        from twisted.internet.address import IPv4Address

        protocol = factory.buildProtocol(None)
        transport = _HalfCloseTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
            peerAddress=IPv4Address("TCP", shard.address.host, shard.address.port),
        )
        protocol.makeConnection(transport)
        self.last = (protocol, transport)
        return defer.succeed(protocol)


_half_close_class: Any = None


def _HalfCloseTransport(**kw: Any) -> Any:
    """A ``StringTransport`` that accepts half-closes and aborts."""
    global _half_close_class
    if _half_close_class is None:
        from twisted.internet.testing import StringTransport

        class HalfClose(StringTransport):
            def loseWriteConnection(self) -> None:
                pass

            def abortConnection(self) -> None:
                self.disconnecting = True

        _half_close_class = HalfClose
    return _half_close_class(**kw)


def _in_memory_connection(lab: Lab, hello: bytes, quick: bool, events: dict) -> dict:
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.failure import Failure

    from shardtcp.config import load_config
    from shardtcp.tap import build_service

    config = load_config(lab.shardtcp_config)
    clock = MemoryReactorClock()
    clock.advance(time.time())
    connector = _MemoryConnector()
    service = build_service(config, clock, connector=connector)
    factory = service.factories["edge"]
    peer = IPv4Address("TCP", "198.51.100.7", 51515)
    host = IPv4Address("TCP", "127.0.0.1", 8443)
    done = Failure(ConnectionDone())

    def one() -> None:
        protocol = factory.buildProtocol(peer)
        transport = _HalfCloseTransport(hostAddress=host, peerAddress=peer)
        protocol.makeConnection(transport)
        protocol.dataReceived(hello)
        upstream, _ = connector.last
        protocol.connectionLost(done)
        upstream.connectionLost(done)

    one()
    if factory.context.connections:
        raise RuntimeError("the in-memory connection did not finish")
    before = events["n"]
    one()
    per_connection = events["n"] - before
    return {
        "connection_in_memory_us": _time_op(one, quick) * 1e6,
        "log_events_per_conn": per_connection,
    }


# ---------------------------------------------------------------------------
# The run


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b:
        return None
    return a / b


def run(options: argparse.Namespace) -> dict:
    quick = options.quick
    bulk_mib = options.bulk_mib or (64 if quick else 256)
    conns = options.connections or (500 if quick else 2000)
    held = options.hold or 1000
    rounds = 1 if quick else 3
    time_limit = 8.0 if quick else 20.0
    started = time.monotonic()
    results: dict = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_model()}, Linux {platform.release()}",
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "twisted": _version("twisted"),
            "shardtcp_commit": _git_commit(),
            "quick": quick,
            "bulk_mib": bulk_mib,
            "connections": conns,
            "concurrency": options.concurrency,
            "held": held,
        }
    }
    workdir = tempfile.mkdtemp(prefix="shardtcp-bench-")
    lab = Lab(workdir)
    try:
        _measure(lab, options, results, bulk_mib, conns, held, rounds, quick, time_limit)
    finally:
        if options.keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["ratios"] = _ratios(results)
    return results


def _measure(lab: Lab, options: argparse.Namespace, results: dict, bulk_mib: int, conns: int, held: int,
             rounds: int, quick: bool, time_limit: float) -> None:
    workdir = lab.workdir
    try:
        lab.prepare()
        lab.start_backend()
        lab.start_shardtcp()
        results["meta"]["haproxy"] = lab.start_haproxy() or "haproxy: not installed"
        if "haproxy" not in lab.ports:
            print("haproxy: not installed", flush=True)
        targets = [t for t in ("direct", "shardtcp", "haproxy") if t in lab.ports]
        proxies = [t for t in targets if t != "direct"]
        idle = {t: rss_kib(lab.pids[t]) for t in proxies}
        for t in targets:
            sanity(lab.client_context, lab.ports[t])
        _say(f"targets: {', '.join(f'{t}=:{lab.ports[t]}' for t in targets)}; work folder {workdir}")

        # 1. Bulk throughput: rounds interleaved, the best round kept.
        results["bulk"] = {}
        for direction in ("up", "down"):
            for t in targets:
                results["bulk"].setdefault(t, {})[direction] = None
            for _ in range(rounds):
                for t in targets:
                    r = bulk(lab.client_context, lab.ports[t], direction, bulk_mib * MIB, lab.pids.get(t))
                    kept = results["bulk"][t][direction]
                    if kept is None or r["mib_s"] > kept["mib_s"]:
                        results["bulk"][t][direction] = r
            _say(
                f"bulk {direction}: "
                + ", ".join(f"{t} {results['bulk'][t][direction]['mib_s']:.0f} MiB/s" for t in targets)
            )

        # 2. Connection rate and time to first byte.
        results["connect"] = {}
        for t in targets:
            for _ in range(20):  # warm up
                _one_request(lab.client_context, lab.ports[t], b"w" * ECHO_SIZE)
        for mode, concurrency in (("sequential", 1), ("concurrent", options.concurrency)):
            for t in targets:
                r = connection_rate(
                    lab.client_context, lab.ports[t], conns, concurrency, lab.pids.get(t), time_limit
                )
                results["connect"].setdefault(t, {})[mode] = r
            _say(
                f"connections {mode}: "
                + ", ".join(f"{t} {results['connect'][t][mode]['conn_s']:.0f}/s" for t in targets)
            )

        # 3. Memory of the proxies.
        results["memory"] = {}
        for t in proxies:
            r = hold(lab.client_context, lab.ports[t], lab.pids[t], held)
            r["rss_idle_start_kib"] = idle[t]
            results["memory"][t] = r
            _say(f"memory {t}: {r['kib_per_conn']:.1f} KiB per held connection")
    finally:
        lab.close()

    # 4. Micro-benchmarks, with nothing else running.
    results["micro"] = micro(lab, quick)
    _say("micro-benchmarks done")


def _ratios(r: dict) -> dict:
    out: dict = {}
    for other in ("direct", "haproxy"):
        if other not in r["bulk"]:
            continue
        ratios = {}
        for direction in ("up", "down"):
            ratios[f"bulk_{direction}_throughput"] = _ratio(
                r["bulk"]["shardtcp"][direction]["mib_s"], r["bulk"][other][direction]["mib_s"]
            )
        for mode in ("sequential", "concurrent"):
            s, o = r["connect"]["shardtcp"][mode], r["connect"][other][mode]
            ratios[f"{mode}_conn_rate"] = _ratio(s["conn_s"], o["conn_s"])
            ratios[f"{mode}_ttfb_p50"] = _ratio(s["ttfb_p50_ms"], o["ttfb_p50_ms"])
            ratios[f"{mode}_ttfb_p99"] = _ratio(s["ttfb_p99_ms"], o["ttfb_p99_ms"])
        if other == "haproxy":
            for direction in ("up", "down"):
                ratios[f"bulk_{direction}_proxy_cpu"] = _ratio(
                    r["bulk"]["shardtcp"][direction]["proxy_cpu_s_per_gib"],
                    r["bulk"]["haproxy"][direction]["proxy_cpu_s_per_gib"],
                )
            for mode in ("sequential", "concurrent"):
                ratios[f"{mode}_proxy_cpu_per_conn"] = _ratio(
                    r["connect"]["shardtcp"][mode].get("proxy_cpu_ms_per_conn"),
                    r["connect"]["haproxy"][mode].get("proxy_cpu_ms_per_conn"),
                )
            ratios["memory_per_conn"] = _ratio(
                r["memory"]["shardtcp"]["kib_per_conn"], r["memory"]["haproxy"]["kib_per_conn"]
            )
        out[f"shardtcp/{other}"] = ratios
    return out


# ---------------------------------------------------------------------------
# Reporting


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "nan"
    return format(value, spec)


def _table(title: str, header: list, rows: list) -> str:
    widths = [max(len(str(h)), *(len(str(row[i])) for row in rows)) for i, h in enumerate(header)]
    lines = [title]
    lines.append("  " + "  ".join(str(h).rjust(w) if i else str(h).ljust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for row in rows:
        lines.append("  " + "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def report(r: dict) -> str:
    m = r["meta"]
    targets = list(r["bulk"])
    others = [t for t in ("direct", "haproxy") if t in targets]
    out = [
        f"shardtcp bench, {m['date']}, {m['machine']}",
        f"Python {m['python']}, {m['openssl']}, Twisted {m['twisted']}, {m['haproxy']}, commit {m['shardtcp_commit']}",
        f"bulk {m['bulk_mib']} MiB per transfer; {m['connections']} connections per run; "
        f"{m['held']} held; {m['seconds']} s in all",
        "",
    ]

    def ratio_cells(get: Callable[[str], Optional[float]]) -> list:
        return [_fmt(_ratio(get("shardtcp"), get(o)), ".2f") for o in others]

    def cpu_ratio_cells(get: Callable[[str], Optional[float]]) -> list:
        # The direct case has no proxy, so no CPU of one to compare.
        return [_fmt(_ratio(get("shardtcp"), get(o)), ".2f") if o != "direct" else "-" for o in others]

    ratio_head = [f"shardtcp/{o}" for o in others]
    rows = []
    for direction, label in (("up", "client->shard"), ("down", "shard->client")):
        rows.append(
            [f"{label} MiB/s"]
            + [_fmt(r["bulk"][t][direction]["mib_s"], ".0f") for t in targets]
            + ratio_cells(lambda t, d=direction: r["bulk"][t][d]["mib_s"])
        )
        rows.append(
            [f"{label} proxy CPU s/GiB (user/sys)"]
            + [_cpu_cell(r["bulk"][t][direction], "s_per_gib") for t in targets]
            + cpu_ratio_cells(lambda t, d=direction: r["bulk"][t][d].get("proxy_cpu_s_per_gib"))
        )
    out.append(_table("1. Bulk throughput (one TLS connection, best round)", ["", *targets, *ratio_head], _pad(rows)))
    out.append("")
    rows = []
    for mode in ("sequential", "concurrent"):
        c = r["connect"]
        rows.append([f"{mode} conn/s"] + [_fmt(c[t][mode]["conn_s"], ".0f") for t in targets]
                    + ratio_cells(lambda t, mode=mode: c[t][mode]["conn_s"]))
        rows.append([f"{mode} TTFB p50 ms"] + [_fmt(c[t][mode]["ttfb_p50_ms"], ".2f") for t in targets]
                    + ratio_cells(lambda t, mode=mode: c[t][mode]["ttfb_p50_ms"]))
        rows.append([f"{mode} TTFB p99 ms"] + [_fmt(c[t][mode]["ttfb_p99_ms"], ".2f") for t in targets]
                    + ratio_cells(lambda t, mode=mode: c[t][mode]["ttfb_p99_ms"]))
        rows.append([f"{mode} proxy CPU ms/conn (user/sys)"]
                    + [_cpu_cell(c[t][mode], "ms_per_conn") for t in targets]
                    + cpu_ratio_cells(lambda t, mode=mode: c[t][mode].get("proxy_cpu_ms_per_conn")))
        rows.append([f"{mode} connections (errors)"]
                    + [f"{c[t][mode]['connections']}{'*' if c[t][mode].get('stopped_by_time_limit') else ''}"
                       f" ({c[t][mode]['errors']})" for t in targets]
                    + [""] * len(others))
    concurrency = m["concurrency"]
    out.append(_table(f"2. Connections (TLS handshake, 64-byte echo, close; concurrent = {concurrency} at a time)",
                      ["", *targets, *ratio_head], _pad(rows)))
    if any(c[t][mode].get("stopped_by_time_limit") for t in targets for mode in c[t]):
        out.append("  * stopped by the time limit before all connections were made")
    out.append("")
    proxies = list(r["memory"])
    rows = []
    for label, key, spec in (
        ("RSS idle at start KiB", "rss_idle_start_kib", "d"),
        ("RSS before hold KiB", "rss_before_kib", "d"),
        (f"RSS with {m['held']} held KiB", "rss_held_kib", "d"),
        ("RSS after close KiB", "rss_after_kib", "d"),
        ("KiB per connection", "kib_per_conn", ".1f"),
    ):
        row = [label] + [_fmt(r["memory"][t][key], spec) for t in proxies]
        if "haproxy" in proxies:
            row.append(_fmt(_ratio(r["memory"]["shardtcp"][key], r["memory"]["haproxy"][key]), ".2f"))
        rows.append(row)
    out.append(_table("3. Proxy memory", ["", *proxies] + (["shardtcp/haproxy"] if "haproxy" in proxies else []), rows))
    out.append("")
    mc = r["micro"]
    rows = [
        ["ClientHelloParser.feed (one hello)", _fmt(mc["clienthello_parse_us"], ".1f")],
        ["Detector.feed (sni)", _fmt(mc["detector_feed_us"], ".1f")],
        ["NameTable.lookup", _fmt(mc["names_lookup_us"], ".2f")],
        ["ShardResolver.resolve, 3 shards", _fmt(mc["resolve_3_shards_us"], ".1f")],
        ["ShardResolver.resolve, 30 shards", _fmt(mc["resolve_30_shards_us"], ".1f")],
        ["_address_pair", _fmt(mc["address_pair_us"], ".2f")],
        ["new_connection_id", _fmt(mc["new_connection_id_us"], ".2f")],
        ["PolicySigner.sign", _fmt(mc["policy_sign_us"], ".1f")],
        ["  of which Ed25519 sign alone", _fmt(mc["ed25519_sign_raw_us"], ".1f")],
        ["proxyv2.encode", _fmt(mc["proxyv2_encode_us"], ".1f")],
        ["proxyv2.parse (shard side)", _fmt(mc["proxyv2_parse_us"], ".1f")],
        ["ShardVerifier.verify_bytes (shard side)", _fmt(mc["verify_bytes_us"], ".1f")],
        ["  of which Ed25519 verify alone", _fmt(mc["ed25519_verify_raw_us"], ".1f")],
        ["one log event, twistd's file format", _fmt(mc["log_event_us"], ".1f")],
        [f"whole connection in memory ({mc['log_events_per_conn']} log events)",
         _fmt(mc["connection_in_memory_us"], ".1f")],
    ]
    out.append(_table(
        f"4. Per-connection pieces in shardtcp, µs per operation (hello {mc['client_hello_bytes']} B, "
        f"header {mc['proxyv2_header_bytes']} B)",
        ["operation", "µs"], rows))
    for name, error in mc.get("errors", {}).items():
        out.append(f"  not measured: {name}: {error}")
    return "\n".join(out)


def _cpu_cell(result: dict, unit: str) -> str:
    total = result.get(f"proxy_cpu_{unit}")
    if total is None:
        return "-"
    spec = ".2f" if unit == "s_per_gib" else ".3f"
    return (f"{format(total, spec)} ({format(result[f'proxy_user_{unit}'], spec)}"
            f"/{format(result[f'proxy_sys_{unit}'], spec)})")


def _pad(rows: list) -> list:
    width = max(len(r) for r in rows)
    return [r + [""] * (width - len(r)) for r in rows]


def _say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_repo_root(), capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "shardtcp"],
            cwd=_repo_root(), capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + ("+dirty" if dirty else "") if head else "?"


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Measure shardtcp against a direct connection and HAProxy on loopback.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller run, under a minute")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (configurations, logs)")
    parser.add_argument("--bulk-mib", type=int, help="MiB per bulk transfer (default 256, 64 with --quick)")
    parser.add_argument("--connections", type=int, help="connections per rate run (default 2000, 500 with --quick)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients at a time in the concurrent run")
    parser.add_argument("--hold", type=int, help="connections held open for the memory figure (default 1000)")
    parser.add_argument("--backend", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.backend:
        run_backend(options.cert, options.key)
        return 0
    for name in ("bulk_mib", "connections", "concurrency", "hold"):
        value = getattr(options, name)
        if value is not None and not 1 <= value <= 100_000:
            parser.error(f"--{name.replace('_', '-')} must be within 1..100000")
    # A SIGTERM unwinds like Ctrl-C, so the processes started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = run(options)
    print(report(results))
    if options.json:
        with open(options.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
