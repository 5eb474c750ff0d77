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
    _route_stdlib_logging(LEVELS.get(level, logging.INFO))


class _ToStructlog(logging.Handler):
    """Forwards stdlib log records (the drivers', paramiko's, nats-py's) into structlog,
    so they are JSON events with level and timestamp like the agent's own."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not break logging
            message = str(record.msg)
        method = record.levelname.lower()
        if method not in ("debug", "info", "warning", "error", "critical"):
            method = "info"
        getattr(structlog.get_logger().bind(logger=record.name), method)(message)


class _OwnOrWarnings(logging.Filter):
    """The project's own loggers at the configured level; libraries only from warning up
    (paramiko and nats-py narrate every connection at info), except at debug."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("replicas", "replicator")) or self.level <= logging.DEBUG:
            return record.levelno >= self.level
        return record.levelno >= max(self.level, logging.WARNING)


def _route_stdlib_logging(level: int) -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _ToStructlog)]:
        root.removeHandler(h)
    handler = _ToStructlog()
    handler.addFilter(_OwnOrWarnings(level))
    root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING))
    logging.captureWarnings(True)  # warnings.warn (e.g. from urllib3) become log events too


def current_format() -> str:
    """'text' or 'json': what the last configure() chose."""
    return _format


def get(**context):
    """A logger bound to context (db=, replica=, generation=...)."""
    return structlog.get_logger().bind(**context)
