"""Proving one theorem: settings, environment and generator construction, and the search call.

The CLI (`dco-prover prove`), the service and batch evaluation all go through this module:
`ProveSettings` says how to search, `make_environment` / `make_generators` build the
backend and the tactic generators, `prove` runs the search with a shared cache.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, get_args

from prover.cache import CachingEnvironment
from search.budget import Budget
from search.result import SearchResult
from search.types import ProofEnvironment, TacticGenerator, Theorem

Strategy = Literal["best_first", "sampling"]
EnsembleMode = Literal["independent", "union", "shared", "mixture"]  # union: independent's former name
EnvKind = Literal["replay", "repl", "dojo"]
GeneratorKind = Literal["fixed", "oracle", "model", "openai"]

SETUP_HINT = "run `dco-prover setup-lean` to install Lean and the REPL, and `dco-prover doctor` to see what is missing"


class EnvironmentUnavailable(RuntimeError):
    """The requested proof environment cannot run on this machine; the message says how to fix it."""


def _choice(value: str, kind: Any, what: str) -> None:
    options = get_args(kind)
    if value not in options:
        raise ValueError(f"{what} must be one of {', '.join(options)}; got {value!r}")


@dataclass(frozen=True)
class GeneratorSpec:
    """Which tactic generators to build.

    - `fixed`: `fixed_tactics` (default `prover.generators.fixed.DEFAULT_TACTICS`);
    - `oracle`: the replay data's recorded tactics among distractors (replay only; tests
      and benchmarks), seeded by `oracle_seed`;
    - `model`: `models` (checkpoint directories or `tiny-qwen2`) and/or the trainer's
      `ensemble_manifest`, sampled at `temperature` (or beam search), on `device` in `dtype`;
    - `openai`: clients of model servers (`vllm serve`, `dco-prover serve-models`): one
      server at `generator_url` (its only served model, unless `served_model` names one),
      or every member of the endpoints manifest `endpoints`; sampled at `temperature`.
      Prompts are token ids built with the served checkpoint's tokenizer: `tokenizer`
      (a checkpoint directory or hub id; for an endpoints manifest it overrides every
      member's `checkpoint`); without one the clients refuse to start unless
      `text_prompts` (see `prover.generators.openai_client`).
    """

    kind: GeneratorKind = "fixed"
    models: tuple[str, ...] = ()
    ensemble_manifest: str | None = None
    device: str | None = None
    dtype: str | None = None
    temperature: float = 1.0
    max_new_tokens: int = 96
    beam_search: bool = False
    fixed_tactics: tuple[str, ...] | None = None
    oracle_seed: int = 0
    generator_url: str | None = None
    endpoints: str | None = None
    served_model: str | None = None
    tokenizer: str | None = None  # openai: the served checkpoint's directory (or hub id) for prompt tokens
    text_prompts: bool = False  # openai: without a tokenizer, send text (the server truncates by another rule)

    def __post_init__(self) -> None:
        _choice(self.kind, GeneratorKind, "generator kind")
        if self.kind == "openai":
            if (self.generator_url is None) == (self.endpoints is None):
                raise ValueError("the openai generator needs exactly one of --generator-url URL or --endpoints FILE")
            if self.beam_search:
                raise ValueError("beam search is not offered through model servers: sample (drop --beam)")
        elif self.generator_url is not None or self.endpoints is not None:
            raise ValueError(f"--generator-url/--endpoints need the openai generator, not {self.kind!r}")
        elif self.tokenizer is not None:
            raise ValueError(f"--tokenizer goes with the openai generator, not {self.kind!r}")
        if self.kind == "model" and not self.models and self.ensemble_manifest is None:
            raise ValueError("the model generator needs --models or --ensemble")
        if self.kind != "model" and (self.models or self.ensemble_manifest is not None):
            raise ValueError(f"--models/--ensemble need the model generator, not {self.kind!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")


@dataclass(frozen=True)
class ProveSettings:
    """How to search for one proof. `budget` applies per ensemble member for `union`.

    `length_alpha` is best-first's depth^α length normalisation (0 = none);
    `forbidden_tactics` replaces the shared filter's default list when given;
    `cache` wraps the environment in a `CachingEnvironment` shared by all members.
    Sampling only: `samples_per_step` tactics are asked per step and one is drawn in
    proportion to its probability; `parallel_passes` passes walk in lockstep (one batched
    generator call per round); `seed` seeds that draw.
    """

    strategy: Strategy = "best_first"
    budget: Budget = field(default_factory=Budget)
    ensemble_mode: EnsembleMode = "union"
    length_alpha: float = 0.0
    forbidden_tactics: tuple[str, ...] | None = None
    env: EnvKind = "replay"
    benchmark: str | None = None  # LeanDojo JSON for the replay environment (default: bundled sample)
    generator: GeneratorSpec = field(default_factory=GeneratorSpec)
    cache: bool = True
    samples_per_step: int = 1
    parallel_passes: int = 1
    seed: int | None = 0
    all_passes: bool = False  # sampling: run every pass after a proof, counting successful passes (pass@n)

    def __post_init__(self) -> None:
        _choice(self.strategy, Strategy, "strategy")
        _choice(self.ensemble_mode, EnsembleMode, "ensemble mode")
        _choice(self.env, EnvKind, "environment")
        for name in ("samples_per_step", "parallel_passes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.length_alpha >= 0:
            raise ValueError(f"length_alpha must be >= 0, got {self.length_alpha!r}")
        if self.generator.kind == "oracle" and self.env != "replay":
            raise ValueError("the oracle generator only works with the replay environment")

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["budget"] = self.budget.to_json()
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "ProveSettings":
        data = dict(record)
        data["budget"] = Budget(**data.get("budget", {}))
        spec = dict(data.get("generator", {}))
        for key in ("models", "fixed_tactics"):
            if spec.get(key) is not None:
                spec[key] = tuple(spec[key])
        data["generator"] = GeneratorSpec(**spec)
        if data.get("forbidden_tactics") is not None:
            data["forbidden_tactics"] = tuple(data["forbidden_tactics"])
        return cls(**data)


# ------------------------------------------------------------------ environments


def make_environment(kind: EnvKind, *, benchmark: str | Path | None = None, **options: Any) -> ProofEnvironment:
    """A proof environment of `kind` (not entered; use it as a context manager).

    `replay`: `ReplayEnvironment` over `benchmark` (default: the bundled LeanDojo sample);
    `options` may set `latency_s`. `repl` / `dojo`: the Lean backends of `prover.lean`,
    constructed with `options`; `EnvironmentUnavailable` when they cannot run here.
    """
    _choice(kind, EnvKind, "environment")
    if kind == "replay":
        from prover.replay import ReplayEnvironment

        return ReplayEnvironment.from_benchmark(benchmark, **options)
    if kind == "repl":
        missing = lean_problems()
        if missing:
            raise EnvironmentUnavailable("the 'repl' environment needs Lean: " + "; ".join(missing) + f". {SETUP_HINT}")
        from prover.lean.repl_env import ReplEnvironment

        return ReplEnvironment(**options)
    try:
        from prover.lean.dojo_env import DojoEnvironment

        return DojoEnvironment(**options)
    except ImportError as err:  # LeanDojoUnavailable carries the install hint
        raise EnvironmentUnavailable(f"the 'dojo' environment is not available: {err}. {SETUP_HINT}") from err


def lean_problems() -> list[str]:
    """What is missing for the REPL backend (the Mathlib build is not required here: a
    statement that imports only Lean core needs none), as `detail (fix: ...)` strings."""
    from prover.lean.readiness import lean_readiness

    return [
        f"{check.name}: {check.detail}" + (f" (fix: {check.how_to_fix})" if check.how_to_fix else "")
        for check in lean_readiness()
        if check.required and not check.ok and check.name != "mathlib cache"
    ]


def _replay_of(env: ProofEnvironment | None):
    from prover.replay import ReplayEnvironment

    while isinstance(env, CachingEnvironment):
        env = env.env
    return env if isinstance(env, ReplayEnvironment) else None


def make_generators(spec: GeneratorSpec, *, env: ProofEnvironment | None = None) -> dict[str, TacticGenerator]:
    """Named tactic generators for `spec`; `env` is needed by the oracle (a replay environment,
    possibly wrapped in a cache). Model loading errors raise `GeneratorLoadError`."""
    if spec.kind == "fixed":
        from prover.generators.fixed import DEFAULT_TACTICS, FixedTacticGenerator

        return {"fixed": FixedTacticGenerator(spec.fixed_tactics or DEFAULT_TACTICS)}
    if spec.kind == "oracle":
        from prover.generators.oracle import OracleGenerator

        replay = _replay_of(env)
        if replay is None:
            raise ValueError("the oracle generator needs the replay environment")
        return {"oracle": OracleGenerator(replay, seed=spec.oracle_seed)}
    if spec.kind == "openai":
        return _openai_generators(spec)
    from prover.generators.loading import load_generators

    return load_generators(
        list(spec.models) or None,
        Path(spec.ensemble_manifest) if spec.ensemble_manifest is not None else None,
        device=spec.device,
        dtype=spec.dtype,
        temperature=spec.temperature,
        max_new_tokens=spec.max_new_tokens,
        beam_search=spec.beam_search,
    )


def _openai_generators(spec: GeneratorSpec) -> dict[str, TacticGenerator]:
    """Completions clients: one for `generator_url`, or one per member of `endpoints`.
    A bad manifest raises `GeneratorLoadError` naming the problem."""
    from prover.generators.endpoints import EndpointsError, endpoint_generators
    from prover.generators.loading import GeneratorLoadError
    from prover.generators.openai_client import MissingTokenizer, OpenAICompletionsGenerator

    options = dict(temperature=spec.temperature, max_new_tokens=spec.max_new_tokens, text_prompts=spec.text_prompts)
    try:
        if spec.generator_url is not None:
            generator = OpenAICompletionsGenerator(spec.generator_url, model=spec.served_model,
                                                   tokenizer=spec.tokenizer, **options)
            return {generator.name: generator}
        return endpoint_generators(str(spec.endpoints), tokenizer=spec.tokenizer, **options)
    except (EndpointsError, MissingTokenizer) as err:
        raise GeneratorLoadError(str(err)) from err


# ------------------------------------------------------------------------ proving


def prove(
    theorem: Theorem,
    env: ProofEnvironment,
    generators: Mapping[str, TacticGenerator] | TacticGenerator,
    settings: ProveSettings,
    progress: Callable[[dict], None] | None = None,
    cancel: threading.Event | None = None,
) -> SearchResult:
    """Search for a proof of `theorem` in an entered `env`; never raises for search-time
    failures (they are in the result). The environment is wrapped in a cache shared by the
    ensemble members unless `settings.cache` is false or it is one already."""
    from search.api import search
    from search.tactic_filter import TacticFilter

    if settings.cache and not isinstance(env, CachingEnvironment):
        env = CachingEnvironment(env)
    tactic_filter = TacticFilter(settings.forbidden_tactics) if settings.forbidden_tactics is not None else None
    return search(
        theorem,
        env,
        generators,
        strategy=settings.strategy,
        budget=settings.budget,
        ensemble=settings.ensemble_mode,
        tactic_filter=tactic_filter,
        length_alpha=settings.length_alpha,
        samples_per_step=settings.samples_per_step,
        parallel_passes=settings.parallel_passes,
        seed=settings.seed,
        progress=progress,
        cancel=cancel,
        all_passes=settings.all_passes,
    )
