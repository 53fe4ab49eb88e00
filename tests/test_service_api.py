"""The HTTP service through a real uvicorn process on loopback (replay backend + oracle).

One server serves the whole module (starting one costs seconds): jobs, SSE, cancel,
auth, validation, health and metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from service.auth import add_key
from service_harness import SAMPLE_CONNECTED, ServerProcess, wait_for_status, write_config

REPO = Path(__file__).resolve().parent.parent
# The replay environment sleeps this long per tactic (seconds). A request whose tactic
# timeout is shorter sees every tactic time out (never cached): a search that runs until
# its time limit or a cancel, with progress after each pass.
LATENCY_S = 0.05
ENDLESS = {"strategy": "sampling", "budget": {"tactic_timeout_s": 0.01, "time_limit_s": 100, "max_passes": 4096}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("service-api")
    data = root / "data"
    keys_file = data / "api_keys.json"
    keys = {
        "alice": add_key(keys_file, "alice"),
        "bob": add_key(keys_file, "bob"),
        "off": add_key(keys_file, "off"),
        "checker": add_key(keys_file, "checker", scopes=("check",)),
        "slow": add_key(keys_file, "slow", rate_per_s=0.2, burst=2),
        "quota": add_key(keys_file, "quota", max_concurrent_jobs=1),
        "fuzz": add_key(keys_file, "fuzz", rate_per_s=100000, burst=100000, max_concurrent_jobs=100000),
    }
    stored = json.loads(keys_file.read_text())
    for entry in stored["keys"]:
        entry["disabled"] = entry["id"] == "off"
    keys_file.write_text(json.dumps(stored))
    config = write_config(
        root / "service.yaml",
        data,
        backend={"kind": "replay", "latency_s": LATENCY_S, "generators": {"kind": "oracle"}},
        limits={"max_statement_chars": 2000, "max_body_bytes": 16384, "budget_caps": {"time_limit_s": 120}, "default_budget": {"time_limit_s": 60}},
        auth={"rate_per_s": 1000, "burst": 1000, "max_concurrent_jobs": 8},
    )
    proc = ServerProcess(config, root / "server.log").start()
    try:
        proc.wait_ready(workers=2)
        proc.keys = keys
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def alice(server):
    with server.client(server.keys["alice"]) as client:
        yield client


def submit(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/proofs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] and body["error"]["message"], body
    return body["error"]


# ------------------------------------------------------------------- jobs


def test_submit_poll_proof_then_check(alice):
    response = alice.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED, "budget": {"max_expansions": 50}})
    assert response.status_code == 202
    accepted = response.json()
    assert response.headers["location"] == f"/v1/proofs/{accepted['id']}"
    assert accepted["budget"]["max_expansions"] == 50 and accepted["replayed"] is False
    job = wait_for_status(alice, accepted["id"], {"proved", "failed", "error"})
    assert job["status"] == "proved", job
    assert job["verified"] is True
    assert job["proof"] == ["dsimp [invFunIdAssoc]", "aesop_cat"]
    assert job["result"]["status"] == "proved" and job["result"]["lean_calls"] > 0
    assert job["attempts"] == 1 and job["finished_at"] >= job["started_at"] >= job["created_at"]

    good = alice.post("/v1/check", json={"theorem_id": SAMPLE_CONNECTED, "tactics": job["proof"]})
    assert good.status_code == 200, good.text
    assert good.json()["valid"] is True
    bad = alice.post("/v1/check", json={"theorem_id": SAMPLE_CONNECTED, "tactics": ["dsimp [invFunIdAssoc]"]})
    assert bad.status_code == 200
    assert bad.json()["valid"] is False and "unsolved goals" in bad.json()["message"]


def test_idempotency_key_returns_the_same_job(alice):
    body = {"theorem_id": SAMPLE_CONNECTED, "idempotency_key": "batch-1/theorem-7"}
    first = submit(alice, **body)
    again = submit(alice, **body)
    assert again["id"] == first["id"] and again["replayed"] is True
    conflict = alice.post("/v1/proofs", json={**body, "strategy": "sampling"})
    assert conflict.status_code == 409
    assert error_of(conflict)["code"] == "idempotency_conflict"


def read_sse(response: httpx.Response) -> list[tuple[str, dict]]:
    """Parse `text/event-stream` framing: `event:`/`data:` lines, events separated by a blank line."""
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line == "":
            if data:
                events.append((name or "message", json.loads("\n".join(data))))
            name, data = None, []
        elif line.startswith(":"):
            continue  # keep-alive comment
        elif line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())
    return events


def test_events_stream_progress_then_result(alice):
    job = submit(alice, theorem_id=SAMPLE_CONNECTED, strategy="sampling",
                 budget={"tactic_timeout_s": 0.01, "time_limit_s": 1.0, "max_passes": 4096})
    with alice.stream("GET", job["events_url"], timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
    names = [name for name, _ in events]
    assert names[0] == "status" and names[-1] == "result", names
    assert names.count("result") == 1
    progress = [data for name, data in events if name == "progress"]
    assert progress, names
    assert {"passes", "max_depth", "elapsed_s"} <= set(progress[-1])
    assert progress[-1]["passes"] >= progress[0]["passes"] >= 0
    final = events[-1][1]
    assert final["id"] == job["id"] and final["status"] == "failed"
    assert final["search_status"] == "timeout"
    # A finished job's stream is its result at once.
    with alice.stream("GET", job["events_url"], timeout=10) as response:
        again = read_sse(response)
    assert [n for n, _ in again] == ["status", "result"]


def test_cancel_running_job_stops_within_a_tactic_timeout(alice):
    job = submit(alice, theorem_id=SAMPLE_CONNECTED, **ENDLESS)
    wait_for_status(alice, job["id"], {"running"})
    time.sleep(0.3)  # let the search run some passes
    started = time.monotonic()
    response = alice.delete(f"/v1/proofs/{job['id']}")
    assert response.status_code == 202, response.text
    assert response.json()["cancel_requested"] is True
    done = wait_for_status(alice, job["id"], {"cancelled", "failed", "proved", "error"}, timeout_s=10)
    elapsed = time.monotonic() - started
    assert done["status"] == "cancelled", done
    assert done["result"]["status"] == "cancelled" and done["result"]["passes"] > 0
    # One tactic timeout is 0.01 s; allow for polling and process hops on a loaded machine
    # (the supervisor would kill the worker after tactic timeout + grace_s = 2.01 s).
    assert elapsed < 3.0, elapsed
    assert alice.delete(f"/v1/proofs/{job['id']}").status_code == 200  # cancelling again: nothing to do


def test_cancel_queued_job_and_finished_job(server, alice):
    # Two endless searches occupy both workers; a third job waits in the queue.
    busy = [submit(alice, theorem_id=SAMPLE_CONNECTED, **ENDLESS) for _ in range(2)]
    for job in busy:
        wait_for_status(alice, job["id"], {"running"})
    queued = submit(alice, theorem_id=SAMPLE_CONNECTED)
    assert alice.get(f"/v1/proofs/{queued['id']}").json()["status"] == "queued"
    response = alice.delete(f"/v1/proofs/{queued['id']}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    for job in busy:
        assert alice.delete(f"/v1/proofs/{job['id']}").status_code == 202
    for job in busy:
        assert wait_for_status(alice, job["id"], {"cancelled", "failed", "error"})["status"] == "cancelled"
    proved = submit(alice, theorem_id=SAMPLE_CONNECTED)
    wait_for_status(alice, proved["id"], {"proved"})
    finished = alice.delete(f"/v1/proofs/{proved['id']}")
    assert finished.status_code == 409 and error_of(finished)["code"] == "already_finished"


# ------------------------------------------------------------------- auth


def test_missing_or_wrong_keys_are_401(server):
    with server.client(None) as anonymous:
        response = anonymous.get("/v1/proofs/abc")
        assert response.status_code == 401 and error_of(response)["code"] == "missing_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    bad_secret = server.keys["alice"].rsplit(".", 1)[0] + ".wrong"
    for key, code in (("dco-nobody.secret", "invalid_api_key"), (bad_secret, "invalid_api_key"), ("not-a-key", "malformed_api_key")):
        with server.client(key) as client:
            response = client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED})
            assert response.status_code == 401, (key, response.text)
            assert error_of(response)["code"] == code


def test_disabled_key_and_missing_scope_are_403(server):
    with server.client(server.keys["off"]) as client:
        response = client.get("/v1/proofs/abc")
        assert response.status_code == 403 and error_of(response)["code"] == "api_key_disabled"
    with server.client(server.keys["checker"]) as client:
        response = client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED})
        assert response.status_code == 403 and error_of(response)["code"] == "scope_denied"
        check = client.post("/v1/check", json={"theorem_id": SAMPLE_CONNECTED, "tactics": ["dsimp [invFunIdAssoc]", "aesop_cat"]})
        assert check.status_code == 200 and check.json()["valid"] is True


def test_rate_limit_is_429_with_retry_after(server):
    with server.client(server.keys["slow"]) as client:
        codes = [client.get("/v1/proofs/none").status_code for _ in range(3)]
        assert codes[:2] == [404, 404] and codes[2] == 429, codes
        response = client.get("/v1/proofs/none")
        assert response.status_code == 429
        assert error_of(response)["code"] == "rate_limited"
        assert int(response.headers["retry-after"]) >= 1


def test_concurrent_job_quota_is_429_with_retry_after(server):
    with server.client(server.keys["quota"]) as client:
        first = submit(client, theorem_id=SAMPLE_CONNECTED, **ENDLESS)
        response = client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED})
        assert response.status_code == 429
        assert error_of(response)["code"] == "concurrent_jobs" and "limit is 1" in error_of(response)["message"]
        assert int(response.headers["retry-after"]) >= 1
        assert client.delete(f"/v1/proofs/{first['id']}").status_code in (200, 202)
        wait_for_status(client, first["id"], {"cancelled"})
        submit(client, theorem_id=SAMPLE_CONNECTED)  # the slot is free again


def test_jobs_are_private_to_their_key(server, alice):
    job = submit(alice, theorem_id=SAMPLE_CONNECTED)
    with server.client(server.keys["bob"]) as bob:
        assert bob.get(f"/v1/proofs/{job['id']}").status_code == 404
        assert bob.delete(f"/v1/proofs/{job['id']}").status_code == 404
        assert bob.get(f"/v1/proofs/{job['id']}/events").status_code == 404


# ------------------------------------------------------------- validation


def hostile_corpus() -> list[tuple[str, str]]:
    """`(kind, text)`: our statements plus the Lean backend's corpus (statements, headers, tactics)."""
    # split on "\n" only: the texts hold Unicode line separators that str.splitlines would cut at
    ours = (REPO / "tests/data/service/hostile_statements.jsonl").read_text(encoding="utf-8").split("\n")
    corpus = [("statement", json.loads(line)["statement"]) for line in ours if line.strip()]
    theirs = REPO / "tests/data/hostile_statements/hostile.jsonl"
    if theirs.is_file():
        rows = [json.loads(line) for line in theirs.read_text(encoding="utf-8").split("\n") if line.strip()]
        corpus += [(row["kind"], row["text"]) for row in rows]
    return corpus


def test_hostile_inputs_are_422_naming_the_problem(alice):
    corpus = hostile_corpus()
    assert len(corpus) >= 12
    kinds = set()
    for kind, text in corpus:
        kinds.add(kind)
        if kind == "statement":
            requests = [("/v1/proofs", {"statement": text}), ("/v1/check", {"statement": text, "tactics": ["rfl"]})]
            codes = {"untrusted_statement", "statement_too_long"}
        elif kind == "header":
            requests = [("/v1/proofs", {"statement": "theorem t : True", "header": text})]
            codes = {"untrusted_header", "header_too_long"}
        else:
            requests = [("/v1/check", {"theorem_id": SAMPLE_CONNECTED, "tactics": ["dsimp [invFunIdAssoc]", text]})]
            codes = {"untrusted_tactic", "tactic_too_long"}
        for path, body in requests:
            response = alice.post(path, json=body)
            assert response.status_code == 422, (kind, text, response.text)
            error = error_of(response)
            assert error["code"] in codes, (kind, text, error)
            assert "rejected" in error["message"] or "characters" in error["message"], error
    # The batch route screens each item as POST /v1/proofs does: every hostile statement is an item error.
    statements = [text for kind, text in corpus if kind == "statement"]
    for start in range(0, len(statements), 50):
        chunk = statements[start : start + 50]
        response = alice.post("/v1/proofs:batch", json={"items": [{"statement": text} for text in chunk]})
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        assert len(items) == len(chunk)
        for text, item in zip(chunk, items):
            assert "id" not in item or item["id"] is None, (text, item)
            assert item["error"]["code"] in {"untrusted_statement", "statement_too_long"}, (text, item)


def test_benign_statement_passes_the_checks_but_replay_cannot_elaborate_it(alice):
    response = alice.post("/v1/proofs", json={"statement": "theorem t (n : Nat) : n + 0 = n"})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "statement_unsupported" and "theorem_id" in error["message"]


@pytest.mark.parametrize(
    "body, code, fragment",
    [
        ({}, "theorem_required", "exactly one"),
        ({"statement": "theorem t : True", "theorem_id": SAMPLE_CONNECTED}, "theorem_required", "exactly one"),
        ({"theorem_id": "Nat.no_such_theorem"}, "unknown_theorem", "unknown theorem"),
        ({"theorem_id": "invFunIdAssoc_hom_app"}, "unknown_theorem", SAMPLE_CONNECTED),
        # A term-mode proof whose traced tactics prove a side goal: refused with the replay's reason, never searched.
        ({"theorem_id": "MeasureTheory.OuterMeasure.comap_ofFunction"}, "unknown_theorem", "not replayable [root_not_statement]"),
        ({"theorem_id": SAMPLE_CONNECTED, "budget": {"time_limit_s": 500}}, "budget_over_cap", "time_limit_s"),
        ({"theorem_id": SAMPLE_CONNECTED, "budget": {"max_depth": 0}}, "invalid_request", "max_depth"),
        ({"theorem_id": SAMPLE_CONNECTED, "members": ["nobody"]}, "unknown_member", "nobody"),
        ({"theorem_id": SAMPLE_CONNECTED, "strategy": "dfs"}, "invalid_request", "strategy"),
        ({"theorem_id": SAMPLE_CONNECTED, "surprise": 1}, "invalid_request", "surprise"),
        ({"statement": "theorem t : " + "a" * 3000}, "statement_too_long", "2000"),
    ],
)
def test_invalid_requests_are_422_naming_the_problem(alice, body, code, fragment):
    response = alice.post("/v1/proofs", json=body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == code and fragment in error["message"], error


def test_oversized_body_is_413(alice):
    response = alice.post("/v1/proofs", content=json.dumps({"statement": "x" * 20000}), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"statement": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}'

    response = alice.post("/v1/proofs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert error_of(response)["code"] == "http_413" and "16384" in error_of(response)["message"]


# --------------------------------------------------------- health, metrics


def test_health_ready_and_metrics(server, alice):
    assert httpx.get(f"{server.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.base_url}/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["backend"] == "replay" and body["generators"] == ["oracle"]
    assert {c["name"] for c in body["checks"]} >= {"theorem source", "workers", "job store"}
    job = submit(alice, theorem_id=SAMPLE_CONNECTED)
    wait_for_status(alice, job["id"], {"proved"})
    assert httpx.get(f"{server.base_url}/v1/proofs/{job['id']}").status_code == 401
    text = httpx.get(f"{server.base_url}/metrics").text
    assert "dco_queue_depth " in text
    assert 'dco_jobs{status="proved"}' in text
    assert 'dco_search_seconds_bucket{le="0.5",status="proved"}' in text
    assert "dco_lean_seconds_count" in text
    assert 'dco_requests_rejected_total{reason="' in text
    assert 'dco_http_request_seconds_count{code="202",method="POST",route="/v1/proofs"}' in text


# ------------------------------------------------------------ schemathesis

FUZZ_EXAMPLES = 12  # per operation and generation mode (valid, then invalid requests)


def test_openapi_fuzzing_finds_no_server_errors(server):
    """schemathesis against /openapi.json: generated requests, valid and invalid, against every
    operation. Never a 5xx, and every answer is documented (status, content type, body schema)."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev extra: pip install -e '.[dev]'")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    headers = {"Authorization": f"Bearer {server.keys['fuzz']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/proofs", "GET /v1/proofs/{job_id}", "DELETE /v1/proofs/{job_id}", "POST /v1/check"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                case.call_and_validate(base_url=server.base_url, headers=headers, timeout=10, checks=checks)

            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label  # no input to make invalid (e.g. /healthz)
