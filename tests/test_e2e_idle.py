"""End to end: an idle database parks (keeps only the pin connection's fds, the -shm reader
and the shadow lock) and picks up where it left off, through the app's own
checkpoints and WAL restarts, without a new generation."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from harness import AgentProcess, has_snapshot, restore_equals_source, wait_for, write, write_config


def open_files(pid: int, under: Path) -> Counter:
    """The agent's open fds on files under a directory, by name relative to it."""
    out: Counter = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{under}/") and not target.startswith(f"{under}/logs/"):
            out[os.path.relpath(target, under)] += 1
    return out


def is_parked(files: Counter, db: Path) -> bool:
    """Only the pin connection's fds (the database, which raw page reads share, its WAL,
    its -shm), the -shm reader and the shadow lock are open; plus the checkpoint
    connection's database fd, which SQLite keeps for reuse while the pin's lock lasts,
    once a checkpoint ran."""
    files = Counter(files)
    return files.pop(db.name, 0) in (1, 2) and files == Counter(
        {f"{db.name}-wal": 1, f"{db.name}-shm": 2, f".{db.name}-replicator/lock": 1}
    )


def wait_parked(pid: int, tmp_path: Path, db: Path, what: str) -> None:
    try:
        wait_for(lambda: is_parked(open_files(pid, tmp_path), db), timeout=20, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; open: {dict(open_files(pid, tmp_path))}") from None


def generations_started(log: Path) -> int:
    return log.read_text().count('"event": "generation started"')


def test_an_idle_database_parks_and_resumes_through_checkpoints(tmp_path):
    db, replica, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "logs" / "agent.log"
    log.parent.mkdir()
    write(db, [["schema"], ["insert", 40, 500]])
    # a low checkpoint threshold: the agent's checkpoints (on a connection it closes when
    # parking, reopened at the next one) restart the WAL again and again
    cfg = write_config(tmp_path / "r.yml", db, f"file://{replica}", min_checkpoint_page_count=100)
    with AgentProcess("-c", str(cfg), log=log) as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        pid = agent.proc.pid
        for round_ in range(2):
            # parked: the checkpoint connection, the raw WAL fd, the page-hash map, the
            # state file and the shadow folders are closed
            wait_parked(pid, tmp_path, db, f"the idle database to park (round {round_})")
            # the app (which leaves checkpoints to the agent) writes while it is parked,
            # small transactions and one larger than the checkpoint threshold
            write(db, [["autocheckpoint", 0], ["insert", 150, 700], ["batch", 300, 900], ["insert", 10, 300]], lib="apsw")
        wait_parked(pid, tmp_path, db, "the database to park again")
        # parking never costs a new generation: the pin, held while parked, keeps every frame
        assert generations_started(log) == 1, log.read_text()[-3000:]
        # the app checkpoints on its own too (which can restart the WAL before capture has
        # read a commit of the new one: that costs a new generation, not data)
        write(db, [["autocheckpoint", 50], ["insert", 100, 700], ["checkpoint", "TRUNCATE"], ["insert", 30, 700]], lib="apsw")
        wait_parked(pid, tmp_path, db, "the database to park at the end")
        assert agent.stop() == 0
    text = log.read_text()
    assert '"event": "capture failed' not in text
    assert text.count('"event": "checkpoint"') >= 2  # the agent's own, after parking too
    restore_equals_source(tmp_path, replica, db)


def test_raw_page_reads_share_the_pin_connections_database_fd(tmp_path):
    """The agent reads pages through the fd SQLite opened for its pin connection (one fd
    fewer per database), and never closes it itself."""
    import stat as stat_

    from replicator.sqlite_access import SqliteAccess

    db = tmp_path / "app.db"
    write(db, [["schema"], ["insert", 5, 100]])  # (another process: no fd of ours on it)
    ident = (db.stat().st_dev, db.stat().st_ino)

    def fds_on_db() -> list[int]:
        out = []
        for name in os.listdir("/proc/self/fd"):
            try:
                st = os.fstat(int(name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == ident and stat_.S_ISREG(st.st_mode):
                out.append(int(name))
        return out

    sql = SqliteAccess(db)
    sql.open()
    try:
        assert fds_on_db() == [sql.db_fd]  # SQLite's own, and only it
        assert os.pread(sql.db_fd, 16, 0) == b"SQLite format 3\x00"
        assert sql.pin() is not None
    finally:
        sql.close()
    assert fds_on_db() == []  # closed with the connection, once


_PROBE = """
import os, sys, threading, time
from pathlib import Path
from replicator.cli import main

db, replica, wanted = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]


def probe():
    deadline = time.monotonic() + 30
    while not any(p.is_file() for p in replica.rglob('*')) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # idle a while: nothing imported lazily later may hide
    print(sorted(m for m in ('prometheus_client', 'http.server', 'urllib.request', 'asyncio', 'ssl') if m in sys.modules))
    sys.stdout.flush()
    os._exit(0)


threading.Thread(target=probe, daemon=True).start()
main(['replicate', *wanted, db, replica.as_uri()])  # the main thread, for its signal handlers
os._exit(3)
"""


def _modules_of_a_running_agent(tmp_path: Path, *options: str) -> list[str]:
    import ast
    import subprocess
    import sys

    from harness import ROOT, env

    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"], ["insert", 10, 500]])
    p = subprocess.run([sys.executable, "-c", _PROBE, str(db), str(replica), *options], capture_output=True, text=True,
                       timeout=60, env=env(), cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip(), (p.stdout, p.stderr)
    assert has_snapshot(replica), p.stderr
    return ast.literal_eval(p.stdout.strip().splitlines()[-1])


def test_an_agent_without_metrics_addr_loads_neither_prometheus_client_nor_asyncio_nor_ssl(tmp_path):
    """The idle footprint: a real agent replicating to a file replica without metrics-addr
    runs without prometheus-client (and its http.server, urllib.request and ssl) and
    without asyncio (which structlog imports for async methods the agent never calls)."""
    assert _modules_of_a_running_agent(tmp_path) == []


def test_an_agent_serving_metrics_loads_prometheus_client_and_still_not_asyncio(tmp_path):
    from harness import free_port

    loaded = _modules_of_a_running_agent(tmp_path, "--metrics-addr", f"127.0.0.1:{free_port()}")
    assert "prometheus_client" in loaded and "http.server" in loaded, loaded
    assert "asyncio" not in loaded, loaded
