"""The deployment files under deploy/, each held to what it claims.

- every YAML and JSON file parses (duplicate keys are errors);
- the systemd unit is hardened, matches its sample config, and passes `systemd-analyze
  verify` (and a `security` exposure bound) where systemd-analyze exists;
- the Dockerfile builds a non-root multi-stage image from a context its dockerignore
  keeps, and its healthcheck script works against a real metrics server;
- the alert rules and the dashboard are valid PromQL (promql-parser, Python bindings of
  a Rust PromQL parser: a missing parser is a failure, not a skip), use only metric names
  the agent exports, link to runbook sections that exist, and the rules fire on the series
  the agent really exports (a small evaluator of the PromQL they use);
- the Kubernetes manifests have the init container, the sidecar, the shared volume and the
  probes; the compose file references files that exist and agree with each other;
- the docs link to pages and anchors that exist, and their replicator configs parse.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from replicator import exposition
from replicator.config import parse_config
from replicator.metrics_server import MetricsServer

try:
    import promql_parser
except ImportError:  # reported by the promql fixture as a failure
    promql_parser = None

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs"
UNIT = DEPLOY / "systemd" / "replicator.service"
SAMPLE_CONFIG = DEPLOY / "systemd" / "replicator.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "replicator-dashboard.json"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose" / "compose.yml"

ENV = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}
REQUIRED_ALERTS = {
    "ReplicatorDataLossWindowHigh",
    "ReplicatorReplicaFailing",
    "ReplicatorUploadErrors",
    "ReplicatorCaptureFailing",
    "ReplicatorDown",
    "ReplicatorSnapshotOverdue",
    "ReplicatorRestoreDrillFailing",
    "ReplicatorShadowFull",
}


# --- helpers -------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> object:
    return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)


def load_yaml_docs(path: Path) -> list:
    return [d for d in yaml.load_all(path.read_text(), Loader=_UniqueKeyLoader) if d is not None]


def seconds(text: str) -> float:
    """A Prometheus or systemd duration ("5m", "1h30m", "60s", "90") in seconds."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|sec|min|s|m|h|d|w|y)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]|\[|\]\([^)]*\)", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.DOTALL)
    found = {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)}
    return found | set(re.findall(r'<a (?:id|name)="([^"]+)"', text))


def runbook_anchor(url: str) -> str:
    m = re.fullmatch(r"https://\S+/docs/operations\.md#([a-z0-9-]+)", url)
    assert m, f"runbook_url must link a section of docs/operations.md: {url}"
    return m.group(1)


@pytest.fixture(scope="module")
def promql():
    if promql_parser is None:
        pytest.fail(
            "the PromQL validator is missing: install promql-parser (pip install 'promql-parser>=0.12'; "
            "it belongs in the test extra)"
        )
    return promql_parser


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]


GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*", "$db": ".*"}


def ungrafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def selector_names(promql, expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql.VectorSelector) and node.name:
            names.add(node.name)
        elif isinstance(node, promql.MatrixSelector) and node.vector_selector.name:
            names.add(node.vector_selector.name)

    promql.walk(promql.parse(expr), visit)
    return names


# --- every file parses ---------------------------------------------------------------------


def test_deploy_tree_has_the_promised_files():
    for path in (UNIT, SAMPLE_CONFIG, DOCKERFILE, DOCKERIGNORE, HEALTHCHECK, ALERTS, PROMETHEUS, DASHBOARD, COMPOSE,
                 K8S / "statefulset.yaml", K8S / "configmap.yaml", K8S / "secret.yaml", K8S / "kustomization.yaml",
                 DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml",
                 DEPLOY / "grafana" / "provisioning" / "dashboards" / "replicator.yml"):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml", ".json")),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_yaml_and_json_file_parses(path: Path):
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text()), dict)
    else:
        docs = load_yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"


def test_sample_configs_are_valid_replicator_configs():
    for path in (SAMPLE_CONFIG, DEPLOY / "compose" / "replicator.yml"):
        config = parse_config(path.read_text(), source=path, environ=ENV)
        assert config.dbs and config.metrics_addr, path


# --- systemd -------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a systemd unit, each key with every value it was given (in order)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    text = re.sub(r"\\\n", " ", path.read_text())
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if m := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            current = sections.setdefault(m.group(1), {})
            continue
        m = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", line)
        assert m and current is not None, f"{path.name}:{n}: not a unit line: {line!r}"
        current.setdefault(m.group(1), []).append(m.group(2).strip())
    return sections


def test_systemd_unit_is_hardened():
    unit = parse_unit(UNIT)
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]

    def one(key):
        assert key in svc, f"[Service] lacks {key}="
        return svc[key][-1]

    assert one("User") not in ("", "root", "0")
    assert one("Type") in ("exec", "simple")
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "Restart": "on-failure",
        "KillMode": "mixed",
    }.items():
        assert one(key) == value, f"{key}={one(key)}, expected {value}"
    assert one("CapabilityBoundingSet") == "", "CapabilityBoundingSet= must be empty (no capabilities)"
    assert one("AmbientCapabilities") == ""
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert svc["SystemCallFilter"][0] == "@system-service"
    assert all(v.startswith("~") for v in svc["SystemCallFilter"][1:]), "later filters may only remove calls"
    assert one("ReadWritePaths")
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_matches_its_sample_config():
    unit = parse_unit(UNIT)["Service"]
    config = parse_config(SAMPLE_CONFIG.read_text(), source=Path("/etc/replicator.yml"), environ=ENV)
    start = shlex.split(unit["ExecStart"][-1])
    assert start[1:] == ["replicate", "-c", "/etc/replicator.yml"], start
    # writable: every database's directory, its shadow directory and any file replica
    writable = [Path(p.lstrip("-")) for v in unit["ReadWritePaths"] for p in v.split()]
    needed = [db.path.parent for db in config.dbs] + [db.shadow_dir for db in config.dbs]
    needed += [Path(r.url[len("file://"):]) for db in config.dbs for r in db.replicas if r.scheme == "file"]
    for path in needed:
        assert any(path == w or path.is_relative_to(w) for w in writable), f"{path} is not in ReadWritePaths="
    # stop: the agent may take 2 x shutdown-timeout per database after SIGTERM
    stop = seconds(unit["TimeoutStopSec"][-1])
    needs = sum(2 * db.shutdown_timeout for db in config.dbs)
    assert stop > needs, f"TimeoutStopSec={stop:g}s must exceed 2 x shutdown-timeout x dbs = {needs:g}s"
    # bootstrap: the restore step names a configured database, with both bootstrap flags
    for pre in unit.get("ExecStartPre", []):
        args = shlex.split(pre.lstrip("-"))
        if "restore" in args:
            assert {"--if-db-not-exists", "--if-replica-exists"} <= set(args)
            assert args[args.index("-c") + 1] == "/etc/replicator.yml"
            assert Path(args[-1]) in [db.path for db in config.dbs]


def _unit_for_analysis(tmp_path: Path) -> Path:
    """The unit with the replicator path pointed at an existing executable (verify checks it)."""
    exe = Path(sys.executable).parent / "replicator"
    assert exe.exists(), exe
    copy = tmp_path / "replicator.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/replicator", str(exe)))
    return copy


def test_systemd_analyze_verify(tmp_path: Path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed: the unit is checked by the parse tests only")
    unit = _unit_for_analysis(tmp_path)
    p = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    complaints = [line for line in out.splitlines() if "replicator.service" in line]
    assert not complaints, "\n".join(complaints)  # e.g. "Unknown key 'X' in section [Service], ignoring."


def test_systemd_analyze_security_exposure(tmp_path: Path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed: the unit is checked by the parse tests only")
    unit = _unit_for_analysis(tmp_path)
    p = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for replicator\.service: (\d+(?:\.\d+)?)", p.stdout + p.stderr)
    if m is None and "--offline" in p.stderr:
        pytest.skip(f"this systemd-analyze cannot assess a unit offline: {p.stderr.strip()}")
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= 2.0, f"exposure {m.group(1)} (0 is best, 10 worst):\n{p.stdout}"


# --- container image -----------------------------------------------------------------------

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# syntax="), "the first line should pin the Dockerfile syntax (BuildKit features are used)"
    out: list[tuple[str, str]] = []
    pending = ""
    for line in lines:
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += " " + stripped if pending else stripped
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, args = pending.partition(" ")
        assert word.upper() in INSTRUCTIONS and word == word.upper(), f"unknown instruction {word!r}"
        out.append((word, args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_dockerfile_parses_and_runs_as_non_root():
    instructions = parse_dockerfile(DOCKERFILE)
    stages: list[list[tuple[str, str]]] = []
    for word, args in instructions:
        if word == "FROM":
            stages.append([])
        assert stages, "the first instruction must be FROM"
        stages[-1].append((word, args))
    assert len(stages) >= 2, "multi-stage: a build stage for the wheel and a runtime stage"
    for stage in stages:
        assert stage[0][1].split()[0] == "python:3.11-slim", stage[0]
    build_name = stages[0][0][1].split()[-1]
    assert re.search(r"\bpip wheel\b", " ".join(a for w, a in stages[0] if w == "RUN"))
    final = {w: a for w, a in stages[-1]}  # the last of each instruction wins
    assert f"from={build_name}" in " ".join(a for w, a in stages[-1]), "the runtime stage installs the built wheels"
    user = final["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER must be a fixed non-root uid, got {final['USER']!r}"
    assert _exec_form(final["ENTRYPOINT"]) == ["replicator"]
    assert _exec_form(final["CMD"]) == ["replicate", "-c", "/etc/replicator.yml"]
    healthcheck = final["HEALTHCHECK"]
    assert "CMD" in healthcheck and "healthcheck" in healthcheck
    for word, args in instructions:
        if word in ("CMD", "ENTRYPOINT") or (word == "RUN" and args.startswith("[")):
            _exec_form(args)
        if word == "HEALTHCHECK":
            _exec_form(args.split("CMD", 1)[1].strip())


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent wins."""

    def regex(pattern: str) -> re.Pattern:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = os.path.normpath(raw.lstrip("!").strip()).lstrip("/")
        if any(regex(pattern).fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def test_docker_build_context_keeps_what_the_dockerfile_copies():
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    sources = []
    for word, args in parse_dockerfile(DOCKERFILE):
        if word in ("COPY", "ADD") and "--from=" not in args:
            sources += [a for a in args.split()[:-1] if not a.startswith("--")]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        files = [src] if (ROOT / src).is_file() else [str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*.py")]
        assert files and not any(_ignored(f, patterns) for f in files), f"{src} is excluded by {DOCKERIGNORE.name}"
    for heavy in (".git/HEAD", ".venv/bin/python", "tests/test_deploy.py", "benchmarks/run.py", "demo/app.db",
                  "replicator/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(heavy, patterns), f"{heavy} should stay out of the build context"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthcheck(config: Path | None, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    e["PYTHONPATH"] = str(ROOT)
    if config is not None:
        e["REPLICATOR_CONFIG"] = str(config)
    e.update(env)
    return subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, timeout=30, env=e, check=False)


def test_container_healthcheck_asks_healthz(tmp_path: Path):
    port = _free_port()
    config = tmp_path / "replicator.yml"
    config.write_text(f"metrics-addr: 0.0.0.0:{port}\ndbs:\n  - path: {tmp_path}/app.db\n    replicas:\n"
                      f"      - url: {tmp_path}/replica\n")
    server = MetricsServer(f"127.0.0.1:{port}", lambda: fake_status(["s3"]))
    try:
        p = _healthcheck(config)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "/healthz: ok" in p.stdout
    finally:
        server.close()
    p = _healthcheck(config)
    assert p.returncode == 1, p.stdout + p.stderr  # nothing listens any more
    no_addr = tmp_path / "plain.yml"
    no_addr.write_text(f"dbs:\n  - path: {tmp_path}/app.db\n    replicas:\n      - url: {tmp_path}/replica\n")
    p = _healthcheck(no_addr)
    assert p.returncode == 0 and "nothing to check" in p.stdout, p.stdout + p.stderr
    p = _healthcheck(no_addr, REPLICATOR_HEALTHCHECK_ADDR=f"127.0.0.1:{port}")
    assert p.returncode == 1, "the override address is asked even without a metrics-addr"


# --- alert rules and dashboard: PromQL -----------------------------------------------------

RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}


def test_alert_rules_are_well_formed():
    doc = load_yaml(ALERTS)
    assert set(doc) == {"groups"}
    names = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= RULE_KEYS and {"alert", "expr", "labels", "annotations"} <= set(rule), rule
            names.append(rule["alert"])
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            if "for" in rule:
                seconds(rule["for"])
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            notes = rule["annotations"]
            assert {"summary", "description", "runbook_url"} <= set(notes), rule["alert"]
            for text in notes.values():
                assert text.count("{{") == text.count("}}"), f"{rule['alert']}: unbalanced template braces"
    assert len(names) == len(set(names)), "alert names must be unique"
    missing = REQUIRED_ALERTS - set(names)
    assert not missing, f"missing alerts: {missing}"


def test_alert_rules_are_valid_promql(promql):
    for rule in alert_rules():
        try:
            promql.parse(rule["expr"])
        except ValueError as e:
            pytest.fail(f"{rule['alert']}: invalid PromQL: {e}\n{rule['expr']}")


def test_dashboard_queries_are_valid_promql(promql):
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        try:
            promql.parse(ungrafana(expr))
        except ValueError as e:
            pytest.fail(f"invalid PromQL in the dashboard: {e}\n{expr}")


def test_every_metric_name_used_is_exported(promql):
    exported = exposition.metric_names()
    used = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    used.update({f"dashboard: {e}": ungrafana(e) for e in dashboard_exprs()})
    for where, expr in used.items():
        named = set(re.findall(r"\breplicator_[A-Za-z0-9_:]*", expr))
        assert named or where == "ReplicatorDown", f"{where}: no replicator metric"
        unknown = named - exported
        assert not unknown, f"{where}: not exported by the agent: {unknown}"
        selected = selector_names(promql, expr)
        assert selected <= exported | {"up"}, f"{where}: unknown series {selected - exported - {'up'}}"


def test_rate_windows_cover_several_scrapes(promql):
    scrape = seconds(load_yaml(PROMETHEUS)["global"]["scrape_interval"])
    def check(expr: str) -> None:
        def visit(node):
            if isinstance(node, promql.Call) and node.func.name in ("rate", "increase", "irate"):
                selector = node.args[0]
                assert selector.vector_selector.name.endswith(("_total", "_bucket", "_sum", "_count")), expr
                assert selector.range.total_seconds() >= 4 * scrape, f"{expr}: range below 4 scrape intervals"

        promql.walk(promql.parse(expr), visit)

    for expr in [r["expr"] for r in alert_rules()] + [ungrafana(e) for e in dashboard_exprs()]:
        check(expr)


def test_runbook_urls_point_at_sections_of_the_runbook():
    sections = anchors(DOCS / "operations.md")
    for rule in alert_rules():
        anchor = runbook_anchor(rule["annotations"]["runbook_url"])
        assert anchor in sections, f"{rule['alert']}: docs/operations.md has no section #{anchor}"
        assert anchor == rule["alert"].lower(), "each alert's section is named after it"


def test_dashboard_covers_the_operations_view():
    dash = json.loads(DASHBOARD.read_text())
    text = " ".join(dashboard_exprs())
    for name in ("replicator_data_loss_window_seconds", "replicator_data_loss_window_threshold_seconds",
                 "replicator_replica_pending_bytes", "replicator_upload_seconds_bucket",
                 "replicator_upload_failures_total", "replicator_wal_bytes", "replicator_database_bytes",
                 "replicator_checkpoints_total", "replicator_generation_rotations_total",
                 "replicator_last_snapshot_timestamp_seconds"):
        assert name in text, f"the dashboard does not show {name}"
    assert "histogram_quantile" in text
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "db"} <= variables
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        for t in p["targets"]:
            assert set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval", "__range", "__interval"} <= variables


# --- alert rules: semantics on the series the agent exports --------------------------------

NOW = 1_800_000_000.0


def fake_status(replicas: list[str], db: str = "/data/app.db") -> dict:
    """An agent_status() of one healthy database (the shape replicator.status builds)."""
    return {
        "time": NOW,
        "pid": 1,
        "ready": True,
        "databases": [
            {
                "path": db,
                "generation": "20270115T080000000000Z-ab12",
                "txid": 100,
                "last_commit_time": NOW - 1,
                "last_snapshot": NOW - 600,
                "snapshot_interval": 3600.0,
                "wal_bytes": 4096,
                "db_bytes": 65536,
                "shadow_bytes": 0,
                "shadow_max_bytes": 1 << 30,
                "shadow_full": False,
                "last_error": None,
                "data_loss_window_threshold": 10.0,
                "replicas": [
                    {
                        "name": name,
                        "url": f"mem://{name}",
                        "generation": "20270115T080000000000Z-ab12",
                        "txid": 100,
                        "data_loss_window": 0.0,
                        "behind_threshold": False,
                        "last_upload": NOW - 1,
                        "pending_artefacts": 0,
                        "pending_bytes": 0,
                        "last_error": None,
                        "verify": {"last_success": NOW - 60, "last_ok": True, "last_error": None, "seconds": 1.5},
                    }
                    for name in replicas
                ],
            }
        ],
    }


def scraped(agents: dict[str, dict]) -> list[tuple[dict, float]]:
    """The series Prometheus stores from scraping each agent's live state (instance -> status)."""
    series = []
    for instance, status in agents.items():
        target = {"job": "replicator", "instance": instance}
        series.append(({"__name__": "up", **target}, 1.0))
        text = generate_latest(exposition.status_registry(lambda s=status: s)).decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                series.append(({"__name__": s.name, **s.labels, **target}, float(s.value)))
    return series


class MatchError(Exception):
    """A vector match Prometheus would refuse (duplicate series on the "one" side)."""


class Evaluator:
    """Instant evaluation of the PromQL the state alerts use: selectors, numbers, time(),
    arithmetic and comparisons (scalar or vector, with on/ignoring and group_left/right),
    and the set operators. Anything else raises NotImplementedError."""

    ARITH: ClassVar[dict] = {"+": float.__add__, "-": float.__sub__, "*": float.__mul__, "/": float.__truediv__}
    CMP: ClassVar[dict] = {">": float.__gt__, "<": float.__lt__, ">=": float.__ge__, "<=": float.__le__,
           "==": float.__eq__, "!=": float.__ne__}

    def __init__(self, promql, series, now: float = NOW):
        self.pq, self.series, self.now = promql, series, now

    def __call__(self, expr: str):
        return self.eval(self.pq.parse(expr))

    def eval(self, node):
        pq = self.pq
        if isinstance(node, pq.VectorSelector):
            return [(dict(ls), v) for ls, v in self.series if self.selects(node, ls)]
        if isinstance(node, pq.NumberLiteral):
            return float(node.val)
        if isinstance(node, pq.ParenExpr):
            return self.eval(node.expr)
        if isinstance(node, pq.Call) and node.func.name == "time":
            return self.now
        if isinstance(node, pq.BinaryExpr):
            return self.binary(node)
        raise NotImplementedError(type(node).__name__)

    def selects(self, node, labels: dict) -> bool:
        if node.name and labels["__name__"] != node.name:
            return False
        for m in node.matchers.matchers:
            value, op = labels.get(m.name, ""), m.op
            if op == self.pq.MatchOp.Equal and value != m.value or op == self.pq.MatchOp.NotEqual and value == m.value:
                return False
            if op == self.pq.MatchOp.Re and not re.fullmatch(m.value, value):
                return False
            if op == self.pq.MatchOp.NotRe and re.fullmatch(m.value, value):
                return False
        return True

    def binary(self, node):
        op = str(node.op)
        lhs, rhs = self.eval(node.lhs), self.eval(node.rhs)
        mod = node.modifier
        if op in ("and", "or", "unless"):
            return self.set_op(op, lhs, rhs, mod)
        if mod is not None and mod.return_bool:
            raise NotImplementedError("bool modifier")
        fn = self.ARITH.get(op) or self.CMP.get(op)
        if fn is None:
            raise NotImplementedError(op)
        arith = op in self.ARITH
        if isinstance(lhs, float) and isinstance(rhs, float):
            if not arith:
                raise NotImplementedError("scalar comparison without bool")
            return fn(lhs, rhs)
        if isinstance(lhs, float) or isinstance(rhs, float):
            out = []
            for ls, v in rhs if isinstance(lhs, float) else lhs:
                a, b = (lhs, v) if isinstance(lhs, float) else (v, rhs)
                if arith:
                    out.append(({k: x for k, x in ls.items() if k != "__name__"}, fn(a, b)))
                elif fn(a, b):
                    out.append((ls, v))
            return out
        return self.vector_op(op, fn, arith, lhs, rhs, mod)

    def signature(self, labels: dict, mod) -> tuple:
        matching = mod.matching if mod is not None else None
        if matching is not None and matching.type == self.pq.LabelModifierType.Include:
            return tuple(labels.get(name, "") for name in sorted(matching.labels))
        drop = {"__name__", *(matching.labels if matching is not None else ())}
        return tuple(sorted((k, v) for k, v in labels.items() if k not in drop))

    def vector_op(self, op, fn, arith, lhs, rhs, mod):
        card = mod.card if mod is not None else self.pq.VectorMatchCardinality.OneToOne
        Card = self.pq.VectorMatchCardinality
        if card == Card.OneToMany:  # evaluate as group_left with the sides swapped
            many, one, swap = rhs, lhs, True
        else:
            many, one, swap = lhs, rhs, False
        by_sig: dict[tuple, tuple[dict, float]] = {}
        for ls, v in one:
            sig = self.signature(ls, mod)
            if sig in by_sig:
                raise MatchError(f"found duplicate series for the match group {sig} on the {'left' if swap else 'right'} side")
            by_sig[sig] = (ls, v)
        if card == Card.OneToOne:
            seen = set()
            for ls, _ in many:
                sig = self.signature(ls, mod)
                if sig in seen:
                    raise MatchError(f"multiple matches for labels {sig}: many-to-one matching must be explicit")
                seen.add(sig)
        out = []
        for ls, v in many:
            match = by_sig.get(self.signature(ls, mod))
            if match is None:
                continue
            a, b = (match[1], v) if swap else (v, match[1])
            labels = dict(ls)
            if arith:
                labels.pop("__name__", None)
            if card == Card.OneToOne and mod is not None and mod.matching is not None:
                if mod.matching.type == self.pq.LabelModifierType.Include:
                    labels = {k: x for k, x in labels.items() if k in mod.matching.labels or k == "__name__"}
                else:
                    labels = {k: x for k, x in labels.items() if k not in mod.matching.labels}
            for name in (mod.group_labels or []) if mod is not None else []:
                labels[name] = match[0].get(name, "")
            if arith:
                out.append((labels, fn(a, b)))
            elif fn(a, b):
                out.append((labels, v))
        return out

    def set_op(self, op, lhs, rhs, mod):
        assert isinstance(lhs, list) and isinstance(rhs, list), "set operators take vectors"
        right = {self.signature(ls, mod) for ls, _ in rhs}
        if op == "and":
            return [(ls, v) for ls, v in lhs if self.signature(ls, mod) in right]
        if op == "unless":
            return [(ls, v) for ls, v in lhs if self.signature(ls, mod) not in right]
        left = {self.signature(ls, mod) for ls, _ in lhs}
        return lhs + [(ls, v) for ls, v in rhs if self.signature(ls, mod) not in left]


def rule(name: str) -> dict:
    return next(r for r in alert_rules() if r["alert"] == name)


def firing(promql, name: str, agents: dict[str, dict]) -> list[tuple[dict, float]]:
    """The series the rule's expression returns; and its annotations only use their labels."""
    r = rule(name)
    result = Evaluator(promql, scraped(agents))(r["expr"])
    used = set(re.findall(r"\$labels\.(\w+)", " ".join(r["annotations"].values())))
    for labels, _ in result:
        assert used <= set(labels), f"{name}: annotations use labels the alert lacks: {used - set(labels)}"
    return result


def two_agents(**changes) -> dict[str, dict]:
    """Two pods replicating the same path (as in Kubernetes), each to replicas s3 and file."""
    agents = {"pod-a:9090": fake_status(["s3", "file"]), "pod-b:9090": fake_status(["s3", "file"])}
    for key, change in changes.items():
        instance, _, replica = key.partition("__")
        db = agents[f"{instance.replace('_', '-')}:9090"]["databases"][0]
        target = next(r for r in db["replicas"] if r["name"] == replica) if replica else db
        target.update(change)
    return agents


def test_data_loss_window_rule(promql):
    r = rule("ReplicatorDataLossWindowHigh")
    assert seconds(r["for"]) == 300, "the data-loss window must be above its threshold for 5 minutes"
    assert r["labels"]["severity"] == "critical"
    assert firing(promql, r["alert"], two_agents()) == []
    at_threshold = two_agents(pod_a__s3={"data_loss_window": 10.0})
    assert firing(promql, r["alert"], at_threshold) == [], "the window must exceed the threshold, not reach it"
    behind = two_agents(pod_a__s3={"data_loss_window": 42.5}, pod_b={"data_loss_window_threshold": 60.0},
                        pod_b__file={"data_loss_window": 30.0})
    result = firing(promql, r["alert"], behind)
    assert [(ls["instance"], ls["db"], ls["replica"], v) for ls, v in result] == [
        ("pod-a:9090", "/data/app.db", "s3", 42.5)
    ], "only the replica above its own agent's threshold fires, and $value is its window"
    # matching on db alone would be refused: every pod has /data/app.db
    naive = r["expr"].replace("ignoring(replica)", "on(db)")
    assert naive != r["expr"]
    with pytest.raises(MatchError):
        Evaluator(promql, scraped(behind))(naive)


def test_snapshot_overdue_rule(promql):
    name = "ReplicatorSnapshotOverdue"
    assert firing(promql, name, two_agents()) == []
    # 1h interval: 1h59m is fine, 2h01m is overdue
    assert firing(promql, name, two_agents(pod_a={"last_snapshot": NOW - 7140})) == []
    result = firing(promql, name, two_agents(pod_a={"last_snapshot": NOW - 7260}))
    assert [(ls["instance"], ls["db"], v) for ls, v in result] == [("pod-a:9090", "/data/app.db", 7260.0)]
    off = two_agents(pod_a={"last_snapshot": NOW - 86400, "snapshot_interval": 0.0})
    assert firing(promql, name, off) == [], "snapshot-interval 0 takes no periodic snapshots: nothing is overdue"


@pytest.mark.parametrize(
    "name, change, fires_on",
    [
        ("ReplicatorReplicaFailing", {"pod_b__file": {"last_error": "connection refused"}}, ("pod-b:9090", "file")),
        ("ReplicatorRestoreDrillFailing",
         {"pod_a__s3": {"verify": {"last_success": NOW - 7200, "last_ok": False, "last_error": "checksum", "seconds": 3}}},
         ("pod-a:9090", "s3")),
        ("ReplicatorShadowFull", {"pod_a": {"shadow_full": True}}, ("pod-a:9090", None)),
        ("ReplicatorCaptureFailing", {"pod_b": {"last_error": "disk I/O error"}}, ("pod-b:9090", None)),
    ],
)
def test_state_rules_fire_on_the_broken_series_only(promql, name, change, fires_on):
    assert firing(promql, name, two_agents()) == [], f"{name} fires on a healthy agent"
    result = firing(promql, name, two_agents(**change))
    assert [(ls["instance"], ls.get("replica")) for ls, _ in result] == [fires_on]


def test_restore_drill_rule_ignores_replicas_never_drilled(promql):
    never = two_agents(pod_a__s3={"verify": {"last_success": None, "last_ok": None, "last_error": None, "seconds": None}})
    assert firing(promql, "ReplicatorRestoreDrillFailing", never) == []


def test_agent_down_rule(promql):
    series = scraped(two_agents())
    series = [(ls, 0.0 if ls["__name__"] == "up" and ls["instance"] == "pod-b:9090" else v) for ls, v in series]
    series.append(({"__name__": "up", "job": "node", "instance": "other:9100"}, 0.0))
    result = Evaluator(promql, series)(rule("ReplicatorDown")["expr"])
    assert [ls["instance"] for ls, _ in result] == ["pod-b:9090"], "only the replicator job counts"
    assert rule("ReplicatorDown")["labels"]["severity"] == "critical"


def test_prometheus_scrapes_the_job_the_rules_expect():
    conf = load_yaml(PROMETHEUS)
    jobs = [j["job_name"] for j in conf["scrape_configs"]]
    assert "replicator" in jobs
    assert '{job="replicator"}' in rule("ReplicatorDown")["expr"]


# --- Kubernetes ----------------------------------------------------------------------------


def k8s_objects() -> list[dict]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        objects += [d for d in load_yaml_docs(path) if "kind" in d and d["kind"] != "Kustomization"]
    return objects


def _args(container: dict) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _env_names(container: dict, objects: list[dict]) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        ref = source.get("secretRef") or source.get("configMapRef")
        obj = next(o for o in objects if o["metadata"]["name"] == ref["name"])
        names |= set(obj.get("data", {})) | set(obj.get("stringData", {}))
    return names


def test_kubernetes_manifests():
    objects = k8s_objects()
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert all((K8S / f).is_file() for f in kustomization["resources"])
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Secret", "StatefulSet"}
    for o in objects:
        assert o["apiVersion"] and o["metadata"]["name"], o
    workload = next(o for o in objects if o["kind"] in ("StatefulSet", "Deployment"))
    assert workload["spec"]["replicas"] == 1, "exactly one agent per database"
    pod = workload["spec"]["template"]["spec"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()

    init = [c for c in pod["initContainers"] if "restore" in _args(c)]
    assert len(init) == 1, "one init container restores the database"
    restore = _args(init[0])
    assert {"--if-db-not-exists", "--if-replica-exists"} <= set(restore)
    assert restore[restore.index("-c") + 1] == "/etc/replicator/replicator.yml" and restore[-1] == "/data/app.db"
    sidecars = [c for c in pod["containers"] + pod["initContainers"] if "replicate" in _args(c)]
    assert len(sidecars) == 1, "one replicator sidecar"
    sidecar = sidecars[0]
    if sidecar in pod["initContainers"]:
        assert sidecar.get("restartPolicy") == "Always", "a sidecar among initContainers must be a native sidecar"
    assert _args(sidecar)[_args(sidecar).index("-c") + 1] == "/etc/replicator/replicator.yml"
    apps = [c for c in pod["containers"] if c is not sidecar]
    assert len(apps) == 1, "one app container"
    app = apps[0]

    # the shared volume: mounted at the same path in the init container, the app and the sidecar
    claim_names = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    volume_names = {v["name"] for v in pod.get("volumes", [])} | claim_names
    mounts = [{m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (init[0], app, sidecar)]
    shared = set(mounts[0]) & set(mounts[1]) & set(mounts[2])
    assert shared and shared <= volume_names, "a volume mounted in all three containers"
    assert any(all(m[name] == "/data" for m in mounts) for name in shared), "the shared volume is /data in all three"

    # probes on the sidecar's metrics port
    port = next(p for p in sidecar["ports"] if p["containerPort"] == 9090)
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path and get["port"] in (port["name"], 9090), probe

    # the config: the ConfigMap's replicator.yml, its metrics-addr on the probed port, on every interface
    cm_volume = next(v for v in pod["volumes"] if "configMap" in v)
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cm_volume["configMap"]["name"])
    text = cm["data"]["replicator.yml"]
    config = parse_config(text, source=Path("/etc/replicator/replicator.yml"), environ=ENV)
    assert [str(db.path) for db in config.dbs] == ["/data/app.db"]
    assert config.metrics_addr in ("0.0.0.0:9090", ":9090"), "the kubelet probes the pod IP"
    for c in (init[0], sidecar):
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}[cm_volume["name"]] == "/etc/replicator"

    # the ${VAR}s of the config come from the Secret, in both containers that read the config
    variables = set(re.findall(r"\$\{(\w+)", text))
    assert variables, "the S3 credentials are ${VAR}s"
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    for c in (init[0], sidecar):
        assert variables <= _env_names(c, objects), f"{c['name']} lacks {variables - _env_names(c, objects)}"
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                held = secrets[ref["name"]]
                assert ref["key"] in {**held.get("data", {}), **held.get("stringData", {})}

    # the same uid for the app and the sidecar, and not root
    def uid(c):
        return c.get("securityContext", {}).get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))

    assert uid(app) is not None and uid(app) == uid(sidecar) == uid(init[0]) != 0
    assert pod["terminationGracePeriodSeconds"] > sum(2 * db.shutdown_timeout for db in config.dbs)


def test_kubernetes_readme_says_the_sidecar_runs_as_the_apps_uid():
    readme = (K8S / "README.md").read_text()
    assert re.search(r"same uid as the app", readme), "the note about the uid is missing"
    assert "same uid as the app" in (K8S / "statefulset.yaml").read_text()


# --- compose -------------------------------------------------------------------------------


def _bind_mounts(service: dict) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append(((COMPOSE.parent / source).resolve(), target))
    return out


def test_compose_file_references_files_that_exist():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"app", "replicator", "s3", "prometheus", "grafana"} <= set(services)
    mounted: dict[Path, tuple[str, str]] = {}
    for name, service in services.items():
        for source, target in _bind_mounts(service):
            assert source.exists(), f"{name}: mounts {source}, which does not exist"
            mounted[source] = (name, target)
        if "build" in service:
            build = service["build"]
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    # the rules and the dashboard are mounted where Prometheus and Grafana look for them
    assert mounted[ALERTS][0] == "prometheus"
    assert mounted[ALERTS][1] in load_yaml(PROMETHEUS)["rule_files"]
    assert mounted[PROMETHEUS] == ("prometheus", "/etc/prometheus/prometheus.yml")
    assert mounted[DASHBOARD][0] == "grafana"
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounted[provisioning] == ("grafana", "/etc/grafana/provisioning")
    providers = load_yaml(provisioning / "dashboards" / "replicator.yml")["providers"]
    assert any(Path(mounted[DASHBOARD][1]).parent == Path(p["options"]["path"]) for p in providers)
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert any(d["type"] == "prometheus" and d["url"] == "http://prometheus:9090" for d in datasources)


def test_compose_services_agree_with_each_other():
    services = load_yaml(COMPOSE)["services"]
    replicator = services["replicator"]
    config_file, target = next((s, t) for s, t in _bind_mounts(replicator) if s.suffix == ".yml")
    assert replicator["command"] == ["replicate", "-c", target]
    env = {k: str(v) for k, v in replicator["environment"].items()}
    config = parse_config(config_file.read_text(), source=Path(target), environ=env)
    # Prometheus scrapes the agent's metrics-addr port under the service's name
    port = config.metrics_addr.rpartition(":")[2]
    targets = [t for j in load_yaml(PROMETHEUS)["scrape_configs"] if j["job_name"] == "replicator"
               for s in j.get("static_configs", []) for t in s["targets"]]
    assert f"replicator:{port}" in targets
    # the replica is the s3 service, with the credentials it accepts
    (replica,) = config.dbs[0].replicas
    assert replica.scheme == "s3" and replica.options["endpoint"].startswith("http://s3:")
    s3 = services["s3"]
    auth = s3["command"][s3["command"].index("--auth-key") + 1]
    assert auth == f"{env['AWS_ACCESS_KEY_ID']},{env['AWS_SECRET_ACCESS_KEY']}"
    bucket = replica.url.split("/")[2]
    assert s3["healthcheck"]["test"][-1] == f":s3:{bucket}", "the healthcheck creates the replica's bucket"
    # bootstrap before the app and the agent; the same database everywhere
    restore = services["restore"]["command"]
    assert {"--if-db-not-exists", "--if-replica-exists"} <= set(restore) and restore[-1] == str(config.dbs[0].path)
    assert services["restore"]["depends_on"]["s3"]["condition"] == "service_healthy"
    for name in ("app", "replicator"):
        assert services[name]["depends_on"]["restore"]["condition"] == "service_completed_successfully"
    assert str(config.dbs[0].path) in services["app"]["entrypoint"]
    assert seconds(replicator["stop_grace_period"]) > 2 * config.dbs[0].shutdown_timeout


def test_compose_writer_writes_until_sigterm(tmp_path: Path):
    db = tmp_path / "app.db"
    p = subprocess.Popen([sys.executable, str(COMPOSE.parent / "writer.py"), str(db)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "WRITES_PER_SECOND": "50"})
    try:
        import apsw

        deadline = time.monotonic() + 20
        count = 0
        while time.monotonic() < deadline and count < 5:
            time.sleep(0.2)
            if db.exists():
                try:
                    con = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
                    count = con.execute("SELECT count(*) FROM events").fetchone()[0]
                    con.close()
                except apsw.Error:
                    pass
        assert count >= 5, "the writer wrote nothing"
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert "writer: stopped after" in out
    mode = apsw.Connection(str(db)).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


# --- docs ----------------------------------------------------------------------------------

OWN_DOCS = ("operations.md", "migrating-from-litestream.md", "configuration.md", "README.md")


def test_docs_index_links_the_pages():
    index = (DOCS / "README.md").read_text()
    for page in ("operations.md", "configuration.md", "migrating-from-litestream.md"):
        assert f"]({page})" in index, f"docs/README.md does not link {page}"


@pytest.mark.parametrize("page", OWN_DOCS)
def test_doc_links_resolve(page: str):
    path = DOCS / page
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{page}: broken link {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page}: {target}: no such section"


def test_operations_runbook_has_its_stable_sections():
    sections = anchors(DOCS / "operations.md")
    for anchor in ("sqlite-version-warning", "bootstrap-at-node-start", "metrics-and-alerting", "data-loss-window",
                   "readyz", "replicator-status", "alerts", "restore-drills", "disaster-recovery-drill", "upgrades",
                   *(a.lower() for a in REQUIRED_ALERTS)):
        assert anchor in sections, f"docs/operations.md lacks #{anchor}"
    text = (DOCS / "operations.md").read_text()
    assert "https://sqlite.org/wal.html#walresetbug" in text or "https://www.sqlite.org/wal.html#walresetbug" in text


def test_migration_guide_configs_parse():
    text = (DOCS / "migrating-from-litestream.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    ours = [b for b in blocks if b.startswith("# replicator.yml")]
    theirs = [b for b in blocks if b.startswith("# litestream.yml")]
    assert ours and theirs and len(ours) + len(theirs) == len(blocks), "label each yaml block with its file"
    for block in ours:
        parse_config(block, source=Path("/etc/replicator.yml"), environ={**ENV, "LITESTREAM_ACCESS_KEY_ID": "id",
                                                                            "LITESTREAM_SECRET_ACCESS_KEY": "s"})
    for block in theirs:
        assert isinstance(yaml.safe_load(block), dict)


def test_configuration_reference_documents_the_new_keys():
    text = (DOCS / "configuration.md").read_text()
    for key in ("metrics-addr", "data-loss-window-threshold", "verify-interval", "restore-if-db-not-exists"):
        assert re.search(rf"^\| `{key}`", text, re.MULTILINE), f"docs/configuration.md has no table row for {key}"


def test_durations_helper():
    assert seconds("5m") == 300 and seconds("1h30m") == 5400 and seconds("60s") == 60 and seconds("90") == 90
    assert timedelta(seconds=seconds("30min")) == timedelta(minutes=30)
