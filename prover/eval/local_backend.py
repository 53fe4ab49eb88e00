"""The in-process backend: `workers` threads, each a `ProverWorker` with its own environment.

The members' generators are built once and shared; with more than one worker each model
is wrapped in a `BatchingGenerator`, so concurrent searches share model calls exactly as
the Ray generator actors do (model-free members, oracle and fixed, are not batched: they
fork a sampling stream per theorem, see `prover.eval.worker`). A worker whose `prove` raises is discarded and rebuilt (a fresh
environment) and its theorem retried up to `max_retries` times, then recorded as an error.
Lean work releases the GIL (subprocesses), so threads overlap the environment's latency.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import Callable, Mapping, Sequence

from prover.eval.backend import BackendReport, GroupSink, after_failure
from prover.eval.batching import BatchingGenerator
from prover.eval.config import EvalConfig, build_member
from prover.eval.worker import ProverWorker, TheoremTask
from search.types import TacticGenerator

_STOP = object()


def build_generators(config: EvalConfig) -> dict[str, TacticGenerator]:
    """Every member's generator, built in this process."""
    sources = [b.path for b in config.benchmarks if b.format == "leandojo"]
    return {m.name: build_member(m, config.generator_options, sources) for m in config.members}


class LocalBackend:
    """Runs the tasks on threads of this process (see the module docstring).

    `generators`: prebuilt generators (tests, benchmarks); built from the config otherwise.
    `worker_factory(config, generators) -> ProverWorker`: how a worker is made (tests inject
    failures through it).
    """

    def __init__(
        self,
        config: EvalConfig,
        *,
        generators: Mapping[str, TacticGenerator] | None = None,
        worker_factory: Callable[[EvalConfig, Mapping[str, TacticGenerator]], ProverWorker] = ProverWorker,
    ) -> None:
        self.config = config
        self._generators = dict(generators) if generators is not None else None
        self._worker_factory = worker_factory

    def run(self, tasks: Sequence[TheoremTask], sink: GroupSink) -> BackendReport:
        workers = min(self.config.distribution.workers, max(1, len(tasks)))
        report = BackendReport("local", workers)
        if not tasks:
            return report
        base = self._generators if self._generators is not None else build_generators(self.config)
        batchers: dict[str, BatchingGenerator] = {}
        generators: Mapping[str, TacticGenerator] = base
        if workers > 1:
            model_free = {m.name for m in self.config.members if m.kind in ("oracle", "fixed")}
            batchers = {
                name: BatchingGenerator(
                    gen,
                    max_batch_states=self.config.distribution.batch_max_states,
                    max_wait_s=self.config.distribution.batch_wait_s,
                    expected_clients=workers,
                )
                for name, gen in base.items()
                if name not in model_free or not callable(getattr(gen, "fork", None))
            }
            generators = {name: batchers.get(name, gen) for name, gen in base.items()}
        todo: "queue.Queue[object]" = queue.Queue()
        done: "queue.Queue[tuple[str, object]]" = queue.Queue()
        for task in tasks:
            todo.put(task)
        lock = threading.Lock()

        def work() -> None:
            worker: ProverWorker | None = None
            while True:
                item = todo.get()
                if item is _STOP:
                    break
                task = item  # type: ignore[assignment]
                try:
                    if worker is None:
                        worker = self._worker_factory(self.config, generators)
                    done.put(("ok", worker.prove(task)))
                except Exception as err:  # noqa: BLE001 - a broken worker: rebuild and retry
                    message = f"{type(err).__name__}: {err}"
                    if worker is not None:
                        try:
                            worker.close()
                        except Exception:  # noqa: BLE001
                            pass
                        worker = None
                        with lock:
                            report.workers_replaced += 1
                    done.put(("failed", (task, message, traceback.format_exc(limit=3))))
            if worker is not None:
                worker.close()

        threads = [threading.Thread(target=work, name=f"prover-{i}", daemon=True) for i in range(workers)]
        for thread in threads:
            thread.start()
        remaining = len(tasks)
        interrupted = False
        started = time.monotonic()
        try:
            while remaining:
                kind, payload = done.get()
                if kind == "ok":
                    sink(payload)  # type: ignore[arg-type]
                    remaining -= 1
                    continue
                task, message, _ = payload  # type: ignore[misc]
                retry, group = after_failure(task, message, self.config, report)
                if retry is not None:
                    todo.put(retry)
                else:
                    sink(group)  # type: ignore[arg-type]
                    remaining -= 1
            report.serving_s = time.monotonic() - started
        except BaseException:
            interrupted = True  # e.g. Ctrl-C: do not wait for the theorems in flight
            raise
        finally:
            for _ in threads:
                todo.put(_STOP)
            if not interrupted:
                for thread in threads:
                    thread.join()
            for name, batcher in batchers.items():
                report.batching[name] = batcher.stats().to_json()
                batcher.close()
        return report
