"""Fused linear -> per-token log-prob + entropy, never materialising the [T, V] logits.

Layers (kernel, autograd Function, public op -- as in Liger-Kernel): Triton kernels `_logprobs_fwd_kernel` / `_logprobs_dlogits_kernel` -> `TritonLogprobsFunction`
(torch.autograd.Function) -> `fused_logprobs`, which validates once on the host and dispatches to Triton (CUDA
tensors, or any tensors under TRITON_INTERPRET=1) or to the chunked torch path in `logprobs_torch.py`.

Forward: grid (token blocks x vocab splits). Each program walks its vocab range block by block, forms the logits
tile with tl.dot (bf16/fp16 operands, fp32 accumulator) and folds it into an ONLINE log-sum-exp (running max m,
sum s = sum exp(z - m), and sum exp(z - m) * z for the entropy), plus the target's logit. The vocab is split so
that small T still fills the GPU; the few partial statistics per token are merged on the host ([splits, T] fp32).

Backward: tokens are processed in chunks of C. For a chunk, `_logprobs_dlogits_kernel` recomputes the logits tile
by tile and writes dL = d loss / d logits as a [C, V] tensor in the input dtype (the only large buffer: C is
sized to ~0.6 GiB); the two big products dH = dL @ W and dW += dL^T @ h then run as cuBLAS GEMMs. This keeps the
weight gradient free of atomics (each GEMM owns its output tile) and writes it straight into a [V, H] tensor of
the weight's dtype, without a [V, H] fp32 accumulator (2.2 GiB at Qwen-7B size); with several chunks that
gradient is rounded to the weight dtype once per chunk (fp32 accumulation inside each GEMM).
"""

from __future__ import annotations


import torch

from ._triton_utils import gpu_arch, interpreting, kernel, launch, use_triton
from .logprobs_torch import chunked_logprobs, finish_forward, own_precision, upstream_grads, valid_tokens
from .validate import validate_logprobs_inputs

try:  # Triton is optional: without it every call goes to the chunked torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

# Bytes of the [C, V] gradient buffer of one backward chunk on the GPU. Bigger chunks mean fewer read-modify-write
# passes of the [V, H] weight gradient (2 x 1.1 GB per chunk at Qwen-7B size); 600 MiB gives C = 2048 at V=152k.
GPU_CHUNK_BYTES = 600 * 2**20
# Bytes of the fused loss's per-chunk buffers (fp32 logits + gradient): 900 MiB gives C = 1024 at V=152k, bf16.
FUSED_CHUNK_BYTES = 900 * 2**20


# Logit of a column past the vocab end: exp(_MASKED_LOGIT - max) == 0 for any real max, unlike -inf it is finite.
_MASKED_LOGIT = -3.0e38

if triton is not None:
    _MASKED_LOGIT = tl.constexpr(_MASKED_LOGIT)


@kernel
def _logits_tile(
    p_hidden, p_weight, p_bias, o_t64, m_t, o_v, m_v, H, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # [BLOCK_T, BLOCK_V] fp32 (hidden @ weight^T + bias) / temperature of one tile, K-looped over H.
    o_v64 = o_v.to(tl.int64)
    b_acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        o_h = h0 + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        # [BLOCK_T, BLOCK_H]
        b_h = tl.load(p_hidden + o_t64[:, None] * stride_h + o_h[None, :], mask=m_t[:, None] & m_h[None, :], other=0.0)
        # [BLOCK_V, BLOCK_H]
        b_w = tl.load(p_weight + o_v64[:, None] * stride_w + o_h[None, :], mask=m_v[:, None] & m_h[None, :], other=0.0)
        if DOT_UPCAST:
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_acc = tl.dot(b_h, tl.trans(b_w), b_acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b_acc += tl.load(p_bias + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return b_acc * inv_temp


@kernel
def _logprobs_fwd_kernel(
    p_hidden,  # [T, H]
    p_weight,  # [V, H]
    p_bias,  # [V] (dummy when HAS_BIAS is False)
    p_targets,  # [T] int64
    p_max,  # [S, T] fp32 partial running max
    p_sum,  # [S, T] fp32 partial sum exp(z - max)
    p_zexp,  # [S, T] fp32 partial sum exp(z - max) * z
    p_ztgt,  # [S, T] fp32 partial target logit (0 where the target is outside the split)
    p_logits,  # [T, V] fp32 (dummy unless STORE_LOGITS)
    T,
    V,
    H,
    stride_h,
    stride_w,
    stride_logits,
    inv_temp,
    NUM_SPLITS,
    HAS_BIAS: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_t64 = o_t.to(tl.int64)
    # [BLOCK_T]
    b_tgt = tl.load(p_targets + o_t, mask=m_t, other=-1)
    # Each split covers a whole number of vocab blocks, so only the last block of the last split is ragged.
    v_per_split = tl.cdiv(tl.cdiv(V, NUM_SPLITS), BLOCK_V) * BLOCK_V
    v_start = i_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)

    b_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    b_zexp = tl.zeros([BLOCK_T], dtype=tl.float32)
    b_ztgt = tl.zeros([BLOCK_T], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < v_end
        b_z = _logits_tile(p_hidden, p_weight, p_bias, o_t64, m_t, o_v, m_v, H, stride_h, stride_w, inv_temp,
                           HAS_BIAS, DOT_PRECISION, DOT_UPCAST, BLOCK_T, BLOCK_V, BLOCK_H)
        if STORE_LOGITS:
            tl.store(p_logits + o_t64[:, None] * stride_logits + o_v[None, :], b_z, mask=m_t[:, None] & m_v[None, :])
        # Online log-sum-exp: rescale the running sums whenever the running max grows. Columns past the vocab
        # end (last block only) get a finite floor rather than -inf: exp() of it is exactly 0, so they drop out
        # of every sum bit for bit, and p * z stays 0 without a second masked copy of the tile (0 * -inf = NaN),
        # which would be 64 more live registers per thread at a 128 x 128 tile.
        b_z = tl.where(m_v[None, :], b_z, _MASKED_LOGIT)
        b_new_max = tl.maximum(b_max, tl.max(b_z, axis=1))
        b_scale = tl.exp(b_max - b_new_max)
        b_p = tl.exp(b_z - b_new_max[:, None])
        b_sum = b_sum * b_scale + tl.sum(b_p, axis=1)
        if COMPUTE_ENTROPY:
            b_zexp = b_zexp * b_scale + tl.sum(b_p * b_z, axis=1)
        b_ztgt += tl.sum(tl.where(o_v[None, :] == b_tgt[:, None], b_z, 0.0), axis=1)
        b_max = b_new_max
    o_out = i_s * T + o_t
    tl.store(p_max + o_out, b_max, mask=m_t)
    tl.store(p_sum + o_out, b_sum, mask=m_t)
    tl.store(p_zexp + o_out, b_zexp, mask=m_t)
    tl.store(p_ztgt + o_out, b_ztgt, mask=m_t)


@kernel
def _logprobs_dlogits_kernel(
    p_hidden,  # [T, H] (this chunk's rows)
    p_weight,  # [V, H]
    p_bias,  # [V]
    p_targets,  # [T] int64
    p_lse,  # [T] fp32
    p_entropy,  # [T] fp32
    p_glogp,  # [T] fp32 upstream grad of logp (0 on masked tokens)
    p_gent,  # [T] fp32 upstream grad of entropy (0 on masked tokens; dummy unless ENTROPY_GRAD)
    p_dlogits,  # [T, V] out, input dtype
    p_logits,  # [T, V] fp32 logits / temperature (only read when FROM_LOGITS)
    T,
    V,
    H,
    stride_h,
    stride_w,
    stride_d,
    stride_logits,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Token blocks vary fastest, so the programs in flight share one weight tile [BLOCK_V, H] through L2
    # while the chunk's hidden rows (C x H, a few MiB) stay resident.
    pid = tl.program_id(0)
    n_t = tl.cdiv(T, BLOCK_T)
    i_t = pid % n_t
    i_v = pid // n_t
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_t = o_t < T
    m_v = o_v < V
    o_t64 = o_t.to(tl.int64)
    if FROM_LOGITS:
        # [BLOCK_T, BLOCK_V] logits stored by the forward kernel (fused loss: no recompute)
        b_z = tl.load(p_logits + o_t64[:, None] * stride_logits + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    else:
        b_z = _logits_tile(p_hidden, p_weight, p_bias, o_t64, m_t, o_v, m_v, H, stride_h, stride_w, inv_temp,
                           HAS_BIAS, DOT_PRECISION, DOT_UPCAST, BLOCK_T, BLOCK_V, BLOCK_H)
    # [BLOCK_T]
    b_lse = tl.load(p_lse + o_t, mask=m_t, other=0.0)
    b_glogp = tl.load(p_glogp + o_t, mask=m_t, other=0.0)
    b_tgt = tl.load(p_targets + o_t, mask=m_t, other=-1)
    b_logp = b_z - b_lse[:, None]
    b_p = tl.exp(b_logp)
    # d logp / dz = onehot - p
    b_dz = b_glogp[:, None] * (tl.where(o_v[None, :] == b_tgt[:, None], 1.0, 0.0) - b_p)
    if ENTROPY_GRAD:
        # d entropy / dz = -p * (log p + entropy)
        b_ent = tl.load(p_entropy + o_t, mask=m_t, other=0.0)
        b_gent = tl.load(p_gent + o_t, mask=m_t, other=0.0)
        b_dz -= b_gent[:, None] * b_p * (b_logp + b_ent[:, None])
    b_dz = b_dz * inv_temp
    tl.store(
        p_dlogits + o_t64[:, None] * stride_d + o_v[None, :],
        b_dz.to(p_dlogits.dtype.element_ty),
        mask=m_t[:, None] & m_v[None, :],
    )


# Tile configs (BLOCK_T, BLOCK_V, BLOCK_H, num_warps, num_stages) per SM family and product class, chosen with the
# compile audit (`python -m deepeyesv2_kernels.audit`, no GPU needed): at each of them no register spills, and every
# GEMM kernel keeps at least two K steps of operand tiles in shared memory (a pipelined K loop). sm_80's configs also
# fit the 99 KB of shared memory of sm_86 / sm_89. Product classes: "16" bf16/fp16 operands; "tf32" fp32 operands on
# tf32 tensor cores; "ieee" true fp32 products (FMA units: smaller tiles, no tensor cores by definition).
# The forward's tile is fixed (never autotuned): it fixes the online-softmax summation order, which must not change
# between calls (on-policy ratio exactly 1).
_FWD_TILES = {
    ("sm90", "16"): (128, 128, 64, 8, 4),
    ("sm90", "tf32"): (128, 128, 32, 8, 4),
    ("sm90", "ieee"): (128, 64, 16, 8, 3),
    ("sm80", "16"): (128, 128, 32, 8, 4),
    ("sm80", "tf32"): (128, 64, 32, 8, 4),
    ("sm80", "ieee"): (128, 64, 16, 8, 3),
    # Blackwell (tcgen05): sm_90's 128 x 128 tiles spill 112-128 B there once the logits are stored (fused loss).
    ("sm100", "16"): (128, 64, 64, 8, 4),
    ("sm100", "tf32"): (128, 64, 32, 8, 4),
    ("sm100", "ieee"): (128, 64, 16, 8, 3),
}
# Autotune candidates of the recomputing dlogits kernel (M = chunk tokens, N = vocab, K = H): its output never feeds
# the log-probs, so its tile may vary. Candidates that spill at any flag set are left out (the audit checks).
_DLOGITS_TILES = {
    # (128, 256, 64, 8, 3) and (128, 128, 64, 4, 4) were candidates until the audit showed them spilling (168 and
    # 552 bytes with the entropy gradient).
    ("sm90", "16"): [(128, 128, 64, 8, 4), (64, 256, 64, 8, 4)],
    ("sm90", "tf32"): [(128, 128, 32, 8, 4), (64, 256, 32, 8, 3)],
    ("sm90", "ieee"): [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3)],
    ("sm80", "16"): [(128, 128, 32, 8, 4), (64, 256, 32, 8, 3), (128, 64, 64, 8, 4)],
    ("sm80", "tf32"): [(128, 64, 32, 8, 4), (64, 128, 32, 8, 4)],
    ("sm80", "ieee"): [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3)],
    ("sm100", "ieee"): [(64, 128, 32, 8, 3), (64, 64, 32, 8, 3)],
}
# sm_90's 16-bit and tf32 candidates are spill-free on sm_100 too (only its true-fp32 ones spilled there).
_DLOGITS_TILES[("sm100", "16")] = _DLOGITS_TILES[("sm90", "16")]
_DLOGITS_TILES[("sm100", "tf32")] = _DLOGITS_TILES[("sm90", "tf32")]
# The fused loss's dlogits pass over stored fp32 logits: elementwise, bandwidth-bound, no GEMM.
_FROM_LOGITS_TILE = (32, 256, 64, 4, 1)
# The interpreter runs each tile op in numpy: few, large tiles are fastest.
_INTERPRETER_TILE = (16, 128, 32, 4, 1)


def _tile(cfg: tuple[int, int, int, int, int]) -> dict:
    bt, bv, bh, w, st = cfg
    return dict(BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, num_warps=w, num_stages=st)


if triton is not None:
    _DLOGITS_TUNED = {
        key: triton.autotune(
            configs=[triton.Config(dict(BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh), num_warps=w, num_stages=st)
                     for bt, bv, bh, w, st in cfgs],
            key=["V", "H"],
        )(_logprobs_dlogits_kernel)
        for key, cfgs in _DLOGITS_TILES.items()
    }


def _dot_args(dtype: torch.dtype) -> dict:
    # fp32 inputs follow torch's own switch, torch.set_float32_matmul_precision: true fp32 products by default
    # ("highest"), tf32 tensor cores at "high"/"medium" (~1e-3 relative error in the logits, ~8x the GEMM rate
    # on Hopper) -- the same choice torch's matmuls make, so sampling and training agree.
    # The Triton 3.9 interpreter returns garbage for bf16/fp16 tl.dot on CPU, so there the tiles are upcast to
    # fp32 before the product (exact: bf16/fp16 values are representable in fp32); on the GPU they stay 16-bit.
    low = dtype != torch.float32
    if interpreting():
        return dict(DOT_PRECISION="ieee", DOT_UPCAST=low)
    fp32_fast = torch.get_float32_matmul_precision() != "highest"
    return dict(DOT_PRECISION="tf32" if (low or fp32_fast) else "ieee", DOT_UPCAST=False)


def _tile_key(arch: int, dtype: torch.dtype) -> tuple[str, str]:
    """(SM family, product class) indexing the tile tables."""
    if dtype != torch.float32:
        cls = "16"
    else:
        cls = "tf32" if _dot_args(dtype)["DOT_PRECISION"] == "tf32" else "ieee"
    family = "sm100" if arch >= 100 else "sm90" if arch >= 90 else "sm80"
    return family, cls


def _fwd_config(device: torch.device, dtype: torch.dtype) -> dict:
    arch = gpu_arch(device)
    if arch is None:
        return _tile(_INTERPRETER_TILE)
    return _tile(_FWD_TILES[_tile_key(arch, dtype)])


def _num_splits(vocab: int, block_v: int, device: torch.device) -> int:
    """Vocab splits of the forward grid, so that small T still gives enough programs to fill the GPU.

    Depends on V only (not on T): the fused loss runs the forward kernel on token chunks and must reproduce
    `fused_logprobs` bit for bit (on-policy ratio exactly 1), which needs the same per-split summation order.
    """
    if gpu_arch(device) is None:
        return min(2, triton.cdiv(vocab, block_v))
    # ~8k vocab entries per split: 19 splits at V=152k, i.e. >= 2 waves on 132 SMs from T=2k tokens on.
    return max(1, triton.cdiv(vocab, 8192))


def triton_logprob_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temp: float,
    compute_entropy: bool,
    logits_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the forward kernel: (logp [T], entropy [T], lse [T]) fp32, unmasked.

    If `logits_out` ([T, V] fp32) is given the kernel also writes logits / temperature there (fused GRPO loss).
    """
    T, H = hidden.shape
    V = weight.shape[0]
    cfg = _fwd_config(hidden.device, hidden.dtype)
    splits = _num_splits(V, cfg["BLOCK_V"], hidden.device)
    stats = torch.empty(4, splits, T, dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), splits)
    launch(
        _logprobs_fwd_kernel, grid,
        hidden, weight, bias if bias is not None else hidden, targets,
        stats[0], stats[1], stats[2], stats[3],
        logits_out if logits_out is not None else stats,
        T, V, H, hidden.stride(0), weight.stride(0),
        logits_out.stride(0) if logits_out is not None else 0,
        inv_temp, splits,
        HAS_BIAS=bias is not None, COMPUTE_ENTROPY=compute_entropy, STORE_LOGITS=logits_out is not None,
        **_dot_args(hidden.dtype), **cfg,
    )
    # Merge the per-split online-softmax states: rescale each to the global max.
    part_max, part_sum, part_zexp, part_ztgt = stats
    z_max = part_max.amax(dim=0)
    scale = torch.exp(part_max - z_max)
    total = (part_sum * scale).sum(dim=0)
    lse = z_max + torch.log(total)
    logp = part_ztgt.sum(dim=0) - lse
    if compute_entropy:
        entropy = lse - (part_zexp * scale).sum(dim=0) / total
    else:
        entropy = torch.zeros_like(lse)
    return logp, entropy, lse


def triton_dlogits(
    hidden_c: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets_c: torch.Tensor,
    lse_c: torch.Tensor,
    entropy_c: torch.Tensor,
    glogp_c: torch.Tensor,
    gent_c: torch.Tensor | None,
    inv_temp: float,
    out: torch.Tensor,
    logits_c: torch.Tensor | None = None,
) -> torch.Tensor:
    """d loss / d logits (pre-temperature) for a chunk of tokens into out: [C, V] (input dtype).

    The logits are recomputed from hidden_c and weight, or read from `logits_c` ([C, V] fp32, logits / temperature
    as stored by `triton_logprob_stats(..., logits_out=)`) when given.
    """
    C, H = hidden_c.shape
    V = weight.shape[0]
    arch = gpu_arch(hidden_c.device)
    if arch is not None and logits_c is None:
        kernel, cfg = _DLOGITS_TUNED[_tile_key(arch, hidden_c.dtype)], {}

        def grid(meta):
            return (triton.cdiv(C, meta["BLOCK_T"]) * triton.cdiv(V, meta["BLOCK_V"]),)
    else:
        kernel = _logprobs_dlogits_kernel
        cfg = _tile(_INTERPRETER_TILE if arch is None else _FROM_LOGITS_TILE)
        grid = (triton.cdiv(C, cfg["BLOCK_T"]) * triton.cdiv(V, cfg["BLOCK_V"]),)
    launch(
        kernel, grid,
        hidden_c, weight, bias if bias is not None else hidden_c, targets_c, lse_c, entropy_c, glogp_c,
        gent_c if gent_c is not None else glogp_c, out, logits_c if logits_c is not None else out,
        C, V, H, hidden_c.stride(0), weight.stride(0), out.stride(0),
        logits_c.stride(0) if logits_c is not None else 0, inv_temp,
        HAS_BIAS=bias is not None, ENTROPY_GRAD=gent_c is not None, FROM_LOGITS=logits_c is not None,
        **_dot_args(hidden_c.dtype), **cfg,
    )
    return out


def backward_chunk_tokens(num_tokens: int, vocab: int, itemsize: int) -> int:
    """Tokens per backward chunk: the [C, V] gradient buffer stays near GPU_CHUNK_BYTES; multiple of 128."""
    c = max(128, (GPU_CHUNK_BYTES // (itemsize * vocab)) // 128 * 128)
    return min(c, max(num_tokens, 1))


def fused_loss_chunk_tokens(num_tokens: int, vocab: int, itemsize: int) -> int:
    """Tokens per chunk of the fused loss: fp32 logits + gradient buffer ~FUSED_CHUNK_BYTES; multiple of 128."""
    c = max(128, (FUSED_CHUNK_BYTES // ((4 + itemsize) * vocab)) // 128 * 128)
    return min(c, max(num_tokens, 1))


def apply_dlogits_chunk(
    dz: torch.Tensor,
    hidden_c: torch.Tensor,
    weight: torch.Tensor,
    grad_h_c: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b32: torch.Tensor | None,
    first: bool,
) -> None:
    """dH_c = dz @ W (written in place), dW (+)= dz^T @ h_c, db += sum dz; the GEMMs accumulate in fp32."""
    if grad_h_c is not None:
        torch.mm(dz, weight, out=grad_h_c)
    if grad_w is not None:
        if first:
            torch.mm(dz.t(), hidden_c, out=grad_w)
        else:
            grad_w.addmm_(dz.t(), hidden_c)
    if grad_b32 is not None:
        grad_b32 += dz.sum(dim=0, dtype=torch.float32)


class TritonLogprobsFunction(torch.autograd.Function):
    @staticmethod
    @own_precision
    def forward(ctx, hidden, weight, bias, targets, valid, temperature, compute_entropy, entropy_grad):
        inv_temp = 1.0 / temperature
        logp, entropy, lse = triton_logprob_stats(hidden, weight, bias, targets, inv_temp, compute_entropy)
        return finish_forward(ctx, valid, logp, entropy, lse, (hidden, weight, bias, targets), inv_temp,
                              compute_entropy, entropy_grad)

    @staticmethod
    @own_precision
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, valid, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        g_lp, g_ent = upstream_grads(ctx, valid, grad_logp, grad_entropy)
        grads = triton_backward(hidden, weight, bias, targets, lse, entropy, g_lp, g_ent, ctx.inv_temp,
                                need_h, need_w, need_b)
        return (*grads, None, None, None, None, None)


def triton_backward(hidden, weight, bias, targets, lse, entropy, g_lp, g_ent, inv_temp, need_h, need_w, need_b):
    """(grad_hidden, grad_weight, grad_bias) from per-token upstream grads, chunk by chunk over tokens."""
    T, V = hidden.shape[0], weight.shape[0]
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b32 = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_b else None
    chunk = backward_chunk_tokens(T, V, hidden.element_size())
    dz_buf = torch.empty(min(chunk, T), V, dtype=hidden.dtype, device=hidden.device)
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        dz = triton_dlogits(
            hidden[c0:c1], weight, bias, targets[c0:c1], lse[c0:c1], entropy[c0:c1], g_lp[c0:c1],
            g_ent[c0:c1] if g_ent is not None else None, inv_temp, dz_buf[: c1 - c0],
        )
        apply_dlogits_chunk(dz, hidden[c0:c1], weight, grad_h[c0:c1] if need_h else None, grad_w, grad_b32, c0 == 0)
    if need_w and T == 0:
        grad_w.zero_()
    grad_b = grad_b32.to(bias.dtype) if need_b else None
    return grad_h, grad_w, grad_b


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    compute_entropy: bool = True,
    entropy_grad: bool = False,
    loss_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of `targets` and softmax entropy from hidden states, without [T, V] logits.

    hidden: [T, H] bf16/fp16/fp32, weight: [V, H] same dtype, targets: [T] int64, bias: [V] | None,
    loss_mask: [T] bool | None. logits = (hidden @ weight.T + bias) / temperature, accumulated in fp32.
    Returns (logprobs [T] fp32, entropy [T] fp32). Tokens with target == ignore_index or loss_mask False get 0 and
    no gradient. The entropy is differentiable only with entropy_grad=True (otherwise detached); with
    compute_entropy=False it is all zeros. T == 0 returns two empty tensors. Differentiable w.r.t. hidden, weight
    and bias; no [V, H] gradient is formed when weight does not require grad.
    backend: 'auto' (Triton on CUDA or under TRITON_INTERPRET=1, else chunked torch), 'triton' or 'torch'.
    Raises ValueError (naming the argument) on bad shapes, dtypes, devices, non-contiguous inputs or targets
    outside [0, V) other than ignore_index.
    """
    validate_logprobs_inputs(hidden, weight, targets, temperature, bias, ignore_index, loss_mask)
    if hidden.dtype == torch.float64:
        raise ValueError("hidden must be fp32/bf16/fp16 (fp64 is for the references only)")
    on_triton = use_triton(backend, hidden)
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        # Keep the graph connected so that backward on an empty batch gives zero grads rather than an error.
        if hidden.requires_grad:
            empty = empty + hidden.sum().float() * 0
        return empty, empty.detach().clone()
    if not on_triton:
        return chunked_logprobs(
            hidden, weight, targets, temperature, bias, ignore_index, compute_entropy, entropy_grad, loss_mask
        )
    valid = valid_tokens(targets, ignore_index, loss_mask)
    return TritonLogprobsFunction.apply(
        hidden, weight, bias, targets, valid, float(temperature), compute_entropy, entropy_grad
    )
