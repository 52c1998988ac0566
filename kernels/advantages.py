"""Group-relative advantages (GRPO / Dr.GRPO) and their broadcast to a packed token stream, in one Triton kernel.

GRPO: A_i = (r_i - mean_g) / (std_g + eps) with the unbiased std; a group of one sample gets 0.
Dr.GRPO (norm="none"): A_i = r_i - mean_g. Tokens of segment s (cu_seqlens[s]:cu_seqlens[s+1]) get
A[seq_ids[s]] * loss_mask.

The kernel runs max(N, S) programs. Program i computes the group statistics of sample i (and of sample
seq_ids[i]) by scanning all N rewards for matching group ids: O(N^2) compares, which is nothing for RL batch sizes
(N <= ~16k) and needs neither sorting nor ``unique`` (so ids can be any ints, ragged, unsorted, and there is
no host sync). Statistics are computed on rewards shifted by the sample's own reward, so a group whose rewards
are all equal (very common: all right / all wrong) gets exactly 0 rather than rounding noise / (0 + eps).
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

NORMS = ("std", "none")  # GRPO's std-normalised advantages, Dr.GRPO's plain centring


@kernel
def _group_advantages_fwd_kernel(
    rewards_ptr, group_ids_ptr, cu_ptr, seq_ids_ptr, mask_ptr,  # inputs
    seq_adv_ptr, token_adv_ptr,  # outputs: [N] fp32, [T] fp32
    N, S, eps,
    NORM_STD: tl.constexpr, HAS_TOKENS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i_p = tl.program_id(0)
    # phase 0: seq_adv[i_p] (if i_p < N); phase 1: broadcast A[seq_ids[i_p]] over segment i_p (if i_p < S)
    for phase in tl.static_range(2 if HAS_TOKENS else 1):
        if phase == 0:
            i_n = tl.minimum(i_p, N - 1).to(tl.int64)
            active = i_p < N
        else:
            i_s = tl.minimum(i_p, S - 1).to(tl.int64)
            i_n = tl.load(seq_ids_ptr + i_s).to(tl.int64)
            active = i_p < S
        b_gid = tl.load(group_ids_ptr + i_n)
        b_r0 = tl.load(rewards_ptr + i_n).to(tl.float32)
        # pass 1: count and mean of (r - r0) over the group
        acc_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_cnt = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            o_n = start + tl.arange(0, BLOCK_N)
            m_n = o_n < N
            # [BLOCK_N] group ids and rewards
            m_g = (tl.load(group_ids_ptr + o_n, mask=m_n, other=0) == b_gid) & m_n
            b_r = tl.load(rewards_ptr + o_n, mask=m_g, other=0.0).to(tl.float32)
            acc_sum += tl.where(m_g, b_r - b_r0, 0.0)
            acc_cnt += m_g.to(tl.float32)
        cnt = tl.sum(acc_cnt, axis=0)
        mean_d = tl.sum(acc_sum, axis=0) / cnt
        adv = -mean_d
        if NORM_STD:
            # pass 2: sum of squared deviations (two-pass: no cancellation of E[x^2] - E[x]^2)
            acc_ss = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                o_n = start + tl.arange(0, BLOCK_N)
                m_n = o_n < N
                m_g = (tl.load(group_ids_ptr + o_n, mask=m_n, other=0) == b_gid) & m_n
                b_r = tl.load(rewards_ptr + o_n, mask=m_g, other=0.0).to(tl.float32)
                b_dev = tl.where(m_g, b_r - b_r0 - mean_d, 0.0)
                acc_ss += b_dev * b_dev
            std = tl.sqrt(tl.sum(acc_ss, axis=0) / tl.maximum(cnt - 1.0, 1.0))
            adv = adv / (std + eps)
        adv = tl.where(cnt > 1.0, adv, 0.0)
        if phase == 0:
            tl.store(seq_adv_ptr + i_n, adv, mask=active)
        else:
            bos = tl.load(cu_ptr + i_s).to(tl.int64)
            eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
            eos = tl.where(active, eos, bos)  # inactive programs (i_p >= S) write nothing
            for start in range(bos, eos, BLOCK_T):
                o_t = start + tl.arange(0, BLOCK_T)
                m_t = o_t < eos
                b_out = tl.zeros([BLOCK_T], dtype=tl.float32) + adv
                if HAS_MASK:
                    b_out = tl.where(tl.load(mask_ptr + o_t, mask=m_t, other=0) != 0, b_out, 0.0)
                tl.store(token_adv_ptr + o_t, b_out, mask=m_t)


def _group_advantages_triton(rewards, group_ids, cu_seqlens, loss_mask, seq_ids, norm, eps, T):
    N = rewards.shape[0]
    S = 0 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    seq_adv = torch.empty(N, dtype=torch.float32, device=rewards.device)
    token_adv = None if cu_seqlens is None else torch.empty(T, dtype=torch.float32, device=rewards.device)
    if N == 0:
        return seq_adv, None if token_adv is None else token_adv.zero_()
    has_tokens = cu_seqlens is not None and S > 0
    launch(
        _group_advantages_fwd_kernel, (max(N, S),),
        rewards.contiguous(), group_ids.contiguous(),
        cu_seqlens if has_tokens else group_ids, seq_ids if has_tokens else group_ids,
        loss_mask.contiguous().view(torch.uint8) if loss_mask is not None else group_ids,
        seq_adv, token_adv if has_tokens else seq_adv,
        N, S, float(eps),
        NORM_STD=norm == "std", HAS_TOKENS=has_tokens, HAS_MASK=loss_mask is not None,
        BLOCK_N=256, BLOCK_T=1024,
        num_warps=8,  # 4 warps hold 8 values of each [1024] block per thread: 8 B spilled on sm_100
    )
    return seq_adv, token_adv


def _group_advantages_torch(rewards, group_ids, cu_seqlens, loss_mask, seq_ids, norm, eps, T):
    r = rewards.float()
    _, inv = torch.unique(group_ids, return_inverse=True)
    G = int(inv.max().item()) + 1 if inv.numel() else 0
    # shift by one member's reward per group (any member: equal rewards then give exactly 0, see module docstring)
    r0 = r.new_zeros(G).scatter(0, inv, r)[inv]
    d = r - r0
    cnt = r.new_zeros(G).index_add(0, inv, torch.ones_like(r))[inv]
    mean_d = r.new_zeros(G).index_add(0, inv, d)[inv] / cnt
    adv = d - mean_d
    if norm == "std":
        ss = r.new_zeros(G).index_add(0, inv, (d - mean_d) ** 2)[inv]
        adv = adv / (torch.sqrt(ss / (cnt - 1.0).clamp(min=1.0)) + eps)
    seq_adv = torch.where(cnt > 1, adv, 0.0)
    if cu_seqlens is None:
        return seq_adv, None
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    token_adv = torch.repeat_interleave(seq_adv[seq_ids.long()], lens, output_size=T)
    if loss_mask is not None:
        token_adv = token_adv * loss_mask.float()
    return seq_adv, token_adv


def _validate(rewards, group_ids, cu_seqlens, loss_mask, seq_ids, norm):
    if rewards.ndim != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D float tensor [N], got {tuple(rewards.shape)} {rewards.dtype}")
    N = rewards.shape[0]
    if group_ids.shape != (N,) or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an int tensor of shape [{N}], got {tuple(group_ids.shape)} "
                         f"{group_ids.dtype}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if cu_seqlens is None:
        if loss_mask is not None or seq_ids is not None:
            raise ValueError("loss_mask and seq_ids need cu_seqlens")
        return 0
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [S+1], got {tuple(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype}")
    cu = cu_seqlens.tolist()
    T = cu[-1] if loss_mask is None else loss_mask.shape[0]
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={T}; got {cu[:4]}...{cu[-2:]}")
    if loss_mask is not None and (loss_mask.ndim != 1 or loss_mask.dtype != torch.bool):
        raise ValueError(f"loss_mask must be a 1-D bool tensor [T], got {tuple(loss_mask.shape)} {loss_mask.dtype}")
    S = len(cu) - 1
    if seq_ids is None:
        if S != N:
            raise ValueError(f"seq_ids is required when the number of segments ({S}) != number of rewards ({N})")
    else:
        if seq_ids.shape != (S,) or seq_ids.is_floating_point():
            raise ValueError(f"seq_ids must be an int tensor of shape [{S}], got {tuple(seq_ids.shape)} "
                             f"{seq_ids.dtype}")
        if S and (int(seq_ids.min()) < 0 or int(seq_ids.max()) >= N):
            raise ValueError(f"seq_ids must index rewards (0 <= id < {N})")
    return T


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    norm: str = "std",
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Group-normalised advantages, optionally broadcast to packed tokens (not differentiable: rewards are data).

    rewards: [N] float, group_ids: [N] int (samples of one prompt share an id; any ints, ragged, unsorted),
    cu_seqlens: [S+1] int32, loss_mask: [T] bool, seq_ids: [S] int64 (sample of each segment; default arange(S),
    needing S == N). norm: "std" (GRPO) or "none" (Dr.GRPO).
    Returns (seq_adv [N] fp32, token_adv [T] fp32 or None when cu_seqlens is None).
    """
    check_same_device(rewards=rewards, group_ids=group_ids, cu_seqlens=cu_seqlens, loss_mask=loss_mask, seq_ids=seq_ids)
    T = _validate(rewards, group_ids, cu_seqlens, loss_mask, seq_ids, norm)
    if cu_seqlens is not None and seq_ids is None:
        seq_ids = torch.arange(cu_seqlens.shape[0] - 1, device=rewards.device)
    if use_triton(backend, rewards):
        return _group_advantages_triton(rewards, group_ids, cu_seqlens, loss_mask, seq_ids, norm, eps, T)
    return _group_advantages_torch(rewards, group_ids, cu_seqlens, loss_mask, seq_ids, norm, eps, T)
