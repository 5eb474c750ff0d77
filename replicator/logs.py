"""structlog set-up: readable lines on a TTY, one JSON object per line otherwise."""

from __future__ import annotations

import importlib
import logging
import sys
import types


def _import_structlog_without_asyncio():
    """Import structlog without importing asyncio.

    structlog imports asyncio at the top of two modules (_native, stdlib) for its async
    methods (`ainfo` and friends), which the agent never calls; asyncio in turn imports
    ssl. The two cost an idle agent about 9 MiB of RSS. While structlog is imported, a
    stand-in module takes asyncio's place in sys.modules; structlog keeps it as its
    `asyncio` global, and the stand-in imports the real asyncio the first time any of its
    attributes is read. The stand-in leaves sys.modules as soon as structlog is in, so any
    other `import asyncio` (the NATS driver's) is an ordinary one.
    """
    if "structlog" in sys.modules or "asyncio" in sys.modules:
        return importlib.import_module("structlog")
    stand_in = types.ModuleType("asyncio", "Stand-in for asyncio while structlog is imported (replicator.logs).")

    def real_asyncio():
        if sys.modules.get("asyncio") is stand_in:
            del sys.modules["asyncio"]
        return importlib.import_module("asyncio")

    stand_in.__getattr__ = lambda name: getattr(real_asyncio(), name)  # PEP 562
    sys.modules["asyncio"] = stand_in
    try:
        return importlib.import_module("structlog")
    finally:
        if sys.modules.get("asyncio") is stand_in:
            del sys.modules["asyncio"]


structlog = _import_structlog_without_asyncio()

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
