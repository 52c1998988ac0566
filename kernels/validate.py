"""Input checks of the public ops, in one place: each raises ValueError naming the offending argument.

A Triton launch with a wrong shape, dtype or device fails deep inside with a pointer error (or silently reads out of
bounds), the torch path with a generic message; these checks run once on the host before either.
"""

from __future__ import annotations

import math

import torch

from .grpo_terms import KL_ESTIMATORS, LOSS_AGGS


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """ValueError naming the first tensor that is not on the first one's device (None entries are skipped):
    a Triton launch with one host tensor would fail deep inside with a pointer error, the torch path with a
    generic device error."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    if not named:
        return
    first, ref = named[0]
    for name, t in named[1:]:
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}, {first} on {ref.device}")


def validate_logprobs_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    bias: torch.Tensor | None,
    ignore_index: int,
    loss_mask: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the argument when the inputs do not fit `fused_logprobs`' contract."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} disagree on H")
    if weight.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"weight must have V > 0 and H > 0, got shape {tuple(weight.shape)}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"hidden must be fp32/bf16/fp16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if targets.ndim != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be [T={hidden.shape[0]}], got shape {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64, got {targets.dtype}")
    named = [("hidden", hidden), ("weight", weight), ("targets", targets)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V={weight.shape[0]}], got {getattr(bias, 'shape', bias)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        named.append(("bias", bias))
    if loss_mask is not None:
        if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != targets.shape:
            raise ValueError(f"loss_mask must be [T={targets.shape[0]}], got {getattr(loss_mask, 'shape', loss_mask)}")
        if loss_mask.dtype != torch.bool:
            raise ValueError(f"loss_mask must be bool, got {loss_mask.dtype}")
        named.append(("loss_mask", loss_mask))
    check_same_device(**dict(named))  # named starts with hidden
    for name, t in named:
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if targets.numel():
        checked = targets[targets != ignore_index]
        if checked.numel() and bool(((checked < 0) | (checked >= weight.shape[0])).any()):
            bad = checked[(checked < 0) | (checked >= weight.shape[0])][0].item()
            raise ValueError(
                f"targets contains {bad}, outside [0, V={weight.shape[0]}) and not ignore_index={ignore_index}"
            )


def shape_of(t) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else repr(t)


def validate_grpo_inputs(
    anchor: tuple[str, torch.Tensor],
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_estimator: str,
    loss_agg: str,
    num_tokens: float | None,
) -> None:
    """The GRPO arguments shared by `grpo_loss` and `fused_linear_grpo_loss`; `anchor` is (name, tensor) of the
    op's [T]-leading input (logprobs, or hidden), which fixes T and the device."""
    anchor_name, anchor_t = anchor
    T = anchor_t.shape[0]
    per_token = {"old_logprobs": old_logprobs, "advantages": advantages, "ref_logprobs": ref_logprobs,
                 "entropy": entropy}
    for name, t in per_token.items():
        if t is None and name in ("ref_logprobs", "entropy"):
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (T,) or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of shape [T={T}], got {shape_of(t)}")
    if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != (T,) or loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be a bool tensor of shape [T={T}], got {shape_of(loss_mask)}")
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 1
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [S+1], got {shape_of(cu_seqlens)}")
    check_same_device(**{anchor_name: anchor_t}, **per_token, loss_mask=loss_mask, cu_seqlens=cu_seqlens)
    # Checking monotonicity costs one host sync; packing bugs here would silently mis-attribute tokens.
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={T}; got {cu[:4]}...{cu[-2:]}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if not (0.0 <= clip_low < 1.0) or clip_high < 0.0:
        raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0, got {clip_low}, {clip_high}")
    if num_tokens is not None and not (math.isfinite(num_tokens) and num_tokens > 0):
        raise ValueError(f"num_tokens must be finite and > 0 (or None), got {num_tokens}")
