"""M-RoPE (Qwen2.5-VL multimodal rotary embedding) for packed sequences, cos/sin computed in-kernel from positions.

Math (see ``mrope_ref``): half-dim j of the head takes the angle position_ids[row(j), t] * inv_freq[j], where
row(j) = (index of the ``mrope_section`` chunk containing j) % 3; then
    out[:D/2] = x1 cos - x2 sin,  out[D/2:] = x2 cos + x1 sin       (x1 = x[:D/2], x2 = x[D/2:])
Packed sequences need nothing special: each token carries its own (t, h, w) position.

Why in-kernel cos/sin: transformers materialises [3, B, T, D/2] angles and [B, T, D] cos/sin in the activation
dtype per forward; the kernel reads 3 int64 positions per token and keeps the angles in fp32 (so bf16 models
get cos/sin rounded once, at the output, instead of before the products). The backward is the same rotation with
the sign of sin flipped (a rotation's inverse is its transpose), so nothing but the positions is saved.
"""

from __future__ import annotations

import torch

from ._triton_utils import kernel, launch, use_triton
from .validate import check_same_device

try:  # triton is optional: the torch path works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


@kernel
def _mrope_fwd_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, inv_freq_ptr, rows_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h,
    stride_qo_t, stride_qo_h, stride_ko_t, stride_ko_h, stride_pos_r,
    HQ, HK, scaling,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_HALF)
    m_d = o_d < HALF
    # [BLOCK_HALF] position row per half-dim, its position, the angle in fp32
    b_row = tl.load(rows_ptr + o_d, mask=m_d, other=0).to(tl.int64)
    b_pos = tl.load(pos_ptr + b_row * stride_pos_r + i_t, mask=m_d, other=0).to(tl.float32)
    b_angle = b_pos * tl.load(inv_freq_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_cos = tl.cos(b_angle) * scaling
    b_sin = tl.sin(b_angle) * scaling
    if BACKWARD:
        b_sin = -b_sin

    # q: [BLOCK_HQ, BLOCK_HALF] first and second halves of every head of token i_t
    o_hq = tl.arange(0, BLOCK_HQ)
    m_q = (o_hq < HQ)[:, None] & m_d[None, :]
    p_q = q_ptr + i_t * stride_q_t + o_hq[:, None] * stride_q_h + o_d[None, :]
    b_q1 = tl.load(p_q, mask=m_q, other=0.0).to(tl.float32)
    b_q2 = tl.load(p_q + HALF, mask=m_q, other=0.0).to(tl.float32)
    p_qo = q_out_ptr + i_t * stride_qo_t + o_hq[:, None] * stride_qo_h + o_d[None, :]
    tl.store(p_qo, (b_q1 * b_cos[None, :] - b_q2 * b_sin[None, :]).to(q_out_ptr.dtype.element_ty), mask=m_q)
    tl.store(p_qo + HALF, (b_q2 * b_cos[None, :] + b_q1 * b_sin[None, :]).to(q_out_ptr.dtype.element_ty), mask=m_q)

    # k: [BLOCK_HK, BLOCK_HALF]
    o_hk = tl.arange(0, BLOCK_HK)
    m_k = (o_hk < HK)[:, None] & m_d[None, :]
    p_k = k_ptr + i_t * stride_k_t + o_hk[:, None] * stride_k_h + o_d[None, :]
    b_k1 = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
    b_k2 = tl.load(p_k + HALF, mask=m_k, other=0.0).to(tl.float32)
    p_ko = k_out_ptr + i_t * stride_ko_t + o_hk[:, None] * stride_ko_h + o_d[None, :]
    tl.store(p_ko, (b_k1 * b_cos[None, :] - b_k2 * b_sin[None, :]).to(k_out_ptr.dtype.element_ty), mask=m_k)
    tl.store(p_ko + HALF, (b_k2 * b_cos[None, :] + b_k1 * b_sin[None, :]).to(k_out_ptr.dtype.element_ty), mask=m_k)


def mrope_rows(mrope_section: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """[D/2] int32: which position row (0=t, 1=h, 2=w) drives each rotary half-dim."""
    rows = [i % 3 for i, n in enumerate(mrope_section) for _ in range(n)]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, q_out, k_out, position_ids, inv_freq, rows, scaling, backward):
    T, HQ, D = q.shape
    HK = k.shape[1]
    if T == 0:
        return
    launch(
        _mrope_fwd_kernel, (T,),
        q, k, q_out, k_out, position_ids, inv_freq, rows,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), position_ids.stride(0),
        HQ, HK, float(scaling),
        HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_HQ=triton.next_power_of_2(HQ),
        BLOCK_HK=triton.next_power_of_2(HK), BACKWARD=backward,
    )


class MRopeFunction(torch.autograd.Function):
    """Triton M-RoPE on q [T, Hq, D] and k [T, Hk, D]; backward rotates the gradients by the inverse angle."""

    @staticmethod
    def forward(ctx, q, k, position_ids, inv_freq, rows, scaling, inplace):
        q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
        if inplace:
            q_out, k_out = q, k  # each element is read before it is written, by the same program
            ctx.mark_dirty(q, k)
        else:
            q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        _launch(q, k, q_out, k_out, position_ids, inv_freq, rows, scaling, backward=False)
        ctx.save_for_backward(position_ids, inv_freq, rows)
        ctx.scaling = scaling
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        position_ids, inv_freq, rows = ctx.saved_tensors
        grad_q, grad_k = _last_dim_contiguous(grad_q), _last_dim_contiguous(grad_k)
        dq, dk = torch.empty_like(grad_q), torch.empty_like(grad_k)
        _launch(grad_q, grad_k, dq, dk, position_ids, inv_freq, rows, ctx.scaling, backward=True)
        return dq, dk, None, None, None, None, None


def _apply_mrope_torch(q, k, position_ids, inv_freq, rows, scaling):
    # same math as the kernel: angles, products and sums in fp32, one rounding at the output
    angle = position_ids.gather(0, rows.long()[:, None].expand(-1, q.shape[0])).float().t() * inv_freq.float()
    cos, sin = (angle.cos() * scaling)[:, None, :], (angle.sin() * scaling)[:, None, :]  # [T, 1, D/2]

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def _validate(q, k, position_ids, inv_freq, mrope_section):
    if q.ndim != 3 or k.ndim != 3 or not q.is_floating_point() or q.dtype != k.dtype:
        raise ValueError(f"q and k must be [T, H, D] float tensors of one dtype, got q {tuple(q.shape)} {q.dtype}, "
                         f"k {tuple(k.shape)} {k.dtype}")
    T, _, D = q.shape
    if k.shape[0] != T or k.shape[2] != D or D % 2:
        raise ValueError(f"k must be [T={T}, Hk, D={D}] with D even, got {tuple(k.shape)}")
    if position_ids.shape != (3, T) or position_ids.is_floating_point():
        raise ValueError(f"position_ids must be an int tensor of shape [3, {T}], got {tuple(position_ids.shape)} "
                         f"{position_ids.dtype}")
    if inv_freq.shape != (D // 2,):
        raise ValueError(f"inv_freq must have shape [{D // 2}], got {tuple(inv_freq.shape)}")
    if sum(mrope_section) != D // 2 or any(n < 0 for n in mrope_section):
        raise ValueError(f"mrope_section must be non-negative and sum to D/2={D // 2}, got {list(mrope_section)}")


def apply_mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: list[int],
    inplace: bool = False,
    scaling: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by Qwen2.5-VL's M-RoPE, with cos/sin computed in-kernel.

    q: [T, Hq, D], k: [T, Hk, D] (any float dtype; last dim contiguous, else copied), position_ids: [3, T] int64
    (t, h, w rows; per-sequence positions of a packed batch), inv_freq: [D/2] fp32, mrope_section: chunk sizes of
    D/2 (e.g. [16, 24, 24]), scaling: the rotary "attention_scaling" (1.0 for default rope).
    inplace=True writes into q and k (and returns them). Differentiable w.r.t. q and k.
    Returns (q_out, k_out) with the shapes and dtype of q and k.
    """
    check_same_device(q=q, k=k, position_ids=position_ids, inv_freq=inv_freq)
    _validate(q, k, position_ids, inv_freq, mrope_section)
    if inplace and (q.stride(-1) != 1 or k.stride(-1) != 1):
        raise ValueError("inplace=True needs q and k with a contiguous last dim")
    rows = mrope_rows(mrope_section, device=q.device)
    if use_triton(backend, q, k):
        pos = position_ids.contiguous()
        return MRopeFunction.apply(q, k, pos, inv_freq.float().contiguous(), rows, float(scaling), inplace)
    q_out, k_out = _apply_mrope_torch(q, k, position_ids, inv_freq, rows, scaling)
    if inplace:
        return q.copy_(q_out), k.copy_(k_out)
    return q_out, k_out
