"""The shipper: one per (database, replica). Uploads shadow artefacts in order, with its own
position, retries with backoff, and prunes the replica by retention.

A replica that is down or slow only delays its own shipper: capture and the other replicas
go on, and the shadow log keeps every artefact until every replica has it.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from replicas import Driver, StorageError
from replicator import failpoints, keys, metrics
from replicator.artefact import ArtefactError, read_header
from replicator.progress import MiB, Progress
from replicator.progress import console as console_progress
from replicator.retention import plan_retention
from replicator.shadow import ShadowLog


@dataclass(frozen=True)
class Pending:
    """An artefact waiting for upload, with the commit time of its oldest transaction."""

    key: keys.ArtefactKey
    first_commit_time: float
    size: int
    # the same moment on the monotonic clock, so the data-loss window survives the wall
    # clock stepping back (it would read 0 while a replica is down)
    first_commit_mono: float = field(default=0.0, compare=False)
    # the artefact's bytes, when capture handed them over (small artefacts, while the
    # queue's in-memory budget lasts); else the upload reads the shadow file
    data: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.first_commit_mono:
            age = max(0.0, time.time() - self.first_commit_time)
            object.__setattr__(self, "first_commit_mono", time.monotonic() - age)


class ReplicaShipper:
    """Ships one database's artefacts to one replica on a background thread."""

    # a backlog this large (bytes or artefacts) when shipping resumes after a failure or
    # an agent restart is a catch-up, shown as progress lines on a terminal
    CATCHUP_MIN_BYTES = 4 * MiB
    CATCHUP_MIN_ARTEFACTS = 100
    # bytes of queued artefacts held in memory at most, by all shippers of the process
    # together (beyond, uploads read the shadow log): replicas that are down must not make
    # the agent grow, whatever the number of databases
    MEMORY_BUDGET = 16 * MiB
    MEMORY_ARTEFACT_MAX = 256 * 1024
    _held_total = 0
    _held_lock = threading.Lock()

    def __init__(
        self,
        name: str,
        driver: Driver,
        shadow: ShadowLog,
        *,
        retention: float,
        retention_check_interval: float,
        log,
        db: str = "",
        on_shipped: Callable[["ReplicaShipper", Pending, float], None] | None = None,
        clock: Callable[[], float] = time.time,
        sync_interval: float = 0.0,
    ):
        self.name = name
        self.db = db
        self.driver = driver
        self.shadow = shadow
        self.retention = retention
        self.retention_check_interval = retention_check_interval
        self.log = log.bind(replica=name)
        self.on_shipped = on_shipped
        self.clock = clock
        self.sync_interval = sync_interval
        self.pending: deque[Pending] = deque()
        self._upload_seconds = None  # the labelled histogram, once looked up
        self.uploaded: set[str] = set()
        self.position: tuple[str, int] | None = None  # (generation, txid) durable on the replica
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.errors = 0
        self.behind_threshold = False  # set by the agent's threshold monitor
        # the last restore drill of this replica (replicator.verify), for status and metrics
        self.verify: dict = {"last_success": None, "last_ok": None, "last_error": None, "seconds": None}
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._next_retention = time.monotonic() + min(60.0, retention_check_interval)
        self._known_listing = False
        self._catchup: Progress | None = None  # progress of the backlog being drained
        self._catchup_end: str | None = None  # the last key of that backlog
        self._catchup_armed = False  # the next success may begin a catch-up

    # -- queue ----------------------------------------------------------------------------
    def offer(
        self, key: keys.ArtefactKey, *, first_commit_time: float | None = None, size: int | None = None, data: bytes | None = None
    ) -> None:
        """Queue an artefact that is now durable in the shadow log (its header is read from
        the shadow only when the caller does not pass the commit time and size). data: its
        bytes, kept for the upload if the memory budget allows."""
        if first_commit_time is None or size is None:
            item = self._pending_for(key)
            if item is None:
                return
        else:
            item = Pending(key, first_commit_time, size)
        if data is not None and len(data) <= self.MEMORY_ARTEFACT_MAX and self._hold(len(data)):
            object.__setattr__(item, "data", data)
        with self._cond:
            self.pending.append(item)
            self._cond.notify_all()

    @classmethod
    def _hold(cls, n: int) -> bool:
        """Count n more bytes held in memory, if the process-wide budget allows."""
        with ReplicaShipper._held_lock:
            if ReplicaShipper._held_total + n > cls.MEMORY_BUDGET:
                return False
            ReplicaShipper._held_total += n
            return True

    @classmethod
    def _release(cls, n: int) -> None:
        with ReplicaShipper._held_lock:
            ReplicaShipper._held_total -= n

    def _pending_for(self, key: keys.ArtefactKey) -> Pending | None:
        try:
            with self.shadow.open(key.key) as f:
                header = read_header(f)
            size = self.shadow.size_of(key.key)
        except FileNotFoundError:
            return None
        except ArtefactError as e:
            self.log.error("shadow artefact is damaged; not shipping it", key=key.key, error=str(e))
            return None
        return Pending(key, header.txns[0].commit_time, size)

    def load(self, artefacts: list[keys.ArtefactKey], current_generation: str | None = None) -> None:
        """Queue the shadow artefacts this replica does not hold yet (at start-up); the
        current generation is listed too, to learn which of its snapshots the replica has."""
        generations = sorted({a.generation for a in artefacts} | ({current_generation} if current_generation else set()))
        local = {a.key for a in artefacts}
        reached: dict[str, int] = {}  # per generation, the newest txid the replica holds
        try:
            for gen in generations:
                newest_segment = ""
                for info in self.driver.list(keys.generation_prefix(gen)):
                    # what the shadow log holds, and snapshots: a replica's segments are
                    # not kept here (there may be millions; see forget)
                    snapshot = info.key.endswith(".snapshot")
                    if info.key in local or snapshot:
                        self.uploaded.add(info.key)
                    if snapshot:
                        k = keys.parse_key(info.key)
                        if k is not None:
                            reached[gen] = max(reached.get(gen, -1), k.last_txid)
                    elif info.key.endswith(".segment") and info.key > newest_segment:
                        newest_segment = info.key  # (segment keys sort by first txid)
                k = keys.parse_key(newest_segment)
                if k is not None:
                    reached[gen] = max(reached.get(gen, -1), k.last_txid)
            self._known_listing = True
        except StorageError as e:
            self.last_error = str(e)
            self.log.warning("cannot list replica; will upload everything pending", error=str(e))
        for a in artefacts:
            # uploads go in order: a segment below what the replica holds was uploaded
            # before (and pruned since, by retention); the shadow log may still list it
            # (its log file also holds the newest capture state)
            if a.key not in self.uploaded and a.kind == keys.SEGMENT and a.last_txid <= reached.get(a.generation, -1):
                self.uploaded.add(a.key)
            if a.key in self.uploaded:
                self._advance(a)
            else:
                self.offer(a)
                self._catchup_armed = True

    def newest_snapshot_time(self, generation: str) -> float | None:
        """Creation time of the newest snapshot of generation this replica holds."""
        times = [k.time_ms for k in (keys.parse_key(u) for u in list(self.uploaded)) if k is not None and k.kind == keys.SNAPSHOT and k.generation == generation]
        return max(times) / 1000.0 if times else None

    @property
    def listed(self) -> bool:
        """True when the start-up listing of the replica succeeded (uploaded is complete)."""
        return self._known_listing

    def has(self, key: keys.ArtefactKey) -> bool:
        return key.key in self.uploaded

    def forget(self, key: keys.ArtefactKey) -> None:
        """The shadow log dropped key: a segment's upload need not be remembered any more
        (a snapshot's is, for newest_snapshot_time). Keeps memory flat at any commit rate."""
        if key.kind == keys.SEGMENT:
            self.uploaded.discard(key.key)

    def data_loss_window(self, now: float | None = None) -> float:
        """Seconds of commits that would be lost if the node died now (0 when caught up)."""
        with self._cond:
            if not self.pending:
                return 0.0
            oldest = self.pending[0]
        if now is not None:  # a caller's own clock (tests)
            return max(0.0, now - oldest.first_commit_time)
        return max(0.0, time.monotonic() - oldest.first_commit_mono)

    def pending_bytes(self) -> int:
        with self._cond:
            return sum(p.size for p in self.pending)

    # -- thread ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"ship-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Ship what is pending (up to timeout seconds), then stop; True when caught up."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.pending and time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
                self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            caught_up = not self.pending
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
        released = 0
        if self._thread is not None and self._thread.is_alive():
            return caught_up  # still uploading (the join timed out): leave its items alone
        with self._cond:  # what is left is shipped from the shadow log by the next agent
            for p in self.pending:
                if p.data is not None:
                    released += len(p.data)
                    object.__setattr__(p, "data", None)
        if released:
            self._release(released)
        return caught_up

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.pending and time.monotonic() < deadline:
                self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            return not self.pending

    def _run(self) -> None:
        delay = 0.0
        while True:
            with self._cond:
                while not self.pending and not self._stop and time.monotonic() < self._next_retention:
                    # offer() and stop() notify: an idle shipper sleeps until its retention check
                    self._cond.wait(max(0.01, self._next_retention - time.monotonic()))
                if self._stop:
                    return
                item = self.pending[0] if self.pending else None
            if item is None:
                self._retention()
                continue
            if self.upload(item):
                delay = 0.0
                if self.sync_interval:
                    with self._cond:  # space this replica's uploads out (batching on a costly replica)
                        if not self._stop:
                            self._cond.wait(self.sync_interval)
            else:
                delay = min(10.0, max(0.2, delay * 2))
                # back off for the whole delay: offer() notifies at every new artefact,
                # which must not turn the backoff into a retry storm
                until = time.monotonic() + delay * (0.5 + random.random() / 2)
                with self._cond:
                    while not self._stop and (left := until - time.monotonic()) > 0:
                        self._cond.wait(left)

    def upload(self, item: Pending) -> bool:
        """Upload one artefact; True on success (it is then removed from the queue)."""
        started = time.monotonic()
        bar = self._catchup
        base = bar.done if bar is not None else 0
        def moving(sent: int) -> None:
            failpoints.hit("upload")  # mid-transfer (crash-torture tests)
            if bar is not None:
                bar.update(base + sent)

        try:
            if item.data is not None:
                self.driver.put(item.key.key, item.data, size=item.size, progress=moving)
            else:
                with self.shadow.open(item.key.key) as f:
                    self.driver.put(item.key.key, f, size=item.size, progress=moving)
        except FileNotFoundError:
            self.log.error("shadow artefact vanished before upload", key=item.key.key)
            self._catchup_step(item, base)
            self._pop(item)
            return True
        except (StorageError, OSError) as e:
            if bar is not None:
                bar.update(base)  # what a failed attempt sent does not count
            self._catchup_armed = True
            self.errors += 1
            metrics.UPLOAD_FAILURES.labels(db=self.db, replica=self.name).inc()
            msg = str(e)
            if msg != self.last_error:
                self.log.warning("upload failed; will retry", key=item.key.key, error=msg)
            self.last_error = msg
            return False
        failpoints.hit("upload-recorded")  # on the replica, not yet recorded here
        now = self.clock()
        if self._upload_seconds is None:
            self._upload_seconds = metrics.UPLOAD_SECONDS.labels(db=self.db, replica=self.name)
        self._upload_seconds.observe(time.monotonic() - started)
        if self.last_error is not None:
            self.log.info("replica recovered", key=item.key.key)
        self.last_error = None
        self.last_success = now
        self.uploaded.add(item.key.key)
        self._advance(item.key)
        self._catchup_step(item, base)
        self._pop(item)
        self.log.debug("shipped", key=item.key.key, bytes=item.size, seconds=round(time.monotonic() - started, 4))
        if self.on_shipped is not None:
            self.on_shipped(self, item, now - item.first_commit_time)
        return True

    def _catchup_step(self, item: Pending, base: int) -> None:
        """item (still first in the queue) is done: count it in the catch-up under way, or
        begin one when a large backlog is left after a failure or a restart."""
        if self._catchup is not None:
            self._catchup.update(base + item.size)
            if item.key.key == self._catchup_end:
                self._catchup.close()
                self._catchup = self._catchup_end = None
            return
        if not self._catchup_armed:
            return
        self._catchup_armed = False
        with self._cond:
            backlog = list(self.pending)
        if len(backlog) < 2 or backlog[0] is not item:
            return
        size = sum(p.size for p in backlog)
        if size < self.CATCHUP_MIN_BYTES and len(backlog) < self.CATCHUP_MIN_ARTEFACTS:
            return
        bar = console_progress(f"catch-up of {self.db} to {self.name}", size, min_bytes=self.CATCHUP_MIN_BYTES)
        if bar.enabled:  # a terminal with text logs (progress.enable_console)
            self._catchup, self._catchup_end = bar, backlog[-1].key.key
            bar.update(item.size)

    def _pop(self, item: Pending) -> None:
        with self._cond:
            popped = bool(self.pending) and self.pending[0] is item
            if popped:
                self.pending.popleft()
            self._cond.notify_all()
        if popped and item.data is not None:
            self._release(len(item.data))

    def _advance(self, key: keys.ArtefactKey) -> None:
        if self.position is None or (key.generation, key.last_txid) > self.position:
            self.position = (key.generation, key.last_txid)

    # -- retention ------------------------------------------------------------------------
    def _retention(self) -> None:
        self._next_retention = time.monotonic() + self.retention_check_interval
        try:
            self.enforce_retention()
        except StorageError as e:
            self.log.warning("retention failed; will retry", error=str(e))

    def enforce_retention(self, now: float | None = None) -> int:
        """Delete what retention allows from the replica; returns how many were deleted."""
        listing = [k for k in (keys.parse_key(i.key) for i in self.driver.list(keys.GENERATIONS + "/")) if k is not None]
        decision = plan_retention(listing, now=self.clock() if now is None else now, retention=self.retention)
        for key in decision.delete:
            failpoints.hit("prune")
            self.driver.delete(key.key)
            self.uploaded.discard(key.key)
            metrics.RETENTION_DELETIONS.labels(db=self.db, replica=self.name).inc()
            self.log.info("pruned", key=key.key, reason=decision.reasons.get(key.key, ""))
        return len(decision.delete)
