"""
CPU time and resident memory of a process, read from ``/proc``.

The CPU figure is ``utime + stime`` of ``/proc/PID/stat`` (all threads of
the process, in clock ticks), so a proxy is charged for what it did, not for
how long the run took.
"""

from __future__ import annotations

import os

import attrs

_TICK = os.sysconf("SC_CLK_TCK")


class MeasureError(RuntimeError):
    """A figure could not be read (the process is gone, or /proc differs)."""


@attrs.frozen
class Cpu:
    """CPU seconds of one process, split into user and system."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, other: "Cpu") -> "Cpu":
        return Cpu(self.user - other.user, self.system - other.system)


def cpu(pid: int) -> Cpu:
    """CPU seconds used so far by ``pid`` (``utime``, ``stime``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError as e:
        raise MeasureError(f"cannot read /proc/{pid}/stat: {e}") from e
    # After the command name: state is fields[0], utime fields[11], stime fields[12].
    return Cpu(int(fields[11]) / _TICK, int(fields[12]) / _TICK)


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
