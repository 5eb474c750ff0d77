"""A real nats-server with JetStream for the nats driver tests, started once per session.

`server()` starts the shared server lazily (127.0.0.1, a free port, its own store dir) and
stops it at exit; `stop()` / `restart()` act on it for fault tests (same port and store
dir, so data persists). `token_server()` is a second shared server requiring TOKEN.
`NatsServer` starts extra servers: with `--auth TOKEN`, or from a configuration file
(users, permissions, TLS). FACTORIES plugs the driver into the conformance
suite: factory(tmp_path) returns a fresh NATSDriver on a bucket of its own.

Nkey and decentralised (JWT) authentication: new_nkey() makes a key pair with the `nkeys`
package, nkey_config() is the configuration of a server whose users are nkeys, and
Operator is a whole trust chain made here (operator, system account, accounts with
JetStream, users), with the configuration of a server in operator mode (memory resolver)
and .creds files for its users. encode_jwt() signs the claims like the nats-io/jwt v2
library: base64url(header).base64url(claims).base64url(ed25519 signature by the issuer).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from replicas import open_driver
from replicas.nats import NATSDriver

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
READY_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NatsServer:
    """One nats-server process with JetStream, on 127.0.0.1 and a port of its own."""

    def __init__(self, *, token: str | None = None, config: str | None = None) -> None:
        self.token = token
        self.config = config  # nats-server configuration text (store_dir/listen are added)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="replicator-nats-"))
        self.store = self.dir / "store"
        self.log = self.dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"nats://{self.host}/{bucket}" + (f"/{prefix}" if prefix else "")

    def _command(self) -> list[str]:
        if self.config is not None:
            conf = self.dir / "server.conf"
            conf.write_text(
                f'listen: "127.0.0.1:{self.port}"\n'
                f'jetstream {{ store_dir: "{self.store}" }}\n' + self.config
            )
            return [NATS_SERVER, "-c", str(conf)]
        command = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)]
        if self.token:
            command += ["--auth", self.token]
        return command

    def start(self) -> None:
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                return
            with open(self.log, "ab") as out:
                self.process = subprocess.Popen(self._command(), stdout=out, stderr=subprocess.STDOUT)
            self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT
        offset = self.log.stat().st_size if self.log.exists() else 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            with open(self.log, "rb") as log:
                log.seek(max(0, offset - 200))
                started = b"Server is ready" in log.read()
            if started and _accepts(self.port):
                return
            time.sleep(0.02)
        raise RuntimeError(f"nats-server not ready on port {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        with self._lock:
            process, self.process = self.process, None
            if process is None or process.poll() is not None:
                return
            process.send_signal(signal.SIGTERM)  # a clean shutdown flushes JetStream
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


_shared: NatsServer | None = None
_shared_lock = threading.Lock()


def server() -> NatsServer:
    """The session's shared nats-server, started on first use and stopped at exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = NatsServer()
            atexit.register(_shared.cleanup)
        _shared.start()
        return _shared


TOKEN = "replicator-test-token-8f3a2c"
_token_shared: NatsServer | None = None


def token_server() -> NatsServer:
    """A second shared server that requires TOKEN (`--auth`), for authentication tests."""
    global _token_shared
    with _shared_lock:
        if _token_shared is None:
            _token_shared = NatsServer(token=TOKEN)
            atexit.register(_token_shared.cleanup)
        _token_shared.start()
        return _token_shared


def stop() -> None:
    """Stop the shared server (its port and store dir are kept for restart())."""
    if _shared is not None:
        _shared.stop()


def restart() -> None:
    """Restart the shared server on the same port and store dir: stored objects persist."""
    server().restart()


def unique_bucket(stem: str = "t") -> str:
    return f"{stem}_{uuid.uuid4().hex[:16]}"


def nats_driver(tmp_path: Path | None = None, **options: object) -> NATSDriver:
    """A fresh driver on a bucket of its own on the shared server."""
    driver = open_driver(server().url(unique_bucket()), **options)
    assert isinstance(driver, NATSDriver)
    return driver


FACTORIES = [("nats", nats_driver)]


# --- nkey and decentralised (JWT) authentication -----------------------------------------------


def new_nkey(kind: str) -> tuple[str, str]:
    """A fresh nkey (seed, public key); kind is "operator", "account" or "user"."""
    import nkeys

    prefix = {
        "operator": nkeys.PREFIX_BYTE_OPERATOR,
        "account": nkeys.PREFIX_BYTE_ACCOUNT,
        "user": nkeys.PREFIX_BYTE_USER,
    }[kind]
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed.decode(), nkeys.from_seed(bytearray(seed)).public_key.decode()


def nkey_config(*public_keys: str) -> str:
    """Server configuration: account APP with JetStream, whose users are these user nkeys."""
    users = "\n".join(f"      {{nkey: {key}}}" for key in public_keys)
    return f"accounts {{\n  APP {{\n    jetstream: enabled\n    users: [\n{users}\n    ]\n  }}\n}}\n"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def encode_jwt(kind: str, subject: str, issuer_seed: str, nats: dict, *, name: str, expires: int | None = None) -> str:
    """A NATS JWT (v2) of kind "operator", "account" or "user" about subject (a public
    key), signed by the nkey issuer_seed; nats holds the kind's own claims."""
    import nkeys

    issuer = nkeys.from_seed(bytearray(issuer_seed.encode()))
    claims: dict = {"iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name, "sub": subject}
    if expires is not None:
        claims["exp"] = expires
    # jti: a base32 SHA-512/256 of the standard claims, like nats-io/jwt's (servers do not recompute it)
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    claims["nats"] = {**nats, "type": kind, "version": 2}
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = issuer.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


def write_creds(path: Path, user_jwt: str, user_seed: str) -> Path:
    """A .creds file as `nsc` writes it: the user JWT, then the user's nkey seed."""
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n"
        "\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n"
        "\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed}\n"
        "------END USER NKEY SEED------\n"
        "\n"
        "*************************************************************\n"
    )
    path.chmod(0o600)
    return path


UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "conn": -1, "leaf": -1}
"""Account limits: no limit on anything (zero would mean none: no connection, no data)."""
JETSTREAM_UNLIMITED = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
"""JetStream limits of an account JWT; an account without storage limits has no JetStream."""


@dataclass
class Account:
    seed: str
    public_key: str
    jwt: str  # signed by the operator, or by a stranger for an untrusted account
    trusted: bool


@dataclass
class Operator:
    """A decentralised trust chain: an operator, its system account SYS and the accounts it
    signs (APP, with JetStream, to begin with); config() is the configuration of a server
    in operator mode that trusts it, with every trusted account preloaded into a memory
    resolver."""

    seed: str = field(init=False)
    public_key: str = field(init=False)
    accounts: dict[str, Account] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.seed, self.public_key = new_nkey("operator")
        self.add_account("SYS", jetstream=False)
        self.add_account("APP")

    def add_account(self, name: str, *, jetstream: bool = True, trusted: bool = True) -> Account:
        """Account `name`; trusted=False: signed by another operator and never preloaded,
        so the server knows nothing of it."""
        seed, public = new_nkey("account")
        limits = {**UNLIMITED, "wildcards": True, **(JETSTREAM_UNLIMITED if jetstream else {})}
        signer = self.seed if trusted else new_nkey("operator")[0]
        jwt = encode_jwt("account", public, signer, {"limits": limits}, name=name)
        self.accounts[name] = Account(seed, public, jwt, trusted)
        return self.accounts[name]

    def user(self, account: str = "APP", *, name: str = "replicator", expires: int | None = None) -> tuple[str, str]:
        """A new user of account: (user JWT signed by the account, user seed)."""
        seed, public = new_nkey("user")
        claims = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
        return encode_jwt("user", public, self.accounts[account].seed, claims, name=name, expires=expires), seed

    def creds(self, path: Path, account: str = "APP", *, expires: int | None = None) -> Path:
        """A .creds file for a new user of account."""
        return write_creds(path, *self.user(account, expires=expires))

    def config(self) -> str:
        system = self.accounts["SYS"].public_key
        operator_jwt = encode_jwt("operator", self.public_key, self.seed, {"system_account": system}, name="OP")
        preload = "".join(f"  {a.public_key}: {a.jwt}\n" for a in self.accounts.values() if a.trusted)
        return (
            f"operator: {operator_jwt}\n"
            f"system_account: {system}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{\n{preload}}}\n"
        )
