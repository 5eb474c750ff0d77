"""Prometheus counters and histograms that cost nothing until metrics are served.

prometheus-client's package imports its exposition module, and with it `http.server`,
`urllib.request`, `wsgiref` and `ssl`: about 4.4 MiB of RSS, an eighth of an idle agent.
An agent without `metrics-addr` never exposes a metric, so the project declares its
instruments here and creates them in prometheus-client's default registry only when
`enable()` is called: by the agent as it starts serving `metrics-addr`, before it builds
anything that counts. Until then `labels()` hands out a child that counts nothing.

    UPLOADS = Counter("replicator_uploads_total", "Uploads.", ["db"])
    UPLOADS.labels(db="/data/app.db").inc()     # counted only after enable()

Children taken before `enable()` stay inert, so a component that keeps a child keeps the
choice made when it was built.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

_lock = threading.Lock()
_declared: list[Instrument] = []
_enabled = False


class _Inert:
    """The child of an instrument before enable(): counts and observes nothing."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


INERT = _Inert()


class Instrument:
    """A counter or histogram of the default registry, created by enable()."""

    def __init__(self, kind: str, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float] | None = None) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(buckets) if buckets is not None else None
        self.metric = None  # the prometheus_client object, once enabled
        with _lock:
            _declared.append(self)
            if _enabled:
                self._create()

    def labels(self, **labels: str):
        metric = self.metric
        return INERT if metric is None else metric.labels(**labels)

    def _create(self) -> None:
        import prometheus_client

        if self.kind == "counter":
            self.metric = prometheus_client.Counter(self.name, self.documentation, self.labelnames)
        else:
            self.metric = prometheus_client.Histogram(self.name, self.documentation, self.labelnames,
                                                      buckets=self.buckets or prometheus_client.Histogram.DEFAULT_BUCKETS)


def Counter(name: str, documentation: str, labelnames: Sequence[str]) -> Instrument:  # noqa: N802 - reads like the class it stands for
    return Instrument("counter", name, documentation, labelnames)


def Histogram(name: str, documentation: str, labelnames: Sequence[str],  # noqa: N802
              buckets: Sequence[float] | None = None) -> Instrument:
    return Instrument("histogram", name, documentation, labelnames, buckets)


def enable() -> None:
    """Create every declared instrument (and any declared later) in the default registry."""
    global _enabled
    with _lock:
        if _enabled:
            return
        for instrument in _declared:
            instrument._create()
        _enabled = True


def enabled() -> bool:
    return _enabled


def declared() -> list[Instrument]:
    return list(_declared)
