"""End to end under stress: the agent SIGKILLed at random moments, the app killed mid
transaction, agent restarts, one huge transaction, a database crossing the 1 GiB lock-byte
page. Every restore passes integrity_check and equals the source."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from harness import (
    has_snapshot,
    restore_equals_source,
    AgentProcess,
    assert_same_pages,
    checkpoint,
    cli,
    integrity,
    rows,
    start_writer,
    wait_for,
    write,
    write_config,
)



def _generations(replica: Path) -> list[dict]:
    return json.loads(cli("generations", "--json", f"file://{replica}", check=True).stdout)


def test_agent_sigkilled_at_random_moments_while_app_writes(tmp_path):
    seed = int(os.environ.get("TORTURE_SEED", random.randrange(1 << 30)))
    rounds = int(os.environ.get("TORTURE_ROUNDS", "12"))
    print(f"seed={seed} rounds={rounds}")
    rng = random.Random(seed)
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"]])
    cfg = write_config(
        tmp_path / "r.yml", db, f"file://{replica}", min_checkpoint_page_count=40, checkpoint_interval="1s", snapshot_interval="3s"
    )
    writer = start_writer(db, [["forever", 300, 250]], lib="apsw", seed=seed)
    restores = 0
    try:
        for i in range(rounds):
            agent = AgentProcess("-c", str(cfg), log=tmp_path / "agent.log").start()
            time.sleep(rng.uniform(0.05, 0.8))
            agent.kill()
            if i % 4 == 3 and has_snapshot(replica):
                # a restore taken while the agent is dead is a prefix of committed history
                out = tmp_path / f"mid-{i}.db"
                cli("restore", "-o", str(out), f"file://{replica}", check=True)
                got = rows(out)
                assert integrity(out) == "ok"
                assert got == list(range(1, len(got) + 1)), f"round {i}: not a prefix of history"
                restores += 1
        agent = AgentProcess("-c", str(cfg), log=tmp_path / "agent.log").start()
        time.sleep(0.5)
    finally:
        writer.kill()  # the app dies mid-transaction
        writer.wait()
    # The app comes back and commits. Until then a commit frame the dead writer wrote
    # without publishing it in the WAL index is invisible to every live connection, but
    # a later recovery (the test's checkpoint below, once the agent has exited) would
    # resurrect it; the next commit overwrites it, as it would in production.
    write(db, [["insert", 1, 100]], lib="apsw")
    assert agent.stop() == 0
    restore_equals_source(tmp_path, replica, db)
    final = rows(out)
    assert final[:-1] == list(range(1, len(final))) and len(final) > 50
    print(f"kills={rounds} restores={restores + 1} failures=0 generations={len(_generations(replica))}")


def test_restarted_agent_continues_the_same_generation(tmp_path):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"]])
    keeper = start_writer(db, [["insert", 5, 100], ["sleep", 60]], lib="apsw")  # the app stays connected
    try:
        wait_for(lambda: len(rows(db)) == 5, what="first rows")
        agent = AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log").start()
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        write(db, [["autocheckpoint", 0], ["insert", 20, 100]], lib="apsw")
        assert agent.stop() == 0  # graceful
        write(db, [["insert", 20, 100]], lib="apsw")  # written while the agent is down
        agent = AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log").start()
        write(db, [["insert", 20, 100]], lib="apsw")
        time.sleep(0.3)
        agent.kill()  # crash
        write(db, [["insert", 20, 100]], lib="apsw")
        agent = AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log").start()
        write(db, [["insert", 10, 100]], lib="apsw")
        assert agent.stop() == 0
        assert len(_generations(replica)) == 1, "a plain restart must continue the generation"
        # the app checkpoints (resetting the WAL) while the agent is down: a new generation
        write(db, [["insert", 5, 100], ["checkpoint", "TRUNCATE"], ["insert", 5, 100]], lib="apsw")
        agent = AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log").start()
        write(db, [["insert", 5, 100]], lib="apsw")
        assert agent.stop() == 0
    finally:
        keeper.kill()
        keeper.wait()
    assert len(_generations(replica)) == 2
    restore_equals_source(tmp_path, replica, db)


def test_a_stop_ships_the_whole_backlog_not_one_capture_step(tmp_path):
    """SIGTERM while capture is behind by several steps (capture.MAX_STEP_FRAMES each):
    the agent captures and ships all of it before it exits."""
    step_env = {"REPLICATOR_MAX_STEP_FRAMES": "200"}
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"]])
    keeper = start_writer(db, [["insert", 1, 100], ["sleep", 120]], lib="apsw")  # the app stays connected
    try:
        wait_for(lambda: len(rows(db)) == 1, what="first row")
        agent = AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log", env_extra=step_env).start()
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        assert agent.stop() == 0
        count = 2000  # ten steps at least
        write(db, [["autocheckpoint", 0], ["insert", count, 100]], lib="apsw")
        agent = AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log", env_extra=step_env).start()
        assert agent.stop() == 0  # at once: a step or two taken, most of the backlog left
        out = tmp_path / "restored.db"
        cli("restore", "-o", str(out), f"file://{replica}", check=True)
        assert len(rows(out)) == count + 1
    finally:
        keeper.kill()
        keeper.wait()


def test_backlog_larger_than_a_capture_step_is_taken_in_bites(tmp_path):
    """The app commits more frames while the agent is down than one capture step reads
    (capture.MAX_STEP_FRAMES): the restarted agent takes them in several steps, in the
    same generation, without waiting for the app's next change event between steps."""
    MAX_STEP_FRAMES = 500
    os.environ["REPLICATOR_MAX_STEP_FRAMES"] = str(MAX_STEP_FRAMES)  # the agents started below inherit it
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"]])
    keeper = start_writer(db, [["insert", 1, 100], ["sleep", 120]], lib="apsw")  # the app stays connected
    try:
        wait_for(lambda: len(rows(db)) == 1, what="first row")
        agent = AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log").start()
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        assert agent.stop() == 0
        count = MAX_STEP_FRAMES + MAX_STEP_FRAMES // 2  # at least one frame each
        write(db, [["autocheckpoint", 0], ["insert", count, 100]], lib="apsw")
        agent = AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log").start()
        # no further commit: the whole backlog must reach the replica on its own
        out = tmp_path / "polled.db"

        def all_on_replica() -> bool:
            out.unlink(missing_ok=True)
            return cli("restore", "-o", str(out), f"file://{replica}").returncode == 0 and len(rows(out)) == count + 1

        wait_for(all_on_replica, timeout=60, interval=0.5, what="the whole backlog on the replica")
        assert agent.stop() == 0
        assert len(_generations(replica)) == 1, "catching up in bites must continue the generation"
        events = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines() if line.startswith("{")]
        segments = [e["txns"] for e in events if e.get("event") == "segment written"]
        # at least one frame per transaction, so a bite holds at most MAX_STEP_FRAMES of them
        assert max(segments) <= MAX_STEP_FRAMES and len(segments) >= count // MAX_STEP_FRAMES
    finally:
        os.environ.pop("REPLICATOR_MAX_STEP_FRAMES", None)
        keeper.kill()
        keeper.wait()
    restore_equals_source(tmp_path, replica, db)


def test_app_writes_and_closes_while_agent_is_down(tmp_path):
    """Each app connection's close checkpoints and deletes the WAL and -shm; the commit
    counter restarts with them, so it must not be trusted across the agent's downtime."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"]])
    agent = AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log").start()
    wait_for(lambda: has_snapshot(replica), what="first snapshot")
    assert agent.stop() == 0
    for _ in range(5):
        write(db, [["insert", 1, 100]])  # separate processes: each close deletes the WAL
    agent = AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log").start()
    write(db, [["insert", 3, 100]], lib="apsw")
    assert agent.stop() == 0
    out = tmp_path / "restored.db"
    cli("restore", "-o", str(out), f"file://{replica}", check=True)
    checkpoint(db)
    assert len(rows(out)) == 8
    assert_same_pages(out, db)


def test_transaction_over_100_mib(tmp_path):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"], ["insert", 3, 100]])
    with AgentProcess(str(db), f"file://{replica}", log=tmp_path / "agent.log") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        write(db, [["big", 110], ["insert", 3, 100]], lib="apsw")
        assert agent.stop(timeout=300) == 0
    out = tmp_path / "restored.db"
    cli("restore", "-o", str(out), f"file://{replica}", check=True, timeout=300)
    checkpoint(db)
    assert integrity(out) == "ok"
    assert_same_pages(out, db)


def test_database_crossing_the_lock_byte_page(tmp_path):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"], ["insert", 3, 100]])
    cfg = write_config(tmp_path / "r.yml", db, f"file://{replica}", min_checkpoint_page_count=20000)
    with AgentProcess("-c", str(cfg), log=tmp_path / "agent.log") as agent:
        wait_for(lambda: has_snapshot(replica), what="first snapshot")
        write(db, [["fill", 1100, 64], ["insert", 3, 100]], lib="apsw", timeout=900)
        assert agent.stop(timeout=600) == 0
    assert db.stat().st_size > (1 << 30) or (Path(f"{db}-wal").exists() and Path(f"{db}-wal").stat().st_size > 0)
    out = tmp_path / "restored.db"
    cli("restore", "-o", str(out), f"file://{replica}", check=True, timeout=600)
    checkpoint(db)
    assert db.stat().st_size > (1 << 30) + 4096
    assert integrity(out) == "ok"
    assert_same_pages(out, db)
