"""A real application process for the tests: writes to an SQLite database in WAL mode.

    python tests/writer.py DB SCRIPT_JSON [--lib apsw|sqlite3] [--page-size N]

SCRIPT_JSON is a list of steps, each [name, *args]:
    ["schema"]                          create table t (id INTEGER PRIMARY KEY, v BLOB, n INTEGER)
    ["insert", count, size]             count transactions, one row of `size` random-ish bytes each
    ["insert_rate", count, size, tps]   the same, paced
    ["batch", rows, size]               one transaction inserting `rows` rows
    ["update", count]                   count transactions updating a random row each
    ["delete_fraction", f]              delete that fraction of rows in one transaction
    ["checkpoint", MODE]                PRAGMA wal_checkpoint(MODE)
    ["autocheckpoint", pages]           PRAGMA wal_autocheckpoint=pages
    ["vacuum"]
    ["big", mib]                        one transaction writing about `mib` MiB
    ["fill", mib, per_tx]               about `mib` MiB of compressible rows, per_tx MiB a transaction
    ["sleep", seconds]
    ["forever", size, tps]              insert until killed (SIGTERM: after the transaction under way)
Each committed transaction prints "commit <n> <unix time after commit>" (n counts commits).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time


class Db:
    def __init__(self, path: str, lib: str, page_size: int | None):
        self.lib = lib
        if lib == "apsw":
            import apsw

            self.conn = apsw.Connection(path)
            self.conn.set_busy_timeout(10000)
        else:
            import sqlite3

            self.conn = sqlite3.connect(path, timeout=10, isolation_level=None)
        if page_size:
            self.execute(f"PRAGMA page_size={page_size}")
        self.execute("PRAGMA journal_mode=WAL")
        self.commits = 0

    def execute(self, sql: str, params=()):
        return list(self.conn.execute(sql, params))

    def tx(self, fn):
        self.execute("BEGIN IMMEDIATE")
        try:
            fn()
        except BaseException:
            self.execute("ROLLBACK")
            raise
        self.execute("COMMIT")
        self.commits += 1
        print(f"commit {self.commits} {time.time():.6f}", flush=True)


def payload(rng: random.Random, size: int) -> bytes:
    # half random, half repetitive: compressible like real rows
    half = size // 2
    return rng.randbytes(half) + bytes([rng.randrange(256)]) * (size - half)


def main() -> None:
    path, script = sys.argv[1], json.loads(sys.argv[2])
    lib = "sqlite3"
    page_size = None
    rest = sys.argv[3:]
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--lib":
            lib = value
        elif flag == "--page-size":
            page_size = int(value)
    rng = random.Random(int(os.environ.get("WRITER_SEED", "1")))
    db = Db(path, lib, page_size)
    for step in script:
        name, args = step[0], step[1:]
        if name == "schema":
            db.tx(lambda: db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB, n INTEGER)"))
        elif name in ("insert", "insert_rate", "forever"):
            if name == "forever":
                count, size, tps = 1 << 62, args[0], args[1]
            else:
                count, size = args[0], args[1]
                tps = args[2] if name == "insert_rate" else 0
            if name == "forever":
                # SIGTERM stops at a commit boundary. A SIGKILL can land after the commit's
                # frames are in the WAL but before the WAL index counts them: the commit was
                # never acknowledged, yet the next opener's WAL recovery brings it back
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            for _ in range(count):
                db.tx(lambda: db.execute("INSERT INTO t (v, n) VALUES (?, ?)", (payload(rng, size), db.commits + 1)))
                if tps:
                    time.sleep(1.0 / tps)
        elif name == "batch":
            rows, size = args
            db.tx(lambda: [db.execute("INSERT INTO t (v, n) VALUES (?, ?)", (payload(rng, size), i)) for i in range(rows)])
        elif name == "update":
            for _ in range(args[0]):
                db.tx(lambda: db.execute("UPDATE t SET n = n + 1 WHERE id = (SELECT id FROM t ORDER BY random() LIMIT 1)"))
        elif name == "delete_fraction":
            db.tx(lambda: db.execute("DELETE FROM t WHERE id % 100 < ?", (int(args[0] * 100),)))
        elif name == "checkpoint":
            db.execute(f"PRAGMA wal_checkpoint({args[0]})")
        elif name == "autocheckpoint":
            db.execute(f"PRAGMA wal_autocheckpoint={args[0]}")
        elif name == "vacuum":
            db.execute("VACUUM")
            db.commits += 1
            print(f"commit {db.commits} {time.time():.6f}", flush=True)
        elif name == "big":
            mib = args[0]
            chunk = 1 << 20
            db.tx(lambda: [db.execute("INSERT INTO t (v, n) VALUES (?, ?)", (payload(rng, chunk), -1)) for _ in range(mib)])
        elif name == "fill":
            # about `mib` MiB of very compressible rows, `per_tx` MiB per transaction
            mib, per_tx = args
            row = bytes([7]) * (256 << 10)
            for _ in range(0, mib, per_tx):
                db.tx(lambda: [db.execute("INSERT INTO t (v, n) VALUES (?, ?)", (row, -2)) for _ in range(per_tx * 4)])
        elif name == "sleep":
            time.sleep(args[0])
        else:
            raise SystemExit(f"unknown step {name}")


if __name__ == "__main__":
    main()
