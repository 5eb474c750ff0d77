"""Restore before replicating (`replicate --restore-if-db-not-exists`, or the per-database
`restore-if-db-not-exists: true`): for single-process containers that start from nothing.

A missing database is restored from the replica with the newest position. Only when every
replica is reachable and holds nothing does the app start with a new database: an
unreachable replica might hold the only backup, and starting fresh would begin a new history
that hides it.
"""

from __future__ import annotations

from replicas import StorageError
from replicator.config import DbConfig, encryption_key_of
from replicator.errors import BootstrapError  # defined apart, so the CLI can catch it without importing this module
from replicator.restore import RestoreError, list_artefacts, restore
from replicator.restore_plan import PlanError, RestoreTarget, plan_restore


def restore_if_missing(db: DbConfig, log) -> bool:
    """Restore db.path when it does not exist; True when a restore happened."""
    from replicator.controller import open_replica

    if db.path.exists():
        return False
    best = None
    unreachable: list[str] = []
    for rc in db.replicas:
        driver = open_replica(rc, str(db.path))
        try:
            listing = list_artefacts(driver)
            if not listing:
                driver.close()
                continue
            plan = plan_restore(listing, RestoreTarget())
        except StorageError as e:
            unreachable.append(f"{rc.name}: {e}")
            log.warning("replica unreachable while bootstrapping", replica=rc.name, error=str(e))
            driver.close()
            continue
        except PlanError as e:
            # a broken chain is not an empty replica: it may hold the only backup
            unreachable.append(f"{rc.name}: {e}")
            log.warning("replica holds no restorable generation", replica=rc.name, error=str(e))
            driver.close()
            continue
        rank = (plan.generation, plan.last_txid)
        if best is None or rank > best[0]:
            if best is not None:
                best[2].close()
            best = (rank, rc.name, driver, plan)
        else:
            driver.close()
    if best is None:
        if unreachable:
            raise BootstrapError(
                f"{db.path} does not exist and cannot be restored: " + "; ".join(unreachable)
                + " (not starting with an empty database while a replica may hold a backup;"
                " restore by hand or clear the replica)"
            )
        log.info("no replica holds a backup; starting with a new database", path=str(db.path))
        return False
    _, name, driver, plan = best
    try:
        result = restore(driver, db.path, restore_plan=plan, encryption_key=encryption_key_of(db))
    except (RestoreError, StorageError) as e:
        raise BootstrapError(f"{db.path}: restore from replica {name} failed: {e}") from None
    finally:
        driver.close()
    log.info("restored before replicating", path=str(db.path), replica=name, generation=plan.generation, txid=result.txid)
    return True
