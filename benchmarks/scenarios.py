"""The eight scenarios of issue 5. Each takes a Ctx and returns a Section (tables, PASS/MISS
rows, method, raw per-run figures) for the report."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks import harness as H
from benchmarks import procs
from benchmarks.stats import (
    Target,
    TargetRow,
    fmt,
    maximum,
    md_table,
    median,
    p90,
    ratio,
)
from benchmarks.tools import Tool, writer_cmd

MiB = 1 << 20


@dataclass
class Ctx:
    work: Path
    tools: list[Tool]  # at their defaults
    intervals: list[float | None]  # extra Litestream intervals for scenarios 1 and 2 (None = defaults)
    quick: bool
    runs: int  # scenario 1 runs
    reps: int  # repetitions in scenarios 2, 3, 8
    restore_reps: int  # repetitions of the timed restores (and cp+fsync) in scenario 5
    log: Callable[[str], None] = print
    commands: dict[str, str] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)
    seed: int = 5
    s5_agent_rss: dict[str, float] = field(default_factory=dict)  # filled by scenario 5, used by 4
    keep: bool = False  # --keep: the trash stays too (work/trash/N-name)
    _discarded: int = 0

    def note_cmd(self, kind: str, cmd: str | list[str], config: Path | None = None) -> None:
        """Remember one example of each kind of command for the report ($WORK for the work dir)."""
        if isinstance(cmd, list):
            import shlex

            cmd = shlex.join(map(str, cmd))
        if kind not in self.commands:
            self.commands[kind] = self._tidy(cmd)
        if config is not None and kind not in self.configs:
            self.configs[kind] = shorten_config(self._tidy(config.read_text()))

    def _tidy(self, text: str) -> str:
        from benchmarks.tools import ROOT

        return text.replace(str(self.work), "$WORK").replace(str(ROOT) + "/", "")

    def discard(self, path: Path) -> None:
        """Put a finished run's directory aside, to be deleted after the last scenario
        (empty_trash): not at once, where the runs measured next would pay for it (see
        TRASH_KEEP_FREE_BYTES)."""
        if path.exists():
            trash = self.work / "trash"
            trash.mkdir(exist_ok=True)
            self._discarded += 1
            path.rename(trash / f"{self._discarded}-{path.name}")

    def empty_trash(self, final: bool = False) -> None:
        """Delete what discard() put aside: at the end of the run (final), or between
        scenarios only when the work directory's file system runs short of space."""
        trash = self.work / "trash"
        if not trash.exists() or self.keep:
            return
        if not final:
            free = shutil.disk_usage(self.work).free
            if free >= TRASH_KEEP_FREE_BYTES:
                return
            self.log(f"  only {free / (1 << 30):.1f} GiB free: deleting the finished runs' files now; on ext4 without a "
                     "journal, files created in the next minutes cost more (see TRASH_KEEP_FREE_BYTES)")
        shutil.rmtree(trash, ignore_errors=True)

    def by_label(self, label: str) -> Tool | None:
        for t in self.tools:
            if t.label == label:
                return t
        return None


# On ext4 without a journal (as on these machines' work disks) an inode is not reused for
# 60 s after its deletion, or for 360 s while its inode-table block is dirty, which it
# stays while anything creates files nearby (fs/ext4/ialloc.c, RECENTCY_MIN and
# RECENTCY_DIRTY): allocating a new inode walks past every recently deleted one in its
# group, a buffer-cache lookup each. Deleting a scenario's few thousand files made every
# file the next scenario's agents created cost that walk, whichever tool it was: about a
# tenth of replicator's CPU in scenario 2 (perf: __ext4_new_inode -> find_inode_bit ->
# recently_deleted, 4 % of its samples, with find_get_block_common and
# ext4_get_group_desc). So finished runs' directories are kept until the end of the run
# (several GiB for a full run), unless the file system has less free space than
# this.
TRASH_KEEP_FREE_BYTES = 25 << 30


def shorten_config(text: str, keep: int = 2) -> str:
    """A config with many `dbs:` entries, shortened to its first `keep` entries and a
    comment saying how many more of the same form there are."""
    lines = text.rstrip("\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("  - path:")]
    if len(starts) <= keep + 1:
        return text
    rest = len(starts) - keep
    return "\n".join(lines[: starts[keep]] + [f"  # ... {rest} more entries of the same form, one per database"]) + "\n"


@dataclass
class Section:
    number: int
    title: str
    method: str
    tables: list[str] = field(default_factory=list)
    targets: list[TargetRow] = field(default_factory=list)
    raw: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def rotate(xs: list, i: int) -> list:
    if not xs:
        return xs
    k = i % len(xs)
    return xs[k:] + xs[:k]


def slug(label: str) -> str:
    return label.replace(" @", "-").replace("/", "_").replace(" ", "_")


def variants(ctx: Ctx) -> list[Tool]:
    """Every tool at its defaults, and each Litestream also at the extra intervals."""
    out: list[Tool] = []
    for t in ctx.tools:
        if t.is_litestream:
            for iv in ctx.intervals:
                v = t.with_interval(iv)
                v.bin = t.bin  # type: ignore[attr-defined]
                out.append(v)
        else:
            out.append(t)
    return out


def start_agent(ctx: Ctx, tool: Tool, dbs: list[Path], replicas: list[Path], d: Path, *, group: int = 0, ready_timeout=60):
    agent = tool.start(dbs, replicas, d, group=group)
    ctx.note_cmd(f"replicate: {tool.label}" + (f" ({len(dbs)} dbs)" if len(dbs) > 1 else ""), agent.proc.cmdline, agent.config)
    try:
        H.wait_ready(replicas, ready_timeout)
    except TimeoutError:
        procs.kill(agent.proc)
        raise RuntimeError(f"{tool.label}: replica never appeared; agent log:\n{tail(agent.log)}") from None
    if agent.proc.poll() is not None:
        raise RuntimeError(f"{tool.label}: agent exited {agent.proc.returncode}; log:\n{tail(agent.log)}")
    return agent


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def restore(ctx: Ctx, tool: Tool, replica: Path, out: Path, log: Path, timeout: float = 600) -> dict:
    H.rm(out)
    cmd = tool.restore_cmd(replica, out)
    ctx.note_cmd(f"restore: {tool.name}", cmd)
    return procs.run_measured(cmd, log=log, timeout=timeout)


def read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def best_litestream(results: dict[str, float | None], labels: list[str], higher_is_better=False) -> tuple[float | None, str]:
    vals = [(results.get(lab), lab) for lab in labels if results.get(lab) is not None]
    if not vals:
        return None, ""
    v, lab = (max if higher_is_better else min)(vals, key=lambda x: x[0])
    return v, lab


# ---- 1. data-loss window at node loss ---------------------------------------------------


def s1_once(ctx: Ctx, tool: Tool, i: int, kill_after: float) -> dict:
    d = ctx.work / "s1" / f"{slug(tool.label)}-{i}"
    db, rep = d / "db.sqlite", d / "replica"
    H.init_db(db)
    agent = start_agent(ctx, tool, [db], [rep], d)
    w = None
    try:
        time.sleep(0.5)
        cmd = writer_cmd(db, rate=200, seed=1000 + i)
        ctx.note_cmd("writer: scenario 1", cmd)
        # the writer joins the agent's process group: one killpg() kills both at once
        w = procs.spawn(cmd, group=agent.pid, log=d / "writer.log")
        time.sleep(kill_after)
        os.killpg(agent.pid, signal.SIGKILL)
        procs.wait(w, 10)
        procs.wait(agent.proc, 10)
    finally:
        procs.kill(agent.proc)
        if w is not None:
            procs.kill(w)
    out = d / "restored.db"
    r = restore(ctx, tool, rep, out, d / "restore.log", timeout=120)
    src = H.rows(db)
    rec = {"tool": tool.label, "run": i, "kill_after_s": round(kill_after, 3), "source_rows": len(src),
           "restore_rc": r["rc"], "restore_s": r["seconds"]}
    restored = None
    if r["rc"] == 0 and out.exists():
        try:
            rec["integrity"] = H.integrity(out)
            restored = H.rows(out)
        except Exception as e:  # a corrupt restore is a finding, not a crash
            rec["integrity"] = f"error: {e}"
    rec["restored_rows"] = None if restored is None else len(restored)
    rec["prefix"] = restored is not None and restored == src[: len(restored)]
    rec["intact"] = bool(r["rc"] == 0 and rec.get("integrity") == "ok" and rec["prefix"])
    if src and restored is not None:
        last_src = src[-1][1]
        last_rest = restored[-1][1] if restored else src[0][1]  # nothing restored: everything lost
        rec["window_s"] = max(0.0, last_src - last_rest)
    else:
        rec["window_s"] = None
    if not rec["intact"]:
        rec["log_tail"] = tail(d / "restore.log", 5)
    ctx.discard(d)
    return rec


def scenario1(ctx: Ctx) -> Section:
    sec = Section(
        1,
        "Data-loss window at node loss",
        "A writer process commits 200 tx/s of ~1 KiB rows (each row stores `time.time()` taken inside its "
        "transaction, just before COMMIT). At a random moment (uniform in "
        f"{'1–2.5' if ctx.quick else '2–6'} s after the writer starts; the same moments for every tool) the writer "
        "and the agent, which share one process group, are SIGKILLed with one `killpg()`. The replica is then "
        "restored with the tool's own restore command. The window is the commit time of the last row in the "
        "source database (file + WAL; a process kill loses nothing the OS has) minus that of the last restored "
        "row. *Intact* means the restore exits 0, `PRAGMA integrity_check` is `ok` and the restored rows "
        "(id, ts, payload) are a prefix of the source's. Runs are interleaved: run *i* goes through all tools "
        "in an order rotated by *i*. p90 is linearly interpolated between ranks.",
    )
    tools = variants(ctx)
    rng = random.Random(ctx.seed)
    lo, hi = (1.0, 2.5) if ctx.quick else (2.0, 6.0)
    kill_after = [rng.uniform(lo, hi) for _ in range(ctx.runs)]
    for i in range(ctx.runs):
        for tool in rotate(tools, i):
            rec = s1_once(ctx, tool, i, kill_after[i])
            ctx.log(f"  s1 run {i} {tool.label}: window {fmt(rec['window_s'] and rec['window_s'] * 1000, 'ms')}"
                    f" intact={rec['intact']} rows {rec['restored_rows']}/{rec['source_rows']}")
            sec.raw.append(rec)
    rows = []
    p90s: dict[str, float | None] = {}
    maxs: dict[str, float | None] = {}
    for tool in tools:
        recs = [r for r in sec.raw if r["tool"] == tool.label]
        ws = [r["window_s"] for r in recs]
        intact = sum(1 for r in recs if r["intact"])
        p90s[tool.label] = p90(ws)
        maxs[tool.label] = maximum(ws)
        rows.append([tool.label, f"{intact}/{len(recs)}", fmt(_ms(median(ws)), "ms"), fmt(_ms(p90(ws)), "ms"),
                     fmt(_ms(maximum(ws)), "ms"), fmt(median(r["restore_s"] for r in recs), "s")])
    sec.tables.append(md_table(["tool", "intact restores", "median window", "p90 window", "max window", "median restore time"], rows))
    rep_recs = [r for r in sec.raw if r["tool"] == "replicator"]
    if rep_recs:
        ls_default = [t.label for t in ctx.tools if t.is_litestream]
        ls_fast = [t.label for t in tools if t.is_litestream]
        b, lab = best_litestream(p90s, ls_default)
        sec.targets.append(TargetRow("p90 window (vs Litestream at defaults)", p90s["replicator"],
                                     Target("p90", "<=", 0.025, "ms", 1000), b, lab))
        b, lab = best_litestream(p90s, ls_fast)
        sec.targets.append(TargetRow("p90 window (vs Litestream at any interval)", p90s["replicator"],
                                     Target("p90", "<=", 0.025, "ms", 1000), b, lab))
        b, lab = best_litestream(maxs, ls_default)
        sec.targets.append(TargetRow("max window", maxs["replicator"], Target("max", "<=", 0.050, "ms", 1000), b, lab))
        frac = {lab: sum(1 for r in sec.raw if r["tool"] == lab and r["intact"]) / max(1, sum(1 for r in sec.raw if r["tool"] == lab))
                for lab in [t.label for t in tools]}
        b, lab = best_litestream(frac, ls_fast, higher_is_better=True)
        sec.targets.append(TargetRow("restores intact", frac["replicator"], Target("intact", ">=", 1.0, "%", 100), b, lab))
    return sec


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


# ---- 2. agent CPU at a steady 1,000 tx/s ------------------------------------------------


def s2_once(ctx: Ctx, tool: Tool, i: int) -> dict:
    d = ctx.work / "s2" / f"{slug(tool.label)}-{i}"
    db, rep = d / "db.sqlite", d / "replica"
    H.init_db(db)
    warm, measure = (1.5, 3.0) if ctx.quick else (5.0, 15.0)
    agent = start_agent(ctx, tool, [db], [rep], d)
    w = None
    try:
        time.sleep(0.5)
        stats = d / "writer.json"
        cmd = writer_cmd(db, rate=1000, stats=stats, seed=2000 + i)
        ctx.note_cmd("writer: scenario 2", cmd)
        w = procs.spawn(cmd, log=d / "writer.log")
        time.sleep(warm)
        c0, t0 = procs.cpu_seconds(agent.pid), time.monotonic()
        time.sleep(measure)
        c1, t1 = procs.cpu_seconds(agent.pid), time.monotonic()
        rss = procs.rss_bytes(agent.pid)
        procs.stop(w, 20)
        ws = read_stats(stats)
        alive = agent.proc.poll() is None
    finally:
        procs.stop(agent.proc, 30)
        if w is not None:
            procs.kill(w)
    rec = {"tool": tool.label, "rep": i, "cpu_pct": (c1 - c0) / (t1 - t0) * 100, "seconds": t1 - t0,
           "writer_rate": ws.get("rate"), "rss_mib": rss / MiB, "agent_alive": alive}
    ctx.discard(d)
    return rec


def scenario2(ctx: Ctx) -> Section:
    warm, measure = (1.5, 3.0) if ctx.quick else (5.0, 15.0)
    sec = Section(
        2,
        "Agent CPU at a steady 1,000 tx/s",
        f"The writer commits 1,000 tx/s of ~1 KiB rows (absolute schedule). After {warm:g} s of warm-up, the agent's "
        f"CPU time (utime+stime from /proc/PID/stat, of the agent and any child process) is read twice, "
        f"{measure:g} s apart; the figure is CPU seconds per wall second, in % of one core. "
        f"{ctx.reps} repetition(s), interleaved (tools in an order rotated per repetition); medians.",
    )
    tools = variants(ctx)
    for i in range(ctx.reps):
        for tool in rotate(tools, i):
            rec = s2_once(ctx, tool, i)
            ctx.log(f"  s2 rep {i} {tool.label}: cpu {rec['cpu_pct']:.1f}% writer {rec['writer_rate']:.0f} tx/s")
            sec.raw.append(rec)
    med: dict[str, float | None] = {}
    rows = []
    for tool in tools:
        recs = [r for r in sec.raw if r["tool"] == tool.label]
        med[tool.label] = median(r["cpu_pct"] for r in recs)
        rows.append([tool.label, fmt(med[tool.label], "%"), fmt(median(r["writer_rate"] for r in recs), "tx/s"),
                     fmt(median(r["rss_mib"] for r in recs), "MiB")])
    sec.tables.append(md_table(["tool", "agent CPU (median)", "writer rate achieved", "agent RSS"], rows))
    if "replicator" in med:
        target = Target("cpu", "<=", 10.0, "%")
        b, lab = best_litestream(med, [t.label for t in ctx.tools if t.is_litestream])
        sec.targets.append(TargetRow("agent CPU at 1,000 tx/s (vs Litestream at defaults)", med["replicator"], target, b, lab))
        fast = [t.label for t in tools if t.is_litestream and t.interval is not None and t.interval <= 0.01]
        if fast:
            b, lab = best_litestream(med, fast)
            sec.targets.append(TargetRow("agent CPU at 1,000 tx/s (vs Litestream at 10 ms)", med["replicator"], target, b, lab))
    return sec


# ---- 3 and 4. writer throughput while replicating; agent cost ---------------------------


def s3_once(ctx: Ctx, tool: Tool | None, i: int, check_restore: bool) -> dict:
    label = tool.label if tool else "none (no agent)"
    d = ctx.work / "s3" / f"{slug(tool.label) if tool else 'none'}-{i}"
    db, rep = d / "db.sqlite", d / "replica"
    H.init_db(db)
    duration = 3.0 if ctx.quick else 15.0
    agent = start_agent(ctx, tool, [db], [rep], d) if tool else None
    w = None
    rec: dict = {"tool": label, "rep": i}
    try:
        if agent:
            time.sleep(0.5)
        stats = d / "writer.json"
        cmd = writer_cmd(db, rate=0, duration=duration, stats=stats, seed=3000 + i)
        ctx.note_cmd("writer: scenario 3", cmd)
        wal = Path(str(db) + "-wal")
        probes = {"wal": lambda: procs.file_size(wal)}
        if agent:
            probes["rss"] = lambda: procs.rss_bytes(agent.pid)
        c0 = procs.cpu_seconds(agent.pid) if agent else 0.0
        t0 = time.monotonic()
        with procs.Sampler(probes, 0.02) as sampler:
            w = procs.spawn(cmd, log=d / "writer.log")
            if procs.wait(w, duration + 120) is None:
                raise RuntimeError(f"writer did not finish; log:\n{tail(d / 'writer.log')}")
            if agent:
                rec["drain_s"] = procs.wait_idle(agent.pid, timeout=300)
        t1 = time.monotonic()
        ws = read_stats(stats)
        if not ws:
            raise RuntimeError(f"writer wrote no stats; log:\n{tail(d / 'writer.log')}")
        rec.update({"tx_s": ws["rate"], "commits": ws["commits"], "wal_written_mib": ws["wal_bytes"] / MiB,
                    "peak_wal_mib": sampler.max["wal"] / MiB, "max_commit_s": ws["lat_max"], "p99_commit_s": ws["lat_p99"]})
        if agent:
            c1 = procs.cpu_seconds(agent.pid)
            rec["agent_cpu_s"] = c1 - c0
            rec["agent_wall_s"] = t1 - t0
            rec["cpu_s_per_mib"] = (c1 - c0) / (ws["wal_bytes"] / MiB) if ws["wal_bytes"] else None
            rec["peak_rss_mib"] = max(sampler.max["rss"], procs.hwm_bytes(agent.pid)) / MiB
            rec["agent_alive"] = agent.proc.poll() is None
    finally:
        if agent:
            procs.stop(agent.proc, 60)
        if w is not None:
            procs.kill(w)
    if agent and check_restore:
        out = d / "restored.db"
        r = restore(ctx, tool, rep, out, d / "restore.log", timeout=900)
        if r["rc"] == 0:
            n, mx, _ = H.count_and_max(out)
            rec["restored_rows"] = n
            rec["all_shipped"] = n == rec["commits"]
        else:
            rec["restored_rows"] = None
            rec["all_shipped"] = False
            rec["log_tail"] = tail(d / "restore.log", 5)
        H.rm(out)
    ctx.discard(d)
    return rec


def scenario3_4(ctx: Ctx, want3: bool, want4: bool) -> list[Section]:
    duration = 3.0 if ctx.quick else 15.0
    method3 = (
        f"The writer commits as fast as it can for {duration:g} s (one ~1 KiB row per transaction, "
        "`synchronous=NORMAL`, `busy_timeout` 10 s), once with no agent and once with each tool at its "
        "defaults, interleaved per repetition (order rotated). The ratio is tx/s with the agent over tx/s without, "
        "of the same repetition; the figure is the median of those ratios. The peak WAL size is the largest "
        "size of the `-wal` file sampled every 20 ms; the worst commit latency is the slowest "
        "`BEGIN IMMEDIATE`..`COMMIT` (lock waits included). The writer checkpoints like SQLite's "
        "autocheckpoint (PASSIVE at 1000 frames)."
    )
    method4 = (
        "Same runs as scenario 3. Agent CPU seconds are counted from just before the writer starts until the agent "
        "is idle again after the writer stops (below 5 % of a core over two consecutive 0.5 s windows), so work the "
        "agent does to catch up is included. *MiB of WAL shipped* is defined identically for every tool as the WAL "
        "bytes the writer produced: the sum over commits of the frames each commit appended (from "
        "`sqlite3_wal_hook`: growth of the frame count since the previous commit, or the whole count after a WAL "
        "restart) times the page size. Peak RSS is the maximum of the agent's VmHWM and its process tree's RSS "
        "sampled every 20 ms. In the first repetition the replica is restored afterwards and its row count "
        "compared with the rows committed, to confirm everything was shipped."
    )
    s3 = Section(3, "Writer throughput while replicating", method3)
    s4 = Section(4, "Agent cost under the maximum write rate", method4)
    raw: list[dict] = []
    configs: list[Tool | None] = [None, *ctx.tools]
    for i in range(ctx.reps):
        for tool in rotate(configs, i):
            rec = s3_once(ctx, tool, i, check_restore=(i == 0))
            ctx.log(f"  s3 rep {i} {rec['tool']}: {rec['tx_s']:.0f} tx/s, peak WAL {rec['peak_wal_mib']:.0f} MiB, "
                    f"worst commit {rec['max_commit_s'] * 1000:.1f} ms"
                    + (f", cpu {rec['agent_cpu_s']:.1f}s = {rec['cpu_s_per_mib']:.4f} s/MiB, rss {rec['peak_rss_mib']:.0f} MiB"
                       f", drain {rec['drain_s']:.1f}s" if tool else ""))
            raw.append(rec)
    base = {r["rep"]: r["tx_s"] for r in raw if r["tool"].startswith("none")}
    for r in raw:
        r["ratio_vs_none"] = ratio(r["tx_s"], base.get(r["rep"]))
    s3.raw = raw
    s4.notes.append("The raw per-run figures of this scenario are those of scenario 3 (same runs), in its appendix.")
    s3.notes.append("The writer checkpoints itself (PASSIVE at 1000 frames, as SQLite's autocheckpoint). An agent that keeps a "
                    "read transaction open stops those checkpoints from copying pages back and from restarting the WAL, so the "
                    "writer does less I/O while the WAL grows: a ratio above 1 is possible and comes with a large peak WAL.")
    labels = ["none (no agent)"] + [t.label for t in ctx.tools]
    rows3, rows4 = [], []
    agg: dict[str, dict[str, float | None]] = {}
    for lab in labels:
        recs = [r for r in raw if r["tool"] == lab]
        a = agg[lab] = {
            "tx_s": median(r["tx_s"] for r in recs),
            "ratio": median(r["ratio_vs_none"] for r in recs),
            "peak_wal": maximum(r["peak_wal_mib"] for r in recs),
            "peak_wal_med": median(r["peak_wal_mib"] for r in recs),
            "max_commit": maximum(r["max_commit_s"] for r in recs),
            "p99_commit": median(r["p99_commit_s"] for r in recs),
            "cpu_per_mib": median(r.get("cpu_s_per_mib") for r in recs),
            "cpu_s": median(r.get("agent_cpu_s") for r in recs),
            "wal_mib": median(r["wal_written_mib"] for r in recs),
            "rss": maximum(r.get("peak_rss_mib") for r in recs),
            "drain": median(r.get("drain_s") for r in recs),
        }
        shipped = [r.get("all_shipped") for r in recs if "all_shipped" in r]
        rows3.append([lab, fmt(a["tx_s"], "tx/s"), fmt(a["ratio"], "", 2), fmt(a["peak_wal_med"], "MiB"), fmt(a["peak_wal"], "MiB"),
                      fmt(_ms(a["max_commit"]), "ms"), fmt(_ms(a["p99_commit"]), "ms")])
        if lab != labels[0]:
            rows4.append([lab, fmt(a["cpu_s"], "s"), fmt(a["wal_mib"], "MiB"), fmt(a["cpu_per_mib"], "s/MiB", 4), fmt(a["rss"], "MiB"),
                          fmt(a["drain"], "s"), ("yes" if all(shipped) else "NO") if shipped else "–"])
    s3.tables.append(md_table(["tool", "writer tx/s (median)", "ratio vs no agent (median)", "peak WAL (median)", "peak WAL (max)",
                               "worst commit (max)", "p99 commit (median)"], rows3))
    s4.tables.append(md_table(["tool", "agent CPU (median)", "WAL written (median)", "CPU per MiB of WAL (median)", "peak RSS (max)",
                               "time to idle after the writer stopped", "restore has every row"], rows4))
    ls = [t.label for t in ctx.tools if t.is_litestream]
    if "replicator" in agg:
        a = agg["replicator"]
        b, lab = best_litestream({k: v["ratio"] for k, v in agg.items()}, ls, higher_is_better=True)
        s3.targets.append(TargetRow("writer throughput ratio (with / without agent)", a["ratio"], Target("ratio", ">=", 0.7, ""), b, lab))
        b, lab = best_litestream({k: v["peak_wal"] for k, v in agg.items()}, ls)
        s3.targets.append(TargetRow("peak WAL size", a["peak_wal"], Target("wal", "", None, "MiB"), b, lab))
        b, lab = best_litestream({k: v["max_commit"] for k, v in agg.items()}, ls)
        s3.targets.append(TargetRow("worst commit latency", a["max_commit"], Target("lat", "", None, "ms", 1000), b, lab))
        b, lab = best_litestream({k: v["cpu_per_mib"] for k, v in agg.items()}, ls)
        s4.targets.append(TargetRow("agent CPU seconds per MiB of WAL", a["cpu_per_mib"],
                                    Target("cpu/MiB", "<=", None if b is None else 1.5 * b, "s/MiB", note="1.5 × best Litestream"), b, lab))
        b, lab = best_litestream({k: v["rss"] for k, v in agg.items()}, ls)
        s4.targets.append(TargetRow("agent peak RSS (this scenario)", a["rss"], Target("rss", "<=", 100.0, "MiB"), b, lab))
        if "replicator" in ctx.s5_agent_rss:
            b, lab = best_litestream(ctx.s5_agent_rss, ls)
            s4.targets.append(TargetRow("agent peak RSS replicating the 256 MiB database (scenario 5)", ctx.s5_agent_rss["replicator"],
                                        Target("rss", "<=", 100.0, "MiB"), b, lab))
    out = []
    if want3:
        out.append(s3)
    if want4:
        out.append(s4)
    return out


# ---- 5 and 6. restore of a 256 MiB database; storage ------------------------------------


def scenario5_6(ctx: Ctx, want5: bool, want6: bool) -> list[Section]:
    size_mib = 32 if ctx.quick else 256
    tail_tx = 200 if ctx.quick else 2000
    base_dir = ctx.work / "s5"
    base = base_dir / "base.sqlite"
    H.build_big_db(base, size_mib * MiB, log=ctx.log)
    per_tool: dict[str, dict] = {}
    raw: list[dict] = []
    for tool in ctx.tools:
        d = base_dir / slug(tool.label)
        d.mkdir(parents=True)
        db, rep = d / "db.sqlite", d / "replica"
        shutil.copyfile(base, db)
        info: dict = {"tool": tool.label}
        t0 = time.time()
        agent = start_agent(ctx, tool, [db], [rep], d, ready_timeout=300)
        try:
            with procs.Sampler({"rss": lambda pid=agent.pid: procs.rss_bytes(pid)}, 0.05) as sampler:
                H.wait_quiescent(rep, stable=3.0, timeout=600)
                info["initial_sync_s"] = time.time() - t0
                cmd = writer_cmd(db, count=tail_tx, seed=5000)
                ctx.note_cmd("writer: scenario 5 tail", cmd)
                w = procs.spawn(cmd, log=d / "writer.log")
                if procs.wait(w, 600) != 0:
                    raise RuntimeError(f"tail writer failed:\n{tail(d / 'writer.log')}")
                H.wait_quiescent(rep, stable=3.0, timeout=600)
            info["agent_peak_rss_mib"] = max(sampler.max["rss"], procs.hwm_bytes(agent.pid)) / MiB
        finally:
            procs.stop(agent.proc, 60)
        info["replica_bytes"], info["objects"] = H.storage(rep)
        ref = d / "ref.sqlite"
        H.checkpointed_copy(db, ref)
        info["db_bytes"] = H.db_bytes(ref)
        info["source_rows"], info["source_max"], _ = H.count_and_max(ref)
        info["bytes_per_db_byte"] = info["replica_bytes"] / info["db_bytes"]
        per_tool[tool.label] = info
        ctx.log(f"  s5 {tool.label}: initial sync {info['initial_sync_s']:.1f}s, replica {info['replica_bytes'] / MiB:.1f} MiB "
                f"in {info['objects']} objects ({info['bytes_per_db_byte']:.3f} B/B), agent peak RSS {info['agent_peak_rss_mib']:.0f} MiB")
        ctx.s5_agent_rss[tool.label] = info["agent_peak_rss_mib"]
    # restores, interleaved with cp + fsync of the reference database
    ref0 = base_dir / slug(ctx.tools[0].label) / "ref.sqlite"
    entries: list[str] = ["cp+fsync", *[t.label for t in ctx.tools]]
    for i in range(ctx.restore_reps):
        for lab in rotate(entries, i):
            out = base_dir / "out.sqlite"
            H.rm(out)
            # no dirty data left from what ran before (the setup's copies, the last restore)
            # for the disk to write back while this one is timed
            os.sync()
            if lab == "cp+fsync":
                cmd = ["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(ref0), str(out)]
                ctx.note_cmd("baseline: cp + fsync", cmd)
                r = procs.run_measured(cmd, timeout=600)
                rec = {"tool": lab, "rep": i, "seconds": r["seconds"], "rc": r["rc"], "maxrss_mib": None}
            else:
                tool = next(t for t in ctx.tools if t.label == lab)
                d = base_dir / slug(lab)
                r = restore(ctx, tool, d / "replica", out, d / f"restore-{i}.log", timeout=900)
                rec = {"tool": lab, "rep": i, "seconds": r["seconds"], "rc": r["rc"], "maxrss_mib": (r["maxrss"] or 0) / MiB}
                if r["rc"] == 0:
                    if i == 0:
                        rec["integrity"] = H.integrity(out)
                    n, mx, _ = H.count_and_max(out)
                    info = per_tool[lab]
                    rec["complete"] = (n, mx) == (info["source_rows"], info["source_max"])
                else:
                    rec["complete"] = False
                    rec["log_tail"] = tail(d / f"restore-{i}.log", 5)
            ctx.log(f"  s5 rep {i} {lab}: {fmt(rec['seconds'], 's')}" + (f", rss {rec['maxrss_mib']:.0f} MiB, complete={rec.get('complete')}"
                                                                       if rec["maxrss_mib"] is not None else ""))
            raw.append(rec)
            H.rm(out)
    ctx.discard(base_dir)

    size_s = f"{size_mib} MiB"
    s5 = Section(
        5,
        f"Restore of a {size_s} database plus a tail of {tail_tx:,} transactions",
        f"A {size_s} database (1 KiB rows, alternately random bytes and text-like compressible bytes) is copied in "
        "place; the agent starts on it (its initial snapshot), then the writer commits "
        f"{tail_tx:,} one-row transactions as fast as it can; once the replica directory has not changed for 3 s the "
        "agent is stopped (SIGTERM). The restore command of each tool is then timed (wall clock, process start to "
        "exit, so replicator's verification and Python start-up are included), interleaved with `cp` + `sync` of "
        "a checkpointed copy of the same database, "
        f"{ctx.restore_reps} repetition(s), medians; each timed command starts after a `sync`, so no dirty data from "
        "what ran before is written back during it. Page cache is warm for both (the replica files and the source were "
        "just written). Restore peak RSS is `ru_maxrss` from `wait4()`. Every restore is checked for row count and last "
        "row (and, in the first repetition, `integrity_check`).",
    )
    s6 = Section(
        6,
        "Storage after scenario 5",
        "Replica bytes (sum of file sizes under the replica directory, temporary files excluded) divided by the "
        "database's logical size (page_count × page_size), and the number of objects (files), measured after the agent "
        "of scenario 5 was stopped. Each tool keeps its default retention and compaction settings.",
    )
    s5.raw = raw
    s6.raw = [dict(v) for v in per_tool.values()]
    s6.notes.append("Measured a few seconds after the tail was shipped. Litestream 0.5 keeps level-0 LTX files for 5 minutes "
                    "(`l0-retention`) besides the compacted levels and the snapshot, and 0.3 keeps WAL segments until retention "
                    "(24h); replicator keeps its snapshot and segments until retention (24h). A later measurement can differ "
                    "for Litestream 0.5 once level-0 files expire.")
    med_t = {lab: median(r["seconds"] for r in raw if r["tool"] == lab) for lab in entries}
    med_rss = {lab: maximum(r["maxrss_mib"] for r in raw if r["tool"] == lab) for lab in entries[1:]}
    cp = med_t["cp+fsync"]
    rows5 = [["cp + fsync", fmt(cp, "s"), "1.00x", "–", "–"]]
    for lab in entries[1:]:
        ok = all(r.get("complete") for r in raw if r["tool"] == lab)
        rows5.append([lab, fmt(med_t[lab], "s"), fmt(ratio(med_t[lab], cp), "x", 2), fmt(med_rss[lab], "MiB"), "yes" if ok else "NO"])
    s5.tables.append(md_table(["restore", "time (median)", "vs cp+fsync", "peak RSS", "complete (every row)"], rows5))
    rows6 = [[lab, fmt(v["db_bytes"] / MiB, "MiB"), fmt(v["replica_bytes"] / MiB, "MiB"), fmt(v["bytes_per_db_byte"], "", 3), str(v["objects"]),
              fmt(v["initial_sync_s"], "s")] for lab, v in per_tool.items()]
    s6.tables.append(md_table(["tool", "database", "replica", "replica bytes per database byte", "objects", "initial sync time"], rows6))
    ls = [t.label for t in ctx.tools if t.is_litestream]
    if "replicator" in med_t:
        s5.targets.append(TargetRow("restore time vs cp+fsync", ratio(med_t["replicator"], cp), Target("x", "<=", 1.5, "x"),
                                    *best_litestream({k: ratio(v, cp) for k, v in med_t.items()}, ls)))
        b, lab = best_litestream(med_t, ls)
        s5.targets.append(TargetRow("restore time", med_t["replicator"], Target("t", "<", b, "s", note="faster than the best Litestream"), b, lab))
        b, lab = best_litestream(med_rss, ls)
        s5.targets.append(TargetRow("restore peak RSS", med_rss["replicator"], Target("rss", "", None, "MiB"), b, lab))
        bpb = {k: v["bytes_per_db_byte"] for k, v in per_tool.items()}
        b, lab = best_litestream(bpb, ls)
        s6.targets.append(TargetRow("replica bytes per database byte", bpb["replicator"],
                                    Target("bpb", "<=", None if b is None else 0.9 * b, "", note="0.9 × best Litestream"), b, lab))
        objs = {k: float(v["objects"]) for k, v in per_tool.items()}
        b, lab = best_litestream(objs, ls)
        s6.targets.append(TargetRow("object count", objs["replicator"], Target("n", "", None, "", digits=0), b, lab))
    out = []
    if want5:
        out.append(s5)
    if want6:
        out.append(s6)
    return out


# ---- 7. idle cost -----------------------------------------------------------------------


def s7_once(ctx: Ctx, tool: Tool, n: int) -> dict:
    d = ctx.work / "s7" / f"{slug(tool.label)}-{n}"
    dbs = [d / "dbs" / f"db{k:03d}.sqlite" for k in range(n)]
    reps = [d / "replicas" / f"db{k:03d}" for k in range(n)]
    for db in dbs:
        H.init_db(db)
        c = H.connect(db)
        c.execute("BEGIN")
        for _ in range(10):
            c.execute("INSERT INTO t (ts, v) VALUES (?, ?)", (time.time(), os.urandom(512)))
        c.execute("COMMIT")
        c.close()
    settle, measure = (1.0, 3.0) if ctx.quick else (5.0, 30.0)
    agent = start_agent(ctx, tool, dbs, reps, d, ready_timeout=300)
    try:
        time.sleep(settle)
        c0, t0 = procs.cpu_seconds(agent.pid), time.monotonic()
        busy, churn = procs.idle_cpu_seconds(agent.pid, measure)
        c1, t1 = procs.cpu_seconds(agent.pid), time.monotonic()
        rec = {"tool": tool.label, "dbs": n, "cpu_pct": busy / (t1 - t0) * 100, "cpu_pct_ticks": (c1 - c0) / (t1 - t0) * 100,
               "thread_churn": churn, "rss_mib": procs.rss_bytes(agent.pid) / MiB,
               "fds": procs.fd_count(agent.pid), "threads": procs.threads(agent.pid), "seconds": t1 - t0}
    finally:
        procs.stop(agent.proc, 60)
    ctx.discard(d)
    return rec


def scenario7(ctx: Ctx) -> Section:
    counts = [1, 20] if ctx.quick else [1, 200]
    settle, measure = (1.0, 3.0) if ctx.quick else (5.0, 30.0)
    sec = Section(
        7,
        "Idle cost",
        f"{' and '.join(map(str, counts))} small databases (10 rows each), no writes. Each tool replicates all of them from "
        "one process (Litestream: a config file with one `dbs:` entry per database; replicator: the ad hoc command for "
        "one database, a config file with one `dbs:` entry per database otherwise), each database with its own file "
        "replica. After every replica "
        f"directory holds a file and {settle:g} s more, CPU is measured over {measure:g} s (% of one "
        "core: the on-CPU nanoseconds of every thread of the agent's process tree, from /proc/PID/task/TID/schedstat, "
        "read every 0.1 s so that threads born or ended in the window count; utime+stime count 10 ms clock ticks, "
        "too coarse for an idle agent); RSS (sum of VmRSS over the tree), open fds (/proc/PID/fd) and threads are read "
        "at the end. One measurement per tool and size.",
    )
    for n in counts:
        for tool in rotate(list(ctx.tools), n):
            rec = s7_once(ctx, tool, n)
            ctx.log(f"  s7 {n} dbs {tool.label}: cpu {rec['cpu_pct']:.3f}% (ticks {rec['cpu_pct_ticks']:.3f}%, threads came or went {rec['thread_churn']}) rss {rec['rss_mib']:.0f} MiB fds {rec['fds']} threads {rec['threads']}")
            sec.raw.append(rec)
    rows = [[r["tool"], str(r["dbs"]), fmt(r["cpu_pct"], "%", 2), fmt(r["rss_mib"], "MiB"), str(r["fds"]), str(r["threads"])] for r in sec.raw]
    sec.tables.append(md_table(["tool", "databases", "CPU", "RSS", "open fds", "threads"], rows))
    ref = "litestream-0.5.17"
    for n in counts:
        by = {r["tool"]: r for r in sec.raw if r["dbs"] == n}
        if "replicator" not in by:
            continue
        rr = by["replicator"]
        lr = by.get(ref)
        for key, what, unit, digits in (("cpu_pct", "CPU", "%", 2), ("rss_mib", "RSS", "MiB", None), ("fds", "open fds", "", 0)):
            lim = None if lr is None else lr[key]
            sec.targets.append(TargetRow(f"{what}, {n} idle database{'s' if n > 1 else ''}", rr[key],
                                         Target(key, "<", lim, unit, note=f"below {ref}", digits=digits), lim, ref if lr else ""))
    return sec


# ---- 8. catch-up --------------------------------------------------------------------------


def s8_once(ctx: Ctx, tool: Tool, i: int) -> dict:
    d = ctx.work / "s8" / f"{slug(tool.label)}-{i}"
    db, rep = d / "db.sqlite", d / "replica"
    H.init_db(db)
    outage, watch = (3.0, 5.0) if ctx.quick else (10.0, 10.0)
    agent = start_agent(ctx, tool, [db], [rep], d)
    w = None
    agent2 = None
    watcher = H.ReplicaWatcher(rep, d / "pool")
    try:
        time.sleep(0.5)
        cmd = writer_cmd(db, rate=500, seed=8000 + i)
        ctx.note_cmd("writer: scenario 8", cmd)
        w = procs.spawn(cmd, log=d / "writer.log")
        time.sleep(2.0)
        procs.stop(agent.proc, 60)
        time.sleep(outage)
        target = H.max_id(db)
        watcher.start()
        t0 = time.time()
        agent2 = tool.start([db], [rep], d)
        time.sleep(watch)
        watcher.stop()
        procs.stop(agent2.proc, 60)
        procs.stop(w, 20)
    finally:
        watcher._stop.set()
        if agent2 is not None:
            procs.kill(agent2.proc)
        procs.kill(agent.proc)
        if w is not None:
            procs.kill(w)
    states = [(k, t) for k, (t, _) in enumerate(watcher.states) if t >= t0 or k == 0]
    cache: dict[int, int] = {}

    def has_target(k: int) -> bool:
        if k not in cache:
            src = watcher.materialise(k, d / "probe")
            out = d / "probe.db"
            r = restore(ctx, tool, src, out, d / "probe-restore.log", timeout=300)
            cache[k] = H.max_id(out) if r["rc"] == 0 else -1
            H.rm(out)
        return cache[k] >= target

    rec = {"tool": tool.label, "rep": i, "target_row": target, "states": len(watcher.states), "rewritten_files": watcher.rewritten}
    idx = [k for k, _ in states]
    if not idx or not has_target(idx[-1]):
        rec["catchup_s"] = None
        rec["note"] = f"target row not on the replica within {watch:g} s"
    else:
        lo, hi = 0, len(idx) - 1  # invariant: idx[hi] has it; find the first that does
        if has_target(idx[0]):
            hi = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if has_target(idx[mid]):
                hi = mid
            else:
                lo = mid
        rec["catchup_s"] = max(0.0, watcher.states[idx[hi]][0] - t0)
        rec["restores_probed"] = len(cache)
    ctx.discard(d)
    return rec


def scenario8(ctx: Ctx) -> Section:
    outage, watch = (3.0, 5.0) if ctx.quick else (10.0, 10.0)
    sec = Section(
        8,
        "Catch-up after the agent was stopped",
        f"The writer commits 500 tx/s; the agent runs for 2 s, is stopped (SIGTERM) for {outage:g} s while the writer "
        "goes on, and is started again; the writer keeps writing. The target is the last row committed just before "
        "the restart. Method, the same for every tool: a watcher thread lists the replica directory every 10 ms and "
        "hard-links each new object into a pool as it appears (all three tools write objects under a temporary name "
        "and rename them, and never modify them), so the replica as it was at each observed instant can be rebuilt "
        "afterwards. A binary search over those states, each restored with the tool's own restore command, finds "
        "the first state whose restore contains the target row; the catch-up time is when that state was observed "
        f"minus the restart time (resolution ≈ 10 ms plus one directory listing). {ctx.reps} repetition(s), "
        "interleaved; medians.",
    )
    for i in range(ctx.reps):
        for tool in rotate(list(ctx.tools), i):
            rec = s8_once(ctx, tool, i)
            ctx.log(f"  s8 rep {i} {tool.label}: catch-up {fmt(rec['catchup_s'], 's')} (target row {rec['target_row']}, "
                    f"{rec['states']} states, {rec.get('restores_probed', 0)} restores, rewritten {rec['rewritten_files']})")
            sec.raw.append(rec)
    med: dict[str, float | None] = {}
    rows = []
    for tool in ctx.tools:
        recs = [r for r in sec.raw if r["tool"] == tool.label]
        med[tool.label] = median(r["catchup_s"] for r in recs)
        missing = sum(1 for r in recs if r["catchup_s"] is None)
        rows.append([tool.label, fmt(med[tool.label], "s"), fmt(maximum(r["catchup_s"] for r in recs), "s"),
                     f"{missing}" if missing else "0"])
    sec.tables.append(md_table(["tool", "catch-up (median)", "catch-up (max)", f"runs not caught up within {watch:g} s"], rows))
    if "replicator" in med:
        b, lab = best_litestream(med, [t.label for t in ctx.tools if t.is_litestream])
        sec.targets.append(TargetRow("catch-up time", med["replicator"], Target("t", "<=", 0.5, "s"), b, lab))
    return sec
