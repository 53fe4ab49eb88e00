"""The service under ordinary traffic and operator mistakes, through a real uvicorn process.

Regression tests for issue 14's defects: the job store's connection leak across thread-pool
turnover, a key file that cannot be parsed (fail closed, never a plain-text 500), per-key
limits on event streams and checks, Retry-After on every 503, no absolute paths in public
messages, owner-only files, a backend installed after startup, /docs offline, and an OpenAPI
document that matches behaviour.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.auth import add_key
from service_harness import SAMPLE_CONNECTED, ServerProcess, wait_for_status, write_config

# Replay latency per tactic (seconds); a shorter tactic timeout makes a search that runs
# until its time limit or a cancel (see test_service_api).
LATENCY_S = 0.05
ENDLESS = {"strategy": "sampling", "budget": {"tactic_timeout_s": 0.01, "time_limit_s": 100, "max_passes": 4096}}
ANYIO_IDLE_S = 10.0  # AnyIO retires a thread-pool thread idle this long (anyio.to_thread's MAX_IDLE_TIME)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("service-traffic")
    data = root / "data"
    keys_file = data / "api_keys.json"
    big = {"rate_per_s": 100000, "burst": 100000, "max_concurrent_jobs": 100000}
    keys = {
        "alice": add_key(keys_file, "alice", **big),
        "bob": add_key(keys_file, "bob"),
        "carol": add_key(keys_file, "carol"),
        "streams": add_key(keys_file, "streams"),
        "checks": add_key(keys_file, "checks"),
    }
    stored = json.loads(keys_file.read_text())  # per-key limits as the file holds them
    for entry in stored["keys"]:
        entry.update({"streams": {"max_open_streams": 2}, "checks": {"max_concurrent_checks": 1}}.get(entry["id"], {}))
    _atomic_write(keys_file, json.dumps(stored))
    config = write_config(
        root / "service.yaml", data,
        backend={"kind": "replay", "latency_s": LATENCY_S, "generators": {"kind": "oracle"}},
        auth={"rate_per_s": 1000, "burst": 1000, "max_concurrent_jobs": 100},
        sqlite_synchronous="FULL",  # each submission waits for an fsync: bursts overlap on many pool threads
    )
    proc = ServerProcess(config, root / "server.log").start()
    try:
        proc.wait_ready(workers=2)
        proc.keys = keys
        proc.keys_file = keys_file
        proc.data = data
        yield proc
    finally:
        proc.stop()


def _burst(server: ServerProcess, key: str, n: int = 40, rounds: int = 4, ids: list[str] | None = None) -> list[int]:
    """`n` concurrent clients, `rounds` requests each: submissions and metrics scrapes, which
    run on the server's thread pool (sync routes), so a burst spreads over up to 40 threads."""
    start = threading.Barrier(n)

    def one(i: int) -> list[int]:
        headers = {"Authorization": f"Bearer {key}"}
        codes = []
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client:
            start.wait()
            for r in range(rounds):
                if (i + r) % 4 == 3:
                    codes.append(client.get("/metrics").status_code)
                else:
                    response = client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED})
                    codes.append(response.status_code)
                    if ids is not None and response.status_code == 202:
                        ids.append(response.json()["id"])
        return codes

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return [code for codes in pool.map(one, range(n)) for code in codes]


def test_bursts_after_idle_gaps_do_not_leak_file_descriptors(srv):
    """Each burst after an idle gap runs on new pool threads; before the fix each new thread
    opened a SQLite connection that was never closed (~70 fds per burst of 40)."""
    key = srv.keys["alice"]
    ids: list[str] = []
    codes = _burst(srv, key, ids=ids)
    assert set(codes) <= {200, 202}, codes
    time.sleep(1.0)
    after_first = srv.open_fds()
    time.sleep(ANYIO_IDLE_S + 1.5)  # the burst's threads retire
    codes = _burst(srv, key, ids=ids)
    assert set(codes) <= {200, 202}, codes
    time.sleep(1.0)
    after_second = srv.open_fds()
    assert after_second - after_first <= 6, (after_first, after_second)
    assert httpx.get(f"{srv.base_url}/readyz", timeout=10).status_code == 200
    with srv.client(key) as client:  # leave the workers free for the next tests
        for job_id in ids:
            client.delete(f"/v1/proofs/{job_id}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".test-tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_unparseable_key_file_fails_closed_and_never_500s(srv):
    path = srv.keys_file
    good = path.read_text()
    base = srv.base_url
    codes = {name: httpx.get(f"{base}/v1/proofs/none", headers={"Authorization": f"Bearer {k}"}).status_code
             for name, k in srv.keys.items() if name in ("alice", "bob", "carol")}
    assert codes == {"alice": 404, "bob": 404, "carol": 404}
    # Revoke bob and drop carol in one edit that leaves the file unparseable (a hand edit
    # gone wrong, or a half-written file): neither may keep working.
    data = json.loads(good)
    data["keys"] = [e for e in data["keys"] if e["id"] != "carol"]
    for entry in data["keys"]:
        if entry["id"] == "bob":
            entry["sha256"] = "00" * 32  # bob's credential is no longer in the file
    broken = json.dumps(data, indent=2)[:-40]  # truncated: not JSON
    path.write_text(broken)  # not atomic on purpose
    time.sleep(1.5)  # the server re-reads the file at most once a second
    seen = []
    for _ in range(6):
        for name in ("alice", "bob", "carol"):
            response = httpx.get(f"{base}/v1/proofs/none", headers={"Authorization": f"Bearer {srv.keys[name]}"})
            assert response.headers["content-type"].startswith("application/json"), response.text
            seen.append((name, response.status_code, response.json().get("error", {}).get("code")))
        time.sleep(0.25)
    by_name = {name: {(s, c) for n, s, c in seen if n == name} for name in ("alice", "bob", "carol")}
    assert by_name["alice"] == {(404, "job_not_found")}, by_name  # valid in the last good file, still in this one
    for name in ("bob", "carol"):
        assert by_name[name] == {(503, "key_file_unreadable")}, by_name  # fail closed, every time
    response = httpx.get(f"{base}/v1/proofs/none", headers={"Authorization": f"Bearer {srv.keys['bob']}"})
    assert int(response.headers["retry-after"]) >= 1
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 503 and "retry-after" in ready.headers
    check = {c["name"]: c for c in ready.json()["checks"]}["api keys"]
    assert not check["ok"] and "api_keys.json" in check["detail"] and "not valid JSON" in check["detail"]
    assert str(srv.data) not in ready.text
    assert "api_keys.json is not valid JSON" in srv.log()  # the operator's log says it too
    # A repaired file (written atomically) is read again at once.
    _atomic_write(path, good)
    time.sleep(1.5)
    assert httpx.get(f"{base}/readyz").status_code == 200
    response = httpx.get(f"{base}/v1/proofs/none", headers={"Authorization": f"Bearer {srv.keys['carol']}"})
    assert response.status_code == 404


def test_per_key_limit_on_open_event_streams(srv):
    key = srv.keys["streams"]
    with srv.client(key) as client:
        job = client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED, **ENDLESS}).json()
        streams = []
        try:
            for _ in range(2):
                stream = client.stream("GET", job["events_url"], timeout=30)
                response = stream.__enter__()
                assert response.status_code == 200
                streams.append(stream)
            with srv.client(key) as other:
                refused = other.get(job["events_url"], timeout=10)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "too_many_streams" and int(refused.headers["retry-after"]) >= 1
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
        # Closed streams give their slots back.
        deadline = time.monotonic() + 10
        while True:
            with srv.client(key) as other, other.stream("GET", job["events_url"], timeout=30) as response:
                if response.status_code == 200 or time.monotonic() > deadline:
                    break
            time.sleep(0.2)
        assert response.status_code == 200
        assert client.delete(f"/v1/proofs/{job['id']}").status_code in (200, 202)


def test_per_key_limit_on_checks_in_flight(srv):
    with srv.client(srv.keys["alice"]) as alice:
        busy = [alice.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED, **ENDLESS}).json() for _ in range(2)]
        for job in busy:
            wait_for_status(alice, job["id"], {"running"})
        body = {"theorem_id": SAMPLE_CONNECTED, "tactics": ["dsimp [invFunIdAssoc]", "aesop_cat"]}
        results: list[httpx.Response] = []

        def first_check() -> None:
            with srv.client(srv.keys["checks"]) as c:
                results.append(c.post("/v1/check", json=body, timeout=60))

        thread = threading.Thread(target=first_check)
        thread.start()
        try:
            time.sleep(1.0)  # the first check waits for a worker (both run endless searches)
            with srv.client(srv.keys["checks"]) as c:
                second = c.post("/v1/check", json=body)
            assert second.status_code == 429, second.text
            assert second.json()["error"]["code"] == "too_many_checks" and int(second.headers["retry-after"]) >= 1
        finally:
            for job in busy:
                alice.delete(f"/v1/proofs/{job['id']}")
            thread.join(60)
        assert results and results[0].status_code == 200 and results[0].json()["valid"] is True


def test_store_and_key_files_are_owner_only(srv):
    for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm", "api_keys.json"):
        path = srv.data / name
        assert path.exists(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (name, oct(path.stat().st_mode))


def test_docs_work_offline(srv):
    page = httpx.get(f"{srv.base_url}/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text) + re.findall(r"""url:\s*['"]([^'"]+)['"]""", page.text)
    assert urls and not [u for u in urls if u.startswith(("http:", "https:", "//"))], urls
    for url in urls:
        assert httpx.get(f"{srv.base_url}{url}").status_code == 200, url


def test_openapi_documents_what_happens(srv):
    spec = httpx.get(f"{srv.base_url}/openapi.json").json()
    documented = {(m.upper(), p): set(op["responses"]) for p, ops in spec["paths"].items() for m, op in ops.items()}
    with srv.client(srv.keys["alice"]) as alice:
        malformed = alice.post("/v1/proofs", content=b'{"theorem_id": ', headers={"content-type": "application/json"})
        not_utf8 = alice.post("/v1/proofs", content=b'{"theorem_id": "\xff"}', headers={"content-type": "application/json"})
    for response in (malformed, not_utf8):
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", response.text
    assert "malformed" in malformed.json()["error"]["message"]
    for key, codes in documented.items():
        assert "400" not in codes, key  # nothing answers 400
    # Codes a route cannot produce are not documented.
    assert "404" not in documented[("POST", "/v1/proofs")]
    assert "404" not in documented[("GET", "/v1/proofs")]
    for key in documented:
        if key[1].startswith("/v1/"):
            assert {"401", "429", "503"} <= documented[key], key  # every /v1 route authenticates and may be refused
    assert "429" in documented[("GET", "/v1/proofs/{job_id}/events")]
    assert "/v1/proofs:batch" in spec["paths"]


# ------------------------------------------------------- store gone under it


def test_readyz_fails_and_submissions_503_when_the_store_is_gone(tmp_path):
    data = tmp_path / "data"
    key = add_key(data / "api_keys.json", "alice")
    config = write_config(tmp_path / "service.yaml", data, workers={"count": 1, "grace_s": 2.0, "poll_interval_s": 0.2})
    server = ServerProcess(config, tmp_path / "server.log").start()
    try:
        server.wait_ready(workers=1)
        with server.client(key) as client:
            job = client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED}).json()
            wait_for_status(client, job["id"], {"proved"})
            for suffix in ("", "-wal", "-shm"):
                (data / f"jobs.sqlite3{suffix}").unlink()
            ready = httpx.get(f"{server.base_url}/readyz")
            assert ready.status_code == 503 and int(ready.headers["retry-after"]) >= 1
            check = {c["name"]: c for c in ready.json()["checks"]}["job store"]
            assert not check["ok"] and "jobs.sqlite3" in check["detail"] and str(tmp_path) not in ready.text
            refused = client.post("/v1/proofs", json={"theorem_id": SAMPLE_CONNECTED})
            assert refused.status_code == 503, refused.text  # a job accepted now would be lost on restart
            assert refused.json()["error"]["code"] == "store_unavailable" and "retry-after" in refused.headers
    finally:
        server.stop()


# ------------------------------------------- no backend, then setup-lean


def _fake_lean_install(elan: Path, project: Path) -> None:
    """The files `prover.lean.readiness` looks for (what `dco-prover setup-lean` leaves behind).
    The programs exit 1: a worker that tries them fails to start, and /readyz says so."""
    from prover.lean.paths import LEAN_TOOLCHAIN, MATHLIB_OLEAN_REL, REPL_BINARY_REL, toolchain_dir_name

    for tool in ("elan", "lake"):
        path = elan / "bin" / tool
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 1\n")
        path.chmod(0o755)
    (elan / "toolchains" / toolchain_dir_name(LEAN_TOOLCHAIN)).mkdir(parents=True)
    project.mkdir(parents=True, exist_ok=True)
    (project / "lakefile.toml").write_text('name = "fake"\n')
    (project / "lean-toolchain").write_text(LEAN_TOOLCHAIN + "\n")
    (project / MATHLIB_OLEAN_REL).parent.mkdir(parents=True)
    (project / MATHLIB_OLEAN_REL).write_bytes(b"")
    repl = project / REPL_BINARY_REL
    repl.parent.mkdir(parents=True)
    repl.write_text("#!/bin/sh\nexit 1\n")
    repl.chmod(0o755)


def test_without_backend_every_503_has_retry_after_and_setup_lean_is_found_without_restart(tmp_path):
    data = tmp_path / "data"
    key = add_key(data / "api_keys.json", "alice")
    elan, project = tmp_path / "elan", tmp_path / "lean_project"
    config = write_config(tmp_path / "service.yaml", data, backend={"kind": "auto"}, workers={"count": 1, "startup_timeout_s": 20})
    env = {"ELAN_HOME": str(elan), "DCO_LEAN_PROJECT": str(project), "PATH": "/usr/bin:/bin"}
    server = ServerProcess(config, tmp_path / "server.log", env=env).start()
    try:
        ready = httpx.get(f"{server.base_url}/readyz")
        assert ready.status_code == 503 and ready.json()["backend"] == "none"
        assert int(ready.headers["retry-after"]) >= 1
        with server.client(key) as client:
            responses = [
                client.post("/v1/proofs", json={"statement": "theorem t : True"}),
                client.post("/v1/check", json={"statement": "theorem t : True", "tactics": ["trivial"]}),
                client.post("/v1/proofs:batch", json={"items": [{"statement": "theorem t : True"}]}),
            ]
        for response in responses:
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) >= 1, response.headers
            assert response.json()["error"]["code"] == "backend_unavailable"
        # No absolute server path in any public answer (the readiness details name them today).
        for text in [ready.text] + [r.text for r in responses]:
            assert str(tmp_path) not in text and "/root/" not in text and not re.search(r"(?<![\w.])/(?:tmp|home|work|usr)/", text), text
        assert stat.S_IMODE((data / "jobs.sqlite3").stat().st_mode) == 0o600

        _fake_lean_install(elan, project)  # what setup-lean installs, while the server runs
        deadline = time.monotonic() + 30
        body = {}
        while time.monotonic() < deadline:
            body = httpx.get(f"{server.base_url}/readyz").json()
            if body["backend"] == "repl":
                break
            time.sleep(0.5)
        assert body["backend"] == "repl", body  # found without a restart
        checks = {c["name"]: c for c in body["checks"]}
        assert all(checks[n]["ok"] for n in ("elan", "lake", "lean toolchain", "lean project", "mathlib cache", "repl binary")), checks
        assert "workers" in checks  # the pool started (its fake REPL cannot load: reported, not hidden)
    finally:
        server.stop()
