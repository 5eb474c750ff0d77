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
