"""Durations ("1h30m", "250ms") and sizes ("1GiB", "500MB"): parsing and formatting.

Used by the config loader and by CLI flags. Durations are float seconds, sizes int bytes.
Parse errors are `UnitError` (a ValueError) carrying a second, redacted message without
the offending value, for values that may hold secrets (expanded from the environment).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

DURATION_HINT = "use e.g. 30s, 15m, 1h, 1h30m"
SIZE_HINT = "use e.g. 64MiB, 1GiB, 500MB or a plain number of bytes"

_DURATION_UNITS = {
    "ns": Fraction(1, 1_000_000_000),
    "us": Fraction(1, 1_000_000),
    "µs": Fraction(1, 1_000_000),  # micro sign
    "μs": Fraction(1, 1_000_000),  # Greek mu, as Go also accepts
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})(ns|us|µs|μs|ms|s|m|h|d)")
_DURATION_RE = re.compile(rf"(?:{_NUMBER}(?:ns|us|µs|μs|ms|s|m|h|d))+")
_PLAIN_NUMBER_RE = re.compile(_NUMBER)

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(rf"({_NUMBER})\s*([A-Za-z]*)")
_BINARY_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


class UnitError(ValueError):
    """A duration or size that cannot be parsed; `redacted` is the message without the value."""

    def __init__(self, message: str, redacted: str) -> None:
        super().__init__(message)
        self.redacted = redacted


def _parse_duration(value: object) -> float:
    """Seconds from a Go-style duration string ("1h30m", "500ms", "1d") or a number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UnitError(
            f"expected a duration, got {_type_name(value)} ({DURATION_HINT})",
            f"expected a duration, got {_type_name(value)} ({DURATION_HINT})",
        )
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise UnitError(f"invalid duration {value!r} (must be finite)", "invalid duration (must be finite)")
        if value < 0:
            raise UnitError(f"negative duration {value!r} is not allowed", "negative duration is not allowed")
        return float(value)
    text = value.strip()
    if text.startswith("-"):
        raise UnitError(f"negative duration {value!r} is not allowed", "negative duration is not allowed")
    text = text.removeprefix("+")
    if _PLAIN_NUMBER_RE.fullmatch(text):
        return float(Fraction(text))
    if not _DURATION_RE.fullmatch(text):
        raise UnitError(f"invalid duration {value!r} ({DURATION_HINT})", f"invalid duration ({DURATION_HINT})")
    total = sum(
        (Fraction(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text)), Fraction(0)
    )
    return float(total)


def format_duration(seconds: float) -> str:
    """Go-style text for a number of seconds: "1h30m", "1m30.5s", "250ms", "0s"."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if not math.isfinite(seconds):
        return "inf"
    if seconds < 1:
        micros = round(seconds * 1_000_000)
        if micros == 0:
            return f"{_trim(seconds * 1e9)}ns"
        if micros < 1000:
            return f"{micros}us"
        return f"{_trim(micros / 1000)}ms"
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if millis:
        parts.append(f"{_trim(millis / 1000)}s")
    return "".join(parts)


def _parse_size(value: object) -> int:
    """Bytes from "1GiB", "512MiB", "100MB", "4096B", "4096" or an int (binary and SI units)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UnitError(
            f"expected a size, got {_type_name(value)} ({SIZE_HINT})",
            f"expected a size, got {_type_name(value)} ({SIZE_HINT})",
        )
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not value.is_integer():
            raise UnitError(f"invalid size {value!r} (must be whole bytes)", "invalid size (must be whole bytes)")
        if value < 0:
            raise UnitError(f"negative size {value!r} is not allowed", "negative size is not allowed")
        return int(value)
    text = value.strip()
    if text.startswith("-"):
        raise UnitError(f"negative size {value!r} is not allowed", "negative size is not allowed")
    match = _SIZE_RE.fullmatch(text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise UnitError(f"invalid size {value!r} ({SIZE_HINT})", f"invalid size ({SIZE_HINT})")
    number, unit = match.groups()
    return round(Fraction(number) * _SIZE_UNITS[unit.lower()])


def format_size(n: int) -> str:
    """Short text for a byte count in binary units: "1GiB", "1.5MiB", "512B"."""
    if n < 0:
        return "-" + format_size(-n)
    for unit, factor in _BINARY_UNITS:
        if n >= factor:
            if n % factor == 0:
                return f"{n // factor}{unit}"
            return f"{_trim(n / factor, places=1)}{unit}"
    return f"{n}B"


def _trim(x: float, places: int = 3) -> str:
    text = f"{x:.{places}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _type_name(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"  # only non-scalars reach here


def parse_duration(value: object) -> float:
    """Seconds from "1h30m", "250ms", "10s", a plain number of seconds, or an int/float."""
    try:
        return _parse_duration(value)
    except UnitError:
        raise
    except (ValueError, OverflowError):  # a number too long to convert, or beyond a float
        raise UnitError("invalid duration (too large)", "invalid duration (too large)") from None


def parse_size(value: object) -> int:
    """Bytes from "1GiB", "512MiB", "100MB", "4096B", "4096" or an int (binary and SI units)."""
    try:
        return _parse_size(value)
    except UnitError:
        raise
    except (ValueError, OverflowError):
        raise UnitError("invalid size (too large)", "invalid size (too large)") from None
