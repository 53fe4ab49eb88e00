"""Coverage numerics against a high-precision reference, and the DCO gradient identity."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from training.data import SAMPLE_PATH, collate, load_tactic_examples, tokenize_examples
from training.losses import (
    IGNORE_INDEX,
    coverage_weight,
    log1mexp,
    log_coverage,
    log_coverage_weight,
    majority_vote_weight,
    make_loss,
    proof_level_dco_loss,
    sequence_logprobs,
    sequence_logprobs_from_hidden,
    stepwise_dco_loss,
)
from training.modeling import TINY_MODEL, build_tiny_qwen2, load_tokenizer

NS = (1, 2, 4, 16, 256, 4096)
LOGPS = (
    -10000.0, -5000.0, -745.5, -700.0, -500.0, -100.0, -50.0, -36.0, -20.0, -10.0, -5.0,
    -2.0, -1.0, -0.6931, -0.5, -0.1, -1e-2, -1e-3, -1e-4, -1e-6, -1e-9, -1e-12, -1e-15,
    -1e-100, -1e-300, 0.0,
)

mpmath.mp.dps = 60


def _reference(logp: float, n: int) -> tuple[mpmath.mpf, mpmath.mpf]:
    """(log(1-(1-p)^n), F(n, p)) in 60-digit arithmetic; (0, 0) at p = 1 for n > 1."""
    lp = mpmath.mpf(logp)
    p = mpmath.exp(lp)
    one_minus_p = -mpmath.expm1(lp)
    if one_minus_p == 0:
        return mpmath.mpf(0), mpmath.mpf(1 if n == 1 else 0)
    # log1p keeps log(1-p) exact when p is below the working precision.
    log_q = mpmath.log1p(-p) if p < 0.5 else mpmath.log(one_minus_p)
    q_n = mpmath.exp(n * log_q)  # (1-p)^n
    log_cov = mpmath.log1p(-q_n) if q_n < 0.5 else mpmath.log(-mpmath.expm1(n * log_q))
    weight = mpmath.exp(mpmath.log(n) + lp + (n - 1) * log_q - log_cov)
    assert mpmath.isfinite(log_cov) and mpmath.isfinite(weight)
    return log_cov, weight


@pytest.mark.parametrize("n", NS)
def test_log_coverage_and_weight_match_high_precision_reference(n: int) -> None:
    logp = torch.tensor(LOGPS, dtype=torch.float64)
    got_cov = log_coverage(logp, n)
    got_f = coverage_weight(logp, n)
    assert got_cov.dtype == torch.float64 and torch.isfinite(got_cov).all()
    assert torch.isfinite(got_f).all() and ((got_f >= 0) & (got_f <= 1)).all()
    for lp, cov, f in zip(LOGPS, got_cov.tolist(), got_f.tolist(), strict=True):
        ref_cov, ref_f = _reference(lp, n)
        assert abs(cov - float(ref_cov)) <= 1e-12 * abs(float(ref_cov)) + 1e-300, (lp, n, cov, ref_cov)
        if ref_f < mpmath.mpf("1e-300"):
            assert f < 1e-290, (lp, n, f, ref_f)
        else:
            assert abs(f - float(ref_f)) <= 1e-11 * float(ref_f), (lp, n, f, ref_f)


@pytest.mark.parametrize("n", NS)
def test_float32_inputs_are_accurate_to_float32(n: int) -> None:
    logp32 = torch.tensor(LOGPS, dtype=torch.float32)
    cov = log_coverage(logp32, n)
    f = coverage_weight(logp32, n)
    assert cov.dtype == torch.float32 and f.dtype == torch.float32
    exact_cov = log_coverage(logp32.double(), n)
    exact_f = coverage_weight(logp32.double(), n)
    torch.testing.assert_close(cov.double(), exact_cov, rtol=2e-7, atol=1e-38)
    torch.testing.assert_close(f.double(), exact_f, rtol=2e-7, atol=1e-38)


def test_n_equal_one_is_exactly_cross_entropy() -> None:
    logp = torch.tensor(LOGPS, dtype=torch.float32)
    assert torch.equal(log_coverage(logp, 1), logp)
    assert torch.equal(coverage_weight(logp, 1), torch.ones_like(logp))
    x = torch.tensor([-3.25, -0.5, -71.0], requires_grad=True)
    loss = stepwise_dco_loss(x, 1, reduction="sum")
    assert loss.item() == pytest.approx(74.75, abs=0)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, -torch.ones(3))


@pytest.mark.parametrize("n", [2, 4, 16, 256, 4096])
def test_weight_is_monotone_decreasing_in_p_with_correct_limits(n: int) -> None:
    logp = -torch.logspace(4, -12, 4001, dtype=torch.float64)  # ascending p
    f = coverage_weight(logp, n)
    ulp = torch.finfo(torch.float64).eps
    assert (f[1:] <= f[:-1] * (1 + 2 * ulp)).all()  # non-increasing up to rounding
    assert f[-1] < 1e-11  # p = 1 - 1e-12
    assert f[0].item() == 1.0  # p = e^-10000
    assert coverage_weight(torch.zeros(1, dtype=torch.float64), n).item() == 0.0
    assert log_coverage(torch.zeros(1), n).item() == 0.0
    # Confident examples stop pulling: F collapses once p is well above 1/n.
    assert coverage_weight(torch.tensor([math.log(min(0.999, 8 / n))]), n).item() < 0.01


def test_log1mexp_branches_and_edges() -> None:
    a = torch.tensor([-1e-300, -1e-10, -0.5, -math.log(2), -1.0, -50.0, -800.0], dtype=torch.float64)
    expected = [mpmath.log(-mpmath.expm1(mpmath.mpf(v))) for v in a.tolist()]
    for got, ref in zip(log1mexp(a).tolist(), expected, strict=True):
        assert got == pytest.approx(float(ref), rel=1e-14, abs=1e-300)
    assert log1mexp(torch.tensor([0.0])).item() == -math.inf
    x = torch.tensor([-1e-8, -3.0], requires_grad=True)
    (g,) = torch.autograd.grad(log1mexp(x).sum(), x)
    assert torch.isfinite(g).all()


def test_log_coverage_gradient_is_the_weight() -> None:
    x = torch.tensor([-800.0, -30.0, -3.0, -0.05, -1e-6], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(log_coverage(x, 16).sum(), x)
    torch.testing.assert_close(g, coverage_weight(x.detach(), 16), rtol=1e-9, atol=1e-300)


def test_input_validation() -> None:
    logp = torch.tensor([-1.0])
    for bad_n in (0, -3, 2.0, True, None):
        with pytest.raises((TypeError, ValueError), match="n"):
            log_coverage(logp, bad_n)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="<= 0"):
        coverage_weight(torch.tensor([-1.0, 0.5]), 4)
    with pytest.raises(ValueError, match="finite"):
        coverage_weight(torch.tensor([float("nan")]), 4)
    with pytest.raises(TypeError):
        log_coverage(torch.tensor([-1]), 4)
    # Rounding above zero (<= LOGP_CLAMP_TOL) is clamped: p = 1.
    assert coverage_weight(torch.tensor([5e-7]), 4).item() == 0.0
    with pytest.raises(ValueError, match="k must not exceed n"):
        majority_vote_weight(logp, 4, 5)
    with pytest.raises(ValueError, match="reduction"):
        stepwise_dco_loss(logp, 4, reduction="max")  # type: ignore[arg-type]


def test_bf16_inputs_compute_in_float32() -> None:
    logp = torch.tensor([-300.0, -3.0, -0.01], dtype=torch.bfloat16)
    for value in (log_coverage(logp, 16), coverage_weight(logp, 16)):
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
    torch.testing.assert_close(coverage_weight(logp, 16), coverage_weight(logp.float(), 16))


def test_majority_vote_weight() -> None:
    logp = torch.tensor([-40.0, -3.0, -1.0, -0.2, -1e-3], dtype=torch.float64)
    torch.testing.assert_close(majority_vote_weight(logp, 16, 1), coverage_weight(logp, 16))
    n, k = 16, 5
    got = majority_vote_weight(logp, n, k).tolist()
    for lp, value in zip(logp.tolist(), got, strict=True):
        p = mpmath.exp(mpmath.mpf(lp))
        tail = sum(mpmath.binomial(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        d_tail = n * mpmath.binomial(n - 1, k - 1) * p ** (k - 1) * (1 - p) ** (n - k)
        assert value == pytest.approx(float(p * d_tail / tail), rel=1e-10)
    assert got[0] == pytest.approx(k, rel=1e-9)  # p -> 0: the factor tends to k


def _reference_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    token = logp.gather(2, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(1)


def _random_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 9, 50, generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 9), generator=generator)
    labels[:, :4] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX  # padding
    labels[2] = IGNORE_INDEX  # no completion tokens
    return logits, labels


def test_sequence_logprobs_values_and_gradients() -> None:
    logits, labels = _random_batch(torch.float32)
    got = sequence_logprobs(logits, labels)
    ref = _reference_logprobs(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)
    assert got[2].item() == 0.0
    weights = torch.tensor([0.3, -2.0, 1.0])
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref.float() * weights).sum(), logits)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)


def test_sequence_logprobs_bf16_logits_are_finite_float32() -> None:
    logits, labels = _random_batch(torch.bfloat16)
    got = sequence_logprobs(logits, labels)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # Same bf16 values, upcast: only float32 rounding separates the two.
    torch.testing.assert_close(got.double(), _reference_logprobs(logits, labels), rtol=1e-6, atol=1e-4)
    (grad,) = torch.autograd.grad(stepwise_dco_loss(got[:2], 16), logits)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


def test_sequence_logprobs_from_hidden_matches_full_logits() -> None:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 9, 8, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, generator=generator, requires_grad=True)
    _, labels = _random_batch(torch.float32)
    fused = sequence_logprobs_from_hidden(hidden, weight, labels)
    full = sequence_logprobs(hidden @ weight.t(), labels)
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-5)
    g_fused = torch.autograd.grad(fused.sum(), (hidden, weight))
    g_full = torch.autograd.grad(full.sum(), (hidden, weight))
    for a, b in zip(g_fused, g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_from_hidden_under_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 9, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    _, labels = _random_batch(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = sequence_logprobs_from_hidden(hidden, weight, labels)
        full = sequence_logprobs(hidden @ weight.t(), labels)  # bf16 logits
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-4)  # same bf16 matmul
    assert (fused - sequence_logprobs(hidden @ weight.t(), labels)).abs().max() > 1e-4  # really bf16
    grads = torch.autograd.grad(fused.sum(), (hidden, weight))
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------- gradient identity on a model


@pytest.fixture(scope="module")
def confident_batch():
    """A tiny Qwen2 whose greedy tactics have p ~ 0.1, and a batch mixing those (high p)
    with the sample's real tactics (p ~ e^-80)."""
    tokenizer = load_tokenizer(TINY_MODEL)
    model = build_tiny_qwen2(tokenizer)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # sharper output distributions
    examples, _ = load_tactic_examples(SAMPLE_PATH)
    rows, _ = tokenize_examples(examples.select(range(4)), tokenizer, max_length=96, length_policy="truncate_left")
    batch = [dict(rows[i]) for i in range(4)]
    for row in batch[:2]:
        n_prompt = row["labels"].count(IGNORE_INDEX)
        ids = torch.tensor([row["input_ids"][:n_prompt]])
        with torch.no_grad():
            for _ in range(2):  # greedy tactic of two tokens
                next_id = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        completion = ids[0, n_prompt:].tolist()
        row["input_ids"] = row["input_ids"][:n_prompt] + completion
        row["labels"] = [IGNORE_INDEX] * n_prompt + completion
    return model, collate(batch, tokenizer.pad_token_id)


def _per_example_nll(model, batch) -> torch.Tensor:
    """Summed tactic NLL per example, via cross_entropy (independent of sequence_logprobs)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.sum(1)


def _grads(model, loss) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])


def test_stepwise_dco_gradient_is_weight_times_cross_entropy_gradient(confident_batch) -> None:
    model, batch = confident_batch
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    seq_logp = sequence_logprobs(logits, batch["labels"])
    best = seq_logp.max().item()
    n_eff = max(2, round(math.exp(-best)))  # n·p ~ 1 for the most confident example
    # Reference factor from the 60-digit formula, not from the code under test.
    weights = torch.tensor([float(_reference(lp, n_eff)[1]) for lp in seq_logp.tolist()], dtype=torch.float64)
    assert weights.min() < 0.8 and weights.max() > 0.999  # a real mix, not plain CE

    loss = stepwise_dco_loss(seq_logp, n_eff, reduction="sum")
    ref_loss = [-float(_reference(lp, n_eff)[0]) for lp in seq_logp.tolist()]
    assert loss.item() == pytest.approx(sum(ref_loss), rel=1e-6)
    dco_grad = _grads(model, loss).double()

    nll = _per_example_nll(model, batch)
    torch.testing.assert_close(nll, -seq_logp.detach(), rtol=1e-5, atol=1e-5)
    per_example = [_grads(model, nll[i]).double() for i in range(nll.shape[0])]
    expected = sum(w * g for w, g in zip(weights, per_example, strict=True))
    # The model computes in float32 (Qwen2's RMSNorm does even for float64 weights).
    scale = expected.abs().max()
    torch.testing.assert_close(dco_grad, expected, rtol=1e-5, atol=1e-6 * scale)
    ce_grad = sum(per_example)
    assert (dco_grad - ce_grad).norm() > 0.05 * ce_grad.norm()  # the factor matters here

    # A confident example alone: ∇ l_i = F_i · ∇ NLL_i.
    per_loss = stepwise_dco_loss(seq_logp, n_eff, reduction="none")
    i = int(seq_logp.argmax())
    torch.testing.assert_close(
        _grads(model, per_loss[i]).double(), weights[i] * per_example[i], rtol=1e-5, atol=1e-6 * scale
    )


def test_proof_level_dco_groups_steps_into_one_probability() -> None:
    seq_logp = torch.tensor([-0.4, -2.0, -0.3, -5.0], dtype=torch.float64, requires_grad=True)
    proof_ids = ["thm.a", "thm.b", "thm.a", "thm.c"]
    n = 4
    per_proof = proof_level_dco_loss(seq_logp, proof_ids, n, reduction="none")
    proof_logp = torch.tensor([-0.7, -2.0, -5.0], dtype=torch.float64)
    torch.testing.assert_close(per_proof, -log_coverage(proof_logp, n))
    loss = proof_level_dco_loss(seq_logp, proof_ids, n)
    (grad,) = torch.autograd.grad(loss, seq_logp)
    f = coverage_weight(proof_logp, n)
    expected = -torch.stack([f[0], f[1], f[0], f[2]]) / 3  # mean over 3 proofs
    torch.testing.assert_close(grad, expected)
    # One proof per step reduces to step-wise DCO; tensor ids work too.
    torch.testing.assert_close(
        proof_level_dco_loss(seq_logp, torch.arange(4), n), stepwise_dco_loss(seq_logp, n)
    )
    # A joint proof is less likely than its steps, so its factor is larger than theirs.
    assert f[0] > coverage_weight(torch.tensor([-0.3], dtype=torch.float64), n)[0]
    torch.testing.assert_close(make_loss("proof_dco", n)(seq_logp, proof_ids), loss)
    torch.testing.assert_close(make_loss("dco", n)(seq_logp), stepwise_dco_loss(seq_logp, n))
    with pytest.raises(ValueError, match="one proof id per example"):
        proof_level_dco_loss(seq_logp, proof_ids[:3], n)


def test_log_coverage_weight_is_log_of_weight() -> None:
    logp = torch.tensor([-1e4, -20.0, -1.0, -1e-8], dtype=torch.float64)
    torch.testing.assert_close(log_coverage_weight(logp, 256).exp(), coverage_weight(logp, 256))
