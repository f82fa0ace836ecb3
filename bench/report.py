"""
Tables for the bench's output: reStructuredText simple tables, so a run's
output can go into ``docs/performance.rst`` as it is.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence


def fmt(value: Any, spec: str = ".1f") -> str:
    """A figure as text; ``-`` where there is none by design (no proxy in the direct case)."""
    if value is None:
        return "-"
    return format(value, spec)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b:
        return None
    return a / b


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``title`` underlined, then an RST simple table; the first column is left-aligned."""
    width = max(len(header), *(len(r) for r in rows)) if rows else len(header)
    header = list(header) + [""] * (width - len(header))
    rows = [[str(c) for c in r] + [""] * (width - len(r)) for r in rows]
    widths = [max(1, len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    rule = " ".join("=" * w for w in widths)

    def line(cells: Sequence[str]) -> str:
        return " ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [title, "~" * len(title), "", rule, line([str(h) for h in header]), rule]
    out += [line(r) for r in rows]
    out.append(rule)
    return "\n".join(out)
