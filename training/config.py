"""Training configuration: one validated record, loaded from YAML plus overrides.

Precedence, lowest first: the defaults below (the paper's theorem-proving recipe for
Qwen2.5-Math-1.5B), then a YAML file, then explicit overrides (the command line).
A YAML file may name a bundled config (`tiny`, `default`) instead of a path.

Units: learning rate per optimizer step; `batch_size` counts examples per optimizer step
over all processes; `epochs` counts passes over the training split (fractions allowed;
replacement draws from the same passes);
`max_length` counts tokens; `epsilon` is a value of the DCO factor `F` in [0, 1).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_TACTIC_ROOM = 128
"""Tokens of `max_length` kept for the tactic and EOS when no prompt budget is set (at most a quarter)."""

CONFIG_DIR = Path(str(resources.files("training") / "configs"))
BUNDLED_CONFIGS = {"default": CONFIG_DIR / "default.yaml", "tiny": CONFIG_DIR / "tiny.yaml"}

# Fields that do not change what is trained (where it goes, how it is reported and
# checkpointed); everything else enters `config_hash`.
_NOT_HASHED = frozenset(
    {"output_dir", "save_every_steps", "keep_checkpoints", "log_every_steps", "progress", "overwrite"}
)


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message names the problem."""


class TrainConfig(BaseModel):
    """One training run (one `N_eff`). See the module docstring for units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # What to train.
    model: str = Field("Qwen/Qwen2.5-Math-1.5B", description="HF hub id, local path, or `tiny-qwen2`.")
    tokenizer: str | None = Field(None, description="Tokenizer id/path; defaults to `model`.")
    data: Path | None = Field(None, description="LeanDojo Benchmark 4 JSON file; default the bundled sample.")
    eval_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="Fraction of theorems held out (split by theorem).")
    max_length: int = Field(1024, ge=8, description="Tokens per example (prompt + tactic + EOS).")
    length_policy: Literal["truncate_left", "drop"] = "truncate_left"
    max_prompt_tokens: int | None = Field(
        None,
        ge=8,
        description=(
            "Prompt budget in tokens: longer prompts are shortened to it (training.prompt.build_prompt) "
            "in training and, read back from the checkpoint's dco_training.json, by its generators, "
            "so both see the same tokens. None: max_length minus min(128, max_length // 4) for the tactic."
        ),
    )

    # The objective.
    n_eff: int = Field(1, ge=1, description="DCO's N_eff; 1 is cross-entropy.")
    loss: Literal["stepwise", "proof_level"] = "stepwise"
    epsilon: float = Field(
        0.3,
        ge=0.0,
        lt=1.0,
        description=(
            "Threshold replacement: examples with F < epsilon are replaced by fresh ones. "
            "0.3 is the paper's value, 0.1 the authors' code default; 0 disables it."
        ),
    )

    # Optimisation.
    lr: float = Field(1e-5, gt=0.0)
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant",
        description=(
            "After warmup: constant at lr (the paper states only the warmup; the authors' code keeps "
            "the rate constant), or linear decay towards 0 at the planned last step."
        ),
    )
    warmup_steps: int = Field(
        20, ge=0, description="Linear warmup: optimizer step s <= warmup_steps runs at lr * s / warmup_steps."
    )
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping; null disables.")
    batch_size: int = Field(64, ge=1, description="Examples per optimizer step, all processes together.")
    micro_batch_size: int = Field(8, ge=1, description="Examples per forward pass per process.")
    epochs: float = Field(
        3.0,
        gt=0.0,
        description=(
            "Passes over the training split. Threshold replacement draws replacements from the "
            "same passes, so discards shorten the run (fewer steps), never add passes."
        ),
    )
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps (the schedule uses the cap).")
    seed: int = 0

    # Hardware.
    bf16: bool = Field(
        True,
        description=(
            "bf16 mixed precision with fp32 master weights: without DeepSpeed, fp32 weights "
            "(whatever the checkpoint's dtype) under bf16 autocast; with DeepSpeed, its bf16 mode "
            "(bf16 module weights, fp32 master copies in the ZeRO optimizer). The final checkpoint "
            "is saved in bf16. False: fp32 throughout."
        ),
    )
    gradient_checkpointing: bool = False
    fused_logprobs: bool = Field(
        True,
        description=(
            "Project only completion positions to the vocabulary, in chunks (never the "
            "full logits). Ignored under DeepSpeed ZeRO-3."
        ),
    )
    torch_compile: bool = Field(False, description="torch.compile the decoder (GPU; ignored under DeepSpeed).")
    deepspeed: Path | None = Field(None, description="DeepSpeed JSON config (ZeRO-2/3 shipped in training/configs).")

    # Bookkeeping.
    output_dir: Path = Path("runs/train")
    save_every_steps: int = Field(200, ge=0, description="Resumable checkpoint period in optimizer steps; 0 = none.")
    keep_checkpoints: int = Field(2, ge=1, description="Resumable checkpoints kept (newest).")
    log_every_steps: int = Field(1, ge=1)
    eval_every_steps: int = Field(500, ge=0, description="Eval-split loss period; 0 = only at the end.")
    progress: bool = True
    overwrite: bool = Field(False, description="Delete an existing run in output_dir instead of resuming it.")

    @model_validator(mode="after")
    def _check_consistency(self) -> "TrainConfig":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size}): the batch is micro_batch_size x gradient "
                f"accumulation steps x processes"
            )
        if self.max_prompt_tokens is not None and self.max_prompt_tokens >= self.max_length:
            raise ValueError(
                f"max_prompt_tokens ({self.max_prompt_tokens}) must leave room for the tactic within "
                f"max_length ({self.max_length})"
            )
        if self.data is not None and not self.data.is_file():
            raise ValueError(f"data file not found: {self.data}")
        if self.deepspeed is not None and not self.deepspeed.is_file():
            raise ValueError(f"deepspeed config not found: {self.deepspeed}")
        return self

    @property
    def prompt_budget(self) -> int:
        """Prompt tokens per example (and per generated prompt of the checkpoint); the rest
        of `max_length` is room for the tactic and EOS."""
        if self.max_prompt_tokens is not None:
            return self.max_prompt_tokens
        return self.max_length - min(DEFAULT_TACTIC_ROOM, self.max_length // 4)

    @property
    def replacement_active(self) -> bool:
        """Threshold replacement runs only where it can discard: F ≡ 1 when n_eff = 1."""
        return self.epsilon > 0.0 and self.n_eff > 1

    def with_overrides(self, **overrides: Any) -> "TrainConfig":
        """A validated copy with `overrides` applied (None values are ignored)."""
        return _validate({**self.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}, "overrides")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def config_hash(config: TrainConfig) -> str:
    """Hex digest (16 chars) of everything that determines the trained weights."""
    fields = {k: v for k, v in config.model_dump(mode="json").items() if k not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def resolve_config_path(path_or_name: str | Path) -> Path:
    """A YAML path, or the path of a bundled config named `tiny` or `default`."""
    if str(path_or_name) in BUNDLED_CONFIGS:
        return BUNDLED_CONFIGS[str(path_or_name)]
    path = Path(path_or_name)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (bundled configs: {', '.join(BUNDLED_CONFIGS)})")
    return path


def load_config(path_or_name: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file (if any), then `overrides` (None values ignored)."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path_or_name is not None:
        path = resolve_config_path(path_or_name)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _validate(values, source)


def _validate(values: dict[str, Any], source: str) -> TrainConfig:
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid training config ({source}): {problems}") from None
