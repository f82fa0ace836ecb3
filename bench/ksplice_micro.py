#!/usr/bin/env python3
"""
Proxy CPU seconds per GiB: the kernel splice (``shardtcp.proxy.ksplice``)
against the userspace ``Splice``, one loopback TCP connection pair at a time.

This process is the proxy: it accepts the client on a Twisted port,
connects to the shard with Twisted, then either hands both transports to
``KernelSplicer.take_transports`` or couples them with ``Splice``.  The
client and the shard run in a child process (blocking sockets, threads), so
their CPU is not counted.  The proxy's CPU is read from ``getrusage`` (and
``/proc/self/stat`` as a cross-check) between the start of the splice and
its end.  Each run is bounded by ``--max-seconds``; a run cut short reports
the bytes it moved.

    python bench/ksplice_micro.py [--gib 1] [--max-seconds 60] [--mode both]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# The peers: a client that connects to the proxy and a shard that the proxy
# connects to.  ``up`` sends from the client, ``down`` from the shard; the
# receiver counts, then each side closes after the other's EOF.
PEERS = r"""
import socket, sys, threading
front, direction, total = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
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

client = socket.create_connection(("127.0.0.1", front))
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


def _cpu() -> tuple[float, float]:
    """(getrusage user+sys, /proc/self/stat utime+stime) in seconds."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return r.ru_utime + r.ru_stime, (int(fields[11]) + int(fields[12])) / ticks


def run_once(mode: str, direction: str, nbytes: int, max_seconds: float) -> dict:
    from twisted.internet import protocol, reactor

    from shardtcp.eventloop import adopt

    adopt(reactor)  # as the daemon does: its splices are edge-triggered
    from shardtcp.proxy.ksplice import KernelSplicer, PipePool
    from shardtcp.proxy.splice import DOWNSTREAM, UPSTREAM, Splice, SpliceSideMixin

    result: dict = {"mode": mode, "direction": direction}
    pool = PipePool(max_pipes=16)
    splicer = KernelSplicer(pool, reactor=reactor)
    if mode == "kernel" and not splicer.enabled:
        raise SystemExit("kernel splice unavailable here")
    shard_port = []

    def finished(stats) -> None:
        cpu, proc = _cpu()
        result.update(
            cpu=cpu - result["cpu0"],
            proc=proc - result["proc0"],
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
            result["cpu0"], result["proc0"] = _cpu()
            result["wall0"] = time.monotonic()
            if mode == "kernel":
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
    child = subprocess.Popen(
        [sys.executable, "-c", PEERS, str(port.getHost().port), direction, str(nbytes)],
        stdout=subprocess.PIPE,
        text=True,
    )
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
    try:
        out = child.communicate(timeout=10)[0].split()
        result["received"] = int(out[-1]) if out else 0
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        result["received"] = 0
    pool.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="bytes per run, in GiB")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="wall-clock bound per run")
    parser.add_argument("--mode", choices=("kernel", "userspace", "both"), default="both")
    parser.add_argument("--run", nargs=2, metavar=("MODE", "DIRECTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    nbytes = int(args.gib * GIB)
    if args.run:
        result = run_once(args.run[0], args.run[1], nbytes, args.max_seconds)
        result.pop("splice", None)
        print(json.dumps(result))
        return
    modes = ("kernel", "userspace") if args.mode == "both" else (args.mode,)
    rows = []
    for mode in modes:
        for direction in ("up", "down"):
            # A fresh process per run: one reactor run each, clean rusage.
            command = [sys.executable, os.path.abspath(__file__), "--run", mode, direction]
            command += ["--gib", str(args.gib), "--max-seconds", str(args.max_seconds)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'mode':<10} {'dir':<5} {'GiB':>6} {'cpu s':>7} {'cpu s/GiB':>10} {'/proc s/GiB':>11} {'wall s':>7}")
    for r in rows:
        gib = r["moved"] / GIB
        note = " (cut short)" if r.get("partial") else ""
        if r["received"] != r["moved"] and not r.get("partial"):
            note += f" (peer received {r['received']})"
        print(
            f"{r['mode']:<10} {r['direction']:<5} {gib:6.2f} {r['cpu']:7.3f} {r['cpu'] / gib:10.3f} "
            f"{r['proc'] / gib:11.3f} {r['wall']:7.2f}{note}"
        )


if __name__ == "__main__":
    main()
