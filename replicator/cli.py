"""The `replicator` command line: a thin skin over the library.

    replicator replicate [-c FILE] [DB_PATH REPLICA_URL] [--exec CMD]
    replicator restore [-c FILE] [-o OUT] [options] DB_PATH|REPLICA_URL
    replicator status [-c FILE] [--addr HOST:PORT] [--json]
    replicator verify [-c FILE] [--replica NAME] [--json] [DB_PATH|REPLICA_URL]
    replicator generations|snapshots|segments [-c FILE] [--json] DB_PATH|REPLICA_URL
    replicator demo [--dir DIR] [--seconds N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from replicator import __version__, logs

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UserError(Exception):
    """An error caused by input the user can fix; printed as one line, exit code 2."""


def _iso(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_time(value: str) -> float:
    v = value.strip()
    if v.endswith("Z") or v.endswith("z"):
        v = v[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid RFC 3339 time {value!r} (e.g. 2026-11-22T10:00:00Z)") from None
    if dt.tzinfo is None:
        raise argparse.ArgumentTypeError(f"time {value!r} needs a zone (e.g. Z or +01:00)")
    return dt.timestamp()


def _nonneg_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return n


# -- targets: a replica URL or a database in the config ----------------------------------------
def _is_url(arg: str) -> bool:
    return "://" in arg


def _load_config(path: str | None):
    from replicator.config import load_config

    return load_config(path)


def _replicas_for(args) -> list[tuple[str, object]]:
    """(name, replica config or URL) candidates for a DB_PATH|REPLICA_URL argument."""
    target = args.target
    if _is_url(target):
        if args.replica:
            raise UserError("--replica names a replica in the config; it cannot be used with a replica URL")
        return [(target.split("://", 1)[0], target)]
    from replicator.config import find_db

    config = _load_config(args.config)
    db = find_db(config, target)
    replicas = list(db.replicas)
    if args.replica:
        replicas = [r for r in replicas if r.name == args.replica]
        if not replicas:
            raise UserError(f"database {db.path} has no replica named {args.replica!r} (it has: {', '.join(r.name for r in db.replicas)})")
    return [(r.name, r) for r in replicas]


def _encryption_key(args, db=None):
    """The key that decrypts encrypted artefacts: --encryption-key-path, else the config's
    (encryption-key-path or encryption-key of db), else $REPLICATOR_ENCRYPTION_KEY_PATH;
    None when there is none (unencrypted artefacts need none)."""
    if db is None and not getattr(args, "encryption_key_path", None) and not os.environ.get("REPLICATOR_ENCRYPTION_KEY_PATH"):
        return None  # (and the config module, ~5 ms of a restore's start, stays unimported)
    from replicator.config import encryption_key_of, load_encryption_key

    if getattr(args, "encryption_key_path", None):
        return load_encryption_key(args.encryption_key_path, what="--encryption-key-path")
    key = encryption_key_of(db) if db is not None else None
    if key is None and os.environ.get("REPLICATOR_ENCRYPTION_KEY_PATH"):
        key = load_encryption_key(os.environ["REPLICATOR_ENCRYPTION_KEY_PATH"], what="REPLICATOR_ENCRYPTION_KEY_PATH")
    return key


def _db_of(args, target: str | None):
    """The config's db entry for a DB_PATH target; None for a replica URL."""
    if target is None or _is_url(target):
        return None
    from replicator.config import find_db

    return find_db(_load_config(args.config), target)


def _open(spec):
    from replicas import RetryingDriver, open_driver

    if isinstance(spec, str):
        return RetryingDriver(open_driver(spec), attempts=3)
    from replicator.controller import open_replica

    return open_replica(spec)


# -- replicate ------------------------------------------------------------------------------------
def _raise_open_files_limit() -> None:
    """Each database holds about a dozen fds open (its connections, -wal, -shm, shadow log):
    lift the soft limit to the hard one, so that hundreds of databases fit (a soft limit of
    1024 would stop at about 80)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    except (ImportError, ValueError, OSError) as e:
        logs.get().debug("cannot raise the open files limit", error=str(e))


def cmd_replicate(args) -> int:
    from replicator.config import adhoc_config
    from replicator.controller import Agent
    from replicator import memory
    from replicator.sqlite_access import agent_memory_settings

    agent_memory_settings()  # before any connection (a bootstrap restore's among them)
    memory.limit_arenas()  # before the agent's threads

    if args.db and args.url:
        config = adhoc_config(args.db, args.url)
    elif args.db or args.url:
        raise UserError("give both DB_PATH and REPLICA_URL, or -c FILE")
    else:
        config = _load_config(args.config)
    if args.log_level is None and args.log_format is None:
        logs.configure(config.log_level, config.log_format)
    elif args.log_level is None or args.log_format is None:
        logs.configure(args.log_level or config.log_level, args.log_format or config.log_format)
    from replicator import progress

    # long work (a large snapshot, a replica catching up) prints progress lines on a terminal
    progress.enable_console(logs.current_format() == "text" and progress.is_terminal(sys.stderr))
    for w in config.warnings:
        logs.get().warning(w)
    from replicator.bootstrap import restore_if_missing

    for db in config.dbs:
        if args.restore_if_db_not_exists or db.restore_if_db_not_exists:
            restore_if_missing(db, logs.get(db=str(db.path)))
    if config.dirs:
        from replicator.discovery import restore_if_empty

        for entry in config.dirs:
            if args.restore_if_db_not_exists or entry.template.restore_if_db_not_exists:
                restore_if_empty(entry, logs.get(dir=str(entry.dir)))
    _raise_open_files_limit()
    stop = threading.Event()
    child = None

    def on_signal(signum, frame):
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        else:
            stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = Agent(config, metrics_addr=args.metrics_addr)
    agent.start()
    code = EXIT_OK
    if args.exec:
        import shlex
        import subprocess

        child = subprocess.Popen(shlex.split(args.exec))
        while child.poll() is None:
            time.sleep(0.1)
        code = child.returncode
    else:
        while not stop.wait(0.5):
            pass
    logs.get().info("shutting down: shipping what is committed")
    caught_up = agent.stop()
    if not caught_up:
        logs.get().warning("some replicas were not caught up at shutdown; the shadow log keeps the rest for next start")
    return code


# -- restore --------------------------------------------------------------------------------------
def _restore_progress(args, driver, plan, output: Path):
    """The download bar of a restore (bytes fetched of the planned artefacts' sizes): only on
    a terminal with text logs, never for --dry-run; otherwise a reporter that prints nothing."""
    from replicator.progress import Progress, is_terminal

    if args.dry_run or logs.current_format() != "text" or not is_terminal(sys.stderr):
        return Progress.null()
    from replicas import StorageError
    from replicator.restore import list_artefacts_with_sizes, planned_bytes

    try:
        total = planned_bytes(plan, list_artefacts_with_sizes(driver)[1]) or None
    except StorageError:
        total = None  # the restore itself will say what is wrong
    return Progress(f"restoring {output.name}", total, sys.stderr, final_label=f"restored {output.name}")


def cmd_restore(args) -> int:
    from replicator.restore import RestoreError, restore
    from replicator.restore_plan import RestoreTarget

    log = logs.get()
    if args.txid is not None and args.timestamp is not None:
        raise UserError("use either --txid or --timestamp, not both")
    if not _is_url(args.target):
        entry = _dir_entry(args)
        if entry is not None:  # DIR of a dir: entry: every database its replicas hold
            return _restore_dir(args, entry)
    if _is_url(args.target):
        if not args.output:
            raise UserError("restoring from a replica URL needs -o OUT")
        output = Path(args.output)
    else:
        output = Path(args.output or args.target)
    output = output.absolute()
    if args.if_db_not_exists and output.exists():
        log.info("database exists; nothing to do", path=str(output))
        return EXIT_OK
    if output.exists() and not args.force and not args.dry_run:
        raise UserError(f"{output} already exists (use --force to replace it, or --if-db-not-exists)")
    target = RestoreTarget(generation=args.generation, txid=args.txid, timestamp=args.timestamp)
    candidates = _replicas_for(args)
    best, errors = _best_replica(candidates, target, log)
    if best is None:
        if args.if_replica_exists and all("holds no generations" in e for e in errors):
            log.info("no replica holds a backup; nothing to restore")
            return EXIT_OK
        raise RestoreError("nothing to restore: " + "; ".join(errors) if errors else "nothing to restore")
    _, name, driver, plan = best
    if args.dry_run:
        print(f"replica:    {name}")
        print(f"generation: {plan.generation}")
        print(f"snapshot:   {plan.snapshot.key}")
        for seg in plan.segments:
            print(f"segment:    {seg.key}")
        if plan.target_txid is not None:
            print(f"target:     txid {plan.target_txid}")
        elif plan.target_time is not None:
            print(f"target:     {_iso(plan.target_time)}")
        else:
            print(f"target:     latest (txid {plan.last_txid})")
        for note in plan.notes:
            print(f"note:       {note}")
        print(f"output:     {output}")
        return EXIT_OK
    for note in plan.notes:
        log.warning(note)
    key = _encryption_key(args, _db_of(args, args.target))
    started = time.monotonic()
    bar = _restore_progress(args, driver, plan, output)
    try:
        result = restore(driver, output, restore_plan=plan, force=args.force, on_read=bar.advance, encryption_key=key)
    except BaseException:
        bar.close(ok=False)
        raise
    bar.close()
    log.info(
        "restored",
        path=str(output),
        replica=name,
        generation=plan.generation,
        txid=result.txid,
        pages=result.db_pages,
        seconds=round(time.monotonic() - started, 3),
    )
    return EXIT_OK


def _best_replica(candidates, target, log, *, close_others: bool = False):
    """(best, errors): best is (rank, name, driver, plan) for the replica with the newest
    restorable position, or None; an unreachable replica is skipped (and named in errors)."""
    from replicas import StorageError
    from replicator.restore import list_artefacts
    from replicator.restore_plan import PlanError, plan_restore

    best = None
    errors = []
    for name, spec in candidates:
        try:
            driver = _open(spec)
            listing = list_artefacts(driver)
        except StorageError as e:
            errors.append(f"{name}: {e}")
            log.warning("replica unreachable; trying another", replica=name, error=str(e))
            continue
        if not listing:
            errors.append(f"{name}: holds no generations")
            continue
        try:
            plan = plan_restore(listing, target)
        except PlanError as e:
            errors.append(f"{name}: {e}")
            continue
        end = plan.target_txid if plan.target_txid is not None else plan.last_txid
        rank = (plan.generation, end)
        if best is None or rank > best[0]:
            if best is not None and close_others:
                best[2].close()
            best = (rank, name, driver, plan)
        elif close_others:
            driver.close()
    return best, errors


def _dir_entry(args):
    """The dir: entry of the config whose directory is args.target, else None."""
    from replicator.config import ConfigError

    target = Path(args.target)
    if target.exists() and not target.is_dir():
        return None
    try:
        config = _load_config(args.config)
    except ConfigError:
        if target.is_dir():
            raise
        return None  # the database path's own checks report it, as they always did
    wanted = target.absolute()
    for entry in config.dirs:
        if entry.dir == wanted or entry.dir.resolve() == wanted.resolve():
            return entry
    return None


def _restore_dir(args, entry) -> int:
    """`restore -c FILE DIR`: restore every database the replicas of the dir: entry hold
    into DIR (or -o OUT_DIR) at its relative path; one line per database."""
    import dataclasses

    from replicas import StorageError
    from replicator.discovery import databases_in_listing, join_url
    from replicator.restore import RestoreError, restore
    from replicator.restore_plan import RestoreTarget

    log = logs.get()
    if args.txid is not None or args.generation is not None:
        raise UserError(
            f"--txid and --generation name a point in one database's history; they cannot be used to restore "
            f"every database under {entry.dir} (use --timestamp, or restore one database by its path)"
        )
    replicas = list(entry.replicas)
    if args.replica:
        replicas = [r for r in replicas if r.name == args.replica]
        if not replicas:
            names = ", ".join(r.name for r in entry.replicas)
            raise UserError(f"dir {entry.dir} has no replica named {args.replica!r} (it has: {names})")
    out_dir = Path(args.output or entry.dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is not a directory")
    # every database some replica holds: <rel>/generations/... under the entry's base URL
    found: set[str] = set()
    refused: dict[str, str] = {}
    errors = []
    for rc in replicas:
        try:
            driver = _open(rc)
            try:
                rels, bad = databases_in_listing(info.key for info in driver.list(""))
            finally:
                driver.close()
        except StorageError as e:
            errors.append(f"{rc.name}: {e}")
            log.warning("replica unreachable; trying another", replica=rc.name, error=str(e))
            continue
        found.update(rels)
        refused.update(bad)
    if not found and not refused:
        if errors:
            raise RestoreError("nothing to restore: " + "; ".join(errors))
        if args.if_replica_exists:
            log.info("no replica holds a backup; nothing to restore", dir=str(entry.dir))
            return EXIT_OK
        raise RestoreError(f"nothing to restore: no replica of dir {entry.dir} holds a database")
    targets = []
    root = out_dir.resolve()
    for rel in sorted(found):
        output = out_dir.joinpath(*rel.split("/"))
        if not output.parent.resolve().is_relative_to(root):  # e.g. through a symlink already there
            refused[rel] = f"{output.parent} resolves outside {out_dir}"
            continue
        targets.append((rel, output))
    existing = [o for _, o in targets if o.exists()]
    if existing and not (args.force or args.if_db_not_exists or args.dry_run):
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} already exists{more} (use --force to replace, or --if-db-not-exists)")
    target = RestoreTarget(timestamp=args.timestamp)
    key = None if args.dry_run else _encryption_key(args, entry.template)
    failed = 0
    for rel, reason in sorted(refused.items()):
        shown = rel if rel.isprintable() and rel.strip() == rel else repr(rel)
        print(f"refused  {shown}: unsafe path from the replica ({reason}); not restored", flush=True)
        failed += 1
    for rel, output in targets:
        if args.if_db_not_exists and output.exists():
            print(f"exists   {rel}: {output} exists; nothing to do", flush=True)
            continue
        candidates = [(rc.name, dataclasses.replace(rc, url=join_url(rc.url, rel))) for rc in replicas]
        best, errs = _best_replica(candidates, target, log, close_others=True)
        if best is None:
            print(f"failed   {rel}: nothing to restore: {'; '.join(errs)}", flush=True)
            failed += 1
            continue
        _, name, driver, plan = best
        try:
            if args.dry_run:
                end = f"txid {plan.target_txid}" if plan.target_txid is not None else f"txid {plan.last_txid}"
                if plan.target_time is not None:
                    end += f" (at {_iso(plan.target_time)})"
                print(
                    f"plan     {rel} -> {output}: replica {name}, generation {plan.generation}, "
                    f"snapshot at txid {plan.snapshot.last_txid} + {len(plan.segments)} segment(s), to {end}",
                    flush=True,
                )
                continue
            for note in plan.notes:
                log.warning(note, path=str(output))
            result = restore(driver, output, restore_plan=plan, force=args.force, encryption_key=key)
            print(f"restored {rel} -> {output}: replica {name}, generation {plan.generation}, txid {result.txid}", flush=True)
        except (RestoreError, StorageError) as e:
            print(f"failed   {rel}: {e}", flush=True)
            failed += 1
        finally:
            driver.close()
    return EXIT_FAILED if failed else EXIT_OK


# -- status ---------------------------------------------------------------------------------------
class AgentUnreachable(Exception):
    """The running agent's endpoint does not answer; exit code 1."""


def fetch_status(addr: str, timeout: float = 5.0) -> dict:
    import urllib.error
    import urllib.request

    host, _, port = addr.rpartition(":")
    host = host or "127.0.0.1"
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise AgentUnreachable(f"cannot read the agent's status at {url} ({reason}); is `replicator replicate` running with this metrics-addr?") from None


def _age(t: float | None, now: float) -> str:
    return "-" if t is None else f"{max(0.0, now - t):.1f}s ago"


def cmd_status(args) -> int:
    if args.addr:
        addr = args.addr
    else:
        config = _load_config(args.config)
        if not config.metrics_addr:
            where = config.source or "the config"
            raise UserError(f"{where} has no metrics-addr; status reads the running agent through it (add e.g. metrics-addr: 127.0.0.1:9090, or pass --addr)")
        addr = config.metrics_addr
    st = fetch_status(addr)
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    now = st["time"]
    rows = []
    for db in st["databases"]:
        for r in db["replicas"]:
            rows.append({
                "db": db["path"],
                "replica": r["name"],
                "generation": r["generation"] or "-",
                "txid": "-" if r["txid"] is None else r["txid"],
                "local_txid": "-" if db["txid"] is None else db["txid"],
                "window": f"{r['data_loss_window']:.3f}s" + (" !" if r["behind_threshold"] else ""),
                "pending": r["pending_artefacts"],
                "last_upload": _age(r["last_upload"], now),
                "error": r["last_error"] or db["last_error"] or "-",
            })
    print(_table(rows, list(rows[0].keys())) if rows else "no databases")
    print("ready" if st["ready"] else "NOT READY (a data-loss window is above its threshold or something is failing)")
    return EXIT_OK


# -- verify ---------------------------------------------------------------------------------------
def _verify_targets(args) -> list[tuple[str | None, list[tuple[str, object]]]]:
    """(live database path or None, [(replica name, config or URL)]) to drill."""
    if args.target and _is_url(args.target):
        if args.replica:
            raise UserError("--replica names a replica in the config; it cannot be used with a replica URL")
        return [(None, [(args.target.split("://", 1)[0], args.target)])]
    from replicator.config import find_db

    config = _load_config(args.config)
    dbs = [find_db(config, args.target)] if args.target else list(config.dbs)
    out = []
    for db in dbs:
        replicas = [r for r in db.replicas if not args.replica or r.name == args.replica]
        if args.replica and not replicas:
            raise UserError(f"database {db.path} has no replica named {args.replica!r} (it has: {', '.join(r.name for r in db.replicas)})")
        out.append((str(db.path), [(r.name, r) for r in replicas]))
    return out


def cmd_verify(args) -> int:
    from replicas import StorageError
    import tempfile

    from replicator.db_image import live_checksum
    from replicator.verify import Verdict, verify_replica

    scratch = Path(args.scratch_dir) if args.scratch_dir else Path(tempfile.gettempdir())
    if not scratch.is_dir():
        raise UserError(f"--scratch-dir {scratch} is not a directory")
    targets = _verify_targets(args)
    results = []
    for db_path, replicas in targets:
        key = _encryption_key(args, _db_of(args, db_path))
        source = None
        if db_path is not None and Path(db_path).exists():
            source = lambda p=db_path: live_checksum(Path(p))[0]  # noqa: E731
        for name, spec in replicas:
            try:
                driver = _open(spec)
            except StorageError as e:
                verdict = Verdict(replica=name, ok=False, reason="unreachable", message=str(e))
            else:
                try:
                    verdict = verify_replica(
                        name, driver, scratch_dir=scratch, source_checksum=source, wait=args.wait, encryption_key=key
                    )
                finally:
                    driver.close()
            results.append((db_path, verdict))
            if not args.json:
                prefix = f"{db_path} -> " if db_path is not None and len(targets) > 1 else ""
                print(prefix + verdict.line(), flush=True)
    if args.json:
        print(json.dumps([{"db": db, **v.as_dict()} for db, v in results], indent=2))
    return EXIT_OK if all(v.ok for _, v in results) else EXIT_FAILED


# -- listings -------------------------------------------------------------------------------------
def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(widths[c]) for c in columns).rstrip())
    return "\n".join(lines)


def cmd_list(args) -> int:
    from replicator.restore import list_artefacts
    from replicator.restore_plan import generation_summary
    from replicator import keys

    rows: list[dict] = []
    for name, spec in _replicas_for(args):
        driver = _open(spec)
        listing = list_artefacts(driver)
        if args.generation:
            listing = [a for a in listing if a.generation == args.generation]
        if args.command == "generations":
            for g in generation_summary(listing):
                rows.append({
                    "replica": name, "generation": g.generation, "snapshots": g.snapshot_count, "segments": g.segment_count,
                    "first_txid": g.first_txid, "last_txid": g.last_txid, "created": _iso(g.created), "updated": _iso(g.updated),
                    "restorable": g.is_restorable,
                })
        else:
            kind = keys.SNAPSHOT if args.command == "snapshots" else keys.SEGMENT
            sizes = {}
            for info in driver.list(keys.GENERATIONS + "/"):
                sizes[info.key] = info.size
            for a in listing:
                if a.kind != kind:
                    continue
                row = {"replica": name, "generation": a.generation}
                if kind == keys.SNAPSHOT:
                    row.update(txid=a.last_txid, time=_iso(a.time))
                else:
                    row.update(first_txid=a.first_txid, last_txid=a.last_txid, last_commit=_iso(a.time))
                row.update(size=sizes.get(a.key, 0), key=a.key)
                rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        if rows:
            print(_table(rows, list(rows[0].keys())))
        else:
            print(f"no {args.command} found")
    return EXIT_OK


# -- demo -----------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from replicator.demo import run_demo

    return run_demo(Path(args.dir), seconds=args.seconds, rate=args.rate)


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replicator", description="Continuous replication of SQLite databases, with verified point-in-time restore.")
    parser.add_argument("--version", action="version", version=f"replicator {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    common.add_argument("--log-format", choices=["auto", "text", "json"], default=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("replicate", parents=[common], help="replicate databases continuously (foreground)")
    p.add_argument("-c", "--config", help="config file (default $REPLICATOR_CONFIG or /etc/replicator.yml)")
    p.add_argument("db", nargs="?", metavar="DB_PATH")
    p.add_argument("url", nargs="?", metavar="REPLICA_URL")
    p.add_argument("--exec", metavar="CMD", help="run CMD as a child; stop when it exits and exit with its code")
    p.add_argument("--restore-if-db-not-exists", action="store_true",
                   help="restore a missing database from its replicas before replicating")
    p.add_argument("--metrics-addr", metavar="HOST:PORT", help="serve /metrics, /healthz, /readyz and /status here (overrides metrics-addr)")
    p.set_defaults(func=cmd_replicate)

    p = sub.add_parser("verify", parents=[common], help="restore drill: restore each replica's latest state into a scratch file and check it")
    p.add_argument("-c", "--config")
    p.add_argument("--replica", metavar="NAME", help="only this named replica of the config")
    p.add_argument("--json", action="store_true")
    p.add_argument("--scratch-dir", metavar="DIR", help="where the scratch restores go (default: the system temp dir)")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for a replica to reach the live database's state (default 10)")
    p.add_argument("--encryption-key-path", metavar="FILE",
                   help="key file of encrypted replicas (default: the config's, else $REPLICATOR_ENCRYPTION_KEY_PATH)")
    p.add_argument("target", nargs="?", metavar="DB_PATH|REPLICA_URL", help="default: every database of the config")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("status", parents=[common], help="show the running agent's positions and data-loss windows")
    p.add_argument("-c", "--config", help="config file whose metrics-addr the agent serves")
    p.add_argument("--addr", metavar="HOST:PORT", help="the agent's metrics-addr (instead of reading the config)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("restore", parents=[common], help="restore a database from a replica")
    p.add_argument("-c", "--config")
    p.add_argument("-o", "--output", metavar="OUT", help="where to write the database (default: DB_PATH)")
    p.add_argument("--replica", metavar="NAME", help="restore from this named replica of the config")
    p.add_argument("--generation", metavar="G")
    p.add_argument("--txid", type=_nonneg_int, metavar="N", help="restore the state right after txid N")
    p.add_argument("--timestamp", type=_parse_time, metavar="RFC3339", help="restore the state at this time")
    p.add_argument("--if-db-not-exists", action="store_true", help="do nothing (exit 0) when the output exists")
    p.add_argument("--if-replica-exists", action="store_true", help="exit 0 when no replica holds a backup")
    p.add_argument("--dry-run", action="store_true", help="print the plan, restore nothing")
    p.add_argument("--force", action="store_true", help="replace an existing database (and its -wal/-shm)")
    p.add_argument("--encryption-key-path", metavar="FILE",
                   help="key file of an encrypted replica (default: the config's, else $REPLICATOR_ENCRYPTION_KEY_PATH)")
    p.add_argument("target", metavar="DB_PATH|REPLICA_URL")
    p.set_defaults(func=cmd_restore)

    for name, text in (("generations", "list generations"), ("snapshots", "list snapshots"), ("segments", "list segments")):
        p = sub.add_parser(name, parents=[common], help=f"{text} held by replicas")
        p.add_argument("-c", "--config")
        p.add_argument("--replica", metavar="NAME")
        p.add_argument("--generation", metavar="G")
        p.add_argument("--json", action="store_true")
        p.add_argument("target", metavar="DB_PATH|REPLICA_URL")
        p.set_defaults(func=cmd_list)

    p = sub.add_parser("demo", parents=[common], help="replicate a demo database with a small writer to a local file replica")
    p.add_argument("--dir", default="demo", help="working directory (default ./demo)")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--rate", type=float, default=20, help="writer transactions per second (default 20)")
    p.set_defaults(func=cmd_demo)
    return parser


def run() -> None:
    """The `replicator` console script (and `python -m replicator`): main(), exiting without
    the interpreter's teardown after a command that runs once and ends (see main)."""
    sys.exit(main(exit_fast=True))


def _exit_now(rc: int | None) -> None:
    import logging

    rc = rc or 0

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what the interpreter's own exit reports as 120
            rc = rc or 120
    os._exit(rc)


def main(argv: list[str] | None = None, *, exit_fast: bool = False) -> int:
    """Run one command; its exit status. With exit_fast, a command that runs once and ends
    (restore, verify, status, the listings) ends the process itself, without the
    interpreter's teardown: clearing the imported modules takes 10 to 17 ms that each such
    command would spend after its work is done (a restore at node bootstrap waits for
    it). Nothing is left to that teardown: each command fsyncs what it writes before it
    returns, and the standard streams and logging are flushed. replicate and demo, which
    hold database connections and threads until they end, exit as usual."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    rc = _run_command(args)
    if exit_fast and args.func not in (cmd_replicate, cmd_demo):
        _exit_now(rc)
    return rc


def _run_command(args: argparse.Namespace) -> int:
    from replicas import StorageError
    from replicator.errors import BootstrapError, ConfigError, MetricsServerError, ShadowLocked
    from replicator.restore import RestoreError
    from replicator.restore_plan import PlanError

    level = args.log_level or os.environ.get("REPLICATOR_LOG_LEVEL") or "info"
    logs.configure(level, args.log_format or "auto")
    try:
        return args.func(args)
    except (UserError, ConfigError) as e:
        print(f"replicator: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MetricsServerError as e:
        print(f"replicator: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (RestoreError, PlanError, StorageError, AgentUnreachable, BootstrapError, ShadowLocked) as e:
        print(f"replicator: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
