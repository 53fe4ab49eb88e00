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
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from transformers import get_scheduler

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
from training.replacement import BatchFiller, ExampleStream, ReplacementExhausted

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"
RESULT = "train_result.json"
TRAINING_INFO = "dco_training.json"  # inside final/: what produced the checkpoint

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
                                             length_policy=config.length_policy)
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
        """F per example under the current model (for threshold replacement)."""
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
    """Step arithmetic. `total_steps` optimizer steps of `batch_size` examples each."""

    world_size: int
    accumulation_steps: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, config: TrainConfig, num_train: int, world_size: int) -> "Plan":
        per_step = config.micro_batch_size * world_size
        if config.batch_size % per_step:
            raise ConfigError(
                f"batch_size {config.batch_size} is not a multiple of micro_batch_size "
                f"{config.micro_batch_size} x {world_size} processes"
            )
        total = math.ceil(config.epochs * num_train / config.batch_size)
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        return cls(world_size, config.batch_size // per_step, math.ceil(num_train / config.batch_size), max(total, 1))


def distributed_state() -> PartialState:
    """The process group this process belongs to (one process unless launched by
    `accelerate launch`/`torchrun`). Without CUDA a multi-process launch is CPU DDP (gloo),
    which accelerate only selects when asked for the CPU explicitly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return PartialState(cpu=not torch.cuda.is_available() and world > 1)


def make_accelerator(config: TrainConfig, accumulation_steps: int) -> Accelerator:
    plugin = None
    if config.deepspeed is not None:
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"--deepspeed {config.deepspeed} needs DeepSpeed, which is not installed: "
                              f"pip install -e '.[gpu]' on a CUDA machine, then run under `accelerate launch`")
        plugin = DeepSpeedPlugin(
            hf_ds_config=str(config.deepspeed),
            gradient_accumulation_steps=accumulation_steps,
            gradient_clipping=config.max_grad_norm or 0.0,
        )
    accelerator = Accelerator(
        cpu=distributed_state().use_distributed and not torch.cuda.is_available(),
        gradient_accumulation_steps=accumulation_steps,
        mixed_precision="bf16" if config.bf16 else "no",
        deepspeed_plugin=plugin,
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
    state = distributed_state()
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
    lm = load_causal_lm(config.model, gradient_checkpointing=config.gradient_checkpointing)
    if config.torch_compile and config.deepspeed is None:
        lm.get_decoder().compile()  # in place: parameter names (and checkpoints) unchanged
    model = CompletionLogProbs(lm, fused=config.fused_logprobs and not _is_zero3(accelerator))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
        fused=accelerator.device.type == "cuda" and config.deepspeed is None,
    )
    scheduler = get_scheduler(
        "linear" if config.lr_schedule == "linear" else "constant_with_warmup",
        optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=plan.total_steps,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
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
    )

    # --- resume
    step = 0
    latest = run.latest_checkpoint()
    if latest is not None:
        step = _load_checkpoint(accelerator, filler, latest[1], digest)
        logger.info("resumed %s from step %d", run.root, step)
    if accelerator.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
        (run.root / "config.yaml").write_text(config.to_yaml())
        run.truncate_metrics(step)  # a killed run may have logged steps after its last checkpoint
        if step == 0:
            run.append_metrics({"step": 0, "event": "start", "config_hash": digest, "plan": asdict(plan),
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
                                         objective, train_split, plan, step)
            except ReplacementExhausted as exc:
                stopped_early = str(exc)
                step -= 1
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
            if accelerator.is_main_process and (step % config.log_every_steps == 0 or step == plan.total_steps):
                run.append_metrics(record)
            if config.save_every_steps and step % config.save_every_steps == 0 and step < plan.total_steps:
                _save_checkpoint(accelerator, filler, run, step, digest, config.keep_checkpoints)
            progress.advance(record)
            if on_step is not None:
                on_step(record)

    # --- finish: eval, Hugging Face checkpoint, result
    final_eval = evaluate(accelerator, eval_split, config, eval_logprobs)
    if accelerator.is_main_process:
        run.append_metrics({"step": step, "event": "eval", **final_eval})
    _save_final(accelerator, model, tokenizer, run, config, digest, step)
    result = TrainResult(
        output_dir=run.root, checkpoint=run.final, metrics_path=run.metrics, config_hash=digest, steps=step,
        final_metrics={"last_step": record, "eval": final_eval, "data": data_counts,
                       "replacement_totals": asdict(filler.totals)},
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
                    plan: Plan, step: int) -> dict[str, Any]:
    """One optimizer step over `plan.accumulation_steps` full micro-batches; its metrics record."""
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
        torch.cat([sums, torch.tensor([counts.discarded, counts.scored], dtype=torch.float64, device=sums.device)]),
        reduction="sum",
    ).cpu().tolist()
    loss_sum, factor_sum, logp_sum, examples, tokens, discarded, scored = totals
    elapsed = time.perf_counter() - started
    return {
        "step": step,
        "epoch": round(filler.stream.epochs_done, 4),
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


def _any_across_processes(accelerator: Accelerator) -> Callable[[bool, bool], tuple[bool, bool]]:
    def sync(short: bool, exhausted: bool) -> tuple[bool, bool]:
        if accelerator.num_processes == 1:
            return short, exhausted
        flags = accelerator.reduce(torch.tensor([short, exhausted], dtype=torch.float32, device=accelerator.device),
                                   reduction="sum")
        return bool(flags[0] > 0), bool(flags[1] > 0)
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


def _save_checkpoint(accelerator: Accelerator, filler: BatchFiller, run: RunDir, step: int, digest: str,
                     keep: int) -> None:
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
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config_hash": digest}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        complete = sorted(p for p in run.checkpoints.glob("step-*") if not p.name.endswith(".tmp"))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator: Accelerator, filler: BatchFiller, path: Path, digest: str) -> int:
    state = json.loads((path / "trainer_state.json").read_text())
    if state["config_hash"] != digest:
        raise ConfigError(f"checkpoint {path} was written by a different training config "
                          f"(hash {state['config_hash']}, now {digest}); use another output dir or overwrite")
    replacement = path / f"replacement_rank{accelerator.process_index}.json"
    if not replacement.is_file():
        raise ConfigError(f"checkpoint {path} has no {replacement.name}: it was written with a different number of processes")
    accelerator.load_state(str(path))
    filler.load_state_dict(json.loads(replacement.read_text()))
    return int(state["step"])


def _save_final(accelerator: Accelerator, model: nn.Module, tokenizer: Any, run: RunDir, config: TrainConfig,
                digest: str, step: int) -> None:
    """Hugging Face checkpoint (weights, config, tokenizer) in `final/`, written via `final.tmp`."""
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3
    if accelerator.is_main_process:
        tmp = run.final.with_name(FINAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        lm = accelerator.unwrap_model(model).lm
        # bf16 runs are saved in bf16 (what vLLM and from_pretrained(dtype="auto") then use).
        save_dtype = torch.bfloat16 if config.bf16 else torch.float32
        weights = {k.removeprefix("lm."): v.to(save_dtype) if v.is_floating_point() else v
                   for k, v in state_dict.items()}
        lm.config.dtype = save_dtype
        lm.config.use_cache = True  # training may have turned it off for gradient checkpointing
        lm.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        info = {"n_eff": config.n_eff, "loss": config.loss, "epsilon": config.epsilon, "base_model": config.model,
                "config_hash": digest, "steps": step, "config": config.model_dump(mode="json")}
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
