"""Chunked torch path for per-token log-probs + entropy from hidden states (CPU, or wherever Triton is missing).

Same API and numerics as the Triton path in `logprobs.py`: logits are formed for a chunk of tokens at a time
(chunk x full vocab, fp32), reduced to (logprob, entropy, lse) and dropped; the backward recomputes them chunk by
chunk. Peak extra memory is two [chunk, V] fp32 buffers, whatever T is, instead of several [T, V] tensors.

The chunk helpers here are also used by the fused GRPO loss (`linear_grpo.py`), which turns the logits of a chunk
into their gradient in the forward pass (3 matrix products instead of 4).
"""

from __future__ import annotations

import math

import torch

# Size of one [chunk, V] fp32 buffer. Two are alive at the peak; 128 MiB keeps the extra memory at ~1/30 of the
# naive path at T=4096, V=152k, while chunks stay >= ~200 tokens, large enough for the GEMMs to run at speed.
CHUNK_BYTES = 128 * 2**20
# Rows per block of the entropy reduction (bounds its temporary to ROW_BLOCK x V fp32).
_ROW_BLOCK = 32


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
    for name, t in named:
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
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


def valid_tokens(targets: torch.Tensor, ignore_index: int, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """[T] bool: tokens that get a log-prob (target not ignored and inside the loss mask)."""
    valid = targets != ignore_index
    return valid & loss_mask if loss_mask is not None else valid


def chunk_tokens(num_tokens: int, vocab: int, chunk_bytes: int | None = None) -> int:
    """Tokens per chunk so that one [chunk, V] fp32 buffer takes about `chunk_bytes` (default CHUNK_BYTES)."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(16, min(max(num_tokens, 1), chunk_bytes // (4 * vocab)))


def chunk_logits(
    hidden_c: torch.Tensor, weight32: torch.Tensor, bias32: torch.Tensor | None, inv_temp: float
) -> torch.Tensor:
    """[C, V] fp32 logits / temperature for one chunk of tokens (hidden_c: [C, H] fp32)."""
    z = hidden_c @ weight32.t()
    if bias32 is not None:
        z += bias32
    if inv_temp != 1.0:
        z *= inv_temp
    return z


def chunk_stats(
    z: torch.Tensor, safe_targets_c: torch.Tensor, compute_entropy: bool, consume_z: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """From [C, V] fp32 logits: (lse [C], target logit [C], entropy [C] | None, e = exp(z - max) [C, V], sum e [C]).

    `z` is left unchanged unless consume_z (then it is overwritten, saving a pass); `e` is the second [C, V]
    buffer (the fused loss turns it into probabilities in place).
    """
    z_max = z.amax(dim=1, keepdim=True)
    e = torch.sub(z, z_max).exp_()
    s = e.sum(dim=1)
    lse = z_max.squeeze(1) + s.log()
    z_target = z.gather(1, safe_targets_c[:, None]).squeeze(1)
    entropy = None
    if compute_entropy:
        # entropy = log s - sum_v e_v (z_v - max) / s: both terms >= 0, no cancellation against lse. The products
        # are summed by torch's pairwise sum (a bmm dot accumulates sequentially: ~1e-4 relative error at V=152k)
        # over row blocks, so the temporary stays small instead of a third [C, V] buffer.
        if consume_z:
            ez = z.sub_(z_max).mul_(e).sum(dim=1)
        else:
            ez = torch.empty_like(s)
            for r0 in range(0, z.shape[0], _ROW_BLOCK):
                r1 = r0 + _ROW_BLOCK
                ez[r0:r1] = (torch.sub(z[r0:r1], z_max[r0:r1]).mul_(e[r0:r1])).sum(dim=1)
        entropy = s.log() - ez / s
    return lse, z_target, entropy, e, s


def dlogits_(
    z: torch.Tensor,
    p: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    safe_targets_c: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temp: float,
) -> torch.Tensor:
    """Gradient w.r.t. the pre-temperature logits of one chunk, written into `z` or `p` (both are consumed).

    z: [C, V] fp32 logits / temperature, p: [C, V] fp32 softmax probabilities; grad_logp, grad_entropy: [C] fp32,
    already zero on masked tokens. d logp / dz = onehot - p; d entropy / dz = -p * (z - lse + entropy).
    """
    if grad_entropy is not None:
        z.sub_((lse - entropy)[:, None]).mul_(p).mul_(-grad_entropy[:, None])
        dz = z.addcmul_(p, grad_logp[:, None], value=-1.0)
    else:
        dz = p.mul_(-grad_logp[:, None])
    dz.scatter_add_(1, safe_targets_c[:, None], grad_logp[:, None])
    if inv_temp != 1.0:
        dz *= inv_temp
    return dz


class ChunkedLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: forward keeps only [T] statistics, backward recomputes logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, temperature, compute_entropy, entropy_grad):
        T, V = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        # Low-precision inputs are upcast: fp32 logits and accumulation whatever the input dtype.
        weight32 = weight.float()
        bias32 = bias.float() if bias is not None else None
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        logp = torch.zeros(T, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(T, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(T, dtype=torch.float32, device=hidden.device)
        chunk = chunk_tokens(T, V)
        for c0 in range(0, T, chunk):
            c1 = min(c0 + chunk, T)
            z = chunk_logits(hidden[c0:c1].float(), weight32, bias32, inv_temp)
            lse_c, zt_c, ent_c, e, _ = chunk_stats(z, safe_targets[c0:c1], compute_entropy, consume_z=True)
            del z, e
            lse[c0:c1] = lse_c
            logp[c0:c1] = zt_c - lse_c
            if compute_entropy:
                entropy[c0:c1] = ent_c
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        logp = torch.where(valid, logp, zero)
        entropy = torch.where(valid, entropy, zero)
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid, lse, entropy)
        ctx.inv_temp = inv_temp
        ctx.entropy_grad = entropy_grad and compute_entropy
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, safe_targets, valid, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        T = hidden.shape[0]
        validf = valid.float()
        g_lp = grad_logp.float() * validf if grad_logp is not None else torch.zeros_like(validf)
        g_ent = None
        if ctx.entropy_grad and grad_entropy is not None:
            g_ent = grad_entropy.float() * validf
        weight32 = weight.float()
        bias32 = bias.float() if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w32 = torch.zeros_like(weight32) if need_w else None
        grad_b32 = torch.zeros_like(bias32) if need_b else None
        chunk = chunk_tokens(T, weight.shape[0])
        for c0 in range(0, T, chunk):
            c1 = min(c0 + chunk, T)
            h_c = hidden[c0:c1].float()
            z = chunk_logits(h_c, weight32, bias32, ctx.inv_temp)
            p = torch.sub(z, lse[c0:c1, None]).exp_()
            dz = dlogits_(
                z, p, lse[c0:c1], entropy[c0:c1], safe_targets[c0:c1], g_lp[c0:c1],
                g_ent[c0:c1] if g_ent is not None else None, ctx.inv_temp,
            )
            if need_h:
                grad_h[c0:c1] = dz @ weight32
            if need_w:
                grad_w32.addmm_(dz.t(), h_c)
            if need_b:
                grad_b32 += dz.sum(0)
            del z, p, dz
        grad_w = grad_w32.to(weight.dtype) if need_w else None
        grad_b = grad_b32.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    compute_entropy: bool = True,
    entropy_grad: bool = False,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked-torch `fused_logprobs` (see `logprobs.fused_logprobs` for the contract); no input validation."""
    valid = valid_tokens(targets, ignore_index, loss_mask)
    return ChunkedLogprobsFunction.apply(
        hidden, weight, bias, targets, valid, float(temperature), compute_entropy, entropy_grad
    )
