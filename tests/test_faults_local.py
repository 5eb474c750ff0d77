"""Local faults, end to end with the real agent, a real writer and real restores: the shadow
directory on a full filesystem, permission errors, the database deleted or replaced while
it is replicated, journal_mode switched away from WAL and back, and the wall clock stepping
backwards.

What each fault must give: a clear error (the agent keeps running), nothing corrupt, a new
generation where continuity is lost, and recovery without operator help once the cause
is gone; a restore then equals the source (integrity_check, rows, pages).

How the faults are made (the tests run as root on CI):

- A full filesystem is a 2 MiB tmpfs mounted on the shadow directory, filled with a
  ballast file (removed to free the space). Without the right to mount, these tests skip.
- Root ignores permission bits, so "not writable" is `chattr +i` on the directories (as
  root; `chmod 500` otherwise): no file can be created in them, as for a non-root agent
  whose directories are mode 500.
- A slow disk: the app is a small apsw program whose VFS sleeps 50 ms in every fsync of
  the -wal (SQLite's default synchronous=FULL).
- The clock: libfaketime from Debian (0.9.10) cannot run CPython 3.11 (with a faked
  CLOCK_MONOTONIC, Event.wait hangs; with FAKETIME_DONT_FAKE_MONOTONIC, time.sleep fails
  with EINVAL), so the agent's wall clock is shifted in Python: a sitecustomize module
  (written by the test, put first on the agent's PYTHONPATH) wraps time.time/time.time_ns
  with an offset read from a file, which the test changes while the agent runs. Every wall
  clock read of the agent goes through time.time (commit times, key times, generation ids,
  the data-loss window); time.monotonic (intervals) is left alone, as a real step leaves it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import (
    ROOT,
    AgentProcess,
    assert_same_pages,
    checkpoint,
    cli,
    has_snapshot,
    integrity,
    rows,
    start_writer,
    wait_for,
    write,
)

MiB = 1 << 20

pytestmark = pytest.mark.timeout(300)


# --- helpers ------------------------------------------------------------------------------------


from harness import free_port as _free_port, http_get as _get  # noqa: E402


class Metrics:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def value(self, name: str, **labels) -> float | None:
        code, text = _get(self.base + "/metrics")
        assert code == 200, text
        want = set(labels.items())
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            if want <= set(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")):
                return float(m.group(3))
        return None

    def caught_up(self, *replicas: str) -> bool:
        """Every replica holds what capture has, twice 1.2 s apart: the app's last commit may
        reach capture only at its next poll (monitor-interval, 1 s; see
        test_commit_on_a_slow_fsync_is_captured_at_once)."""

        def once() -> float | None:
            local = self.value("replicator_local_txid")
            if local is None or local < 0:
                return None
            for r in replicas:
                if self.value("replicator_replica_txid", replica=r) != local:
                    return None
                if self.value("replicator_data_loss_window_seconds", replica=r) != 0:
                    return None
            return local

        first = once()
        if first is None:
            return False
        time.sleep(1.2)
        return once() == first


def _events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _named(log: Path, event: str) -> list[dict]:
    return [e for e in _events(log) if e.get("event") == event]


def _config(tmp: Path, db: Path, replicas: dict[str, Path], *, port: int | None = None, shadow: Path | None = None, extra: str = "") -> Path:
    cfg = tmp / "r.yml"
    lines = []
    if port is not None:
        lines += [f"metrics-addr: 127.0.0.1:{port}", "data-loss-window-threshold: 1s"]
    lines += ["dbs:", f"  - path: {db}"]
    if shadow is not None:
        lines.append(f"    shadow-dir: {shadow}")
    lines.append("    replicas:")
    for name, path in replicas.items():
        lines += [f"      - name: {name}", f"        url: file://{path}"]
    cfg.write_text("\n".join(lines) + "\n" + extra)
    return cfg


def _restore(out: Path, replica: Path, *args: str) -> subprocess.CompletedProcess:
    return cli("restore", "-o", str(out), *args, f"file://{replica}", timeout=120)


def _restore_equals_source(tmp: Path, replica: Path, db: Path, name: str = "restored.db") -> Path:
    out = tmp / name
    p = _restore(out, replica)
    assert p.returncode == 0, p.stderr
    checkpoint(db)
    assert integrity(out) == "ok"
    assert rows(out) == rows(db)
    assert_same_pages(out, db)
    return out


@contextmanager
def tmpfs(path: Path, size: str):
    """A size-capped tmpfs mounted on path (skip when this machine does not let us mount)."""
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({p.stderr.strip()}): the full-filesystem tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _free_bytes(fs: Path) -> int:
    st = os.statvfs(fs)
    return st.f_bavail * st.f_frsize


def fill(fs: Path, leave: int = 0) -> Path:
    """A ballast file that takes every free byte of the filesystem but `leave` (page-aligned)."""
    ballast = fs / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (b"\1" * 65536, b"\1" * 4096):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as e:
                assert e.errno == 28, e
        if leave:
            os.ftruncate(fd, os.fstat(fd).st_size - leave)
    finally:
        os.close(fd)
    assert _free_bytes(fs) == leave, f"free: {_free_bytes(fs)}"
    return ballast


def _chattr(flag: str, paths: list[Path]) -> None:
    p = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        pytest.skip(f"chattr {flag} is not supported here: {p.stderr.strip()}")


def _dirs(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]


def lock_dirs(root: Path) -> list[Path]:
    """No file can be created in root or below (existing files stay writable)."""
    dirs = _dirs(root)
    if os.geteuid() == 0:  # root ignores mode bits
        _chattr("+i", dirs)
    else:
        for d in dirs:
            d.chmod(0o500)
    return dirs


def unlock_dirs(dirs: list[Path]) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", *map(str, dirs)], capture_output=True, check=False)
    else:
        for d in dirs:
            d.chmod(0o700)


def _page_count(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute("PRAGMA page_count").fetchone()[0]
    finally:
        conn.close()


# --- the shadow directory on a full filesystem ------------------------------------------------------


@pytest.fixture(scope="module")
def full_shadow(tmp_path_factory) -> dict:
    """The shadow directory's filesystem (a 2 MiB tmpfs) fills up while the app writes
    (100 commits of 2 KB over 5 s), then the ballast is removed. Records what happened."""
    tmp = tmp_path_factory.mktemp("full-shadow")
    db, replica, log = tmp / "app.db", tmp / "replica", tmp / "agent.log"
    seen: dict = {}
    with tmpfs(tmp / "shadow", "2m") as shadow:
        port = _free_port()
        m = Metrics(port)
        cfg = _config(tmp, db, {"local": replica}, port=port, shadow=shadow)
        write(db, [["schema"], ["insert", 20, 100]])
        with AgentProcess("-c", str(cfg), log=log) as agent:
            wait_for(lambda: has_snapshot(replica), what="the first snapshot")
            wait_for(lambda: m.value("replicator_shadow_bytes") == 0, what="the shadow log to empty")
            errors_before = m.value("replicator_capture_errors_total") or 0
            ballast = fill(shadow)
            writer = start_writer(db, [["insert_rate", 100, 2000, 20]])
            wait_for(lambda: _named(log, "capture failed; will retry"), timeout=20, what="the capture error")
            assert writer.wait(60) == 0
            seen["alive_while_full"] = agent.proc.poll() is None
            seen["capture_failing"] = m.value("replicator_capture_failing")
            seen["readyz"] = _get(m.base + "/readyz")[0]
            # meanwhile the replica still restores what it had, intact
            during = tmp / "during.db"
            p = _restore(during, replica)
            seen["restore_during"] = (p.returncode, p.stderr, integrity(during) if p.returncode == 0 else None)
            seen["errors_while_full"] = (m.value("replicator_capture_errors_total") or 0) - errors_before
            ballast.unlink()
            freed = time.monotonic()
            wait_for(lambda: _named(log, "capture recovered"), timeout=30, what="capture to recover")
            seen["recovered_after"] = time.monotonic() - freed
            write(db, [["insert", 10, 100]])
            wait_for(lambda: m.caught_up("local"), timeout=30, what="the replica to catch up")
            seen["stop"] = agent.stop()
    seen["restored"] = _restore_equals_source(tmp, replica, db)
    seen["shadow"] = shadow
    seen["log"] = log
    return seen


def test_full_shadow_filesystem_recovers_without_help(full_shadow):
    seen = full_shadow
    assert seen["alive_while_full"], "the agent died on a full shadow filesystem"
    assert seen["capture_failing"] == 1  # /metrics says so
    assert seen["readyz"] == 503  # and readiness
    code, stderr, verdict = seen["restore_during"]
    assert code == 0 and verdict == "ok", stderr
    [failed] = _named(seen["log"], "capture failed; will retry")  # said once, not at every retry
    assert "No space left on device" in failed["error"]
    assert seen["recovered_after"] < 10  # the retry backoff tops out at 5 s
    assert seen["stop"] == 0
    # continuity was lost while capture could not write: a new generation, with a reason
    started = _named(seen["log"], "generation started")
    assert len(started) >= 2 and all(e.get("reason") for e in started)


def test_full_shadow_filesystem_retries_with_backoff(full_shadow):
    # ~6 s full while the app commits 20 times a second; a backoff of 0.1 s doubling to 5 s
    # allows about 7 attempts
    assert full_shadow["errors_while_full"] <= 15, f"{full_shadow['errors_while_full']:.0f} capture attempts"
    assert len(_named(full_shadow["log"], "resumed")) <= 3


# --- the shadow directory not writable --------------------------------------------------------------


@pytest.fixture(scope="module")
def locked_shadow(tmp_path_factory) -> dict:
    """No file can be created in the shadow directory (every directory of it chattr +i)
    while the app writes; then it is writable again."""
    tmp = tmp_path_factory.mktemp("locked-shadow")
    db, replica, log = tmp / "app.db", tmp / "replica", tmp / "agent.log"
    shadow = tmp / ".app.db-replicator"
    seen: dict = {}
    port = _free_port()
    m = Metrics(port)
    cfg = _config(tmp, db, {"local": replica}, port=port)
    write(db, [["schema"], ["insert", 20, 100]])
    with AgentProcess("-c", str(cfg), log=log) as agent:
        wait_for(lambda: has_snapshot(replica), what="the first snapshot")
        wait_for(lambda: m.value("replicator_shadow_bytes") == 0, what="the shadow log to empty")
        locked = lock_dirs(shadow)
        try:
            write(db, [["insert_rate", 40, 500, 20]])
            wait_for(lambda: _named(log, "capture failed; will retry"), timeout=20, what="the capture error")
            time.sleep(1)
            seen["alive_while_locked"] = agent.proc.poll() is None
            seen["capture_failing"] = m.value("replicator_capture_failing")
        finally:
            unlock_dirs(locked)
        wait_for(lambda: _named(log, "capture recovered"), timeout=30, what="capture to recover")
        write(db, [["insert", 10, 100]])
        wait_for(lambda: m.caught_up("local"), timeout=30, what="the replica to catch up")
        seen["stop"] = agent.stop()
    seen["restored"] = _restore_equals_source(tmp, replica, db)
    seen["shadow"] = shadow
    seen["log"] = log
    return seen


def test_unwritable_shadow_directory_recovers_without_help(locked_shadow):
    seen = locked_shadow
    assert seen["alive_while_locked"]
    assert seen["capture_failing"] == 1
    failed = _named(seen["log"], "capture failed; will retry")[0]
    assert "Operation not permitted" in failed["error"] or "Permission denied" in failed["error"]
    assert str(seen["shadow"]) in failed["error"]  # where
    assert seen["stop"] == 0


def test_unwritable_shadow_directory_is_reported_once(locked_shadow):
    failed = _named(locked_shadow["log"], "capture failed; will retry")
    assert len(failed) <= 8, f"{len(failed)} 'capture failed' lines in about 3 s"


def test_full_shadow_filesystem_error_names_the_directory(full_shadow):
    failed = _named(full_shadow["log"], "capture failed; will retry")[0]
    assert str(full_shadow["shadow"]) in failed["error"], failed["error"]


def test_full_shadow_filesystem_when_the_page_hash_table_must_grow(tmp_path):
    db, replica, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "agent.log"
    with tmpfs(tmp_path / "shadow", "2m") as shadow:
        port = _free_port()
        m = Metrics(port)
        cfg = _config(tmp_path, db, {"local": replica}, port=port, shadow=shadow)
        write(db, [["schema"], ["fill", 5, 1]])  # ~1290 pages: the table's hashes end in its 3rd 4 KiB page
        assert _page_count(db) < 1529
        with AgentProcess("-c", str(cfg), log=log) as agent:
            wait_for(lambda: has_snapshot(replica), what="the first snapshot")
            wait_for(lambda: m.value("replicator_shadow_bytes") == 0, what="the shadow log to empty")
            ballast = fill(shadow, leave=4096)  # room for one small segment, nothing more
            write(db, [["fill", 1, 1]])  # one compressible transaction of ~256 pages
            assert _page_count(db) >= 1529  # its hashes need a 4th page of the table
            time.sleep(2)
            assert agent.proc.poll() is None, f"the agent died (exit {agent.proc.returncode})"
            ballast.unlink()
            write(db, [["insert", 5, 100]])
            wait_for(lambda: m.caught_up("local"), timeout=30, what="the replica to catch up")
            assert agent.stop() == 0
    _restore_equals_source(tmp_path, replica, db)


# --- a replica directory not writable ---------------------------------------------------------------


@pytest.fixture(scope="module")
def locked_replica(tmp_path_factory) -> dict:
    """Two file replicas; no file can be created in one of them (chattr +i on its
    directories) while the app writes 40 commits; then it is writable again."""
    tmp = tmp_path_factory.mktemp("locked-replica")
    db, good, locked, log = tmp / "app.db", tmp / "good", tmp / "locked", tmp / "agent.log"
    seen: dict = {"log": log, "locked": locked}
    port = _free_port()
    m = Metrics(port)
    cfg = _config(tmp, db, {"good": good, "locked": locked}, port=port)
    write(db, [["schema"], ["insert", 20, 100]])
    with AgentProcess("-c", str(cfg), log=log) as agent:
        wait_for(lambda: has_snapshot(good) and has_snapshot(locked), what="both replicas")
        dirs = lock_dirs(locked)
        try:
            failures_before = m.value("replicator_upload_failures_total", replica="locked") or 0
            before = m.value("replicator_replica_txid", replica="good")
            locked_at = time.monotonic()
            write(db, [["insert_rate", 40, 500, 20]])
            wait_for(lambda: _named(log, "upload failed; will retry"), timeout=20, what="the upload error")
            wait_for(lambda: m.value("replicator_data_loss_window_seconds", replica="locked") > 1, timeout=10,
                     what="the locked replica's window to pass the threshold")
            seen["failing"] = m.value("replicator_replica_failing", replica="locked")
            # the other replica has it all
            wait_for(lambda: m.value("replicator_replica_txid", replica="good") >= before + 40, timeout=5,
                     what="the good replica to have every commit")
            seen["good_window"] = m.value("replicator_data_loss_window_seconds", replica="good")
            seen["failures_while_locked"] = (m.value("replicator_upload_failures_total", replica="locked") or 0) - failures_before
            seen["locked_seconds"] = time.monotonic() - locked_at
        finally:
            unlock_dirs(dirs)
        write(db, [["insert", 5, 100]])
        wait_for(lambda: m.caught_up("good", "locked"), timeout=60, what="the locked replica to catch up")
        seen["stop"] = agent.stop()
    seen["recovered"] = bool(_named(log, "replica recovered"))
    for replica in (good, locked):
        _restore_equals_source(tmp, replica, db, f"{replica.name}.db")
    return seen


def test_unwritable_replica_directory_fails_clearly_and_recovers(locked_replica):
    seen = locked_replica
    failed = [e for e in _named(seen["log"], "upload failed; will retry") if e.get("replica") == "locked"]
    assert len(failed) == 1  # said once
    assert str(seen["locked"]) in failed[0]["error"]  # which replica, and where
    assert "ermission" in failed[0]["error"] or "not permitted" in failed[0]["error"], failed[0]["error"]
    assert seen["failing"] == 1
    assert seen["good_window"] < 1
    assert seen["recovered"] and seen["stop"] == 0


def test_unwritable_replica_is_retried_with_backoff(locked_replica):
    # backoff from 0.2 s doubling (with jitter 0.5..1): about 5 attempts in 3 s
    assert locked_replica["failures_while_locked"] <= 10, (
        f"{locked_replica['failures_while_locked']:.0f} failed uploads in {locked_replica['locked_seconds']:.1f} s"
    )


# --- the database deleted or replaced while it is replicated ------------------------------------------


def _replicating(tmp_path: Path) -> tuple[Path, Path, Path, Metrics, AgentProcess]:
    """A database of ~60 pages replicated to a file replica, caught up."""
    db, replica, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "agent.log"
    port = _free_port()
    m = Metrics(port)
    cfg = _config(tmp_path, db, {"local": replica}, port=port)
    write(db, [["schema"], ["insert", 200, 1000]])
    agent = AgentProcess("-c", str(cfg), log=log).start()
    wait_for(lambda: has_snapshot(replica), what="the first snapshot")
    write(db, [["insert", 20, 1000]])
    wait_for(lambda: m.caught_up("local"), timeout=30, what="the replica to catch up")
    return db, replica, log, m, agent


def _no_mix_and_same_as_source(tmp_path, db, replica, log, agent, generations_before: int, new_sizes: set[int]) -> None:
    """After the database was swapped under the agent: a new generation (with a reason), no
    generation on the replica mixes the old database (rows of 1000 bytes) with the new one
    (rows of new_sizes), and the latest restore is the new database."""
    assert agent.stop() == 0
    started = _named(log, "generation started")
    assert len(started) > generations_before, "no new generation for the new database"
    assert all(e.get("reason") for e in started)
    for g in _generations(replica):
        out = tmp_path / f"gen-{g['generation']}.db"
        p = _restore(out, replica, "--generation", g["generation"])
        assert p.returncode == 0, f"generation {g['generation']} does not restore: {p.stderr}"
        sizes = set(rows(out, "SELECT DISTINCT length(v) FROM t"))
        assert sizes <= {1000} or sizes <= new_sizes, f"generation {g['generation']} mixes the two databases: {sizes}"
    _restore_equals_source(tmp_path, replica, db)  # the new database


def test_database_deleted_and_recreated_by_the_app(tmp_path):
    db, replica, log, _, agent = _replicating(tmp_path)
    try:
        before = len(_named(log, "generation started"))
        for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            p.unlink()
        write(db, [["schema"], ["insert", 30, 300]])  # the app creates it again (and closes)
        # and goes on writing: a few commits, a pause (the agent looks), then more
        w = start_writer(db, [["insert", 5, 300], ["sleep", 2], ["insert_rate", 40, 300, 20]], seed=2)
        assert w.wait(60) == 0
        time.sleep(1.5)
        _no_mix_and_same_as_source(tmp_path, db, replica, log, agent, before, {300})
    finally:
        if agent.proc.poll() is None:
            agent.kill()


def test_database_replaced_by_another_file(tmp_path):
    db, replica, log, _, agent = _replicating(tmp_path)
    try:
        before = len(_named(log, "generation started"))
        other = tmp_path / "other.db"
        write(other, [["schema"], ["insert", 50, 3000]])
        checkpoint(other)
        # the app is stopped; the operator moves another database over it (and its -wal/-shm away)
        os.replace(other, db)
        for p in (Path(f"{db}-wal"), Path(f"{db}-shm")):
            p.unlink(missing_ok=True)
        # the app starts again
        w = start_writer(db, [["insert", 5, 300], ["sleep", 2], ["insert_rate", 40, 300, 20]], seed=3)
        assert w.wait(60) == 0
        time.sleep(1.5)
        _no_mix_and_same_as_source(tmp_path, db, replica, log, agent, before, {3000, 300})
    finally:
        if agent.proc.poll() is None:
            agent.kill()


# --- a slow disk: the app's fsync takes 50 ms ----------------------------------------------------------

_SLOW_SYNC_APP = '''"""The app on a slow disk: SQLite's default synchronous=FULL, and an fsync of the -wal that
takes 50 ms (an apsw VFS over the default one). Commits one row every SPACING seconds and
prints "commit N <unix time after the commit>"."""
import sys, time, apsw

class SlowSyncFile(apsw.VFSFile):
    def __init__(self, base, filename, flags):
        name = filename.filename() if isinstance(filename, apsw.URIFilename) else str(filename)
        self.wal = name.endswith("-wal")
        super().__init__(base, filename, flags)

    def xSync(self, flags):
        if self.wal:
            time.sleep(0.05)
        return super().xSync(flags)

class SlowSyncVFS(apsw.VFS):
    def __init__(self):
        super().__init__("slowsync", "")

    def xOpen(self, name, flags):
        return SlowSyncFile("", name, flags)

vfs = SlowSyncVFS()
conn = apsw.Connection(sys.argv[1], vfs="slowsync")
conn.set_busy_timeout(10000)
conn.execute("PRAGMA journal_mode=WAL")
assert conn.execute("PRAGMA synchronous").fetchall()[0][0] == 2  # FULL
for i in range(int(sys.argv[2])):
    time.sleep(float(sys.argv[3]))
    conn.execute("INSERT INTO t (v, n) VALUES (x'00', ?)", (i,))
    print("commit", i + 1, time.time(), flush=True)
'''


def test_commit_on_a_slow_fsync_is_captured_at_once(tmp_path):
    """An isolated commit (after a quiet spell) is captured within milliseconds, as the docs
    say, also when the app's disk takes 50 ms to fsync (synchronous=FULL is SQLite's
    default). Measured from the end of the commit to the agent's /status txid."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    app = tmp_path / "slow_sync_app.py"
    app.write_text(_SLOW_SYNC_APP)
    port = _free_port()
    cfg = _config(tmp_path, db, {"local": replica}, port=port)
    write(db, [["schema"], ["insert", 5, 100]])
    latencies = []
    with AgentProcess("-c", str(cfg), log=tmp_path / "agent.log") as agent:
        wait_for(lambda: has_snapshot(replica), what="the first snapshot")
        proc = subprocess.Popen([sys.executable, str(app), str(db), "4", "1.5"], stdout=subprocess.PIPE, text=True)
        try:
            def captured() -> int:
                return json.loads(_get(f"http://127.0.0.1:{port}/status")[1])["databases"][0]["txid"]

            for line in proc.stdout:
                _, n, done = line.split()
                wait_for(lambda n=int(n): captured() >= n, timeout=10, interval=0.005, what=f"commit {n}")
                latencies.append(round(time.time() - float(done), 3))
        finally:
            proc.kill()
            proc.wait()
        assert agent.stop() == 0
    assert len(latencies) == 4
    assert max(latencies) < 0.3, f"seconds from commit to capture: {latencies}"


# --- journal_mode switched away from WAL and back ------------------------------------------------------


def test_journal_mode_cannot_leave_wal_while_the_agent_replicates(tmp_path):
    """The agent's read transaction keeps the database in WAL mode: the app's switch to
    DELETE fails (SQLITE_BUSY) and nothing is lost or corrupted."""
    db, replica, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "agent.log"
    write(db, [["schema"], ["insert", 20, 100]])
    with AgentProcess(str(db), f"file://{replica}", log=log) as agent:
        wait_for(lambda: has_snapshot(replica), what="the first snapshot")
        conn = sqlite3.connect(db, timeout=2, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                conn.execute("PRAGMA journal_mode=DELETE").fetchall()
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            for i in range(10):
                conn.execute("INSERT INTO t (v, n) VALUES (x'00', ?)", (1000 + i,))
        finally:
            conn.close()
        write(db, [["insert", 10, 100]])
        time.sleep(1)
        assert agent.stop() == 0
    assert len(_named(log, "generation started")) == 1
    _restore_equals_source(tmp_path, replica, db)


def test_journal_mode_delete_then_wal_again(tmp_path):
    """While the agent is down the app switches to DELETE and writes; the agent starts, says
    clearly that the database is not in WAL mode and waits; the app writes on, switches
    back to WAL; replication resumes with a new generation, and a restore is identical."""
    db, replica, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "agent.log"
    write(db, [["schema"], ["insert", 20, 100]])
    agent = AgentProcess(str(db), f"file://{replica}", log=log)
    with agent:
        wait_for(lambda: has_snapshot(replica), what="the first snapshot")
        write(db, [["insert", 10, 100]])
        time.sleep(0.5)
        assert agent.stop() == 0
    conn = sqlite3.connect(db, timeout=10, isolation_level=None)
    try:
        assert conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
        for i in range(5):
            conn.execute("INSERT INTO t (v, n) VALUES (x'00', ?)", (1000 + i,))
        with agent:
            wait_for(lambda: _named(log, "database unavailable; waiting"), timeout=10, what="the not-WAL warning")
            for i in range(5):  # the app goes on writing in DELETE mode while the agent waits
                conn.execute("INSERT INTO t (v, n) VALUES (x'00', ?)", (1500 + i,))
            time.sleep(1.5)
            assert agent.proc.poll() is None
            assert len(_named(log, "database unavailable; waiting")) == 1  # said once, not at every poll
            assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
            for i in range(5):
                conn.execute("INSERT INTO t (v, n) VALUES (x'00', ?)", (2000 + i,))
            wait_for(lambda: _named(log, "database available"), timeout=10, what="the agent to take it up again")
            for i in range(5):
                conn.execute("INSERT INTO t (v, n) VALUES (x'00', ?)", (3000 + i,))
            time.sleep(1)
            assert agent.stop() == 0
    finally:
        conn.close()
    [waiting] = _named(log, "database unavailable; waiting")
    assert "journal_mode=delete" in waiting["reason"] and "WAL" in waiting["reason"]
    started = _named(log, "generation started")
    assert len(started) == 2 and started[1]["reason"] != "initial"
    out = _restore_equals_source(tmp_path, replica, db)
    assert rows(out)[-20:] == [*range(1000, 1005), *range(1500, 1505), *range(2000, 2005), *range(3000, 3005)]


# --- the wall clock stepping backwards -------------------------------------------------------------------

_CLOCK_SHIM = '''"""Test shim: shift time.time/time.time_ns by the seconds in $FAULT_CLOCK_OFFSET_FILE."""
import os as _os
import time as _time

_path = _os.environ.get("FAULT_CLOCK_OFFSET_FILE")
if _path:
    _real_time, _real_time_ns, _monotonic = _time.time, _time.time_ns, _time.monotonic
    _state = [-1.0, 0.0]  # (monotonic time of the last read, offset)

    def _offset():
        now = _monotonic()
        if now - _state[0] >= 0.05:
            try:
                with open(_path) as f:
                    _state[1] = float(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
            _state[0] = now
        return _state[1]

    _time.time = lambda: _real_time() + _offset()
    _time.time_ns = lambda: _real_time_ns() + int(_offset() * 1e9)
'''


class Clock:
    """The agent's wall clock offset (seconds), changeable while it runs."""

    def __init__(self, tmp: Path, offset: float = 0.0) -> None:
        self.dir = tmp / "clock-shim"
        self.dir.mkdir(exist_ok=True)
        (self.dir / "sitecustomize.py").write_text(_CLOCK_SHIM)
        self.file = tmp / "clock-offset"
        self.set(offset)

    def set(self, offset: float) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(repr(offset))
        os.replace(tmp, self.file)
        time.sleep(0.1)  # the shim rereads the file every 50 ms

    def env(self) -> dict:
        return {"PYTHONPATH": f"{self.dir}{os.pathsep}{ROOT}", "FAULT_CLOCK_OFFSET_FILE": str(self.file)}


def _segments(replica: Path) -> list[dict]:
    p = cli("segments", "--json", f"file://{replica}", check=True)
    return json.loads(p.stdout)


def _generations(replica: Path) -> list[dict]:
    p = cli("generations", "--json", f"file://{replica}", check=True)
    return json.loads(p.stdout)


def _iso(ms: int) -> str:
    from replicator.restore_plan import format_time

    return format_time(ms / 1000)


def _key_ms(key: str) -> int:
    return int(key.rsplit(".", 2)[-2])


def _bursts(db: Path, count: int) -> None:
    """count commits, each in its own capture pass (a segment of its own, 0.3 s apart)."""
    for i in range(count):
        write(db, [["insert", 1, 100]])
        time.sleep(0.3)


def test_clock_behind_after_a_restart_keeps_the_generation(tmp_path):
    """The agent runs, stops, and starts again with its wall clock an hour behind (a VM
    restored, an RTC wrong until NTP steps it): it resumes the same generation, whose newer
    keys carry older times. Restores by latest and by txid are exact; a restore by
    timestamp gives the state after the last transaction recorded at or before it."""
    db, replica, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "agent.log"
    clock = Clock(tmp_path)
    write(db, [["schema"], ["insert", 5, 100]])  # 6 commits before the agent: the snapshot at txid 0
    agent = AgentProcess(str(db), f"file://{replica}", log=log, env_extra=clock.env())
    with agent:
        wait_for(lambda: has_snapshot(replica), what="the first snapshot")
        _bursts(db, 5)
        assert agent.stop() == 0
    clock.set(-3600)
    with agent:
        _bursts(db, 5)
        assert agent.stop() == 0
    assert len(_named(log, "generation started")) == 1 and _named(log, "resumed")
    segments = _segments(replica)
    assert [(s["first_txid"], s["last_txid"]) for s in segments] == [(t, t) for t in range(1, 11)]  # by txid
    times = [_key_ms(s["key"]) for s in segments]
    assert times[:5] == sorted(times[:5]) and times[5:] == sorted(times[5:])
    assert max(times[5:]) < min(times[:5]) - 3_000_000  # the step is in the keys
    # latest
    _restore_equals_source(tmp_path, replica, db)
    base = 5  # rows at txid 0
    # by txid, across the step
    for txid in (3, 5, 8):
        out = tmp_path / f"txid-{txid}.db"
        p = _restore(out, replica, "--txid", str(txid))
        assert p.returncode == 0, p.stderr
        assert integrity(out) == "ok" and len(rows(out)) == base + txid
    # by timestamp, between two commits before the step: the state after the earlier one
    between = (times[2] + times[3]) // 2
    out = tmp_path / "at-time.db"
    p = _restore(out, replica, "--timestamp", _iso(between))
    assert p.returncode == 0, p.stderr
    assert integrity(out) == "ok" and len(rows(out)) == base + 3
    # by timestamp, now (later than every recorded time): the latest state
    out = tmp_path / "now.db"
    p = _restore(out, replica, "--timestamp", _iso(int(time.time() * 1000)))
    assert p.returncode == 0, p.stderr
    assert_same_pages(out, db)
    # a time of the commits after the step is earlier than the generation's snapshot as
    # recorded: "no restore point at or before" it, as the docs say for a time before the
    # oldest snapshot, never a silently wrong state
    p = _restore(tmp_path / "x.db", replica, "--timestamp", _iso(times[7]))
    assert p.returncode == 1 and "no restore point at or before" in p.stderr
    assert not (tmp_path / "x.db").exists()


def test_new_generation_with_the_clock_behind_is_the_latest(tmp_path):
    db, replica, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "agent.log"
    clock = Clock(tmp_path)
    write(db, [["schema"], ["insert", 5, 100]])
    agent = AgentProcess(str(db), f"file://{replica}", log=log, env_extra=clock.env())
    with agent:
        wait_for(lambda: has_snapshot(replica), what="the first snapshot")
        write(db, [["insert", 10, 100]])
        time.sleep(0.5)
        assert agent.stop() == 0
    shutil.rmtree(tmp_path / ".app.db-replicator")  # safe while the agent is stopped (docs): a new generation
    write(db, [["insert", 10, 100]])
    clock.set(-3600)
    with agent:
        wait_for(lambda: len(_named(log, "generation started")) == 2, what="the second generation")
        write(db, [["insert", 10, 100]])
        time.sleep(0.5)
        assert agent.stop() == 0
    _restore_equals_source(tmp_path, replica, db)  # latest: the new generation, not the old one
    second = _named(log, "generation started")[1]["generation"]
    assert [g["generation"] for g in _generations(replica)][-1] == second, "the new generation is not listed as the newest"


def test_clock_step_back_keeps_the_data_loss_window(tmp_path):
    db, good, down, log = tmp_path / "app.db", tmp_path / "good", tmp_path / "down", tmp_path / "agent.log"
    clock = Clock(tmp_path)
    port = _free_port()
    m = Metrics(port)
    cfg = _config(tmp_path, db, {"good": good, "down": down}, port=port, extra="shutdown-timeout: 1s\n")
    write(db, [["schema"], ["insert", 5, 100]])
    with AgentProcess("-c", str(cfg), log=log, env_extra=clock.env()) as agent:
        wait_for(lambda: has_snapshot(good) and has_snapshot(down), what="both replicas")
        shutil.rmtree(down)
        down.write_bytes(b"not a directory")  # every upload to it fails from now on
        writer = start_writer(db, [["forever", 100, 20]])
        try:
            wait_for(lambda: (m.value("replicator_data_loss_window_seconds", replica="down") or 0) > 2, timeout=15,
                     what="the window of the replica that is down")
            clock.set(-3600)
            time.sleep(1.5)  # a threshold check passes meanwhile
            window = m.value("replicator_data_loss_window_seconds", replica="down")
            behind = m.value("replicator_replica_behind_threshold", replica="down")
        finally:
            writer.kill()
            writer.wait()
        assert agent.stop() == 0
    assert window > 2, f"the window of a replica that is down reads {window} after the clock stepped back"
    assert behind == 1
    assert not _named(log, "data-loss window back within threshold")
