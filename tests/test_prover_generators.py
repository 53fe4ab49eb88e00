"""Tactic generators: fixed list, oracle, transformers (exact log-probs, batching, beams),
and loading checkpoints by path or manifest."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from prover.generators import DEFAULT_TACTICS, FixedTacticGenerator, OracleGenerator
from prover.generators.loading import GeneratorLoadError, load_generators
from prover.generators.transformers_gen import TransformersGenerator, completion_mask
from prover.replay import ReplayEnvironment, collapse_whitespace
from search.types import Candidate, Failed, Progress, TacticGenerator, Theorem
from training.modeling import TINY_MODEL, build_tiny_qwen2, load_tokenizer

STATES = [
    "x : Nat\n⊢ x + 0 = x",
    "a b : Nat\nh : a = b\n⊢ b = a",
    "⊢ True",
    "α : Type u_1\ns t : Set α\nh : s ⊆ t\n⊢ s ∩ t = s",
    "n : ℕ\n⊢ 0 < n + 1",
]



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spin contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- fixed


def test_fixed_generator_scores_and_validation() -> None:
    gen = FixedTacticGenerator()
    assert isinstance(gen, TacticGenerator) and gen.name == "fixed"
    rows = gen.propose(["⊢ a", "⊢ b"], 3)
    assert [c.tactic for c in rows[0]] == list(DEFAULT_TACTICS[:3]) and rows[0] == rows[1]
    assert all(c.logprob <= 0 for c in gen.candidates)
    assert math.isclose(sum(math.exp(c.logprob) for c in gen.candidates), 1.0)
    assert [c.logprob for c in gen.candidates] == sorted((c.logprob for c in gen.candidates), reverse=True)
    scored = FixedTacticGenerator({"ring": -2.0, "simp": -0.5})
    assert scored.propose(["s"], 5) == [[Candidate("simp", -0.5), Candidate("ring", -2.0)]]
    for bad in ([], ["simp", " simp"], [""], {"simp": 0.5}):
        with pytest.raises(ValueError):
            FixedTacticGenerator(bad)
    with pytest.raises(ValueError):
        gen.propose(["s"], 0)


# ---------------------------------------------------------------------------- oracle


@pytest.fixture(scope="module")
def replay() -> ReplayEnvironment:
    return ReplayEnvironment.from_benchmark()


def test_oracle_knows_recorded_tactics_among_distractors(replay: ReplayEnvironment) -> None:
    oracle = OracleGenerator(replay, seed=0)
    not_top = steps = 0
    for proof in replay.connected_proofs():
        state = replay.start(Theorem(proof.theorem_id))
        for tactic in proof.tactics:
            support = oracle.support(state.pp)
            assert math.isclose(sum(math.exp(c.logprob) for c in support), 1.0)
            recorded = {collapse_whitespace(t) for t in replay.recorded_tactics(state.pp)}
            assert collapse_whitespace(tactic) in {collapse_whitespace(c.tactic) for c in support}
            distractors = [c for c in support if collapse_whitespace(c.tactic) not in recorded]
            assert len(distractors) == 5
            assert all(isinstance(replay.apply(state, c.tactic), Failed) for c in distractors)
            not_top += collapse_whitespace(support[0].tactic) not in recorded
            steps += 1
            result = replay.apply(state, tactic)
            if isinstance(result, Progress):
                state = result.state
    assert steps == sum(p.length for p in replay.connected_proofs())
    assert 3 <= not_top < steps  # the recorded tactic is often, but not always, top-scored


def test_oracle_is_seeded_and_samples_without_replacement(replay: ReplayEnvironment) -> None:
    state = replay.start(Theorem(replay.connected_proofs()[0].theorem_id)).pp
    a, b, c = OracleGenerator(replay, seed=3), OracleGenerator(replay, seed=3), OracleGenerator(replay, seed=4)
    assert a.support(state) == b.support(state) != c.support(state)
    assert a.propose([state] * 4, 2) == b.propose([state] * 4, 2)
    full = a.propose([state], 100)[0]
    assert full == a.support(state)
    draws = a.propose([state] * 3000, 1)
    counts = Counter(row[0].tactic for row in draws)
    for candidate in a.support(state):  # sampled in proportion to the probabilities
        assert abs(counts[candidate.tactic] / 3000 - math.exp(candidate.logprob)) < 0.04
    pairs = a.propose([state] * 50, 3)
    assert all(len({x.tactic for x in row}) == 3 for row in pairs)
    unknown = a.propose(["⊢ a state nobody recorded"], 10)[0]
    assert len(unknown) == 5 and math.isclose(sum(math.exp(x.logprob) for x in unknown), 1.0)


# ---------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    """The tiny Qwen2 with an output bias that makes EOS likely, so completions both end
    with EOS and run into max_new_tokens."""
    tokenizer = load_tokenizer(TINY_MODEL)
    model = build_tiny_qwen2(tokenizer)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 7.0
    model.lm_head = head
    return model.eval(), tokenizer


def _reference_logprob(model: torch.nn.Module, prompt: list[int], tokens: tuple[int, ...]) -> float:
    """Σ log softmax(logits) of `tokens` after `prompt`, one unpadded sequence, float64."""
    ids = torch.tensor([prompt + list(tokens)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)))


def test_sampled_logprobs_are_exact(tiny) -> None:
    model, tokenizer = tiny
    torch.manual_seed(0)
    gen = TransformersGenerator(model, tokenizer, temperature=1.3, max_new_tokens=10, max_batch_states=2)
    rows = gen.generate(STATES, 4)
    assert len(rows) == len(STATES) and all(len(r) == 4 for r in rows)
    finished = [g for row in rows for g in row if g.finished]
    truncated = [g for row in rows for g in row if not g.finished]
    assert finished and truncated and gen.stats.truncated == len(truncated)
    for state, row in zip(STATES, rows):
        prompt = gen.prompt_ids(state)
        for g in row:
            assert g.logprob <= 0
            assert g.logprob == pytest.approx(_reference_logprob(model, prompt, g.token_ids), abs=2e-4)
            assert g.token_ids.count(tokenizer.eos_token_id) == int(g.finished)
            body = g.token_ids[:-1] if g.finished else g.token_ids
            assert g.text == tokenizer.decode(list(body), skip_special_tokens=True).strip()
    # propose() is generate() without the tokens.
    torch.manual_seed(0)
    again = TransformersGenerator(model, tokenizer, temperature=1.3, max_new_tokens=10, max_batch_states=2).propose(STATES, 4)
    assert again == [[Candidate(g.text, g.logprob) for g in row] for row in rows]


def test_rescoring_in_small_chunks_is_unchanged(tiny) -> None:
    model, tokenizer = tiny
    torch.manual_seed(1)
    big = TransformersGenerator(model, tokenizer, max_new_tokens=6).generate(STATES[:3], 3)
    torch.manual_seed(1)
    small = TransformersGenerator(model, tokenizer, max_new_tokens=6, max_rescore_tokens=1).generate(STATES[:3], 3)
    assert [[g.token_ids for g in r] for r in big] == [[g.token_ids for g in r] for r in small]
    for rb, rs in zip(big, small):
        for gb, gs in zip(rb, rs):
            assert gb.logprob == pytest.approx(gs.logprob, abs=1e-5)


def test_beam_search_returns_distinct_exactly_scored_beams(tiny) -> None:
    model, tokenizer = tiny
    gen = TransformersGenerator(model, tokenizer, beam_search=True, max_new_tokens=6)
    rows = gen.generate(STATES[:3], 3)
    for state, row in zip(STATES[:3], rows):
        assert len(row) == 3 and len({g.token_ids for g in row}) == 3
        prompt = gen.prompt_ids(state)
        for g in row:
            assert g.logprob == pytest.approx(_reference_logprob(model, prompt, g.token_ids), abs=2e-4)


def test_completion_mask_stops_after_first_eos() -> None:
    eos = 0
    tokens = torch.tensor([[5, 0, 0, 0], [5, 6, 7, 8], [0, 0, 0, 0]])
    assert completion_mask(tokens, eos).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_generator_validates_arguments(tiny) -> None:
    model, tokenizer = tiny
    for bad in ({"temperature": 0}, {"max_new_tokens": 0}, {"max_batch_states": 0}):
        with pytest.raises(ValueError):
            TransformersGenerator(model, tokenizer, **bad)
    with pytest.raises(ValueError):
        TransformersGenerator(model, tokenizer).propose(["s"], 0)


# --------------------------------------------------------------------------- loading


def test_load_generators_by_path_and_name(tiny, tmp_path: Path) -> None:
    _, tokenizer = tiny
    model = build_tiny_qwen2(tokenizer).eval()
    paths = [tmp_path / "x" / "ckpt", tmp_path / "y" / "ckpt"]
    for path in paths:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    generators = load_generators([str(p) for p in paths], max_new_tokens=4)
    assert list(generators) == ["x/ckpt", "y/ckpt"]
    torch.manual_seed(0)
    loaded = generators["x/ckpt"].generate(STATES[:1], 2)[0]
    for g in loaded:
        assert g.logprob == pytest.approx(
            _reference_logprob(model, generators["x/ckpt"].prompt_ids(STATES[0]), g.token_ids), abs=2e-4
        )


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(GeneratorLoadError, match="no model given"):
        load_generators(None, None)
    with pytest.raises(GeneratorLoadError, match="does not exist"):
        load_generators([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeneratorLoadError, match="no config.json"):
        load_generators([str(tmp_path / "empty")])
    (tmp_path / "file").write_text("x")
    with pytest.raises(GeneratorLoadError, match="not a directory"):
        load_generators([str(tmp_path / "file")])
    with pytest.raises(GeneratorLoadError, match="manifest .* does not exist"):
        load_generators(None, tmp_path / "manifest.json")
    with pytest.raises(GeneratorLoadError, match="used twice"):
        load_generators([TINY_MODEL, TINY_MODEL])


def test_manifest_members_become_named_generators(tiny, tmp_path: Path) -> None:
    from training.ensemble import EnsembleMember, write_manifest

    _, tokenizer = tiny
    model = build_tiny_qwen2(tokenizer).eval()
    for name in ("neff-1", "neff-4"):
        model.save_pretrained(tmp_path / name / "final")
        tokenizer.save_pretrained(tmp_path / name / "final")
    members = [
        EnsembleMember(name=f"neff-{n}", n_eff=n, checkpoint=str(tmp_path / f"neff-{n}" / "final"), base_model=TINY_MODEL)
        for n in (1, 4)
    ]
    manifest = write_manifest(tmp_path / "ensemble.json", members)
    generators = load_generators(None, manifest, max_new_tokens=4)
    assert list(generators) == ["neff-1", "neff-4"] and generators["neff-4"].name == "neff-4"
    assert list(load_generators(None, tmp_path, max_new_tokens=4)) == ["neff-1", "neff-4"]  # the run directory
    both = load_generators([TINY_MODEL], manifest, max_new_tokens=4)
    assert list(both) == [TINY_MODEL, "neff-1", "neff-4"]

    # A member whose checkpoint is gone: the error names the member and the path.
    import shutil

    shutil.rmtree(tmp_path / "neff-4" / "final")
    with pytest.raises(GeneratorLoadError, match=r"neff-4.*not found"):
        load_generators(None, manifest)
    (tmp_path / "bad.json").write_text('{"version": 1, "members": []}')
    with pytest.raises(GeneratorLoadError, match="bad.json"):
        load_generators(None, tmp_path / "bad.json")


def test_out_of_memory_splits_the_batch_then_names_the_cause(monkeypatch) -> None:
    """A GPU OOM on a batch retries its halves; one state that still does not fit raises a
    clear GeneratorOutOfMemory instead of a bare CUDA error."""
    import torch

    from prover.generators.transformers_gen import GeneratorOutOfMemory, TransformersGenerator

    generator = TransformersGenerator("tiny-qwen2", device="cpu", max_new_tokens=4)
    real = generator._generate_batch
    sizes: list[int] = []

    def fits_two(states, k):
        sizes.append(len(states))
        if len(states) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(states, k)

    monkeypatch.setattr(generator, "_generate_batch", fits_two)
    states = ["a : Nat\n⊢ a = a", "⊢ True", "p : Prop\n⊢ p → p", "⊢ 1 + 1 = 2"]
    rows = generator.generate(states, 2)
    assert len(rows) == 4 and all(len(r) == 2 for r in rows)
    assert sizes == [4, 2, 2] and generator.stats.oom_splits == 1

    def never_fits(states, k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(generator, "_generate_batch", never_fits)
    with pytest.raises(GeneratorOutOfMemory, match="one state of"):
        generator.generate(states[:2], 2)
