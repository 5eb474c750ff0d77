"""Progress of long work on a terminal: bytes done, rate and ETA.

Two styles:

- a redrawn bar (the default), for commands that own the terminal (`replicator restore`):
  one line rewritten with `\\r` at most ten times a second, then a final summary line:

      restoring app.db  120.5/256.0 MiB  85.3 MiB/s  ETA 2s
      restored app.db  256.0 MiB in 3.0s  85.3 MiB/s

- plain lines (lines=True), for the agent, whose log lines share stderr: a whole line every
  couple of seconds and a summary at the end, never a `\\r`, and nothing at all for work
  that is small and quick (below min_bytes and min_seconds):

      snapshot of /data/app.db: 120.5/256.0 MiB, 85.3 MiB/s, ETA 2s
      snapshot of /data/app.db: 256.0 MiB in 3.0s, 85.3 MiB/s

A Progress prints only when its stream is a terminal and the caller did not disable it
(e.g. for --json output or JSON logs); otherwise every method is a cheap no-op, so callers
never branch. The agent's progress is off unless the CLI turns it on (enable_console).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


# -- formatting (pure) ----------------------------------------------------------------------------
def _unit(n: float) -> tuple[int, str, int]:
    """(divisor, unit, decimals) for a byte count: MiB below 1 GiB, GiB above."""
    return (GiB, "GiB", 2) if n >= GiB else (MiB, "MiB", 1)


def format_size(n: float) -> str:
    """A byte count in MiB, or GiB from 1 GiB up: '120.5 MiB', '1.25 GiB'."""
    div, unit, dec = _unit(n)
    return f"{n / div:.{dec}f} {unit}"


def format_pair(done: float, total: float | None) -> str:
    """Done out of total in the unit of the larger: '120.5/256.0 MiB'; just the size
    without a total."""
    if total is None:
        return format_size(done)
    div, unit, dec = _unit(max(done, total))
    return f"{done / div:.{dec}f}/{total / div:.{dec}f} {unit}"


def format_rate(bytes_per_second: float | None) -> str:
    """'85.3 MiB/s' ('512 KiB/s' below 1 MiB/s, '1.20 GiB/s' from 1 GiB/s); '-' when unknown."""
    if bytes_per_second is None or bytes_per_second < 0 or math.isnan(bytes_per_second):
        return "- MiB/s"
    if bytes_per_second >= GiB:
        return f"{bytes_per_second / GiB:.2f} GiB/s"
    if bytes_per_second >= MiB:
        return f"{bytes_per_second / MiB:.1f} MiB/s"
    return f"{bytes_per_second / KiB:.0f} KiB/s"


def format_duration(seconds: float) -> str:
    """An elapsed time: '0.8s' below 10 s, then '12s', '1m05s', '2h03m'."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    return _hms(round(seconds))


def format_eta(seconds: float | None) -> str:
    """A time left, rounded up to whole seconds: '2s', '1m05s', '2h03m'; '--' when unknown."""
    if seconds is None or seconds < 0 or math.isnan(seconds) or math.isinf(seconds):
        return "--"
    return _hms(math.ceil(round(seconds, 3)))  # 3.0000001 is 3s, not 4s


def _hms(s: int) -> str:
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def rate_of(done: float, elapsed: float) -> float | None:
    """Average bytes per second; None until some time has passed."""
    if elapsed <= 0.01:
        return None
    return done / elapsed


def eta_of(done: float, total: float | None, rate: float | None) -> float | None:
    """Seconds left at rate; None when the total or the rate is unknown."""
    if total is None or rate is None:
        return None
    left = max(0.0, total - done)
    if left == 0:
        return 0.0
    return left / rate if rate > 0 else None


def progress_line(label: str, done: float, total: float | None, elapsed: float, *, lines: bool = False) -> str:
    """'restoring app.db  120.5/256.0 MiB  85.3 MiB/s  ETA 2s' (the bar), or with lines=True
    'snapshot of app.db: 120.5/256.0 MiB, 85.3 MiB/s, ETA 2s'."""
    rate = rate_of(done, elapsed)
    parts = [format_pair(done, total), format_rate(rate)]
    if total is not None:
        parts.append(f"ETA {format_eta(eta_of(done, total, rate))}")
    return (f"{label}: " + ", ".join(parts)) if lines else "  ".join([label, *parts])


def summary_line(label: str, done: float, total: float | None, elapsed: float, *, ok: bool = True, lines: bool = False) -> str:
    """The final line: 'restored app.db  256.0 MiB in 3.0s  85.3 MiB/s'; when not ok,
    'restoring app.db  120.5/256.0 MiB, stopped after 1.4s'."""
    if ok:
        parts = [f"{format_size(done)} in {format_duration(elapsed)}", format_rate(rate_of(done, elapsed))]
    else:
        parts = [f"{format_pair(done, total)} stopped after {format_duration(elapsed)}"]
    return (f"{label}: " + ", ".join(parts)) if lines else "  ".join([label, *parts])


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _lock_for(stream) -> threading.Lock:
    """The lock structlog's PrintLogger holds while it writes to stream, so that a progress
    line and a log line never interleave; a private lock when it is not available."""
    try:
        from structlog._output import _get_lock_for_file

        return _get_lock_for_file(stream)
    except (ImportError, AttributeError, TypeError):  # another structlog: whole-line writes suffice
        return threading.Lock()


# -- the reporter ---------------------------------------------------------------------------------
class Progress:
    """Reports done bytes of a piece of work against total_bytes (None: unknown)."""

    REDRAW_INTERVAL = 0.1  # seconds between redraws of the bar
    LINE_INTERVAL = 2.0  # seconds between plain lines (lines=True)

    def __init__(
        self,
        label: str,
        total_bytes: int | None = None,
        stream: TextIO | None = None,
        enabled: bool = True,
        *,
        final_label: str | None = None,
        lines: bool = False,
        interval: float | None = None,
        min_bytes: int = 0,
        min_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label = label
        self.final_label = final_label or label
        self.total = total_bytes
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(enabled) and is_terminal(self.stream)
        self.lines = lines
        self.interval = interval if interval is not None else (self.LINE_INTERVAL if lines else self.REDRAW_INTERVAL)
        self.min_bytes = min_bytes
        self.min_seconds = min_seconds
        self.clock = clock
        self.done = 0
        self.started = clock()
        self.closed = False
        self.shown = 0  # lines or redraws written
        # the bar appears at the first advance; plain lines only once the work takes a while
        self._last = self.started if lines else float("-inf")
        self._width = 0  # length of the bar on screen, to blank what a shorter one leaves
        self._state = threading.Lock()
        self._out = _lock_for(self.stream) if self.enabled else None

    @classmethod
    def null(cls) -> Progress:
        """A reporter that never prints."""
        return cls("", None, enabled=False)

    # -- counting ---------------------------------------------------------------------------
    def advance(self, n: int) -> None:
        """n more bytes are done."""
        with self._state:
            self.done += n
        if self.enabled:
            self._tick()

    def update(self, done: int) -> None:
        """done bytes are done in all."""
        with self._state:
            self.done = done
        if self.enabled:
            self._tick()

    def _tick(self) -> None:
        now = self.clock()
        with self._state:
            if self.closed or now - self._last < self.interval:
                return
            self._last = now
            done, elapsed = self.done, now - self.started
        self._show(progress_line(self.label, done, self.total, elapsed, lines=self.lines))

    def _show(self, text: str, final: bool = False) -> None:
        assert self._out is not None
        if self.lines:
            out = text + "\n"
        else:  # redraw: back to column 0, blank what is left of a longer previous line
            pad = max(0, self._width - len(text))
            out = "\r" + text + " " * pad + ("\n" if final else "")
            self._width = 0 if final else len(text)
        with self._out:
            try:
                self.stream.write(out)
                self.stream.flush()
            except (OSError, ValueError):  # a closed terminal must not fail the work
                self.enabled = False
                return
        self.shown += 1

    # -- the end ----------------------------------------------------------------------------
    def close(self, ok: bool = True) -> None:
        """Print the final line (totals and elapsed time) and end the line; once."""
        with self._state:
            if self.closed:
                return
            self.closed = True
            done, elapsed = self.done, self.clock() - self.started
        if not self.enabled:
            return
        if self.lines and not self.shown and not self._significant(elapsed):
            return  # small and quick: stay quiet
        label = self.final_label if ok else self.label
        self._show(summary_line(label, done, self.total, elapsed, ok=ok, lines=self.lines), final=True)

    def _significant(self, elapsed: float) -> bool:
        size = self.total if self.total is not None else self.done
        return size >= self.min_bytes or elapsed >= self.min_seconds

    def __enter__(self) -> Progress:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


# -- the agent's console --------------------------------------------------------------------------
_console = False

CONSOLE_MIN_BYTES = 32 * MiB  # below this, work shows progress only when it takes longer than
CONSOLE_MIN_SECONDS = 1.0  # this


def enable_console(on: bool) -> None:
    """Turn the agent's progress lines on (the CLI does so when stderr is a terminal and the
    logs are text) or off (the default: library use, JSON logs, pipes)."""
    global _console
    _console = bool(on)


def console_enabled() -> bool:
    return _console


def console(label: str, total_bytes: int | None, *, min_bytes: int = CONSOLE_MIN_BYTES, min_seconds: float = CONSOLE_MIN_SECONDS) -> Progress:
    """A plain-lines reporter on stderr for the agent's long work, or a null one when the
    console is off."""
    if not _console:
        return Progress.null()
    return Progress(label, total_bytes, sys.stderr, lines=True, min_bytes=min_bytes, min_seconds=min_seconds)
