"""End to end: a `dir:` entry replicates every SQLite database of a directory, each under
its own prefix; with watch: true it picks up new databases and drops deleted ones without a
restart; `replicator restore -c FILE DIR` restores all of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness import (
    AgentProcess,
    assert_same_pages,
    checkpoint,
    cli,
    has_snapshot,
    integrity,
    rows,
    start_writer,
    wait_for,
    write,
)


def _events(log: Path, name: str) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == name:
            out.append(record)
    return out


def _config(path: Path, data: Path, replica: Path) -> Path:
    path.write_text(
        f"""
dbs:
  - dir: {data}
    recursive: true
    watch: true
    replicas:
      - url: file://{replica}
"""
    )
    return path


def test_dir_entry_replicates_follows_the_directory_and_restores_everything(tmp_path):
    data, replica = tmp_path / "data", tmp_path / "replica"
    (data / "tenants").mkdir(parents=True)
    a, b, c = data / "a.db", data / "b.db", data / "tenants" / "c.db"
    write(a, [["schema"], ["insert", 20, 300]])
    write(b, [["schema"], ["insert", 10, 500]])
    write(c, [["schema"], ["insert", 15, 200]], page_size=1024)
    (data / "notes.db").write_text("not an SQLite database, though the name matches\n")
    cfg = _config(tmp_path / "r.yml", data, replica)
    log = tmp_path / "agent.log"

    with AgentProcess("-c", str(cfg), log=log) as agent:
        # each database under its own prefix of the replica
        for rel in ("a.db", "b.db", "tenants/c.db"):
            wait_for(lambda rel=rel: has_snapshot(replica / rel), what=f"snapshot of {rel}")
        discovered = sorted(e["path"] for e in _events(log, "database discovered"))
        assert discovered == sorted(str(p) for p in (a, b, c))
        assert not (replica / "notes.db").exists()
        assert _events(log, "replicating")[0]["databases"] == 3

        writer = start_writer(a, [["insert_rate", 60, 200, 40]], lib="apsw")  # keeps going throughout

        # a new database, created while the agent runs: replicated without a restart
        d = data / "tenants" / "d.db"
        write(d, [["schema"], ["insert", 12, 400]])
        wait_for(lambda: has_snapshot(replica / "tenants" / "d.db"), timeout=30, what="snapshot of the new database")
        assert str(d) in [e["path"] for e in _events(log, "database discovered")]

        # a deleted database is dropped; the others go on. Keep a copy to compare with.
        saved = tmp_path / "saved"
        saved.mkdir()
        for p in data.glob("b.db*"):
            shutil.copy2(p, saved / p.name)
        for p in data.glob("b.db*"):
            p.unlink()
        wait_for(lambda: any(e["path"] == str(b) for e in _events(log, "database removed")), timeout=30, what="database removed")
        write(c, [["insert", 5, 200]])  # after the removal: still replicated

        assert writer.wait(60) == 0
        assert agent.stop() == 0
    assert "Traceback" not in log.read_text()
    assert not any("notes.db" in e.get("path", "") for e in _events(log, "database discovered"))

    # the node is lost: restore the whole directory into an empty one
    orig = tmp_path / "orig"
    data.rename(orig)
    data.mkdir()
    p = cli("restore", "-c", str(cfg), str(data))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 4, p.stdout
    assert all(line.startswith("restored ") for line in lines), p.stdout
    assert sorted(line.split()[1] for line in lines) == ["a.db", "b.db", "tenants/c.db", "tenants/d.db"]
    sources = {
        "a.db": orig / "a.db",
        "b.db": saved / "b.db",
        "tenants/c.db": orig / "tenants" / "c.db",
        "tenants/d.db": orig / "tenants" / "d.db",
    }
    for rel, source in sources.items():
        restored = data / rel
        checkpoint(source)
        assert integrity(restored) == "ok"
        assert_same_pages(restored, source)
    assert rows(data / "a.db") == rows(orig / "a.db")
    assert len(rows(data / "a.db")) == 80
    assert not (data / "notes.db").exists()

    # once more: everything exists now
    p = cli("restore", "-c", str(cfg), str(data))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "already exists" in p.stderr
    p = cli("restore", "-c", str(cfg), "--if-db-not-exists", str(data))
    assert p.returncode == 0, p.stderr
    assert [line.split()[0] for line in p.stdout.strip().splitlines()] == ["exists"] * 4
    # a dry run into another directory restores nothing
    p = cli("restore", "-c", str(cfg), "--dry-run", "-o", str(tmp_path / "elsewhere"), str(data))
    assert p.returncode == 0, p.stderr
    assert [line.split()[0] for line in p.stdout.strip().splitlines()] == ["plan"] * 4
    assert not (tmp_path / "elsewhere").exists()
    # a point in one database's history makes no sense across databases
    for flag, value in (("--txid", "3"), ("--generation", "20261122T171656939519Z-ea5f")):
        p = cli("restore", "-c", str(cfg), flag, value, "-o", str(tmp_path / "x"), str(data))
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "cannot be used to restore every database" in p.stderr


def test_dir_restore_never_writes_outside_the_directory(tmp_path):
    data, replica, outside = tmp_path / "data", tmp_path / "replica", tmp_path / "outside"
    (data / "tenants").mkdir(parents=True)
    write(data / "a.db", [["schema"], ["insert", 3, 100]])
    write(data / "tenants" / "b.db", [["schema"], ["insert", 3, 100]])
    cfg = _config(tmp_path / "r.yml", data, replica)
    with AgentProcess("-c", str(cfg), log=tmp_path / "agent.log") as agent:
        for rel in ("a.db", "tenants/b.db"):
            wait_for(lambda rel=rel: has_snapshot(replica / rel), what=f"snapshot of {rel}")
        assert agent.stop() == 0
    out = tmp_path / "out"
    out.mkdir()
    outside.mkdir()
    (out / "tenants").symlink_to(outside)  # a path through a symlink to elsewhere
    p = cli("restore", "-c", str(cfg), "-o", str(out), str(data))
    assert p.returncode == 1, p.stderr
    by_rel = {line.split()[1].rstrip(":"): line for line in p.stdout.strip().splitlines()}
    assert by_rel["a.db"].startswith("restored ")
    assert by_rel["tenants/b.db"].startswith("refused ")
    assert list(outside.iterdir()) == []
    assert rows(out / "a.db") == [2, 3, 4]  # the schema is commit 1


def test_dir_config_errors_are_one_line(tmp_path):
    cases = {
        "both": ("dbs:\n  - path: /tmp/x.db\n    dir: /tmp\n    replicas:\n      - url: file:///tmp/r\n",
                 "dbs[0]: give either path (one database) or dir (a directory of databases), not both"),
        "neither": ("dbs:\n  - replicas:\n      - url: file:///tmp/r\n", "dbs[0].path: required"),
        "pattern": ("dbs:\n  - dir: /tmp/d\n    pattern: [a, b]\n    replicas:\n      - url: file:///tmp/r\n",
                    "dbs[0].pattern: expected a string, got a list"),
    }
    for name, (text, expected) in cases.items():
        bad = tmp_path / f"{name}.yml"
        bad.write_text(text)
        p = cli("replicate", "-c", str(bad), timeout=60)
        assert p.returncode == 2, (name, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, (name, p.stderr)
        assert expected in p.stderr and "Traceback" not in p.stderr, (name, p.stderr)


def test_restore_if_db_not_exists_fills_an_empty_directory_only(tmp_path):
    data, replica = tmp_path / "data", tmp_path / "replica"
    (data / "t").mkdir(parents=True)
    write(data / "a.db", [["schema"], ["insert", 4, 100]])
    write(data / "t" / "b.db", [["schema"], ["insert", 6, 100]])
    cfg = _config(tmp_path / "r.yml", data, replica)
    cfg.write_text(cfg.read_text() + "    restore-if-db-not-exists: true\n")
    with AgentProcess("-c", str(cfg), log=tmp_path / "agent1.log") as agent:
        for rel in ("a.db", "t/b.db"):
            wait_for(lambda rel=rel: has_snapshot(replica / rel), what=f"snapshot of {rel}")
        assert agent.stop() == 0
    shutil.rmtree(data)  # the node starts from nothing: every database comes back
    with AgentProcess("-c", str(cfg), log=tmp_path / "agent2.log") as agent:
        assert rows(data / "a.db") == [2, 3, 4, 5] and rows(data / "t" / "b.db") == [2, 3, 4, 5, 6, 7]
        assert len(_events(tmp_path / "agent2.log", "database discovered")) == 2
        assert agent.stop() == 0
    # a directory that still holds a database is left alone: the missing one may have been
    # deleted on purpose
    for p in (data / "t").glob("b.db*"):
        p.unlink()
    with AgentProcess("-c", str(cfg), log=tmp_path / "agent3.log") as agent:
        assert not (data / "t" / "b.db").exists()
        assert agent.stop() == 0
