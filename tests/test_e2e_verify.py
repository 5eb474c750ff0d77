"""End to end: restore drills (`replicator verify`, `verify-interval:`) and restoring before
replicating (`replicate --restore-if-db-not-exists`), with real agent and writer processes."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from harness import AgentProcess, assert_same_pages, checkpoint, cli, has_snapshot, integrity, replica_keys, rows, start_writer, wait_for, write


def _config(tmp_path: Path, db: Path, extra: str = "", top: str = "") -> Path:
    cfg = tmp_path / "r.yml"
    cfg.write_text(
        f"""{top}dbs:
  - path: {db}
{extra}    replicas:
      - name: one
        url: file://{tmp_path}/one
      - name: two
        url: file://{tmp_path}/two
"""
    )
    return cfg


def _flip_byte_in_newest_segment(replica: Path) -> Path:
    segs = sorted((replica / k for k in replica_keys(replica) if k.endswith(".segment")), key=lambda p: p.name)
    victim = segs[-1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # in the payload: the payload checksum no longer matches
    victim.write_bytes(bytes(data))
    return victim


def test_verify_matches_the_live_database_while_the_app_writes(tmp_path):
    db = tmp_path / "app.db"
    write(db, [["schema"], ["insert", 50, 300]])
    cfg = _config(tmp_path, db)
    with AgentProcess("-c", str(cfg)) as agent:
        wait_for(lambda: has_snapshot(tmp_path / "one") and has_snapshot(tmp_path / "two"), what="snapshots")
        writer = start_writer(db, [["forever", 300, 100]])
        try:
            time.sleep(0.5)
            p = cli("verify", "-c", str(cfg), str(db))
        finally:
            writer.kill()
            writer.wait()
        assert p.returncode == 0, p.stdout + p.stderr
        lines = p.stdout.strip().splitlines()
        assert len(lines) == 2
        for name, line in zip(("one", "two"), lines):
            assert line.startswith(f"{name}: OK generation ")
            assert "integrity ok; checksum ok; matches the live database at txid" in line
        p = cli("verify", "-c", str(cfg), "--json", "--replica", "two", str(db), check=True)
        [v] = json.loads(p.stdout)
        assert v["replica"] == "two" and v["ok"] and v["compared"] and v["db"] == str(db)
        assert v["source_txid"] >= 1 and v["txid"] >= v["source_txid"]
        assert agent.stop() == 0
    # a replica URL: no live database to compare with
    p = cli("verify", f"file://{tmp_path}/one", check=True)
    assert p.stdout.startswith("file: OK generation") and "matches the live database" not in p.stdout


def test_verify_reports_damage_empty_and_behind_with_one_line_each(tmp_path):
    db = tmp_path / "app.db"
    write(db, [["schema"]])
    cfg = _config(tmp_path, db)
    with AgentProcess("-c", str(cfg)) as agent:
        wait_for(lambda: has_snapshot(tmp_path / "one") and has_snapshot(tmp_path / "two"), what="snapshots")
        write(db, [["insert", 30, 300]])
        wait_for(lambda: cli("verify", "-c", str(cfg), "--wait", "0", str(db)).returncode == 0, timeout=30, what="replicas caught up")
        assert agent.stop() == 0
    # the app writes while the agent is down: the replicas are behind the live database
    write(db, [["insert", 5, 300]])
    p = cli("verify", "-c", str(cfg), "--wait", "1", str(db))
    assert p.returncode == 1
    assert [ln.split(":")[0] for ln in p.stdout.strip().splitlines()] == ["one", "two"]
    assert all("FAILED (behind)" in ln for ln in p.stdout.strip().splitlines())
    # a damaged artefact on one replica: that replica fails, naming the artefact; the other passes
    victim = _flip_byte_in_newest_segment(tmp_path / "one")
    p = cli("verify", f"file://{tmp_path}/one")
    assert p.returncode == 1 and "FAILED (damaged)" in p.stdout and victim.name in p.stdout
    assert "Traceback" not in p.stdout + p.stderr
    p = cli("verify", f"file://{tmp_path}/two")
    assert p.returncode == 0
    # an empty replica
    (tmp_path / "empty").mkdir()
    p = cli("verify", f"file://{tmp_path}/empty")
    assert p.returncode == 1 and p.stdout.strip() == "file: FAILED (empty): the replica holds no generations"
    p = cli("verify", "-c", str(cfg), "--replica", "nope", str(db))
    assert p.returncode == 2 and "has no replica named 'nope'" in p.stderr


def test_verify_interval_exports_drill_results(tmp_path):
    db = tmp_path / "app.db"
    write(db, [["schema"], ["insert", 20, 300]])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(tmp_path, db, extra="    verify-interval: 1s\n", top=f"metrics-addr: 127.0.0.1:{port}\n")
    log = tmp_path / "agent.log"
    with AgentProcess("-c", str(cfg), log=log) as agent:
        write(db, [["insert", 20, 300]])

        def status():
            return json.loads(cli("status", "-c", str(cfg), "--json", check=True).stdout)

        wait_for(lambda: all(r["verify"]["last_ok"] for r in status()["databases"][0]["replicas"]), timeout=30, what="drills to pass")
        assert "restore drill passed" in log.read_text()
        assert '"compared": true' in log.read_text()  # compared with the checksums capture recorded
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert f'replicator_verify_last_ok{{db="{db}",replica="one"}} 1.0' in body
        assert f'replicator_verify_seconds_count{{db="{db}",replica="one"}}' in body
        # damage replica one: the next drill fails, is counted by reason, and shows in status
        _flip_byte_in_newest_segment(tmp_path / "one")
        wait_for(lambda: status()["databases"][0]["replicas"][0]["verify"]["last_ok"] is False, timeout=30, what="a failed drill")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert f'replicator_verify_failures_total{{db="{db}",reason="damaged",replica="one"}}' in body
        assert f'replicator_verify_last_ok{{db="{db}",replica="one"}} 0.0' in body
        assert "restore drill failed" in log.read_text()
        assert agent.stop() == 0


def test_restore_if_db_not_exists_bootstraps_a_lost_node(tmp_path):
    db = tmp_path / "node" / "app.db"
    db.parent.mkdir()
    write(db, [["schema"], ["insert", 40, 300]])
    cfg = _config(tmp_path, db)
    with AgentProcess("-c", str(cfg)) as agent:
        write(db, [["insert", 10, 300]])
        wait_for(lambda: cli("verify", "-c", str(cfg), "--wait", "0", str(db)).returncode == 0, timeout=30, what="replicas caught up")
        assert agent.stop() == 0
    expected = rows(db)
    # the node is lost: database, WAL and shadow log
    import shutil

    shutil.rmtree(db.parent)
    log = tmp_path / "agent2.log"
    with AgentProcess("-c", str(cfg), "--restore-if-db-not-exists", log=log) as agent:
        assert "restored before replicating" in log.read_text()
        assert rows(db) == expected
        write(db, [["insert", 10, 300]])
        wait_for(lambda: cli("verify", "-c", str(cfg), "--wait", "0", str(db)).returncode == 0, timeout=30, what="the new writes on the replicas")
        assert agent.stop() == 0
    checkpoint(db)
    out = tmp_path / "final.db"
    cli("restore", "-o", str(out), f"file://{tmp_path}/two", check=True)
    assert integrity(out) == "ok"
    assert_same_pages(out, db)
    assert len(rows(out)) == len(expected) + 10


def test_restore_if_db_not_exists_refuses_to_start_fresh_when_a_replica_is_unreachable(tmp_path):
    db = tmp_path / "app.db"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    cfg = tmp_path / "r.yml"
    cfg.write_text(
        f"""dbs:
  - path: {db}
    restore-if-db-not-exists: true
    replicas:
      - name: s3
        url: s3://bucket/app
        endpoint: http://127.0.0.1:{port}
        region: us-east-1
        access-key-id: test
        secret-access-key: test-secret
"""
    )
    cfg.chmod(0o600)
    p = cli("replicate", "-c", str(cfg), timeout=120)
    assert p.returncode == 1
    assert f"{db} does not exist and cannot be restored" in p.stderr and "Traceback" not in p.stderr
    assert not db.exists()
    # every replica reachable and empty: a new database is fine (the agent waits for the app)
    cfg2 = _config(tmp_path, db, extra="    restore-if-db-not-exists: true\n")
    log = tmp_path / "agent.log"
    with AgentProcess("-c", str(cfg2), log=log) as agent:
        assert "no replica holds a backup; starting with a new database" in log.read_text()
        write(db, [["schema"], ["insert", 5, 100]])
        wait_for(lambda: has_snapshot(tmp_path / "one"), what="the new database replicated")
        assert agent.stop() == 0


def test_restore_if_db_not_exists_refuses_to_start_fresh_over_a_broken_replica(tmp_path):
    db = tmp_path / "app.db"
    write(db, [["schema"]])
    cfg = _config(tmp_path, db, extra="    snapshot-interval: 0s\n")
    with AgentProcess("-c", str(cfg)) as agent:
        for _ in range(3):
            write(db, [["insert", 5, 300]])
            time.sleep(0.1)
        wait_for(lambda: cli("verify", "-c", str(cfg), "--wait", "0", str(db)).returncode == 0, timeout=30, what="replicas caught up")
        assert agent.stop() == 0
    for replica in ("one", "two"):  # a hole in the middle of both chains
        segs = sorted(k for k in replica_keys(tmp_path / replica) if k.endswith(".segment"))
        assert len(segs) >= 3
        (tmp_path / replica / segs[1]).unlink()
    for p in tmp_path.glob("app.db*"):
        p.unlink()
    p = cli("replicate", "-c", str(cfg), "--restore-if-db-not-exists", timeout=120)
    assert p.returncode == 1 and "does not exist and cannot be restored" in p.stderr
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]  # the error; the lines before are warning logs per replica
    assert last.startswith("replicator: ") and "does not exist and cannot be restored" in last
    assert not db.exists()


def test_verify_interval_drills_an_encrypted_replica(tmp_path):
    import os as _os

    key = tmp_path / "key"
    key.write_bytes(_os.urandom(32))
    key.chmod(0o600)
    db = tmp_path / "app.db"
    write(db, [["schema"], ["insert", 10, 300]])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(tmp_path, db, extra="    verify-interval: 1s\n", top=f"metrics-addr: 127.0.0.1:{port}\nencryption-key-path: {key}\n")
    log = tmp_path / "agent.log"
    with AgentProcess("-c", str(cfg), log=log) as agent:
        write(db, [["insert", 10, 300]])

        def drills_ok():
            st = json.loads(cli("status", "-c", str(cfg), "--json", check=True).stdout)
            return all(r["verify"]["last_ok"] for r in st["databases"][0]["replicas"])

        wait_for(drills_ok, timeout=30, what="drills of the encrypted replicas to pass")
        assert "restore drill failed" not in log.read_text()
        assert agent.stop() == 0
