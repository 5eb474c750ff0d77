"""Process memory of the long-lived agent, under glibc's malloc (a no-op elsewhere).

- Fewer malloc arenas. glibc gives each thread that allocates while another holds an
  arena a new one, up to 8 per core, and each keeps the pages it touched. The agent runs
  two threads per database; the GIL serialises most of their allocations anyway, so two
  arenas cost no speed. With 200 idle databases this saved about 17 MiB of resident
  memory (109.8 -> 92 MiB; docs/benchmarks.md, scenario 7).
- Freed memory handed back when databases go idle. glibc returns free memory to the
  system only from the top of the heap; malloc_trim(0) releases the free pages inside it
  too (about 2 MiB after start-up alone). It walks the arenas, so it runs at most once
  per TRIM_INTERVAL, when a database parks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

M_ARENA_MAX = -8  # glibc's mallopt parameter number
ARENAS = 2
TRIM_INTERVAL = 10.0

_lock = threading.Lock()
_last_trim = float("-inf")
_libc: ctypes.CDLL | None | bool = None  # False: not glibc
_timer: threading.Timer | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        _libc = False
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") and hasattr(lib, "gnu_get_libc_version"):
                _libc = lib
        except OSError:
            pass
    return _libc or None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas (call before the agent starts its threads). True if set."""
    lib = _glibc()
    return bool(lib is not None and lib.mallopt(M_ARENA_MAX, arenas) == 1)


def trim() -> bool:
    """Hand free heap memory back to the system, at most once per TRIM_INTERVAL; a call
    inside the interval schedules one trim at its end (many databases park together, and
    the last of them frees memory too). True if it ran now."""
    global _last_trim, _timer
    lib = _glibc()
    if lib is None:
        return False
    now = time.monotonic()
    with _lock:
        wait = _last_trim + TRIM_INTERVAL - now
        if wait > 0:
            if _timer is None:
                _timer = threading.Timer(wait, _trailing)
                _timer.daemon = True
                _timer.start()
            return False
        _last_trim = now
    lib.malloc_trim(0)
    return True


def _trailing() -> None:
    global _timer
    with _lock:
        _timer = None
    trim()
