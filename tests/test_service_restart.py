"""Durability through a real uvicorn process: `kill -9` with jobs queued and running, then
a worker process killed mid-search; and a server with no backend (503 with the reason)."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import httpx
import psutil
import pytest

from service.auth import add_key
from service_harness import SAMPLE_CONNECTED, ServerProcess, wait_for_status, write_config

# Every tactic sleeps 0.05 s and times out at 0.01 s: a sampling search that runs until its
# time limit (seconds) and then answers `failed` (search status `timeout`).
LATENCY_S = 0.05


def long_job(seconds: float) -> dict:
    return {"theorem_id": SAMPLE_CONNECTED, "strategy": "sampling",
            "budget": {"tactic_timeout_s": 0.01, "time_limit_s": seconds, "max_passes": 4096}}


@pytest.fixture
def durable(tmp_path):
    data = tmp_path / "data"
    key = add_key(data / "api_keys.json", "alice", rate_per_s=1000, burst=1000, max_concurrent_jobs=100)
    config = write_config(
        tmp_path / "service.yaml", data,
        backend={"kind": "replay", "latency_s": LATENCY_S, "generators": {"kind": "oracle"}},
        workers={"count": 1, "grace_s": 2.0, "poll_interval_s": 0.2},
    )
    servers: list[ServerProcess] = []

    def start() -> ServerProcess:
        server = ServerProcess(config, tmp_path / "server.log").start()
        servers.append(server)
        server.wait_ready(workers=1)
        return server

    try:
        yield start, key, data
    finally:
        for server in servers:
            server.stop()


def test_kill_9_with_jobs_queued_and_running_loses_and_duplicates_nothing(durable):
    start, key, data = durable
    server = start()
    submitted: dict[str, dict] = {}
    with server.client(key) as client:
        running = {**long_job(3.0), "idempotency_key": "long"}  # occupies the one worker
        submitted[client.post("/v1/proofs", json=running).json()["id"]] = running
        wait_for_status(client, next(iter(submitted)), {"running"})
        for i in range(4):  # wait behind it
            body = {"theorem_id": SAMPLE_CONNECTED, "idempotency_key": f"quick-{i}"}
            response = client.post("/v1/proofs", json=body)
            assert response.status_code == 202
            submitted[response.json()["id"]] = body
        states = {job_id: client.get(f"/v1/proofs/{job_id}").json()["status"] for job_id in submitted}
    assert sorted(states.values()) == ["queued"] * 4 + ["running"], states

    workers = server.children()
    assert len(workers) == 1
    server.kill9()
    # The orphaned worker process notices its closed pipe and exits by itself.
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers):
        assert time.monotonic() < deadline, "a worker process outlived its server"
        time.sleep(0.1)

    server = start()
    with server.client(key) as client:
        finals = {job_id: wait_for_status(client, job_id, {"proved", "failed", "cancelled", "error"}) for job_id in submitted}
        for job_id, job in finals.items():
            if submitted[job_id]["idempotency_key"] == "long":
                assert job["status"] == "failed" and job["search_status"] == "timeout", job
                assert job["attempts"] == 2, job  # interrupted once, re-run once
            else:
                assert job["status"] == "proved" and job["attempts"] == 1, job
        # Resubmitting after the restart finds the same jobs.
        for job_id, body in submitted.items():
            again = client.post("/v1/proofs", json=body).json()
            assert again["id"] == job_id and again["replayed"] is True
        metrics = httpx.get(f"{server.base_url}/metrics").text
        finished = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("dco_jobs_finished_total{"))
        assert finished == len(submitted)  # each job answered exactly once, by the new server
        with sqlite3.connect(f"file:{data / 'jobs.sqlite3'}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT id, status FROM jobs").fetchall()
        assert sorted(r[0] for r in rows) == sorted(submitted)
        assert all(status in ("proved", "failed") for _, status in rows)

        # A worker process killed mid-search is replaced and its job re-run.
        job = client.post("/v1/proofs", json=long_job(1.0)).json()
        wait_for_status(client, job["id"], {"running"})
        os.kill(server.children()[0], signal.SIGKILL)
        final = wait_for_status(client, job["id"], {"proved", "failed", "cancelled", "error"}, timeout_s=60)
        assert final["status"] == "failed" and final["search_status"] == "timeout", final
        assert final["attempts"] == 2
        quick = client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED}).json()
        assert wait_for_status(client, quick["id"], {"proved", "failed", "error"})["status"] == "proved"
    assert 'dco_worker_restarts_total{reason="crash"} 1.0' in httpx.get(f"{server.base_url}/metrics").text


def test_without_a_backend_readyz_explains_and_submissions_are_503(tmp_path):
    data = tmp_path / "data"
    key = add_key(data / "api_keys.json", "alice")
    config = write_config(tmp_path / "service.yaml", data, backend={"kind": "auto"})
    server = ServerProcess(config, tmp_path / "server.log")
    old_path = os.environ["PATH"]
    os.environ["PATH"] = "/usr/bin:/bin"  # no lake, no elan here
    try:
        server.start()
    finally:
        os.environ["PATH"] = old_path
    try:
        ready = httpx.get(f"{server.base_url}/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["ready"] is False and body["backend"] == "none"
        failed = [c for c in body["checks"] if not c["ok"]]
        assert any(c["name"] == "lake" and c["how_to_fix"] for c in failed), failed
        with server.client(key) as client:
            response = client.post("/v1/proofs", json={"statement": "theorem t (n : Nat) : n + 0 = n"})
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["code"] == "backend_unavailable" and "lake" in error["message"]
            check = client.post("/v1/check", json={"statement": "theorem t (n : Nat) : n + 0 = n", "tactics": ["simp"]})
            assert check.status_code == 503
            # Validation still comes first: a hostile statement is 422, not 503.
            assert client.post("/v1/proofs", json={"statement": "#eval 1"}).status_code == 422
    finally:
        server.stop()


def test_workers_that_cannot_load_their_models_make_submissions_503(tmp_path):
    data = tmp_path / "data"
    key = add_key(data / "api_keys.json", "alice")
    config = write_config(
        tmp_path / "service.yaml", data,
        backend={"kind": "replay", "generators": {"kind": "model", "models": [str(tmp_path / "no-such-checkpoint")]}},
        workers={"count": 1},
    )
    server = ServerProcess(config, tmp_path / "server.log").start()
    try:
        deadline = time.monotonic() + 60
        while True:
            ready = httpx.get(f"{server.base_url}/readyz")
            workers = next(c for c in ready.json()["checks"] if c["name"] == "workers")
            if "could load" in workers["detail"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ready.status_code == 503 and not workers["ok"]
        assert "no-such-checkpoint does not exist" in workers["detail"], workers
        with server.client(key) as client:
            response = client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "workers_unavailable" and "no-such-checkpoint" in response.json()["error"]["message"]
            assert int(response.headers["retry-after"]) >= 1
    finally:
        server.stop()
