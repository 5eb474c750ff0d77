"""End to end against real servers: one database replicated at once to file, S3 (rclone
serve s3), SFTP (OpenSSH sshd) and NATS JetStream (nats-server); the node is lost; each
replica alone restores a database equal to the source. Secrets never reach the logs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import server_nats
import server_s3
from harness import AgentProcess, assert_same_pages, checkpoint, cli, has_snapshot, integrity, wait_for, write

REMOTES = ["s3", "nats"]
try:
    import server_sftp  # noqa: F401

    REMOTES.append("sftp")
except ImportError:  # the SFTP driver lands separately
    server_sftp = None


def _replicas_yaml(tmp_path: Path) -> tuple[str, list[str]]:
    """The replicas section of the config, and the secrets it holds."""
    s3 = server_s3.server()
    bucket = server_s3.new_bucket_name()
    s3.driver("warmup", bucket=bucket).close()  # creates the bucket
    nats = server_nats.token_server()
    lines = [
        "    replicas:",
        "      - name: local",
        f"        url: file://{tmp_path}/file-replica",
        "      - name: s3",
        f"        url: s3://{bucket}/app",
        f"        endpoint: {s3.endpoint}",
        "        region: us-east-1",
        f"        access-key-id: {s3.access}",
        "        secret-access-key: ${S3_SECRET}",
        "      - name: nats",
        f"        url: nats://{nats.host}/{server_nats.unique_bucket()}/app",
        "        token: ${NATS_TOKEN}",
    ]
    secrets = [s3.secret, server_nats.TOKEN]
    if server_sftp is not None:
        ssh = server_sftp.server()
        lines += [
            "      - name: sftp",
            f"        url: {ssh.url(tmp_path / 'sftp-root')}",
            f"        key-path: {ssh.client_key}",
            f"        known-hosts-path: {ssh.known_hosts}",
        ]
    return "\n".join(lines), secrets


def _last_txid(cfg: Path, db: Path, replica: str) -> int:
    p = cli("generations", "--json", "-c", str(cfg), "--replica", replica, str(db))
    if p.returncode != 0:
        return -1
    gens = json.loads(p.stdout)
    return max((g["last_txid"] or -1) for g in gens) if gens else -1


def test_node_lost_each_replica_alone_restores(tmp_path, monkeypatch):
    db = tmp_path / "app.db"
    replicas_yaml, secrets = _replicas_yaml(tmp_path)
    monkeypatch.setenv("S3_SECRET", server_s3.server().secret)
    monkeypatch.setenv("NATS_TOKEN", server_nats.TOKEN)
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"dbs:\n  - path: {db}\n{replicas_yaml}\n")
    names = ["local", *REMOTES]
    write(db, [["schema"], ["insert", 5, 100]])
    log = tmp_path / "agent.log"
    agent = AgentProcess("-c", str(cfg), log=log).start()
    try:
        wait_for(lambda: has_snapshot(tmp_path / "file-replica"), what="first snapshot")
        write(db, [["insert", 40, 500], ["batch", 100, 300], ["update", 20]], lib="apsw")
        from replicator.shadow import read_state

        state = read_state(tmp_path / ".app.db-replicator")
        wait_for(lambda: all(_last_txid(cfg, db, n) >= state.txid for n in names), timeout=60, what="every replica caught up")
    finally:
        agent.kill()  # the node is lost
    checkpoint(db)
    source = tmp_path / "source.db"
    shutil.copy(db, source)
    for p in tmp_path.glob("app.db*"):
        p.unlink()
    shutil.rmtree(tmp_path / ".app.db-replicator")
    for name in names:
        out = tmp_path / f"from-{name}.db"
        p = cli("restore", "-c", str(cfg), "--replica", name, "-o", str(out), str(db), timeout=120)
        assert p.returncode == 0, f"{name}: {p.stderr}"
        assert integrity(out) == "ok"
        assert_same_pages(out, source)
        for secret in secrets:
            assert secret not in p.stdout + p.stderr
    text = log.read_text()
    for secret in secrets:
        assert secret not in text, "a secret reached the agent's log"


def test_secrets_stay_out_of_error_messages(tmp_path):
    s3 = server_s3.server()
    cfg = tmp_path / "r.yml"
    wrong = "W" * 40
    cfg.write_text(
        f"""dbs:
  - path: {tmp_path}/app.db
    replicas:
      - name: s3
        url: s3://{server_s3.new_bucket_name()}/app
        endpoint: {s3.endpoint}
        region: us-east-1
        access-key-id: {s3.access}
        secret-access-key: {wrong}
      - name: nats
        url: nats://{server_nats.token_server().host}/b/app
        token: not-the-token-{wrong}
"""
    )
    for name in ("s3", "nats"):
        p = cli("restore", "-c", str(cfg), "--replica", name, "-o", str(tmp_path / "x.db"), str(tmp_path / "app.db"), timeout=120)
        assert p.returncode != 0
        assert wrong not in p.stdout + p.stderr and "Traceback" not in p.stderr
        assert name in p.stderr
