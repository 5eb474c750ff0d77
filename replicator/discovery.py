"""`dir:` entries: finding the SQLite databases of a directory, and keeping up with it.

`discover(entry)` is a function over the filesystem: the files under entry.dir whose name
matches entry.pattern (in subdirectories too when entry.recursive), that are not a
database's -wal/-shm/-journal file, not inside a shadow directory (`.NAME-replicator`),
not a temp file, and whose first 16 bytes say "SQLite format 3". Each becomes a DbConfig
with the entry's settings, its own default shadow directory, and replica URLs extended by
its path relative to entry.dir (`join_url`): /data/tenants/a.db under dir /data with a
replica s3://bucket/app goes to s3://bucket/app/tenants/a.db.

`DirectoryWatcher` keeps a running agent in step with the entries that have `watch: true`:
it follows file-change events of the directory tree (replicator.wal_events; no polling)
and adds databases that appear, or become SQLite, and drops those deleted. A slow safety
rescan (every 30 s) catches anything the events missed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import quote

from replicas.registry import redact_url
from replicator import keys, logs
from replicator.config import DbConfig, DirConfig, default_shadow_dir
from replicator.wal_events import CREATED, DELETED, MODIFIED, MOVED_FROM, MOVED_TO, OVERFLOW

SQLITE_HEADER = b"SQLite format 3\x00"
_SIDE_FILES = ("-wal", "-shm", "-journal")
# temp files: restore's `.NAME.tmp-PID-HEX` (fsutil.temp_path), the file driver's `.NAME.tmp-HEX16`
_TEMP_RE = re.compile(r"^\..*\.tmp-(\d+-)?[0-9a-f]+$", re.DOTALL)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


# -- names and paths ----------------------------------------------------------------------------
def is_shadow_dir_name(name: str) -> bool:
    """True for the name of a default shadow directory (`.NAME-replicator`)."""
    return name.startswith(".") and name.endswith("-replicator") and len(name) > len(".-replicator")


def candidate_name(entry: DirConfig, name: str) -> bool:
    """Whether a file called name could be one of the entry's databases (before its header
    is read). Like a shell glob, a pattern matches a leading '.' only when it starts with one."""
    if name.endswith(_SIDE_FILES) or _TEMP_RE.match(name):
        return False
    if name.startswith(".") and not entry.pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, entry.pattern)


def is_sqlite(path: str | os.PathLike) -> bool:
    """True when the file starts with the SQLite header (False for empty or unreadable files)."""
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_HEADER
    except OSError:
        return False


def check_relpath(rel: str) -> str:
    """rel if it is a safe relative path ('a.db', 'tenants/a.db'), else ValueError saying why.
    Safe: '/'-separated, not absolute, no empty, '.' or '..' component, no backslash or
    control character."""
    if not isinstance(rel, str) or not rel:
        raise ValueError("empty path")
    if rel.startswith("/"):
        raise ValueError("absolute path")
    if "\\" in rel:
        raise ValueError("contains a backslash")
    if _CONTROL_RE.search(rel):
        raise ValueError("contains a control character")
    parts = rel.split("/")
    if "" in parts:
        raise ValueError("empty path component")
    if "." in parts or ".." in parts:
        raise ValueError("'.' or '..' component")
    return rel


def relative_path(entry: DirConfig, path: str | os.PathLike) -> str | None:
    """The path of a database of the entry relative to entry.dir ('tenants/a.db'), or None
    when path cannot be one of its databases (outside dir, too deep, name not matching)."""
    path = Path(os.path.abspath(path))
    for root, p in ((entry.dir, path), (entry.dir.resolve(), path.resolve())):
        if p == root or not p.is_relative_to(root):
            continue
        parts = p.relative_to(root).parts
        if len(parts) > 1 and not entry.recursive:
            continue
        if any(is_shadow_dir_name(part) for part in parts[:-1]) or not candidate_name(entry, parts[-1]):
            continue
        return "/".join(parts)
    return None


def in_entry(entry: DirConfig, path: str | os.PathLike) -> bool:
    return relative_path(entry, path) is not None


def join_url(url: str, rel: str) -> str:
    """url extended by the relative path rel, percent-encoded, for every replica scheme:
    file:///b/app + tenants/a.db -> file:///b/app/tenants/a.db; s3://bucket/app?x=1 ->
    s3://bucket/app/tenants/a.db?x=1; sftp://u@h:22/srv/app, nats://h:4222/bucket/app and
    mem://name alike. A URL without '://' is a plain path and is joined as one."""
    rel = check_relpath(rel)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return os.path.join(url, *rel.split("/"))
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    main, tail = rest[:cut], rest[cut:]
    # the last '@' ends the user-info, as in the drivers: passwords may hold a raw '/'
    userinfo, at, location = main.rpartition("@")
    host, _, path = location.partition("/")
    path = path.rstrip("/")
    encoded = quote(rel, safe="/")
    return f"{scheme}://{userinfo}{at}{host}/{path + '/' if path else ''}{encoded}{tail}"


def db_config(entry: DirConfig, path: str | os.PathLike) -> DbConfig:
    """The DbConfig of the entry's database at path (ValueError when it cannot be one)."""
    rel = relative_path(entry, path)
    if rel is None:
        raise ValueError(f"{path} is not a database of dir {entry.dir} (pattern {entry.pattern!r})")
    db_path = entry.dir.joinpath(*rel.split("/"))
    replicas = tuple(dataclasses.replace(r, url=join_url(r.url, rel)) for r in entry.template.replicas)
    return dataclasses.replace(entry.template, path=db_path, shadow_dir=default_shadow_dir(db_path), replicas=replicas)


# -- discovery ----------------------------------------------------------------------------------
def find_databases(entry: DirConfig, known: frozenset[str] = frozenset()) -> list[Path]:
    """The SQLite databases of the entry, sorted (see the module doc for what counts).

    Files in `known` (databases the agent replicates) count without a look at their
    header: opening and closing one would drop the POSIX locks its SQLite connections hold
    (a close drops all of the process's locks on the file). A file that took the place of
    one is caught by its inode (DirectoryWatcher._check)."""
    log = logs.get()
    found: list[Path] = []
    pending = [str(entry.dir)]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                items = list(it)
        except OSError as e:
            log.debug("cannot list directory; skipped", dir=directory, error=e.strerror or str(e))
            continue
        for item in items:
            try:
                if item.is_dir(follow_symlinks=False):
                    if entry.recursive and not is_shadow_dir_name(item.name):
                        pending.append(item.path)
                    continue
                if not candidate_name(entry, item.name):
                    continue
                if not item.is_file(follow_symlinks=False):
                    log.debug("not a regular file; skipped", path=item.path)
                    continue
            except OSError:
                continue
            if item.path in known or is_sqlite(item.path):
                found.append(Path(item.path))
            else:
                log.debug("not an SQLite database (yet); skipped", path=item.path)
    return sorted(found)


def discover(entry: DirConfig) -> list[DbConfig]:
    """A DbConfig for every SQLite database of the entry, sorted by path."""
    return [db_config(entry, p) for p in find_databases(entry)]


def databases_in_listing(object_keys: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """From the keys listed under a dir entry's replica base URL (`<rel>/generations/<gen>/
    snapshots/...`), the relative paths of the databases it holds, sorted, and the relative
    paths refused as unsafe (rel -> reason). Keys that are not artefacts are ignored."""
    found: set[str] = set()
    refused: dict[str, str] = {}
    for key in object_keys:
        parts = key.split("/")
        if len(parts) < 5 or keys.parse_key("/".join(parts[-4:])) is None:
            continue
        rel = "/".join(parts[:-4])
        try:
            found.add(check_relpath(rel))
        except ValueError as e:
            refused[rel] = str(e)
    return sorted(found), refused


# -- bootstrap ----------------------------------------------------------------------------------
def restore_if_empty(entry: DirConfig, log) -> int:
    """restore-if-db-not-exists for a dir: entry: when the directory holds no database at
    all (a node that starts from nothing), restore every database its replicas hold; returns
    how many were restored. A directory with some databases is left alone: a database
    missing there may have been deleted on purpose, and must not come back. BootstrapError
    when a replica cannot be listed or a restore fails."""
    from replicas import StorageError
    from replicator.bootstrap import BootstrapError, restore_if_missing
    from replicator.controller import open_replica

    if find_databases(entry):
        return 0
    rels: set[str] = set()
    for rc in entry.replicas:
        driver = open_replica(rc, str(entry.dir))
        try:
            found, refused = databases_in_listing(info.key for info in driver.list(""))
        except StorageError as e:
            raise BootstrapError(
                f"{entry.dir} holds no database and replica {rc.name} cannot be listed: {e} "
                "(not starting with an empty directory while a replica may hold backups)"
            ) from None
        finally:
            driver.close()
        for rel, reason in sorted(refused.items()):
            log.warning("unsafe database path on the replica; not restored", rel=rel, reason=reason, replica=rc.name)
        rels.update(found)
    restored = 0
    root = entry.dir.resolve()
    for rel in sorted(rels):
        path = entry.dir.joinpath(*rel.split("/"))
        if not path.parent.resolve().is_relative_to(root) or relative_path(entry, path) is None:
            log.warning("database on the replica is not one of the entry's; not restored", rel=rel, dir=str(entry.dir))
            continue
        restored += restore_if_missing(db_config(entry, path), logs.get(db=str(path)))
    if not rels:
        log.info("no replica holds a backup; starting with an empty directory", dir=str(entry.dir))
    return restored


# -- the watcher --------------------------------------------------------------------------------
class DirectoryWatcher:
    """Adds and drops a running agent's databases as the watched dir: entries change.

    add(DbConfig) -> bool adds a database to the agent (False when it is not added: already
    replicated, or being removed); remove(path) stops one. Both are called from the
    watcher's thread, removals from a thread of their own (a removal ships what is
    committed first, which may take up to shutdown-timeout).
    """

    RESCAN_INTERVAL = 30.0
    DEBOUNCE = 0.05

    def __init__(
        self,
        entries: Iterable[DirConfig],
        events,
        *,
        add: Callable[[DbConfig], bool],
        remove: Callable[[str], object],
        rescan_interval: float | None = None,
    ):
        self.entries = list(entries)
        self.events = events
        self._add = add
        self._remove = remove
        self.rescan_interval = rescan_interval or self.RESCAN_INTERVAL
        self.log = logs.get()
        self._lock = threading.Lock()
        self._owned: dict[str, int] = {}  # database path -> index of the entry it came from
        self._inodes: dict[str, int] = {}  # database path -> inode of the file being replicated
        self._removing: set[str] = set()
        self._trees: dict[int, int | None] = {}  # entry index -> ChangeEvents tree handle
        self._checks: set[tuple[int, str]] = set()
        self._rescans: set[int] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._removers: list[threading.Thread] = []
        self._unwatchable: set[int] = set()  # entries whose directory cannot be watched (yet)

    # -- life cycle -----------------------------------------------------------------------
    def scan(self) -> None:
        """Watch the trees of the watched entries, then add every database of every entry
        (once, at start; entries without watch are never looked at again)."""
        for i, entry in enumerate(self.entries):
            if entry.watch:
                self._watch_tree(i)
        for i in range(len(self.entries)):
            self._rescan(i)

    def start(self) -> None:
        if not any(e.watch for e in self.entries):
            return
        self._thread = threading.Thread(target=self._run, name="discovery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching; wait (up to timeout) for removals under way."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for i, handle in list(self._trees.items()):
            if handle is not None:
                self.events.unwatch_tree(handle)
            self._trees[i] = None
        deadline = time.monotonic() + timeout
        for t in list(self._removers):
            t.join(max(0.0, deadline - time.monotonic()))

    def owned(self) -> dict[str, int]:
        with self._lock:
            return dict(self._owned)

    # -- events (on the inotify thread: cheap, no I/O) ------------------------------------
    def _on_event(self, i: int, path: str, kind: str, is_dir: bool) -> None:
        name = os.path.basename(path)
        if kind == OVERFLOW or is_dir:
            if kind == MODIFIED or is_shadow_dir_name(name):
                return
            if kind == DELETED and path == str(self.entries[i].dir):
                with self._lock:  # the root went away: the rescans watch it again once it is back
                    handle, self._trees[i] = self._trees.get(i), None
                if handle is not None:
                    self.events.unwatch_tree(handle)
            self._request(rescan=i)
            return
        if not candidate_name(self.entries[i], name):
            return  # e.g. a write to some database's -wal: the common case, dropped at once
        owned = path in self._owned
        if kind in (DELETED, MOVED_FROM):
            if owned:
                self._request(check=(i, path))
        elif not owned or kind in (CREATED, MOVED_TO):  # new, or replaced (e.g. restored over it)
            self._request(check=(i, path))

    def _request(self, *, rescan: int | None = None, check: tuple[int, str] | None = None) -> None:
        with self._lock:
            if rescan is not None:
                self._rescans.add(rescan)
            if check is not None:
                self._checks.add(check)
        self._wake.set()

    # -- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        next_rescan = time.monotonic() + self.rescan_interval
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_rescan - time.monotonic()))
            if self._stop.is_set():
                return
            if self._wake.is_set():
                self._stop.wait(self.DEBOUNCE)  # gather a burst of events
                self._wake.clear()
            with self._lock:
                rescans, self._rescans = self._rescans, set()
                checks, self._checks = self._checks, set()
            if time.monotonic() >= next_rescan:
                rescans |= {i for i, e in enumerate(self.entries) if e.watch}
                next_rescan = time.monotonic() + self.rescan_interval
            try:
                for i in sorted(rescans):
                    if self._trees.get(i) is None:
                        self._watch_tree(i)
                    self._rescan(i)
                for i, path in sorted(checks):
                    if i not in rescans:
                        self._check(i, path)
            except Exception as e:  # keep watching; the next rescan tries again
                self.log.error("database discovery failed; will retry", error=f"{type(e).__name__}: {e}")

    def _watch_tree(self, i: int) -> None:
        entry = self.entries[i]
        try:
            handle = self.events.watch_tree(
                str(entry.dir),
                lambda path, kind, is_dir: self._on_event(i, path, kind, is_dir),
                recursive=entry.recursive,
                skip_dir=is_shadow_dir_name,
            )
        except OSError as e:
            handle = None
            if i not in self._unwatchable:  # say it once, not at every rescan
                self.log.warning(
                    "cannot watch directory; looking again at every rescan",
                    dir=str(entry.dir),
                    error=e.strerror or str(e),
                    rescan_interval=self.rescan_interval,
                )
            self._unwatchable.add(i)
        else:
            if i in self._unwatchable:
                self.log.info("watching directory", dir=str(entry.dir))
            self._unwatchable.discard(i)
        with self._lock:
            self._trees[i] = handle

    def _rescan(self, i: int) -> None:
        """Bring the agent in step with the entry: add what is there, drop what is gone."""
        with self._lock:
            mine = {Path(p) for p, owner in self._owned.items() if owner == i}
        found = set(find_databases(self.entries[i], frozenset(str(p) for p in mine)))
        for path in sorted(found - mine):
            self._discovered(i, path)
        for path in sorted(mine):
            self._check(i, str(path))

    def _check(self, i: int, path: str) -> None:
        """One file changed: add it if it is (now) an SQLite database; drop it if it is gone;
        restart it if another file took its place (the new one then starts a generation)."""
        with self._lock:
            owned = path in self._owned
            inode = self._inodes.get(path)
        if not owned:
            if os.path.isfile(path) and not os.path.islink(path) and is_sqlite(path):
                self._discovered(i, Path(path))
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._gone(path)
            return
        except OSError:
            return
        if st.st_ino != inode:
            self.log.info("database file replaced; restarting its replication", path=path)
            self._gone(path)  # then checked again, and added back

    def _discovered(self, i: int, path: Path) -> None:
        with self._lock:
            if str(path) in self._owned or str(path) in self._removing:
                return
        cfg = db_config(self.entries[i], path)
        try:
            inode = os.lstat(path).st_ino
        except OSError:
            return  # gone already
        if self._add(cfg):
            with self._lock:
                self._owned[str(path)] = i
                self._inodes[str(path)] = inode
            self.log.info("database discovered", path=str(path), dir=str(self.entries[i].dir), replicas=[redact_url(r.url) for r in cfg.replicas])

    def _gone(self, path: str) -> None:
        with self._lock:
            if path in self._removing or path not in self._owned:
                return
            self._removing.add(path)
            i = self._owned.pop(path)
            self._inodes.pop(path, None)

        def remove() -> None:
            try:
                self._remove(path)
            except Exception as e:
                self.log.error("removing a database failed", path=path, error=f"{type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._removing.discard(path)
                if not self._stop.is_set():
                    self._request(check=(i, path))  # it may be back already

        t = threading.Thread(target=remove, name=f"remove-{os.path.basename(path)}", daemon=True)
        self._removers = [r for r in self._removers if r.is_alive()] + [t]
        t.start()
