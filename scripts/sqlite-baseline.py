#!/usr/bin/env python3
"""Raw SQLite on this machine, for comparison with `hale bench durable-append`.

Same settings as hale's log (WAL, synchronous=FULL), one writer, rows of about the size
of a hale checkpoint event. Prints single-row commits/s, rows/s in 100-row transactions,
and the median and p99 time of one fsync of a 4 KiB write.
"""
import json, os, sqlite3, statistics, sys, tempfile, time

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
BODY = b'{"checkpointed":{"agent":"bench-17","incarnation":1,"version":42,"patch":{"lane":3,"n":42,"note":"step done"}}}'

def run(rows_per_tx):
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(os.path.join(d, "t.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, at_ms INTEGER, format INTEGER, body BLOB, crc INTEGER) STRICT")
        seq, end = 0, time.perf_counter() + SECONDS
        start = time.perf_counter()
        while time.perf_counter() < end:
            db.execute("BEGIN")
            for _ in range(rows_per_tx):
                seq += 1
                db.execute("INSERT INTO events VALUES (?, ?, 1, ?, 0)", (seq, seq, BODY))
            db.execute("COMMIT")
        return seq / (time.perf_counter() - start)

def fsync_ms():
    samples = []
    with tempfile.NamedTemporaryFile(dir=".") as f:
        for _ in range(500):
            f.write(b"x" * 4096); f.flush()
            t = time.perf_counter(); os.fsync(f.fileno()); samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]

median, p99 = fsync_ms()
print(json.dumps({
    "sqlite_version": sqlite3.sqlite_version,
    "single_row_commits_per_s": round(run(1)),
    "rows_per_s_in_100_row_transactions": round(run(100)),
    "fsync_4k_p50_ms": round(median, 3),
    "fsync_4k_p99_ms": round(p99, 3),
    "settings": "WAL, synchronous=FULL, one writer, ~110-byte rows",
}))
