"""The Ray backend: prover actors pull theorems; generator actors own the models.

- One *generator actor* per model-backed member (`transformers` / `vllm`) holds the model
  and a `BatchingGenerator`; it is a threaded actor (`max_concurrency`), so the `propose`
  calls of every prover actor meet in one batcher and become single generate calls. Its
  GPU request is its planned share of the cluster's GPUs (`plan_gpu_shares`: the members
  spread over the GPUs, a fraction each when several share one; `--gpu-fraction-per-model`
  overrides), and vLLM's memory fraction is that share less headroom, so the engines
  that share a GPU fit together. No GPU in the cluster: no GPU request. No CPU request.
  Ray restarts it if it dies (`max_restarts`), retrying the calls in flight.
- Prover actors reach it through `RemoteGenerator`, which carries the search's deadline:
  it stops waiting at it (`GeneratorTimeout`; the late answer is dropped), and retries an
  unavailable or restarting actor with backoff within the deadline before it reports a
  `GeneratorError`.
- *Prover actors* (`workers` of them, `cpus_per_prover` CPUs each) each hold a
  `ProverWorker` with its own environment; model-free members (oracle, fixed) are built
  inside them. The driver hands each idle actor the next theorem.
- An actor that dies (or raises, or runs past the task timeout and is killed) is replaced
  by a new one; its theorem is retried up to `max_retries` times, then recorded as an
  error; the run goes on. An actor that cannot even start fails the run after a few tries
  in a row (a configuration problem, not bad luck).

Ray is started locally (`ray.init(num_cpus=..., object_store_memory=..., include_dashboard=False)`)
unless a cluster is named — `ray_address` (`--ray-address`), else the `RAY_ADDRESS`
environment variable — or Ray is already initialised by the caller; only a session this
backend started (or connected) is shut down (disconnected) at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from prover.eval.backend import BackendReport, GroupSink, after_failure
from prover.eval.batching import BatchingGenerator
from prover.eval.config import EvalConfig, GeneratorOptions, MemberSpec, build_member, cpu_count
from prover.eval.worker import ProverWorker, TheoremTask
from search.types import Candidate, GeneratorError, GeneratorTimeout

log = logging.getLogger(__name__)

MODEL_KINDS = ("transformers", "vllm")
MAX_CONSECUTIVE_START_FAILURES = 3
POLL_S = 0.25
GPU_MEMORY_HEADROOM = 0.9  # vLLM's memory fraction = the GPU share × this (CUDA context, other processes)
ACTOR_RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)  # waits between calls to an unavailable generator actor


class RayUnavailable(RuntimeError):
    """Ray is not installed (install the `dist` extra) or cannot start."""


class BackendError(RuntimeError):
    """The Ray backend cannot go on (prover actors cannot start)."""


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise RayUnavailable("Ray is not installed: pip install -e '.[dist]' (or run with --no-ray)") from err
    return ray


# ------------------------------------------------------------------ actor bodies


def ray_address(flag: str | None) -> str | None:
    """The cluster to join: `--ray-address`, else `RAY_ADDRESS`; None: start a local one."""
    return flag or os.environ.get("RAY_ADDRESS") or None


@dataclass(frozen=True)
class GpuShare:
    """A generator actor's GPU request (`num_gpus`, in GPUs) and vLLM's memory fraction
    (of one GPU) for it."""

    num_gpus: float
    memory_fraction: float


def plan_gpu_shares(members: int, cluster_gpus: float, requested: float = 0.0) -> GpuShare:
    """Each of `members` model-backed generator actors' share of `cluster_gpus` GPUs.

    `requested` > 0 (`--gpu-fraction-per-model`) is taken as given; 0 plans it: with at
    least as many GPUs as members, one GPU each; otherwise the members share GPUs evenly,
    `1 / ceil(members / gpus)` each (5 members on 1 GPU: 0.2; on 2 GPUs: 1/3), rounded
    down to Ray's 1e-4 resolution. No GPU: 0 (the actors run on CPU). Ray places the
    fractions so that one GPU's shares sum to at most 1; vLLM's memory fraction is the
    share × `GPU_MEMORY_HEADROOM` (never the whole card for one of several engines).
    Raises `ValueError` when a requested share cannot fit every member on the cluster.
    """
    if members < 1:
        raise ValueError(f"need at least one generator actor, got {members}")
    if cluster_gpus <= 0:
        return GpuShare(0.0, 0.0)
    whole_gpus = math.floor(cluster_gpus)
    if requested > 0:
        share = requested
        per_gpu = math.floor(1.0 / share + 1e-9) if share <= 1 else 0
        capacity = per_gpu * whole_gpus if share <= 1 else math.floor(cluster_gpus / share + 1e-9)
        if capacity < members:
            raise ValueError(
                f"{members} generator actors × {share:g} GPU do not fit on {cluster_gpus:g} GPUs "
                f"(at most {capacity}); lower --gpu-fraction-per-model or leave it 0 to plan it"
            )
    elif whole_gpus >= members:
        share = 1.0
    else:
        per_gpu = math.ceil(members / max(1, whole_gpus))
        share = math.floor(10_000 / per_gpu) / 10_000
    return GpuShare(share, round(min(1.0, share) * GPU_MEMORY_HEADROOM, 4))


def _actor_unavailable_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError

    try:
        from ray.exceptions import ActorUnavailableError
    except ImportError:  # older Ray
        return (RayActorError,)
    return (RayActorError, ActorUnavailableError)


class RemoteGenerator:
    """A `TacticGenerator` that forwards `propose` to a generator actor, under the caller's
    deadline (see the module docstring)."""

    def __init__(self, name: str, handle: Any, *, backoff_s: Sequence[float] = ACTOR_RETRY_BACKOFF_S) -> None:
        self.name = name
        self.handle = handle
        self.backoff_s = tuple(backoff_s)

    def propose(self, states: Sequence[str], k: int, *, timeout_s: float | None = None) -> list[list[Candidate]]:
        ray = import_ray()
        from ray.exceptions import GetTimeoutError

        unavailable = _actor_unavailable_errors()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        tries = 0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise GeneratorTimeout(f"{self.name}: no time left to ask the generator actor")
            tries += 1
            ref = self.handle.propose.remote(list(states), k, remaining)
            try:
                return ray.get(ref, timeout=remaining)
            except GeneratorError as err:  # raised in the actor (its batcher's deadline, OOM): its own words
                cause = getattr(err, "cause", None)  # Ray's RayTaskError(GeneratorError) wraps a traceback around it
                raise (cause if isinstance(cause, GeneratorError) else err) from None
            except GetTimeoutError:
                try:
                    ray.cancel(ref)  # the actor may still finish it; the answer goes nowhere
                except Exception:  # noqa: BLE001 - cancelling is best effort
                    pass
                raise GeneratorTimeout(f"{self.name}: the generator actor gave no answer within {timeout_s:.2f} s") from None
            except unavailable as err:
                cause = _short(err)
            if tries > len(self.backoff_s):
                raise GeneratorError(f"{self.name}: the generator actor is unavailable after {tries} tries: {cause}")
            wait = self.backoff_s[tries - 1]
            if deadline is not None and time.monotonic() + wait >= deadline:
                raise GeneratorError(f"{self.name}: the generator actor is unavailable ({tries} tries) and the search's time is nearly out: {cause}")
            log.warning("generator actor %s unavailable (try %d): %s; retrying in %.1f s", self.name, tries, cause, wait)
            time.sleep(wait)


class GeneratorActor:
    """Body of a generator actor: one member's model behind a batcher."""

    def __init__(
        self,
        member: MemberSpec,
        options: GeneratorOptions,
        sources: Sequence[str],
        max_batch_states: int,
        max_wait_s: float | None,
        expected_clients: int,
    ) -> None:
        self.batcher = BatchingGenerator(
            build_member(member, options, sources),
            max_batch_states=max_batch_states,
            max_wait_s=max_wait_s,
            expected_clients=expected_clients,
        )

    def ready(self) -> int:
        return os.getpid()

    def propose(self, states: list[str], k: int, timeout_s: float | None = None) -> list[list[Candidate]]:
        return self.batcher.propose(states, k, timeout_s=timeout_s)

    def stats(self) -> dict:
        return self.batcher.stats().to_json()


class ProverActor:
    """Body of a prover actor: a `ProverWorker` whose model members are remote."""

    def __init__(self, config: EvalConfig, remote_members: dict[str, Any]) -> None:
        sources = [b.path for b in config.benchmarks if b.format == "leandojo"]
        generators = {}
        for member in config.members:
            if member.name in remote_members:
                generators[member.name] = RemoteGenerator(member.name, remote_members[member.name])
            else:
                generators[member.name] = build_member(member, config.generator_options, sources)
        self.worker = ProverWorker(config, generators)

    def ready(self) -> int:
        return os.getpid()

    def prove(self, task: TheoremTask) -> list:
        return self.worker.prove(task)


# ------------------------------------------------------------------ driver


@dataclass
class _Slot:
    index: int
    actor: Any
    timed_out: bool = False


DispatchHook = Callable[[int, Any, TheoremTask], None]


class RayBackend:
    """Runs the tasks on Ray actors (see the module docstring).

    `on_dispatch(n, actor, task)`: called after the n-th dispatch (1-based) with the actor
    handle, for monitoring and fault-injection tests.
    """

    def __init__(self, config: EvalConfig, *, on_dispatch: DispatchHook | None = None) -> None:
        self.config = config
        self.on_dispatch = on_dispatch
        self._started_ray = False

    # ------------------------------------------------------------- ray session

    def _init_ray(self, ray) -> None:
        dist = self.config.distribution
        if ray.is_initialized():
            return
        address = ray_address(dist.ray_address)
        if address:  # an existing cluster: its resources are its own (no num_cpus / object store here)
            ray.init(address=address, log_to_driver=False)
        else:
            cpus = max(cpu_count(), math.ceil(dist.workers * dist.cpus_per_prover))
            ray.init(
                num_cpus=cpus,
                object_store_memory=dist.object_store_mb * 1024 * 1024,
                include_dashboard=False,
                log_to_driver=False,
            )
        self._started_ray = True

    def run(self, tasks: Sequence[TheoremTask], sink: GroupSink) -> BackendReport:
        ray = import_ray()
        dist = self.config.distribution
        workers = min(dist.workers, max(1, len(tasks)))
        report = BackendReport("ray", workers)
        if not tasks:
            return report
        self._init_ray(ray)
        generator_actors: dict[str, Any] = {}
        slots: list[_Slot] = []
        try:
            generator_actors = self._start_generators(ray)
            self._drive(ray, list(tasks), sink, report, generator_actors, slots, workers)
            for name, actor in generator_actors.items():
                try:
                    report.batching[name] = ray.get(actor.stats.remote(), timeout=30)
                except Exception as err:  # noqa: BLE001 - stats are informative only
                    report.batching[name] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            for slot in slots:
                ray.kill(slot.actor, no_restart=True)
            for actor in generator_actors.values():
                ray.kill(actor, no_restart=True)
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False
        return report

    def _start_generators(self, ray) -> dict[str, Any]:
        dist = self.config.distribution
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        remote_cls = ray.remote(GeneratorActor)
        sources = [b.path for b in self.config.benchmarks if b.format == "leandojo"]
        actors = {}
        for member, options, actor_options in self.generator_actor_plan(gpus):
            actors[member.name] = remote_cls.options(**actor_options).remote(
                member, options, sources, dist.batch_max_states, dist.batch_wait_s, dist.workers
            )
        return actors

    def generator_actor_plan(self, cluster_gpus: float) -> list[tuple[MemberSpec, GeneratorOptions, dict[str, Any]]]:
        """Per model-backed member: its generator options (vLLM's memory fraction from the
        plan) and its actor's Ray options (`num_gpus` from `plan_gpu_shares`)."""
        dist = self.config.distribution
        members = [m for m in self.config.members if m.kind in MODEL_KINDS]
        if not members:
            return []
        if dist.gpu_fraction_per_model > 0 and cluster_gpus == 0:
            log.warning("--gpu-fraction-per-model %.2f asked, but the Ray cluster has no GPU: generator actors run on CPU", dist.gpu_fraction_per_model)
        try:
            share = plan_gpu_shares(len(members), cluster_gpus, dist.gpu_fraction_per_model)
        except ValueError as err:
            raise BackendError(str(err)) from err
        options = self.config.generator_options
        if share.num_gpus > 0:
            options = dataclasses.replace(options, gpu_memory_fraction=share.memory_fraction)
        actor_options = dict(
            num_cpus=0,
            num_gpus=share.num_gpus,
            max_concurrency=max(16, 4 * dist.workers),
            max_restarts=2,
            max_task_retries=2,
            name=None,
        )
        return [(member, options, dict(actor_options)) for member in members]

    def _new_prover(self, ray, index: int, generator_actors: dict[str, Any]) -> _Slot:
        remote_cls = ray.remote(ProverActor)
        actor = remote_cls.options(num_cpus=self.config.distribution.cpus_per_prover, max_restarts=0, max_concurrency=1).remote(
            self.config, generator_actors
        )
        return _Slot(index, actor)

    def _drive(
        self,
        ray,
        pending_tasks: list[TheoremTask],
        sink: GroupSink,
        report: BackendReport,
        generator_actors: dict[str, Any],
        slots: list[_Slot],
        workers: int,
    ) -> None:
        from ray.exceptions import RayError

        pending: deque[TheoremTask] = deque(pending_tasks)
        remaining = len(pending)
        starting: dict[Any, _Slot] = {}
        inflight: dict[Any, tuple[_Slot, TheoremTask, float]] = {}
        idle: list[_Slot] = []
        start_failures = 0
        dispatches = 0
        timeout_s = self.config.task_timeout_s

        def launch(index: int) -> None:
            slot = self._new_prover(ray, index, generator_actors)
            slots.append(slot)
            starting[slot.actor.ready.remote()] = slot

        for index in range(workers):
            launch(index)
        # Prover actors start while the models load; a model that cannot load fails the run.
        ray.get([actor.ready.remote() for actor in generator_actors.values()])

        first_dispatch: float | None = None
        while remaining:
            while idle and pending:
                slot = idle.pop()
                task = pending.popleft()
                ref = slot.actor.prove.remote(task)
                inflight[ref] = (slot, task, time.monotonic())
                first_dispatch = first_dispatch if first_dispatch is not None else time.monotonic()
                dispatches += 1
                if self.on_dispatch is not None:
                    self.on_dispatch(dispatches, slot.actor, task)
            refs = list(starting) + list(inflight)
            ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref in starting:
                    slot = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayError as err:
                        start_failures += 1
                        self._retire(ray, slot, slots)
                        if start_failures >= MAX_CONSECUTIVE_START_FAILURES:
                            raise BackendError(f"prover actors fail to start ({start_failures} in a row); last error: {err}") from err
                        launch(slot.index)
                        continue
                    start_failures = 0
                    idle.append(slot)
                    continue
                slot, task, _ = inflight.pop(ref)
                try:
                    group = ray.get(ref)
                except RayError as err:
                    reason = "timed out and was killed" if slot.timed_out else _short(err)
                    self._retire(ray, slot, slots)
                    report.workers_replaced += 1
                    launch(slot.index)
                    retry, group = after_failure(task, reason, self.config, report)
                    if retry is not None:
                        pending.appendleft(retry)
                        continue
                sink(group)
                remaining -= 1
                if not remaining and first_dispatch is not None:
                    report.serving_s = time.monotonic() - first_dispatch
                if slot in slots:
                    idle.append(slot)
            now = time.monotonic()
            for ref, (slot, task, started) in list(inflight.items()):
                if not slot.timed_out and now - started > timeout_s:
                    log.warning("theorem %s ran %.0f s (> %.0f s): killing its prover actor", task.theorem.id, now - started, timeout_s)
                    slot.timed_out = True
                    ray.kill(slot.actor, no_restart=True)

    @staticmethod
    def _retire(ray, slot: _Slot, slots: list[_Slot]) -> None:
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        if slot in slots:
            slots.remove(slot)


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 500 else text[:500] + "…"
