"""The shadow log: a local directory holding the capture position and the artefacts not yet
on every replica.

    <shadow>/state                      CaptureState (generation, txid, database checksum, WAL position)
                                        in two checksummed slots written in turn
    <shadow>/state.json                 the same, as written by versions before 0.2 (read once)
    <shadow>/pagehash                   per-page hashes behind the incremental database checksum
    <shadow>/encryption                 the id of the key the current generation is encrypted
                                        with, or null (capture: a new key starts a new generation)
    <shadow>/generations/<g>/log/<seq>.log
                                        segment records: each holds one segment and the capture
                                        state that covers it (append-only, see below)
    <shadow>/generations/...            snapshots (and segment files written before the segment
                                        log), same keys as on a replica (replicator.keys)
    <shadow>/tmp/                       spool files of artefacts being built

A segment is appended to its generation's current log file as one record: a header, the
segment's key, the capture state after it, the segment's bytes and an xxh64 of all of
them; one fdatasync makes the segment and the state that covers it durable together,
before any shipper sees it. A crash mid-record leaves a tail whose checksum fails: it lies
past the durable state and is ignored (the WAL still holds its frames: the agent
checkpoints only what the durable state covers). Records and state slots share one
sequence number; the newest valid one is the state. Rarer state changes (a new
generation, a WAL restart) go to the state slots. A log file goes once every segment in
it is on every replica and a newer record or slot holds the state. Snapshots, written
rarely, stay files (fdatasync, directory fsync).

Per segment this is one write and one fdatasync: no file created, renamed or unlinked, no
directory synced (a file per segment cost a create, two fdatasyncs, a directory fsync and
an unlink).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import io
import json
import mmap
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from replicator import failpoints, keys
from replicator.artefact import EncodedArtefact, xor_of_u64
from replicator.errors import ShadowLocked  # defined apart, so the CLI can catch it without importing this module
from replicator.fsutil import fsync_dir, pwrite_all

import xxhash

# 2: segments live in log records, whose states are newer than the slots; an agent that
# reads only version 1 finds no state it knows and starts a new generation, instead of
# resuming from a slot the records have overtaken
STATE_VERSION = 2
_STATE_VERSIONS_READ = (1, 2)
_LITTLE = sys.byteorder == "little"
_U64 = struct.Struct("<Q")
_SLOT = 2048  # bytes per state slot
_SLOT_HEAD = struct.Struct("<4sQI")  # magic, sequence number, JSON length
_SLOT_MAGIC = b"RPLS"
_REC_HEAD = struct.Struct("<4sQHHQ")  # magic, sequence number, key length, state length, artefact length
_REC_MAGIC = b"RPLR"
_REC_SUM = 8  # the trailing xxh64
LOG_DIR = "log"
LOG_ROLL_BYTES = 16 * 1024 * 1024  # a log file takes records until it is this large


@dataclass(frozen=True)
class WalPosition:
    """Where capture stands in the WAL: frames consumed of the incarnation with these salts,
    and the cumulative frame checksum after the last of them."""

    salt1: int
    salt2: int
    index: int
    checksum1: int
    checksum2: int
    big_endian: bool
    page_size: int
    change: int = 0  # the WAL index's commit counter (iChange) at this position


@dataclass(frozen=True)
class CaptureState:
    """The durable capture position: everything up to txid is in the shadow log."""

    generation: str
    txid: int
    page_size: int
    db_pages: int
    db_checksum: int
    commit_time: float
    wal: WalPosition | None

    def to_json(self) -> dict:
        # by hand: dataclasses.asdict deep-copies recursively, and this runs every segment
        w = self.wal
        return {
            "generation": self.generation,
            "txid": self.txid,
            "page_size": self.page_size,
            "db_pages": self.db_pages,
            "db_checksum": self.db_checksum,
            "commit_time": self.commit_time,
            "wal": None if w is None else {
                "salt1": w.salt1, "salt2": w.salt2, "index": w.index, "checksum1": w.checksum1,
                "checksum2": w.checksum2, "big_endian": w.big_endian, "page_size": w.page_size, "change": w.change,
            },
            "version": STATE_VERSION,
        }

    @classmethod
    def from_json(cls, d: dict) -> "CaptureState":
        if d.get("version") not in _STATE_VERSIONS_READ:
            raise ValueError(f"unsupported shadow state version {d.get('version')!r}")
        wal = WalPosition(**d["wal"]) if d.get("wal") else None
        return cls(
            generation=d["generation"],
            txid=int(d["txid"]),
            page_size=int(d["page_size"]),
            db_pages=int(d["db_pages"]),
            db_checksum=int(d["db_checksum"]),
            commit_time=float(d["commit_time"]),
            wal=wal,
        )


class PageHashes:
    """Per-page 64-bit hashes of the database at (generation, txid), in a memory-mapped file.

    File: 64-byte header (generation id, txid) then one little-endian u64 per page. On a
    little-endian machine the map is read and written as an array of native u64 (a
    memoryview cast); elsewhere each access packs and unpacks.
    """

    HEADER = 64

    def __init__(self, path: Path):
        self.path = path
        self._mm: mmap.mmap | None = None
        self._arr: memoryview | None = None  # the hashes, cast to u64 (little-endian hosts)
        self._capacity = 0
        self._pages = -1  # db_pages of the last update (-1: unknown, zero the tail)
        self._parked = False  # unmapped by park(); the next use maps the file again

    def _map(self, pages: int) -> None:
        if self._mm is not None and pages <= self._capacity:
            return
        # after park() the file keeps its capacity: map it as it is unless pages need more
        grow = self._capacity * 2 if self._mm is not None or pages > self._capacity else self._capacity
        capacity = max(1024, pages, grow)
        self._parked = False
        self._unmap()
        size = self.HEADER + capacity * 8
        with open(self.path, "r+b" if self.path.exists() else "w+b") as f:
            if os.fstat(f.fileno()).st_size < size:
                # allocate the blocks now: a sparse file on a full filesystem would kill the
                # process with SIGBUS at the first store through the map
                os.posix_fallocate(f.fileno(), 0, size)
            self._mm = mmap.mmap(f.fileno(), size)
        if _LITTLE:
            self._arr = memoryview(self._mm)[self.HEADER : size].cast("Q")
        self._capacity = capacity

    def _unmap(self) -> None:
        if self._arr is not None:
            self._arr.release()
            self._arr = None
        if self._mm is not None:
            self._mm.flush()
            self._mm.close()
            self._mm = None

    def _set(self, pgno: int, value: int) -> None:
        if self._arr is not None:
            self._arr[pgno - 1] = value
        else:
            _U64.pack_into(self._mm, self.HEADER + 8 * (pgno - 1), value)

    def _zero(self, first: int, end: int) -> None:
        """Zero the hashes of pages first+1..end (0-based slots first..end-1)."""
        if end > first:
            self._mm[self.HEADER + 8 * first : self.HEADER + 8 * end] = bytes(8 * (end - first))

    def reset(self, generation: str, txid: int, hashes: array.array) -> None:
        """Replace the whole table (a new snapshot); hashes: native u64, index = page - 1."""
        self.close()
        self.path.unlink(missing_ok=True)
        self._capacity = 0
        self._map(len(hashes))
        assert self._mm is not None
        data = hashes
        if sys.byteorder != "little":  # the file is little-endian
            data = array.array("Q", hashes)
            data.byteswap()
        self._mm[self.HEADER : self.HEADER + 8 * len(hashes)] = memoryview(data).cast("B")
        self._zero(len(hashes), self._capacity)
        self._pages = len(hashes)
        self.set_position(generation, txid)

    def load(self) -> tuple[str, int] | None:
        """Open an existing table; returns its (generation, txid) or None."""
        if not self.path.exists() or self.path.stat().st_size < self.HEADER:
            return None
        with open(self.path, "rb") as f:
            head = f.read(self.HEADER)
        gen = head[:40].rstrip(b"\0").decode("ascii", "replace")
        txid = int.from_bytes(head[40:48], "little")
        pages = (self.path.stat().st_size - self.HEADER) // 8
        self._capacity = 0
        self._map(max(pages, 1))
        return gen, txid

    def set_position(self, generation: str, txid: int) -> None:
        head = generation.encode("ascii")[:40].ljust(40, b"\0") + txid.to_bytes(8, "little")
        if self._mm is None:
            self._map(max(self._pages, 0))  # (after park(): the same capacity)
        self._mm[: len(head)] = head  # through the map: no system call per segment

    @property
    def parked(self) -> bool:
        return self._mm is None

    def park(self) -> None:
        """Unmap the file (an idle database: the map holds an fd); the next use maps it
        again, at the same capacity."""
        if self._mm is None:
            return
        pages = self._pages
        self.close()
        self._pages = pages
        self._parked = True

    def _unpark(self) -> bool:
        if self._parked:
            self._map(0)
        return self._mm is not None

    def get(self, pgno: int) -> int:
        if self._mm is None and not self._unpark():
            return 0
        if pgno > self._capacity:
            return 0
        if self._arr is not None:
            return self._arr[pgno - 1]
        return _U64.unpack_from(self._mm, self.HEADER + 8 * (pgno - 1))[0]

    def update(self, changes: dict[int, int], db_pages: int) -> None:
        """Apply page -> hash changes and drop pages past db_pages."""
        self._map(db_pages)
        assert self._mm is not None
        arr = self._arr
        if arr is not None:
            for p, h in changes.items():
                arr[p - 1] = h
        else:
            for p, h in changes.items():
                self._set(p, h)
        if db_pages < self._pages or self._pages < 0:
            # the database shrank (or the table is new to us)
            self._zero(db_pages, self._capacity)
        self._pages = db_pages

    def checksum(self, db_pages: int) -> int:
        if db_pages == 0 or (self._mm is None and not self._unpark()):
            return 0
        with memoryview(self._mm) as mv:
            return xor_of_u64(mv[self.HEADER : self.HEADER + 8 * db_pages], "little")

    def close(self) -> None:
        self._unmap()
        self._pages = -1
        self._parked = False


@dataclass
class _LogFile:
    """One append-only log file of segment records."""

    path: Path
    generation: str
    end: int  # bytes of valid records: the next record goes here
    live: int = 0  # segments in it not yet removed (shipped everywhere)
    last_seq: int = 0  # sequence number of its newest record


@dataclass(frozen=True)
class _Record:
    seq: int
    key: str
    state: dict
    offset: int  # of the artefact's bytes in the file
    length: int
    end: int  # of the whole record


class ShadowLog:
    """The local shadow directory of one database, locked (flock on <shadow>/lock) for as
    long as this object lives: two agents replicating one database would interleave two
    histories in one shadow log and on the replicas."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._root_str = str(self.root)
        self.tmp = self.root / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock()
        self.tmp.mkdir(exist_ok=True)
        for stale in self.tmp.iterdir():  # spools and scratch restores of a previous run
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        self.hashes = PageHashes(self.root / "pagehash")
        self._state_fd: int | None = None
        self._dir_fds: dict[Path, int] = {}
        # segment records: key -> (log, offset, length); the newest record's (seq, state)
        self._logs: dict[Path, _LogFile] = {}
        self._segments: dict[str, tuple[_LogFile, int, int]] = {}
        self._log_newest: tuple[int, dict] | None = None
        self._active: _LogFile | None = None  # the log file appends go to
        self._active_fd: int | None = None
        for path in _log_files(self.root):
            log = _LogFile(path, path.parent.parent.name, 0)
            for rec in _read_records(path):
                self._segments[rec.key] = (log, rec.offset, rec.length)
                log.live += 1
                log.last_seq, log.end = rec.seq, rec.end
                if self._log_newest is None or rec.seq > self._log_newest[0]:
                    self._log_newest = (rec.seq, rec.state)
            if log.live:
                self._logs[path] = log
            else:  # created but never written (a crash, or a full disk, right after)
                path.unlink(missing_ok=True)
        slots = _read_slots(self.root / "state")
        self._state_seq = max([seq for seq, _ in slots] + [self._log_newest[0] if self._log_newest else 0])

    def _lock(self) -> int:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ShadowLocked(
                f"shadow directory {self.root} is in use by another replicator agent (pid {holder}): "
                "run one agent per database, or give this one another shadow-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def release(self) -> None:
        """Close the descriptors and give up the lock (the agent is done with this database)."""
        self.close()
        self.hashes.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- state --------------------------------------------------------------------------
    def load_state(self) -> CaptureState | None:
        """The newest durable state: of the state slots and the segment records."""
        slots = _read_slots(self.root / "state")
        if self._log_newest is not None:  # (a slot wins a tie: it sorts first)
            slots.append(self._log_newest)
        return _newest_state(self.root, slots)

    def save_state(self, state: CaptureState) -> None:
        """Make state durable: written into the older of two checksummed slots, so a torn
        write leaves the previous state readable."""
        body = json.dumps(state.to_json(), sort_keys=True).encode()
        if _SLOT_HEAD.size + len(body) + 8 > _SLOT:
            raise ValueError("capture state too large for its slot")
        fd = self._state_file()
        seq = self._state_seq + 1
        record = _SLOT_HEAD.pack(_SLOT_MAGIC, seq, len(body)) + body
        record += xxhash.xxh64_intdigest(record).to_bytes(8, "little")
        os.pwrite(fd, record, (seq % 2) * _SLOT)
        os.fdatasync(fd)
        self._state_seq = seq
        for log in list(self._logs.values()):  # what they held of the state is superseded
            self._maybe_drop(log)

    def _state_file(self) -> int:
        if self._state_fd is None:
            path = self.root / "state"
            created = not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if created or os.fstat(fd).st_size < 2 * _SLOT:
                os.ftruncate(fd, 2 * _SLOT)
                os.fsync(fd)
                fsync_dir(self.root)
            self._state_fd = fd
        return self._state_fd

    # -- artefacts ----------------------------------------------------------------------
    def path_of(self, key: str) -> Path:
        """Where a snapshot (or a segment file of an earlier version) lies."""
        return self.root / key

    def open(self, key: str) -> BinaryIO:
        """The artefact's bytes as a stream to close; FileNotFoundError when it is gone."""
        held = self._segments.get(key)
        if held is None:
            return open(self.path_of(key), "rb")
        log, offset, length = held
        return io.BufferedReader(_Slice(os.open(log.path, os.O_RDONLY | os.O_CLOEXEC), offset, length), 256 * 1024)

    def size_of(self, key: str) -> int:
        held = self._segments.get(key)
        return held[2] if held is not None else self.path_of(key).stat().st_size

    def write(self, key: str, artefact: EncodedArtefact, data: bytes | None = None) -> int:
        """Write an artefact durably as a file under key (a snapshot; data: the whole
        artefact, when the caller holds it in memory already); returns its size."""
        path = self.path_of(key)
        try:
            dirfd = self._dir_fd(path.parent)
            fd = os.open(path.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
            try:
                if data is None:
                    artefact.write_to(_FdWriter(fd))
                else:  # in two writes, as write_to does: a crash between them tears it
                    view = memoryview(data)
                    out = _FdWriter(fd)
                    out.write(view[: len(artefact.prefix)])
                    out.write(view[len(artefact.prefix) :])
                os.fdatasync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(path.name, dir_fd=dirfd)
                raise
            os.close(fd)
            os.fsync(dirfd)
        except OSError as e:  # say where: "No space left on device" alone names nothing
            raise OSError(e.errno, f"shadow directory {self.root}: cannot write {key}: {e.strerror or e}") from None
        return artefact.size

    def append_segment(self, key: str, artefact: EncodedArtefact, data: bytes | None, state: CaptureState) -> int:
        """Append a segment and the capture state after it to the generation's log as one
        record, durably (one fdatasync); returns the segment's size."""
        as_json = state.to_json()
        body = json.dumps(as_json, sort_keys=True).encode()
        kb = key.encode()
        try:
            log, fd = self._log_for(state.generation)
            seq = self._state_seq + 1
            head = _REC_HEAD.pack(_REC_MAGIC, seq, len(kb), len(body), artefact.size) + kb + body
            out = _LogWriter(fd, log.end)
            try:
                out.write(head)
                if data is None:
                    artefact.write_to(out)
                else:  # in two writes, as write_to does: a crash between them tears it
                    view = memoryview(data)
                    out.write(view[: len(artefact.prefix)])
                    out.write(view[len(artefact.prefix) :])
                out.seal()
                os.fdatasync(fd)
            except BaseException:
                # the next record goes where this one began, under a new sequence number
                # (this one may be whole on disk if only the fdatasync failed)
                self._state_seq = seq
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, log.end)
                raise
        except OSError as e:  # say where: "No space left on device" alone names nothing
            raise OSError(e.errno, f"shadow directory {self.root}: cannot write {key}: {e.strerror or e}") from None
        self._state_seq = seq
        self._segments[key] = (log, log.end + len(head), artefact.size)
        log.end, log.live, log.last_seq = out.pos, log.live + 1, seq
        self._log_newest = (seq, as_json)
        if len(self._logs) > 1:  # an older log kept only for the state it held
            for other in [o for o in self._logs.values() if not o.live and o is not log]:
                self._maybe_drop(other)
        return artefact.size

    def _log_for(self, generation: str) -> tuple[_LogFile, int]:
        """The log file (and descriptor) the generation's next record goes to: the current
        one until it is LOG_ROLL_BYTES large, then a new one."""
        log = self._active
        if log is not None and (log.generation != generation or log.end >= LOG_ROLL_BYTES):
            self._close_active()
            self._maybe_drop(log)
            log = None
        if log is None:
            directory = self.root / keys.GENERATIONS / generation / LOG_DIR
            dirfd = self._dir_fd(directory)
            name = f"{self._state_seq + 1:016x}.log"
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
            os.fsync(dirfd)
            log = _LogFile(directory / name, generation, 0)
            self._logs[log.path] = log
            self._active, self._active_fd = log, fd
        elif self._active_fd is None:  # parked
            self._active_fd = os.open(log.path, os.O_RDWR | os.O_CLOEXEC)
        assert self._active_fd is not None
        return log, self._active_fd

    def _close_active(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
        self._active = self._active_fd = None

    def _maybe_drop(self, log: _LogFile) -> None:
        """Delete a log file that holds nothing needed: every segment in it shipped, and
        the state in a newer record or slot."""
        if log.live or log.last_seq >= self._state_seq:
            return
        if log is self._active:
            self._close_active()
        self._logs.pop(log.path, None)
        with contextlib.suppress(FileNotFoundError):
            log.path.unlink()

    def _dir_fd(self, directory: Path) -> int:
        """An open descriptor of directory (created durably if missing), cached."""
        fd = self._dir_fds.get(directory)
        if fd is None:
            if not directory.is_dir():
                missing = [d for d in (directory, *directory.parents) if not d.exists()]
                directory.mkdir(parents=True, exist_ok=True)
                for d in reversed(missing):
                    fsync_dir(d.parent)
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            # one generation is written at a time: keep only the newest few
            while len(self._dir_fds) >= 4:
                os.close(self._dir_fds.pop(next(iter(self._dir_fds))))
            self._dir_fds[directory] = fd
        return fd

    @property
    def holds_fds(self) -> bool:
        return bool(self._dir_fds) or self._state_fd is not None or self._active_fd is not None

    def close(self) -> None:
        """Release the cached descriptors (the shadow log stays usable; they reopen)."""
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()
        if self._state_fd is not None:
            os.close(self._state_fd)
            self._state_fd = None
        if self._active_fd is not None:  # the log stays current: appends reopen it
            os.close(self._active_fd)
            self._active_fd = None

    def remove(self, key: str) -> None:
        held = self._segments.pop(key, None)
        if held is not None:
            held[0].live -= 1
            self._maybe_drop(held[0])
            return
        try:
            os.unlink(f"{self._root_str}/{key}")
        except FileNotFoundError:
            pass

    def list(self) -> list[keys.ArtefactKey]:
        """Every artefact held locally, in (generation, kind, txid) order."""
        out = [a for a in map(keys.parse_key, self._segments) if a is not None]
        base = self.root / keys.GENERATIONS
        if base.exists():
            for gen_dir in base.iterdir():
                for folder in ("snapshots", "segments"):
                    d = gen_dir / folder
                    if not d.is_dir():
                        continue
                    for entry in d.iterdir():
                        parsed = keys.parse_key(f"{keys.GENERATIONS}/{gen_dir.name}/{folder}/{entry.name}")
                        if parsed is not None:
                            out.append(parsed)
        out.sort(key=lambda a: (a.generation, a.first_txid, a.kind != keys.SNAPSHOT, a.last_txid))
        return out

    def drop_generation(self, generation: str) -> None:
        for d in [d for d in self._dir_fds if generation in d.parts]:
            os.close(self._dir_fds.pop(d))
        if self._active is not None and self._active.generation == generation:
            self._close_active()
        for path in [p for p, log in self._logs.items() if log.generation == generation]:
            del self._logs[path]
        for key in [k for k, (log, _, _) in self._segments.items() if log.generation == generation]:
            del self._segments[key]
        shutil.rmtree(self.root / keys.GENERATIONS / generation, ignore_errors=True)

    def size(self) -> int:
        """Bytes held by artefacts."""
        total = 0
        for a in self.list():
            try:
                total += self.size_of(a.key)
            except FileNotFoundError:
                pass
        return total

    def sync_dirs(self) -> None:
        fsync_dir(self.root)


class _FdWriter:
    """The write() an artefact streams into, straight onto a descriptor (no buffering layer)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            n = os.write(self.fd, view)
            failpoints.hit("segment-write")  # a torn artefact (crash-torture tests)
            view = view[n:]
        return total


class _LogWriter:
    """Writes one record at an offset of a log file, hashing what it writes; seal() adds
    the hash."""

    def __init__(self, fd: int, pos: int) -> None:
        self.fd = fd
        self.pos = pos
        self._hash = xxhash.xxh64()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        self._hash.update(view)
        while view:
            n = os.pwrite(self.fd, view, self.pos)
            failpoints.hit("segment-write")  # a torn record (crash-torture tests)
            self.pos += n
            view = view[n:]
        return total

    def seal(self) -> None:
        digest = self._hash.intdigest().to_bytes(_REC_SUM, "little")
        pwrite_all(self.fd, digest, self.pos)
        self.pos += len(digest)


class _Slice(io.RawIOBase):
    """A read-only stream over bytes [offset, offset + length) of a file; owns fd."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd = fd
        self._start = offset
        self._end = offset + length
        self._pos = offset

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self._end - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._pos)
        if not data:
            raise OSError(f"shadow log {self._fd}: ended early")
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _log_files(root: Path) -> list[Path]:
    """The segment log files of a shadow directory, oldest first (by sequence number)."""
    base = root / keys.GENERATIONS
    if not base.is_dir():
        return []
    return sorted(base.glob(f"*/{LOG_DIR}/*.log"), key=lambda p: p.name)


def _read_records(path: Path) -> list[_Record]:
    """The valid records of a log file, in order, up to the first that is not (a tail torn
    by a crash, which lies past the durable state)."""
    out: list[_Record] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return out
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos + _REC_HEAD.size + _REC_SUM <= size:
            head = os.pread(fd, _REC_HEAD.size, pos)
            magic, seq, klen, slen, alen = _REC_HEAD.unpack(head)
            end = pos + _REC_HEAD.size + klen + slen + alen + _REC_SUM
            if magic != _REC_MAGIC or end > size:
                break
            h = xxhash.xxh64(head)
            meta = os.pread(fd, klen + slen, pos + _REC_HEAD.size)
            h.update(meta)
            offset = pos + _REC_HEAD.size + klen + slen
            at, left = offset, alen
            while left:  # the artefact, hashed in pieces
                chunk = os.pread(fd, min(left, 1 << 20), at)
                if not chunk:
                    break
                h.update(chunk)
                at += len(chunk)
                left -= len(chunk)
            if left or h.intdigest() != int.from_bytes(os.pread(fd, _REC_SUM, end - _REC_SUM), "little"):
                break
            try:
                key = meta[:klen].decode()
                state = json.loads(meta[klen:])
            except ValueError:
                break
            out.append(_Record(seq, key, state, offset, alen, end))
            pos = end
    finally:
        os.close(fd)
    return out


def _read_slots(path: Path) -> list[tuple[int, dict]]:
    """The valid (sequence, state JSON) records of a state file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for off in (0, _SLOT):
        slot = data[off : off + _SLOT]
        if len(slot) < _SLOT_HEAD.size + 8:
            continue
        magic, seq, length = _SLOT_HEAD.unpack_from(slot)
        end = _SLOT_HEAD.size + length
        if magic != _SLOT_MAGIC or end + 8 > len(slot):
            continue
        if xxhash.xxh64_intdigest(slot[:end]) != int.from_bytes(slot[end : end + 8], "little"):
            continue
        try:
            out.append((seq, json.loads(slot[_SLOT_HEAD.size : end])))
        except ValueError:
            continue
    return out


def read_state(root: str | os.PathLike) -> CaptureState | None:
    """The durable capture state of a shadow directory (no side effects), or None: the
    newest of the state slots and the segment records."""
    root = Path(root)
    slots = _read_slots(root / "state")
    for path in _log_files(root):
        records = _read_records(path)
        if records:
            slots.append((records[-1].seq, records[-1].state))
    return _newest_state(root, slots)


def _newest_state(root: Path, slots: list[tuple[int, dict]]) -> CaptureState | None:
    """The newest of (sequence, state JSON) records that parses, or the pre-0.2 state.json."""
    candidates = [d for _, d in sorted(slots, key=lambda r: r[0], reverse=True)]
    legacy = root / "state.json"
    if not slots and legacy.exists():
        try:
            candidates.append(json.loads(legacy.read_text()))
        except ValueError:
            pass
    for d in candidates:
        try:
            return CaptureState.from_json(d)
        except (ValueError, KeyError, TypeError):
            continue
    return None
