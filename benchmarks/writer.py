"""The benchmark writer: one separate process, the same for every tool.

    python benchmarks/writer.py DB [--rate TPS] [--duration S] [--count N] [--row-size B]
                                   [--synchronous NORMAL] [--stats FILE]

It opens DB with apsw (the SQLite linked by apsw, not Python's sqlite3), in WAL mode with
`busy_timeout` 10 s and `synchronous` as given (NORMAL by default), and commits one row of
about `--row-size` bytes per transaction into

    t (id INTEGER PRIMARY KEY, ts REAL NOT NULL, v BLOB NOT NULL)

`ts` is `time.time()` taken inside the transaction, just before COMMIT, so a row carries
its own commit time and the data-loss window can be read from the databases alone after a
SIGKILL. `--rate 0` commits as fast as it can; otherwise commits follow an absolute
schedule (start + i / rate), so the rate does not drift.

WAL accounting: a WAL hook (sqlite3_wal_hook) sees the number of frames in the WAL after
each commit; the frames this commit appended are the growth since the previous commit, or
the whole count when the WAL was restarted. Their sum times the page size is "WAL bytes
written". Setting a WAL hook replaces SQLite's automatic checkpoint, so the writer runs
the same PASSIVE checkpoint itself once the WAL holds >= 1000 frames (SQLite's default
`wal_autocheckpoint`), right after the commit, as SQLite would.

On exit (end of --duration or --count, SIGTERM or SIGINT) it writes a JSON summary to
--stats: commits, elapsed seconds, rate, WAL frames and bytes written, page size, the
slowest transaction (BEGIN IMMEDIATE .. COMMIT, so lock waits count, plus the
checkpoint when that commit triggers one, as SQLite's autocheckpoint would) and its p99.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time

AUTOCHECKPOINT_FRAMES = 1000

# a small vocabulary: "compressible" payloads read like text (zstd ~3-4x), not like zeros
_WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "order", "customer", "invoice",
    "status", "pending", "shipped", "amount", "currency", "EUR", "USD", "created", "updated",
    "null", "true", "false", "user", "session", "token", "region", "eu-west-1", "item", "sku",
]


def compressible(rng: random.Random, size: int) -> bytes:
    out = []
    n = 0
    while n < size:
        w = rng.choice(_WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out).encode()[:size]


def payload(rng: random.Random, size: int) -> bytes:
    """About `size` bytes: half random, half text-like (compressible)."""
    half = size // 2
    return rng.randbytes(half) + compressible(rng, size - half)


class Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db")
    ap.add_argument("--rate", type=float, default=0, help="transactions per second; 0 = as fast as possible")
    ap.add_argument("--duration", type=float, default=0, help="seconds; 0 = until killed or --count")
    ap.add_argument("--count", type=int, default=0, help="stop after N transactions; 0 = no limit")
    ap.add_argument("--row-size", type=int, default=1024)
    ap.add_argument("--synchronous", default="NORMAL")
    ap.add_argument("--stats", help="write a JSON summary here on exit")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)

    import apsw

    def on_signal(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    conn = apsw.Connection(a.db)
    conn.set_busy_timeout(10_000)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={a.synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, ts REAL NOT NULL, v BLOB NOT NULL)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]

    wal = {"prev": 0, "frames": 0, "max": 0, "now": 0}

    def wal_hook(_conn, _name, pages):
        prev = wal["prev"]
        wal["frames"] += pages - prev if pages >= prev else pages
        wal["prev"] = pages
        wal["now"] = pages
        if pages > wal["max"]:
            wal["max"] = pages
        return 0  # SQLITE_OK

    conn.set_wal_hook(wal_hook)

    rng = random.Random(a.seed)
    lat: list[float] = []
    commits = 0
    checkpoints = 0
    start = time.time()
    deadline = start + a.duration if a.duration else float("inf")
    period = 1.0 / a.rate if a.rate else 0.0
    try:
        while True:
            if a.count and commits >= a.count:
                break
            if period:
                due = start + commits * period
                now = time.time()
                if due > now:
                    time.sleep(due - now)
            if time.time() >= deadline:
                break
            v = payload(rng, a.row_size)
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT INTO t (ts, v) VALUES (?, ?)", (time.time(), v))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            commits += 1
            if wal["now"] >= AUTOCHECKPOINT_FRAMES:
                # SQLite's autocheckpoint runs inside COMMIT: count it in this commit's latency
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                checkpoints += 1
                wal["now"] = 0
            lat.append(time.perf_counter() - t0)
    except Stop:
        pass
    elapsed = time.time() - start
    if a.stats:
        lat.sort()
        summary = {
            "commits": commits,
            "elapsed": elapsed,
            "rate": commits / elapsed if elapsed > 0 else 0.0,
            "wal_frames": wal["frames"],
            "wal_bytes": wal["frames"] * page_size,
            "wal_max_frames": wal["max"],
            "page_size": page_size,
            "checkpoints": checkpoints,
            "lat_max": lat[-1] if lat else 0.0,
            "lat_p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0.0,
            "lat_median": lat[len(lat) // 2] if lat else 0.0,
        }
        tmp = a.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f)
        os.replace(tmp, a.stats)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
