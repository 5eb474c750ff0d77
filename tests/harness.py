"""Test harness: real processes for the app (tests/writer.py) and the agent
(`python -m replicator replicate`), and page-level comparison of databases."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRITER = ROOT / "tests" / "writer.py"


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def cli(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    """Run the replicator CLI in a child process."""
    p = subprocess.run(
        [sys.executable, "-m", "replicator", *args], capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT
    )
    if check and p.returncode != 0:
        raise AssertionError(f"replicator {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def write(db: Path, steps: list, *, lib: str = "sqlite3", page_size: int | None = None, timeout: float = 600) -> list[tuple[int, float]]:
    """Run the writer to completion; returns its (commit number, time) lines."""
    cmd = [sys.executable, str(WRITER), str(db), json.dumps(steps), "--lib", lib]
    if page_size:
        cmd += ["--page-size", str(page_size)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())
    if p.returncode != 0:
        raise AssertionError(f"writer failed: {p.stderr}")
    return parse_commits(p.stdout)


def start_writer(db: Path, steps: list, *, lib: str = "sqlite3", page_size: int | None = None, seed: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, str(WRITER), str(db), json.dumps(steps), "--lib", lib]
    if page_size:
        cmd += ["--page-size", str(page_size)]
    e = env()
    e["WRITER_SEED"] = str(seed)
    # a writer prints a line per commit: one that runs until killed would fill the pipe
    # nobody reads (64 KiB, about 2,000 commits) and then block, writing nothing more
    forever = any(step[0] == "forever" for step in steps)
    out = subprocess.DEVNULL if forever else subprocess.PIPE
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, env=e)


def parse_commits(out: str) -> list[tuple[int, float]]:
    res = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "commit":
            res.append((int(parts[1]), float(parts[2])))
    return res


class AgentProcess:
    """`replicator replicate` as a real child process."""

    def __init__(self, *args: str, log: Path | None = None, env_extra: dict | None = None):
        self.args = args
        self.env_extra = env_extra or {}
        if log is None:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="replicator-agent-", suffix=".log")
            os.close(fd)
            log = Path(name)
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, *, ready_timeout: float = 60) -> "AgentProcess":
        """Start the agent and wait until it has started replicating."""
        before = self._ready_lines()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "replicator", "replicate", "--log-format", "json", "--log-level", "debug", *self.args],
                stdout=out,
                stderr=out,
                env={**env(), **self.env_extra},
                cwd=ROOT,
            )
        wait_for(lambda: self._ready_lines() > before or self.proc.poll() is not None, timeout=ready_timeout, what="agent start")
        return self

    def _ready_lines(self) -> int:
        try:
            return self.log.read_text(errors="replace").count('"event": "replicating"')
        except FileNotFoundError:
            return 0

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(predicate, timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint(db: Path) -> None:
    """Fold the WAL into the database file (the source 'checkpointed at the same point')."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0, "checkpoint was blocked"
    finally:
        conn.close()


def page_size_of(db: Path) -> int:
    with open(db, "rb") as f:
        head = f.read(100)
    ps = int.from_bytes(head[16:18], "big")
    return 65536 if ps == 1 else ps


def page_hashes(db: Path) -> list[str]:
    """One digest per page of the database file."""
    ps = page_size_of(db)
    out = []
    with open(db, "rb") as f:
        while True:
            page = f.read(ps)
            if not page:
                break
            out.append(hashlib.blake2b(page, digest_size=16).hexdigest())
    return out


def assert_same_pages(restored: Path, source: Path) -> None:
    a, b = page_hashes(restored), page_hashes(source)
    assert len(a) == len(b), f"restored has {len(a)} pages, source {len(b)}"
    diff = [i + 1 for i, (x, y) in enumerate(zip(a, b)) if x != y]
    assert not diff, f"pages differ: {diff[:20]}"


def integrity(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def rows(db: Path, sql: str = "SELECT n FROM t ORDER BY id"):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute(sql)]
    finally:
        conn.close()


def replica_keys(replica_dir: Path) -> list[str]:
    if not replica_dir.exists():
        return []
    return sorted(str(p.relative_to(replica_dir)) for p in replica_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def has_snapshot(replica_dir: Path) -> bool:
    """True once the replica holds a snapshot (the agent's first generation is up)."""
    return any(k.endswith(".snapshot") for k in replica_keys(replica_dir))


def restore_equals_source(tmp_path: Path, replica_dir: Path, db: Path, *, timeout: float = 120) -> Path:
    """Restore the latest state and assert it is page-identical to the checkpointed source."""
    out = tmp_path / "restored.db"
    cli("restore", "-o", str(out), f"file://{replica_dir}", check=True, timeout=timeout)
    checkpoint(db)
    assert integrity(out) == "ok"
    assert_same_pages(out, db)
    return out


def write_config(path: Path, db: Path, replica_url: str, **extra) -> Path:
    lines = ["dbs:", f"  - path: {db}", "    replicas:", f"      - url: {replica_url}"]
    for k, v in extra.items():
        lines.append(f"{k.replace('_', '-')}: {v}")
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (now)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, also for error statuses (e.g. /readyz answering 503)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
