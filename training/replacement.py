"""Threshold replacement: keep every micro-batch full of examples with `F >= epsilon`.

DCO's factor `F(N_eff, p)` collapses once an example's probability exceeds about
`1/N_eff`; such examples contribute almost no gradient. Following the paper, candidates
are scored with a no-grad forward pass, those with `F < epsilon` are discarded (and
counted), and fresh examples are drawn until the micro-batch is full, so every optimizer
step sees `batch_size` useful examples.

Two pieces, both checkpointable as plain JSON-able dicts:

- `ExampleStream`: an endless, deterministic stream of example indices. Epoch `e` is a
  permutation of the training split drawn from `(seed, e)`; process `rank` of
  `world_size` takes every `world_size`-th index of it. The stream's position is its
  whole state, so a resumed run draws exactly the same examples.
- `BatchFiller`: turns the stream into micro-batches of indices, scoring candidates in
  chunks of `micro_batch_size` (the same shape as a training forward). With `max_draws`
  it draws at most that many candidates in all (the run's passes over the data: an epoch
  is one pass, replacement draws from the rest of it, and discards shorten the run
  instead of adding passes); a micro-batch it can no longer fill raises `PassesComplete`.

Invariants of `BatchFiller`:
- every returned micro-batch has exactly `micro_batch_size` indices;
- `carry` holds indices that passed the threshold at their scoring and were not yet
  used; they are used first, before any new candidate (no re-scoring: the training
  forward recomputes the real F anyway);
- every drawn candidate is used once or counted as discarded; nothing else is dropped;
- with replacement inactive (`score_fn` None: epsilon = 0 or N_eff = 1) the filler draws
  exactly `micro_batch_size` indices per micro-batch and never calls a model;
- never more than `max_draws` candidates are drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ScoreFn = Callable[[Sequence[int]], torch.Tensor]
"""Maps example indices to their DCO factor `F` in [0, 1] (a 1-D tensor, one per index)."""

SyncFn = Callable[[bool, bool, bool], tuple[bool, bool, bool]]
"""Across processes: `(this_rank_short, this_rank_exhausted, this_rank_out_of_draws) ->
(any_short, any_exhausted, any_out_of_draws)`."""


def _local_sync(short: bool, exhausted: bool, out_of_draws: bool) -> tuple[bool, bool, bool]:
    return short, exhausted, out_of_draws


class PassesComplete(Exception):
    """The run's passes over the training split are drawn (`BatchFiller.max_draws`): the
    micro-batch being filled cannot be completed, and the run ends before this step."""


class ReplacementExhausted(RuntimeError):
    """A full pass over the training split found no example with `F >= epsilon`.

    The model's confidence exceeds the DCO target on every training example: there is
    nothing left for this objective to learn from at this threshold.
    """


class ExampleStream:
    """Endless deterministic stream of example indices in [0, num_examples), epoch by epoch."""

    def __init__(self, num_examples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
        if num_examples < world_size:
            raise ValueError(
                f"the training split has {num_examples} examples, fewer than the {world_size} processes"
            )
        self.num_examples = num_examples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0  # index into this rank's share of the current epoch's permutation
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.num_examples, generator=generator).tolist()
        return permutation[self.rank :: self.world_size]

    @property
    def epoch_length(self) -> int:
        """Indices this rank draws per epoch."""
        return len(self._order)

    @property
    def epochs_done(self) -> float:
        """Epochs consumed, fractional (e.g. 1.25 = a quarter into the second epoch)."""
        return self.epoch + self.position / self.epoch_length

    def next(self) -> int:
        if self.position == len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        index = self._order[self.position]
        self.position += 1
        return index

    def take(self, count: int) -> list[int]:
        return [self.next() for _ in range(count)]

    def state_dict(self) -> dict:
        return {"num_examples": self.num_examples, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        mine = {k: getattr(self, k) for k in ("num_examples", "seed", "rank", "world_size")}
        theirs = {k: state[k] for k in mine}
        if mine != theirs:
            raise ValueError(f"stream state is for a different stream: saved {theirs}, current {mine}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)


@dataclass
class FillCounts:
    """Counters since the last `BatchFiller.pop_counts()` (one optimizer step)."""

    drawn: int = 0  # fresh indices taken from the stream
    scored: int = 0  # candidates scored by a no-grad forward
    discarded: int = 0  # candidates with F < epsilon


class BatchFiller:
    """Micro-batches of example indices, full of examples with `F >= epsilon`.

    `score_fn` None disables replacement. `sync` makes the scoring rounds collective in
    multi-process runs: every process scores the same number of chunks (required where a
    forward pass is itself collective, as under ZeRO-3), extras go to `carry`, and when
    any process runs out of draws all of them raise `PassesComplete` in the same round.
    `max_draws`: candidates this process may draw in all (None: endless).
    """

    def __init__(
        self,
        stream: ExampleStream,
        micro_batch_size: int,
        epsilon: float,
        score_fn: ScoreFn | None,
        sync: SyncFn = _local_sync,
        max_draws: int | None = None,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.stream = stream
        self.micro_batch_size = micro_batch_size
        self.epsilon = epsilon
        self.score_fn = score_fn if epsilon > 0.0 else None
        self.sync = sync
        self.max_draws = max_draws
        self.carry: list[int] = []
        self.consecutive_discards = 0
        self.counts = FillCounts()
        self.totals = FillCounts()

    @property
    def active(self) -> bool:
        return self.score_fn is not None

    @property
    def draws_left(self) -> int | None:
        """Candidates this process may still draw (None: no limit)."""
        return None if self.max_draws is None else self.max_draws - self.totals.drawn

    def next_micro_batch(self) -> list[int]:
        """`micro_batch_size` indices. Raises `PassesComplete` when the draws left cannot
        fill it, `ReplacementExhausted` after a whole pass of discards."""
        size = self.micro_batch_size
        if not self.active:
            # No discards: the trainer plans its steps within every process's draws.
            if self.draws_left is not None and self.draws_left < size:
                raise PassesComplete(f"{self.totals.drawn} of {self.max_draws} draws used")
            batch = self.stream.take(size)
            self._count(drawn=size)
            return batch
        batch, self.carry = self.carry[:size], self.carry[size:]
        while True:
            short = len(batch) < size
            exhausted = self.consecutive_discards >= self.stream.epoch_length
            out_of_draws = short and self.draws_left == 0
            any_short, any_exhausted, any_out_of_draws = self.sync(short, exhausted, out_of_draws)
            if any_out_of_draws:
                # Unused accepted indices go back to `carry` (they are counted as drawn).
                self.carry = batch + self.carry
                raise PassesComplete(f"{self.totals.drawn} of {self.max_draws} draws used")
            if any_exhausted:
                raise ReplacementExhausted(
                    f"no training example has F >= epsilon={self.epsilon} over a full pass "
                    f"({self.consecutive_discards} consecutive discards)"
                )
            if not any_short:
                return batch
            if short:  # carry is empty here: it was used up first
                batch.extend(self._score(self._draw()))
                batch, self.carry = batch[:size], batch[size:]
            elif len(self.carry) < size:  # a round forced by another process
                self.carry.extend(self._score(self._draw()))
            else:  # forced while holding a full carry: re-score its head instead (bounded)
                head, rest = self.carry[:size], self.carry[size:]
                self.carry = self._score(head) + rest

    def _draw(self) -> list[int]:
        """Up to `micro_batch_size` fresh candidates (fewer, or none, near `max_draws`)."""
        left = self.draws_left
        candidates = self.stream.take(self.micro_batch_size if left is None else min(self.micro_batch_size, left))
        self._count(drawn=len(candidates))
        return candidates

    def _score(self, candidates: list[int]) -> list[int]:
        """The candidates with F >= epsilon, in order; the others are counted as discarded.
        Called also with no candidates (a round another process forced), since scoring may
        be collective."""
        factors = self.score_fn(candidates).detach().float().cpu()  # type: ignore[misc]
        if factors.shape != (len(candidates),):
            raise ValueError(f"score_fn returned shape {tuple(factors.shape)} for {len(candidates)} candidates")
        accepted = []
        for index, factor in zip(candidates, factors.tolist()):
            if factor >= self.epsilon:
                accepted.append(index)
                self.consecutive_discards = 0
            else:
                self.consecutive_discards += 1
        self._count(scored=len(candidates), discarded=len(candidates) - len(accepted))
        return accepted

    def _count(self, drawn: int = 0, scored: int = 0, discarded: int = 0) -> None:
        for counts in (self.counts, self.totals):
            counts.drawn += drawn
            counts.scored += scored
            counts.discarded += discarded

    def pop_counts(self) -> FillCounts:
        """Counters since the previous call (call once per optimizer step)."""
        counts, self.counts = self.counts, FillCounts()
        return counts

    def state_dict(self) -> dict:
        return {
            "stream": self.stream.state_dict(),
            "carry": list(self.carry),
            "consecutive_discards": self.consecutive_discards,
            "counts": vars(self.counts).copy(),
            "totals": vars(self.totals).copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.carry = [int(i) for i in state["carry"]]
        self.consecutive_discards = int(state["consecutive_discards"])
        self.counts = FillCounts(**state["counts"])
        self.totals = FillCounts(**state["totals"])
