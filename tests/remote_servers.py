"""Driver factories for the conformance suite that run against real servers (started by the
tests themselves): rclone serve s3, OpenSSH sshd, nats-server. Each server_<name>.py module
exports FACTORIES, a list of (name, factory(tmp_path) -> Driver) pairs."""

from __future__ import annotations

import importlib
from pathlib import Path

REMOTE_FACTORIES: list = []
for _name in ("server_s3", "server_sftp", "server_nats"):
    if (Path(__file__).parent / f"{_name}.py").exists():
        REMOTE_FACTORIES += importlib.import_module(_name).FACTORIES
