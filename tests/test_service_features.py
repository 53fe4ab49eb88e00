"""What a team submitting many theorems needs (issue 14): job lists, batches, results to paste
into Lean, resumable event streams, queue positions, retention, and `dco-prover keys`.

Through one real uvicorn process (replay backend + oracle), plus in-process checks of the
parts (store pages and purge, result fields, key file management).
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from service.auth import KeyRing, add_key, revoke_key, rotate_key
from service.config import AuthConfig
from service.errors import ApiError
from service.results import axioms_of, failure_reason, proof_text
from service.store import JobStatus, JobStore
from service_harness import SAMPLE_CONNECTED, ServerProcess, wait_for_status, write_config

LATENCY_S = 0.05
ENDLESS = {"strategy": "sampling", "budget": {"tactic_timeout_s": 0.01, "time_limit_s": 100, "max_passes": 4096}}
RETENTION_S = 4.0  # the test server purges finished jobs this many seconds old


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("service-features")
    data = root / "data"
    keys_file = data / "api_keys.json"
    keys = {name: add_key(keys_file, name) for name in ("alice", "bob", "queue", "batch", "old")}
    config = write_config(
        root / "service.yaml", data,
        backend={"kind": "replay", "latency_s": LATENCY_S, "generators": {"kind": "oracle"}},
        auth={"rate_per_s": 1000, "burst": 1000, "max_concurrent_jobs": 50},
        limits={"max_batch_items": 5},
        retention={"max_age_days": RETENTION_S / 86400, "interval_s": 1.0},
    )
    proc = ServerProcess(config, root / "server.log").start()
    try:
        proc.wait_ready(workers=2)
        proc.keys = keys
        yield proc
    finally:
        proc.stop()


def client_for(server, name):
    return server.client(server.keys[name])


def submit(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/proofs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def read_sse(response: httpx.Response) -> list[tuple[str | None, str, dict]]:
    """`(id, event, data)` per event of a `text/event-stream`."""
    events, event_id, name, data = [], None, None, []
    for line in response.iter_lines():
        if line == "":
            if data:
                events.append((event_id, name or "message", json.loads("\n".join(data))))
            event_id, name, data = None, None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events


# ------------------------------------------------------------ lists, batches


def test_list_jobs_newest_first_with_cursor_and_status_filter(server):
    with client_for(server, "alice") as alice, client_for(server, "bob") as bob:
        ids = [submit(alice, theorem_id=SAMPLE_CONNECTED, idempotency_key=f"list-{i}")["id"] for i in range(3)]
        submit(bob, theorem_id=SAMPLE_CONNECTED)
        for job_id in ids:
            wait_for_status(alice, job_id, {"proved"})
        first = alice.get("/v1/proofs", params={"limit": 2})
        assert first.status_code == 200, first.text
        page = first.json()
        assert [j["id"] for j in page["items"]] == ids[::-1][:2] and page["next_cursor"]
        second = alice.get("/v1/proofs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        assert [j["id"] for j in second["items"]] == [ids[0]] and second["next_cursor"] is None
        assert {j["id"] for j in alice.get("/v1/proofs", params={"status": "proved"}).json()["items"]} == set(ids)  # not bob's
        assert alice.get("/v1/proofs", params={"status": "queued"}).json() == {"items": [], "next_cursor": None}
        # a cursor past SQLite's 64-bit integers (found by the OpenAPI fuzzer: it was a 500) reads from the newest
        huge = alice.get("/v1/proofs", params={"limit": 2, "cursor": "9670219919215128020"})
        assert huge.status_code == 200 and [j["id"] for j in huge.json()["items"]] == ids[::-1][:2], huge.text
        for bad in ({"cursor": "x"}, {"limit": 0}, {"status": "done"}):
            response = alice.get("/v1/proofs", params=bad)
            assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", bad


def test_batch_answers_in_order_and_is_idempotent(server):
    with client_for(server, "batch") as client:
        body = {"idempotency_key": "nightly-7", "items": [
            {"theorem_id": SAMPLE_CONNECTED},
            {"theorem_id": "Nat.no_such_theorem"},
            {"theorem_id": SAMPLE_CONNECTED, "surprise": 1},
            {"theorem_id": SAMPLE_CONNECTED, "strategy": "sampling", "budget": {"max_passes": 8}},
        ]}
        response = client.post("/v1/proofs:batch", json=body)
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        assert len(items) == 4
        assert items[0]["id"] and items[3]["id"] and items[0]["id"] != items[3]["id"]
        assert items[1]["error"]["code"] == "unknown_theorem" and items[1]["id"] is None
        assert items[2]["error"]["code"] == "invalid_request" and "surprise" in items[2]["error"]["message"]
        again = client.post("/v1/proofs:batch", json=body).json()["items"]
        assert [i["id"] for i in again] == [i["id"] for i in items] and again[0]["replayed"] is True
        for item in (items[0], items[3]):
            wait_for_status(client, item["id"], {"proved", "failed"})
        too_many = client.post("/v1/proofs:batch", json={"items": [{"theorem_id": SAMPLE_CONNECTED}] * 6})
        assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "too_many_items"


# ------------------------------------------------------------------- results


def test_results_carry_paste_ready_proof_versions_reason_and_counters(server):
    with client_for(server, "alice") as alice:
        proved = wait_for_status(alice, submit(alice, theorem_id=SAMPLE_CONNECTED)["id"], {"proved"})
        assert proved["proof_text"] == f"theorem {SAMPLE_CONNECTED} := by\n  dsimp [invFunIdAssoc]\n  aesop_cat"
        assert proved["axioms"] is None  # the replay backend does not audit axioms
        assert proved["versions"] == {"backend": "replay", "lean": None, "mathlib": None}
        assert proved["counters"]["lean_calls"] > 0 and proved["reason"] is None
        timed_out = submit(alice, theorem_id=SAMPLE_CONNECTED, strategy="sampling",
                           budget={"tactic_timeout_s": 0.01, "time_limit_s": 0.5, "max_passes": 4096})
        budget = submit(alice, theorem_id=SAMPLE_CONNECTED, strategy="sampling", budget={"tactic_timeout_s": 0.01, "max_passes": 2})
        for job, reason in ((timed_out, "timeout"), (budget, "budget_exhausted")):
            done = wait_for_status(alice, job["id"], {"failed", "proved", "error"})
            assert done["status"] == "failed" and done["reason"] == reason, done
            assert done["proof_text"] is None and done["counters"]["passes"] >= 1


def test_result_fields_from_records():
    theorem = {"id": "t", "statement": "theorem t (n : Nat) : n + 0 = n", "header": ""}
    text = proof_text(theorem, ["induction n with\n| zero => rfl\n| succ n ih => simp", "done"])
    assert text == "theorem t (n : Nat) : n + 0 = n := by\n  induction n with\n  | zero => rfl\n  | succ n ih => simp\n  done"
    assert axioms_of({"verification_message": "verified; axioms: propext, Classical.choice"}) == ["propext", "Classical.choice"]
    assert axioms_of({"verification_message": "verified; axioms: none"}) == []
    assert axioms_of({"verification_message": ""}) is None
    budget = {"max_depth": 3}
    assert failure_reason({"status": "failed", "max_depth_reached": 3}, budget) == "depth_cap"
    assert failure_reason({"status": "failed", "max_depth_reached": 1}, budget) == "all_branches_failed"
    assert failure_reason({"status": "proved"}, budget) is None


# --------------------------------------------- queue position, event ids, resume


def test_queue_position_and_resumable_event_stream(server):
    with client_for(server, "queue") as client:
        busy = [submit(client, theorem_id=SAMPLE_CONNECTED, **ENDLESS) for _ in range(2)]
        for job in busy:
            wait_for_status(client, job["id"], {"running"})
        queued = [submit(client, theorem_id=SAMPLE_CONNECTED) for _ in range(2)]
        positions = [client.get(f"/v1/proofs/{j['id']}").json()["queue_position"] for j in queued]
        assert positions == [1, 2], positions
        assert client.get(f"/v1/proofs/{busy[0]['id']}").json()["queue_position"] is None
        with client.stream("GET", queued[1]["events_url"], timeout=10) as response:
            stream = response.iter_lines()
            lines = [next(stream) for _ in range(3)]  # the first event: `id:`, `event:`, `data:` in some order
        assert any(line.startswith("id:") for line in lines), lines
        snapshot = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
        assert snapshot["status"] == "queued" and snapshot["queue_position"] == 2

        # Resume a running job's stream: the events after Last-Event-ID, none missed, none twice.
        watched = busy[0]
        with client.stream("GET", watched["events_url"], timeout=10) as response:
            seen = []
            for line in response.iter_lines():
                if line.startswith("id:"):
                    seen.append(int(line[3:].strip()))
                if len(seen) >= 3:
                    break
        assert seen == sorted(seen) and len(set(seen)) == 3
        with client.stream("GET", watched["events_url"], headers={"Last-Event-ID": str(seen[-1])}, timeout=30) as response:
            resumed_ids, lines = [], response.iter_lines()
            for line in lines:
                if line.startswith("id:"):
                    resumed_ids.append(int(line[3:].strip()))
                if len(resumed_ids) >= 2:
                    break
            assert resumed_ids == [seen[-1] + 1, seen[-1] + 2], (seen, resumed_ids)  # from the server's replay buffer
            for job in busy:
                assert client.delete(f"/v1/proofs/{job['id']}").status_code == 202
            rest = [line for line in lines]
        assert "event: result" in rest and "id: result" in rest
        later = [int(line[3:].strip()) for line in rest if line.startswith("id:") and line[3:].strip() != "result"]
        assert later == sorted(later) and all(n > resumed_ids[-1] for n in later)
        # Reconnecting after the end (with the last id, or `result`) gets the result alone.
        for last in (str(seen[-1]), "result"):
            with client.stream("GET", watched["events_url"], headers={"Last-Event-ID": last}, timeout=10) as response:
                again = read_sse(response)
            assert [(i, n) for i, n, _ in again] == [("result", "result")] and again[0][2]["status"] == "cancelled"
        for job in queued:
            wait_for_status(client, job["id"], {"proved"})


# ---------------------------------------------------------------- retention


def test_finished_jobs_are_purged_after_the_retention_age(server):
    with client_for(server, "old") as client:
        job = submit(client, theorem_id=SAMPLE_CONNECTED)
        wait_for_status(client, job["id"], {"proved"})
        deadline = time.monotonic() + RETENTION_S + 10
        while time.monotonic() < deadline and client.get(f"/v1/proofs/{job['id']}").status_code == 200:
            time.sleep(0.5)
        assert client.get(f"/v1/proofs/{job['id']}").status_code == 404
        ready = httpx.get(f"{server.base_url}/readyz").json()
        assert "retention" in {c["name"]: c for c in ready["checks"]}["job store"]["detail"]


def test_purge_deletes_only_old_finished_jobs_and_compacts(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3", synchronous="NORMAL")
    try:
        request = {"theorem": {"id": "t"}, "budget": {}, "payload": "x" * 20_000}
        ids = [store.submit("k", request, idempotency_key=str(i), max_queue=1000, max_active_for_key=1000).job.id for i in range(60)]
        for _ in range(50):
            job = store.claim()
            store.finish(job.id, JobStatus.PROVED, result={"status": "proved"})
        with store._read() as conn:
            pages_before = conn.execute("PRAGMA page_count").fetchone()[0]
        assert store.purge_finished(3600, now=time.time() + 1800) == 0  # not old enough
        assert store.purge_finished(3600, now=time.time() + 7200) == 50
        with store._read() as conn:
            pages_after = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        assert pages_after < pages_before / 2 and free == 0, (pages_before, pages_after, free)
        remaining = [store.get(i) for i in ids]
        assert sum(j is not None for j in remaining) == 10 and all(j.status is JobStatus.QUEUED for j in remaining if j)
        assert store.connection_count() <= 1 + 4
    finally:
        store.close()


def test_store_connections_stay_bounded_across_threads(tmp_path):
    import threading

    store = JobStore(tmp_path / "jobs.sqlite3", synchronous="NORMAL", read_pool_size=2)
    try:
        for _ in range(20):  # short-lived threads, as a thread pool retires and replaces them
            threads = [threading.Thread(target=lambda: (store.queue_depth(), store.submit(
                "k", {"theorem": {"id": "t"}}, idempotency_key=None, max_queue=10**6, max_active_for_key=10**6))) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert store.connection_count() <= 3
        store.probe()
    finally:
        store.close()
    with pytest.raises(Exception):
        store.get("x")


# ---------------------------------------------------------------------- keys


def test_revoked_and_rotated_credentials_stay_refused_even_when_the_file_breaks(tmp_path, monkeypatch):
    path = tmp_path / "api_keys.json"
    alice, bob, carol = (add_key(path, name) for name in ("alice", "bob", "carol"))
    monkeypatch.setattr(KeyRing, "RELOAD_CHECK_S", 0.0)
    ring = KeyRing(path, AuthConfig())
    revoke_key(path, "bob")
    new_carol = rotate_key(path, "carol")
    assert ring.authenticate(alice).key_id == "alice" and ring.authenticate(new_carol).key_id == "carol"
    for token, code in ((bob, "api_key_revoked"), (carol, "invalid_api_key")):
        with pytest.raises(ApiError) as err:
            ring.authenticate(token)
        assert err.value.code == code
    # The key file breaks, with bob's and old-carol's entries as they were before (a stale
    # copy restored by hand): the revocation list still refuses them.
    stale = json.loads(path.read_text())
    for entry in stale["keys"]:
        entry["disabled"], entry["revoked_at"] = False, None
    path.write_text(json.dumps(stale)[:-5])
    os.utime(path, (1, 1))
    assert ring.authenticate(alice).key_id == "alice"  # proven valid by the last good file, still in this one
    with pytest.raises(ApiError) as err:
        ring.authenticate(bob)
    assert err.value.status == 403
    with pytest.raises(ApiError) as err:
        ring.authenticate(add_key(tmp_path / "other.json", "dave").replace("dave", "alice"))  # wrong secret
    assert err.value.status == 503 and err.value.code == "key_file_unreadable"
    ok, detail = ring.status()
    assert not ok and "not valid JSON" in detail and str(tmp_path) not in detail


def test_keys_cli_add_list_rotate_revoke(tmp_path, capfd):
    from typer.testing import CliRunner

    from prover.cli import app

    runner = CliRunner()
    data = str(tmp_path)

    def run(*args):
        result = runner.invoke(app, ["keys", *args, "--data-dir", data])
        out = capfd.readouterr()
        return result.exit_code, out.out, out.err

    code, out, _ = run("add", "alice", "--scopes", "check", "--max-open-streams", "3", "--max-concurrent-checks", "1")
    assert code == 0 and out.strip().startswith("dco-alice.")
    key = out.strip().splitlines()[-1]
    code, out, _ = run("list", "--json")
    assert code == 0
    [entry] = json.loads(out)
    assert entry["id"] == "alice" and entry["scopes"] == ["check"] and entry["max_open_streams"] == 3
    assert "sha256" not in entry and "salt" not in entry
    ring = KeyRing(tmp_path / "api_keys.json", AuthConfig())
    principal = ring.authenticate(key)
    assert principal.max_open_streams == 3 and principal.max_concurrent_checks == 1 and principal.scopes == {"check"}
    code, out, _ = run("rotate", "alice")
    new_key = out.strip().splitlines()[-1]
    assert code == 0 and new_key != key
    code, _, _ = run("revoke", "alice")
    assert code == 0
    code, out, _ = run("list")
    assert code == 0 and "revoked" in out
    code, _, err = run("revoke", "nobody")
    assert code == 2 and "no key 'nobody'" in err
    assert oct((tmp_path / "api_keys.json").stat().st_mode & 0o777) == "0o600"


def test_purge_compacts_a_database_made_before_auto_vacuum(tmp_path):
    import sqlite3

    from service.store import _SCHEMA

    path = tmp_path / "jobs.sqlite3"
    conn = sqlite3.connect(path)  # an older server's database: auto_vacuum off
    conn.executescript(_SCHEMA)
    conn.close()
    store = JobStore(path, synchronous="NORMAL")
    try:
        for i in range(30):
            store.submit("k", {"theorem": {"id": "t"}, "payload": "x" * 20_000}, idempotency_key=str(i), max_queue=100, max_active_for_key=100)
            job = store.claim()
            store.finish(job.id, JobStatus.FAILED, result=None)
        assert store.purge_finished(0.0, now=time.time() + 1) == 30
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental from now on
            assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
            assert conn.execute("PRAGMA page_count").fetchone()[0] < 20
    finally:
        store.close()


def test_concurrent_key_writes_lose_nothing_and_readers_never_see_a_partial_file(tmp_path):
    import threading

    path = tmp_path / "api_keys.json"
    add_key(path, "first")
    stop = threading.Event()
    bad_reads: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except (ValueError, FileNotFoundError) as err:
                bad_reads.append(repr(err))

    watcher = threading.Thread(target=reader)
    watcher.start()
    writers = [threading.Thread(target=add_key, args=(path, f"k{i}")) for i in range(12)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    watcher.join()
    assert bad_reads == []
    assert {e["id"] for e in json.loads(path.read_text())["keys"]} == {"first", *(f"k{i}" for i in range(12))}
    assert not list(tmp_path.glob("*.tmp")) and oct(path.stat().st_mode & 0o777) == "0o600"


def test_an_unreadable_revocation_list_refuses_every_key_until_fixed(tmp_path, monkeypatch):
    path = tmp_path / "api_keys.json"
    alice = add_key(path, "alice")
    revoke_key(path, add_key(path, "bob") and "bob")
    monkeypatch.setattr(KeyRing, "RELOAD_CHECK_S", 0.0)
    ring = KeyRing(path, AuthConfig())
    assert ring.authenticate(alice).key_id == "alice"
    revoked = path.with_name(path.name + ".revoked")
    good = revoked.read_text()
    revoked.write_text(good + "not-hex\n")
    with pytest.raises(ApiError) as err:
        ring.authenticate(alice)
    assert err.value.status == 503 and not ring.status()[0]
    revoked.write_text(good)
    assert ring.authenticate(alice).key_id == "alice" and ring.status()[0]
