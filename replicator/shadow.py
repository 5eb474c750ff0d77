"""The shadow log: a local directory holding the capture position and the artefacts not yet
on every replica.

    <shadow>/state.json                 CaptureState: generation, txid, database checksum, WAL position
    <shadow>/pagehash                   per-page hashes behind the incremental database checksum
    <shadow>/generations/...            artefacts, same keys as on a replica (replicator.keys)
    <shadow>/tmp/                       spool files of artefacts being built

Artefacts are written durably (fsync, rename, directory fsync) before any shipper sees them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from replicator import keys
from replicator.artefact import EncodedArtefact
from replicator.fsutil import fsync_dir, write_atomic

STATE_VERSION = 1


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
        d = asdict(self)
        d["version"] = STATE_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CaptureState":
        if d.get("version") != STATE_VERSION:
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

    File: 64-byte header (generation id, txid) then one little-endian u64 per page.
    """

    HEADER = 64

    def __init__(self, path: Path):
        self.path = path
        self._mm: np.memmap | None = None
        self._capacity = 0

    def _map(self, pages: int) -> None:
        if self._mm is not None and pages <= self._capacity:
            return
        capacity = max(1024, pages, self._capacity * 2)
        if self._mm is not None:
            self._mm.flush()
            del self._mm
            self._mm = None
        size = self.HEADER + capacity * 8
        with open(self.path, "r+b" if self.path.exists() else "w+b") as f:
            if os.fstat(f.fileno()).st_size < size:
                f.truncate(size)
        self._mm = np.memmap(self.path, dtype="<u8", mode="r+", offset=self.HEADER, shape=(capacity,))
        self._capacity = capacity

    def reset(self, generation: str, txid: int, hashes: np.ndarray) -> None:
        """Replace the whole table (a new snapshot)."""
        self.close()
        self.path.unlink(missing_ok=True)
        self._capacity = 0
        self._map(len(hashes))
        assert self._mm is not None
        self._mm[: len(hashes)] = hashes
        self._mm[len(hashes) :] = 0
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
        with open(self.path, "r+b") as f:
            f.write(head)

    def get(self, pgno: int) -> int:
        if self._mm is None or pgno > self._capacity:
            return 0
        return int(self._mm[pgno - 1])

    def update(self, changes: dict[int, int], db_pages: int) -> None:
        """Apply page -> hash changes and drop pages past db_pages."""
        self._map(db_pages)
        assert self._mm is not None
        if changes:
            idx = np.fromiter((p - 1 for p in changes), dtype=np.int64, count=len(changes))
            vals = np.fromiter(changes.values(), dtype=np.uint64, count=len(changes))
            self._mm[idx] = vals
        self._mm[db_pages:] = 0

    def checksum(self, db_pages: int) -> int:
        if self._mm is None or db_pages == 0:
            return 0
        return int(np.bitwise_xor.reduce(self._mm[:db_pages]))

    def close(self) -> None:
        if self._mm is not None:
            self._mm.flush()
            del self._mm
            self._mm = None


class ShadowLog:
    """The local shadow directory of one database."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        for stale in self.tmp.iterdir():
            stale.unlink(missing_ok=True)
        self.hashes = PageHashes(self.root / "pagehash")

    # -- state --------------------------------------------------------------------------
    def load_state(self) -> CaptureState | None:
        path = self.root / "state.json"
        if not path.exists():
            return None
        try:
            return CaptureState.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            return None

    def save_state(self, state: CaptureState) -> None:
        write_atomic(self.root / "state.json", json.dumps(state.to_json(), sort_keys=True).encode())

    # -- artefacts ----------------------------------------------------------------------
    def path_of(self, key: str) -> Path:
        return self.root / key

    def write(self, key: str, artefact: EncodedArtefact) -> int:
        """Write an artefact durably under key; returns its size."""
        write_atomic(self.path_of(key), artefact.write_to)
        return artefact.size

    def remove(self, key: str) -> None:
        path = self.path_of(key)
        path.unlink(missing_ok=True)

    def list(self) -> list[keys.ArtefactKey]:
        """Every artefact held locally, in (generation, kind, txid) order."""
        out = []
        base = self.root / keys.GENERATIONS
        if not base.exists():
            return out
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
        shutil.rmtree(self.root / keys.GENERATIONS / generation, ignore_errors=True)

    def size(self) -> int:
        """Bytes held by artefacts."""
        total = 0
        for a in self.list():
            try:
                total += self.path_of(a.key).stat().st_size
            except FileNotFoundError:
                pass
        return total

    def sync_dirs(self) -> None:
        fsync_dir(self.root)
