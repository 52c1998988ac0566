"""Naive spec for per-token log-probs and entropy from hidden states: full fp32 logits, then log_softmax.

This is the reference the fused paths (`logprobs.py` Triton, `logprobs_torch.py` chunked torch) are tested
against. It materialises the [T, V] logits, so it is only for tests and small inputs.
"""

from __future__ import annotations

import torch


def logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of `targets` and entropy of the softmax over the vocabulary.

    hidden: [T, H], weight: [V, H], bias: [V] | None, targets: [T] int64, loss_mask: [T] bool | None.
    Returns (logprobs [T], entropy [T]), fp32 (fp64 if the inputs are fp64, for gradcheck), differentiable
    w.r.t. hidden, weight and bias; tokens with target == ignore_index or loss_mask False give 0 for both.
    """
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    logits = logits / temperature
    valid = targets != ignore_index
    if loss_mask is not None:
        valid = valid & loss_mask.bool()
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_p = torch.log_softmax(logits, dim=-1)
    token_logp = log_p.gather(-1, safe_targets[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    zero = torch.zeros((), dtype=compute_dtype, device=hidden.device)
    return torch.where(valid, token_logp, zero), torch.where(valid, entropy, zero)
