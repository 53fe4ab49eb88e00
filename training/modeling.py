"""Loading causal LMs and tokenizers: Hugging Face checkpoints, and a tiny offline model.

`load_tokenizer` / `load_causal_lm` take a local checkpoint directory, a Hugging Face Hub
id (needs network unless cached), or the special name `TINY_MODEL` ("tiny-qwen2"): a
random-weight Qwen2 model with a byte-level BPE tokenizer trained on the bundled LeanDojo
sample — built in-process, no files and no network, deterministic across processes.
Checkpoints written with `save_pretrained` (model and tokenizer) load back through the same
two functions.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

from training.data import SAMPLE_PATH, read_benchmark
from training.prompt import format_completion, format_prompt

TINY_MODEL = "tiny-qwen2"
"""Special model name: random-weight Qwen2 + local BPE tokenizer, built without files."""

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TINY_VOCAB_SIZE = 2048
"""Target vocabulary of the tiny tokenizer (the sample supports about 1,850 tokens)."""
TINY_SEED = 0

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says where it looked."""


# --------------------------------------------------------------------------- tokenizer


def _train_bpe(texts: Iterable[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocabulary and merges trained with Qwen2's normalizer and pre-tokenizer."""
    template = Qwen2Tokenizer().backend_tokenizer
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = template.normalizer
    tokenizer.pre_tokenizer = template.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Qwen2Tokenizer:
    return Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=2048,
    )


def build_local_tokenizer(texts: Iterable[str], vocab_size: int) -> Qwen2Tokenizer:
    """Train a byte-level BPE `Qwen2Tokenizer` on `texts` (deterministic for a given input order).

    Same normalizer (NFC) and pre-tokenizer as Qwen2's, so a checkpoint saved with
    `save_pretrained` (which `AutoTokenizer` reloads as `Qwen2Tokenizer`) tokenizes
    identically. Byte-level: every string encodes without an unknown token. Special
    tokens: `EOS_TOKEN` (id 0) and `PAD_TOKEN` (id 1); no BOS is added.
    """
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size must leave room for 256 bytes and 2 specials, got {vocab_size}")
    return _qwen2_tokenizer(*_train_bpe(texts, vocab_size))


def _sample_texts() -> list[str]:
    texts: list[str] = []
    for theorem in read_benchmark(SAMPLE_PATH):
        for step in theorem.traced_tactics:
            texts.append(format_prompt(step.state_before) + format_completion(step.annotated_tactic))
            texts.append(step.state_after)
    return texts


@functools.lru_cache(maxsize=1)
def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Each caller gets its own tokenizer object built from these (callers may mutate it).
    return _train_bpe(_sample_texts(), TINY_VOCAB_SIZE)


def _ensure_special_tokens(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"tokenizer {source!r} has no EOS token; completions must end with one")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked (attention 0, label -100), so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ------------------------------------------------------------------------ resolution


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[str, bool]:
    """Return (path or hub id, is_local_dir); raise for paths that do not exist."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise ModelLoadError(f"{text!r} is a file; expected a checkpoint directory or a Hub id")
    if not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise ModelLoadError(
            f"model {text!r} not found: no such local directory (and it is not a Hugging "
            f"Face Hub id of the form 'org/name')"
        )
    return text, False


def _load_error(kind: str, name: str, local_files_only: bool, error: Exception) -> ModelLoadError:
    where = "in the local Hugging Face cache" if local_files_only else "on the Hugging Face Hub"
    return ModelLoadError(
        f"could not load {kind} {name!r}: not found as a local directory, and not {where}. "
        f"Pass a checkpoint directory, or the special name {TINY_MODEL!r} for the offline "
        f"tiny model; downloading from the Hub needs network access (and HF_HUB_OFFLINE "
        f"unset). Cause: {type(error).__name__}: {error}"
    )


def load_tokenizer(
    name_or_path: str | os.PathLike[str], *, local_files_only: bool = False
) -> PreTrainedTokenizerBase:
    """Tokenizer for `TINY_MODEL`, a local checkpoint directory, or a Hub id.

    Guarantees an EOS token and a pad token (EOS is reused when the checkpoint has no pad).
    Raises `ModelLoadError` when nothing can be found.
    """
    if str(name_or_path) == TINY_MODEL:
        return _qwen2_tokenizer(*_tiny_vocab_and_merges())
    source, is_local = _resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only or is_local)
    except (OSError, ValueError) as error:
        raise _load_error("tokenizer", source, local_files_only or is_local, error) from error
    return _ensure_special_tokens(tokenizer, source)


# ---------------------------------------------------------------------------- models


def tiny_qwen2_config(vocab_size: int, **overrides: Any) -> Qwen2Config:
    """The tiny Qwen2 shape of `training/configs/tiny_qwen2.json`, with `vocab_size` set."""
    text = resources.files("training").joinpath("configs", "tiny_qwen2.json").read_text("utf-8")
    values = json.loads(text)
    values.pop("model_type", None)
    values.update(vocab_size=vocab_size, **overrides)
    return Qwen2Config(**values)


def build_tiny_qwen2(
    tokenizer: PreTrainedTokenizerBase, *, seed: int = TINY_SEED, **overrides: Any
) -> Qwen2ForCausalLM:
    """A float32 random-weight Qwen2ForCausalLM sized to `tokenizer`, seeded (global RNG untouched).

    `overrides` replace fields of the tiny config (e.g. `num_hidden_layers=1`).
    """
    config = tiny_qwen2_config(
        len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.config.name_or_path = TINY_MODEL
    return model


def qwen2_math_1p5b_config(vocab_size: int = 151936) -> Qwen2Config:
    """Qwen2.5-Math-1.5B's shape (for benchmarks with random weights; no download)."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151643,
    )


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'")
    return resolved


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation (gradient) checkpointing on every layer; disables the KV cache."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def load_causal_lm(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    gradient_checkpointing: bool = False,
    local_files_only: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A causal LM from `TINY_MODEL`, a local checkpoint directory, or a Hub id.

    `dtype`: parameter dtype (`None` = float32 for the tiny model, the checkpoint's default
    otherwise; "auto" = the checkpoint's saved dtype). `gradient_checkpointing` enables
    non-reentrant activation checkpointing and disables the KV cache. Raises
    `ModelLoadError` when nothing can be found.
    """
    torch_dtype = _as_dtype(dtype)
    if str(name_or_path) == TINY_MODEL:
        model = build_tiny_qwen2(load_tokenizer(TINY_MODEL))
        if isinstance(torch_dtype, torch.dtype):
            model = model.to(torch_dtype)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
    else:
        source, is_local = _resolve(name_or_path)
        kwargs: dict[str, Any] = {"local_files_only": local_files_only or is_local}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as error:
            raise _load_error("model", source, local_files_only or is_local, error) from error
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    if device is not None:
        model = model.to(device)
    return model
