"""The database image at a pinned read transaction: the database file overlaid with the WAL
frames the transaction sees, streamed in chunks with one xxh3 hash per page.

Capture uses it for snapshots; `replicator verify` uses it to checksum a live database.
"""

from __future__ import annotations

import array
import os
import sys
import time
from pathlib import Path
from typing import Callable

import xxhash

from replicator.artefact import xor_of_u64
from replicator.sqlite_access import SqliteAccess
from replicator.walindex import WalIndexHeader
from replicator.walreader import ChainPos, FrameInfo, WalError, WalHeader, parse_wal_header, read_page, scan_frames


def wal_header(wal_fd: int | None) -> WalHeader | None:
    """The -wal file's header when it is valid, else None."""
    if wal_fd is None:
        return None
    try:
        h = parse_wal_header(os.pread(wal_fd, 32, 0))
    except WalError:
        return None
    return h if h is not None and h.valid else None


def pinned_frames(sql: SqliteAccess, wal_fd: int | None) -> tuple[WalIndexHeader, WalHeader | None, list[FrameInfo]] | None:
    """Pin and read the frames 1..V of the pinned view (V = its mx_frame); None to retry."""
    view = sql.pin()
    if view is None:
        return None
    header = wal_header(wal_fd)
    if view.mx_frame == 0:
        return view, header, []
    if header is None or header.salts != view.salts:
        return None
    assert wal_fd is not None
    frames = list(scan_frames(wal_fd, header, ChainPos.start(header), end_index=view.mx_frame, vouched=view))
    if not frames or frames[-1].index != view.mx_frame or not frames[-1].is_commit:
        return None
    return view, header, frames


def read_image(
    db_fd: int,
    wal_fd: int | None,
    page_size: int,
    db_pages: int,
    overlay: dict[int, int],
    sink: Callable[[memoryview], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> array.array:
    """Stream the image (db file pages, replaced by the WAL frames in overlay: page -> frame
    index) to sink in chunks of about 4 MiB; returns the per-page hashes (an array of
    unsigned 64-bit integers, index = page - 1). progress, if given, gets the bytes of
    each chunk once the sink has taken it."""
    hashes = array.array("Q")
    chunk_pages = max(1, (4 << 20) // page_size)
    overlay_sorted = sorted(overlay)
    oi = 0
    h = xxhash.xxh3_64_intdigest
    for first in range(1, db_pages + 1, chunk_pages):
        n = min(chunk_pages, db_pages - first + 1)
        buf = bytearray(os.pread(db_fd, n * page_size, (first - 1) * page_size))
        if len(buf) < n * page_size:
            buf.extend(bytes(n * page_size - len(buf)))
        while oi < len(overlay_sorted) and overlay_sorted[oi] < first + n:
            p = overlay_sorted[oi]
            if p >= first:
                assert wal_fd is not None
                off = (p - first) * page_size
                buf[off : off + page_size] = read_page(wal_fd, page_size, overlay[p])
            oi += 1
        mv = memoryview(buf)
        hashes.extend([h(mv[i * page_size : (i + 1) * page_size], seed=first + i) for i in range(n)])
        if sink is not None:
            sink(mv)
        if progress is not None:
            progress(n * page_size)
    return hashes


def checksum_of(hashes: array.array) -> int:
    """The whole-database checksum: XOR of the per-page hashes (0 for an empty database)."""
    return xor_of_u64(hashes, sys.byteorder)


class LiveImageError(Exception):
    """The live database could not be read consistently; one line."""


def live_checksum(db_path: Path, attempts: int = 20) -> tuple[int, int, int]:
    """(checksum, db_pages, page_size) of a live WAL database at one read transaction.

    Opens its own connections and fds, so it must run in a process other than the agent
    (closing an fd on the database drops the process's POSIX locks). Never writes or
    checkpoints.
    """
    from replicator.sqlite_access import DatabaseUnavailable

    sql = SqliteAccess(Path(db_path))
    try:
        sql.open()
    except DatabaseUnavailable as e:
        raise LiveImageError(str(e)) from None
    wal_fd = None
    try:
        try:
            wal_fd = os.open(sql.wal_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            wal_fd = None
        for _ in range(attempts):
            got = pinned_frames(sql, wal_fd)
            if got is None:
                time.sleep(0.01)
                continue
            view, header, frames = got
            page_size = header.page_size if header is not None else sql.page_size
            assert sql.db_fd is not None
            db_pages = frames[-1].commit if frames else os.fstat(sql.db_fd).st_size // page_size
            overlay = {f.pgno: f.index for f in frames}
            hashes = read_image(sql.db_fd, wal_fd, page_size, db_pages, overlay)
            if not sql.pinned:
                after = sql.index.read()
                if after is None or (after.salts, after.n_backfill) != (view.salts, view.n_backfill):
                    continue
            return checksum_of(hashes), db_pages, page_size
        raise LiveImageError(f"could not read {db_path} consistently: the WAL kept changing")
    finally:
        sql.close()
        if wal_fd is not None:
            os.close(wal_fd)
