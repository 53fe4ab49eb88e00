"""The vLLM adapter's conversion logic (no GPU): stand-ins with vLLM's attribute names, and
vLLM's real output classes when the package imports here."""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from prover.generators.vllm_gen import (
    ConversionStats,
    VLLMGenerator,
    VLLMOutputError,
    candidates_from_beam_outputs,
    candidates_from_request_outputs,
    load_vllm_or_fallback,
)
from search.types import Candidate


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput's fields
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = "stop"


@dataclass
class RequestOutput:  # the fields of vllm.outputs.RequestOutput the adapter reads
    request_id: str
    outputs: list[CompletionOutput]
    prompt: str | None = None
    finished: bool = True


@dataclass
class BeamSearchSequence:  # vllm.beam_search.BeamSearchSequence: tokens include the prompt
    tokens: list[int]
    cum_logprob: float = 0.0
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]


def test_samples_become_candidates_with_cumulative_logprob():
    outputs = [
        RequestOutput("0", [CompletionOutput(0, " simp\n", [5, 2], -1.25, None), CompletionOutput(1, "ring", [7, 2], -0.5, None)]),
        RequestOutput("1", [CompletionOutput(0, "   ", [2], -0.1, None), CompletionOutput(1, "omega", [9], -3.0, None, "length")]),
    ]
    stats = ConversionStats()
    result = candidates_from_request_outputs(outputs, 2, stats)
    assert result == [[Candidate("simp", -1.25), Candidate("ring", -0.5)], [Candidate("omega", -3.0)]]
    assert stats.empty == 1 and stats.truncated == 1


def test_logprob_from_per_token_logprobs_when_cumulative_is_missing():
    lp = lambda x: SimpleNamespace(logprob=x)  # noqa: E731 - vllm.logprobs.Logprob has `.logprob`
    completion = CompletionOutput(0, "linarith", [4, 8, 2], None, [{4: lp(-0.5), 1: lp(-2.0)}, {8: lp(-0.25)}, {2: lp(-0.125)}])
    assert candidates_from_request_outputs([RequestOutput("0", [completion])], 1) == [[Candidate("linarith", -0.875)]]
    bare = CompletionOutput(0, "simp", [4], None, None)
    with pytest.raises(VLLMOutputError, match="logprobs"):
        candidates_from_request_outputs([RequestOutput("0", [bare])], 1)
    with pytest.raises(VLLMOutputError, match="1 requests for 2 prompts"):
        candidates_from_request_outputs([RequestOutput("0", [])], 2)


def test_beam_outputs_strip_the_prompt_and_eos():
    vocab = {1: "[GOAL]", 2: "x", 3: "simp", 4: " at", 5: " h", 0: "<eos>"}
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    outputs = [
        BeamSearchOutput([BeamSearchSequence([1, 2, 3, 0], -0.5), BeamSearchSequence([1, 2, 3, 4, 5, 0], -1.5)]),
        BeamSearchOutput([BeamSearchSequence([1, 3, 3], -2.0, finish_reason="length"), BeamSearchSequence([1, 0], -0.1)]),
    ]
    stats = ConversionStats()
    result = candidates_from_beam_outputs(outputs, [2, 1], decode, 0, stats)
    assert result == [[Candidate("simp", -0.5), Candidate("simp at h", -1.5)], [Candidate("simpsimp", -2.0)]]
    assert stats.truncated == 1 and stats.empty == 1


class FakeLLM:
    """Records the calls; answers like vLLM's offline engine (with our stand-in classes)."""

    def __init__(self) -> None:
        self.calls: list = []

    def get_tokenizer(self):
        return SimpleNamespace(
            encode=lambda text, add_special_tokens: [ord(c) % 50 + 1 for c in text],
            decode=lambda ids, skip_special_tokens: "".join(chr(96 + i % 26) for i in ids),
            eos_token_id=0,
        )

    def beam_search(self, prompts, params):
        self.calls.append(("beam_search", prompts, params))
        return [
            BeamSearchOutput([BeamSearchSequence(list(p["prompt_token_ids"]) + [j + 1, 0], -0.5 * (j + 1)) for j in range(params.beam_width)])
            for p in prompts
        ]

    def generate(self, prompts, params, use_tqdm):
        self.calls.append(("generate", prompts, params))
        return [RequestOutput(str(i), [CompletionOutput(j, f"t{i}{j}", [1], -1.0 * (j + 1), None) for j in range(params.n)]) for i, _ in enumerate(prompts)]


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (its SamplingParams) to build requests")
def test_generator_builds_vllm_requests():
    llm = FakeLLM()
    gen = VLLMGenerator("unused", name="neff4", llm=llm, max_new_tokens=48, temperature=0.7)
    out = gen.propose(["⊢ 1 + 1 = 2", "⊢ a = a"], 3)
    assert [len(c) for c in out] == [3, 3] and out[0][0] == Candidate("t00", -1.0)
    _, prompts, params = llm.calls[0]
    assert params.n == 3 and params.max_tokens == 48 and params.logprobs == 1 and math.isclose(params.temperature, 0.7)
    assert all("prompt_token_ids" in p for p in prompts)
    beams = VLLMGenerator("unused", name="b", llm=llm, beam_search=True, max_new_tokens=8).propose(["⊢ a = a"], 2)
    kind, _, params = llm.calls[-1]
    assert kind == "beam_search" and params.beam_width == 2 and params.max_tokens == 8
    assert beams == [[Candidate("a", -0.5), Candidate("b", -1.0)]]  # the prompt's tokens are not in the text


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM importable (the vllm venv of .ci/run)")
def test_conversion_against_vllm_real_classes():
    from vllm.outputs import CompletionOutput as RealCompletion
    from vllm.outputs import RequestOutput as RealRequest

    real = RealRequest(
        request_id="0",
        prompt="p",
        prompt_token_ids=[1],
        prompt_logprobs=None,
        outputs=[RealCompletion(index=0, text=" simp ", token_ids=[3], cumulative_logprob=-0.75, logprobs=None)],
        finished=True,
    )
    assert candidates_from_request_outputs([real], 1) == [[Candidate("simp", -0.75)]]
    try:
        from vllm.entrypoints.generate.beam_search.utils import BeamSearchOutput as RealBeamOutput
        from vllm.entrypoints.generate.beam_search.utils import BeamSearchSequence as RealBeam
    except ImportError:  # vLLM releases before the move
        from vllm.beam_search import BeamSearchOutput as RealBeamOutput
        from vllm.beam_search import BeamSearchSequence as RealBeam
    beam = RealBeam(orig_prompt={"type": "token", "prompt_token_ids": [7, 8]}, tokens=[7, 8, 3, 0], logprobs=[], cum_logprob=-0.25)
    decode = lambda ids: {3: "simp"}.get(ids[0], "?") if ids else ""  # noqa: E731
    assert candidates_from_beam_outputs([RealBeamOutput(sequences=[beam])], [2], decode, 0) == [[Candidate("simp", -0.25)]]


def test_falls_back_to_transformers_with_a_warning(caplog):
    if importlib.util.find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            pytest.skip("vLLM and CUDA are present: no fallback to test")
    options = SimpleNamespace(temperature=1.0, max_new_tokens=8, beam_search=False, device="cpu", dtype=None, gpu_memory_fraction=0.2, seed=0)
    with caplog.at_level(logging.WARNING):
        gen = load_vllm_or_fallback("tiny-qwen2", name="neff1", options=options)
    assert type(gen).__name__ == "TransformersGenerator" and gen.name == "neff1"
    assert "falls back to the transformers generator" in caplog.text
