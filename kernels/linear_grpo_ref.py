"""Plain-torch spec of the GRPO/DAPO loss from hidden states: `logprobs_ref`, then the clipped token loss.

The reference that `linear_grpo.fused_linear_grpo_loss` is tested against; written as directly as the spec reads
(the token loss and its aggregation are `grpo_loss_ref`, the one spec both loss kernels follow).
"""

from __future__ import annotations

import torch

from .grpo_loss_ref import grpo_loss_ref
from .logprobs_ref import logprobs_ref



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
    """Reference GRPO/DAPO loss: (scalar loss, metrics) with the same contract as `fused_linear_grpo_loss`:
    the log-prob spec followed by the token-loss spec. The effective mask is loss_mask & (targets != ignore_index).
    """
    mask = loss_mask.bool() & (targets != ignore_index)
    logp, entropy = logprobs_ref(hidden, weight, targets, temperature, bias, ignore_index, mask)
    dtype = logp.dtype
    return grpo_loss_ref(
        logp, old_logprobs.to(dtype), advantages.to(dtype), mask, cu_seqlens,
        ref_logprobs=ref_logprobs.to(dtype) if ref_logprobs is not None else None,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator,
        loss_agg=loss_agg, num_tokens=num_tokens, entropy=entropy, entropy_coef=entropy_coef,
    )
