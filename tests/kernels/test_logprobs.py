"""fused_logprobs (Triton path and chunked torch path) against the naive fp32 reference.

The Triton tests (`test_triton_*`) run in this process only when the kernels were built by Triton's interpreter
(TRITON_INTERPRET=1 before triton was first imported) or on CUDA. Otherwise `test_interpreter_subprocess` reruns
them in a fresh interpreter-mode process: setting TRITON_INTERPRET here would switch every later CPU user of
triton in the session to the (slow) interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from deepeyesv2_kernels import logprobs as logprobs_mod
from deepeyesv2_kernels import logprobs_torch
from deepeyesv2_kernels.logprobs import fused_logprobs
from deepeyesv2_kernels.logprobs_ref import logprobs_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and logprobs_mod.interpreting()
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRETED else None)
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="no CUDA and no interpreter: see test_interpreter_subprocess")

# (name, T, H, V, dtype, temperature, bias, mask, entropy_grad)
LADDER = [
    ("odd-fp32", 37, 32, 4099, torch.float32, 1.0, False, False, False),
    ("masked-bias-temp", 63, 48, 1000, torch.float32, 0.7, True, True, True),
    ("T1", 1, 16, 257, torch.float32, 1.3, False, False, True),
    ("bf16", 37, 32, 4099, torch.bfloat16, 0.9, True, True, True),
]
TOL = {torch.float32: dict(rtol=1e-5, grad=2e-5), torch.bfloat16: dict(rtol=2e-2, grad=3e-2)}


def _inputs(T, H, V, dtype, bias, mask, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(device=device, dtype=dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (T,), generator=g).to(device)
    loss_mask = None
    if mask:
        targets[::5] = -100
        loss_mask = (torch.rand(T, generator=g) > 0.3).to(device)
    return hidden, weight, b, targets, loss_mask


def _run(fn, hidden, weight, bias, targets, loss_mask, temperature, use_entropy, **kw):
    """Outputs and grads of sum(c1 * logp + c2 * entropy) with fixed random c1, c2."""
    params = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    for t in params:
        t.grad = None
    logp, ent = fn(hidden, weight, targets, temperature=temperature, bias=bias, loss_mask=loss_mask, **kw)
    g = torch.Generator().manual_seed(1)
    c1 = torch.randn(logp.shape[0], generator=g).to(logp.device)
    c2 = torch.randn(logp.shape[0], generator=g).to(logp.device)
    loss = (c1 * logp).sum() + ((c2 * ent).sum() if use_entropy else 0.0)
    loss.backward()
    return logp.detach(), ent.detach(), {n: t.grad for n, t in zip(("hidden", "weight", "bias"), (hidden, weight, bias)) if t is not None and t.requires_grad}


def _assert_close_named(actual, expected, name, rtol, atol_scale):
    expected = expected.float()
    atol = atol_scale * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _check_against_ref(backend, device, T, H, V, dtype, temperature, bias, mask, entropy_grad):
    hidden, weight, b, targets, loss_mask = _inputs(T, H, V, dtype, bias, mask, device)
    out = _run(fused_logprobs, hidden, weight, b, targets, loss_mask, temperature, entropy_grad,
               entropy_grad=entropy_grad, backend=backend)
    ref = _run(logprobs_ref, hidden, weight, b, targets, loss_mask, temperature, entropy_grad)
    tol = TOL[dtype]
    _assert_close_named(out[0], ref[0], "logprobs", tol["rtol"], tol["rtol"])
    _assert_close_named(out[1], ref[1], "entropy", tol["rtol"], tol["rtol"])
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    if mask:
        dead = targets == -100
        dead |= ~loss_mask
        assert (out[0][dead] == 0).all() and (out[1][dead] == 0).all(), "masked tokens must give 0"
        assert (out[2]["hidden"][dead] == 0).all(), "masked tokens must get zero grad"
    for name in ref[2]:
        _assert_close_named(out[2][name], ref[2][name], f"grad {name}", tol["rtol"], tol["grad"])


# ----------------------------------------------------------------------------------------------- Triton path
@needs_triton
@pytest.mark.parametrize("case", LADDER, ids=[c[0] for c in LADDER])
def test_triton_matches_ref(case):
    _check_against_ref("triton", TRITON_DEVICE, *case[1:])


@needs_triton
def test_triton_qwen_vocab_tiny_hidden():
    # V = 151,936 is not a multiple of any block size; the vocab is split across programs.
    _check_against_ref("triton", TRITON_DEVICE, 3, 16, 151_936, torch.float32, 1.0, True, False, True)


@needs_triton
def test_triton_multi_chunk_backward(monkeypatch):
    # Force several backward chunks (min 128 tokens each) so chunked grad accumulation is exercised.
    monkeypatch.setattr(logprobs_mod, "GPU_CHUNK_BYTES", 1)
    _check_against_ref("triton", TRITON_DEVICE, 150, 16, 300, torch.float32, 1.0, True, True, True)


@needs_triton
def test_triton_weight_frozen_and_detached_entropy():
    _check_frozen_weight("triton", TRITON_DEVICE)


# ------------------------------------------------------------------------------------------ chunked torch path
@pytest.mark.parametrize("case", LADDER, ids=[c[0] for c in LADDER])
def test_torch_matches_ref(case):
    _check_against_ref("torch", "cpu", *case[1:])


def test_torch_qwen_vocab_tiny_hidden():
    _check_against_ref("torch", "cpu", 3, 16, 151_936, torch.float32, 1.0, True, False, True)


def _small_tiles(monkeypatch, tokens=16, block=300):
    """Shrink the vocab tiling to [tokens, block] tiles so that small shapes span several chunks and blocks."""
    monkeypatch.setattr(logprobs_torch, "TOKEN_CHUNK_MAX", tokens)
    monkeypatch.setattr(logprobs_torch, "VOCAB_BLOCK_MIN", block)
    monkeypatch.setattr(logprobs_torch, "TILE_BYTES", 4 * tokens * block)


def test_torch_multi_chunk(monkeypatch):
    # 16-token chunks over T=63: the last chunk is ragged; V=1000 fits one block.
    monkeypatch.setattr(logprobs_torch, "TOKEN_CHUNK_MAX", 16)
    assert logprobs_torch.vocab_tiles(63, 1000) == (16, 1000)
    _check_against_ref("torch", "cpu", 63, 48, 1000, torch.float32, 0.7, True, True, True)


@pytest.mark.parametrize("entropy_grad", [False, True], ids=["logp-grad", "entropy-grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_several_chunks_and_vocab_blocks(monkeypatch, entropy_grad, dtype):
    # T=50 in 16-token chunks (ragged 2-token tail) x V=1000 in 300-row blocks (ragged 100-row tail): the online
    # statistics are merged across blocks, targets are picked block-locally, grad_W blocks are first written then
    # accumulated over token chunks; bias and temperature != 1 go through the GEMM operands.
    _small_tiles(monkeypatch)
    T, V = 50, 1000
    tokens, block = logprobs_torch.vocab_tiles(T, V)
    assert (tokens, block) == (16, 300) and T % tokens and V % block
    _check_against_ref("torch", "cpu", T, 24, V, dtype, 0.7, True, True, entropy_grad)


def test_torch_vocab_blocks_max_moves_late(monkeypatch):
    # Logits grow block after block (the running max is replaced at every merge) and one late block holds a
    # dominant row: a wrong rescaling of the running sums would show in lse and entropy.
    _small_tiles(monkeypatch, tokens=8, block=64)
    T, H, V = 20, 16, 333
    hidden, weight, b, targets, loss_mask = _inputs(T, H, V, torch.float32, True, False, "cpu")
    with torch.no_grad():
        weight.mul_(torch.linspace(0.2, 3.0, V)[:, None])
        weight[250] *= 6.0
    out = _run(fused_logprobs, hidden, weight, b, targets, loss_mask, 1.3, True, entropy_grad=True, backend="torch")
    ref = _run(logprobs_ref, hidden, weight, b, targets, loss_mask, 1.3, True)
    _assert_close_named(out[0], ref[0], "logprobs", 1e-5, 1e-5)
    _assert_close_named(out[1], ref[1], "entropy", 1e-5, 1e-5)
    for name in ref[2]:
        _assert_close_named(out[2][name], ref[2][name], f"grad {name}", 1e-5, 2e-5)


def test_torch_vocab_blocks_without_entropy(monkeypatch):
    # compute_entropy=False takes the one-tile path (exp in place); log-probs and grads still match the reference.
    _small_tiles(monkeypatch)
    hidden, weight, b, targets, loss_mask = _inputs(40, 16, 700, torch.float32, True, True, "cpu")
    out = _run(fused_logprobs, hidden, weight, b, targets, loss_mask, 0.8, False, compute_entropy=False,
               backend="torch")
    ref = _run(logprobs_ref, hidden, weight, b, targets, loss_mask, 0.8, False)
    assert (out[1] == 0).all()
    _assert_close_named(out[0], ref[0], "logprobs", 1e-5, 1e-5)
    for name in ref[2]:
        _assert_close_named(out[2][name], ref[2][name], f"grad {name}", 1e-5, 2e-5)


def test_vocab_tiles_budget():
    lt = logprobs_torch
    # The CPU benchmark shape: all tokens in one chunk, vocab blocks sized to the tile budget.
    tokens, block = lt.vocab_tiles(4096, 151_936)
    assert tokens == 4096 and block >= lt.VOCAB_BLOCK_MIN and tokens * block * 4 <= lt.TILE_BYTES
    # Many tokens: the chunk is capped; the block never drops below VOCAB_BLOCK_MIN.
    tokens, block = lt.vocab_tiles(10**6, 151_936)
    assert tokens <= lt.TOKEN_CHUNK_MAX and block >= lt.VOCAB_BLOCK_MIN and tokens * block * 4 <= lt.TILE_BYTES
    # Small vocab: one block holds it all.
    assert lt.vocab_tiles(10, 300) == (10, 300)


def test_chunked_logprobs_empty_batch_grads_are_zero():
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    lp, _ = logprobs_torch.chunked_logprobs(h, w, torch.zeros(0, dtype=torch.int64))
    (lp.sum() + w.sum() * 0).backward()
    assert (w.grad == 0).all() and h.grad.shape == (0, 8)


def test_torch_weight_frozen_and_detached_entropy():
    _check_frozen_weight("torch", "cpu")


def _check_frozen_weight(backend, device):
    hidden, weight, _, targets, _ = _inputs(20, 16, 301, torch.float32, False, False, device)
    weight.requires_grad_(False)
    logp, ent = fused_logprobs(hidden, weight, targets, backend=backend)
    assert not ent.requires_grad, "entropy must be detached without entropy_grad"
    logp.sum().backward()
    assert weight.grad is None
    ref_h = hidden.detach().clone().requires_grad_()
    logprobs_ref(ref_h, weight, targets)[0].sum().backward()
    _assert_close_named(hidden.grad, ref_h.grad, "grad hidden", 1e-5, 2e-5)
    _, ent_off = fused_logprobs(hidden, weight, targets, compute_entropy=False, backend=backend)
    assert (ent_off == 0).all(), "compute_entropy=False gives zeros"


def test_interpreter_subprocess():
    """Run this file's Triton tests in a fresh process with TRITON_INTERPRET=1 (when they could not run here)."""
    if TRITON_DEVICE is not None:
        pytest.skip("Triton tests already ran in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-k", "test_triton_", "-p", "no:cacheprovider", "-rs"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    n_triton = len(LADDER) + 3
    assert f"{n_triton} passed" in proc.stdout and "skipped" not in proc.stdout, tail


# --------------------------------------------------------------------------------------------- references
def test_ref_gradcheck_fp64():
    g = torch.Generator().manual_seed(0)
    T, H, V = 5, 4, 7
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, -100, 3, 2])
    mask = torch.tensor([True, True, True, False, True])

    def f(h, w, b):
        lp, ent = logprobs_ref(h, w, targets, temperature=0.8, bias=b, loss_mask=mask)
        return lp, ent

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_ref_known_values():
    # Uniform logits: logp = -log V, entropy = log V.
    V = 10
    lp, ent = logprobs_ref(torch.zeros(2, 3), torch.zeros(V, 3), torch.tensor([1, 4]))
    torch.testing.assert_close(lp, torch.full((2,), -torch.log(torch.tensor(float(V))).item()))
    torch.testing.assert_close(ent, torch.full((2,), torch.log(torch.tensor(float(V))).item()))


# ------------------------------------------------------------------------------------------------ bad input
def _good():
    return torch.randn(4, 8), torch.randn(11, 8), torch.tensor([0, 3, -100, 10])


@pytest.mark.parametrize(
    "mutate, word",
    [
        (lambda h, w, y: (torch.randn(8, 4).t(), w, y), "hidden"),
        (lambda h, w, y: (h, w.double(), y), "weight"),
        (lambda h, w, y: (h, torch.randn(11, 7), y), "disagree on H"),
        (lambda h, w, y: (h, w, y.int()), "targets"),
        (lambda h, w, y: (h, w, torch.tensor([0, 3, 11, 1])), "targets"),
        (lambda h, w, y: (h, w, torch.tensor([0, 3, -5, 1])), "targets"),
        (lambda h, w, y: (h, w, y[:3]), "targets"),
        (lambda h, w, y: (h[0], w, y), "hidden"),
        (lambda h, w, y: (h, w.to("meta"), y), "weight is on meta, hidden on cpu"),
    ],
    ids=["non-contiguous", "dtype", "H-mismatch", "int32-targets", "target-too-big", "target-negative",
         "targets-shape", "hidden-1d", "weight-on-other-device"],
)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bad_inputs_raise(mutate, word, backend):
    h, w, y = mutate(*_good())
    with pytest.raises(ValueError, match=word):
        fused_logprobs(h, w, y, backend=backend)


def test_bad_options_raise():
    h, w, y = _good()
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        fused_logprobs(h, w, y, backend="cuda")
    with pytest.raises(ValueError, match="loss_mask"):
        fused_logprobs(h, w, y, loss_mask=torch.ones(4))
    with pytest.raises(ValueError, match="bias"):
        fused_logprobs(h, w, y, bias=torch.zeros(10))


def test_empty_batch_returns_empty():
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    lp, ent = fused_logprobs(h, w, torch.zeros(0, dtype=torch.int64))
    assert lp.shape == (0,) and ent.shape == (0,) and lp.dtype == torch.float32
    lp.sum().backward()
    assert h.grad is not None and h.grad.shape == (0, 8)
