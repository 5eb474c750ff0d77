"""Security properties, end to end with real processes (tests/harness.py) and real servers
(rclone serve s3, OpenSSH sshd, nats-server):

- secrets (S3 secret key and session token from ${ENV}, SFTP passwords, NATS tokens) never
  reach the agent's log, /metrics, /status, /readyz, `replicator status`, listings or the
  errors of failing commands, in clear, URL-encoded, JSON-escaped, hex or base64 form;
- a hostile replica (symlinks to local files, `..` and absolute keys, unsafe database paths
  under a dir: entry, crafted artefacts) cannot make restore write outside its output or
  read a local file;
- an SFTP server whose host key changed is refused by `replicate` and `restore`;
- TLS certificates are verified by default for S3 and NATS; skip-verify disables that with a
  warning, and a CA (SSL_CERT_FILE, tls-ca-path) makes a private certificate work;
- a config file holding literal secrets that others can read gets a warning.

Tests that pin a bug found here are strict xfails: they fail (XPASS) once it is fixed.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import server_nats
import server_s3
import server_sftp
from harness import AgentProcess, checkpoint, cli, integrity, wait_for, write

from replicas.s3 import S3Driver
from replicator import artefact as A
from replicator import keys

# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def secret_forms(secret: str) -> dict[str, str]:
    """Every form of a secret worth searching for: as is, URL-encoded (both ways),
    JSON-escaped, hex, and base64 (standard and URL-safe) at each of the three byte
    alignments it can take inside a longer encoded string (only the characters that
    depend on the secret alone)."""
    raw = secret.encode()
    forms = {
        "clear": secret,
        "url-encoded": urllib.parse.quote(secret, safe=""),
        "url-encoded (plus)": urllib.parse.quote_plus(secret),
        "url-encoded (path)": urllib.parse.quote(secret),
        "json": json.dumps(secret)[1:-1],
        "hex": raw.hex(),
    }
    for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
        for k in range(3):
            encoded = encode(b"\0" * k + raw).decode().rstrip("=")
            start, end = -(-8 * k // 6), (8 * (k + len(raw))) // 6
            forms[f"{name} (offset {k})"] = encoded[start:end]
    return forms


def assert_no_secrets(outputs: dict[str, str], secrets: dict[str, str]) -> None:
    leaks = []
    for source, text in outputs.items():
        for secret_name, secret in secrets.items():
            for form, needle in secret_forms(secret).items():
                if needle and needle in text:
                    leaks.append(f"{secret_name} ({form}) in {source}")
    assert not leaks, "secrets leaked: " + "; ".join(leaks)


def assert_one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    """A failed command: non-zero exit, no traceback, the error is its last stderr line."""
    assert p.returncode != 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines, "no error message"
    last = lines[-1]
    assert last.startswith("replicator: "), p.stderr
    for word in words:
        assert word in last, (word, last)
    return last


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for 127.0.0.1, and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def tree(root: Path) -> set[str]:
    """Every path below root (relative), to see what a command created."""
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def status_of(port: int) -> dict:
    code, body = http_get(f"http://127.0.0.1:{port}/status")
    assert code == 200, body
    return json.loads(body)


def replica_status(port: int, name: str) -> dict:
    [db] = status_of(port)["databases"]
    return next(r for r in db["replicas"] if r["name"] == name)


# --------------------------------------------------------------------------- secrets


def test_secrets_never_appear_in_logs_metrics_status_or_errors(tmp_path, monkeypatch):
    s3 = server_s3.server()
    ssh = server_sftp.server()
    nats = server_nats.token_server()
    good_bucket, bad_bucket = server_s3.new_bucket_name(), server_s3.new_bucket_name()
    for bucket in (good_bucket, bad_bucket):
        s3.driver("warmup", bucket=bucket).close()  # creates the bucket
    tag = uuid.uuid4().hex[:12]
    secrets = {
        "S3 secret-access-key": s3.secret,
        "S3 session-token": f"IQoJb3JpZ2luX2VjE/Sess+Tok=en{tag}",
        "S3 wrong secret-access-key": f"wrong/Secret+Key={tag}WRONGwrong",
        "SFTP password (with a key)": f"sftp-Pass/+w0rd:{tag}",
        "SFTP wrong password": f"sftp-Wrong/+Pass@{tag}",
        "NATS token": server_nats.TOKEN,
        "NATS wrong token": f"nats-Wrong-Tok/en+{tag}",
    }
    monkeypatch.setenv("S3_SECRET", secrets["S3 secret-access-key"])
    monkeypatch.setenv("S3_TOKEN", secrets["S3 session-token"])
    monkeypatch.setenv("S3_BAD_SECRET", secrets["S3 wrong secret-access-key"])
    monkeypatch.setenv("NATS_TOKEN", secrets["NATS token"])
    monkeypatch.setenv("NATS_BAD_TOKEN", secrets["NATS wrong token"])
    db = tmp_path / "app.db"
    write(db, [["schema"], ["insert", 10, 200]])
    port = free_port()
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(
        f"""metrics-addr: 127.0.0.1:{port}
dbs:
  - path: {db}
    replicas:
      - name: local
        url: file://{tmp_path}/local
      - name: s3-good
        url: s3://{good_bucket}/app
        endpoint: {s3.endpoint}
        region: us-east-1
        access-key-id: {s3.access}
        secret-access-key: ${{S3_SECRET}}
        session-token: ${{S3_TOKEN}}
      - name: s3-bad
        url: s3://{bad_bucket}/app
        endpoint: {s3.endpoint}
        region: us-east-1
        access-key-id: {s3.access}
        secret-access-key: ${{S3_BAD_SECRET}}
        session-token: ${{S3_TOKEN}}
      - name: sftp-good
        url: {ssh.url(tmp_path / 'sftp-good')}
        key-path: {ssh.client_key}
        known-hosts-path: {ssh.known_hosts}
        password: '{secrets["SFTP password (with a key)"]}'
      - name: sftp-bad
        url: {ssh.url(tmp_path / 'sftp-bad')}
        known-hosts-path: {ssh.known_hosts}
        password: '{secrets["SFTP wrong password"]}'
      - name: nats-good
        url: nats://{nats.host}/{server_nats.unique_bucket()}/app
        token: ${{NATS_TOKEN}}
      - name: nats-bad
        url: nats://{nats.host}/{server_nats.unique_bucket()}/app
        token: ${{NATS_BAD_TOKEN}}
"""
    )
    cfg.chmod(0o600)
    good, bad = ["local", "s3-good", "sftp-good", "nats-good"], ["s3-bad", "sftp-bad", "nats-bad"]
    outputs: dict[str, str] = {}
    log = tmp_path / "agent.log"
    with AgentProcess("-c", str(cfg), log=log) as agent:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: all(replica_status(port, n)["txid"] is not None for n in good), timeout=90, what="the good replicas")
        wait_for(lambda: all(replica_status(port, n)["last_error"] for n in bad), timeout=90, what="errors from the bad replicas")
        write(db, [["insert", 5, 100]])
        for path in ("/metrics", "/status", "/readyz", "/healthz"):
            outputs[f"GET {path}"] = http_get(base + path)[1]
        for args in (("status", "--json"), ("status",)):
            p = cli(*args, "-c", str(cfg))
            outputs[f"replicator {' '.join(args)}"] = p.stdout + p.stderr
            if "--json" in args:
                status_json = json.loads(p.stdout)
        for name in good + bad:
            for command in (("generations",), ("generations", "--json"), ("snapshots", "--json"), ("segments", "--json")):
                p = cli(*command, "-c", str(cfg), "--replica", name, str(db), timeout=120)
                outputs[f"replicator {' '.join(command)} --replica {name}"] = p.stdout + p.stderr
                if name in bad:
                    assert_one_line_error(p, name.split("-")[0])
                else:
                    assert p.returncode == 0, p.stderr
        for name in bad:
            p = cli("restore", "-c", str(cfg), "--replica", name, "-o", str(tmp_path / f"from-{name}.db"), str(db), timeout=120)
            outputs[f"replicator restore --replica {name}"] = p.stdout + p.stderr
            assert_one_line_error(p)
            assert not (tmp_path / f"from-{name}.db").exists()
        p = cli("verify", "--json", "--wait", "0", "-c", str(cfg), str(db), timeout=300)
        outputs["replicator verify --json"] = p.stdout + p.stderr
        readyz_code = http_get(base + "/readyz")[0]
        assert agent.stop() == 0
    outputs["agent log"] = log.read_text(errors="replace")
    assert readyz_code == 503  # the bad replicas are failing, and say so...
    [dbs] = status_json["databases"]
    errors = {r["name"]: r["last_error"] for r in dbs["replicas"]}
    assert all(errors[n] for n in bad) and not any(errors[n] for n in good), errors
    assert_no_secrets(outputs, secrets)  # ...without giving any secret away



# --------------------------------------------------------------------------- hostile replicas

GEN = "20261122T171656939519Z-ea5f"


def snapshot_of(tmp_path: Path, rows: int = 3) -> tuple[bytes, bytes]:
    """A valid snapshot artefact of a real database (txid 1), and the database's bytes."""
    src = tmp_path / f"src-{uuid.uuid4().hex[:6]}.db"
    write(src, [["schema"], ["insert", rows, 64]])
    checkpoint(src)
    image = src.read_bytes()
    page_size = int.from_bytes(image[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    return A.encode_snapshot(GEN, 1, page_size, image, commit_time=time.time()), image


SNAPSHOT_KEY = keys.snapshot_key(GEN, 1, 1_795_000_000_000)


def restore_cmd(replica: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("restore", "--log-format", "json", *extra, "-o", str(out), f"file://{replica}", timeout=120)


def test_a_valid_replica_restores(tmp_path):
    """The control for the hostile cases below: the same artefact as a regular file restores."""
    art, _ = snapshot_of(tmp_path)
    replica = tmp_path / "replica"
    (replica / SNAPSHOT_KEY).parent.mkdir(parents=True)
    (replica / SNAPSHOT_KEY).write_bytes(art)
    out = tmp_path / "out" / "restored.db"
    p = restore_cmd(replica, out)
    assert p.returncode == 0, p.stderr
    assert integrity(out) == "ok"


@pytest.mark.parametrize(
    "link",
    [
        "snapshot -> /etc/passwd",
        "snapshot -> a local file holding a valid snapshot",
        "snapshot -> a local secret file",
        "generation dir -> a directory outside the replica",
        "generations dir -> a directory outside the replica",
        "snapshots dir -> /etc",
    ],
)
def test_symlinks_in_a_file_replica_are_not_followed(tmp_path, link):
    art, _ = snapshot_of(tmp_path)
    marker = f"LOCAL-SECRET-{uuid.uuid4().hex}"
    outside = tmp_path / "outside"  # what the replica points at: a file or tree of the host
    outside.mkdir()
    (outside / "secret.txt").write_text(marker + "\n")
    (outside / "valid.snapshot").write_bytes(art)
    elsewhere = outside / "elsewhere"
    (elsewhere / "generations" / GEN / "snapshots").mkdir(parents=True)
    (elsewhere / SNAPSHOT_KEY).write_bytes(art)  # a whole valid replica tree outside
    replica = tmp_path / "replica"
    key = replica / SNAPSHOT_KEY
    key.parent.mkdir(parents=True)
    if link == "snapshot -> /etc/passwd":
        key.symlink_to("/etc/passwd")
        needles = [line for line in Path("/etc/passwd").read_text().splitlines()[:3] if line]
    elif link == "snapshot -> a local file holding a valid snapshot":
        key.symlink_to(outside / "valid.snapshot")
        needles = [marker]
    elif link == "snapshot -> a local secret file":
        key.symlink_to(outside / "secret.txt")
        needles = [marker]
    elif link == "generation dir -> a directory outside the replica":
        shutil.rmtree(replica / "generations" / GEN)
        (replica / "generations" / GEN).symlink_to(elsewhere / "generations" / GEN, target_is_directory=True)
        needles = [marker]
    elif link == "generations dir -> a directory outside the replica":
        shutil.rmtree(replica / "generations")
        (replica / "generations").symlink_to(elsewhere / "generations", target_is_directory=True)
        needles = [marker]
    else:
        shutil.rmtree(key.parent)
        key.parent.symlink_to("/etc", target_is_directory=True)
        needles = [line for line in Path("/etc/passwd").read_text().splitlines()[:3] if line]
    before = tree(tmp_path)
    out_dir = tmp_path / "out"
    out = out_dir / "restored.db"
    outputs = {}
    p = restore_cmd(replica, out)
    outputs["restore"] = p.stdout + p.stderr
    assert_one_line_error(p)
    for command in ("generations", "snapshots"):
        q = cli(command, "--json", f"file://{replica}")
        outputs[command] = q.stdout + q.stderr
        assert "Traceback" not in q.stderr
        if q.returncode == 0:
            assert json.loads(q.stdout) == [], f"{command} lists what a symlink points at"
    q = cli("restore", "--dry-run", "-o", str(out), f"file://{replica}")
    outputs["restore --dry-run"] = q.stdout + q.stderr
    assert q.returncode != 0 and "Traceback" not in q.stderr
    # nothing was created anywhere but an empty output directory, no local content was shown
    assert not out.exists()
    assert tree(tmp_path) - before <= {"out"} and tree(out_dir) == set()
    for source, text in outputs.items():
        for needle in needles:
            assert needle not in text, f"local file content in the output of {source}"


@pytest.fixture
def in_process_cli():
    """replicator.cli.main, run in this process; the logging set-up it changes is put back."""
    import structlog

    from replicator import logs
    from replicator.cli import main

    saved, fmt = structlog.get_config(), logs._format
    yield main
    structlog.configure(**saved)
    logs._format = fmt


@pytest.fixture
def mem_stores():
    """Named mem:// stores for a test, filled behind the driver's back and forgotten after."""
    from replicas import mem
    from replicas.mem import MemDriver

    names: list[str] = []

    def store(name: str):
        names.append(name)
        return MemDriver(name)._store

    yield store
    with mem._stores_lock:
        for name in names:
            mem._stores.pop(name, None)


HOSTILE_KEYS = [
    "generations/../../x",
    "generations/../../../../tmp/escaped.db",
    "/etc/passwd",
    "/generations/" + GEN + "/snapshots/" + SNAPSHOT_KEY.rsplit("/", 1)[1],
    "generations/" + GEN + "/snapshots/../../../../escaped.snapshot",
    "generations/" + GEN + "/snapshots/" + SNAPSHOT_KEY.rsplit("/", 1)[1] + "/../../x",
    "generations//snapshots/" + SNAPSHOT_KEY.rsplit("/", 1)[1],
    "generations/" + GEN + "/snapshots/./" + SNAPSHOT_KEY.rsplit("/", 1)[1],
    "generations\\..\\..\\x",
    "generations/" + GEN + "/snapshots/\x00" + SNAPSHOT_KEY.rsplit("/", 1)[1],
]


def test_hostile_keys_in_an_object_store_are_never_used(tmp_path, capsys, mem_stores, in_process_cli):
    """An object store can hold any key (S3 does): `..`, absolute and odd keys, each holding
    a valid snapshot. None may be planned, fetched or mapped to a path. (A mem:// store,
    filled behind the driver's back, stands for such a bucket; the CLI runs in-process.)"""
    main = in_process_cli
    art, _ = snapshot_of(tmp_path)
    name = f"hostile-{uuid.uuid4().hex}"
    store = mem_stores(name)
    for key in HOSTILE_KEYS:
        store.objects[key] = (art, time.time())
    out = tmp_path / "out" / "restored.db"
    before = tree(tmp_path)
    for argv in (
        ["restore", "-o", str(out), f"mem://{name}"],
        ["restore", "--dry-run", "-o", str(out), f"mem://{name}"],
        ["generations", f"mem://{name}"],
        ["snapshots", "--json", f"mem://{name}"],
    ):
        code = main(argv)
        captured = capsys.readouterr()
        if argv[0] == "restore":
            assert code == 1, captured
            assert captured.err.strip().splitlines()[-1].startswith("replicator: nothing to restore")
        else:
            assert code == 0 and ("[]" in captured.out or "no generations" in captured.out), captured
    assert not out.exists() and tree(tmp_path) - before <= {"out"}
    assert not Path("/tmp/escaped.db").exists()


def test_unsafe_database_paths_under_a_dir_entry_are_refused(tmp_path, capsys, mem_stores, in_process_cli):
    """`restore -c FILE DIR` maps `<rel>/generations/...` keys to DIR/<rel>: a rel with `..`,
    an absolute one, a backslash or a control character is refused, the safe one restored,
    and nothing is written outside DIR."""
    main = in_process_cli
    art, _ = snapshot_of(tmp_path)
    name = f"hostile-dir-{uuid.uuid4().hex}"
    store = mem_stores(name)
    tag = uuid.uuid4().hex[:8]
    unsafe = [
        f"../escape-{tag}.db",
        f"a/../../escape-{tag}.db",
        f"/tmp/escape-{tag}.db",
        f"..\\escape-{tag}.db",
        f"sub//escape-{tag}.db",
        f"./escape-{tag}.db",
        f"bad\nname-{tag}.db",
    ]
    for rel in ["ok.db", *unsafe]:
        store.objects[f"{rel}/{SNAPSHOT_KEY}"] = (art, time.time())
    ok_store = mem_stores(f"{name}/ok.db")  # mem://NAME/ok.db, as join_url addresses it
    ok_store.objects[SNAPSHOT_KEY] = (art, time.time())
    tenants = tmp_path / "root" / "tenants"
    tenants.mkdir(parents=True)
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"dbs:\n  - dir: {tenants}\n    recursive: true\n    replicas:\n      - url: mem://{name}\n")
    before = tree(tmp_path)
    code = main(["restore", "-c", str(cfg), str(tenants)])
    captured = capsys.readouterr()
    assert code == 1, captured  # refusals count as failures
    refused = [line for line in captured.out.splitlines() if line.startswith("refused")]
    assert len(refused) == len(unsafe), captured.out
    assert re.search(r"^restored ok\.db -> ", captured.out, re.MULTILINE), captured.out
    created = tree(tmp_path) - before
    assert created == {"root/tenants/ok.db"}, created
    assert integrity(tenants / "ok.db") == "ok"
    assert not list(Path("/tmp").glob(f"escape-{tag}*"))


def test_dir_restore_does_not_follow_a_symlink_in_the_output(tmp_path):
    """A database path that is safe on the replica but lands on a symlink in the output
    directory (pointing outside it) is refused; nothing is written through the link."""
    art, _ = snapshot_of(tmp_path)
    replica = tmp_path / "replica"
    for rel in ("tenants/a.db", "b.db"):
        (replica / rel / SNAPSHOT_KEY).parent.mkdir(parents=True)
        (replica / rel / SNAPSHOT_KEY).write_bytes(art)
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "tenants").symlink_to(outside, target_is_directory=True)
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"dbs:\n  - dir: {tmp_path}/data\n    recursive: true\n    replicas:\n      - url: file://{replica}\n")
    p = cli("restore", "-c", str(cfg), "-o", str(out), str(tmp_path / "data"), timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert re.search(r"^refused  tenants/a\.db: unsafe path", p.stdout, re.MULTILINE), p.stdout
    assert re.search(r"^restored b\.db -> ", p.stdout, re.MULTILINE), p.stdout
    assert list(outside.iterdir()) == []


def test_a_replica_with_an_odd_generation_id_is_listed_or_refused_in_one_line(tmp_path):
    art, _ = snapshot_of(tmp_path)
    replica = tmp_path / "replica"
    key = replica / "generations" / "99999999T999999999999Z-abcd" / "snapshots" / SNAPSHOT_KEY.rsplit("/", 1)[1]
    key.parent.mkdir(parents=True)
    key.write_bytes(art)
    p = cli("generations", f"file://{replica}")
    assert "Traceback" not in p.stderr, p.stderr


def _crafted_segment_replica(tmp_path: Path, page_size: int, pages, db_pages: int | None = None) -> Path:
    """A replica holding a valid snapshot of a real database and a segment with crafted,
    correctly checksummed transactions (what a hostile replica can write)."""
    src = tmp_path / "src.db"
    write(src, [["schema"], ["insert", 3, 64]], page_size=page_size)
    checkpoint(src)
    image = src.read_bytes()
    n = len(image) // page_size
    replica = tmp_path / "replica"
    snap = A.encode_snapshot(GEN, 1, page_size, image, commit_time=1.0)
    (replica / SNAPSHOT_KEY).parent.mkdir(parents=True)
    (replica / SNAPSHOT_KEY).write_bytes(snap)
    seg = A.encode_segment(GEN, page_size, [(2, n if db_pages is None else db_pages, 2.0, A.db_checksum_of_image(image, page_size), pages)])
    seg_key = replica / keys.segment_key(GEN, 2, 2, 1_795_000_000_001)
    seg_key.parent.mkdir(parents=True)
    seg_key.write_bytes(seg)
    return replica


def test_a_crafted_page_number_is_a_one_line_error(tmp_path):
    replica = _crafted_segment_replica(tmp_path, 65536, [(2**32 - 2, bytes(65536))])
    out = tmp_path / "out" / "restored.db"
    p = restore_cmd(replica, out)
    assert not out.exists()
    assert_one_line_error(p)


@pytest.mark.timeout(120)
def test_a_crafted_database_size_is_refused_promptly(tmp_path):
    replica = _crafted_segment_replica(tmp_path, 4096, [], db_pages=2**31)
    out = tmp_path / "out" / "restored.db"
    try:
        p = cli("restore", "-o", str(out), f"file://{replica}", timeout=10)
    finally:
        for leftover in (tmp_path / "out").glob(".*tmp*"):
            leftover.unlink()  # the killed restore leaves its sparse temp file
    assert not out.exists()
    assert_one_line_error(p)


# --------------------------------------------------------------------------- SFTP host key


def test_sftp_replica_whose_host_key_changed_is_refused_by_replicate_and_restore(tmp_path):
    """known_hosts holds another key for the server (it was replaced, or someone is in the
    middle): replicate and restore refuse with one clear line, and nothing is uploaded.
    (The driver-level refusal is in test_sftp_driver.py; this is the CLI with a config.)"""
    ssh = server_sftp.server()
    known = tmp_path / "known_hosts"
    other_key = " ".join(Path(f"{ssh.client_keys['ed25519']}.pub").read_text().split()[:2])  # an ed25519 key, not the host's
    known.write_text(f"{ssh.host_id} {other_key}\n")
    remote = tmp_path / "remote"
    db = tmp_path / "app.db"
    write(db, [["schema"], ["insert", 5, 100]])
    port = free_port()
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(
        f"""metrics-addr: 127.0.0.1:{port}
dbs:
  - path: {db}
    replicas:
      - name: local
        url: file://{tmp_path}/local
      - name: sftp
        url: {ssh.url(remote)}
        key-path: {ssh.client_key}
        known-hosts-path: {known}
"""
    )
    refusal = f"host key for {ssh.host_id} does not match {known}"
    log = tmp_path / "agent.log"
    with AgentProcess("-c", str(cfg), log=log) as agent:
        wait_for(lambda: replica_status(port, "local")["txid"] is not None, timeout=60, what="the local replica")
        wait_for(lambda: replica_status(port, "sftp")["last_error"], timeout=60, what="the sftp refusal")
        error = replica_status(port, "sftp")["last_error"]
        assert refusal in error and "refusing to connect" in error and "\n" not in error, error
        assert replica_status(port, "sftp")["txid"] is None
        assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 503
        assert agent.stop() == 0
    text = log.read_text()
    assert refusal in text
    assert not remote.exists(), "something was uploaded to a server whose host key is wrong"
    out = tmp_path / "restored.db"
    p = cli("restore", "-c", str(cfg), "--replica", "sftp", "-o", str(out), str(db), timeout=120)
    assert refusal in assert_one_line_error(p, "refusing to connect")
    # the same with the replica given as a URL (options in its query)
    url = f"{ssh.url(remote)}?key_path={ssh.client_key}&known_hosts_path={known}"
    p = cli("restore", "-o", str(out), url, timeout=120)
    assert refusal in assert_one_line_error(p, "refusing to connect")
    assert not out.exists() and not remote.exists()


# --------------------------------------------------------------------------- TLS


def _run_agent_until(tmp_path: Path, cfg: Path, port: int, replica: str, condition, what: str) -> str:
    log = tmp_path / f"agent-{uuid.uuid4().hex[:6]}.log"
    with AgentProcess("-c", str(cfg), log=log) as agent:
        try:
            wait_for(lambda: condition(replica_status(port, replica)), timeout=60, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}; the agent's log ends with:\n{log.read_text(errors='replace')[-3000:]}") from None
        assert agent.stop() == 0
    return log.read_text(errors="replace")


@pytest.fixture(scope="module")
def s3_tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("s3-tls")
    cert, key = self_signed(d)
    (d / "root").mkdir()
    server = server_s3.RcloneS3(str(d / "root"), tls=(str(cert), str(key)))
    server.start()
    yield server, cert, d / "root"
    server.shutdown()


def _s3_tls_config(tmp_path: Path, s3_tls, port: int, extra: str = "") -> tuple[Path, Path, Path]:
    server, cert, root = s3_tls
    db = tmp_path / "app.db"
    write(db, [["schema"], ["insert", 3, 100]])
    bucket = server_s3.new_bucket_name()
    # made through the API (rclone caches its directory listing), over TLS trusting the cert
    S3Driver(bucket, endpoint=server.endpoint, access_key_id=server.access, secret_access_key=server.secret,
             environ={"SSL_CERT_FILE": str(cert)}).ensure_bucket()
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(
        f"""metrics-addr: 127.0.0.1:{port}
dbs:
  - path: {db}
    replicas:
      - name: s3
        url: s3://{bucket}/app
        endpoint: {server.endpoint}
        region: us-east-1
        access-key-id: {server.access}
        secret-access-key: ${{S3_SECRET}}
{extra}"""
    )
    return cfg, db, root / bucket


def test_s3_tls_is_verified_by_default(tmp_path, monkeypatch, s3_tls):
    server = s3_tls[0]
    monkeypatch.setenv("S3_SECRET", server.secret)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    port = free_port()
    cfg, db, bucket = _s3_tls_config(tmp_path, s3_tls, port)
    assert server.endpoint.startswith("https://")
    text = _run_agent_until(tmp_path, cfg, port, "s3", lambda r: r["last_error"], "the certificate error")
    assert re.search(r"certificate", text, re.IGNORECASE)
    assert "verification is disabled" not in text
    assert tree(bucket) == set(), "an artefact went to a server whose certificate is not trusted"
    p = cli("generations", "-c", str(cfg), str(db), timeout=120)
    assert_one_line_error(p, "certificate")
    p = cli("restore", "-c", str(cfg), "-o", str(tmp_path / "out.db"), str(db), timeout=120)
    assert_one_line_error(p, "certificate")


def test_s3_tls_with_the_ca_in_ssl_cert_file_works(tmp_path, monkeypatch, s3_tls):
    server, cert, _ = s3_tls
    monkeypatch.setenv("S3_SECRET", server.secret)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    port = free_port()
    cfg, _, bucket = _s3_tls_config(tmp_path, s3_tls, port)
    text = _run_agent_until(tmp_path, cfg, port, "s3", lambda r: r["txid"] is not None, "the s3 replica over verified TLS")
    assert "verification is disabled" not in text
    assert any(p.name.endswith(".snapshot") for p in bucket.rglob("*"))


@pytest.fixture(scope="module")
def s3_skip_verify_log(tmp_path_factory, s3_tls):
    """The agent's log (JSON lines) when the S3 replica says skip-verify: true."""
    server = s3_tls[0]
    tmp_path = tmp_path_factory.mktemp("s3-skip-verify")
    port = free_port()
    cfg, _, bucket = _s3_tls_config(tmp_path, s3_tls, port, extra="        skip-verify: true\n")
    old = {k: os.environ.get(k) for k in ("S3_SECRET", "SSL_CERT_FILE")}
    os.environ["S3_SECRET"] = server.secret
    os.environ.pop("SSL_CERT_FILE", None)
    try:
        text = _run_agent_until(tmp_path, cfg, port, "s3", lambda r: r["txid"] is not None, "the s3 replica with skip-verify")
    except AssertionError as e:  # not an AssertionError: the strict xfails below must not swallow it
        raise RuntimeError(f"the agent did not replicate with skip-verify: {e}") from None
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert any(p.name.endswith(".snapshot") for p in bucket.rglob("*"))
    return text


def test_s3_skip_verify_works_and_warns(s3_skip_verify_log):
    assert re.search(r"verification is disabled.*skip-verify", s3_skip_verify_log), s3_skip_verify_log[-2000:]


def _structured_warnings(log_text: str) -> list[dict]:
    events = []
    for line in log_text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("level") == "warning":
            events.append(event)
    return events


def test_s3_skip_verify_warning_is_a_structured_log_event(s3_skip_verify_log):
    lines = [line for line in s3_skip_verify_log.splitlines() if "verification is disabled" in line]
    assert any("verification is disabled" in json.dumps(e) for e in _structured_warnings(s3_skip_verify_log)), lines


def test_s3_skip_verify_warns_once_not_per_request(s3_skip_verify_log):
    per_request = s3_skip_verify_log.count("InsecureRequestWarning")
    assert per_request == 0, f"{per_request} InsecureRequestWarning lines"


@pytest.fixture(scope="module")
def nats_tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("nats-tls")
    cert, key = self_signed(d)
    server = server_nats.NatsServer(config=f'tls {{ cert_file: "{cert}", key_file: "{key}", timeout: 2 }}\n')
    server.start()
    yield server, cert
    server.cleanup()


@pytest.mark.parametrize(
    "mode",
    ["default", "tls=true in the URL", "skip-verify", "tls-ca-path"],
)
def test_nats_tls_is_verified_by_default(tmp_path, nats_tls, mode):
    server, cert = nats_tls
    db = tmp_path / "app.db"
    write(db, [["schema"], ["insert", 3, 100]])
    port = free_port()
    url = server.url(server_nats.unique_bucket(), "app") + ("?tls=true" if mode == "tls=true in the URL" else "")
    extra = {"skip-verify": "        skip-verify: true\n", "tls-ca-path": f"        tls-ca-path: {cert}\n"}.get(mode, "")
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"metrics-addr: 127.0.0.1:{port}\ndbs:\n  - path: {db}\n    replicas:\n      - name: nats\n        url: {url}\n{extra}")
    if mode in ("default", "tls=true in the URL"):
        text = _run_agent_until(tmp_path, cfg, port, "nats", lambda r: r["last_error"], "the certificate error")
        assert "certificate verification failed" in text and "verification is disabled" not in text
        p = cli("generations", "-c", str(cfg), str(db), timeout=120)
        assert_one_line_error(p, "certificate verification failed")
        return
    text = _run_agent_until(tmp_path, cfg, port, "nats", lambda r: r["txid"] is not None, "the nats replica over TLS")
    p = cli("generations", "--json", "-c", str(cfg), str(db), timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout), p.stderr
    if mode == "skip-verify":
        assert "TLS certificate verification is disabled" in text
    else:
        assert "verification is disabled" not in text


# --------------------------------------------------------------------------- config file permissions


@pytest.mark.parametrize(
    "mode,how,warned",
    [
        (0o644, "literal option", True),
        (0o640, "literal option", True),
        (0o600, "literal option", False),
        (0o644, "from ${ENV}", False),
        (0o644, "token in the URL", True),
    ],
)
def test_config_with_literal_secrets_readable_by_others_gets_a_warning(tmp_path, monkeypatch, mode, how, warned):
    nats = server_nats.token_server()
    monkeypatch.setenv("NATS_TOKEN", server_nats.TOKEN)
    db = tmp_path / "app.db"
    write(db, [["schema"], ["insert", 2, 100]])
    bucket = server_nats.unique_bucket()
    replica = {
        "literal option": f"        url: nats://{nats.host}/{bucket}/app\n        token: {server_nats.TOKEN}\n",
        "from ${ENV}": f"        url: nats://{nats.host}/{bucket}/app\n        token: ${{NATS_TOKEN}}\n",
        "token in the URL": f"        url: nats://{server_nats.TOKEN}@{nats.host}/{bucket}/app\n",
    }[how]
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"dbs:\n  - path: {db}\n    replicas:\n      - name: local\n        url: file://{tmp_path}/local\n      - name: nats\n{replica}")
    cfg.chmod(mode)
    log = tmp_path / "agent.log"
    with AgentProcess("-c", str(cfg), log=log) as agent:
        assert agent.stop() == 0
    text = log.read_text()
    warnings = [e for e in _structured_warnings(text) if "secrets written literally" in e.get("event", "")]
    if warned:
        assert len(warnings) == 1, text[-3000:]
        assert str(cfg) in warnings[0]["event"] and "chmod 600" in warnings[0]["event"]
        assert ("url" if how == "token in the URL" else "token") in warnings[0]["event"]
    else:
        assert warnings == [], warnings
    assert_no_secrets({"agent log": text}, {"NATS token": server_nats.TOKEN})
