"""
Proxy memory per idle spliced connection (issue 10, goal 5).

``count`` connections through a ``plain`` shardtcp listener (a ``SHARD``
line, then nothing) to a shard that accepts and holds them: the proxy's
resident set (``VmRSS``) before, while they are held and after, and its
pipe descriptors, which tell the path taken (a kernel-spliced connection
holds two pipes, four descriptors, besides its two sockets).  Measured with
the kernel splice at ``hold`` and ten times ``hold`` connections, and with
``[proxy] splice = "userspace"`` at ``hold``; when the descriptor limit
does not allow ten times ``hold``, also at the most (in thousands) it
allows.  The proxy runs under
``prlimit --nofile`` with 6 descriptors per connection plus 1024; the bench
process raises its own limit as far.  A count those limits do not allow is
reported as not measured, with the limit it needs; a path not taken, a
connection the shard never sees or a proxy that dies stops the bench.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time

from bench import clients, measure, targets
from bench.lab import BenchError, Lab, free_port, say
from bench.report import fmt, table

# Descriptors per kernel-spliced connection in the proxy: two sockets and
# two pipes; plus room for the process's own.
FDS_PER_CONNECTION = 6
FDS_SPARE = 1024


class _Holder:
    """A shard in the bench process that accepts connections and keeps them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.held: list = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def release(self) -> None:
        for conn in self.held:
            conn.close()
        self.held = []

    def close(self) -> None:
        self.sock.close()
        self.release()


def _pipe_fds(pid: int) -> int:
    folder = f"/proc/{pid}/fd"
    count = 0
    for name in os.listdir(folder):
        try:
            if os.readlink(os.path.join(folder, name)).startswith("pipe:"):
                count += 1
        except OSError:
            pass
    return count


def _raise_own_limit(need: int) -> str:
    """Raise this process's descriptor limit to ``need``; "" or why not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return ""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    except (ValueError, OSError):
        return f"needs RLIMIT_NOFILE {need}, hard limit here {hard} (not raisable)"
    return ""


def _case(lab: Lab, mode: str, count: int, time_limit: float) -> dict:
    nofile = count * FDS_PER_CONNECTION + FDS_SPARE
    result = {"mode": mode, "count": count, "nofile": nofile}
    why_not = _raise_own_limit(nofile)
    if why_not:
        result["skipped"] = why_not
        say(f"memory {mode} {count}: not measured, {why_not}")
        return result
    holder = _Holder()
    port = free_port()
    text = targets.shardtcp_config(lab, [targets.listener("edge", port, "plain")],
                                   [targets.Shard("bench-shard-1", f"127.0.0.1:{holder.port}")])
    keys = f'splice = "{mode}"\nmax_pipes = {2 * count + 16}\n'
    text = text.replace('id = "edge-bench-1"\n', 'id = "edge-bench-1"\n' + keys, 1)
    name = f"shardtcp-memory-{mode}-{count}"
    target, _ = targets.start_shardtcp(lab, name, text, port, nofile=nofile)
    held: list = []
    try:
        time.sleep(1.0)
        before = measure.rss_kib(target.pid)
        t0 = time.perf_counter()
        for _ in range(count):
            if time.perf_counter() - t0 > time_limit:
                raise BenchError(f"only {len(held)} of {count} connections opened through {name} "
                                 f"in {time_limit:.0f}s")
            held.append(clients.connect(port, None, targets.PLAIN_PREAMBLE))
        deadline = time.monotonic() + 30
        while len(holder.held) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(holder.held) < count:
            raise BenchError(f"{name}: the shard saw {len(holder.held)} of {count} connections")
        time.sleep(1.0)
        lab.alive(name, target.process)
        during = measure.rss_kib(target.pid)
        pipes = _pipe_fds(target.pid)
    except OSError as e:
        raise BenchError(f"{name}: holding connection {len(held) + 1}: {e}") from e
    finally:
        for sock in held:
            sock.close()
        holder.close()
    if mode == "auto" and pipes < 4 * count:
        raise BenchError(f"{name}: {pipes} pipe descriptors for {count} connections: not kernel-spliced")
    if mode == "userspace" and pipes > 16:
        raise BenchError(f"{name}: {pipes} pipe descriptors with the userspace splice")
    time.sleep(2.0)
    after = measure.rss_kib(target.pid)
    lab.stop(target.process)
    result.update({"rss_before_kib": before, "rss_held_kib": during, "rss_after_kib": after,
                   "kib_per_conn": (during - before) / count, "pipe_fds": pipes})
    say(f"memory {mode} {count}: {result['kib_per_conn']:.2f} KiB per held connection, {pipes} pipe descriptors")
    return result


def run(lab: Lab, settings: dict) -> dict:
    hold = settings["hold"]
    cases = [("auto", hold), ("userspace", hold), ("auto", 10 * hold)]
    results: dict = {"cases": [_case(lab, mode, count, 120.0) for mode, count in cases]}
    if "skipped" in results["cases"][-1]:
        # As many as this machine's descriptor limit allows, in thousands.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        most = (hard - FDS_SPARE) // FDS_PER_CONNECTION // 1000 * 1000
        if most > hold:
            results["cases"].append(_case(lab, "auto", most, 120.0))
    kernel = [c for c in results["cases"] if c["mode"] == "auto" and "kib_per_conn" in c]
    if kernel:
        largest = max(kernel, key=lambda c: c["count"])
        results["kernel_kib_per_conn"] = largest["kib_per_conn"]
        results["kernel_count"] = largest["count"]
    return results


def report(r: dict) -> str:
    cases = r["cases"]
    heads = [f"{'kernel' if c['mode'] == 'auto' else 'userspace'} {c['count']}" for c in cases]

    def cell(c: dict, key: str, spec: str) -> str:
        return c["skipped"] if key == "kib_per_conn" and "skipped" in c else fmt(c.get(key), spec)

    rows = [
        ["RSS KiB before"] + [cell(c, "rss_before_kib", "d") for c in cases],
        ["RSS KiB while held"] + [cell(c, "rss_held_kib", "d") for c in cases],
        ["RSS KiB after they closed"] + [cell(c, "rss_after_kib", "d") for c in cases],
        ["KiB per held connection"] + [cell(c, "kib_per_conn", ".2f") for c in cases],
        ["pipe descriptors while held"] + [cell(c, "pipe_fds", "d") for c in cases],
        ["RLIMIT_NOFILE given"] + [str(c["nofile"]) for c in cases],
    ]
    return table("Proxy memory per idle spliced connection (plain listener, resident set)", ["", *heads], rows)
