"""Train one checkpoint per N_eff and write the ensemble manifest naming them.

The one loop shared by `dco-prover train`, the end-to-end pipeline and expert iteration.
Each member is its own resumable run in `root/neff-N/`; the manifest is rewritten after
every member, so a partial ensemble is usable and a killed run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.ensemble import MANIFEST_NAME, EnsembleMember, member_name, write_manifest


def member_summary(final_metrics: dict[str, Any], stopped_early: str | None) -> dict[str, Any]:
    """The few metrics a manifest keeps per member (last loss and mean F, eval NLL, discards)."""
    last = final_metrics.get("last_step", {})
    summary = {k: last.get(k) for k in ("loss", "mean_F", "epoch") if k in last}
    summary.update(dict(final_metrics.get("eval", {})))
    summary["discarded_total"] = final_metrics.get("replacement_totals", {}).get("discarded", 0)
    if stopped_early:
        summary["stopped_early"] = stopped_early
    return summary


def member_configs(base: TrainConfig, n_effs: Sequence[int] | None, root: Path) -> list[TrainConfig]:
    """One config per N_eff (default: the base config's own), output in `root/neff-N`."""
    return [base.with_overrides(n_eff=n, output_dir=root / member_name(n)) for n in (n_effs or [base.n_eff])]


def train_ensemble(
    runs: Sequence[TrainConfig],
    manifest_path: Path,
    *,
    on_start: Callable[[TrainConfig], None] | None = None,
    on_step: Callable[[TrainConfig, dict[str, Any]], None] | None = None,
) -> list[EnsembleMember]:
    """Train `runs` in order and write `manifest_path` after each (main process only).

    `on_start(run)` is called before each run; `on_step(run, record)` with each optimizer
    step's metrics record (the trainer's step callback)."""
    from training.trainer import distributed_state, train

    main_process = distributed_state(deepspeed=any(run.deepspeed is not None for run in runs)).is_main_process
    members: list[EnsembleMember] = []
    for run in runs:
        if on_start is not None and main_process:
            on_start(run)
        step_hook = None if on_step is None else (lambda record, run=run: on_step(run, record))
        result = train(run, on_step=step_hook)
        members.append(
            EnsembleMember(
                name=member_name(run.n_eff),
                n_eff=run.n_eff,
                checkpoint=str(result.checkpoint),
                base_model=run.model,
                loss=run.loss,
                epsilon=run.epsilon,
                config_hash=result.config_hash,
                steps=result.steps,
                metrics=member_summary(result.final_metrics, result.stopped_early),
            )
        )
        if main_process:
            write_manifest(manifest_path, members)
    return members


__all__ = ["MANIFEST_NAME", "member_configs", "member_summary", "train_ensemble"]
