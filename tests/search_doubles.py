"""Test doubles for the search tests: a graph environment, a caching wrapper, generators.

They have real semantics: the graph environment applies only the edges it was given (any
other tactic is a Lean-style error) and verifies a proof by replaying it from the root;
the caching wrapper memoises `(pp, tactic)` and marks hits `from_cache`.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable, Mapping, Sequence

from search.types import (
    Candidate,
    EnvironmentStartError,
    Failed,
    FailureKind,
    ProofState,
    Progress,
    Proved,
    Theorem,
    Verification,
)

QED = "<QED>"  # edge target meaning "closes every goal"

THEOREM = Theorem(id="thm")


class GraphEnv:
    """States are strings; `edges[state][tactic]` is the next state, `QED`, a `Failed`, or an
    exception instance to raise. Unknown tactics fail with a Lean-style error.

    - `sleep_s`: wall-clock seconds each apply takes; if that exceeds the call's timeout, the
      call waits only the timeout and returns `Failed(TIMEOUT)` (an environment that honours
      its timeout).
    - `reject`: proofs (tuples of tactics) that verification rejects although they replay.
    - `start_error`: message of an `EnvironmentStartError` raised by `start`.
    - `slow_states`: per-state sleep overriding `sleep_s`.
    - `honour_timeout=False`: calls take their full sleep whatever the timeout (a backend
      that answers late).
    """

    def __init__(
        self,
        edges: Mapping[str, Mapping[str, object]],
        root: str = "root",
        *,
        sleep_s: float = 0.0,
        slow_states: Mapping[str, float] | None = None,
        reject: Sequence[Sequence[str]] = (),
        start_error: str | None = None,
        successor: Callable[[str, str], object] | None = None,
        honour_timeout: bool = True,
    ) -> None:
        self.edges = {state: dict(out) for state, out in edges.items()}
        self.root = root
        self.sleep_s = sleep_s
        self.slow_states = dict(slow_states or {})
        self.reject = {tuple(p) for p in reject}
        self.start_error = start_error
        self.successor = successor  # computed edges for infinite graphs (None = no edge)
        self.honour_timeout = honour_timeout  # False: every call takes its full sleep (a late backend)
        self.calls: list[tuple[str, str, float | None]] = []
        self.verify_calls: list[list[str]] = []

    def __enter__(self) -> "GraphEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def start(self, theorem: Theorem) -> ProofState:
        if self.start_error is not None:
            raise EnvironmentStartError(self.start_error)
        return ProofState(self.root, handle=("root", theorem.id))

    def _target(self, pp: str, tactic: str) -> object:
        target = self.edges.get(pp, {}).get(tactic)
        if target is None and self.successor is not None:
            target = self.successor(pp, tactic)
        return target

    def apply(self, state: ProofState, tactic: str, timeout_s: float | None = None):
        self.calls.append((state.pp, tactic, timeout_s))
        sleep = self.slow_states.get(state.pp, self.sleep_s)
        if sleep:
            if self.honour_timeout and timeout_s is not None and sleep > timeout_s:
                time.sleep(timeout_s)
                return Failed(FailureKind.TIMEOUT, f"tactic timed out after {timeout_s:.3f}s")
            time.sleep(sleep)
        target = self._target(state.pp, tactic)
        if target is None:
            return Failed(FailureKind.LEAN_ERROR, f"unknown tactic {tactic!r} at {state.pp!r}")
        if isinstance(target, BaseException):
            raise target
        if isinstance(target, Failed):
            return target
        if target == QED:
            return Proved()
        return Progress(ProofState(str(target), handle=len(self.calls)))

    def verify(self, theorem: Theorem, tactics: Sequence[str]) -> Verification:
        self.verify_calls.append(list(tactics))
        state = self.root
        for i, tactic in enumerate(tactics):
            target = self._target(state, tactic)
            if target == QED:
                if i != len(tactics) - 1:
                    return Verification(False, "goals closed before the end of the proof")
                if tuple(tactics) in self.reject:
                    return Verification(False, "uses a forbidden axiom")
                return Verification(True)
            if not isinstance(target, str):
                return Verification(False, f"step {i} ({tactic!r}) fails")
            state = target
        return Verification(False, "unsolved goals")


class CachingEnv:
    """Memoises `(pp, tactic) -> result` of an inner environment; hits carry `from_cache`.
    Timeouts and crashes are not cached (a later try may succeed)."""

    def __init__(self, inner: GraphEnv) -> None:
        self.inner = inner
        self.cache: dict[tuple[str, str], object] = {}

    def __enter__(self) -> "CachingEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def start(self, theorem: Theorem) -> ProofState:
        return self.inner.start(theorem)

    def apply(self, state: ProofState, tactic: str, timeout_s: float | None = None):
        key = (state.pp, tactic)
        hit = self.cache.get(key)
        if hit is not None:
            return dataclasses.replace(hit, from_cache=True)
        result = self.inner.apply(state, tactic, timeout_s)
        if not (isinstance(result, Failed) and result.kind in (FailureKind.TIMEOUT, FailureKind.CRASH)):
            self.cache[key] = result
        return result

    def verify(self, theorem: Theorem, tactics: Sequence[str]) -> Verification:
        return self.inner.verify(theorem, tactics)


class ScriptedGenerator:
    """Proposes, for each state, the scripted `(tactic, logprob)` list (first `k`).

    `default` is used for states without a script; `raise_on` states raise RuntimeError;
    `answer` overrides everything with a raw return value (for malformed answers).
    """

    def __init__(
        self,
        script: Mapping[str, Sequence[tuple[str, float]]] | None = None,
        *,
        name: str = "scripted",
        default: Sequence[tuple[str, float]] = (),
        raise_on: Sequence[str] = (),
        answer: object = None,
        delay_s: float = 0.0,
    ) -> None:
        self.name = name
        self.script = {state: [Candidate(t, lp) for t, lp in cands] for state, cands in (script or {}).items()}
        self.default = [Candidate(t, lp) for t, lp in default]
        self.raise_on = set(raise_on)
        self.answer = answer
        self.delay_s = delay_s
        self.calls: list[tuple[list[str], int]] = []

    def propose(self, states: Sequence[str], k: int) -> list[list[Candidate]]:
        self.calls.append((list(states), k))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.answer is not None:
            return self.answer  # type: ignore[return-value]
        for state in states:
            if state in self.raise_on:
                raise RuntimeError(f"model failed on {state!r}")
        return [list(self.script.get(state, self.default))[:k] for state in states]

    @property
    def states_asked(self) -> list[str]:
        return [s for states, _ in self.calls for s in states]


class SamplingGenerator:
    """Samples `k` tactics per state from a fixed distribution (with replacement), seeded.

    `dist[state]` is a list of `(tactic, probability)`; the returned log-prob is log(p).
    """

    def __init__(self, dist: Mapping[str, Sequence[tuple[str, float]]], *, seed: int = 0, name: str = "sampler") -> None:
        import math

        self.name = name
        self.dist = {s: list(d) for s, d in dist.items()}
        self.rng = random.Random(seed)
        self._log = math.log
        self.calls: list[tuple[list[str], int]] = []

    def propose(self, states: Sequence[str], k: int) -> list[list[Candidate]]:
        self.calls.append((list(states), k))
        out = []
        for state in states:
            dist = self.dist.get(state, [])
            if not dist:
                out.append([])
                continue
            tactics = [t for t, _ in dist]
            weights = [p for _, p in dist]
            picks = self.rng.choices(range(len(tactics)), weights=weights, k=k)
            out.append([Candidate(tactics[i], self._log(weights[i])) for i in picks])
        return out


def chain(n: int, *, prefix: str = "s", closing: bool = True) -> dict[str, dict[str, object]]:
    """root -t0-> s1 -t1-> s2 ... -> s{n-1} -t{n-1}-> QED (a proof of n tactics)."""
    edges: dict[str, dict[str, object]] = {}
    states = ["root"] + [f"{prefix}{i}" for i in range(1, n)]
    for i, state in enumerate(states):
        nxt: object = states[i + 1] if i + 1 < n else (QED if closing else f"{prefix}{n}")
        edges[state] = {f"t{i}": nxt}
    return edges
