"""The sftp driver against a real OpenSSH sshd (tests/server_sftp.py): authentication, host
key verification, URL and option parsing, and faults (sshd killed or frozen mid-transfer,
connections dropped while idle). The generic behaviour is in test_driver_conformance.py."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("paramiko")

import server_sftp

from replicas import (
    BadURL,
    NotFound,
    PermissionDenied,
    RetryingDriver,
    StorageError,
    Transient,
    open_driver,
)
from replicas.sftp import SFTPDriver

MiB = 1 << 20
SECRET = "s3cr3t-Pa55word-that-must-never-leak"


@pytest.fixture
def sshd():
    server = server_sftp.server()
    yield server
    server.thaw()
    server.start()  # a fault test may have left it stopped


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "remote"


def listing(drv) -> list[str]:
    return [info.key for info in drv.list()]


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*.tmp-*")) if directory.exists() else []


# --- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_key_authentication(sshd, root: Path, kind: str) -> None:
    with sshd.driver(root, key_path=str(sshd.client_keys[kind])) as drv:
        drv.put("dir/k", b"value")
        assert drv.get_bytes("dir/k") == b"value"
    assert (root / "dir" / "k").read_bytes() == b"value"  # the remote root is this machine's path


def test_unauthorised_key_is_refused(sshd, root: Path, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with sshd.driver(root, key_path=str(stranger)) as drv, pytest.raises(PermissionDenied) as caught:
        drv.put("k", b"v")
    message = str(caught.value)
    assert "authentication" in message and sshd.host_id in message and str(stranger) in message


def test_missing_key_file_is_refused(sshd, root: Path, tmp_path: Path) -> None:
    drv = sshd.driver(root, key_path=str(tmp_path / "nope"))
    with drv, pytest.raises(PermissionDenied, match="cannot read key"):
        drv.head("k")


@pytest.mark.parametrize("where", ["option", "url"])
def test_password_never_appears_in_errors_or_logs(
    sshd, root: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The test sshd allows password authentication, but no password works (root may log
    # in with a key only; the tests set no passwords): the attempt must fail cleanly.
    caplog.set_level(logging.DEBUG)
    if where == "option":
        drv = sshd.driver(root, key_path=None, password=SECRET)
    else:
        url = sshd.url(root).replace("sftp://", "").split("@", 1)[1]
        drv = open_driver(f"sftp://{sshd.user}:{SECRET}@{url}", known_hosts_path=str(sshd.known_hosts), timeout=10)
    with drv:
        assert SECRET not in drv.url and SECRET not in repr(drv)
        with pytest.raises(PermissionDenied) as caught:
            drv.put("k", b"v")
    text = str(caught.value)
    assert "password" in text and sshd.host_id in text
    chain = [caught.value, caught.value.__cause__, caught.value.__context__]
    assert all(SECRET not in str(exc) for exc in chain if exc is not None)
    assert all(SECRET not in record.getMessage() for record in caplog.records)
    assert not (root / "k").exists()


def test_bad_url_errors_do_not_show_the_password() -> None:
    with pytest.raises(BadURL) as caught:
        open_driver(f"sftp://me:{SECRET}@host:99999/x")
    assert SECRET not in str(caught.value)


# --- host key verification -------------------------------------------------------------


def test_changed_host_key_is_refused(sshd, root: Path, tmp_path: Path) -> None:
    # known_hosts lists an ed25519 key for the server, but not the server's.
    wrong = " ".join(Path(f"{sshd.client_keys['ed25519']}.pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"{sshd.host_id} {wrong}\n")
    with sshd.driver(root, known_hosts_path=str(known)) as drv, pytest.raises(PermissionDenied) as caught:
        drv.put("k", b"v")
    message = str(caught.value)
    assert f"host key for {sshd.host_id} does not match {known}" in message
    assert "\n" not in message
    assert not root.exists()  # refused before anything happened


def test_unknown_host_is_refused(sshd, root: Path, tmp_path: Path) -> None:
    known = sshd.write_known_hosts(tmp_path / "known_hosts", host_id=f"[127.0.0.1]:{sshd.port + 1}")
    with sshd.driver(root, known_hosts_path=str(known)) as drv, pytest.raises(PermissionDenied) as caught:
        drv.head("k")
    message = str(caught.value)
    assert f"host key for {sshd.host_id} is not in {known}" in message
    assert "ssh-ed25519 SHA256:" in message  # what the server offered, to check by hand


def test_plain_host_entry_does_not_cover_another_port(sshd, root: Path, tmp_path: Path) -> None:
    known = sshd.write_known_hosts(tmp_path / "known_hosts", host_id="127.0.0.1")
    with sshd.driver(root, known_hosts_path=str(known)) as drv, pytest.raises(PermissionDenied, match="is not in"):
        drv.head("k")


def test_missing_known_hosts_file_is_refused(sshd, root: Path, tmp_path: Path) -> None:
    with (
        sshd.driver(root, known_hosts_path=str(tmp_path / "absent")) as drv,
        pytest.raises(PermissionDenied, match="does not exist"),
    ):
        drv.head("k")


def test_default_known_hosts_is_home_ssh(sshd, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with (
        sshd.driver(root, known_hosts_path=None) as drv,
        pytest.raises(PermissionDenied, match=r"\.ssh/known_hosts does not exist"),
    ):
        drv.head("k")
    (tmp_path / ".ssh").mkdir()
    sshd.write_known_hosts(tmp_path / ".ssh" / "known_hosts")
    with sshd.driver(root, known_hosts_path=None) as drv:
        drv.put("k", b"v")
        assert drv.get_bytes("k") == b"v"


@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
def test_known_hosts_with_another_key_type_is_negotiated(sshd, root: Path, tmp_path: Path, kind: str) -> None:
    # The server also has an Ed25519 key; the client must ask for the type it can verify.
    known = sshd.write_known_hosts(tmp_path / "known_hosts", kind)
    with sshd.driver(root, known_hosts_path=str(known)) as drv:
        drv.put("k", b"v")
        assert drv.get_bytes("k") == b"v"


def test_hashed_known_hosts_entry(sshd, root: Path, tmp_path: Path) -> None:
    known = sshd.write_known_hosts(tmp_path / "known_hosts")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    assert sshd.host_id not in known.read_text()
    with sshd.driver(root, known_hosts_path=str(known)) as drv:
        drv.put("k", b"v")


def test_pinned_host_key(sshd, root: Path, tmp_path: Path) -> None:
    absent = str(tmp_path / "absent")  # the pin is what counts, not known_hosts
    for pin in (
        sshd.public_key(),
        sshd.public_key() + " a comment",
        f"{sshd.host_id} {sshd.public_key()}",  # a known_hosts line
        sshd.public_key("rsa"),  # negotiated as with known_hosts
    ):
        with sshd.driver(root, host_key=pin, known_hosts_path=absent) as drv:
            drv.put("k", b"v")


def test_wrong_pinned_host_key_is_refused(sshd, root: Path) -> None:
    wrong = " ".join(Path(f"{sshd.client_keys['ed25519']}.pub").read_text().split()[:2])
    # ... even when known_hosts would have accepted the server
    with sshd.driver(root, host_key=wrong) as drv, pytest.raises(PermissionDenied) as caught:
        drv.head("k")
    assert f"host key for {sshd.host_id} does not match the pinned host_key" in str(caught.value)


@pytest.mark.parametrize("pin", ["", "ssh-ed25519", "ssh-ed25519 not-base64!", "AAAA", "ssh-ed25519 AAAAC3Nz"])
def test_malformed_pinned_host_key_is_a_bad_url(pin: str) -> None:
    with pytest.raises(BadURL, match="host_key"):
        open_driver("sftp://h/x", host_key=pin)


# --- URL and options ------------------------------------------------------------------------


def test_url_parsing() -> None:
    drv = open_driver("sftp://alice@example.org:2222/srv/backup/")
    assert isinstance(drv, SFTPDriver)
    assert (drv.host, drv.port, drv.user, drv.root) == ("example.org", 2222, "alice", "/srv/backup")
    assert drv.url == "sftp://alice@example.org:2222/srv/backup"
    assert drv.host_id == "[example.org]:2222"

    drv = open_driver("sftp://example.org/", user="bob", timeout="2.5")
    assert (drv.port, drv.user, drv.root, drv.timeout) == (22, "bob", "/", 2.5)
    assert drv.host_id == "example.org" and drv.url == "sftp://bob@example.org/"

    drv = open_driver("sftp://[::1]:2200/with%20space/%C3%A9?key-path=/k&known_hosts_path=/kh&timeout=3")
    assert (drv.host, drv.port, drv.root) == ("::1", 2200, "/with space/é")
    assert (drv.key_path, drv.known_hosts_path, drv.timeout) == ("/k", "/kh", 3.0)
    assert drv.host_id == "[::1]:2200" and drv.url == "sftp://" + drv.user + "@[::1]:2200/with%20space/%C3%A9"

    # a password may hold '/', '@' and ':' (the last '@' ends the user-info)
    drv = open_driver("sftp://carol:p/a@s:s@host/data")
    assert (drv.user, drv._password, drv.host, drv.root) == ("carol", "p/a@s:s", "host", "/data")
    assert drv.url == "sftp://carol@host/data"
    assert open_driver("sftp://carol:p%40w@host/data")._password == "p@w"
    assert open_driver("sftp://u@h/d", user="u").user == "u"  # the same both ways is fine
    assert open_driver("sftp://h/d?timeout=3", timeout=3.0).timeout == 3.0
    assert open_driver("sftp://Example.ORG/d").host_id == "example.org"


@pytest.mark.parametrize(
    ("url", "options", "match"),
    [
        ("sftp://host", {}, "absolute path"),
        ("sftp:///path", {}, "needs a host"),
        ("sftp://host:0/x", {}, "invalid port"),
        ("sftp://host:22x/x", {}, "invalid port"),
        ("sftp://[::1/x", {}, "malformed host"),
        ("sftp://host/x#frag", {}, "fragment"),
        ("sftp://host/x?bogus=1", {}, "unknown option 'bogus'"),
        ("sftp://host/x?password=p", {}, "password in the query"),
        ("sftp://host/x?timeout=1&timeout=2", {}, "twice"),
        ("sftp://host/x", {"bogus": 1}, "unknown option 'bogus'"),
        ("sftp://host/x", {"timeout": 0}, "positive"),
        ("sftp://host/x", {"timeout": "soon"}, "number of seconds"),
        ("sftp://host/x?timeout=3", {"timeout": 4}, "differently"),
        ("sftp://alice@host/x", {"user": "bob"}, "differs"),
        ("sftp://alice:pw@host/x", {"password": "other"}, "the password differs"),
    ],
)
def test_bad_urls_and_options(url: str, options: dict, match: str) -> None:
    with pytest.raises(BadURL, match=match):
        open_driver(url, **options)


def test_config_style_options_reach_the_driver(sshd, root: Path) -> None:
    # replicator.config hands the sftp options over as snake_case keywords
    drv = open_driver(
        sshd.url(root),
        user=sshd.user,
        key_path=str(sshd.client_key),
        known_hosts_path=str(sshd.known_hosts),
        host_key=sshd.public_key(),
        timeout=5.0,
    )
    with drv:
        drv.put("k", b"v")
        assert drv.head("k").size == 1


# --- remote tree details ---------------------------------------------------------------------


def test_temp_files_symlinks_and_odd_names_are_not_listed(sshd, root: Path, tmp_path: Path) -> None:
    with sshd.driver(root) as drv:
        drv.put("a/real", b"1")
        (root / "a" / ".real.tmp-0123456789abcdef").write_bytes(b"partial")
        (root / "a" / "link").symlink_to(root / "a" / "real")
        (root / "a" / "back\\slash").write_bytes(b"x")
        os.mkfifo(root / "a" / "fifo")
        os.makedirs(root / "empty" / "nested")
        assert listing(drv) == ["a/real"]
        with pytest.raises(NotFound):
            drv.head("a/link")
        with pytest.raises(NotFound):
            drv.get("a/link")
        with pytest.raises(NotFound):
            drv.get("a/fifo")  # and does not block
        with pytest.raises(NotFound):
            drv.get("empty")  # a directory is not an object
        drv.delete("empty")
        assert (root / "empty").is_dir()


def test_listing_sweeps_temporary_files_a_day_old(sshd, root: Path) -> None:
    """An agent killed mid-put leaves its temporary file; a day later a listing removes it
    (a fresh one may belong to a put in progress, and stays)."""
    with sshd.driver(root) as drv:
        drv.put("a/real", b"1")
        old = root / "a" / ".real.tmp-00000000000000aa"
        fresh = root / "a" / ".real.tmp-00000000000000bb"
        old.write_bytes(b"cut")
        fresh.write_bytes(b"in progress")
        day_ago = time.time() - 24 * 3600 - 60
        os.utime(old, (day_ago, day_ago))
        assert listing(drv) == ["a/real"]
        assert not old.exists()
        assert fresh.exists()


def test_non_utf8_names_are_skipped(sshd, root: Path) -> None:
    with sshd.driver(root) as drv:
        drv.put("ok", b"1")
        with open(os.path.join(os.fsencode(root), b"bad-\xff"), "wb") as f:
            f.write(b"x")
        assert listing(drv) == ["ok"]


def test_put_creates_root_and_delete_prunes_to_it(sshd, root: Path) -> None:
    with sshd.driver(root) as drv:
        assert listing(drv) == []
        drv.put("a/b/c", b"1")
        drv.delete("a/b/c")
        assert root.is_dir() and os.listdir(root) == []
        assert temp_files(root) == []


def test_get_stream_closed_early_and_reused_sessions(sshd, root: Path) -> None:
    data = os.urandom(6 * MiB + 123)
    with sshd.driver(root) as drv:
        drv.put("big", data)
        for _ in range(20):  # each abandons a stream with reads in flight
            with drv.get("big") as stream:
                assert stream.read(1000) == data[:1000]
        with drv.get("big", offset=5 * MiB, length=MiB + 50) as stream:
            assert stream.read() == data[5 * MiB : 6 * MiB + 50]
        assert drv.get_bytes("big", offset=len(data) - 10) == data[-10:]
        assert drv.get_bytes("big") == data


def test_more_threads_than_server_sessions(sshd, root: Path) -> None:
    # OpenSSH allows 10 sessions per connection by default; 16 threads share them.
    with sshd.driver(root) as drv:

        def work(thread: int) -> None:
            for i in range(5):
                key = f"t{thread}/k{i}"
                drv.put(key, os.urandom(100_000))
                with drv.get(key) as stream:
                    time.sleep(0.01)  # hold the session a little
                    assert len(stream.read()) == 100_000

        with ThreadPoolExecutor(16) as pool:
            for future in [pool.submit(work, t) for t in range(16)]:
                future.result()
        assert len(listing(drv)) == 80


def test_server_refusals_are_not_transient(sshd) -> None:
    # Even root cannot make directories in sysfs (EPERM), nor files in /proc/1 (ENOENT).
    if not os.path.isdir("/sys/kernel") or not os.path.isdir("/proc/1"):
        pytest.skip("needs Linux /sys and /proc")
    with (
        sshd.driver("/sys/replicator-sftp-test") as drv,
        pytest.raises(PermissionDenied, match="cannot create /sys/replicator-sftp-test"),
    ):
        drv.put("k", b"1")
        assert [info.key for info in drv.list()] == []
    with sshd.driver("/proc/1") as drv, pytest.raises(StorageError) as caught:
        drv.put("k", b"1")
        assert not isinstance(caught.value, Transient)


# --- faults ------------------------------------------------------------------------------------


def test_sshd_killed_mid_put_raises_transient_then_reconnects(sshd, root: Path) -> None:
    with sshd.driver(root, timeout=5) as drv:
        drv.put("obj", b"old")
        stopped_at: list[float] = []

        def kill_at_4mib(total: int) -> None:
            if total >= 4 * MiB and not stopped_at:
                sshd.stop()
                stopped_at.append(time.monotonic())

        with pytest.raises(Transient) as caught:
            drv.put("obj", io.BytesIO(os.urandom(32 * MiB)), progress=kill_at_4mib)
        assert time.monotonic() - stopped_at[0] < 5, "Transient should come at once, not after the timeout"
        assert caught.value.key == "obj" and sshd.host_id in str(caught.value)
        # Nothing partial under the real name: the old object is intact on disk.
        assert (root / "obj").read_bytes() == b"old"

        with pytest.raises(Transient, match="cannot connect"):  # the server is down
            drv.head("obj")
        sshd.start()
        assert drv.get_bytes("obj") == b"old"
        assert listing(drv) == ["obj"]  # the left-over temporary file is never listed
        info = drv.put("obj", os.urandom(3 * MiB))
        assert info.size == 3 * MiB and drv.head("obj").size == 3 * MiB


def test_sshd_killed_mid_get_raises_transient(sshd, root: Path) -> None:
    data = os.urandom(20 * MiB)
    with sshd.driver(root, timeout=5) as drv:
        drv.put("obj", data)
        stream = drv.get("obj")
        assert stream.read(MiB) == data[:MiB]
        sshd.stop()
        start = time.monotonic()
        with pytest.raises(Transient):
            while stream.read(MiB):
                pass
        assert time.monotonic() - start < 5
        stream.close()
        sshd.start()
        assert drv.get_bytes("obj") == data


def test_frozen_sshd_mid_put_times_out(sshd, root: Path) -> None:
    timeout = 2.0
    with sshd.driver(root, timeout=timeout) as drv:
        drv.put("obj", b"old")
        frozen_at: list[float] = []

        def freeze_at_2mib(total: int) -> None:
            if total >= 2 * MiB and not frozen_at:
                sshd.freeze()
                frozen_at.append(time.monotonic())

        try:
            with pytest.raises(Transient) as caught:
                drv.put("obj", io.BytesIO(os.urandom(64 * MiB)), progress=freeze_at_2mib)
            waited = time.monotonic() - frozen_at[0]
            assert waited < 3 * timeout + 1, f"put hung for {waited:.1f}s"
            assert "obj" in str(caught.value)
            start = time.monotonic()
            with pytest.raises(Transient):  # a new connection gets no banner either
                drv.head("obj")
            assert time.monotonic() - start < 3 * timeout + 1
        finally:
            sshd.thaw()
        assert drv.get_bytes("obj") == b"old"
        drv.put("obj", b"new")
        assert drv.get_bytes("obj") == b"new"


class Blackhole:
    """A TCP proxy to sshd that, once cut, stops moving bytes either way: a dead link."""

    def __init__(self, port: int) -> None:
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = port
        self.cut = threading.Event()
        self.closed = threading.Event()
        self.sockets: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst) -> None:  # type: ignore[no-untyped-def]
        while not self.closed.is_set():
            if self.cut.is_set():
                time.sleep(0.05)
                continue
            try:
                src.settimeout(0.05)
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_dead_link_mid_put_is_bounded_by_the_timeout(sshd, root: Path) -> None:
    timeout = 2.0
    proxy = Blackhole(sshd.port)
    try:
        url = f"sftp://{sshd.user}@127.0.0.1:{proxy.port}{root}"
        opts = {"key_path": str(sshd.client_key), "host_key": sshd.public_key(), "timeout": timeout}
        with open_driver(url, **opts) as drv:
            drv.put("obj", b"old")
            cut_at: list[float] = []

            def cut_at_1mib(total: int) -> None:
                if total >= MiB and not cut_at:
                    proxy.cut.set()
                    cut_at.append(time.monotonic())

            with pytest.raises(Transient) as caught:
                drv.put("obj", io.BytesIO(os.urandom(64 * MiB)), progress=cut_at_1mib)
            assert caught.value.key == "obj"
            waited = time.monotonic() - cut_at[0]
            assert waited < 3 * timeout + 1, f"put hung for {waited:.1f}s on a dead link"
        assert (root / "obj").read_bytes() == b"old"
    finally:
        proxy.close()


def test_threads_queued_behind_a_failed_connect_fail_with_it(sshd, root: Path) -> None:
    timeout = 1.5
    with sshd.driver(root, timeout=timeout) as drv:
        sshd.freeze()  # TCP connects, but no SSH banner comes
        try:
            start = time.monotonic()

            def attempt(_: int) -> float:
                with pytest.raises(Transient):
                    drv.head("k")
                return time.monotonic() - start

            with ThreadPoolExecutor(8) as pool:
                took = list(pool.map(attempt, range(8)))
            assert max(took) < 2 * timeout + 1, f"threads waited one after another: {took}"
        finally:
            sshd.thaw()
        drv.put("k", b"v")  # and the next operation tries again


def test_a_send_that_makes_no_progress_gives_up() -> None:
    # paramiko retries a timed-out send for as long as the connection is open; the driver's
    # socket turns a peer that stopped reading into an error after stall_timeout.
    import errno
    import socket

    from replicas.sftp import _GuardedSocket

    a, b = socket.socketpair()
    guarded = _GuardedSocket(a.family, a.type, a.proto, fileno=a.detach())
    guarded.stall_timeout = 0.5
    guarded.settimeout(0.05)
    start = time.monotonic()
    try:
        with pytest.raises(OSError) as caught:
            while time.monotonic() - start < 10:  # what paramiko's Packetizer.write_all does
                try:
                    guarded.send(b"x" * 65536)
                except TimeoutError:
                    continue  # paramiko retries these
        assert caught.value.errno == errno.ECONNABORTED and not isinstance(caught.value, TimeoutError)
        assert 0.4 < time.monotonic() - start < 5
    finally:
        guarded.close()
        b.close()


def test_connection_dropped_while_idle_is_reestablished(sshd, root: Path) -> None:
    with sshd.driver(root) as drv:
        drv.put("k", b"1")
        with drv.get("k") as stream:
            assert stream.read() == b"1"  # an idle session is now pooled
        sshd.restart()  # drops every connection
        time.sleep(0.2)
        assert drv.get_bytes("k") == b"1"  # no error: reconnected transparently
        drv.put("k2", b"2")
        assert listing(drv) == ["k", "k2"]


def test_retrying_driver_rides_out_a_restart(sshd, root: Path) -> None:
    drv = RetryingDriver(sshd.driver(root, timeout=5), attempts=20, base_delay=0.05, max_delay=0.2)
    with drv:
        drv.put("k", b"1")
        restarter = threading.Timer(0.3, sshd.restart)
        sshd.stop()
        restarter.start()
        try:
            drv.put("k", b"2")  # fails while the server is down, succeeds once it is back
        finally:
            restarter.join()
        assert drv.get_bytes("k") == b"2"


def test_closed_driver_refuses_operations(sshd, root: Path) -> None:
    drv = sshd.driver(root)
    drv.put("k", b"1")
    drv.close()
    drv.close()
    with pytest.raises(StorageError, match="closed"):
        drv.head("k")
