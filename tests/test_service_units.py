"""The service's parts in-process: job store, API keys and rate limits, config, event hub."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from service.auth import KeyRing, Principal, RateLimiter, add_key
from service.config import AuthConfig, ServiceConfig, load_config
from service.errors import ApiError
from service.events import EventHub
from service.store import CancelOutcome, JobStatus, JobStore, SubmitOutcome
from service.workers import job_status_of, search_seconds_allowed

REQUEST = {"theorem": {"id": "t", "statement": "", "header": ""}, "budget": {"time_limit_s": 5.0, "tactic_timeout_s": 1.0}, "strategy": "best_first", "ensemble": "union", "members": None}


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite3", synchronous="NORMAL")
    yield s
    s.close()


def submit(store: JobStore, key: str = "k", idem: str | None = None, request: dict = REQUEST, max_queue: int = 100, max_active: int = 100):
    return store.submit(key, request, idempotency_key=idem, max_queue=max_queue, max_active_for_key=max_active)


# ------------------------------------------------------------------ store


def test_store_uses_wal_and_a_job_moves_forward_only(store):
    with store._read() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    job = submit(store).job
    assert job.status is JobStatus.QUEUED and job.attempts == 0
    claimed = store.claim()
    assert claimed.id == job.id and claimed.status is JobStatus.RUNNING and claimed.attempts == 1
    assert store.claim() is None
    assert store.finish(job.id, JobStatus.PROVED, result={"status": "proved"}) is True
    assert store.finish(job.id, JobStatus.FAILED, result=None) is False  # terminal rows never change
    assert store.requeue(job.id) is False
    assert store.get(job.id).status is JobStatus.PROVED and store.get(job.id).result == {"status": "proved"}
    with pytest.raises(ValueError, match="terminal"):
        store.finish(job.id, JobStatus.RUNNING, result=None)


def test_claims_are_exclusive_across_threads(store):
    ids = {submit(store).job.id for _ in range(60)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker():
        while (job := store.claim()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # every job once, none twice


def test_idempotency_queue_limit_and_quota(store):
    first = submit(store, idem="a")
    assert first.outcome is SubmitOutcome.CREATED
    assert submit(store, idem="a").outcome is SubmitOutcome.REPLAYED
    assert submit(store, idem="a").job.id == first.job.id
    other = dict(REQUEST, strategy="sampling")
    assert submit(store, idem="a", request=other).outcome is SubmitOutcome.CONFLICT
    assert submit(store, key="other", idem="a").outcome is SubmitOutcome.CREATED  # keys are per API key
    assert submit(store, max_queue=2).outcome is SubmitOutcome.QUEUE_FULL
    quota = submit(store, max_active=1)
    assert quota.outcome is SubmitOutcome.QUOTA and quota.active == 1


def test_cancel_queued_running_and_finished(store):
    queued = submit(store).job
    assert store.request_cancel(queued.id)[0] is CancelOutcome.CANCELLED
    assert store.get(queued.id).status is JobStatus.CANCELLED
    running = submit(store).job
    store.claim()
    outcome, job = store.request_cancel(running.id)
    assert outcome is CancelOutcome.REQUESTED and job.status is JobStatus.RUNNING and job.cancel_requested
    assert store.request_cancel(running.id)[0] is CancelOutcome.ALREADY
    store.finish(running.id, JobStatus.CANCELLED, result=None)
    done = submit(store).job
    store.claim()
    store.finish(done.id, JobStatus.PROVED, result=None)
    assert store.request_cancel(done.id)[0] is CancelOutcome.FINISHED
    assert store.request_cancel("nope")[0] is CancelOutcome.NOT_FOUND


def test_recover_requeues_cancels_and_gives_up(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    plain, cancelled, poison = (submit(store).job for _ in range(3))
    for _ in range(3):
        store.claim()
    store.request_cancel(cancelled.id)
    for _ in range(2):  # the poison job already ran (and killed its server) twice more
        store.requeue(poison.id)
        while store.claim().id != poison.id:
            pass
    store.close()

    store = JobStore(path)  # a new server on the same file
    report = store.recover(max_attempts=3)
    assert report.requeued == [plain.id] and report.cancelled == [cancelled.id] and report.errored == [poison.id]
    assert store.get(plain.id).status is JobStatus.QUEUED
    assert store.get(cancelled.id).status is JobStatus.CANCELLED
    assert "3 runs" in store.get(poison.id).error
    assert store.requeue("missing") is False
    store.close()


def test_orderly_requeue_refunds_the_attempt(store):
    job = submit(store).job
    store.claim()
    store.requeue(job.id, refund_attempt=True)
    assert store.get(job.id).attempts == 0 and store.claim().attempts == 1


# ------------------------------------------------------------------- auth


def test_keys_are_stored_hashed_and_checked(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "alice", rate_per_s=2.0)
    secret = key.split(".", 1)[1]
    assert secret not in path.read_text() and oct(path.stat().st_mode & 0o777) == "0o600"
    ring = KeyRing(path, AuthConfig())
    principal = ring.authenticate(key)
    assert principal.key_id == "alice" and principal.rate_per_s == 2.0 and principal.burst == AuthConfig().burst
    for token, status in ((None, 401), ("garbage", 401), ("dco-alice.wrong", 401), ("dco-bob." + secret, 401)):
        with pytest.raises(ApiError) as err:
            ring.authenticate(token)
        assert err.value.status == status
    with pytest.raises(ValueError, match="already exists"):
        add_key(path, "alice")
    with pytest.raises(ValueError, match="must match"):
        add_key(path, "no spaces")


def test_disabled_key_is_403_and_the_file_is_reloaded(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    key = add_key(path, "alice")
    ring = KeyRing(path, AuthConfig())
    monkeypatch.setattr(KeyRing, "RELOAD_CHECK_S", 0.0)
    data = json.loads(path.read_text())
    data["keys"][0]["disabled"] = True
    path.write_text(json.dumps(data))
    import os

    os.utime(path, (1, 1))  # a different modification time
    with pytest.raises(ApiError) as err:
        ring.authenticate(key)
    assert err.value.status == 403


def test_token_bucket_grants_burst_then_retry_after():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    p = Principal("k", frozenset(), rate_per_s=2.0, burst=3, max_concurrent_jobs=1)
    assert [limiter.acquire(p) for _ in range(3)] == [None, None, None]
    wait = limiter.acquire(p)
    assert wait == pytest.approx(0.5)  # one token refills in 1/rate seconds
    now[0] += 0.5
    assert limiter.acquire(p) is None
    assert limiter.acquire(p) == pytest.approx(0.5)


def test_retry_after_header_rounds_up():
    response = ApiError(429, "rate_limited", "slow down", retry_after_s=0.2).response()
    assert response.headers["retry-after"] == "1" and response.status_code == 429


# ----------------------------------------------------------------- config


def test_config_from_yaml_and_toml(tmp_path):
    (tmp_path / "a.yaml").write_text("data_dir: d\nworkers: {count: 3}\nbackend: {kind: replay, generators: {kind: oracle}}\n")
    config = load_config(tmp_path / "a.yaml")
    assert config.data_dir == tmp_path / "d" and config.workers.count == 3 and config.keys_path == tmp_path / "d/api_keys.json"
    (tmp_path / "b.toml").write_text('data_dir = "/abs"\n[limits]\nmax_queue = 5\n')
    config = load_config(tmp_path / "b.toml", data_dir="rel")
    assert config.limits.max_queue == 5 and str(config.data_dir) == "rel"  # command line: relative to the cwd


@pytest.mark.parametrize(
    "text, message",
    [
        ("limits: {max_queeu: 5}\n", "max_queeu"),
        ("limits: {budget_caps: {time_limit_s: 10}}\n", "default_budget.time_limit_s exceeds"),
        ("backend: {generators: {kind: model}}\n", "needs generators.models"),
        ("workers: {count: 0}\n", "count"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(tmp_path / "c.yaml")


def test_embedded_default_config_is_valid():
    config = ServiceConfig()
    assert config.backend.kind == "auto" and config.auth.allow_anonymous is False


# ------------------------------------------------------ workers and events


@pytest.mark.parametrize(
    "search, cancel, job",
    [
        ("proved", False, JobStatus.PROVED),
        ("proved", True, JobStatus.PROVED),  # a verified proof is always reported
        ("budget_exhausted", False, JobStatus.FAILED),
        ("timeout", False, JobStatus.FAILED),
        ("timeout", True, JobStatus.CANCELLED),
        ("cancelled", False, JobStatus.CANCELLED),
        ("error", False, JobStatus.ERROR),
        ("something new", False, JobStatus.ERROR),
    ],
)
def test_job_status_of_search_status(search, cancel, job):
    assert job_status_of({"status": search}, cancel) is job


def test_union_ensembles_get_a_budget_per_member():
    assert search_seconds_allowed(REQUEST, all_members=1) == 6.0
    assert search_seconds_allowed(REQUEST, all_members=3) == 16.0  # members None: every generator
    assert search_seconds_allowed(dict(REQUEST, members=["a", "b"]), all_members=3) == 11.0
    assert search_seconds_allowed(dict(REQUEST, members=["a", "b"], ensemble="mixture"), all_members=3) == 6.0


def test_event_hub_delivers_across_threads_and_done_is_never_dropped():
    async def main():
        hub = EventHub()
        hub.publish("j", {"type": "progress", "passes": 1})
        queue, backlog, seq, _ = hub.subscribe("j")
        assert [e["passes"] for e in backlog] == [1] and seq == 1  # the last progress, for late subscribers

        def flood():
            for i in range(1000):
                hub.publish("j", {"type": "progress", "passes": i})
            hub.publish("j", {"type": "done", "status": "proved"})

        thread = threading.Thread(target=flood)
        thread.start()
        thread.join()
        events = []
        while True:
            event = await asyncio.wait_for(queue.get(), 5)
            events.append(event)
            if event["type"] == "done":
                break
        assert events[-1] == {"type": "done", "status": "proved", "seq": 1002}
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        assert len(events) <= 256
        hub.unsubscribe("j", queue)
        assert hub.subscriber_count() == 0

    asyncio.run(main())


def test_event_hub_replays_what_a_resumed_stream_missed():
    async def main():
        hub = EventHub()
        for i in range(1, 6):
            hub.publish("j", {"type": "progress", "passes": i})
        _, backlog, seq, complete = hub.subscribe("j", after=3)
        assert [e["seq"] for e in backlog] == [4, 5] and seq == 5 and complete
        _, backlog, _, complete = hub.subscribe("j", after=5)
        assert backlog == [] and complete
        for i in range(100):  # more than the replay buffer holds
            hub.publish("j", {"type": "progress", "passes": i})
        _, backlog, _, complete = hub.subscribe("j", after=2)
        assert not complete  # events were lost: the stream must send a fresh snapshot
        _, backlog, _, complete = hub.subscribe("j", after=10_000)  # an id from before a restart
        assert not complete

    asyncio.run(main())


@pytest.mark.parametrize("name", ["replay-oracle.yaml", "replay-tiny-model.yaml"])
def test_shipped_demo_configs_load(name):
    from pathlib import Path

    import service

    config = load_config(Path(service.__file__).parent / "configs" / name)
    assert config.backend.kind == "replay" and config.data_dir.is_absolute()


def test_serve_add_key_writes_a_hashed_key(tmp_path, capfd):
    import typer
    from typer.testing import CliRunner

    from prover.cli.serve import serve_command

    app = typer.Typer()
    app.command()(serve_command)
    app.command("other")(lambda: None)  # two commands: `serve` is addressed by name, as in dco-prover
    result = CliRunner().invoke(app, ["serve-command", "--data-dir", str(tmp_path), "--add-key", "alice"])
    assert result.exit_code == 0, result.output
    key = capfd.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("dco-alice.")
    assert KeyRing(tmp_path / "api_keys.json", AuthConfig()).authenticate(key).key_id == "alice"
    assert CliRunner().invoke(app, ["serve-command", "--data-dir", str(tmp_path), "--add-key", "alice"]).exit_code == 2
    assert CliRunner().invoke(app, ["serve-command", "--config", str(tmp_path / "missing.yaml")]).exit_code == 2


def test_prover_never_imports_service():
    import subprocess
    import sys

    code = "import sys, prover.cli.serve; print(sorted(m for m in sys.modules if m.split('.')[0] == 'service'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
