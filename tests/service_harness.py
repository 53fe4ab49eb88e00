"""A real `uvicorn` server process on loopback for the service tests.

Each server gets its own data directory and a free port on 127.0.0.1; it runs in its own
process group, and `stop()` (always called by the fixtures) kills the whole group, worker
processes included.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CONNECTED = "CategoryTheory.Equivalence.invFunIdAssoc_hom_app"  # proved by the oracle in 2 tactics


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, data_dir: Path, **sections: Any) -> Path:
    """A replay + oracle config (2 workers) under `data_dir`, with `sections` merged in."""
    config: dict[str, Any] = {
        "data_dir": str(data_dir),
        "sqlite_synchronous": "NORMAL",
        "backend": {"kind": "replay", "generators": {"kind": "oracle"}},
        "workers": {"count": 2, "grace_s": 2.0, "poll_interval_s": 0.2},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


class ServerProcess:
    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "ServerProcess":
        """Start uvicorn and wait until `/healthz` answers (the lifespan has run)."""
        self.port = free_port()
        env = dict(os.environ, DCO_SERVICE_CONFIG=str(self.config_path), DCO_SERVICE_OVERRIDES="{}", **self.extra_env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:app_from_env", "--factory",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer /healthz within {timeout_s} s:\n{self.log()}")

    def wait_ready(self, workers: int = 1, timeout_s: float = 90.0) -> dict:
        """Wait until `/readyz` is 200 with at least `workers` worker processes loaded."""
        deadline = time.monotonic() + timeout_s
        body: dict = {}
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.base_url}/readyz", timeout=5.0)
            body = response.json()
            if response.status_code == 200 and body["workers"] >= workers:
                return body
            time.sleep(0.2)
        raise RuntimeError(f"server not ready within {timeout_s} s: {json.dumps(body)}\n{self.log()}")

    def children(self) -> list[int]:
        import psutil

        assert self.proc is not None
        return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]

    def open_fds(self) -> int:
        """File descriptors the server process holds now (its workers not included)."""
        import psutil

        assert self.proc is not None
        return psutil.Process(self.proc.pid).num_fds()

    def rss_bytes(self) -> int:
        import psutil

        assert self.proc is not None
        return psutil.Process(self.proc.pid).memory_info().rss

    def kill9(self) -> None:
        """SIGKILL the server process only (its workers must notice and exit by themselves)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        """Kill the server's whole process group (teardown: nothing may outlive a test)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=10.0)


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        response = client.get(f"/v1/proofs/{job_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in statuses:
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {statuses} after {timeout_s} s: {body}")
