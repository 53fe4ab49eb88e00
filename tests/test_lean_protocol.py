"""The REPL wire protocol against Lean's real recorded sessions (no process involved)."""

from __future__ import annotations

import io
import json

import pytest
from pydantic import BaseModel

import fake_repl
from prover.lean.protocol import (
    CommandResponse,
    ErrorResponse,
    ProtocolError,
    ResponseFramer,
    TacticResponse,
    command_request,
    decode_response,
    encode_request,
    parse_response,
    pickle_env_request,
    tactic_request,
    unpickle_proof_state_request,
)
from prover.lean.repl_env import classify_tactic_response, parse_axioms
from search.types import Failed, FailureKind, ProofState, Progress, Proved

SESSIONS = fake_repl.load_sessions()


def _no_extra(model: BaseModel) -> list[str]:
    """Field names the typed model did not capture (anywhere in the tree)."""
    extra = [f"{type(model).__name__}.{k}" for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, BaseModel):
                extra += _no_extra(item)
    return extra


def test_transcripts_are_complete():
    assert len(SESSIONS) == 71  # 55 core + 16 mathlib sessions with recorded outputs
    assert sum(len(r) for r, _ in SESSIONS.values()) == 217
    for name, (requests, responses) in SESSIONS.items():
        assert len(requests) == len(responses), name


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_every_recorded_response_parses_field_for_field(name):
    _, responses = SESSIONS[name]
    for text in responses:
        resp = decode_response(text.encode("utf-8"))
        recorded = json.loads(text)
        assert resp.model_dump(by_alias=True, exclude_unset=True) == recorded
        assert _no_extra(resp) == [], f"{name}: fields not modelled"
        if isinstance(resp, TacticResponse):
            assert resp.goals == recorded["goals"]
            assert resp.proof_status == recorded.get("proofStatus")
            assert [s.proof_state for s in resp.sorries] == [s["proofState"] for s in recorded.get("sorries", [])]
        elif isinstance(resp, CommandResponse):
            assert resp.env == recorded["env"]
            assert [m.severity for m in resp.messages] == [m["severity"] for m in recorded.get("messages", [])]
            assert [s.goal for s in resp.sorries] == [s["goal"] for s in recorded.get("sorries", [])]
        else:
            assert resp.message == recorded["message"]


def test_specific_recorded_fields():
    _, out = SESSIONS["core/proof_branching"]
    first = decode_response(out[0])
    assert isinstance(first, CommandResponse) and first.env == 0
    assert first.sorries[0].proof_state == 0
    assert first.sorries[0].goal == "p q r : Prop\nh1 : p ∧ q\nh2 : q → r\n⊢ p ∧ r"
    assert first.sorries[0].pos.line == 1 and first.sorries[0].pos.column == 75
    assert first.messages[0].severity == "warning" and first.messages[0].end_pos.column == 19
    step = decode_response(out[1])
    assert isinstance(step, TacticResponse) and step.proof_state == 1 and len(step.goals) == 2
    assert step.proof_status == "Incomplete: open goals remain"
    err = decode_response(SESSIONS["core/unknown_proof_state"][1][1])
    assert isinstance(err, ErrorResponse) and err.message == "Unknown proof state."
    traced = decode_response(SESSIONS["core/trace_simp"][1][6])
    assert isinstance(traced, TacticResponse) and len(traced.traces) == 2 and traced.proof_status == "Completed"
    tactics = decode_response(SESSIONS["core/all_tactics"][1][0])
    assert [t.tactic for t in tactics.tactics] == ["have t := 37", "exact t"]
    assert tactics.tactics[0].used_constants == ["instOfNatNat", "Nat", "OfNat.ofNat"]
    tree = decode_response(SESSIONS["core/infotree"][1][0])
    assert tree.infotree[0]["kind"] == "TacticInfo"


def test_framer_splits_the_real_stream_at_blank_lines_in_any_chunking():
    text = "\n\n".join(SESSIONS["core/name_generator"][1]) + "\n\n"
    data = text.encode("utf-8")
    for chunk in (1, 7, 64, len(data)):
        framer = ResponseFramer()
        frames = []
        for i in range(0, len(data), chunk):
            frames += framer.feed(data[i : i + chunk])
        assert [f.decode() for f in frames] == SESSIONS["core/name_generator"][1]
        assert framer.pending == 0


@pytest.mark.parametrize(
    "frame, match",
    [
        (b"PANIC at Lean.Elab not json", "not valid JSON"),
        (b'{"env": 0, "messages": [{"severity": "warn', "not valid JSON"),  # truncated
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "not an object"),
        (b'{"foo": 1}', "unrecognised"),
        (b'{"env": "zero"}', "malformed"),
        (b'{"proofState": 1, "goals": "not a list"}', "malformed"),
        (b'{"env": 0, "messages": [{"severity": "fatal", "pos": {"line": 1, "column": 0}, "data": ""}]}', "malformed"),
        (b"   ", "empty"),
    ],
)
def test_garbage_is_a_typed_protocol_error(frame, match):
    with pytest.raises(ProtocolError, match=match):
        decode_response(frame)


def test_unknown_extra_fields_are_kept_not_fatal():
    resp = parse_response({"env": 3, "newField": [1]})
    assert isinstance(resp, CommandResponse) and resp.model_extra == {"newField": [1]}


def test_requests_are_single_lines_the_repl_reads_back_identically():
    reqs = [
        command_request("theorem foo : 1 = 1 := by\n  rfl", 0, all_tactics=True),
        command_request("example : (𝕜 : Type) = 𝕜 := rfl"),
        tactic_request("have h : x = 1 := by\n    simp\n  exact h", 3),
        pickle_env_request("/tmp/a.olean", 1),
        unpickle_proof_state_request("/tmp/b.olean", env=2),
    ]
    stream = b"".join(encode_request(r) for r in reqs)
    assert all(encode_request(r).count(b"\n") == 2 for r in reqs)
    reader = io.BytesIO(stream)
    back = []
    while (q := fake_repl.read_query(reader)) is not None:
        back.append(json.loads(q))
    assert back == reqs


def _state(resp: TacticResponse) -> ProofState:
    return ProofState("\n\n".join(resp.goals), resp.proof_state)


@pytest.mark.parametrize(
    "session, index, expected",
    [
        ("core/proof_branching", 1, Progress),
        ("core/proof_branching", 4, Proved),
        ("core/tactic_mode_sorry", 1, FailureKind.GIVEN_UP),
        ("core/by_cases", 3, FailureKind.GIVEN_UP),
        ("core/invalid_tactic", 1, FailureKind.LEAN_ERROR),  # error message + error-recovery sorry
        ("mathlib/20240209", 1, FailureKind.LEAN_ERROR),
        ("core/unknown_tactic", 1, FailureKind.LEAN_ERROR),  # {"message": "Lean error: ..."}
        ("core/app_type_mismatch2", 4, FailureKind.LEAN_ERROR),  # kernel check failed
        ("core/app_type_mismatch", 4, FailureKind.LEAN_ERROR),  # metavariables left
        ("core/self_proof_rw", 2, FailureKind.LEAN_ERROR),
        ("core/unknown_proof_state", 1, FailureKind.CRASH),
        ("mathlib/exact", 2, Proved),  # info "Try this" message does not matter
        ("mathlib/exact", 4, FailureKind.LEAN_ERROR),
        ("core/sorry_hypotheses", 1, FailureKind.GIVEN_UP),
        ("mathlib/on_goal", 2, FailureKind.GIVEN_UP),
    ],
)
def test_recorded_tactic_answers_are_classified(session, index, expected):
    resp = decode_response(SESSIONS[session][1][index])
    result = classify_tactic_response(resp, _state)
    if isinstance(expected, FailureKind):
        assert isinstance(result, Failed) and result.kind == expected, result
    else:
        assert isinstance(result, expected), result
    if isinstance(result, Progress):
        assert result.state.pp == "\n\n".join(resp.goals)
    if session == "core/unknown_tactic":
        assert result.message == "<input>:1:1: unknown tactic"


def test_parse_axioms():
    assert parse_axioms(["'foo' does not depend on any axioms"]) == frozenset()
    assert parse_axioms(["'foo' depends on axioms: [propext,\n Classical.choice, Quot.sound]"]) == {
        "propext", "Classical.choice", "Quot.sound"}
    assert parse_axioms(["'foo' depends on axioms: [sorryAx]"]) == {"sorryAx"}
    assert parse_axioms(["something else"]) is None
