#!/usr/bin/env python3
"""The container HEALTHCHECK: GET /healthz on the agent's metrics-addr.

The address is $REPLICATOR_HEALTHCHECK_ADDR if set (use it when you pass --metrics-addr on
the command line), else the config's metrics-addr ($REPLICATOR_CONFIG, else
/etc/replicator.yml). Without a metrics-addr there is nothing to ask and the check passes:
the container's health is then its process. Exit 0: healthy; 1: unhealthy.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def metrics_addr() -> str | None:
    addr = os.environ.get("REPLICATOR_HEALTHCHECK_ADDR")
    if addr:
        return addr
    try:
        from replicator.config import load_config

        return load_config().metrics_addr
    except Exception as e:  # noqa: BLE001 - a broken config stops the agent itself; say why, do not flap
        print(f"healthcheck: cannot read the config: {e}")
        return None


def main() -> int:
    addr = metrics_addr()
    if not addr:
        print("healthcheck: no metrics-addr; nothing to check")
        return 0
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            ok = resp.status == 200
    except OSError as e:
        print(f"healthcheck: {url}: {e}")
        return 1
    print(f"healthcheck: {url}: {'ok' if ok else 'unexpected status'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
