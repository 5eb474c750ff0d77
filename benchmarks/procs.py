"""Child processes that are always cleaned up, and measurements from /proc.

Every child is started through `spawn()`, in its own process group, with
PR_SET_PDEATHSIG=SIGKILL (it dies if the harness dies, even on SIGKILL), and is
registered; `kill_all()` (run at exit, on SIGINT/SIGTERM and on errors) kills every
registered process group that is still alive. Children are only spawned from the main
thread (PDEATHSIG fires when the spawning thread exits).
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_live: dict[int, subprocess.Popen] = {}
_lock = threading.Lock()

try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    _prctl = _libc.prctl
except OSError:  # pragma: no cover - not glibc
    _prctl = None
PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(
    cmd: Sequence[str],
    *,
    log: Path | None = None,
    env: dict | None = None,
    group: int = 0,
    stdout=None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start cmd in process group `group` (0: a new group led by the child)."""
    out = open(log, "ab") if log is not None else (stdout if stdout is not None else subprocess.DEVNULL)
    try:
        p = subprocess.Popen(
            list(map(str, cmd)),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if (log is not None or stdout is not None) else subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            process_group=group,
            preexec_fn=_child_setup,
        )
    finally:
        if log is not None:
            out.close()
    p.cmdline = shlex.join(map(str, cmd))  # type: ignore[attr-defined]
    with _lock:
        _live[p.pid] = p
    return p


def _forget(p: subprocess.Popen) -> None:
    with _lock:
        _live.pop(p.pid, None)


def alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


def wait(p: subprocess.Popen, timeout: float | None = None) -> int | None:
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    _forget(p)
    return rc


def kill(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send sig to p's process group (p and anything it started)."""
    if p.poll() is not None:
        _forget(p)
        return
    try:
        os.killpg(os.getpgid(p.pid), sig)
    except (ProcessLookupError, PermissionError):
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass
    if sig == signal.SIGKILL:
        wait(p, 10)


def stop(p: subprocess.Popen, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
    """SIGTERM (or sig), wait up to `timeout`, then SIGKILL. Returns the exit code."""
    if p.poll() is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass
        if wait(p, timeout) is None:
            kill(p)
    rc = p.wait()
    _forget(p)
    return rc


def kill_all() -> None:
    with _lock:
        procs = list(_live.values())
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.kill()
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        _forget(p)


def live_count() -> int:
    with _lock:
        return sum(1 for p in _live.values() if p.poll() is None)


def run_measured(cmd: Sequence[str], *, timeout: float = 600, log: Path | None = None) -> dict:
    """Run cmd to completion; wall time, exit code and peak RSS (ru_maxrss from wait4)."""
    t0 = time.perf_counter()
    p = spawn(cmd, log=log)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            break
        if time.monotonic() > deadline:
            kill(p)
            return {"rc": None, "seconds": None, "maxrss": None, "timeout": True}
        time.sleep(0.002)
    seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    _forget(p)
    return {"rc": p.returncode, "seconds": seconds, "maxrss": ru.ru_maxrss * 1024, "cmd": p.cmdline}


# ---- /proc ----------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """pid and its live descendants."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        out.extend(int(c) for c in f.read().split())
                except OSError:
                    pass
        except OSError:
            pass
    return out


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    # the command name may contain spaces: split after the closing parenthesis
    return s[s.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime+stime of pid and its live descendants, plus cutime+cstime of pid (children
    it has already reaped), in seconds."""
    total = 0
    for i, p in enumerate(tree(pid)):
        f = _stat_fields(p)
        if f is None:
            continue
        # fields after ')' start at field 3 (state): utime is field 14 -> index 11
        total += int(f[11]) + int(f[12])
        if i == 0:
            total += int(f[13]) + int(f[14])
    return total / CLK_TCK


def cpu_ns_threads(pid: int) -> dict[tuple[int, int], int]:
    """On-CPU nanoseconds of every live thread of pid and its live descendants: the first
    field of /proc/PID/task/TID/schedstat, by (pid, tid)."""
    out = {}
    for p in tree(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/schedstat") as f:
                    out[(p, int(t))] = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return out


def idle_cpu_seconds(pid: int, seconds: float, every: float = 0.1) -> tuple[float, int]:
    """CPU seconds the process tree of pid spends over the next `seconds`, in nanoseconds
    rather than utime/stime's 10 ms clock ticks (an idle agent may use one or two ticks in
    30 s, so two idle agents tie at that resolution). Threads are read every `every`
    seconds: one born in the window counts from zero, one that exits counts up to its
    last reading (it loses at most `every` of its time). Also returns how many threads
    came or went."""
    first = cpu_ns_threads(pid)
    last = dict(first)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(every, left))
        last.update(cpu_ns_threads(pid))
    churn = len(set(last) - set(first)) + len(set(first) - set(cpu_ns_threads(pid)))
    return sum(v - first.get(k, 0) for k, v in last.items()) / 1e9, churn


def _status(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    parts = line.split()
                    return int(parts[1]) * (1024 if len(parts) > 2 and parts[2] == "kB" else 1)
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """Sum of VmRSS over pid and its descendants."""
    return sum(_status(p, "VmRSS") for p in tree(pid))


def hwm_bytes(pid: int) -> int:
    """Peak RSS (VmHWM) of pid itself."""
    return _status(pid, "VmHWM")


def threads(pid: int) -> int:
    return sum(_status(p, "Threads") for p in tree(pid))


def fd_count(pid: int) -> int:
    n = 0
    for p in tree(pid):
        try:
            n += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return n


class Sampler:
    """A thread that calls each probe every `interval` seconds and keeps the maximum."""

    def __init__(self, probes: dict[str, Callable[[], float]], interval: float = 0.02):
        self.probes = probes
        self.interval = interval
        self.max: dict[str, float] = {k: 0.0 for k in probes}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, fn in self.probes.items():
                try:
                    v = fn()
                except Exception:
                    continue
                if v > self.max[k]:
                    self.max[k] = v
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(5)


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def wait_idle(pid: int, *, threshold: float = 0.05, window: float = 0.5, need: int = 2, timeout: float = 120) -> float:
    """Wait until the process tree uses less than `threshold` of a core over `need`
    consecutive windows; returns the seconds waited (timeout if never idle)."""
    t0 = time.monotonic()
    quiet = 0
    c0 = cpu_seconds(pid)
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        c1 = cpu_seconds(pid)
        quiet = quiet + 1 if (c1 - c0) / window < threshold else 0
        c0 = c1
        if quiet >= need:
            break
    return time.monotonic() - t0
