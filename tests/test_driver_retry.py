"""Unit tests of RetryingDriver against a driver that fails on purpose."""

from __future__ import annotations

import io
import uuid
from collections import Counter

import pytest

import replicas
from replicas import (
    Capability,
    InvalidKey,
    MemDriver,
    NotFound,
    PermissionDenied,
    RetryingDriver,
    StorageError,
    Transient,
)


class FlakyDriver(MemDriver):
    """A mem driver whose operations fail `failures` times each before working."""

    def __init__(self, failures: int = 0, error: type[StorageError] = Transient) -> None:
        super().__init__(f"flaky-{uuid.uuid4().hex}")
        self.failures, self.error = failures, error
        self.calls: Counter[str] = Counter()
        self.raised: list[StorageError] = []
        self.closed = False

    def _maybe_fail(self, operation: str, data: object = None) -> None:
        self.calls[operation] += 1
        if self.calls[operation] <= self.failures:
            if hasattr(data, "read"):
                data.read(3)  # a failed upload has consumed some of the stream
            exc = self.error(f"{operation} failed, call {self.calls[operation]}")
            self.raised.append(exc)
            raise exc

    def put(self, key, data, **kwargs):  # type: ignore[no-untyped-def]
        self._maybe_fail("put", data)
        return super().put(key, data, **kwargs)

    def get(self, key, **kwargs):  # type: ignore[no-untyped-def]
        self._maybe_fail("get")
        return super().get(key, **kwargs)

    def head(self, key):  # type: ignore[no-untyped-def]
        self._maybe_fail("head")
        return super().head(key)

    def delete(self, key):  # type: ignore[no-untyped-def]
        self._maybe_fail("delete")
        return super().delete(key)

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def _clean_mem():
    yield
    replicas.mem.reset()


def wrap(inner: FlakyDriver, **kwargs) -> tuple[RetryingDriver, list[float]]:  # type: ignore[no-untyped-def]
    sleeps: list[float] = []
    return RetryingDriver(inner, sleep=sleeps.append, **kwargs), sleeps


@pytest.mark.parametrize("failures", [0, 1, 4])
def test_transient_failures_are_retried_until_success(failures: int) -> None:
    inner = FlakyDriver(failures)
    drv, sleeps = wrap(inner)
    drv.put("k", b"value")
    assert drv.get_bytes("k") == b"value"
    assert drv.head("k").size == 5
    drv.delete("k")
    assert inner.calls == {op: failures + 1 for op in ("put", "get", "head", "delete")}
    assert len(sleeps) == 4 * failures


def test_gives_up_after_attempts_and_reraises_the_last_transient() -> None:
    inner = FlakyDriver(failures=100)
    drv, sleeps = wrap(inner, attempts=3)
    with pytest.raises(Transient) as caught:
        drv.head("k")
    assert inner.calls["head"] == 3
    assert caught.value is inner.raised[-1]
    assert len(sleeps) == 2  # no sleep after the last attempt


@pytest.mark.parametrize("error", [NotFound, PermissionDenied, InvalidKey, StorageError])
def test_other_errors_are_not_retried(error: type[StorageError]) -> None:
    inner = FlakyDriver(failures=1, error=error)
    drv, sleeps = wrap(inner)
    with pytest.raises(error):
        drv.head("k")
    assert inner.calls["head"] == 1 and sleeps == []


def test_backoff_is_exponential_capped_and_jittered() -> None:
    drv, sleeps = wrap(
        FlakyDriver(failures=100), attempts=6, base_delay=0.1, max_delay=0.5, jitter=lambda: 1.0
    )
    with pytest.raises(Transient):
        drv.head("k")
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])

    drv, sleeps = wrap(FlakyDriver(failures=100), attempts=6, jitter=lambda: 0.0)
    with pytest.raises(Transient):
        drv.head("k")
    assert sleeps == [0.0] * 5

    drv, sleeps = wrap(FlakyDriver(failures=100), attempts=8)  # default: random full jitter
    with pytest.raises(Transient):
        drv.head("k")
    ceilings = [min(5.0, 0.1 * 2**n) for n in range(7)]
    assert len(sleeps) == 7 and all(0 <= s <= c for s, c in zip(sleeps, ceilings))
    assert drv.delay(100) <= 5.0


def test_seekable_stream_is_rewound_before_retrying() -> None:
    inner = FlakyDriver(failures=2)
    drv, _ = wrap(inner)
    stream = io.BytesIO(b"skip:payload")
    stream.seek(5)  # rewinds to where the caller left it, not to 0
    drv.put("k", stream)
    assert inner.calls["put"] == 3
    assert drv.get_bytes("k") == b"payload"


def test_non_seekable_stream_is_not_retried() -> None:
    class OneWay(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
            return 0

    inner = FlakyDriver(failures=1)
    drv, sleeps = wrap(inner)
    with pytest.raises(Transient):
        drv.put("k", OneWay())
    assert inner.calls["put"] == 1 and sleeps == []


def test_list_resumes_after_a_transient_failure_without_duplicates() -> None:
    class FlakyList(FlakyDriver):
        list_failures = 2

        def list(self, prefix="", *, page_size=1000):  # type: ignore[no-untyped-def]
            self.calls["list"] += 1
            for index, info in enumerate(super().list(prefix, page_size=page_size)):
                if index == 3 and self.list_failures:
                    self.list_failures -= 1
                    raise Transient("connection reset while listing")
                yield info

    inner = FlakyList()
    for i in range(10):
        inner.put(f"k{i}", b"v")
    drv, sleeps = wrap(inner)
    assert [info.key for info in drv.list()] == [f"k{i}" for i in range(10)]
    assert inner.calls["list"] == 3 and len(sleeps) == 2


def test_wrapper_mirrors_the_inner_driver() -> None:
    inner = FlakyDriver()
    with RetryingDriver(inner) as drv:
        assert (drv.scheme, drv.url) == ("mem", inner.url)
        assert Capability.CONDITIONAL_CREATE in drv.capabilities
    assert inner.closed
    with pytest.raises(ValueError):
        RetryingDriver(inner, attempts=0)
