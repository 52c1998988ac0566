"""Chunked torch path for per-token log-probs + entropy from hidden states (CPU, or wherever Triton is missing).

Same API and numerics as the Triton path in `logprobs.py`, and the same tiling idea: the [T, V] logits are never
formed. Tokens go in chunks of Tc (all T up to TOKEN_CHUNK_MAX) and, inside a chunk, the vocab in blocks of Vb so
that one [Tc, Vb] fp32 tile is about TILE_BYTES:

  forward   per block: tile = h_c @ W_b^T (one GEMM), reduced to per-token ONLINE statistics (running max m,
            s = sum exp(z - m), a = sum exp(z - m) (z - m) for the entropy, the target logit when the target lies in
            the block), merged across blocks by rescaling to the new max; finally lse = m + log s,
            entropy = log s - a / s.
  backward  per block: the GEMM recomputes the log-probs z - lse (it adds -lse), the tile becomes q with
            dlogits = -row_scale * q: q = exp(z - lse) - onehot(target) and row_scale = g_lp (log-prob grad only,
            the per-token factor goes on the [Tc, H] GEMM operands, not through the tile), or
            q = p (g_ent (log p + entropy) + g_lp) - g_lp onehot(target) and row_scale = 1; the one-hot part is
            added only at the targets inside the block (Tc elements). Then grad_h_c += q @ W_b and
            grad_W[v0:v1] = q^T @ (-row_scale * h_c): a reduction over all Tc tokens, written once per block when
            there is one token chunk.

Why this shape: on CPU, W (V x H, ~620 MB fp32 at V=152k, H=1024) dominates memory traffic. Token-chunked tiles
with the full vocab (the previous layout) stream all of W through every GEMM of every chunk and read-modify-write the
whole fp32 weight gradient once per chunk with a reduction dim of only ~200 tokens. Vocab blocks with tokens as the
wide dimension read W once per token chunk per GEMM and give every GEMM large dims (Tc x Vb x H); the GEMMs then
run as fast as the naive path's single [T, V] products, and the elementwise work is a few passes per tile.
Peak extra memory: two [Tc, Vb] fp32 tiles (one without entropy), O(Tc x H) per-chunk vectors, and, for bf16/fp16
weights, the [V, H] fp32 weight-gradient accumulator.

The fused GRPO loss (`linear_grpo.py`) runs the same two passes inside its forward: statistics for all tokens,
the token-loss gradients, then the recomputing gradient pass -- one more matrix product than holding a [Tc, V]
chunk of logits between them would need, for the same two-tile memory bound.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch


# Size of one [Tc, Vb] fp32 tile of the vocab-tiled log-prob path; two are alive at its peak. On 2 CPU cores the GEMMs
# dominate and tiles of 16-128 MiB timed alike when the machine was quiet; under load, 64-128 MiB did better than
# 32 MiB (fewer ops per pass, so fewer thread barriers stalled by a descheduled thread). 64 MiB: Vb = 4096 at
# T = 4096, ~1/45 of the naive path's extra memory there.
TILE_BYTES = 64 * 2**20
# Tokens per chunk of the vocab-tiled path (all of them up to this): W is read once per chunk and per GEMM.
TOKEN_CHUNK_MAX = 8192
# Smallest vocab block before the token chunk shrinks instead (keeps the K = Vb of the grad-hidden GEMM wide).
VOCAB_BLOCK_MIN = 1024


def valid_tokens(targets: torch.Tensor, ignore_index: int, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """[T] bool: tokens that get a log-prob (target not ignored and inside the loss mask)."""
    valid = targets != ignore_index
    return valid & loss_mask if loss_mask is not None else valid


# ------------------------------------------------------------------------------------------- vocab-tiled path
def vocab_tiles(num_tokens: int, vocab: int, tile_bytes: int | None = None) -> tuple[int, int]:
    """(tokens per chunk Tc, vocab rows per block Vb) so that one [Tc, Vb] fp32 tile takes about `tile_bytes`
    (default TILE_BYTES).

    Tokens are the wide dimension (all of them up to TOKEN_CHUNK_MAX): W is streamed once per token chunk, and the
    weight-gradient GEMM reduces over Tc tokens. Vb shrinks to fit the budget but not below VOCAB_BLOCK_MIN (then
    Tc shrinks instead), so that no GEMM dimension gets small.
    """
    elems = max(1, (TILE_BYTES if tile_bytes is None else tile_bytes) // 4)
    tokens = max(1, min(num_tokens, TOKEN_CHUNK_MAX, elems // min(vocab, VOCAB_BLOCK_MIN)))
    block = max(1, min(vocab, elems // tokens))
    return tokens, block


def _tile(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Contiguous [rows, cols] view of the head of a flat fp32 buffer: ragged last chunks/blocks reuse the same
    memory, so the tiles are allocated (and page-faulted) once per pass instead of once per block."""
    return buf[: rows * cols].view(rows, cols)


def scaled_hidden(hidden_c: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """[C, H] fp32 hidden / temperature. Scaling the C x H input instead of the C x Vb logits folds the temperature
    into the GEMM (no pass over the tile); the result may alias `hidden_c` when no cast or scaling is needed."""
    h = hidden_c.float()
    return h * inv_temp if inv_temp != 1.0 else h


def block_logits(
    h_s: torch.Tensor,
    weight_b: torch.Tensor,
    bias_s_b: torch.Tensor | None,
    row_shift: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[C, B] = h_s @ weight_b^T + bias_s_b + row_shift, fp32, written in place and returned.

    h_s: [C, H] fp32 (already / temperature), weight_b: [B, H] fp32, bias_s_b: [B] fp32 (already / temperature) or
    None, row_shift: [C, 1] fp32 or None. A single additive term is handed to the GEMM as its C operand (addmm, beta
    = 1), so it costs no extra pass over the tile; both together (bias and shift) take one.
    """
    w_t = weight_b.t()
    if bias_s_b is None and row_shift is None:
        return torch.mm(h_s, w_t, out=out)
    torch.addmm(bias_s_b if bias_s_b is not None else row_shift, h_s, w_t, out=out)
    if bias_s_b is not None and row_shift is not None:
        out += row_shift
    return out


def pick_block_targets(z: torch.Tensor, local_targets: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """[C] z_target with the logits of the targets that fall in this block filled in from z [C, B].

    local_targets: [C] int64 target - v0 (outside [0, B) for targets in other blocks; those keep their value).
    """
    width = z.shape[1]
    inside = (local_targets >= 0) & (local_targets < width)
    picked = z.gather(1, local_targets.clamp(0, width - 1)[:, None]).squeeze(1)
    return torch.where(inside, picked, z_target)


def block_stats_(
    z: torch.Tensor, e_out: torch.Tensor | None, compute_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token statistics of one [C, B] fp32 logit tile (consumed): (max m [C], s = sum exp(z - m) [C],
    a = sum exp(z - m) (z - m) [C] or None).

    e_out: a [C, B] fp32 tile for exp(z - m), needed only with compute_entropy (otherwise z is exponentiated in
    place). a <= 0 term by term, so the entropy log s - a / s adds two non-negative numbers instead of cancelling
    against lse; the products are summed by torch's pairwise sum (a bmm dot accumulates sequentially and loses
    ~1e-4 relative at V=152k).
    """
    m = z.amax(dim=1, keepdim=True)
    d = z.sub_(m)
    if not compute_entropy:
        return m.squeeze(1), d.exp_().sum(dim=1), None
    e = torch.exp(d, out=e_out)
    return m.squeeze(1), e.sum(dim=1), d.mul_(e).sum(dim=1)


def merge_stats(
    run: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    new: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Combine running (m, s, a) [C] fp32 with a block's: both are rescaled to the new max m' = max(m1, m2).

    exp(z - m) = exp(z - m') * exp(m - m'), and (z - m') = (z - m) + (m - m'), so a' = sum_k exp(m_k - m') *
    (a_k + (m_k - m') s_k): every term stays <= 0, no cancellation. The first block is taken as is (no -inf
    start value whose difference with itself would be NaN).
    """
    if run is None:
        return new
    m1, s1, a1 = run
    m2, s2, a2 = new
    m = torch.maximum(m1, m2)
    d1, d2 = m1 - m, m2 - m
    w1, w2 = d1.exp(), d2.exp()
    s = w1 * s1 + w2 * s2
    a = None
    if a1 is not None and a2 is not None:
        a = w1 * (a1 + d1 * s1) + w2 * (a2 + d2 * s2)
    return m, s, a


def tiled_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    safe_targets: torch.Tensor,
    inv_temp: float,
    compute_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lse [T], target logit [T], entropy [T] or None), fp32, of logits (hidden @ weight^T + bias) / temperature.

    hidden: [T, H], weight: [V, H], bias: [V] or None (any float dtype; fp32 arithmetic), safe_targets: [T] int64
    in [0, V). Vocab-tiled with online statistics (see the module docstring); W is read once per token chunk.
    """
    T, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    tokens, block = vocab_tiles(T, V)
    z_buf = torch.empty(min(tokens, T) * block, dtype=torch.float32, device=dev)
    e_buf = torch.empty_like(z_buf) if compute_entropy else None
    bias_s = bias.float() * inv_temp if bias is not None else None
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    z_target = torch.empty(T, dtype=torch.float32, device=dev)
    entropy = torch.empty(T, dtype=torch.float32, device=dev) if compute_entropy else None
    for c0 in range(0, T, tokens):
        c1 = min(c0 + tokens, T)
        n = c1 - c0
        h_s = scaled_hidden(hidden[c0:c1], inv_temp)
        zt = torch.zeros(n, dtype=torch.float32, device=dev)
        run = None
        for v0 in range(0, V, block):
            v1 = min(v0 + block, V)
            b_s = bias_s[v0:v1] if bias_s is not None else None
            z = block_logits(h_s, weight[v0:v1].float(), b_s, None, _tile(z_buf, n, v1 - v0))
            zt = pick_block_targets(z, safe_targets[c0:c1] - v0, zt)
            e_out = _tile(e_buf, n, v1 - v0) if e_buf is not None else None
            run = merge_stats(run, block_stats_(z, e_out, compute_entropy))
        m, s, a = run
        log_s = s.log()
        lse[c0:c1] = m + log_s
        z_target[c0:c1] = zt
        if entropy is not None:
            entropy[c0:c1] = log_s - a / s
    return lse, z_target, entropy


def add_at_block_targets_(tile: torch.Tensor, local_targets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """tile[i, local_targets[i]] += values[i] for the rows whose target lies in this block; returns `tile`.

    tile: [C, B] fp32, local_targets: [C] int64 target - v0, values: [C] fp32. One entry per row at most, so this
    touches C elements, never the whole tile.
    """
    rows = ((local_targets >= 0) & (local_targets < tile.shape[1])).nonzero().squeeze(1)
    return tile.index_put_((rows, local_targets[rows]), values[rows], accumulate=True)


def block_dlogits_(
    a: torch.Tensor,
    p_out: torch.Tensor | None,
    local_targets: torch.Tensor,
    onehot: torch.Tensor,
    entropy_c: torch.Tensor | None,
    g_lp_c: torch.Tensor,
    g_ent_c: torch.Tensor | None,
) -> torch.Tensor:
    """q [C, B] fp32, written into `a`, such that dlogits = -row_scale[:, None] * q on this tile.

    a: [C, B] fp32 log-probs z - lse (consumed); local_targets: [C] int64 target - v0; onehot: [C] fp32, the value
    subtracted at each in-block target. Without an entropy gradient q = p - onehot(target) (onehot = 1) and
    row_scale = g_lp: the per-token factor is applied to the [C, H] GEMM operands instead of the tile. With one
    (p_out: a second [C, B] tile; entropy_c, g_ent_c: [C]; onehot = g_lp): d entropy / dz = -p (log p + entropy), so
    q = p (g_ent (log p + entropy) + g_lp) - g_lp onehot(target) and row_scale = 1.
    """
    if g_ent_c is None:
        q = a.exp_()
    else:
        p = torch.exp(a, out=p_out)
        offset = (g_ent_c * entropy_c + g_lp_c)[:, None]
        # One pass: a <- g_ent * a + offset (torch.addcmul may write into `a`, which it reads elementwise).
        q = torch.addcmul(offset, a, g_ent_c[:, None], out=a).mul_(p)
    return add_at_block_targets_(q, local_targets, -onehot)


def tiled_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    safe_targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor | None,
    inv_temp: float,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad hidden [T, H] in hidden's dtype, grad weight [V, H] fp32, grad bias [V] fp32), None where not needed.

    lse, entropy, g_lp (dLoss/dlogp), g_ent (dLoss/dentropy or None): [T] fp32, the grads zero on masked tokens.
    needs: (hidden, weight, bias). Per token chunk and vocab block, recomputes the log-probs z - lse (the GEMM adds
    -lse) and turns them into q with dlogits = -row_scale * q (see `block_dlogits_`); then grad_h_c accumulates
    q @ W_b and grad_W[v0:v1] gets q^T @ (-row_scale * h_s), a reduction over all Tc tokens. z = h_s W^T + b_s with
    h_s = h / temperature, so dW = dz^T h_s while dh and db take the 1 / temperature.
    """
    need_h, need_w, need_b = needs
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    tokens, block = vocab_tiles(T, V)
    a_buf = torch.empty(min(tokens, T) * block, dtype=torch.float32, device=dev)
    p_buf = torch.empty_like(a_buf) if g_ent is not None else None
    bias_s = bias.float() * inv_temp if bias is not None else None
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = None
    if need_w:
        # Each block of grad_w is first written (mm out=) by the first token chunk, later chunks accumulate into it:
        # no zero-fill pass over [V, H]. Zeros only when there is no token chunk at all (T = 0).
        grad_w = (torch.zeros if T == 0 else torch.empty)(V, H, dtype=torch.float32, device=dev)
    grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    for c0 in range(0, T, tokens):
        c1 = min(c0 + tokens, T)
        n = c1 - c0
        h_s = scaled_hidden(hidden[c0:c1], inv_temp)
        g_lp_c = g_lp[c0:c1]
        g_ent_c = g_ent[c0:c1] if g_ent is not None else None
        ones = torch.ones_like(g_lp_c)
        row_scale, onehot = (g_lp_c, ones) if g_ent is None else (ones, g_lp_c)
        h_w = h_s * (-row_scale)[:, None] if need_w else None
        acc_h = torch.zeros(n, H, dtype=torch.float32, device=dev) if need_h else None
        shift = -lse[c0:c1, None]
        for v0 in range(0, V, block):
            v1 = min(v0 + block, V)
            w_b = weight[v0:v1].float()
            b_s = bias_s[v0:v1] if bias_s is not None else None
            a = block_logits(h_s, w_b, b_s, shift, _tile(a_buf, n, v1 - v0))
            p_out = _tile(p_buf, n, v1 - v0) if p_buf is not None else None
            q = block_dlogits_(a, p_out, safe_targets[c0:c1] - v0, onehot, entropy[c0:c1], g_lp_c, g_ent_c)
            if need_h:
                acc_h.addmm_(q, w_b)
            if need_w:
                if c0 == 0:
                    torch.mm(q.t(), h_w, out=grad_w[v0:v1])
                else:
                    grad_w[v0:v1].addmm_(q.t(), h_w)
            if need_b:
                grad_b[v0:v1].addmv_(q.t(), row_scale, alpha=-1.0)
        if need_h:
            grad_h[c0:c1] = acc_h.mul_((-inv_temp) * row_scale[:, None])
    if need_b:
        grad_b *= inv_temp
    return grad_h, grad_w, grad_b


def own_precision(fn):
    """For an autograd Function's forward/backward: run with any enclosing autocast switched off. The kernels
    pick their own precision (matmuls in the inputs' dtype, fp32 logits and statistics); autocast would
    re-type the matmuls of their chunk loops and break the in-place fp32 accumulators."""

    @functools.wraps(fn)
    def wrapped(ctx, *args):
        with contextlib.ExitStack() as stack:
            for device_type in ("cuda", "cpu"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(ctx, *args)

    return wrapped


def finish_forward(ctx, valid, logp, entropy, lse, saved: tuple, inv_temp: float, compute_entropy: bool,
                   entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward epilogue both autograd wrappers share: zero logp [T] / entropy [T] on invalid tokens, save
    `saved` + (valid, lse, entropy) for the backward, and mark entropy non-differentiable unless its grad is on."""
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    logp = torch.where(valid, logp, zero)
    entropy = torch.where(valid, entropy, zero) if entropy is not None else torch.zeros_like(lse)
    ctx.save_for_backward(*saved, valid, lse, entropy)
    ctx.inv_temp = inv_temp
    ctx.entropy_grad = entropy_grad and compute_entropy
    if not ctx.entropy_grad:
        ctx.mark_non_differentiable(entropy)
    return logp, entropy


def upstream_grads(ctx, valid, grad_logp, grad_entropy) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dL/dlogp [T] fp32, dL/dentropy [T] fp32 or None), zero on invalid tokens (autograd may pass None)."""
    validf = valid.float()
    g_lp = grad_logp.float() * validf if grad_logp is not None else torch.zeros_like(validf)
    g_ent = grad_entropy.float() * validf if (ctx.entropy_grad and grad_entropy is not None) else None
    return g_lp, g_ent


class ChunkedLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: forward keeps only [T] statistics, backward recomputes logits tile by tile."""

    @staticmethod
    @own_precision
    def forward(ctx, hidden, weight, bias, targets, valid, temperature, compute_entropy, entropy_grad):
        inv_temp = 1.0 / temperature
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        lse, z_target, ent = tiled_forward(hidden, weight, bias, safe_targets, inv_temp, compute_entropy)
        return finish_forward(ctx, valid, z_target - lse, ent, lse, (hidden, weight, bias, safe_targets), inv_temp,
                              compute_entropy, entropy_grad)

    @staticmethod
    @own_precision
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, safe_targets, valid, lse, entropy = ctx.saved_tensors
        g_lp, g_ent = upstream_grads(ctx, valid, grad_logp, grad_entropy)
        grad_h, grad_w, grad_b = tiled_backward(
            hidden, weight, bias, safe_targets, lse, entropy, g_lp, g_ent, ctx.inv_temp, ctx.needs_input_grad[:3]
        )
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
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
