"""Plain-torch spec of the GRPO/DAPO loss from hidden states: `logprobs_ref`, then the clipped token loss.

The reference that `linear_grpo.fused_linear_grpo_loss` is tested against; written as directly as the spec reads
(a loop over sequences for the per-sequence aggregations).
"""

from __future__ import annotations

import torch

from .logprobs_ref import logprobs_ref

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")


def grpo_token_loss_ref(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [T] and per-token terms (pg1, pg2, ratio, kl) from [T] fp32 log-probs.

    The kl term is reported whenever ref_logprobs is given and enters the loss only when kl_coef != 0.
    """
    log_ratio = torch.clamp(logprobs - old_logprobs, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * dual_clip), pg)
    loss = pg
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        d = ref_logprobs - logprobs
        if kl_estimator == "k1":
            kl = -d
        elif kl_estimator == "k2":
            kl = 0.5 * d * d
        else:
            kl = torch.exp(d) - d - 1.0
    if ref_logprobs is not None and kl_coef != 0.0:
        loss = loss + kl_coef * kl
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * entropy
    return loss, {"pg1": pg1, "pg2": pg2, "ratio": ratio, "kl": kl}


def fused_linear_grpo_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token-mean",
    entropy_coef: float = 0.0,
    num_tokens: float | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference GRPO/DAPO loss: (scalar loss, metrics) with the same contract as `fused_linear_grpo_loss`.

    The effective mask is loss_mask & (targets != ignore_index).
    """
    mask = loss_mask.bool() & (targets != ignore_index)
    logp, entropy = logprobs_ref(hidden, weight, targets, temperature, bias, ignore_index, mask)
    dtype = logp.dtype
    maskf = mask.to(dtype)
    token_loss, terms = grpo_token_loss_ref(
        logp, old_logprobs.to(dtype), advantages.to(dtype),
        ref_logprobs.to(dtype) if ref_logprobs is not None else None, entropy,
        clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef,
    )
    masked_loss = token_loss * maskf
    if loss_agg == "token-mean":
        denom = num_tokens if num_tokens is not None else maskf.sum().clamp(min=1.0)
        loss = masked_loss.sum() / denom
    else:
        per_seq = []
        bounds = cu_seqlens.tolist()
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            n = maskf[s0:s1].sum()
            if n > 0:
                seq_sum = masked_loss[s0:s1].sum()
                per_seq.append(seq_sum / n if loss_agg == "seq-mean-token-mean" else seq_sum)
        loss = torch.stack(per_seq).mean() if per_seq else masked_loss.sum() * 0.0

    with torch.no_grad():
        count = maskf.sum().clamp(min=1.0)

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return (x.detach().to(torch.float32) * mask).sum() / count.float()

        metrics = {
            "clip_frac": masked_mean((terms["pg2"] > terms["pg1"]).to(dtype)),
            "approx_kl": masked_mean(old_logprobs.to(dtype) - logp),
            "kl": masked_mean(terms["kl"]),
            "entropy": masked_mean(entropy),
            "ratio_mean": masked_mean(terms["ratio"]),
        }
    return loss, metrics
