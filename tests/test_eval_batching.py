"""The batching generator proxy: concurrent callers share generate calls, answers stay theirs."""

from __future__ import annotations

import threading
import time

import pytest

from prover.eval.batching import BatchingGenerator
from search.types import Candidate


class EchoGenerator:
    """Answers state s with k candidates naming s; records each call; `delay_s` per call."""

    name = "echo"

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None, serial: bool = False) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.calls: list[tuple[list[str], int]] = []
        self.lock = threading.Lock()
        self.model = threading.Lock() if serial else None  # one forward at a time, like a GPU

    def propose(self, states, k):
        with self.lock:
            self.calls.append((list(states), k))
        if self.model is not None:
            with self.model:
                time.sleep(self.delay_s)
        else:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in states:
            raise RuntimeError(f"model failed on {self.fail_on}")
        return [[Candidate(f"{s}#{i}", -float(i)) for i in range(k)] for s in states]


def _run_clients(batcher, n_clients: int, rounds: int, k: int = 2, results=None, errors=None):
    barrier = threading.Barrier(n_clients)

    def client(c: int) -> None:
        barrier.wait()
        for r in range(rounds):
            states = [f"c{c}r{r}s{j}" for j in range(1 + c % 2)]
            try:
                out = batcher.propose(states, k)
                if results is not None:
                    results.append((states, out))
            except Exception as err:  # noqa: BLE001
                if errors is not None:
                    errors.append((states, err))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_searches_share_calls_and_get_their_own_answers():
    inner = EchoGenerator(delay_s=0.02)
    results: list = []
    with BatchingGenerator(inner, max_batch_states=64, max_wait_s=0.01) as batcher:
        _run_clients(batcher, n_clients=8, rounds=5, results=results)
        stats = batcher.stats()
    assert len(results) == 40
    for states, out in results:  # every caller gets exactly its states' candidates, in order
        assert [[c.tactic for c in cands] for cands in out] == [[f"{s}#0", f"{s}#1"] for s in states]
    total_states = sum(len(s) for s, _ in results)
    assert stats.states == total_states == sum(len(states) for states, _ in inner.calls)
    assert stats.calls == len(inner.calls) < 40  # merged
    assert stats.states_per_call > 2.0


def test_batch_size_cap_and_different_k_are_never_mixed():
    inner = EchoGenerator(delay_s=0.01)
    with BatchingGenerator(inner, max_batch_states=3, max_wait_s=0.05) as batcher:
        results: list = []
        _run_clients(batcher, n_clients=6, rounds=2, k=2, results=results)
        big = batcher.propose([f"b{i}" for i in range(5)], 3)  # larger than the cap: served alone
    assert [c.tactic for c in big[4]] == ["b4#0", "b4#1", "b4#2"]
    for states, k in inner.calls:
        assert len(states) <= 3 or (len(states) == 5 and k == 3)
    assert {k for _, k in inner.calls} == {2, 3}


def test_errors_reach_every_caller_of_the_failed_call_only():
    inner = EchoGenerator(delay_s=0.01, fail_on="c0r0s0")
    results: list = []
    errors: list = []
    with BatchingGenerator(inner, max_wait_s=0.02) as batcher:
        _run_clients(batcher, n_clients=4, rounds=2, results=results, errors=errors)
    failed_call = next(states for states, _ in inner.calls if "c0r0s0" in states)
    assert errors and all(isinstance(e, RuntimeError) for _, e in errors)
    assert sorted(s for states, _ in errors for s in states) == sorted(failed_call)
    assert len(results) + len(errors) == 8


def test_closed_batcher_refuses_and_bad_k():
    batcher = BatchingGenerator(EchoGenerator())
    assert batcher.propose([], 2) == []
    with pytest.raises(ValueError):
        batcher.propose(["s"], 0)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.propose(["s"], 1)


def test_expected_clients_release_the_batch_without_waiting_out_the_window():
    inner = EchoGenerator()
    with BatchingGenerator(inner, max_wait_s=30.0, expected_clients=4) as batcher:
        started = time.monotonic()
        _run_clients(batcher, n_clients=4, rounds=1)
        assert time.monotonic() - started < 10.0  # not the 30 s window
    assert len(inner.calls) == 1 and len(inner.calls[0][0]) == sum(1 + c % 2 for c in range(4))


def test_adaptive_window_merges_searches_that_return_from_lean_at_different_times():
    """Searches alternate model call / tactic; without a pause after each call the queue
    splits into two groups that alternate forever (about 4 states per call for 8)."""
    model = EchoGenerator(delay_s=0.04, serial=True)

    def client(batcher):
        for _ in range(12):
            batcher.propose(["s"], 1)
            time.sleep(0.004)  # a tactic in Lean: shorter than the window (a quarter of a ~45 ms call)

    rates = {}
    for label, wait in (("fixed-0", 0.0), ("adaptive", None)):
        with BatchingGenerator(model, max_wait_s=wait) as batcher:
            threads = [threading.Thread(target=client, args=(batcher,)) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rates[label] = batcher.stats().states_per_call
    assert rates["adaptive"] >= 5.5 and rates["adaptive"] > rates["fixed-0"], rates


# ----------------------------------------------------------------------------- deadlines


class DeadlineEcho(EchoGenerator):
    """An `EchoGenerator` that takes the deadline and records it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timeouts: list[float | None] = []

    def propose(self, states, k, *, timeout_s=None):
        self.timeouts.append(timeout_s)
        return super().propose(states, k)


def test_a_caller_stops_waiting_at_its_deadline_and_the_late_answer_is_dropped() -> None:
    from search.types import GeneratorTimeout

    inner = DeadlineEcho(delay_s=0.5)
    with BatchingGenerator(inner, max_wait_s=0.0) as batcher:
        started = time.monotonic()
        with pytest.raises(GeneratorTimeout, match="in a call"):
            batcher.propose(["a"], 1, timeout_s=0.15)
        assert time.monotonic() - started < 0.4  # did not wait for the 0.5 s call
        assert inner.timeouts and 0.1 <= inner.timeouts[0] <= 0.15  # the inner call got the deadline
        # A caller without a deadline is served normally afterwards (the late answer went nowhere).
        assert batcher.propose(["b"], 1) == [[Candidate("b#0", -0.0)]]
        assert batcher.stats().timed_out == 1


def test_a_queued_request_is_withdrawn_at_its_deadline() -> None:
    from search.types import GeneratorTimeout

    inner = DeadlineEcho(delay_s=0.4, serial=True)
    with BatchingGenerator(inner, max_wait_s=0.0, max_batch_states=1) as batcher:
        first = threading.Thread(target=batcher.propose, args=(["busy"], 1))
        first.start()
        time.sleep(0.05)  # "busy" is in the call; "late" queues behind it
        with pytest.raises(GeneratorTimeout, match="still queued"):
            batcher.propose(["late"], 1, timeout_s=0.1)
        first.join()
    assert [states for states, _ in inner.calls] == [["busy"]]  # the withdrawn request never ran


def test_the_batched_call_gets_the_latest_deadline_of_its_requests() -> None:
    inner = DeadlineEcho()
    with BatchingGenerator(inner, max_wait_s=0.2, expected_clients=2) as batcher:
        out: list = []
        threads = [
            threading.Thread(target=lambda t=t: out.append(batcher.propose([f"s{t}"], 1, timeout_s=t)))
            for t in (5.0, 20.0)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(inner.calls) == 1 and 19.0 < inner.timeouts[0] <= 20.0
