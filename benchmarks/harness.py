"""Helpers shared by the scenarios: databases, replica directories, and a replica watcher."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, ts REAL NOT NULL, v BLOB NOT NULL)"


def connect(path: Path):
    import apsw

    c = apsw.Connection(str(path))
    c.set_busy_timeout(10_000)
    return c


def init_db(path: Path) -> None:
    """An empty database in WAL mode with the writer's table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    c = connect(path)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute(SCHEMA)
    c.close()


def rows(path: Path) -> list[tuple]:
    """(id, ts, v) of every row of t, in id order."""
    c = connect(path)
    try:
        return list(c.execute("SELECT id, ts, v FROM t ORDER BY id"))
    finally:
        c.close()


def count_and_max(path: Path) -> tuple[int, int | None, float | None]:
    c = connect(path)
    try:
        n, mx = c.execute("SELECT count(*), max(id) FROM t").fetchone()
        ts = c.execute("SELECT ts FROM t WHERE id = ?", (mx,)).fetchone() if mx is not None else None
        return n, mx, (ts[0] if ts else None)
    finally:
        c.close()


def max_id(path: Path) -> int:
    c = connect(path)
    try:
        return c.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]
    finally:
        c.close()


def integrity(path: Path) -> str:
    c = connect(path)
    try:
        return "; ".join(r[0] for r in c.execute("PRAGMA integrity_check"))
    finally:
        c.close()


def db_bytes(path: Path) -> int:
    """Logical size: page_count x page_size (what a restore must produce)."""
    c = connect(path)
    try:
        pc = c.execute("PRAGMA page_count").fetchone()[0]
        ps = c.execute("PRAGMA page_size").fetchone()[0]
        return pc * ps
    finally:
        c.close()


def checkpointed_copy(src: Path, dst: Path) -> None:
    """dst = src as one file (online backup API), with no WAL."""
    import apsw

    s = connect(src)
    d = apsw.Connection(str(dst))
    with d.backup("main", s, "main") as b:
        b.step(-1)
    d.execute("PRAGMA journal_mode=DELETE")
    d.close()
    s.close()


def build_big_db(path: Path, target_bytes: int, *, row_size: int = 1024, seed: int = 7, log=print) -> int:
    """A database of about target_bytes in WAL mode: alternately random rows and
    text-like (compressible) rows of row_size bytes. Returns the row count."""
    from benchmarks.writer import compressible

    init_db(path)
    rng = random.Random(seed)
    c = connect(path)
    c.execute("PRAGMA synchronous=OFF")
    n = 0
    t0 = time.time()
    while True:
        c.execute("BEGIN")
        for _ in range(1000):
            v = rng.randbytes(row_size) if n % 2 == 0 else compressible(rng, row_size)
            c.execute("INSERT INTO t (ts, v) VALUES (?, ?)", (time.time(), v))
            n += 1
        c.execute("COMMIT")
        pc = c.execute("PRAGMA page_count").fetchone()[0]
        ps = c.execute("PRAGMA page_size").fetchone()[0]
        if pc * ps >= target_bytes:
            break
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    log(f"built {path} ({db_bytes(path) / 2**20:.0f} MiB, {n} rows) in {time.time() - t0:.1f}s")
    return n


# ---- replica directories ---------------------------------------------------------------


def _is_temp(name: str) -> bool:
    return name.startswith(".") or ".tmp" in name


def listing(root: Path) -> dict[str, int]:
    """{relative path: size} of the finished files under root (temporary files excluded)."""
    out: dict[str, int] = {}
    base = str(root)
    stack = [base]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                if _is_temp(e.name):
                    continue
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        out[e.path[len(base) + 1 :]] = e.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    return out


def storage(root: Path) -> tuple[int, int]:
    """(bytes, object count) of the finished files under root."""
    ls = listing(root)
    return sum(ls.values()), len(ls)


def wait_ready(replicas: list[Path], timeout: float = 60.0) -> float:
    """Wait until every replica directory holds at least one finished file."""
    t0 = time.monotonic()
    pending = list(replicas)
    while pending and time.monotonic() - t0 < timeout:
        pending = [r for r in pending if not listing(r)]
        if pending:
            time.sleep(0.02)
    if pending:
        raise TimeoutError(f"{len(pending)} replica(s) still empty after {timeout:.0f}s, e.g. {pending[0]}")
    return time.monotonic() - t0


def wait_quiescent(root: Path, *, stable: float = 3.0, timeout: float = 180.0, poll: float = 0.05) -> float:
    """Wait until the listing of root has not changed for `stable` seconds; returns the
    wall time (time.time()) of its last change."""
    last = listing(root)
    last_change = time.time()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(poll)
        cur = listing(root)
        if cur != last:
            last, last_change = cur, time.time()
        elif time.time() - last_change >= stable:
            return last_change
    raise TimeoutError(f"{root} still changing after {timeout:.0f}s")


@dataclass
class ReplicaWatcher:
    """Records every state of a replica directory, so that the replica "as it was at time
    t" can be restored afterwards.

    A thread lists the directory every `poll` seconds. Each file seen for the first time
    is hard-linked into a pool (the three tools write each object to a temporary name and
    rename it into place, and never change it afterwards, so a link taken when the name
    appears is the object as it was at that time, even if it is deleted later). Each
    distinct listing is a state (time, {path: size}); `materialise(i, dest)` rebuilds
    state i under dest from the pool. A file whose size later changes in place is
    counted in `rewritten` (it would make the method optimistic; it stays 0 for all three)."""

    root: Path
    pool: Path
    poll: float = 0.01
    states: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    rewritten: int = 0

    def __post_init__(self):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._sizes: dict[str, int] = {}

    def _snap(self) -> None:
        cur = listing(self.root)
        now = time.time()
        if self.states and cur == self.states[-1][1]:
            return
        for rel, size in cur.items():
            known = self._sizes.get(rel)
            if known is None:
                dst = self.pool / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.root / rel, dst)
                    self._sizes[rel] = os.stat(dst).st_size
                except FileNotFoundError:
                    cur = {k: v for k, v in cur.items() if k != rel}
                    continue
                except FileExistsError:
                    self._sizes[rel] = os.stat(dst).st_size
            elif known != size:
                self.rewritten += 1
                self._sizes[rel] = size
        self.states.append((now, cur))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._snap()
            self._stop.wait(self.poll)

    def start(self) -> "ReplicaWatcher":
        self.pool.mkdir(parents=True, exist_ok=True)
        self._snap()
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)
        self._snap()

    def materialise(self, i: int, dest: Path) -> Path:
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for rel in self.states[i][1]:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(self.pool / rel, dest / rel)
        return dest


def rm(path: Path) -> None:
    for p in [path, Path(str(path) + "-wal"), Path(str(path) + "-shm"), Path(str(path) + "-journal")]:
        try:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:
            pass
