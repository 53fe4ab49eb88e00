"""The settings of an evaluation and the picklable specs that rebuild its parts in any process.

A Ray actor (or a worker thread) receives specs, not live objects: `BenchmarkSpec.load()`
gives the theorems, `EnvSpec.build()` a fresh environment, `build_member(...)` one tactic
generator. `EvalConfig.to_json()` is what `config.json` stores; `identity()` is the part
a resumed run must repeat (everything that changes what a record means), while the
distribution settings (`workers`, Ray, retries, `limit`) may change between runs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from search.budget import Budget
from search.types import ProofEnvironment, TacticGenerator, Theorem


ENV_KINDS = ("replay", "repl", "dojo")
ENSEMBLE_MODES = ("independent", "union", "shared", "mixture")
BACKENDS = ("transformers", "vllm")
SPECIAL_GENERATORS = ("oracle", "fixed")
OPENAI = "openai"  # members served by model servers (completions clients)


class EvalConfigError(ValueError):
    """A setting of the evaluation is invalid; the message names it."""


# ----------------------------------------------------------------------------- benchmarks


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark column. `name` keys its records (`leandojo:<file stem>`, `minif2f:<split>`)."""

    name: str
    format: str  # "leandojo" | "minif2f"
    path: str
    split: str | None = None
    label: str = ""
    env: str | None = None  # this benchmark's environment kind; None: the run's `EnvSpec.kind`

    def load(self) -> list[Theorem]:
        from prover.theorems import load_leandojo, load_minif2f

        if self.format == "minif2f":
            return load_minif2f(self.path, split=self.split)
        if self.split is not None:
            raise EvalConfigError(f"benchmark {self.name}: --split applies to miniF2F files only (LeanDojo files are one split each)")
        return load_leandojo(self.path)


def parse_benchmark_arg(text: str, default_split: str | None = None) -> tuple[str, str | None]:
    """`SOURCE@SPLIT` (e.g. `minif2f@test`) → (source, split); without `@`, the default
    split applies to miniF2F sources only (a LeanDojo file is one split)."""
    source, sep, split = text.rpartition("@")
    if sep and source and split and "/" not in split:
        return source, split
    is_minif2f = text == "minif2f" or text.endswith(".jsonl")
    return text, default_split if is_minif2f else None


def resolve_benchmark(source: str, split: str | None = None, env: str | None = None) -> BenchmarkSpec:
    """`minif2f` (bundled), `leandojo` (the bundled LeanDojo sample), or a file: `.jsonl` is
    miniF2F's format, anything else LeanDojo Benchmark 4 JSON. `env`: the environment kind
    this benchmark runs in (None: the run's default)."""
    spec = _resolve_benchmark(source, split)
    if env is not None:
        if env not in ENV_KINDS:
            raise EvalConfigError(f"unknown environment {env!r}; choose one of {', '.join(ENV_KINDS)}")
        spec = replace(spec, env=env)
    return spec


def _resolve_benchmark(source: str, split: str | None = None) -> BenchmarkSpec:
    if source == "minif2f":
        from prover.theorems import MINIF2F_PATH

        split_name = split or "all"
        return BenchmarkSpec(f"minif2f:{split_name}", "minif2f", str(MINIF2F_PATH), split, f"miniF2F {split_name}")
    if source == "leandojo":
        from training.data import SAMPLE_PATH

        path = Path(SAMPLE_PATH)
    else:
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise EvalConfigError(f"benchmark file {source} does not exist (use 'minif2f', 'leandojo' or a file path)")
    if path.suffix == ".jsonl":
        split_name = split or "all"
        return BenchmarkSpec(f"minif2f:{path.stem}:{split_name}", "minif2f", str(path), split, f"miniF2F {path.stem} {split_name}")
    if split is not None:
        raise EvalConfigError("--split applies to miniF2F (.jsonl) benchmarks only; a LeanDojo file is one split")
    return BenchmarkSpec(f"leandojo:{path.stem}", "leandojo", str(path), None, f"LeanDojo {path.stem}")


# ----------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class EnvSpec:
    """How to build one proof environment.

    `replay`: the recorded transitions of `replay_sources` (LeanDojo JSON files) with
    `latency_s` seconds slept per tactic (0 = as fast as possible; a positive value stands
    in for Lean's cost in benchmarks). `repl` / `dojo`: the Lean backends of `prover.runner`.
    """

    kind: str = "replay"
    replay_sources: tuple[str, ...] = ()
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ENV_KINDS:
            raise EvalConfigError(f"unknown environment {self.kind!r}; choose one of {', '.join(ENV_KINDS)}")
        if self.latency_s < 0:
            raise EvalConfigError(f"tactic latency must be >= 0 seconds, got {self.latency_s!r}")

    def build(self) -> ProofEnvironment:
        if self.kind == "replay":
            return build_replay(self.replay_sources, self.latency_s)
        from prover import runner  # the Lean backends (REPL pool, LeanDojo)

        return runner.make_environment(self.kind)


def build_replay(sources: Sequence[str], latency_s: float = 0.0):
    """A `ReplayEnvironment` over the traced tactics of every LeanDojo file in `sources`."""
    from prover.replay import ReplayEnvironment
    from training.data import read_benchmark

    theorems = [t for source in sources for t in read_benchmark(source)]
    return ReplayEnvironment(theorems, latency_s=latency_s)


# ----------------------------------------------------------------------------- generators


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member: a name (the row of Table 2) and where its generator comes from.

    `source` is a checkpoint directory, `tiny-qwen2`, or for `kind` `oracle` / `fixed` the
    kind itself. `kind`: `transformers`, `vllm`, `oracle`, `fixed`, or `openai` (`source` is
    the model server's URL and `model` its served model name, None: the only one it serves).
    """

    name: str
    source: str
    kind: str = "transformers"
    model: str | None = None
    n_eff: int | None = None  # from the ensemble manifest; N_eff = 1 is the CE member
    tokenizer: str | None = None  # openai: the served checkpoint (tokenizer and prompt budget of its prompts)


@dataclass(frozen=True)
class GeneratorOptions:
    """Sampling settings shared by the members.

    `temperature` (> 0), `max_new_tokens` per tactic, `beam_search` (k best beams instead
    of k samples), `device`/`dtype` for transformers (device None: CUDA when visible), `gpu_memory_fraction` per vLLM
    engine (several members share a GPU), `seed` for the oracle and vLLM.
    """

    temperature: float = 1.0
    max_new_tokens: int = 96
    beam_search: bool = False
    device: str | None = None
    dtype: str | None = None
    gpu_memory_fraction: float = 0.2
    seed: int = 0


def parse_members(
    models: Sequence[str] | None,
    manifest: str | None,
    generator: str | None,
    backend: str = "transformers",
    endpoints: str | None = None,
    generator_url: str | None = None,
    served_model: str | None = None,
    tokenizer: str | None = None,
) -> list[MemberSpec]:
    """Members from `--models` (`PATH`, `tiny-qwen2` or `NAME=PATH`), an ensemble manifest,
    a model-free `--generator` (`oracle`, `fixed`), or model servers (`--generator openai`
    with `--generator-url URL` for one member or `--endpoints FILE` for an ensemble).
    Exactly one source must be given."""
    if generator == OPENAI or endpoints is not None or generator_url is not None:
        if generator not in (None, OPENAI) or models or manifest is not None:
            raise EvalConfigError("--generator-url/--endpoints give the members: drop --models, --ensemble and other --generator values")
        return _openai_members(endpoints, generator_url, served_model, tokenizer)
    given = [x for x in (bool(models), manifest is not None, generator is not None) if x]
    if len(given) != 1:
        raise EvalConfigError("give exactly one of --ensemble MANIFEST, --models ... or --generator oracle|fixed")
    if backend not in BACKENDS:
        raise EvalConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if generator is not None:
        if generator not in SPECIAL_GENERATORS:
            raise EvalConfigError(f"unknown --generator {generator!r}; choose one of {', '.join(SPECIAL_GENERATORS)}")
        return [MemberSpec(generator, generator, generator)]
    members: list[MemberSpec] = []
    if manifest is not None:
        members = _manifest_members(Path(manifest).expanduser(), backend)
    else:
        members = _model_members(list(models or ()), backend)
    names = [m.name for m in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvalConfigError(f"member name(s) {', '.join(duplicates)} used twice; name them with NAME=PATH")
    from prover.eval.records import ENSEMBLE

    if ENSEMBLE in names:
        raise EvalConfigError(f"{ENSEMBLE!r} is reserved for the ensemble row; rename that member")
    return members


def _model_members(models: list[str], backend: str) -> list[MemberSpec]:
    from training.modeling import TINY_MODEL

    members = []
    for text in models:
        name, sep, source = text.partition("=")
        if not sep:
            name, source = "", text
        if source != TINY_MODEL:
            path = Path(source).expanduser()
            if not (path / "config.json").is_file():
                raise EvalConfigError(f"model {source!r} is not a checkpoint directory with a config.json (or {TINY_MODEL!r})")
            source = str(path.resolve())
            name = name or path.name
        members.append(MemberSpec(name or TINY_MODEL, source, backend))
    return members


def _manifest_members(manifest: Path, backend: str) -> list[MemberSpec]:
    from training.ensemble import read_manifest

    if not manifest.exists():
        raise EvalConfigError(f"ensemble manifest {manifest} does not exist")
    try:
        entries = list(read_manifest(manifest).members)  # checkpoints come back absolute and checked
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EvalConfigError(f"ensemble manifest {manifest} cannot be read: {err}") from err
    if not entries:
        raise EvalConfigError(f"ensemble manifest {manifest} lists no members")
    members = []
    for entry in entries:
        path = Path(entry.checkpoint)
        if not path.is_absolute():
            path = manifest.parent / path
        if not (path / "config.json").is_file():
            raise EvalConfigError(f"member {entry.name!r} of {manifest}: {path} is not a checkpoint directory with a config.json")
        members.append(MemberSpec(entry.name, str(path.resolve()), backend, n_eff=getattr(entry, "n_eff", None)))
    return members


def _openai_members(endpoints: str | None, generator_url: str | None, served_model: str | None,
                    tokenizer: str | None = None) -> list[MemberSpec]:
    if (endpoints is None) == (generator_url is None):
        raise EvalConfigError("--generator openai needs exactly one of --generator-url URL or --endpoints FILE")
    from prover.eval.records import ENSEMBLE
    from prover.generators.endpoints import EndpointsError, read_endpoints
    from prover.generators.openai_client import normalise_base_url

    if generator_url is not None:
        try:
            url = normalise_base_url(generator_url)
        except ValueError as err:
            raise EvalConfigError(str(err)) from err
        return [MemberSpec(served_model or OPENAI, url, OPENAI, served_model, tokenizer=tokenizer)]
    try:
        manifest = read_endpoints(Path(endpoints).expanduser())
    except EndpointsError as err:
        raise EvalConfigError(str(err)) from err
    if ENSEMBLE in {m.name for m in manifest.members}:
        raise EvalConfigError(f"{ENSEMBLE!r} is reserved for the ensemble row; rename that member in {endpoints}")
    return [MemberSpec(m.name, m.base_url, OPENAI, m.model, n_eff=m.n_eff, tokenizer=tokenizer or m.checkpoint) for m in manifest.members]


def build_member(member: MemberSpec, options: GeneratorOptions, replay_sources: Sequence[str] = ()) -> TacticGenerator:
    """The member's generator, built in the calling process (a worker or a generator actor)."""
    if member.kind == OPENAI:
        from prover.generators.openai_client import OpenAICompletionsGenerator

        if options.beam_search:
            raise EvalConfigError("beam search is not offered through model servers: sample (drop --beam)")
        from prover.generators.openai_client import MissingTokenizer

        try:
            return OpenAICompletionsGenerator(
                member.source, model=member.model, name=member.name, tokenizer=member.tokenizer,
                temperature=options.temperature, max_new_tokens=options.max_new_tokens,
            )
        except MissingTokenizer as err:
            raise EvalConfigError(f"{err} (--tokenizer, or 'checkpoint' in the endpoints manifest)") from err
    if member.kind == "fixed":
        from prover.generators.fixed import FixedTacticGenerator

        return FixedTacticGenerator(name=member.name)
    if member.kind == "oracle":
        from prover.generators.oracle import OracleGenerator

        if not replay_sources:
            raise EvalConfigError("the oracle generator needs LeanDojo data (a leandojo benchmark) to know the recorded tactics")
        return OracleGenerator(build_replay(replay_sources), seed=options.seed, name=member.name)
    if member.kind == "vllm":
        from prover.generators.vllm_gen import load_vllm_or_fallback

        return load_vllm_or_fallback(member.source, name=member.name, options=options)
    import torch

    from prover.generators.transformers_gen import TransformersGenerator

    torch.manual_seed(options.seed)
    return TransformersGenerator.load(
        member.source,
        name=member.name,
        device=options.device or ("cuda" if torch.cuda.is_available() else None),
        dtype=options.dtype,
        temperature=options.temperature,
        max_new_tokens=options.max_new_tokens,
        beam_search=options.beam_search,
    )


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Distribution:
    """Where and how the work runs; may change when a run is resumed.

    `workers`: prover workers (Ray actors or threads), each with its own environment.
    `use_ray`: Ray actors (local cluster unless `ray_address`); else threads in-process.
    `cpus_per_prover`, `gpu_fraction_per_model`: Ray resource requests (a generator actor
    asks for no GPU when none is visible). `max_retries`: re-dispatches of a theorem whose
    worker died or raised, before it is recorded as an error. `task_timeout_s`: a theorem
    still running after this many seconds has its worker killed and counts as a failed try
    (None: derived from the budget). `batch_max_states` / `batch_wait_s`: the generator
    batcher's limits (`batch_wait_s` None: its adaptive window). `object_store_mb`: the local Ray object store size.
    """

    workers: int = 1
    use_ray: bool = False
    ray_address: str | None = None
    cpus_per_prover: float = 1.0
    gpu_fraction_per_model: float = 0.0
    max_retries: int = 2
    task_timeout_s: float | None = None
    batch_max_states: int = 64
    batch_wait_s: float | None = None
    object_store_mb: int = 256

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise EvalConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.max_retries < 0:
            raise EvalConfigError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.cpus_per_prover < 0 or self.gpu_fraction_per_model < 0:
            raise EvalConfigError("resource requests (--cpus-per-prover, --gpu-fraction-per-model) must be >= 0")
        if self.task_timeout_s is not None and self.task_timeout_s <= 0:
            raise EvalConfigError(f"task timeout must be > 0 seconds, got {self.task_timeout_s}")


@dataclass(frozen=True)
class EvalConfig:
    """Everything an evaluation needs; `to_json` is stored in `config.json`."""

    benchmarks: tuple[BenchmarkSpec, ...]
    members: tuple[MemberSpec, ...]
    env: EnvSpec = field(default_factory=EnvSpec)
    strategy: str = "best_first"
    budget: Budget = field(default_factory=Budget)
    ensemble: str = "independent"
    length_alpha: float = 0.0
    samples_per_step: int = 1
    parallel_passes: int = 1
    generator_options: GeneratorOptions = field(default_factory=GeneratorOptions)
    distribution: Distribution = field(default_factory=Distribution)
    limit: int | None = None
    all_passes: bool = False  # sampling: every pass even after a proof, counting successes (pass@n)
    baseline: str | None = None  # member searched again with `baseline_factor`× the budget
    baseline_factor: int | None = None  # None: the number of members (the paper's 5× CE row)

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise EvalConfigError("no benchmark given")
        if not self.members:
            raise EvalConfigError("no ensemble member given")
        if self.ensemble not in ENSEMBLE_MODES:
            raise EvalConfigError(f"unknown ensemble mode {self.ensemble!r}; choose one of {', '.join(ENSEMBLE_MODES)}")
        if self.limit is not None and self.limit < 1:
            raise EvalConfigError(f"--limit must be >= 1, got {self.limit}")
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise EvalConfigError(f"a benchmark is given twice: {names}")
        if self.baseline is not None:
            if self.baseline not in self.member_names:
                raise EvalConfigError(f"baseline member {self.baseline!r} is not a member ({', '.join(self.member_names)})")
            if self.ensemble == "mixture":
                raise EvalConfigError("the equal-compute baseline needs member rows (not with --ensemble-mode mixture)")
        if self.baseline_factor is not None and self.baseline_factor < 1:
            raise EvalConfigError(f"baseline factor must be >= 1, got {self.baseline_factor}")

    @property
    def baseline_row(self) -> str | None:
        """The member name of the equal-compute baseline's records (e.g. `neff-1 ×5`)."""
        if self.baseline is None:
            return None
        return f"{self.baseline} ×{self.effective_baseline_factor}"

    @property
    def effective_baseline_factor(self) -> int:
        return self.baseline_factor if self.baseline_factor is not None else len(self.members)

    def env_kind(self, benchmark: str) -> str:
        """The environment kind a benchmark's theorems run in."""
        for bench in self.benchmarks:
            if bench.name == benchmark:
                return bench.env or self.env.kind
        raise KeyError(benchmark)

    @property
    def env_kinds(self) -> list[str]:
        return sorted({b.env or self.env.kind for b in self.benchmarks})

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def task_timeout_s(self) -> float:
        """Seconds after which a theorem's worker is presumed hung (the budget's wall clock per
        member, doubled, plus a minute for start-up and verification)."""
        if self.distribution.task_timeout_s is not None:
            return self.distribution.task_timeout_s
        members = len(self.members) + (self.effective_baseline_factor if self.baseline is not None else 0)
        return 2.0 * self.budget.time_limit_s * members + 60.0

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmarks": [asdict(b) for b in self.benchmarks],
            # `tokenizer` only when set, so runs stored before it existed still resume.
            "members": [{k: v for k, v in asdict(m).items() if k != "tokenizer" or v is not None} for m in self.members],
            "env": {**asdict(self.env), "replay_sources": list(self.env.replay_sources)},
            "strategy": self.strategy,
            "budget": self.budget.to_json(),
            "ensemble": self.ensemble,
            "length_alpha": self.length_alpha,
            "samples_per_step": self.samples_per_step,
            "parallel_passes": self.parallel_passes,
            "generator_options": asdict(self.generator_options),
            "distribution": asdict(self.distribution),
            "limit": self.limit,
            "baseline": self.baseline,
            "baseline_factor": self.baseline_factor,
            "all_passes": self.all_passes,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "EvalConfig":
        env = dict(data["env"])
        env["replay_sources"] = tuple(env.get("replay_sources", ()))
        return cls(
            benchmarks=tuple(BenchmarkSpec(**b) for b in data["benchmarks"]),
            members=tuple(MemberSpec(**m) for m in data["members"]),
            env=EnvSpec(**env),
            strategy=data["strategy"],
            budget=Budget(**data["budget"]),
            ensemble=data["ensemble"],
            length_alpha=float(data.get("length_alpha", 0.0)),
            samples_per_step=int(data.get("samples_per_step", 1)),
            parallel_passes=int(data.get("parallel_passes", 1)),
            generator_options=GeneratorOptions(**data.get("generator_options", {})),
            distribution=Distribution(**data.get("distribution", {})),
            limit=data.get("limit"),
            baseline=data.get("baseline"),
            baseline_factor=data.get("baseline_factor"),
            all_passes=bool(data.get("all_passes", False)),
        )

    def with_distribution(self, distribution: Distribution) -> "EvalConfig":
        return replace(self, distribution=distribution)


# Where the work runs, not what it computes: free to change when a run is resumed.
DISTRIBUTION_OPTIONS = ("device", "gpu_memory_fraction")


def identity(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the stored run (see the module docstring):
    everything but the distribution (workers, Ray, devices, GPU shares), `limit` and the
    bookkeeping; settings added later compare equal to their defaults."""
    ignored = {"distribution", "limit", "expected", "duplicates"}
    out = {k: v for k, v in config_json.items() if k not in ignored}
    options = dict(out.get("generator_options") or {})
    for key in DISTRIBUTION_OPTIONS:
        options.pop(key, None)
    out["generator_options"] = options
    default_env = (out.get("env") or {}).get("kind")
    out["benchmarks"] = [{**b, "env": b.get("env") or default_env} for b in out.get("benchmarks", [])]
    out["members"] = [{"model": None, "n_eff": None, **m} for m in out.get("members", [])]
    out.setdefault("baseline", None)
    out.setdefault("baseline_factor", None)
    out.setdefault("all_passes", False)
    return out


def cpu_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
