"""
The work folder of one bench run and the processes started in it.

``Lab`` makes the signing key (``shardtcp.keys.generate_keypair``) and a
throw-away certificate authority (``shardtcp.example.pki``), starts
processes through ``spawn`` and stops every one of them in ``close``,
whatever happened.  Every wait here is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any, Optional

SERVICE_NAME = "localhost"  # what wrk sends as SNI for https://localhost:PORT/
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchError(RuntimeError):
    """A measurement could not be made; the message says why."""


def say(text: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    """A console script of this virtualenv (``twistd``, ``shardtcp``)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        raise BenchError(f"{path} not found: install the package into this virtualenv first")
    return path


def die_with_parent() -> None:
    """In a child before exec: SIGTERM when the bench process dies, however it dies."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Lab:
    """The files and processes of one bench run; ``close`` stops them all."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self._processes: list[tuple[str, subprocess.Popen]] = []
        self._logs: list[Any] = []

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def prepare(self) -> None:
        """Signing key, CA and a server certificate for ``SERVICE_NAME``."""
        from shardtcp.example.pki import CertificateAuthority
        from shardtcp.keys import generate_keypair

        os.makedirs(self.path("keys"), exist_ok=True)
        os.makedirs(self.path("certs"), exist_ok=True)
        self.keys = generate_keypair(self.path("keys"), kid="bench-1")
        ca = CertificateAuthority("shardtcp bench CA")
        self.ca_path = ca.write(self.path("certs"), "ca")
        issued = ca.issue_server([SERVICE_NAME], common_name="bench-shard-1")
        self.cert, self.key = issued.write(self.path("certs"), "shard")
        # HAProxy wants certificate and key in one file.
        self.cert_and_key = self.path("certs", "shard-combined.pem")
        with open(self.cert_and_key, "wb") as f:
            f.write(issued.cert_pem + issued.key_pem)
        self.client_context = ssl.create_default_context(cafile=self.ca_path)

    def spawn(self, name: str, argv: list, **kw: Any) -> subprocess.Popen:
        """Start ``argv`` with its output in ``<name>.out``; stopped by ``close``."""
        out = open(self.path(f"{name}.out"), "wb")
        self._logs.append(out)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", out)
        kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("cwd", self.workdir)
        process = subprocess.Popen(argv, preexec_fn=die_with_parent, **kw)
        self._processes.append((name, process))
        return process

    def output(self, name: str, limit: int = 2000) -> str:
        """The tail of a process's output, for error messages."""
        try:
            with open(self.path(f"{name}.out"), "rb") as f:
                return f.read()[-limit:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def wait_listening(self, name: str, process: subprocess.Popen, port: int,
                       timeout: float = START_TIMEOUT) -> float:
        """Seconds until ``port`` accepted a connection; ``BenchError`` if ``process`` exits or time runs out."""
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BenchError(f"{name} exited with status {process.returncode} before listening: "
                                 f"{self.output(name)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return time.perf_counter() - start
            except OSError:
                time.sleep(0.02)
        raise BenchError(f"{name} not listening on 127.0.0.1:{port} after {timeout:.0f}s: {self.output(name)}")

    def stop(self, process: subprocess.Popen) -> None:
        """Stop one process now (SIGTERM, then SIGKILL)."""
        if process.poll() is None:
            if process.stdin is not None:
                try:
                    process.stdin.close()
                except OSError:
                    pass
            process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
        self._processes = [(n, p) for n, p in self._processes if p is not process]

    def alive(self, name: str, process: subprocess.Popen) -> None:
        """``BenchError`` if ``process`` died during a measurement."""
        if process.poll() is not None:
            raise BenchError(f"{name} died (status {process.returncode}): {self.output(name)}")

    def close(self) -> None:
        for _, process in list(self._processes):
            self.stop(process)
        for out in self._logs:
            out.close()
        self._logs.clear()


def readline_bounded(process: subprocess.Popen, timeout: float) -> str:
    """The first line of ``process``'s stdout, or "" after ``timeout``."""
    result: list = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""


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


def optional_version(argv: list) -> Optional[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None
