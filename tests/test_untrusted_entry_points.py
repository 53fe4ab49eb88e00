"""The untrusted-text corpus (tests/data/hostile_statements: `hostile.jsonl` must be rejected,
`accepted.jsonl` accepted) through every entry point: `dco-prover prove --statement`, the eval
loaders feeding the REPL backend (statements, headers, tactics), and the service's
`POST /v1/proofs` / `POST /v1/check` (its rejections are covered by
`test_service_api.test_hostile_inputs_are_422_naming_the_problem`, which reads the same file).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import fake_repl
from prover.cli import app
from prover.lean.process import ReplConfig
from prover.lean.repl_env import ReplEnvironment
from prover.theorems import load_theorems
from search.types import EnvironmentStartError, Theorem
from service_harness import SAMPLE_CONNECTED, ServerProcess, write_config
from service.auth import add_key

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests/data/hostile_statements"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").split("\n") if line.strip()]


HOSTILE, ACCEPTED = rows("hostile.jsonl"), rows("accepted.jsonl")
CORPUS = [(r, False) for r in HOSTILE] + [(r, True) for r in ACCEPTED]


def test_cli_prove_statement_screens_statements_and_headers():
    runner = CliRunner()
    seen = 0
    for row, ok in CORPUS:
        if row["kind"] == "statement":
            args = ["prove", "--statement", row["text"], "--time-limit", "1"]
        elif row["kind"] == "header":
            args = ["prove", "--statement", "theorem t : True", "--header", row["text"], "--time-limit", "1"]
        else:
            continue
        seen += 1
        result = runner.invoke(app, args)
        rejected = "rejected by rule" in result.output
        assert rejected is (not ok), (row["id"], result.output)
        if not ok:
            assert result.exit_code == 2 and row["reason"] in result.output, (row["id"], result.output)
    assert seen >= 120


@pytest.fixture(scope="module")
def repl_env():
    script = Path(tempfile.mkdtemp()) / "script.json"
    script.write_text("{}", encoding="utf-8")
    log = script.with_name("requests.jsonl")
    cfg = ReplConfig(command=fake_repl.fake_command("--script", script, "--request-log", log), cwd=ROOT,
                     memory_limit_mb=1024, close_grace_s=0.1, sandbox_writable=(script.parent,))
    with ReplEnvironment(cfg, max_processes=1) as env:
        yield env, log


def requests_sent(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_eval_loader_then_repl_backend_screens_before_lean(repl_env, tmp_path):
    env, log = repl_env
    jsonl = tmp_path / "corpus.jsonl"
    cases = [(r, ok) for r, ok in CORPUS if r["kind"] in ("statement", "header")]
    with jsonl.open("w", encoding="utf-8") as f:
        for i, (row, _) in enumerate(cases):
            statement = row["text"] if row["kind"] == "statement" else "theorem t : True := by"
            header = row["text"] if row["kind"] == "header" else "import Mathlib"
            f.write(json.dumps({"name": f"case_{i}", "split": "test", "header": header, "formal_statement": statement}) + "\n")
    theorems = load_theorems(jsonl)
    assert len(theorems) == len(cases)
    for theorem, (row, ok) in zip(theorems, cases):
        before = requests_sent(log)
        with pytest.raises(EnvironmentStartError) as info:  # the fake has no scripted answer
            env.start(theorem)
        if ok:
            assert "rejected" not in str(info.value), (row["id"], str(info.value))
        else:
            assert "rejected by rule" in str(info.value) and row["reason"] in str(info.value), (row["id"], str(info.value))
            assert requests_sent(log) == before, row["id"]  # nothing reached Lean


def test_repl_backend_screens_tactics_in_apply_and_verify(repl_env):
    env, log = repl_env
    theorem = Theorem("t", "theorem t : True := by", header="import Mathlib")
    for row, ok in CORPUS:
        if row["kind"] != "tactic":
            continue
        before = requests_sent(log)
        verification = env.verify(theorem, ["skip", row["text"]])
        assert not verification.ok
        if ok:
            assert "rejected" not in verification.message, (row["id"], verification.message)
        else:
            assert "tactic 2" in verification.message and row["reason"] in verification.message, (row["id"], verification.message)
            assert requests_sent(log) == before


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("entry-points")
    data = root / "data"
    key = add_key(data / "api_keys.json", "alice")
    config = write_config(root / "service.yaml", data, auth={"rate_per_s": 100000, "burst": 100000, "max_concurrent_jobs": 1000},
                          workers={"count": 1, "grace_s": 2.0, "poll_interval_s": 0.2})
    proc = ServerProcess(config, root / "server.log").start()
    try:
        proc.wait_ready(workers=1)
        proc.key = key
        yield proc
    finally:
        proc.stop()


UNTRUSTED_CODES = {"untrusted_statement", "untrusted_header", "untrusted_tactic"}


def test_service_accepts_the_harmless_corpus_and_reports_the_sandbox(server):
    with server.client(server.key) as client:
        for row in ACCEPTED:
            if row["kind"] == "statement":
                requests = [("/v1/proofs", {"statement": row["text"]}), ("/v1/check", {"statement": row["text"], "tactics": ["rfl"]})]
            elif row["kind"] == "header":
                requests = [("/v1/proofs", {"statement": "theorem t : True", "header": row["text"]})]
            else:
                requests = [("/v1/check", {"theorem_id": SAMPLE_CONNECTED, "tactics": ["dsimp [invFunIdAssoc]", row["text"]]})]
            for path, body in requests:
                response = client.post(path, json=body)
                if response.status_code == 422:
                    assert response.json()["error"]["code"] not in UNTRUSTED_CODES, (row["id"], path, response.text)
        # and one rejection per kind, naming rule and position
        bad = client.post("/v1/proofs", json={"statement": "theorem t (h : (by native_decide : 1 < 2)) : True"})
        assert bad.status_code == 422 and "rule `forbidden-word` at 1:19" in bad.json()["error"]["message"]
    ready = httpx.get(f"{server.base_url}/readyz").json()
    sandbox = next(c for c in ready["checks"] if c["name"] == "lean sandbox")
    assert ("active" in sandbox["detail"]) or ("INACTIVE" in sandbox["detail"])
