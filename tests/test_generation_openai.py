"""The completions client (`prover.generators.openai_client`) against a real completions
server over the tiny transformers model (`tests/openai_double.py`): requests, summed token
log-probs, the deadline, retries of transient failures and the errors that are not retried.
The same client against real vLLM is in `tests/test_vllm_cpu.py` (vllm venv)."""

from __future__ import annotations

import math
import threading
import time

import httpx
import pytest
import torch

from prover.generators.openai_client import (
    OpenAICompletionsGenerator,
    candidates_from_completions,
    normalise_base_url,
)
from search.types import Candidate, GeneratorError, TacticGenerator
from openai_double import CompletionsDouble, ResetServer, free_port
from training.modeling import TINY_MODEL, build_tiny_qwen2, load_tokenizer
from training.prompt import format_prompt

STATES = ["x : Nat\n⊢ x + 0 = x", "a b : Nat\nh : a = b\n⊢ b = a", "⊢ True"]


@pytest.fixture(scope="module")
def server():
    """The tiny Qwen2 with an output bias that makes EOS likely, so completions are short."""
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(TINY_MODEL)
    model = build_tiny_qwen2(tokenizer)
    with torch.no_grad():
        model.lm_head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        model.lm_head.bias.zero_()
        model.lm_head.bias[tokenizer.eos_token_id] = 6.0
    with CompletionsDouble(model, tokenizer, served_name="neff-4") as double:
        yield double


@pytest.fixture(autouse=True)
def _healthy(server):
    server.fail_next.clear()
    server.stall_s = 0.0
    yield
    server.fail_next.clear()
    server.stall_s = 0.0


def _gen(url: str, **options) -> OpenAICompletionsGenerator:
    options.setdefault("model", "neff-4")
    options.setdefault("max_new_tokens", 6)
    options.setdefault("backoff_s", 0.05)
    options.setdefault("tokenizer", TINY_MODEL)  # the served checkpoint's tokenizer builds the prompt tokens
    return OpenAICompletionsGenerator(url, **options)


def test_samples_are_scored_by_their_summed_token_logprobs(server) -> None:
    gen = _gen(server.url + "/v1/", temperature=0.8, stop=["\n\n"])
    assert isinstance(gen, TacticGenerator) and gen.name == "neff-4"
    rows = gen.propose(STATES, 3, timeout_s=60)
    body = server.requests[-1]
    # the one prompt format, as token ids, one request
    assert body["prompt"] == [server.tokenizer(format_prompt(s), add_special_tokens=False)["input_ids"] for s in STATES]
    assert (body["n"], body["max_tokens"], body["logprobs"], body["stop"]) == (3, 6, 1, ["\n\n"])
    assert math.isclose(body["temperature"], 0.8) and "truncate_prompt_tokens" not in body
    assert len(rows) == 3 and sum(len(r) for r in rows) + gen.stats.empty == 9
    assert all(c.logprob <= 0 and c.tactic == c.tactic.strip() and c.tactic for row in rows for c in row)
    # the same request answered directly: each candidate's score is the sum of its tokens'
    raw = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    sums = {c["text"].strip(): sum(c["logprobs"]["token_logprobs"]) for c in raw["choices"]}
    parsed, _, _ = candidates_from_completions(raw, 3, 3)
    for row in parsed:
        for cand in row:
            assert math.isclose(cand.logprob, sums[cand.tactic], rel_tol=1e-9)


def test_logprobs_agree_with_the_models_own_scores(server) -> None:
    """The double's per-token log-probs are the model's (EOS included): the generator's
    re-scoring of the returned tokens gives the same sum."""
    body = _gen(server.url).request_body(STATES[:1], 4, "neff-4") | {"return_tokens_as_token_ids": True}
    raw = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    prompt = server.tokenizer(format_prompt(STATES[0]), add_special_tokens=False)["input_ids"]
    for choice in raw["choices"]:
        tokens = [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logp = torch.log_softmax(server.model(input_ids=ids).logits[0].double(), dim=-1)
        reference = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))
        assert abs(sum(choice["logprobs"]["token_logprobs"]) - reference) < 1e-4
        assert (tokens[-1] == server.tokenizer.eos_token_id) == (choice["finish_reason"] == "stop")


def test_model_name_comes_from_v1_models_when_not_given(server) -> None:
    gen = OpenAICompletionsGenerator(server.url, max_new_tokens=4, tokenizer=server.tokenizer)
    assert gen.propose(["⊢ True"], 1, timeout_s=30) and gen.model == "neff-4"


def test_transient_503_is_retried_within_the_budget(server) -> None:
    server.fail_next[:] = [503, 503]
    gen = _gen(server.url)
    rows = gen.propose(STATES[:1], 2, timeout_s=30)
    assert len(rows) == 1 and gen.stats.retries == 2 and gen.stats.errors == 0


def test_persistent_503_becomes_a_transient_generator_error_with_its_cause(server) -> None:
    server.fail_next[:] = [503] * 50
    gen = _gen(server.url, max_retries=3)
    with pytest.raises(GeneratorError, match="failed 4 time.*HTTP 503.*injected") as info:
        gen.propose(STATES[:1], 2, timeout_s=30)
    assert info.value.transient and gen.stats.retries == 3


def test_a_stalled_endpoint_fails_within_the_search_deadline(server) -> None:
    server.stall_s = 30.0
    gen = _gen(server.url, max_retries=10)
    start = time.monotonic()
    with pytest.raises(GeneratorError) as info:
        gen.propose(STATES[:1], 2, timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 1.5, elapsed
    assert info.value.transient and "timed out" in str(info.value)


def test_connection_refused_and_reset_are_transient(server) -> None:
    refused = _gen(f"http://127.0.0.1:{free_port()}", max_retries=2)
    with pytest.raises(GeneratorError, match="failed 3 time.*ConnectError") as info:
        refused.propose(STATES[:1], 1, timeout_s=10)
    assert info.value.transient
    with ResetServer() as reset:
        gen = _gen(reset.url, max_retries=1)
        start = time.monotonic()
        with pytest.raises(GeneratorError, match="failed 2 time.*(RemoteProtocolError|ReadError)") as info:
            gen.propose(STATES[:1], 1, timeout_s=10)
        assert info.value.transient and reset.connections == 2 and time.monotonic() - start < 5


def test_retries_stop_at_the_deadline_not_after_it(server) -> None:
    gen = _gen(f"http://127.0.0.1:{free_port()}", max_retries=1000, backoff_s=0.2, max_backoff_s=0.2)
    start = time.monotonic()
    with pytest.raises(GeneratorError, match="time budget"):
        gen.propose(STATES[:1], 1, timeout_s=0.7)
    assert time.monotonic() - start < 0.8
    with pytest.raises(GeneratorError, match="time budget"):
        gen.propose(STATES[:1], 1, timeout_s=0.0)


def test_rejected_requests_are_not_retried(server) -> None:
    unknown = _gen(server.url, model="no-such-model")
    with pytest.raises(GeneratorError, match="HTTP 404.*no-such-model.*does not exist.*served model name") as info:
        unknown.propose(STATES[:1], 1, timeout_s=30)
    assert not info.value.transient and unknown.stats.retries == 0
    too_long = _gen(server.url, max_new_tokens=100_000)
    with pytest.raises(GeneratorError, match="HTTP 400.*max_tokens") as info:
        too_long.propose(STATES[:1], 1, timeout_s=30)
    assert not info.value.transient and too_long.stats.retries == 0


def test_concurrent_searches_share_one_connection_pool(server) -> None:
    gens = [_gen(server.url) for _ in range(4)]
    assert len({id(g._client) for g in gens}) == 1
    results: list = []
    errors: list = []

    def search(g: OpenAICompletionsGenerator) -> None:
        try:
            for _ in range(3):
                results.append(g.propose(STATES[:2], 2, timeout_s=60))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=search, args=(g,)) for g in gens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12 and all(len(r) == 2 for r in results)


def test_answer_conversion_checks_shape_and_logprobs() -> None:
    def choice(index: int, text: str, lps: list[float] | None, reason: str = "stop") -> dict:
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": None if lps is None else {"token_logprobs": lps}}

    answer = {"choices": [choice(0, " simp ", [-0.5, -0.25]), choice(1, "  ", [-0.1]), choice(2, "ring", [-1.0, 1e-9], "length"), choice(3, "omega", [-2.0])]}
    rows, empty, truncated = candidates_from_completions(answer, 2, 2)
    assert rows == [[Candidate("simp", -0.75)], [Candidate("ring", -1.0 + 1e-9), Candidate("omega", -2.0)]]
    assert (empty, truncated) == (1, 1)
    clamped, _, _ = candidates_from_completions({"choices": [choice(0, "rfl", [1e-7])]}, 1, 1)
    assert clamped == [[Candidate("rfl", 0.0)]]
    with pytest.raises(ValueError, match="3 choices for 2 prompt"):
        candidates_from_completions({"choices": answer["choices"][:3]}, 2, 2)
    with pytest.raises(ValueError, match="log-probs"):
        candidates_from_completions({"choices": [choice(0, "simp", None)]}, 1, 1)


def test_bad_settings_are_refused() -> None:
    assert normalise_base_url("http://h:8000/v1/") == "http://h:8000"
    for bad in ("h:8000", "ftp://h/v1", ""):
        with pytest.raises(ValueError, match="http"):
            normalise_base_url(bad)
    with pytest.raises(ValueError, match="temperature"):
        OpenAICompletionsGenerator("http://h:1", temperature=0, tokenizer=TINY_MODEL)
    with pytest.raises(ValueError, match="k must be"):
        OpenAICompletionsGenerator("http://h:1", tokenizer=TINY_MODEL).propose(["s"], 0)


# ------------------------------------------------------------------ prove and eval


def test_prove_through_a_model_server(server, tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from prover.cli import app

    result = CliRunner().invoke(app, ["prove", "--name", "Fin.zero_add", "--generator-url", server.url, "--tokenizer", TINY_MODEL, "--max-expansions", "2",
                                      "--tactics-per-expansion", "2", "--max-new-tokens", "4", "--json"])
    assert result.exit_code in (0, 1), result.output
    record = json.loads(result.stdout)
    generator = record["settings"]["generator"]
    assert generator["kind"] == "openai" and generator["generator_url"] == server.url
    from prover.runner import ProveSettings

    assert ProveSettings.from_json(record["settings"]).generator.generator_url == server.url  # the service stores settings as JSON
    from prover.generators import OpenAICompletionsGenerator as Lazy

    assert Lazy is OpenAICompletionsGenerator
    assert record["generator_calls"] >= 1 and record["status"] in ("proved", "failed", "budget_exhausted") and not record.get("errors")
    served = len(server.requests)
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"version": 1, "members": [
        {"name": "a", "base_url": server.url + "/v1", "model": "neff-4", "checkpoint": TINY_MODEL},
        {"name": "b", "base_url": server.url, "model": "neff-4", "checkpoint": TINY_MODEL}]}))
    result = CliRunner().invoke(app, ["prove", "--name", "Fin.zero_add", "--endpoints", str(endpoints), "--max-expansions", "1",
                                      "--tactics-per-expansion", "2", "--max-new-tokens", "4", "--json"])
    assert result.exit_code in (0, 1), result.output
    assert len(server.requests) >= served + 2  # both members asked the server
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "members": [{"name": "a", "base_url": "localhost:1", "model": "m"}]}))
    for args, message in (
        (["--endpoints", str(bad)], "members.0.base_url"),
        (["--endpoints", str(tmp_path / "none.json")], "endpoints manifest not found"),
        (["--generator", "openai"], "exactly one of --generator-url URL or --endpoints FILE"),
        (["--generator-url", server.url, "--beam"], "beam search is not offered"),
        (["--generator-url", server.url], "needs the served checkpoint's tokenizer"),
        (["--generator-url", server.url, "--tokenizer", str(tmp_path / "no-such-checkpoint")], "cannot load the tokenizer"),
        (["--generator", "fixed", "--generator-url", server.url], "need the openai generator"),
    ):
        result = CliRunner().invoke(app, ["prove", "--name", "Fin.zero_add", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_eval_members_from_an_endpoints_manifest(server, tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from prover.cli import app
    from prover.eval.rundir import RunDirectory

    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"version": 1, "members": [
        {"name": "neff-1", "base_url": server.url, "model": "neff-4", "checkpoint": TINY_MODEL},
        {"name": "neff-4", "base_url": server.url, "model": "neff-4", "checkpoint": TINY_MODEL, "n_eff": 4}]}))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "--endpoints", str(endpoints), "--run-dir", str(run_dir), "--limit", "6",
                                      "--max-expansions", "1", "--tactics-per-expansion", "2", "--max-new-tokens", "4",
                                      "--workers", "2", "--no-ray", "--no-progress"])
    assert result.exit_code == 0, result.output
    config = json.loads((run_dir / "config.json").read_text())
    assert [(m["name"], m["kind"], m["source"], m["model"]) for m in config["members"]] == [
        ("neff-1", "openai", server.url, "neff-4"), ("neff-4", "openai", server.url, "neff-4")]
    records = list(RunDirectory(run_dir).records())
    assert {r.member for r in records} >= {"neff-1", "neff-4"}
    searched = [r for r in records if r.status != "error"]  # the sample's first theorems have no traced tactics
    assert searched and all("env_start" in r.error for r in records if r.status == "error")
    assert len(server.requests) >= len([r for r in searched if r.member != "ensemble"])
    clash = CliRunner().invoke(app, ["eval", "--endpoints", str(endpoints), "--generator", "fixed", "--run-dir", str(tmp_path / "x")])
    assert clash.exit_code == 2 and "drop --models" in clash.output


def test_health_reports_reachability_and_the_served_model(server) -> None:
    assert _gen(server.url).health() == (True, "healthy")
    ok, detail = _gen(server.url, model="other").health()
    assert not ok and "does not serve 'other'" in detail and "neff-4" in detail
    ok, detail = _gen(f"http://127.0.0.1:{free_port()}").health(timeout_s=1)
    assert not ok and "unreachable" in detail and "ConnectError" in detail
