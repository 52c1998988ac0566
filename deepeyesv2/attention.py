"""Varlen attention for packed rows: sequences side by side in one row must not attend to each other.

Resetting position ids alone does not isolate packed sequences under SDPA (a causal mask over the whole
row still lets a sequence attend to the ones packed before it), so
the text model runs an attention function registered with transformers' `AttentionInterface` that
reads `cu_seq_lens_q` and attends within each segment:

- ``sdpa``     CPU/GPU: SDPA per segment (no dense T x T mask: memory stays O(sum L_i^2) at worst per call).
- ``flash``    CUDA: flash-attn's ``flash_attn_varlen_func`` (imported lazily).
- ``xformers`` CUDA: memory-efficient attention with a block-diagonal causal bias (imported lazily).

All three compute the same numbers. Without ``cu_seq_lens_q`` (e.g. cached generation) the function
defers to transformers' stock SDPA path with the mask it was given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ATTN_BACKENDS


def impl_name(backend: str) -> str:
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}")
    return f"deepeyesv2_varlen_{backend}"


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sdpa_segments(q, k, v, cu_seqlens, scaling):
    # q: [1, Hq, T, D]; k, v: [1, Hk, T, D]. Per-segment causal SDPA; output [1, T, Hq, D].
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            out[:, :, s:e] = F.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scaling
            )
    return out.transpose(1, 2)


def kernel_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in one dtype for the fused attention kernels: the autocast dtype inside an autocast region (there
    q and k arrive fp32 from RoPE's fp32 cos/sin while v is bf16), else v's. SDPA promotes by itself; flash-attn
    takes fp16/bf16 only and xformers rejects mixed dtypes."""
    dev = q.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else v.dtype
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _flash_varlen(q, k, v, cu_seqlens, max_seqlen, scaling):
    from flash_attn import flash_attn_varlen_func  # lazy: GPU-only package

    # flash-attn wants [T, H, D] and handles GQA natively.
    q_, k_, v_ = (x[0].transpose(0, 1) for x in (q, k, v))
    out = flash_attn_varlen_func(
        q_, k_, v_, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scaling, causal=True
    )
    return out.unsqueeze(0)


def _xformers_varlen(q, k, v, cu_seqlens, scaling):
    from xformers.ops import fmha  # lazy: GPU-only package

    groups = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lens)
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # [1, T, H, D]
    return fmha.memory_efficient_attention(q_, k_, v_, attn_bias=bias, scale=scaling)


def _make_attention(backend: str):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        if query.shape[0] != 1:
            raise ValueError("packed attention expects a single packed row (batch size 1)")
        if backend == "flash":
            query, key, value = kernel_dtype(query, key, value)
            out = _flash_varlen(query, key, value, cu, int(kwargs.get("max_length_q") or 0), scaling)
        elif backend == "xformers":
            query, key, value = kernel_dtype(query, key, value)
            out = _xformers_varlen(query, key, value, cu, scaling)
        else:
            out = _sdpa_segments(query, key, value, cu, scaling)
        return out, None

    return attention


def register_varlen_attention() -> None:
    """Register the three backends with transformers (idempotent). Masks come from SDPA's builder,
    used only when no `cu_seq_lens_q` is passed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    for backend in ATTN_BACKENDS:
        name = impl_name(backend)
        AttentionInterface.register(name, _make_attention(backend))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def backend_available(backend: str) -> tuple[bool, str]:
    """(available, reason) for `deepeyesv2 info`."""
    if backend == "sdpa":
        return True, "torch SDPA, per segment"
    if not torch.cuda.is_available():
        return False, "needs a CUDA device"
    module = {"flash": "flash_attn", "xformers": "xformers"}[backend]
    try:
        __import__(module)
    except Exception as e:  # ImportError or a broken CUDA build
        return False, f"{module} not importable ({type(e).__name__})"
    return True, module
