"""Change events that wake capture: a write to a database's -wal (or the database file);
and, for `dir:` entries, files and directories created, deleted, moved or modified in a
directory tree (replicator.discovery).

On Linux this registers callbacks directly on watchdog's inotify reader (InotifyFD), which
runs them on its own thread; that skips watchdog's emitter and dispatcher queues, which
cost about six times more CPU per event (10.8 % vs 1.8 % of a core for a writer at 1,000
tx/s, measured here). One inotify instance serves every database and every tree: a
directory has one watch, shared by the callbacks that need it. Elsewhere it falls back to
watchdog's portable Observer. Events only wake capture early; capture also polls every
monitor-interval as a safety net.

Databases and trees can be added and removed at any time (`add`, `remove`, `watch_tree`,
`unwatch_tree`).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable

# kinds of tree events
CREATED, DELETED, MODIFIED, MOVED_FROM, MOVED_TO, OVERFLOW = "created", "deleted", "modified", "moved_from", "moved_to", "overflow"

TreeCallback = Callable[[str, str, bool], None]  # (path, kind, is_dir)


def _key(path: str) -> str:
    return path[:-4] if path.endswith("-wal") else path


def _name(event) -> str:
    return event.name.decode(errors="surrogateescape") if isinstance(event.name, bytes) else (event.name or "")


class _Tree:
    """One watched directory tree: its root, the callback, and a watch per directory."""

    def __init__(self, ident: int, root: str, recursive: bool, on_event: TreeCallback, skip_dir: Callable[[str], bool]):
        self.ident = ident
        self.root = root
        self.recursive = recursive
        self.on_event = on_event
        self.skip_dir = skip_dir
        self.handles: dict[str, object] = {}  # directory -> watch handle


class ChangeEvents:
    """Calls wake(db_path) when a watched database or its -wal changes, and a tree's
    on_event(path, kind, is_dir) for changes in a watched directory tree."""

    def __init__(self, wake: Callable[[str], None]):
        self._wake = wake
        self._targets: frozenset[str] = frozenset()  # replaced, never mutated: read without the lock
        self._sync_intervals: dict[str, float] = {}  # target -> its database's sync-interval
        self._impl = None
        self._inotify = False
        self._lock = threading.RLock()
        self._db_dirs: dict[str, list] = {}  # directory -> [number of targets in it, watch handle]
        self._trees: dict[int, _Tree] = {}
        self._next_tree = 0

    # -- databases ------------------------------------------------------------------------
    def watch(self, db_paths: list[str]) -> None:
        """Start, and wake for every path of db_paths."""
        self.start()
        for p in db_paths:
            self.add(p)

    def add(self, db_path: str, sync_interval: float = 0.0) -> None:
        """Wake for db_path from now on. OSError when its directory cannot be watched (the
        caller then relies on capture's slow poll). sync_interval is the database's: under
        load its capture steps at most that often, so reads need not be more frequent
        (see busy_gap)."""
        self.start()
        with self._lock:
            if db_path in self._targets:
                return
            directory = os.path.dirname(db_path)
            entry = self._db_dirs.get(directory)
            if entry is None:
                handle = self._add_watch(directory, _DbDirCallback(self, directory), "db")
                entry = self._db_dirs[directory] = [0, handle]
            entry[0] += 1
            self._targets = self._targets | {db_path}
            self._sync_intervals[db_path] = sync_interval
            self._set_busy_gap()

    def remove(self, db_path: str) -> None:
        """Stop waking for db_path (its directory's watch goes with its last database)."""
        with self._lock:
            if db_path not in self._targets:
                return
            self._targets = self._targets - {db_path}
            self._sync_intervals.pop(db_path, None)
            self._set_busy_gap()
            directory = os.path.dirname(db_path)
            entry = self._db_dirs.get(directory)
            if entry is not None:
                entry[0] -= 1
                if entry[0] <= 0:
                    del self._db_dirs[directory]
                    self._remove_watch(entry[1])

    @property
    def targets(self) -> frozenset[str]:
        return self._targets

    def _set_busy_gap(self) -> None:
        if self._inotify:
            self._impl.busy_gap = busy_gap(self._sync_intervals.values())

    def _on_path(self, path: str) -> None:
        key = _key(path)
        if key in self._targets:
            self._wake(key)

    def _wake_all(self) -> None:
        for target in self._targets:  # events were lost: wake everyone
            self._wake(target)

    def _db_dir_lost(self, directory: str, handle: object) -> None:
        """The directory's watch is gone (the directory was deleted): forget it, so that a
        database added there later watches it again."""
        with self._lock:
            entry = self._db_dirs.get(directory)
            if entry is not None and entry[1] == handle:
                del self._db_dirs[directory]

    # -- trees ----------------------------------------------------------------------------
    def watch_tree(
        self, root: str, on_event: TreeCallback, *, recursive: bool = False, skip_dir: Callable[[str], bool] = lambda name: False
    ) -> int:
        """Report changes of the entries of root (and, when recursive, of its subdirectories,
        except those whose name skip_dir accepts) as on_event(path, kind, is_dir), kind one
        of created, deleted, modified, moved_from, moved_to, or overflow (events were lost;
        path is the root). Returns a handle for unwatch_tree. OSError when root cannot be
        watched."""
        self.start()
        with self._lock:
            ident = self._next_tree
            self._next_tree += 1
            tree = _Tree(ident, root, recursive, on_event, skip_dir)
            if self._inotify:
                tree.handles[root] = self._add_watch(root, _TreeDirCallback(self, tree, root), f"tree{ident}")
                if recursive:
                    self._watch_below(tree, root)
            else:
                # always recursive here, filtered by depth: an Observer watch is keyed by
                # (path, recursive), and a database directory's watch must stay apart
                tree.handles[root] = self._impl.schedule(_TreeHandler(tree), root, recursive=True)
            self._trees[ident] = tree
            return ident

    def unwatch_tree(self, ident: int) -> None:
        with self._lock:
            tree = self._trees.pop(ident, None)
            if tree is None:
                return
            for handle in tree.handles.values():
                self._remove_watch(handle)
            tree.handles.clear()

    def _watch_below(self, tree: _Tree, directory: str) -> None:
        """inotify: add a watch for every subdirectory of directory (not following symlinks)."""
        for parent, dirnames, _ in os.walk(directory):
            keep = []
            for name in dirnames:
                path = os.path.join(parent, name)
                if tree.skip_dir(name) or os.path.islink(path):
                    continue
                if path in tree.handles:
                    keep.append(name)
                    continue
                try:
                    tree.handles[path] = self._add_watch(path, _TreeDirCallback(self, tree, path), f"tree{tree.ident}")
                except OSError:
                    continue  # gone meanwhile, or unreadable: a rescan still finds what is there
                keep.append(name)
            dirnames[:] = keep

    def _tree_event(self, tree: _Tree, path: str, kind: str, is_dir: bool) -> None:
        if is_dir and tree.recursive and self._inotify:
            with self._lock:
                if tree.ident in self._trees:
                    if kind in (DELETED, MOVED_FROM):
                        gone = [d for d in tree.handles if d == path or d.startswith(path + os.sep)]
                        for d in gone:
                            self._remove_watch(tree.handles.pop(d))
                    elif (
                        kind in (CREATED, MOVED_TO)
                        and path not in tree.handles
                        and not tree.skip_dir(os.path.basename(path))
                        and not os.path.islink(path)
                    ):
                        try:
                            tree.handles[path] = self._add_watch(path, _TreeDirCallback(self, tree, path), f"tree{tree.ident}")
                        except OSError:
                            pass
                        else:
                            self._watch_below(tree, path)  # what was created before the watch
        tree.on_event(path, kind, is_dir)

    def _tree_dir_lost(self, tree: _Tree, directory: str) -> None:
        with self._lock:
            tree.handles.pop(directory, None)
        if directory == tree.root:
            tree.on_event(directory, DELETED, True)

    # -- back ends ------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._impl is not None:
                return
            if sys.platform.startswith("linux"):
                try:
                    fd = _coalescing_inotify()()
                    fd.daemon = True
                    fd.start()
                    self._impl, self._inotify = fd, True
                    return
                except (ImportError, OSError):
                    pass
            from watchdog.observers import Observer

            observer = Observer()
            observer.daemon = True
            observer.start()
            self._impl, self._inotify = observer, False

    def _add_watch(self, directory: str, callback, ident: str) -> object:
        if self._inotify:
            C = _constants()
            mask = C.IN_MODIFY | C.IN_CREATE | C.IN_DELETE | C.IN_MOVED_TO | C.IN_MOVED_FROM
            wd = self._impl.add_callback(os.fsencode(directory), mask, callback, ident)
            callback.handle = (wd, ident)
            return callback.handle
        if not os.path.isdir(directory):
            raise FileNotFoundError(2, "No such directory", directory)
        return self._impl.schedule(_DbDirHandler(self), directory, recursive=False)

    def _remove_watch(self, handle: object) -> None:
        try:
            if self._inotify:
                self._impl.remove_callbacks([handle])
            else:
                self._impl.unschedule(handle)
        except (OSError, KeyError):
            pass  # the directory (and its watch) is already gone

    def close(self) -> None:
        with self._lock:
            impl, self._impl = self._impl, None
            self._trees.clear()
            self._db_dirs.clear()
        if impl is None:
            return
        try:
            impl.stop()
            impl.join(2)
        except Exception:  # closing during shutdown: nothing to recover
            pass


# -- inotify callbacks (run on the InotifyFD thread) ----------------------------------------
_C = None

READ_GAP = 0.002  # seconds between two reads of the inotify fd when events start coming
READ_GAP_BUSY = 0.008  # ... and at most, while every read finds events already queued,
READ_GAP_BUSY_MAX = 0.05  # ... or up to this when every database's sync-interval is longer
BUSY_GAP_SHARE = 0.75  # of the shortest sync-interval (room for a late wake-up of the reader)


def busy_gap(sync_intervals) -> float:
    """The longest pause between reads while busy: BUSY_GAP_SHARE of the shortest
    sync-interval of the databases watched, within [READ_GAP_BUSY, READ_GAP_BUSY_MAX].

    A busy database's capture steps at most once per sync-interval, and any event read
    since its last step wakes it: as long as a read comes at least once per sync-interval,
    reading more often wakes nobody sooner. (The default 20 ms gives 15 ms: about 67 reads
    a second instead of 125 for a database under load.)"""
    shortest = min(sync_intervals, default=0.0)
    return min(READ_GAP_BUSY_MAX, max(READ_GAP_BUSY, BUSY_GAP_SHARE * shortest))


def _coalescing_inotify():
    """watchdog's InotifyFD, pausing between reads while busy.

    A writer at 1,000 tx/s makes several IN_MODIFY events per commit on its -wal; read one
    by one they cost the reader thread a parse and a wake-up each (about 4 % of a core).
    The kernel merges identical events queued back to back, so a pause between reads
    turns a burst into one event. The first event after a quiet spell is read at once;
    then the pause is READ_GAP, doubling up to busy_gap while each read finds events
    waiting (a busy database: its capture steps every sync-interval anyway, and is woken
    by any one read in that time), and back to READ_GAP once a read has to wait for them.
    """
    import time

    from watchdog.observers.inotify_c import InotifyFD

    class CoalescingInotifyFD(InotifyFD):
        _last_read = 0.0
        _gap = READ_GAP
        busy_gap = READ_GAP_BUSY  # set by ChangeEvents from the databases' sync-intervals

        def read_events(self, *args, **kwargs):
            pause = self._last_read + self._gap - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            before = time.monotonic()
            events = super().read_events(*args, **kwargs)
            self._last_read = now = time.monotonic()
            # waited for them (a quiet spell): short pauses again; else pause longer
            self._gap = READ_GAP if now - before > 0.001 else min(self.busy_gap, self._gap * 2)
            return events

    return CoalescingInotifyFD


def _constants():
    global _C
    if _C is None:
        from watchdog.observers.inotify_c import InotifyConstants

        _C = InotifyConstants
    return _C


class _DbDirCallback:
    def __init__(self, events: ChangeEvents, directory: str):
        self.events = events
        self.directory = directory
        self.handle: object = None

    def on_event(self, event) -> None:
        self.events._on_path(os.path.join(self.directory, _name(event)))

    def on_watch_deleted(self, wd) -> None:
        self.events._db_dir_lost(self.directory, self.handle)

    def on_queue_overflow(self) -> None:
        self.events._wake_all()


class _TreeDirCallback:
    def __init__(self, events: ChangeEvents, tree: _Tree, directory: str):
        self.events = events
        self.tree = tree
        self.directory = directory
        self.handle: object = None

    def on_event(self, event) -> None:
        C = _constants()
        mask = event.mask
        if mask & C.IN_CREATE:
            kind = CREATED
        elif mask & C.IN_DELETE:
            kind = DELETED
        elif mask & C.IN_MOVED_FROM:
            kind = MOVED_FROM
        elif mask & C.IN_MOVED_TO:
            kind = MOVED_TO
        elif mask & C.IN_MODIFY:
            kind = MODIFIED
        else:
            return
        self.events._tree_event(self.tree, os.path.join(self.directory, _name(event)), kind, bool(mask & C.IN_ISDIR))

    def on_watch_deleted(self, wd) -> None:
        self.events._tree_dir_lost(self.tree, self.directory)

    def on_queue_overflow(self) -> None:
        self.tree.on_event(self.tree.root, OVERFLOW, True)


# -- Observer handlers (other platforms) ---------------------------------------------------
def _handler_base():
    from watchdog.events import FileSystemEventHandler

    return FileSystemEventHandler


class _DbDirHandler:
    def __new__(cls, events: ChangeEvents):
        class Handler(_handler_base()):
            def on_any_event(self, event) -> None:
                for p in (event.src_path, getattr(event, "dest_path", "") or ""):
                    if p:
                        events._on_path(p if isinstance(p, str) else os.fsdecode(p))

        return Handler()


class _TreeHandler:
    def __new__(cls, tree: _Tree):
        kinds = {"created": CREATED, "deleted": DELETED, "modified": MODIFIED}

        def report(path, kind: str, is_dir: bool) -> None:
            path = path if isinstance(path, str) else os.fsdecode(path)
            rel = os.path.relpath(path, tree.root)
            parts = rel.split(os.sep)
            if rel.startswith("..") or rel == "." or (not tree.recursive and len(parts) > 1):
                return
            if any(tree.skip_dir(p) for p in parts[:-1]) or (is_dir and tree.skip_dir(parts[-1])):
                return
            tree.on_event(path, kind, is_dir)

        class Handler(_handler_base()):
            def on_any_event(self, event) -> None:
                if event.event_type == "moved":
                    report(event.src_path, MOVED_FROM, event.is_directory)
                    report(event.dest_path, MOVED_TO, event.is_directory)
                elif event.event_type in kinds:
                    report(event.src_path, kinds[event.event_type], event.is_directory)

        return Handler()
