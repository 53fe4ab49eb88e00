"""The one place the service meets the prover: backend choice, theorem lookup, running a job.

API side (`plan_backend`, `TheoremCatalog`): which backend serves (real Lean when it is
ready, the replay environment when configured), why not when none, and what a request's
`theorem_id` names. Worker side (`WorkerBackend`): the environment and generators one
worker process loads once and uses for every job it runs.

How requests map to theorems:
- `theorem_id` names a theorem of the catalog: with the replay backend, the `full_name` of a
  LeanDojo sample theorem that has traced tactics (only those have a recorded root goal);
  with a Lean backend, a miniF2F theorem (its statement and header come from the bundled file).
- `statement` (+ `header`) is a Lean declaration, elaborated by a Lean backend only; the
  replay backend cannot elaborate text, so it refuses statements (422).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from search.types import Theorem
from service.config import ServiceConfig


@dataclass(frozen=True)
class Check:
    """One readiness fact (mirrors `prover.lean.readiness`' records)."""

    name: str
    ok: bool
    detail: str = ""
    how_to_fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "how_to_fix": self.how_to_fix}


@dataclass(frozen=True)
class BackendPlan:
    """The backend this server uses (`kind` None: none can run; `reason` says why)."""

    kind: str | None
    checks: list[Check] = field(default_factory=list)
    theorem_source: str = "none"

    @property
    def reason(self) -> str:
        failed = [c for c in self.checks if not c.ok]
        return "; ".join(f"{c.name}: {c.detail}" + (f" (fix: {c.how_to_fix})" if c.how_to_fix else "") for c in failed)


def lean_checks() -> list[Check]:
    """Readiness of the real-Lean backend (`prover.lean.readiness`); optional checks
    (LeanDojo) are reported but never block."""
    from prover.lean.readiness import lean_readiness

    return [Check(r.name, r.ok or not r.required, r.detail, "" if r.ok else r.how_to_fix) for r in lean_readiness()]


def plan_backend(config: ServiceConfig) -> BackendPlan:
    """The backend to use; cheap (no data is loaded: `TheoremCatalog.build` does that)."""
    backend = config.backend
    if backend.kind == "replay":
        return BackendPlan("replay", [], backend.theorem_source or "leandojo_sample")
    checks = lean_checks()
    ready = all(c.ok for c in checks)
    return BackendPlan("repl" if ready else None, checks, backend.theorem_source or "minif2f")


def backend_versions(kind: str | None) -> dict[str, str | None]:
    """`{"backend", "lean", "mathlib"}` of a backend kind: for `repl`, the Lean project's pinned
    toolchain and Mathlib revision (`prover.lean.paths`); unknown (None) for `replay`."""
    if kind != "repl":
        return {"backend": kind, "lean": None, "mathlib": None}
    from prover.lean.paths import LEAN_TOOLCHAIN, MATHLIB_REV, lean_project_dir

    try:
        lean = (lean_project_dir() / "lean-toolchain").read_text(encoding="utf-8").strip() or LEAN_TOOLCHAIN
    except OSError:
        lean = LEAN_TOOLCHAIN
    return {"backend": kind, "lean": lean, "mathlib": MATHLIB_REV}


class TheoremCatalog:
    """The theorems a request may name by `theorem_id`."""

    def __init__(self, theorems: dict[str, Theorem], where: str, unopenable: dict[str, str] | None = None) -> None:
        self._theorems = theorems
        self.where = where
        self._unopenable = unopenable or {}  # id → why it cannot be opened

    def __len__(self) -> int:
        return len(self._theorems)

    def ids(self) -> list[str]:
        return list(self._theorems)

    @classmethod
    def build(cls, backend_kind: str | None, source: str, config: ServiceConfig) -> "TheoremCatalog":
        if source == "none":
            return cls({}, "no theorem source")
        if source == "minif2f":
            from prover.theorems import MINIF2F_PATH, load_minif2f

            return cls({t.id: t for t in load_minif2f()}, f"miniF2F ({MINIF2F_PATH.name})")
        from prover.replay import ReplayEnvironment

        data = config.backend.replay_data
        replay = ReplayEnvironment.from_benchmark(data)
        where = f"LeanDojo {'sample' if data is None else Path(data).name}"
        if backend_kind == "replay":
            theorems = {name: Theorem(id=name) for name in replay.startable_ids}
            unopenable = {name: verdict.message for name, verdict in replay.not_replayable.items()}
            return cls(theorems, where, unopenable)
        from prover.theorems import load_leandojo

        return cls({t.id: t for t in load_leandojo(data)}, where)

    def resolve(self, theorem_id: str) -> Theorem:
        """The theorem named `theorem_id`; `LookupError` naming the source and close matches."""
        theorem = self._theorems.get(theorem_id)
        if theorem is not None:
            return theorem
        if theorem_id in self._unopenable:
            raise LookupError(f"theorem {theorem_id!r} of {self.where} cannot be opened: {self._unopenable[theorem_id]}")
        from prover.theorems import TheoremNotFoundError, find_theorem

        try:
            find_theorem(list(self._theorems.values()), theorem_id)
        except TheoremNotFoundError as err:
            raise LookupError(str(err).replace("the given theorems", self.where)) from err
        raise LookupError(f"unknown theorem {theorem_id!r} in {self.where}")  # pragma: no cover


# ------------------------------------------------------------------ model endpoints


ENDPOINT_HEALTH_TIMEOUT_S = 2.0  # seconds one /health probe may take


def generation_endpoints(config: ServiceConfig) -> list[tuple[str, str, str | None]]:
    """`(member, base_url, served model)` of each model server the workers call
    (`generators.kind = 'openai'`); empty for in-process generators. Raises `ValueError` for
    an unusable endpoints manifest (the message names the file and the problem)."""
    g = config.backend.generators
    if g.kind != "openai":
        return []
    if g.url is not None:
        from prover.generators.openai_client import normalise_base_url

        # named as the client names itself (prover.runner): its model, else "openai"
        return [(g.served_model or "openai", normalise_base_url(g.url), g.served_model)]
    from prover.generators.endpoints import read_endpoints

    return [(m.name, m.base_url, m.model) for m in read_endpoints(str(g.endpoints)).members]


def endpoint_checks(config: ServiceConfig, timeout_s: float = ENDPOINT_HEALTH_TIMEOUT_S) -> list[Check]:
    """One readiness fact per member's model server: it answers `GET /health` (vLLM's
    liveness route) and lists the member's served model, within `timeout_s` seconds each
    (`OpenAICompletionsGenerator.health`). Probed concurrently; never raises."""
    if config.backend.generators.kind != "openai":
        return []
    try:
        endpoints = generation_endpoints(config)
    except (OSError, ValueError) as err:
        return [Check("model endpoints", False, str(err), "fix generators.endpoints (written by `dco-prover serve-models`)")]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(endpoints))) as pool:
        return list(pool.map(lambda e: _probe_endpoint(*e, timeout_s), endpoints))


def _probe_endpoint(member: str, base_url: str, model: str | None, timeout_s: float) -> Check:
    import time

    from prover.generators.openai_client import OpenAICompletionsGenerator

    started = time.monotonic()
    ok, detail = OpenAICompletionsGenerator(base_url, model=model, name=member, text_prompts=True).health(timeout_s)  # probes send no prompt
    if ok:
        return Check(f"model endpoint {member}", True, f"{base_url}: {detail} ({1000 * (time.monotonic() - started):.0f} ms)")
    fix = f"start the model server of {member!r} (`dco-prover serve-models`) or correct its URL/model in the endpoints manifest"
    return Check(f"model endpoint {member}", False, detail if base_url in detail else f"{base_url}: {detail}", fix)


class WorkerBackend:
    """What one worker process holds: an entered environment and the named generators."""

    def __init__(self, kind: str, config: ServiceConfig) -> None:
        from prover.runner import GeneratorSpec, make_environment, make_generators

        backend = config.backend
        g = backend.generators
        self.kind = kind
        self.config = config
        self.spec = GeneratorSpec(
            kind=g.kind,
            models=tuple(g.models),
            ensemble_manifest=str(g.ensemble_manifest) if g.ensemble_manifest is not None else None,
            device=g.device,
            dtype=g.dtype,
            temperature=g.temperature,
            max_new_tokens=g.max_new_tokens,
            fixed_tactics=tuple(g.tactics) if g.tactics else None,
            oracle_seed=g.oracle_seed,
            # `openai`: clients of the shared model servers; this process loads no model.
            generator_url=g.url,
            endpoints=str(g.endpoints) if g.endpoints is not None else None,
            served_model=g.served_model,
            tokenizer=g.tokenizer,  # the served checkpoint (default: each manifest member's `checkpoint`)
        )
        if kind == "replay":
            env = make_environment("replay", benchmark=backend.replay_data, latency_s=backend.latency_s)
        else:
            env = make_environment("repl", **backend.repl_options)
        self.env = env.__enter__()
        self.generators = make_generators(self.spec, env=self.env)
        self._lock = threading.Lock()  # one job at a time per worker process

    @property
    def generator_names(self) -> list[str]:
        return list(self.generators)

    def prove(self, request: dict[str, Any], *, progress: Callable[[dict], None] | None, cancel: threading.Event | None) -> dict[str, Any]:
        """Run one normalised request (see `service.requests`); the search result as JSON."""
        from prover.runner import ProveSettings, prove
        from search.budget import Budget

        theorem = Theorem(**request["theorem"])
        members = request.get("members") or list(self.generators)
        unknown = [m for m in members if m not in self.generators]
        if unknown:
            raise ValueError(f"unknown ensemble members {unknown}; this worker has {list(self.generators)}")
        settings = ProveSettings(
            strategy=request["strategy"],
            budget=Budget(**request["budget"]),
            ensemble_mode=request["ensemble"],
            env="replay" if self.kind == "replay" else "repl",
            generator=self.spec,
        )
        generators = {name: self.generators[name] for name in members}
        with self._lock:
            result = prove(theorem, self.env, generators, settings, progress=progress, cancel=cancel)
        return result.to_json()

    def check(self, theorem: dict[str, Any], tactics: list[str]) -> tuple[bool, str]:
        """Verify a complete proof from scratch (no search): `(ok, why not)`."""
        with self._lock:
            verification = self.env.verify(Theorem(**theorem), tactics)
        return verification.ok, verification.message

    def close(self) -> None:
        self.env.__exit__(None, None, None)


def build_worker_backend(kind: str, config: ServiceConfig) -> WorkerBackend:
    if kind not in ("replay", "repl"):
        raise ValueError(f"unknown backend {kind!r} (replay | repl)")
    return WorkerBackend(kind, config)
