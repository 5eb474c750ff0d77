"""Failpoints for crash-torture tests: the agent SIGKILLs itself at a named stage.

    REPLICATOR_FAILPOINTS="segment-write:0.2,checkpoint:0.5" replicator replicate ...

Each hit of a listed stage kills the process with that probability (SIGKILL: no cleanup,
no flush, like a power cut for the process). Unset (production), `hit` is a dictionary
lookup on an empty dict. Stages: wal-read, segment-write, state-save, upload,
upload-recorded, prune, snapshot, checkpoint.
"""

from __future__ import annotations

import os
import random
import signal

STAGES = ("wal-read", "segment-write", "state-save", "upload", "upload-recorded", "prune", "snapshot", "checkpoint")


def _parse(spec: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, p = part.partition(":")
        if name not in STAGES:
            raise ValueError(f"REPLICATOR_FAILPOINTS: unknown stage {name!r} (known: {', '.join(STAGES)})")
        out[name] = float(p or 1.0)
    return out


_ACTIVE = _parse(os.environ.get("REPLICATOR_FAILPOINTS", ""))
_rng = random.Random(os.environ.get("REPLICATOR_FAILPOINTS_SEED"))


def hit(stage: str) -> None:
    """Die here (SIGKILL) with the configured probability for stage."""
    p = _ACTIVE.get(stage)
    if p is not None and _rng.random() < p:
        os.write(2, f'{{"event": "failpoint", "stage": "{stage}"}}\n'.encode())
        os.kill(os.getpid(), signal.SIGKILL)
