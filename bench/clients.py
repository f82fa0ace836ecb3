"""
The load generators: blocking-socket clients in this process, and ``wrk``.

The same client code runs against every target, so its cost cancels out in
the ratios.  Every socket operation times out; every loop has a count.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from typing import Optional

import attrs

from bench.lab import SERVICE_NAME, BenchError, recv_exact

OP = struct.Struct("!cQ")
CHUNK = 256 * 1024
MIB = 1024 * 1024
ECHO_SIZE = 64
SOCKET_TIMEOUT = 60.0


def connect(port: int, context: Optional[ssl.SSLContext], preamble: bytes = b"") -> socket.socket:
    """
    A connection to 127.0.0.1:``port``, ``TCP_NODELAY`` set, ``preamble``
    sent first (a ``SHARD`` line for a plain shardtcp listener), then TLS
    when ``context`` is given.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if preamble:
        raw.sendall(preamble)
    if context is None:
        return raw
    try:
        return context.wrap_socket(raw, server_hostname=SERVICE_NAME)
    except BaseException:
        raw.close()
        raise


def echo(name: str, port: int, context: Optional[ssl.SSLContext], preamble: bytes = b"") -> None:
    """One echo through ``name`` at ``port``; ``BenchError`` when the path does not work."""
    payload = os.urandom(ECHO_SIZE)
    try:
        with connect(port, context, preamble) as sock:
            sock.sendall(OP.pack(b"R", len(payload)) + payload)
            back = recv_exact(sock, len(payload))
    except (OSError, EOFError) as e:
        raise BenchError(f"no echo through {name} (127.0.0.1:{port}): {type(e).__name__}: {e}") from e
    if back != payload:
        raise BenchError(f"the echo through {name} (127.0.0.1:{port}) came back changed")


def bulk(port: int, context: Optional[ssl.SSLContext], direction: str, size: int,
         on_start=lambda: None, preamble: bytes = b"") -> float:
    """
    Move ``size`` bytes client -> shard (``up``) or shard -> client
    (``down``) over one connection; ``on_start`` is called once connected,
    and the seconds after it are returned.
    """
    with connect(port, context, preamble) as sock:
        on_start()
        t0 = time.perf_counter()
        if direction == "up":
            sock.sendall(OP.pack(b"U", size))
            block = memoryview(bytes(CHUNK))
            sent = 0
            while sent < size:
                k = min(CHUNK, size - sent)
                sock.sendall(block[:k])
                sent += k
            (got,) = struct.unpack("!Q", recv_exact(sock, 8))
        else:
            sock.sendall(OP.pack(b"D", size))
            buf = memoryview(bytearray(CHUNK))
            got = 0
            for _ in range(size):  # each pass reads at least one byte
                if got >= size:
                    break
                k = sock.recv_into(buf, min(CHUNK, size - got))
                if not k:
                    break
                got += k
        elapsed = time.perf_counter() - t0
    if got != size:
        raise BenchError(f"bulk {direction} through 127.0.0.1:{port} moved {got} of {size} bytes")
    return elapsed


def one_request(port: int, context: ssl.SSLContext, payload: bytes) -> float:
    """Seconds from ``connect()`` to the first byte of an echo of ``payload``."""
    t0 = time.perf_counter()
    with connect(port, context) as sock:
        sock.sendall(OP.pack(b"R", len(payload)) + payload)
        first = sock.recv(len(payload))
        ttfb = time.perf_counter() - t0
        if not first:
            raise EOFError("no answer")
        if len(first) < len(payload):
            recv_exact(sock, len(payload) - len(first))
    return ttfb


def echo_connections(port: int, context: ssl.SSLContext, count: int, concurrency: int,
                     time_limit: float) -> dict:
    """
    ``count`` short TLS connections (handshake, 64-byte echo, close),
    ``concurrency`` at a time, none started after ``time_limit`` seconds.
    Any failed connection is an error of the run.
    """
    payload = b"x" * ECHO_SIZE
    ttfbs: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    shares = [count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)]
    deadline = time.perf_counter() + time_limit

    def worker(n: int) -> None:
        mine = []
        for _ in range(n):
            if time.perf_counter() > deadline:
                break
            try:
                mine.append(one_request(port, context, payload))
            except (OSError, EOFError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                break
        with lock:
            ttfbs.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=time_limit + 2 * SOCKET_TIMEOUT)
    elapsed = time.perf_counter() - t0
    if errors:
        raise BenchError(f"{len(errors)} connections through 127.0.0.1:{port} failed, first: {errors[0]}")
    if not ttfbs:
        raise BenchError(f"no connection through 127.0.0.1:{port} finished within {time_limit:.0f}s")
    ttfbs.sort()
    return {
        "connections": len(ttfbs),
        "stopped_by_time_limit": len(ttfbs) < count,
        "conn_s": len(ttfbs) / elapsed,
        "ttfb_p50_ms": percentile(ttfbs, 50) * 1000,
        "ttfb_p99_ms": percentile(ttfbs, 99) * 1000,
    }


def percentile(values: list, p: float) -> float:
    index = min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[index]


# -- wrk -----------------------------------------------------------------------


@attrs.frozen
class WrkResult:
    requests: int
    seconds: float
    latency_p50_ms: float
    latency_p99_ms: float
    socket_errors: int
    non_2xx: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk is not installed (apt-get install wrk): the connection-rate run needs it")
    return path


def wrk(port: int, seconds: float, connections: int, threads: int = 1) -> WrkResult:
    """
    ``wrk`` with ``Connection: close`` against ``https://localhost:port/``:
    every request is a new TCP connection and a full TLS handshake, with SNI
    ``localhost``.  Errors of any kind make the run fail.
    """
    argv = [wrk_path(), "-t", str(threads), "-c", str(connections), "-d", f"{seconds:.0f}s",
            "--latency", "--timeout", "5s", "-H", "Connection: close", f"https://{SERVICE_NAME}:{port}/"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"wrk against port {port} did not finish in {seconds + 60:.0f}s") from e
    if done.returncode != 0:
        raise BenchError(f"wrk exited with status {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
_PERCENT = re.compile(r"^\s*(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_wrk(text: str) -> WrkResult:
    """The figures of a ``wrk --latency`` report; ``BenchError`` when it does not read as one."""
    requests = _REQUESTS.search(text)
    percents = {int(p): float(v) * _UNIT[u] * 1000 for p, v, u in _PERCENT.findall(text)}
    if requests is None or set(percents) != {50, 99}:
        raise BenchError(f"cannot read wrk's report:\n{text}")
    errors = _SOCKET_ERRORS.search(text)
    non_2xx = _NON_2XX.search(text)
    return WrkResult(
        requests=int(requests.group(1)),
        seconds=float(requests.group(2)) * _UNIT[requests.group(3)],
        latency_p50_ms=percents[50],
        latency_p99_ms=percents[99],
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )
