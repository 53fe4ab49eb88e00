"""Tactic generation with vLLM's offline engine: one `LLM` per checkpoint.

Several `N_eff` checkpoints share one GPU through `gpu_memory_utilization` (each engine
takes that fraction of GPU memory); prefix caching is on, so the `k` samples of a state
and the states that share a long prefix reuse the prompt's KV cache.

- Sampling: `LLM.generate(prompts, SamplingParams(n=k, temperature, max_tokens, logprobs))`;
  a sample's log-probability is `CompletionOutput.cumulative_logprob`, the sum of the
  sampled tokens' log-probs (EOS included). vLLM fills it only when `logprobs` is set
  (older releases only when it is > 0), hence `logprobs=1` by default.
- Beam search: `LLM.beam_search(prompts, BeamSearchParams(beam_width=k, max_tokens))`
  (vLLM removed `use_beam_search` from `SamplingParams`); each `BeamSearchSequence` has
  `tokens` (prompt + completion) and `cum_logprob`. The completion text is decoded here
  from the tokens after the prompt, because vLLM's offline beam search decodes the
  prompt into `text` too.

The conversion from vLLM's outputs to `Candidate` lists is in the pure functions
`candidates_from_request_outputs` / `candidates_from_beam_outputs` (tested without a GPU);
`VLLMGenerator` is the thin part that needs CUDA. `load_vllm_or_fallback` returns the
transformers generator, with a warning, when vLLM cannot run here.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from search.types import Candidate, GeneratorTimeout
from training.prompt import FROM_CHECKPOINT, build_prompt, generation_prompt_budget

log = logging.getLogger(__name__)


class VLLMOutputError(ValueError):
    """vLLM's output lacks what a candidate needs (e.g. log-probs were not requested)."""


@dataclass
class ConversionStats:
    """`empty` completions (no text after stripping) are dropped and counted here;
    `truncated` ones stopped at `max_tokens` (finish_reason "length") and are kept."""

    empty: int = 0
    truncated: int = 0


def _sampled_logprob(completion: Any) -> float:
    """`cumulative_logprob`, or the sum of the sampled tokens' entries in `logprobs`."""
    value = getattr(completion, "cumulative_logprob", None)
    if value is not None:
        return float(value)
    per_position = getattr(completion, "logprobs", None)
    token_ids = list(getattr(completion, "token_ids", ()) or ())
    if per_position is not None and len(per_position) == len(token_ids):
        total = 0.0
        for position, token in zip(per_position, token_ids):
            entry = position.get(token) if hasattr(position, "get") else None
            if entry is None:
                break
            total += float(getattr(entry, "logprob", entry))
        else:
            return total
    raise VLLMOutputError(
        "vLLM returned a completion without log-probabilities: create SamplingParams with logprobs >= 1 "
        "(cumulative_logprob is only filled when log-probs are requested)"
    )


def candidates_from_request_outputs(
    outputs: Sequence[Any], n_states: int, stats: ConversionStats | None = None
) -> list[list[Candidate]]:
    """Per state (in prompt order), the samples of `LLM.generate`'s `RequestOutput`s.

    Each `RequestOutput.outputs[i]` (a `CompletionOutput`) becomes
    `Candidate(text.strip(), cumulative_logprob)`. Empty texts are dropped (counted in
    `stats.empty`). Raises `VLLMOutputError` if the number of outputs is not `n_states`.
    """
    if len(outputs) != n_states:
        raise VLLMOutputError(f"vLLM answered {len(outputs)} requests for {n_states} prompts")
    stats = stats if stats is not None else ConversionStats()
    result: list[list[Candidate]] = []
    for request in outputs:
        candidates = []
        for completion in request.outputs:
            if getattr(completion, "finish_reason", None) == "length":
                stats.truncated += 1
            text = (completion.text or "").strip()
            if not text:
                stats.empty += 1
                continue
            candidates.append(Candidate(text, min(0.0, _sampled_logprob(completion))))
        result.append(candidates)
    return result


def candidates_from_beam_outputs(
    outputs: Sequence[Any],
    prompt_lengths: Sequence[int],
    decode: Callable[[list[int]], str],
    eos_token_id: int | None,
    stats: ConversionStats | None = None,
) -> list[list[Candidate]]:
    """Per state, the beams of `LLM.beam_search`'s `BeamSearchOutput`s.

    A `BeamSearchSequence`'s `tokens` start with the prompt's `prompt_lengths[i]` tokens;
    the completion is the rest, minus a final EOS; its score is `cum_logprob`.
    """
    if len(outputs) != len(prompt_lengths):
        raise VLLMOutputError(f"vLLM beam search answered {len(outputs)} requests for {len(prompt_lengths)} prompts")
    stats = stats if stats is not None else ConversionStats()
    result: list[list[Candidate]] = []
    for output, prompt_len in zip(outputs, prompt_lengths):
        candidates = []
        for sequence in output.sequences:
            tokens = list(sequence.tokens)[prompt_len:]
            if tokens and eos_token_id is not None and tokens[-1] == eos_token_id:
                tokens = tokens[:-1]
            elif getattr(sequence, "finish_reason", None) == "length":
                stats.truncated += 1
            text = decode(tokens).strip()
            if not text:
                stats.empty += 1
                continue
            candidates.append(Candidate(text, min(0.0, float(sequence.cum_logprob))))
        result.append(candidates)
    return result


def vllm_available() -> bool:
    """vLLM is importable and a CUDA device is visible."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class VLLMGenerator:
    """A `TacticGenerator` over one vLLM offline engine (see the module docstring).

    `gpu_memory_fraction`: fraction of GPU memory this engine may take (several engines
    can share a GPU). `max_prompt_tokens`: longer prompts are shortened by the training
    rule (`training.prompt.build_prompt`, as the transformers generator does); by default
    the budget the checkpoint was trained with (`training.prompt.generation_prompt_budget`). `llm`: an
    existing engine (tests, sharing). `engine_options`: more `vllm.LLM` arguments (e.g.
    `enforce_eager=True` on CPU).
    Calls are serialised by a lock: `LLM` is not thread-safe.
    """

    def __init__(
        self,
        model_path: str,
        *,
        name: str = "model",
        temperature: float = 1.0,
        max_new_tokens: int = 96,
        beam_search: bool = False,
        gpu_memory_fraction: float = 0.2,
        seed: int = 0,
        dtype: str | None = None,
        max_prompt_tokens: int | str | None = FROM_CHECKPOINT,
        logprobs: int = 1,
        llm: Any = None,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not 0 < gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction!r}")
        if logprobs < 1:
            raise ValueError("logprobs must be >= 1: vLLM fills cumulative_logprob only when log-probs are requested")
        self.name = name
        self.temperature = float(temperature)
        self.max_new_tokens = int(max_new_tokens)
        self.beam_search = bool(beam_search)
        self.max_prompt_tokens = generation_prompt_budget(max_prompt_tokens, model_path)
        self.logprobs = int(logprobs)
        self.seed = seed
        self.stats = ConversionStats()
        self._lock = threading.Lock()
        if llm is None:
            from vllm import LLM

            llm = LLM(
                model=str(model_path),
                gpu_memory_utilization=gpu_memory_fraction,
                enable_prefix_caching=True,
                seed=seed,
                dtype=dtype or "auto",
                **(engine_options or {}),
            )
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()

    def _prompts(self, states: Sequence[str]) -> list[dict[str, list[int]]]:
        prompts = []
        for state in states:
            ids = build_prompt(self.tokenizer, state, self.max_prompt_tokens).ids
            prompts.append({"prompt_token_ids": ids})
        return prompts

    def propose(self, states: Sequence[str], k: int, *, timeout_s: float | None = None) -> list[list[Candidate]]:
        """`timeout_s` (seconds): waiting for the engine stops at it (`GeneratorTimeout`); the
        offline engine cannot be interrupted, so an answer finished past it is dropped
        (`GeneratorTimeout`) — the model-server path interrupts for real."""
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not states:
            return []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        prompts = self._prompts(states)
        if not self._lock.acquire(timeout=-1 if timeout_s is None else max(0.0, timeout_s)):
            raise GeneratorTimeout(f"{self.name}: the vLLM engine stayed busy with other calls for {timeout_s:.2f} s")
        try:
            answer = self._generate_locked(states, prompts, k)
        finally:
            self._lock.release()
        if deadline is not None and time.monotonic() > deadline:
            raise GeneratorTimeout(f"{self.name}: the vLLM engine answered after the search's deadline; answer dropped")
        return answer

    def _generate_locked(self, states: Sequence[str], prompts: list[dict[str, list[int]]], k: int) -> list[list[Candidate]]:
        """One engine call; the caller holds `self._lock` (`LLM` is not thread-safe)."""
        if self.beam_search:
            from vllm.sampling_params import BeamSearchParams

            params = BeamSearchParams(beam_width=k, max_tokens=self.max_new_tokens)
            outputs = self.llm.beam_search(prompts, params)
            return candidates_from_beam_outputs(
                outputs,
                [len(p["prompt_token_ids"]) for p in prompts],
                lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                self.tokenizer.eos_token_id,
                self.stats,
            )
        from vllm import SamplingParams

        params = SamplingParams(n=k, temperature=self.temperature, max_tokens=self.max_new_tokens, logprobs=self.logprobs)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return candidates_from_request_outputs(outputs, len(states), self.stats)


def load_vllm_or_fallback(source: str, *, name: str, options: Any) -> Any:
    """A `VLLMGenerator` when vLLM and CUDA are here; otherwise, with a warning, the
    transformers generator with the same sampling settings."""
    if vllm_available():
        return VLLMGenerator(
            source,
            name=name,
            temperature=options.temperature,
            max_new_tokens=options.max_new_tokens,
            beam_search=options.beam_search,
            gpu_memory_fraction=options.gpu_memory_fraction,
            seed=options.seed,
            dtype=options.dtype,
        )
    log.warning("vLLM is not installed or no CUDA device is visible: member %r falls back to the transformers generator", name)
    from prover.generators.transformers_gen import TransformersGenerator

    import torch

    return TransformersGenerator.load(
        source,
        name=name,
        device=options.device or ("cuda" if torch.cuda.is_available() else None),
        dtype=options.dtype,
        temperature=options.temperature,
        max_new_tokens=options.max_new_tokens,
        beam_search=options.beam_search,
    )
