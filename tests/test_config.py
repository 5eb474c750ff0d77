"""Tests for replicator.config and replicator.durations."""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from pathlib import Path

import pytest

from replicator.config import (
    DEFAULTS,
    Config,
    ConfigError,
    DbConfig,
    DirConfig,
    ReplicaConfig,
    adhoc_config,
    default_shadow_dir,
    find_db,
    load_config,
    parse_config,
)
from replicator.durations import (
    UnitError,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

SRC = Path("/etc/replicator.yml")


def parse(text: str, environ: dict[str, str] | None = None, source: Path | None = SRC) -> Config:
    return parse_config(textwrap.dedent(text), source=source, environ=environ or {})


def error(text: str, environ: dict[str, str] | None = None, source: Path | None = SRC) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, environ, source)
    message = str(info.value)
    assert "\n" not in message
    return message


def minimal(extra_db: str = "", extra_replica: str = "", top: str = "") -> str:
    """A one-db, one-replica config with extra lines at each level (pre-indented)."""
    return (
        f"{top}\n"
        "dbs:\n"
        "  - path: /data/app.db\n"
        f"{extra_db}"
        "    replicas:\n"
        "      - url: s3://bucket/app\n"
        f"{extra_replica}"
    )


# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2h45m10s", 9910.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("250us", 0.00025),
        ("0", 0.0),
        ("30", 30.0),
        ("  1m  ", 60.0),
        (45, 45.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("bad", ["abc", "1H", "1h 30m", "", "h", "10 s", "1y", "1.2.3s"])
def test_parse_duration_rejects_garbage_with_hint(bad):
    with pytest.raises(ValueError, match=r"invalid duration .*use e\.g\. 30s, 15m, 1h, 1h30m") as info:
        parse_duration(bad)
    assert repr(bad) in str(info.value)
    assert repr(bad) not in info.value.redacted


@pytest.mark.parametrize("bad", ["-1s", -5, -0.5])
def test_parse_duration_rejects_negative(bad):
    with pytest.raises(ValueError, match="negative"):
        parse_duration(bad)


@pytest.mark.parametrize("bad", [True, None, [1], float("inf"), float("nan")])
def test_parse_duration_rejects_other_types(bad):
    with pytest.raises(UnitError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5400, "1h30m"), (0.25, "250ms"), (0, "0s"), (90.5, "1m30.5s"), (86400, "24h"), (10, "10s"), (0.0005, "500us")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.25, 1, 59, 61, 3600, 5400, 9910, 86400, 90061.5])
def test_format_duration_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1GiB", 1024**3),
        ("512MiB", 512 * 1024**2),
        ("4KiB", 4096),
        ("100MB", 100_000_000),
        ("2GB", 2_000_000_000),
        ("10KB", 10_000),
        ("100B", 100),
        ("4096", 4096),
        ("1.5GiB", 1536 * 1024**2),
        ("1 MiB", 1024**2),
        ("1gib", 1024**3),
        (123, 123),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("bad", ["lots", "1XB", "GiB", "", "1.5.1MB", True, 1.5])
def test_parse_size_rejects_garbage(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_parse_size_rejects_negative():
    with pytest.raises(ValueError, match="negative"):
        parse_size("-1MiB")
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)


@pytest.mark.parametrize(("n", "text"), [(1024**3, "1GiB"), (512, "512B"), (1536 * 1024, "1.5MiB"), (0, "0B"), (4096, "4KiB")])
def test_format_size(n, text):
    assert format_size(n) == text


# --- a full file ---------------------------------------------------------------------------

FULL = """
snapshot-interval: 2h
retention: 48h
retention-check-interval: 30m
compression: none
compression-level: 9
min-checkpoint-page-count: 500
checkpoint-interval: 30s
truncate-page-count: 5000
monitor-interval: 250ms
sync-interval: 2s
shadow-max-bytes: 512MiB
shutdown-timeout: 20s
log-level: debug
log-format: json
dbs:
  - path: /data/app.db
    shadow-dir: /var/lib/replicator/app
    replicas:
      - name: local
        url: file:///var/backups/app
      - name: offsite
        url: s3://bucket/app
        endpoint: https://s3.example.com
        region: eu-west-1
        access-key-id: AKIA123
        secret-access-key: ${AWS_SECRET_ACCESS_KEY}
        session-token: ${AWS_SESSION_TOKEN:-}
        force-path-style: true
        skip-verify: false
        part-size: 16MiB
        retention: 72h
        retention-check-interval: 2h
        sync-interval: 10s
  - path: /data/other.db
    snapshot-interval: 0
    retention: 12h
    retention-check-interval: 10m
    compression: zstd
    compression-level: 19
    min-checkpoint-page-count: 2000
    checkpoint-interval: 0
    truncate-page-count: 0
    monitor-interval: 2s
    sync-interval: 0s
    shadow-max-bytes: 2GB
    shutdown-timeout: 1m
    replicas:
      - url: sftp://backup.example.com/srv/other
        user: backup
        password: ${SFTP_PASSWORD}
        key-path: /root/.ssh/id_ed25519
        known-hosts-path: /root/.ssh/known_hosts
        host-key: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample
        timeout: 45s
      - url: nats://nats.example.com:4222/backups
        username: agent
        password: ${NATS_PASSWORD}
        token: ${NATS_TOKEN}
        nkey-path: /etc/nats/agent.nk
        creds-path: /etc/nats/agent.creds
        tls-ca-path: /etc/nats/ca.pem
        skip-verify: "yes"
        max-bucket-bytes: 10GiB
      - name: scratch
        url: mem://scratch
"""
FULL_ENV = {"AWS_SECRET_ACCESS_KEY": "sekrit", "SFTP_PASSWORD": "pw1", "NATS_PASSWORD": "pw2", "NATS_TOKEN": "tok"}


@pytest.fixture
def full() -> Config:
    return parse(FULL, FULL_ENV)


def test_full_globals(full):
    assert full.log_level == "debug"
    assert full.log_format == "json"
    assert full.source == SRC
    assert full.warnings == ()
    assert len(full.dbs) == 2


def test_full_first_db_inherits_every_global(full):
    db = full.dbs[0]
    assert db.path == Path("/data/app.db")
    assert db.shadow_dir == Path("/var/lib/replicator/app")
    assert db.snapshot_interval == 7200.0
    assert db.retention == 172800.0
    assert db.retention_check_interval == 1800.0
    assert db.compression == "none"
    assert db.compression_level == 9
    assert db.min_checkpoint_page_count == 500
    assert db.checkpoint_interval == 30.0
    assert db.truncate_page_count == 5000
    assert db.monitor_interval == 0.25
    assert db.sync_interval == 2.0
    assert db.shadow_max_bytes == 512 * 1024**2
    assert db.shutdown_timeout == 20.0


def test_full_second_db_overrides_every_global(full):
    db = full.dbs[1]
    assert db.path == Path("/data/other.db")
    assert db.shadow_dir == Path("/data/.other.db-replicator")
    assert db.snapshot_interval == 0.0
    assert db.retention == 43200.0
    assert db.retention_check_interval == 600.0
    assert db.compression == "zstd"
    assert db.compression_level == 19
    assert db.min_checkpoint_page_count == 2000
    assert db.checkpoint_interval == 0.0
    assert db.truncate_page_count == 0
    assert db.monitor_interval == 2.0
    assert db.sync_interval == 0.0
    assert db.shadow_max_bytes == 2_000_000_000
    assert db.shutdown_timeout == 60.0


def test_full_replica_overrides_and_inheritance(full):
    local, offsite = full.dbs[0].replicas
    # sync-interval is not inherited by replicas (it spaces capture steps at the db level)
    assert (local.retention, local.retention_check_interval, local.sync_interval) == (172800.0, 1800.0, 0.0)
    assert (offsite.retention, offsite.retention_check_interval, offsite.sync_interval) == (259200.0, 7200.0, 10.0)
    sftp = full.dbs[1].replicas[0]
    assert (sftp.retention, sftp.retention_check_interval, sftp.sync_interval) == (43200.0, 600.0, 0.0)


def test_full_file_replica(full):
    local = full.dbs[0].replicas[0]
    assert local == ReplicaConfig(
        name="local",
        url="file:///var/backups/app",
        scheme="file",
        options={},
        retention=172800.0,
        retention_check_interval=1800.0,
        sync_interval=0.0,
    )


def test_full_s3_options_snake_case_and_typed(full):
    offsite = full.dbs[0].replicas[1]
    assert offsite.name == "offsite"
    assert offsite.scheme == "s3"
    assert offsite.url == "s3://bucket/app"
    assert dict(offsite.options) == {
        "endpoint": "https://s3.example.com",
        "region": "eu-west-1",
        "access_key_id": "AKIA123",
        "secret_access_key": "sekrit",
        "force_path_style": True,
        "skip_verify": False,
        "part_size": 16 * 1024**2,
    }  # session-token expanded to "" and so counts as unset
    assert type(offsite.options["secret_access_key"]) is str


def test_full_sftp_options(full):
    sftp = full.dbs[1].replicas[0]
    assert sftp.name == "sftp"
    assert sftp.scheme == "sftp"
    assert dict(sftp.options) == {
        "user": "backup",
        "password": "pw1",
        "key_path": "/root/.ssh/id_ed25519",
        "known_hosts_path": "/root/.ssh/known_hosts",
        "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample",
        "timeout": 45.0,
    }


def test_full_nats_and_mem_options(full):
    nats, mem = full.dbs[1].replicas[1:]
    assert nats.name == "nats"
    assert dict(nats.options) == {
        "username": "agent",
        "password": "pw2",
        "token": "tok",
        "nkey_path": "/etc/nats/agent.nk",
        "creds_path": "/etc/nats/agent.creds",
        "tls_ca_path": "/etc/nats/ca.pem",
        "skip_verify": True,
        "max_bucket_bytes": 10 * 1024**3,
    }
    assert (mem.name, mem.scheme, mem.url, dict(mem.options)) == ("scratch", "mem", "mem://scratch", {})


def test_results_are_frozen_and_read_only(full):
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.dbs[0].retention = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        full.dbs[0].replicas[1].options["region"] = "x"  # type: ignore[index]
    assert isinstance(full.dbs, tuple) and isinstance(full.dbs[0].replicas, tuple)


# --- defaults ------------------------------------------------------------------------------


def test_defaults_fill_everything():
    config = parse(minimal())
    db = config.dbs[0]
    assert config.log_level == "info"
    assert config.log_format == "auto"
    assert db.shadow_dir == Path("/data/.app.db-replicator")
    assert db.snapshot_interval == 3600.0
    assert db.retention == 86400.0
    assert db.retention_check_interval == 3600.0
    assert db.compression == "zstd"
    assert db.compression_level == 3
    assert db.segment_compression_level == 1
    assert db.min_checkpoint_page_count == 1000
    assert db.checkpoint_interval == 60.0
    assert db.truncate_page_count == 121359
    assert db.monitor_interval == 1.0
    assert db.sync_interval == 0.02
    assert db.shadow_max_bytes == 1024**3
    assert db.shutdown_timeout == 10.0
    replica = db.replicas[0]
    assert (replica.name, replica.scheme, replica.retention, replica.retention_check_interval, replica.sync_interval) == (
        "s3",
        "s3",
        86400.0,
        3600.0,
        0.0,
    )
    assert dict(replica.options) == {}


def test_defaults_mapping_matches_dataclass_defaults():
    db = parse(minimal()).dbs[0]
    for key, value in DEFAULTS.items():
        if key in ("log-level", "log-format", "metrics-addr"):
            continue
        assert getattr(db, key.replace("-", "_")) == value, key
    assert DEFAULTS["snapshot-interval"] == DEFAULTS["snapshot_interval"] == 3600.0
    assert DEFAULTS["log-format"] == "auto"
    with pytest.raises(TypeError):
        DEFAULTS["retention"] = 1  # type: ignore[index]


def test_default_shadow_dir():
    assert default_shadow_dir(Path("/data/app.db")) == Path("/data/.app.db-replicator")


def test_db_override_beats_global_and_replica_beats_db():
    config = parse(minimal(extra_db="    retention: 2h\n", extra_replica="        retention: 3h\n", top="retention: 1h"))
    db = config.dbs[0]
    assert db.retention == 7200.0
    assert db.replicas[0].retention == 10800.0


def test_replica_does_not_inherit_db_sync_interval():
    # the database's sync-interval spaces capture steps; a replica's spaces its uploads
    db = parse(minimal(extra_db="    sync-interval: 5s\n")).dbs[0]
    assert db.sync_interval == 5.0
    assert db.replicas[0].sync_interval == 0.0


def test_numbers_of_seconds_accepted_for_durations():
    db = parse(minimal(extra_db="    retention: 90\n    monitor-interval: 0.5\n")).dbs[0]
    assert (db.retention, db.monitor_interval) == (90.0, 0.5)


def test_enums_are_case_insensitive():
    config = parse(minimal(top="log-level: WARNING\nlog-format: Text\ncompression: ZSTD"))
    assert (config.log_level, config.log_format, config.dbs[0].compression) == ("warning", "text", "zstd")


# --- paths and URLs ------------------------------------------------------------------------


def test_relative_db_and_shadow_paths_resolve_against_config_dir():
    text = """
    dbs:
      - path: data/app.db
        shadow-dir: ../shadow/app
        replicas:
          - url: backups/app
    """
    db = parse(text, source=Path("/etc/replicator/replicator.yml")).dbs[0]
    assert db.path == Path("/etc/replicator/data/app.db")
    assert db.shadow_dir == Path("/etc/shadow/app")
    assert db.replicas[0].url == "file:///etc/replicator/backups/app"


def test_relative_paths_without_source_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = parse("dbs: [{path: app.db, replicas: [{url: /b}]}]", source=None).dbs[0]
    assert db.path == tmp_path / "app.db"


def test_home_directory_expands(monkeypatch):
    monkeypatch.setenv("HOME", "/home/alice")
    db = parse("dbs: [{path: ~/app.db, replicas: [{url: ~/backups}]}]").dbs[0]
    assert db.path == Path("/home/alice/app.db")
    assert db.replicas[0].url == "file:///home/alice/backups"


def test_bare_absolute_path_means_file_url():
    replica = parse("dbs: [{path: /d/app.db, replicas: [{url: /var/backups/app/}]}]").dbs[0].replicas[0]
    assert (replica.url, replica.scheme, replica.name) == ("file:///var/backups/app", "file", "file")


def test_file_url_normalised():
    replica = parse("dbs: [{path: /d/app.db, replicas: [{url: 'file:///var//backups/./app/'}]}]").dbs[0].replicas[0]
    assert replica.url == "file:///var/backups/app"


def test_file_paths_with_special_characters_are_percent_encoded():
    text = "dbs: [{path: /d/app.db, replicas: [{url: '/var/my backups/50%'}, {name: two, url: 'file:///srv/a%20b'}]}]"
    first, second = parse(text).dbs[0].replicas
    assert first.url == "file:///var/my%20backups/50%25"
    assert second.url == "file:///srv/a%20b"


def test_password_with_slash_in_userinfo_is_accepted():
    replica = parse("dbs: [{path: /d/a.db, replicas: [{url: 'sftp://u:pa/ss@host:22/srv'}]}]").dbs[0].replicas[0]
    assert replica.url == "sftp://u:pa/ss@host:22/srv"


def test_scheme_lowercased():
    replica = parse("dbs: [{path: /d/app.db, replicas: [{url: 'S3://bucket/app'}]}]").dbs[0].replicas[0]
    assert (replica.url, replica.scheme) == ("s3://bucket/app", "s3")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://host/x", "unknown scheme 'ftp'; did you mean 'sftp'? (known schemes: file, mem, s3, sftp, nats)"),
        ("gopher://host/x", "unknown scheme 'gopher' (known schemes: file, mem, s3, sftp, nats)"),
        ("file://relative/dir", "file URL needs an absolute path"),
        ("s3:///prefix", "s3 URLs need a bucket"),
        ("sftp:///srv", "sftp URLs need a host"),
        ("s3:/bucket/x", "malformed URL 's3:/bucket/x'"),
        ("file:///x?mode=fast", "a file URL takes no ?query"),
        ("nats://:4222/bucket", "nats URLs need a server"),
    ],
)
def test_bad_urls(url, expected):
    message = error(f"dbs: [{{path: /d/app.db, replicas: [{{url: '{url}'}}]}}]")
    assert message.startswith("/etc/replicator.yml: dbs[0].replicas[0].url: ")
    assert expected in message


def test_file_replica_inside_shadow_dir_rejected():
    message = error("dbs: [{path: /d/app.db, replicas: [{url: /d/.app.db-replicator/backup}]}]")
    assert "dbs[0].replicas[0].url: must not be inside the shadow directory" in message


def test_shadow_dir_must_not_contain_db():
    message = error("dbs: [{path: /d/app.db, shadow-dir: /d, replicas: [{url: s3://b/x}]}]")
    assert "dbs[0].shadow-dir: must not be the database's own directory" in message


# --- environment expansion -----------------------------------------------------------------


def test_env_expansion_forms():
    text = minimal(extra_replica="        region: ${REGION}\n        endpoint: ${ENDPOINT:-https://default}\n        access-key-id: pa$$word-${ID}-$x\n")
    options = parse(text, {"REGION": "eu-north-1", "ID": "42"}).dbs[0].replicas[0].options
    assert options["region"] == "eu-north-1"
    assert options["endpoint"] == "https://default"
    assert options["access_key_id"] == "pa$word-42-$x"


def test_env_default_used_when_variable_empty():
    options = parse(minimal(extra_replica="        region: ${REGION:-us-east-1}\n"), {"REGION": ""}).dbs[0].replicas[0].options
    assert options["region"] == "us-east-1"


def test_env_set_but_empty_without_default_counts_as_unset():
    db = parse(minimal(extra_db="    retention: ${RETENTION}\n"), {"RETENTION": ""}).dbs[0]
    assert db.retention == 86400.0


def test_env_expands_into_typed_values():
    env = {"LEVEL": "7", "RET": "3h", "SIZE": "2MiB", "PATHSTYLE": "true", "DB": "/srv/x.db"}
    text = """
    compression-level: ${LEVEL}
    shadow-max-bytes: ${SIZE}
    dbs:
      - path: ${DB}
        retention: ${RET}
        replicas:
          - url: s3://b/x
            force-path-style: ${PATHSTYLE}
    """
    db = parse(text, env).dbs[0]
    assert (db.path, db.compression_level, db.retention, db.shadow_max_bytes) == (Path("/srv/x.db"), 7, 10800.0, 2 * 1024**2)
    assert db.replicas[0].options["force_path_style"] is True


def test_env_missing_variable_names_key_and_variable():
    message = error(minimal(extra_replica="        secret-access-key: ${AWS_SECRET}\n"))
    assert message == (
        "/etc/replicator.yml: dbs[0].replicas[0].secret-access-key: "
        "environment variable AWS_SECRET is not set (use ${AWS_SECRET:-default} for a fallback)"
    )


def test_env_invalid_value_names_variable_not_value():
    message = error(minimal(extra_db="    retention: ${RETENTION}\n"), {"RETENTION": "hunter2-secret"})
    assert "hunter2" not in message
    assert message == (
        "/etc/replicator.yml: dbs[0].retention (from ${RETENTION}): invalid duration (use e.g. 30s, 15m, 1h, 1h30m)"
    )


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("    compression-level: ${V}\n", "compression-level"),
        ("    compression: ${V}\n", "compression"),
        ("    shadow-max-bytes: ${V}\n", "shadow-max-bytes"),
        ("    min-checkpoint-page-count: ${V}\n", "min-checkpoint-page-count"),
    ],
)
def test_env_secret_never_leaks_in_any_kind_of_error(line, key):
    message = error(minimal(extra_db=line), {"V": "TOPSECRET"})
    assert "TOPSECRET" not in message
    assert f"dbs[0].{key} (from ${{V}})" in message


def test_env_secret_not_leaked_from_url_or_bool():
    message = error("dbs: [{path: /d/a.db, replicas: [{url: '${U}'}]}]", {"U": "ftp://user:TOPSECRET@host/x"})
    assert "TOPSECRET" not in message and "'ftp'" not in message
    assert "dbs[0].replicas[0].url (from ${U}): unknown scheme" in message
    message = error(minimal(extra_replica="        skip-verify: ${V}\n"), {"V": "TOPSECRET"})
    assert "TOPSECRET" not in message and "(from ${V}): expected true or false" in message


def test_env_literal_value_is_shown_in_errors():
    assert "invalid duration 'abc'" in error(minimal(extra_db="    retention: abc\n"))


def test_env_unterminated_and_bad_names():
    assert "unterminated ${" in error(minimal(extra_replica="        region: ${REGION\n"))
    assert "invalid variable name '1X'" in error(minimal(extra_replica="        region: ${1X}\n"))


def test_env_not_expanded_in_keys_or_comments():
    config = parse(minimal(extra_replica="        region: x  # ${UNSET}\n"))
    assert config.dbs[0].replicas[0].options["region"] == "x"


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("REPLICATOR_TEST_REGION", "ap-south-1")
    text = minimal(extra_replica="        region: ${REPLICATOR_TEST_REGION}\n")
    assert parse_config(text).dbs[0].replicas[0].options["region"] == "ap-south-1"


# --- unknown keys --------------------------------------------------------------------------


def test_unknown_top_level_key_suggests():
    assert error(minimal(top="retenton: 1h")) == "/etc/replicator.yml: retenton: unknown key; did you mean 'retention'?"


def test_unknown_top_level_key_snake_case():
    assert "log_level: unknown key; did you mean 'log-level'?" in error(minimal(top="log_level: info"))


def test_unknown_key_without_close_match_lists_valid_keys():
    message = error(minimal(top="zzzzzz: 1"))
    assert "zzzzzz: unknown key (valid keys here: dbs, snapshot-interval," in message


def test_unknown_db_key_suggests():
    message = error(minimal(extra_db="    snapshot-intervall: 1h\n"))
    assert message == "/etc/replicator.yml: dbs[0].snapshot-intervall: unknown key; did you mean 'snapshot-interval'?"


def test_unknown_replica_key_suggests():
    message = error(minimal(extra_replica="        acess-key-id: x\n"))
    assert message == "/etc/replicator.yml: dbs[0].replicas[0].acess-key-id: unknown key; did you mean 'access-key-id'?"


def test_unknown_replica_key_suggests_several():
    message = error(minimal(extra_replica="        retention-interval: 1h\n"))
    assert "dbs[0].replicas[0].retention-interval: unknown key; did you mean 'retention-check-interval'" in message


def test_option_of_another_scheme():
    message = error("dbs: [{path: /d/a.db, replicas: [{url: /backups, region: x}]}]")
    assert "dbs[0].replicas[0].region: unknown key; region is an option of s3 replicas, not file" in message


def test_misplaced_keys():
    assert "dbs[0].log-level: unknown key; log-level can only be set at the top level" in error(
        minimal(extra_db="    log-level: debug\n")
    )
    assert "dbs[0].replicas[0].snapshot-interval: unknown key; snapshot-interval can be set per db or at the top level" in error(
        minimal(extra_replica="        snapshot-interval: 1h\n")
    )
    assert "path: unknown key; path belongs in an entry of dbs" in error(minimal(top="path: /x.db"))
    assert "dbs[0].url: unknown key; url belongs in an entry of replicas" in error(minimal(extra_db="    url: /x\n"))


def test_litestream_style_replica_gets_url_hint():
    assert "missing url (e.g. url: s3://BUCKET/PATH" in error(
        "dbs: [{path: /d/a.db, replicas: [{type: s3, bucket: b}]}]"
    )
    message = error("dbs: [{path: /d/a.db, replicas: [{url: s3://b/x, bucket: b}]}]")
    assert "dbs[0].replicas[0].bucket: unknown key; a replica's destination is one url" in message


def test_non_string_key():
    assert "keys must be strings" in error(minimal(top="1: x"))


# --- value validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("    retention: abc\n", "dbs[0].retention: invalid duration 'abc' (use e.g. 30s, 15m, 1h, 1h30m)"),
        ("    retention: -1h\n", "dbs[0].retention: negative duration '-1h' is not allowed"),
        ("    retention: 0\n", "dbs[0].retention: must be greater than 0, got 0"),
        ("    monitor-interval: 0s\n", "dbs[0].monitor-interval: must be greater than 0, got '0s'"),
        ("    shadow-max-bytes: lots\n", "dbs[0].shadow-max-bytes: invalid size 'lots'"),
        ("    shadow-max-bytes: 0\n", "dbs[0].shadow-max-bytes: must be greater than 0"),
        ("    compression: gzip\n", "dbs[0].compression: invalid value 'gzip' (expected one of zstd, none)"),
        ("    compression-level: 0\n", "dbs[0].compression-level: must be between 1 and 22, got 0"),
        ("    compression-level: 23\n", "dbs[0].compression-level: must be between 1 and 22, got 23"),
        ("    compression-level: high\n", "dbs[0].compression-level: expected a whole number, got 'high'"),
        ("    compression-level: 3.5\n", "dbs[0].compression-level: expected a whole number, got a number"),
        ("    compression-level: true\n", "dbs[0].compression-level: expected a whole number, got a boolean"),
        ("    truncate-page-count: -1\n", "dbs[0].truncate-page-count: must be at least 0, got -1"),
        ("    min-checkpoint-page-count: 0\n", "dbs[0].min-checkpoint-page-count: must be at least 1, got 0"),
        ("    truncate-page-count: 500\n", "dbs[0]: truncate-page-count must be greater than min-checkpoint-page-count"),
        ("    retention:\n", "dbs[0].retention: no value given (remove the key to use the default)"),
        ("    retention: [1h]\n", "dbs[0].retention: expected a duration, got a list"),
        ("    shadow-dir: 5\n", "dbs[0].shadow-dir: expected a string, got an integer (quote it)"),
    ],
)
def test_bad_db_values(line, expected):
    message = error(minimal(extra_db=line))
    assert message.startswith("/etc/replicator.yml: ")
    assert expected in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("        retention: 1x\n", "dbs[0].replicas[0].retention: invalid duration '1x'"),
        ("        sync-interval: -1s\n", "dbs[0].replicas[0].sync-interval: negative duration"),
        ("        part-size: 1MiB\n", "dbs[0].replicas[0].part-size: must be between 5MiB and 5GiB, got '1MiB'"),
        ("        part-size: big\n", "dbs[0].replicas[0].part-size: invalid size 'big'"),
        ("        force-path-style: maybe\n", "dbs[0].replicas[0].force-path-style: expected true or false, got 'maybe'"),
        ("        region: 5\n", "dbs[0].replicas[0].region: expected a string, got an integer (quote it)"),
        ("        name: 'has space'\n", "dbs[0].replicas[0].name: invalid name 'has space'"),
    ],
)
def test_bad_replica_values(line, expected):
    assert expected in error(minimal(extra_replica=line))


def test_sftp_timeout_and_nats_size_validated():
    assert "dbs[0].replicas[0].timeout: invalid duration 'soon'" in error(
        "dbs: [{path: /d/a.db, replicas: [{url: 'sftp://h/x', timeout: soon}]}]"
    )
    assert "dbs[0].replicas[0].max-bucket-bytes: invalid size 'x'" in error(
        "dbs: [{path: /d/a.db, replicas: [{url: 'nats://h/b', max-bucket-bytes: 'x'}]}]"
    )


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ("log-level: verbose", "log-level: invalid value 'verbose' (expected one of debug, info, warning, error)"),
        ("log-level: warn", "did you mean 'warning'?"),
        ("log-format: yaml", "log-format: invalid value 'yaml' (expected one of auto, text, json)"),
        ("log-format: false", "log-format: expected a string, got a boolean (quote it)"),
        ("retention: 1y", "/etc/replicator.yml: retention: invalid duration '1y'"),
    ],
)
def test_bad_global_values(top, expected):
    assert expected in error(minimal(top=top))


def test_compression_none_keeps_level():
    db = parse(minimal(extra_db="    compression: none\n")).dbs[0]
    assert (db.compression, db.compression_level) == ("none", 3)


def test_truncate_zero_disables_and_skips_ordering_check():
    db = parse(minimal(extra_db="    truncate-page-count: 0\n")).dbs[0]
    assert db.truncate_page_count == 0


# --- structure -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "/etc/replicator.yml: config is empty"),
        ("# only a comment\n", "/etc/replicator.yml: config is empty"),
        ("- a\n- b\n", "/etc/replicator.yml: the top level must be a mapping of keys, got a list"),
        ("just a string\n", "the top level must be a mapping of keys, got a string"),
        ("log-level: info\n", "/etc/replicator.yml: dbs: required"),
        ("dbs: []\n", "/etc/replicator.yml: dbs: must list at least one database"),
        ("dbs: {path: /x}\n", "dbs: expected a list of databases, got a mapping"),
        ("dbs: [/x.db]\n", "dbs[0]: expected a mapping with path and replicas, got a string"),
        ("dbs: [{replicas: [{url: /b}]}]\n", "dbs[0].path: required"),
        ("dbs: [{path: /x.db}]\n", "dbs[0].replicas: required"),
        ("dbs: [{path: /x.db, replicas: []}]\n", "dbs[0].replicas: must list at least one replica"),
        ("dbs: [{path: /x.db, replicas: [s3://b]}]\n", "dbs[0].replicas[0]: expected a mapping with a url, got a string"),
    ],
)
def test_structure_errors(text, expected):
    assert expected in error(text)


def test_label_without_source():
    assert error("dbs: []", source=None) == "config: dbs: must list at least one database"


def test_yaml_syntax_error_is_one_line_with_position():
    message = error("dbs:\n  - path: /x.db\n    replicas: [\n")
    assert message.startswith("/etc/replicator.yml: line ")
    assert ", column " in message and "invalid YAML" in message


def test_yaml_tab_error():
    message = error("dbs:\n\t- path: /x.db\n")
    assert message.startswith("/etc/replicator.yml: line 2, column 1: invalid YAML:")


def test_yaml_duplicate_key_rejected():
    message = error("retention: 1h\nretention: 2h\ndbs: [{path: /x.db, replicas: [{url: /b}]}]\n")
    assert message == "/etc/replicator.yml: line 2, column 1: invalid YAML: duplicate key 'retention' (first given on line 1)"


def test_yaml_merge_keys_may_override():
    text = """
    dbs:
      - path: /d/a.db
        replicas:
          - &r {url: s3://b/one, region: eu-west-1}
          - {<<: *r, url: s3://b/two, name: two}
    """
    replicas = parse(text).dbs[0].replicas
    assert replicas[1].url == "s3://b/two"
    assert replicas[1].options["region"] == "eu-west-1"


def test_duplicate_replica_names_name_both_entries():
    text = """
    dbs:
      - path: /d/a.db
        replicas:
          - {name: backup, url: /b1}
          - {name: other, url: /b2}
          - {name: backup, url: s3://b/x}
    """
    message = error(text)
    assert message == (
        "/etc/replicator.yml: dbs[0].replicas[2]: duplicate replica name 'backup', also used by "
        "dbs[0].replicas[0]; give each replica a distinct name"
    )


def test_duplicate_default_replica_names_explain_default():
    message = error("dbs: [{path: /d/a.db, replicas: [{url: s3://b/x}, {url: s3://b/y}]}]")
    assert "dbs[0].replicas[1]: duplicate replica name 's3', also used by dbs[0].replicas[0] (the default name is the URL scheme)" in message


def test_same_replica_name_in_different_dbs_is_fine():
    config = parse("dbs: [{path: /d/a.db, replicas: [{url: s3://b/a}]}, {path: /d/b.db, replicas: [{url: s3://b/b}]}]")
    assert [db.replicas[0].name for db in config.dbs] == ["s3", "s3"]


def test_duplicate_db_paths_after_resolution():
    text = """
    dbs:
      - path: /etc/app.db
        replicas: [{url: s3://b/x}]
      - path: ./sub/../app.db
        replicas: [{url: s3://b/y}]
    """
    assert "dbs[1].path: same database as dbs[0] (/etc/app.db)" in error(text)


def test_duplicate_db_paths_via_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    text = f"dbs: [{{path: {tmp_path}/real/a.db, replicas: [{{url: /b1}}]}}, {{path: {tmp_path}/link/a.db, shadow-dir: /s, replicas: [{{url: /b2}}]}}]"
    assert "dbs[1].path: same database as dbs[0]" in error(text)


def test_shared_replica_location_rejected():
    text = "dbs: [{path: /d/a.db, replicas: [{url: s3://b/x}]}, {path: /d/b.db, replicas: [{url: s3://b/x}]}]"
    assert "dbs[1].replicas[0].url: same location as dbs[0].replicas[0]" in error(text)


def test_shared_shadow_dir_rejected():
    text = "dbs: [{path: /d/a.db, shadow-dir: /s, replicas: [{url: /b1}]}, {path: /d/b.db, shadow-dir: /s, replicas: [{url: /b2}]}]"
    assert "dbs[1].shadow-dir: same shadow directory as dbs[0]" in error(text)


# --- load_config: files, path resolution, warnings ---------------------------------------------


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


def test_load_explicit_path(tmp_path):
    file = write(tmp_path / "r.yml", "dbs: [{path: app.db, replicas: [{url: backups}]}]")
    config = load_config(file, environ={})
    assert config.source == file
    assert config.dbs[0].path == tmp_path / "app.db"
    assert config.dbs[0].replicas[0].url == f"file://{tmp_path}/backups"
    assert load_config(str(file), environ={}) == config


def test_load_uses_replicator_config_env(tmp_path, monkeypatch):
    file = write(tmp_path / "env.yml", "dbs: [{path: /d/a.db, replicas: [{url: /b}]}]")
    monkeypatch.setenv("REPLICATOR_CONFIG", str(file))
    assert load_config().source == file
    assert load_config(None, environ={"REPLICATOR_CONFIG": str(file)}).source == file


def test_load_explicit_path_beats_env(tmp_path):
    file = write(tmp_path / "explicit.yml", "dbs: [{path: /d/a.db, replicas: [{url: /b}]}]")
    assert load_config(file, environ={"REPLICATOR_CONFIG": str(tmp_path / "nope.yml")}).source == file


def test_load_defaults_to_etc(monkeypatch):
    monkeypatch.delenv("REPLICATOR_CONFIG", raising=False)
    if Path("/etc/replicator.yml").exists():
        pytest.skip("a real /etc/replicator.yml exists")
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(info.value) == "config file /etc/replicator.yml not found (pass -c FILE or set REPLICATOR_CONFIG)"
    with pytest.raises(ConfigError, match="config file /etc/replicator.yml not found"):
        load_config(environ={"REPLICATOR_CONFIG": ""})


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "x.yml", environ={})
    assert str(info.value) == f"config file {tmp_path}/x.yml not found (pass -c FILE or set REPLICATOR_CONFIG)"


def test_load_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, environ={})


def test_load_not_utf8(tmp_path):
    file = tmp_path / "r.yml"
    file.write_bytes(b"dbs: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(file, environ={})


def test_load_errors_name_the_file(tmp_path):
    file = write(tmp_path / "r.yml", "dbs: [{path: /d/a.db, retention: abc, replicas: [{url: /b}]}]")
    with pytest.raises(ConfigError) as info:
        load_config(file, environ={})
    assert str(info.value) == f"{file}: dbs[0].retention: invalid duration 'abc' (use e.g. 30s, 15m, 1h, 1h30m)"
    assert info.value.key == "dbs[0].retention"


def test_load_yaml_error_names_file_line_and_column(tmp_path):
    file = write(tmp_path / "r.yml", "dbs:\n  - path: /x.db\n   replicas: oops\n")
    with pytest.raises(ConfigError) as info:
        load_config(file, environ={})
    assert str(info.value).startswith(f"{file}: line 3, column ")
    assert "\n" not in str(info.value)


SECRET_FILE = """
dbs:
  - path: /d/a.db
    replicas:
      - url: s3://b/x
        access-key-id: AKIA
        secret-access-key: literal-secret
      - url: nats://h/b
        token: ${NATS_TOKEN}
"""


def test_world_readable_literal_secret_warns(tmp_path):
    file = write(tmp_path / "r.yml", SECRET_FILE, mode=0o644)
    config = load_config(file, environ={"NATS_TOKEN": "t"})
    assert len(config.warnings) == 1
    warning = config.warnings[0]
    assert "dbs[0].replicas[0].secret-access-key" in warning
    assert "dbs[0].replicas[1].token" not in warning  # came from the environment
    assert "literal-secret" not in warning
    assert f"chmod 600 {file}" in warning


def test_group_readable_literal_secret_warns(tmp_path):
    file = write(tmp_path / "r.yml", SECRET_FILE, mode=0o640)
    assert load_config(file, environ={"NATS_TOKEN": "t"}).warnings


def test_private_file_with_literal_secret_does_not_warn(tmp_path):
    file = write(tmp_path / "r.yml", SECRET_FILE, mode=0o600)
    assert load_config(file, environ={"NATS_TOKEN": "t"}).warnings == ()


def test_readable_file_with_env_secrets_only_does_not_warn(tmp_path):
    text = SECRET_FILE.replace("literal-secret", "${AWS_SECRET}")
    file = write(tmp_path / "r.yml", text, mode=0o644)
    assert load_config(file, environ={"NATS_TOKEN": "t", "AWS_SECRET": "s"}).warnings == ()


def test_secret_from_default_in_file_counts_as_literal(tmp_path):
    text = "dbs: [{path: /d/a.db, replicas: [{url: 'sftp://h/x', password: '${PW:-fallback}'}]}]"
    file = write(tmp_path / "r.yml", text, mode=0o644)
    warnings = load_config(file, environ={}).warnings
    assert len(warnings) == 1 and "dbs[0].replicas[0].password" in warnings[0]


def test_password_in_url_counts_as_literal_secret(tmp_path):
    file = write(tmp_path / "r.yml", "dbs: [{path: /d/a.db, replicas: [{url: 'sftp://u:pw@h/x'}]}]", mode=0o644)
    assert "dbs[0].replicas[0].url" in load_config(file, environ={}).warnings[0]


@pytest.mark.parametrize("url", ["nats://s3cr3t@h/b", "s3://b/x?secret-access-key=abc"])
def test_token_or_secret_query_in_url_counts_as_literal_secret(tmp_path, url):
    file = write(tmp_path / "r.yml", f"dbs: [{{path: /d/a.db, replicas: [{{url: '{url}'}}]}}]", mode=0o644)
    warnings = load_config(file, environ={}).warnings
    assert len(warnings) == 1 and "dbs[0].replicas[0].url" in warnings[0]
    assert "s3cr3t" not in warnings[0] and "abc" not in warnings[0]


def test_url_from_env_does_not_warn(tmp_path):
    file = write(tmp_path / "r.yml", "dbs: [{path: /d/a.db, replicas: [{url: '${URL}'}]}]", mode=0o644)
    assert load_config(file, environ={"URL": "sftp://u:pw@h/x"}).warnings == ()


def test_parse_config_does_not_warn():
    assert parse(SECRET_FILE, {"NATS_TOKEN": "t"}).warnings == ()


# --- adhoc_config and find_db --------------------------------------------------------------------


def test_adhoc_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = adhoc_config("app.db", "/var/backups/app")
    assert config.source is None
    assert (config.log_level, config.log_format) == ("info", "auto")
    (db,) = config.dbs
    assert db.path == tmp_path / "app.db"
    assert db.shadow_dir == tmp_path / ".app.db-replicator"
    assert db.retention == DEFAULTS["retention"]
    (replica,) = db.replicas
    assert (replica.name, replica.url, replica.scheme) == ("file", "file:///var/backups/app", "file")


def test_adhoc_overrides():
    config = adhoc_config(
        "/d/app.db",
        "s3://bucket/app",
        retention="2h",
        sync_interval=1.5,
        shadow_max_bytes="64MiB",
        log_level="debug",
        name="primary",
        options={"region": "eu-west-1", "force_path_style": True},
        monitor_interval=None,
    )
    db = config.dbs[0]
    assert (db.retention, db.sync_interval, db.shadow_max_bytes, db.monitor_interval) == (7200.0, 1.5, 64 * 1024**2, 1.0)
    assert config.log_level == "debug"
    replica = db.replicas[0]
    assert replica.name == "primary"
    assert dict(replica.options) == {"region": "eu-west-1", "force_path_style": True}
    assert (replica.retention, replica.sync_interval) == (7200.0, 0.0)


def test_adhoc_does_not_expand_env():
    config = adhoc_config("/d/app.db", "s3://bucket/app", options={"secret_access_key": "a$${B}"})
    assert config.dbs[0].replicas[0].options["secret_access_key"] == "a$${B}"


def test_adhoc_errors_are_short():
    with pytest.raises(ConfigError) as info:
        adhoc_config("/d/app.db", "ftp://host/x")
    assert str(info.value) == "command line: url: unknown scheme 'ftp'; did you mean 'sftp'? (known schemes: file, mem, s3, sftp, nats)"
    with pytest.raises(ConfigError) as info:
        adhoc_config("/d/app.db", "/b", retention="soon")
    assert str(info.value) == "command line: retention: invalid duration 'soon' (use e.g. 30s, 15m, 1h, 1h30m)"
    with pytest.raises(ConfigError) as info:
        adhoc_config("/d/app.db", "/b", retenton="1h")
    assert str(info.value) == "command line: unknown setting 'retenton'; did you mean 'retention'?"


def test_find_db(tmp_path, monkeypatch):
    config = parse("dbs: [{path: /d/a.db, replicas: [{url: /b1}]}, {path: /d/b.db, replicas: [{url: /b2}]}]")
    assert find_db(config, "/d/b.db") is config.dbs[1]
    assert find_db(config, Path("/d/./sub/../a.db")) is config.dbs[0]
    monkeypatch.chdir("/")
    assert find_db(config, "d/a.db") is config.dbs[0]


def test_find_db_through_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = parse(f"dbs: [{{path: {tmp_path}/real/a.db, replicas: [{{url: /b}}]}}]")
    assert find_db(config, tmp_path / "link" / "a.db") is config.dbs[0]


def test_find_db_missing_lists_configured():
    config = parse("dbs: [{path: /d/a.db, replicas: [{url: /b1}]}, {path: /d/b.db, replicas: [{url: /b2}]}]")
    with pytest.raises(ConfigError) as info:
        find_db(config, "/d/c.db")
    assert str(info.value) == "database /d/c.db is not in config /etc/replicator.yml (it has: /d/a.db, /d/b.db)"


def test_find_db_missing_in_adhoc_config():
    with pytest.raises(ConfigError, match=r"database /d/c.db is not in the config \(it has: /d/a.db\)"):
        find_db(adhoc_config("/d/a.db", "/b"), "/d/c.db")


def test_dataclass_field_names_are_the_contract():
    assert [f.name for f in dataclasses.fields(ReplicaConfig)] == [
        "name", "url", "scheme", "options", "retention", "retention_check_interval", "sync_interval", "op_timeout",
    ]
    assert [f.name for f in dataclasses.fields(DbConfig)] == [
        "path", "shadow_dir", "replicas", "snapshot_interval", "retention", "retention_check_interval",
        "compression", "compression_level", "min_checkpoint_page_count", "checkpoint_interval",
        "truncate_page_count", "monitor_interval", "sync_interval", "shadow_max_bytes", "shutdown_timeout",
        "data_loss_window_threshold", "verify_interval", "restore_if_db_not_exists",
        "encryption_key_path", "encryption_key", "segment_compression_level",
    ]
    assert [f.name for f in dataclasses.fields(Config)] == [
        "dbs", "log_level", "log_format", "source", "warnings", "metrics_addr", "dirs",
    ]
    assert [f.name for f in dataclasses.fields(DirConfig)] == ["dir", "pattern", "recursive", "watch", "template"]


def test_operations_keys():
    config = parse(minimal(extra_db="    data-loss-window-threshold: 3s\n    verify-interval: 1h\n", top="metrics-addr: 127.0.0.1:9090\nrestore-if-db-not-exists: true"))
    db = config.dbs[0]
    assert config.metrics_addr == "127.0.0.1:9090"
    assert db.data_loss_window_threshold == 3.0
    assert db.verify_interval == 3600.0
    assert db.restore_if_db_not_exists is True
    assert parse(minimal()).metrics_addr is None
    assert parse(minimal()).dbs[0].data_loss_window_threshold == 10.0
    for bad in ("9090", "localhost", "host:99999", "[::1:80"):
        with pytest.raises(ConfigError, match="metrics-addr: expected HOST:PORT"):
            parse(minimal(top=f"metrics-addr: '{bad}'"))
    assert parse(minimal(top="metrics-addr: ':9090'")).metrics_addr == ":9090"


def test_config_error_is_plain_exception_with_one_line():
    err = ConfigError("a\nb")
    assert str(err) == "a b"
    assert isinstance(err, Exception)
    assert os.linesep not in str(err)


def test_docs_examples_parse():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert len(blocks) >= 2
    env = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}
    configs = [parse_config(block, source=SRC, environ=env) for block in blocks]
    full = configs[-1]
    assert [db.path for db in full.dbs] == [Path("/data/app.db"), Path("/data/analytics.db")]
    assert [r.name for r in full.dbs[0].replicas] == ["local", "offsite"]
    assert [r.scheme for r in full.dbs[1].replicas] == ["sftp", "nats"]


def test_replica_op_timeout():
    assert parse(minimal()).dbs[0].replicas[0].op_timeout == 60.0
    assert parse(minimal(extra_replica="        op-timeout: 5s\n")).dbs[0].replicas[0].op_timeout == 5.0
    with pytest.raises(ConfigError, match=r"replicas\[0\]\.op-timeout: must be greater than 0"):
        parse(minimal(extra_replica="        op-timeout: 0s\n"))
