"""
CPU time and resident memory of a process, read from ``/proc``.

A proxy is charged for what it did, not for how long the run took.  The
CPU total is the time its threads ran, in nanoseconds, from
``/proc/PID/task/TID/schedstat`` (the first field of each, summed); the
split into user and system time is ``utime`` and ``stime`` of
``/proc/PID/stat``, in clock ticks (10 ms), so for a short run the split is
coarse while the total is exact.  Where schedstat is missing the total is
the sum of the ticks.
"""

from __future__ import annotations

import os

import attrs

_TICK = os.sysconf("SC_CLK_TCK")


class MeasureError(RuntimeError):
    """A figure could not be read (the process is gone, or /proc differs)."""


@attrs.frozen
class Cpu:
    """
    CPU seconds of one process: ``ran`` (threads' run time, exact; None
    without schedstat), split into ``user`` and ``system`` (clock ticks).
    """

    user: float
    system: float
    ran: float | None = None

    @property
    def total(self) -> float:
        return self.ran if self.ran is not None else self.user + self.system

    def __sub__(self, other: "Cpu") -> "Cpu":
        ran = None if self.ran is None or other.ran is None else self.ran - other.ran
        return Cpu(self.user - other.user, self.system - other.system, ran)

    def __add__(self, other: "Cpu") -> "Cpu":
        ran = None if self.ran is None or other.ran is None else self.ran + other.ran
        return Cpu(self.user + other.user, self.system + other.system, ran)


def cpu(pid: int) -> Cpu:
    """CPU seconds used so far by ``pid`` (``utime``, ``stime``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError as e:
        raise MeasureError(f"cannot read /proc/{pid}/stat: {e}") from e
    # After the command name: state is fields[0], utime fields[11], stime fields[12].
    return Cpu(int(fields[11]) / _TICK, int(fields[12]) / _TICK, _ran(pid))


def _ran(pid: int) -> float | None:
    """Seconds the threads of ``pid`` have run (schedstat), or None."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError as e:
        raise MeasureError(f"cannot read /proc/{pid}/status: {e}") from e
    raise MeasureError(f"no VmRSS for pid {pid}")


def per(used: Cpu, count: float, scale: float = 1.0) -> dict:
    """``used`` divided by ``count`` (times ``scale``), as total/user/sys."""
    if count <= 0:
        raise MeasureError("nothing was counted, so no CPU per unit")
    return {
        "total": used.total * scale / count,
        "user": used.user * scale / count,
        "sys": used.system * scale / count,
    }
