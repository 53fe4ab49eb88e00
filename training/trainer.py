"""The training loop: fine-tune a causal LM on (proof state, tactic) pairs with step-wise DCO.

Read top to bottom: `train` sets up (data, model, optimizer, accelerate), restores the
last checkpoint if there is one, then runs optimizer steps; each step fills
`gradient_accumulation_steps` micro-batches through threshold replacement
(`training.replacement`), computes the loss (`training.losses`) and steps the optimizer.
The same code runs as one CPU/GPU process and under `accelerate launch` (DDP or DeepSpeed
ZeRO-2/3 when `config.deepspeed` names a JSON config).

A run directory (`config.output_dir`) holds:

    config.yaml          the resolved config
    metrics.jsonl        one JSON object per logged step (and eval / stop events)
    checkpoints/step-N/  resumable state: model, optimizer, scheduler, RNG (accelerate),
                         per-rank replacement state, trainer_state.json
    final/               Hugging Face checkpoint (model + tokenizer), for from_pretrained/vLLM
    train_result.json    written last: the run is complete

Resuming (automatic when checkpoints exist) restores everything a step depends on, so a
run killed after checkpoint N and restarted produces the same steps, data order and
weights as an uninterrupted run.

Precision (`Precision`, recorded in the `start` event and in `final/dco_training.json`):
fp32 master weights always, whatever the checkpoint's dtype; `bf16` adds bf16 autocast, or
under DeepSpeed its bf16 mode (fp32 master copies in the ZeRO optimizer). Epochs are
passes over the data (`Plan`): threshold replacement draws from the same passes, so
discards end the run earlier instead of adding passes; `metrics.jsonl` gets an
`epoch_end` record per epoch and an `end` record.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from training.config import ConfigError, TrainConfig, config_hash
from training.data import SAMPLE_PATH, collate, load_tactic_examples, split_by_theorem, tokenize_examples
from training.losses import (
    coverage_weight,
    proof_level_dco_loss,
    proof_logprobs,
    sequence_logprobs,
    sequence_logprobs_from_hidden,
    stepwise_dco_loss,
)
from training.modeling import load_causal_lm, load_tokenizer
from training.prompt import TRAINING_RECORD
from training.replacement import BatchFiller, ExampleStream, PassesComplete, ReplacementExhausted

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"
RESULT = "train_result.json"
TRAINING_INFO = TRAINING_RECORD  # inside final/: what produced the checkpoint

StepCallback = Callable[[dict[str, Any]], None]


class TrainingOutOfMemory(RuntimeError):
    """The GPU ran out of memory in an optimizer step. The message says how to fit the run
    and from which step a re-run of the same command resumes; nothing else is lost."""


@dataclass
class TrainResult:
    """A finished run. Paths are absolute; `final_metrics` holds the last step's record,
    the eval metrics and the data counts."""

    output_dir: Path
    checkpoint: Path
    metrics_path: Path
    config_hash: str
    steps: int
    final_metrics: dict[str, Any] = field(default_factory=dict)
    stopped_early: str | None = None

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        for key in ("output_dir", "checkpoint", "metrics_path"):
            record[key] = str(record[key])
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "TrainResult":
        paths = {key: Path(record[key]) for key in ("output_dir", "checkpoint", "metrics_path")}
        return cls(**{**record, **paths})


# ---------------------------------------------------------------------------- the model


class CompletionLogProbs(nn.Module):
    """`forward(input_ids, attention_mask, labels) -> [batch] float32 log p(completion | prompt)`.

    Wraps a causal LM so that accelerate/DDP/DeepSpeed prepare exactly what the loss needs.
    `fused`: project only completion positions to the vocabulary, in chunks
    (`sequence_logprobs_from_hidden`), instead of materialising [batch, seq, vocab] logits;
    valid for LMs whose logits are `lm_head(final hidden)` without bias or scaling,
    which `check_fused` verifies on real data before training.
    """

    def __init__(self, lm: nn.Module, fused: bool) -> None:
        super().__init__()
        self.lm = lm
        head = lm.get_output_embeddings()
        self.fused = fused and head is not None and getattr(head, "bias", None) is None

    @property
    def config(self) -> Any:
        """The LM's config: accelerate fills a DeepSpeed config's `"auto"` sizes from
        `model.config.hidden_size` of the module it prepares, which is this wrapper."""
        return self.lm.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, fused: bool | None = None) -> Tensor:
        if self.fused if fused is None else fused:
            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return sequence_logprobs_from_hidden(hidden, self.lm.get_output_embeddings().weight, labels)
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        return sequence_logprobs(logits, labels)

    @torch.no_grad()
    def check_fused(self, batch: dict[str, Tensor], atol: float = 1e-2) -> None:
        """Turn `fused` off (with a warning) if it disagrees with the full-logits path."""
        if not self.fused:
            return
        with torch.autocast(batch["input_ids"].device.type, enabled=False):
            fused, full = self(**batch, fused=True), self(**batch, fused=False)
        if not torch.allclose(fused, full, atol=atol, rtol=1e-3):
            logger.warning("fused completion log-probs disagree with full logits (max diff %.3g); using full logits",
                           (fused - full).abs().max().item())
            self.fused = False


@dataclass(frozen=True)
class Precision:
    """What a run computes in, measured on the prepared model and optimizer (dtype names).

    `mode`: "fp32" (fp32 weights, no autocast), "fp32_master_bf16_autocast" (fp32 weights
    updated by AdamW, forward/backward under bf16 autocast) or "deepspeed_bf16" (bf16
    weights in the module, fp32 master copies kept and updated by DeepSpeed's ZeRO
    optimizer). `master_weights`: dtype of the tensors the optimizer updates;
    `module_weights`: dtype of the weights the forward pass reads; `autocast`: autocast
    dtype or None; `checkpoint`: dtype of the saved Hugging Face checkpoint.
    """

    mode: str
    master_weights: str
    module_weights: str
    autocast: str | None
    checkpoint: str

    @classmethod
    def measure(cls, config: TrainConfig, accelerator: Accelerator, model: nn.Module, optimizer: Any) -> "Precision":
        """The precision of a prepared run. Raises `RuntimeError` if the optimizer would
        update anything but fp32 master weights (bf16 weights under a plain AdamW lose
        updates of 1e-5 to rounding) or the setup is not one of the two bf16 modes."""
        master = {str(t.dtype).removeprefix("torch.") for t in _master_tensors(optimizer)}
        module = {str(p.dtype).removeprefix("torch.") for p in accelerator.unwrap_model(model).parameters()}
        autocast = "bfloat16" if accelerator.native_amp and accelerator.mixed_precision == "bf16" else None
        deepspeed = config.deepspeed is not None
        if master != {"float32"}:
            raise RuntimeError(f"the optimizer would update {sorted(master)} weights; training keeps fp32 master weights")
        if config.bf16:
            mode = "deepspeed_bf16" if deepspeed else "fp32_master_bf16_autocast"
            expected = ({"bfloat16"}, None) if deepspeed else ({"float32"}, "bfloat16")
        else:
            mode, expected = "fp32", ({"float32"}, None)
        if (module, autocast) != expected:
            raise RuntimeError(f"precision mode {mode} expects module weights {expected[0]} and autocast "
                               f"{expected[1]}, got {sorted(module)} and {autocast}")
        return cls(mode=mode, master_weights="float32", module_weights=module.pop(), autocast=autocast,
                   checkpoint="bfloat16" if config.bf16 else "float32")


def _master_tensors(optimizer: Any) -> list[Tensor]:
    """The tensors a prepared optimizer updates: DeepSpeed's ZeRO optimizers keep their
    (flat, partitioned) master copies in attributes of their own (ZeRO-3 hands them to the
    torch optimizer only inside `step`); otherwise the torch optimizer's parameters."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        tensors = getattr(inner, name, None)
        if tensors:
            return list(tensors)
    return [p for group in optimizer.param_groups for p in group["params"]]


# ----------------------------------------------------------------------------- the data


class TokenizedSplit:
    """A tokenized split (rows: input_ids, labels, attention_mask, theorem_id, step)."""

    def __init__(self, dataset: datasets.Dataset, pad_token_id: int) -> None:
        self.dataset = dataset
        self.pad_token_id = pad_token_id
        self.theorem_ids: list[str] = list(dataset["theorem_id"])
        self.steps_of: dict[str, list[int]] = defaultdict(list)
        for index, theorem_id in enumerate(self.theorem_ids):
            self.steps_of[theorem_id].append(index)

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: Sequence[int], device: torch.device) -> dict[str, Tensor]:
        """input_ids, attention_mask, labels [len(indices), longest] on `device`."""
        columns = self.dataset[list(indices)]
        rows = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
        tensors = collate(rows, self.pad_token_id)
        return {key: tensors[key].to(device) for key in ("input_ids", "attention_mask", "labels")}


def load_splits(config: TrainConfig, tokenizer: Any) -> tuple[TokenizedSplit, TokenizedSplit, dict[str, Any]]:
    """Train and eval splits (by theorem) of `config.data`, tokenized; plus every count."""
    examples, load_stats = load_tactic_examples(config.data or SAMPLE_PATH)
    train_raw, eval_raw = split_by_theorem(examples, config.eval_fraction, config.seed)
    counts: dict[str, Any] = {"load": load_stats.to_json()}
    splits = []
    for name, raw in (("train", train_raw), ("eval", eval_raw)):
        tokenized, stats = tokenize_examples(raw, tokenizer, max_length=config.max_length,
                                             length_policy=config.length_policy,
                                             max_prompt_tokens=config.prompt_budget)
        counts[f"tokenize_{name}"] = stats.to_json()
        splits.append(TokenizedSplit(tokenized, tokenizer.pad_token_id))
    if len(splits[0]) == 0:
        raise ConfigError(f"no training examples left after tokenization: {counts}")
    return splits[0], splits[1], counts


# ------------------------------------------------------------------------ the objective


class Objective:
    """Loss and per-example DCO factor `F` for a micro-batch of example indices.

    `stepwise`: each example its own `p` (`stepwise_dco_loss`, mean over examples).
    `proof_level`: one `p` per proof, the product over all of its steps in the split;
    steps outside the micro-batch enter as detached constants from a no-grad forward,
    so each example's gradient is `F(N, p_proof) · ∇ NLL` / micro-batch size.
    """

    def __init__(self, kind: str, n_eff: int, split: TokenizedSplit,
                 no_grad_logprobs: Callable[[Sequence[int]], Tensor]) -> None:
        self.kind = kind
        self.n_eff = n_eff
        self.split = split
        self.no_grad_logprobs = no_grad_logprobs

    def __call__(self, indices: Sequence[int], seq_logp: Tensor) -> tuple[Tensor, Tensor]:
        """(scalar loss, detached [batch] factors F)."""
        if self.kind == "stepwise":
            return stepwise_dco_loss(seq_logp, self.n_eff), coverage_weight(seq_logp.detach(), self.n_eff)
        theorem_ids = [self.split.theorem_ids[i] for i in indices]
        in_batch = set(indices)
        others = [j for t in dict.fromkeys(theorem_ids) for j in self.split.steps_of[t] if j not in in_batch]
        other_logp = self.no_grad_logprobs(others).to(seq_logp.device, seq_logp.dtype)
        all_logp = torch.cat([seq_logp, other_logp])
        all_ids = theorem_ids + [self.split.theorem_ids[j] for j in others]
        loss = proof_level_dco_loss(all_logp, all_ids, self.n_eff, reduction="none").sum() / len(indices)
        proof_logp, group = proof_logprobs(all_logp.detach(), all_ids)
        return loss, coverage_weight(proof_logp, self.n_eff)[group[: len(indices)]]

    @torch.no_grad()
    def score(self, indices: Sequence[int]) -> Tensor:
        """F per example under the current model (for threshold replacement). No indices:
        still one (collective) scoring call, so every process runs the same forwards."""
        if not indices:
            return self.no_grad_logprobs([]).float()
        if self.kind == "stepwise":
            return coverage_weight(self.no_grad_logprobs(indices), self.n_eff)
        theorem_ids = [self.split.theorem_ids[i] for i in indices]
        proofs = list(dict.fromkeys(theorem_ids))
        steps = [j for t in proofs for j in self.split.steps_of[t]]
        # Groups come in order of first appearance, i.e. the order of `proofs`.
        proof_logp, _ = proof_logprobs(self.no_grad_logprobs(steps), [self.split.theorem_ids[j] for j in steps])
        factors = coverage_weight(proof_logp, self.n_eff)
        position = {t: k for k, t in enumerate(proofs)}
        return factors[[position[t] for t in theorem_ids]]


# ------------------------------------------------------------------------ the run folder


class RunDir:
    """Paths and bookkeeping of one run directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.checkpoints = self.root / CHECKPOINTS
        self.final = self.root / FINAL
        self.metrics = self.root / METRICS
        self.result = self.root / RESULT

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint (incomplete ones end in `.tmp`)."""
        found = [(int(p.name.split("-")[1]), p) for p in self.checkpoints.glob("step-*")
                 if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer_state.json").is_file()]
        return max(found) if found else None

    def remove_artifacts(self) -> None:
        """Delete what a previous run wrote here (only the names this module writes)."""
        for path in (self.checkpoints, self.final, self.final.with_name(FINAL + ".tmp")):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.metrics, self.result, self.root / "config.yaml"):
            path.unlink(missing_ok=True)

    def truncate_metrics(self, last_step: int) -> None:
        """Keep the records of steps <= last_step; none at all when last_step is 0 (a fresh start)."""
        if not self.metrics.exists():
            return
        kept = [line for line in self.metrics.read_text().splitlines()
                if line.strip() and 0 < last_step and json.loads(line).get("step", 0) <= last_step]
        self.metrics.write_text("".join(line + "\n" for line in kept))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Plan:
    """Step arithmetic. An epoch is one pass over the training split; the run draws at most
    `config.epochs` passes (`draws_per_process[r]` candidates on process `r`). Without
    discards that is `total_steps` optimizer steps of `batch_size` examples; threshold
    replacement draws its replacements from the same passes, so a run that discards takes
    fewer steps (it ends when the draws left cannot fill a step). `total_steps` is also
    the horizon of the linear-decay schedule."""

    world_size: int
    accumulation_steps: int
    steps_per_epoch: int
    total_steps: int
    draws_per_process: tuple[int, ...]

    @classmethod
    def make(cls, config: TrainConfig, num_train: int, world_size: int) -> "Plan":
        per_step = config.micro_batch_size * world_size
        if config.batch_size % per_step:
            raise ConfigError(
                f"batch_size {config.batch_size} is not a multiple of micro_batch_size "
                f"{config.micro_batch_size} x {world_size} processes"
            )
        # Process r takes every world_size-th example of each pass (`ExampleStream`).
        draws = tuple(math.floor(config.epochs * len(range(r, num_train, world_size)) + 1e-9)
                      for r in range(world_size))
        per_process_step = config.batch_size // world_size
        total = min(d // per_process_step for d in draws)
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        if total < 1:
            raise ConfigError(f"{config.epochs} epoch(s) of {num_train} training examples do not fill one batch of "
                              f"{config.batch_size}: lower batch_size or raise epochs")
        return cls(world_size, config.batch_size // per_step, num_train // config.batch_size, total, draws)


@dataclass(frozen=True)
class LearningRateSchedule:
    """Multiplier of the peak learning rate, as `LambdaLR` takes it (called with the number
    of optimizer steps taken, so optimizer step `s` (1-based) gets `factor(s - 1)`).

    Linear warmup: step `s <= warmup_steps` runs at `s / warmup_steps` of the peak (step 1
    is not wasted at 0). Then `constant` (the peak) or `linear`: decay from the peak at
    step `warmup_steps + 1` to `1 / (total - warmup_steps)` of it at step `total_steps`."""

    kind: str
    warmup_steps: int
    total_steps: int

    def __call__(self, steps_taken: int) -> float:
        step = steps_taken + 1
        if step <= self.warmup_steps:
            return step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        return max(self.total_steps - step + 1, 1) / max(self.total_steps - self.warmup_steps, 1)


@dataclass
class EpochLog:
    """Totals per epoch, over all processes. An epoch is one pass over the training split
    (`num_train` candidates drawn); a step belongs to the epoch in which it ends. The same
    on every process (built from reduced counts); saved with each checkpoint."""

    num_train: int
    drawn: int = 0  # candidates drawn since the start of the run
    epoch: int = 1  # the epoch in progress, 1-based
    steps: int = 0  # in the epoch in progress
    examples: int = 0  # trained on
    discarded: int = 0
    scored: int = 0

    @property
    def passes(self) -> float:
        return self.drawn / self.num_train

    def add_step(self, drawn: int, examples: int, discarded: int, scored: int) -> list[dict[str, Any]]:
        """Count one optimizer step; the records of the epochs it completes."""
        self.steps += 1
        self.examples += examples
        return self.add_draws(drawn, discarded, scored)

    def add_draws(self, drawn: int, discarded: int, scored: int) -> list[dict[str, Any]]:
        """Count draws outside a step (the step the passes ran out in); closed epochs."""
        self.drawn += drawn
        self.discarded += discarded
        self.scored += scored
        closed = []
        while self.drawn >= self.epoch * self.num_train:
            closed.append(self._close())
        return closed

    def finish(self) -> list[dict[str, Any]]:
        """The record of a last, partial epoch (if it has steps)."""
        return [self._close()] if self.steps else []

    def _close(self) -> dict[str, Any]:
        record = {"event": "epoch_end", "epoch": self.epoch, "passes": round(self.passes, 4), "steps": self.steps,
                  "examples": self.examples, "discarded": self.discarded, "scored": self.scored}
        self.epoch += 1
        self.steps = self.examples = self.discarded = self.scored = 0
        return record


def distributed_state(deepspeed: bool = False) -> PartialState:
    """The process group this process belongs to (one process unless launched by
    `accelerate launch`/`torchrun`). The first call in a process decides; later calls
    return the same state.

    Without CUDA a multi-process launch is CPU DDP (gloo), which accelerate only selects
    when asked for the CPU explicitly. With `deepspeed` the group is DeepSpeed's (its
    communication layer over torch.distributed): a run without a launcher is one process
    of a group of one (rank variables set here), and without CUDA the backend is gloo
    (accelerate would otherwise leave DeepSpeed without a backend, and each process of a
    launch would believe it is alone). The group is destroyed at interpreter exit.
    """
    if not deepspeed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        state = PartialState(cpu=not torch.cuda.is_available() and world > 1)
    else:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if "LOCAL_RANK" not in os.environ:  # not launched: a group of one
            for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                                ("LOCAL_WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
                os.environ.setdefault(name, value)
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        state = PartialState(**_process_group_kwargs())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _destroy_group_at_exit()
    return state


def _process_group_kwargs() -> dict[str, Any]:
    """`init_process_group` options: gloo where there is no CUDA (DeepSpeed's CPU accelerator)."""
    return {} if torch.cuda.is_available() else InitProcessGroupKwargs(backend="gloo").to_kwargs()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_DESTROY_REGISTERED = False


def _destroy_group_at_exit() -> None:
    """Destroy the process group when the interpreter exits (once per process). Not after
    each `train`: the CLI trains several N_eff one after another in the same group."""
    global _DESTROY_REGISTERED
    if not _DESTROY_REGISTERED:
        _DESTROY_REGISTERED = True
        atexit.register(_destroy_group)


def _destroy_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _deepspeed_json(config: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config file, checked against what the trainer owns: the optimizer and
    schedule are the trainer's, and precision follows `config.bf16` (fp16 is not offered)."""
    assert config.deepspeed is not None
    try:
        values = json.loads(config.deepspeed.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config.deepspeed}: not valid JSON: {exc}") from exc
    for section in ("optimizer", "scheduler"):
        if section in values:
            raise ConfigError(f"{config.deepspeed}: remove the {section!r} section; the trainer builds the "
                              f"{section} (AdamW; lr_schedule, warmup_steps in the training config)")
    if values.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{config.deepspeed}: fp16 is not supported; use bf16 (config bf16: true)")
    enabled = values.get("bf16", {}).get("enabled", "auto")
    if enabled != "auto" and bool(enabled) != config.bf16:
        raise ConfigError(f"{config.deepspeed} sets bf16.enabled={enabled} but the training config has "
                          f"bf16: {str(config.bf16).lower()}; set it to \"auto\" (it then follows the training config)")
    return values


def _require_deepspeed(config: TrainConfig) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"--deepspeed {config.deepspeed} needs DeepSpeed, which is not installed: "
                          f"pip install -e '.[dev]' (or pip install deepspeed; DS_BUILD_OPS=0 builds no ops ahead of "
                          f"time); several processes need `accelerate launch`")


def make_accelerator(config: TrainConfig, accumulation_steps: int) -> Accelerator:
    """The accelerator of one run. Precision (see `Precision`): without DeepSpeed, fp32
    weights and bf16 autocast when `config.bf16`; with DeepSpeed, its bf16 mode (bf16
    weights, fp32 master copies in the ZeRO optimizer) when `config.bf16`."""
    plugin = None
    handlers = []
    if config.deepspeed is not None:
        _require_deepspeed(config)
        plugin = DeepSpeedPlugin(
            hf_ds_config=_deepspeed_json(config),
            gradient_accumulation_steps=accumulation_steps,
            gradient_clipping=config.max_grad_norm or 0.0,
        )
        handlers.append(InitProcessGroupKwargs(**_process_group_kwargs()))
    state = distributed_state(deepspeed=plugin is not None)
    # One process may train several runs (the CLI's N_eff members, tests); each run's
    # precision is its own, while the process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=plugin is None and state.use_distributed and not torch.cuda.is_available(),
        gradient_accumulation_steps=accumulation_steps,
        mixed_precision="bf16" if config.bf16 else "no",
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,  # the loop steps the scheduler once per optimizer step
    )
    if plugin is not None:
        # No dataloader is prepared (the replacement filler feeds batches), so DeepSpeed
        # learns the micro-batch size here instead of from a dataloader.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    return accelerator


def _is_zero3(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


# -------------------------------------------------------------------------------- train


def train(config: TrainConfig, on_step: StepCallback | None = None) -> TrainResult:
    """Train one checkpoint as `config` says; resume the run in `config.output_dir` if any.

    A finished run with the same `config_hash` is returned as is. `on_step` is called with
    each optimizer step's metrics record (after any checkpoint of that step is saved).
    """
    run = RunDir(config.output_dir)
    digest = config_hash(config)
    if config.deepspeed is not None:
        _require_deepspeed(config)
    state = distributed_state(deepspeed=config.deepspeed is not None)
    world_size = state.num_processes
    if config.overwrite and state.is_main_process:
        run.remove_artifacts()
    state.wait_for_everyone()
    if run.result.exists():
        finished = TrainResult.from_json(json.loads(run.result.read_text()))
        if finished.config_hash != digest:
            raise ConfigError(f"{run.root} holds a finished run of a different config "
                              f"(hash {finished.config_hash}, now {digest}); use another output dir or overwrite")
        return finished

    # --- setup: data, model, optimizer, schedule
    set_seed(config.seed)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    train_split, eval_split, data_counts = load_splits(config, tokenizer)
    plan = Plan.make(config, len(train_split), world_size)
    accelerator = make_accelerator(config, plan.accumulation_steps)
    # fp32 master weights whatever the checkpoint's dtype (transformers 5 keeps a bf16
    # checkpoint in bf16); DeepSpeed's bf16 mode casts the module itself and keeps fp32 copies.
    lm = load_causal_lm(config.model, dtype=torch.float32, gradient_checkpointing=config.gradient_checkpointing)
    if config.torch_compile and config.deepspeed is None:
        lm.get_decoder().compile()  # in place: parameter names (and checkpoints) unchanged
    model = CompletionLogProbs(lm, fused=config.fused_logprobs and not _is_zero3(accelerator))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
        fused=accelerator.device.type == "cuda" and config.deepspeed is None,
    )
    scheduler = LambdaLR(optimizer, LearningRateSchedule(config.lr_schedule, config.warmup_steps, plan.total_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    precision = Precision.measure(config, accelerator, model, optimizer)
    accelerator.unwrap_model(model).check_fused(train_split.batch(range(min(2, len(train_split))), accelerator.device))

    no_grad_logprobs = _no_grad_logprobs_fn(accelerator, model, train_split, config.micro_batch_size)
    eval_logprobs = _no_grad_logprobs_fn(accelerator, model, eval_split, config.micro_batch_size)
    objective = Objective(config.loss, config.n_eff, train_split, no_grad_logprobs)
    filler = BatchFiller(
        ExampleStream(len(train_split), config.seed, accelerator.process_index, world_size),
        config.micro_batch_size,
        config.epsilon,
        score_fn=objective.score if config.replacement_active else None,
        sync=_any_across_processes(accelerator),
        max_draws=plan.draws_per_process[accelerator.process_index],
    )
    epochs = EpochLog(len(train_split))

    # --- resume
    step = 0
    latest = run.latest_checkpoint()
    if latest is not None:
        step = _load_checkpoint(accelerator, filler, epochs, latest[1], digest)
        logger.info("resumed %s from step %d", run.root, step)
    if accelerator.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
        (run.root / "config.yaml").write_text(config.to_yaml())
        run.truncate_metrics(step)  # a killed run may have logged steps after its last checkpoint
        if step == 0:
            run.append_metrics({"step": 0, "event": "start", "config_hash": digest, "plan": asdict(plan),
                                "precision": asdict(precision),
                                "train_examples": len(train_split), "eval_examples": len(eval_split),
                                "data": data_counts})

    # --- train
    stopped_early = None
    record: dict[str, Any] = {}
    with _ProgressBar(config, accelerator, plan, step) as progress:
        while step < plan.total_steps:
            step += 1
            try:
                record = _optimizer_step(config, accelerator, model, optimizer, scheduler, filler,
                                         objective, train_split, plan, epochs, step)
            except PassesComplete:
                # The passes are drawn before this step could fill: it is not taken, but its
                # draws and discards count.
                step -= 1
                optimizer.zero_grad(set_to_none=True)
                counts = filler.pop_counts()
                drawn, discarded, scored = accelerator.reduce(torch.tensor(
                    [counts.drawn, counts.discarded, counts.scored], dtype=torch.float64, device=accelerator.device),
                    reduction="sum").cpu().tolist()
                for epoch_record in epochs.add_draws(int(drawn), int(discarded), int(scored)):
                    if accelerator.is_main_process:
                        run.append_metrics({"step": step, **epoch_record})
                break
            except ReplacementExhausted as exc:
                stopped_early = str(exc)
                step -= 1
                optimizer.zero_grad(set_to_none=True)
                if accelerator.is_main_process:
                    run.append_metrics({"step": step, "event": "stopped", "reason": stopped_early})
                break
            except torch.cuda.OutOfMemoryError as exc:
                latest = run.latest_checkpoint()
                resume_from = latest[0] if latest else 0
                if accelerator.is_main_process:
                    run.append_metrics({"step": step, "event": "out_of_memory", "resume_from_step": resume_from})
                raise TrainingOutOfMemory(
                    f"GPU out of memory in step {step} of {run.root} (micro-batch {config.micro_batch_size} x up to "
                    f"{config.max_length} tokens): lower --micro-batch-size (gradient accumulation keeps the batch "
                    f"size), enable --gradient-checkpointing, lower max_length, or use a DeepSpeed ZeRO config. "
                    f"Re-running the same command resumes from step {resume_from}."
                ) from exc
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step < plan.total_steps:
                record.update(evaluate(accelerator, eval_split, config, eval_logprobs))
            completed = record.pop("epochs_completed")
            if accelerator.is_main_process and (step % config.log_every_steps == 0 or step == plan.total_steps):
                run.append_metrics(record)
            if accelerator.is_main_process:
                for epoch_record in completed:
                    run.append_metrics({"step": step, **epoch_record})
            if config.save_every_steps and step % config.save_every_steps == 0 and step < plan.total_steps:
                _save_checkpoint(accelerator, filler, epochs, run, step, digest, config.keep_checkpoints)
            progress.advance(record)
            if on_step is not None:
                on_step(record)

    # --- finish: eval, Hugging Face checkpoint, result
    if accelerator.is_main_process:
        for epoch_record in epochs.finish():
            run.append_metrics({"step": step, **epoch_record})
        run.append_metrics({"step": step, "event": "end", "steps": step, "passes": round(epochs.passes, 4),
                            "planned_steps": plan.total_steps})
    final_eval = evaluate(accelerator, eval_split, config, eval_logprobs)
    if accelerator.is_main_process:
        run.append_metrics({"step": step, "event": "eval", **final_eval})
    _save_final(accelerator, model, tokenizer, run, config, digest, step, precision)
    result = TrainResult(
        output_dir=run.root, checkpoint=run.final, metrics_path=run.metrics, config_hash=digest, steps=step,
        final_metrics={"last_step": record, "eval": final_eval, "data": data_counts, "precision": asdict(precision),
                       "replacement_totals": asdict(filler.totals), "passes": epochs.passes},
        stopped_early=stopped_early,
    )
    if accelerator.is_main_process:
        run.result.write_text(json.dumps(result.to_json(), indent=2))
    # No `end_training()`: it destroys the process group, and the CLI trains several
    # N_eff one after another in the same processes.
    accelerator.wait_for_everyone()
    return result


def _optimizer_step(config: TrainConfig, accelerator: Accelerator, model: nn.Module, optimizer: Any,
                    scheduler: Any, filler: BatchFiller, objective: Objective, split: TokenizedSplit,
                    plan: Plan, epochs: EpochLog, step: int) -> dict[str, Any]:
    """One optimizer step over `plan.accumulation_steps` full micro-batches; its metrics
    record (with `epochs_completed`: the records of epochs this step ends, for the log)."""
    started = time.perf_counter()
    lr = scheduler.get_last_lr()[0]
    sums = torch.zeros(5, dtype=torch.float64, device=accelerator.device)  # loss, F, log p, examples, tokens
    for _ in range(plan.accumulation_steps):
        indices = filler.next_micro_batch()
        batch = split.batch(indices, accelerator.device)
        with accelerator.accumulate(model):
            seq_logp = model(**batch)
            loss, factors = objective(indices, seq_logp)
            accelerator.backward(loss)
        size = torch.tensor(float(len(indices)), device=accelerator.device)
        sums += torch.stack([loss.detach() * size, factors.sum(), seq_logp.detach().sum(), size,
                             batch["attention_mask"].sum()]).to(torch.float64)
    # Invariant: the last micro-batch of a step synchronises gradients, so the optimizer steps.
    assert accelerator.sync_gradients, "gradient accumulation out of step with the optimizer"
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm) if config.max_grad_norm else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    counts = filler.pop_counts()
    totals = accelerator.reduce(
        torch.cat([sums, torch.tensor([counts.discarded, counts.scored, counts.drawn], dtype=torch.float64,
                                      device=sums.device)]),
        reduction="sum",
    ).cpu().tolist()
    loss_sum, factor_sum, logp_sum, examples, tokens, discarded, scored, drawn = totals
    completed = epochs.add_step(int(drawn), int(examples), int(discarded), int(scored))
    elapsed = time.perf_counter() - started
    return {
        "step": step,
        "epoch": round(epochs.passes, 4),  # passes over the training split drawn so far
        "drawn": int(drawn),
        "loss": loss_sum / examples,
        "mean_F": factor_sum / examples,
        "mean_logp": logp_sum / examples,
        "discarded": int(discarded),
        "scored": int(scored),
        "tokens": int(tokens),
        "tokens_per_s": tokens / elapsed,
        "step_time_s": elapsed,
        "lr": lr,
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "epochs_completed": completed,
    }


# ---------------------------------------------------------------------- no-grad forwards


def _no_grad_logprobs_fn(accelerator: Accelerator, model: nn.Module, split: TokenizedSplit,
                         chunk: int) -> Callable[[Sequence[int]], Tensor]:
    """`indices -> [len] float32 log p` under the current weights, without gradients.

    Runs the unwrapped module (no DDP hooks) in eval mode, in chunks of `chunk` examples.
    With several processes every process runs the same number of forwards (padding with
    repeats of one example), since under ZeRO-3 a forward is a collective operation.
    """
    def logprobs(indices: Sequence[int]) -> Tensor:
        indices = list(indices)
        chunks = [indices[i : i + chunk] for i in range(0, len(indices), chunk)]
        if accelerator.num_processes > 1:
            most = int(accelerator.gather(torch.tensor([len(chunks)], device=accelerator.device)).max())
            chunks += [[0]] * (most - len(chunks))
        inner = accelerator.unwrap_model(model)
        was_training = inner.training
        inner.eval()
        out = []
        try:
            with torch.no_grad(), accelerator.autocast():
                for part in chunks:
                    out.append(inner(**split.batch(part, accelerator.device)).float().cpu())
        finally:
            inner.train(was_training)
        return torch.cat(out)[: len(indices)] if out else torch.zeros(0)
    return logprobs


def _any_across_processes(accelerator: Accelerator) -> Callable[..., tuple[bool, ...]]:
    """`flags -> any over processes of each flag` (one all-reduce)."""
    def sync(*flags: bool) -> tuple[bool, ...]:
        if accelerator.num_processes == 1:
            return flags
        total = accelerator.reduce(torch.tensor(flags, dtype=torch.float32, device=accelerator.device),
                                   reduction="sum")
        return tuple(bool(value > 0) for value in total)
    return sync


@torch.no_grad()
def evaluate(accelerator: Accelerator, split: TokenizedSplit, config: TrainConfig,
             logprobs: Callable[[Sequence[int]], Tensor]) -> dict[str, Any]:
    """Eval-split metrics under the current weights: mean DCO loss (step-wise, the
    training `n_eff`), mean summed NLL, mean F, mean per-token NLL. Empty split -> count 0."""
    if len(split) == 0:
        return {"eval_examples": 0}
    mine = list(range(accelerator.process_index, len(split), accelerator.num_processes))
    logp = logprobs(mine).double()
    tokens = float(sum(sum(1 for t in split.dataset[i]["labels"] if t != -100) for i in mine))
    sums = torch.tensor([
        stepwise_dco_loss(logp, config.n_eff, reduction="sum").item(),
        (-logp).sum().item(),
        coverage_weight(logp, config.n_eff).sum().item(),
        len(mine),
        tokens,
    ], dtype=torch.float64, device=accelerator.device)
    loss, nll, factor, count, tokens = accelerator.reduce(sums, reduction="sum").cpu().tolist()
    return {"eval_loss": loss / count, "eval_nll": nll / count, "eval_mean_F": factor / count,
            "eval_token_nll": nll / tokens, "eval_examples": int(count)}


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(accelerator: Accelerator, filler: BatchFiller, epochs: EpochLog, run: RunDir, step: int,
                     digest: str, keep: int) -> None:
    """Resumable state after optimizer step `step`; written to `.tmp`, renamed when complete."""
    final = run.checkpoints / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with _quiet("accelerate.utils.other"):  # "Removed shared tensor": tied weights are stored once
        accelerator.save_state(str(tmp))
    (tmp / f"replacement_rank{accelerator.process_index}.json").write_text(json.dumps(filler.state_dict()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config_hash": digest,
                                                            "epochs": asdict(epochs)}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        complete = sorted(p for p in run.checkpoints.glob("step-*") if not p.name.endswith(".tmp"))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator: Accelerator, filler: BatchFiller, epochs: EpochLog, path: Path,
                     digest: str) -> int:
    state = json.loads((path / "trainer_state.json").read_text())
    if state["config_hash"] != digest:
        raise ConfigError(f"checkpoint {path} was written by a different training config "
                          f"(hash {state['config_hash']}, now {digest}); use another output dir or overwrite")
    replacement = path / f"replacement_rank{accelerator.process_index}.json"
    if not replacement.is_file():
        raise ConfigError(f"checkpoint {path} has no {replacement.name}: it was written with a different number of processes")
    accelerator.load_state(str(path))
    filler.load_state_dict(json.loads(replacement.read_text()))
    if "epochs" not in state:
        raise ConfigError(f"checkpoint {path} was written by an older trainer (no per-epoch log); "
                          f"use another output dir or overwrite")
    for key, value in state["epochs"].items():
        setattr(epochs, key, value)
    return int(state["step"])


def _save_final(accelerator: Accelerator, model: nn.Module, tokenizer: Any, run: RunDir, config: TrainConfig,
                digest: str, step: int, precision: Precision) -> None:
    """Hugging Face checkpoint (weights, config, tokenizer) in `final/`, written via `final.tmp`."""
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3
    if accelerator.is_main_process:
        tmp = run.final.with_name(FINAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        lm = accelerator.unwrap_model(model).lm
        # bf16 runs are saved in bf16 (what vLLM and from_pretrained(dtype="auto") then use).
        save_dtype = getattr(torch, precision.checkpoint)
        weights = {k.removeprefix("lm."): v.to(save_dtype) if v.is_floating_point() else v
                   for k, v in state_dict.items()}
        lm.config.dtype = save_dtype
        lm.config.use_cache = True  # training may have turned it off for gradient checkpointing
        lm.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        info = {"n_eff": config.n_eff, "loss": config.loss, "epsilon": config.epsilon, "base_model": config.model,
                "config_hash": digest, "steps": step, "precision": asdict(precision),
                "config": config.model_dump(mode="json"),
                # Read back by every generator of this checkpoint (training.prompt.generation_prompt_budget).
                "prompt_budget": config.prompt_budget}
        (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2))
        shutil.rmtree(run.final, ignore_errors=True)
        tmp.rename(run.final)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence one logger's warnings for the duration of the block."""
    target = logging.getLogger(logger_name)
    previous = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(previous)


# ------------------------------------------------------------------------------ progress


class _ProgressBar:
    """A rich progress bar over optimizer steps (main process, `config.progress` only)."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator, plan: Plan, start: int) -> None:
        self.enabled = config.progress and accelerator.is_main_process
        self.bar = Progress(TextColumn(f"N_eff={config.n_eff}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not self.enabled)
        self.task = self.bar.add_task("train", total=plan.total_steps, completed=start, info="")

    def __enter__(self) -> "_ProgressBar":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def advance(self, record: dict[str, Any]) -> None:
        info = f"loss {record['loss']:.3f}  F {record['mean_F']:.3f}  discarded {record['discarded']}"
        self.bar.update(self.task, advance=1, info=info)
