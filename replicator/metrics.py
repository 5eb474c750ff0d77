"""The agent's event metrics: counters and histograms, counted as things happen.

Labelled `db` (the database path) and, where it applies, the replica's name as `replica`,
like the driver wrapper's `replicator_replica_operation_*` (replicas.metrics). They are
declared through replicas.instruments, so they count (and prometheus-client is imported)
only once the agent serves `metrics-addr`. The state gauges, read live from the agent's
status at each scrape, and the exposition itself are in replicator.exposition.
"""

from __future__ import annotations

from replicas.instruments import Counter, Histogram

ROTATIONS = Counter(
    "replicator_generation_rotations_total",
    "New generations started, by reason (initial, wal-reset, wal-mismatch, checksum-mismatch, ...).",
    ["db", "reason"],
)
CHECKPOINTS = Counter(
    "replicator_checkpoints_total",
    "Checkpoints the agent ran, by mode (PASSIVE, TRUNCATE) and result (ok, busy, error).",
    ["db", "mode", "result"],
)
SNAPSHOT_SECONDS = Histogram(
    "replicator_snapshot_seconds",
    "Time to write a snapshot into the shadow log.",
    ["db"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
UPLOAD_SECONDS = Histogram(
    "replicator_upload_seconds",
    "Time to upload one artefact to a replica (all attempts of one upload).",
    ["db", "replica"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UPLOAD_FAILURES = Counter(
    "replicator_upload_failures_total",
    "Artefact uploads that failed after the driver's retries (the shipper tries again later).",
    ["db", "replica"],
)
RETENTION_DELETIONS = Counter(
    "replicator_retention_deletions_total",
    "Artefacts deleted from a replica by retention.",
    ["db", "replica"],
)
CAPTURE_ERRORS = Counter(
    "replicator_capture_errors_total",
    "Capture steps that failed (the agent retries from its durable position).",
    ["db"],
)
VERIFY_SECONDS = Histogram(
    "replicator_verify_seconds",
    "Duration of a restore drill (verify) of one replica.",
    ["db", "replica"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
VERIFY_FAILURES = Counter(
    "replicator_verify_failures_total",
    "Restore drills that failed, by reason (unreachable, damaged, checksum, integrity, mismatch, empty).",
    ["db", "replica", "reason"],
)

EVENTS = (ROTATIONS, CHECKPOINTS, SNAPSHOT_SECONDS, UPLOAD_SECONDS, UPLOAD_FAILURES, RETENTION_DELETIONS,
           CAPTURE_ERRORS, VERIFY_SECONDS, VERIFY_FAILURES)
