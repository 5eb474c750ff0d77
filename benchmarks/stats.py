"""Pure helpers for the benchmark report: statistics, targets, PASS/MISS and Markdown.

Nothing here runs a process or reads the clock, so it is unit-tested
(tests/test_benchmarks_smoke.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PASS = "PASS"
MISS = "MISS"
NA = "n/a"


def _clean(xs: Iterable[float | None]) -> list[float]:
    return sorted(float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x)))


def median(xs: Iterable[float | None]) -> float | None:
    """The median of the values that are not None; None when there are none."""
    v = _clean(xs)
    if not v:
        return None
    n = len(v)
    mid = n // 2
    return v[mid] if n % 2 else (v[mid - 1] + v[mid]) / 2


def percentile(xs: Iterable[float | None], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks
    (numpy's default): rank = q/100 * (n-1)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} out of 0..100")
    v = _clean(xs)
    if not v:
        return None
    rank = q / 100 * (len(v) - 1)
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return v[lo] + (v[hi] - v[lo]) * (rank - lo)


def p90(xs: Iterable[float | None]) -> float | None:
    return percentile(xs, 90)


def maximum(xs: Iterable[float | None]) -> float | None:
    v = _clean(xs)
    return v[-1] if v else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def best(values: Iterable[float | None], higher_is_better: bool = False) -> float | None:
    v = _clean(values)
    if not v:
        return None
    return v[-1] if higher_is_better else v[0]


_OPS = {
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "==": lambda a, b: a == b,
}


def verdict(value: float | None, op: str, limit: float | None) -> str:
    """PASS when `value op limit` holds, MISS when it does not, n/a when either is missing."""
    if op not in _OPS:
        raise ValueError(f"unknown comparison {op!r}")
    if value is None or limit is None:
        return NA
    return PASS if _OPS[op](value, limit) else MISS


def fmt(x: float | None, unit: str = "", digits: int | None = None) -> str:
    """Human formatting with a unit: 'ms', 's', '%', 'MiB', 'x', 'tx/s', '' ..."""
    if x is None:
        return "–"
    if digits is None:
        ax = abs(x)
        if ax == 0:
            digits = 0
        elif ax >= 100:
            digits = 0
        elif ax >= 10:
            digits = 1
        elif ax >= 1:
            digits = 2
        elif ax >= 0.01:
            digits = 3
        else:
            digits = 4
    s = f"{x:,.{digits}f}"
    if unit in ("", None):
        return s
    if unit in ("%", "x", "×"):
        return s + unit
    return f"{s} {unit}"


def md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are str()-ed and pipes escaped."""
    out = ["| " + " | ".join(md_escape(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        cells = [md_escape("" if c is None else c) for c in r]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells, table has {len(headers)} columns")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


@dataclass(frozen=True)
class Target:
    """A target of the issue: `what op limit`, e.g. Target('p90 window', '<=', 0.025, 's')."""

    what: str
    op: str
    limit: float | None
    unit: str = ""
    scale: float = 1.0  # display multiplier (e.g. 1000 to show seconds as ms)
    note: str = ""  # how the limit was derived, e.g. "1.5 x best Litestream"
    digits: int | None = None  # fixed decimals for display (0 for counts); None: automatic

    def describe(self) -> str:
        if not self.op:
            return "reported (no target)" + (f"; {self.note}" if self.note else "")
        lim = fmt(None if self.limit is None else self.limit * self.scale, self.unit, self.digits)
        s = f"{self.op} {lim}"
        return f"{s} ({self.note})" if self.note else s

    def judge(self, value: float | None) -> str:
        if not self.op:
            return NA
        return verdict(value, self.op, self.limit)


@dataclass(frozen=True)
class TargetRow:
    """One line of a PASS/MISS table: a figure of replicator against a target."""

    what: str
    value: float | None
    target: Target
    best_litestream: float | None = None
    litestream_label: str = ""

    def cells(self) -> list[str]:
        t = self.target
        v = None if self.value is None else self.value * t.scale
        b = None if self.best_litestream is None else self.best_litestream * t.scale
        r = ratio(self.value, self.best_litestream)
        best_s = fmt(b, t.unit, t.digits) + (f" ({self.litestream_label})" if self.litestream_label and b is not None else "")
        return [self.what, fmt(v, t.unit, t.digits), best_s, fmt(r, "x", 2) if r is not None else "–", t.describe(), t.judge(self.value)]

    def summary(self) -> dict:
        return {
            "figure": self.what,
            "replicator": self.value,
            "best_litestream": self.best_litestream,
            "litestream_label": self.litestream_label,
            "ratio": ratio(self.value, self.best_litestream),
            "target": self.target.describe(),
            "result": self.target.judge(self.value),
        }


TARGET_HEADERS = ["figure", "replicator", "best Litestream", "ratio (replicator / best Litestream)", "target", "result"]


def target_table(rows: Iterable[TargetRow]) -> str:
    """The PASS/MISS table of one scenario."""
    return md_table(TARGET_HEADERS, [r.cells() for r in rows])


def count_verdicts(rows: Iterable[TargetRow]) -> dict[str, int]:
    out = {PASS: 0, MISS: 0, NA: 0}
    for r in rows:
        out[r.target.judge(r.value)] += 1
    return out
