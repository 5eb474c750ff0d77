"""Crash torture: the agent SIGKILLs itself at every stage of its work (replicator.failpoints)
while a real app writes, again and again; after each round it restarts and carries on.
Restores taken between rounds are prefixes of committed history; the final restore is
page-identical to the source.

A short bounded run is part of the normal suite. The long run:

    TORTURE_KILLS=25 TORTURE_SEED=123 .venv/bin/python -m pytest -q -s tests/test_torture.py

prints, per stage, the seed, kills, restores and failures.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from harness import AgentProcess, cli, integrity, restore_equals_source, rows, start_writer, wait_for, write, write_config
from replicator.failpoints import STAGES

KILLS = int(os.environ.get("TORTURE_KILLS", "2"))  # kills per stage
# chance of dying at each hit of the stage: stages hit often get a small one
CHANCE = {"wal-read": 0.03, "segment-write": 0.03, "state-save": 0.03, "upload": 0.03, "upload-recorded": 0.03,
          "prune": 0.5, "snapshot": 0.3, "checkpoint": 0.3}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.timeout(900)
def test_agent_killed_at_every_stage_loses_nothing(tmp_path, stage):
    seed = int(os.environ.get("TORTURE_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    write(db, [["schema"]])
    cfg = write_config(
        tmp_path / "r.yml", db, f"file://{replica}", min_checkpoint_page_count=40, checkpoint_interval="1s",
        snapshot_interval="2s", retention="1s", retention_check_interval="1s",
    )
    log = tmp_path / "agent.log"
    writer = start_writer(db, [["forever", 300, 200]], lib="apsw", seed=seed)
    kills = restores = 0
    try:
        deadline = time.monotonic() + 240
        while kills < KILLS:
            assert time.monotonic() < deadline, f"stage {stage}: only {kills} kills in 240 s (seed {seed})"
            env = {"REPLICATOR_FAILPOINTS": f"{stage}:{CHANCE[stage]}", "REPLICATOR_FAILPOINTS_SEED": str(rng.randrange(1 << 30))}
            agent = AgentProcess("-c", str(cfg), log=log, env_extra=env).start()
            try:
                wait_for(lambda: agent.proc.poll() is not None, timeout=20, interval=0.05, what=f"a kill at {stage}")
            except AssertionError:
                agent.kill()  # the stage was not hit this time; a plain kill still counts as a crash
            kills += 1
            if replica.exists() and any(replica.rglob("*.snapshot")):
                # a restore taken while the agent is dead is a prefix of committed history
                out = tmp_path / f"mid-{kills}.db"
                cli("restore", "-o", str(out), f"file://{replica}", check=True)
                got = rows(out)
                assert integrity(out) == "ok"
                assert got == list(range(1, len(got) + 1)), f"stage {stage} kill {kills}: not a prefix (seed {seed})"
                restores += 1
        agent = AgentProcess("-c", str(cfg), log=log).start()
        time.sleep(0.5)
    finally:
        writer.kill()  # and the app dies mid-transaction
        writer.wait()
    write(db, [["insert", 1, 100]], lib="apsw")
    assert agent.stop() == 0
    restore_equals_source(tmp_path, replica, db)
    hits = log.read_text().count('"event": "failpoint"')
    print(f"stage={stage} seed={seed} kills={kills} failpoint_kills={hits} restores={restores + 1} failures=0")
    assert hits >= 1, f"stage {stage} was never hit (seed {seed})"
