"""A tiny app for the compose example: writes one row to a SQLite database in WAL mode,
WRITES_PER_SECOND times a second (default 10), until SIGTERM.

It uses apsw, which bundles its own SQLite (3.51.3 or later in the replicator image), not
the system library that Python's sqlite3 links: see the SQLite version warning in
docs/operations.md.

    python writer.py /data/app.db
"""

from __future__ import annotations

import os
import signal
import sys
import time

import apsw


def main(path: str) -> int:
    rate = float(os.environ.get("WRITES_PER_SECOND", "10"))
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    con = apsw.Connection(path)
    con.setbusytimeout(5000)  # the agent's checkpoints hold the write lock for milliseconds
    cur = con.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, at REAL NOT NULL, payload TEXT NOT NULL)")
    (start,) = cur.execute("SELECT count(*) FROM events").fetchone()
    print(f"writer: SQLite {apsw.sqlite_lib_version()}, {path} has {start} rows; writing {rate:g}/s", flush=True)
    written = 0
    while not stop:
        with con:
            cur.execute("INSERT INTO events (at, payload) VALUES (?, ?)", (time.time(), os.urandom(32).hex()))
        written += 1
        if written % 600 == 0:
            print(f"writer: {start + written} rows", flush=True)
        time.sleep(1.0 / rate)
    con.close()
    print(f"writer: stopped after {written} rows", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/data/app.db"))
