"""Service configuration: one pydantic model, read from a YAML or TOML file.

Every limit the service enforces lives here, with its unit. The embedded default
(`ServiceConfig()`) runs on this machine: SQLite under `data_dir`, the backend chosen by
availability (`auto`: real Lean when `lake` and the REPL build are present).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetCaps(_Strict):
    """Largest budget a request may ask for (a request above a cap gets 422)."""

    max_depth: int = Field(50, ge=1)
    time_limit_s: float = Field(600.0, gt=0, description="seconds of wall clock per job")
    max_expansions: int = Field(2000, ge=1)
    tactics_per_expansion: int = Field(32, ge=1)
    max_passes: int = Field(4096, ge=1)
    tactic_timeout_s: float = Field(60.0, gt=0, description="seconds per tactic")


class DefaultBudget(_Strict):
    """Budget of a request that does not name one (each field capped by `BudgetCaps`)."""

    max_depth: int = Field(50, ge=1)
    time_limit_s: float = Field(300.0, gt=0)
    max_expansions: int = Field(100, ge=1)
    tactics_per_expansion: int = Field(8, ge=1)
    max_passes: int = Field(64, ge=1)
    tactic_timeout_s: float = Field(10.0, gt=0)


class Limits(_Strict):
    max_statement_chars: int = Field(20_000, ge=1)
    max_header_chars: int = Field(4_000, ge=1)
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="request body size, bytes (413 above)")
    max_queue: int = Field(1000, ge=1, description="queued jobs (all keys) before POST /v1/proofs answers 503")
    max_check_tactics: int = Field(1000, ge=1)
    max_tactic_chars: int = Field(4000, ge=1)
    check_timeout_s: float = Field(120.0, gt=0, description="seconds POST /v1/check waits for its verification")
    max_batch_items: int = Field(100, ge=1, description="proof requests in one POST /v1/proofs:batch")
    budget_caps: BudgetCaps = Field(default_factory=BudgetCaps)
    default_budget: DefaultBudget = Field(default_factory=DefaultBudget)

    @model_validator(mode="after")
    def _defaults_within_caps(self) -> "Limits":
        for name, cap in self.budget_caps.model_dump().items():
            if getattr(self.default_budget, name) > cap:
                raise ValueError(f"limits.default_budget.{name} exceeds limits.budget_caps.{name} ({cap})")
        return self


class AuthConfig(_Strict):
    """API keys. A key file is JSON written by `dco-prover serve --add-key NAME` (see `service.auth`)."""

    keys_file: Path | None = Field(None, description="default: <data_dir>/api_keys.json")
    allow_anonymous: bool = Field(
        False, description="accept requests without a key (as key id 'anonymous'); only for loopback demos"
    )
    rate_per_s: float = Field(20.0, gt=0, description="default per-key token-bucket refill, requests per second")
    burst: int = Field(40, ge=1, description="default per-key bucket size, requests")
    max_concurrent_jobs: int = Field(16, ge=1, description="default per-key queued+running jobs")
    max_open_streams: int = Field(8, ge=1, description="default per-key open event streams (GET /v1/proofs/{id}/events)")
    max_concurrent_checks: int = Field(2, ge=1, description="default per-key POST /v1/check requests in flight")


class WorkerConfig(_Strict):
    count: int = Field(default_factory=lambda: max(1, min(4, (os.cpu_count() or 2) - 1)), ge=1)
    max_attempts: int = Field(
        3, ge=1, description="runs of one job (server crashes, worker deaths) before it is answered with an error"
    )
    startup_timeout_s: float = Field(900.0, gt=0, description="seconds a worker may take to load its backend")
    grace_s: float = Field(
        10.0, gt=0, description="seconds past a job's time limit (or a cancel's tactic timeout) before its worker is killed"
    )
    poll_interval_s: float = Field(0.5, gt=0, description="seconds between queue polls when idle")


class GeneratorConfig(_Strict):
    """Which tactic generators the workers load (`prover.runner.GeneratorSpec`).

    `oracle`: the replay data's recorded tactics among distractors (replay backend only: a
    demo that proves most connected sample theorems). `fixed`: a fixed tactic list
    (`tactics`, or the default list). `model`: `models` (checkpoint directories or
    `tiny-qwen2`) and/or the trainer's `ensemble_manifest`; each becomes an ensemble member,
    loaded in-process by every worker — the one-user demo (one worker). `openai`: the model
    servers (`vllm serve` per member, `dco-prover serve-models`) named by the endpoints
    manifest `endpoints` (or one server at `url`, serving `served_model`): the workers hold
    no model, they are clients, so N workers share one set of engines, which batch the
    workers' concurrent requests. `/readyz` reports each member's endpoint health.
    """

    kind: Literal["oracle", "fixed", "model", "openai"] = "fixed"
    endpoints: Path | None = Field(None, description="endpoints manifest (JSON) of the model servers, written by serve-models")
    url: str | None = Field(None, description="one model server's root, http://host:port (instead of endpoints)")
    served_model: str | None = Field(None, description="with url: the served model name (default: the server's only model)")
    tokenizer: str | None = Field(
        None,
        description="openai: the served checkpoint's directory (or tokenizer id) whose tokenizer and trained prompt "
        "budget build the prompts (training.prompt.build_prompt); default: each manifest member's checkpoint",
    )
    tactics: list[str] | None = None
    models: list[str] = Field(default_factory=list)
    ensemble_manifest: Path | None = None
    device: str | None = None
    dtype: str | None = None
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(96, ge=1)
    oracle_seed: int = 0

    @model_validator(mode="after")
    def _models_named(self) -> "GeneratorConfig":
        if self.kind == "model" and not self.models and self.ensemble_manifest is None:
            raise ValueError("generators.kind = 'model' needs generators.models or generators.ensemble_manifest")
        if self.kind != "model" and (self.models or self.ensemble_manifest is not None):
            raise ValueError(f"generators.models/ensemble_manifest need generators.kind = 'model', not {self.kind!r}")
        if self.kind == "openai" and (self.endpoints is None) == (self.url is None):
            raise ValueError("generators.kind = 'openai' needs exactly one of generators.endpoints (a manifest) or generators.url")
        if self.kind != "openai" and (self.endpoints is not None or self.url is not None or self.served_model is not None):
            raise ValueError(f"generators.endpoints/url/served_model need generators.kind = 'openai', not {self.kind!r}")
        if self.kind != "openai" and self.tokenizer is not None:
            raise ValueError(f"generators.tokenizer needs generators.kind = 'openai', not {self.kind!r}")
        if self.served_model is not None and self.url is None:
            raise ValueError("generators.served_model goes with generators.url (a manifest names each member's model)")
        return self


class BackendConfig(_Strict):
    """`auto`: real Lean (REPL) when available, otherwise no backend (readyz says why).

    `replay`: the recorded LeanDojo sample (tests, demos); `latency_s` is slept per tactic
    to stand in for Lean's cost (seconds). `theorems`: what a request's `theorem_id` names.
    """

    kind: Literal["auto", "repl", "replay"] = "auto"
    replay_data: Path | None = Field(None, description="LeanDojo benchmark JSON; default: the bundled sample")
    latency_s: float = Field(0.0, ge=0)
    theorem_source: Literal["leandojo_sample", "minif2f", "none"] | None = Field(
        None, description="default: leandojo_sample for replay, minif2f for Lean"
    )
    repl_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of prover.lean.repl_env.ReplEnvironment"
    )
    generators: GeneratorConfig = Field(default_factory=GeneratorConfig)
    strategy: Literal["best_first", "sampling"] = "best_first"
    ensemble: Literal["union", "mixture"] = "union"


class RetentionConfig(_Strict):
    """Finished jobs older than `max_age_days` are deleted (then the database is compacted)."""

    max_age_days: float | None = Field(30.0, gt=0, description="days after a job finished; null keeps every job")
    interval_s: float = Field(3600.0, gt=0, description="seconds between purges (the first runs at startup)")


class ServiceConfig(_Strict):
    data_dir: Path = Field(Path("runs/service"), description="SQLite job store and default key file live here")
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL: an accepted job survives power loss; NORMAL: survives a process crash only"
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: Limits = Field(default_factory=Limits)
    workers: WorkerConfig = Field(default_factory=WorkerConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @model_validator(mode="after")
    def _in_process_models_for_one_worker(self) -> "ServiceConfig":
        if self.backend.generators.kind == "model" and self.workers.count > 1:
            raise ValueError(
                f"generators.kind = 'model' loads every model into each of the {self.workers.count} workers; in-process "
                "models are for the one-user demo (workers.count: 1). For more workers, serve the models once "
                "(`dco-prover serve-models`) and set generators.kind = 'openai' with generators.endpoints"
            )
        return self

    @property
    def keys_path(self) -> Path:
        return self.auth.keys_file if self.auth.keys_file is not None else self.data_dir / "api_keys.json"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"


def load_config(path: str | Path | None = None, **overrides: object) -> ServiceConfig:
    """Read a YAML (`.yaml`/`.yml`) or TOML (`.toml`) file; `overrides` (not None) replace top-level keys.

    Relative paths inside the file are resolved against the file's directory; those in
    `overrides` (command-line values) against the working directory. Unknown keys
    are errors (a misspelt limit must not silently fall back to its default).
    """
    data: dict = {}
    base: Path | None = None
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"service config file not found: {file}")
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".toml":
            data = tomllib.loads(text)
        elif file.suffix in {".yaml", ".yml"}:
            data = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"service config must be .yaml, .yml or .toml, got {file.name}")
        if not isinstance(data, dict):
            raise ValueError(f"service config {file} must be a mapping at the top level")
        base = file.resolve().parent
    config = ServiceConfig.model_validate(data)
    if base is not None:
        config = _resolve_paths(config, base)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:  # command-line values: relative to the working directory, validated like the file
        config = ServiceConfig.model_validate({**config.model_dump(), **given})
    return config


def _resolve_paths(config: ServiceConfig, base: Path) -> ServiceConfig:
    def fix(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else base / p

    update = {}
    if (p := fix(config.data_dir)) is not None:
        update["data_dir"] = p
    config = config.model_copy(update=update)
    if (p := fix(config.auth.keys_file)) is not None:
        config.auth = config.auth.model_copy(update={"keys_file": p})
    backend = config.backend
    if (p := fix(backend.replay_data)) is not None:
        backend = backend.model_copy(update={"replay_data": p})
    if (p := fix(backend.generators.ensemble_manifest)) is not None:
        backend = backend.model_copy(
            update={"generators": backend.generators.model_copy(update={"ensemble_manifest": p})}
        )
    if (p := fix(backend.generators.endpoints)) is not None:
        backend = backend.model_copy(update={"generators": backend.generators.model_copy(update={"endpoints": p})})
    config.backend = backend
    return config
