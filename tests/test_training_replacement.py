"""Threshold replacement: full micro-batches, counted discards, deterministic resumable state."""

from __future__ import annotations

import pytest
import torch

from training.replacement import BatchFiller, ExampleStream, PassesComplete, ReplacementExhausted


def factor_table(values: dict[int, float], calls: list[list[int]] | None = None):
    """A score function with fixed F per example index (records its calls)."""
    def score(indices):
        if calls is not None:
            calls.append(list(indices))
        return torch.tensor([values[i] for i in indices])
    return score


def test_stream_is_a_fresh_permutation_each_epoch_and_deterministic():
    stream = ExampleStream(10, seed=3)
    first, second = stream.take(10), stream.take(10)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second  # reshuffled at the epoch boundary
    assert stream.epoch == 1 and stream.epochs_done == 2.0
    again = ExampleStream(10, seed=3)
    assert again.take(20) == first + second
    assert ExampleStream(10, seed=4).take(10) != first


def test_stream_shards_across_ranks_without_overlap():
    shards = [ExampleStream(11, seed=0, rank=r, world_size=3).take(ExampleStream(11, 0, r, 3).epoch_length)
              for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    with pytest.raises(ValueError, match="fewer than"):
        ExampleStream(2, seed=0, rank=0, world_size=3)


def test_stream_state_roundtrip_resumes_the_same_order():
    stream = ExampleStream(7, seed=1)
    stream.take(9)
    state = stream.state_dict()
    expected = stream.take(12)
    resumed = ExampleStream(7, seed=1)
    resumed.load_state_dict(state)
    assert resumed.take(12) == expected
    with pytest.raises(ValueError, match="different stream"):
        ExampleStream(8, seed=1).load_state_dict(state)


def test_every_micro_batch_is_full_and_discards_are_counted():
    n, size, eps = 50, 4, 0.3
    factors = {i: (0.1 if i % 3 == 0 else 0.9) for i in range(n)}  # a third is below epsilon
    filler = BatchFiller(ExampleStream(n, seed=0), size, eps, factor_table(factors))
    used: list[int] = []
    for _ in range(30):
        batch = filler.next_micro_batch()
        assert len(batch) == size
        assert all(factors[i] >= eps for i in batch)
        used.extend(batch)
    counts = filler.pop_counts()
    # Conservation: every drawn candidate is used, discarded, or still carried.
    assert counts.drawn == len(used) + counts.discarded + len(filler.carry)
    assert counts.scored == counts.drawn and counts.discarded > 0
    # The discarded ones are exactly the low-F draws of the stream prefix.
    drawn = ExampleStream(n, seed=0).take(counts.drawn)
    assert counts.discarded == sum(factors[i] < eps for i in drawn)
    assert used + filler.carry == [i for i in drawn if factors[i] >= eps]
    assert filler.pop_counts().discarded == 0  # reset per optimizer step
    assert filler.totals.discarded == counts.discarded


def test_carry_over_is_used_before_new_candidates():
    calls: list[list[int]] = []
    factors = {i: 1.0 for i in range(20)}
    filler = BatchFiller(ExampleStream(20, seed=0), 4, 0.5, factor_table(factors, calls))
    filler.carry = [7, 8]
    batch = filler.next_micro_batch()
    assert batch[:2] == [7, 8]
    assert len(calls) == 1 and len(filler.carry) == 2  # one chunk of 4 scored, 2 carried over


def test_inactive_replacement_never_scores():
    def boom(indices):
        raise AssertionError("scored although replacement is off")
    for filler in (BatchFiller(ExampleStream(9, seed=0), 4, 0.0, boom), BatchFiller(ExampleStream(9, seed=0), 4, 0.3, None)):
        batches = [filler.next_micro_batch() for _ in range(5)]
        assert [i for b in batches for i in b] == ExampleStream(9, seed=0).take(20)
        assert filler.pop_counts().scored == 0


def test_one_pass_of_draws_replaces_from_the_rest_of_the_pass_and_then_ends():
    """With `max_draws` = one pass, discarded examples are replaced by later examples of
    the same pass (never by a second pass): fewer micro-batches, each example drawn once."""
    n, size, eps = 50, 4, 0.3
    factors = {i: (0.1 if i % 3 == 0 else 0.9) for i in range(n)}
    filler = BatchFiller(ExampleStream(n, seed=0), size, eps, factor_table(factors), max_draws=n)
    used: list[int] = []
    with pytest.raises(PassesComplete):
        while True:
            batch = filler.next_micro_batch()
            assert len(batch) == size and all(factors[i] >= eps for i in batch)
            used.extend(batch)
    good = sum(f >= eps for f in factors.values())
    assert len(used) == size * (good // size)  # every full micro-batch the pass allows, no more
    assert filler.totals.drawn == n and filler.stream.epoch == 0 and filler.stream.position == n
    assert sorted(used + filler.carry) == sorted(i for i in range(n) if factors[i] >= eps)
    assert filler.totals.discarded == n - good
    with pytest.raises(PassesComplete):  # stays complete
        filler.next_micro_batch()


def test_inactive_replacement_stops_at_max_draws():
    filler = BatchFiller(ExampleStream(9, seed=0), 4, 0.0, None, max_draws=18)
    batches = [filler.next_micro_batch() for _ in range(4)]
    assert [i for b in batches for i in b] == ExampleStream(9, seed=0).take(16)
    with pytest.raises(PassesComplete):
        filler.next_micro_batch()


def test_exhausted_when_a_full_pass_finds_nothing_above_epsilon():
    filler = BatchFiller(ExampleStream(10, seed=0), 4, 0.5, factor_table({i: 0.01 for i in range(10)}))
    with pytest.raises(ReplacementExhausted, match="full pass"):
        filler.next_micro_batch()
    assert filler.totals.discarded >= 10


def test_filler_state_roundtrip_continues_identically():
    factors = {i: (0.05 if i % 4 == 0 else 0.8) for i in range(30)}

    def make():
        return BatchFiller(ExampleStream(30, seed=5), 4, 0.3, factor_table(factors))

    filler = make()
    for _ in range(7):
        filler.next_micro_batch()
    state = filler.state_dict()
    expected = [filler.next_micro_batch() for _ in range(10)]
    resumed = make()
    resumed.load_state_dict(state)
    assert [resumed.next_micro_batch() for _ in range(10)] == expected


def test_collective_rounds_keep_processes_in_step():
    """Two simulated processes: one rich in good examples, one poor. Every scoring round
    is collective, so both score the same number of chunks, and the rich one's carry
    stays bounded (it re-scores its carry instead of drawing without limit)."""
    n, size, eps = 40, 4, 0.5
    rich_f = {i: 0.9 for i in range(n)}
    poor_f = {i: (0.9 if i % 5 == 0 else 0.1) for i in range(n)}
    calls = {"rich": [], "poor": []}
    rich = BatchFiller(ExampleStream(n, 0, 0, 2), size, eps, factor_table(rich_f, calls["rich"]))
    poor = BatchFiller(ExampleStream(n, 0, 1, 2), size, eps, factor_table(poor_f, calls["poor"]))
    # Lock-step simulation of the all-reduce: run both generators round by round.
    import threading

    barrier = threading.Barrier(2)
    flags: dict[str, tuple[bool, bool, bool]] = {}

    def sync_for(name):
        def sync(*mine):
            flags[name] = mine
            barrier.wait()
            result = tuple(any(f[k] for f in flags.values()) for k in range(3))
            barrier.wait()
            return result
        return sync

    rich.sync, poor.sync = sync_for("rich"), sync_for("poor")
    out = {"rich": [], "poor": []}

    def run(name, filler):
        for _ in range(6):
            out[name].append(filler.next_micro_batch())

    threads = [threading.Thread(target=run, args=(k, f)) for k, f in (("rich", rich), ("poor", poor))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(len(b) == size for k in out for b in out[k]) and len(out["poor"]) == 6
    assert len(calls["rich"]) == len(calls["poor"])
    assert len(rich.carry) <= 2 * size
    assert all(poor_f[i] >= eps for b in out["poor"] for i in b)

    # With one pass of draws each, the poor process runs out first; both stop in the same
    # round (each scored the same number of chunks, the rich one's last ones empty).
    calls = {"rich": [], "poor": []}
    rich = BatchFiller(ExampleStream(n, 0, 0, 2), size, eps, factor_table(rich_f, calls["rich"]), max_draws=n // 2)
    poor = BatchFiller(ExampleStream(n, 0, 1, 2), size, eps, factor_table(poor_f, calls["poor"]), max_draws=n // 2)
    rich.sync, poor.sync = sync_for("rich"), sync_for("poor")
    ended: dict[str, int] = {}

    def until_done(name, filler):
        batches = 0
        try:
            while True:
                filler.next_micro_batch()
                batches += 1
        except PassesComplete:
            ended[name] = batches

    threads = [threading.Thread(target=until_done, args=(k, f)) for k, f in (("rich", rich), ("poor", poor))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert ended["rich"] == ended["poor"] == 1  # the poor half-pass fills one micro-batch
    assert len(calls["rich"]) == len(calls["poor"]) and poor.totals.drawn == n // 2


def test_real_model_scores_and_keeps_only_examples_above_epsilon():
    """The trainer's scoring with the tiny model: with a huge N_eff, short (likely)
    tactics have F ~ 0 and long ones F ~ 1, so some are discarded and batches stay full."""
    from training.config import TrainConfig
    from training.modeling import TINY_MODEL, load_causal_lm, load_tokenizer
    from training.trainer import CompletionLogProbs, Objective, load_splits

    config = TrainConfig(model=TINY_MODEL, max_length=256, micro_batch_size=4, batch_size=4, bf16=False)
    tokenizer = load_tokenizer(TINY_MODEL)
    train_split, _, _ = load_splits(config, tokenizer)
    model = CompletionLogProbs(load_causal_lm(TINY_MODEL), fused=True)

    @torch.no_grad()
    def logprobs(indices):
        return model(**train_split.batch(indices, torch.device("cpu"))) if indices else torch.zeros(0)

    objective = Objective("stepwise", 10**12, train_split, logprobs)
    eps = 0.5
    filler = BatchFiller(ExampleStream(len(train_split), seed=0), 4, eps, objective.score)
    batches = [filler.next_micro_batch() for _ in range(4)]
    assert all(len(b) == 4 for b in batches)
    kept = [i for b in batches for i in b]
    assert bool((objective.score(kept) >= eps).all())
    counts = filler.pop_counts()
    assert counts.discarded > 0
    drawn = ExampleStream(len(train_split), seed=0).take(counts.drawn)
    rejected = [i for i in drawn if i not in set(kept) | set(filler.carry)]
    assert len(rejected) == counts.discarded
    assert bool((objective.score(rejected) < eps).all())
