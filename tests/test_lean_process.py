"""One REPL process driven through the fake REPL: real recordings and scripted misbehaviour."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

import fake_repl
from prover.lean.process import (
    HeaderError,
    ReplConfig,
    ReplCrashed,
    ReplOutputTooLarge,
    ReplProcess,
    ReplProtocolError,
    ReplStartError,
    ReplTimeout,
    kill_all_processes,
)
from prover.lean.protocol import CommandResponse, ErrorResponse, command_request, tactic_request

ROOT = Path(__file__).resolve().parents[1]


def config(*flags: object, **overrides) -> ReplConfig:
    # Unsandboxed: these tests check host pids and process groups (tests/test_lean_sandbox.py
    # covers the sandbox).
    base = dict(command=fake_repl.fake_command(*flags), cwd=ROOT, memory_limit_mb=1024, close_grace_s=0.2, sandbox="off")
    base.update(overrides)
    return ReplConfig(**base)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def gone(pid: int, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def assert_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + 3.0
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert group_members(pgid) == [], f"orphans left in process group {pgid}"


def test_every_recorded_session_round_trips_through_the_client():
    sessions = fake_repl.load_sessions()
    proc = ReplProcess(config("--sequential"))
    proc.start()
    try:
        n = 0
        for name, (requests, responses) in sessions.items():
            for req, recorded in zip(requests, responses):
                resp = proc.request(req, timeout_s=10)
                assert resp.model_dump(by_alias=True, exclude_unset=True) == json.loads(recorded), name
                n += 1
        assert n == 217 and proc.request_count == 217 and proc.generation == 1
    finally:
        proc.close()


def test_timeout_kills_the_whole_process_group_and_start_gives_a_new_generation(tmp_path):
    child_file = tmp_path / "child.pid"
    proc = ReplProcess(config("--session", "core/proof_step", "--slow", 30, "--slow-on", 2, "--child-pid-file", child_file))
    proc.start()
    leader = proc.pid
    assert isinstance(proc.run_command("def f : Nat := by sorry", timeout_s=10), CommandResponse)
    child = int(child_file.read_text())
    assert os.getpgid(child) == leader  # the fake's child lives in the REPL's group
    started = time.monotonic()
    with pytest.raises(ReplTimeout):
        proc.run_tactic("apply Int.natAbs", 0, timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert not proc.alive and gone(leader) and gone(child)
    assert_group_gone(leader)
    with pytest.raises(ReplCrashed, match="not running"):
        proc.run_tactic("apply Int.natAbs", 0)
    proc.start()
    second = proc.pid
    assert proc.generation == 2 and second != leader
    assert isinstance(proc.run_command("def f : Nat := by sorry"), CommandResponse)
    proc.close()
    assert_group_gone(second)


def test_crash_reports_exit_code_and_stderr():
    proc = ReplProcess(config("--crash-after", 1))
    proc.start()
    pid = proc.pid
    proc.run_command("def f : Nat := by sorry")
    with pytest.raises(ReplCrashed, match=r"exit code 1.*simulated crash"):
        proc.run_tactic("exact 1", 0)
    assert not proc.alive
    assert_group_gone(pid)


@pytest.mark.parametrize("flag, error", [("--garbage-on", ReplProtocolError), ("--truncate-on", ReplProtocolError),
                                         ("--truncate-exit-on", ReplCrashed)])
def test_garbage_or_truncated_output_fails_that_request_only(flag, error):
    proc = ReplProcess(config("--session", "core/proof_step", flag, 2))
    proc.start()
    pid = proc.pid
    first = proc.run_command("def f : Nat := by sorry")
    assert isinstance(first, CommandResponse) and first.sorries[0].proof_state == 0
    with pytest.raises(error):
        proc.run_tactic("apply Int.natAbs", 0)
    assert not proc.alive
    assert_group_gone(pid)
    proc.start()  # the next request is served by a fresh process
    again = proc.run_command("def f : Nat := by sorry")
    assert isinstance(again, CommandResponse) and again.env == 0
    proc.close()


def test_two_answers_to_one_request_are_never_mixed_up():
    proc = ReplProcess(config("--session", "core/proof_step", "--double-on", 1))
    proc.start()
    pid = proc.pid
    with pytest.raises(ReplProtocolError, match="more than one response|nobody asked for"):
        proc.run_command("def f : Nat := by sorry")
        proc.run_tactic("apply Int.natAbs", 0)  # if both answers arrived in separate reads
    assert not proc.alive
    assert_group_gone(pid)


def test_huge_output_is_cut_off():
    proc = ReplProcess(config("--huge-on", 1, "--huge-bytes", 3_000_000, max_response_bytes=1_000_000))
    proc.start()
    pid = proc.pid
    with pytest.raises(ReplOutputTooLarge):
        proc.request(command_request("def f := 1"))
    assert not proc.alive
    assert_group_gone(pid)


def test_a_flood_on_stderr_cannot_block_the_pipe():
    proc = ReplProcess(config("--session", "core/proof_branching", "--stderr-bytes", 1_000_000, stderr_tail_bytes=4096))
    proc.start()
    resp = proc.run_command("theorem complex_and (p q r : Prop) (h1 : p ∧ q) (h2 : q → r) : p ∧ r := by sorry", timeout_s=20)
    assert isinstance(resp, CommandResponse)
    step = proc.run_tactic("apply And.intro", 0, timeout_s=20)
    assert step.proof_state == 1
    assert len(proc.stderr_tail()) <= 4096
    proc.close()


def test_environment_is_scrubbed_and_memory_is_limited(monkeypatch):
    monkeypatch.setenv("DCO_SECRET_API_KEY", "hunter2")
    monkeypatch.setenv("LEAN_PATH_TEST", "kept")
    proc = ReplProcess(config(memory_limit_mb=768, extra_env={"LEAN_NUM_THREADS": "1"}))
    proc.start()
    p = psutil.Process(proc.pid)
    env = p.environ()
    assert "DCO_SECRET_API_KEY" not in env and env.get("LEAN_PATH_TEST") == "kept"
    assert env.get("LEAN_NUM_THREADS") == "1" and "PATH" in env
    assert p.rlimit(psutil.RLIMIT_AS) == (768 * 1024 * 1024, 768 * 1024 * 1024)
    assert p.rlimit(psutil.RLIMIT_CORE) == (0, 0)
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
    proc.close()


def _script(tmp_path: Path, script: dict) -> Path:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script), encoding="utf-8")
    return path


def test_header_imports_once_per_generation_and_bodies_are_cached(tmp_path):
    log = tmp_path / "requests.jsonl"
    proc = ReplProcess(config("--script", _script(tmp_path, {}), "--request-log", log), imports=("Mathlib", "Aesop"))
    base = proc.header_env("")
    opened = proc.header_env("open Real")
    assert proc.header_env("open Real") == opened and proc.header_env("") == base
    other = proc.header_env("open Nat\nset_option maxHeartbeats 400000")
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    assert sent == [
        {"cmd": "import Aesop\nimport Mathlib"},
        {"cmd": "open Real", "env": base},
        {"cmd": "open Nat\nset_option maxHeartbeats 400000", "env": base},
    ]
    assert len({base, opened, other}) == 3
    proc.start()  # restart: header environments belong to the old generation
    proc.header_env("open Real")
    assert len(log.read_text().splitlines()) == 5
    proc.close()


def test_header_that_fails_raises_header_error(tmp_path):
    script = {"commands": [{"cmd": "open Nonexistent", "response": {"messages": [
        {"severity": "error", "pos": {"line": 1, "column": 5}, "endPos": {"line": 1, "column": 16},
         "data": "unknown namespace 'Nonexistent'"}]}}]}
    proc = ReplProcess(config("--script", _script(tmp_path, script)), imports=("Mathlib",))
    with pytest.raises(HeaderError, match="unknown namespace"):
        proc.header_env("open Nonexistent")
    proc.close()


def test_pickled_header_is_unpickled_by_a_fresh_process(tmp_path):
    log = tmp_path / "requests.jsonl"
    cfg = config("--script", _script(tmp_path, {}), "--request-log", log, pickle_dir=tmp_path / "pickles")
    first = ReplProcess(cfg, imports=("Mathlib",))
    first.header_env("open Real")
    first.close()
    pickles = list((tmp_path / "pickles").glob("header-*.olean"))
    assert len(pickles) == 1
    second = ReplProcess(cfg, imports=("Mathlib",))
    env = second.header_env("open Real")
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    assert sent[:3] == [{"cmd": "import Mathlib"}, {"cmd": "open Real", "env": 0},
                        {"pickleTo": str(pickles[0]), "env": 1}]
    assert sent[3:] == [{"unpickleEnvFrom": str(pickles[0])}] and env == 0
    second.close()


def test_unknown_ids_come_back_as_repl_errors(tmp_path):
    proc = ReplProcess(config("--script", _script(tmp_path, {})))
    proc.start()
    assert isinstance(proc.request(tactic_request("rfl", 7)), ErrorResponse)
    assert proc.request(command_request("open Nat", 5)).message == "Unknown environment."
    proc.close()


def test_missing_binary_is_a_start_error(tmp_path):
    proc = ReplProcess(ReplConfig(command=(str(tmp_path / "no-such-lake"), "env", "repl"), cwd=tmp_path))
    with pytest.raises(ReplStartError, match="could not start"):
        proc.start()
    with pytest.raises(ReplStartError, match="does not exist"):
        ReplProcess(ReplConfig(command=("lake",), cwd=tmp_path / "missing")).start()


def test_kill_all_processes_leaves_nothing_behind(tmp_path):
    procs = [ReplProcess(config("--child-pid-file", tmp_path / f"c{i}")) for i in range(2)]
    for p in procs:
        p.start()
    pids = [p.pid for p in procs]
    children = []
    for i in range(2):
        deadline = time.monotonic() + 5
        while not (tmp_path / f"c{i}").exists() or not (tmp_path / f"c{i}").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        children.append(int((tmp_path / f"c{i}").read_text()))
    kill_all_processes()
    for pid in pids + children:
        assert gone(pid)
    for pid in pids:
        assert_group_gone(pid)


def test_recycling_after_max_requests(tmp_path):
    proc = ReplProcess(config("--script", _script(tmp_path, {}), max_requests=2))
    proc.start()
    proc.run_command("open Nat")
    assert not proc.recycle_if_needed()
    proc.run_command("open Nat")
    assert proc.recycle_if_needed() and proc.generation == 2 and proc.request_count == 0
    proc.close()
