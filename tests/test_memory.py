"""replicator.memory: glibc malloc settings for the long-lived agent."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from replicator import memory

glibc = pytest.mark.skipif(memory._glibc() is None, reason="not glibc: the settings are no-ops")


@glibc
def test_trim_runs_once_per_interval_and_once_more_at_its_end(monkeypatch):
    calls = []

    class Lib:
        def malloc_trim(self, pad):
            calls.append((time.monotonic(), pad))
            return 1

    monkeypatch.setattr(memory, "_libc", Lib())
    monkeypatch.setattr(memory, "_last_trim", float("-inf"))
    monkeypatch.setattr(memory, "_timer", None)
    monkeypatch.setattr(memory, "TRIM_INTERVAL", 0.3)
    assert memory.trim() is True
    assert [memory.trim() for _ in range(5)] == [False] * 5  # inside the interval
    assert len(calls) == 1
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(calls) == 2 and calls[1][0] - calls[0][0] >= 0.29  # one trailing trim, not five
    time.sleep(0.5)
    assert len(calls) == 2 and memory._timer is None


@glibc
def test_arena_cap_and_trim_on_the_real_allocator():
    """In a fresh process (the cap applies to arenas created after it): mallopt accepts
    it, and malloc_trim runs."""
    code = (
        "from replicator import memory\n"
        "assert memory.limit_arenas() is True\n"
        "assert memory.trim() is True and memory.trim() is False\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
