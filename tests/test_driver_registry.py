"""Tests of the replica URL registry: parsing, options, unknown schemes, redaction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import replicas
from replicas import BadURL, FileDriver, MemDriver, StorageError, open_driver, redact_url, register, schemes
from replicas import registry


@pytest.fixture(autouse=True)
def _restore_registry():
    saved = dict(registry._factories)
    yield
    registry._factories.clear()
    registry._factories.update(saved)
    replicas.mem.reset()


def test_builtin_schemes_are_registered() -> None:
    assert {"file", "mem"} <= set(schemes())
    assert schemes() == sorted(schemes())


@pytest.mark.parametrize(
    "url_for",
    [
        lambda root: f"file://{root}",
        lambda root: f"file://localhost{root}",
        lambda root: f"FILE://{root}",
        lambda root: str(root),
    ],
    ids=["file-url", "localhost", "upper-case-scheme", "plain-path"],
)
def test_file_urls(tmp_path: Path, url_for) -> None:  # type: ignore[no-untyped-def]
    drv = open_driver(url_for(tmp_path / "r"))
    assert isinstance(drv, FileDriver)
    assert drv.root == str(tmp_path / "r")
    assert drv.url == f"file://{tmp_path}/r"


def test_file_url_is_percent_decoded_and_relative_paths_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drv = open_driver(f"file://{tmp_path}/my%20replica")
    assert drv.root == str(tmp_path / "my replica")
    assert drv.url == f"file://{tmp_path}/my%20replica"
    monkeypatch.chdir(tmp_path)
    assert open_driver("relative/dir").root == os.path.join(str(tmp_path), "relative", "dir")
    assert open_driver("odd/x://y?z").root == os.path.join(str(tmp_path), "odd", "x:", "y?z")


def test_mem_urls() -> None:
    drv = open_driver("mem://name")
    assert isinstance(drv, MemDriver) and drv.url == "mem://name"
    assert open_driver("MEM://name").url == "mem://name"


@pytest.mark.parametrize("url", ["", "   ", "mem://", "file://otherhost/path", "file:///p#frag", "file://"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(BadURL):
        open_driver(url)


def test_unknown_scheme_names_it_and_the_known_ones() -> None:
    with pytest.raises(BadURL) as caught:
        open_driver("gopher://user:hunter2@host/path")
    message = str(caught.value)
    assert "unknown replica URL scheme 'gopher'" in message
    assert "(known: file, mem" in message
    assert "hunter2" not in message  # the URL in the message is redacted
    assert isinstance(caught.value, StorageError)


@pytest.mark.parametrize("url", ["mem://x", "/tmp/replica", "file:///tmp/replica"])
def test_unknown_option_is_rejected_by_name(url: str) -> None:
    with pytest.raises(BadURL, match="'endpoint'"):
        open_driver(url, endpoint="http://localhost:9000")
    with pytest.raises(BadURL, match="'region'"):
        open_driver(url + "?region=us-east-1" if "://" in url else "file://" + url + "?region=us-east-1")


def test_register_a_new_scheme() -> None:
    opened: list[tuple[str, dict]] = []

    def factory(url: str, **options: object) -> MemDriver:
        opened.append((url, options))
        return MemDriver("custom")

    register("custom+tls", factory)
    assert "custom+tls" in schemes()
    drv = open_driver("custom+tls://host/x", endpoint="e")
    assert isinstance(drv, MemDriver)
    assert opened == [("custom+tls://host/x", {"endpoint": "e"})]
    with pytest.raises(ValueError):
        register("Bad Scheme", factory)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://AKIA:s3cr3t@bucket/prefix", "s3://AKIA:***@bucket/prefix"),
        ("s3://AKIA:se/cr+et@bucket/prefix", "s3://AKIA:***@bucket/prefix"),
        ("sftp://alice:pw@host:22/backups", "sftp://alice:***@host:22/backups"),
        ("sftp://alice@host:22/backups", "sftp://alice@host:22/backups"),
        ("nats://s3cr3ttoken@host:4222/bucket", "nats://***@host:4222/bucket"),
        (
            "s3://b/p?endpoint=http://h:9000&secret_key=abc&region=r&SessionToken=t&password=p&x-api-key=k",
            "s3://b/p?endpoint=http://h:9000&secret_key=***&region=r&SessionToken=***&password=***&x-api-key=***",
        ),
        ("s3://bucket/p?access_key=&flag", "s3://bucket/p?access_key=&flag"),
        ("file:///tmp/a@b:c", "file:///tmp/a@b:c"),
        ("/plain/path", "/plain/path"),
        ("mem://name", "mem://name"),
        ("s3://bucket/p#frag", "s3://bucket/p#frag"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
