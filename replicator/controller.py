"""The agent: for each database a capture thread and one shipper per replica, woken by file
change events (replicator.wal_events) with a slow poll as a safety net."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Callable

from replicas import RetryingDriver, TimeoutDriver, instruments, open_driver
from replicas.metrics import MetricsDriver
from replicator import keys, logs, memory, metrics
from replicator.artefact import ArtefactHeader
from replicator.capture import Capture
from replicator.config import Config, DbConfig, ReplicaConfig
from replicator.shipper import Pending, ReplicaShipper
from replicator.wal_events import ChangeEvents


def open_replica(rc: ReplicaConfig, db: str = ""):
    """The driver for a configured replica: retries around per-attempt metrics around a
    deadline on progress (op-timeout), all wrappers around the backend's driver. The
    metrics wrapper only when metrics count (replicas.instruments): it would time every
    operation for nothing otherwise."""
    driver = TimeoutDriver(open_driver(rc.url, **dict(rc.options)), op_timeout=rc.op_timeout)
    if instruments.enabled():
        driver = MetricsDriver(driver, db=db, replica=rc.name)
    return RetryingDriver(driver, attempts=3)


class DatabaseReplicator:
    """Replicates one database: capture into the shadow log, ship to every replica."""

    # the last transaction of each recent artefact, whose checksum a restore drill compares
    # (a replica's latest state ends with an artefact's last transaction)
    RECORDED_MAX = 10_000

    def __init__(self, cfg: DbConfig, *, on_shipped: Callable[[ReplicaShipper, Pending, float], None] | None = None):
        self.cfg = cfg
        self.log = logs.get(db=str(cfg.path))
        self.capture = Capture(cfg, publish=self._publish, log=self.log)
        self.shippers = [
            ReplicaShipper(
                rc.name,
                open_replica(rc, str(cfg.path)),
                self.capture.shadow,
                retention=rc.retention,
                retention_check_interval=rc.retention_check_interval,
                log=self.log,
                db=str(cfg.path),
                on_shipped=on_shipped,
                sync_interval=rc.sync_interval,
            )
            for rc in cfg.replicas
        ]
        # (generation, txid) -> database checksum capture recorded, for restore drills
        self.recorded: OrderedDict[tuple[str, int], int] = OrderedDict()
        self.next_verify = time.monotonic() + cfg.verify_interval if cfg.verify_interval else None
        self._local: deque[keys.ArtefactKey] = deque()
        self._local_bytes: dict[str, int] = {}  # key -> size of what the shadow log holds
        self.shadow_full = False
        self._wake = threading.Event()
        self._woken = False  # the last wait ended with a change event
        self._error_kind: tuple | None = None  # the failure last logged
        self.events = False  # change events wake this database (set by the agent)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # -- events ---------------------------------------------------------------------------
    def notify(self) -> None:
        self._wake.set()

    def _remember(self, key: keys.ArtefactKey, size: int | None = None) -> None:
        self._local.append(key)
        if size is None:
            try:
                size = self.capture.shadow.size_of(key.key)
            except FileNotFoundError:
                size = 0
        self._local_bytes[key.key] = size

    def shadow_bytes(self) -> int:
        """Bytes of artefacts the shadow log holds (not yet on every replica)."""
        return sum(self._local_bytes.values())

    def _publish(self, key: keys.ArtefactKey, header: ArtefactHeader, size: int | None = None, data: bytes | None = None) -> None:
        # the header, size and (a small artefact's) bytes come from capture: no shipper
        # re-reads the artefact from the shadow log
        if size is None:
            size = self.capture.shadow.size_of(key.key)
        self._remember(key, size)
        if header.txns:
            last = header.txns[-1]
            self.recorded[(key.generation, last.txid)] = last.db_checksum
        while len(self.recorded) > self.RECORDED_MAX:
            self.recorded.popitem(last=False)
        for s in self.shippers:
            s.offer(key, first_commit_time=header.txns[0].commit_time, size=size, data=data)

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        existing = self.capture.shadow.list()
        self._discard_orphans(existing)
        existing = self.capture.shadow.list()
        for key in existing:
            self._remember(key)
        state = self.capture.shadow.load_state()
        if state is None:
            self._find_generation_floor()
        for s in self.shippers:
            s.load(existing, state.generation if state is not None else None)
            s.start()
        self._initial_snapshot_time()
        self._owe_snapshot_to_new_replicas()
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.cfg.path.name}", daemon=True)
        self._thread.start()

    def _find_generation_floor(self) -> None:
        """Without a shadow state (a new node, or a shadow directory removed), the first
        generation must still sort after every generation the replicas hold, even if this
        node's clock is behind theirs: restore and retention take the newest id as latest."""
        newest = None
        for s in self.shippers:
            try:
                for info in s.driver.list(keys.GENERATIONS + "/"):
                    k = keys.parse_key(info.key)
                    if k is not None and (newest is None or k.generation > newest):
                        newest = k.generation
            except Exception as e:  # unreachable now: its shipper reports it
                self.log.debug("cannot list replica for its newest generation", replica=s.name, error=str(e))
        self.capture.generation_floor = newest

    def _initial_snapshot_time(self) -> None:
        """After a restart, the last snapshot is the newest one of the generation on any replica
        or in the shadow log (for the last-snapshot metric)."""
        state = self.capture.shadow.load_state()
        if state is None or self.capture.last_snapshot_time is not None:
            return
        times = [s.newest_snapshot_time(state.generation) for s in self.shippers]
        times += [k.time_ms / 1000.0 for k in self._local if k.kind == keys.SNAPSHOT and k.generation == state.generation]
        known = [t for t in times if t is not None]
        if known:
            self.capture.last_snapshot_time = max(known)

    def _owe_snapshot_to_new_replicas(self) -> None:
        """A replica added to the config of a running generation would get only segments,
        which restore cannot use without a snapshot: take one at the first step."""
        state = self.capture.shadow.load_state()
        if state is None:
            return
        if any(k.kind == keys.SNAPSHOT and k.generation == state.generation for k in self._local):
            return  # the shadow still holds the generation's snapshot: it ships to everyone
        lacking = [s.name for s in self.shippers if s.listed and s.newest_snapshot_time(state.generation) is None]
        if lacking:
            self.log.info("replica has no snapshot of the current generation; taking one", replicas=lacking)
            self.capture.snapshot_due = True

    def _discard_orphans(self, existing: list[keys.ArtefactKey]) -> None:
        """Artefacts written after the last durable position (a crash between the two) go."""
        state = self.capture.shadow.load_state()
        for a in existing:
            if state is None or a.generation > state.generation or (
                a.generation == state.generation and a.kind == keys.SEGMENT and a.first_txid > state.txid
            ):
                self.capture.shadow.remove(a.key)

    def stop(self, timeout: float | None = None) -> bool:
        """Capture what is committed, ship it to every reachable replica, then stop."""
        timeout = self.cfg.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        ok = True
        for s in self.shippers:
            ok = s.stop(max(0.1, deadline - time.monotonic())) and ok
        self._cleanup()
        self.capture.close()
        self.capture.shadow.release()
        for s in self.shippers:
            s.driver.close()
        return ok

    IDLE_POLL_FACTOR = 8  # with change events, an idle database's safety poll backs off to 8x

    def _safety_poll(self, idle_steps: int) -> float:
        """Seconds to wait for a change event before stepping anyway. With working change
        events the poll is only a safety net: it doubles while nothing changes, from
        monitor-interval up to IDLE_POLL_FACTOR times it, so hundreds of idle databases
        cost almost nothing; any event or capture resets it."""
        base = self.cfg.monitor_interval
        if not self.events or idle_steps <= 0:
            return base
        return min(base * self.IDLE_POLL_FACTOR, base * (2 ** min(idle_steps, 10)))

    RECHECKS = (0.002, 0.01, 0.05)  # after an event that found nothing to capture
    PARK_AFTER = 2.0  # seconds without a commit before an idle database releases what it can (Capture.park)

    def _run(self) -> None:
        backoff = 0.0
        idle_steps = 0
        rechecks = 0  # short re-steps left after an event that found no new commit
        active = time.monotonic()  # the last step that captured a commit
        while True:
            stopping = self._stop.is_set()
            try:
                captured = 0
                if self._has_room():
                    captured = self.capture.step()
                    # stopping: the whole backlog, not one bite of it (what is committed ships)
                    while stopping and self.capture.behind and self._has_room():
                        more = self.capture.step()  # (behind is only news from a step that captured)
                        if not more:
                            break
                        captured += more
                idle_steps = 0 if captured or self._woken else idle_steps + 1
                # a change event can arrive before SQLite has published the commit in the
                # WAL index (it writes the frames, fsyncs, then updates the index): look
                # again a few times soon instead of waiting for the safety poll
                if captured:
                    rechecks = 0
                elif self._woken:
                    rechecks = len(self.RECHECKS)
                if not stopping and not self.shadow_full:
                    self.capture.maybe_checkpoint()
                    self.capture.maybe_snapshot()
                self._cleanup()
                now = time.monotonic()
                if captured:
                    active = now
                elif not stopping and not rechecks and now - active >= self.PARK_AFTER and self.capture.parkable:
                    self.capture.park()
                    memory.trim()  # what the database let go of, and what start-up left free
                if self.last_error is not None:
                    self.log.info("capture recovered")
                self.last_error = None
                self._error_kind = None
                backoff = 0.0
            except Exception as e:  # keep the agent alive; the next step retries from the durable position
                msg = f"{type(e).__name__}: {e}"
                metrics.CAPTURE_ERRORS.labels(db=str(self.cfg.path)).inc()
                # say it once: the same kind of failure (a new generation id in each message
                # must not make it new)
                kind = (type(e).__name__, getattr(e, "errno", None) or msg)
                if kind != self._error_kind:
                    self.log.error("capture failed; will retry", error=msg)
                self._error_kind = kind
                self.last_error = msg
                self.capture.close()
                backoff = min(5.0, max(0.1, backoff * 2))
            if stopping:
                return
            stepped = time.monotonic()
            if backoff:
                # a failing step backs off whatever the app commits meanwhile (change
                # events would turn the backoff into a retry storm)
                self._stop.wait(backoff)
                self._woken = False
            elif captured and self.capture.behind:
                self._woken = True  # a backlog is left: go on at once (after the sync-interval gap)
            elif rechecks:
                self._woken = self._wake.wait(self.RECHECKS[len(self.RECHECKS) - rechecks])
                rechecks -= 1
            else:
                wait = self._safety_poll(idle_steps)
                if self.capture.parkable:  # park soon after the last commit (or snapshot, checkpoint)
                    wait = min(wait, max(0.05, active + self.PARK_AFTER - time.monotonic()))
                self._woken = self._wake.wait(wait)
            self._wake.clear()
            # coalesce: a commit after a quiet spell is captured at once, but under load
            # capture steps (and so segments) are at least sync-interval apart
            gap = self.cfg.sync_interval - (time.monotonic() - stepped)
            if gap > 0:
                self._stop.wait(gap)

    def _has_room(self) -> bool:
        """False while the shadow log is at its size bound: capture pauses (the WAL keeps
        every frame meanwhile, because the agent stops checkpointing) until the replicas
        catch up. Nothing is dropped."""
        used = self.shadow_bytes()
        full = used >= self.cfg.shadow_max_bytes
        if full and not self.shadow_full:
            self.log.error(
                "shadow directory is full: capture paused until every replica catches up; the WAL grows meanwhile",
                shadow_bytes=used,
                shadow_max_bytes=self.cfg.shadow_max_bytes,
                lagging=[s.name for s in self.shippers if s.pending],
            )
        elif self.shadow_full and not full:
            self.log.info("shadow directory has room again: capture resumed", shadow_bytes=used)
        self.shadow_full = full
        return not full

    def _cleanup(self) -> None:
        """Drop local artefacts that every replica holds."""
        state = self.capture.state
        while self._local:
            key = self._local[0]
            if not all(s.has(key) for s in self.shippers):
                break
            if state is not None and key.generation == state.generation and key.last_txid > state.txid:
                break
            self._local.popleft()
            self._local_bytes.pop(key.key, None)
            self.capture.shadow.remove(key.key)
            for s in self.shippers:
                s.forget(key)

    def data_loss_window(self) -> dict[str, float]:
        return {s.name: s.data_loss_window() for s in self.shippers}

    def run_drills(self) -> None:
        """Restore-drill every replica (verify-interval) and record the verdicts."""
        from replicator.verify import verify_replica

        for s in self.shippers:
            verdict = verify_replica(
                s.name, s.driver, scratch_dir=self.capture.shadow.tmp, recorded=lambda g, t: self.recorded.get((g, t)), wait=0,
                encryption_key=self.capture.encryption_key,
            )
            db = str(self.cfg.path)
            metrics.VERIFY_SECONDS.labels(db=db, replica=s.name).observe(verdict.seconds)
            s.verify["seconds"] = verdict.seconds
            s.verify["last_ok"] = verdict.ok
            if verdict.ok:
                s.verify["last_success"] = time.time()
                s.verify["last_error"] = None
                s.log.info("restore drill passed", txid=verdict.txid, compared=verdict.compared, seconds=verdict.seconds)
            else:
                metrics.VERIFY_FAILURES.labels(db=db, replica=s.name, reason=verdict.reason).inc()
                s.verify["last_error"] = f"{verdict.reason}: {verdict.message}"
                s.log.error("restore drill failed", reason=verdict.reason, error=verdict.message)

    def check_thresholds(self, now: float) -> None:
        """Log once when a replica's data-loss window crosses the threshold, and once when it
        is back within it."""
        threshold = self.cfg.data_loss_window_threshold
        for s in self.shippers:
            window = s.data_loss_window()
            behind = window > threshold
            if behind and not s.behind_threshold:
                s.log.warning(
                    "data-loss window above threshold",
                    data_loss_window=round(window, 3),
                    threshold=threshold,
                    pending=len(s.pending),
                    error=s.last_error,
                )
            elif s.behind_threshold and not behind:
                s.log.info("data-loss window back within threshold", data_loss_window=round(window, 3), threshold=threshold)
            s.behind_threshold = behind


class Agent:
    """Replicates every database of a config until stopped."""

    MONITOR_INTERVAL = 1.0  # seconds between threshold checks

    def __init__(self, config: Config, *, on_shipped=None, metrics_addr: str | None = None):
        self.config = config
        self.log = logs.get()
        self._on_shipped = on_shipped
        self.metrics_addr = metrics_addr or config.metrics_addr
        if self.metrics_addr:  # count from the start: before any component takes a labelled child
            instruments.enable()
        # databases and _by_path are replaced, never mutated (copy on write): status, metrics
        # and the monitors iterate them without a lock while add/remove_database run
        self.databases = [DatabaseReplicator(db, on_shipped=on_shipped) for db in config.dbs]
        self._by_path = {str(d.cfg.path): d for d in self.databases}
        self._lock = threading.RLock()  # serialises add_database / remove_database
        self._removing: dict[str, DatabaseReplicator] = {}  # stopping after remove_database
        self._add_errors: dict[str, str] = {}
        self._dirs = None  # replicator.discovery.DirectoryWatcher, for dir: entries
        self._events = ChangeEvents(self._wake_database)
        self._stopped = threading.Event()
        self._stopping = threading.Event()
        self.metrics_server = None
        self._monitor: threading.Thread | None = None

    def status(self) -> dict:
        from replicator.status import agent_status

        return agent_status(self)

    def start(self) -> None:
        if self.metrics_addr:
            from replicator.metrics_server import MetricsServer

            self.metrics_server = MetricsServer(self.metrics_addr, self.status)  # fails before anything starts
        for d in self.databases:
            Path(d.cfg.path).parent.mkdir(parents=True, exist_ok=True)
        self._events.start()
        for d in self.databases:
            self._watch_database(d)
        for d in self.databases:
            d.start()
        if self.config.dirs:
            from replicator.discovery import DirectoryWatcher

            self._dirs = DirectoryWatcher(self.config.dirs, self._events, add=self._add_discovered, remove=self.remove_database)
            self._dirs.scan()  # every database of every dir: entry, before "replicating"
            self._dirs.start()  # then follow the watched ones
        self._monitor = threading.Thread(target=self._watch_thresholds, name="thresholds", daemon=True)
        self._monitor.start()
        if any(d.next_verify is not None for d in self.databases):
            self._verifier = threading.Thread(target=self._run_drills, name="verify", daemon=True)
            self._verifier.start()
        extra = {"metrics": f"http://{self.metrics_addr}/metrics"} if self.metrics_addr else {}
        self.log.info("replicating", databases=len(self.databases), replicas=sum(len(d.shippers) for d in self.databases), **extra)

    # -- databases at run time ------------------------------------------------------------
    def _wake_database(self, path: str) -> None:
        d = self._by_path.get(path)
        if d is not None:
            d.notify()

    def _watch_database(self, d: DatabaseReplicator) -> None:
        try:
            self._events.add(str(d.cfg.path), d.cfg.sync_interval)
            d.events = True
        except OSError as e:
            d.log.warning(
                "no change events for this database; capture relies on its poll every monitor-interval",
                error=e.strerror or str(e),
                monitor_interval=d.cfg.monitor_interval,
            )

    def add_database(self, cfg: DbConfig) -> DatabaseReplicator | None:
        """Start replicating cfg while the agent runs. None (and nothing started) when its
        path is already replicated or still being removed, when the agent is stopping, or
        when the replicator cannot be set up (logged)."""
        key = str(cfg.path)
        with self._lock:
            if self._stopping.is_set() or key in self._by_path or key in self._removing:
                self.log.debug("database not added: already replicated or being removed", path=key)
                return None
            in_use = {r.url for x in [*self.databases, *self._removing.values()] for r in x.cfg.replicas}
            clash = [r.url for r in cfg.replicas if r.url in in_use]
            if clash:  # two databases in one replica location would mix their generations
                message = "replica location already used by another database"
                if self._add_errors.get(key) != message:
                    from replicas import redact_url

                    self.log.error("cannot replicate database: " + message, path=key, url=redact_url(clash[0]))
                self._add_errors[key] = message
                return None
            d = None
            try:
                d = DatabaseReplicator(cfg, on_shipped=self._on_shipped)
                self._watch_database(d)
                d.start()
            except Exception as e:  # e.g. a replica URL its driver refuses, an unwritable shadow dir
                if d is not None:
                    try:
                        d.stop(0.1)
                    except Exception:  # half started: release what can be released
                        pass
                message = f"{type(e).__name__}: {e}"
                if self._add_errors.get(key) != message:  # say it once, not at every rescan
                    self.log.error("cannot replicate database", path=key, error=message)
                self._add_errors[key] = message
                self._events.remove(key)
                return None
            self._add_errors.pop(key, None)
            self.databases = [*self.databases, d]
            self._by_path = {**self._by_path, key: d}
        self.log.debug("database added", path=key, replicas=len(d.shippers))
        return d

    def _add_discovered(self, cfg: DbConfig) -> bool:
        return self.add_database(cfg) is not None

    def remove_database(self, path) -> bool:
        """Stop replicating the database at path, gracefully: capture what is committed, ship
        it (up to shutdown-timeout), close. Its shadow directory stays, so adding it again
        resumes. False when it is not replicated or replicas were not caught up."""
        key = str(path)
        with self._lock:
            d = self._by_path.get(key)
            if d is None:
                return False
            self.databases = [x for x in self.databases if x is not d]
            self._by_path = {k: v for k, v in self._by_path.items() if v is not d}
            self._removing[key] = d
            self._events.remove(key)
        try:
            caught_up = d.stop()
        finally:
            with self._lock:
                self._removing.pop(key, None)
        self.log.info("database removed", path=key, caught_up=caught_up)
        return caught_up

    def _watch_thresholds(self) -> None:
        while not self._stopped.wait(self.MONITOR_INTERVAL):
            now = time.time()
            for d in list(self.databases):
                d.check_thresholds(now)

    def _run_drills(self) -> None:
        """Background restore drills, one database at a time (verify-interval)."""
        while not self._stopped.is_set():
            now = time.monotonic()
            due = [d for d in list(self.databases) if d.next_verify is not None and d.next_verify <= now]
            for d in due:
                if self._stopping.is_set():
                    return
                try:
                    d.run_drills()
                except Exception as e:  # a drill must never take the agent down
                    d.log.error("restore drill crashed", error=f"{type(e).__name__}: {e}")
                d.next_verify = time.monotonic() + d.cfg.verify_interval
            pending = [d.next_verify for d in list(self.databases) if d.next_verify is not None]
            self._stopping.wait(max(0.1, min(pending) - time.monotonic()) if pending else 60)

    def stop(self) -> bool:
        self._stopping.set()
        if self._dirs is not None:
            self._dirs.stop()  # no more adds; removals under way finish first
        ok = True
        for d in self.databases:
            ok = d.stop() and ok
        self._events.close()
        self._stopped.set()
        if self.metrics_server is not None:
            self.metrics_server.close()
        return ok
