"""GRPO/DAPO clipped-ratio token loss over a packed batch, in one Triton pass (+ a tiny backward kernel).

Spec (identical in ``grpo_loss_ref`` and in the fused lm-head loss of ``linear_grpo``):
    log_ratio = clamp(logp - old_logp, -20, 20); ratio = exp(log_ratio)
    pg1 = -A * ratio; pg2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high); pg = max(pg1, pg2)
    dual clip (c > 1): where A < 0, pg = min(pg, -A * c)
    kl (ref given; in the loss if kl_coef != 0): d = ref - logp; k1 = -d; k2 = d^2 / 2; k3 = exp(d) - d - 1
    token loss = pg + kl_coef * kl - entropy_coef * entropy
Aggregation over masked tokens: "token-mean" (sum / (num_tokens or #masked)), "seq-mean-token-mean",
"seq-mean-token-sum" (means over the sequences of ``cu_seqlens`` with at least one masked token).

The forward kernel runs one program per sequence: it writes dloss/dlogp per token (unscaled by the aggregation
weight, which depends on counts only known after the pass) and 7 per-sequence sums; the aggregation weight of
each sequence is then a few [S]-sized torch ops (no host sync), and the backward kernel scales the saved
gradient by ``grad_out * weight[seq]``.
"""

from __future__ import annotations

import torch

from ._triton_utils import kernel, launch, use_triton
from .grpo_terms import KL_ESTIMATORS, seq_denominators, token_terms
from .validate import shape_of, validate_grpo_inputs

try:  # triton is optional: the torch path works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

# Columns of the per-sequence statistics buffer [S, N_STATS].
_LOSS, _COUNT, _CLIP, _APPROX_KL, _KL, _ENT, _RATIO = range(7)
_N_STATS = 8


@kernel
def _grpo_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, cu_ptr,  # inputs
    dlogp_ptr, stats_ptr,  # outputs: [T] fp32, [S, N_STATS] fp32
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef,
    HAS_KL: tl.constexpr, KL_IN_LOSS: tl.constexpr, KL_EST: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_ENT: tl.constexpr,
    N_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    i_s = tl.program_id(0)
    bos = tl.load(cu_ptr + i_s).to(tl.int64)
    eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    acc_count = tl.zeros([BLOCK], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK], dtype=tl.float32)
    acc_approx_kl = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ent = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ratio = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(bos, eos, BLOCK):
        o_t = start + tl.arange(0, BLOCK)
        m_t = o_t < eos
        # [BLOCK] loss mask (uint8 view of bool)
        b_mask = tl.load(mask_ptr + o_t, mask=m_t, other=0) != 0
        # Masked-out tokens are loaded as 0 (ratio 1, A 0): their values may overflow exp() (e.g. ref - logp = 90
        # on prompt tokens) and inf * 0 would poison the sums.
        b_logp = tl.load(logp_ptr + o_t, mask=b_mask, other=0.0).to(tl.float32)
        b_old = tl.load(old_ptr + o_t, mask=b_mask, other=0.0).to(tl.float32)
        b_adv = tl.load(adv_ptr + o_t, mask=b_mask, other=0.0).to(tl.float32)
        b_w = b_mask.to(tl.float32)

        b_log_ratio = b_logp - b_old
        m_in = (b_log_ratio >= -20.0) & (b_log_ratio <= 20.0)
        b_ratio = tl.exp(tl.minimum(tl.maximum(b_log_ratio, -20.0), 20.0))
        b_ratio_c = tl.minimum(tl.maximum(b_ratio, 1.0 - clip_low), 1.0 + clip_high)
        b_pg1 = -b_adv * b_ratio
        b_pg2 = -b_adv * b_ratio_c
        m_clip = b_pg2 > b_pg1
        b_pg = tl.where(m_clip, b_pg2, b_pg1)
        # d pg / d logp: the clamped branch is constant in logp (pg2 > pg1 only happens when the ratio is clipped)
        b_dpg = tl.where(m_clip, 0.0, -b_adv * b_ratio)
        b_dpg = tl.where(m_in, b_dpg, 0.0)
        if HAS_DUAL:
            b_cap = -b_adv * dual_clip
            m_dual = (b_adv < 0) & (b_cap < b_pg)
            b_pg = tl.where(m_dual, b_cap, b_pg)
            b_dpg = tl.where(m_dual, 0.0, b_dpg)
        b_loss = b_pg
        b_dloss = b_dpg
        b_kl = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_KL:
            b_ref = tl.load(ref_ptr + o_t, mask=b_mask, other=0.0).to(tl.float32)
            b_d = b_ref - b_logp
            if KL_EST == 1:
                b_kl = -b_d
                b_dkl = tl.full([BLOCK], 1.0, dtype=tl.float32)
            elif KL_EST == 2:
                b_kl = 0.5 * b_d * b_d
                b_dkl = -b_d
            else:
                b_exp_d = tl.exp(b_d)
                b_kl = b_exp_d - b_d - 1.0
                b_dkl = 1.0 - b_exp_d
            if KL_IN_LOSS:
                b_loss += kl_coef * b_kl
                b_dloss += kl_coef * b_dkl
        b_ent = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_ENT:
            b_ent = tl.load(ent_ptr + o_t, mask=b_mask, other=0.0).to(tl.float32)
            b_loss -= entropy_coef * b_ent

        tl.store(dlogp_ptr + o_t, tl.where(b_mask, b_dloss, 0.0), mask=m_t)
        acc_loss += tl.where(b_mask, b_loss, 0.0)
        acc_count += b_w
        acc_clip += tl.where(b_mask & m_clip, 1.0, 0.0)
        acc_approx_kl += tl.where(b_mask, b_old - b_logp, 0.0)
        acc_kl += tl.where(b_mask, b_kl, 0.0)
        acc_ent += tl.where(b_mask, b_ent, 0.0)
        acc_ratio += tl.where(b_mask, b_ratio, 0.0)
    p_stats = stats_ptr + i_s * N_STATS
    tl.store(p_stats + 0, tl.sum(acc_loss, axis=0))
    tl.store(p_stats + 1, tl.sum(acc_count, axis=0))
    tl.store(p_stats + 2, tl.sum(acc_clip, axis=0))
    tl.store(p_stats + 3, tl.sum(acc_approx_kl, axis=0))
    tl.store(p_stats + 4, tl.sum(acc_kl, axis=0))
    tl.store(p_stats + 5, tl.sum(acc_ent, axis=0))
    tl.store(p_stats + 6, tl.sum(acc_ratio, axis=0))


@kernel
def _grpo_loss_bwd_kernel(
    dlogp_ptr, mask_ptr, cu_ptr, weight_ptr, grad_out_ptr,  # inputs
    dlogp_out_ptr, dent_out_ptr,  # outputs [T] in the dtypes of logprobs / entropy
    entropy_coef,
    HAS_ENT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    i_s = tl.program_id(0)
    bos = tl.load(cu_ptr + i_s).to(tl.int64)
    eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
    # scalar: d loss / d (sum of the sequence's token losses) * upstream gradient
    b_scale = tl.load(weight_ptr + i_s) * tl.load(grad_out_ptr)
    for start in range(bos, eos, BLOCK):
        o_t = start + tl.arange(0, BLOCK)
        m_t = o_t < eos
        b_d = tl.load(dlogp_ptr + o_t, mask=m_t, other=0.0)
        tl.store(dlogp_out_ptr + o_t, (b_d * b_scale).to(dlogp_out_ptr.dtype.element_ty), mask=m_t)
        if HAS_ENT_GRAD:
            b_w = (tl.load(mask_ptr + o_t, mask=m_t, other=0) != 0).to(tl.float32)
            b_de = -entropy_coef * b_scale * b_w
            tl.store(dent_out_ptr + o_t, b_de.to(dent_out_ptr.dtype.element_ty), mask=m_t)


def _seq_weights(stats: torch.Tensor, loss_agg: str, num_tokens: float | None) -> torch.Tensor:
    """[S] fp32 weight of each sequence's summed token loss (device ops only, no sync); sequences without masked
    tokens weigh 0 in the per-sequence means (their sum is 0 either way)."""
    count = stats[:, _COUNT]
    weights = 1.0 / seq_denominators(count, loss_agg, num_tokens)
    return weights if loss_agg == "token-mean" else torch.where(count > 0, weights, 0.0)


def _metrics_from_stats(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    totals = stats.sum(0)
    n = totals[_COUNT].clamp(min=1.0)
    return {
        "clip_frac": totals[_CLIP] / n,
        "approx_kl": totals[_APPROX_KL] / n,
        "kl": totals[_KL] / n,
        "entropy": totals[_ENT] / n,
        "ratio_mean": totals[_RATIO] / n,
    }


class GRPOLossFunction(torch.autograd.Function):
    """Triton GRPO loss; returns (loss, stats [S, 8] fp32). Gradients flow to logprobs (and entropy)."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, loss_mask, cu_seqlens, ref_logprobs, entropy,
                clip_low, clip_high, dual_clip, kl_coef, kl_estimator, loss_agg, num_tokens, entropy_coef):
        T = logprobs.shape[0]
        S = cu_seqlens.shape[0] - 1
        mask_u8 = loss_mask.contiguous().view(torch.uint8)
        has_kl = ref_logprobs is not None
        has_ent = entropy is not None
        dlogp = torch.empty(T, dtype=torch.float32, device=logprobs.device)
        stats = torch.zeros(S, _N_STATS, dtype=torch.float32, device=logprobs.device)
        if S > 0:
            launch(
                _grpo_loss_fwd_kernel, (S,),
                logprobs, old_logprobs, advantages, mask_u8,
                ref_logprobs if has_kl else logprobs, entropy if has_ent else logprobs, cu_seqlens,
                dlogp, stats,
                float(clip_low), float(clip_high), float(dual_clip or 0.0), float(kl_coef), float(entropy_coef),
                HAS_KL=has_kl, KL_IN_LOSS=has_kl and kl_coef != 0.0, KL_EST=KL_ESTIMATORS.index(kl_estimator) + 1,
                HAS_DUAL=dual_clip is not None,
                HAS_ENT=has_ent, N_STATS=_N_STATS, BLOCK=1024,
                num_warps=8,  # 4 warps left 8 values x 7 sums per thread: 8 B spilled with k3 KL on sm_90
            )
        weights = _seq_weights(stats, loss_agg, num_tokens)
        loss = (weights * stats[:, _LOSS]).sum()
        ctx.save_for_backward(dlogp, mask_u8, cu_seqlens, weights)
        ctx.entropy_coef = float(entropy_coef)
        ctx.logp_dtype = logprobs.dtype
        ctx.ent_dtype = entropy.dtype if has_ent else None
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        dlogp, mask_u8, cu_seqlens, weights = ctx.saved_tensors
        S = cu_seqlens.shape[0] - 1
        ent_grad = ctx.ent_dtype is not None and ctx.needs_input_grad[6]
        grad_logp = torch.zeros(dlogp.shape, dtype=ctx.logp_dtype, device=dlogp.device)
        grad_ent = torch.zeros(dlogp.shape, dtype=ctx.ent_dtype, device=dlogp.device) if ent_grad else None
        if S > 0:
            launch(
                _grpo_loss_bwd_kernel, (S,),
                dlogp, mask_u8, cu_seqlens, weights, grad_loss.float().contiguous(),
                grad_logp, grad_ent if ent_grad else grad_logp, ctx.entropy_coef,
                HAS_ENT_GRAD=ent_grad, BLOCK=1024,
            )
        return (grad_logp, None, None, None, None, None, grad_ent) + (None,) * 8


def _grpo_loss_torch(logprobs, old_logprobs, advantages, loss_mask, cu_seqlens, ref_logprobs, entropy, clip_low,
                     clip_high, dual_clip, kl_coef, kl_estimator, loss_agg, num_tokens, entropy_coef):
    """Vectorised torch path (segment sums with index_add): same math as the kernel, autograd for backward."""
    T = logprobs.shape[0]
    S = cu_seqlens.shape[0] - 1
    m = loss_mask

    def masked(x):  # zero outside the mask before exp() (see kernel comment)
        return None if x is None else torch.where(m, x.float(), 0.0)

    lp, old, ent = masked(logprobs), masked(old_logprobs), masked(entropy)
    terms = token_terms(lp, old, masked(advantages), masked(ref_logprobs), clip_low, clip_high, dual_clip, kl_coef,
                        kl_estimator, ent, entropy_coef)
    approx_kl = old - lp
    ent = ent if ent is not None else torch.zeros_like(terms.loss)
    seq_len = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_idx = torch.repeat_interleave(torch.arange(S, device=logprobs.device), seq_len, output_size=T)
    cols = [terms.loss, m.float(), terms.clipped, approx_kl, terms.kl, ent, terms.ratio]
    per_tok = torch.stack([torch.where(m, c, 0.0) for c in cols], dim=1)
    stats = per_tok.new_zeros(S, len(cols)).index_add(0, seq_idx, per_tok)
    weights = _seq_weights(stats.detach(), loss_agg, num_tokens)
    loss = (weights * stats[:, _LOSS]).sum()
    return loss, stats.detach()


def grpo_loss(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO/DAPO policy loss of a packed batch (see module docstring for the exact math).

    logprobs: [T] fp32 (requires grad), old_logprobs / advantages / ref_logprobs / entropy: [T] float,
    loss_mask: [T] bool, cu_seqlens: [S+1] int32. ``num_tokens`` replaces the masked-token count of "token-mean"
    (gradient accumulation: pass the global count of all micro-batches); other aggregations ignore it.
    ``entropy`` receives a gradient (-entropy_coef per masked token, scaled) if it requires grad.
    Returns (loss 0-d fp32, metrics {clip_frac, approx_kl, kl, entropy, ratio_mean}: 0-d fp32, detached; masked
    means over all masked tokens; kl is reported whenever ref_logprobs is given, even with kl_coef == 0, and is 0
    without it).
    """
    if not isinstance(logprobs, torch.Tensor) or logprobs.ndim != 1 or not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a 1-D float tensor [T], got {shape_of(logprobs)}")
    validate_grpo_inputs(("logprobs", logprobs), old_logprobs, advantages, loss_mask, cu_seqlens, ref_logprobs, entropy,
                         clip_low, clip_high, dual_clip, kl_estimator, loss_agg, num_tokens)
    args = (logprobs, old_logprobs, advantages, loss_mask, cu_seqlens, ref_logprobs, entropy, clip_low, clip_high,
            dual_clip, kl_coef, kl_estimator, loss_agg, num_tokens, entropy_coef)
    if use_triton(backend, logprobs):
        contig = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in args[:7]]
        loss, stats = GRPOLossFunction.apply(*contig, *args[7:])
    else:
        loss, stats = _grpo_loss_torch(*args)
    return loss, _metrics_from_stats(stats.detach())
