"""Restore drills: prove a replica can be restored, not just that uploads succeeded.

A drill restores the replica's latest state into a scratch file (every artefact's checksums,
the recorded whole-database checksum and PRAGMA integrity_check are verified by the restore
itself), then, when the live database is at hand, compares it with the source at the same
position: the source's checksum at one read transaction must be a position of the
replica's history, restored and verified again at exactly that transaction.

`replicator verify` runs drills from the command line; `verify-interval:` runs them inside
the agent (comparing with the checksums capture recorded, since the agent process must not
open extra file descriptors on the database).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from replicas import Driver, StorageError
from replicator.artefact import ArtefactError, read_header
from replicator.restore import RestoreError, RestoreResult, list_artefacts, restore
from replicator.restore_plan import PlanError, RestoreTarget, plan_restore

REASONS = ("unreachable", "empty", "damaged", "checksum", "integrity", "behind", "mismatch", "source")


@dataclass
class Verdict:
    """The outcome of one drill of one replica."""

    replica: str
    ok: bool
    reason: str | None = None  # one of REASONS when not ok
    message: str = ""
    generation: str | None = None
    txid: int | None = None
    bytes: int = 0
    seconds: float = 0.0
    compared: bool = False  # True when the source was compared at the same position
    source_txid: int | None = None  # the replica's txid that equals the live source

    def line(self) -> str:
        """The one-line verdict."""
        if not self.ok:
            return f"{self.replica}: FAILED ({self.reason}): {self.message}"
        where = f"generation {self.generation} txid {self.txid}"
        extra = f"; matches the live database at txid {self.source_txid}" if self.compared else ""
        return f"{self.replica}: OK {where} ({self.bytes / 2**20:.1f} MiB restored in {self.seconds:.2f} s; integrity ok; checksum ok{extra})"

    def as_dict(self) -> dict:
        return asdict(self)


def _classify(e: RestoreError) -> str:
    text = str(e)
    if "integrity_check" in text:
        return "integrity"
    if "checksum" in text and "does not match the recorded" in text:
        return "checksum"
    return "damaged"


def _txn_checksums(driver: Driver, keys_) -> dict[int, int]:
    """txid -> recorded database checksum, from the headers of the given artefacts."""
    out: dict[int, int] = {}
    for k in keys_:
        with driver.get(k.key) as f:
            header = read_header(f)
        for t in header.txns:
            out[t.txid] = t.db_checksum
    return out


def verify_replica(
    name: str,
    driver: Driver,
    *,
    scratch_dir: Path,
    source_checksum: Callable[[], int] | None = None,
    recorded: Callable[[str, int], int | None] | None = None,
    wait: float = 10.0,
    encryption_key=None,
) -> Verdict:
    """Run one drill. source_checksum reads the live database's checksum now (CLI);
    recorded(generation, txid) gives the checksum capture recorded there (agent);
    encryption_key (a replicator.encryption.EncryptionKey) decrypts encrypted artefacts."""
    started = time.monotonic()
    verdict = Verdict(replica=name, ok=False)
    scratch = Path(tempfile.mkdtemp(prefix="replicator-verify-", dir=scratch_dir))
    try:
        try:
            listing = list_artefacts(driver)
            if not listing:
                verdict.reason, verdict.message = "empty", "the replica holds no generations"
                return verdict
            plan = plan_restore(listing, RestoreTarget())
            result = restore(driver, scratch / "latest.db", restore_plan=plan, encryption_key=encryption_key)
        except StorageError as e:
            verdict.reason, verdict.message = "unreachable", str(e)
            return verdict
        except PlanError as e:
            verdict.reason, verdict.message = "damaged", str(e)
            return verdict
        except RestoreError as e:
            verdict.reason, verdict.message = _classify(e), str(e)
            return verdict
        verdict.generation, verdict.txid, verdict.bytes = plan.generation, result.txid, result.bytes_fetched
        if source_checksum is not None:
            _compare_live(verdict, driver, result, source_checksum, scratch, wait, encryption_key)
            if verdict.reason is not None:
                return verdict
        elif recorded is not None:
            expected = recorded(plan.generation, result.txid)
            if expected is not None:
                verdict.compared, verdict.source_txid = True, result.txid
                if expected != result.db_checksum:
                    verdict.reason = "mismatch"
                    verdict.message = (
                        f"txid {result.txid} of generation {plan.generation} restores to checksum "
                        f"{result.db_checksum:016x}, but capture recorded {expected:016x} for the source"
                    )
                    return verdict
        verdict.ok = True
        return verdict
    finally:
        verdict.seconds = round(time.monotonic() - started, 3)
        shutil.rmtree(scratch, ignore_errors=True)


def _compare_live(
    verdict: Verdict, driver: Driver, result: RestoreResult, source_checksum, scratch: Path, wait: float, encryption_key=None
) -> None:
    """Find the live database's state in the replica's history and restore exactly there."""
    try:
        wanted = source_checksum()
    except Exception as e:  # LiveImageError, apsw errors: the source, not the replica
        verdict.reason, verdict.message = "source", f"cannot read the live database: {e}"
        return
    if wanted == result.db_checksum:
        verdict.compared, verdict.source_txid = True, result.txid
        return
    generation = result.plan.generation
    deadline = time.monotonic() + wait
    seen: dict[int, int] = {}
    checked: set[str] = set()
    last_txid = result.txid
    while True:
        try:
            listing = [a for a in list_artefacts(driver) if a.generation == generation]
            plan = plan_restore(listing, RestoreTarget(generation=generation))
            new = [s for s in (plan.snapshot, *plan.segments) if s.key not in checked]
            seen.update(_txn_checksums(driver, new))
            checked.update(s.key for s in new)
            last_txid = plan.last_txid
        except (StorageError, PlanError, ArtefactError) as e:
            verdict.reason, verdict.message = "damaged", f"while searching for the live database's state: {e}"
            return
        match = [t for t, c in seen.items() if c == wanted]
        if match:
            txid = max(match)
            try:
                again = restore(
                    driver, scratch / f"at-{txid}.db", target=RestoreTarget(generation=generation, txid=txid),
                    encryption_key=encryption_key,
                )
            except (StorageError, RestoreError, PlanError) as e:
                verdict.reason, verdict.message = "damaged", f"restoring txid {txid} to compare with the live database: {e}"
                return
            verdict.compared, verdict.source_txid = True, again.txid
            return
        if time.monotonic() >= deadline:
            verdict.reason = "behind"
            verdict.message = (
                f"the live database's current state (checksum {wanted:016x}) is not on the replica after {wait:g} s "
                f"(generation {generation} ends at txid {last_txid}); is the agent running and the replica caught up?"
            )
            return
        time.sleep(0.2)
        try:
            wanted = source_checksum()  # the source may have moved on; follow it
        except Exception as e:
            verdict.reason, verdict.message = "source", f"cannot read the live database: {e}"
            return
