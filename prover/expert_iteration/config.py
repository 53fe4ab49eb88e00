"""The settings of an expert-iteration run: one validated record, from YAML plus overrides.

Units: seconds for `time_limit_s` / `tactic_timeout_s`; `max_passes` is pass@N of the
sampling strategy (the paper used pass@1k); `holdout_fraction` in (0, 1) is the share of
the theorems with recorded proofs whose proofs are withheld from training and that form
the initial unproved set (used only when `unproved` is not given); `eval_fraction` in
(0, 1) is the share held out FIRST as the fixed evaluation split, disjoint from every
theorem whose proof is trained on (the default evaluation benchmark).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ExpertConfigError(ValueError):
    """An expert-iteration setting that cannot be used; the message names it."""


class SearchSettings(BaseModel):
    """The proof search of one stage (the search stage, or the evaluation stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["sampling", "best_first"] = "sampling"
    max_passes: int = Field(1000, ge=1, description="sampling: pass@N per member (paper: 1000).")
    max_expansions: int = Field(100, ge=1, description="best_first: node expansions at most.")
    tactics_per_expansion: int = Field(8, ge=1)
    max_depth: int = Field(50, ge=1, description="Proof steps on a path at most.")
    time_limit_s: float = Field(600.0, gt=0.0, description="Wall-clock seconds per theorem per member.")
    tactic_timeout_s: float = Field(10.0, gt=0.0, description="Wall-clock seconds per tactic.")
    temperature: float = Field(1.0, gt=0.0)
    max_new_tokens: int = Field(96, ge=1, description="Tokens per generated tactic at most.")
    limit: int | None = Field(None, ge=1, description="Only the first N theorems (smoke runs).")
    seed: int = 0


class ExpertConfig(BaseModel):
    """One expert-iteration run. See the module docstring for units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(2, ge=1, description="Expert iterations after the initial training (iteration 0).")
    n_effs: list[int] = Field(default_factory=lambda: [1], min_length=1, description="One ensemble member per N_eff.")
    train_config: str = Field("tiny", description="Training YAML, or a bundled name ('tiny', 'default').")
    train_overrides: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields applied on top.")
    retrain_from: Literal["base", "previous"] = Field(
        "base", description="Retrain each N_eff from the base model, or from its previous iteration's checkpoint."
    )
    data: Path | None = Field(None, description="LeanDojo Benchmark 4 JSON with proofs; default the bundled sample.")
    unproved: Path | None = Field(None, description="LeanDojo JSON of theorems to prove; default: held out of `data`.")
    holdout_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    eval_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Share of the proved theorems held out as the fixed evaluation split (never trained on)."
    )
    holdout_seed: int = 0
    env: Literal["replay", "repl", "dojo"] = "replay"
    env_sources: list[Path] = Field(
        default_factory=list, description="replay: LeanDojo files whose transitions form the environment (default: data + unproved)."
    )
    search: SearchSettings = Field(default_factory=SearchSettings)
    eval: SearchSettings = Field(default_factory=lambda: SearchSettings(strategy="best_first", max_expansions=100))
    eval_benchmark: str | None = Field(
        None, description="Benchmark of the evaluation stage ('minif2f', 'leandojo', a file); default: the fixed held-out evaluation split."
    )
    search_generator: Literal["oracle", "fixed"] | None = Field(
        None, description="Debug/tests only: search with this model-free generator instead of the trained ensemble."
    )
    backend: Literal["transformers", "vllm"] = "transformers"
    workers: int = Field(1, ge=1, description="Prover workers of the search and evaluation stages.")
    ray_address: str | None = Field(None, description="Run searches on this Ray cluster ('auto' inside one); None: threads.")

    @model_validator(mode="after")
    def _check(self) -> "ExpertConfig":
        if len(set(self.n_effs)) != len(self.n_effs) or any(n < 1 for n in self.n_effs):
            raise ValueError(f"n_effs must be distinct integers >= 1, got {self.n_effs}")
        for name in ("data", "unproved"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} file not found: {path}")
        for path in self.env_sources:
            if not path.is_file():
                raise ValueError(f"env_sources file not found: {path}")
        if self.search_generator == "oracle" and self.env != "replay":
            raise ValueError("search_generator 'oracle' needs env 'replay'")
        if self.env == "replay" and self.eval_benchmark is not None and (
            self.eval_benchmark == "minif2f" or self.eval_benchmark.endswith(".jsonl")
        ):
            raise ValueError("eval_benchmark: miniF2F needs a Lean environment (env 'repl' or 'dojo'), not 'replay'")
        forbidden = {"n_eff", "data", "output_dir", "model"} & set(self.train_overrides)
        if forbidden:
            raise ValueError(f"train_overrides may not set {', '.join(sorted(forbidden))}: expert iteration sets them per stage")
        return self

    def identity(self) -> dict[str, Any]:
        """What a resumed run must repeat: everything but `iterations` (a run may be extended), `workers` and `ray_address`."""
        data = json.loads(self.model_dump_json())
        data.pop("iterations")
        data.pop("workers")
        data.pop("ray_address")
        return data


def load_expert_config(path: str | Path | None = None, **overrides: Any) -> ExpertConfig:
    """Defaults, then a YAML file (if any), then `overrides` (None values ignored;
    `search`/`eval`/`train_overrides` mappings are merged key by key)."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        file = Path(path)
        source = str(file)
        if not file.is_file():
            raise ExpertConfigError(f"expert-iteration config not found: {file}")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise ExpertConfigError(f"{file}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ExpertConfigError(f"{file}: expected a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded or {})
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("search", "eval", "train_overrides") and isinstance(value, dict):
            values[key] = {**(values.get(key) or {}), **value}
        else:
            values[key] = value
    try:
        return ExpertConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ExpertConfigError(f"invalid expert-iteration config ({source}): {problems}") from None
