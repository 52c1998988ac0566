"""Plain torch spec of the GRPO/DAPO token loss: a loop over the packed sequences (what the kernel is tested against).

Per token (fp32):
    log_ratio = clamp(logp - old_logp, -20, 20); ratio = exp(log_ratio)
    pg1 = -A * ratio; pg2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high); pg = max(pg1, pg2)
    dual clip (c > 1): where A < 0, pg = min(pg, -A * c)
    kl (ref given; in the loss if kl_coef != 0): d = ref - logp; k1 = -d; k2 = d^2 / 2; k3 = exp(d) - d - 1
    loss = pg + kl_coef * kl - entropy_coef * entropy
Aggregation over masked tokens of the sequences in ``cu_seqlens`` (see ``grpo_loss``).
"""

from __future__ import annotations

import torch

from .grpo_terms import KL_ESTIMATORS, LOSS_AGGS, METRIC_NAMES  # noqa: F401  (names of the options and metrics)


def kl_penalty_ref(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate of KL(pi || pi_ref) from log-probs of the sampled tokens (Schulman's k1/k2/k3)."""
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def grpo_token_terms_ref(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Per-token loss and metric terms, all [T] in the promoted float dtype of the inputs."""
    log_ratio = torch.clamp(logprobs - old_logprobs, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * dual_clip), pg)
    loss = pg
    kl = torch.zeros_like(pg)
    if ref_logprobs is not None:  # reported whenever a reference is given, in the loss only when kl_coef != 0
        kl = kl_penalty_ref(logprobs, ref_logprobs, kl_estimator)
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl
    ent = torch.zeros_like(pg) if entropy is None else entropy
    if entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * entropy
    return {
        "loss": loss,
        "clipped": (pg2 > pg1).to(pg.dtype),
        "approx_kl": old_logprobs - logprobs,
        "kl": kl,
        "entropy": ent,
        "ratio": ratio,
    }


def grpo_loss_ref(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token-mean",
    num_tokens: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference GRPO loss: per-token terms, then a python loop over the sequences of ``cu_seqlens``.

    Same signature and result as ``grpo_loss``; differentiable by plain autograd (use float64 for gradcheck).
    """
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    # Zero the inputs outside the mask first: prompt/tool tokens can carry values whose exp() overflows
    # (e.g. ref - logp = 90 in k3), and inf * 0 would turn the masked sum and its gradient into NaN.
    logprobs = torch.where(loss_mask, logprobs, 0.0)
    old_logprobs = torch.where(loss_mask, old_logprobs, 0.0)
    advantages = torch.where(loss_mask, advantages, 0.0)
    if ref_logprobs is not None:
        ref_logprobs = torch.where(loss_mask, ref_logprobs, 0.0)
    if entropy is not None:
        entropy = torch.where(loss_mask, entropy, 0.0)
    terms = grpo_token_terms_ref(logprobs, old_logprobs, advantages, ref_logprobs, clip_low, clip_high, dual_clip,
                                 kl_coef, kl_estimator, entropy, entropy_coef)
    mask = loss_mask.to(terms["loss"].dtype)
    bounds = cu_seqlens.tolist()
    seq_sums, seq_counts = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        seq_sums.append((terms["loss"][start:end] * mask[start:end]).sum())
        seq_counts.append(mask[start:end].sum())
    zero = terms["loss"].sum() * 0.0
    if loss_agg == "token-mean":
        total = sum(seq_sums, zero)
        denom = float(num_tokens) if num_tokens is not None else max(float(sum(c.item() for c in seq_counts)), 1.0)
        loss = total / denom
    else:
        per_seq = []
        for s, c in zip(seq_sums, seq_counts):
            if c.item() > 0:
                per_seq.append(s / c if loss_agg == "seq-mean-token-mean" else s)
        loss = sum(per_seq, zero) / max(len(per_seq), 1)

    n_masked = max(float(mask.sum().item()), 1.0)
    with torch.no_grad():
        metrics = {
            "clip_frac": (terms["clipped"] * mask).sum() / n_masked,
            "approx_kl": (terms["approx_kl"] * mask).sum() / n_masked,
            "kl": (terms["kl"] * mask).sum() / n_masked,
            "entropy": (terms["entropy"] * mask).sum() / n_masked,
            "ratio_mean": (terms["ratio"] * mask).sum() / n_masked,
        }
    metrics = {k: v.detach().float() for k, v in metrics.items()}
    return loss.float() if loss.dtype != torch.float64 else loss, metrics
