"""Small shared helpers of the reports: robust mean/std, number formatting, Markdown tables
and target records."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["fmt", "make_target", "md_table", "mean_or_none", "pm", "std_or_none"]


def mean_or_none(xs: Sequence[float | None]) -> float | None:
    """Mean of the finite values of ``xs``; ``None`` if there are none."""
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(vals) if vals else None


def std_or_none(xs: Sequence[float | None]) -> float | None:
    """Sample standard deviation (n-1) of the finite values; ``None`` for fewer than two."""
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.stdev(vals) if len(vals) >= 2 else None


def fmt(v: float | None, spec: str = ".4f") -> str:
    """``v`` formatted with ``spec``; ``-`` for ``None``."""
    return "-" if v is None else format(v, spec)


def pm(m: float | None, s: float | None, spec: str = ".4f") -> str:
    """``m +- s`` (just ``m`` without ``s``; ``-`` without ``m``)."""
    if m is None:
        return "-"
    return f"{m:{spec}} +- {s:{spec}}" if s is not None else f"{m:{spec}}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    lines = [line.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [line.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def make_target(tid: str, what: str, status: str, *, experiment: str | None = None,
                measured: float | None = None, threshold: float | None = None,
                comparison: str | None = None, detail: str = "") -> dict[str, Any]:
    """One target record: ``status`` is PASS / MISS / N/A, ``measured`` the measured value
    compared with ``threshold`` by ``comparison``."""
    return {"id": tid, "target": what, "experiment": experiment, "measured": measured,
            "threshold": threshold, "comparison": comparison, "status": status, "detail": detail}
