"""The GRPO/DAPO token loss and its aggregation weights, shared by `grpo_loss` (torch path) and the fused lm-head loss.

One definition of each, so the two losses cannot drift apart (ties and clamp conventions included); the spec both
are tested against is `grpo_loss_ref.py`, which production code never imports.

Token terms (fp32): log_ratio = clamp(logp - old, -20, 20); ratio = exp(log_ratio);
pg = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)), capped at -A * dual_clip where A < 0;
kl (when a reference is given) k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 with d = ref - logp;
loss = pg + kl_coef * kl - entropy_coef * entropy.
Aggregation: loss = sum over sequences s of (sum of s's masked token losses) / denominator_s.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")
METRIC_NAMES = ("clip_frac", "approx_kl", "kl", "entropy", "ratio_mean")


class TokenTerms(NamedTuple):
    """Per-token terms, all [T] fp32."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor  # 1.0 where the clipped branch is the active one
    kl: torch.Tensor  # zeros without a reference


def _kl(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    d = ref - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1.0


def token_terms(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    ref: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_estimator: str,
    entropy: torch.Tensor | None,
    entropy_coef: float,
) -> TokenTerms:
    """Differentiable w.r.t. logp (and entropy); inputs already validated (`validate.validate_grpo_inputs`)."""
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    loss = pg
    kl = torch.zeros_like(pg)
    if ref is not None:  # reported whenever a reference is given, in the loss only when kl_coef != 0
        kl = _kl(logp, ref, kl_estimator)
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl
    if entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * entropy
    return TokenTerms(loss, ratio, (clipped > unclipped).to(pg.dtype), kl)


def seq_denominators(count: torch.Tensor, loss_agg: str, num_tokens: float | None) -> torch.Tensor:
    """[S] fp32 denominator of each sequence's summed token loss, from its masked-token count [S] fp32.

    token-mean: the masked tokens of the batch (or `num_tokens`, the global count under gradient accumulation);
    seq-mean-token-mean: the sequence's own count times the number of sequences with tokens;
    seq-mean-token-sum: the number of sequences with tokens. Device ops only, no host sync.
    """
    if loss_agg == "token-mean":
        denom = count.sum().clamp(min=1.0) if num_tokens is None else count.new_tensor(float(num_tokens))
        return denom.expand(count.shape)
    n_seqs = (count > 0).sum().clamp(min=1).to(torch.float32)
    if loss_agg == "seq-mean-token-mean":
        return count.clamp(min=1.0) * n_seqs
    return n_seqs.expand(count.shape)
