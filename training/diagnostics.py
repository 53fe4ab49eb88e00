"""Greedy-completion confidence: the paper's Figure 1 check of overconfidence.

For each example's prompt (`format_prompt(state)`, the training length policy applied),
decode greedily up to `max_new_tokens`, then score that completion with a forward pass:
`logp = log p(y_greedy | x)` is the sum of its token log-probs (EOS included when it was
generated), `p = exp(logp)` in [0, 1]. Cross-entropy drives `p` towards 1 on training
data; DCO with `N_eff` caps it near `1/N_eff`-ish, leaving room for exploration.

Outputs: a JSON report (per checkpoint: summary statistics, a histogram of `p`, and
per-example records) and a PNG with one histogram per checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import torch

from training.config import ConfigError
from training.data import SAMPLE_PATH, collate, load_tactic_examples, split_by_theorem, tokenize_examples
from training.prompt import checkpoint_prompt_budget
from training.losses import IGNORE_INDEX, sequence_logprobs
from training.modeling import load_causal_lm, load_tokenizer

Split = Literal["all", "train", "eval"]
HISTOGRAM_BINS = 20


@dataclass
class GreedyConfidence:
    """One example: the greedy tactic and its model probability (natural-log `logp`)."""

    theorem_id: str
    step: int
    reference: str
    greedy: str
    logp: float
    p: float
    finished: bool  # the greedy completion ended with EOS within max_new_tokens
    matches_reference: bool


def select_examples(data: Path | None, split: Split, eval_fraction: float, seed: int) -> datasets.Dataset:
    """Examples (state_before, tactic, ...) of `data`: all of them, or one side of the
    by-theorem split made with (`eval_fraction`, `seed`) as in training."""
    examples, _ = load_tactic_examples(data or SAMPLE_PATH)
    if split == "all":
        return examples
    train, held_out = split_by_theorem(examples, eval_fraction, seed)
    return train if split == "train" else held_out


@torch.no_grad()
def greedy_confidences(
    model: Any,
    tokenizer: Any,
    examples: datasets.Dataset,
    *,
    max_length: int = 1024,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
) -> list[GreedyConfidence]:
    """Greedy completion and its confidence for every example that tokenizes under
    `max_length` and the prompt budget `max_prompt_tokens` (the training prompt rule,
    `training.prompt.build_prompt`; drops are not scored)."""
    device = next(model.parameters()).device
    tokenized, _ = tokenize_examples(examples.select_columns(["theorem_id", "step", "state_before", "tactic"]),
                                     tokenizer, max_length=max_length, length_policy="truncate_left",
                                     max_prompt_tokens=max_prompt_tokens)
    references = {(t, s): tac for t, s, tac in zip(examples["theorem_id"], examples["step"], examples["tactic"])}
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    records: list[GreedyConfidence] = []
    try:
        for start in range(0, len(tokenized), batch_size):
            rows = tokenized[start : start + batch_size]
            # The prompt is the prefix without labels.
            prompts = [ids[: next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)]
                       for ids, labels in zip(rows["input_ids"], rows["labels"])]
            completions = _greedy(model, prompts, eos, pad, max_new_tokens, device)
            scored = collate([{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}
                              for p, c in zip(prompts, completions)], pad)
            logits = model(input_ids=scored["input_ids"].to(device),
                           attention_mask=scored["attention_mask"].to(device)).logits
            logps = sequence_logprobs(logits, scored["labels"].to(device)).tolist()
            for theorem_id, step, completion, logp in zip(rows["theorem_id"], rows["step"], completions, logps):
                finished = bool(completion) and completion[-1] == eos
                text = tokenizer.decode(completion[:-1] if finished else completion, skip_special_tokens=True).strip()
                reference = references[(theorem_id, step)]
                records.append(GreedyConfidence(theorem_id, step, reference, text, logp, math.exp(logp),
                                                finished, text == reference.strip()))
    finally:
        model.train(was_training)
    return records


def _greedy(model: Any, prompts: list[list[int]], eos: int, pad: int, max_new_tokens: int,
            device: torch.device) -> list[list[int]]:
    """Greedy continuations (left-padded batch), each cut after its first EOS."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, prompt in enumerate(prompts):
        input_ids[i, longest - len(prompt):] = torch.tensor(prompt)
        attention_mask[i, longest - len(prompt):] = 1
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                            pad_token_id=pad)
    completions = []
    for row in output[:, longest:].tolist():
        completions.append(row[: row.index(eos) + 1] if eos in row else row)
    return completions


def summarize(records: Sequence[GreedyConfidence], bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Mean/median confidence, fractions, and a histogram of `p` over [0, 1]."""
    if not records:
        return {"examples": 0}
    p = torch.tensor([r.p for r in records], dtype=torch.float64)
    counts = torch.histc(p, bins=bins, min=0.0, max=1.0)
    return {
        "examples": len(records),
        "mean_p": p.mean().item(),
        "median_p": p.median().item(),
        "mean_logp": sum(r.logp for r in records) / len(records),
        "fraction_p_above_0.5": (p > 0.5).double().mean().item(),
        "fraction_p_above_0.9": (p > 0.9).double().mean().item(),
        "unfinished": sum(not r.finished for r in records),
        "exact_match": sum(r.matches_reference for r in records) / len(records),
        "histogram": {"edges": torch.linspace(0, 1, bins + 1).tolist(), "counts": [int(c) for c in counts.tolist()]},
    }


def plot_histograms(summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    """One step histogram of p per checkpoint, overlaid (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, summary in summaries.items():
        if not summary.get("examples"):
            continue
        hist = summary["histogram"]
        ax.stairs(hist["counts"], hist["edges"], label=f"{name} (mean p = {summary['mean_p']:.3f})", linewidth=1.8)
    ax.set_xlabel("greedy-completion confidence p(y_greedy | x)")
    ax.set_ylabel("examples")
    ax.set_xlim(0, 1)
    ax.set_title("Greedy-completion confidence per checkpoint")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class DiagnosticsReport:
    json_path: Path
    png_path: Path
    summaries: dict[str, dict[str, Any]]


def training_settings(checkpoint: str | Path) -> dict[str, Any]:
    """The training config recorded in a checkpoint by the trainer (`dco_training.json`),
    or {} for checkpoints from elsewhere."""
    info = Path(checkpoint) / "dco_training.json"
    return json.loads(info.read_text()).get("config", {}) if info.is_file() else {}


def diagnose(
    checkpoints: dict[str, str | Path],
    output_dir: Path,
    *,
    data: Path | None = None,
    split: Split = "all",
    eval_fraction: float | None = None,
    seed: int | None = None,
    max_length: int | None = None,
    max_new_tokens: int = 64,
    max_examples: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
) -> DiagnosticsReport:
    """Greedy confidence of each named checkpoint on the same examples; writes
    `output_dir/confidence.json` and `output_dir/confidence.png`.

    `eval_fraction`, `seed` (the by-theorem split) and `max_length` default to what the
    first checkpoint was trained with (else 0.1, 0, 1024), so `split="eval"` is its
    held-out split and prompts are truncated as in its training."""
    if not checkpoints:
        raise ConfigError("no checkpoints to diagnose")
    trained = training_settings(next(iter(checkpoints.values())))
    eval_fraction = trained.get("eval_fraction", 0.1) if eval_fraction is None else eval_fraction
    seed = trained.get("seed", 0) if seed is None else seed
    max_length = trained.get("max_length", 1024) if max_length is None else max_length
    examples = select_examples(data, split, eval_fraction, seed)
    if max_examples is not None:
        examples = examples.select(range(min(max_examples, len(examples))))
    if len(examples) == 0:
        raise ConfigError(f"no examples in split {split!r} of {data or SAMPLE_PATH}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {
        "data": str(data or SAMPLE_PATH), "split": split, "eval_fraction": eval_fraction, "seed": seed,
        "max_length": max_length, "max_new_tokens": max_new_tokens, "checkpoints": {},
    }
    summaries = {}
    for name, path in checkpoints.items():
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, dtype="auto" if device != "cpu" else torch.float32, device=device)
        records = greedy_confidences(model, tokenizer, examples, max_length=max_length,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     max_prompt_tokens=checkpoint_prompt_budget(path))  # as it was trained
        summaries[name] = summarize(records)
        report["checkpoints"][name] = {"path": str(path), **summaries[name],
                                       "records": [asdict(r) for r in records]}
        del model
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "confidence.json"
    json_path.write_text(json.dumps(report, indent=2))
    png_path = plot_histograms(summaries, output_dir / "confidence.png")
    return DiagnosticsReport(json_path, png_path, summaries)
