"""Retention: which artefacts a replica may drop, as a pure decision over its listing.

DESIGN invariant 6: never delete what the oldest retained restore point needs. A snapshot
is retained while it is younger than the retention period, and the newest snapshot is
retained whatever its age; a retained snapshot keeps every segment after it.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from replicator.keys import SEGMENT, SNAPSHOT, ArtefactKey
from replicator.restore_plan import format_time, group_by_generation

__all__ = ["RetentionDecision", "plan_retention"]


@dataclass(frozen=True)
class RetentionDecision:
    """What to delete, in a safe order, and which snapshots stay."""

    # Oldest generation first; within one, snapshots (oldest first) before segments
    # (oldest first), so an interrupted run leaves every remaining snapshot's chain whole.
    delete: tuple[ArtefactKey, ...]
    keep_snapshots: tuple[ArtefactKey, ...]
    reasons: Mapping[str, str]  # key string -> why it is deleted (for logs)


def plan_retention(artefacts: Iterable[ArtefactKey], *, now: float, retention: float) -> RetentionDecision:
    """Decide what to prune; `retention` in seconds, <= 0 keeps only the newest restore chain."""
    groups = group_by_generation(artefacts)
    snapshots = [a for items in groups.values() for a in items if a.kind == SNAPSHOT]
    # The newest snapshot is the one a latest restore uses: newest generation that has
    # one, highest txid (a newer generation without a snapshot yet does not count).
    newest = max(snapshots, key=lambda s: (s.generation, s.last_txid, s.time_ms)) if snapshots else None
    newest_generation = max(groups) if groups else None
    cutoff = now - retention

    def expired(s: ArtefactKey) -> bool:
        if s == newest:
            return False
        return retention <= 0 or s.time < cutoff

    why_expired = (
        "snapshot older than the newest snapshot (retention <= 0)"
        if retention <= 0
        else f"snapshot taken before the retention cutoff {format_time(cutoff)}"
    )

    delete: list[ArtefactKey] = []
    keep: list[ArtefactKey] = []
    reasons: dict[str, str] = {}
    for generation, items in groups.items():
        snaps = [a for a in items if a.kind == SNAPSHOT]
        segs = [a for a in items if a.kind == SEGMENT]
        retained = [s for s in snaps if not expired(s)]
        if retained:
            oldest = min(retained, key=lambda s: (s.last_txid, s.time_ms))
            keep.extend(retained)
            retained_set = set(retained)
            for s in snaps:
                if s not in retained_set:
                    delete.append(s)
                    reasons[s.key] = why_expired
            for s in segs:
                if s.last_txid <= oldest.last_txid:
                    delete.append(s)
                    reasons[s.key] = f"segment before the oldest retained snapshot (txid {oldest.last_txid})"
        elif generation == newest_generation:
            # Its first snapshot may still be uploading: touch nothing.
            continue
        else:
            for a in items:
                delete.append(a)
                reasons[a.key] = f"generation {generation} has no retained snapshot"

    return RetentionDecision(
        delete=tuple(delete),
        keep_snapshots=tuple(keep),
        reasons=types.MappingProxyType(reasons),
    )
