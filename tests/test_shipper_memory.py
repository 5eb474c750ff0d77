"""The bytes capture hands to the shippers with each small segment: uploaded as they are,
within one budget for the whole process, released when uploaded or when a shipper stops."""

from __future__ import annotations

import os
import time

from replicas import open_driver
from replicator import keys, logs
from replicator.shadow import ShadowLog
from replicator.shipper import ReplicaShipper


def _shipper(tmp_path, name: str) -> tuple[ReplicaShipper, ShadowLog]:
    shadow = ShadowLog(tmp_path / f"shadow-{name}")
    driver = open_driver(f"mem://{name}-{os.getpid()}-{time.monotonic_ns()}")
    return ReplicaShipper(name, driver, shadow, retention=3600, retention_check_interval=3600, log=logs.get(), db="app.db"), shadow


def test_held_bytes_are_uploaded_and_bounded_by_one_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(ReplicaShipper, "MEMORY_BUDGET", 3000)
    monkeypatch.setattr(ReplicaShipper, "_held_total", 0)
    a, shadow_a = _shipper(tmp_path, "a")
    b, shadow_b = _shipper(tmp_path, "b")
    gen = keys.new_generation_id(time.time())
    segs = [keys.ArtefactKey(gen, keys.SEGMENT, i, i, 1000 + i) for i in range(1, 5)]
    blobs = [bytes([i]) * 1000 for i in range(1, 5)]
    for key, blob in zip(segs, blobs):
        path = shadow_a.path_of(key.key)  # the shadow copy, for what is not held in memory
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    for key, blob in zip(segs[:2], blobs[:2]):
        a.offer(key, first_commit_time=time.time(), size=len(blob), data=blob)
    for key, blob in zip(segs[2:], blobs[2:]):  # another shipper: the budget is shared
        b.offer(key, first_commit_time=time.time(), size=len(blob), data=blob)
    held = [p.data is not None for p in (*a.pending, *b.pending)]
    assert held == [True, True, True, False]  # 3000 bytes at most, all shippers together
    assert ReplicaShipper._held_total == 3000
    for item in list(a.pending):
        assert a.upload(item)
    assert ReplicaShipper._held_total == 1000  # released as uploaded
    assert [a.driver.get_bytes(k.key) for k in segs[:2]] == blobs[:2]
    b.stop(timeout=0)  # never started: what it holds is given back
    assert ReplicaShipper._held_total == 0
    assert all(p.data is None for p in b.pending)


def test_at_start_segments_below_what_the_replica_holds_are_not_uploaded_again(tmp_path):
    """The shadow log's newest log file is kept for the capture state it holds, so after a
    restart it lists segments already shipped; one the replica pruned since (retention) must
    not come back. Uploads go in order: what lies below the replica's newest artefact of the
    generation was uploaded before."""
    from replicator.artefact import SegmentWriter
    from replicator.shadow import CaptureState

    a, shadow = _shipper(tmp_path, "a")
    gen = keys.new_generation_id(time.time())
    segs = [keys.ArtefactKey(gen, keys.SEGMENT, i, i, 1000 + i) for i in range(1, 5)]
    for k in segs:
        w = SegmentWriter(gen, 4096, codec="zstd", level=1)
        w.add_txn(k.first_txid, [(1, bytes(4096))], db_pages=1, commit_time=1.0, db_checksum=1)
        art = w.finish(created=1.0)
        shadow.append_segment(k.key, art, art.in_memory(), CaptureState(gen, k.last_txid, 4096, 1, 1, 1.0, None))
        art.close()
    a.driver.put(segs[2].key, b"x")  # the replica holds 3 (1 and 2 were pruned); 4 never arrived
    a.load(shadow.list(), gen)
    assert [p.key for p in a.pending] == [segs[3]]
    assert all(a.has(k) for k in segs[:3])
    shadow.release()
