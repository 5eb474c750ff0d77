"""Restore planning: which snapshot and which segments rebuild a requested state.

Pure functions over a replica listing (parsed keys): no I/O, no clock. A plan is a
snapshot plus the unbroken chain of segments after it up to the target; anything missing
on the way is a PlanError naming it, never a silently older state (DESIGN invariants 2, 4).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from replicator.keys import SEGMENT, SNAPSHOT, ArtefactKey, generation_time

__all__ = [
    "GenerationSummary",
    "PlanError",
    "RestorePlan",
    "RestoreTarget",
    "format_time",
    "generation_summary",
    "group_by_generation",
    "plan_restore",
]


class PlanError(Exception):
    """The replica cannot provide the requested state; the message names what is missing."""


@dataclass(frozen=True)
class RestoreTarget:
    """What to restore: latest by default, or the state after a txid or at a time."""

    generation: str | None = None
    txid: int | None = None  # restore the state right after this txid
    timestamp: float | None = None  # the state after the last txn committed at or before this unix time

    def __post_init__(self) -> None:
        if self.txid is not None and self.timestamp is not None:
            raise ValueError("restore target: txid and timestamp are mutually exclusive")
        if self.txid is not None and self.txid < 0:
            raise ValueError(f"restore target: txid must be >= 0, got {self.txid}")


@dataclass(frozen=True)
class RestorePlan:
    """A snapshot and the segments to apply on top of it, in order."""

    generation: str
    snapshot: ArtefactKey
    # In apply order; the first may start at or before snapshot.last_txid (the applier
    # skips transactions the snapshot already holds).
    segments: tuple[ArtefactKey, ...]
    target_txid: int | None  # stop after this txid; None = apply everything in the segments
    target_time: float | None  # stop before the first txn committed later than this
    notes: tuple[str, ...] = ()

    @property
    def last_txid(self) -> int:
        """The txid the plan ends at when target_txid is None."""
        return self.segments[-1].last_txid if self.segments else self.snapshot.last_txid


@dataclass(frozen=True)
class GenerationSummary:
    """One generation as `replicator generations` shows it."""

    generation: str
    snapshot_count: int
    segment_count: int
    first_txid: int | None  # the earliest snapshot's txid; None without a snapshot
    last_txid: int | None  # end of the contiguous chain from the newest snapshot
    created: float  # unix seconds, from the generation id
    updated: float  # unix seconds, newest key time
    is_restorable: bool  # has a snapshot and no hole after its newest snapshot


def format_time(t: float) -> str:
    """RFC 3339 UTC with 'Z'; milliseconds only when the time has them."""
    ms = round(t * 1000)
    whole, frac = divmod(ms, 1000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{stamp}.{frac:03d}Z" if frac else f"{stamp}Z"


def _sort_key(a: ArtefactKey) -> tuple[int, int, int, int]:
    return (0 if a.kind == SNAPSHOT else 1, a.first_txid, a.last_txid, a.time_ms)


def group_by_generation(artefacts: Iterable[ArtefactKey]) -> dict[str, list[ArtefactKey]]:
    """Artefacts per generation, generations in id order; each list holds snapshots then
    segments, each by txid. Duplicate keys (the same listing entry twice) collapse."""
    groups: dict[str, set[ArtefactKey]] = {}
    for a in artefacts:
        groups.setdefault(a.generation, set()).add(a)
    return {g: sorted(groups[g], key=_sort_key) for g in sorted(groups)}


@dataclass(frozen=True)
class _Chain:
    segments: tuple[ArtefactKey, ...]
    end: int  # last txid covered (the start txid when no segment follows it)
    gap: tuple[int, int] | None  # missing txids right after `end`, when later segments exist


def _follow_chain(
    segments: list[ArtefactKey],
    start: int,
    *,
    until_txid: int | None = None,
    until_time: float | None = None,
) -> _Chain:
    """Greedy chain of segments continuing the state at txid `start`.

    Each step takes, among segments holding txid end+1, the one reaching furthest. Stops
    once end >= until_txid, or after taking a segment whose time is later than until_time,
    or when no segment holds end+1 (then `gap` says what is missing if anything follows).
    """
    ordered = sorted(segments, key=lambda s: (s.first_txid, s.last_txid, s.time_ms))
    chain: list[ArtefactKey] = []
    end, i = start, 0
    while True:
        if until_txid is not None and end >= until_txid:
            return _Chain(tuple(chain), end, None)
        if until_time is not None and chain and chain[-1].time > until_time:
            return _Chain(tuple(chain), end, None)
        nxt, best = end + 1, None
        # Segments consumed here start at or before nxt; those ending before nxt are
        # useless now and later (nxt only grows), so one pass over `ordered` suffices.
        while i < len(ordered) and ordered[i].first_txid <= nxt:
            s = ordered[i]
            if s.last_txid >= nxt and (best is None or s.last_txid >= best.last_txid):
                best = s
            i += 1
        if best is None:
            gap = (nxt, ordered[i].first_txid - 1) if i < len(ordered) else None
            return _Chain(tuple(chain), end, gap)
        chain.append(best)
        end = best.last_txid


def _hole_error(generation: str, chain: _Chain, snapshot: ArtefactKey) -> PlanError:
    assert chain.gap is not None
    lo, hi = chain.gap
    txids = f"txid {lo}" if lo == hi else f"txids {lo}..{hi}"
    before = chain.segments[-1] if chain.segments else snapshot
    return PlanError(f"segment missing in generation {generation}: {txids} (after {before.key})")


def _names(generations: Iterable[str], limit: int = 6) -> str:
    names = list(generations)
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[-limit:]) + f" and {len(names) - limit} older"


def _snapshots(items: list[ArtefactKey]) -> list[ArtefactKey]:
    return [a for a in items if a.kind == SNAPSHOT]


def _segments(items: list[ArtefactKey]) -> list[ArtefactKey]:
    return [a for a in items if a.kind == SEGMENT]


def _newest(snapshots: Iterable[ArtefactKey]) -> ArtefactKey:
    return max(snapshots, key=lambda s: (s.last_txid, s.time_ms))


def _choose_generation(
    groups: dict[str, list[ArtefactKey]], target: RestoreTarget
) -> tuple[str, tuple[str, ...]]:
    """The generation to restore from (for latest and txid targets) and notes about it."""
    if target.generation is not None:
        if not _snapshots(groups[target.generation]):
            raise PlanError(f"generation {target.generation} has no snapshot")
        return target.generation, ()
    with_snapshot = [g for g, items in groups.items() if _snapshots(items)]
    if not with_snapshot:
        raise PlanError(f"no generation has a snapshot (have: {_names(groups)})")
    chosen = with_snapshot[-1]
    newer = [g for g in groups if g > chosen]
    if not newer:
        return chosen, ()
    if len(newer) == 1:
        note = f"newest generation {newer[0]} has no snapshot yet; using {chosen}"
    else:
        note = f"newer generations {', '.join(newer)} have no snapshot yet; using {chosen}"
    return chosen, (note,)


def plan_restore(artefacts: Iterable[ArtefactKey], target: RestoreTarget = RestoreTarget()) -> RestorePlan:
    """Plan the restore of `target` from a replica listing; PlanError if it cannot be done."""
    groups = group_by_generation(artefacts)
    if not groups:
        raise PlanError("replica holds no generations")
    if target.generation is not None and target.generation not in groups:
        raise PlanError(f"generation {target.generation} not found (have: {_names(groups)})")
    if target.timestamp is not None:
        return _plan_at_time(groups, target)

    generation, notes = _choose_generation(groups, target)
    items = groups[generation]
    snapshots, segments = _snapshots(items), _segments(items)

    if target.txid is None:
        snapshot = _newest(snapshots)
        chain = _follow_chain(segments, snapshot.last_txid)
        if chain.gap is not None:
            raise _hole_error(generation, chain, snapshot)
        return RestorePlan(generation, snapshot, chain.segments, None, None, notes)

    usable = [s for s in snapshots if s.last_txid <= target.txid]
    if not usable:
        earliest = min(s.last_txid for s in snapshots)
        raise PlanError(
            f"no snapshot at or before txid {target.txid} in generation {generation}"
            f" (earliest snapshot is at txid {earliest})"
        )
    snapshot = _newest(usable)
    chain = _follow_chain(segments, snapshot.last_txid, until_txid=target.txid)
    if chain.end < target.txid:
        if chain.gap is not None:
            raise _hole_error(generation, chain, snapshot)
        raise PlanError(
            f"txid {target.txid} is beyond the end of generation {generation} (last txid {chain.end})"
        )
    return RestorePlan(generation, snapshot, chain.segments, target.txid, None, notes)


def _plan_at_time(groups: dict[str, list[ArtefactKey]], target: RestoreTarget) -> RestorePlan:
    assert target.timestamp is not None
    ts = target.timestamp
    considered = [target.generation] if target.generation is not None else list(groups)
    for generation in reversed(considered):
        items = groups[generation]
        usable = [s for s in _snapshots(items) if s.time <= ts]
        if not usable:
            continue
        snapshot = _newest(usable)
        chain = _follow_chain(_segments(items), snapshot.last_txid, until_time=ts)
        if chain.gap is None and not (chain.segments and chain.segments[-1].time > ts):
            # the chain ran out before the time: if the generation knows later txids (a
            # later snapshot), the segments leading to them are missing, and their
            # transactions may be at or before the time: never restore an older state
            later = [a.first_txid - 1 if a.kind == SEGMENT else a.last_txid for a in items if a.last_txid > chain.end]
            if later:
                chain = _Chain(chain.segments, chain.end, (chain.end + 1, max(chain.end + 1, min(later))))
        if chain.gap is not None:
            raise _hole_error(generation, chain, snapshot)
        return RestorePlan(generation, snapshot, chain.segments, None, ts)

    times = [s.time for g in considered for s in _snapshots(groups[g])]
    where = f" in generation {target.generation}" if target.generation is not None else ""
    if not times:
        raise PlanError(f"no snapshot{where} to restore from (have: {_names(considered)})")
    raise PlanError(
        f"no restore point{where} at or before {format_time(ts)} (earliest is {format_time(min(times))})"
    )


def generation_summary(artefacts: Iterable[ArtefactKey]) -> list[GenerationSummary]:
    """One summary per generation, oldest first."""
    out = []
    for generation, items in group_by_generation(artefacts).items():
        snapshots, segments = _snapshots(items), _segments(items)
        first_txid = last_txid = None
        restorable = False
        if snapshots:
            first_txid = min(s.last_txid for s in snapshots)
            chain = _follow_chain(segments, _newest(snapshots).last_txid)
            last_txid, restorable = chain.end, chain.gap is None
        out.append(
            GenerationSummary(
                generation=generation,
                snapshot_count=len(snapshots),
                segment_count=len(segments),
                first_txid=first_txid,
                last_txid=last_txid,
                created=generation_time(generation),
                updated=max(a.time for a in items),
                is_restorable=restorable,
            )
        )
    return out
