"""
Proxy memory per idle spliced connection (issue 10, goal 5).

``count`` connections through a ``plain`` shardtcp listener (a ``SHARD``
line, then nothing) to a shard that accepts and holds them (a process of
its own): the proxy's resident set (``VmRSS``) before, while they are held
and after, its descriptors, and its kernel-spliced counter from the admin
``/metrics`` (the proof of the path taken: an idle kernel-spliced
connection holds its two sockets and no pipe, pipes being lent only while
bytes are in flight).  Measured with the kernel splice at ``hold`` and
three and ten times ``hold`` connections, and with ``[proxy] splice =
"userspace"`` at ``hold``, and at ``hold`` with a listener ``idle_timeout``
(the cost of its timer); when the descriptor limit does not allow ten
times ``hold``, also at the most (in hundreds) it allows.  The first
``WARM_UP`` connections are opened and closed before the first reading,
so that what they load once (lazy imports, caches) is not counted per
connection; the cost of each connection past the previous count is
reported too.  Connections are opened ``BATCH`` at a time, each batch
through to the shard before the next.  The proxy runs
under ``prlimit --nofile`` with 2 descriptors per connection plus
``FDS_SPARE``; the bench process raises its own limit as far.  A count
those limits do not allow is reported as not measured, with the limit it
needs; a path not taken, a connection the shard never sees or a proxy that
dies stops the bench.  When ten times ``hold`` does not fit one process's
descriptor limit, it is also held by ``[proxy] workers = 2``: two worker
processes, each under its own limit, the memory and descriptors being
those of the supervisor and its workers together.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
import urllib.request

from bench import clients, measure, targets
from bench.lab import BenchError, Lab, free_port, readline_bounded, say
from bench.report import fmt, table

# Descriptors per idle kernel-spliced connection in the proxy: its two
# sockets (pipes are lent only while bytes move); plus room for the
# process's own (standard streams, epoll, waker, listeners, log).
FDS_PER_CONNECTION = 2
FDS_SPARE = 64
# Connections opened and closed before the first reading.
WARM_UP = 50
# Connections opened at once: each batch reaches the shard before the
# next, so the reading is of idle connections, not of a burst's
# connections all being set up at the same time.
BATCH = 100

_HOLDER = """
import socket, sys, threading
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(4096)
held = []
def accept():
    while True:
        try:
            held.append(srv.accept()[0])
        except OSError:
            return
threading.Thread(target=accept, daemon=True).start()
print(srv.getsockname()[1], flush=True)
for line in sys.stdin:
    if line.strip() == "close":
        while held:
            held.pop().close()
    print(len(held), flush=True)
"""


class _Holder:
    """
    A shard that accepts connections and keeps them, in a process of its
    own (so that its descriptors do not count against the bench's).
    """

    def __init__(self, lab: Lab, name: str) -> None:
        self.process = lab.spawn(name, [sys.executable, "-c", _HOLDER],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = int(readline_bounded(self.process, 30.0))

    def held(self, command: str = "?") -> int:
        """The connections it holds (after closing them all, with ``close``)."""
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return int(readline_bounded(self.process, 30.0))

    def wait_for(self, count: int, seconds: float) -> int:
        """Wait until it holds ``count`` connections; how many it holds."""
        deadline = time.monotonic() + seconds
        while self.held() < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.held()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


def _kernel_spliced(admin_port: int) -> float:
    """The proxy's ``shardtcp_connections_kernel_spliced_total`` from its admin ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.search(r'^shardtcp_connections_kernel_spliced_total\{[^}]*\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def _settled_counter(admin_port: int, expected) -> float:
    """
    The kernel-spliced counter; with ``expected``, read until it reaches
    that (a supervisor's figure lags its workers' by a scrape), for at
    most 15 s.
    """
    deadline = time.monotonic() + 15.0
    while True:
        value = _kernel_spliced(admin_port)
        if expected is None or value >= expected or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


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


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants (a supervisor and its workers)."""
    found = [pid]
    for each in found:
        try:
            with open(f"/proc/{each}/task/{each}/children") as f:
                found.extend(int(child) for child in f.read().split())
        except OSError:
            pass
    return found


def _family_rss_kib(pid: int) -> int:
    return sum(measure.rss_kib(each) for each in _family(pid))


def _family_fds(pid: int) -> int:
    return sum(_fds(each) for each in _family(pid))


def _family_pipe_fds(pid: int) -> int:
    return sum(_pipe_fds(each) for each in _family(pid))


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


def _case(lab: Lab, mode: str, count: int, time_limit: float, idle_timeout: str = "", workers: int = 0) -> dict:
    """
    One reading.  With ``workers``, the proxy runs ``[proxy] workers``
    processes sharing the listener: each holds its share of the
    connections under its own descriptor limit (the limit given is the
    hard limit, as a worker's share is up to the kernel's accept queue),
    and the memory and descriptors are those of the supervisor and its
    workers together.
    """
    nofile = count * FDS_PER_CONNECTION + FDS_SPARE
    result = {"mode": mode, "count": count, "nofile": nofile, "idle_timeout": idle_timeout, "workers": workers}
    why_not = _raise_own_limit(count + FDS_SPARE)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if workers:
        # A worker may take a little more than its share; the hard limit
        # leaves it room.
        per_worker = -(-count // workers) * FDS_PER_CONNECTION + FDS_SPARE
        nofile = result["nofile"] = hard
        if not why_not and per_worker > hard:
            why_not = f"needs RLIMIT_NOFILE {per_worker} per worker, hard limit here {hard} (not raisable)"
    elif not why_not and nofile > hard:
        why_not = f"needs RLIMIT_NOFILE {nofile}, hard limit here {hard} (not raisable)"
    if why_not:
        result["skipped"] = why_not
        say(f"memory {mode} {count}: not measured, {why_not}")
        return result
    name = f"shardtcp-memory-{mode}-{count}" + ("-idle" if idle_timeout else "") + (f"-w{workers}" if workers else "")
    holder = _Holder(lab, name + "-shard")
    port, admin = free_port(), free_port()
    text = targets.shardtcp_config(lab, [targets.listener("edge", port, "plain")],
                                   [targets.Shard("bench-shard-1", f"127.0.0.1:{holder.port}")])
    keys = f'splice = "{mode}"\nmax_pipes = {2 * count + 16}\n' + (f"workers = {workers}\n" if workers else "")
    text = text.replace('id = "edge-bench-1"\n', 'id = "edge-bench-1"\n' + keys, 1)
    if idle_timeout:
        text = text.replace('connect_timeout = "5s"\n', f'connect_timeout = "5s"\nidle_timeout = "{idle_timeout}"\n', 1)
    text += f'\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
    target, _ = targets.start_shardtcp(lab, name, text, port, nofile=nofile)
    held: list = []
    try:
        # Warm up: the first connections load and build what every later
        # one shares (lazy imports, caches); that is not per-connection.
        warm = [clients.connect(port, None, targets.PLAIN_PREAMBLE) for _ in range(WARM_UP)]
        if holder.wait_for(WARM_UP, 30) < WARM_UP:
            raise BenchError(f"{name}: the shard saw {holder.held()} of {WARM_UP} warm-up connections")
        for sock in warm:
            sock.close()
        holder.held("close")
        # A supervisor sums its workers' counters as it scrapes them (every
        # 5 s): wait for the warm-up's to show.
        kernel_before = _settled_counter(admin, WARM_UP if workers else None)
        before = _family_rss_kib(target.pid)
        fds_before = _family_fds(target.pid)
        t0 = time.perf_counter()
        while len(held) < count:
            if time.perf_counter() - t0 > time_limit:
                raise BenchError(f"only {len(held)} of {count} connections opened through {name} "
                                 f"in {time_limit:.0f}s")
            for _ in range(min(BATCH, count - len(held))):
                held.append(clients.connect(port, None, targets.PLAIN_PREAMBLE))
            seen = holder.wait_for(len(held), 30)
            if seen < len(held):
                raise BenchError(f"{name}: the shard saw {seen} of {len(held)} connections")
        time.sleep(1.0)
        lab.alive(name, target.process)
        during = _family_rss_kib(target.pid)
        pipes = _family_pipe_fds(target.pid)
        fds = _family_fds(target.pid)
        processes = len(_family(target.pid))
        kernel = _settled_counter(admin, kernel_before + count if workers else None) - kernel_before
    except OSError as e:
        raise BenchError(f"{name}: holding connection {len(held) + 1}: {e}") from e
    finally:
        for sock in held:
            sock.close()
        holder.close()
    if mode == "auto" and kernel != count:
        raise BenchError(f"{name}: {kernel:.0f} of {count} connections kernel-spliced")
    if mode == "userspace" and kernel:
        raise BenchError(f"{name}: {kernel:.0f} connections kernel-spliced with the userspace splice")
    time.sleep(2.0)
    after = _family_rss_kib(target.pid)
    lab.stop(target.process)
    result.update({"rss_before_kib": before, "rss_held_kib": during, "rss_after_kib": after, "processes": processes,
                   "kib_per_conn": (during - before) / count, "pipe_fds": pipes,
                   "fds_per_conn": (fds - fds_before) / count, "fds_before": fds_before, "kernel_spliced": int(kernel)})
    say(f"memory {mode} {count}: {result['kib_per_conn']:.2f} KiB per held connection, "
        f"{result['fds_per_conn']:.2f} descriptors per connection, {pipes} pipe descriptors")
    return result


def run(lab: Lab, settings: dict) -> dict:
    hold = settings["hold"]
    cases = [("auto", hold), ("userspace", hold), ("auto", 3 * hold), ("auto", 10 * hold)]
    results: dict = {"cases": [_case(lab, mode, count, 180.0) for mode, count in cases]}
    # With an idle timeout, as a deployed listener has: its timer's cost.
    results["cases"].insert(2, _case(lab, "auto", hold, 180.0, idle_timeout="5m"))
    if "skipped" in results["cases"][-1]:
        # As many as this machine's descriptor limit allows, in hundreds.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        most = (hard - FDS_SPARE) // FDS_PER_CONNECTION // 100 * 100
        if most > 3 * hold:
            results["cases"].append(_case(lab, "auto", most, 180.0))
        # Ten times ``hold`` with two worker processes: each holds its share
        # under its own descriptor limit.
        results["workers_case"] = _case(lab, "auto", 10 * hold, 240.0, workers=2)
        results["cases"].append(results["workers_case"])
    kernel = sorted((c for c in results["cases"]
                     if c["mode"] == "auto" and not c["idle_timeout"] and not c.get("workers") and "kib_per_conn" in c),
                    key=lambda c: c["count"])
    for smaller, larger in zip(kernel, kernel[1:]):
        # What each further connection costs, the start-up growth aside.
        larger["kib_per_added"] = (larger["rss_held_kib"] - smaller["rss_held_kib"]) / (larger["count"] - smaller["count"])
    if kernel:
        results["kernel_kib_per_conn"] = kernel[-1]["kib_per_conn"]
        results["kernel_count"] = kernel[-1]["count"]
    return results


def report(r: dict) -> str:
    cases = r["cases"]
    heads = [f"{'kernel' if c['mode'] == 'auto' else 'userspace'} {c['count']}"
             + (f" idle_timeout {c['idle_timeout']}" if c.get("idle_timeout") else "")
             + (f", {c['workers']} workers" if c.get("workers") else "") for c in cases]

    def cell(c: dict, key: str, spec: str) -> str:
        return c["skipped"] if key == "kib_per_conn" and "skipped" in c else fmt(c.get(key), spec)

    rows = [
        ["RSS KiB before"] + [cell(c, "rss_before_kib", "d") for c in cases],
        ["RSS KiB while held"] + [cell(c, "rss_held_kib", "d") for c in cases],
        ["RSS KiB after they closed"] + [cell(c, "rss_after_kib", "d") for c in cases],
        ["KiB per held connection"] + [cell(c, "kib_per_conn", ".2f") for c in cases],
        ["KiB per connection past the last count"] + [cell(c, "kib_per_added", ".2f") for c in cases],
        ["proxy descriptors before"] + [cell(c, "fds_before", "d") for c in cases],
        ["descriptors per held connection"] + [cell(c, "fds_per_conn", ".2f") for c in cases],
        ["pipe descriptors while held"] + [cell(c, "pipe_fds", "d") for c in cases],
        ["kernel-spliced (counter)"] + [cell(c, "kernel_spliced", "d") for c in cases],
        ["RLIMIT_NOFILE given (per process)"] + [str(c["nofile"]) for c in cases],
        ["processes (supervisor + workers)"] + [cell(c, "processes", "d") for c in cases],
    ]
    return table("Proxy memory per idle spliced connection (plain listener, resident set)", ["", *heads], rows)
