#!/usr/bin/env python3
"""
Proxy CPU seconds per GiB: the kernel splice (``shardtcp.proxy.ksplice``)
against the userspace ``Splice`` and against the floor of any Python proxy
that splices, one loopback TCP connection pair at a time.

This process is the proxy: it accepts the client on a Twisted port,
connects to the shard with Twisted, then either hands both transports to
``KernelSplicer.take_transports`` (``kernel``; ``python`` is the same
through the kernel splice's pure-Python loop, as on an install where its
C loop was not built) or couples them with ``Splice`` (``userspace``).  ``haproxy`` is HAProxy between the same two
peers, with ``option splice-request`` and ``option splice-response`` (no
PROXY header: a one-off cost, not a per-GiB one).  ``floor`` is no proxy at all: the same two
sockets driven by the shortest Python loop that splices them
(``select.epoll`` edge-triggered, one 1 MiB pipe, ``os.splice`` until
EAGAIN), what the interpreter costs per wake-up with nothing else around.
The client and the shard run in a child process (blocking sockets,
threads), so their CPU is not counted.  The proxy's CPU is its run time
from ``/proc/self/schedstat`` (and ``getrusage`` as a cross-check) between
the start of the splice and its end; its user part is shown on its own
(``getrusage``; HAProxy's from ``/proc``, in 10 ms ticks).  Modes
alternate within each of ``--rounds`` rounds, and each keeps its median.  Each run is bounded by
``--max-seconds``; a run cut short reports the bytes it moved.

    python bench/ksplice_micro.py [--gib 1] [--max-seconds 60] [--mode kernel floor] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# Run as a script: the bench package's helpers are one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.lab import die_with_parent  # noqa: E402
from bench.measure import cpu as process_cpu  # noqa: E402

# The peers: a client that connects to the proxy and a shard that the proxy
# connects to.  ``up`` sends from the client, ``down`` from the shard; the
# receiver counts, then each side closes after the other's EOF.
PEERS = r"""
import socket, sys, threading, time
front, direction, total = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
if sys.argv[4:] == ["wait"]:
    sys.stdin.readline()  # the measurement has begun
chunk = b"\xa5" * (1 << 20)
got = {}

def pump(sock, name, send):
    if send:
        left = total
        while left > 0:
            n = sock.send(chunk[: min(left, len(chunk))])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 20):
            pass
    else:
        count = 0
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            count += len(data)
        got[name] = count
        sock.shutdown(socket.SHUT_WR)
    sock.close()

for attempt in range(200):  # the proxy may still be starting (haproxy)
    try:
        client = socket.create_connection(("127.0.0.1", front))
        break
    except ConnectionRefusedError:
        time.sleep(0.05)
else:
    raise SystemExit("the proxy never listened")
shard, _ = srv.accept()
threads = [
    threading.Thread(target=pump, args=(client, "client", direction == "up")),
    threading.Thread(target=pump, args=(shard, "shard", direction == "down")),
]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(sum(got.values()), flush=True)
"""

GIB = 1 << 30


def _cpu() -> tuple[float, float, float]:
    """(getrusage user+sys, run time of the process's threads from schedstat, getrusage user) in seconds."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, _ran(os.getpid()), r.ru_utime


def _ran(pid: int) -> float:
    return process_cpu(pid).total


def _peers(direction: str, nbytes: int, port: int, *, wait: bool = False) -> subprocess.Popen:
    """
    The client and the shard; with ``wait`` the client connects only once
    a line is written to the child's stdin (``_go``).
    """
    return subprocess.Popen(
        [sys.executable, "-c", PEERS, str(port), direction, str(nbytes)] + (["wait"] if wait else []),
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE if wait else None,
        text=True,
        preexec_fn=die_with_parent,
    )


def _go(child: subprocess.Popen) -> None:
    # Flushed, not closed: ``communicate`` closes it.
    child.stdin.write("go\n")
    child.stdin.flush()


def _received(child: subprocess.Popen) -> int:
    try:
        out = child.communicate(timeout=10)[0].split()
        return int(out[-1]) if out else 0
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return 0


def run_floor(direction: str, nbytes: int, max_seconds: float) -> dict:
    """The bare loop: accept, connect, then splice one way until EOF; no Twisted, no shardtcp."""
    import fcntl
    import select
    import socket

    from shardtcp.proxy.ksplice import PIPE_SIZE

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    child = _peers(direction, nbytes, srv.getsockname()[1])
    shard_port = int(child.stdout.readline())
    client, _ = srv.accept()
    srv.close()
    shard = socket.create_connection(("127.0.0.1", shard_port))
    src, dst = (client, shard) if direction == "up" else (shard, client)
    for sock in (src, dst):
        sock.setblocking(False)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, 1031, PIPE_SIZE)  # F_SETPIPE_SZ
    except OSError:
        pass
    capacity = fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ
    ep = select.epoll()
    edge = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
    ep.register(src.fileno(), edge)
    ep.register(dst.fileno(), edge)
    sfd, dfd = src.fileno(), dst.fileno()
    readable = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
    splice, flags = os.splice, 3  # SPLICE_F_MOVE | SPLICE_F_NONBLOCK
    in_pipe, rd, wr, eof, moved, partial = 0, False, True, False, 0, False
    cpu0, ran0, user0 = _cpu()
    wall0 = time.monotonic()
    deadline = wall0 + max_seconds
    while not (eof and not in_pipe):
        if time.monotonic() > deadline:
            partial = True
            break
        for fd, events in ep.poll(1.0):
            if fd == sfd and events & readable:
                rd = True
            if fd == dfd and events & select.EPOLLOUT:
                wr = True
        progress = True
        while progress:
            progress = False
            if wr and in_pipe:
                try:
                    n = splice(r, dfd, in_pipe, None, None, flags)
                    in_pipe -= n
                    progress = True
                except BlockingIOError:
                    wr = False
            if rd and not eof and in_pipe < capacity:
                try:
                    n = splice(sfd, w, capacity - in_pipe, None, None, flags)
                    if n:
                        in_pipe += n
                        moved += n
                    else:
                        eof = True
                    progress = True
                except BlockingIOError:
                    rd = False
    cpu1, ran1, user1 = _cpu()
    wall = time.monotonic() - wall0
    if not partial:
        dst.shutdown(socket.SHUT_WR)
        src.setblocking(True)
        src.settimeout(10)
        try:
            while src.recv(1 << 16):
                pass
        except OSError:
            pass
    for fd in (r, w):
        os.close(fd)
    ep.close()
    client.close()
    shard.close()
    result = {"mode": "floor", "direction": direction, "cpu": cpu1 - cpu0, "ran": ran1 - ran0, "wall": wall,
              "user": user1 - user0,
              "moved": moved, "ended_by": "eof", "received": _received(child)}
    if partial:
        result["partial"] = True
    return result


def run_once(mode: str, direction: str, nbytes: int, max_seconds: float) -> dict:
    from twisted.internet import protocol, reactor

    from shardtcp.eventloop import adopt

    adopt(reactor)  # as the daemon does: its splices are edge-triggered
    from shardtcp.proxy.ksplice import KernelSplicer, PipePool
    from shardtcp.proxy.splice import DOWNSTREAM, UPSTREAM, Splice, SpliceSideMixin

    result: dict = {"mode": mode, "direction": direction}
    if mode == "python":
        from shardtcp.proxy import ksplice

        ksplice._kpump = None
    pool = PipePool(max_pipes=16)
    splicer = KernelSplicer(pool, reactor=reactor)
    if mode in ("kernel", "python") and not splicer.enabled:
        raise SystemExit("kernel splice unavailable here")
    shard_port = []

    def finished(stats) -> None:
        cpu, ran, user = _cpu()
        result.update(
            cpu=cpu - result["cpu0"],
            ran=ran - result["ran0"],
            user=user - result["user0"],
            wall=time.monotonic() - result["wall0"],
            moved=stats.bytes_up + stats.bytes_down,
            ended_by=stats.ended_by,
        )
        reactor.callLater(0, reactor.stop)

    class Back(SpliceSideMixin, protocol.Protocol):
        _side = UPSTREAM

        def dataReceived(self, data):
            self._splice.data(UPSTREAM, data)

        def connectionLost(self, reason):
            if self._splice is not None:
                self._splice.lost(UPSTREAM, reason)

    class Front(SpliceSideMixin, protocol.Protocol):
        _side = DOWNSTREAM

        def connectionMade(self):
            self.transport.pauseProducing()
            creator = protocol.ClientCreator(reactor, Back)
            creator.connectTCP("127.0.0.1", shard_port[0]).addCallback(self._connected)

        def _connected(self, back):
            result["cpu0"], result["ran0"], result["user0"] = _cpu()
            result["wall0"] = time.monotonic()
            if mode in ("kernel", "python"):
                splice = splicer.take_transports(self.transport, back.transport, on_done=finished)
                assert splice is not None, "kernel splice refused the connection"
            else:
                splice = Splice(self.transport, back.transport, clock=reactor, on_done=finished)
                self._splice = back._splice = splice
                splice.start()
                self.transport.resumeProducing()
            result["splice"] = splice

        def dataReceived(self, data):
            self._splice.data(DOWNSTREAM, data)

        def connectionLost(self, reason):
            if self._splice is not None:
                self._splice.lost(DOWNSTREAM, reason)

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Front), interface="127.0.0.1")
    child = _peers(direction, nbytes, port.getHost().port)
    shard_port.append(int(child.stdout.readline()))

    def too_long() -> None:
        splice = result.get("splice")
        result["partial"] = True
        if splice is not None:
            splice.abort("bench-timeout")
        else:
            reactor.stop()

    guard = reactor.callLater(max_seconds, too_long)
    reactor.run()
    if guard.active():
        guard.cancel()
    port.stopListening()
    result["received"] = _received(child)
    pool.close()
    return result


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (read from /proc, no connection made)."""
    with open("/proc/net/tcp") as f:
        return any(
            fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A"
            for fields in (line.split() for line in list(f)[1:])
        )


_HAPROXY = """global
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    option splice-request
    option splice-response
frontend edge
    bind 127.0.0.1:{front}
    default_backend shard
backend shard
    server shard 127.0.0.1:{shard}
"""


def run_haproxy(direction: str, nbytes: int, max_seconds: float) -> dict:
    """HAProxy with splice between the same peers; its CPU from schedstat while they run."""
    import shutil
    import socket
    import tempfile

    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(haproxy):
        raise SystemExit("haproxy not found (Debian package haproxy)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        front = probe.getsockname()[1]
    child = _peers(direction, nbytes, front, wait=True)
    shard_port = int(child.stdout.readline())
    with tempfile.TemporaryDirectory() as folder:
        config = os.path.join(folder, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(_HAPROXY.format(front=front, shard=shard_port))
        proxy = subprocess.Popen([haproxy, "-db", "-f", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 preexec_fn=die_with_parent)
        try:
            deadline = time.monotonic() + 10
            while not _listening(front):
                if proxy.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("haproxy did not start")
                time.sleep(0.01)
            ran0, user0 = _ran(proxy.pid), process_cpu(proxy.pid).user
            wall0 = time.monotonic()
            _go(child)  # not before: a short run could end before ``ran0``
            try:
                out = child.communicate(timeout=max_seconds)[0].split()
                received, partial = (int(out[-1]) if out else 0), False
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                received, partial = 0, True
            wall = time.monotonic() - wall0
            ran, user = _ran(proxy.pid) - ran0, process_cpu(proxy.pid).user - user0
        finally:
            proxy.terminate()
            proxy.wait(10)
    result = {"mode": "haproxy", "direction": direction, "cpu": ran, "ran": ran, "wall": wall, "user": user,
              "moved": received if partial else nbytes, "ended_by": "eof", "received": received}
    if partial:
        result["partial"] = True
    return result


MODES = ("kernel", "python", "userspace", "floor", "haproxy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="bytes per run, in GiB")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="wall-clock bound per run")
    parser.add_argument("--mode", nargs="+", choices=(*MODES, "both", "all"), default=["both"],
                        help="what moves the bytes (both: kernel and userspace; all: the five)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, the modes alternating; medians kept")
    parser.add_argument("--run", nargs=2, metavar=("MODE", "DIRECTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    nbytes = int(args.gib * GIB)
    if args.run:
        if args.run[0] == "floor":
            result = run_floor(args.run[1], nbytes, args.max_seconds)
        elif args.run[0] == "haproxy":
            result = run_haproxy(args.run[1], nbytes, args.max_seconds)
        else:
            result = run_once(args.run[0], args.run[1], nbytes, args.max_seconds)
        result.pop("splice", None)
        print(json.dumps(result))
        return
    modes: list = []
    for mode in args.mode:
        for m in {"both": ("kernel", "userspace"), "all": MODES}.get(mode, (mode,)):
            if m not in modes:
                modes.append(m)
    runs: dict = {}
    for _ in range(args.rounds):
        for direction in ("up", "down"):
            for mode in modes:
                # A fresh process per run: one reactor run each, clean counters.
                command = [sys.executable, os.path.abspath(__file__), "--run", mode, direction]
                command += ["--gib", str(args.gib), "--max-seconds", str(args.max_seconds)]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                runs.setdefault((mode, direction), []).append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'mode':<10} {'dir':<5} {'GiB':>6} {'cpu s/GiB':>10} {'rusage s/GiB':>12} {'user s/GiB':>10} {'wall s':>7}"
          "  every round (cpu s/GiB)")
    for mode in modes:
        for direction in ("up", "down"):
            rows = runs[(mode, direction)]
            per = [r["ran"] / max(r["moved"], 1) * GIB for r in rows]
            r = sorted(zip(per, range(len(rows))))[len(rows) // 2]
            r = rows[r[1]]
            gib = r["moved"] / GIB
            # user time of its own (getrusage; HAProxy: /proc ticks), median of the rounds
            user = sorted(x["user"] / max(x["moved"], 1) * GIB for x in rows)[len(rows) // 2]
            note = " (cut short)" if r.get("partial") else ""
            if r["received"] != r["moved"] and not r.get("partial"):
                note += f" (peer received {r['received']})"
            print(
                f"{mode:<10} {direction:<5} {gib:6.2f} {r['ran'] / gib:10.3f} {r['cpu'] / gib:12.3f} "
                f"{user:10.3f} "
                f"{r['wall']:7.2f}  {' '.join(f'{v:.3f}' for v in per)}{note}"
            )


if __name__ == "__main__":
    main()
