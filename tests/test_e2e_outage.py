"""End to end: a replica that fails does not block capture or the other replicas, catches
up in order when it returns, and the shadow log's size bound pauses capture without
losing anything."""

from __future__ import annotations

import time
from pathlib import Path

from harness import AgentProcess, assert_same_pages, checkpoint, cli, has_snapshot, integrity, replica_keys, wait_for, write


def _config(tmp_path: Path, db: Path, extra: str = "") -> Path:
    cfg = tmp_path / "r.yml"
    cfg.write_text(
        f"""dbs:
  - path: {db}
    replicas:
      - name: good
        url: file://{tmp_path}/good
      - name: flaky
        url: file://{tmp_path}/flaky
{extra}"""
    )
    return cfg


def _break(replica: Path) -> None:
    """Make every upload to a file replica fail: its root is a plain file."""
    replica.write_bytes(b"not a directory")


def _mend(replica: Path) -> None:
    replica.unlink()


def test_a_failing_replica_does_not_hold_back_the_others(tmp_path):
    db = tmp_path / "app.db"
    good, flaky = tmp_path / "good", tmp_path / "flaky"
    write(db, [["schema"]])
    _break(flaky)
    log = tmp_path / "agent.log"
    with AgentProcess("-c", str(_config(tmp_path, db)), log=log) as agent:
        wait_for(lambda: has_snapshot(good), what="snapshot on the good replica")
        write(db, [["insert", 40, 200]], lib="apsw")
        # the good replica has every commit while the other one is down
        wait_for(lambda: sum(1 for k in replica_keys(good) if k.endswith(".segment")) > 0, what="segments")
        time.sleep(0.5)
        assert "upload failed; will retry" in log.read_text()
        _mend(flaky)
        wait_for(lambda: has_snapshot(flaky), timeout=30, what="the flaky replica to catch up")
        write(db, [["insert", 10, 200]], lib="apsw")
        assert agent.stop() == 0
    assert "replica recovered" in log.read_text()
    checkpoint(db)
    for replica in (good, flaky):
        out = tmp_path / f"{replica.name}.db"
        cli("restore", "-o", str(out), f"file://{replica}", check=True)
        assert integrity(out) == "ok"
        assert_same_pages(out, db)


def test_full_shadow_pauses_capture_and_loses_nothing(tmp_path):
    db = tmp_path / "app.db"
    good, flaky = tmp_path / "good", tmp_path / "flaky"
    write(db, [["schema"]])
    _break(flaky)
    log = tmp_path / "agent.log"
    cfg = _config(tmp_path, db, "shadow-max-bytes: 64KiB\ncompression: none\n")
    with AgentProcess("-c", str(cfg), log=log) as agent:
        wait_for(lambda: has_snapshot(good), what="snapshot on the good replica")
        write(db, [["insert", 60, 3000]], lib="apsw")  # far more than 64 KiB of pages
        wait_for(lambda: "shadow directory is full" in log.read_text(), timeout=30, what="the full shadow to be reported")
        _mend(flaky)
        wait_for(lambda: "capture resumed" in log.read_text(), timeout=30, what="capture to resume")
        assert agent.stop() == 0
    checkpoint(db)
    for replica in (good, flaky):
        out = tmp_path / f"{replica.name}.db"
        cli("restore", "-o", str(out), f"file://{replica}", check=True)
        assert_same_pages(out, db)


def test_restore_falls_back_to_a_reachable_replica(tmp_path):
    db = tmp_path / "app.db"
    good, flaky = tmp_path / "good", tmp_path / "flaky"
    write(db, [["schema"], ["insert", 5, 100]])
    cfg = _config(tmp_path, db)
    with AgentProcess("-c", str(cfg), log=tmp_path / "agent.log") as agent:
        wait_for(lambda: has_snapshot(good) and has_snapshot(flaky), what="both replicas")
        write(db, [["insert", 5, 100]], lib="apsw")
        assert agent.stop() == 0
    import shutil

    shutil.rmtree(flaky)
    _break(flaky)  # unreachable now
    out = tmp_path / "restored.db"
    p = cli("restore", "-c", str(cfg), "-o", str(out), str(db))
    assert p.returncode == 0, p.stderr
    assert "flaky" in p.stderr and "trying another" in p.stderr
    checkpoint(db)
    assert_same_pages(out, db)
    # asked for by name, the unreachable replica is an error that names it
    p = cli("restore", "-c", str(cfg), "--replica", "flaky", "-o", str(tmp_path / "x.db"), str(db))
    assert p.returncode == 1 and "flaky" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x.db").exists()
