"""The agent's live status as plain data: what `/status`, `/metrics` and `/readyz` report.

One function builds it, so `replicator status` and the Prometheus gauges always agree.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from replicator.controller import Agent, DatabaseReplicator


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def database_status(d: "DatabaseReplicator", now: float) -> dict[str, Any]:
    state = d.capture.state
    threshold = d.cfg.data_loss_window_threshold
    replicas = []
    for s in d.shippers:
        window = s.data_loss_window()
        generation, txid = s.position if s.position is not None else (None, None)
        replicas.append(
            {
                "name": s.name,
                "url": s.driver.url,
                "generation": generation,
                "txid": txid,
                "data_loss_window": round(window, 6),
                "behind_threshold": window > threshold,
                "last_upload": s.last_success,
                "pending_artefacts": len(s.pending),
                "pending_bytes": s.pending_bytes(),
                "last_error": s.last_error,
                "verify": dict(s.verify),
            }
        )
    path = str(d.cfg.path)
    return {
        "path": path,
        "generation": state.generation if state is not None else None,
        "txid": state.txid if state is not None else None,
        "last_commit_time": state.commit_time if state is not None else None,
        "last_snapshot": d.capture.last_snapshot_time,
        "snapshot_interval": d.cfg.snapshot_interval,
        "wal_bytes": _size(path + "-wal"),
        "db_bytes": _size(path),
        "shadow_bytes": d.shadow_bytes(),
        "shadow_max_bytes": d.cfg.shadow_max_bytes,
        "shadow_full": d.shadow_full,
        "last_error": d.last_error,
        "data_loss_window_threshold": threshold,
        "replicas": replicas,
    }


def is_ready(databases: list[dict[str, Any]]) -> bool:
    """Ready while every replica is within its threshold and not failing, and capture works."""
    return all(
        db["last_error"] is None and all(not r["behind_threshold"] and r["last_error"] is None for r in db["replicas"])
        for db in databases
    )


def agent_status(agent: "Agent", now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    databases = [database_status(d, now) for d in list(agent.databases)]
    return {"time": now, "pid": os.getpid(), "ready": is_ready(databases), "databases": databases}
