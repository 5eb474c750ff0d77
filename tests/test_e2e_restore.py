"""End to end: a real writer process, a real agent process, a file replica, a real restore."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import (
    has_snapshot,
    restore_equals_source,
    AgentProcess,
    cli,
    integrity,
    rows,
    wait_for,
    write,
    write_config,
)



@pytest.mark.parametrize("page_size", [1024, 4096, 65536])
def test_restore_equals_source_page_for_page(tmp_path, page_size):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"]], page_size=page_size)
    with AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        write(db, [["insert", 150, 300], ["batch", 200, 500], ["update", 50], ["delete_fraction", 0.3], ["insert", 30, 2000]], lib="apsw")
        assert agent.stop() == 0
    out = restore_equals_source(tmp_path, replica, db)
    assert rows(out) == rows(db)
    assert not list(tmp_path.glob(".restored.db.tmp-*"))


def test_point_in_time_by_txid_and_timestamp(tmp_path):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"]])
    with AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        write(db, [["insert_rate", 40, 100, 50]], lib="apsw")
        assert agent.stop() == 0
    gens = json.loads(cli("generations", "--json", f"file://{replica}", check=True).stdout)
    assert len(gens) == 1, gens
    times = {}
    for k in (0, 1, 7, 23, 40):
        out = tmp_path / f"at-{k}.db"
        cli("restore", "--txid", str(k), "-o", str(out), f"file://{replica}", check=True)
        assert rows(out) == list(range(1, k + 1)), f"txid {k}"
        assert integrity(out) == "ok"
    # the time of each commit, from the segment headers, drives timestamp restores
    from replicas import open_driver
    from replicator.restore import list_artefacts
    from replicator.artefact import read_header

    d = open_driver(f"file://{replica}")
    for key in list_artefacts(d):
        with d.get(key.key) as f:
            h = read_header(f)
        for t in h.txns:
            times[t.txid] = t.commit_time
    # Commit times are observed by capture; commits captured in one step (under load, one
    # sync-interval) share a time, and --txid is the exact way to name them. Every
    # boundary between two observed times is a timestamp restore point.
    from datetime import datetime, timezone

    boundaries = [k for k in range(1, 40) if times[k] < times[k + 1]]
    assert len(boundaries) >= 20, boundaries
    for k in boundaries[:: max(1, len(boundaries) // 6)]:
        mid = (times[k] + times[k + 1]) / 2
        stamp = datetime.fromtimestamp(mid, timezone.utc).isoformat().replace("+00:00", "Z")
        out = tmp_path / f"time-{k}.db"
        cli("restore", "--timestamp", stamp, "-o", str(out), f"file://{replica}", check=True)
        assert rows(out) == list(range(1, k + 1)), f"time after txid {k}"


def test_app_checkpoints_every_mode_while_writing(tmp_path):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"]])
    cfg = write_config(tmp_path / "r.yml", db, f"file://{replica}", min_checkpoint_page_count=20, checkpoint_interval="1s")
    with AgentProcess("-c", str(cfg), log=tmp_path / "agent.log") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        steps = []
        for mode in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            steps += [["insert", 25, 400], ["checkpoint", mode], ["batch", 50, 300]]
        steps += [["autocheckpoint", 2], ["insert", 60, 700], ["update", 40]]
        write(db, steps, lib="apsw")
        assert agent.stop() == 0
    restore_equals_source(tmp_path, replica, db)


def _replica_of_a_vacuumed_database(tmp_path) -> tuple[Path, Path]:
    """A database snapshotted at 2,000 rows, then 90 % deleted and VACUUMed (its tail
    shrinks it well below the snapshot) with 20 rows more, and its file replica."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"], ["batch", 2000, 800]])
    with AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        write(db, [["delete_fraction", 0.9], ["vacuum"], ["insert", 20, 100]], lib="apsw")
        assert agent.stop() == 0
    return db, replica


def test_vacuum_and_shrinking_database(tmp_path):
    db, replica = _replica_of_a_vacuumed_database(tmp_path)
    restore_equals_source(tmp_path, replica, db)


def test_existing_target_refused_and_force_replaces(tmp_path):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"], ["insert", 5, 10]])
    with AgentProcess(str(db), f"file://{replica}") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        assert agent.stop() == 0
    out = tmp_path / "out.db"
    out.write_bytes(b"precious")
    p = cli("restore", "-o", str(out), f"file://{replica}")
    assert p.returncode != 0 and "already exists" in p.stderr and "Traceback" not in p.stderr
    assert out.read_bytes() == b"precious"
    p = cli("restore", "--if-db-not-exists", "-o", str(out), f"file://{replica}")
    assert p.returncode == 0 and out.read_bytes() == b"precious"
    Path(f"{out}-wal").write_bytes(b"stale wal")
    cli("restore", "--force", "-o", str(out), f"file://{replica}", check=True)
    assert not Path(f"{out}-wal").exists()
    assert rows(out) == [2, 3, 4, 5, 6]  # the schema was commit 1


def test_if_replica_exists_and_dry_run(tmp_path):
    out = tmp_path / "out.db"
    p = cli("restore", "--if-replica-exists", "-o", str(out), f"file://{tmp_path / 'empty'}")
    assert p.returncode == 0, p.stderr
    assert not out.exists()
    p = cli("restore", "-o", str(out), f"file://{tmp_path / 'empty'}")
    assert p.returncode == 1 and "nothing to restore" in p.stderr and "Traceback" not in p.stderr
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"], ["insert", 3, 10]])
    with AgentProcess(str(db), f"file://{replica}") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        write(db, [["insert", 3, 10]])
        assert agent.stop() == 0
    p = cli("restore", "--dry-run", "-o", str(out), f"file://{replica}", check=True)
    assert "snapshot:" in p.stdout and "segment:" in p.stdout and not out.exists()


def test_listings(tmp_path):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"]])
    with AgentProcess(str(db), f"file://{replica}") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        write(db, [["insert", 10, 10]])
        assert agent.stop() == 0
    gens = json.loads(cli("generations", "--json", f"file://{replica}", check=True).stdout)
    assert len(gens) == 1 and gens[0]["restorable"] and gens[0]["last_txid"] == 10
    snaps = json.loads(cli("snapshots", "--json", f"file://{replica}", check=True).stdout)
    assert [s["txid"] for s in snaps] == [0]
    segs = json.loads(cli("segments", "--json", f"file://{replica}", check=True).stdout)
    covered = sorted(t for s in segs for t in range(s["first_txid"], s["last_txid"] + 1))
    assert covered == list(range(1, 11))
    text = cli("segments", f"file://{replica}", check=True).stdout
    assert text.splitlines()[0].split()[:2] == ["REPLICA", "GENERATION"]
    assert cli("--version", check=True).stdout.startswith("replicator ")


def test_snapshot_of_many_frames_restores_page_for_page(tmp_path):
    """A 14 MiB database: its snapshot is four zstd frames, which the restore decodes and
    writes on several threads. The result is page-identical; a damaged frame in the middle
    fails the restore, naming the snapshot, and leaves nothing behind."""
    from replicator import artefact as A

    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"], ["batch", 3500, 4000]])
    with AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        write(db, [["update", 40], ["insert", 20, 700]], lib="apsw")
        assert agent.stop() == 0
    (snap,) = replica.rglob("*.snapshot")
    data = snap.read_bytes()
    h = A.parse_header_bytes(data)
    assert h.codec == "zstd-frames" and len(h.frames) >= 4, (h.codec, h.frames)
    restore_equals_source(tmp_path, replica, db)

    bad = bytearray(data)
    middle = A.header_end(data) + sum(h.frames[:2]) + h.frames[2] // 2
    bad[middle] ^= 0x40
    snap.write_bytes(bytes(bad))
    out = tmp_path / "again.db"
    p = cli("restore", "-o", str(out), f"file://{replica}")
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and snap.name in p.stderr and "payload checksum mismatch" in p.stderr, p.stderr
    assert not out.exists() and not list(tmp_path.glob(".again.db.tmp-*"))


def test_restore_from_a_url_loads_neither_the_metrics_server_nor_yaml(tmp_path):
    """A restore in an init step starts fast: restoring from a replica URL imports neither
    prometheus-client (with http.server) nor PyYAML, which only the agent and config files
    need, nor asyncio and ssl, which only the NATS and S3 drivers need, nor the config
    module (with its duration parsing and key handling) or hashlib, which only encrypted
    artefacts need."""
    import subprocess
    import sys
    import time

    from harness import ROOT, checkpoint, env
    from replicator import artefact as A, keys

    db, replica = tmp_path / "src.db", tmp_path / "replica"
    write(db, [["schema"], ["insert", 20, 300]])
    checkpoint(db)
    image = db.read_bytes()
    now = time.time()
    gen = keys.new_generation_id(now)
    key = keys.snapshot_key(gen, 0, int(now * 1000))
    (replica / key).parent.mkdir(parents=True)
    (replica / key).write_bytes(A.encode_snapshot(gen, 0, 4096, image, commit_time=now))
    out = tmp_path / "out.db"
    code = (
        "import sys; from replicator.cli import main; "
        f"rc = main(['restore', '-o', {str(out)!r}, {replica.as_uri()!r}]); "
        "print(rc, sorted(m for m in ('prometheus_client', 'http.server', 'yaml', 'asyncio', 'ssl', 'replicator.config', 'hashlib', 'secrets', 'tempfile') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT)
    assert p.stdout.strip() == "0 []", (p.stdout, p.stderr)
    assert out.read_bytes() == image


def test_snapshot_writes_in_pieces_and_the_checksum_reads_back(tmp_path):
    """A decoded snapshot frame goes into the page cache in PAGE_CACHE_WRITE pieces (small
    folios, see replicator.restore): every byte lands at its offset, whatever the frame's
    length. The whole-database checksum reads the file back through one reused buffer:
    pages past the end of the file count as zeros, as SQLite reads them."""
    import os

    import xxhash

    from replicator import restore as R

    piece = R.PAGE_CACHE_WRITE
    data = os.urandom(3 * piece + 3 * 4096 + 100)  # not a whole number of pieces (nor of pages)
    path = tmp_path / "image"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        R._pwrite_all(fd, data, 8192)
        R._pwrite_all(fd, memoryview(data)[:4096], 0)
    finally:
        os.close(fd)
    body = path.read_bytes()
    assert body == data[:4096] + bytes(4096) + data

    pages = -(-len(body) // 4096) + 2  # two pages past the end of the file
    padded = body + bytes(pages * 4096 - len(body))
    want = 0
    for i in range(pages):
        want ^= xxhash.xxh3_64_intdigest(padded[i * 4096 : (i + 1) * 4096], i + 1)
    assert R.file_checksum(path, 4096, pages) == want
    assert R.file_checksum(path, 4096, 1) == xxhash.xxh3_64_intdigest(body[:4096], 1)


def test_segments_are_fetched_ahead_from_a_remote_replica_and_in_order_from_a_local_one(tmp_path):
    """A restore with a tail of many segments reads a local replica (file) in order on its
    own thread, and fetches ahead on worker threads from any other: both build the same,
    page-identical database."""
    import threading

    from harness import assert_same_pages, checkpoint
    from replicas import Capability, Driver, open_driver
    from replicator import restore as R

    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"]])
    with AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        for i in range(6):
            write(db, [["insert", 40, 300], ["update", 5]], lib="apsw")
        assert agent.stop() == 0
    assert len(list(replica.rglob("*.segment"))) >= 3
    checkpoint(db)

    class Remote(Driver):
        """The file replica, as a driver that does not say it is local; notes each get's thread."""

        scheme = "remote"

        def __init__(self, inner: Driver) -> None:
            self.inner, self.url, self.threads = inner, "remote:" + inner.url, []
            self.capabilities = inner.capabilities & ~Capability.LOCAL  # type: ignore[misc]

        def get(self, key, **kw):
            self.threads.append(threading.current_thread().name)
            return self.inner.get(key, **kw)

        def put(self, *a, **kw):
            return self.inner.put(*a, **kw)

        def head(self, key):
            return self.inner.head(key)

        def list(self, prefix="", **kw):
            return self.inner.list(prefix, **kw)

        def delete(self, key):
            self.inner.delete(key)

    local = open_driver(f"file://{replica}")
    assert Capability.LOCAL in local.capabilities
    remote = Remote(open_driver(f"file://{replica}"))
    real_get, local_threads = local.get, []
    local.get = lambda key, **kw: (local_threads.append(threading.current_thread().name), real_get(key, **kw))[1]
    for name, driver, threads in (("local", local, local_threads), ("remote", remote, remote.threads)):
        out = tmp_path / f"{name}.db"
        R.restore(driver, out)
        assert integrity(out) == "ok"
        assert_same_pages(out, db)
        segment_gets = threads[1:]  # the first get is the snapshot's, on this thread
        assert len(segment_gets) >= 3
        if name == "local":
            assert set(threads) == {threading.current_thread().name}, threads
        else:
            assert all(t.startswith("restore-fetch") for t in segment_gets), threads


def test_the_snapshot_image_is_reserved_in_one_call_and_a_refused_reservation_changes_nothing(tmp_path):
    """A restore reserves the snapshot image's blocks before decoding it (fallocate); the
    tail may then shrink the database below the image, and the file ends at the database's
    size. Where the reservation is refused (a filesystem without fallocate, no room), the
    file is left empty and the restore writes it as before: both restores are
    page-identical to the source."""
    import os

    from harness import assert_same_pages, checkpoint
    from replicas import open_driver
    from replicator import fsutil
    from replicator import restore as R

    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert fsutil.preallocate(fd, 5 * 4096 + 7) is True
        assert os.fstat(fd).st_size == 5 * 4096 + 7
        os.ftruncate(fd, 0)
        assert fsutil.preallocate(fd, 1 << 62) is False  # past the largest file (EFBIG) or the disk
        assert os.fstat(fd).st_size == 0
        assert fsutil.preallocate(fd, 0) is False
    finally:
        os.close(fd)

    db, replica = _replica_of_a_vacuumed_database(tmp_path)
    checkpoint(db)
    driver = open_driver(f"file://{replica}")
    calls: list[tuple[int, bool]] = []
    real = R.preallocate

    def noted(fd: int, length: int) -> bool:
        calls.append((length, real(fd, length)))
        return calls[-1][1]

    R.preallocate = noted
    try:
        out = tmp_path / "reserved.db"
        result = R.restore(driver, out)
        refused = tmp_path / "refused.db"
        looked_up = dict(fsutil._libc_functions)
        fsutil._libc_functions["fallocate"] = lambda fd, mode, offset, length: -1
        try:
            R.restore(driver, refused)
        finally:
            fsutil._libc_functions.clear()
            fsutil._libc_functions.update(looked_up)
    finally:
        R.preallocate = real
    assert [c[1] for c in calls] == [True, False]
    image = calls[0][0]  # the snapshot's whole image, larger than the vacuumed database
    assert image == calls[1][0] and image % result.page_size == 0 and image > out.stat().st_size
    for path in (out, refused):
        assert integrity(path) == "ok"
        assert_same_pages(path, db)
        assert path.stat().st_size == db.stat().st_size


def test_one_shot_commands_exit_without_the_interpreters_teardown_and_lose_no_output(tmp_path):
    """The console script ends a one-shot command (restore, the listings) with os._exit
    once its work is done: an atexit hook never runs, yet every line of its output is
    there (flushed into a pipe) and its exit status is the command's own."""
    import subprocess
    import sys

    from harness import ROOT, env

    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"], ["insert", 30, 200]])
    with AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        assert agent.stop() == 0
    hook = "import atexit, sys; atexit.register(lambda: print('TEARDOWN', file=sys.stderr)); from replicator.cli import run; "

    def run(*args: str) -> subprocess.CompletedProcess:
        code = hook + f"sys.argv = ['replicator', *{list(args)!r}]; run()"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env(), cwd=ROOT)

    listing = run("snapshots", "--json", f"file://{replica}")
    assert listing.returncode == 0 and "TEARDOWN" not in listing.stderr, listing.stderr
    assert len(json.loads(listing.stdout)) >= 1
    out = tmp_path / "out.db"
    restored = run("restore", "-o", str(out), f"file://{replica}")
    assert restored.returncode == 0 and "TEARDOWN" not in restored.stderr, restored.stderr
    assert integrity(out) == "ok" and rows(out) == rows(db)
    refused = run("restore", "-o", str(out), f"file://{replica}")  # exists: refused, exit 2 (a usage error)
    assert refused.returncode == 2 and "already exists" in refused.stderr and "TEARDOWN" not in refused.stderr
    # in process, main() returns its status and leaves the interpreter alone
    code = hook + f"from replicator.cli import main; print('rc', main(['snapshots', '--json', 'file://{replica}']))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env(), cwd=ROOT)
    assert p.stdout.rstrip().endswith("rc 0") and "TEARDOWN" in p.stderr
