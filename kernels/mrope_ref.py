"""Plain torch spec of Qwen2.5-VL's multimodal rotary embedding (M-RoPE), as transformers 5.x computes it.

transformers (``Qwen2_5_VLRotaryEmbedding`` + ``apply_rotary_pos_emb``):
    freqs[r, t, j] = position_ids[r, t] * inv_freq[j]                      r in {t, h, w}, j < D/2
    half-dim j lies in chunk c of ``mrope_section`` (sum = D/2) and takes the angle of row c % 3
    cos = cat(cos_half, cos_half) * scaling, same for sin, cast to the dtype of q
    q_out = q * cos + rotate_half(q) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2])
"""

from __future__ import annotations

import torch


def mrope_cos_sin_ref(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: list[int],
    scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids: [3, T] int64, inv_freq: [D/2] fp32 -> (cos, sin) [T, D] in ``dtype`` (transformers' layout)."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [3, T, D/2], fp32 like transformers
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling

    def recompose(f: torch.Tensor) -> torch.Tensor:
        f = torch.cat([m[i % 3] for i, m in enumerate(f.split(list(mrope_section), dim=-1))], dim=-1)
        return torch.cat((f, f), dim=-1)

    return recompose(cos).to(dtype), recompose(sin).to(dtype)


def rotate_half_ref(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_mrope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: list[int],
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D], position_ids: [3, T] -> rotated (q, k), same dtype (cos/sin cast to q's dtype
    before the products, exactly as transformers does)."""
    cos, sin = mrope_cos_sin_ref(position_ids, inv_freq, mrope_section, scaling, dtype=q.dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half_ref(q) * sin, k * cos + rotate_half_ref(k) * sin
