"""Exceptions that the CLI reports as one-line errors, kept apart from the modules that
raise them so that `main` can catch them without importing those modules (a restore
should not pay for the metrics server's HTTP and Prometheus imports)."""

from __future__ import annotations


class BootstrapError(Exception):
    """The database is missing and cannot be restored; one line."""


class MetricsServerError(Exception):
    """The address cannot be served (in use, not local, bad host); one line."""


class ShadowLocked(Exception):
    """Another agent holds the shadow directory; one line."""


class ConfigError(Exception):
    """A user mistake in the configuration; str() is one line naming the file and key path."""

    def __init__(self, message: str, *, key: str | None = None, detail: str | None = None) -> None:
        super().__init__(message.replace("\r", " ").replace("\n", " "))
        self.key = key  # the key path, e.g. "dbs[0].retention", when there is one
        self.detail = detail if detail is not None else message  # the message without file and key
