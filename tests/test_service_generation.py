"""The service's generation layer: workers hold no models, they are clients of shared model
servers named by the service config; `/readyz` reports each member's endpoint; a stalled or
failing endpoint ends a job at its time limit as an `error` with its cause, never `failed`.

The model server is `tests.batching_server.BatchingCompletionsServer` (loopback): an
OpenAI-compatible completions server whose models batch concurrent requests, as `vllm
serve` does; the workers reach it through the project's completions client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from prover.replay import ReplayEnvironment
from prover.generators.oracle import OracleGenerator
from service.backend import endpoint_checks
from service.config import ServiceConfig, load_config
from service.store import JobStatus
from service.workers import generation_cause, job_status_of
from tests.batching_server import BatchingCompletionsServer
from tests.service_harness import REPO, SAMPLE_CONNECTED, ServerProcess, wait_for_status, write_config


def _manifest(path: Path, url: str, names: list[str], served: str | None = None) -> Path:
    checkpoint = path.parent / "tiny-tokenizer"  # the served checkpoint's tokenizer files (the clients build prompt ids)
    if not (checkpoint / "tokenizer.json").is_file():
        from training.modeling import TINY_MODEL, load_tokenizer

        load_tokenizer(TINY_MODEL).save_pretrained(checkpoint)
    members = [{"name": name, "base_url": url, "model": served or name, "checkpoint": str(checkpoint)} for name in names]
    path.write_text(json.dumps({"version": 1, "members": members}))
    return path


def _openai_backend(manifest: Path) -> dict:
    return {"kind": "replay", "generators": {"kind": "openai", "endpoints": str(manifest)}}


@pytest.fixture(scope="module")
def oracle() -> OracleGenerator:
    return OracleGenerator(ReplayEnvironment.from_benchmark(None), seed=0, name="m1")


# ----------------------------------------------------------------------------- config


def test_config_names_the_endpoints_and_keeps_in_process_models_to_one_worker(tmp_path: Path) -> None:
    (tmp_path / "svc.yaml").write_text(
        "workers: {count: 3}\nbackend: {kind: replay, generators: {kind: openai, endpoints: servers/endpoints.json}}\n"
    )
    config = load_config(tmp_path / "svc.yaml")
    assert config.backend.generators.endpoints == tmp_path / "servers" / "endpoints.json"  # relative to the file
    with pytest.raises(ValueError, match="one-user demo"):
        ServiceConfig.model_validate({"workers": {"count": 2}, "backend": {"generators": {"kind": "model", "models": ["tiny-qwen2"]}}})
    ServiceConfig.model_validate({"workers": {"count": 1}, "backend": {"generators": {"kind": "model", "models": ["tiny-qwen2"]}}})
    with pytest.raises(ValueError, match="exactly one of generators.endpoints"):
        ServiceConfig.model_validate({"backend": {"generators": {"kind": "openai"}}})
    with pytest.raises(ValueError, match="need generators.kind = 'openai'"):
        ServiceConfig.model_validate({"backend": {"generators": {"kind": "fixed", "url": "http://127.0.0.1:1"}}})
    with pytest.raises(ValueError, match="tokenizer needs generators.kind = 'openai'"):
        ServiceConfig.model_validate({"backend": {"generators": {"kind": "fixed", "tokenizer": "x"}}})


def test_one_server_by_url_takes_the_tokenizer_from_the_config(tmp_path: Path) -> None:
    """generators.url has no manifest naming the checkpoint: `generators.tokenizer` names it,
    and the worker's client builds its prompts with it (token ids, the training rule)."""
    from service.backend import WorkerBackend

    checkpoint = _manifest(tmp_path / "endpoints.json", "http://127.0.0.1:1", ["m"]).parent / "tiny-tokenizer"
    url_only = {"kind": "replay", "generators": {"kind": "openai", "url": "http://127.0.0.1:1", "served_model": "m"}}
    with pytest.raises(Exception, match="tokenizer"):
        WorkerBackend("replay", ServiceConfig.model_validate({"backend": url_only}))
    url_only["generators"]["tokenizer"] = str(checkpoint)
    worker = WorkerBackend("replay", ServiceConfig.model_validate({"backend": url_only}))
    (client,) = worker.generators.values()
    assert client.tokenizer is not None and not getattr(client, "text_prompts", False)


def test_a_generation_failure_is_an_error_job_with_its_cause() -> None:
    stalled = {"status": "timeout", "errors": ["generator_timeout: m1: GeneratorError: no answer from http://x within the search's time budget"]}
    assert job_status_of(stalled, False) is JobStatus.ERROR and "no answer" in generation_cause(stalled)
    union = {"status": "error", "errors": ["[m2] generator_error: m2: GeneratorError: HTTP 503"]}
    assert job_status_of(union, False) is JobStatus.ERROR and generation_cause(union).startswith("[m2]")
    slow_lean = {"status": "timeout", "errors": ["env_timeout: tactic ran 10 s"]}
    assert job_status_of(slow_lean, False) is JobStatus.FAILED and generation_cause(slow_lean) is None
    assert job_status_of(stalled, True) is JobStatus.CANCELLED


def test_readiness_reports_each_members_endpoint(tmp_path: Path, oracle) -> None:
    from tests.openai_double import free_port

    with BatchingCompletionsServer({"m1": oracle}) as server:
        dead = f"http://127.0.0.1:{free_port()}"
        manifest = tmp_path / "endpoints.json"
        manifest.write_text(json.dumps({"version": 1, "members": [
            {"name": "m1", "base_url": server.url, "model": "m1"},
            {"name": "m2", "base_url": dead, "model": "m2"},
            {"name": "m3", "base_url": server.url, "model": "not-served"},
        ]}))
        config = ServiceConfig.model_validate({"backend": _openai_backend(manifest)})
        checks = {c.name: c for c in endpoint_checks(config)}
        assert checks["model endpoint m1"].ok and "healthy" in checks["model endpoint m1"].detail
        assert not checks["model endpoint m2"].ok and dead in checks["model endpoint m2"].detail
        assert not checks["model endpoint m3"].ok and "does not serve 'not-served'" in checks["model endpoint m3"].detail
        server.healthy = False
        assert "HTTP 503" in {c.name: c for c in endpoint_checks(config)}["model endpoint m1"].detail
    bad = ServiceConfig.model_validate({"backend": _openai_backend(tmp_path / "missing.json")})
    (check,) = endpoint_checks(bad)
    assert not check.ok and "not found" in check.detail


# ------------------------------------------------------------ workers hold no models


def _worker_rss_kib(config: ServiceConfig) -> tuple[int, list[str], bool]:
    """Start a real worker process, wait for `ready`; its resident memory (KiB), generator
    names, and whether it mapped libtorch (a model-holding worker must)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "service.worker_process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"op": "init", "config": config.model_dump(mode="json"), "backend": "replay"}) + "\n")
        proc.stdin.flush()
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready", ready
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        torch_mapped = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        return rss, ready["generators"], torch_mapped
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads worker memory from /proc (Linux)")
def test_worker_memory_does_not_grow_with_the_members(tmp_path: Path, oracle) -> None:
    with BatchingCompletionsServer({"m1": oracle}) as server:
        one = _manifest(tmp_path / "one.json", server.url, ["m1"])
        five = _manifest(tmp_path / "five.json", server.url, [f"neff-{n}" for n in (1, 4, 8, 16, 32)], served="m1")
        rss_one, names_one, torch_one = _worker_rss_kib(ServiceConfig.model_validate({"backend": _openai_backend(one)}))
        rss_five, names_five, torch_five = _worker_rss_kib(ServiceConfig.model_validate({"backend": _openai_backend(five)}))
    assert names_one == ["m1"] and names_five == ["neff-1", "neff-4", "neff-8", "neff-16", "neff-32"]
    assert not torch_one and not torch_five  # no model, not even the library that would hold one
    assert rss_five - rss_one < 8 * 1024, (rss_one, rss_five)  # four more members: clients only (KiB)


# --------------------------------------------------------------- the running service


@pytest.fixture
def shared_model(oracle):
    # expected_clients=2: a call is released as soon as both workers wait (or after 0.2 s).
    with BatchingCompletionsServer({"m1": oracle}, call_s=0.02, window_s=0.2, expected_clients=2) as server:
        yield server


def _start(tmp_path: Path, manifest: Path, **sections) -> ServerProcess:
    from tests.service_harness import free_port as _unused  # noqa: F401 - the harness picks the port

    config = write_config(
        tmp_path / "service.yaml", tmp_path / "data",
        backend=_openai_backend(manifest),
        auth={"allow_anonymous": True},
        workers={"count": 2, "grace_s": 2.0, "poll_interval_s": 0.1},
        **sections,
    )
    return ServerProcess(config, tmp_path / "server.log").start()


def test_two_workers_share_one_model_server_which_batches_their_jobs(tmp_path: Path, shared_model) -> None:
    manifest = _manifest(tmp_path / "endpoints.json", shared_model.url, ["m1"])
    server = _start(tmp_path, manifest)
    try:
        ready = server.wait_ready(workers=2)
        assert ready["generators"] == ["m1"]
        endpoint = next(c for c in ready["checks"] if c["name"] == "model endpoint m1")
        assert endpoint["ok"] and "healthy" in endpoint["detail"]
        with server.client(None) as client:
            ids = [client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED}).json()["id"] for _ in range(6)]
            done = [wait_for_status(client, job, {"proved", "failed", "error", "cancelled"}, timeout_s=90) for job in ids]
        assert [d["status"] for d in done] == ["proved"] * 6
        workers = [pid for pid in server.children() if "service.worker_process" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2
        assert not any("libtorch" in Path(f"/proc/{pid}/maps").read_text() for pid in workers)  # they hold no model
    finally:
        server.stop()
    stats = shared_model.stats("m1")
    print("model server batching:", json.dumps(stats))  # shown with -s
    # Both workers' searches reached the one server, which merged their requests into calls.
    assert stats["requests"] >= 12 and stats["calls"] < stats["requests"], stats
    assert stats["requests_per_call"] > 1.2, stats


def test_a_stalled_endpoint_ends_the_job_at_its_time_limit_with_timeout_and_the_cause(tmp_path: Path, shared_model) -> None:
    manifest = _manifest(tmp_path / "endpoints.json", shared_model.url, ["m1"])
    server = _start(tmp_path, manifest)
    try:
        server.wait_ready(workers=2)
        shared_model.stall_s = 60.0
        limit, tactic = 2.0, 1.0
        with server.client(None) as client:
            started = time.monotonic()
            job = client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED, "budget": {"time_limit_s": limit, "tactic_timeout_s": tactic}}).json()
            body = wait_for_status(client, job["id"], {"proved", "failed", "error", "cancelled"}, timeout_s=30)
            elapsed = time.monotonic() - started
            print(f"stalled endpoint: job answered after {elapsed:.2f} s, search wall time {body['result']['wall_time_s']:.2f} s; error: {body['error']}")
            assert body["status"] == "error" and body["search_status"] == "timeout"
            assert shared_model.url in body["error"] and "time budget" in body["error"], body["error"]
            assert body["result"]["wall_time_s"] <= limit + tactic, body["result"]
            assert elapsed <= limit + tactic + 2.0  # + the queue poll and the status polls

            # An endpoint answering 503 is retried within the budget, then reported with its cause.
            shared_model.stall_s = 0.0
            shared_model.fail_next = [503] * 50
            job = client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED, "budget": {"time_limit_s": 60.0}}).json()
            body = wait_for_status(client, job["id"], {"proved", "failed", "error", "cancelled"}, timeout_s=60)
            assert body["status"] == "error" and body["search_status"] == "error"
            assert "HTTP 503" in body["error"] and body["result"]["wall_time_s"] < 30
    finally:
        shared_model.fail_next = []
        server.stop()
