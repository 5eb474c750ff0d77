"""The agent's SQLite connections: the read transaction that pins the WAL, and checkpoints.

The agent never writes to the user's database. It opens two apsw connections: `pin` holds a
read transaction so that no checkpoint can reset the WAL while capture reads it (a reader
whose snapshot includes WAL frames blocks the restart), and `ckpt` runs the checkpoints the
agent owns. Neither checkpoints on close, so stopping the agent never folds unshipped frames
into the database.

An idle database keeps only what it must (park() closes the checkpoint connection, which
reopens at the next checkpoint): the pin connection (the database, whose fd also serves the
raw page reads, its WAL and its -shm) and the -shm reader. The reader stays open while the
connections are: a connection in WAL mode holds its locks for as long as it is open, and
closing any fd of the process on a file drops every POSIX lock it holds there.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import apsw

from replicator.walindex import WalIndexHeader, WalIndexReader

CHECKPOINT_MODES = {
    "PASSIVE": apsw.SQLITE_CHECKPOINT_PASSIVE,
    "FULL": apsw.SQLITE_CHECKPOINT_FULL,
    "RESTART": apsw.SQLITE_CHECKPOINT_RESTART,
    "TRUNCATE": apsw.SQLITE_CHECKPOINT_TRUNCATE,
}


class DatabaseUnavailable(Exception):
    """The database cannot be replicated right now (missing, not WAL, locked); one line."""


@dataclass(frozen=True)
class CheckpointResult:
    mode: str
    busy: bool
    wal_frames: int
    checkpointed: int


def agent_memory_settings() -> None:
    """For the agent, before it opens any connection: no lookaside memory. SQLite gives every
    connection 120 KiB of it by default, for the many small allocations of busy statements;
    the agent runs a few tiny ones, over a connection or two per database (200 databases:
    about 9 MiB saved). A no-op while a connection is open in this process."""
    if apsw.connections():
        return
    try:
        apsw.shutdown()
        apsw.config(apsw.SQLITE_CONFIG_LOOKASIDE, 0, 0)
    except apsw.Error:
        pass
    finally:
        apsw.initialize()


def _sqlite_db_fd(path: Path) -> int | None:
    """The fd SQLite opened on the database file for the one connection of this process
    that has it open, or None unless exactly one fd of the process is on that file (Linux:
    /proc/self/fd). It stays open, at the same number, for as long as the connection:
    SQLite never reopens a file it has open. Reading pages through it (pread, which leaves
    its offset alone) spares an fd of our own per database, which could only be closed
    with the connection anyway."""
    try:
        st = os.stat(path)
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    found = []
    for name in names:
        try:
            fst = os.fstat(int(name))
        except (OSError, ValueError):
            continue  # (among them the fd that listed the directory, closed by now)
        if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino) and stat.S_ISREG(fst.st_mode):
            found.append(int(name))
    return found[0] if len(found) == 1 else None


def _open(path: Path, busy_ms: int) -> apsw.Connection:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOFOLLOW)
    conn.set_busy_timeout(busy_ms)
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    conn.wal_autocheckpoint(0)
    return conn


def _view_key(h: WalIndexHeader | None):
    return None if h is None else (h.change, h.mx_frame, h.salts, h.n_backfill, h.n_page)


class SqliteAccess:
    """The pinning read transaction and the checkpointing connection for one database."""

    def __init__(self, db_path: Path, *, checkpoint_busy_ms: int = 100):
        self.db_path = db_path
        self.shm_path = Path(f"{db_path}-shm")
        self.wal_path = Path(f"{db_path}-wal")
        self._checkpoint_busy_ms = checkpoint_busy_ms
        self.pin_conn: apsw.Connection | None = None
        self.ckpt_conn: apsw.Connection | None = None
        self.index = WalIndexReader(self.shm_path)
        self.pinned_view: WalIndexHeader | None = None
        self.barrier = False
        self.page_size = 0
        # POSIX locks belong to the process: closing ANY fd on the database file drops the
        # locks SQLite holds through its own fds (our pin among them). So the raw page
        # reads use the pin connection's own fd, found when it opens (_sqlite_db_fd); where
        # it cannot be found, the agent opens the file once and closes it only after SQLite
        # is done.
        self.db_fd: int | None = None
        self._own_db_fd = False  # db_fd is ours to close (else it is SQLite's)

    def open(self) -> None:
        """Open the connections; DatabaseUnavailable when the database cannot be replicated."""
        if not self.db_path.exists():
            raise DatabaseUnavailable(f"database {self.db_path} does not exist yet")
        try:
            conn = _open(self.db_path, 5000)
            mode = conn.execute("PRAGMA journal_mode").fetchall()[0][0]
            if str(mode).lower() != "wal":
                conn.close()
                raise DatabaseUnavailable(
                    f"database {self.db_path} is in journal_mode={mode}, not WAL: "
                    "the app must set PRAGMA journal_mode=WAL"
                )
            self.page_size = int(conn.execute("PRAGMA page_size").fetchall()[0][0])
            self.pin_conn = conn
            fd = _sqlite_db_fd(self.db_path)
            self._own_db_fd = fd is None
            self.db_fd = os.open(self.db_path, os.O_RDONLY | os.O_CLOEXEC) if fd is None else fd
        except apsw.Error as e:
            self.close()
            raise DatabaseUnavailable(f"cannot open database {self.db_path}: {e}") from None

    def _ckpt(self) -> apsw.Connection:
        """The checkpoint connection, opened at its first use."""
        if self.ckpt_conn is None:
            conn = _open(self.db_path, self._checkpoint_busy_ms)
            try:
                # a connection opens the WAL only when it first reads; until then its
                # checkpoints silently do nothing (nLog = -1)
                conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
            except BaseException:
                conn.close()
                raise
            self.ckpt_conn = conn
        return self.ckpt_conn

    def park(self) -> None:
        """Close the checkpoint connection (an idle database): its WAL fd and its memory
        (page cache, lookaside) go; its database fd waits in SQLite for the pin's lock to
        end, and the next checkpoint connection reuses it."""
        if self.ckpt_conn is not None:
            try:
                self.ckpt_conn.close()
            except apsw.Error:
                pass
            self.ckpt_conn = None

    def close(self) -> None:
        self.unpin()
        for conn in (self.ckpt_conn, self.pin_conn):
            if conn is not None:
                try:
                    conn.close()
                except apsw.Error:
                    pass
        self.pin_conn = self.ckpt_conn = None
        if self.db_fd is not None and self._own_db_fd:
            os.close(self.db_fd)  # (SQLite's own closed with its connection)
        self.db_fd = None
        self._own_db_fd = False
        self.index.close()

    # -- pin ----------------------------------------------------------------------------
    def pin(self, attempts: int = 50) -> WalIndexHeader | None:
        """(Re)start the read transaction and return the WAL-index view it sees.

        The view is known exactly only when the WAL index did not change while the
        transaction started; retried until it did not.
        """
        assert self.pin_conn is not None
        last = None
        for _ in range(attempts):
            self.unpin()
            before = self.index.read()
            self.pin_conn.execute("BEGIN; SELECT count(*) FROM sqlite_master").fetchall()
            after = self.index.read()
            last = after
            if _view_key(before) == _view_key(after):
                self.pinned_view = after
                return after
        self.pinned_view = None
        return last

    @property
    def pinned(self) -> bool:
        """True when the read transaction really pins the WAL (its view includes frames)."""
        v = self.pinned_view
        return v is not None and v.mx_frame > v.n_backfill

    def unpin(self) -> None:
        if self.pin_conn is not None and not self.pin_conn.getautocommit():
            self.pin_conn.execute("ROLLBACK")
        self.pinned_view = None
        self.barrier = False

    # -- the checkpoint barrier -----------------------------------------------------------
    def hold_write_lock(self, timeout: float = 0.05) -> bool:
        """Take SQLite's write lock (BEGIN IMMEDIATE, writing nothing) for a moment.

        While it is held no transaction can commit, so capture can read everything that
        is committed and a PASSIVE checkpoint can backfill the whole WAL; when it is
        released, the app's next write finds the WAL fully backfilled and restarts it.
        Without this, a PASSIVE checkpoint that completes while the app is inside a
        transaction never lets the WAL restart. App writers wait for it with their busy
        handler. False (and nothing held) when the lock is not free within timeout.

        SQLite's busy handler sleeps 1, 2, 5, 10... ms between tries, which mostly misses
        the short gaps between a busy writer's transactions; polling every 0.2 ms
        catches them.
        """
        assert self.pin_conn is not None
        self.unpin()
        deadline = time.monotonic() + timeout
        self.pin_conn.set_busy_timeout(0)
        try:
            while True:
                try:
                    self.pin_conn.execute("BEGIN IMMEDIATE")
                    self.barrier = True
                    return True
                except apsw.BusyError:
                    if time.monotonic() >= deadline:
                        return False
                    time.sleep(0.0002)
        finally:
            self.pin_conn.set_busy_timeout(5000)

    def release_write_lock(self) -> None:
        if self.barrier:
            self.unpin()

    # -- checkpoints --------------------------------------------------------------------
    def checkpoint(self, mode: str) -> CheckpointResult:
        """Run a checkpoint with the pin released (the barrier may be held); the caller
        releases the barrier and re-pins afterwards."""
        if not self.barrier:
            self.unpin()
        try:
            nlog, nckpt = self._ckpt().wal_checkpoint(mode=CHECKPOINT_MODES[mode])
            return CheckpointResult(mode, False, nlog, nckpt)
        except apsw.BusyError:
            return CheckpointResult(mode, True, -1, -1)
        except apsw.LockedError:
            return CheckpointResult(mode, True, -1, -1)

