"""Retention decisions over plain key listings (DESIGN invariant 6)."""

from __future__ import annotations

import calendar
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.keys import SEGMENT, SNAPSHOT, ArtefactKey
from replicator.restore_plan import PlanError, RestoreTarget, group_by_generation, plan_restore
from replicator.retention import RetentionDecision, plan_retention

BASE = calendar.timegm((2026, 11, 22, 10, 0, 0, 0, 0, 0))  # 2026-11-22T10:00:00Z
DAY = 86400.0


def gen(offset: float = 0.0, suffix: int = 0) -> str:
    """A generation id created `offset` seconds after BASE."""
    t = BASE + offset
    whole = int(t)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(whole))
    return f"{stamp}{round((t - whole) * 1e6):06d}Z-{suffix:04x}"


def snap(g: str, txid: int, t: float) -> ArtefactKey:
    return ArtefactKey(g, SNAPSHOT, txid, txid, round((BASE + t) * 1000))


def seg(g: str, first: int, last: int, t: float) -> ArtefactKey:
    return ArtefactKey(g, SEGMENT, first, last, round((BASE + t) * 1000))


A, B, C = gen(0, 0xA), gen(10 * DAY, 0xB), gen(20 * DAY, 0xC)


def remaining(items: list[ArtefactKey], decision: RetentionDecision) -> list[ArtefactKey]:
    gone = set(decision.delete)
    return [a for a in items if a not in gone]


def test_empty_listing():
    d = plan_retention([], now=BASE, retention=DAY)
    assert d.delete == () and d.keep_snapshots == () and dict(d.reasons) == {}


def test_newest_snapshot_is_never_deleted_even_if_ancient():
    items = [snap(A, 0, 0), seg(A, 1, 5, 5), seg(A, 6, 9, 9)]
    d = plan_retention(items, now=BASE + 365 * DAY, retention=DAY)
    assert d.delete == ()
    assert d.keep_snapshots == (snap(A, 0, 0),)


def test_expired_snapshots_and_segments_before_oldest_retained_snapshot_go():
    now = BASE + 2 * DAY
    s0, s10 = snap(A, 0, 0), snap(A, 10, 0.5 * DAY)  # expired (retention 1 day)
    s20, s30 = snap(A, 20, 1.5 * DAY), snap(A, 30, 1.9 * DAY)
    old = [seg(A, 1, 5, 100), seg(A, 6, 10, 200), seg(A, 11, 17, 300)]
    straddling = seg(A, 18, 22, 1.6 * DAY)  # holds txns after snapshot 20: needed
    after = [seg(A, 23, 30, 1.8 * DAY), seg(A, 31, 40, 1.95 * DAY)]
    items = [s0, s10, s20, s30, *old, straddling, *after]
    d = plan_retention(items, now=now, retention=DAY)
    assert d.delete == (s0, s10, *old)
    assert d.keep_snapshots == (s20, s30)
    assert set(d.reasons) == {k.key for k in d.delete}
    assert "retention cutoff 2026-11-23T10:00:00Z" in d.reasons[s0.key]
    assert d.reasons[old[0].key] == "segment before the oldest retained snapshot (txid 20)"


def test_segments_after_oldest_retained_snapshot_are_kept_for_point_in_time():
    now = BASE + 2 * DAY
    items = [snap(A, 0, 0), snap(A, 5, 1.2 * DAY), snap(A, 9, 1.5 * DAY), seg(A, 1, 5, 1.1 * DAY),
             seg(A, 6, 7, 1.3 * DAY), seg(A, 8, 9, 1.4 * DAY), seg(A, 10, 12, 1.6 * DAY)]  # fmt: skip
    d = plan_retention(items, now=now, retention=DAY)
    left = remaining(items, d)
    assert seg(A, 6, 7, 1.3 * DAY) in left and seg(A, 8, 9, 1.4 * DAY) in left
    for txid in range(5, 13):  # every point from the oldest retained snapshot on
        assert plan_restore(left, RestoreTarget(txid=txid)).target_txid == txid


def test_snapshot_exactly_at_the_cutoff_is_kept():
    items = [snap(A, 0, 0), snap(A, 3, DAY), snap(A, 6, 1.5 * DAY)]
    d = plan_retention(items, now=BASE + 2 * DAY, retention=DAY)
    assert d.delete == (snap(A, 0, 0),)
    assert d.keep_snapshots == (snap(A, 3, DAY), snap(A, 6, 1.5 * DAY))


def test_old_generation_without_retained_snapshot_is_dropped_whole():
    old = [snap(A, 0, 0), snap(A, 4, 4), seg(A, 1, 3, 3), seg(A, 4, 9, 9)]
    new = [snap(B, 0, 10 * DAY), seg(B, 1, 2, 10 * DAY + 1)]
    d = plan_retention(old + new, now=BASE + 10.5 * DAY, retention=DAY)
    assert d.delete == tuple(old)  # snapshots first, then segments, each oldest first
    assert d.keep_snapshots == (snap(B, 0, 10 * DAY),)
    assert all(d.reasons[k.key] == f"generation {A} has no retained snapshot" for k in old)


def test_old_generation_with_a_retained_snapshot_is_kept():
    old = [snap(A, 0, 0), seg(A, 1, 3, 3)]
    new = [snap(B, 0, 10 * DAY)]
    d = plan_retention(old + new, now=BASE + 10.5 * DAY, retention=30 * DAY)
    assert d.delete == ()
    assert d.keep_snapshots == (snap(A, 0, 0), snap(B, 0, 10 * DAY))


def test_newest_generation_without_snapshot_is_untouched_and_fallback_kept():
    older = [snap(A, 0, 0), seg(A, 1, 3, 3)]
    fallback = [snap(B, 0, 10 * DAY), seg(B, 1, 4, 10 * DAY + 4)]  # ancient, but the newest snapshot
    newest = [seg(C, 1, 1, 20 * DAY + 1), seg(C, 2, 5, 20 * DAY + 5)]  # first snapshot still uploading
    d = plan_retention(older + fallback + newest, now=BASE + 100 * DAY, retention=DAY)
    assert d.delete == tuple(older)
    assert d.keep_snapshots == (snap(B, 0, 10 * DAY),)
    assert plan_restore(remaining(older + fallback + newest, d)).generation == B


def test_retention_zero_keeps_only_the_newest_restore_chain():
    now = BASE + 11 * DAY
    old = [snap(A, 0, 0), seg(A, 1, 3, 3)]
    cur = [snap(B, 0, 10 * DAY), snap(B, 4, 10 * DAY + 5), seg(B, 1, 4, 10 * DAY + 4), seg(B, 5, 6, 10 * DAY + 6)]
    for retention in (0.0, -5.0):
        d = plan_retention(old + cur, now=now, retention=retention)
        assert d.delete == (*old, snap(B, 0, 10 * DAY), seg(B, 1, 4, 10 * DAY + 4))
        assert d.keep_snapshots == (snap(B, 4, 10 * DAY + 5),)
        assert "retention <= 0" in d.reasons[snap(B, 0, 10 * DAY).key]


def test_retention_zero_ignores_clock_skew():
    # A snapshot stamped in the future (skewed clock) still expires when it is not the newest.
    items = [snap(A, 0, DAY), snap(A, 2, DAY + 1), seg(A, 1, 2, DAY + 1)]
    d = plan_retention(items, now=BASE, retention=0)
    assert d.keep_snapshots == (snap(A, 2, DAY + 1),)


def test_delete_order_is_oldest_generation_first():
    g1 = [snap(A, 0, 0), seg(A, 1, 1, 1)]
    g2 = [snap(B, 0, 10 * DAY), snap(B, 5, 10 * DAY + 5), seg(B, 1, 5, 10 * DAY + 5)]
    g3 = [snap(C, 0, 20 * DAY)]
    d = plan_retention(list(reversed(g1 + g2 + g3)), now=BASE + 20 * DAY, retention=0)
    assert d.delete == (*g1, snap(B, 0, 10 * DAY), snap(B, 5, 10 * DAY + 5), seg(B, 1, 5, 10 * DAY + 5))


def test_reasons_are_read_only():
    d = plan_retention([snap(A, 0, 0), snap(A, 1, 1)], now=BASE + DAY, retention=1)
    with pytest.raises(TypeError):
        d.reasons["x"] = "y"  # type: ignore[index]


# --- property -------------------------------------------------------------------------


@st.composite
def listings(draw):
    """1..3 generations of valid chains (maybe with a hole); txn n of generation i commits
    at BASE + i*1000 + n*10 s; snapshots 5 s after their txn."""
    n_gens = draw(st.integers(1, 3))
    items: list[ArtefactKey] = []
    ends: dict[str, int] = {}
    for i in range(n_gens):
        g, t0 = gen(i * 1000, i), i * 1000
        end = draw(st.integers(0, 20))
        ends[g] = end
        cuts = sorted(draw(st.sets(st.integers(1, end), max_size=end)) | {end + 1}) if end else []
        first = 1
        for cut in cuts:
            if cut > first:
                items.append(seg(g, first, cut - 1, t0 + (cut - 1) * 10))
            first = cut
        for _ in range(draw(st.integers(0, 2)) if end else 0):
            lo = draw(st.integers(1, end))
            hi = draw(st.integers(lo, end))
            items.append(seg(g, lo, hi, t0 + hi * 10))
        if i < n_gens - 1 or draw(st.integers(0, 3)) > 0:
            txids = draw(st.sets(st.integers(0, end), min_size=1, max_size=4))
            items += [snap(g, t, t0 + t * 10 + 5) for t in txids]
    segs = [a for a in items if a.kind == SEGMENT]
    if segs and draw(st.booleans()):
        items.remove(draw(st.sampled_from(segs)))
    return items, ends


def attempt(items: list[ArtefactKey], target: RestoreTarget):
    try:
        return plan_restore(items, target)
    except PlanError:
        return None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_retention_keeps_every_retained_restore_point(data):
    items, ends = data.draw(listings())
    now = BASE + data.draw(st.floats(0, 3500, allow_nan=False))
    retention = data.draw(st.one_of(st.just(0.0), st.floats(-10, 4000, allow_nan=False)))
    d = plan_retention(items, now=now, retention=retention)
    left = remaining(items, d)

    assert set(d.delete) <= set(items) and len(set(d.delete)) == len(d.delete)
    assert not set(d.keep_snapshots) & set(d.delete)
    assert set(d.reasons) == {k.key for k in d.delete}

    snaps = [a for a in items if a.kind == SNAPSHOT]
    if snaps:  # the newest snapshot (newest generation that has one, highest txid) survives
        newest = max(snaps, key=lambda s: (s.generation, s.last_txid))
        assert newest in d.keep_snapshots and newest in left
    newest_gen = max(ends)
    if not any(s.generation == newest_gen for s in snaps):
        assert not any(a.generation == newest_gen for a in d.delete)

    before_latest = attempt(items, RestoreTarget())
    if before_latest is not None:
        assert attempt(left, RestoreTarget()) == before_latest

    for g, kept in group_by_generation(d.keep_snapshots).items():
        oldest = min(s.last_txid for s in kept)
        for txid in range(oldest, ends[g] + 2):
            target = RestoreTarget(generation=g, txid=txid)
            before = attempt(items, target)
            if before is not None:
                assert attempt(left, target) == before, f"txid {txid} of {g} lost"
