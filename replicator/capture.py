"""Capture: tail one database's WAL into the shadow log.

Every committed transaction becomes part of a segment; a generation starts with a snapshot
whenever continuity with the previous position cannot be proven. The agent holds a read
transaction (the pin) so the WAL cannot be reset while it reads, and it owns checkpointing.

Continuity is proven by counting commits. SQLite's WAL index keeps a counter (iChange) that
every commit increments, in every process, across WAL restarts, for as long as the -shm
file lives (the agent's open connection keeps it alive). Capture records the counter at its
position; whenever it consumes transactions, the counter must have moved by exactly the
number of commits it read. Across a WAL restart (a checkpoint reset the WAL and frames are
written again from the start of the file) capture reads what remains of the old
incarnation after its position (frames that continue the checksum chain with the old
salts) plus the new incarnation's frames, and continues only if those commits account for
the whole counter delta. Anything else starts a new generation with a snapshot; capture
never stitches across a gap.
"""

from __future__ import annotations

import array
import json
import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import xxhash
import zstandard

from replicator import db_image, failpoints, keys, metrics
from replicator.artefact import ArtefactError, ArtefactHeader, SegmentWriter, SnapshotWriter, page_hash, snapshot_codec
from replicator.fsutil import fsync_dir
from replicator.progress import console as console_progress
from replicator.shadow import CaptureState, ShadowLog, WalPosition
from replicator.shipper import ReplicaShipper
from replicator.sqlite_access import CheckpointResult, DatabaseUnavailable, SqliteAccess
from replicator.walindex import WalIndexHeader
from replicator.walreader import (
    ChainPos,
    FrameInfo,
    PageReader,
    WalError,
    WalHeader,
    frame_offset,
    parse_wal_header,
    scan_frames,
)

if TYPE_CHECKING:  # configuration is passed in; capture does not load it
    from replicator.config import DbConfig

MAX_SEGMENT_TXNS = 4096
KEEP_PAGES_IN_MEMORY = 256
MAX_SEGMENT_PAGES = 16384
# WAL frames one capture step reads at most (unless one transaction is larger): 256 MiB of
# 4 KiB pages; the environment variable is for tests
MAX_STEP_FRAMES = int(os.environ.get("REPLICATOR_MAX_STEP_FRAMES", "65536"))
_MASK32 = 0xFFFFFFFF


class CaptureError(Exception):
    """Capture cannot continue for a reason the operator must see (one line)."""


@dataclass
class Txn:
    """One committed transaction read from the WAL: page -> frame index (last copy wins)."""

    pages: dict[int, int]
    commit: FrameInfo


def _failing(sink):
    """sink, with the snapshot failpoint before each chunk (crash-torture tests)."""
    def write(data):
        failpoints.hit("snapshot")
        return sink(data)
    return write


def group_transactions(frames: list[FrameInfo]) -> tuple[list[Txn], FrameInfo | None]:
    """Split valid frames into whole transactions; frames after the last commit are dropped."""
    txns: list[Txn] = []
    pending: dict[int, int] = {}
    last_commit = None
    for f in frames:
        pending[f.pgno] = f.index
        if f.commit:  # a commit frame (is_commit, without the property call per frame)
            txns.append(Txn(pending, f))
            pending = {}
            last_commit = f
    return txns, last_commit


def _ms(t: float) -> int:
    return int(t * 1000)


_KEY_FILE = "encryption"  # in the shadow directory: {"generation": ..., "kid": ...}


def _encryption_key_of(cfg: "DbConfig"):
    """The db's encryption key (its key file read now), or None; a ConfigError when the key
    file cannot be read or holds no key."""
    if getattr(cfg, "encryption_key", None) is None and getattr(cfg, "encryption_key_path", None) is None:
        return None
    from replicator.config import encryption_key_of

    return encryption_key_of(cfg)


class Capture:
    """Tails one database into its shadow log and hands new artefacts to `publish`."""

    def __init__(
        self,
        cfg: "DbConfig",
        *,
        publish: Callable[..., None] = lambda key, header, size=None, data=None: None,
        log=None,
        clock: Callable[[], float] = time.time,
    ):
        from replicator import logs

        self.cfg = cfg
        self._db = str(cfg.path)
        self.publish = publish
        self.clock = clock
        self.log = log or logs.get(db=str(cfg.path))
        self.shadow = ShadowLog(cfg.shadow_dir)
        self.sql = SqliteAccess(cfg.path)
        self.state: CaptureState | None = None
        self.wal_pages: dict[int, int] = {}
        self.opened = False
        self.last_checkpoint = time.monotonic()
        self.last_snapshot = time.monotonic()
        self.last_snapshot_time: float | None = None  # wall clock, for metrics
        self.snapshot_due = False
        self._replaced = False  # the database file was deleted or replaced under us
        self.generation_floor: str | None = None  # the newest generation id on any replica
        self._last_ckpt: tuple[tuple[int, int] | None, int] = (None, 0)  # (salts, frames) at the last checkpoint
        self._ckpt_done: tuple[tuple[int, int], int] | None = None  # (salts, frames) the last checkpoint backfilled whole
        self._wal_fd: int | None = None
        self._wal_ino: int | None = None
        self._zero_hash: dict[int, int] = {}
        self.behind = False  # the last step left committed frames for the next (see MAX_STEP_FRAMES)
        self._compressor = (
            zstandard.ZstdCompressor(level=cfg.segment_compression_level) if cfg.compression == "zstd" else None
        )  # lent to every segment writer: one compression context for the life of capture
        self.rotations: dict[str, int] = {}
        self._unavailable: str | None = None
        # the key every artefact is encrypted with (None: unencrypted); read once, at start
        self.encryption_key = _encryption_key_of(cfg)

    # -- life cycle -------------------------------------------------------------------------
    def open(self) -> bool:
        """Open the database and resume (or start) a generation; False while unavailable."""
        if self.opened:
            return True
        try:
            self.sql.open()
        except DatabaseUnavailable as e:
            if str(e) != self._unavailable:  # say it once, not at every poll
                self.log.warning("database unavailable; waiting", reason=str(e))
                self._unavailable = str(e)
            return False
        if self._unavailable:
            self.log.info("database available")
            self._unavailable = None
        self.opened = True
        self._resume()
        return True

    def close(self) -> None:
        self.sql.close()
        self.shadow.hashes.close()
        self.shadow.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        self.opened = False

    @property
    def parkable(self) -> bool:
        """True when park() has something to release."""
        sql, shadow = self.sql, self.shadow
        return self.opened and not (sql.ckpt_conn is None and self._wal_fd is None and shadow.hashes.parked and not shadow.holds_fds)

    def park(self) -> None:
        """Idle: release the fds and memory a quiet database does not need (the checkpoint
        connection, the raw WAL fd, the page-hash map, the shadow log's descriptors); each
        reopens at its next use. The pin stays: it keeps every frame the app commits
        meanwhile, through the app's own checkpoints, until capture has read it."""
        if not self.parkable:
            return
        self.sql.park()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        self.shadow.close()
        self.shadow.hashes.park()

    # -- the WAL file -----------------------------------------------------------------------
    def _fd(self) -> int | None:
        """An fd on the current -wal file, reopened if the file was replaced."""
        try:
            st = os.stat(self.sql.wal_path)
        except FileNotFoundError:
            return None
        if self._wal_fd is None or st.st_ino != self._wal_ino:
            if self._wal_fd is not None:
                os.close(self._wal_fd)
            self._wal_fd = os.open(self.sql.wal_path, os.O_RDONLY)
            self._wal_ino = st.st_ino
        return self._wal_fd

    def _file_header(self) -> WalHeader | None:
        fd = self._fd()
        if fd is None:
            return None
        try:
            h = parse_wal_header(os.pread(fd, 32, 0))
        except WalError:
            return None
        return h if h is not None and h.valid else None

    # -- resume -----------------------------------------------------------------------------
    def _file_replaced(self) -> bool:
        """True (and the database closed) when the path no longer names the file capture
        has open: deleted, or replaced by another file renamed over it. The next step
        opens the new file and starts a new generation; a missing one is "unavailable"."""
        fd = self.sql.db_fd
        if fd is None:
            return False
        try:
            st = os.stat(self.cfg.path)
        except FileNotFoundError:
            st = None
        mine = os.fstat(fd)
        if st is not None and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            return False
        self.log.warning("database file deleted or replaced; a new generation starts when it is back",
                         path=str(self.cfg.path), deleted=st is None)
        self.close()
        self._replaced = True
        return True

    def _resume(self) -> None:
        state = self.shadow.load_state()
        if state is None:
            self.start_generation("initial")
            return
        if self._replaced:
            self._replaced = False
            self.start_generation("database-replaced")
            return
        if self._key_changed(state):
            # a generation must be restorable with one key: never mix two in one
            self.start_generation("encryption-key-changed")
            return
        problem = self._load_hashes(state)
        if problem:
            self.start_generation(problem)
            return
        self.state = state
        view = self.sql.pin()
        pos = state.wal
        if pos is None or view is None:
            self.start_generation("no-wal-position")
            return
        # The WAL index's commit counter only counts while the -shm file lives, and the
        # app may have closed (deleting WAL and -shm) while the agent was down: across a
        # restart of the agent, continuity is proven from the files alone.
        if pos.index == 0:
            # our position had no WAL frames: continue only if nothing was written since,
            # i.e. the WAL is still empty and the database file is what we captured
            if view.mx_frame != 0 or not self._db_file_matches(state):
                self.start_generation("wal-mismatch")
                return
            baseline = view.change
        else:
            header = self._file_header()
            if view.salts != (pos.salt1, pos.salt2) or header is None or header.salts != view.salts:
                self.start_generation("wal-reset")  # the WAL restarted while the agent was down
                return
            if not self._rebuild_wal_pages(header, pos, view):
                self.start_generation("wal-mismatch")
                return
            fd = self._fd()
            assert fd is not None
            frames = list(scan_frames(fd, header, ChainPos(pos.index, pos.checksum1, pos.checksum2), end_index=view.mx_frame, vouched=view))
            txns, last = group_transactions(frames)
            if view.mx_frame > pos.index and (last is None or last.index != view.mx_frame):
                self.start_generation("wal-mismatch")
                return
            baseline = (view.change - len(txns)) & _MASK32
        self.state = replace(state, wal=replace(pos, salt1=view.salts[0], salt2=view.salts[1], change=baseline))
        self.log.info("resumed", generation=state.generation, txid=state.txid)
        self.step()

    def _db_file_matches(self, state: CaptureState) -> bool:
        """True when the database file alone holds exactly the captured state."""
        assert self.sql.db_fd is not None
        size = os.fstat(self.sql.db_fd).st_size
        if size != state.db_pages * state.page_size:
            return False
        before = self.sql.index.read()
        hashes = self._read_image(state.page_size, state.db_pages, {}, lambda mv: None)
        after = self.sql.index.read()
        if before is None or after is None or (before.salts, before.mx_frame, before.n_backfill) != (after.salts, after.mx_frame, after.n_backfill):
            return False
        return db_image.checksum_of(hashes) == state.db_checksum

    def _load_hashes(self, state: CaptureState) -> str | None:
        """Open the page-hash table at state's position, replaying shadow segments it lags."""
        loaded = self.shadow.hashes.load()
        if loaded is None or loaded[0] != state.generation:
            return "shadow-mismatch"
        _, txid = loaded
        if txid > state.txid:
            return "shadow-mismatch"
        if txid < state.txid:
            from replicator.artefact import iter_segment_pages, read_header

            needed = [a for a in self.shadow.list() if a.generation == state.generation and a.kind == keys.SEGMENT and a.last_txid > txid]
            changes: dict[int, int] = {}
            db_pages = None
            at = txid
            for a in needed:
                if a.first_txid > at + 1:
                    return "shadow-mismatch"
                with self.shadow.open(a.key) as f:
                    try:
                        header = read_header(f)
                        for txn, pgno, data in iter_segment_pages(f, header, encryption_key=self.encryption_key):
                            if txn.txid <= txid or txn.txid > state.txid:
                                continue
                            changes[pgno] = page_hash(pgno, data)
                    except ArtefactError as e:  # damaged, or under a key capture no longer has
                        self.log.warning("shadow segment unreadable", key=a.key, error=str(e))
                        return "shadow-mismatch"
                    for t in header.txns:
                        if txid < t.txid <= state.txid:
                            db_pages = t.db_pages
                at = a.last_txid
            if at < state.txid or db_pages is None:
                return "shadow-mismatch"
            self.shadow.hashes.update(changes, db_pages)
            self.shadow.hashes.set_position(state.generation, state.txid)
        if self.shadow.hashes.checksum(state.db_pages) != state.db_checksum:
            return "shadow-mismatch"
        return None

    # -- the encryption key of the current generation ------------------------------------------
    def _key_changed(self, state: CaptureState) -> bool:
        """True when state's generation was not written under the key capture has now (or was,
        and capture has none): <shadow>/encryption records the key id of each new generation."""
        try:
            recorded = json.loads((self.shadow.root / _KEY_FILE).read_text())
        except FileNotFoundError:
            recorded = {"generation": state.generation, "kid": None}  # from before encryption existed
        except (OSError, ValueError):
            return True
        if not isinstance(recorded, dict) or recorded.get("generation") != state.generation:
            return True  # e.g. a crash between a new generation's state and this record
        return recorded.get("kid") != (self.encryption_key.kid if self.encryption_key is not None else None)

    def _record_key(self, generation: str) -> None:
        """Durably record the key id (or null) the new generation is written under."""
        kid = self.encryption_key.kid if self.encryption_key is not None else None
        path = self.shadow.root / _KEY_FILE
        tmp = path.with_name(_KEY_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"generation": generation, "kid": kid}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.shadow.root)

    def _rebuild_wal_pages(self, header: WalHeader, pos: WalPosition, view: WalIndexHeader) -> bool:
        """The page -> frame map of frames 1..pos.index, which must end at pos's checksum."""
        fd = self._fd()
        if fd is None or view.mx_frame < pos.index:
            return False
        pages: dict[int, int] = {}
        last = None
        for f in scan_frames(fd, header, ChainPos.start(header), end_index=pos.index, vouched=view):
            pages[f.pgno] = f.index
            last = f
        if last is None or last.index != pos.index or (last.chain.checksum1, last.chain.checksum2) != (pos.checksum1, pos.checksum2):
            return False
        self.wal_pages = pages
        return True

    # -- the main step ----------------------------------------------------------------------
    def step(self) -> int:
        """Capture whatever was committed since the last step; returns transactions captured."""
        if not self.open():
            return 0
        assert self.state is not None
        if self._file_replaced():
            return 0
        view = self.sql.index.read()
        if view is not None and not self.sql.pinned and view.mx_frame > view.n_backfill:
            view = self.sql.pin()
        if view is None:
            return 0
        pos = self.state.wal
        captured = 0
        if pos is None:
            self.start_generation("no-wal-position")
            return 0
        if view.salts != (pos.salt1, pos.salt2):
            captured += self._handle_restart(view)
        elif view.mx_frame > pos.index:
            captured += self._capture_to(view)
        elif view.mx_frame < pos.index:
            self.start_generation("wal-shrank")
            return captured
        if self.opened and not self.sql.pinned:
            self._repin()
        return captured

    def _repin(self) -> None:
        view = self.sql.pin()
        if view is not None and self.state is not None and self.state.wal is not None:
            if view.salts != (self.state.wal.salt1, self.state.wal.salt2):
                self._handle_restart(view)

    # -- reading committed frames ---------------------------------------------------------------
    def _current_header(self, pos: WalPosition) -> WalHeader | None:
        header = self._file_header()
        if header is None or header.salts != (pos.salt1, pos.salt2):
            return None
        return header

    def _chain_of(self, pos: WalPosition, header: WalHeader) -> ChainPos:
        if pos.index == 0:
            return ChainPos.start(header)
        return ChainPos(pos.index, pos.checksum1, pos.checksum2)

    def _capture_to(self, view: WalIndexHeader, bite: bool = True) -> int:
        """Capture frames (position, view.mx_frame] of the current incarnation (bite: at
        most MAX_STEP_FRAMES of them, setting `behind` when more are left)."""
        assert self.state is not None and self.state.wal is not None
        pos = self.state.wal
        end_index = view.mx_frame
        header = self._current_header(pos)
        if header is None:
            self.start_generation("wal-header-changed")
            return 0
        fd = self._fd()
        assert fd is not None
        # far behind (a writer faster than capture, or a restart): take the backlog in
        # bites of MAX_STEP_FRAMES, so that memory does not grow with it
        capped = bite and end_index - pos.index > MAX_STEP_FRAMES
        if capped:
            frames = list(scan_frames(fd, header, self._chain_of(pos, header), end_index=pos.index + MAX_STEP_FRAMES, vouched=view))
            txns, last = group_transactions(frames)
            if last is None or frames[-1].index != pos.index + MAX_STEP_FRAMES:
                capped = False  # one transaction larger than a bite, or a WAL that changed: all at once
        if not capped:
            frames = list(scan_frames(fd, header, self._chain_of(pos, header), end_index=end_index, vouched=view))
            txns, last = group_transactions(frames)
        del frames
        self.behind = capped  # more to take at once: the caller steps again without waiting for a change event
        if last is None or (not capped and last.index != end_index):
            # committed frames must validate; if they do not, the WAL changed under us
            view = self.sql.index.read()
            if view is not None and view.salts != (pos.salt1, pos.salt2):
                return self._handle_restart(view)
            self.start_generation("wal-invalid")
            return 0
        if not capped and (view.change - pos.change) & _MASK32 != len(txns):
            self.log.warning("commit count does not match the WAL index", read=len(txns), counted=(view.change - pos.change) & _MASK32)
            self.start_generation("commit-count-mismatch")
            return 0
        failpoints.hit("wal-read")
        if not self._emit(txns, fd, header, self._still_valid((pos.salt1, pos.salt2))):
            view = self.sql.index.read()
            if view is not None and self.state is not None and self.state.wal is not None and view.salts != (self.state.wal.salt1, self.state.wal.salt2):
                return self._handle_restart(view)
            return 0
        return len(txns)

    def _emit(self, txns: list[Txn], fd: int, header: WalHeader, still_valid: Callable[[], bool] | None = None) -> bool:
        """Write transactions as segments to the shadow log and advance the position.

        still_valid is asked after the pages were read and before anything is committed:
        when the WAL is not pinned, frames could have been overwritten while we read them.
        Returns False (nothing more committed) when it says no.
        """
        chunk: list[Txn] = []
        pages = 0
        for t in txns:
            if chunk and (pages + len(t.pages) > MAX_SEGMENT_PAGES or len(chunk) >= MAX_SEGMENT_TXNS):
                if not self._write_segment(chunk, fd, header, still_valid):
                    return False
                chunk, pages = [], 0
            chunk.append(t)
            pages += len(t.pages)
        if chunk:
            return self._write_segment(chunk, fd, header, still_valid)
        return True

    def _write_segment(self, txns: list[Txn], fd: int, header: WalHeader, still_valid: Callable[[], bool] | None) -> bool:
        state = self.state
        assert state is not None
        ps = header.page_size
        if ps != state.page_size:
            self.start_generation("page-size-changed")
            return False
        hashes = self.shadow.hashes
        now = self.clock()
        writer = SegmentWriter(
            state.generation, ps, codec=self.cfg.compression, level=self.cfg.segment_compression_level, spool_dir=self.shadow.tmp,
            encryption_key=self.encryption_key, compressor=self._compressor,
        )
        changes: dict[int, int] = {}
        cks = state.db_checksum
        db_pages = state.db_pages
        txid = state.txid

        def old_hash(p: int) -> int:
            if p in changes:
                return changes[p]
            return hashes.get(p) if p <= db_pages else 0

        # every frame of txns was validated before this call, so a read-ahead window over
        # them reads stable bytes; it lives only for this segment
        reader = PageReader(fd, ps, last=txns[-1].commit.index)
        read_page, hash_page, hash_of = reader.page, xxhash.xxh3_64_intdigest, hashes.get  # the loop below runs per page
        for t in txns:
            txid += 1
            pages = t.pages
            pgnos = sorted(pages)
            keep = len(pgnos) <= KEEP_PAGES_IN_MEMORY
            kept = []
            reader.cover(min(pages.values()), t.commit.index)
            for pgno in pgnos:
                data = read_page(pages[pgno])
                h = hash_page(data, pgno)  # artefact.page_hash, inline
                old = changes.get(pgno)
                if old is None:
                    old = hash_of(pgno) if pgno <= db_pages else 0
                cks ^= old ^ h
                changes[pgno] = h
                if keep:
                    kept.append((pgno, data))
            # a large transaction is read twice (the second time from the page cache)
            # rather than held in memory while its segment is encoded
            page_list = kept if keep else ((p, reader.page(t.pages[p])) for p in pgnos)
            new_size = t.commit.commit
            if new_size < db_pages:
                for p in range(new_size + 1, db_pages + 1):
                    cks ^= old_hash(p)
                    changes[p] = 0
            elif new_size > db_pages:
                for p in range(db_pages + 1, new_size + 1):
                    if p not in t.pages:  # never written by SQLite: the lock-byte page
                        h = self._zero_page_hash(p, ps)
                        cks ^= old_hash(p) ^ h
                        changes[p] = h
            db_pages = new_size
            writer.add_txn(txid, page_list, db_pages=db_pages, commit_time=now, db_checksum=cks)
        artefact = writer.finish(created=now)
        try:
            if still_valid is not None and not still_valid():
                return False
            parsed = keys.ArtefactKey(state.generation, keys.SEGMENT, state.txid + 1, txid, _ms(now))
            key = parsed.key
            # a small segment's bytes go to the shippers too: none of them re-reads its file
            data = artefact.in_memory() if artefact.size <= ReplicaShipper.MEMORY_ARTEFACT_MAX else None
            last = txns[-1].commit
            wal = WalPosition(
                salt1=header.salt1,
                salt2=header.salt2,
                index=last.index,
                checksum1=last.chain.checksum1,
                checksum2=last.chain.checksum2,
                big_endian=header.big_endian,
                page_size=ps,
                change=((state.wal.change if state.wal else 0) + len(txns)) & _MASK32,
            )
            after = replace(state, txid=txid, db_pages=db_pages, db_checksum=cks, commit_time=now, wal=wal)
            # the segment and the state that covers it: one record, one fdatasync
            size = self.shadow.append_segment(key, artefact, data, after)
        finally:
            artefact.close()
        self.state = after
        failpoints.hit("state-save")  # durable, not yet handed to the shippers
        hashes.update(changes, db_pages)
        hashes.set_position(state.generation, txid)
        for t in txns:
            self.wal_pages.update(t.pages)
        self.log.debug("segment written", key=key, txns=len(txns))
        self.publish(parsed, artefact.header, size, data)
        return True

    def _zero_page_hash(self, pgno: int, page_size: int) -> int:
        h = self._zero_hash.get(pgno)
        if h is None:
            h = self._zero_hash[pgno] = page_hash(pgno, bytes(page_size))
        return h

    # -- WAL restarts ---------------------------------------------------------------------------
    def _handle_restart(self, view: WalIndexHeader) -> int:
        """The WAL was restarted since our position: prove continuity or rotate."""
        assert self.state is not None and self.state.wal is not None
        pos = self.state.wal
        generation = self.state.generation
        fd = self._fd()
        if fd is None:
            self.start_generation("wal-missing")
            return 0
        old_header = WalHeader(
            big_endian=pos.big_endian,
            page_size=pos.page_size,
            ckpt_seq=0,
            salt1=pos.salt1,
            salt2=pos.salt2,
            checksum1=0,
            checksum2=0,
            valid=True,
        )
        # 1. what remains of the old incarnation after our position
        tail: list[FrameInfo] = []
        if pos.index > 0 and os.fstat(fd).st_size >= frame_offset(pos.index + 1, pos.page_size):
            tail = list(scan_frames(fd, old_header, ChainPos(pos.index, pos.checksum1, pos.checksum2)))
        tail_txns, _ = group_transactions(tail)
        # 2. the new incarnation, up to a pinned view (the pin stops further restarts)
        view = self.sql.pin() or view
        new_txns: list[Txn] = []
        new_header = None
        if view.mx_frame > 0:
            new_header = self._file_header()
            if new_header is None or new_header.salts != view.salts or new_header.page_size != pos.page_size:
                self.start_generation("wal-reset")
                return 0
            frames = list(scan_frames(fd, new_header, ChainPos.start(new_header), end_index=view.mx_frame, vouched=view))
            new_txns, last = group_transactions(frames)
            if last is None or last.index != view.mx_frame:
                self.start_generation("wal-reset")
                return 0
        # 3. every commit since our position must be accounted for
        delta = (view.change - pos.change) & _MASK32
        if delta != len(tail_txns) + len(new_txns):
            self.log.info("wal reset with commits we could not read", counted=delta, read=len(tail_txns) + len(new_txns))
            self.start_generation("wal-reset")
            return 0

        same_incarnation = self._still_valid(view.salts)

        def tail_intact() -> bool:
            # no further restart, and the new incarnation has not reached the tail
            return same_incarnation() and self._count_frames_with_salts(fd, view.salts, pos.page_size, pos.index + 1) <= pos.index

        captured = 0
        if tail_txns:
            if not self._emit(tail_txns, fd, old_header, tail_intact):
                if self.state.generation == generation:
                    self.start_generation("wal-overwritten")
                return 0
            captured += len(tail_txns)
            if self.state.generation != generation:
                return captured
        # 4. switch to the new incarnation
        change = (pos.change + len(tail_txns)) & _MASK32
        if new_header is not None:
            start = ChainPos.start(new_header)
            big = new_header.big_endian
        else:
            start = ChainPos(0, 0, 0)
            big = pos.big_endian
        self.state = replace(
            self.state,
            wal=WalPosition(view.salts[0], view.salts[1], 0, start.checksum1, start.checksum2, big, pos.page_size, change),
        )
        self.shadow.save_state(self.state)
        self.wal_pages = {}
        self.log.debug("wal restarted", salt1=view.salts[0], tail_txns=len(tail_txns), new_txns=len(new_txns))
        if new_txns and new_header is not None:
            if not self._emit(new_txns, fd, new_header, same_incarnation):
                again = self.sql.index.read()
                if again is not None and self.state.wal is not None and again.salts != (self.state.wal.salt1, self.state.wal.salt2):
                    return captured + self._handle_restart(again)
                return captured
            captured += len(new_txns)
        return captured

    def _still_valid(self, salts: tuple[int, int]) -> Callable[[], bool]:
        """A check, made after pages were read and before a segment is committed, that the
        WAL incarnation with these salts was not restarted meanwhile (frames we read could
        then have been overwritten). Always true while the pin holds the WAL."""

        def check() -> bool:
            if self.sql.pinned:
                return True
            again = self.sql.index.read()
            return again is not None and again.salts == salts

        return check

    def _count_frames_with_salts(self, fd: int, salts: tuple[int, int], page_size: int, limit: int) -> int:
        """How many frames from the start of the file carry these salts (up to limit)."""
        n = 0
        while n < limit:
            buf = os.pread(fd, 24, frame_offset(n + 1, page_size))
            if len(buf) < 24 or (int.from_bytes(buf[8:12], "big"), int.from_bytes(buf[12:16], "big")) != salts:
                break
            n += 1
        return n

    # -- checkpoints ----------------------------------------------------------------------------
    def maybe_checkpoint(self) -> CheckpointResult | None:
        """Run the checkpoint the thresholds call for, if any.

        When a checkpoint could not reset the WAL (a reader of the app holds it), the next
        one waits until the WAL has grown by another threshold or a second has passed.
        """
        if not self.opened or self.state is None or self.state.wal is None:
            return None
        pos = self.state.wal
        frames = pos.index
        cfg = self.cfg
        since = time.monotonic() - self.last_checkpoint
        if self._last_ckpt[0] == (pos.salt1, pos.salt2):
            grown = frames - self._last_ckpt[1]
        else:
            grown = frames
        due = grown >= cfg.min_checkpoint_page_count or since >= 1.0
        mode = None
        if cfg.truncate_page_count and frames >= cfg.truncate_page_count and due:
            mode = "TRUNCATE"
        elif frames >= cfg.min_checkpoint_page_count and due:
            mode = "PASSIVE"
        elif cfg.checkpoint_interval and frames > 0 and since >= cfg.checkpoint_interval and self._ckpt_done != ((pos.salt1, pos.salt2), frames):
            mode = "PASSIVE"  # (not again for a WAL the last one backfilled whole: an idle database stays parked)
        if mode is None:
            return None
        self._last_ckpt = ((pos.salt1, pos.salt2), frames)
        return self.checkpoint(mode)

    def checkpoint(self, mode: str) -> CheckpointResult:
        """Capture everything, checkpoint with the pin released, re-pin and follow a restart.

        A PASSIVE checkpoint runs under a brief write-lock barrier (see
        SqliteAccess.hold_write_lock): capture first reads the last commits, so the WAL
        restart that follows leaves no tail behind. The bulk of the copy happens before
        the barrier, while the app writes.
        """
        self.step()
        for _ in range(64):  # a backlog taken in bites: all of it, if capture keeps up
            if not self.behind:
                break
            self.step()
        assert self.state is not None and self.state.wal is not None
        # a busy writer leaves only short gaps between its transactions; when earlier
        # barriers missed them and the WAL has grown well past its threshold, poll longer
        # (this waits for the lock, it does not hold it longer)
        patience = 0.25 if self.state.wal.index >= 4 * self.cfg.min_checkpoint_page_count else 0.05
        if mode in ("PASSIVE", "TRUNCATE") and self.state.wal.index >= self.cfg.min_checkpoint_page_count:
            # two phases: first backfill what is captured while the app keeps writing (the
            # pin bounds it to our position), so the barrier (or TRUNCATE, which blocks
            # writers while it runs) only holds writers for the frames committed since; one
            # phase held them for the whole copy (seconds for a WAL of a few hundred MiB)
            self.sql.checkpoint("PASSIVE")
        barrier = mode == "PASSIVE" and self.sql.hold_write_lock(patience)
        result = None
        try:
            if barrier:
                view = self.sql.index.read()
                pos = self.state.wal
                if view is not None and pos is not None and view.salts == (pos.salt1, pos.salt2) and view.mx_frame > pos.index:
                    self._capture_to(view, bite=False)  # all of it: the WAL restarts after this
            result = self.sql.checkpoint(mode)
            failpoints.hit("checkpoint")
        finally:
            self.sql.release_write_lock()
            outcome = "error" if result is None else "busy" if result.busy else "ok"
            metrics.CHECKPOINTS.labels(db=self._db, mode=mode, result=outcome).inc()
        self.last_checkpoint = time.monotonic()
        pos = self.state.wal if self.state is not None else None
        if pos is not None and not result.busy and 0 <= result.wal_frames == result.checkpointed == pos.index:
            self._ckpt_done = ((pos.salt1, pos.salt2), pos.index)
        self.log.debug(
            "checkpoint", mode=mode, barrier=barrier, busy=result.busy, wal_frames=result.wal_frames, checkpointed=result.checkpointed
        )
        self._repin()
        self.step()
        return result

    # -- snapshots and generations ----------------------------------------------------------------
    def maybe_snapshot(self) -> bool:
        """Snapshot when the interval has passed, or when one is owed (snapshot_due: a
        replica holds the generation's segments but none of its snapshots)."""
        if not self.opened or self.state is None:
            return False
        if not self.snapshot_due:
            if not self.cfg.snapshot_interval or time.monotonic() - self.last_snapshot < self.cfg.snapshot_interval:
                return False
        self.snapshot()
        self.snapshot_due = False
        return True

    def _pinned_view_and_frames(self) -> tuple[WalIndexHeader, WalHeader | None, list[FrameInfo]] | None:
        """Pin and read the frames 1..V of the pinned view (V = its mx_frame)."""
        return db_image.pinned_frames(self.sql, self._fd())

    def _read_image(self, page_size: int, db_pages: int, overlay: dict[int, int], sink, progress=None) -> array.array:
        """Stream the database image at the pinned view to sink; returns per-page hashes."""
        assert self.sql.db_fd is not None
        return db_image.read_image(self.sql.db_fd, self._fd(), page_size, db_pages, overlay, sink, progress)

    def start_generation(self, reason: str) -> None:
        """Begin a new generation with a snapshot of the database at the pinned view."""
        for _ in range(20):
            got = self._pinned_view_and_frames()
            if got is None:
                time.sleep(0.01)
                continue
            view, header, frames = got
            started = time.monotonic()
            page_size = header.page_size if header is not None else self.sql.page_size
            if frames:
                db_pages = frames[-1].commit
            else:
                assert self.sql.db_fd is not None
                db_pages = os.fstat(self.sql.db_fd).st_size // page_size
            overlay = {}
            for f in frames:
                overlay[f.pgno] = f.index
            now = self.clock()
            # a new generation must sort after the previous one even when the wall clock
            # stepped back: restore and retention take the newest id as the latest
            stamp = now
            previous = self.state.generation if self.state is not None else None
            for newest in (previous, self.generation_floor):
                if newest is not None and keys.is_generation_id(newest):
                    stamp = max(stamp, keys.generation_time(newest) + 2e-6)
            generation = keys.new_generation_id(stamp)
            writer = SnapshotWriter(
                generation, 0, page_size, codec=snapshot_codec(self.cfg.compression), level=self.cfg.compression_level,
                spool_dir=self.shadow.tmp,
                encryption_key=self.encryption_key,
            )
            try:
                with console_progress(f"snapshot of {self.cfg.path}", db_pages * page_size) as bar:
                    hashes = self._read_image(page_size, db_pages, overlay, _failing(writer.write), bar.advance)
                if not self.sql.pinned:
                    after = self.sql.index.read()
                    if after is None or (after.salts, after.n_backfill) != (view.salts, view.n_backfill):
                        writer.close() if hasattr(writer, "close") else None
                        continue
                cks = db_image.checksum_of(hashes)
                artefact = writer.finish(db_pages=db_pages, commit_time=now, db_checksum=cks, created=now)
            except BaseException:
                raise
            key = keys.snapshot_key(generation, 0, _ms(now))
            try:
                self.shadow.write(key, artefact)
            finally:
                artefact.close()
            if frames:
                last = frames[-1]
                wal = WalPosition(view.salts[0], view.salts[1], last.index, last.chain.checksum1, last.chain.checksum2, header.big_endian, page_size, view.change)
            else:
                big = header.big_endian if header is not None else False
                wal = WalPosition(view.salts[0], view.salts[1], 0, 0, 0, big, page_size, view.change)
            self.shadow.hashes.reset(generation, 0, hashes)
            self.state = CaptureState(generation, 0, page_size, db_pages, cks, now, wal)
            self.shadow.save_state(self.state)
            self._record_key(generation)
            self.wal_pages = overlay
            self._snapshot_done(started)
            self.rotations[reason] = self.rotations.get(reason, 0) + 1
            metrics.ROTATIONS.labels(db=self._db, reason=reason).inc()
            self.log.info("generation started", generation=generation, reason=reason, pages=db_pages)
            parsed = keys.parse_key(key)
            assert parsed is not None
            self.publish(parsed, artefact.header)
            return
        raise CaptureError(f"could not take a consistent snapshot of {self.cfg.path}: the WAL kept changing")

    def _snapshot_done(self, started: float) -> None:
        self.last_snapshot = time.monotonic()
        self.last_snapshot_time = self.clock()
        metrics.SNAPSHOT_SECONDS.labels(db=self._db).observe(self.last_snapshot - started)

    def snapshot(self) -> keys.ArtefactKey | None:
        """Take a snapshot of the current generation at the current position."""
        for _ in range(20):
            self.step()
            assert self.state is not None and self.state.wal is not None
            got = self._pinned_view_and_frames()
            if got is None:
                time.sleep(0.01)
                continue
            view, header, frames = got
            pos = self.state.wal
            if view.salts != (pos.salt1, pos.salt2):
                self._handle_restart(view)
                continue
            if view.mx_frame > pos.index:
                self._capture_to(view)
            state = self.state
            if state.wal is None or state.wal.index != view.mx_frame or view.salts != (state.wal.salt1, state.wal.salt2):
                continue
            now = self.clock()
            started = time.monotonic()
            writer = SnapshotWriter(
                state.generation, state.txid, state.page_size, codec=snapshot_codec(self.cfg.compression),
                level=self.cfg.compression_level, spool_dir=self.shadow.tmp,
                encryption_key=self.encryption_key,
            )
            with console_progress(f"snapshot of {self.cfg.path}", state.db_pages * state.page_size) as bar:
                hashes = self._read_image(state.page_size, state.db_pages, dict(self.wal_pages), _failing(writer.write), bar.advance)
            if not self.sql.pinned:
                after = self.sql.index.read()
                if after is None or (after.salts, after.n_backfill) != (view.salts, view.n_backfill):
                    writer.close() if hasattr(writer, "close") else None
                    continue
            cks = db_image.checksum_of(hashes)
            if cks != state.db_checksum:
                writer.close() if hasattr(writer, "close") else None
                self.log.error("database checksum does not match the captured history; starting a new generation",
                               expected=state.db_checksum, actual=cks)
                self.start_generation("checksum-mismatch")
                return None
            artefact = writer.finish(db_pages=state.db_pages, commit_time=state.commit_time, db_checksum=cks, created=now)
            key = keys.snapshot_key(state.generation, state.txid, _ms(now))
            try:
                self.shadow.write(key, artefact)
            finally:
                artefact.close()
            self._snapshot_done(started)
            parsed = keys.parse_key(key)
            assert parsed is not None
            self.log.info("snapshot written", generation=state.generation, txid=state.txid)
            self.publish(parsed, artefact.header)
            return parsed
        raise CaptureError(f"could not take a consistent snapshot of {self.cfg.path}: the WAL kept changing")
