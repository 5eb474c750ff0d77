"""Progress of long work: the pure formatting, the throttling (a fake clock, no sleeps), the
shipper's catch-up, and end to end: `replicator restore` and `replicator replicate` on a
pseudo-terminal show progress, and print none to a pipe or with JSON logs."""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from harness import (
    ROOT,
    AgentProcess,
    cli,
    env,
    has_snapshot,
    integrity,
    wait_for,
    write,
)

from replicator import progress
from replicator.progress import (
    GiB,
    KiB,
    MiB,
    Progress,
    eta_of,
    format_duration,
    format_eta,
    format_pair,
    format_rate,
    format_size,
    progress_line,
    rate_of,
    summary_line,
)


class Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- formatting -------------------------------------------------------------------------------
def test_sizes_are_mib_then_gib():
    assert format_size(0) == "0.0 MiB"
    assert format_size(int(120.5 * MiB)) == "120.5 MiB"
    assert format_size(1023 * MiB) == "1023.0 MiB"
    assert format_size(GiB) == "1.00 GiB"
    assert format_size(int(2.5 * GiB)) == "2.50 GiB"


def test_pairs_use_the_unit_of_the_larger():
    assert format_pair(int(120.5 * MiB), 256 * MiB) == "120.5/256.0 MiB"
    assert format_pair(512 * MiB, 2 * GiB) == "0.50/2.00 GiB"
    assert format_pair(3 * MiB, None) == "3.0 MiB"


def test_rates():
    assert format_rate(85.3 * MiB) == "85.3 MiB/s"
    assert format_rate(512 * KiB) == "512 KiB/s"
    assert format_rate(1.2 * GiB) == "1.20 GiB/s"
    assert format_rate(None) == "- MiB/s"
    assert rate_of(100 * MiB, 2.0) == 50 * MiB
    assert rate_of(100, 0.0) is None


def test_durations_and_etas():
    assert format_duration(0.84) == "0.8s"
    assert format_duration(12.4) == "12s"
    assert format_duration(65) == "1m05s"
    assert format_duration(2 * 3600 + 3 * 60 + 10) == "2h03m"
    assert format_eta(1.2) == "2s"  # rounded up: never promises too early
    assert format_eta(0) == "0s"
    assert format_eta(125) == "2m05s"
    assert format_eta(None) == "--"
    assert eta_of(50, 100, 25.0) == 2.0
    assert eta_of(100, 100, 0.0) == 0.0
    assert eta_of(50, None, 25.0) is None
    assert eta_of(50, 100, None) is None


def test_lines():
    elapsed = 120.5 / 85.3
    assert progress_line("restoring app.db", 120.5 * MiB, 256 * MiB, elapsed) == "restoring app.db  120.5/256.0 MiB  85.3 MiB/s  ETA 2s"
    assert (
        progress_line("snapshot of /data/app.db", 120.5 * MiB, 256 * MiB, elapsed, lines=True)
        == "snapshot of /data/app.db: 120.5/256.0 MiB, 85.3 MiB/s, ETA 2s"
    )
    assert progress_line("x", 3 * MiB, None, 1.0) == "x  3.0 MiB  3.0 MiB/s"
    assert progress_line("x", 0, 10 * MiB, 0.0) == "x  0.0/10.0 MiB  - MiB/s  ETA --"
    assert summary_line("restored app.db", 256 * MiB, 256 * MiB, 3.0) == "restored app.db  256.0 MiB in 3.0s  85.3 MiB/s"
    assert summary_line("snap", 256 * MiB, 256 * MiB, 3.0, lines=True) == "snap: 256.0 MiB in 3.0s, 85.3 MiB/s"
    assert summary_line("restoring app.db", 100 * MiB, 256 * MiB, 3.0, ok=False) == "restoring app.db  100.0/256.0 MiB stopped after 3.0s"


# -- the reporter -----------------------------------------------------------------------------
def test_bar_redraws_at_most_ten_times_a_second_and_ends_with_a_summary():
    clock, out = Clock(), Tty()
    p = Progress("restoring app.db", 100 * MiB, out, clock=clock, final_label="restored app.db")
    p.advance(MiB)  # the first advance draws at once
    assert out.getvalue() == "\rrestoring app.db  1.0/100.0 MiB  - MiB/s  ETA --"
    for _ in range(99):  # 99 MiB in 99 steps of 10 ms: about 10 redraws, not 99
        clock.t += 0.01
        p.advance(MiB)
    draws = out.getvalue().count("\r")
    assert 9 <= draws <= 11, draws
    assert "\n" not in out.getvalue()
    clock.t += 0.01
    p.close()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    assert text.split("\r")[-1].rstrip(" \n") == "restored app.db  100.0 MiB in 1.0s  100.0 MiB/s"
    p.close()  # once
    p.advance(MiB)
    assert out.getvalue() == text


def test_bar_blanks_what_a_longer_line_left():
    clock, out = Clock(), Tty()
    p = Progress("x", None, out, clock=clock)
    clock.t += 0.5
    p.update(900 * MiB)
    clock.t += 99.5
    p.update(901 * MiB)
    first, second = out.getvalue().split("\r")[1:]
    assert first == "x  900.0 MiB  1.76 GiB/s"
    assert second == "x  901.0 MiB  9.0 MiB/s "  # one blank over the longer line's last character


def test_bar_shows_the_eta_from_the_average_rate():
    clock, out = Clock(), Tty()
    p = Progress("restoring app.db", 256 * MiB, out, clock=clock)
    clock.t += 0.5
    p.update(128 * MiB)
    assert out.getvalue() == "\rrestoring app.db  128.0/256.0 MiB  256.0 MiB/s  ETA 1s"


def test_not_a_terminal_or_disabled_prints_nothing():
    for p in (
        Progress("x", 10 * MiB, io.StringIO(), clock=Clock()),
        Progress("x", 10 * MiB, Tty(), enabled=False, clock=Clock()),
        Progress("x", 10 * MiB, Tty(), lines=True, enabled=False, clock=Clock()),
    ):
        assert not p.enabled
        p.advance(5 * MiB)
        p.update(10 * MiB)
        p.close()
        assert p.stream.getvalue() == ""
        assert p.done == 10 * MiB  # still counts
    null = Progress.null()
    null.advance(1)
    null.close()
    assert not null.enabled


def test_failure_ends_the_line_with_where_it_stopped():
    clock, out = Clock(), Tty()
    with pytest.raises(RuntimeError), Progress("restoring app.db", 10 * MiB, out, clock=clock, final_label="restored app.db") as p:
        p.advance(4 * MiB)
        clock.t += 2
        raise RuntimeError("boom")
    assert out.getvalue().endswith("\rrestoring app.db  4.0/10.0 MiB stopped after 2.0s\n")


def test_plain_lines_every_two_seconds_without_carriage_returns():
    clock, out = Clock(), Tty()
    p = Progress("snapshot of /data/app.db", 100 * MiB, out, lines=True, clock=clock, min_bytes=32 * MiB, min_seconds=1.0)
    for _ in range(50):  # 5 s at 2 MiB per 100 ms
        clock.t += 0.1
        p.advance(2 * MiB)
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and out.getvalue().endswith("\n")
    assert lines == [
        "snapshot of /data/app.db: 40.0/100.0 MiB, 20.0 MiB/s, ETA 3s",
        "snapshot of /data/app.db: 80.0/100.0 MiB, 20.0 MiB/s, ETA 1s",
        "snapshot of /data/app.db: 100.0 MiB in 5.0s, 20.0 MiB/s",
    ]


def test_plain_lines_stay_quiet_for_small_quick_work():
    clock, out = Clock(), Tty()
    p = Progress("snapshot", 8 * MiB, out, lines=True, clock=clock, min_bytes=32 * MiB, min_seconds=1.0)
    clock.t += 0.5
    p.advance(8 * MiB)
    p.close()
    assert out.getvalue() == ""
    # large but quick: a summary only
    p = Progress("snapshot", 40 * MiB, out, lines=True, clock=clock, min_bytes=32 * MiB, min_seconds=1.0)
    clock.t += 0.5
    p.advance(40 * MiB)
    p.close()
    assert out.getvalue() == "snapshot: 40.0 MiB in 0.5s, 80.0 MiB/s\n"
    # small but slow: a summary too
    out = Tty()
    p = Progress("snapshot", 8 * MiB, out, lines=True, clock=clock, min_bytes=32 * MiB, min_seconds=1.0)
    clock.t += 1.5
    p.advance(8 * MiB)
    p.close()
    assert out.getvalue() == "snapshot: 8.0 MiB in 1.5s, 5.3 MiB/s\n"


def test_console_is_off_unless_enabled(monkeypatch):
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(progress, "_console", False)
    p = progress.console("snapshot", 64 * MiB)
    p.advance(64 * MiB)
    p.close()
    assert not p.enabled and tty.getvalue() == ""
    progress.enable_console(True)
    p = progress.console("snapshot", 64 * MiB)
    assert p.enabled and p.lines
    p.advance(64 * MiB)
    p.close()
    assert tty.getvalue().startswith("snapshot: 64.0 MiB in ")


# -- the shipper's catch-up -------------------------------------------------------------------
def test_shipper_shows_a_catch_up_after_a_failure(tmp_path, monkeypatch):
    from replicas import Transient, open_driver
    from replicator import keys, logs
    from replicator.shadow import ShadowLog
    from replicator.shipper import Pending, ReplicaShipper

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(progress, "_console", True)

    class Flaky:
        def __init__(self, inner):
            self.inner, self.down, self.sent = inner, True, []

        def put(self, key, data, **kw):
            if self.down:
                raise Transient("replica down")
            self.sent.append(kw.get("progress") is not None)
            return self.inner.put(key, data, **kw)

    shadow = ShadowLog(tmp_path / "shadow")
    gen = keys.new_generation_id(time.time())
    items = []
    for i in range(6):
        key = keys.segment_key(gen, i + 1, i + 1, 1000 + i) if i else keys.snapshot_key(gen, 0, 1000)
        path = shadow.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(MiB))
        items.append(Pending(keys.parse_key(key), time.time(), MiB))
    driver = Flaky(open_driver(f"mem://catch-up-{os.getpid()}-{time.monotonic_ns()}"))
    s = ReplicaShipper("r", driver, shadow, retention=3600, retention_check_interval=3600, log=logs.get(), db="app.db")
    s.pending.extend(items)
    assert not s.upload(items[0])  # the replica is down
    driver.down = False
    for item in items:
        assert s.upload(item)
    assert not s.pending
    # every upload reports its progress (the catch-up line and the upload failpoint use it)
    assert driver.sent == [True] * 6
    out = tty.getvalue()
    assert "\r" not in out
    assert re.search(r"^catch-up of app\.db to r: 6\.0 MiB in [\d.]+m?s, ", out, re.MULTILINE), out
    # a small backlog is no catch-up
    tty.truncate(0)
    tty.seek(0)
    driver.down = True
    more = items[:2]
    s.pending.extend(more)
    assert not s.upload(more[0])
    driver.down = False
    for item in more:
        assert s.upload(item)
    assert tty.getvalue() == ""


# -- restore, end to end ----------------------------------------------------------------------
def _pty_run(cmd: list[str], *, timeout: float = 120, until=None) -> tuple[int, str, str]:
    """Run cmd with stderr on a pseudo-terminal (stdout a pipe); returns (exit code, what
    the terminal got, stdout). With until, SIGTERM the process once until(terminal text)."""
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # no "\n" -> "\r\n": a "\r" in the output is the program's
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env(), cwd=ROOT)
    os.close(slave)
    got = bytearray()
    deadline = time.monotonic() + timeout
    signalled = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    if proc.poll() is not None:
                        break
                    continue
                got += chunk
            elif proc.poll() is not None:
                break
            if until is not None and not signalled and until(got.decode(errors="replace")):
                proc.send_signal(signal.SIGTERM)
                signalled = True
        else:
            raise AssertionError(f"{cmd} did not finish in {timeout}s; terminal so far:\n{got.decode(errors='replace')}")
        code = proc.wait(timeout=30)
        stdout = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        os.close(master)
    return code, got.decode(errors="replace"), stdout


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    """A file replica of a database of a few MiB (less compressible rows, so the stored
    snapshot has a few MiB too)."""
    tmp = tmp_path_factory.mktemp("progress")
    db, rep = tmp / "app.db", tmp / "replica"
    write(db, [["schema"], ["big", 5], ["insert", 200, 2000]])
    with AgentProcess(str(db), f"file://{rep}", log=tmp / "agent.log") as agent:
        wait_for(lambda: has_snapshot(rep), what="first snapshot")
        write(db, [["insert", 50, 2000]], lib="apsw")
        assert agent.stop() == 0
    return rep


def test_restore_counts_the_bytes_it_fetches(replica, tmp_path):
    from replicas import open_driver
    from replicator.restore import (
        list_artefacts,
        list_artefacts_with_sizes,
        planned_bytes,
        restore,
    )
    from replicator.restore_plan import RestoreTarget, plan_restore

    d = open_driver(f"file://{replica}")
    listing, sizes = list_artefacts_with_sizes(d)
    assert listing == list_artefacts(d)
    assert set(sizes) == {k.key for k in listing} and all(v > 0 for v in sizes.values())
    p = plan_restore(listing, RestoreTarget())
    assert p.segments
    reads: list[int] = []
    restore(d, tmp_path / "out.db", restore_plan=p, on_read=reads.append)
    assert len(reads) > 2 and sum(reads) == planned_bytes(p, sizes) > 2 * MiB


def test_restore_on_a_terminal_shows_progress(replica, tmp_path):
    out = tmp_path / "restored.db"
    code, term, stdout = _pty_run([sys.executable, "-m", "replicator", "restore", "-o", str(out), f"file://{replica}"])
    assert code == 0, term
    assert integrity(out) == "ok"
    assert stdout == ""
    # the bar: redrawn with "\r", bytes in MiB against the planned total, rate and ETA
    assert re.search(r"\rrestoring restored\.db  [\d.]+/[\d.]+ MiB  (- MiB/s|[\d.]+ [KMG]iB/s)  ETA (--|\d+s)", term), term
    # the summary: the total and the elapsed time, and a newline, before the log line
    m = re.search(r"\rrestored restored\.db  ([\d.]+) MiB in [\d.]+s  (- MiB/s|[\d.]+ [KMG]iB/s) *\n", term)
    assert m, term
    assert float(m.group(1)) > 2.0
    # a plain text log line (not garbled by the bar) follows
    assert "\n" in term and any("restored" in line and "txid" in line for line in term[m.end():].splitlines())


def test_restore_to_a_pipe_or_with_json_logs_shows_no_progress(replica, tmp_path):
    for fmt in (None, "text", "json"):
        out = tmp_path / f"restored-{fmt}.db"
        extra = ["--log-format", fmt] if fmt else []
        p = cli("restore", *extra, "-o", str(out), f"file://{replica}", check=True)
        assert "restoring" not in p.stderr and "MiB" not in p.stderr and "\r" not in p.stderr, p.stderr
        assert "restored" in p.stderr  # the usual log line is still there
    # on a terminal, but with JSON logs: only JSON lines
    out = tmp_path / "restored-json-tty.db"
    code, term, _ = _pty_run([sys.executable, "-m", "replicator", "restore", "--log-format", "json", "-o", str(out), f"file://{replica}"])
    assert code == 0, term
    assert "\r" not in term and "MiB" not in term
    events = [json.loads(line)["event"] for line in term.splitlines() if line.strip()]
    assert "restored" in events
    # --dry-run prints the plan and no progress, on a terminal too
    code, term, stdout = _pty_run([sys.executable, "-m", "replicator", "restore", "--dry-run", "-o", str(tmp_path / "dry.db"), f"file://{replica}"])
    assert code == 0 and "snapshot:" in stdout
    assert "\r" not in term and "MiB" not in term


# -- the agent, end to end --------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_template(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("progress-big") / "big.db"
    write(db, [["schema"], ["fill", 40, 8]])
    assert db.stat().st_size > 36 * MiB
    return db


@pytest.fixture
def big_db(big_template, tmp_path) -> Path:
    """A fresh copy of a database of about 40 MiB (no shadow directory yet)."""
    db = tmp_path / "big.db"
    shutil.copyfile(big_template, db)
    return db


def test_agent_on_a_terminal_shows_the_snapshot_progress(big_db, tmp_path):
    rep = tmp_path / "replica"
    cmd = [sys.executable, "-m", "replicator", "replicate", str(big_db), f"file://{rep}"]
    code, term, _ = _pty_run(cmd, until=lambda t: "replicating" in t and has_snapshot(rep))
    assert code == 0, term
    assert "\r" not in term  # plain lines: the log lines are not garbled
    m = re.search(rf"^snapshot of {re.escape(str(big_db))}: ([\d.]+) MiB in [\d.]+m?s, [\d.]+ [KMG]iB/s$", term, re.MULTILINE)
    assert m, term
    assert float(m.group(1)) > 36
    assert "generation started" in term  # the log lines are still there


def test_agent_to_a_pipe_shows_no_progress(big_db, tmp_path):
    rep = tmp_path / "replica"
    log = tmp_path / "agent.log"
    with AgentProcess(str(big_db), f"file://{rep}", log=log) as agent:
        wait_for(lambda: has_snapshot(rep), what="first snapshot")
        assert agent.stop() == 0
    text = log.read_text()
    assert "generation started" in text
    assert "snapshot of" not in text and "MiB" not in text
    assert all(json.loads(line) for line in text.splitlines() if line.strip())
