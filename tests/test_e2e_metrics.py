"""End to end: the agent's /metrics, /healthz, /readyz and `replicator status`, with a real
S3 server (rclone serve s3) that is stopped while the app writes and started again."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import server_s3
from harness import AgentProcess, cli, integrity, rows, start_writer, wait_for, write


from harness import free_port as _free_port, http_get as _get  # noqa: E402


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Parse the exposition into {(name, labels): value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        assert m, line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def _value(samples, name: str, **labels) -> float | None:
    want = frozenset(labels.items())
    for (n, ls), v in samples.items():
        if n == name and want <= ls:
            return v
    return None


def _config(tmp_path: Path, db: Path, s3: server_s3.RcloneS3, bucket: str, port: int) -> Path:
    cfg = tmp_path / "r.yml"
    cfg.write_text(
        f"""metrics-addr: 127.0.0.1:{port}
data-loss-window-threshold: 1s
dbs:
  - path: {db}
    replicas:
      - name: local
        url: file://{tmp_path}/local
      - name: s3
        url: s3://{bucket}/app
        endpoint: {s3.endpoint}
        region: us-east-1
        access-key-id: {s3.access}
        secret-access-key: {s3.secret}
"""
    )
    cfg.chmod(0o600)
    return cfg


def test_replica_outage_raises_the_window_and_fails_readyz_then_recovers(tmp_path):
    s3 = server_s3.RcloneS3()
    s3.start()
    try:
        bucket = server_s3.new_bucket_name()
        s3.driver("warmup", bucket=bucket).close()
        db = tmp_path / "app.db"
        write(db, [["schema"]])
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        cfg = _config(tmp_path, db, s3, bucket, port)
        log = tmp_path / "agent.log"
        with AgentProcess("-c", str(cfg), log=log) as agent:
            assert _get(base + "/healthz") == (200, "ok\n")
            wait_for(lambda: _get(base + "/readyz")[0] == 200, what="ready")
            writer = start_writer(db, [["forever", 200, 50]])
            try:
                wait_for(lambda: (_value(_samples(_get(base + "/metrics")[1]), "replicator_replica_txid", replica="s3") or 0) > 5, what="s3 to receive commits")
                s3.stop()
                stopped = time.monotonic()

                def window(replica: str) -> float:
                    return _value(_samples(_get(base + "/metrics")[1]), "replicator_data_loss_window_seconds", replica=replica) or 0.0

                wait_for(lambda: window("s3") > 1.0, timeout=15, what="the s3 window to pass the threshold")
                assert time.monotonic() - stopped < 15
                code, body = _get(base + "/readyz")
                assert code == 503 and "s3" in body
                assert window("local") < 1.0  # the other replica keeps shipping
                metrics = _samples(_get(base + "/metrics")[1])
                assert _value(metrics, "replicator_ready") == 0
                assert _value(metrics, "replicator_replica_pending_artefacts", replica="s3") > 0
                wait_for(lambda: "data-loss window above threshold" in log.read_text(), timeout=5, what="the threshold warning")
                s3.start()
                wait_for(lambda: window("s3") == 0.0 and _get(base + "/readyz")[0] == 200, timeout=60, what="the s3 replica to catch up")
                wait_for(lambda: "data-loss window back within threshold" in log.read_text(), timeout=5, what="the recovery line")
            finally:
                writer.terminate()  # at a commit boundary: the source is then exactly what was committed
                writer.wait()
            text = log.read_text()
            # warned once and recovered once, not at every check
            assert text.count("data-loss window above threshold") == 1
            assert text.count("data-loss window back within threshold") == 1
            assert agent.stop() == 0
        out = tmp_path / "restored.db"
        cli("restore", "-c", str(cfg), "--replica", "s3", "-o", str(out), str(db), check=True)
        assert integrity(out) == "ok"
        assert rows(out) == rows(db)  # every committed row
    finally:
        s3.shutdown()


def test_status_matches_metrics_and_counters_exist(tmp_path):
    db = tmp_path / "app.db"
    write(db, [["schema"], ["insert", 20, 100]])
    port = _free_port()
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"metrics-addr: 127.0.0.1:{port}\ndbs:\n  - path: {db}\n    replicas:\n      - name: one\n        url: file://{tmp_path}/one\n      - name: two\n        url: file://{tmp_path}/two\n")
    with AgentProcess("-c", str(cfg)) as agent:
        write(db, [["insert", 30, 100], ["checkpoint", "PASSIVE"]])
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: all((_value(_samples(_get(base + "/metrics")[1]), "replicator_replica_txid", replica=r) or 0) >= 30 for r in ("one", "two")), what="caught up")
        time.sleep(1.2)  # let the shadow log drop what both replicas hold
        p = cli("status", "-c", str(cfg), "--json", check=True)
        st = json.loads(p.stdout)
        metrics = _samples(_get(base + "/metrics")[1])
        [d] = st["databases"]
        assert d["path"] == str(db)
        assert _value(metrics, "replicator_local_txid", db=str(db)) == d["txid"] >= 30
        assert _value(metrics, "replicator_generation_info", db=str(db), generation=d["generation"]) == 1
        for r in d["replicas"]:
            assert _value(metrics, "replicator_replica_txid", replica=r["name"]) == r["txid"] == d["txid"]
            assert _value(metrics, "replicator_data_loss_window_seconds", replica=r["name"]) == r["data_loss_window"] == 0
            assert _value(metrics, "replicator_replica_pending_artefacts", replica=r["name"]) == r["pending_artefacts"] == 0
            assert _value(metrics, "replicator_replica_last_upload_timestamp_seconds", replica=r["name"]) == r["last_upload"]
        assert _value(metrics, "replicator_database_bytes", db=str(db)) == d["db_bytes"] == db.stat().st_size
        assert _value(metrics, "replicator_data_loss_window_threshold_seconds", db=str(db)) == 10
        assert _value(metrics, "replicator_generation_rotations_total", db=str(db), reason="initial") == 1
        assert _value(metrics, "replicator_snapshot_seconds_count", db=str(db)) >= 1
        assert _value(metrics, "replicator_upload_seconds_count", replica="one") >= 2
        assert _value(metrics, "replicator_ready") == 1
        # the text form names both replicas and says ready
        p = cli("status", "-c", str(cfg), check=True)
        assert re.search(r"\bone\b.*\b0\.000s\b", p.stdout) and re.search(r"\btwo\b", p.stdout)
        assert p.stdout.strip().endswith("ready")
        assert agent.stop() == 0


def test_status_and_metrics_addr_errors_are_one_line(tmp_path):
    db = tmp_path / "app.db"
    write(db, [["schema"]])
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"dbs:\n  - path: {db}\n    replicas:\n      - url: file://{tmp_path}/r\n")
    p = cli("status", "-c", str(cfg))
    assert p.returncode == 2 and "has no metrics-addr" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    port = _free_port()
    p = cli("status", "--addr", f"127.0.0.1:{port}")
    assert p.returncode == 1 and "cannot read the agent's status" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        p = cli("replicate", "--metrics-addr", f"127.0.0.1:{taken}", str(db), f"file://{tmp_path}/r", timeout=30)
    assert p.returncode == 2 and f"metrics-addr 127.0.0.1:{taken}: cannot listen" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()  # nothing started
