"""Smoke test of the benchmark script (benchmarks/run.py) and unit tests of its pure
statistics and report helpers. Nothing here runs a benchmark, downloads Litestream or
asserts on timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import stats  # noqa: E402
from benchmarks.stats import MISS, NA, PASS, Target, TargetRow  # noqa: E402


def test_run_help_lists_the_options():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for opt in ("--scenarios", "--quick", "--runs", "--reps", "--restore-reps", "--out", "--tools", "--intervals", "--workdir"):
        assert opt in out
    assert "litestream-0.5.17" in out and "litestream-0.3.13" in out
    assert "docs/benchmarks.md" in out


def test_run_rejects_an_unknown_scenario():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--scenarios", "9"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "unknown scenario" in p.stderr


def test_run_rejects_zero_restore_repetitions():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--restore-reps", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "--restore-reps must be >= 1" in p.stderr


def test_restore_repetitions_default_to_seven_and_one_when_quick():
    from benchmarks import run

    assert run.parse_args([]).restore_reps == 7
    assert run.parse_args(["--quick"]).restore_reps == 1
    assert run.parse_args(["--restore-reps", "3"]).restore_reps == 3


def test_median():
    assert stats.median([3, 1, 2]) == 2
    assert stats.median([4, 1, 3, 2]) == 2.5
    assert stats.median([5.0]) == 5.0
    assert stats.median([]) is None
    assert stats.median([None, 1, None, 3]) == 2  # missing values are ignored


def test_percentile_and_p90():
    xs = list(range(1, 11))  # 1..10
    # linear interpolation: rank = 0.9 * 9 = 8.1 -> 9 + 0.1 * (10 - 9)
    assert stats.p90(xs) == pytest.approx(9.1)
    assert stats.percentile(xs, 0) == 1
    assert stats.percentile(xs, 100) == 10
    assert stats.percentile(xs, 50) == pytest.approx(stats.median(xs))
    assert stats.p90([7]) == 7
    assert stats.p90([]) is None
    assert stats.p90([0.010, 0.005, 0.020, 0.015]) == pytest.approx(0.0185)
    with pytest.raises(ValueError):
        stats.percentile(xs, 101)


def test_maximum_ratio_best():
    assert stats.maximum([1, 5, None, 3]) == 5
    assert stats.maximum([None]) is None
    assert stats.ratio(1, 4) == 0.25
    assert stats.ratio(1, 0) is None
    assert stats.ratio(None, 2) is None
    assert stats.best([3, 1, 2]) == 1
    assert stats.best([3, 1, 2], higher_is_better=True) == 3


def test_verdict():
    assert stats.verdict(0.020, "<=", 0.025) == PASS
    assert stats.verdict(0.025, "<=", 0.025) == PASS
    assert stats.verdict(0.026, "<=", 0.025) == MISS
    assert stats.verdict(0.69, ">=", 0.7) == MISS
    assert stats.verdict(1.0, "<", 1.0) == MISS
    assert stats.verdict(None, "<=", 1.0) == NA
    assert stats.verdict(1.0, "<=", None) == NA
    with pytest.raises(ValueError):
        stats.verdict(1.0, "~", 1.0)


def test_fmt():
    assert stats.fmt(None) == "–"
    assert stats.fmt(12.345, "ms") == "12.3 ms"
    assert stats.fmt(0.5, "%") == "0.500%"
    assert stats.fmt(1234.4, "tx/s") == "1,234 tx/s"
    assert stats.fmt(0.0031, "s/MiB", 4) == "0.0031 s/MiB"


def test_md_table_escapes_and_checks_width():
    t = stats.md_table(["a", "b"], [["x|y", 1], [None, "z"]])
    lines = t.splitlines()
    assert lines[0] == "| a | b |"
    assert lines[1] == "|---|---|"
    assert lines[2] == "| x\\|y | 1 |"
    assert lines[3] == "|  | z |"
    with pytest.raises(ValueError):
        stats.md_table(["a", "b"], [["only one"]])


def test_target_rows_render_pass_miss_table():
    rows = [
        TargetRow("p90 window", 0.010, Target("p90", "<=", 0.025, "ms", 1000), 0.51, "litestream-0.5.17"),
        TargetRow("agent CPU", 24.0, Target("cpu", "<=", 10.0, "%"), 2.8, "litestream-0.5.17"),
        TargetRow("cpu per MiB", 0.006, Target("c", "<=", 1.5 * 0.003, "s/MiB", note="1.5 × best Litestream"), 0.003, "litestream-0.3.13"),
        TargetRow("peak WAL", 80.0, Target("wal", "", None, "MiB"), 190.0, "litestream-0.5.17"),
    ]
    table = stats.target_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| figure | replicator | best Litestream |")
    assert len(lines) == 2 + len(rows)
    assert lines[2] == "| p90 window | 10.0 ms | 510 ms (litestream-0.5.17) | 0.02x | <= 25.0 ms | PASS |"
    assert lines[3].endswith("| <= 10.0% | MISS |")
    assert "8.57x" in lines[3]
    assert "(1.5 × best Litestream) | MISS |" in lines[4]
    assert lines[5].endswith("| reported (no target) | n/a |")
    assert stats.count_verdicts(rows) == {PASS: 1, MISS: 2, NA: 1}
    s = rows[1].summary()
    assert s["result"] == MISS and s["ratio"] == pytest.approx(24.0 / 2.8)


def test_the_report_names_the_cpu_probe_when_the_run_took_it():
    import json

    from benchmarks import run

    meta = json.loads((ROOT / "benchmarks" / "results" / "full-run.json").read_text())
    sections = [run.section_from_dict(d) for d in meta.pop("sections")]
    before = {k: v for k, v in meta["machine"].items() if not k.startswith("cpu_probe")}
    assert "- **CPU probe**" not in run.render({**meta, "machine": before}, sections)  # a run from before the probe
    text = run.render({**meta, "machine": {**before, "cpu_probe_start": 0.5123, "cpu_probe_end": 0.6789}}, sections)
    assert "- **CPU probe**" in text and "0.512 s at the start, 0.679 s at the end" in text


def test_cpu_probe_times_a_fresh_interpreter():
    from benchmarks import run

    assert 0 < run.cpu_probe() < 60
