"""The prompt format: the one place that turns a proof state into model input.

Training (labels on the completion only) and generation (transformers, vLLM) both build
prompt tokens with `build_prompt`, which formats the state with `format_prompt` and, when
the prompt exceeds a token budget, shortens the *state* by one rule (`build_prompt`), so
that a model sees at generation time exactly the tokens it was trained on. The completion
is the tactic text followed by the tokenizer's EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt tokens, padding): completion-only training."""

PROMPT_TEMPLATE = "[GOAL]\n{state}\n[PROOFSTEP]\n"

GOAL_SEPARATOR = "\n\n"
"""Between the goals of a pretty-printed Lean proof state (Lean and LeanDojo print them so)."""


class PromptTooLong(ValueError):
    """Not even the prompt's header, footer and one character of the first goal fit the budget."""


@dataclass(frozen=True)
class Prompt:
    """Prompt tokens for a state. `ids` are exactly the tokens of `format_prompt(state)`
    (no special tokens added); `state` is the (possibly shortened) state they encode;
    `goals_dropped` counts later goals left out; `cut_chars` counts characters cut from the
    start of the first goal (0 unless dropping goals was not enough)."""

    ids: list[int]
    state: str
    goals_dropped: int = 0
    cut_chars: int = 0

    @property
    def truncated(self) -> bool:
        return self.goals_dropped > 0 or self.cut_chars > 0


def format_prompt(state: str) -> str:
    """Model input for a pretty-printed proof state (goals separated by blank lines)."""
    return PROMPT_TEMPLATE.format(state=state.strip())


def format_completion(tactic: str) -> str:
    """Target text for a tactic (without EOS; the tokenizer adds it). Whitespace-trimmed."""
    return tactic.strip()


def _encode(tokenizer: Any, text: str) -> list[int]:
    # `encode` is what both Hugging Face tokenizers and vLLM's tokenizer wrappers offer.
    return list(tokenizer.encode(text, add_special_tokens=False))


def build_prompt(tokenizer: Any, state: str, max_tokens: int | None, *,
                 full_ids: list[int] | None = None) -> Prompt:
    """Prompt tokens of `state`, at most `max_tokens` of them (None: no limit).

    The one truncation rule, for training and for generation:
    1. the whole prompt if it fits;
    2. else drop goals from the end (the tactic acts on the first goal), keeping as many
       leading goals as fit;
    3. else (the first goal alone is too long) cut characters from the start of the first
       goal, keeping its end (the `⊢` target and the hypotheses nearest to it).
    The header `[GOAL]` and footer `[PROOFSTEP]` are always kept, and the result is always
    the tokenization of `format_prompt` of the kept text (re-tokenized, so merges at the
    cut are exactly what the model would see for that text). `full_ids`: the tokens of
    `format_prompt(state)` when already computed (saves one encode).
    Raises `PromptTooLong` when not even one character of the first goal fits.
    """
    text = state.strip()
    ids = full_ids if full_ids is not None else _encode(tokenizer, format_prompt(text))
    if max_tokens is None or len(ids) <= max_tokens:
        return Prompt(list(ids), text)

    def fits(candidate: str) -> list[int] | None:
        encoded = _encode(tokenizer, format_prompt(candidate))
        return encoded if len(encoded) <= max_tokens else None

    goals = text.split(GOAL_SEPARATOR)
    # Step 2: the most leading goals that fit (binary search; length grows with the count).
    low, high, best = 1, len(goals) - 1, None
    while low <= high:
        middle = (low + high) // 2
        encoded = fits(GOAL_SEPARATOR.join(goals[:middle]))
        if encoded is not None:
            best, low = (middle, encoded), middle + 1
        else:
            high = middle - 1
    if best is not None:
        kept = GOAL_SEPARATOR.join(goals[: best[0]]).strip()
        return Prompt(best[1], kept, goals_dropped=len(goals) - best[0])

    # Step 3: the shortest cut from the left of the first goal that fits. Token counts are
    # monotone in the cut up to merges at the cut, so search, then step on until it fits.
    first = goals[0].rstrip()
    if not first.strip() or fits(first.strip()[-1:]) is None:
        raise PromptTooLong(f"a prompt budget of {max_tokens} tokens does not hold the prompt's header, "
                            f"footer and one character of the state")
    low, high = 0, len(first) - 1  # invariant: cutting `high` characters fits
    while low < high:
        middle = (low + high) // 2
        if first[middle:].strip() and fits(first[middle:]) is not None:
            high = middle
        else:
            low = middle + 1
    cut = high
    while (encoded := fits(first[cut:])) is None or not first[cut:].strip():
        cut += 1
    return Prompt(encoded, first[cut:].strip(), goals_dropped=len(goals) - 1, cut_chars=cut)


# ------------------------------------------------------------------ the checkpoint's budget

TRAINING_RECORD = "dco_training.json"
"""The trainer's record inside a final checkpoint (`training.trainer._save_final`)."""

DEFAULT_PROMPT_BUDGET = 2048
"""Prompt budget (tokens) of generators whose checkpoint records none (not from this trainer)."""

FROM_CHECKPOINT = "checkpoint"
"""A generator's `max_prompt_tokens` default: the budget its checkpoint was trained with."""


def checkpoint_prompt_budget(checkpoint: Any) -> int | None:
    """The prompt budget (tokens) `checkpoint` was trained with: `prompt_budget` of its
    `dco_training.json`; None when it has no such record (a hub id, `tiny-qwen2`, a
    checkpoint from elsewhere or from a trainer that did not record it)."""
    import json
    from pathlib import Path

    if checkpoint is None or not str(checkpoint):
        return None
    record = Path(str(checkpoint)).expanduser() / TRAINING_RECORD
    if not record.is_file():
        return None
    try:
        budget = json.loads(record.read_text()).get("prompt_budget")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{record}: unreadable training record: {err}") from err
    if budget is None:
        return None
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"{record}: prompt_budget must be a positive integer, got {budget!r}")
    return budget


def generation_prompt_budget(max_prompt_tokens: int | str | None, checkpoint: Any = None) -> int | None:
    """The prompt budget a generator uses: `max_prompt_tokens` when given (an int, or None
    for no limit), else (`FROM_CHECKPOINT`) the budget `checkpoint` was trained with, else
    `DEFAULT_PROMPT_BUDGET`. Every generator calls this, so its prompts are `build_prompt`
    with its checkpoint's training budget: the tokens it was trained on."""
    if max_prompt_tokens != FROM_CHECKPOINT:
        if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
            raise ValueError(f"max_prompt_tokens must be a positive integer, None or {FROM_CHECKPOINT!r}, got {max_prompt_tokens!r}")
        return max_prompt_tokens
    recorded = checkpoint_prompt_budget(checkpoint)
    return DEFAULT_PROMPT_BUDGET if recorded is None else recorded
