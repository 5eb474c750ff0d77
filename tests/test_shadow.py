"""The shadow log's durable state: two checksummed slots written in turn, so a torn write
leaves the previous state; state.json of earlier versions is still read."""

from __future__ import annotations

import json
from dataclasses import replace

from replicator.shadow import CaptureState, ShadowLog, WalPosition, read_state


def _state(txid: int) -> CaptureState:
    return CaptureState("20261122T000000000000Z-abcd", txid, 4096, 10 + txid, 0xDEADBEEF ^ txid, 1.5 + txid,
                        WalPosition(1, 2, 3 * txid, 4, 5, False, 4096, txid))


def test_state_round_trips_and_the_newest_slot_wins(tmp_path):
    log = ShadowLog(tmp_path / "s")
    assert log.load_state() is None
    for txid in range(1, 6):
        log.save_state(_state(txid))
        assert log.load_state() == _state(txid)
    log.release()
    # a new ShadowLog (an agent restart) continues the sequence in the right slot
    again = ShadowLog(tmp_path / "s")
    assert again.load_state() == _state(5)
    again.save_state(_state(6))
    assert read_state(tmp_path / "s") == _state(6)
    assert (tmp_path / "s" / "state").stat().st_size == 4096


def test_a_torn_state_write_leaves_the_previous_state(tmp_path):
    log = ShadowLog(tmp_path / "s")
    log.save_state(_state(1))
    log.save_state(_state(2))
    path = tmp_path / "s" / "state"
    data = bytearray(path.read_bytes())
    newest = 0 if data[4:12] == (2).to_bytes(8, "little") else 2048  # sequence 2 sits in slot 0
    data[newest + 40] ^= 0x55  # damage the newest record: its checksum fails
    path.write_bytes(bytes(data))
    assert read_state(tmp_path / "s") == _state(1)
    data[(2048 - newest) + 40] ^= 0x55  # both damaged: no state (the agent starts a generation)
    path.write_bytes(bytes(data))
    assert read_state(tmp_path / "s") is None


def test_state_json_of_earlier_versions_is_read_and_then_superseded(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / "state.json").write_text(json.dumps(_state(7).to_json()))
    log = ShadowLog(root)
    assert log.load_state() == _state(7)
    log.save_state(replace(_state(7), txid=8))
    assert read_state(root).txid == 8


def test_artefact_directories_are_created_and_written_durably(tmp_path):
    from replicator.artefact import SegmentWriter

    log = ShadowLog(tmp_path / "s")
    w = SegmentWriter("20261122T000000000000Z-abcd", 4096, codec="zstd", level=3)
    w.add_txn(1, [(1, bytes(4096))], db_pages=1, commit_time=1.0, db_checksum=1)
    artefact = w.finish(created=1.0)
    key = "generations/20261122T000000000000Z-abcd/segments/0000000000000001-0000000000000001.1000.segment"
    assert log.write(key, artefact) == artefact.size
    assert log.path_of(key).read_bytes() == artefact.to_bytes()
    assert [a.key for a in log.list()] == [key]
    log.drop_generation("20261122T000000000000Z-abcd")
    assert log.list() == []
    log.close()


def test_scratch_directories_left_in_tmp_by_a_killed_drill_are_cleared_at_start(tmp_path):
    root = tmp_path / "s"
    ShadowLog(root).release()
    (root / "tmp" / "replicator-verify-x" / "sub").mkdir(parents=True)
    (root / "tmp" / "replicator-verify-x" / "sub" / "latest.db").write_bytes(b"x")
    (root / "tmp" / "spool-1").write_bytes(b"y")
    ShadowLog(root).release()  # an agent start: no IsADirectoryError, nothing stale left
    assert list((root / "tmp").iterdir()) == []


def test_one_agent_per_shadow_directory(tmp_path):
    import pytest

    from replicator.shadow import ShadowLocked

    first = ShadowLog(tmp_path / "s")
    with pytest.raises(ShadowLocked, match=r"in use by another replicator agent \(pid \d+\)"):
        ShadowLog(tmp_path / "s")
    first.release()
    ShadowLog(tmp_path / "s").release()  # free again once released


def test_page_hashes_park_and_map_again_at_the_same_capacity(tmp_path):
    """An idle database unmaps its page-hash table (the map holds an fd); the next use maps
    the file again, with every hash and the position as they were, and no larger."""
    import array
    import os

    from replicator.shadow import PageHashes

    ph = PageHashes(tmp_path / "pagehash")
    ph.reset("gen-a", 7, array.array("Q", range(1, 1501)))
    size = (tmp_path / "pagehash").stat().st_size
    cks = ph.checksum(1500)
    fds = len(os.listdir("/proc/self/fd"))
    ph.park()
    assert ph.parked and len(os.listdir("/proc/self/fd")) <= fds - 1
    assert ph.get(1500) == 1500 and not ph.parked  # get maps it again
    ph.park()
    assert ph.checksum(1500) == cks  # so does checksum
    ph.park()
    ph.update({3: 99}, 1500)  # and update, which keeps the pages it was not given
    assert ph.get(3) == 99 and ph.get(4) == 4
    ph.park()
    ph.set_position("gen-a", 8)
    ph.park()
    assert (tmp_path / "pagehash").stat().st_size == size  # never grown by mapping again
    again = PageHashes(tmp_path / "pagehash")
    assert again.load() == ("gen-a", 8) and again.get(3) == 99 and again.get(1500) == 1500
    ph.update({1600: 5}, 1600)  # growing past the capacity still works after a park
    assert ph.get(1600) == 5 and ph.get(1500) == 1500
    ph.close()
    again.close()


def test_page_hashes_packed_path_writes_the_same_file(tmp_path, monkeypatch):
    """The table's file is little-endian u64 whatever the machine: the path taken where a
    native cast would not be little-endian (struct packing) writes the same bytes and
    reads the same values as the cast."""
    import array

    from replicator import shadow
    from replicator.shadow import PageHashes

    def exercise(path):
        ph = PageHashes(path)
        ph.reset("gen-b", 3, array.array("Q", [(i * 0x9E3779B97F4A7C15) & (2**64 - 1) for i in range(1, 2001)]))
        ph.update({5: 2**64 - 1, 2500: 42}, 2500)  # grows past the capacity
        ph.update({7: 1}, 1800)  # shrinks: pages past 1800 drop out
        out = (ph.get(5), ph.get(7), ph.get(1800), ph.get(1801), ph.get(2500), ph.checksum(1800))
        ph.close()
        return out, path.read_bytes()

    native = exercise(tmp_path / "native")
    monkeypatch.setattr(shadow, "_LITTLE", False)
    packed = exercise(tmp_path / "packed")
    assert packed == native
    assert native[0][:5] == (2**64 - 1, 1, (1800 * 0x9E3779B97F4A7C15) & (2**64 - 1), 0, 0)


# -- the segment log: one record per segment, holding the segment and the state after it --

GEN = "20261122T000000000000Z-abcd"


def _segment(txid: int, payload: int = 1):
    from replicator.artefact import SegmentWriter

    w = SegmentWriter(GEN, 4096, codec="zstd", level=3)
    w.add_txn(txid, [(p, bytes([txid % 251]) * 4096) for p in range(1, payload + 1)], db_pages=payload, commit_time=float(txid), db_checksum=txid)
    return w.finish(created=float(txid))


def _seg_key(txid: int) -> str:
    return f"generations/{GEN}/segments/{txid:016x}-{txid:016x}.{1000 + txid}.segment"


def _append(log: ShadowLog, txid: int, payload: int = 1, in_memory: bool = True) -> bytes:
    artefact = _segment(txid, payload)
    try:
        data = artefact.in_memory() if in_memory else None
        assert log.append_segment(_seg_key(txid), artefact, data, _state(txid)) == artefact.size
        return artefact.to_bytes()
    finally:
        artefact.close()


def _log_paths(root):
    return sorted((root / "generations" / GEN / "log").glob("*.log"))


def test_a_segment_and_its_state_are_one_record_read_back_after_a_restart(tmp_path):
    root = tmp_path / "s"
    log = ShadowLog(root)
    log.save_state(_state(0))
    written = {t: _append(log, t, in_memory=t % 2 == 0) for t in range(1, 5)}
    assert log.load_state() == _state(4)
    assert [a.key for a in log.list()] == [_seg_key(t) for t in range(1, 5)]
    for t, data in written.items():
        with log.open(_seg_key(t)) as f:
            assert f.read() == data
        assert log.size_of(_seg_key(t)) == len(data)
    assert not list((root / "generations" / GEN).glob("segments/*"))  # no file per segment
    assert len(_log_paths(root)) == 1
    log.release()
    again = ShadowLog(root)  # an agent restart
    assert again.load_state() == _state(4) and read_state(root) == _state(4)
    assert [a.key for a in again.list()] == [_seg_key(t) for t in range(1, 5)]
    with again.open(_seg_key(3)) as f:
        assert f.read() == written[3]
    _append(again, 5)  # into a new log file; the sequence goes on
    assert again.load_state() == _state(5)
    again.release()
    assert read_state(root) == _state(5) and len(_log_paths(root)) == 2


def test_a_record_torn_by_a_crash_is_ignored_and_the_state_before_it_stands(tmp_path):
    root = tmp_path / "s"
    log = ShadowLog(root)
    log.save_state(_state(0))
    for t in range(1, 4):
        _append(log, t, payload=3)
    log.release()
    path = _log_paths(root)[0]
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the last record loses its tail: written, not synced
        f.truncate(size - 100)
    assert read_state(root) == _state(2)
    again = ShadowLog(root)
    assert again.load_state() == _state(2)
    assert [a.key for a in again.list()] == [_seg_key(1), _seg_key(2)]
    _append(again, 3)  # captured again from the WAL
    again.release()
    third = ShadowLog(root)
    assert third.load_state() == _state(3)
    assert [a.key for a in third.list()] == [_seg_key(1), _seg_key(2), _seg_key(3)]
    # a flipped byte in a record's segment fails its checksum the same way
    third.release()
    newest = _log_paths(root)[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x40
    newest.write_bytes(bytes(data))
    assert read_state(root) == _state(2)


def test_a_newer_state_slot_supersedes_the_records(tmp_path):
    root = tmp_path / "s"
    log = ShadowLog(root)
    _append(log, 1)
    _append(log, 2)
    restarted = replace(_state(2), wal=None)  # e.g. the WAL restarted: a state-only change
    log.save_state(restarted)
    assert log.load_state() == restarted
    log.release()
    assert ShadowLog(root).load_state() == restarted and read_state(root) == restarted


def test_a_log_file_goes_once_its_segments_shipped_and_a_newer_record_holds_the_state(tmp_path, monkeypatch):
    import replicator.shadow as shadow_mod

    monkeypatch.setattr(shadow_mod, "LOG_ROLL_BYTES", 1)  # a log file per record
    root = tmp_path / "s"
    log = ShadowLog(root)
    for t in range(1, 4):
        _append(log, t)
    assert len(_log_paths(root)) == 3
    log.remove(_seg_key(1))
    assert len(_log_paths(root)) == 2  # shipped everywhere, and state 3 is newer
    log.remove(_seg_key(3))
    assert len(_log_paths(root)) == 2  # shipped, but it holds the newest state
    log.remove(_seg_key(2))
    assert len(_log_paths(root)) == 1
    log.release()
    again = ShadowLog(root)
    # the log kept for the state lists its shipped segment again (the shippers find it on
    # their replicas, or below what they hold, and do not upload it twice)
    assert again.load_state() == _state(3) and [a.key for a in again.list()] == [_seg_key(3)]
    again.remove(_seg_key(3))
    _append(again, 4)
    assert len(_log_paths(root)) == 1  # the old one held nothing needed any more
    assert again.load_state() == _state(4)
    again.drop_generation(GEN)
    assert again.list() == [] and _log_paths(root) == []
    again.release()


def test_a_failed_append_leaves_nothing_and_the_next_one_goes_in_its_place(tmp_path, monkeypatch):
    import os

    import pytest

    root = tmp_path / "s"
    log = ShadowLog(root)
    _append(log, 1)
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 2:  # mid-record: the disk is full
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(OSError, match=r"shadow directory .*: cannot write .*No space left on device"):
        _append(log, 2, payload=2)
    monkeypatch.setattr(os, "pwrite", real)
    assert log.load_state() == _state(1) and [a.key for a in log.list()] == [_seg_key(1)]
    _append(log, 2)
    log.release()
    again = ShadowLog(root)
    assert again.load_state() == _state(2)
    assert [a.key for a in again.list()] == [_seg_key(1), _seg_key(2)]
    again.release()


def test_segment_files_of_earlier_versions_are_still_read_and_removed(tmp_path):
    root = tmp_path / "s"
    log = ShadowLog(root)
    artefact = _segment(1)
    try:
        log.write(_seg_key(1), artefact)  # as versions before the log wrote every segment
        data = artefact.to_bytes()
    finally:
        artefact.close()
    _append(log, 2)
    assert [a.key for a in log.list()] == [_seg_key(1), _seg_key(2)]
    with log.open(_seg_key(1)) as f:
        assert f.read() == data
    assert log.size_of(_seg_key(1)) == len(data)
    log.remove(_seg_key(1))
    assert not log.path_of(_seg_key(1)).exists()
    assert [a.key for a in log.list()] == [_seg_key(2)]
    log.release()


def test_a_state_of_the_version_before_the_log_is_resumed_from(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / "state.json").write_text(json.dumps({**_state(7).to_json(), "version": 1}))
    assert read_state(root) == _state(7)
    (root / "state.json").write_text(json.dumps({**_state(7).to_json(), "version": 99}))
    assert read_state(root) is None  # not understood: the agent starts a new generation


def test_unshipped_segments_across_rolled_log_files_survive_a_restart_in_order(tmp_path, monkeypatch):
    """A replica down for a while: the backlog spans several log files; after a restart
    every segment is listed in txid order and reads back whole, then the files go as the
    segments ship."""
    import replicator.shadow as shadow_mod

    monkeypatch.setattr(shadow_mod, "LOG_ROLL_BYTES", 3000)  # a few records per file
    root = tmp_path / "s"
    log = ShadowLog(root)
    log.save_state(_state(0))
    written = {t: _append(log, t, payload=2) for t in range(1, 13)}
    assert len(_log_paths(root)) >= 3
    log.release()
    again = ShadowLog(root)
    assert again.load_state() == _state(12)
    assert [a.key for a in again.list()] == [_seg_key(t) for t in range(1, 13)]
    for t, data in written.items():
        with again.open(_seg_key(t)) as f:
            assert f.read() == data
    for t in range(1, 12):
        again.remove(_seg_key(t))
    assert len(_log_paths(root)) == 1  # only the file holding the newest state
    again.release()
