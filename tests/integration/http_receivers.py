"""Receivers for the routing tests: a local HTTP server that records what it is sent, and a real Alertmanager; the
router in a background thread with fast retries.

Both listen on free ports of 127.0.0.1 and are stopped by the tests that start them.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from config import PROJECT_ROOT, load_config
from services.processes import free_port

if TYPE_CHECKING:
    from monitoring.router import IncidentRouter

FAST_RETRIES = {"FLEAD_ROUTER_BACKOFF_INITIAL_S": "0.5", "FLEAD_ROUTER_BACKOFF_FACTOR": "2.0",
                "FLEAD_ROUTER_BACKOFF_MAX_S": "2.0", "FLEAD_ROUTER_BACKOFF_JITTER": "0.0",
                "FLEAD_ROUTER_MAX_ATTEMPTS": "100", "FLEAD_ROUTER_IDLE_SLEEP_S": "0.05",
                "FLEAD_ROUTER_RESEND_INTERVAL_S": "2.0"}


def router_cfg(**env):
    """The configuration (from the environment) with the router retrying fast."""
    return load_config(env={**os.environ, **FAST_RETRIES, **env})


class RecordingReceiver:
    """An HTTP server that answers every POST with `status` and records (path, headers, JSON body). It can be
    stopped and started again on the same port (a receiver that is down for a while)."""

    def __init__(self, port: int | None = None, status: int = 200):
        self.port = port or free_port()
        self.status = status
        self.requests: list[dict] = []
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "RecordingReceiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                              "body": json.loads(body or b"null"), "raw": body})
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self, path: str | None = None) -> list:
        with self._lock:
            return [r["body"] for r in self.requests if path is None or r["path"] == path]


def wait_for(check, timeout_s: float, what: str, step_s: float = 0.2):
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"not reached within {timeout_s:.0f} s: {what}")


class Alertmanager:
    """The Alertmanager orchestration/setup.sh builds (build/bin/alertmanager), notifying `webhook_url` of every
    group (firing and resolved) one second after it changes."""

    BINARY = PROJECT_ROOT / "build" / "bin" / "alertmanager"

    def __init__(self, workdir: Path, webhook_url: str):
        self.port = free_port()
        self.workdir = workdir
        config = workdir / "alertmanager.yml"
        config.write_text(f"""route:
  receiver: test
  group_by: [incident_id]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
- name: test
  webhook_configs:
  - url: {webhook_url}/alertmanager
    send_resolved: true
""")
        self.log = open(workdir / "alertmanager.log", "wb")
        self.process = subprocess.Popen(
            [str(self.BINARY), f"--config.file={config}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--cluster.listen-address=", f"--storage.path={workdir / 'data'}"], stdout=self.log,
            stderr=subprocess.STDOUT)
        wait_for(self.ready, 30, "Alertmanager /-/ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def alerts(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/v2/alerts", timeout=5).json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class Running:
    """An IncidentRouter in a background thread (the service loop), stopped on exit."""

    def __init__(self, router: IncidentRouter):
        self.router = router
        self.stopping = False
        self.thread = threading.Thread(target=router.run, kwargs={"should_stop": lambda: self.stopping}, daemon=True)

    def __enter__(self) -> IncidentRouter:
        self.thread.start()
        return self.router

    def __exit__(self, *exc) -> None:
        self.stopping = True
        self.thread.join(30)
