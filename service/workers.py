"""The worker pool: supervisor threads, each owning one worker process (`service.worker_process`).

Searches run in the worker processes, never on the event loop and never under the API's
GIL. A supervisor thread claims a job from the store, sends it to its process, relays
progress to the `EventHub`, forwards cancellation, and records the answer. It enforces
wall-clock limits from outside: a process that does not stop within one tactic timeout
(plus `grace_s`) of a cancel, or that overruns its job's time limit, is killed (its whole
process group, Lean included) and restarted.

Invariants: a job is finished only by the supervisor that claimed it; a process death
re-queues the job (until `max_attempts`) and never answers it twice.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.config import ServiceConfig
from service.events import EventHub
from service.metrics import ServiceMetrics
from service.store import JobRecord, JobStatus, JobStore

log = logging.getLogger("service.workers")

_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)

# Search statuses (search.result.Status values) → job status.
_JOB_STATUS = {
    "proved": JobStatus.PROVED,
    "failed": JobStatus.FAILED,
    "budget_exhausted": JobStatus.FAILED,
    "timeout": JobStatus.FAILED,
    "error": JobStatus.ERROR,
    "cancelled": JobStatus.CANCELLED,
}


# Error-log kinds (`search.proposer`) that say the generation layer (a model server, an
# actor, an in-process model) failed or ran out of the search's time: an infrastructure
# outcome, never a search's `failed`.
GENERATION_FAILURE_KINDS = ("generator_error:", "generator_timeout:", "generator_late:")


def generation_cause(result: dict[str, Any]) -> str | None:
    """The message of the generation-layer failure that ended a search, if one did (the
    last such entry of the result's error log; ensemble entries carry a `[member] ` prefix)."""
    if result.get("status") not in ("error", "timeout"):
        return None
    for message in reversed(result.get("errors") or []):
        text = message.split("] ", 1)[1] if message.startswith("[") and "] " in message else message
        if text.startswith(GENERATION_FAILURE_KINDS):
            return message
    return None


def job_status_of(result: dict[str, Any], cancel_requested: bool) -> JobStatus:
    """The job status for a search result. A search stopped by a cancel is `cancelled`
    unless it had already found its proof (a verified proof is always reported). A search
    ended by its generation layer (a model endpoint down, stalled past the time limit) is
    `error` — with `search_status` `timeout` when it ran out of time — never `failed`."""
    status = _JOB_STATUS.get(result.get("status", ""), JobStatus.ERROR)
    if cancel_requested and status is not JobStatus.PROVED:
        return JobStatus.CANCELLED
    if status is not JobStatus.PROVED and generation_cause(result) is not None:
        return JobStatus.ERROR
    return status


def search_seconds_allowed(request: dict[str, Any], all_members: int) -> float:
    """Upper bound (seconds) on a search's wall time: `union` ensembles give each member its
    own budget; `members` None means all `all_members` generators of the worker."""
    budget = request["budget"]
    members = request.get("members")
    count = len(members) if members else all_members
    factor = count if request.get("ensemble") == "union" else 1
    return budget["time_limit_s"] * max(1, factor) + budget["tactic_timeout_s"]


@dataclass
class CheckTask:
    """A `/v1/check` verification waiting for a worker; `future` gets `(ok, message)`."""

    theorem: dict[str, Any]
    tactics: list[str]
    timeout_s: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    task_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class WorkerDied(RuntimeError):
    pass


class WorkerPool:
    def __init__(self, config: ServiceConfig, backend_kind: str, store: JobStore, hub: EventHub, metrics: ServiceMetrics) -> None:
        self.config = config
        self.backend_kind = backend_kind
        self.store = store
        self.hub = hub
        self.metrics = metrics
        self.stopping = threading.Event()
        self._cond = threading.Condition()
        self._signals = 0  # bumped by every wake(): an idle slot waits only if nothing arrived since it looked
        self._checks: collections.deque[CheckTask] = collections.deque()
        self._running: dict[str, "WorkerSlot"] = {}
        self.slots = [WorkerSlot(i, self) for i in range(config.workers.count)]
        from service.backend import backend_versions

        self.versions = backend_versions(backend_kind)

    # -------------------------------------------------------------- control

    def start(self) -> None:
        for slot in self.slots:
            slot.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every slot; running jobs go back to the queue (this is not a failure of theirs)."""
        self.stopping.set()
        self.wake()
        for slot in self.slots:
            slot.join(timeout_s)
        with self._cond:
            while self._checks:
                self._checks.popleft().future.set_exception(WorkerDied("the server is shutting down"))

    def wake(self) -> None:
        with self._cond:
            self._signals += 1
            self._cond.notify_all()

    # ---------------------------------------------------------------- state

    @property
    def ready_count(self) -> int:
        return sum(1 for slot in self.slots if slot.ready)

    @property
    def generator_names(self) -> list[str]:
        for slot in self.slots:
            if slot.generators:
                return list(slot.generators)
        return []

    @property
    def startup_errors(self) -> list[str]:
        return sorted({slot.startup_error for slot in self.slots if slot.startup_error})

    @property
    def pending_checks(self) -> int:
        with self._cond:
            return len(self._checks)

    # ------------------------------------------------------------- requests

    def cancel(self, job_id: str) -> bool:
        """Tell the slot running `job_id` to stop it; False when no slot runs it."""
        with self._cond:
            slot = self._running.get(job_id)
        if slot is None:
            return False
        slot.request_cancel(job_id)
        return True

    def submit_check(self, task: CheckTask) -> concurrent.futures.Future:
        with self._cond:
            self._checks.append(task)
            self._signals += 1
            self._cond.notify_all()
        return task.future

    # ------------------------------------------------------- slot interface

    def _next_task(self, timeout_s: float) -> CheckTask | JobRecord | None:
        """A check (first) or the oldest queued job; None after `timeout_s` seconds without work."""
        with self._cond:
            seen = self._signals
            while self._checks:
                task = self._checks.popleft()
                if task.future.set_running_or_notify_cancel():
                    return task
        job = self.store.claim()
        if job is not None:
            return job
        with self._cond:
            if self._signals == seen and not self.stopping.is_set():
                self._cond.wait(timeout_s)
        return None

    def _register(self, job_id: str, slot: "WorkerSlot | None") -> None:
        with self._cond:
            if slot is None:
                self._running.pop(job_id, None)
            else:
                self._running[job_id] = slot


class WorkerSlot(threading.Thread):
    """Supervises one worker process; restarts it after a crash, a kill or a failed start."""

    STARTUP_BACKOFF_S = (1.0, 5.0, 30.0, 60.0)  # seconds between failed start attempts

    def __init__(self, index: int, pool: WorkerPool) -> None:
        super().__init__(name=f"worker-slot-{index}", daemon=True)
        self.index = index
        self.pool = pool
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.generators: list[str] = []
        self.startup_error: str | None = None
        self._failed_starts = 0
        self._messages: queue.Queue[dict | None] = queue.Queue()
        self._cancel = threading.Event()
        self._current: str | None = None

    # ------------------------------------------------------------ main loop

    def run(self) -> None:
        pool = self.pool
        try:
            while not pool.stopping.is_set():
                if not self._ensure_process():
                    delay = self.STARTUP_BACKOFF_S[min(self._failed_starts, len(self.STARTUP_BACKOFF_S)) - 1]
                    pool.stopping.wait(delay)
                    continue
                task = pool._next_task(pool.config.workers.poll_interval_s)
                if task is None:
                    continue
                if isinstance(task, CheckTask):
                    self._run_check(task)
                else:
                    self._run_job(task)
        except Exception:  # a supervisor bug must be visible, and must not leave a process behind
            log.exception("worker slot %d failed", self.index)
        finally:
            self._shutdown_process()

    # ----------------------------------------------------- process handling

    def _ensure_process(self) -> bool:
        if self.proc is not None and self.proc.poll() is None and self.ready:
            return True
        self._kill_process()
        config = self.pool.config
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.worker_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
            start_new_session=True,  # own process group: a kill takes Lean children with it
            env=env,
        )
        self._messages = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self._messages), daemon=True, name=f"{self.name}-reader").start()
        self._send({"op": "init", "config": config.model_dump(mode="json"), "backend": self.pool.backend_kind})
        deadline = time.monotonic() + config.workers.startup_timeout_s
        while not self.pool.stopping.is_set():
            try:
                message = self._messages.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    return self._start_failed(f"worker did not load its backend within {config.workers.startup_timeout_s:g} s")
                continue
            if message is None:
                return self._start_failed(f"worker process exited with code {self.proc.wait()} while starting")
            if message.get("event") == "startup_error":
                return self._start_failed(message.get("message", "unknown startup error"))
            if message.get("event") == "ready":
                self.ready = True
                self.generators = list(message.get("generators", []))
                self.startup_error = None
                self._failed_starts = 0
                log.info("worker %d ready (pid %s, generators %s)", self.index, message.get("pid"), self.generators)
                return True
        return False

    def _start_failed(self, reason: str) -> bool:
        self.startup_error = reason
        self._failed_starts += 1
        self.pool.metrics.worker_restarts.labels("startup_failed").inc()
        log.error("worker %d could not start: %s", self.index, reason)
        self._kill_process()
        return False

    @staticmethod
    def _read(proc: subprocess.Popen, messages: "queue.Queue[dict | None]") -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                messages.put(json.loads(line))
            except json.JSONDecodeError:
                log.error("worker pid %d wrote a non-protocol line: %r", proc.pid, line[:200])
        messages.put(None)  # EOF: the process is gone

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):  # the reader sees the EOF and reports the death
            pass

    def _kill_process(self) -> None:
        self.ready = False
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def _shutdown_process(self) -> None:
        """Ask an idle process to close its backend and exit, then make sure it is gone."""
        proc = self.proc
        if proc is not None and proc.poll() is None and proc.stdin is not None and self.ready:
            self._send({"op": "shutdown"})
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
        self._kill_process()

    # ----------------------------------------------------------------- jobs

    def request_cancel(self, job_id: str) -> None:
        if self._current == job_id:
            self._cancel.set()

    def _run_job(self, job: JobRecord) -> None:
        pool, store, hub = self.pool, self.pool.store, self.pool.hub
        job_id = job.id
        self._cancel.clear()
        self._current = job_id
        pool._register(job_id, self)
        try:
            # A DELETE between the claim and the registration above is seen here.
            if store.cancel_requested(job_id):
                self._cancel.set()
            hub.publish(job_id, {"type": "status", "status": "running", "attempt": job.attempts})
            self._send({"op": "prove", "job_id": job_id, "request": job.request})
            self._supervise(job)
        finally:
            pool._register(job_id, None)
            self._current = None

    def _supervise(self, job: JobRecord) -> None:
        config = self.pool.config.workers
        tactic_timeout = float(job.request["budget"]["tactic_timeout_s"])
        allowed_s = search_seconds_allowed(job.request, len(self.generators))
        hard_deadline = time.monotonic() + allowed_s + config.grace_s
        cancel_deadline: float | None = None
        started = time.monotonic()
        while True:
            if self._cancel.is_set() and cancel_deadline is None:
                self._send({"op": "cancel", "job_id": job.id})
                cancel_deadline = time.monotonic() + tactic_timeout + config.grace_s
            try:
                message = self._messages.get(timeout=0.1)
            except queue.Empty:
                now = time.monotonic()
                if self.pool.stopping.is_set():
                    self._kill_process()
                    self.pool.store.requeue(job.id, refund_attempt=True)
                    return
                if cancel_deadline is not None and now > cancel_deadline:
                    self._kill_process()
                    self.pool.metrics.worker_restarts.labels("cancel_overrun").inc()
                    self._finish(job, JobStatus.CANCELLED, None, f"cancelled; the search did not stop within {tactic_timeout + config.grace_s:g} s, so its worker was killed")
                    return
                if now > hard_deadline:
                    self._kill_process()
                    self.pool.metrics.worker_restarts.labels("time_overrun").inc()
                    result = _overrun_result(job, now - started, allowed_s)
                    self._finish(job, JobStatus.FAILED, result, result["errors"][0])
                    return
                continue
            if message is None:
                self._worker_died(job)
                return
            event = message.get("event")
            if event == "progress" and message.get("job_id") == job.id:
                self.pool.hub.publish(job.id, {"type": "progress", **message.get("data", {})})
            elif event == "result" and message.get("job_id") == job.id:
                result = message["result"]
                status = job_status_of(result, self._cancel.is_set())
                self._finish(job, status, result, generation_cause(result) if status is JobStatus.ERROR else None)
                return
            elif event == "job_error" and message.get("job_id") == job.id:
                self._finish(job, JobStatus.ERROR, None, message.get("message", "worker error"))
                return

    def _worker_died(self, job: JobRecord) -> None:
        code = self.proc.wait() if self.proc is not None else None
        self._kill_process()
        self.pool.metrics.worker_restarts.labels("crash").inc()
        max_attempts = self.pool.config.workers.max_attempts
        if self._cancel.is_set():
            self._finish(job, JobStatus.CANCELLED, None, f"cancelled; the worker process exited with code {code}")
        elif job.attempts < max_attempts:
            log.warning("worker %d died (exit code %s) on job %s; re-queued (attempt %d of %d)", self.index, code, job.id, job.attempts, max_attempts)
            if self.pool.store.requeue(job.id):
                self.pool.hub.publish(job.id, {"type": "status", "status": "queued", "reason": f"worker exited with code {code}"})
                self.pool.wake()
        else:
            self._finish(job, JobStatus.ERROR, None, f"the worker process died on each of this job's {job.attempts} runs (last exit code {code})")

    def _finish(self, job: JobRecord, status: JobStatus, result: dict | None, error: str | None) -> None:
        metrics = self.pool.metrics
        if result is not None:  # which Lean/Mathlib answered (service.results reads it)
            result = {**result, "backend_versions": self.pool.versions}
        if self.pool.store.finish(job.id, status, result=result, error=error):
            metrics.finished.labels(status.value).inc()
            if result is not None:
                metrics.observe_result(result)
        self.pool.hub.publish(job.id, {"type": "done", "status": status.value})

    # --------------------------------------------------------------- checks

    def _run_check(self, task: CheckTask) -> None:
        self._send({"op": "check", "task_id": task.task_id, "theorem": task.theorem, "tactics": task.tactics})
        deadline = time.monotonic() + task.timeout_s
        started = time.monotonic()
        while True:
            try:
                message = self._messages.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline or self.pool.stopping.is_set():
                    self._kill_process()
                    self.pool.metrics.worker_restarts.labels("check_overrun").inc()
                    task.future.set_exception(TimeoutError(f"the verification did not finish within {task.timeout_s:g} s"))
                    return
                continue
            if message is None:
                self._kill_process()
                self.pool.metrics.worker_restarts.labels("crash").inc()
                task.future.set_exception(WorkerDied("the worker process died while verifying the proof"))
                return
            if message.get("task_id") != task.task_id:
                continue
            self.pool.metrics.check_seconds.observe(time.monotonic() - started)
            if message.get("event") == "check_result":
                task.future.set_result((bool(message["ok"]), str(message.get("message", ""))))
            else:
                task.future.set_exception(RuntimeError(message.get("message", "verification failed in the worker")))
            return


def _overrun_result(job: JobRecord, elapsed_s: float, allowed_s: float) -> dict[str, Any]:
    """The search result of a job whose worker was killed for overrunning its time limit."""
    from search.result import SearchResult, Status

    return SearchResult(
        theorem_id=job.request["theorem"]["id"],
        status=Status.TIMEOUT,
        strategy=job.request["strategy"],
        wall_time_s=elapsed_s,
        errors=[f"the worker overran the job's time limit ({allowed_s:g} s) and was killed after {elapsed_s:.1f} s"],
    ).to_json()
