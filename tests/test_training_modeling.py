"""The offline tiny model and tokenizer, checkpoint round trips, and load errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.data import SAMPLE_PATH, load_tactic_examples
from training.modeling import (
    TINY_MODEL,
    ModelLoadError,
    build_local_tokenizer,
    build_tiny_qwen2,
    load_causal_lm,
    load_tokenizer,
    qwen2_math_1p5b_config,
)
from training.prompt import format_prompt


@pytest.fixture(scope="module")
def sample_texts() -> list[str]:
    dataset, _ = load_tactic_examples(SAMPLE_PATH)
    return [format_prompt(s) + t for s, t in zip(dataset["state_before"], dataset["tactic"], strict=True)]


def test_tiny_tokenizer_is_byte_level_and_deterministic(sample_texts) -> None:
    tokenizer = load_tokenizer(TINY_MODEL)
    assert 1500 <= len(tokenizer) <= 2048
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    extra = ["∀ ε > 0, ∃ δ > 0, |x - y| < δ → ‖f x - f y‖ < ε", "  spaces\tand\nnewlines  ", "日本語"]
    for text in sample_texts + extra:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    encoded = tokenizer(sample_texts, add_special_tokens=False)["input_ids"]
    assert sum(map(len, encoded)) < 0.5 * sum(len(t.encode()) for t in sample_texts)  # real merges
    # A fresh object per call (callers may mutate it); same vocabulary every time.
    other = load_tokenizer(TINY_MODEL)
    assert other is not tokenizer and other.get_vocab() == tokenizer.get_vocab()
    small = build_local_tokenizer(sample_texts[:40], vocab_size=400)
    assert len(small) == 400 and small.get_vocab() == build_local_tokenizer(sample_texts[:40], 400).get_vocab()


def test_tiny_model_shape_and_seed() -> None:
    tokenizer = load_tokenizer(TINY_MODEL)
    state = torch.random.get_rng_state()
    model = build_tiny_qwen2(tokenizer)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size) == (2, 128)
    assert config.vocab_size == len(tokenizer) and config.eos_token_id == tokenizer.eos_token_id
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    again = load_causal_lm(TINY_MODEL)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    reseeded = build_tiny_qwen2(tokenizer, seed=1, num_hidden_layers=1)
    assert reseeded.config.num_hidden_layers == 1
    assert not torch.equal(reseeded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    ids = torch.tensor([tokenizer("[GOAL]\nx : ℕ\n⊢ x = x\n[PROOFSTEP]\n")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_load_options() -> None:
    model = load_causal_lm(TINY_MODEL, dtype="bfloat16", gradient_checkpointing=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5
        checkpointing = model.is_gradient_checkpointing
    assert checkpointing and model.config.use_cache is False
    with pytest.raises(ValueError, match="unknown dtype"):
        load_causal_lm(TINY_MODEL, dtype="float12")


def test_checkpoint_round_trip(tmp_path: Path, sample_texts) -> None:
    tokenizer = load_tokenizer(TINY_MODEL)
    model = load_causal_lm(TINY_MODEL)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded_tokenizer = load_tokenizer(tmp_path)
    reloaded = load_causal_lm(str(tmp_path), dtype="float32")
    # AutoTokenizer picks the class from the checkpoint; the encoding must not change.
    texts = sample_texts + ["a<|endoftext|>b", "é vs é"]
    assert reloaded_tokenizer(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert (reloaded_tokenizer.eos_token_id, reloaded_tokenizer.pad_token_id) == (
        tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    ids = torch.tensor([tokenizer(sample_texts[0])["input_ids"][:64]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_unknown_names_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such local directory"):
        load_causal_lm(tmp_path / "missing-checkpoint")
    with pytest.raises(ModelLoadError, match="no such local directory"):
        load_tokenizer("./relative/missing")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_causal_lm(tmp_path / "weights.bin")
    # A Hub id that is not cached: the message says hub downloads need network.
    with pytest.raises(ModelLoadError, match="needs network access") as info:
        load_causal_lm("no-such-org/no-such-model-dco", local_files_only=True)
    assert "not found as a local directory" in str(info.value)
    with pytest.raises(ModelLoadError, match="needs network access"):
        load_tokenizer("no-such-org/no-such-model-dco", local_files_only=True)
    # An empty directory is local: never a Hub lookup.
    with pytest.raises(ModelLoadError, match="in the local Hugging Face cache"):
        load_causal_lm(tmp_path)


def test_qwen2_math_1p5b_shape() -> None:
    config = qwen2_math_1p5b_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1536, 28, 12)
    assert (config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (2, 8960, 151936)
    assert config.tie_word_embeddings
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.50e9 < n_params < 1.56e9  # Qwen2.5-Math-1.5B has 1.54B parameters
