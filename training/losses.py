"""Coverage losses for fine-tuning: step-wise DCO, proof-level DCO, and their numerics.

All quantities come from log-probabilities (natural log, `log p <= 0`), never from `p`:
a tactic's `log p` is the sum of its token log-probs, typically −5 to −500, where `p`
itself underflows. Pure functions, tensors in / tensors out.

- `log1mexp(a) = log(1 - e^a)` for `a <= 0`.
- `log_coverage(logp, n) = log(1 - (1-p)^n)`: log pass@n of one example.
- `coverage_weight(logp, n) = F(n, p) = n (1-p)^(n-1) p / (1 - (1-p)^n)` in [0, 1]:
  the factor by which DCO scales the cross-entropy gradient. `F(1, p) = 1` exactly;
  `F(n, 1) = 0` for `n > 1`; `F -> 1` as `p -> 0`.
- `stepwise_dco_loss`: per-example `-log(1 - (1-p)^N)`, gradient `F · ∇(-log p)`.
- `proof_level_dco_loss`: one `p` per proof (the product of its steps' probabilities).
- `majority_vote_weight`: Compute Aligned Training factor for majority vote.

Numerics: the coverage functions compute in float64 whatever the input dtype and return
float32 for float16/bfloat16/float32 inputs (float64 for float64 inputs). Inputs must be
finite; values in (0, `LOGP_CLAMP_TOL`] are treated as rounding error of a probability-one
completion and clamped to 0, larger positive values raise `ValueError` (the check reads
one boolean back from the device per call).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from numbers import Integral
from typing import Literal

import torch
from torch import Tensor

from training.prompt import IGNORE_INDEX  # noqa: E402  (re-exported: the label of no-loss positions)

LOGP_CLAMP_TOL = 1e-4
"""Positive log-probabilities up to this value (nats) are rounding error and clamp to 0.

Summed float32 token log-probs of a near-certain completion can land slightly above 0."""

_LOG_HALF = -math.log(2.0)
_LOG_EPS64 = math.log(torch.finfo(torch.float64).eps)

Reduction = Literal["mean", "sum", "none"]


# ---------------------------------------------------------------------------- validation


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def _check_logp(logp: Tensor, name: str = "logp") -> Tensor:
    """Validate log-probabilities and return them as float64, positives <= tol clamped."""
    if not isinstance(logp, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logp).__name__}")
    if not logp.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {logp.dtype}")
    work = logp.to(torch.float64)
    bad = ~torch.isfinite(work) | (work > LOGP_CLAMP_TOL)
    if bool(bad.any()):
        worst = work[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must hold finite log-probabilities <= 0 (natural log, not NLL); "
            f"found {worst!r}"
        )
    return work.clamp(max=0.0)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(values: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ------------------------------------------------------------------------------ numerics


def log1mexp(a: Tensor) -> Tensor:
    """`log(1 - exp(a))` for `a <= 0`, accurate over the whole domain.

    Uses `log(-expm1(a))` for `a > -ln 2` and `log1p(-exp(a))` otherwise; `a = 0` gives
    `-inf`, `a = -inf` gives 0. Each branch sees a harmless placeholder where it is not
    selected, so gradients are free of NaNs from the unused branch.
    """
    near = a > _LOG_HALF
    placeholder = torch.full_like(a, _LOG_HALF)
    a_near = torch.where(near, a, placeholder)
    a_far = torch.where(near, placeholder, a)
    return torch.where(near, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def _times_log(count: Tensor | float, log_value: Tensor) -> Tensor:
    """`count * log_value` with `0 * -inf = 0` (an empty product of probabilities is 1)."""
    product = count * log_value
    return torch.where(torch.as_tensor(count, device=log_value.device) == 0, 0.0, product)


def _log_coverage64(logp: Tensor, n: int) -> Tensor:
    """`log(1 - (1-p)^n)` from validated float64 `logp`, `n >= 2`."""
    log_n = math.log(n)
    # 1-(1-p)^n = n p (1 - (n-1)p/2 + ...): below eps the first term is exact to rounding,
    # while exp(logp) itself may have underflowed to 0.
    tiny = logp + log_n < _LOG_EPS64
    # The exact branch sees a placeholder where unused, keeping its gradient finite.
    safe = torch.where(tiny, torch.full_like(logp, -1.0), logp)
    exact = log1mexp(n * log1mexp(safe))
    return torch.where(tiny, logp + log_n, exact)


def log_coverage(logp: Tensor, n: int) -> Tensor:
    """`log(1 - (1-p)^n)` (log pass@n coverage) from `logp = log p`, elementwise.

    Domain: finite `logp <= 0` (any shape), `n` a positive int. Exactly `logp` for
    `n = 1`; 0 at `logp = 0`; `log n + logp` once `n·p` is below float64 epsilon.
    Differentiable; the derivative with respect to `logp` is `coverage_weight(logp, n)`
    (undefined at exactly `logp = 0` for `n > 1`: use `stepwise_dco_loss` for training).
    """
    n = _positive_int(n, "n")
    work = _check_logp(logp)
    out = work if n == 1 else _log_coverage64(work, n)
    return out.to(_out_dtype(logp.dtype))


def _log_coverage_weight64(logp: Tensor, n: int) -> Tensor:
    """`log F(n, p)` from validated float64 `logp`."""
    if n == 1:
        return torch.zeros_like(logp)
    # log F = (n-1) log(1-p) + log r,  r = n p / (1-(1-p)^n) in [1, n]. Evaluating r as a
    # ratio of two accurately computed quantities (no log-difference) keeps F accurate to
    # a few ulps near F = 1. Once n p < eps, r = 1 to rounding (and p may underflow).
    tiny = logp + math.log(n) < _LOG_EPS64
    safe = torch.where(tiny, torch.full_like(logp, -1.0), logp)
    ratio = n * torch.exp(safe) / -torch.expm1(n * log1mexp(safe))
    log_f = _times_log(n - 1, log1mexp(logp)) + torch.where(tiny, 0.0, torch.log(ratio))
    return log_f.clamp(max=0.0)  # F <= 1; removes rounding overshoot as p -> 0


def log_coverage_weight(logp: Tensor, n: int) -> Tensor:
    """`log F(n, p)` (<= 0), with `F` as in `coverage_weight`; `-inf` at `p = 1`, `n > 1`."""
    n = _positive_int(n, "n")
    return _log_coverage_weight64(_check_logp(logp), n).to(_out_dtype(logp.dtype))


def coverage_weight(logp: Tensor, n: int) -> Tensor:
    """DCO gradient factor `F(n, p) = n (1-p)^(n-1) p / (1 - (1-p)^n)`, in [0, 1].

    Domain: finite `logp <= 0`, `n` a positive int. `F = 1` exactly for `n = 1`;
    `F -> 1` as `p -> 0`; `F = 0` at `p = 1` for `n > 1`; decreasing in `p`.
    Not detached: callers that use it as a fixed factor detach it.
    """
    n = _positive_int(n, "n")
    return torch.exp(_log_coverage_weight64(_check_logp(logp), n)).to(_out_dtype(logp.dtype))


def majority_vote_weight(logp: Tensor, n: int, k: int) -> Tensor:
    """Compute Aligned Training factor for a k-of-n majority vote, in [0, k].

    With `T(p) = P(Bin(n, p) >= k)` the probability that at least `k` of `n` samples are
    this completion, the factor is `p · d/dp log T(p)
    = n C(n-1, k-1) p^k (1-p)^(n-k) / T(p)`: the binomial mass at the decision boundary
    over the tail. For `k = 1` it equals `coverage_weight`; it tends to `k` as `p -> 0`
    and to 0 as `p -> 1` (for `k < n`).
    Domain: finite `logp <= 0`; `1 <= k <= n`. Cost is O(n - k + 1) per element.
    """
    n = _positive_int(n, "n")
    k = _positive_int(k, "k")
    if k > n:
        raise ValueError(f"k must not exceed n, got k={k} > n={n}")
    work = _check_logp(logp)
    log_q = log1mexp(work)
    counts = torch.arange(k, n + 1, dtype=torch.float64, device=work.device)
    log_binom = (
        math.lgamma(n + 1) - torch.lgamma(counts + 1) - torch.lgamma(n - counts + 1)
    )
    x = work.unsqueeze(-1)
    terms = log_binom + _times_log(counts, x) + _times_log(n - counts, log_q.unsqueeze(-1))
    log_tail = torch.logsumexp(terms, dim=-1)
    log_boundary = (
        math.log(n)
        + math.lgamma(n) - math.lgamma(k) - math.lgamma(n - k + 1)
        + k * work
        + _times_log(n - k, log_q)
    )
    out = torch.exp(log_boundary - log_tail)
    return out.to(_out_dtype(logp.dtype))


# ------------------------------------------------------------------ sequence log-probs


def _chunk_rows(vocab: int, target_elements: int = 1 << 25) -> int:
    """Rows per chunk so that a float32 chunk of logits stays near 128 MiB."""
    return max(1, target_elements // max(vocab, 1))


class _GatheredTokenLogProb(torch.autograd.Function):
    """log softmax(logits[rows])[targets] in float32 (float64 for float64 logits), chunked.

    No float32 copy of the logits is saved.

    Forward keeps only the float32 log-normaliser per row; backward recomputes the
    softmax one chunk at a time and writes the gradient into a buffer of the logits'
    shape and dtype (rows not selected get zero gradient).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        flat = logits.reshape(-1, logits.shape[-1])
        work = _out_dtype(logits.dtype)
        chunk = _chunk_rows(flat.shape[-1])
        lse = torch.empty(rows.shape[0], dtype=work, device=logits.device)
        picked = torch.empty_like(lse)
        for start in range(0, rows.shape[0], chunk):
            sl = slice(start, start + chunk)
            block = flat.index_select(0, rows[sl]).to(work)
            lse[sl] = torch.logsumexp(block, dim=-1)
            picked[sl] = block.gather(1, targets[sl].unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(logits, rows, targets, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, rows, targets, lse = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        grad = torch.zeros_like(flat)
        chunk = _chunk_rows(vocab)
        for start in range(0, rows.shape[0], chunk):
            sl = slice(start, start + chunk)
            g = grad_out[sl].to(lse.dtype).unsqueeze(1)
            block = flat.index_select(0, rows[sl]).to(lse.dtype)
            block_grad = -g * torch.exp(block - lse[sl].unsqueeze(1))
            block_grad.scatter_add_(1, targets[sl].unsqueeze(1), g)
            grad.index_copy_(0, rows[sl], block_grad.to(grad.dtype))
        return grad.view_as(logits), None, None


def _completion_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flat row indices (into [B, T-1]) of predicted completion tokens, their targets, batch ids."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    batch_ids, pos = mask.nonzero(as_tuple=True)
    targets = shifted[batch_ids, pos]
    return batch_ids, pos, targets


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed completion log-probability per example, `log p(completion | prompt)`, float32.

    `logits`: [batch, seq, vocab] of a causal LM (any float dtype); `labels`: [batch, seq]
    token ids with `IGNORE_INDEX` on prompt and padding. Token `t` is predicted by the
    logits at `t-1` (the usual causal shift). Log-softmax is evaluated in float32 only on
    completion rows, in chunks, so no float32 copy of the full logits is made; an example
    without completion tokens gets 0. Returns a [batch] tensor of values <= 0, float32
    (float64 when the logits are float64).
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [batch, seq, vocab] matching labels [batch, seq]; got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    batch, seq, vocab = logits.shape
    batch_ids, pos, targets = _completion_positions(labels)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"label ids must be in [0, {vocab}) or {IGNORE_INDEX}")
    rows = batch_ids * seq + pos  # row of logits[:, t-1] in the flattened [B*T, V] view
    token_logp = _GatheredTokenLogProb.apply(logits, rows, targets)
    out = torch.zeros(batch, dtype=token_logp.dtype, device=logits.device)
    return out.index_add(0, batch_ids, token_logp)


def _matmul_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the output projection runs in: autocast's if active, else the hidden's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class _HiddenTokenLogProb(torch.autograd.Function):
    """Fused output projection + log-softmax + gather over selected hidden rows, chunked.

    Never materialises logits for more than one chunk of rows; backward recomputes them.
    Matmuls run in `compute_dtype` (autocast's dtype when active, so forward and backward
    agree), log-softmax in float32; gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            chunk = _chunk_rows(w.shape[0])
            lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            picked = torch.empty_like(lse)
            for start in range(0, h.shape[0], chunk):
                sl = slice(start, start + chunk)
                block = (h[sl] @ w.t()).float()
                lse[sl] = torch.logsumexp(block, dim=-1)
                picked[sl] = block.gather(1, targets[sl].unsqueeze(1)).squeeze(1)
        ctx.compute_dtype = compute_dtype
        ctx.save_for_backward(hidden, weight, targets, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(ctx.compute_dtype)
            w = weight.to(ctx.compute_dtype)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            chunk = _chunk_rows(w.shape[0])
            for start in range(0, h.shape[0], chunk):
                sl = slice(start, start + chunk)
                g = grad_out[sl].float().unsqueeze(1)
                block = (h[sl] @ w.t()).float()
                block_grad = -g * torch.exp(block - lse[sl].unsqueeze(1))
                block_grad.scatter_add_(1, targets[sl].unsqueeze(1), g)
                block_grad = block_grad.to(ctx.compute_dtype)
                grad_hidden[sl] = (block_grad @ w).to(hidden.dtype)
                grad_weight += (block_grad.t() @ h[sl]).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def sequence_logprobs_from_hidden(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Like `sequence_logprobs`, from final hidden states and the output-layer weight.

    `hidden`: [batch, seq, d] (after the final norm); `weight`: [vocab, d] (no bias);
    `labels`: [batch, seq]. Only completion positions are projected to the vocabulary,
    in chunks, so neither the full logits nor their gradient is ever stored — for a
    151,936-word vocabulary this is most of a step's activation memory. Returns [batch]
    float32 summed log-probs.
    """
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden must be [batch, seq, d] matching labels [batch, seq]; got "
            f"{tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[2]}], got {tuple(weight.shape)}")
    batch_ids, pos, targets = _completion_positions(labels)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"label ids must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}")
    selected = hidden[batch_ids, pos]
    token_logp = _HiddenTokenLogProb.apply(selected, weight, targets, _matmul_dtype(selected))
    out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    return out.index_add(0, batch_ids, token_logp)


# --------------------------------------------------------------------------------- losses


def _dco_from_logp(seq_logp: Tensor, n_eff: int) -> Tensor:
    """Per-element `-log(1-(1-p)^n)` whose gradient is `F.detach() · ∇(-seq_logp)`.

    Surrogate form: `F·(-logp) + stopgrad(true - F·(-logp))`, evaluated in float64, so
    the value is the true DCO loss and the gradient uses the exact detached factor
    (no differentiation through `log1mexp`, which is singular at p = 1).
    """
    n_eff = _positive_int(n_eff, "n_eff")
    work = _check_logp(seq_logp.detach(), "seq_logp")
    nll = -seq_logp.to(torch.float64)
    if n_eff == 1:
        return nll.to(_out_dtype(seq_logp.dtype))
    weight = torch.exp(_log_coverage_weight64(work, n_eff))
    true_loss = -_log_coverage64(work, n_eff)
    surrogate = weight * nll
    return (surrogate + (true_loss - surrogate).detach()).to(_out_dtype(seq_logp.dtype))


def stepwise_dco_loss(seq_logp: Tensor, n_eff: int, reduction: Reduction = "mean") -> Tensor:
    """Step-wise DCO: each (state, tactic) example has its own `p`; loss `-log(1-(1-p)^N)`.

    `seq_logp`: [batch] summed tactic log-probs (from `sequence_logprobs`). The value is
    the true DCO loss in nats; its gradient is exactly `F(N, p) · ∇(-seq_logp)` with `F`
    detached (see `_dco_from_logp`). `n_eff = 1` is the summed-token cross-entropy,
    value and gradient. `reduction`: mean or sum over examples, or "none".
    """
    if seq_logp.dim() != 1:
        raise ValueError(f"seq_logp must be [batch], got shape {tuple(seq_logp.shape)}")
    return _reduce(_dco_from_logp(seq_logp, n_eff), reduction)


def group_index(proof_ids: Sequence[Hashable] | Tensor, device: torch.device | None = None) -> Tensor:
    """Map each example's proof id to a dense group index 0..G-1, in order of first appearance."""
    keys = proof_ids.tolist() if isinstance(proof_ids, Tensor) else list(proof_ids)
    first_seen: dict[Hashable, int] = {}
    index = [first_seen.setdefault(key, len(first_seen)) for key in keys]
    return torch.tensor(index, dtype=torch.long, device=device)


def proof_logprobs(seq_logp: Tensor, proof_ids: Sequence[Hashable] | Tensor) -> tuple[Tensor, Tensor]:
    """Per-proof `log p = Σ steps' log p` of the steps present in the batch.

    Returns `(group_logp [G], group [batch])` with `group[i]` the proof index of step `i`.
    """
    if seq_logp.dim() != 1 or len(proof_ids) != seq_logp.shape[0]:
        raise ValueError(
            f"seq_logp must be [batch] with one proof id per example; got shape "
            f"{tuple(seq_logp.shape)} and {len(proof_ids)} ids"
        )
    group = group_index(proof_ids, device=seq_logp.device)
    n_groups = int(group.max()) + 1 if group.numel() else 0
    totals = torch.zeros(n_groups, dtype=seq_logp.dtype, device=seq_logp.device)
    return totals.index_add(0, group, seq_logp), group


def proof_level_dco_loss(
    seq_logp: Tensor,
    proof_ids: Sequence[Hashable] | Tensor,
    n_eff: int,
    reduction: Reduction = "mean",
) -> Tensor:
    """Proof-level ("naive") DCO: one `p = ∏ p(tactic_i | state_i)` per proof in the batch.

    Steps sharing a proof id are summed into one `log p`; each proof contributes
    `-log(1-(1-p)^N)` and all its steps share one detached factor `F(N, p_proof)`.
    Only the steps present in the batch count, so group a proof's steps in one batch for
    the paper's variant. `reduction` averages or sums over proofs ("none": [G] in order of
    first appearance).
    """
    group_logp, _ = proof_logprobs(seq_logp, proof_ids)
    return _reduce(_dco_from_logp(group_logp, n_eff), reduction)


LossKind = Literal["dco", "proof_dco"]


def make_loss(kind: LossKind, n_eff: int):
    """A loss callable `(seq_logp, proof_ids) -> scalar` (mean over examples or proofs).

    `dco`: step-wise DCO (ignores `proof_ids`); `proof_dco`: proof-level DCO.
    """
    n_eff = _positive_int(n_eff, "n_eff")
    if kind == "dco":
        return lambda seq_logp, proof_ids=None: stepwise_dco_loss(seq_logp, n_eff)
    if kind == "proof_dco":
        return lambda seq_logp, proof_ids: proof_level_dco_loss(seq_logp, proof_ids, n_eff)
    raise ValueError(f"loss kind must be 'dco' or 'proof_dco', got {kind!r}")
