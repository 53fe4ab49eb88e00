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


def _long_state(tokenizer, budget: int) -> str:
    """A multi-goal state whose prompt exceeds `budget` tokens even without its later goals."""
    first = GOALS[0].replace("⊢", "\n".join(f"h{i} : {i} < {i + 1}" for i in range(12)) + "\n⊢")
    state = GOAL_SEPARATOR.join([first, *GOALS[1:], *GOALS])
    assert len(encode(tokenizer, format_prompt(first))) > budget
    return state


def test_the_completions_client_sends_the_training_prompt_tokens(tokenizer):
    """The client's request carries token ids equal to training's prompt for a long
    multi-goal state (before: `format_prompt` text that vLLM cut from the left, losing the
    header), and the completions double answers them."""
    import torch

    from openai_double import CompletionsDouble
    from prover.generators.openai_client import MissingTokenizer, OpenAICompletionsGenerator
    from training.modeling import build_tiny_qwen2

    budget, tactic_room = 40, 24
    state = _long_state(tokenizer, budget)
    rows = datasets.Dataset.from_dict({"state_before": [state], "tactic": [TACTIC], "theorem_id": ["t"], "step": [0]})
    tokenized, stats = tokenize_examples(rows, tokenizer, max_length=budget + tactic_room, length_policy="truncate_left",
                                         max_prompt_tokens=budget)
    trained = tokenized[0]["input_ids"][: tokenized[0]["labels"].count(IGNORE_INDEX)]
    assert stats.truncated == 1 and stats.past_prompt_budget == 0 and len(trained) <= budget
    assert tokenizer.decode(trained).startswith("[GOAL]\n")
    torch.manual_seed(0)
    with CompletionsDouble(build_tiny_qwen2(tokenizer, num_hidden_layers=1), tokenizer, served_name="m") as server:
        client = OpenAICompletionsGenerator(server.url, model="m", tokenizer=tokenizer, max_prompt_tokens=budget,
                                            max_new_tokens=3)
        assert client.propose([state, GOALS[2]], 2, timeout_s=60)
        body = server.requests[-1]
        assert body["prompt"][0] == trained and body["prompt"][1] == encode(tokenizer, format_prompt(GOALS[2]))
        assert "truncate_prompt_tokens" not in body
    with pytest.raises(MissingTokenizer, match="needs the served checkpoint's tokenizer"):
        OpenAICompletionsGenerator("http://127.0.0.1:1", model="m")
    text = OpenAICompletionsGenerator("http://127.0.0.1:1", model="m", text_prompts=True, max_prompt_tokens=budget)
    assert text.request_body([state], 1, "m")["prompt"] == [format_prompt(state)]  # explicit fallback: server-side cut


def test_generators_of_a_checkpoint_use_the_prompt_budget_it_was_trained_with(tmp_path, monkeypatch):
    """A checkpoint trained with a small max_length records its prompt budget; the
    transformers, vLLM and completions-client generators read it back and build, for long
    states, exactly the prompt tokens the trainer trained on (before: 2048 by default)."""
    import json

    import torch

    from prover.generators.openai_client import OpenAICompletionsGenerator
    from prover.generators.transformers_gen import TransformersGenerator
    from prover.generators.vllm_gen import VLLMGenerator
    from training.config import load_config
    from training.data import SAMPLE_PATH, load_tactic_examples
    from training.prompt import DEFAULT_PROMPT_BUDGET, checkpoint_prompt_budget
    from training.trainer import load_splits, train

    torch.set_num_threads(1)
    config = load_config("tiny", output_dir=tmp_path / "run", max_length=64, batch_size=4, micro_batch_size=4,
                         max_steps=1, epochs=1, warmup_steps=0, save_every_steps=0, progress=False, eval_fraction=0.0)
    checkpoint = train(config).checkpoint
    assert config.prompt_budget == 48
    assert json.loads((checkpoint / "dco_training.json").read_text())["prompt_budget"] == 48
    assert checkpoint_prompt_budget(checkpoint) == 48 and checkpoint_prompt_budget(tmp_path) is None

    train_split, _, counts = load_splits(config, tokenizer=load_tokenizer(str(checkpoint)))
    states = {(e["theorem_id"], e["step"]): e["state_before"] for e in load_tactic_examples(SAMPLE_PATH)[0]}
    hf = TransformersGenerator.load(checkpoint, dtype="float32")

    class Engine:  # an offline vLLM engine as far as prompts go: the checkpoint's tokenizer
        def get_tokenizer(self):
            return hf.tokenizer

    vllm = VLLMGenerator(str(checkpoint), llm=Engine())
    client = OpenAICompletionsGenerator("http://127.0.0.1:1", model="m", tokenizer=str(checkpoint))
    assert hf.max_prompt_tokens == vllm.max_prompt_tokens == client.max_prompt_tokens == 48
    assert TransformersGenerator(hf.model, hf.tokenizer).max_prompt_tokens == 48  # a loaded model: its name_or_path
    assert TransformersGenerator.load("tiny-qwen2").max_prompt_tokens == DEFAULT_PROMPT_BUDGET  # no record
    compared = 0
    for row in train_split.dataset:
        prompt = row["input_ids"][: row["labels"].count(IGNORE_INDEX)]
        state = states[(row["theorem_id"], row["step"])]
        if len(encode(hf.tokenizer, format_prompt(state))) <= 48 or len(row["labels"]) - len(prompt) > 64 - 48:
            continue  # fits anyway, or a tactic longer than its room (counted in past_prompt_budget)
        assert hf.prompt_ids(state) == prompt
        assert vllm._prompts([state])[0]["prompt_token_ids"] == prompt
        assert client.request_body([state], 1, "m")["prompt"] == [prompt]
        compared += 1
    assert compared >= 20, counts


def test_with_a_prompt_budget_a_states_training_prompt_does_not_depend_on_its_tactic(tokenizer):
    """Before, the budget was max_length minus each tactic's length, so no generator budget
    could match every example; now tactics that fit their room share one prompt."""
    from training.config import ConfigError, load_config

    state = _long_state(tokenizer, 40)
    tactics = ["simp", TACTIC, "exact ⟨fun h => h.1, fun h => ⟨h, trivial⟩⟩"]
    rows = datasets.Dataset.from_dict({"state_before": [state] * 3, "tactic": tactics, "theorem_id": ["t"] * 3,
                                       "step": [0, 1, 2]})
    tokenized, stats = tokenize_examples(rows, tokenizer, max_length=40 + 30, length_policy="truncate_left",
                                         max_prompt_tokens=40)
    prompts = {tuple(r["input_ids"][: r["labels"].count(IGNORE_INDEX)]) for r in tokenized}
    assert len(prompts) == 1 and list(prompts.pop()) == build_prompt(tokenizer, state, 40).ids
    assert stats.truncated == 3 and stats.past_prompt_budget == 0
    dropped, stats = tokenize_examples(rows, tokenizer, max_length=70, length_policy="drop", max_prompt_tokens=40)
    assert len(dropped) == 0 and stats.dropped_too_long == 3
    assert load_config("tiny", max_length=64).prompt_budget == 48
    assert load_config("default").prompt_budget == 1024 - 128
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        load_config("tiny", max_prompt_tokens=128)
