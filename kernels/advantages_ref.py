"""Plain torch spec of group-relative advantages (GRPO / Dr.GRPO) and their broadcast to packed tokens.

GRPO: A_i = (r_i - mean_g) / (std_g + eps), unbiased std (torch.std), a group of one sample gets 0.
Dr.GRPO (norm="none"): A_i = r_i - mean_g.
Token broadcast: tokens cu_seqlens[s]:cu_seqlens[s+1] get A[seq_ids[s]] * loss_mask.
"""

from __future__ import annotations

import torch

from .advantages import NORMS


def group_advantages_ref(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    norm: str = "std",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Python loop over groups, then over segments. rewards: [N] float, group_ids: [N] int -> ([N] fp32, [T] fp32)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    r = rewards.double()
    seq_adv = torch.zeros_like(r)
    for g in group_ids.unique().tolist():
        idx = (group_ids == g).nonzero().flatten()
        rg = r[idx]
        if len(idx) == 1:
            continue  # a lone sample has no baseline to compare against: advantage 0
        centred = rg - rg.mean()
        seq_adv[idx] = centred / (rg.std() + eps) if norm == "std" else centred
    seq_adv = seq_adv.float()
    if cu_seqlens is None:
        return seq_adv, None
    bounds = cu_seqlens.tolist()
    S = len(bounds) - 1
    ids = list(range(S)) if seq_ids is None else seq_ids.tolist()
    token_adv = torch.zeros(bounds[-1], dtype=torch.float32, device=rewards.device)
    for s in range(S):
        token_adv[bounds[s]:bounds[s + 1]] = seq_adv[ids[s]]
    if loss_mask is not None:
        token_adv = token_adv * loss_mask.float()
    return seq_adv, token_adv
