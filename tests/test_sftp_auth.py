"""The sftp driver logging in with a password, against a real OpenSSH sshd.

The account is real: server_sftp.password_account() creates the local system account
replicator-sftp-test (no home, no login shell) and sets a random password for this module
(root only: without root these tests FAIL, they never skip). The sshd is one of this
module's own, which accepts that account with a password and only with a password
(`AuthenticationMethods password`), so a login that works here is a password login; it logs
at INFO, so its log shows which method was accepted. The client still verifies the host key
against known_hosts, as everywhere else.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("paramiko")

import server_sftp

from replicas import PermissionDenied, open_driver
from replicas.sftp import SFTPDriver

WRONG_PASSWORD = "wr0ng-Pa55word-that-must-never-leak"
Account = tuple[str, str] | str  # (user, password), or why the account could not be set up


@pytest.fixture(scope="module")
def account() -> Iterator[Account]:
    """(user, password) of the password account, or why it could not be set up."""
    with contextlib.ExitStack() as stack:
        try:
            account: Account = stack.enter_context(server_sftp.password_account())
        except RuntimeError as exc:  # not root, no useradd: each test fails with this reason
            account = f"cannot set up the password account: {exc}"
        yield account


@pytest.fixture(scope="module")
def pw_sshd(account: Account) -> Iterator[server_sftp.SSHServer]:
    missing = server_sftp.available()
    if missing:  # a missing server is a failure, never a skip
        pytest.fail(f"{missing}: run scripts/install-test-services.sh")
    server = server_sftp.SSHServer(password_users=(server_sftp.PASSWORD_USER,), log_level="INFO")
    server.start()
    yield server
    server.close()


@pytest.fixture
def remote(account: Account, tmp_path: Path) -> Iterator[Path]:
    """A directory the password account may write; the driver's root is below it."""
    if isinstance(account, str):
        yield tmp_path / "unused"  # the test fails in credentials() before using it
        return
    base = server_sftp.directory_owned_by(account[0])
    yield base / "remote"
    shutil.rmtree(base, ignore_errors=True)


def credentials(account: Account) -> tuple[str, str]:
    """(user, password); a test without them FAILS (CI runs as root), it never skips.
    Called in the test body, so the outcome is a test failure, not a setup error."""
    if isinstance(account, str):
        pytest.fail(account, pytrace=False)
    return account


def new_log(server: server_sftp.SSHServer, offset: int) -> str:
    """What sshd logged since offset (bytes)."""
    with open(server.log, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def wait_for_log(server: server_sftp.SSHServer, offset: int, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        logged = new_log(server, offset)
        if text in logged or time.monotonic() > deadline:
            return logged
        time.sleep(0.05)


def open_with_password(server: server_sftp.SSHServer, root: Path, user: str, password: str, where: str) -> SFTPDriver:
    """A driver that has a password and no key, with the password as an option or in the URL."""
    known = str(server.known_hosts)
    if where == "option":
        url = f"sftp://{user}@127.0.0.1:{server.port}{urllib.parse.quote(str(root))}"
        driver = open_driver(url, password=password, known_hosts_path=known, timeout=server_sftp.TIMEOUT)
    else:
        secret = urllib.parse.quote(password, safe="")
        url = f"sftp://{user}:{secret}@127.0.0.1:{server.port}{urllib.parse.quote(str(root))}"
        driver = open_driver(url, known_hosts_path=known, timeout=server_sftp.TIMEOUT)
    assert isinstance(driver, SFTPDriver)
    assert driver.key_path is None  # nothing but the password to log in with
    return driver


@pytest.mark.parametrize("where", ["option", "url"])
def test_password_login_round_trip(
    pw_sshd: server_sftp.SSHServer, account: Account, remote: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    user, password = credentials(account)
    caplog.set_level(logging.DEBUG)
    offset = pw_sshd.log.stat().st_size
    with open_with_password(pw_sshd, remote, user, password, where) as drv:
        assert password not in drv.url and password not in repr(drv)
        info = drv.put("dir/k1", b"first value")
        assert info.key == "dir/k1" and info.size == len(b"first value")
        drv.put("k2", b"")
        assert drv.get_bytes("dir/k1") == b"first value"
        assert drv.get_bytes("k2") == b""
        assert drv.head("dir/k1").size == len(b"first value")
        assert [i.key for i in drv.list()] == ["dir/k1", "k2"]
        assert [i.key for i in drv.list("dir/")] == ["dir/k1"]
        drv.delete("dir/k1")
        assert [i.key for i in drv.list()] == ["k2"]
        drv.delete("k2")
        assert list(drv.list()) == []
    logged = wait_for_log(pw_sshd, offset, f"Accepted password for {user}")
    assert f"Accepted password for {user} from 127.0.0.1" in logged
    assert "Accepted publickey" not in logged
    assert remote.exists() and not (remote / "dir").exists()  # delete pruned the empty directory
    assert password not in caplog.text


def test_files_belong_to_the_password_account(pw_sshd: server_sftp.SSHServer, account: Account, remote: Path) -> None:
    user, password = credentials(account)
    with open_with_password(pw_sshd, remote, user, password, "option") as drv:
        drv.put("a/b", b"payload")
        owner = (remote / "a" / "b").owner()
        assert owner == user
        assert (remote / "a" / "b").read_bytes() == b"payload"


def test_wrong_password_is_refused_without_showing_it(
    pw_sshd: server_sftp.SSHServer, account: Account, remote: Path, caplog: pytest.LogCaptureFixture
) -> None:
    user, password = credentials(account)
    caplog.set_level(logging.DEBUG)
    offset = pw_sshd.log.stat().st_size
    drv = open_with_password(pw_sshd, remote, user, WRONG_PASSWORD, "option")
    with drv, pytest.raises(PermissionDenied) as caught:
        drv.put("k", b"v")
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message  # one line
    assert "authentication" in message and f"{user!r}" in message and "password" in message
    assert pw_sshd.host_id in message
    chain = [caught.value, caught.value.__cause__, caught.value.__context__]
    for secret in (WRONG_PASSWORD, password):
        assert all(secret not in str(exc) for exc in chain if exc is not None)
        assert secret not in caplog.text
    assert "Failed password for" in wait_for_log(pw_sshd, offset, "Failed password for")
    assert not remote.exists()  # nothing was written


def test_wrong_password_in_url_is_refused_without_showing_it(
    pw_sshd: server_sftp.SSHServer, account: Account, remote: Path
) -> None:
    user, password = credentials(account)
    with open_with_password(pw_sshd, remote, user, WRONG_PASSWORD, "url") as drv:
        assert WRONG_PASSWORD not in drv.url
        with pytest.raises(PermissionDenied) as caught:
            list(drv.list())
    assert "authentication" in str(caught.value)
    assert WRONG_PASSWORD not in str(caught.value) and password not in str(caught.value)


def test_the_account_cannot_log_in_with_a_key(pw_sshd: server_sftp.SSHServer, account: Account, remote: Path) -> None:
    # The client key is in authorized_keys, but this account may only use a password: the
    # successful logins above can only have been password logins.
    user, _ = credentials(account)
    offset = pw_sshd.log.stat().st_size
    url = f"sftp://{user}@127.0.0.1:{pw_sshd.port}{urllib.parse.quote(str(remote))}"
    drv = open_driver(url, key_path=str(pw_sshd.client_key), known_hosts_path=str(pw_sshd.known_hosts), timeout=10)
    with drv, pytest.raises(PermissionDenied, match="authentication") as caught:
        drv.put("k", b"v")
    assert "server allows only password" in str(caught.value)
    assert "Accepted publickey" not in new_log(pw_sshd, offset)
    assert not remote.exists()


def test_host_key_is_checked_before_the_password_is_sent(
    pw_sshd: server_sftp.SSHServer, account: Account, remote: Path, tmp_path: Path
) -> None:
    user, password = credentials(account)
    # known_hosts lists an ed25519 key for the server, but not the server's.
    wrong_key = " ".join(Path(f"{pw_sshd.client_keys['ed25519']}.pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"{pw_sshd.host_id} {wrong_key}\n")
    offset = pw_sshd.log.stat().st_size
    url = f"sftp://{user}@127.0.0.1:{pw_sshd.port}{urllib.parse.quote(str(remote))}"
    drv = open_driver(url, password=password, known_hosts_path=str(known), timeout=10)
    with drv, pytest.raises(PermissionDenied, match="does not match") as caught:
        drv.put("k", b"v")
    assert password not in str(caught.value)
    time.sleep(0.5)  # let sshd write whatever it would log about this connection
    logged = new_log(pw_sshd, offset)
    assert f"password for {user}" not in logged  # neither accepted nor failed: never offered
    assert not remote.exists()
