"""Fuzzing the config loader (replicator/config.py: parse_config).

Documents are built from the loader's own schema tables (every top-level, per-db, dir,
replica and driver option key it knows, so new keys are fuzzed as they are added) with
random values: well-formed and malformed durations, sizes, numbers (huge, negative,
float, NaN), booleans, enums, paths, addresses, URLs of every scheme and of none, and
${VAR} references (set, unset, with defaults, malformed) into an environment holding
marked secret values. They are rendered as YAML (block or flow style), sometimes with a
few characters inserted or removed, and raw YAML-ish text is fuzzed too.

Property (the module docstring): parse_config returns a Config or raises ConfigError
whose text is one line; a value that came from ${VAR} never appears in an error; an
accepted Config satisfies the documented invariants (absolute normalised paths, bounds
of every setting, at least one db and one replica each, unique names, no two dbs sharing
a file, shadow directory or replica location). Nothing else is raised and nothing hangs.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import event, given
from hypothesis import strategies as st
from test_fuzz_common import fuzz_settings, guarded, timeout

from replicator import config as C
from replicator.config import Config, ConfigError, parse_config

# The schema, as the loader knows it (private tables: the fuzzer follows the loader).
DB_SPECS = dict(C._DB_SPECS)
GLOBAL_SPECS = dict(C._GLOBAL_SPECS)
DRIVER_OPTIONS = {scheme: dict(opts) for scheme, opts in C._DRIVER_OPTIONS.items()}
REPLICA_KEYS = tuple(C._REPLICA_KEYS)
DIR_ONLY_KEYS = tuple(getattr(C, "_DIR_ONLY_KEYS", ("dir", "pattern", "recursive", "watch")))
ALL_OPTIONS = sorted({k for opts in DRIVER_OPTIONS.values() for k in opts})
SCHEMES = tuple(C.SCHEMES)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

SECRET_MARK = "Zq7secretVALUE"  # in every secret environment value; must never be echoed
ENV = {
    "SECRET_A": f"{SECRET_MARK}-a/b+c=",
    "SECRET_B": f"s3://{SECRET_MARK}@host/x",
    "SECRET_C": f"{SECRET_MARK}10s",
    "SECRET_D": f"/{SECRET_MARK}/path",
    "DURATION": "15s",
    "SIZE": "64MiB",
    "NUMBER": "7",
    "BOOL": "yes",
    "PATH": "/var/lib/app.db",
    "URL": "s3://bucket/app",
    "EMPTY": "",
}
SECRET_VALUES = [v for k, v in ENV.items() if k.startswith("SECRET")]

# --------------------------------------------------------------------------- values

huge = st.integers(0, 500).map(lambda k: 10**k)
numbers = st.one_of(
    st.integers(-10, 10**6),
    st.sampled_from([0, 1, -1, 22, 23, 65535, 65536, 2**31, 2**63, 2**64]),
    huge,
    st.floats(allow_nan=True, allow_infinity=True),
)
units = st.sampled_from(["", "s", "ms", "us", "µs", "ns", "m", "h", "d", "B", "KiB", "MiB", "GiB", "TiB", "KB", "MB", "x", " s", "S"])
number_text = st.one_of(
    st.integers(-5, 10**6).map(str),
    st.sampled_from(["0", "1.5", ".5", "5.", "1e3", "-0", "+3", "nan", "inf", "1_000", "١٢", "0x10", ""]),
    huge.map(str),
)
unit_text = st.builds(lambda parts: "".join(parts), st.lists(st.builds(lambda n, u: n + u, number_text, units), min_size=1, max_size=3))
env_refs = st.sampled_from(
    [
        "${SECRET_A}", "${SECRET_B}", "${SECRET_C}", "${SECRET_D}", "${DURATION}", "${SIZE}", "${NUMBER}",
        "${BOOL}", "${PATH}", "${URL}", "${EMPTY}", "${UNSET}", "${UNSET:-5s}", "${UNSET:-}", "${SECRET_A:-x}",
        "$${SECRET_A}", "${", "${bad name}", "${SECRET_A", "$SECRET_A", "x${SECRET_C}y", "${EMPTY:-${SECRET_A}}",
    ]
)
paths = st.one_of(
    st.sampled_from(["/tmp/a.db", "a.db", "./x/../b.db", "~/c.db", "/", ".", "..", "/tmp/dir/", "//x//y", "~nobody/x", "C:\\x"]),
    st.text(min_size=1, max_size=20),
    st.builds(lambda a, b: f"/tmp/{a}/{b}", st.text(max_size=5), st.text(max_size=5)),
)
urls = st.one_of(
    paths,
    st.sampled_from(
        [
            "file:///tmp/r", "file://localhost/tmp/r", "file://host/tmp/r", "file:relative", "file:///tmp/r?x=1",
            "file:///tmp/r#f", "file:///tmp/a%20b", "s3://bucket/app", "s3://", "s3:///x", "s3://b?endpoint=http://h",
            "S3://Bucket/app", "sftp://user@host:22/srv/app", "sftp://user:pw@host/x", "sftp://[::1]:2200/x",
            "sftp:///x", "nats://host:4222/bucket/app", "nats://tok@host/b", "nats://u:p@host/b", "nats://",
            "mem://x", "mem://", "ftp://x/y", "http://x", "x:y", "C:/x", "://x", "", " ", "s3://b/a?secret=x",
        ]
    ),
    st.builds(lambda s, rest: f"{s}://{rest}", st.sampled_from([*SCHEMES, "tls", "gs"]), st.text(max_size=20)),
)


def scalar_garbage():
    return st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20), st.binary(max_size=8))


anything = st.recursive(scalar_garbage(), lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=6)


def value_for(spec) -> st.SearchStrategy:
    kind = getattr(spec, "kind", "str")
    by_kind = {
        "duration": st.one_of(unit_text, numbers),
        "size": st.one_of(unit_text, numbers),
        "int": st.one_of(numbers, number_text),
        "bool": st.one_of(st.booleans(), st.sampled_from(["yes", "no", "on", "off", "1", "0", "true", "True", "TRUE ", "maybe", ""])),
        "enum": st.one_of(st.sampled_from(list(getattr(spec, "choices", ())) or ["x"]), st.text(max_size=8), st.sampled_from(["ZSTD", " info ", "inf"])),
        "path": paths,
        "addr": st.sampled_from([":9090", "127.0.0.1:9090", "[::1]:1", "[::1:1", "host:", "host:65536", "host:١٢", "9090", "a:b:1", ":" + "1" * 5000]),
        "key": st.one_of(
            st.sampled_from(["00" * 32, "0" * 63, "A" * 43 + "=", "-" * 43 + "=", "zz" * 32, ""]),
            st.binary(min_size=32, max_size=32).map(lambda b: b.hex()),
            st.text(max_size=50),
        ),
    }
    return st.one_of(by_kind.get(kind, st.text(max_size=30)), env_refs, anything)


# --------------------------------------------------------------------------- documents


def valid_value(spec, key: str = "") -> st.SearchStrategy:
    """A value the spec accepts (literal or through the environment)."""
    kind = getattr(spec, "kind", "str")
    if key == "truncate-page-count":  # must exceed min-checkpoint-page-count, or be 0
        return st.sampled_from([0, 10**6 + 1])
    if kind == "duration":
        return st.sampled_from(["10s", "1h30m", "250ms", "1d", "2m", 5, 0.5, "${DURATION}", "${UNSET:-3s}"] + ([] if spec.positive else ["0s", 0]))
    if kind == "size":
        if spec.low:
            return st.sampled_from(["5MiB", "64MiB", "1GiB", "${SIZE}"])
        return st.sampled_from(["64MiB", "1GiB", 4096, "100MB", "${SIZE}"])
    if kind == "int":
        return st.integers(int(spec.low or 0), int(spec.high if spec.high is not None else 10**6))
    if kind == "bool":
        return st.sampled_from([True, False, "yes", "off", "${BOOL}"])
    if kind == "enum":
        return st.sampled_from(list(spec.choices))
    if kind == "path":
        return st.sampled_from(["/tmp/fuzz-k", "rel/file", "~/x", "${PATH}", "${SECRET_D}"])
    if kind == "addr":
        return st.sampled_from(["127.0.0.1:9090", ":0", "[::1]:9100", "localhost:65535"])
    if kind == "key":
        return st.sampled_from(["00" * 32, "ab" * 32, "A" * 43 + "=", "${SECRET_A}"])
    return st.one_of(st.text(min_size=1, max_size=12), st.sampled_from(["${SECRET_A}", "${SECRET_B}", "plain"]))


@st.composite
def value(draw, spec, hostility: int, key: str = "") -> object:
    """Mostly a valid value; with probability hostility/10 anything at all."""
    if draw(st.integers(0, 9)) < hostility:
        return draw(value_for(spec))
    return draw(valid_value(spec, key))


@st.composite
def settings_block(draw, specs: dict, hostility: int, extra_keys=()) -> dict:
    pool = sorted(specs) + (list(extra_keys) if hostility and draw(st.integers(0, 9)) < hostility else [])
    keys = draw(st.lists(st.sampled_from(pool), max_size=4, unique=True))
    return {k: draw(value(specs.get(k), hostility, k)) for k in keys}


REPLICA_URLS = {
    "file": lambda i, j: f"/tmp/fuzz-r-{i}-{j}",
    "s3": lambda i, j: f"s3://bucket-{i}-{j}/app",
    "sftp": lambda i, j: f"sftp://u@host:22/srv/{i}/{j}",
    "nats": lambda i, j: f"nats://host:4222/b{i}{j}/app",
    "mem": lambda i, j: f"mem://m{i}{j}",
}


@st.composite
def replica(draw, i: int, j: int, hostility: int) -> object:
    if hostility and draw(st.integers(0, 30)) < hostility:
        return draw(anything)
    if draw(st.integers(0, 9)) < hostility:
        url = draw(st.one_of(urls, env_refs))
    else:
        url = REPLICA_URLS[draw(st.sampled_from(sorted(REPLICA_URLS)))](i, j)
    scheme = str(url).partition("://")[0].lower() if "://" in str(url) else "file"
    own = DRIVER_OPTIONS.get(scheme, {})
    r = {"url": url} if not hostility or draw(st.integers(0, 15)) else {}
    if draw(st.integers(0, 3)):
        r["name"] = draw(
            st.one_of(st.sampled_from([f"r{j}", "x.y_z-1"]), st.sampled_from(["s3", "file", "a b", "-x", ""]), st.text(max_size=8))
            if hostility
            else st.sampled_from([f"r{j}", f"x.y_z-{j}"])
        )
    option_keys = sorted(own) + (ALL_OPTIONS if hostility and draw(st.integers(0, 5)) == 0 else [])
    for key in draw(st.lists(st.sampled_from(option_keys), max_size=3, unique=True)) if option_keys else []:
        r[key] = draw(value(own.get(key), hostility))
    extra = [k for k in REPLICA_KEYS if k not in ("name", "url")] + (["type", "bucket"] if hostility else [])
    for key in draw(st.lists(st.sampled_from(extra), max_size=2, unique=True)):
        r[key] = draw(value(DB_SPECS.get(key, C._Spec("duration", positive=True)), hostility))
    return r


@st.composite
def db_entry(draw, i: int, hostility: int) -> object:
    if hostility and draw(st.integers(0, 30)) < hostility:
        return draw(anything)
    entry = draw(settings_block(DB_SPECS, hostility))
    if draw(st.integers(0, 3)) == 0:  # a dir: entry
        entry["dir"] = draw(st.one_of(st.just(f"/tmp/fuzz-dir-{i}"), paths, env_refs)) if hostility else f"/tmp/fuzz-dir-{i}"
        for key in draw(st.lists(st.sampled_from([k for k in DIR_ONLY_KEYS if k != "dir"]), max_size=2, unique=True)):
            entry[key] = draw(st.sampled_from(["*.db", "*.sqlite"]) if key == "pattern" else st.booleans())
        if hostility:
            for key in draw(st.lists(st.sampled_from(["pattern", "path", "shadow-dir", "watch"]), max_size=1)):
                entry[key] = draw(st.one_of(st.sampled_from(["a/*.db", " ", "*", "yes"]), anything))
    else:
        if not hostility or draw(st.integers(0, 10)):
            entry["path"] = draw(st.one_of(st.just(f"/tmp/fuzz-{i}.db"), paths, env_refs)) if hostility else f"/tmp/fuzz-{i}.db"
        if draw(st.integers(0, 3)) == 0:
            entry["shadow-dir"] = draw(value(C._Spec("path"), hostility)) if hostility else f"/tmp/fuzz-shadow-{i}"
    if not hostility or draw(st.integers(0, 10)):
        n = draw(st.integers(1 if not hostility else 0, 3))
        entry["replicas"] = [draw(replica(i, j, hostility)) for j in range(n)]
    if hostility and draw(st.integers(0, 9)) < hostility:  # a key that belongs elsewhere
        entry[draw(st.sampled_from(sorted(GLOBAL_SPECS) + ALL_OPTIONS[:3] + ["replica", "name"]))] = draw(anything)
    return entry


@st.composite
def documents(draw) -> object:
    hostility = draw(st.sampled_from([0, 0, 1, 1, 2, 4, 10]))  # tenths of the values that may be anything
    event(f"hostility {hostility}")
    if hostility and draw(st.integers(0, 40)) < hostility:
        return draw(anything)
    doc = draw(settings_block({**DB_SPECS, **GLOBAL_SPECS}, hostility, extra_keys=("path", "replicas", "url", "retention_check_interval", "dbz")))
    if not hostility or draw(st.integers(0, 12)):
        n = draw(st.integers(1 if not hostility else 0, 3))
        doc["dbs"] = [draw(db_entry(i, hostility)) for i in range(n)]
    return doc


@st.composite
def config_texts(draw) -> str:
    doc = draw(documents())
    try:
        text = yaml.safe_dump(doc, default_flow_style=draw(st.sampled_from([False, True, None])), allow_unicode=draw(st.booleans()))
    except yaml.YAMLError:
        text = repr(doc)
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 6)) == 0 else 0):  # near-YAML
        pos = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:pos] + draw(st.sampled_from([":", "-", " ", "\n", "\t", "'", '"', "{", "[", "&a", "*a", "!!", "#", "%", "@", "\x00", "\\"])) + text[pos:]
        else:
            text = text[:pos] + text[pos + 1 :]
    return text


yaml_chars = st.sampled_from(list("abdps:- \n\t'\"{}[],&*!|>#%@?~0123456789.$\\") + ["dbs", "path", "replicas", "url", "\n  ", "\n    - ", "${SECRET_A}", "<<", "!!binary", "\x00", "é"])
nested = st.builds(
    lambda opener, closer, depth, key: (key + opener * depth + "x" + closer * depth),
    st.sampled_from(["[", "{a: ", "- ", "[{a: ["]),
    st.sampled_from(["]", "}", "", "]}]"]),
    st.one_of(st.integers(0, 50), st.sampled_from([300, 600, 1000])),
    st.sampled_from(["", "dbs: ", "retention: ", "dbs:\n  - "]),
)
raw_texts = st.one_of(st.lists(yaml_chars, max_size=60).map("".join), st.lists(yaml_chars, max_size=60).map("".join), nested)


# --------------------------------------------------------------------------- checks


def check_config(cfg: Config) -> None:
    """The invariants of an accepted configuration."""
    assert isinstance(cfg, Config)
    assert cfg.dbs or cfg.dirs
    assert cfg.warnings == ()  # parse_config knows no file mode: no permission warning
    assert cfg.log_level in ("debug", "info", "warning", "error") and cfg.log_format in ("auto", "text", "json")
    if cfg.metrics_addr is not None:
        _, sep, port = cfg.metrics_addr.rpartition(":")
        assert sep and port.isdigit() and 0 <= int(port) <= 65535
    templates = [(db, False) for db in cfg.dbs] + [(entry.template, True) for entry in cfg.dirs]
    for entry in cfg.dirs:
        assert entry.dir.is_absolute() and os.path.normpath(entry.dir) == str(entry.dir)
        assert entry.pattern.strip() and "/" not in entry.pattern
        assert type(entry.recursive) is bool and type(entry.watch) is bool
    urls = []
    for db, is_dir in templates:
        for p in (db.path, db.shadow_dir):
            assert p.is_absolute() and os.path.normpath(p) == str(p), p
        assert db.shadow_dir != db.path and not db.path.is_relative_to(db.shadow_dir)
        for name in ("snapshot_interval", "checkpoint_interval", "sync_interval", "shutdown_timeout", "verify_interval"):
            v = getattr(db, name)
            assert type(v) is float and math.isfinite(v) and v >= 0, (name, v)
        for name in ("retention", "retention_check_interval", "monitor_interval", "data_loss_window_threshold"):
            v = getattr(db, name)
            assert type(v) is float and math.isfinite(v) and v > 0, (name, v)
        assert db.compression in ("zstd", "none") and 1 <= db.compression_level <= 22
        assert db.min_checkpoint_page_count >= 1 and db.truncate_page_count >= 0
        assert db.truncate_page_count == 0 or db.truncate_page_count > db.min_checkpoint_page_count
        assert type(db.shadow_max_bytes) is int and db.shadow_max_bytes > 0
        assert type(db.restore_if_db_not_exists) is bool
        key = getattr(db, "encryption_key", None)
        assert key is None or (type(key) is bytes and len(key) == 32)
        assert db.replicas
        names = [r.name for r in db.replicas]
        assert len(set(names)) == len(names)
        for r in db.replicas:
            assert NAME_RE.fullmatch(r.name) and r.scheme in SCHEMES and r.url.startswith(f"{r.scheme}://")
            assert set(r.options) <= {k.replace("-", "_") for k in DRIVER_OPTIONS[r.scheme]}
            for v in (r.retention, r.retention_check_interval, r.op_timeout):
                assert type(v) is float and math.isfinite(v) and v > 0
            assert type(r.sync_interval) is float and math.isfinite(r.sync_interval) and r.sync_interval >= 0
            if r.scheme == "file":
                location = Path(C._file_url_path(r.url))
                assert location.is_absolute()
                if not is_dir:
                    assert location != db.path and location != db.shadow_dir and not location.is_relative_to(db.shadow_dir)
            urls.append(r.url)
    assert len(set(urls)) == len(urls), "two replicas share a location"
    real = [db.path.resolve() for db in cfg.dbs]
    assert len(set(real)) == len(real)
    shadows = [db.shadow_dir.resolve() for db in cfg.dbs]
    assert len(set(shadows)) == len(shadows)


def known_bug(exc: BaseException) -> str | None:
    """The known, unfixed bug an exception belongs to, let through by the fuzz test; none
    now (BUGs 2, 3, 4, 11 and 12 are fixed and kept below as regression tests)."""
    return None


@pytest.fixture(scope="module")
def source():
    with tempfile.TemporaryDirectory(prefix="fuzz-config-") as d:
        yield Path(d) / "replicator.yml"


def run(text: str, source: Path) -> None:
    with guarded():
        try:
            cfg = parse_config(text, source=source, environ=ENV)
        except ConfigError as e:
            message = str(e)
            assert message and "\n" not in message and "\r" not in message
            for secret in SECRET_VALUES:
                assert secret not in message, f"a value from the environment is echoed: {message}"
                assert SECRET_MARK not in message, f"a value from the environment is echoed: {message}"
            event("ConfigError: " + re.sub(r"'[^']*'|\[\d+\]|\d+", "_", getattr(e, "detail", message))[:50])
            return
        except Exception as e:
            bug = known_bug(e)
            if bug is None:
                raise
            event(f"known {bug}")
            return
        event("accepted")
        check_config(cfg)
        assert parse_config(text, source=source, environ=ENV) == cfg  # deterministic


@pytest.mark.timeout(timeout(60))
@fuzz_settings(800)
@given(text=config_texts())
def test_fuzz_config_documents(source, text):
    run(text, source)


@pytest.mark.timeout(timeout(60))
@fuzz_settings(500)
@given(text=raw_texts)
def test_fuzz_config_raw_text(source, text):
    run(text, source)


# --------------------------------------------------------------------------- known bugs

BASE = "dbs:\n  - path: /tmp/fuzz-a.db\n    replicas:\n      - url: /tmp/fuzz-r\n"


def _expect_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        'dbs:\n  - path: "/tmp/a\\0b"\n    replicas:\n      - url: /tmp/fuzz-r\n',
        'dbs:\n  - path: /tmp/a\n    shadow-dir: "/tmp/s\\0x"\n    replicas:\n      - url: /tmp/fuzz-r\n',
        'dbs:\n  - dir: "/tmp/d\\0x"\n    replicas:\n      - url: /tmp/fuzz-r\n',
    ],
    ids=["path", "shadow-dir", "dir"],
)
def test_regression_nul_byte_in_a_path_is_a_config_error(text):
    _expect_config_error(text)


@pytest.mark.parametrize(
    "setting",
    [
        "compression-level: " + "9" * 5000,  # a YAML int: the loader's int() raises inside yaml.load
        'retention: "' + "9" * 5000 + 's"',  # a duration string: Fraction() raises
        'metrics-addr: ":' + "1" * 5000 + '"',  # _addr: int(port) raises
    ],
    ids=["yaml-int", "duration", "metrics-addr"],
)
def test_regression_huge_integers_are_a_config_error(setting):
    _expect_config_error(setting + "\n" + BASE)


@pytest.mark.parametrize("setting", ['retention: "1' + "0" * 400 + 's"', "retention: 1" + "0" * 400], ids=["string", "yaml-int"])
def test_regression_huge_durations_are_a_config_error(setting):
    _expect_config_error(setting + "\n" + BASE)


@pytest.mark.parametrize("text", ["[" * 3000 + "]" * 3000, "dbs: " + "[" * 3000 + "]" * 3000, "retention: " + "{a: " * 3000 + "x" + "}" * 3000])
def test_regression_deeply_nested_yaml_is_a_config_error(text):
    _expect_config_error(text)


def _alias_bomb(levels: int) -> str:
    """A few hundred bytes of YAML whose aliases expand to 10**levels scalars."""
    parts = ["&l0 [x, x, x, x, x, x, x, x, x, x]"]
    parts += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "restore-if-db-not-exists: [" + ", ".join(parts) + "]\n" + BASE


@pytest.mark.timeout(60)
def test_regression_an_alias_bomb_gives_a_short_error():
    text = _alias_bomb(6)  # 400 bytes; 9 levels would make a 5.8 GB message
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    assert len(str(caught.value)) < 10_000, f"a {len(text)}-byte config gave a {len(str(caught.value))}-character error"


def test_regression_nul_byte_in_a_file_url_is_refused():
    from replicas import BadURL, open_driver

    try:
        cfg = parse_config('dbs:\n  - path: /tmp/fuzz-a.db\n    replicas:\n      - url: "file:///tmp/r%00x"\n', environ={})
    except ConfigError:
        return
    with pytest.raises(BadURL):
        open_driver(cfg.dbs[0].replicas[0].url)
