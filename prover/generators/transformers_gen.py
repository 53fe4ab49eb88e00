"""Tactic generation with a Hugging Face causal LM (CPU or one GPU), batched over states.

Prompts come from `training.prompt.build_prompt` (the one prompt format and truncation) and are
left-padded so many states share one `generate` call. Each returned candidate carries
its exact log-probability: the sum, over the decoded completion tokens including the
terminating EOS and excluding padding, of the natural-log token probabilities under the
model at temperature 1 — computed by a re-scoring forward pass over the generated
sequences, so it does not depend on the sampling temperature, top-k/top-p, or beam
bookkeeping. Candidates are whitespace-stripped; deduplication is the search's job.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from search.types import Candidate, GeneratorError, GeneratorTimeout
from training.losses import IGNORE_INDEX, sequence_logprobs
from training.prompt import FROM_CHECKPOINT, build_prompt, generation_prompt_budget


@dataclass(frozen=True)
class GeneratedTactic:
    """One decoded completion: `token_ids` are the generated tokens up to and including
    the first EOS (`finished`) or up to `max_new_tokens` (not finished); `logprob` is their
    summed natural-log probability under the model at temperature 1; `text` is the decoded
    tactic (EOS and special tokens dropped, whitespace stripped)."""

    text: str
    token_ids: tuple[int, ...]
    logprob: float
    finished: bool


@dataclass
class GenerationStats:
    """Counters since construction: `truncated` completions hit `max_new_tokens` before EOS
    (their log-prob then has no EOS term); `sequences` is every decoded completion."""

    calls: int = 0
    states: int = 0
    sequences: int = 0
    truncated: int = 0
    oom_splits: int = 0  # batches split in half after a GPU out-of-memory
    fitting_batch_states: int | None = None  # after an OOM: the batch size (states) kept since


class GeneratorOutOfMemory(GeneratorError):
    """Even one state's generation does not fit in GPU memory; the message says what to lower.
    Not transient: the same state and settings will not fit next time either."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class TransformersGenerator:
    """A `TacticGenerator` over a causal LM.

    `model` is a loaded model (with its `tokenizer`) or a checkpoint path / `tiny-qwen2`,
    loaded with `training.modeling` on `device` in `dtype` (name: the directory's name).

    - sampling (default): `k` independent samples per state at `temperature`
      (top-k/top-p off unless given), so duplicates can occur;
    - beam search (`beam_search=True`): the `k` best beams (`num_beams = k`), distinct.

    `max_batch_states` bounds how many states share one `generate` call (each expands to
    `k` sequences); after a GPU out-of-memory the batch is halved and the size that fits is
    remembered for later calls (`stats.fitting_batch_states`; it only shrinks).
    `max_prompt_tokens`: the prompt budget (`training.prompt.build_prompt`); by default the
    one the checkpoint was trained with (`training.prompt.generation_prompt_budget`: its
    `dco_training.json`, else 2048 tokens), so prompts are the tokens it was trained on.
    `max_rescore_tokens` bounds the logits materialised at once while re-scoring (rows ×
    completion length × vocabulary, in elements).
    Calls are serialised by a lock: one model, one forward at a time. Sampling draws from
    torch's global RNG (`torch.manual_seed` makes runs reproducible).

    Deadline (`timeout_s`, seconds): waiting for the lock stops at it, decoding is capped by
    `generate(max_time=...)`, and a call whose time ran out raises `GeneratorTimeout`
    rather than answer late.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        temperature: float = 1.0,
        max_new_tokens: int = 96,
        beam_search: bool = False,
        top_k: int | None = None,
        top_p: float | None = None,
        max_batch_states: int = 16,
        max_prompt_tokens: int | str | None = FROM_CHECKPOINT,
        max_rescore_tokens: int = 1 << 26,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        if max_batch_states < 1:
            raise ValueError(f"max_batch_states must be >= 1, got {max_batch_states!r}")
        checkpoint = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", None)
        max_prompt_tokens = generation_prompt_budget(max_prompt_tokens, checkpoint)
        if isinstance(model, (str, os.PathLike)):
            if tokenizer is not None:
                raise ValueError("give a tokenizer only with an already loaded model")
            from training.modeling import load_causal_lm, load_tokenizer

            name = name or Path(model).name
            tokenizer = load_tokenizer(str(model))
            model = load_causal_lm(str(model), dtype=dtype, device=device)
        elif tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer")
        elif dtype is not None:
            raise ValueError("dtype applies when loading from a path; convert a loaded model yourself")
        elif device is not None:
            model = model.to(device)
        self.name = name or "model"
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.max_new_tokens = int(max_new_tokens)
        self.beam_search = bool(beam_search)
        self.top_k = top_k
        self.top_p = top_p
        self.max_batch_states = int(max_batch_states)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_rescore_tokens = int(max_rescore_tokens)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: completions could never end")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id
        self.stats = GenerationStats()
        self._lock = threading.Lock()
        self._deadline: float | None = None  # monotonic seconds; set for the call holding the lock

    @classmethod
    def load(cls, model_path: str | Path, **options: Any) -> "TransformersGenerator":
        """Load a checkpoint written by the trainer (or `training.modeling.TINY_MODEL`);
        same as passing the path as `model`. Raises `training.modeling.ModelLoadError`."""
        return cls(str(model_path), **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- proposing

    def propose(self, states: Sequence[str], k: int, *, timeout_s: float | None = None) -> list[list[Candidate]]:
        return [[Candidate(g.text, g.logprob) for g in row] for row in self.generate(states, k, timeout_s=timeout_s)]

    def generate(self, states: Sequence[str], k: int, *, timeout_s: float | None = None) -> list[list[GeneratedTactic]]:
        """`k` completions per state (samples or beams), with their tokens and exact log-probs.
        Raises `GeneratorTimeout` when `timeout_s` seconds pass first, `GeneratorOutOfMemory`
        when one state does not fit."""
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if timeout_s is not None and timeout_s <= 0:
            raise GeneratorTimeout(f"{self.name}: no time left for a generate call")
        if not self._lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            raise GeneratorTimeout(f"{self.name}: the model stayed busy with other calls for {timeout_s:.2f} s")
        try:
            self._deadline = deadline
            out: list[list[GeneratedTactic]] = []
            with torch.inference_mode():
                self.stats.calls += 1
                self.stats.states += len(states)
                out = self._generate_fitting(list(states), k)
            return out
        finally:
            self._deadline = None
            self._lock.release()

    def _batch_limit(self) -> int:
        fit = self.stats.fitting_batch_states
        return self.max_batch_states if fit is None else min(self.max_batch_states, fit)

    def _generate_fitting(self, states: list[str], k: int) -> list[list[GeneratedTactic]]:
        """`_generate_batch` over batches that fit: on GPU out-of-memory a batch is halved,
        and the halved size is kept for the rest of this call and later calls.

        The retry happens outside the `except` block: inside it the exception's traceback
        holds the failed attempt's frames, and with them its tensors, so they could not be
        freed before the retry. A single state that still does not fit raises
        `GeneratorOutOfMemory` (the search ends with ERROR and this message)."""
        out: list[list[GeneratedTactic]] = []
        todo: deque[list[str]] = deque()
        limit = self._batch_limit()
        for start in range(0, len(states), limit):
            todo.append(states[start : start + limit])
        while todo:
            chunk = todo.popleft()
            if self._deadline is not None and time.monotonic() >= self._deadline:
                raise GeneratorTimeout(f"{self.name}: the search's deadline passed with {sum(map(len, todo)) + len(chunk)} states left to generate")
            failure: str | None = None
            try:
                rows = self._generate_batch(chunk, k)
            except torch.cuda.OutOfMemoryError as err:
                failure = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
            if failure is None:
                out.extend(rows)
                continue
            # Outside the except block: the failed attempt's frames and tensors are released.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(chunk) == 1:
                raise GeneratorOutOfMemory(
                    f"{self.name}: GPU out of memory generating {k} samples for one state of "
                    f"{len(self.prompt_ids(chunk[0]))} prompt tokens ({failure}); lower k, max_new_tokens or "
                    f"max_prompt_tokens, or use a bigger GPU"
                )
            self.stats.oom_splits += 1
            half = len(chunk) // 2
            self.stats.fitting_batch_states = min(half, self._batch_limit())
            todo.appendleft(chunk[half:])
            todo.appendleft(chunk[:half])
        return out

    def prompt_ids(self, state: str) -> list[int]:
        """The prompt tokens of `state` (no padding), as the model sees them: the one prompt
        rule of training (`training.prompt.build_prompt`, within `max_prompt_tokens`)."""
        return build_prompt(self.tokenizer, state, self.max_prompt_tokens).ids

    def _encode(self, states: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask, [n, P]."""
        rows = [self.prompt_ids(state) for state in states]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            if ids:
                input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                mask[i, width - len(ids) :] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _generate_batch(self, states: list[str], k: int) -> list[list[GeneratedTactic]]:
        input_ids, prompt_mask = self._encode(states)
        options: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=k,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
        )
        if self._deadline is not None:  # decoding stops at the deadline (the answer is then dropped)
            options["max_time"] = max(0.0, self._deadline - time.monotonic())
        if self.beam_search:
            options.update(do_sample=False, num_beams=k, early_stopping=True, length_penalty=0.0)
        else:
            options.update(
                do_sample=True,
                num_beams=1,
                temperature=self.temperature,
                top_k=self.top_k if self.top_k is not None else 0,
                top_p=self.top_p if self.top_p is not None else 1.0,
            )
        sequences = self.model.generate(input_ids=input_ids, attention_mask=prompt_mask, **options)
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise GeneratorTimeout(f"{self.name}: decoding reached the search's deadline; the cut-short samples are dropped")
        prompt_len = input_ids.shape[1]
        completion = sequences[:, prompt_len:]
        comp_mask = completion_mask(completion, self.eos_id)
        prompt_mask = prompt_mask.repeat_interleave(k, dim=0)
        logprobs = self._rescore(sequences, prompt_mask, comp_mask)

        self.stats.sequences += completion.shape[0]
        results: list[list[GeneratedTactic]] = [[] for _ in states]
        for row in range(completion.shape[0]):
            length = int(comp_mask[row].sum())
            tokens = completion[row, :length].tolist()
            finished = bool(tokens) and tokens[-1] == self.eos_id
            if not finished:
                self.stats.truncated += 1
            text = self.tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True).strip()
            results[row // k].append(GeneratedTactic(text, tuple(tokens), float(logprobs[row]), finished))
        return results

    def _rescore(self, sequences: torch.Tensor, prompt_mask: torch.Tensor, comp_mask: torch.Tensor) -> torch.Tensor:
        """Summed temperature-1 log-probs of the completion tokens selected by `comp_mask`, [rows]."""
        prompt_len = prompt_mask.shape[1]
        comp_len = comp_mask.shape[1]
        attention = torch.cat([prompt_mask, comp_mask.to(prompt_mask.dtype)], dim=1)
        # Positions count real tokens only, as `generate` does with left padding.
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        # Logits at positions prompt_len-1 .. end predict the completion tokens.
        labels = sequences[:, prompt_len - 1 :].clone()
        labels[:, 0] = IGNORE_INDEX
        labels[:, 1:][comp_mask == 0] = IGNORE_INDEX
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 1)
        rows_per_chunk = max(1, self.max_rescore_tokens // max(1, (comp_len + 1) * vocab))
        out = torch.empty(sequences.shape[0], dtype=torch.float32, device=sequences.device)
        for start in range(0, sequences.shape[0], rows_per_chunk):
            sl = slice(start, start + rows_per_chunk)
            logits = self.model(
                input_ids=sequences[sl],
                attention_mask=attention[sl],
                position_ids=positions[sl],
                logits_to_keep=comp_len + 1,
            ).logits
            out[sl] = sequence_logprobs(logits[:, -(comp_len + 1) :], labels[sl])
        return out


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for generated tokens up to and including the first EOS, 0 after it (padding)."""
    is_eos = (completion == eos_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long()
