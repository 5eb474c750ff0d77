"""The agent's HTTP endpoint on `metrics-addr`:

    /metrics   Prometheus exposition (events and live state)
    /healthz   200 while the process runs
    /readyz    200 only while every replica is within its data-loss-window threshold and
               not failing (and capture works); 503 otherwise, with the reasons
    /status    the live status as JSON (what `replicator status` prints)
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST

from replicas import instruments
from replicator import exposition
from replicator.errors import MetricsServerError  # defined apart, so the CLI can catch it without importing this module


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def not_ready_reasons(status: dict[str, Any]) -> list[str]:
    reasons = []
    for db in status["databases"]:
        if db["last_error"] is not None:
            reasons.append(f"{db['path']}: capture failing: {db['last_error']}")
        for r in db["replicas"]:
            if r["last_error"] is not None:
                reasons.append(f"{db['path']} -> {r['name']}: failing: {r['last_error']}")
            elif r["behind_threshold"]:
                reasons.append(
                    f"{db['path']} -> {r['name']}: data-loss window {r['data_loss_window']:.3f}s"
                    f" above {db['data_loss_window_threshold']:g}s"
                )
    return reasons


class MetricsServer:
    """Serves the endpoints on a daemon thread until close()."""

    def __init__(self, addr: str, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status
        instruments.enable()  # the event metrics count from here on (the agent enables them sooner)
        self.registry = exposition.status_registry(status)
        host, port = _split(addr)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, exposition.exposition(server.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    reasons = not_ready_reasons(server.status())
                    if reasons:
                        self._send(503, ("not ready\n" + "\n".join(reasons) + "\n").encode())
                    else:
                        self._send(200, b"ready\n")
                elif path == "/status":
                    self._send(200, json.dumps(server.status()).encode(), "application/json")
                else:
                    self._send(404, b"not found: try /metrics, /healthz, /readyz or /status\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes are not log lines
                pass

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise MetricsServerError(f"metrics-addr {addr}: cannot listen ({e.strerror or e}); choose a free HOST:PORT") from None
        self._httpd.daemon_threads = True
        self.address = self._httpd.server_address
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
