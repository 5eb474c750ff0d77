"""Resuming interrupted transfers against the real servers, with a fault proxy on the link.

The proxy (fault_proxy.py) forwards bytes unchanged to the real rclone serve s3 or sshd and
cuts the connection (RST) at a chosen byte, as a flaky network would. Uploads must go on
from what the server already has; downloads must re-open the object where they stopped,
never mixing two revisions, never returning fewer bytes than the object has.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import pytest
import server_s3
import server_sftp
from fault_proxy import DOWN, UP, FaultProxy

from replicas import Capability, IntegrityError, NotFound, Transient, open_driver
from replicas.s3 import S3Driver

MiB = 1 << 20
PART = 5 * MiB


def _count_calls(monkeypatch: pytest.MonkeyPatch, client, *names: str) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(client, name)

        def spy(*args, _real=real, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(client, name, spy)
    return counts


class Unseekable(io.RawIOBase):
    """A stream that can only be read forward (like a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        return self._data.readinto(buffer)


def read_all(stream) -> bytes:  # type: ignore[no-untyped-def]
    out = bytearray()
    while chunk := stream.read(MiB):
        out += chunk
    return bytes(out)


# --- s3 ------------------------------------------------------------------------------------


@pytest.fixture
def s3(request: pytest.FixtureRequest):
    """(direct driver, driver through a fault proxy, the proxy) on one new bucket."""
    srv = server_s3.server()
    rate = getattr(request, "param", None)
    direct = srv.driver("replica")
    proxy = FaultProxy(srv.port, rate=rate)
    through = S3Driver(
        direct.bucket,
        "replica",
        endpoint=f"http://127.0.0.1:{proxy.port}",
        access_key_id=srv.access,
        secret_access_key=srv.secret,
        part_size=PART,
        read_timeout=10,
    )
    yield direct, through, proxy
    through.close()
    direct.close()
    proxy.close()


def test_s3_declares_resumable_uploads(s3) -> None:
    _, drv, _ = s3
    assert Capability.MULTIPART in drv.capabilities


def test_s3_part_cut_midway_is_sent_again_and_the_upload_goes_on(s3, monkeypatch, caplog) -> None:
    direct, drv, proxy = s3
    counts = _count_calls(
        monkeypatch, drv._client, "_create_multipart_upload", "_upload_part", "_abort_multipart_upload"
    )
    data = os.urandom(2 * PART + 3 * MiB)  # three parts
    proxy.cut_after(PART + 2 * MiB, UP)  # in the middle of part 2
    caplog.set_level(logging.WARNING, logger="replicas.s3")
    info = drv.put("big", Unseekable(data))  # the part is in memory: the source need not seek
    assert proxy.cuts == 1
    assert counts == {"_create_multipart_upload": 1, "_upload_part": 4, "_abort_multipart_upload": 0}
    assert "retrying part 2 of 'big'" in caplog.text
    assert info.size == len(data)
    assert direct.get_bytes("big") == data


def test_s3_part_that_keeps_failing_gives_up_and_aborts_the_upload(s3, monkeypatch) -> None:
    direct, drv, proxy = s3
    counts = _count_calls(monkeypatch, drv._client, "_upload_part", "_abort_multipart_upload")
    drv.put("big", b"old")
    proxy.cut_after(MiB, UP, times=100)  # every part upload is cut
    with pytest.raises(Transient) as caught:
        drv.put("big", os.urandom(2 * PART))
    assert caught.value.key == "big"
    assert counts == {"_upload_part": 4, "_abort_multipart_upload": 1}  # 1 + 3 attempts, then abort
    proxy.disarm()
    assert direct.get_bytes("big") == b"old"  # no partial object visible
    uploads = direct._client._list_multipart_uploads(direct.bucket, prefix=direct.prefix)
    assert not uploads.uploads  # and no upload left behind


def test_s3_read_cut_midway_resumes_with_a_ranged_get(s3, caplog) -> None:
    direct, drv, proxy = s3
    data = os.urandom(24 * MiB)
    direct.put("big", data)
    caplog.set_level(logging.WARNING, logger="replicas.resume")
    proxy.cut_after(10 * MiB, DOWN)
    with drv.get("big") as stream:
        assert read_all(stream) == data
    assert proxy.cuts == 1
    assert re.search(r"resuming the read of 'big' at byte [1-9]", caplog.text)


def test_s3_range_read_cut_midway_resumes_within_the_range(s3) -> None:
    direct, drv, proxy = s3
    data = os.urandom(24 * MiB)
    direct.put("big", data)
    proxy.cut_after(8 * MiB, DOWN)
    with drv.get("big", offset=3 * MiB + 5, length=12 * MiB) as stream:
        assert read_all(stream) == data[3 * MiB + 5 : 15 * MiB + 5]
    assert proxy.cuts == 1


@pytest.mark.parametrize("s3", [8 * MiB], indirect=True, ids=["8MiB/s"])
def test_s3_object_replaced_during_an_interrupted_read_is_an_integrity_error(s3) -> None:
    direct, drv, proxy = s3
    direct.put("obj", os.urandom(16 * MiB))
    with drv.get("obj") as stream:
        assert len(stream.read(MiB)) == MiB
        direct.put("obj", os.urandom(16 * MiB - 1))  # a new revision
        proxy.cut()
        with pytest.raises(IntegrityError, match="changed while being read") as caught:
            read_all(stream)
    assert caught.value.key == "obj"


def test_s3_resume_gives_up_after_bounded_attempts(s3) -> None:
    direct, drv, proxy = s3
    direct.put("big", os.urandom(24 * MiB))
    proxy.cut_after(2 * MiB, DOWN, times=100)
    with drv.get("big") as stream, pytest.raises(Transient) as caught:
        read_all(stream)
    assert caught.value.key == "big"
    assert proxy.cuts == 4  # the first read, then three resumes


# --- sftp ----------------------------------------------------------------------------------


@pytest.fixture
def sftp(request: pytest.FixtureRequest, tmp_path: Path):
    """(direct driver, driver through a fault proxy, the proxy, the remote root)."""
    sshd = server_sftp.server()
    root = tmp_path / "remote"
    proxy = FaultProxy(sshd.port, rate=getattr(request, "param", None))
    options = {"key_path": str(sshd.client_key), "host_key": sshd.public_key(), "timeout": 10}
    through = open_driver(f"sftp://{sshd.user}@127.0.0.1:{proxy.port}{root}", **options)
    direct = sshd.driver(root)
    yield direct, through, proxy, root
    through.close()
    direct.close()
    proxy.close()


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*.tmp-*")) if directory.exists() else []


def resumed_at(text: str) -> int:
    match = re.search(r"resuming the upload of '\w+' at byte (\d+)", text)
    assert match, text
    return int(match.group(1))


def test_sftp_declares_resumable_uploads(sftp) -> None:
    assert Capability.MULTIPART in sftp[1].capabilities


@pytest.mark.parametrize("kind", ["stream", "bytes"])
def test_sftp_upload_cut_midway_resumes_from_what_the_server_has(sftp, caplog, kind: str) -> None:
    _, drv, proxy, root = sftp
    data = os.urandom(32 * MiB)
    seen: list[int] = []
    caplog.set_level(logging.INFO, logger="replicas.sftp")
    proxy.cut_after(12 * MiB, UP)
    info = drv.put("obj", io.BytesIO(data) if kind == "stream" else data, progress=seen.append)
    assert proxy.cuts == 1 and proxy.connections == 2
    offset = resumed_at(caplog.text)
    assert 0 < offset < 12 * MiB
    assert proxy.bytes[UP] < len(data) + 12 * MiB + MiB  # what was there was not sent again
    assert info.size == len(data) and (root / "obj").read_bytes() == data
    assert seen == sorted(set(seen)) and seen[-1] == len(data)  # progress never went back
    assert temp_files(root) == []


def test_sftp_upload_from_an_unseekable_stream_is_not_resumed(sftp) -> None:
    _, drv, proxy, root = sftp
    drv.put("obj", b"old")
    proxy.cut_after(6 * MiB, UP)
    with pytest.raises(Transient) as caught:
        drv.put("obj", Unseekable(os.urandom(16 * MiB)))
    assert caught.value.key == "obj" and proxy.connections == 1
    assert (root / "obj").read_bytes() == b"old"
    assert [i.key for i in drv.list()] == ["obj"]  # the temporary file left behind is not listed


def test_sftp_upload_gives_up_when_the_server_stays_away(sftp) -> None:
    _, drv, proxy, root = sftp
    proxy.cut_after(4 * MiB, UP, times=100)
    with pytest.raises(Transient) as caught:
        drv.put("obj", io.BytesIO(os.urandom(32 * MiB)))
    assert caught.value.key == "obj"
    assert proxy.connections == 4  # the first, then three resumes
    proxy.disarm()
    with pytest.raises(NotFound):
        drv.head("obj")
    assert not (root / "obj").exists()


def test_sftp_read_cut_midway_reopens_and_seeks(sftp, caplog) -> None:
    direct, drv, proxy, _ = sftp
    data = os.urandom(24 * MiB)
    direct.put("obj", data)
    caplog.set_level(logging.WARNING, logger="replicas.resume")
    proxy.cut_after(10 * MiB, DOWN)
    with drv.get("obj") as stream:
        assert read_all(stream) == data
    assert proxy.cuts == 1
    assert re.search(r"resuming the read of 'obj' at byte [1-9]", caplog.text)


@pytest.mark.parametrize("sftp", [4 * MiB], indirect=True, ids=["4MiB/s"])
def test_sftp_object_replaced_during_an_interrupted_read_is_an_integrity_error(sftp) -> None:
    direct, drv, proxy, _ = sftp
    direct.put("obj", os.urandom(16 * MiB))
    with drv.get("obj") as stream:
        assert len(stream.read(MiB)) == MiB
        direct.put("obj", os.urandom(8 * MiB))  # renamed over the key: a new file
        proxy.cut()
        with pytest.raises(IntegrityError, match="changed while being read"):
            read_all(stream)


def test_sftp_file_cut_short_while_read_is_an_integrity_error(sftp) -> None:
    direct, _, _, root = sftp
    direct.put("obj", os.urandom(24 * MiB))
    with direct.get("obj") as stream:
        assert len(stream.read(MiB)) == MiB
        os.truncate(root / "obj", 2 * MiB)  # the same file, shorter than when opened
        with pytest.raises(IntegrityError, match="short read") as caught:
            read_all(stream)
    assert caught.value.key == "obj"


# --- nats ----------------------------------------------------------------------------------


def test_nats_does_not_claim_resumable_uploads() -> None:
    from replicas.nats import NATSDriver

    assert Capability.MULTIPART not in NATSDriver.capabilities
    assert "no resume" in (NATSDriver.__doc__ or "").lower()
