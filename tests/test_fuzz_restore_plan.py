"""Fuzzing the restore planner (replicator/restore_plan.py) over arbitrary listings.

tests/test_restore_plan.py checks plans over listings built from valid chains with at most
one segment dropped. Here listings are arbitrary sets of keys.ArtefactKey: any number of
generations (ids from the generation-id grammar, not only real dates), snapshots and
segments at any txids (0 .. 2**64-1, clustered so that chains and holes both happen),
overlapping, duplicated with other times, before their snapshot or far after it; and
targets of every kind (latest, txid, timestamp, with or without a generation, present or
not). The keys themselves come from parse_key of listing strings where that matters.

Property: plan_restore returns a plan or raises PlanError (nothing else, no hang). A plan is
a snapshot and segments that all come from the listing and from one generation, whose txid
ranges form an unbroken chain from the snapshot, each segment moving it forward; for a txid
target the chain ends at the target (the snapshot is the newest one at or before it and the
last segment holds the target); for "latest" it reaches the end of the generation's
segments; for a time target the snapshot is at or before the time and the chain either
crosses the time or is the whole generation. For txid and latest targets an independent
oracle (interval coverage) says exactly when a plan must exist, so a PlanError is checked
too. generation_summary agrees with the planner and never raises.
"""

from __future__ import annotations

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from test_fuzz_common import fuzz_settings, guarded, timeout

from replicator import keys
from replicator.keys import SEGMENT, SNAPSHOT, ArtefactKey, parse_key
from replicator.restore_plan import (
    PlanError,
    RestoreTarget,
    generation_summary,
    group_by_generation,
    plan_restore,
)

MAX = 2**64 - 1

# Real ids (valid dates) and ids that only have the grammar's shape (\d{8}T\d{12}Z-hex4).
REAL_GENS = ["20261122T100000000000Z-000a", "20261122T110000000000Z-000b", "20261122T110000000000Z-000c", "20270101T000000000001Z-ffff"]
SHAPED_GENS = ["99999999T999999999999Z-abcd", "20261399T000000000000Z-0001", "00000000T000000000000Z-0000"]


@st.composite
def txids(draw, base: int) -> int:
    return draw(st.one_of(st.integers(max(0, base - 3), min(MAX, base + 12)), st.sampled_from([0, 1, MAX - 1, MAX]), st.integers(0, MAX)))


@st.composite
def listings(draw, gens: list[str]) -> list[ArtefactKey]:
    """Artefacts of a few generations; txids cluster around a base so that chains form."""
    out: list[ArtefactKey] = []
    for g in draw(st.lists(st.sampled_from(gens), min_size=1, max_size=3, unique=True)):
        base = draw(st.sampled_from([0, 5, 1000, MAX - 20]))
        times = st.integers(0, 10**15) if draw(st.integers(0, 4)) == 0 else st.integers(1_700_000_000_000, 1_700_000_000_100)
        for _ in range(draw(st.integers(0, 4))):
            t = draw(txids(base))
            out.append(ArtefactKey(g, SNAPSHOT, t, t, draw(times)))
        cursor = base
        for _ in range(draw(st.integers(0, 8))):
            mode = draw(st.sampled_from(["next", "next", "next", "overlap", "gap", "anywhere"]))
            if mode == "next":
                first = cursor + 1
            elif mode == "overlap":
                first = max(0, cursor - draw(st.integers(0, 3)))
            elif mode == "gap":
                first = cursor + draw(st.integers(2, 4))
            else:
                first = draw(txids(base))
            first = min(first, MAX)
            last = min(MAX, first + draw(st.one_of(st.integers(0, 4), st.integers(0, MAX))))
            out.append(ArtefactKey(g, SEGMENT, first, last, draw(times)))
            cursor = max(cursor, last)
    if out and draw(st.booleans()):
        out.append(draw(st.sampled_from(out)))  # the same listing entry twice
    return draw(st.permutations(out))


@st.composite
def targets(draw, items: list[ArtefactKey], gens: list[str]) -> RestoreTarget:
    generation = draw(st.one_of(st.none(), st.sampled_from(gens + ["20200101T000000000000Z-dead"])))
    kind = draw(st.sampled_from(["latest", "txid", "time"]))
    if kind == "txid":
        near = [a.first_txid for a in items] + [a.last_txid for a in items] + [0]
        if draw(st.integers(0, 4)):
            t = min(MAX, draw(st.sampled_from(near)) + draw(st.integers(0, 2)))
        else:
            t = draw(st.integers(0, MAX))
        return RestoreTarget(generation=generation, txid=t)
    if kind == "time":
        near = [a.time for a in items] + [0.0]
        if draw(st.integers(0, 4)):
            ts = draw(st.sampled_from(near)) + draw(st.sampled_from([-0.001, 0.0, 0.0005, 0.001, 1.0]))
        else:
            ts = draw(st.floats(-1e12, 1e13))
        return RestoreTarget(generation=generation, timestamp=ts)
    return RestoreTarget(generation=generation)


# --------------------------------------------------------------------------- the oracle


def covered(segments: list[ArtefactKey], lo: int, hi: int) -> bool:
    """True when the union of the segments' txid ranges holds every txid lo..hi."""
    need = lo
    for s in sorted(segments, key=lambda s: s.first_txid):
        if need > hi:
            break
        if s.first_txid <= need <= s.last_txid:
            need = s.last_txid + 1
    return need > hi


def newest_snapshot(snaps: list[ArtefactKey]) -> ArtefactKey:
    return max(snaps, key=lambda s: (s.last_txid, s.time_ms))


def expected_outcome(items: list[ArtefactKey], target: RestoreTarget):
    """For latest and txid targets: (generation, snapshot, end txid) a plan must have, or
    None when no plan can exist. (Time targets get no oracle here.)"""
    groups = group_by_generation(items)
    if not groups or (target.generation is not None and target.generation not in groups):
        return None
    if target.generation is not None:
        g = target.generation
    else:
        with_snapshot = [g for g, a in groups.items() if any(x.kind == SNAPSHOT for x in a)]
        if not with_snapshot:
            return None
        g = with_snapshot[-1]
    snaps = [a for a in groups[g] if a.kind == SNAPSHOT]
    segs = [a for a in groups[g] if a.kind == SEGMENT]
    if target.txid is None:
        if not snaps:
            return None
        s = newest_snapshot(snaps)
        end = max([s.last_txid] + [a.last_txid for a in segs])
        return (g, s, end) if covered(segs, s.last_txid + 1, end) else None
    usable = [a for a in snaps if a.last_txid <= target.txid]
    if not usable:
        return None
    s = newest_snapshot(usable)
    return (g, s, target.txid) if covered(segs, s.last_txid + 1, target.txid) else None


def check_chain(plan, items: list[ArtefactKey]) -> int:
    """The plan's artefacts come from the listing and one generation and chain unbroken
    from the snapshot; returns the txid the chain reaches."""
    listed = set(items)
    assert plan.snapshot in listed and plan.snapshot.kind == SNAPSHOT and plan.snapshot.generation == plan.generation
    reach = plan.snapshot.last_txid
    for s in plan.segments:
        assert s in listed and s.kind == SEGMENT and s.generation == plan.generation
        assert s.first_txid <= reach + 1 <= s.last_txid, "the chain is broken or does not move forward"
        reach = s.last_txid
    assert plan.last_txid == reach
    return reach


def check_plan(plan, items: list[ArtefactKey], target: RestoreTarget) -> None:
    reach = check_chain(plan, items)
    gen_items = [a for a in items if a.generation == plan.generation]
    if target.generation is not None:
        assert plan.generation == target.generation
    if target.txid is not None:
        assert plan.target_txid == target.txid and plan.target_time is None
        assert plan.snapshot.last_txid <= target.txid <= reach
        # it ends at the target: without its last segment the chain would fall short
        before = plan.segments[-2].last_txid if len(plan.segments) > 1 else plan.snapshot.last_txid
        assert not plan.segments or before < target.txid
    elif target.timestamp is not None:
        ts = target.timestamp
        assert plan.target_time == ts and plan.target_txid is None
        assert plan.snapshot.time <= ts
        assert all(s.time <= ts for s in plan.segments[:-1]), "the chain went on past a segment later than the time"
        if not (plan.segments and plan.segments[-1].time > ts):
            # the chain ran out before the time: nothing of the generation may lie beyond it
            assert all(a.last_txid <= reach for a in gen_items), "an older state than the time was planned"
        if target.generation is None:  # no newer generation could serve the time
            newer = [a for a in items if a.generation > plan.generation and a.kind == SNAPSHOT and a.time <= ts]
            assert not newer
    else:
        assert plan.target_txid is None and plan.target_time is None
        # no segment of the generation continues the chain: it is the whole generation
        assert not any(a.kind == SEGMENT and a.first_txid <= reach + 1 <= a.last_txid for a in gen_items if reach < MAX)


# --------------------------------------------------------------------------- the tests


@pytest.mark.timeout(timeout(60))
@fuzz_settings(1200)
@given(data=st.data())
def test_fuzz_plan_restore(data):
    gens = data.draw(st.sampled_from([REAL_GENS, REAL_GENS[:2], REAL_GENS + SHAPED_GENS]))
    items = data.draw(listings(gens))
    target = data.draw(targets(items, gens))
    with guarded():
        try:
            plan = plan_restore(items, target)
        except PlanError as e:
            assert str(e) and "\n" not in str(e)
            plan = None
    if target.timestamp is None:
        expected = expected_outcome(items, target)
        if expected is None:
            assert plan is None, f"planned {plan} where no unbroken chain exists"
        else:
            assert plan is not None, f"no plan, but {expected} can be restored"
            g, s, end = expected
            assert (plan.generation, plan.snapshot) == (g, s)
            if target.txid is None:
                assert plan.last_txid == end
    event(f"{'latest' if target.txid is None and target.timestamp is None else 'txid' if target.txid is not None else 'time'}: "
          f"{'plan' if plan else 'PlanError'}")
    if plan is not None:
        check_plan(plan, items, target)


@pytest.mark.timeout(timeout(60))
@fuzz_settings(500)
@given(data=st.data())
def test_fuzz_generation_summary_agrees_with_the_planner(data):
    items = data.draw(listings(REAL_GENS))  # (SHAPED_GENS: see the known bug below)
    with guarded():
        summaries = generation_summary(items)
    groups = group_by_generation(items)
    assert [s.generation for s in summaries] == list(groups)
    for s in summaries:
        snaps = [a for a in groups[s.generation] if a.kind == SNAPSHOT]
        assert s.snapshot_count == len(snaps)
        assert s.segment_count == len(groups[s.generation]) - len(snaps)
        try:
            plan = plan_restore(items, RestoreTarget(generation=s.generation))
        except PlanError:
            plan = None
        assert s.is_restorable == (plan is not None)
        if plan is not None:
            assert s.last_txid == plan.last_txid and s.first_txid == min(a.last_txid for a in snaps)


# --------------------------------------------------------------------------- keys

_GEN = "20261122T171656939519Z-ea5f"
digits = st.sampled_from(list("0123456789") + ["٥", "१", "２"])
gen_ids = st.one_of(
    st.sampled_from([_GEN, "99999999T999999999999Z-abcd", "20261122T171656939519Z-EA5F", "x", ""]),
    st.builds(lambda d, h: "".join(d[:8]) + "T" + "".join(d[8:]) + "Z-" + h, st.lists(digits, min_size=20, max_size=20), st.text("0123456789abcdefA", min_size=4, max_size=4)),
)
stamps = st.one_of(st.integers(0, 10**15).map(str), st.sampled_from(["0", "0005", "٥", "1" * 16, "", "-1", "1.5"]), st.lists(digits, min_size=1, max_size=16).map("".join))
hex16 = st.one_of(st.integers(0, MAX).map(lambda t: f"{t:016x}"), st.sampled_from(["F" * 16, "0" * 15, "0" * 17, "g" * 16]))
names = st.one_of(
    st.builds(lambda t, ms: f"{t}.{ms}.snapshot", hex16, stamps),
    st.builds(lambda a, b, ms: f"{a}-{b}.{ms}.segment", hex16, hex16, stamps),
    st.text("0123456789abcdef.-segmntaphot", max_size=40),
)


@st.composite
def key_texts(draw) -> str:
    kind = draw(st.sampled_from(["snapshot", "segment"]))
    stamp = draw(stamps)
    if kind == "snapshot":
        name = f"{draw(hex16)}.{stamp}.snapshot"
    else:
        name = f"{draw(hex16)}-{draw(hex16)}.{stamp}.segment"
    parts = ["generations", draw(gen_ids), kind + "s", name]
    if draw(st.integers(0, 3)) == 0:  # mostly near misses, sometimes further off
        for _ in range(draw(st.integers(1, 2))):
            op = draw(st.sampled_from(["insert", "pop", "replace"]))
            if op == "insert":
                parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(["..", "", "x"])))
            elif op == "pop" and parts:
                parts.pop(draw(st.integers(0, len(parts) - 1)))
            elif parts:
                parts[draw(st.integers(0, len(parts) - 1))] = draw(st.one_of(names, gen_ids, st.sampled_from(["snapshots", "segments", ".."])))
    return "/".join(parts)


@pytest.mark.timeout(timeout(60))
@fuzz_settings(1000)
@given(text=key_texts())
def test_fuzz_parse_key(text):
    """parse_key: None for anything that is not an artefact key, else a key whose txids are
    in range and which names the same object (so restore fetches what was listed)."""
    with guarded():
        k = parse_key(text)
    event("key" if k is not None else "not a key")
    if k is None:
        return
    assert k.kind in (SNAPSHOT, SEGMENT) and keys.is_generation_id(k.generation)
    assert 0 <= k.first_txid <= k.last_txid <= MAX and (k.kind == SEGMENT or k.first_txid == k.last_txid)
    assert parse_key(k.key) == k
    if k.key != text:
        raise AssertionError(f"{text!r} parses to a key that names another object: {k.key!r}")


@pytest.mark.parametrize("stamp", ["0005", "٥"])
def test_regression_parse_key_round_trips(stamp):
    text = f"generations/{_GEN}/snapshots/{1:016x}.{stamp}.snapshot"
    k = parse_key(text)
    assert k is None or k.key == text


@pytest.mark.parametrize("generation", SHAPED_GENS[:2])
def test_regression_generation_summary_of_a_shaped_id(generation):
    k = parse_key(f"generations/{generation}/snapshots/{1:016x}.5.snapshot")
    # an id with the shape but no real date is not a generation (a stray), and whatever
    # the listing accepts, `replicator generations` can show
    assert k is None or len(generation_summary([k])) == 1
