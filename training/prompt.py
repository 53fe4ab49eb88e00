"""The prompt format: the one place that turns a proof state into model input.

Training (labels on the completion only) and generation (transformers, vLLM) both call
`format_prompt`; the completion is the tactic text followed by the tokenizer's EOS token.
"""

from __future__ import annotations

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt tokens, padding): completion-only training."""

PROMPT_TEMPLATE = "[GOAL]\n{state}\n[PROOFSTEP]\n"


def format_prompt(state: str) -> str:
    """Model input for a pretty-printed proof state (goals separated by blank lines)."""
    return PROMPT_TEMPLATE.format(state=state.strip())


def format_completion(tactic: str) -> str:
    """Target text for a tactic (without EOS; the tokenizer adds it). Whitespace-trimmed."""
    return tactic.strip()
