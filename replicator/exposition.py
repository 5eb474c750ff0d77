"""What `/metrics` says: the event metrics plus the agent's state, read live.

Two kinds, both labelled `db` (the database path) and, where it applies, the replica's
name as `replica`:

- events, counted as they happen (replicator.metrics and the driver wrapper's
  replicas.metrics, in prometheus-client's default registry once enabled);
- state, read live at each scrape from the agent's own status (replicator.status), so
  `/metrics` and `replicator status` can never disagree.

`metric_names()` lists every sample name the project exports; deploy/ files are checked
against it. Importing this module imports prometheus-client: only the metrics server
(and tests) do.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from replicator import __version__, metrics

# name -> (type, help) of the state gauges, filled at scrape time from the status
_STATE = {
    "replicator_data_loss_window_seconds": "Seconds of commits that would be lost if the node died now (0 when caught up).",
    "replicator_data_loss_window_threshold_seconds": "The configured data-loss-window threshold.",
    "replicator_replica_txid": "Last transaction id durable on the replica (in its generation).",
    "replicator_replica_last_upload_timestamp_seconds": "Unix time of the last successful upload to the replica.",
    "replicator_replica_pending_artefacts": "Artefacts waiting for upload to the replica.",
    "replicator_replica_pending_bytes": "Bytes waiting for upload to the replica.",
    "replicator_replica_failing": "1 while the replica's last upload attempt failed.",
    "replicator_replica_behind_threshold": "1 while the replica's data-loss window is above the threshold.",
    "replicator_local_txid": "Last transaction id captured into the shadow log (in the current generation).",
    "replicator_last_snapshot_timestamp_seconds": "Unix time of the last snapshot written to the shadow log.",
    "replicator_snapshot_interval_seconds": "The configured snapshot interval (0: no periodic snapshots).",
    "replicator_wal_bytes": "Size of the database's -wal file.",
    "replicator_database_bytes": "Size of the database file.",
    "replicator_shadow_bytes": "Bytes of artefacts in the shadow log not yet on every replica.",
    "replicator_shadow_max_bytes": "The shadow log's size bound (shadow-max-bytes).",
    "replicator_shadow_full": "1 while the shadow log is at its bound and capture is paused.",
    "replicator_capture_failing": "1 while capture of the database fails.",
    "replicator_verify_last_success_timestamp_seconds": "Unix time of the last successful restore drill of the replica.",
    "replicator_verify_last_ok": "1 when the last restore drill of the replica succeeded, 0 when it failed.",
    "replicator_ready": "1 while every replica of every database is within its threshold and not failing.",
}
_INFO = {
    "replicator_build": "Version of the agent.",
    "replicator_generation": "The database's current generation (label generation).",
    "replicator_replica_generation": "The generation of the replica's position (label generation).",
}

def metric_names() -> set[str]:
    """Every sample name the agent can export (with _total/_bucket/_sum/_count/_info forms)."""
    from replicas.metrics import OPERATION_ERRORS, OPERATION_SECONDS, UPLOADED_BYTES

    names = set(_STATE) | {f"{n}_info" for n in _INFO}
    for instrument in (*metrics.EVENTS, OPERATION_ERRORS, OPERATION_SECONDS, UPLOADED_BYTES):
        if instrument.kind == "counter":  # prometheus-client's counter family drops a _total suffix
            family = instrument.name.removesuffix("_total")
            names |= {f"{family}_total", f"{family}_created"}
        else:
            names |= {f"{instrument.name}_{s}" for s in ("bucket", "sum", "count", "created")}
    return names


class StatusCollector(Collector):
    """Gauges read from `status()` (a callable returning replicator.status.agent_status)."""

    def __init__(self, status) -> None:
        self._status = status

    def describe(self) -> Iterator:
        return iter(())  # state is read at collect time; nothing to check at registration

    def collect(self) -> Iterator:
        st = self._status()
        g = {name: GaugeMetricFamily(name, text, labels=_labels_of(name)) for name, text in _STATE.items()}
        build = InfoMetricFamily("replicator_build", _INFO["replicator_build"], value={"version": __version__})
        gen = InfoMetricFamily("replicator_generation", _INFO["replicator_generation"], labels=["db"])
        rgen = InfoMetricFamily("replicator_replica_generation", _INFO["replicator_replica_generation"], labels=["db", "replica"])
        for db in st["databases"]:
            d = [db["path"]]
            if db["generation"]:
                gen.add_metric(d, {"generation": db["generation"]})
            _add(g, "replicator_data_loss_window_threshold_seconds", d, db["data_loss_window_threshold"])
            _add(g, "replicator_local_txid", d, db["txid"])
            _add(g, "replicator_last_snapshot_timestamp_seconds", d, db["last_snapshot"])
            _add(g, "replicator_snapshot_interval_seconds", d, db["snapshot_interval"])
            _add(g, "replicator_wal_bytes", d, db["wal_bytes"])
            _add(g, "replicator_database_bytes", d, db["db_bytes"])
            _add(g, "replicator_shadow_bytes", d, db["shadow_bytes"])
            _add(g, "replicator_shadow_max_bytes", d, db["shadow_max_bytes"])
            _add(g, "replicator_shadow_full", d, int(db["shadow_full"]))
            _add(g, "replicator_capture_failing", d, int(db["last_error"] is not None))
            for r in db["replicas"]:
                dr = [db["path"], r["name"]]
                if r["generation"]:
                    rgen.add_metric(dr, {"generation": r["generation"]})
                _add(g, "replicator_data_loss_window_seconds", dr, r["data_loss_window"])
                _add(g, "replicator_replica_txid", dr, r["txid"])
                _add(g, "replicator_replica_last_upload_timestamp_seconds", dr, r["last_upload"])
                _add(g, "replicator_replica_pending_artefacts", dr, r["pending_artefacts"])
                _add(g, "replicator_replica_pending_bytes", dr, r["pending_bytes"])
                _add(g, "replicator_replica_failing", dr, int(r["last_error"] is not None))
                _add(g, "replicator_replica_behind_threshold", dr, int(r["behind_threshold"]))
                _add(g, "replicator_verify_last_success_timestamp_seconds", dr, r["verify"]["last_success"])
                if r["verify"]["last_ok"] is not None:
                    _add(g, "replicator_verify_last_ok", dr, int(r["verify"]["last_ok"]))
        _add(g, "replicator_ready", [], int(st["ready"]))
        yield build
        yield gen
        yield rgen
        yield from g.values()


def _labels_of(name: str) -> list[str]:
    if name == "replicator_ready":
        return []
    if name.startswith(("replicator_replica_", "replicator_data_loss_window_seconds", "replicator_verify_")):
        return ["db", "replica"]
    return ["db"]


def _add(families: dict, name: str, labels: list[str], value: float | int | None) -> None:
    if value is not None:
        families[name].add_metric(labels, float(value))


def exposition(status_registry: CollectorRegistry) -> bytes:
    """The /metrics body: the event metrics of the default registry plus the live state."""
    return generate_latest(REGISTRY) + generate_latest(status_registry)


def status_registry(status) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return registry
