"""The per-operation metrics wrapper counts and times every operation of any driver."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from replicas import NotFound, instruments, open_driver
from replicas.metrics import MetricsDriver

instruments.enable()  # as the agent does when it serves metrics-addr (they count from here on)


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_operations_are_timed_and_errors_counted(tmp_path):
    labels = {"db": str(tmp_path / "app.db"), "replica": "metrics-test"}
    drv = MetricsDriver(open_driver(f"file://{tmp_path}/r"), **labels)
    drv.put("a/b", b"12345")
    drv.put("a/c", b"678")
    assert drv.get_bytes("a/b") == b"12345"
    assert [i.key for i in drv.list("a/")] == ["a/b", "a/c"]
    with pytest.raises(NotFound):
        drv.head("missing")
    drv.delete("a/b")
    assert _value("replicator_replica_operation_seconds_count", operation="put", **labels) == 2
    assert _value("replicator_replica_operation_seconds_count", operation="list", **labels) == 1
    assert _value("replicator_replica_operation_seconds_count", operation="head", **labels) == 1
    assert _value("replicator_replica_operation_errors_total", operation="head", kind="NotFound", **labels) == 1
    assert _value("replicator_replica_operation_errors_total", operation="put", kind="NotFound", **labels) == 0
    assert _value("replicator_replica_uploaded_bytes_total", **labels) == 8
    assert _value("replicator_replica_operation_seconds_sum", operation="put", **labels) > 0
