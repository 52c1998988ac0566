"""Fused linear -> log-prob -> GRPO/DAPO loss, with the gradients formed during the forward pass.

The loss is sum_t w_t * l_t(logp_t, entropy_t), where the token weight w_t (mask and aggregation normaliser) depends
on the masks and cu_seqlens only, and l_t is a pointwise function of token t's log-prob and entropy. So as soon as
a chunk's log-probs are known, dLoss/dlogp and dLoss/dentropy of its tokens are known too, and the chunk's logits
can be turned into their gradient right away: logits GEMM -> stats -> pointwise grads -> dlogits -> dH and dW GEMMs.
That is 3 [T, V, H] products for forward + backward instead of 4 (no recompute), and the [chunk, V] logits never
outlive their chunk. The backward only scales the stored grads by the incoming scalar gradient.

Per-token derivatives come from autograd on the tiny [chunk] graph of the token loss, so clamp/max/min conventions
match the torch spec (`linear_grpo_ref.py`) exactly.

Paths: Triton (CUDA, or TRITON_INTERPRET=1): the forward kernel also stores the fp32 logits of the chunk, and the
dlogits kernel reads them back instead of recomputing. Torch (CPU): the chunk helpers of `logprobs_torch.py`.
Both produce log-probs bit-identical to `fused_logprobs` on the same backend, so old_logprobs == logprobs gives a
ratio of exactly 1.
"""

from __future__ import annotations


import torch

from .grpo_terms import METRIC_NAMES, seq_denominators, token_terms
from .logprobs import (
    apply_dlogits_chunk,
    fused_loss_chunk_tokens,
    triton_dlogits,
    triton_logprob_stats,
)
from ._triton_utils import use_triton
from .logprobs_torch import own_precision, tiled_backward, tiled_forward, valid_tokens
from .validate import validate_grpo_inputs, validate_logprobs_inputs


def _token_loss(logp, entropy, old, adv, ref, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef):
    """Per-token loss [T] and (ratio, clipped-flag, kl) terms; all [T] fp32. The same function as `grpo_loss`'s
    torch path (`grpo_terms.token_terms`), so the two losses cannot drift apart (ties included)."""
    t = token_terms(logp, old, adv, ref, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy, entropy_coef)
    return t.loss, t.ratio, t.clipped > 0, (t.kl if ref is not None else None)


def token_weights(
    mask: torch.Tensor, cu_seqlens: torch.Tensor, loss_agg: str, num_tokens: float | None
) -> torch.Tensor:
    """[T] fp32 weights w_t with loss = sum_t w_t * token_loss_t for the chosen aggregation (0 on masked tokens)."""
    maskf = mask.float()
    cu = cu_seqlens.long()
    seq_lens = cu[1:] - cu[:-1]
    seq_id = torch.repeat_interleave(torch.arange(seq_lens.numel(), device=mask.device), seq_lens,
                                     output_size=mask.shape[0])
    per_seq = torch.zeros(seq_lens.numel(), dtype=torch.float32, device=mask.device).index_add_(0, seq_id, maskf)
    return maskf / seq_denominators(per_seq, loss_agg, num_tokens)[seq_id]


def _chunk_token_grads(logp_c, ent_c, w_c, extra_c, cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dLoss/dlogp [C], dLoss/dentropy [C] | None) for one chunk, by autograd on the pointwise token loss."""
    old_c, adv_c, ref_c = extra_c
    with torch.enable_grad():
        lp = logp_c.detach().requires_grad_()
        want_ent = cfg["entropy_coef"] != 0.0
        en = ent_c.detach().requires_grad_() if want_ent else ent_c
        loss, _, _, _ = _token_loss(lp, en, old_c, adv_c, ref_c, **cfg)
        grads = torch.autograd.grad((loss * w_c).sum(), [lp, en] if want_ent else [lp])
    return grads[0], (grads[1] if want_ent else None)


class FusedLinearGRPOFunction(torch.autograd.Function):
    """Forward computes loss, log-probs, entropy and the parameter gradients; backward scales the gradients."""

    @staticmethod
    @own_precision
    def forward(ctx, hidden, weight, bias, targets, valid, w, old, adv, ref, temperature, cfg, backend):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        T = hidden.shape[0]
        inv_temp = 1.0 / temperature
        logp = torch.zeros(T, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(T, dtype=torch.float32, device=hidden.device)
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)

        def chunk_grads(c0, c1, lp_c, ent_c):
            lp_c = torch.where(valid[c0:c1], lp_c, zero)
            ent_c = torch.where(valid[c0:c1], ent_c, zero)
            logp[c0:c1] = lp_c
            entropy[c0:c1] = ent_c
            extra = (old[c0:c1], adv[c0:c1], ref[c0:c1] if ref is not None else None)
            return _chunk_token_grads(lp_c, ent_c, w[c0:c1], extra, cfg)

        if backend == "torch":
            grads = _tiled_torch_forward(hidden, weight, bias, safe_targets, inv_temp, need_h, need_w, need_b, chunk_grads)
        else:
            grads = _triton_forward(hidden, weight, bias, targets, inv_temp, need_h, need_w, need_b, chunk_grads)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.has = [g is not None for g in grads]
        token_loss, _, _, _ = _token_loss(logp, entropy, old, adv, ref, **cfg)
        loss = (token_loss * w).sum()
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    @own_precision
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grads = [g.mul_(grad_loss.to(g.dtype)) if has else None for g, has in zip(ctx.saved_tensors, ctx.has)]
        return (*grads, None, None, None, None, None, None, None, None, None)


def _tiled_torch_forward(hidden, weight, bias, safe_targets, inv_temp, need_h, need_w, need_b, chunk_grads):
    """Vocab-tiled CPU path: the log-prob statistics for all tokens (one pass over [Tc, Vb] tiles), the token
    gradients, then the parameter gradients (a second pass that recomputes each tile). Memory: two tiles,
    never a [Tc, V] chunk of logits."""
    T = hidden.shape[0]
    lse, z_target, ent = tiled_forward(hidden, weight, bias, safe_targets, inv_temp, True)
    g_lp, g_ent = chunk_grads(0, T, z_target - lse, ent)
    grad_h, grad_w, grad_b = tiled_backward(hidden, weight, bias, safe_targets, lse, ent, g_lp, g_ent, inv_temp,
                                            (need_h, need_w, need_b))
    return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None)


def _triton_forward(hidden, weight, bias, targets, inv_temp, need_h, need_w, need_b, chunk_grads):
    T, V = hidden.shape[0], weight.shape[0]
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b32 = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_b else None
    # Per chunk: fp32 logits (4 B) + gradient in the input dtype (~0.9 GiB in all at Qwen-7B size).
    chunk = fused_loss_chunk_tokens(T, V, hidden.element_size())
    logits_buf = torch.empty(min(chunk, T), V, dtype=torch.float32, device=hidden.device)
    dz_buf = torch.empty(min(chunk, T), V, dtype=hidden.dtype, device=hidden.device)
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        h_c, y_c, logits_c = hidden[c0:c1], targets[c0:c1], logits_buf[: c1 - c0]
        lp_c, ent_c, lse_c = triton_logprob_stats(h_c, weight, bias, y_c, inv_temp, True, logits_out=logits_c)
        g_lp, g_ent = chunk_grads(c0, c1, lp_c, ent_c)
        dz = triton_dlogits(
            h_c, weight, bias, y_c, lse_c, ent_c, g_lp, g_ent, inv_temp, dz_buf[: c1 - c0], logits_c=logits_c
        )
        apply_dlogits_chunk(dz, h_c, weight, grad_h[c0:c1] if need_h else None, grad_w, grad_b32, c0 == 0)
    return grad_h, grad_w, grad_b32.to(bias.dtype) if need_b else None


def fused_linear_grpo_loss(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO/DAPO clipped-ratio loss straight from hidden states; gradients are computed in the forward.

    hidden: [T, H] bf16/fp16/fp32 (packed sequences), weight: [V, H], targets: [T] int64, old_logprobs /
    advantages / ref_logprobs: [T] fp32, loss_mask: [T] bool, cu_seqlens: [S+1] int32, bias: [V] | None.
    Tokens count when loss_mask is True and target != ignore_index.
    Token loss: max(-A r, -A clip(r, 1-clip_low, 1+clip_high)) (capped at -A * dual_clip where A < 0), plus
    kl_coef * KL(ref) (k1/k2/k3), minus entropy_coef * entropy; r = exp(clamp(logp - old, -20, 20)).
    loss_agg: 'token-mean' (sum / (num_tokens or #masked)), 'seq-mean-token-mean', 'seq-mean-token-sum'.
    Returns (loss: scalar fp32, metrics: dict of detached scalars "clip_frac", "approx_kl", "kl", "entropy",
    "ratio_mean" -- masked token means). Call `loss.backward()` once (the stored gradients are scaled in place).
    """
    validate_logprobs_inputs(hidden, weight, targets, temperature, bias, ignore_index, loss_mask)
    if hidden.dtype == torch.float64:
        raise ValueError("hidden must be fp32/bf16/fp16 (fp64 is for the references only)")
    T = hidden.shape[0]
    validate_grpo_inputs(("hidden", hidden), old_logprobs, advantages, loss_mask, cu_seqlens, ref_logprobs, None,
                         clip_low, clip_high, dual_clip, kl_estimator, loss_agg, num_tokens)
    resolved = "triton" if use_triton(backend, hidden) else "torch"
    valid = valid_tokens(targets, ignore_index, loss_mask)
    w = token_weights(valid, cu_seqlens, loss_agg, num_tokens)
    cfg = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=float(kl_coef),
               kl_estimator=kl_estimator, entropy_coef=float(entropy_coef))
    old = old_logprobs.float()
    adv = advantages.float()
    ref = ref_logprobs.float() if ref_logprobs is not None else None
    if T == 0:
        loss = hidden.float().sum() * 0.0 + weight.float().sum() * 0.0
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        return loss, {name: zero.clone() for name in METRIC_NAMES}
    loss, logp, entropy = FusedLinearGRPOFunction.apply(
        hidden, weight, bias, targets, valid, w, old, adv, ref, float(temperature), cfg, resolved
    )
    with torch.no_grad():
        _, ratio, clipped, kl = _token_loss(logp, entropy, old, adv, ref, **cfg)
        validf = valid.float()
        count = validf.sum().clamp(min=1.0)

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return (x.float() * validf).sum() / count

        metrics = {
            "clip_frac": masked_mean(clipped),
            "approx_kl": masked_mean(old - logp),
            "kl": masked_mean(kl) if kl is not None else torch.zeros((), device=hidden.device),
            "entropy": masked_mean(entropy),
            "ratio_mean": masked_mean(ratio),
        }
    return loss, metrics
