"""A batching proxy: many concurrent searches, one `propose` call on the model.

Searches run in threads (locally) or in Ray actor threads (a generator actor with
`max_concurrency > 1`); each calls `propose(states, k)` and blocks. A dispatcher thread
collects the waiting requests and makes one `inner.propose` call per batch (requests
sharing one `k`), then hands each caller its slice.

When a batch is released: as soon as `max_batch_states` states are queued, or
`expected_clients` requests are waiting (every search is blocked on the model: waiting
longer gains nothing), or else once the *window* has passed since the later of the oldest
request's arrival and the end of the previous call. Counting from the previous call's end
matters: searches answered by that call are off running tactics and come back shortly,
and without the pause the queue splits into groups that alternate and never merge. The
window is `max_wait_s`, or by default a quarter of the recent generate-call time (an
exponential average), clamped to [1 ms, 100 ms]: waiting a fraction of a call to make the
call fuller is worth it when a call's fixed cost dominates, as on a GPU.

Deadlines: a caller's `timeout_s` (the seconds left in its search) bounds its wait. A
caller whose time runs out gets `GeneratorTimeout`; if its request was still queued it is
withdrawn, and if it was already in a call its answer is dropped when it arrives. The
inner call gets the latest deadline among the requests it serves (None if any has none).

Invariants: every request is answered exactly once (with its candidates or with the
exception of the call that served it), or abandoned by its caller at its deadline; the
answer of request `r` is `inner`'s output for exactly `r.states`, in order; a request is
never split across calls (a request larger than `max_batch_states` is served alone).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from search.proposer import deadline_call
from search.types import Candidate, GeneratorTimeout, TacticGenerator


@dataclass
class _Request:
    states: list[str]
    k: int
    arrived: float
    deadline: float | None = None  # monotonic seconds; None: the caller waits as long as it takes
    done: threading.Event = field(default_factory=threading.Event)
    result: list[list[Candidate]] | None = None
    error: BaseException | None = None
    abandoned: bool = False  # the caller stopped waiting at its deadline


@dataclass(frozen=True)
class BatchingStats:
    """Counters since construction. `states_per_call` = states / calls (0 before any call)."""

    calls: int
    requests: int
    states: int
    max_states_per_call: int
    generate_time_s: float
    timed_out: int = 0  # requests whose caller stopped waiting at its deadline

    @property
    def states_per_call(self) -> float:
        return self.states / self.calls if self.calls else 0.0

    @property
    def requests_per_call(self) -> float:
        return self.requests / self.calls if self.calls else 0.0

    def to_json(self) -> dict[str, float | int]:
        return {
            "calls": self.calls,
            "requests": self.requests,
            "states": self.states,
            "max_states_per_call": self.max_states_per_call,
            "states_per_call": self.states_per_call,
            "requests_per_call": self.requests_per_call,
            "generate_time_s": self.generate_time_s,
            "timed_out": self.timed_out,
        }


MIN_WINDOW_S = 0.001
MAX_WINDOW_S = 0.1
WINDOW_FRACTION = 0.25  # of the average generate-call time
EMA_WEIGHT = 0.2


class BatchingGenerator:
    """A thread-safe `TacticGenerator` that merges concurrent calls (see the module docstring).

    `max_batch_states`: states that trigger an immediate call. `max_wait_s`: the batching
    window in seconds (None: adaptive). `expected_clients`: how many callers can be waiting
    at once (e.g. the number of concurrent searches); None when unknown.
    """

    def __init__(
        self,
        inner: TacticGenerator,
        *,
        max_batch_states: int = 64,
        max_wait_s: float | None = None,
        expected_clients: int | None = None,
    ) -> None:
        if max_batch_states < 1:
            raise ValueError(f"max_batch_states must be >= 1, got {max_batch_states!r}")
        if max_wait_s is not None and max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0 seconds, got {max_wait_s!r}")
        if expected_clients is not None and expected_clients < 1:
            raise ValueError(f"expected_clients must be >= 1, got {expected_clients!r}")
        self.inner = inner
        self.name = inner.name
        self._inner_call = deadline_call(inner)
        self._timed_out = 0
        self.max_batch_states = max_batch_states
        self.max_wait_s = max_wait_s
        self.expected_clients = expected_clients
        self._call_time_ema: float | None = None
        self._last_call_end = 0.0
        self._pending: list[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._calls = self._requests = self._states = self._max_states = 0
        self._generate_time = 0.0

    # ----------------------------------------------------------------- client side

    def propose(self, states: Sequence[str], k: int, *, timeout_s: float | None = None) -> list[list[Candidate]]:
        """The inner generator's answer for `states`, from a shared call; `GeneratorTimeout`
        when `timeout_s` seconds pass first (see the module docstring)."""
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        states = list(states)
        if not states:
            return []
        now = time.monotonic()
        request = _Request(states, k, now, None if timeout_s is None else now + timeout_s)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"batching generator {self.name!r} is closed")
            self._ensure_thread()
            self._pending.append(request)
            self._cond.notify_all()
        if not request.done.wait(timeout_s):
            with self._cond:
                if not request.done.is_set():
                    request.abandoned = True
                    self._timed_out += 1
                    queued = "still queued" if request in self._pending else "in a call; its answer will be dropped"
                    if request in self._pending:
                        self._pending.remove(request)
                    raise GeneratorTimeout(f"{self.name}: no answer within {timeout_s:.2f} s (request {queued}; batched generator)")
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def stats(self) -> BatchingStats:
        with self._cond:
            return BatchingStats(self._calls, self._requests, self._states, self._max_states, self._generate_time, self._timed_out)

    def close(self) -> None:
        """Stop the dispatcher after it has answered every queued request."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def __enter__(self) -> "BatchingGenerator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- dispatcher

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"batcher-{self.name}", daemon=True)
            self._thread.start()

    def _take_batch(self) -> list[_Request] | None:
        """Wait for a batch (requests sharing the oldest request's k); None once closed and drained."""
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            while not self._closed:
                oldest = self._pending[0]
                queued = sum(len(r.states) for r in self._pending if r.k == oldest.k)
                everyone = self.expected_clients is not None and len(self._pending) >= self.expected_clients
                remaining = max(oldest.arrived, self._last_call_end) + self.window_s() - time.monotonic()
                if queued >= self.max_batch_states or everyone or remaining <= 0:
                    break
                self._cond.wait(remaining)
            k = self._pending[0].k
            batch: list[_Request] = []
            size = 0
            for request in list(self._pending):
                if request.k != k:
                    continue
                if batch and size + len(request.states) > self.max_batch_states:
                    break
                batch.append(request)
                size += len(request.states)
            for request in batch:
                self._pending.remove(request)
            return batch

    def window_s(self) -> float:
        """The current batching window in seconds (see the module docstring)."""
        if self.max_wait_s is not None:
            return self.max_wait_s
        if self._call_time_ema is None:
            return MIN_WINDOW_S
        return min(MAX_WINDOW_S, max(MIN_WINDOW_S, WINDOW_FRACTION * self._call_time_ema))

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            states = [s for r in batch for s in r.states]
            started = time.monotonic()
            deadlines = [r.deadline for r in batch]
            timeout_s = None if None in deadlines else max(0.0, max(deadlines) - started)  # type: ignore[type-var]
            try:
                output = self._inner_call(states, batch[0].k, timeout_s)
                if len(output) != len(states):
                    raise RuntimeError(f"generator {self.name!r} answered {len(output)} states for {len(states)} asked")
            except BaseException as err:  # noqa: BLE001 - handed to every caller of this batch
                for request in batch:
                    request.error = err
                    request.done.set()
                continue
            finally:
                ended = time.monotonic()
                elapsed = ended - started
                with self._cond:
                    self._last_call_end = ended
                    ema = self._call_time_ema
                    self._call_time_ema = elapsed if ema is None else (1 - EMA_WEIGHT) * ema + EMA_WEIGHT * elapsed
                    self._calls += 1
                    self._requests += len(batch)
                    self._states += len(states)
                    self._max_states = max(self._max_states, len(states))
                    self._generate_time += elapsed
            offset = 0
            for request in batch:
                request.result = [list(c) for c in output[offset : offset + len(request.states)]]
                offset += len(request.states)
                request.done.set()
