"""Shared settings and guards of the fuzz suites (tests/test_fuzz_*.py), and the tests
that show the guards work.

Budget: every fuzz test takes `examples(base)` Hypothesis cases, where base is sized so
that the whole fuzz suite runs in well under 60 s on a small shared machine. The
environment variable FUZZ_EXAMPLES is a multiplier (default 1; a float, so 0.1 gives a
quick smoke run). From 10 on it is the long mode (e.g. FUZZ_EXAMPLES=50): every time limit
scales with it too, and the suites also draw larger inputs (LONG_MODE).

Guards, so that a bad input is reported by Hypothesis with its falsifying example instead
of stalling or killing the run:

- `cpu_budget(seconds)`: an input that keeps the CPU busy longer than that (an endless
  loop) raises FuzzHang inside the code under test (SIGVTALRM, CPU time, so a loaded
  machine does not make it fire; pytest-timeout's SIGALRM is left alone).
- `memory_cap()`: the address space may grow by at most FUZZ_MEMORY_MB (default 1024)
  while a fuzz test runs, so an input that makes the code allocate without bound raises
  MemoryError (a failure, as any undocumented exception) instead of exhausting the host.
- `@pytest.mark.timeout(timeout(base))` on every fuzz test: the backstop for a hang that
  no guard above catches (blocked in C code or I/O).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import traceback
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

MULTIPLIER = float(os.environ.get("FUZZ_EXAMPLES", "1") or "1")
LONG_MODE = MULTIPLIER >= 10
MEMORY_HEADROOM = int(os.environ.get("FUZZ_MEMORY_MB", "1024")) << 20


def examples(base: int) -> int:
    """Hypothesis cases for a test whose normal share of the budget is `base`."""
    return max(1, int(base * MULTIPLIER))


def timeout(base: float) -> float:
    """pytest-timeout seconds for a test that normally takes well under `base` seconds."""
    return base * max(1.0, MULTIPLIER)


def fuzz_settings(base: int, **overrides) -> settings:
    """Settings for a fuzz test: examples(base) cases, no per-example deadline (a loaded
    machine must not make a slow case a failure: the guards catch real hangs), no
    health checks about slow or large data generation, and nothing printed."""
    options = {
        "max_examples": examples(base),
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        "print_blob": False,
    }
    options.update(overrides)
    return settings(**options)


class FuzzHang(Exception):
    """An input kept the code under test busy past its CPU budget."""


def _on_vtalrm(signum, frame):
    raise FuzzHang("CPU budget exhausted: the input keeps the code busy (a hang)")


@contextlib.contextmanager
def cpu_budget(seconds: float = 10.0) -> Iterator[None]:
    """Raise FuzzHang in the body if it uses more than `seconds` of CPU time."""
    previous = signal.signal(signal.SIGVTALRM, _on_vtalrm)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


@contextlib.contextmanager
def memory_cap() -> Iterator[None]:
    """Cap the address space at its current size plus MEMORY_HEADROOM (Linux)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + MEMORY_HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def guarded(cpu_seconds: float = 10.0) -> Iterator[None]:
    """Both guards around one fuzz case."""
    with memory_cap(), cpu_budget(cpu_seconds):
        yield


def raised_in(exc: BaseException, module_suffix: str, function: str) -> bool:
    """True when exc was raised below `function` of a module whose file ends with module_suffix
    (to recognise a known bug by where it comes from, not only by its type)."""
    return any(
        frame.f_code.co_name == function and frame.f_code.co_filename.endswith(module_suffix)
        for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


# --------------------------------------------------------------------------- the guards work


@pytest.mark.timeout(30)
def test_cpu_budget_interrupts_a_busy_loop():
    with pytest.raises(FuzzHang), cpu_budget(0.2):
        while True:
            pass


@pytest.mark.timeout(30)
def test_memory_cap_stops_unbounded_allocation():
    with pytest.raises(MemoryError), memory_cap():
        hog = bytearray(MEMORY_HEADROOM + (256 << 20))
        del hog
    keep = bytearray(64 << 20)  # the cap is lifted afterwards
    del keep


def test_budget_scales_with_fuzz_examples():
    assert examples(100) == max(1, int(100 * MULTIPLIER))
    assert timeout(60) >= 60
