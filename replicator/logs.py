"""structlog set-up: readable lines on a TTY, one JSON object per line otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_format = "json"  # the format configure() chose (auto resolved)


def configure(level: str = "info", fmt: str = "auto", stream=None) -> None:
    """Configure structlog once for the process; fmt is auto, text or json."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    global _format
    _format = fmt
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def current_format() -> str:
    """'text' or 'json': what the last configure() chose."""
    return _format


def get(**context):
    """A logger bound to context (db=, replica=, generation=...)."""
    return structlog.get_logger().bind(**context)
