"""The one prompt rule (training.prompt.build_prompt), shared by training and generation."""

from __future__ import annotations

import datasets
import pytest

from training.data import tokenize_examples
from training.modeling import TINY_MODEL, load_tokenizer
from training.prompt import IGNORE_INDEX, GOAL_SEPARATOR, PromptTooLong, build_prompt, format_completion, format_prompt

GOALS = [
    "case h\nα : Type u_1\ninst✝ : DecidableEq α\ns t : Finset α\nh : s ⊆ t\n⊢ s.card ≤ t.card",
    "case h.a\nα : Type u_1\nx : α\nhx : x ∈ s\n⊢ x ∈ t",
    "case h.b\nn m : ℕ\nhn : 0 < n\n⊢ n * m ≥ m",
]
STATE = GOAL_SEPARATOR.join(GOALS)
TACTIC = "exact Finset.card_le_card h"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_MODEL)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_a_prompt_that_fits_is_the_whole_formatted_state(tokenizer):
    prompt = build_prompt(tokenizer, STATE, 10_000)
    assert prompt.ids == encode(tokenizer, format_prompt(STATE)) and not prompt.truncated
    assert build_prompt(tokenizer, STATE, None).ids == prompt.ids


def test_truncation_drops_later_goals_first_and_keeps_the_header(tokenizer):
    two_goals = len(encode(tokenizer, format_prompt(GOAL_SEPARATOR.join(GOALS[:2]))))
    prompt = build_prompt(tokenizer, STATE, two_goals)
    assert prompt.state == GOAL_SEPARATOR.join(GOALS[:2]) and prompt.goals_dropped == 1
    assert prompt.ids == encode(tokenizer, format_prompt(prompt.state))
    one_goal = len(encode(tokenizer, format_prompt(GOALS[0])))
    prompt = build_prompt(tokenizer, STATE, two_goals - 1)
    assert prompt.state == GOALS[0] and prompt.goals_dropped == 2 and len(prompt.ids) == one_goal
    text = tokenizer.decode(prompt.ids)
    assert text.startswith("[GOAL]\n") and text.endswith("\n[PROOFSTEP]\n")


def test_a_first_goal_too_long_alone_loses_its_start_and_keeps_its_target(tokenizer):
    one_goal = len(encode(tokenizer, format_prompt(GOALS[0])))
    for budget in range(one_goal - 1, 8, -3):
        prompt = build_prompt(tokenizer, STATE, budget)
        assert len(prompt.ids) <= budget and prompt.cut_chars > 0 and prompt.goals_dropped == 2
        assert GOALS[0].endswith(prompt.state) and prompt.state.endswith("⊢ s.card ≤ t.card"[-3:])
        assert prompt.ids == encode(tokenizer, format_prompt(prompt.state))
        text = tokenizer.decode(prompt.ids)
        assert text.startswith("[GOAL]\n") and text.endswith("\n[PROOFSTEP]\n")
        # The longest suffix that fits: one more character does not.
        start = len(GOALS[0]) - len(prompt.state) - 1
        while GOALS[0][start].isspace():
            start -= 1
        assert len(encode(tokenizer, format_prompt(GOALS[0][start:]))) > budget
    with pytest.raises(PromptTooLong, match="budget of 3 tokens"):
        build_prompt(tokenizer, STATE, 3)


def test_training_and_generation_see_identical_prompt_tokens(tokenizer):
    """The same state, truncated in training (tokenize_examples) and by both generators,
    gives the same tokens when the budgets agree; before, the generators cut the last
    raw tokens and lost the header."""
    from prover.generators.transformers_gen import TransformersGenerator
    from prover.generators.vllm_gen import VLLMGenerator
    from training.modeling import build_tiny_qwen2

    completion = len(encode(tokenizer, format_completion(TACTIC))) + 1  # + EOS
    full = len(encode(tokenizer, format_prompt(STATE)))
    model = build_tiny_qwen2(tokenizer, num_hidden_layers=1)

    class Engine:  # an offline vLLM engine as far as prompt building goes: its tokenizer
        def get_tokenizer(self):
            return tokenizer

    for budget in (full, full - 5, len(encode(tokenizer, format_prompt(GOALS[0]))) - 4):
        rows = datasets.Dataset.from_dict({"state_before": [STATE], "tactic": [TACTIC], "theorem_id": ["t"],
                                           "step": [0]})
        tokenized, stats = tokenize_examples(rows, tokenizer, max_length=budget + completion,
                                             length_policy="truncate_left")
        labels = tokenized[0]["labels"]
        trained = tokenized[0]["input_ids"][: labels.count(IGNORE_INDEX)]
        assert stats.truncated == (budget < full)
        hf = TransformersGenerator(model, tokenizer, max_prompt_tokens=budget)
        vllm = VLLMGenerator("unused", max_prompt_tokens=budget, llm=Engine())
        assert hf.prompt_ids(STATE) == trained
        assert vllm._prompts([STATE])[0]["prompt_token_ids"] == trained
        assert tokenizer.decode(trained).startswith("[GOAL]\n")
