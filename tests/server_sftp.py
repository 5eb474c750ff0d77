"""A real OpenSSH sshd for the sftp driver's tests, started once per test session on first use.

The server listens on 127.0.0.1 on a free port with host keys generated into a temporary
directory (Ed25519, ECDSA and RSA) and accepts the current user with generated client keys
(Ed25519, ECDSA, RSA). Password authentication is switched on, but no password works: root
may log in with a key only (PermitRootLogin prohibit-password) and the tests set no
passwords. The client side always verifies the host key: `known_hosts` lists the server's
Ed25519 key as "[127.0.0.1]:PORT ssh-ed25519 ...".

FACTORIES = [("sftp", factory)] plugs the driver into the conformance suite; factory(tmp_path)
returns a driver rooted at a fresh remote directory (the remote side is this machine, so the
remote root is simply a local path below tmp_path). server() returns the running singleton;
stop(), restart(), freeze() and thaw() are for fault tests.

Password logins need a real account with a password: password_account() creates (once,
idempotently) the local account PASSWORD_USER, a system user without a home or a login
shell, gives it a fresh random password for the duration of a `with` block and locks the
password again afterwards (root only). SSHServer(password_users=(name,)) is an extra server
that accepts those users with a password and nothing else (`Match User` with
AuthenticationMethods password), everyone else as the shared server does minus passwords.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself, so it needs an absolute path
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
HOST = "127.0.0.1"
TIMEOUT = 10.0  # seconds; the driver's timeout in tests


def available() -> str | None:
    """Why the server cannot run here, or None when it can."""
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not installed (Debian package openssh-server)"
    if not os.access(SSH_KEYGEN, os.X_OK):
        return "ssh-keygen not installed (Debian package openssh-client)"
    return None


class SSHServer:
    """One sshd process with its own keys, config and known_hosts in a temporary directory."""

    def __init__(self, *, password_users: Sequence[str] = (), log_level: str = "ERROR") -> None:
        """password_users: accounts that log in with a password, and only with one (the
        others then get no password authentication at all); log_level: sshd's LogLevel
        (INFO logs every accepted or failed authentication to self.log)."""
        self.password_users = tuple(password_users)
        self.log_level = log_level
        self.dir = Path(tempfile.mkdtemp(prefix="replicator-sshd-"))
        self.user = pwd.getpwuid(os.geteuid()).pw_name  # sshd logs in the account we run as
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._lock = threading.RLock()
        self.host_keys: dict[str, Path] = {}  # type -> private key path
        self.client_keys: dict[str, Path] = {}
        for kind, bits in (("ed25519", None), ("ecdsa", "256"), ("rsa", "2048")):
            self.host_keys[kind] = self._keygen(f"host_{kind}", kind, bits)
            self.client_keys[kind] = self._keygen(f"client_{kind}", kind, bits)
        self.client_key = self.client_keys["ed25519"]
        (self.dir / "authorized_keys").write_text(
            "".join(Path(f"{path}.pub").read_text() for path in self.client_keys.values())
        )
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        self.known_hosts = self.dir / "known_hosts"

    def _keygen(self, name: str, kind: str, bits: str | None) -> Path:
        path = self.dir / name
        cmd = [SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", f"replicator-test-{name}", "-f", str(path)]
        if bits:
            cmd[4:4] = ["-b", bits]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        return path

    # --- keys as the client sees them ----------------------------------------------------

    def public_key(self, kind: str = "ed25519") -> str:
        """The server's host key of `kind` as "TYPE BASE64" (no comment)."""
        return " ".join(Path(f"{self.host_keys[kind]}.pub").read_text().split()[:2])

    @property
    def host_id(self) -> str:
        """The server's name in known_hosts: [127.0.0.1]:PORT."""
        return f"[{HOST}]:{self.port}"

    def write_known_hosts(self, path: Path, *kinds: str, host_id: str | None = None) -> Path:
        """A known_hosts file listing this server's host keys of kinds (default: ed25519)."""
        lines = [f"{host_id or self.host_id} {self.public_key(kind)}\n" for kind in kinds or ("ed25519",)]
        path.write_text("".join(lines))
        return path

    def url(self, root: str | os.PathLike[str]) -> str:
        return f"sftp://{self.user}@{HOST}:{self.port}{urllib.parse.quote(os.fspath(root))}"

    def driver(self, root: str | os.PathLike[str], **options: object):
        """An sftp driver on this server rooted at root (a remote, i.e. local, directory)."""
        from replicas import open_driver

        defaults = {"key_path": str(self.client_key), "known_hosts_path": str(self.known_hosts), "timeout": TIMEOUT}
        return open_driver(self.url(root), **{**defaults, **options})

    # --- process control ------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return
            if os.geteuid() == 0:
                os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
            attempts = 1 if self.port else 5  # a restart keeps its port
            for attempt in range(attempts):
                port = self.port or _free_port()
                self._write_config(port)
                with open(self.log, "ab") as log:
                    self.proc = subprocess.Popen(
                        [SSHD, "-D", "-e", "-f", str(self.config)],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                    )
                if _wait_for_port(port, self.proc, deadline=time.monotonic() + 15):
                    self.port = port
                    self.write_known_hosts(self.known_hosts)
                    return
                self._kill_tree()
            raise RuntimeError(f"sshd did not start on 127.0.0.1: {self.log.read_text(errors='replace')[-2000:]}")

    def _write_config(self, port: int) -> None:
        lines = [
            f"Port {port}",
            f"ListenAddress {HOST}",
            *(f"HostKey {path}" for path in self.host_keys.values()),
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "PubkeyAuthentication yes",
            # The shared server takes passwords but none works (see the module docstring);
            # a server with password_users takes them from those users only.
            f"PasswordAuthentication {'no' if self.password_users else 'yes'}",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
            "UsePAM no",  # passwords are checked against /etc/shadow
            "UseDNS no",
            "Subsystem sftp internal-sftp",
            f"LogLevel {self.log_level}",
        ]
        if self.password_users:  # Match blocks come last: they run to the end of the file
            lines += [
                f"Match User {','.join(self.password_users)}",
                "    PasswordAuthentication yes",
                "    AuthenticationMethods password",
            ]
        self.config.write_text("\n".join(lines) + "\n")

    def stop(self) -> None:
        """Kill sshd and every session it forked, so open connections drop at once."""
        with self._lock:
            self._kill_tree()

    def restart(self) -> None:
        """Stop, then start again on the same port with the same keys."""
        with self._lock:
            self._kill_tree()
            self.start()

    def freeze(self) -> None:
        """SIGSTOP sshd and its sessions: connections stay open but nothing answers."""
        with self._lock:
            for pid in self._tree():
                _signal(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        with self._lock:
            for pid in self._tree():
                _signal(pid, signal.SIGCONT)

    def _tree(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *_descendants(self.proc.pid)]

    def _kill_tree(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal(proc.pid, signal.SIGSTOP)  # accept no new connection while we collect
            for pid in _descendants(proc.pid):
                _signal(pid, signal.SIGKILL)
            _signal(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((HOST, port), timeout=1) as sock:
                sock.settimeout(2)
                if sock.recv(4) == b"SSH-":  # the banner: sshd itself answers
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _descendants(root: int) -> list[int]:
    """Every process below root (from /proc), children before their parents' siblings."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


_server: SSHServer | None = None
_server_lock = threading.Lock()


def server() -> SSHServer:
    """The session's sshd, started on first use (scripts/install-test-services.sh installs it)."""
    global _server
    with _server_lock:
        if _server is None:
            missing = available()
            if missing:  # a missing server is a failure, never a skip
                raise RuntimeError(f"{missing}: run scripts/install-test-services.sh")
            _server = SSHServer()
            atexit.register(_server.close)
        _server.start()  # also brings it back if a test left it stopped
        return _server


def stop() -> None:
    """Stop the session's sshd if it runs (server() starts it again)."""
    if _server is not None:
        _server.stop()


def restart() -> None:
    server().restart()


# --- a local account that logs in with a password --------------------------------------------

PASSWORD_USER = "replicator-sftp-test"
_ACCOUNT_LOCK = Path(tempfile.gettempdir()) / "replicator-sftp-password-account.lock"
_ACCOUNT_LOCK_TIMEOUT = 300.0  # seconds another test session may hold the account


@contextlib.contextmanager
def password_account(name: str = PASSWORD_USER) -> Iterator[tuple[str, str]]:
    """(name, password): the local account `name`, created if missing, with a fresh random
    password until the block ends; then its password is locked again.

    Needs root (useradd, chpasswd) and raises RuntimeError saying so otherwise. Test
    sessions running at the same time take turns (a lock file), so none resets the
    password under another.
    """
    if os.geteuid() != 0:
        raise RuntimeError(
            f"password login tests need the local account {name!r} with a password set by the tests,"
            f" which takes root (useradd, chpasswd); running as uid {os.geteuid()}: run the tests as root"
        )
    for tool in ("useradd", "chpasswd", "usermod"):
        if shutil.which(tool) is None and not os.access(f"/usr/sbin/{tool}", os.X_OK):
            raise RuntimeError(f"{tool} not installed (Debian package passwd): cannot set up the account {name!r}")
    fd = os.open(_ACCOUNT_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + _ACCOUNT_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"another test session has held {_ACCOUNT_LOCK} for {_ACCOUNT_LOCK_TIMEOUT:g}s"
                    ) from None
                time.sleep(0.2)
        _ensure_account(name)
        password = secrets.token_urlsafe(24)
        _run_admin(["chpasswd"], f"{name}:{password}\n")  # on stdin: never on a command line
        try:
            yield name, password
        finally:
            _run_admin(["usermod", "--lock", name])  # no known password outlives the tests
    finally:
        os.close(fd)  # releases the lock


def _ensure_account(name: str) -> None:
    """Create the system account `name` (no home directory, no login shell) unless it exists."""
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    nologin = next(
        (p for p in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false") if os.access(p, os.X_OK)), "/bin/false"
    )
    result = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            nologin,
            "--comment",
            "replicator sftp password-login tests",
            name,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        pwd.getpwnam(name)  # also fine if a concurrent useradd won the race
    except KeyError:
        raise RuntimeError(f"useradd {name} failed ({result.returncode}): {result.stderr.strip()}") from None


def _run_admin(command: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(command, check=False, input=stdin, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:  # the command line holds no secret; stdin is not shown
        raise RuntimeError(
            f"{command[0]} {' '.join(command[1:])} failed ({result.returncode}): {result.stderr.strip()}"
        )


def directory_owned_by(name: str) -> Path:
    """A fresh directory below the system temp dir owned by the account `name` (mode 0700),
    for a remote root that account can write. The caller removes it."""
    entry = pwd.getpwnam(name)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def _sftp_driver(tmp_path: Path):
    return server().driver(tmp_path / "sftp-root")  # not created yet: the first put makes it


FACTORIES = [("sftp", _sftp_driver)]
