"""Restore: fetch the planned artefacts, verify each, apply pages into a temp file, verify the
result (database checksum and PRAGMA integrity_check), fsync and rename into place.

Nothing is ever left at the target path unless the whole restore succeeded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import apsw
import xxhash

from replicas import Capability, Driver, NotFound, StorageError
from replicator import keys
from replicator.artefact import ArtefactError, decode_body_into, iter_segment_pages, read_header, verify_key
from replicator.encryption import EncryptionKey
from replicator.fsutil import fsync_dir, preallocate, pwrite_all, start_writeback, temp_path
from replicator.restore_plan import RestorePlan, RestoreTarget, plan_restore


class RestoreError(Exception):
    """A restore that cannot be done; the message is one line naming the artefact or path."""


@dataclass(frozen=True)
class RestoreResult:
    plan: RestorePlan
    path: Path
    txid: int
    db_pages: int
    page_size: int
    db_checksum: int
    commit_time: float
    bytes_fetched: int


def list_artefacts(driver: Driver) -> list[keys.ArtefactKey]:
    """Every artefact key on the replica (strays and temp files ignored)."""
    return list_artefacts_with_sizes(driver)[0]


def list_artefacts_with_sizes(driver: Driver) -> tuple[list[keys.ArtefactKey], dict[str, int]]:
    """Like list_artefacts, from the same single listing, plus each artefact's stored size
    in bytes (key string -> size), e.g. for the progress of a restore."""
    artefacts: list[keys.ArtefactKey] = []
    sizes: dict[str, int] = {}
    for info in driver.list(keys.GENERATIONS + "/"):
        k = keys.parse_key(info.key)
        if k is not None:
            artefacts.append(k)
            sizes[k.key] = info.size
    return artefacts, sizes


def planned_bytes(p: RestorePlan, sizes: dict[str, int]) -> int:
    """Stored bytes of the artefacts a plan fetches (0 for those the sizes do not know)."""
    return sum(sizes.get(a.key, 0) for a in (p.snapshot, *p.segments))


class _CountingStream:
    """A driver's read stream that reports every byte read from it to on_read."""

    def __init__(self, inner, on_read: Callable[[int], None]):
        self._inner = inner
        self._on_read = on_read

    def read(self, n: int = -1) -> bytes:
        b = self._inner.read(n)
        if b:
            self._on_read(len(b))
        return b

    def readinto(self, buf) -> int:
        n = self._inner.readinto(buf)
        if n:
            self._on_read(n)
        return n

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


def plan(driver: Driver, target: RestoreTarget) -> RestorePlan:
    return plan_restore(list_artefacts(driver), target)


def file_checksum(path: Path, page_size: int, db_pages: int) -> int:
    """Whole-database checksum of a database file (XOR of per-page xxh3 seeded by page number)."""
    acc = 0
    chunk = max(1, (8 << 20) // page_size)
    h = xxhash.xxh3_64_intdigest
    buf = bytearray(chunk * page_size)  # one buffer for the whole file: no fresh memory per chunk
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        for first in range(1, db_pages + 1, chunk):
            n = min(chunk, db_pages - first + 1)
            want = n * page_size
            got = 0
            while got < want:
                r = f.readinto(mv[got:want])
                if not r:
                    break
                got += r
            if got < want:  # past the end of the file: zeros, as SQLite reads them
                mv[got:want] = bytes(want - got)
            for i in range(n):
                acc ^= h(mv[i * page_size : (i + 1) * page_size], first + i)
    return acc


def integrity_check(path: Path) -> str:
    """PRAGMA integrity_check of a database file opened read-only and immutable ('ok' when fine)."""
    uri = f"file:{path}?immutable=1"
    conn = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    return "; ".join(str(r[0]) for r in rows[:5])


def _open_artefact(driver: Driver, key: keys.ArtefactKey, on_read: Callable[[int], None] | None = None):
    try:
        stream = driver.get(key.key)
        return _CountingStream(stream, on_read) if on_read is not None else stream
    except NotFound:
        raise RestoreError(f"{key.key}: missing from the replica") from None
    except StorageError as e:
        raise RestoreError(f"{key.key}: {e}") from None


def restore(
    driver: Driver,
    output: str | os.PathLike,
    *,
    target: RestoreTarget = RestoreTarget(),
    restore_plan: RestorePlan | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    on_read: Callable[[int], None] | None = None,
    encryption_key: EncryptionKey | None = None,
) -> RestoreResult:
    """Restore the planned state of the replica to output; see the module doc.

    progress gets the size of each decoded snapshot chunk written; on_read gets the number
    of stored bytes each time some are read from the replica (download progress).
    encryption_key decrypts encrypted artefacts (unencrypted ones need none); an encrypted
    artefact without it, or under another key, is a RestoreError naming the key ids."""
    output = Path(output)
    if output.exists() and not force:
        raise RestoreError(f"{output} already exists (use --force to replace it)")
    p = restore_plan or plan(driver, target)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(output)
    try:
        try:
            result = _build(driver, p, tmp, progress, on_read, encryption_key)
        except OSError as e:  # e.g. EFBIG for a page far past any real database, ENOSPC
            raise RestoreError(f"cannot write {tmp}: {e.strerror or e} (generation {p.generation})") from None
        verdict = _verify_file(tmp, p, result)
        if verdict != "ok":
            verdict = " ".join(verdict.split())
            raise RestoreError(
                f"restored database fails integrity_check: {verdict} (txid {result[0]} of generation "
                f"{p.generation}, from {p.snapshot.key} and {len(p.segments)} segment(s))"
            )
        if force:
            for suffix in ("-wal", "-shm", "-journal"):
                Path(f"{output}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, output)
        fsync_dir(output.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise
    return RestoreResult(p, output, result[0], result[1], result[2], result[3], result[4], result[5])


def _build(
    driver: Driver, p: RestorePlan, tmp: Path, progress, on_read=None, encryption_key: EncryptionKey | None = None
) -> tuple[int, int, int, int, float, int]:
    with open(tmp, "wb", buffering=0) as out:
        fd = out.fileno()
        # snapshot: the raw database image, its frames decoded and written by several threads
        with _open_artefact(driver, p.snapshot, on_read) as f:
            try:
                header = read_header(f)
                verify_key(header, p.snapshot.key)
                preallocate(fd, header.raw_length)  # the image's blocks, reserved in one call
                decode_body_into(
                    f, header, lambda off, data: _pwrite_all(fd, data, off),
                    workers=DECODE_WORKERS, encryption_key=encryption_key, progress=progress,
                )
            except ArtefactError as e:
                raise RestoreError(f"{p.snapshot.key}: {e}") from None
        fetched = header.raw_length
        page_size = header.page_size
        txid = header.last_txid
        db_pages = header.db_pages
        checksum = header.db_checksum
        commit_time = header.commit_time
        done = False
        highest = db_pages  # the highest page the image holds so far
        for seg, f in _prefetched(driver, p.segments, on_read):
            with f:
                try:
                    sh = read_header(f)
                    verify_key(sh, seg.key)
                    if sh.page_size != page_size:
                        raise ArtefactError(f"page size {sh.page_size} differs from the snapshot's {page_size}")
                    if sh.first_txid > txid + 1:
                        raise ArtefactError(f"starts at txid {sh.first_txid} but the restore is at {txid}")
                    for txn, pgno, data in iter_segment_pages(f, sh, encryption_key=encryption_key):
                        # every page is read so the payload checksum gets verified; only
                        # the transactions the target wants are applied
                        if txn.txid > txid and _wanted(p, txn):
                            pwrite_all(fd, data, (pgno - 1) * page_size)  # a short write is retried, not left torn
                            fetched += len(data)
                            highest = max(highest, pgno)
                    for t in sh.txns:
                        if t.txid <= txid:
                            continue
                        if not _wanted(p, t):
                            done = True
                            break
                        if t.db_pages > highest + 1:
                            # SQLite writes every page a database grows by (but the lock-byte
                            # page): a size past what the image holds is a forged header, and
                            # would have us build and checksum a huge sparse file
                            raise ArtefactError(f"txid {t.txid} claims {t.db_pages} pages but the pages written end at {highest}")
                        txid, db_pages, checksum, commit_time = t.txid, t.db_pages, t.db_checksum, t.commit_time
                except ArtefactError as e:
                    raise RestoreError(f"{seg.key}: {e}") from None
            if done:
                break
        out.truncate(db_pages * page_size)  # fsynced by _verify_file, while it checks
    if p.target_txid is not None and txid != p.target_txid:
        raise RestoreError(f"replica ends at txid {txid} of generation {p.generation}, before the requested txid {p.target_txid}")
    return txid, db_pages, page_size, checksum, commit_time, fetched


# threads that decode and write a snapshot's frames (zstd and pwrite run without the GIL)
DECODE_WORKERS = max(2, min(4, os.cpu_count() or 2))


# bytes per pwrite of a snapshot frame into the page cache. The kernel sizes a new page-cache
# folio by the write, and large folios come from large free blocks: on a VM whose balloon
# reports free memory to the host (virtio-balloon free page reporting, e.g. Firecracker)
# those are the blocks the host has taken back, and filling them costs a host fault per
# page. A 256 MiB restore's build then took 0.4 to 0.9 s instead of 0.12 s: in most
# restores with 4 MiB writes, and in the benchmark's scenario 5 with 1 MiB writes too.
# 32 KiB (8 pages, the largest block the per-CPU free lists keep) never did, for about
# 0.04 s more when nothing is slow (benchmarks/profile.md, section 5).
PAGE_CACHE_WRITE = 32 * 1024


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of data at offset (in PAGE_CACHE_WRITE pieces), then start its writeback
    (the disk writes while the rest is decoded, and the final fsync has little left to
    wait for)."""
    view = memoryview(data).cast("B")
    for at in range(0, view.nbytes, PAGE_CACHE_WRITE):
        pwrite_all(fd, view[at : at + PAGE_CACHE_WRITE], offset + at)
    start_writeback(fd, offset, view.nbytes)


def _verify_file(tmp: Path, p: RestorePlan, result: tuple) -> str:
    """fsync the restored file, and check it: the whole-database checksum (RestoreError on a
    mismatch) and PRAGMA integrity_check (its verdict). The three run side by side (the
    checks read the page cache while the disk writes it back; apsw and fsync release the
    GIL); the file is renamed into place only when all three are done."""
    import threading

    txid, db_pages, page_size, checksum = result[0], result[1], result[2], result[3]
    verdict: list[str] = []
    synced: list[BaseException | None] = []

    def check() -> None:
        try:
            verdict.append(integrity_check(tmp))
        except apsw.Error as e:  # e.g. NotADBError, CorruptError: a failed check, not a crash
            verdict.append(f"{type(e).__name__}: {e}")
        except BaseException as e:  # reported below, never lost in the thread
            verdict.append(f"{type(e).__name__}: {e}")

    def sync() -> None:
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            synced.append(None)
        except BaseException as e:  # noqa: BLE001 - raised below, in the caller's thread
            synced.append(e)

    checker = threading.Thread(target=check, name="integrity-check", daemon=True)
    syncer = threading.Thread(target=sync, name="restore-fsync", daemon=True)
    syncer.start()
    checker.start()
    try:
        actual = file_checksum(tmp, page_size, db_pages)
    finally:
        checker.join()
        syncer.join()
    if synced[0] is not None:
        error = synced[0]
        raise RestoreError(f"cannot write {tmp}: {getattr(error, 'strerror', None) or error} (generation {p.generation})")
    if actual != checksum:
        raise RestoreError(
            f"restored database checksum {actual:016x} does not match the recorded {checksum:016x} at txid {txid} of generation {p.generation}"
        )
    return verdict[0]


PREFETCH_AHEAD = 8  # segments fetched ahead of the one being applied
PREFETCH_BYTES = 8 << 20  # read into memory at most this much of each prefetched segment


def _prefetched(driver: Driver, segments, on_read):
    """(segment, stream) in order, fetched by a few threads ahead of the caller.

    A restore with a long tail from a remote replica is mostly waiting for many small
    objects one after the other; a worker opens each and reads up to PREFETCH_BYTES of it,
    keeping the stream open for the rest, so memory stays bounded by PREFETCH_AHEAD x
    PREFETCH_BYTES. A local replica (file) is read in order on the caller's thread: its
    gets take microseconds, and the workers would only compete for the GIL with the
    caller's page writes (a restore of 226 small segments took 0.08 s with them, 0.04 s
    without)."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    def fetch(seg):
        stream = _open_artefact(driver, seg, on_read)
        try:
            head = stream.read(PREFETCH_BYTES)
        except BaseException:
            stream.close()
            raise
        if len(head) < PREFETCH_BYTES:
            stream.close()
            return _Joined(io.BytesIO(head), None)
        return _Joined(io.BytesIO(head), stream)

    if len(segments) < 2 or Capability.LOCAL in driver.capabilities:
        for seg in segments:
            yield seg, _open_artefact(driver, seg, on_read)
        return
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="restore-fetch")
    pending = []
    try:
        it = iter(segments)
        for seg in it:
            pending.append((seg, pool.submit(fetch, seg)))
            if len(pending) >= PREFETCH_AHEAD:
                break
        while pending:
            seg, fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fetch, nxt)))
            try:
                stream = fut.result()
            except StorageError as e:
                raise RestoreError(f"{seg.key}: {e}") from None
            yield seg, stream
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
        for _, fut in pending:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().close()


class _Joined:
    """A read-only stream: the prefetched head, then the rest of the artefact's stream."""

    def __init__(self, head, rest) -> None:
        self._head, self._rest = head, rest

    def read(self, n: int = -1) -> bytes:
        data = self._head.read(n)
        if self._rest is None or (n >= 0 and len(data) == n):
            return data
        more = self._rest.read(-1 if n < 0 else n - len(data))
        return data + more if data else more

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._rest is not None:
            self._rest.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wanted(p: RestorePlan, txn) -> bool:
    if p.target_txid is not None and txn.txid > p.target_txid:
        return False
    if p.target_time is not None and txn.commit_time > p.target_time:
        return False
    return True
