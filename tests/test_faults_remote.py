"""Faults of remote replicas, end to end against the real servers (rclone serve s3, OpenSSH
sshd, nats-server), with the real agent, a real writer and real restores.

Every test runs the agent with two replicas, a local file replica ("local") and the
remote under test, /metrics on a free port and data-loss-window-threshold 1s. While the
app writes, the remote fails: its server is SIGKILLed in the middle of a large (multipart)
upload and restarted, restarted, refuses every connection for FAULT_OUTAGE_SECONDS, or is
throttled to a trickle. Each test then checks, from /metrics, that

- the file replica keeps receiving during the fault (its replicator_replica_txid keeps
  increasing and its data-loss window stays within the threshold),
- the faulty replica's replicator_data_loss_window_seconds rises above the threshold,
- after the fault the faulty replica catches up (its window is back within the threshold
  while the app still writes, and 0 once it stops; its txid equals the captured txid),

and finally that a restore from the faulty replica alone holds every committed row and
is page-identical to the source.

FAULT_OUTAGE_SECONDS (default 8) is the length of the "fails every request" outage;
FAULT_OUTAGE_SECONDS=60 is the long version from the issue. Killed servers stay down
FAULT_DOWN_SECONDS (default 3: longer than the drivers' own resume attempts).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import server_nats
import server_s3
import server_sftp
from fault_proxy import UP, FaultProxy
from harness import (
    AgentProcess,
    assert_same_pages,
    checkpoint,
    cli,
    integrity,
    rows,
    start_writer,
    wait_for,
    write,
)

OUTAGE = float(os.environ.get("FAULT_OUTAGE_SECONDS", "8"))
DOWN = float(os.environ.get("FAULT_DOWN_SECONDS", "3"))
THRESHOLD = 1.0  # data-loss-window-threshold of every test's config
MiB = 1 << 20

pytestmark = pytest.mark.timeout(300 + 4 * OUTAGE)


# --- /metrics -----------------------------------------------------------------------------------


from harness import free_port as _free_port, http_get as _get  # noqa: E402


_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


@dataclass
class Scrape:
    samples: dict

    def value(self, name: str, **labels) -> float | None:
        want = frozenset(labels.items())
        for (n, ls), v in self.samples.items():
            if n == name and want <= ls:
                return v
        return None

    def txid(self, replica: str) -> float:
        v = self.value("replicator_replica_txid", replica=replica)
        return -1.0 if v is None else v

    def window(self, replica: str) -> float:
        return self.value("replicator_data_loss_window_seconds", replica=replica) or 0.0

    @property
    def local_txid(self) -> float:
        v = self.value("replicator_local_txid")
        return -1.0 if v is None else v


@dataclass
class Outage:
    """What /metrics showed while a fault lasted: (seconds since its start, scrape)."""

    samples: list[tuple[float, Scrape]] = field(default_factory=list)

    def check(self, remote: str) -> None:
        """The file replica kept receiving, the faulty replica's window rose above the threshold."""
        assert len(self.samples) >= 4, "too few scrapes during the fault"
        local = [s.txid("local") for _, s in self.samples]
        assert local == sorted(local), f"the file replica's txid went backwards: {local}"
        half = len(local) // 2
        assert local[half] > local[0] and local[-1] > local[half], (
            f"the file replica stopped receiving during the fault: {local}"
        )
        windows = [s.window(remote) for _, s in self.samples]
        assert max(windows) > THRESHOLD, f"the {remote} window never passed the threshold: {windows}"
        local_windows = [s.window("local") for _, s in self.samples]
        assert max(local_windows) < THRESHOLD, f"the file replica fell behind: {local_windows}"


# --- the rig: a database, its config, the agent, the writer ------------------------------------


class Rig:
    def __init__(self, tmp_path: Path, remote: str, replica_yaml: list[str], *, extra: str = "") -> None:
        self.tmp_path = tmp_path
        self.remote = remote
        self.db = tmp_path / "app.db"
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cfg = tmp_path / "r.yml"
        body = "\n".join(f"        {line}" for line in replica_yaml[1:])
        self.cfg.write_text(
            f"metrics-addr: 127.0.0.1:{self.port}\n"
            f"data-loss-window-threshold: 1s\n"
            f"{extra}"
            f"dbs:\n"
            f"  - path: {self.db}\n"
            f"    replicas:\n"
            f"      - name: local\n"
            f"        url: file://{tmp_path}/local\n"
            f"      - name: {remote}\n"
            f"        {replica_yaml[0]}\n"
            f"{body}\n"
        )
        self.cfg.chmod(0o600)
        self.log = tmp_path / "agent.log"
        self.agent = AgentProcess("-c", str(self.cfg), log=self.log)
        self.writers: list = []

    def scrape(self) -> Scrape:
        code, text = _get(self.base + "/metrics")
        assert code == 200, text
        return Scrape(_samples(text))

    def start(self) -> Rig:
        write(self.db, [["schema"], ["insert", 10, 200]])
        self.agent.start()
        wait_for(
            lambda: (s := self.scrape()).txid("local") >= 0 and s.txid(self.remote) >= 0,
            timeout=60,
            what="the first snapshot on both replicas",
        )
        return self

    def write_forever(self, size: int = 200, tps: int = 20, seed: int = 1):
        w = start_writer(self.db, [["forever", size, tps]], seed=seed)
        self.writers.append(w)
        return w

    def stop_writers(self) -> None:
        # SIGTERM: the writer stops between two commits. A SIGKILL can land after a
        # commit's frames are in the WAL but before the WAL index counts them; nobody
        # replicates that unacknowledged commit, yet the test's own read of the source,
        # the first opener after the agent stopped, recovers it from the WAL
        for w in self.writers:
            if w.poll() is None:
                w.terminate()
        for w in self.writers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        self.writers = []

    def watch(self, seconds: float, *, until: Callable[[], bool] | None = None, outage: Outage | None = None) -> Outage:
        """Scrape every 0.25 s for `seconds` (or until `until()`), appending to outage."""
        outage = outage or Outage()
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            outage.samples.append((time.monotonic() - start, self.scrape()))
            if until is not None and until():
                break
            time.sleep(0.25)
        return outage

    def recovered(self, timeout: float = 90) -> None:
        """While the app still writes, the faulty replica gets back within the threshold."""
        wait_for(lambda: self.scrape().window(self.remote) < THRESHOLD, timeout=timeout, interval=0.2,
                 what=f"the {self.remote} replica to get back within the threshold")

    def finish(self) -> Path:
        """Stop the app, let every replica catch up, stop the agent, restore from the remote alone."""
        self.stop_writers()

        def caught_up() -> float | None:
            s = self.scrape()
            local = s.local_txid
            if local >= 0 and all(s.txid(r) == local and s.window(r) == 0.0 for r in ("local", self.remote)):
                return local
            return None

        def settled() -> bool:
            # the app's last commit may reach capture only at its next poll (monitor-interval,
            # 1 s: see test_faults_local.test_commit_on_a_slow_fsync_is_captured_at_once)
            first = caught_up()
            if first is None:
                return False
            time.sleep(1.2)
            return caught_up() == first

        wait_for(settled, timeout=120, interval=0.2, what=f"the {self.remote} replica to catch up")
        s = self.scrape()
        assert s.window(self.remote) == 0.0
        assert s.value("replicator_replica_pending_artefacts", replica=self.remote) == 0
        assert self.agent.stop() == 0
        out = self.tmp_path / f"from-{self.remote}.db"
        p = cli("restore", "-c", str(self.cfg), "--replica", self.remote, "-o", str(out), str(self.db), timeout=180)
        assert p.returncode == 0, p.stderr
        assert integrity(out) == "ok"
        assert rows(out) == rows(self.db)  # every committed row
        checkpoint(self.db)
        assert_same_pages(out, self.db)
        return out

    def close(self) -> None:
        self.stop_writers()
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            self.agent.kill()


@contextmanager
def rig(tmp_path: Path, remote: str, replica_yaml: list[str], **kw) -> Iterator[Rig]:
    r = Rig(tmp_path, remote, replica_yaml, **kw)
    try:
        yield r.start()
    finally:
        r.close()


def _s3_yaml(s3: server_s3.RcloneS3, bucket: str, endpoint: str, *extra: str) -> list[str]:
    return [
        f"url: s3://{bucket}/app",
        f"endpoint: {endpoint}",
        "region: us-east-1",
        f"access-key-id: {s3.access}",
        f"secret-access-key: {s3.secret}",
        *extra,
    ]


@pytest.fixture
def own_s3():
    """An rclone serve s3 of this test's own (it gets killed), with a bucket."""
    s3 = server_s3.RcloneS3()
    s3.start()
    bucket = server_s3.new_bucket_name()
    s3.driver("warmup", bucket=bucket).close()
    try:
        yield s3, bucket
    finally:
        s3.shutdown()


def _big_upload_in_flight(proxy: FaultProxy, before: int, beyond: int, timeout: float = 60) -> None:
    """Wait until `beyond` bytes more than `before` went up through the proxy."""
    wait_for(lambda: proxy.bytes[UP] - before > beyond, timeout=timeout, interval=0.02,
             what=f"{beyond} bytes of the big upload on the wire")


def _failed_uploads(log: Path) -> list[str]:
    """Keys of the agent's "upload failed; will retry" lines, in order."""
    out = []
    for line in log.read_text().splitlines():
        if '"upload failed; will retry"' in line:
            out.append(json.loads(line)["key"])
    return out


# --- the tests ------------------------------------------------------------------------------------


def test_s3_killed_during_a_multipart_upload_and_restarted(tmp_path, own_s3):
    """rclone serve s3 is SIGKILLed while the segment of a ~40 MiB transaction is halfway
    through its multipart upload (part-size 5MiB), and started again DOWN seconds later."""
    s3, bucket = own_s3
    with FaultProxy(s3.port) as proxy, rig(
        tmp_path, "s3", _s3_yaml(s3, bucket, f"http://127.0.0.1:{proxy.port}", "part-size: 5MiB")
    ) as r:
        r.write_forever()
        time.sleep(1)
        proxy.throttle(8 * MiB)  # the big upload takes seconds: time to kill it mid-way
        before = proxy.bytes[UP]
        write(r.db, [["big", 40]])  # one transaction, one segment of ~20 MiB (4+ parts)
        _big_upload_in_flight(proxy, before, 7 * MiB)  # part 1 is in, part 2 on the wire
        s3.stop()  # SIGKILL
        killed_after = proxy.bytes[UP] - before
        outage = r.watch(DOWN)
        proxy.throttle(None)
        s3.start()
        outage.check("s3")
        assert "upload failed; will retry" in r.log.read_text()
        r.recovered()
        r.watch(2)  # still writing after the recovery
        out = r.finish()
    assert killed_after < 40 * MiB  # it was killed while the big segment was still going up
    # the upload the kill cut was the big segment's multipart upload (more than one part)
    failed = _failed_uploads(r.log)
    assert failed, "no upload failed"
    assert (tmp_path / "local" / failed[0]).stat().st_size > 5 * MiB
    assert rows(out, "SELECT count(*) FROM t WHERE n = -1") == [40]
    assert "replica recovered" in r.log.read_text()


@pytest.fixture(scope="module")
def sshd_killed(tmp_path_factory) -> dict:
    """sshd and its sessions are SIGKILLed while the segment of a ~40 MiB transaction is
    being written to the server, and started again (same port, same keys) DOWN seconds
    later. Runs once for the tests below; asserts the outage and the recovery."""
    tmp_path = tmp_path_factory.mktemp("sshd-killed")
    ssh = server_sftp.SSHServer()
    try:
        ssh.start()
        proxy = FaultProxy(ssh.port)
        root = tmp_path / "sftp-root"
        yaml = [
            f"url: sftp://{ssh.user}@127.0.0.1:{proxy.port}{root}",
            f"key-path: {ssh.client_key}",
            f"host-key: {ssh.public_key()}",
            "timeout: 10s",
        ]
        with proxy, rig(tmp_path, "sftp", yaml) as r:
            r.write_forever()
            time.sleep(1)
            proxy.throttle(8 * MiB)
            before = proxy.bytes[UP]
            write(r.db, [["big", 40]])
            _big_upload_in_flight(proxy, before, 7 * MiB)
            ssh.stop()  # sshd and every session: SIGKILL
            killed_after = proxy.bytes[UP] - before
            cut = sorted(p.name for p in root.rglob(".*.tmp-*"))  # the upload the kill cut
            outage = r.watch(DOWN)  # longer than the driver's own resume attempts (< 2 s)
            proxy.throttle(None)
            ssh.start()
            outage.check("sftp")
            assert "upload failed; will retry" in r.log.read_text()
            r.recovered()
            r.watch(2)
            out = r.finish()
        assert killed_after < 40 * MiB
        assert cut, "the kill did not catch the upload in flight (no temporary file on the server)"
        failed = _failed_uploads(r.log)
        assert failed and (tmp_path / "local" / failed[0]).stat().st_size > 5 * MiB
        return {
            "restored": out,
            "cut": cut,
            "left": sorted(p.name for p in root.rglob(".*.tmp-*")),
            "log": r.log.read_text(),
        }
    finally:
        ssh.close()


def test_sshd_killed_during_an_upload_and_restarted(sshd_killed):
    assert rows(sshd_killed["restored"], "SELECT count(*) FROM t WHERE n = -1") == [40]
    assert "replica recovered" in sshd_killed["log"]


def test_sshd_killed_during_an_upload_leaves_no_temporary_file(sshd_killed):
    leftovers = [name for name in sshd_killed["left"] if name in sshd_killed["cut"]]
    assert not leftovers, f"the cut upload's temporary file is still on the server: {leftovers}"


def test_nats_server_restarted_while_the_app_writes(tmp_path):
    """nats-server (JetStream, file store) is stopped while the app writes and started again
    DOWN seconds later on the same port and store."""
    nats = server_nats.NatsServer()
    try:
        nats.start()
        with rig(tmp_path, "nats", [f"url: {nats.url(server_nats.unique_bucket(), 'app')}"]) as r:
            r.write_forever(size=2000)
            r.watch(1.5)
            nats.stop()
            outage = r.watch(DOWN)
            nats.start()
            outage.check("nats")
            r.recovered()
            r.watch(2)
            r.finish()
    finally:
        nats.cleanup()


def test_nats_server_killed_while_the_app_writes(tmp_path):
    """The same with SIGKILL: JetStream gets no chance to flush, the driver's connection
    dies without a goodbye."""
    nats = server_nats.NatsServer()
    try:
        nats.start()
        with rig(tmp_path, "nats", [f"url: {nats.url(server_nats.unique_bucket(), 'app')}"]) as r:
            r.write_forever(size=2000)
            r.watch(1.5)
            assert nats.process is not None
            nats.process.kill()
            nats.process.wait()
            nats.process = None
            outage = r.watch(DOWN)
            nats.start()
            outage.check("nats")
            r.recovered()
            r.watch(2)
            r.finish()
    finally:
        nats.cleanup()


@pytest.fixture(scope="module")
def s3_refusing(tmp_path_factory) -> dict:
    """A proxy in front of S3 resets every connection for FAULT_OUTAGE_SECONDS: every
    request fails (as behind a load balancer whose backend is gone). Then it admits them.
    Runs once for the tests below; asserts the outage and the recovery."""
    tmp_path = tmp_path_factory.mktemp("s3-refusing")
    s3 = server_s3.RcloneS3()
    s3.start()
    try:
        bucket = server_s3.new_bucket_name()
        s3.driver("warmup", bucket=bucket).close()
        with FaultProxy(s3.port) as proxy, rig(tmp_path, "s3", _s3_yaml(s3, bucket, f"http://127.0.0.1:{proxy.port}")) as r:
            r.write_forever()
            r.watch(1)
            failures_before = r.scrape().value("replicator_upload_failures_total", replica="s3") or 0
            proxy.refuse()
            outage = r.watch(OUTAGE)
            failing = r.scrape()
            code, body = _get(r.base + "/readyz")
            proxy.admit()
            outage.check("s3")
            assert proxy.refused > 0  # the shipper kept trying
            # the window tracks the outage: about its length by its end
            assert failing.window("s3") > OUTAGE - 2
            assert failing.value("replicator_replica_failing", replica="s3") == 1
            assert failing.value("replicator_replica_behind_threshold", replica="s3") == 1
            assert failing.value("replicator_replica_pending_artefacts", replica="s3") > 0
            assert code == 503 and "s3" in body
            r.recovered()
            wait_for(lambda: _get(r.base + "/readyz")[0] == 200, timeout=30, what="ready again")
            r.watch(2)
            r.finish()
        return {
            "log": r.log.read_text(),
            "failures": (failing.value("replicator_upload_failures_total", replica="s3") or 0) - failures_before,
            "connections": proxy.refused,
        }
    finally:
        s3.shutdown()


def test_s3_failing_every_request_for_an_outage(s3_refusing):
    text = s3_refusing["log"]
    assert text.count("data-loss window above threshold") >= 1
    assert "data-loss window back within threshold" in text
    assert "replica recovered" in text


def test_s3_failing_every_request_is_retried_with_backoff(s3_refusing):
    # the shipper's backoff (0.2 s doubling to 30 s, jitter 0.5..1) allows about
    # log2(OUTAGE / 0.1) attempts during the outage; RetryingDriver makes each up to 3 requests
    allowed = 3 * (2 + math.log2(OUTAGE / 0.1))
    assert s3_refusing["failures"] <= allowed / 3 and s3_refusing["connections"] <= allowed * 2, (
        f"{s3_refusing['failures']:.0f} failed uploads, {s3_refusing['connections']} refused connections"
        f" in {OUTAGE:g} s"
    )


def test_slow_s3_replica_falls_behind_and_catches_up(tmp_path, own_s3):
    """S3 behind a proxy throttled to 200 KiB/s while the app writes ~5 MiB: the file
    replica stays at a window of about 0, the slow one's window rises; once the throttle
    is lifted it catches up."""
    s3, bucket = own_s3
    with FaultProxy(s3.port) as proxy, rig(tmp_path, "s3", _s3_yaml(s3, bucket, f"http://127.0.0.1:{proxy.port}")) as r:
        proxy.throttle(200 * 1024)
        # ~5 MiB of rows in 5 s (half random: ~2.5 MiB of segments, ~13 s at 200 KiB/s)
        w = start_writer(r.db, [["insert_rate", 250, 20_000, 50]])
        r.writers.append(w)
        outage = r.watch(60, until=lambda: w.poll() is not None)
        assert w.wait() == 0
        slow = r.scrape()
        outage.check("s3")
        assert slow.value("replicator_replica_pending_bytes", replica="s3") > 200 * 1024
        assert slow.txid("local") == slow.local_txid  # the fast replica has everything
        proxy.throttle(None)
        r.recovered(timeout=60)
        r.finish()
    assert len(rows(r.db)) == 10 + 250
