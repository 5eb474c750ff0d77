"""`replicator demo`: a demo database in WAL mode with a small writer process, replicated to a
local file replica, one line per shipped artefact; on exit it restores and compares."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

WRITER = r"""
import signal, sqlite3, sys, time, os
# SIGTERM ends it between two commits (a kill could land after a commit's frames are in
# the WAL but before the WAL index counts them: the next opener would then count a row
# that was never acknowledged, nor replicated)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
db, rate = sys.argv[1], float(sys.argv[2])
conn = sqlite3.connect(db, timeout=10, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, at REAL, payload TEXT)")
n = 0
while True:
    conn.execute("INSERT INTO events (at, payload) VALUES (?, ?)", (time.time(), os.urandom(48).hex()))
    n += 1
    time.sleep(1.0 / rate)
"""


def run_demo(workdir: Path, *, seconds: float = 0, rate: float = 20) -> int:
    from replicator.config import adhoc_config
    from replicator.controller import Agent
    from replicator.restore import restore

    workdir = workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "app.db"
    replica = workdir / "replica"
    print(f"demo: database {db}, writer at {rate:g} tx/s, replica file://{replica}", flush=True)
    # its own session: Ctrl-C on the terminal stops the demo, which then stops the writer
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(rate)], start_new_session=True)
    deadline = time.monotonic() + 10
    while not db.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    def shipped(shipper, item, lag):
        k = item.key
        what = f"snapshot txid {k.last_txid}" if k.kind == "snapshot" else f"segment txids {k.first_txid}..{k.last_txid}"
        print(f"shipped {what} to {shipper.name} ({item.size} bytes, {lag * 1000:.0f} ms after commit)", flush=True)

    agent = Agent(adhoc_config(str(db), f"file://{replica}"), on_shipped=shipped)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    agent.start()
    try:
        stop.wait(seconds if seconds > 0 else None)
    finally:
        writer.terminate()
        writer.wait()
        agent.stop()
    out = workdir / "restored.db"
    result = restore(__import__("replicas").open_driver(f"file://{replica}"), out, force=True)
    import sqlite3

    src = sqlite3.connect(db).execute("SELECT count(*) FROM events").fetchone()[0]
    got = sqlite3.connect(out).execute("SELECT count(*) FROM events").fetchone()[0]
    print(f"restored {out}: txid {result.txid}, {got} rows (source has {src}): {'OK' if got == src else 'MISMATCH'}", flush=True)
    return 0 if got == src else 1
