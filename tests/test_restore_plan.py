"""Restore planning over plain key listings: rules, error messages, and chain properties."""

from __future__ import annotations

import calendar
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.keys import SEGMENT, SNAPSHOT, ArtefactKey, generation_time, is_generation_id, parse_key
from replicator.restore_plan import (
    GenerationSummary,
    PlanError,
    RestorePlan,
    RestoreTarget,
    format_time,
    generation_summary,
    group_by_generation,
    plan_restore,
)

BASE = calendar.timegm((2026, 11, 22, 10, 0, 0, 0, 0, 0))  # 2026-11-22T10:00:00Z


def gen(offset: float = 0.0, suffix: int = 0) -> str:
    """A generation id created `offset` seconds after BASE."""
    t = BASE + offset
    whole = int(t)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(whole))
    return f"{stamp}{round((t - whole) * 1e6):06d}Z-{suffix:04x}"


def ms(offset: float) -> int:
    return round((BASE + offset) * 1000)


def snap(g: str, txid: int, t: float) -> ArtefactKey:
    return ArtefactKey(g, SNAPSHOT, txid, txid, ms(t))


def seg(g: str, first: int, last: int, t: float) -> ArtefactKey:
    return ArtefactKey(g, SEGMENT, first, last, ms(t))


A, B, C = gen(0, 0xA), gen(3600, 0xB), gen(7200, 0xC)


def test_helpers_build_real_keys():
    assert is_generation_id(A) and A < B < C
    assert generation_time(B) == BASE + 3600
    for k in (snap(A, 7, 1), seg(A, 1, 9, 2)):
        assert parse_key(k.key) == k


# --- RestoreTarget, RestorePlan, format_time ---------------------------------------


def test_target_txid_and_timestamp_are_mutually_exclusive():
    with pytest.raises(ValueError, match="mutually exclusive"):
        RestoreTarget(txid=3, timestamp=BASE)


def test_target_rejects_negative_txid():
    with pytest.raises(ValueError):
        RestoreTarget(txid=-1)


def test_plan_last_txid_is_last_segment_or_snapshot():
    s = snap(A, 4, 1)
    assert RestorePlan(A, s, (), None, None).last_txid == 4
    assert RestorePlan(A, s, (seg(A, 3, 6, 2), seg(A, 7, 9, 3)), None, None).last_txid == 9


def test_format_time_is_rfc3339_utc():
    assert format_time(BASE) == "2026-11-22T10:00:00Z"
    assert format_time(BASE + 3.5) == "2026-11-22T10:00:03.500Z"
    assert format_time(BASE + 0.0004) == "2026-11-22T10:00:00Z"


# --- group_by_generation ---------------------------------------------------------------


def test_group_by_generation_sorts_generations_then_snapshots_then_segments():
    items = [seg(B, 4, 6, 5), snap(B, 3, 4), seg(A, 1, 2, 1), seg(B, 1, 3, 3), snap(A, 0, 0), snap(B, 0, 0)]
    assert group_by_generation(items) == {
        A: [snap(A, 0, 0), seg(A, 1, 2, 1)],
        B: [snap(B, 0, 0), snap(B, 3, 4), seg(B, 1, 3, 3), seg(B, 4, 6, 5)],
    }
    assert list(group_by_generation(reversed(items))) == [A, B]


def test_group_by_generation_collapses_duplicates():
    assert group_by_generation([snap(A, 0, 0), snap(A, 0, 0)]) == {A: [snap(A, 0, 0)]}


def test_group_by_generation_empty():
    assert group_by_generation([]) == {}


# --- latest ------------------------------------------------------------------------------


def test_no_generations():
    with pytest.raises(PlanError, match=r"^replica holds no generations$"):
        plan_restore([])


def test_latest_snapshot_and_full_chain():
    items = [snap(A, 0, 0), seg(A, 1, 3, 1), seg(A, 4, 6, 2), seg(A, 7, 7, 3)]
    plan = plan_restore(items)
    assert plan == RestorePlan(A, snap(A, 0, 0), (seg(A, 1, 3, 1), seg(A, 4, 6, 2), seg(A, 7, 7, 3)), None, None)
    assert plan.last_txid == 7
    assert plan.notes == ()


def test_latest_with_snapshot_only():
    plan = plan_restore([snap(A, 0, 0)])
    assert plan.segments == () and plan.last_txid == 0


def test_latest_uses_newest_snapshot_and_skips_segments_it_holds():
    items = [snap(A, 0, 0), snap(A, 5, 10), seg(A, 1, 3, 1), seg(A, 4, 5, 2), seg(A, 6, 9, 11)]
    plan = plan_restore(items)
    assert plan.snapshot == snap(A, 5, 10)
    assert plan.segments == (seg(A, 6, 9, 11),)


def test_latest_segment_overlapping_snapshot_is_first():
    # The snapshot was taken mid-segment: the segment starts before it; the applier skips 4..5.
    items = [snap(A, 0, 0), snap(A, 5, 10), seg(A, 1, 3, 1), seg(A, 4, 8, 12), seg(A, 9, 9, 13)]
    plan = plan_restore(items)
    assert plan.segments == (seg(A, 4, 8, 12), seg(A, 9, 9, 13))
    assert plan.segments[0].first_txid <= plan.snapshot.last_txid


def test_latest_prefers_segment_reaching_furthest():
    # 1..5 is a compacted copy of 1..3 + 4..5; the chain takes the longer one.
    items = [snap(A, 0, 0), seg(A, 1, 3, 1), seg(A, 4, 5, 2), seg(A, 1, 5, 2), seg(A, 3, 8, 3), seg(A, 9, 9, 4)]
    plan = plan_restore(items)
    assert plan.segments == (seg(A, 1, 5, 2), seg(A, 3, 8, 3), seg(A, 9, 9, 4))


def test_latest_hole_names_range_and_artefact_before_it():
    before = seg(A, 1, 4, 1)
    items = [snap(A, 0, 0), before, seg(A, 8, 9, 3)]
    with pytest.raises(PlanError) as err:
        plan_restore(items)
    assert str(err.value) == f"segment missing in generation {A}: txids 5..7 (after {before.key})"


def test_latest_single_txid_hole():
    before = seg(A, 1, 4, 1)
    with pytest.raises(PlanError, match=rf"^segment missing in generation {A}: txid 5 \(after {before.key}\)$"):
        plan_restore([snap(A, 0, 0), before, seg(A, 6, 9, 3)])


def test_latest_hole_right_after_snapshot_names_the_snapshot():
    s = snap(A, 5, 10)
    items = [snap(A, 0, 0), s, seg(A, 1, 5, 9), seg(A, 8, 9, 12)]
    with pytest.raises(PlanError) as err:
        plan_restore(items)
    assert str(err.value) == f"segment missing in generation {A}: txids 6..7 (after {s.key})"


def test_latest_hole_before_newest_snapshot_does_not_matter():
    items = [snap(A, 0, 0), seg(A, 1, 2, 1), snap(A, 5, 10), seg(A, 6, 7, 11)]
    assert plan_restore(items).segments == (seg(A, 6, 7, 11),)


def test_latest_falls_back_when_newest_generation_has_no_snapshot_yet():
    items = [snap(A, 0, 0), snap(B, 0, 3600), seg(B, 1, 2, 3601), seg(C, 1, 1, 7201)]
    plan = plan_restore(items)
    assert plan.generation == B
    assert plan.segments == (seg(B, 1, 2, 3601),)
    assert plan.notes == (f"newest generation {C} has no snapshot yet; using {B}",)


def test_latest_fallback_note_lists_every_newer_generation():
    items = [snap(A, 0, 0), seg(B, 1, 1, 3601), seg(C, 1, 1, 7201)]
    plan = plan_restore(items)
    assert plan.generation == A
    assert plan.notes == (f"newer generations {B}, {C} have no snapshot yet; using {A}",)


def test_latest_newest_generation_wins():
    items = [snap(A, 0, 0), seg(A, 1, 50, 10), snap(B, 0, 3600), seg(B, 1, 2, 3601)]
    plan = plan_restore(items)
    assert plan.generation == B and plan.last_txid == 2 and plan.notes == ()


def test_no_generation_has_a_snapshot():
    with pytest.raises(PlanError, match=rf"^no generation has a snapshot \(have: {A}, {B}\)$"):
        plan_restore([seg(A, 1, 1, 1), seg(B, 1, 1, 3601)])


def test_explicit_generation():
    items = [snap(A, 0, 0), seg(A, 1, 3, 1), snap(B, 0, 3600)]
    plan = plan_restore(items, RestoreTarget(generation=A))
    assert plan.generation == A and plan.segments == (seg(A, 1, 3, 1),) and plan.notes == ()


def test_explicit_generation_not_found():
    missing = gen(99, 0xAB12)
    with pytest.raises(PlanError) as err:
        plan_restore([snap(A, 0, 0), snap(B, 0, 3600)], RestoreTarget(generation=missing))
    assert str(err.value) == f"generation {missing} not found (have: {A}, {B})"


def test_explicit_generation_without_snapshot():
    with pytest.raises(PlanError, match=rf"^generation {C} has no snapshot$"):
        plan_restore([snap(A, 0, 0), seg(C, 1, 1, 7201)], RestoreTarget(generation=C))


def test_not_found_lists_only_the_newest_generations():
    gens = [gen(i, i) for i in range(10)]
    with pytest.raises(PlanError) as err:
        plan_restore([snap(g, 0, 0) for g in gens], RestoreTarget(generation=A))
    assert str(err.value).endswith(f"(have: {', '.join(gens[4:])} and 4 older)")


# --- txid target -----------------------------------------------------------------------


def chunked(g: str, last: int, size: int = 5, t0: float = 0.0) -> list[ArtefactKey]:
    """Segments 1..last in chunks; txn n commits at t0 + n seconds."""
    return [seg(g, f, min(f + size - 1, last), t0 + min(f + size - 1, last)) for f in range(1, last + 1, size)]


SNAPS = [snap(A, 0, 0), snap(A, 10, 10.5), snap(A, 20, 20.5)]
CHAIN = chunked(A, 30)  # 1-5, 6-10, ..., 26-30


def test_txid_target_picks_newest_snapshot_at_or_before_it():
    plan = plan_restore(SNAPS + CHAIN, RestoreTarget(txid=14))
    assert plan.snapshot == snap(A, 10, 10.5)
    assert plan.segments == (seg(A, 11, 15, 15),)
    assert plan.target_txid == 14 and plan.target_time is None


def test_txid_target_from_first_snapshot():
    plan = plan_restore(SNAPS + CHAIN, RestoreTarget(txid=6))
    assert plan.snapshot == snap(A, 0, 0)
    assert plan.segments == (seg(A, 1, 5, 5), seg(A, 6, 10, 10))


def test_txid_target_equal_to_snapshot_needs_no_segments():
    for txid in (0, 10, 20):
        plan = plan_restore(SNAPS + CHAIN, RestoreTarget(txid=txid))
        assert plan.snapshot.last_txid == txid and plan.segments == () and plan.target_txid == txid


def test_txid_target_at_chain_end():
    plan = plan_restore(SNAPS + CHAIN, RestoreTarget(txid=30))
    assert plan.snapshot == snap(A, 20, 20.5)
    assert plan.segments == (seg(A, 21, 25, 25), seg(A, 26, 30, 30))


def test_txid_target_beyond_the_end():
    items = [snap(A, 0, 0), *chunked(A, 42)]
    with pytest.raises(PlanError) as err:
        plan_restore(items, RestoreTarget(txid=90))
    assert str(err.value) == f"txid 90 is beyond the end of generation {A} (last txid 42)"


def test_txid_target_before_earliest_snapshot():
    # Retention removed the txid-0 snapshot; txid 3 has no base left.
    items = [snap(A, 5, 5.5), *chunked(A, 10)]
    with pytest.raises(PlanError) as err:
        plan_restore(items, RestoreTarget(txid=3))
    assert str(err.value) == f"no snapshot at or before txid 3 in generation {A} (earliest snapshot is at txid 5)"


def test_txid_target_before_a_hole_succeeds_after_it_fails():
    before = seg(A, 6, 10, 10)
    items = [snap(A, 0, 0), seg(A, 1, 5, 5), before, seg(A, 16, 20, 20)]
    assert plan_restore(items, RestoreTarget(txid=9)).segments == (seg(A, 1, 5, 5), before)
    for txid in (11, 15, 18, 25):
        with pytest.raises(PlanError) as err:
            plan_restore(items, RestoreTarget(txid=txid))
        assert str(err.value) == f"segment missing in generation {A}: txids 11..15 (after {before.key})"


def test_txid_target_with_explicit_older_generation():
    items = [snap(A, 0, 0), *chunked(A, 30), snap(B, 0, 3600), *chunked(B, 3, t0=3600)]
    plan = plan_restore(items, RestoreTarget(generation=A, txid=12))
    assert plan.generation == A and plan.last_txid == 15 and plan.target_txid == 12


def test_txid_target_uses_newest_generation_by_default():
    items = [snap(A, 0, 0), *chunked(A, 30), snap(B, 0, 3600), *chunked(B, 3, t0=3600)]
    with pytest.raises(PlanError, match=f"beyond the end of generation {B}"):
        plan_restore(items, RestoreTarget(txid=12))


def test_txid_target_fallback_note():
    items = [snap(A, 0, 0), *chunked(A, 10), seg(B, 1, 1, 3601)]
    plan = plan_restore(items, RestoreTarget(txid=7))
    assert plan.generation == A
    assert plan.notes == (f"newest generation {B} has no snapshot yet; using {A}",)


# --- timestamp target ------------------------------------------------------------------

# Generation A: txn n commits at BASE + n s (n = 1..30), snapshots at txids 0, 10, 20
# taken half a second after the txn. Generation B starts an hour later.
TIMED = [*SNAPS, *CHAIN, snap(B, 0, 3600), *chunked(B, 10, t0=3600)]


def test_timestamp_picks_newest_snapshot_at_or_before_it():
    ts = BASE + 17.2
    plan = plan_restore(TIMED, RestoreTarget(timestamp=ts))
    assert plan.generation == A
    assert plan.snapshot == snap(A, 10, 10.5)
    assert plan.segments == (seg(A, 11, 15, 15), seg(A, 16, 20, 20))  # 16-20 ends after ts, holds 16, 17
    assert plan.target_time == ts and plan.target_txid is None


def test_timestamp_includes_segment_ending_exactly_at_it_and_the_next():
    plan = plan_restore(TIMED, RestoreTarget(timestamp=BASE + 15))
    assert plan.segments == (seg(A, 11, 15, 15), seg(A, 16, 20, 20))


def test_timestamp_equal_to_snapshot_time_uses_it():
    plan = plan_restore(TIMED, RestoreTarget(timestamp=BASE + 20.5))
    assert plan.snapshot == snap(A, 20, 20.5)
    assert plan.segments == (seg(A, 21, 25, 25),)


def test_timestamp_after_chain_end_takes_whole_chain():
    plan = plan_restore(TIMED, RestoreTarget(timestamp=BASE + 1800))
    assert plan.generation == A
    assert plan.snapshot == snap(A, 20, 20.5)
    assert plan.segments == (seg(A, 21, 25, 25), seg(A, 26, 30, 30))


def test_timestamp_in_newest_generation():
    plan = plan_restore(TIMED, RestoreTarget(timestamp=BASE + 3600 + 7))
    assert plan.generation == B
    assert plan.segments == (seg(B, 1, 5, 3605), seg(B, 6, 10, 3610))


def test_timestamp_with_explicit_generation():
    plan = plan_restore(TIMED, RestoreTarget(generation=A, timestamp=BASE + 7200))
    assert plan.generation == A and plan.last_txid == 30


def test_timestamp_before_earliest_restore_point():
    items = [snap(A, 0, 3603), *chunked(A, 5, t0=3603)]
    with pytest.raises(PlanError) as err:
        plan_restore(items, RestoreTarget(timestamp=BASE))
    assert str(err.value) == "no restore point at or before 2026-11-22T10:00:00Z (earliest is 2026-11-22T11:00:03Z)"


def test_timestamp_before_earliest_in_explicit_generation():
    with pytest.raises(PlanError) as err:
        plan_restore(TIMED, RestoreTarget(generation=B, timestamp=BASE + 60))
    assert str(err.value) == (
        f"no restore point in generation {B} at or before 2026-11-22T10:01:00Z (earliest is 2026-11-22T11:00:00Z)"
    )


def test_timestamp_skips_generations_without_snapshot():
    items = [snap(A, 0, 0), *chunked(A, 10), seg(B, 1, 1, 3601)]
    plan = plan_restore(items, RestoreTarget(timestamp=BASE + 3700))
    assert plan.generation == A and plan.last_txid == 10


def test_timestamp_with_no_snapshot_anywhere():
    with pytest.raises(PlanError, match="no snapshot to restore from"):
        plan_restore([seg(A, 1, 1, 1)], RestoreTarget(timestamp=BASE + 5))


def test_timestamp_hole_before_the_point_fails():
    before = seg(A, 1, 5, 5)
    items = [snap(A, 0, 0), before, seg(A, 11, 15, 15)]
    with pytest.raises(PlanError) as err:
        plan_restore(items, RestoreTarget(timestamp=BASE + 13))
    assert str(err.value) == f"segment missing in generation {A}: txids 6..10 (after {before.key})"
    # Even a time inside the first segment: the chain must reach a segment ending after it
    # or its true end, and the hole sits before both.
    with pytest.raises(PlanError, match="txids 6..10"):
        plan_restore(items, RestoreTarget(timestamp=BASE + 5))


def test_timestamp_hole_after_the_point_is_fine():
    items = [snap(A, 0, 0), seg(A, 1, 5, 5), seg(A, 6, 10, 10), seg(A, 16, 20, 20)]
    plan = plan_restore(items, RestoreTarget(timestamp=BASE + 3))
    assert plan.segments == (seg(A, 1, 5, 5),)


def test_timestamp_never_falls_back_past_a_broken_newer_generation():
    items = [snap(A, 0, 0), *chunked(A, 10), snap(B, 0, 3600), seg(B, 3, 4, 3604)]
    with pytest.raises(PlanError, match=f"segment missing in generation {B}: txids 1..2"):
        plan_restore(items, RestoreTarget(timestamp=BASE + 3700))


# --- generation_summary ------------------------------------------------------------------


def test_generation_summary():
    items = [
        snap(A, 0, 0), snap(A, 10, 10.5), *chunked(A, 20),
        snap(B, 0, 3600), seg(B, 1, 5, 3605), seg(B, 9, 9, 3609),
        seg(C, 1, 2, 7202),
    ]  # fmt: skip
    assert generation_summary(items) == [
        GenerationSummary(A, 2, 4, 0, 20, BASE, BASE + 20, True),
        GenerationSummary(B, 1, 2, 0, 5, BASE + 3600, BASE + 3609, False),
        GenerationSummary(C, 0, 1, None, None, BASE + 7200, BASE + 7202, False),
    ]


def test_generation_summary_first_txid_is_earliest_snapshot_and_old_holes_do_not_matter():
    items = [snap(A, 4, 4.5), snap(A, 8, 8.5), seg(A, 1, 2, 2), seg(A, 9, 12, 12)]
    [summary] = generation_summary(items)
    assert summary.first_txid == 4 and summary.last_txid == 12 and summary.is_restorable


def test_generation_summary_empty():
    assert generation_summary([]) == []


# --- properties ----------------------------------------------------------------------


@st.composite
def replicas(draw, allow_holes: bool = True):
    """A listing of 1..3 generations built from valid chains; maybe one segment dropped.

    Returns (artefacts, ends, dropped) where ends[g] is the generation's true last txid.
    Txn n of generation i commits at i*1000 + n seconds; snapshots half a second later.
    """
    n_gens = draw(st.integers(1, 3))
    artefacts: list[ArtefactKey] = []
    ends: dict[str, int] = {}
    partition: list[ArtefactKey] = []
    for i in range(n_gens):
        g, t0 = gen(i * 1000, i), i * 1000
        end = draw(st.integers(0, 25))
        ends[g] = end
        cuts = sorted(draw(st.sets(st.integers(1, end), max_size=end)) | {end + 1}) if end else []
        first = 1
        for cut in cuts:  # segments first..cut-1
            if cut > first:
                k = seg(g, first, cut - 1, t0 + cut - 1)
                artefacts.append(k)
                partition.append(k)
            first = cut
        for _ in range(draw(st.integers(0, 2)) if end else 0):  # compacted copies, overlapping
            lo = draw(st.integers(1, end))
            hi = draw(st.integers(lo, end))
            artefacts.append(seg(g, lo, hi, t0 + hi))
        has_snapshot = draw(st.integers(0, 3)) > 0 if i == n_gens - 1 else True  # newest may lack one
        if has_snapshot:
            txids = {0} if draw(st.booleans()) else set()
            txids |= draw(st.sets(st.integers(0, end), max_size=3))
            if not txids:
                txids = {0}
            artefacts += [snap(g, t, t0 + t + 0.5) for t in txids]
    dropped = None
    if allow_holes and partition and draw(st.booleans()):
        dropped = draw(st.sampled_from(partition))
        artefacts = [a for a in artefacts if a != dropped]
        # A compacted copy may still cover it; that is not a hole then.
    return draw(st.permutations(artefacts)), ends, dropped


@st.composite
def targets(draw, ends: dict[str, int]):
    """Mostly targets inside some generation's range, sometimes just outside it."""
    gens = list(ends)
    generation = draw(st.one_of(st.none(), st.sampled_from(gens)))
    kind = draw(st.sampled_from(["txid", "time", "latest"]))
    if kind == "txid":
        return RestoreTarget(generation=generation, txid=draw(st.integers(0, max(ends.values()) + 3)))
    if kind == "time":
        i = draw(st.integers(0, len(gens) - 1))
        offset = draw(st.floats(-2, 30, allow_nan=False))
        return RestoreTarget(generation=generation, timestamp=BASE + i * 1000 + offset)
    return RestoreTarget(generation=generation)


def covered(plan: RestorePlan) -> set[int]:
    return {t for s in plan.segments for t in range(s.first_txid, s.last_txid + 1)}


def check_plan_covers(plan: RestorePlan, target: RestoreTarget, ends: dict[str, int]) -> None:
    s = plan.snapshot.last_txid
    assert plan.snapshot.kind == SNAPSHOT and plan.snapshot.generation == plan.generation
    assert all(k.kind == SEGMENT and k.generation == plan.generation for k in plan.segments)
    reach = s
    for k in plan.segments:  # every segment continues the chain and moves it forward
        assert k.first_txid <= reach + 1 <= k.last_txid
        reach = k.last_txid
    if target.txid is not None:
        assert plan.target_txid == target.txid and s <= target.txid <= reach
        end = target.txid
    elif target.timestamp is not None:
        assert plan.target_time == target.timestamp and plan.snapshot.time <= target.timestamp
        # Either the chain reaches past the time or it is the generation's true end.
        assert (plan.segments and plan.segments[-1].time > target.timestamp) or reach == ends[plan.generation]
        end = reach
    else:
        assert reach == ends[plan.generation]
        end = reach
    assert set(range(s + 1, end + 1)) <= covered(plan)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_plan_is_an_unbroken_chain_or_an_error(data):
    artefacts, ends, dropped = data.draw(replicas())
    target = data.draw(targets(ends))
    # A missing tail is indistinguishable from segments not uploaded yet: the listing's
    # own end is what a plan can reach.
    listed_end = {g: max(a.last_txid for a in items) for g, items in group_by_generation(artefacts).items()}
    try:
        plan = plan_restore(artefacts, target)
    except PlanError:
        latest = target.generation is None and target.txid is None and target.timestamp is None
        if latest and dropped is None and any(a.kind == SNAPSHOT for a in artefacts):
            raise AssertionError("latest restore of an intact replica failed") from None
        return
    check_plan_covers(plan, target, listed_end)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_intact_chains_always_plan(data):
    artefacts, ends, _ = data.draw(replicas(allow_holes=False))
    groups = group_by_generation(artefacts)
    for g, items in groups.items():
        snaps = [a for a in items if a.kind == SNAPSHOT]
        if not snaps:
            continue
        for txid in range(min(s.last_txid for s in snaps), ends[g] + 1):
            plan = plan_restore(artefacts, RestoreTarget(generation=g, txid=txid))
            assert plan.snapshot == max((s for s in snaps if s.last_txid <= txid), key=lambda s: s.last_txid)
            check_plan_covers(plan, RestoreTarget(generation=g, txid=txid), ends)
        latest = plan_restore(artefacts, RestoreTarget(generation=g))
        assert latest.last_txid == ends[g]


def test_time_target_with_a_missing_segment_before_a_later_snapshot_is_a_hole():
    # found by the chain property: the segment holding txid 1 is gone, but a snapshot at
    # txid 1 proves it existed; restoring txid 0 for a time after txid 1 would be older
    keys_ = [snap(A, 0, 0.5), snap(A, 1, 1.5)]
    with pytest.raises(PlanError, match="segment missing in generation .*: txid 1"):
        plan_restore(keys_, RestoreTarget(timestamp=BASE + 1.0))
    # with the segment present the time restores through it
    plan = plan_restore([*keys_, seg(A, 1, 1, 1.0)], RestoreTarget(timestamp=BASE + 1.0))
    assert [s.last_txid for s in plan.segments] == [1]
