"""TimeoutDriver against real servers: a hung server fails an operation with Transient within
about op_timeout, whatever the driver's own (longer) timeouts; a slow transfer that keeps
moving is not killed; time spent in the caller's code is not counted.

Hung servers are real: a listener that accepts TCP connections and never answers
(fault_proxy.SilentServer), and the test sshd stopped with SIGSTOP. The conformance suite
runs TimeoutDriver around the file driver ("timeout+file").
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest
import server_nats
import server_s3
import server_sftp
from fault_proxy import FaultProxy, SilentServer

from replicas import NotFound, RetryingDriver, Transient, open_driver
from replicas.s3 import S3Driver
from replicas.timeout import TimeoutDriver

MiB = 1 << 20
SECRET = "S" * 40


def assert_timed_out(operation, drv: TimeoutDriver, name: str, key: str, *, within: float) -> Transient:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    with pytest.raises(Transient) as caught:
        operation()
    elapsed = time.monotonic() - started
    assert elapsed < within, f"{name} took {elapsed:.1f}s"
    message = str(caught.value)
    assert f"{name} {key!r} timed out" in message and drv.url in message, message
    assert caught.value.key == key
    assert SECRET not in message
    return caught.value


# --- a silent S3 endpoint ---------------------------------------------------------------------


@pytest.fixture
def silent():
    with SilentServer() as server:
        yield server


def test_silent_s3_endpoint_fails_each_operation_within_op_timeout(silent: SilentServer) -> None:
    inner = S3Driver(
        "bkt",
        "p",
        endpoint=f"http://127.0.0.1:{silent.port}",
        access_key_id="AKIDEXAMPLE0000000000",
        secret_access_key=SECRET,
        read_timeout=120,  # the driver alone would wait two minutes
    )
    with TimeoutDriver(inner, op_timeout=1.0) as drv:
        operations = {
            "head": lambda: drv.head("k"),
            "put": lambda: drv.put("k", b"value"),
            "get": lambda: drv.get_bytes("k"),
            "delete": lambda: drv.delete("k"),
            "list": lambda: list(drv.list("pre")),
        }
        for name, operation in operations.items():
            assert_timed_out(operation, drv, name, "pre" if name == "list" else "k", within=3.0)


def test_silent_s3_endpoint_bounds_a_large_streamed_put(silent: SilentServer) -> None:
    inner = S3Driver(
        "bkt",
        endpoint=f"http://127.0.0.1:{silent.port}",
        access_key_id="AKIDEXAMPLE0000000000",
        secret_access_key=SECRET,
        part_size=5 * MiB,
        read_timeout=120,
    )
    with TimeoutDriver(inner, op_timeout=1.0) as drv:
        # The silent server reads the body: bytes move until the reply never comes.
        assert_timed_out(lambda: drv.put("big", io.BytesIO(os.urandom(12 * MiB))), drv, "put", "big", within=4.0)


def test_frozen_s3_server_mid_multipart_upload_fails_within_op_timeout(tmp_path: Path) -> None:
    (tmp_path / "s3root").mkdir()
    server = server_s3.RcloneS3(str(tmp_path / "s3root"))
    server.start()
    try:
        inner = server.driver("replica", part_size=5 * MiB, read_timeout=60)
        with TimeoutDriver(inner, op_timeout=1.5) as drv:
            frozen: list[float] = []

            def freeze_in_part_2(total: int) -> None:
                if total >= 7 * MiB and not frozen:
                    server.freeze()
                    frozen.append(time.monotonic())

            try:
                with pytest.raises(Transient, match="put 'big' timed out"):
                    drv.put("big", io.BytesIO(os.urandom(16 * MiB)), progress=freeze_in_part_2)
                # Neither a part retry nor the abort waited on the frozen server.
                assert time.monotonic() - frozen[0] < 4.0
            finally:
                server.thaw()
            with pytest.raises(NotFound):
                drv.head("big")
            drv.put("big", b"after the thaw")
            assert drv.get_bytes("big") == b"after the thaw"
    finally:
        server.shutdown()


# --- a slow link that keeps moving -----------------------------------------------------------


def test_slow_transfers_that_keep_moving_are_not_killed() -> None:
    srv = server_s3.server()
    direct = srv.driver("replica")
    with FaultProxy(srv.port, rate=4 * MiB) as proxy:
        inner = S3Driver(
            direct.bucket,
            "replica",
            endpoint=f"http://127.0.0.1:{proxy.port}",
            access_key_id=srv.access,
            secret_access_key=srv.secret,
        )
        data = os.urandom(20 * MiB)  # 5 s each way at 4 MiB/s, deadline 3 s without progress
        with TimeoutDriver(inner, op_timeout=3.0) as drv:
            started = time.monotonic()
            drv.put("slow", data)
            with drv.get("slow") as stream:
                received = stream.read()
            assert time.monotonic() - started > 2 * drv.op_timeout  # longer than the deadline
            assert received == data


def test_time_in_the_callers_code_is_not_counted(tmp_path: Path) -> None:
    class SlowSource(io.RawIOBase):
        reads = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
            self.reads += 1
            if self.reads > 3:
                return 0
            time.sleep(0.6)  # a slow producer: the caller's problem, not the replica's
            buffer[:4] = b"data"
            return 4

    with TimeoutDriver(open_driver(str(tmp_path / "r")), op_timeout=0.3) as drv:
        drv.put("source", SlowSource())
        drv.put("progress", os.urandom(3 * MiB), progress=lambda total: time.sleep(0.6))
        with drv.get("progress") as stream:
            stream.read(10)
            time.sleep(0.6)  # between reads: the caller's time
            assert len(stream.read()) == 3 * MiB - 10
        assert drv.get_bytes("source") == b"data" * 3


# --- a frozen sshd ------------------------------------------------------------------------------


@pytest.fixture
def sshd():
    server = server_sftp.server()
    yield server
    server.thaw()
    server.start()


def test_frozen_sshd_fails_operations_within_op_timeout_then_recovers(sshd, tmp_path: Path) -> None:
    inner = sshd.driver(tmp_path / "remote", timeout=60)  # the driver alone would wait a minute
    with TimeoutDriver(inner, op_timeout=1.5) as drv:
        drv.put("k", b"old")
        frozen: list[float] = []

        def freeze_at_4mib(total: int) -> None:
            if total >= 4 * MiB and not frozen:
                sshd.freeze()
                frozen.append(time.monotonic())

        try:
            with pytest.raises(Transient) as caught:
                drv.put("k", io.BytesIO(os.urandom(64 * MiB)), progress=freeze_at_4mib)
            assert time.monotonic() - frozen[0] < 4.0
            assert "put 'k' timed out" in str(caught.value)
            # A new connection: TCP is accepted, no SSH banner ever comes.
            assert_timed_out(lambda: drv.head("k"), drv, "head", "k", within=4.0)
        finally:
            sshd.thaw()
        assert drv.get_bytes("k") == b"old"  # reconnected; the interrupted put left nothing
        drv.put("k", b"new")
        assert drv.get_bytes("k") == b"new"


def test_frozen_sshd_mid_read_fails_the_read_within_op_timeout(sshd, tmp_path: Path) -> None:
    data = os.urandom(40 * MiB)
    inner = sshd.driver(tmp_path / "remote", timeout=60)
    with TimeoutDriver(inner, op_timeout=1.5) as drv:
        drv.put("k", data)
        stream = drv.get("k")
        try:
            assert stream.read(MiB) == data[:MiB]
            sshd.freeze()
            started = time.monotonic()
            with pytest.raises(Transient, match="read 'k' timed out"):
                while stream.read(MiB):
                    pass
            assert time.monotonic() - started < 4.0
        finally:
            sshd.thaw()
            stream.close()
        assert drv.get_bytes("k") == data


def test_retrying_driver_rides_out_a_hang(sshd, tmp_path: Path) -> None:
    inner = sshd.driver(tmp_path / "remote", timeout=60)
    drv = RetryingDriver(TimeoutDriver(inner, op_timeout=1.0), attempts=5, base_delay=0.2, max_delay=0.5)
    with drv:
        drv.put("k", b"1")
        sshd.freeze()
        thaw = threading.Timer(1.5, sshd.thaw)
        thaw.start()
        try:
            assert drv.get_bytes("k") == b"1"  # timed out, reset, retried after the thaw
        finally:
            thaw.join()


# --- nats ----------------------------------------------------------------------------------------


def test_silent_nats_server_fails_within_op_timeout(silent: SilentServer) -> None:
    inner = open_driver(f"nats://127.0.0.1:{silent.port}/{server_nats.unique_bucket()}", timeout=60)
    with TimeoutDriver(inner, op_timeout=1.0) as drv:
        assert_timed_out(lambda: drv.head("k"), drv, "head", "k", within=3.0)
        assert_timed_out(lambda: drv.put("k", b"v"), drv, "put", "k", within=3.0)


def test_nats_reset_drops_the_connection_and_the_next_operation_reconnects() -> None:
    server_nats.server()
    drv = TimeoutDriver(server_nats.nats_driver(), op_timeout=5)
    with drv:
        drv.put("k", os.urandom(3 * MiB))
        drv.reset()
        assert len(drv.get_bytes("k")) == 3 * MiB
        drv.put("k2", b"v")
        assert [info.key for info in drv.list()] == ["k", "k2"]


def test_watchdog_thread_ends_when_idle_and_a_new_one_still_expires_a_hung_call() -> None:
    """The replicas of idle databases cost no thread: the watchdog's thread ends after
    LINGER seconds with nothing to watch, and the next operation starts another, which
    still times a hung call out."""
    from replicas.activity import Watch
    from replicas.timeout import _Watchdog

    expired: list[Watch] = []
    dog = _Watchdog(0.3, expired.extend, time.monotonic)
    dog.LINGER = 0.2
    quick = Watch("head", "a", time.monotonic)
    dog.add(quick)
    first = dog._thread
    assert first is not None and first.is_alive()
    dog.remove(quick)
    first.join(5)
    assert not first.is_alive() and dog._thread is None
    hung = Watch("put", "b", time.monotonic)
    dog.add(hung)  # never removed: the call hangs
    second = dog._thread
    assert second is not None and second is not first
    deadline = time.monotonic() + 5
    while not expired and time.monotonic() < deadline:
        time.sleep(0.02)
    assert expired == [hung] and hung.expired
    dog.stop()
    assert not second.is_alive()


def test_adding_a_watch_wakes_the_watchdog_only_when_it_would_sleep_past_the_deadline() -> None:
    """A busy replica makes many short calls: with a timeout longer than LINGER, adding a
    watch does not wake the watchdog's thread (it looks again within LINGER anyway); with
    a timeout shorter than LINGER it must, and the hung call still expires in time."""
    from replicas.activity import Watch
    from replicas.timeout import _Watchdog

    def sleeping(dog: _Watchdog) -> None:
        deadline = time.monotonic() + 5
        while dog._wake_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dog._wake_at is not None

    expired: list[Watch] = []
    dog = _Watchdog(60.0, expired.extend, time.monotonic)
    dog.LINGER = 1.0
    notified = []
    real_notify = dog._cond.notify
    dog._cond.notify = lambda *a: (notified.append(1), real_notify(*a))[1]  # type: ignore[method-assign]
    first = Watch("put", "k0", time.monotonic)
    dog.add(first)
    dog.remove(first)
    sleeping(dog)
    for i in range(50):  # short calls: each added and removed while the thread sleeps
        w = Watch("put", f"k{i + 1}", time.monotonic)
        dog.add(w)
        dog.remove(w)
    assert notified == [] and expired == []
    dog.stop()

    short: list[Watch] = []
    dog = _Watchdog(0.3, short.extend, time.monotonic)
    dog.LINGER = 5.0
    w = Watch("put", "a", time.monotonic)
    dog.add(w)
    dog.remove(w)
    sleeping(dog)  # now asleep for LINGER, longer than the timeout
    hung = Watch("put", "b", time.monotonic)
    started = time.monotonic()
    dog.add(hung)
    while not short and time.monotonic() - started < 10:
        time.sleep(0.01)
    assert short == [hung] and time.monotonic() - started < 4.0  # woken: not LINGER (5 s) late
    dog.stop()
