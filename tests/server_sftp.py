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
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
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

    def __init__(self) -> None:
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
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
            "UsePAM no",
            "UseDNS no",
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
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


def _sftp_driver(tmp_path: Path):
    return server().driver(tmp_path / "sftp-root")  # not created yet: the first put makes it


FACTORIES = [("sftp", _sftp_driver)]
