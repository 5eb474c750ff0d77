"""The YAML configuration: loading, environment expansion and validation.

`load_config` reads a file into frozen dataclasses (`Config` > `DbConfig` > `ReplicaConfig`)
with every default filled in and every path made absolute. Every user mistake is a
`ConfigError` whose text is one line naming the file and the key path, for example
``/etc/replicator.yml: dbs[0].replicas[1].retention: invalid duration 'abc' (...)``.
Values that came from ``${VAR}`` are never echoed in errors; the variable is named instead.
See docs/configuration.md for the reference.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import reprlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn
from urllib.parse import quote, unquote, urlsplit

from replicas.registry import redact_url
from replicator.durations import UnitError, format_duration, format_size, parse_duration, parse_size
from replicator.encryption import EncryptionKey, KeyFormatError, parse_key_text, read_key_file
from replicator.errors import ConfigError  # defined there, so the CLI catches it without importing this module

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULTS",
    "SCHEMES",
    "Config",
    "ConfigError",
    "DbConfig",
    "DirConfig",
    "ReplicaConfig",
    "adhoc_config",
    "default_shadow_dir",
    "encryption_key_of",
    "find_db",
    "load_encryption_key",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/replicator.yml")
SCHEMES = ("file", "mem", "s3", "sftp", "nats")


@dataclass(frozen=True)
class ReplicaConfig:
    """One destination of one database."""

    name: str
    url: str  # normalised; bare paths become file:///abs
    scheme: str
    options: Mapping[str, Any]  # driver options with snake_case keys, read-only
    retention: float
    retention_check_interval: float
    sync_interval: float
    op_timeout: float = 60.0  # seconds without progress before an operation fails (Transient)


@dataclass(frozen=True)
class DbConfig:
    """One replicated database with its settings resolved (own value, else global, else default)."""

    path: Path
    shadow_dir: Path
    replicas: tuple[ReplicaConfig, ...]
    snapshot_interval: float
    retention: float
    retention_check_interval: float
    compression: str
    compression_level: int  # snapshots
    min_checkpoint_page_count: int
    checkpoint_interval: float
    truncate_page_count: int
    monitor_interval: float
    sync_interval: float
    shadow_max_bytes: int
    shutdown_timeout: float
    data_loss_window_threshold: float = 10.0
    verify_interval: float = 0.0
    restore_if_db_not_exists: bool = False
    encryption_key_path: Path | None = None  # the key file, read when needed (encryption_key_of)
    encryption_key: bytes | None = dataclasses.field(default=None, repr=False)  # from encryption-key
    segment_compression_level: int = 1  # segments: the continuous stream, compressed on the commit path


@dataclass(frozen=True)
class DirConfig:
    """A `dir:` entry: every SQLite database in a directory, each replicated on its own.

    `template` holds the entry's resolved settings and its replicas at their base URLs; its
    path is the directory itself. replicator.discovery turns each database found into a
    DbConfig from it (own shadow directory, replica URLs extended by the relative path).
    """

    dir: Path
    pattern: str  # glob on the file name
    recursive: bool
    watch: bool
    template: DbConfig

    @property
    def replicas(self) -> tuple[ReplicaConfig, ...]:
        return self.template.replicas


@dataclass(frozen=True)
class Config:
    """The whole configuration; `warnings` are non-fatal findings for the CLI to log."""

    dbs: tuple[DbConfig, ...]
    log_level: str
    log_format: str
    source: Path | None  # the file it came from, None for ad hoc
    warnings: tuple[str, ...] = ()
    metrics_addr: str | None = None  # host:port serving /metrics, /healthz, /readyz, /status
    dirs: tuple[DirConfig, ...] = ()  # dir: entries, expanded by replicator.discovery


class _KeyedAsWritten(Mapping[str, Any]):
    """Read-only mapping keyed as in YAML ("snapshot-interval"); snake_case lookups work too."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key.replace("_", "-") if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"DEFAULTS({self._data!r})"


# --- the schema -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """How one key's value is checked and converted."""

    kind: str  # duration | size | int | bool | str | path | enum | addr | key
    low: float | None = None  # inclusive lower bound
    positive: bool = False  # must be > 0
    high: float | None = None  # inclusive upper bound
    choices: tuple[str, ...] = ()
    secret: bool = False  # warn when written literally in a file others can read

    def describe_bounds(self) -> str:
        show = format_duration if self.kind == "duration" else format_size if self.kind == "size" else str
        if self.positive:
            return "must be greater than 0"
        if self.low is not None and self.high is not None:
            return f"must be between {show(self.low)} and {show(self.high)}"
        return f"must be at least {show(self.low)}"


_DURATION_0 = _Spec("duration", low=0)  # 0 allowed (disables, or "at once")
_DURATION_POS = _Spec("duration", positive=True)

# Settings given at the top level and overridable per db.
_DB_SPECS: dict[str, _Spec] = {
    "snapshot-interval": _DURATION_0,
    "retention": _DURATION_POS,
    "retention-check-interval": _DURATION_POS,
    "compression": _Spec("enum", choices=("zstd", "none")),
    "compression-level": _Spec("int", low=1, high=22),
    "segment-compression-level": _Spec("int", low=1, high=22),
    "min-checkpoint-page-count": _Spec("int", low=1),
    "checkpoint-interval": _DURATION_0,
    "truncate-page-count": _Spec("int", low=0),
    "monitor-interval": _DURATION_POS,
    "sync-interval": _DURATION_0,
    "shadow-max-bytes": _Spec("size", positive=True),
    "shutdown-timeout": _DURATION_0,
    "data-loss-window-threshold": _DURATION_POS,
    "verify-interval": _DURATION_0,
    "restore-if-db-not-exists": _Spec("bool"),
    # at most one of the two at each level; one set on a db replaces the other inherited
    "encryption-key-path": _Spec("path"),
    "encryption-key": _Spec("key", secret=True),
}
_ENCRYPTION_KEYS = ("encryption-key-path", "encryption-key")
_GLOBAL_SPECS: dict[str, _Spec] = {
    "log-level": _Spec("enum", choices=("debug", "info", "warning", "error")),
    "log-format": _Spec("enum", choices=("auto", "text", "json")),
    "metrics-addr": _Spec("addr"),
}
_REPLICA_OVERRIDES = ("retention", "retention-check-interval", "sync-interval")

_TOP_KEYS = ("dbs", *_DB_SPECS, *_GLOBAL_SPECS)
_DB_KEYS = ("path", "shadow-dir", "replicas", *_DB_SPECS)
_DIR_ONLY_KEYS = ("dir", "pattern", "recursive", "watch")
_DIR_KEYS = (*_DIR_ONLY_KEYS, "replicas", *_DB_SPECS)
_REPLICA_KEYS = ("name", "url", "op-timeout", *_REPLICA_OVERRIDES)
DEFAULT_OP_TIMEOUT = 60.0  # seconds without progress before a storage operation is abandoned

_STR = _Spec("str")
_SECRET = _Spec("str", secret=True)
_BOOL = _Spec("bool")
_FILE = _Spec("path")
# Driver options per URL scheme, as written in YAML; drivers get them with snake_case keys.
_DRIVER_OPTIONS: dict[str, dict[str, _Spec]] = {
    "file": {},
    "mem": {},
    "s3": {
        "endpoint": _STR,
        "region": _STR,
        "access-key-id": _STR,
        "secret-access-key": _SECRET,
        "session-token": _SECRET,
        "force-path-style": _BOOL,
        "skip-verify": _BOOL,
        # S3 rejects multipart parts outside 5 MiB..5 GiB
        "part-size": _Spec("size", low=5 * 1024**2, high=5 * 1024**3),
    },
    "sftp": {
        "user": _STR,
        "password": _SECRET,
        "key-path": _FILE,
        "known-hosts-path": _FILE,
        "host-key": _STR,
        "timeout": _DURATION_POS,
    },
    "nats": {
        "username": _STR,
        "password": _SECRET,
        "token": _SECRET,
        "nkey-path": _FILE,
        "creds-path": _FILE,
        "tls-ca-path": _FILE,
        "skip-verify": _BOOL,
        "max-bucket-bytes": _Spec("size", positive=True),
    },
}
# URL part a scheme needs in its host position, for the error message.
_URL_HOST_NAMES = {
    "s3": "a bucket (s3://BUCKET/PATH)",
    "sftp": "a host (sftp://HOST/PATH)",
    "nats": "a server (nats://HOST:PORT/BUCKET)",
}

DEFAULTS: Mapping[str, Any] = _KeyedAsWritten(
    {
        "snapshot-interval": 3600.0,
        "retention": 86400.0,
        "retention-check-interval": 3600.0,
        "compression": "zstd",
        "compression-level": 3,
        "segment-compression-level": 1,
        "min-checkpoint-page-count": 1000,
        "checkpoint-interval": 60.0,
        "truncate-page-count": 121359,
        "monitor-interval": 1.0,
        "sync-interval": 0.02,
        "shadow-max-bytes": 1024**3,
        "shutdown-timeout": 10.0,
        "data-loss-window-threshold": 10.0,
        "verify-interval": 0.0,
        "restore-if-db-not-exists": False,
        "encryption-key-path": None,
        "encryption-key": None,
        "log-level": "info",
        "log-format": "auto",
        "metrics-addr": None,
    }
)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCHEME_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_BOOL_WORDS = {
    **dict.fromkeys(("true", "yes", "on", "1"), True),
    **dict.fromkeys(("false", "no", "off", "0"), False),
}
_MISSING = object()


# --- public API -------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read and validate the config at path, else $REPLICATOR_CONFIG, else /etc/replicator.yml."""
    env = os.environ if environ is None else environ
    if path is None:
        path = env.get("REPLICATOR_CONFIG") or DEFAULT_CONFIG_PATH
    file = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    try:
        with open(file, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {file} not found (pass -c FILE or set REPLICATOR_CONFIG)") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {file} is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"config file {file} is not readable (permission denied)") from None
    except OSError as exc:
        raise ConfigError(f"config file {file} cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text (bad byte at offset {exc.start})") from None
    return _parse(text, source=file, environ=env, file_mode=mode)


def parse_config(
    text: str, *, source: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Validate config text; relative paths resolve against source's directory (else the cwd)."""
    source = Path(os.path.abspath(source)) if source is not None else None
    return _parse(text, source=source, environ=os.environ if environ is None else environ, file_mode=None)


def adhoc_config(db_path: str | os.PathLike[str], replica_url: str, **overrides: Any) -> Config:
    """The config for `replicator replicate DB_PATH REPLICA_URL`: one db, one replica, defaults.

    overrides take snake_case names of top-level or per-db keys (retention="1h",
    log_level="debug", shadow_dir=...), `name` for the replica, and `options` (a mapping)
    for driver options. None values are ignored, so unset CLI flags can be passed through.
    """
    db: dict[str, Any] = {"path": os.fspath(db_path)}
    replica: dict[str, Any] = {"url": replica_url}
    top: dict[str, Any] = {"dbs": [db]}
    known = ("name", "options", "shadow-dir", *_DB_SPECS, *_GLOBAL_SPECS)
    for name, value in overrides.items():
        if value is None:
            continue
        key = name.replace("_", "-")
        if key in _GLOBAL_SPECS:
            top[key] = value
        elif key in _DB_SPECS or key == "shadow-dir":
            db[key] = value
        elif key == "name":
            replica["name"] = value
        elif key == "options":
            replica.update({str(k).replace("_", "-"): v for k, v in dict(value).items()})
        else:
            raise ConfigError(f"command line: unknown setting {name!r}{_suggest(key, known, snake=True)}")
    db["replicas"] = [replica]
    ctx = _Context(label="command line", base_dir=Path.cwd(), environ={}, expand=False, adhoc=True)
    return _build(top, ctx, source=None)


def find_db(config: Config, db_path: str | os.PathLike[str]) -> DbConfig:
    """The db entry for db_path (relative to the cwd), matched by absolute or resolved path."""
    wanted = Path(os.path.abspath(os.path.expanduser(os.fspath(db_path))))
    for db in config.dbs:
        if db.path == wanted:
            return db
    resolved = wanted.resolve()
    for db in config.dbs:
        if db.path.resolve() == resolved:
            return db
    if config.dirs:  # a database under a dir: entry, whether or not it exists yet
        from replicator.discovery import db_config, in_entry

        for entry in config.dirs:
            for candidate in (wanted, resolved):
                if in_entry(entry, candidate):
                    return db_config(entry, candidate)
    where = f"config {config.source}" if config.source else "the config"
    have = ", ".join([*(str(db.path) for db in config.dbs), *(f"{e.dir}/{e.pattern}" for e in config.dirs)])
    have = have or "no databases"
    raise ConfigError(f"database {wanted} is not in {where} (it has: {have})")


def default_shadow_dir(db_path: Path) -> Path:
    """Where a db's shadow log lives unless shadow-dir says otherwise: <dir>/.<name>-replicator."""
    db_path = Path(db_path)
    return db_path.parent / f".{db_path.name}-replicator"


# --- parsing ----------------------------------------------------------------------------


class _Expanded(str):
    """A string produced by ${VAR} expansion; errors name its variables, never its value."""

    variables: tuple[str, ...]
    from_file: bool  # some text came from a ${VAR:-default} written in the file

    def __new__(cls, value: str, variables: tuple[str, ...], from_file: bool) -> _Expanded:
        obj = super().__new__(cls, value)
        obj.variables = variables
        obj.from_file = from_file
        return obj


@dataclass
class _Context:
    """What every check needs: where errors point, where relative paths start, the env."""

    label: str  # the file, or "config"/"command line"
    base_dir: Path
    environ: Mapping[str, str]
    expand: bool = True
    adhoc: bool = False
    literal_secrets: list[str] | None = None

    def fail(self, path: str, message: str, value: object = None) -> NoReturn:
        shown = path
        if self.adhoc:  # the user typed no dbs list; name the setting alone
            shown = re.sub(r"^dbs\[0\](\.replicas\[0\])?\.?", "", path)
        if isinstance(value, _Expanded):
            shown += " (from " + ", ".join(f"${{{v}}}" for v in value.variables) + ")"
        prefix = f"{self.label}: {shown}: " if shown else f"{self.label}: "
        raise ConfigError(prefix + message, key=path or None, detail=message)


_LOADER: Any = None


def _yaml_loader() -> tuple[Any, Any]:
    """PyYAML and its SafeLoader that rejects duplicate keys (which plain YAML silently
    collapses), made on first use: `replicator restore URL` reads no config file and so
    need not pay for importing PyYAML."""
    global _LOADER
    import yaml

    if _LOADER is None:

        class _Loader(yaml.SafeLoader):
            pass

        def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Iterator[dict]:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = loader.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line)
                except TypeError:
                    continue  # unhashable key: construct_mapping reports it
                if first != key_node.start_mark.line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first + 1})", key_node.start_mark
                    )
            data: dict = {}
            yield data
            data.update(loader.construct_mapping(node))

        _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
        _LOADER = _Loader
    return yaml, _LOADER


def _parse(text: str, *, source: Path | None, environ: Mapping[str, str], file_mode: int | None) -> Config:
    label = str(source) if source is not None else "config"
    yaml, loader = _yaml_loader()
    try:
        doc = yaml.load(text, Loader=loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "syntax error"
        if exc.problem and exc.context:
            what = f"{exc.problem} ({exc.context})"
        raise ConfigError(f"{label}: {where}invalid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: invalid YAML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits; nesting thousands deep
        what = "nested too deeply" if isinstance(exc, RecursionError) else "a number too long to read"
        raise ConfigError(f"{label}: invalid YAML: {what}") from None
    base = source.parent if source is not None else Path.cwd()
    ctx = _Context(label=label, base_dir=base, environ=environ, literal_secrets=[])
    config = _build(doc, ctx, source=source)
    warnings: list[str] = []
    if file_mode is not None and file_mode & 0o044 and ctx.literal_secrets:
        keys = ", ".join(ctx.literal_secrets)
        warnings.append(
            f"{label}: secrets written literally ({keys}) in a file readable by other users; "
            f"use ${{VAR}} or chmod 600 {label}"
        )
    return dataclasses.replace(config, warnings=tuple(warnings))


def _build(doc: object, ctx: _Context, *, source: Path | None) -> Config:
    if doc is None:
        ctx.fail("", "config is empty; it needs a dbs list (see docs/configuration.md)")
    if not isinstance(doc, dict):
        ctx.fail("", f"the top level must be a mapping of keys, got {_type_name(doc)}")
    _check_keys(ctx, "", doc, _TOP_KEYS, where="top")

    settings = {key: DEFAULTS[key] for key in (*_DB_SPECS, *_GLOBAL_SPECS)}
    own = set()
    for key, spec in (*_DB_SPECS.items(), *_GLOBAL_SPECS.items()):
        value = _value(ctx, key, doc, key)
        if value is not _MISSING:
            settings[key] = _convert(ctx, key, value, spec)
            own.add(key)
            _note_secret(ctx, key, value, spec)
    _encryption_settings(ctx, "", settings, own)

    raw_dbs = doc.get("dbs", _MISSING)
    if raw_dbs is _MISSING or raw_dbs is None:
        ctx.fail("dbs", "required: a list of databases, each with a path and replicas")
    if not isinstance(raw_dbs, list):
        ctx.fail("dbs", f"expected a list of databases, got {_type_name(raw_dbs)}")
    if not raw_dbs:
        ctx.fail("dbs", "must list at least one database")
    entries: list[tuple[int, DbConfig]] = []
    dir_entries: list[tuple[int, DirConfig]] = []
    for i, raw in enumerate(raw_dbs):
        if isinstance(raw, dict) and "dir" in raw:
            if "path" in raw:
                ctx.fail(f"dbs[{i}]", "give either path (one database) or dir (a directory of databases), not both")
            dir_entries.append((i, _dir(ctx, f"dbs[{i}]", raw, settings)))
        else:
            entries.append((i, _db(ctx, f"dbs[{i}]", raw, settings)))
    _check_overlaps(ctx, entries, dir_entries)
    return Config(
        dbs=tuple(db for _, db in entries),
        log_level=settings["log-level"],
        log_format=settings["log-format"],
        source=source,
        metrics_addr=settings["metrics-addr"],
        dirs=tuple(entry for _, entry in dir_entries),
    )


def _db(ctx: _Context, path: str, raw: object, inherited: Mapping[str, Any]) -> DbConfig:
    if not isinstance(raw, dict):
        ctx.fail(path, f"expected a mapping with path and replicas, got {_type_name(raw)}")
    _check_keys(ctx, path, raw, _DB_KEYS, where="db")
    db_path = _required_path(ctx, f"{path}.path", raw, "path")
    return _db_entry(ctx, path, raw, inherited, db_path)


def _dir(ctx: _Context, path: str, raw: dict, inherited: Mapping[str, Any]) -> DirConfig:
    """A dir: entry; its settings and replicas are checked as for a path: entry."""
    _check_keys(ctx, path, raw, _DIR_KEYS, where="dir")
    value = _value(ctx, f"{path}.dir", raw, "dir")
    if value is _MISSING:
        ctx.fail(f"{path}.dir", "required: the directory that holds the databases")
    directory = _path(ctx, f"{path}.dir", value)
    pattern = _value(ctx, f"{path}.pattern", raw, "pattern")
    if pattern is _MISSING:
        pattern = "*.db"
    else:
        pattern = _string(ctx, f"{path}.pattern", pattern)
        if "/" in pattern or "\\" in pattern:
            ctx.fail(f"{path}.pattern", f"a glob on the file name, not a path{_got(pattern)} (use recursive: true for subdirectories)", pattern)
        if not pattern.strip():
            ctx.fail(f"{path}.pattern", "blank pattern (e.g. '*.db', '*.sqlite'; remove the key for *.db)", pattern)
    flags = {}
    for key in ("recursive", "watch"):
        flag = _value(ctx, f"{path}.{key}", raw, key)
        flags[key] = False if flag is _MISSING else _convert(ctx, f"{path}.{key}", flag, _BOOL)
    template = _db_entry(ctx, path, raw, inherited, directory, entry_dir=True)
    for j, replica in enumerate(template.replicas):
        if replica.scheme == "file":
            location = _file_url_path(replica.url)
            if location == directory or (flags["recursive"] and _is_within(location, directory)):
                where = "the directory" if location == directory else "the directory (it would be scanned for databases)"
                ctx.fail(f"{path}.replicas[{j}].url", f"must not be {where} of the databases")
    return DirConfig(
        dir=directory, pattern=pattern, recursive=flags["recursive"], watch=flags["watch"], template=template
    )


def _db_entry(
    ctx: _Context, path: str, raw: dict, inherited: Mapping[str, Any], db_path: Path, *, entry_dir: bool = False
) -> DbConfig:
    """The settings and replicas of a db entry (for a dir entry, db_path is the directory)."""
    settings = dict(inherited)
    own = set()
    for key, spec in _DB_SPECS.items():
        value = _value(ctx, f"{path}.{key}", raw, key)
        if value is not _MISSING:
            settings[key] = _convert(ctx, f"{path}.{key}", value, spec)
            own.add(key)
            _note_secret(ctx, f"{path}.{key}", value, spec)
    _encryption_settings(ctx, f"{path}.", settings, own)
    truncate, minimum = settings["truncate-page-count"], settings["min-checkpoint-page-count"]
    if truncate and truncate <= minimum:
        ctx.fail(path, "truncate-page-count must be greater than min-checkpoint-page-count (or 0 to disable)")

    shadow = _MISSING if entry_dir else _value(ctx, f"{path}.shadow-dir", raw, "shadow-dir")
    if shadow is _MISSING:
        shadow_dir = default_shadow_dir(db_path)
    else:
        shadow_dir = _path(ctx, f"{path}.shadow-dir", shadow)
    if shadow_dir == db_path or _is_within(db_path, shadow_dir):
        ctx.fail(f"{path}.shadow-dir", "must not be the database's own directory or contain the database")

    raw_replicas = raw.get("replicas", _MISSING)
    if raw_replicas is _MISSING or raw_replicas is None:
        ctx.fail(f"{path}.replicas", "required: a list of at least one replica, e.g. - url: s3://BUCKET/PATH")
    if not isinstance(raw_replicas, list):
        ctx.fail(f"{path}.replicas", f"expected a list of replicas, got {_type_name(raw_replicas)}")
    if not raw_replicas:
        ctx.fail(f"{path}.replicas", "must list at least one replica")
    replicas = []
    first_with_name: dict[str, int] = {}
    for j, raw_replica in enumerate(raw_replicas):
        replica_path = f"{path}.replicas[{j}]"
        replica = _replica(ctx, replica_path, raw_replica, settings)
        if replica.name in first_with_name:
            other = f"{path}.replicas[{first_with_name[replica.name]}]"
            implicit = "" if "name" in raw_replica else " (the default name is the URL scheme)"
            ctx.fail(
                replica_path,
                f"duplicate replica name {replica.name!r}, also used by {other}{implicit}; "
                "give each replica a distinct name",
            )
        first_with_name[replica.name] = j
        if replica.scheme == "file" and not entry_dir:
            location = _file_url_path(replica.url)
            if location == shadow_dir or _is_within(location, shadow_dir):
                ctx.fail(f"{replica_path}.url", "must not be inside the shadow directory")
            if location == db_path:
                ctx.fail(f"{replica_path}.url", "must not be the database file itself")
        replicas.append(replica)

    return DbConfig(
        path=db_path,
        shadow_dir=shadow_dir,
        replicas=tuple(replicas),
        snapshot_interval=settings["snapshot-interval"],
        retention=settings["retention"],
        retention_check_interval=settings["retention-check-interval"],
        compression=settings["compression"],
        compression_level=settings["compression-level"],
        segment_compression_level=settings["segment-compression-level"],
        min_checkpoint_page_count=settings["min-checkpoint-page-count"],
        checkpoint_interval=settings["checkpoint-interval"],
        truncate_page_count=settings["truncate-page-count"],
        monitor_interval=settings["monitor-interval"],
        sync_interval=settings["sync-interval"],
        shadow_max_bytes=settings["shadow-max-bytes"],
        shutdown_timeout=settings["shutdown-timeout"],
        data_loss_window_threshold=settings["data-loss-window-threshold"],
        verify_interval=settings["verify-interval"],
        restore_if_db_not_exists=settings["restore-if-db-not-exists"],
        encryption_key_path=Path(settings["encryption-key-path"]) if settings["encryption-key-path"] else None,
        encryption_key=settings["encryption-key"],
    )


def _note_secret(ctx: _Context, path: str, value: object, spec: _Spec) -> None:
    """Remember a secret written literally in the file (for the file-permissions warning)."""
    literal = not isinstance(value, _Expanded) or value.from_file
    if spec.secret and literal and ctx.literal_secrets is not None:
        ctx.literal_secrets.append(path)


def _encryption_settings(ctx: _Context, prefix: str, settings: dict[str, Any], own: set[str]) -> None:
    """At most one key source per level; one set here replaces the other one inherited."""
    given = [k for k in _ENCRYPTION_KEYS if k in own]
    if len(given) == 2:
        ctx.fail(f"{prefix}encryption-key", "give either encryption-key-path (a key file) or encryption-key, not both")
    for other in _ENCRYPTION_KEYS:
        if given and other != given[0]:
            settings[other] = None


def load_encryption_key(path: str | os.PathLike[str], *, what: str = "encryption-key-path") -> EncryptionKey:
    """Read a key file (32 raw bytes, 64 hex digits or base64 of 32 bytes). Any problem is a
    one-line ConfigError naming `what` and the file; the file's contents are never shown."""
    try:
        return read_key_file(path)
    except KeyFormatError as exc:
        raise ConfigError(f"{what} {os.fspath(path)}: {exc}", key=what, detail=str(exc)) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what} {os.fspath(path)}: cannot read the key file ({reason})", key=what) from None


def encryption_key_of(db: DbConfig) -> EncryptionKey | None:
    """The db's encryption key (its key file is read now), or None when it has none."""
    if db.encryption_key is not None:
        return EncryptionKey(db.encryption_key, origin="encryption-key")
    if db.encryption_key_path is not None:
        return load_encryption_key(db.encryption_key_path)
    return None


def _replica(ctx: _Context, path: str, raw: object, db_settings: Mapping[str, Any]) -> ReplicaConfig:
    if not isinstance(raw, dict):
        ctx.fail(path, f"expected a mapping with a url, got {_type_name(raw)}")
    raw_url = _value(ctx, f"{path}.url", raw, "url")
    if raw_url is _MISSING:
        ctx.fail(path, "missing url (e.g. url: s3://BUCKET/PATH, or an absolute path)")
    url, scheme = _url(ctx, f"{path}.url", raw_url)
    option_specs = _DRIVER_OPTIONS[scheme]
    _check_keys(ctx, path, raw, (*_REPLICA_KEYS, *option_specs), where=scheme)

    name = _value(ctx, f"{path}.name", raw, "name")
    if name is _MISSING:
        name = scheme
    else:
        name = _string(ctx, f"{path}.name", name)
        if not _NAME_RE.fullmatch(name):
            rule = "use letters, digits, '.', '_' and '-'"
            ctx.fail(f"{path}.name", f"invalid name{_shown(name)} ({rule})", name)

    overrides = {}
    for key in _REPLICA_OVERRIDES:
        value = _value(ctx, f"{path}.{key}", raw, key)
        if value is _MISSING:
            # a replica's sync-interval spaces its uploads and is never inherited: the
            # database's sync-interval already spaces the segments it gets
            overrides[key] = 0.0 if key == "sync-interval" else db_settings[key]
        else:
            overrides[key] = _convert(ctx, f"{path}.{key}", value, _DB_SPECS[key])

    op_timeout = _value(ctx, f"{path}.op-timeout", raw, "op-timeout")
    op_timeout = DEFAULT_OP_TIMEOUT if op_timeout is _MISSING else _convert(ctx, f"{path}.op-timeout", op_timeout, _DURATION_POS)

    options: dict[str, Any] = {}
    for key, spec in option_specs.items():
        value = _value(ctx, f"{path}.{key}", raw, key)
        if value is _MISSING:
            continue
        options[key.replace("-", "_")] = _convert(ctx, f"{path}.{key}", value, spec)
        literal = not isinstance(value, _Expanded) or value.from_file
        if spec.secret and literal and ctx.literal_secrets is not None:
            ctx.literal_secrets.append(f"{path}.{key}")
    # a password in the user-info, a nats token, or a secret-looking query parameter
    url_has_secret = redact_url(url) != url
    if ctx.literal_secrets is not None and url_has_secret and not isinstance(raw_url, _Expanded):
        ctx.literal_secrets.append(f"{path}.url")

    return ReplicaConfig(
        name=str(name),
        url=url,
        scheme=scheme,
        options=MappingProxyType(options),
        retention=overrides["retention"],
        retention_check_interval=overrides["retention-check-interval"],
        sync_interval=overrides["sync-interval"],
        op_timeout=op_timeout,
    )


def _url(ctx: _Context, path: str, value: object) -> tuple[str, str]:
    """The normalised URL and its scheme; anything without "://" is a filesystem path."""
    text = _string(ctx, path, value).strip()
    if "\0" in unquote(text):
        ctx.fail(path, "a URL must not contain a NUL byte (or %00)", value)
    if "://" not in text:
        if _SCHEME_PREFIX_RE.match(text):
            ctx.fail(path, f"malformed URL{_shown(value)} (expected SCHEME://..., or a path)", value)
        return _file_url(_path(ctx, path, value)), "file"
    written_scheme, _, rest = text.partition("://")
    scheme = written_scheme.lower()
    if scheme not in SCHEMES:
        shown = "" if isinstance(value, _Expanded) else f" {written_scheme!r}"
        hint = _suggest(scheme, SCHEMES, value=value)
        ctx.fail(path, f"unknown scheme{shown}{hint} (known schemes: {', '.join(SCHEMES)})", value)
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            ctx.fail(path, "a file URL needs an absolute path: file:///PATH (three slashes)", value)
        if parts.query or parts.fragment:
            message = "a file URL takes no ?query or #fragment (write '?' and '#' in paths as %3F, %23)"
            ctx.fail(path, message, value)
        return _file_url(Path(os.path.normpath(unquote(parts.path)))), "file"
    # The last '@' ends the user-info, as in the drivers: passwords may hold a raw '/'.
    location = rest.split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
    host = location.split("/", 1)[0].rsplit(":", 1)[0] if not location.startswith("[") else location
    if scheme in _URL_HOST_NAMES and not host:
        ctx.fail(path, f"{scheme} URLs need {_URL_HOST_NAMES[scheme]}", value)
    return f"{scheme}://{rest}", scheme


def _file_url(path: Path) -> str:
    """file:// URL for an absolute path, percent-encoded so that drivers can unquote it."""
    return "file://" + quote(str(path), safe="/")


def _file_url_path(url: str) -> Path:
    return Path(unquote(urlsplit(url).path))


# --- values -----------------------------------------------------------------------------


def _value(ctx: _Context, path: str, mapping: dict, key: str) -> object:
    """The expanded value of mapping[key], or _MISSING when absent or empty after expansion."""
    if key not in mapping:
        return _MISSING
    value = mapping[key]
    if value is None:
        ctx.fail(path, "no value given (remove the key to use the default)")
    if isinstance(value, str):
        if ctx.expand:
            value = _expand(ctx, path, value)
        if value == "":
            return _MISSING  # e.g. ${VAR:-} with VAR unset: the key counts as not set
    return value


def _expand(ctx: _Context, path: str, text: str) -> str:
    """Apply ${VAR}, ${VAR:-default} and $$; other "$" characters stay as written."""
    if "$" not in text:
        return text
    out: list[str] = []
    variables: list[str] = []
    from_file = False
    i = 0
    while (j := text.find("$", i)) >= 0:
        out.append(text[i:j])
        following = text[j + 1 : j + 2]
        if following == "$":
            out.append("$")
            i = j + 2
        elif following == "{":
            end = text.find("}", j + 2)
            if end < 0:
                ctx.fail(path, "unterminated ${ (write $$ for a literal $)")
            name, has_default, default = text[j + 2 : end].partition(":-")
            if not _VAR_RE.fullmatch(name):
                ctx.fail(path, f"invalid variable name {name!r} in ${{...}} (write $$ for a literal $)")
            value = ctx.environ.get(name)
            if has_default and not value:
                value, from_file = default, from_file or bool(default)
            elif value is None:
                fallback = f"use ${{{name}:-default}} for a fallback"
                ctx.fail(path, f"environment variable {name} is not set ({fallback})")
            variables.append(name)
            out.append(value)
            i = end + 1
        else:
            out.append("$")
            i = j + 1
    out.append(text[i:])
    result = "".join(out)
    return _Expanded(result, tuple(dict.fromkeys(variables)), from_file) if variables else result


def _convert(ctx: _Context, path: str, value: object, spec: _Spec) -> Any:
    """Check value against spec and return it as the dataclasses store it."""
    if spec.kind in ("duration", "size"):
        try:
            number = parse_duration(value) if spec.kind == "duration" else parse_size(value)
        except UnitError as exc:
            ctx.fail(path, exc.redacted if isinstance(value, _Expanded) else str(exc), value)
        return _bounded(ctx, path, value, number, spec)
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            ctx.fail(path, f"expected a whole number, got {_type_name(value)}", value)
        try:
            number = int(value)
        except ValueError:
            ctx.fail(path, f"expected a whole number{_got(value)}", value)
        return _bounded(ctx, path, value, number, spec)
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        ctx.fail(path, f"expected true or false{_got(value)}", value)
    if spec.kind == "enum":
        text = _string(ctx, path, value).strip().lower()
        if text not in spec.choices:
            hint = "" if isinstance(value, _Expanded) else _suggest(text, spec.choices)
            expected = ", ".join(spec.choices)
            ctx.fail(path, f"invalid value{_shown(value)} (expected one of {expected}){hint}", value)
        return text
    if spec.kind == "path":
        return str(_path(ctx, path, value))
    if spec.kind == "addr":
        return _addr(ctx, path, value)
    if spec.kind == "key":
        try:
            return parse_key_text(_string(ctx, path, value))
        except KeyFormatError:
            expected = "a 256-bit key as 64 hex digits or base64 of 32 bytes (or a key file: encryption-key-path)"
            ctx.fail(path, f"expected {expected}; the value is not shown", value)
    return str(_string(ctx, path, value))


def _addr(ctx: _Context, path: str, value: object) -> str:
    """host:port (host may be empty for every interface, or a [v6] literal); port 0..65535."""
    text = _string(ctx, path, value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535 or (host.startswith("[") != host.endswith("]")):
        ctx.fail(path, f"expected HOST:PORT (e.g. 127.0.0.1:9090){_got(value)}", value)
    return text


def _bounded(ctx: _Context, path: str, value: object, number: float, spec: _Spec) -> Any:
    too_low = number <= 0 if spec.positive else spec.low is not None and number < spec.low
    if too_low or (spec.high is not None and number > spec.high):
        ctx.fail(path, f"{spec.describe_bounds()}{_got(value)}", value)
    return number


def _string(ctx: _Context, path: str, value: object) -> str:
    if not isinstance(value, str):
        quote = " (quote it)" if isinstance(value, (bool, int, float)) else ""
        ctx.fail(path, f"expected a string, got {_type_name(value)}{quote}", value)
    return value


def _path(ctx: _Context, path: str, value: object) -> Path:
    """An absolute, normalised path; ~ expands and relative paths start at the config's directory."""
    text = os.path.expanduser(_string(ctx, path, value))
    if "\0" in text:
        ctx.fail(path, "a path must not contain a NUL byte", value)
    return Path(os.path.normpath(os.path.join(ctx.base_dir, text)))


def _required_path(ctx: _Context, path: str, mapping: dict, key: str) -> Path:
    value = _value(ctx, path, mapping, key)
    if value is _MISSING:
        ctx.fail(path, "required: the database file's path (or dir: a directory of databases)")
    return _path(ctx, path, value)


def _check_overlaps(
    ctx: _Context, dbs: list[tuple[int, DbConfig]], dirs: list[tuple[int, DirConfig]] = ()
) -> None:
    """Two dbs must not share a file, a shadow directory or a replica location; two dir
    entries must not share a directory or a replica base location."""
    seen_db: dict[Path, int] = {}
    seen_shadow: dict[Path, int] = {}
    seen_url: dict[str, str] = {}
    seen_dir: dict[Path, int] = {}
    for i, db in dbs:
        real = db.path.resolve()
        if real in seen_db:
            ctx.fail(f"dbs[{i}].path", f"same database as dbs[{seen_db[real]}] ({db.path})")
        seen_db[real] = i
        shadow = db.shadow_dir.resolve()
        if shadow in seen_shadow:
            other = f"dbs[{seen_shadow[shadow]}]"
            ctx.fail(f"dbs[{i}].shadow-dir", f"same shadow directory as {other}; each database needs its own")
        seen_shadow[shadow] = i
        _check_urls(ctx, i, db, seen_url)
    for i, entry in dirs:
        real = entry.dir.resolve()
        if real in seen_dir:
            ctx.fail(f"dbs[{i}].dir", f"same directory as dbs[{seen_dir[real]}] ({entry.dir})")
        seen_dir[real] = i
        _check_urls(ctx, i, entry.template, seen_url)


def _check_urls(ctx: _Context, i: int, db: DbConfig, seen_url: dict[str, str]) -> None:
    for j, replica in enumerate(db.replicas):
        if replica.url in seen_url:
            other = seen_url[replica.url]
            message = f"same location as {other}; each replica needs its own"
            ctx.fail(f"dbs[{i}].replicas[{j}].url", message)
        seen_url[replica.url] = f"dbs[{i}].replicas[{j}]"


# --- messages ---------------------------------------------------------------------------


def _check_keys(ctx: _Context, path: str, mapping: dict, allowed: tuple[str, ...], *, where: str) -> None:
    """Fail on the first key not in allowed, saying where it belongs or what was meant."""
    for key in mapping:
        if not isinstance(key, str):
            ctx.fail(path, f"keys must be strings, got {_type_name(key)} {key!r}")
        if key not in allowed:
            hint = _misplaced(key, where) or _suggest(key, allowed, listing=True)
            ctx.fail(f"{path}.{key}" if path else key, f"unknown key{hint}")


def _misplaced(key: str, where: str) -> str:
    """A hint when key is valid somewhere else, or is a Litestream-style replica field."""
    replica_keys = {*_REPLICA_KEYS, *(k for opts in _DRIVER_OPTIONS.values() for k in opts)}
    if where == "top":
        if key in ("path", "shadow-dir", "replicas", *_DIR_ONLY_KEYS):
            return f"; {key} belongs in an entry of dbs"
        if key in replica_keys:
            return f"; {key} belongs in a replica, under dbs[N].replicas"
    elif where in ("db", "dir"):
        if key in _GLOBAL_SPECS:
            return f"; {key} can only be set at the top level"
        if key in replica_keys and key not in _DB_SPECS:
            return f"; {key} belongs in an entry of replicas"
        if where == "db" and key in _DIR_ONLY_KEYS:
            return f"; {key} is for an entry with dir (a directory of databases), not path"
        if where == "dir" and key == "shadow-dir":
            return "; each database found under dir gets its own shadow directory (.NAME-replicator beside it)"
    else:
        if key in ("type", "bucket", "path", "host"):
            return "; a replica's destination is one url, e.g. url: s3://BUCKET/PATH or sftp://HOST/PATH"
        if key in _DB_SPECS or key in ("shadow-dir", "replicas"):
            return f"; {key} can be set per db or at the top level, not per replica"
        schemes = [s for s, opts in _DRIVER_OPTIONS.items() if key in opts]
        if schemes:
            own = ", ".join(_DRIVER_OPTIONS[where]) or "none"
            owners = " and ".join(schemes)
            return f"; {key} is an option of {owners} replicas, not {where} (options of {where}: {own})"
    return ""


def _suggest(
    word: str, valid: tuple[str, ...], *, listing: bool = False, snake: bool = False, value: object = None
) -> str:
    """"; did you mean 'x'?" from difflib, else (with listing) the valid keys."""
    if isinstance(value, _Expanded):
        return ""
    candidates = list(valid)
    dashed = word.replace("_", "-")
    scored = sorted(((difflib.SequenceMatcher(None, dashed, c).ratio(), c) for c in candidates), reverse=True)
    best = scored[0][0] if scored else 0.0
    # keep only the near-best matches, so a clear typo gets one suggestion
    close = [c for ratio, c in scored[:3] if ratio >= max(0.6, best - 0.1)]
    if dashed in candidates and dashed != word and not snake:
        close = [dashed, *(c for c in close if c != dashed)]
    if snake:
        close = [c.replace("-", "_") for c in close]
    if close:
        names = [repr(c) for c in close]
        options = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        return f"; did you mean {options}?"
    if listing:
        return f" (valid keys here: {', '.join(candidates)})"
    return ""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80  # a value in a message is shown, not dumped
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4


def _brief(value: object) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _shown(value: object) -> str:
    """" 'value'" for messages, or nothing when the value came from the environment."""
    return "" if isinstance(value, _Expanded) else f" {_brief(value)}"


def _got(value: object) -> str:
    return "" if isinstance(value, _Expanded) else f", got {_brief(value)}"


def _type_name(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return f"a {type(value).__name__}"


def _is_within(path: Path, directory: Path) -> bool:
    return path != directory and path.is_relative_to(directory)
