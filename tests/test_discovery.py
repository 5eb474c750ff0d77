"""Unit tests of dir: entries: the config, discover(), the URL join, the listing of a dir
replica, and the directory watcher (in process, with real file-change events)."""

from __future__ import annotations

import os
import sqlite3
import textwrap
import threading
import time
from pathlib import Path

import pytest

from replicator.config import ConfigError, DirConfig, find_db, parse_config
from replicator.discovery import (
    DirectoryWatcher,
    check_relpath,
    databases_in_listing,
    db_config,
    discover,
    find_databases,
    join_url,
    relative_path,
)
from replicator.wal_events import ChangeEvents

SRC = Path("/etc/replicator.yml")


def parse(text: str):
    return parse_config(textwrap.dedent(text), source=SRC, environ={})


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    return message


def entry(directory: Path, *, pattern: str | None = None, recursive: bool = False, url: str = "file:///backups/app") -> DirConfig:
    extra = f"    pattern: '{pattern}'\n" if pattern is not None else ""
    config = parse_config(
        f"dbs:\n  - dir: {directory}\n{extra}    recursive: {str(recursive).lower()}\n    snapshot-interval: 5m\n"
        f"    replicas:\n      - url: {url}\n",
        source=SRC,
        environ={},
    )
    return config.dirs[0]


def make_db(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    conn.commit()
    conn.close()
    return path


# -- config -----------------------------------------------------------------------------------------
def test_dir_entry_defaults_and_settings():
    config = parse(
        """
        retention: 2h
        dbs:
          - path: /data/app.db
            replicas: [{url: /b/app}]
          - dir: /data/tenants
            compression-level: 9
            replicas:
              - url: s3://bucket/tenants
        """
    )
    assert [db.path for db in config.dbs] == [Path("/data/app.db")]
    (d,) = config.dirs
    assert (d.dir, d.pattern, d.recursive, d.watch) == (Path("/data/tenants"), "*.db", False, False)
    assert d.template.compression_level == 9 and d.template.retention == 7200.0
    assert [r.url for r in d.replicas] == ["s3://bucket/tenants"]


def test_dir_entry_options():
    config = parse(
        """
        dbs:
          - dir: rel/dir
            pattern: '*.sqlite3'
            recursive: yes
            watch: true
            replicas: [{url: file:///b}]
        """
    )
    d = config.dirs[0]
    assert (d.dir, d.pattern, d.recursive, d.watch) == (Path("/etc/rel/dir"), "*.sqlite3", True, True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "dbs: [{path: /d/a.db, dir: /d, replicas: [{url: /b}]}]",
            "/etc/replicator.yml: dbs[0]: give either path (one database) or dir (a directory of databases), not both",
        ),
        ("dbs: [{replicas: [{url: /b}]}]", "/etc/replicator.yml: dbs[0].path: required: the database file's path (or dir: a directory of databases)"),
        ("dbs: [{dir: /d, pattern: 5, replicas: [{url: /b}]}]", "/etc/replicator.yml: dbs[0].pattern: expected a string, got an integer (quote it)"),
        ("dbs: [{dir: /d, pattern: [a], replicas: [{url: /b}]}]", "dbs[0].pattern: expected a string, got a list"),
        ("dbs: [{dir: /d, pattern: 'sub/*.db', replicas: [{url: /b}]}]", "dbs[0].pattern: a glob on the file name, not a path"),
        ("dbs: [{dir: /d, pattern: ' ', replicas: [{url: /b}]}]", "dbs[0].pattern: blank pattern"),
        ("dbs: [{dir: /d, recursive: maybe, replicas: [{url: /b}]}]", "dbs[0].recursive: expected true or false, got 'maybe'"),
        ("dbs: [{dir: /d}]", "dbs[0].replicas: required"),
        ("dbs: [{dir: /d, shadow-dir: /s, replicas: [{url: /b}]}]", "dbs[0].shadow-dir: unknown key; each database found under dir gets its own shadow directory"),
        ("dbs: [{path: /d/a.db, watch: true, replicas: [{url: /b}]}]", "dbs[0].watch: unknown key; watch is for an entry with dir"),
        ("dbs: [{dir: /d, patern: '*.db', replicas: [{url: /b}]}]", "dbs[0].patern: unknown key; did you mean 'pattern'?"),
        ("dbs: [{dir: /d, log-level: debug, replicas: [{url: /b}]}]", "dbs[0].log-level: unknown key; log-level can only be set at the top level"),
        ("pattern: '*.db'\ndbs: [{dir: /d, replicas: [{url: /b}]}]", "pattern: unknown key; pattern belongs in an entry of dbs"),
        ("dbs: [{dir: /d, replicas: [{url: /d}]}]", "dbs[0].replicas[0].url: must not be the directory of the databases"),
        ("dbs: [{dir: /d, recursive: true, replicas: [{url: /d/backup}]}]", "dbs[0].replicas[0].url: must not be the directory (it would be scanned"),
        ("dbs: [{dir: /d, replicas: [{url: /b}]}, {dir: /d/, replicas: [{url: /c}]}]", "dbs[1].dir: same directory as dbs[0]"),
        ("dbs: [{path: /x.db, replicas: [{url: /b}]}, {dir: /d, replicas: [{url: /b}]}]", "dbs[1].replicas[0].url: same location as dbs[0].replicas[0]"),
    ],
)
def test_dir_entry_errors_are_one_line(text, expected):
    assert expected in error(text)


def test_find_db_finds_a_database_under_a_dir_entry():
    config = parse("dbs: [{dir: /d, recursive: true, replicas: [{url: 's3://b/app?region=x'}]}]")
    db = find_db(config, "/d/t/a.db")
    assert db.path == Path("/d/t/a.db")
    assert db.shadow_dir == Path("/d/t/.a.db-replicator")
    assert [r.url for r in db.replicas] == ["s3://b/app/t/a.db?region=x"]
    with pytest.raises(ConfigError, match=r"is not in config /etc/replicator.yml \(it has: /d/\*\.db\)"):
        find_db(config, "/d/t/a.txt")


# -- the URL join -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "rel", "expected"),
    [
        ("file:///backups/app", "tenants/a.db", "file:///backups/app/tenants/a.db"),
        ("file:///backups/app/", "a.db", "file:///backups/app/a.db"),
        ("file:///", "a.db", "file:///a.db"),
        ("file:///srv/my%20backups", "my db.db", "file:///srv/my%20backups/my%20db.db"),
        ("s3://bucket/app", "tenants/a.db", "s3://bucket/app/tenants/a.db"),
        ("s3://bucket", "a.db", "s3://bucket/a.db"),
        ("s3://bucket/app?region=eu-west-1&force-path-style=true", "a.db", "s3://bucket/app/a.db?region=eu-west-1&force-path-style=true"),
        ("sftp://backup@host:2222/srv/app", "t/a.db", "sftp://backup@host:2222/srv/app/t/a.db"),
        ("sftp://u:pa/ss@host/srv", "a.db", "sftp://u:pa/ss@host/srv/a.db"),
        ("nats://host:4222/bucket", "t/a.db", "nats://host:4222/bucket/t/a.db"),
        ("nats://tok@h1:4222,h2:4222/bucket/app", "a.db", "nats://tok@h1:4222,h2:4222/bucket/app/a.db"),
        ("mem://name", "a.db", "mem://name/a.db"),
        ("file:///b", "%?#@ é.db", "file:///b/%25%3F%23%40%20%C3%A9.db"),
    ],
)
def test_join_url(url, rel, expected):
    assert join_url(url, rel) == expected


@pytest.mark.parametrize("rel", ["", "/abs.db", "../x.db", "a/../b.db", "./a.db", "a//b.db", "a/", "a\\b.db", "a\nb.db"])
def test_join_url_refuses_odd_relative_paths(rel):
    with pytest.raises(ValueError):
        join_url("file:///b", rel)
    with pytest.raises(ValueError):
        check_relpath(rel)


def test_joined_urls_reach_the_drivers_unchanged():
    from replicas.file import FileDriver
    from replicas.s3.config import parse_url as s3_url
    from replicas.sftp.config import parse_url as sftp_url

    rel = "ten ants/a%b.db"
    assert FileDriver.from_url(join_url("file:///tmp/x y", rel)).root == "/tmp/x y/ten ants/a%b.db"
    bucket, prefix, _ = s3_url(join_url("s3://bucket/app?region=eu-west-1", rel), {})
    assert (bucket, prefix.strip("/")) == ("bucket", "app/ten ants/a%b.db")
    host, root, port, _ = sftp_url(join_url("sftp://u:p/w@host:2222/srv/app", rel), {})
    assert (host, root, port) == ("host", "/srv/app/ten ants/a%b.db", 2222)
    try:
        from replicas.nats.config import parse as nats_url
    except ImportError:  # the nats driver's module layout
        return
    settings = nats_url(join_url("nats://h:4222/bucket/app", rel), {})
    assert (settings.bucket, settings.prefix) == ("bucket", "app/ten ants/a%b.db/")


# -- discover ---------------------------------------------------------------------------------------
def test_discover_finds_sqlite_files_only(tmp_path, caplog):
    make_db(tmp_path / "a.db")
    make_db(tmp_path / "sub" / "b.db")
    make_db(tmp_path / ".a.db-replicator" / "inside.db")  # a shadow directory
    make_db(tmp_path / ".hidden.db")
    (tmp_path / "notsql.db").write_text("hello, not a database")
    (tmp_path / "empty.db").touch()
    (tmp_path / "other.sqlite").write_bytes((tmp_path / "a.db").read_bytes())
    (tmp_path / ".a.db.tmp-123-0badc0de").write_bytes((tmp_path / "a.db").read_bytes())  # a restore's temp file
    os.symlink(tmp_path / "a.db", tmp_path / "link.db")
    flat = entry(tmp_path)
    assert find_databases(flat) == [tmp_path / "a.db"]
    deep = entry(tmp_path, recursive=True)
    assert find_databases(deep) == [tmp_path / "a.db", tmp_path / "sub" / "b.db"]
    everything = entry(tmp_path, pattern="*", recursive=True)
    # -wal/-shm files and the shadow directory's contents never count
    make_db(tmp_path / "w.db")
    conn = sqlite3.connect(tmp_path / "w.db")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    names = sorted(str(p.relative_to(tmp_path)) for p in find_databases(everything))
    assert names == ["a.db", "other.sqlite", "sub/b.db", "w.db"]
    conn.close()
    assert find_databases(entry(tmp_path / "missing")) == []


def test_discover_gives_each_database_its_own_config(tmp_path):
    make_db(tmp_path / "a.db")
    make_db(tmp_path / "tenants" / "b.db")
    dbs = discover(entry(tmp_path, recursive=True, url="s3://bucket/app"))
    assert [db.path for db in dbs] == [tmp_path / "a.db", tmp_path / "tenants" / "b.db"]
    assert [db.shadow_dir for db in dbs] == [tmp_path / ".a.db-replicator", tmp_path / "tenants" / ".b.db-replicator"]
    assert [[r.url for r in db.replicas] for db in dbs] == [["s3://bucket/app/a.db"], ["s3://bucket/app/tenants/b.db"]]
    assert all(db.snapshot_interval == 300.0 for db in dbs)


def test_relative_path(tmp_path):
    flat, deep = entry(tmp_path), entry(tmp_path, recursive=True)
    assert relative_path(flat, tmp_path / "a.db") == "a.db"
    assert relative_path(flat, tmp_path / "t" / "a.db") is None
    assert relative_path(deep, tmp_path / "t" / "a.db") == "t/a.db"
    assert relative_path(deep, tmp_path / ".x.db-replicator" / "a.db") is None
    assert relative_path(deep, tmp_path / "a.db-wal") is None
    assert relative_path(deep, tmp_path.parent / "a.db") is None
    with pytest.raises(ValueError):
        db_config(flat, tmp_path / "a.txt")


def test_databases_in_listing():
    gen = "20261122T171656939519Z-ea5f"
    snap = f"generations/{gen}/snapshots/0000000000000001.1795377208780.snapshot"
    seg = f"generations/{gen}/segments/0000000000000002-0000000000000003.1795377208780.segment"
    listing = [
        f"a.db/{snap}",
        f"a.db/{seg}",
        f"tenants/b.db/{seg}",
        f"generations/x.db/{snap}",  # a database called generations/x.db
        snap,  # a single database at the base itself: no relative path
        "a.db/generations/not-a-generation/snapshots/x.snapshot",
        "stray.txt",
        f"../evil.db/{snap}",
        f"t/./x.db/{snap}",
        f"t//x.db/{snap}",
    ]
    found, refused = databases_in_listing(listing)
    assert found == ["a.db", "generations/x.db", "tenants/b.db"]
    assert set(refused) == {"../evil.db", "t/./x.db", "t//x.db"}


# -- change events and the watcher ------------------------------------------------------------------
def test_change_events_add_and_remove_at_run_time(tmp_path):
    woken: list[str] = []
    events = ChangeEvents(woken.append)
    try:
        a, b = str(tmp_path / "a.db"), str(tmp_path / "sub" / "b.db")
        (tmp_path / "sub").mkdir()
        events.watch([a])
        events.add(b)
        Path(a + "-wal").write_bytes(b"x")
        Path(b + "-wal").write_bytes(b"x")
        deadline = time.monotonic() + 5
        while {a, b} - set(woken) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert {a, b} <= set(woken)
        events.remove(b)
        events.remove(a)
        assert events.targets == frozenset()
        woken.clear()
        Path(a + "-wal").write_bytes(b"y")
        Path(b + "-wal").write_bytes(b"y")
        time.sleep(0.3)
        assert woken == []
        with pytest.raises(OSError):
            events.add(str(tmp_path / "missing" / "c.db"))
    finally:
        events.close()



def test_change_events_read_as_often_as_the_shortest_sync_interval_needs(tmp_path):
    """Under load the inotify reader pauses between reads, up to 3/4 of the shortest
    sync-interval of the databases watched (a busy capture steps once per sync-interval;
    reading more often wakes it no sooner), never below the old 8 ms nor above 50 ms."""
    from replicator import wal_events as W

    assert W.busy_gap([]) == W.READ_GAP_BUSY == 0.008
    assert W.busy_gap([0.0]) == 0.008 and W.busy_gap([0.005]) == 0.008
    assert W.busy_gap([0.02]) == pytest.approx(0.015)
    assert W.busy_gap([0.02, 0.01, 1.0]) == pytest.approx(0.008)
    assert W.busy_gap([0.04, 0.1]) == pytest.approx(0.03)
    assert W.busy_gap([1.0]) == W.READ_GAP_BUSY_MAX == 0.05

    events = ChangeEvents(lambda path: None)
    try:
        a, b = str(tmp_path / "a.db"), str(tmp_path / "b.db")
        events.add(a, 0.02)
        assert events._impl.busy_gap == pytest.approx(0.015)
        events.add(b, 0.04)
        assert events._impl.busy_gap == pytest.approx(0.015)
        events.remove(a)
        assert events._impl.busy_gap == pytest.approx(0.03)
        events.remove(b)
        assert events._impl.busy_gap == W.READ_GAP_BUSY
    finally:
        events.close()

def test_watcher_follows_the_directory(tmp_path):
    make_db(tmp_path / "a.db")
    cfg = entry(tmp_path, recursive=True)
    cfg = DirConfig(cfg.dir, cfg.pattern, cfg.recursive, True, cfg.template)
    added: list[Path] = []
    removed: list[str] = []
    lock = threading.Lock()

    def add(db):
        with lock:
            added.append(db.path)
        return True

    def remove(path):
        with lock:
            removed.append(path)

    def wait(predicate, what):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if predicate():
                    return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}: added={added} removed={removed}")

    events = ChangeEvents(lambda path: None)
    watcher = DirectoryWatcher([cfg], events, add=add, remove=remove, rescan_interval=3600)
    try:
        watcher.scan()
        watcher.start()
        assert added == [tmp_path / "a.db"]
        make_db(tmp_path / "b.db")
        wait(lambda: tmp_path / "b.db" in added, "a new database")
        make_db(tmp_path / "new" / "deeper" / "c.db")  # directories created after the watch
        wait(lambda: tmp_path / "new" / "deeper" / "c.db" in added, "a database in a new subdirectory")
        (tmp_path / "late.db").touch()  # an app creates the file first, writes the header later
        time.sleep(0.3)
        assert tmp_path / "late.db" not in added
        make_db(tmp_path / "late.db")
        wait(lambda: tmp_path / "late.db" in added, "a file that became a database")
        (tmp_path / "a.db").unlink()
        wait(lambda: str(tmp_path / "a.db") in removed, "a deleted database")
        os.rename(tmp_path / "b.db", tmp_path / "renamed.db")
        wait(lambda: str(tmp_path / "b.db") in removed and tmp_path / "renamed.db" in added, "a rename")
        make_db(tmp_path / "elsewhere" / "fresh.db")  # e.g. a restore renamed over a database
        os.replace(tmp_path / "elsewhere" / "fresh.db", tmp_path / "renamed.db")
        wait(lambda: str(tmp_path / "renamed.db") in removed and added.count(tmp_path / "renamed.db") == 2, "a replaced database")
        (tmp_path / "notes.db").write_text("text")
        time.sleep(0.3)
        assert tmp_path / "notes.db" not in added
    finally:
        watcher.stop()
        events.close()


def test_watcher_waits_for_a_missing_directory(tmp_path):
    root = tmp_path / "later"
    cfg = entry(root)
    cfg = DirConfig(cfg.dir, cfg.pattern, cfg.recursive, True, cfg.template)
    added: list[Path] = []
    removed: list[str] = []
    events = ChangeEvents(lambda path: None)
    watcher = DirectoryWatcher([cfg], events, add=lambda db: added.append(db.path) or True, remove=removed.append, rescan_interval=0.3)

    def wait(predicate, what):
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: added={added} removed={removed}"
            time.sleep(0.02)

    try:
        watcher.scan()
        watcher.start()
        make_db(root / "a.db")  # found by a rescan, which also watches the directory from now on
        wait(lambda: root / "a.db" in added, "the first database")
        time.sleep(0.4)
        make_db(root / "b.db")
        wait(lambda: root / "b.db" in added, "the second database")
        for p in sorted(root.iterdir()):
            if p.is_dir():
                for q in p.iterdir():
                    q.unlink()
                p.rmdir()
            else:
                p.unlink()
        root.rmdir()
        wait(lambda: {str(root / "a.db"), str(root / "b.db")} <= set(removed), "both dropped with the directory")
        make_db(root / "c.db")
        wait(lambda: root / "c.db" in added, "a database in the directory made again")
    finally:
        watcher.stop()
        events.close()


# -- the agent at run time --------------------------------------------------------------------------
def test_agent_adds_and_removes_databases_at_run_time(tmp_path):
    from replicator.controller import Agent
    from replicator.discovery import db_config as make_config

    data, replica = tmp_path / "data", tmp_path / "replica"
    make_db(data / "a.db")
    config = parse_config(
        f"dbs:\n  - path: {tmp_path / 'solo.db'}\n    replicas: [{{url: 'file://{replica}/b.db'}}]\n"
        f"  - dir: {data}\n    replicas: [{{url: 'file://{replica}'}}]\n",
        source=SRC,
        environ={},
    )
    make_db(tmp_path / "solo.db")
    agent = Agent(config)
    agent.start()
    try:
        paths = lambda: sorted(d["path"] for d in agent.status()["databases"])  # noqa: E731
        assert paths() == [str(data / "a.db"), str(tmp_path / "solo.db")]
        # the change-event reader paces itself by the databases' sync-interval (20 ms)
        assert agent._events._impl.busy_gap == pytest.approx(0.75 * 0.02)
        c = make_db(data / "c.db")
        added = agent.add_database(make_config(config.dirs[0], c))
        assert added is not None and str(c) in paths()
        assert agent.add_database(make_config(config.dirs[0], c)) is None  # already replicated
        # data/b.db would go to replica/b.db, where solo.db already goes
        assert agent.add_database(make_config(config.dirs[0], make_db(data / "b.db"))) is None
        assert agent.remove_database(c) is True
        assert str(c) not in paths() and len(agent.databases) == 2
        assert (data / ".c.db-replicator").is_dir()  # kept, so that the database resumes
        assert agent.remove_database(c) is False
        assert agent.add_database(make_config(config.dirs[0], c)) is not None
    finally:
        assert agent.stop()


def test_known_databases_count_without_a_look_at_their_header(tmp_path):
    """A rescan must not open a database the agent replicates: closing that fd would drop
    the POSIX locks its SQLite connections hold. Known files count as they are (a file
    that took the place of one is caught by its inode)."""
    from replicator.discovery import find_databases

    e = entry(tmp_path)
    known = tmp_path / "known.db"
    known.write_bytes(b"not read by the scan" + bytes(100))
    (tmp_path / "other.db").write_bytes(b"not SQLite either" + bytes(100))
    assert find_databases(e, frozenset({str(known)})) == [known]
    assert find_databases(e) == []
