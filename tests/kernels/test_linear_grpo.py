"""fused_linear_grpo_loss (Triton and chunked torch paths) against the plain-torch reference.

Triton tests (`test_triton_*`) run here only on CUDA or when the kernels were built by the interpreter; otherwise
`test_interpreter_subprocess` reruns them in a fresh TRITON_INTERPRET=1 process (see test_logprobs.py for why).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from deepeyesv2_kernels import logprobs as logprobs_mod
from deepeyesv2_kernels import logprobs_torch
from deepeyesv2_kernels.linear_grpo import fused_linear_grpo_loss
from deepeyesv2_kernels.linear_grpo_ref import fused_linear_grpo_loss_ref
from deepeyesv2_kernels.logprobs import fused_logprobs

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and logprobs_mod.interpreting()
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRETED else None)
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="no CUDA and no interpreter: see test_interpreter_subprocess")

# (name, loss_agg, kl_estimator or None, dual_clip, entropy_coef, num_tokens, temperature)
CASES = [
    ("token-mean-k1", "token-mean", "k1", None, 0.0, None, 1.0),
    ("seq-mean-token-mean-k2-dual", "seq-mean-token-mean", "k2", 3.0, 0.0, None, 0.8),
    ("seq-mean-token-sum-k3-dual-ent", "seq-mean-token-sum", "k3", 2.5, 0.01, None, 1.0),
    ("token-mean-num-tokens-ent-noref", "token-mean", None, None, 0.02, 100.0, 1.1),
]
METRICS = ("clip_frac", "approx_kl", "kl", "entropy", "ratio_mean")


def _batch(device, dtype=torch.float32, T=47, H=32, V=1031, seed=0):
    """Packed batch: 5 sequences (one of length 1, one fully masked), prompt tokens masked, some ignore_index."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    cu = torch.tensor([0, 12, 13, 25, 33, T], dtype=torch.int32)
    targets[cu[1:].long() - 1] = -100  # last token of each sequence has no next token
    mask = torch.rand(T, generator=g) > 0.25
    mask[:3] = False  # prompt
    mask[25:33] = False  # a sequence with no policy tokens
    with torch.no_grad():
        logp = fused_logprobs(hidden.float().detach(), weight.float().detach(), targets, backend="torch")[0]
    # Large enough perturbations that the clip, the dual clip and both signs of A all occur.
    old = logp + 0.4 * torch.randn(T, generator=g)
    ref = logp + 0.3 * torch.randn(T, generator=g)
    adv = torch.randn(T, generator=g) * 1.5
    to = dict(device=device)
    return hidden, weight, targets.to(**to), old.to(**to), adv.to(**to), mask.to(**to), cu.to(**to), ref.to(**to)


def _loss_and_grads(fn, batch, **kw):
    hidden, weight, targets, old, adv, mask, cu, ref = batch
    hidden.grad = weight.grad = None
    loss, metrics = fn(hidden, weight, targets, old, adv, mask, cu, **kw)
    (2.0 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), metrics, hidden.grad.clone(), weight.grad.clone()


def _check_case(backend, device, case, dtype=torch.float32, tol=1e-5):
    _, loss_agg, kl_est, dual_clip, entropy_coef, num_tokens, temperature = case
    batch = _batch(device, dtype)
    kw = dict(loss_agg=loss_agg, dual_clip=dual_clip, entropy_coef=entropy_coef, num_tokens=num_tokens,
              temperature=temperature)
    if kl_est is not None:
        kw.update(ref_logprobs=batch[7], kl_coef=0.05, kl_estimator=kl_est)
    out = _loss_and_grads(lambda *a, **k: fused_linear_grpo_loss(*a, backend=backend, **k), batch, **kw)
    ref = _loss_and_grads(fused_linear_grpo_loss_ref, batch, **kw)
    torch.testing.assert_close(out[0], ref[0].float(), rtol=tol, atol=tol, msg=lambda m: f"loss: {m}")
    for name in METRICS:
        assert not out[1][name].requires_grad, f"metric {name} must be detached"
        torch.testing.assert_close(out[1][name].float(), ref[1][name].float(), rtol=tol, atol=tol,
                                   msg=lambda m, n=name: f"metric {n}: {m}")
    for name, a, b in (("grad hidden", out[2], ref[2]), ("grad weight", out[3], ref[3])):
        atol = 3 * tol * b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=3 * tol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    # The batch must actually exercise clipping (otherwise the clip branch is untested).
    assert 0.0 < out[1]["clip_frac"].item() < 1.0


# ----------------------------------------------------------------------------------------------- Triton path
@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_ref(case):
    _check_case("triton", TRITON_DEVICE, case)


@needs_triton
def test_triton_bf16_loose():
    _check_case("triton", TRITON_DEVICE, CASES[2], dtype=torch.bfloat16, tol=2e-2)


@needs_triton
def test_triton_on_policy_ratio_is_one():
    _check_on_policy("triton", TRITON_DEVICE)


@needs_triton
def test_triton_multi_chunk(monkeypatch):
    monkeypatch.setattr(logprobs_mod, "FUSED_CHUNK_BYTES", 1)  # 128-token chunks
    batch = _batch(TRITON_DEVICE, T=300, H=16, V=257)
    _check_batch_against_ref("triton", batch)


# ------------------------------------------------------------------------------------------ chunked torch path
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_matches_ref(case):
    _check_case("torch", "cpu", case)


def test_torch_bf16_loose():
    _check_case("torch", "cpu", CASES[2], dtype=torch.bfloat16, tol=2e-2)


def test_torch_on_policy_ratio_is_one():
    _check_on_policy("torch", "cpu")


@pytest.mark.parametrize("tokens,block", [(16, 64), (300, 100), (7, 257)])
def test_torch_multi_tile(monkeypatch, tokens, block):
    """Several token chunks and/or vocab blocks, ragged at both ends (T=300, V=257)."""
    monkeypatch.setattr(logprobs_torch, "TOKEN_CHUNK_MAX", tokens)
    monkeypatch.setattr(logprobs_torch, "VOCAB_BLOCK_MIN", block)
    monkeypatch.setattr(logprobs_torch, "TILE_BYTES", 4 * tokens * block)
    assert logprobs_torch.vocab_tiles(300, 257) == (min(tokens, 300), min(block, 257))
    _check_batch_against_ref("torch", _batch("cpu", T=300, H=16, V=257))


def _check_batch_against_ref(backend, batch):
    kw = dict(loss_agg="seq-mean-token-mean", ref_logprobs=batch[7], kl_coef=0.1, entropy_coef=0.01)
    out = _loss_and_grads(lambda *a, **k: fused_linear_grpo_loss(*a, backend=backend, **k), batch, **kw)
    ref = _loss_and_grads(fused_linear_grpo_loss_ref, batch, **kw)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    for name, a, b in (("grad hidden", out[2], ref[2]), ("grad weight", out[3], ref[3])):
        atol = 3e-5 * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=3e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _check_on_policy(backend, device):
    """old_logprobs computed by fused_logprobs on the same weights: the ratio is exactly 1, nothing is clipped."""
    hidden, weight, targets, _, adv, mask, cu, _ = _batch(device)
    with torch.no_grad():
        old, _ = fused_logprobs(hidden, weight, targets, backend=backend)
    loss, metrics = fused_linear_grpo_loss(hidden, weight, targets, old, adv, mask, cu, backend=backend)
    assert metrics["ratio_mean"].item() == 1.0
    assert metrics["clip_frac"].item() == 0.0
    assert metrics["approx_kl"].item() == 0.0
    valid = mask & (targets != -100)
    torch.testing.assert_close(loss, -(adv * valid).sum() / valid.sum(), rtol=1e-6, atol=1e-6)


@needs_triton
def test_triton_enclosing_autocast_changes_nothing():
    _check_enclosing_autocast("triton")


def test_torch_enclosing_autocast_changes_nothing():
    _check_enclosing_autocast("torch")


def _check_enclosing_autocast(backend):
    """A trainer's bf16 autocast around the call must not re-type the kernels' own matmuls (fp32 accumulators
    updated in place): the loss, the log-probs and both gradients are bit-identical with and without it."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    batch = _batch(device)
    kw = dict(ref_logprobs=batch[7], kl_coef=0.1, entropy_coef=0.01)
    fn = lambda *a, **k: fused_linear_grpo_loss(*a, backend=backend, **k)  # noqa: E731
    plain = _loss_and_grads(fn, batch, **kw)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        auto = _loss_and_grads(fn, batch, **kw)
    for a, b in zip((plain[0], plain[2], plain[3]), (auto[0], auto[2], auto[3])):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    hidden, weight, targets = batch[:3]
    with torch.no_grad():
        lp = fused_logprobs(hidden, weight, targets, backend=backend)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            lp_auto = fused_logprobs(hidden, weight, targets, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(lp, lp_auto))
    hidden.grad = None
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        logp, _ = fused_logprobs(hidden, weight, targets, backend=backend)
    logp.sum().backward()  # the backward too (called outside the region here, inside by some trainers)
    g_auto = hidden.grad.clone()
    hidden.grad = None
    fused_logprobs(hidden, weight, targets, backend=backend)[0].sum().backward()
    assert torch.equal(hidden.grad, g_auto)


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
    assert f"{len(CASES) + 4} passed" in proc.stdout and "skipped" not in proc.stdout, tail


# --------------------------------------------------------------------------------------------- references
def test_ref_gradcheck_fp64():
    T, H, V = 6, 3, 5
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 2, 0, 4, 3, -100])
    old = torch.randn(T, generator=g, dtype=torch.float64) - 2
    ref = torch.randn(T, generator=g, dtype=torch.float64) - 2
    adv = torch.randn(T, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, True, True])
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)

    def f(h, w):
        return fused_linear_grpo_loss_ref(h, w, targets, old, adv, mask, cu, ref_logprobs=ref, kl_coef=0.1,
                                          loss_agg="seq-mean-token-mean", entropy_coef=0.01, clip_low=0.5,
                                          clip_high=5.0)[0]

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_ref_known_value_on_policy():
    # Uniform logits and old == new: ratio 1, loss = -mean(A) over masked tokens, entropy = log V.
    T, V = 4, 8
    adv = torch.tensor([1.0, -2.0, 3.0, 0.5])
    mask = torch.tensor([True, True, False, True])
    old = torch.full((T,), -torch.log(torch.tensor(float(V))).item())
    loss, m = fused_linear_grpo_loss_ref(torch.zeros(T, 2), torch.zeros(V, 2), torch.zeros(T, dtype=torch.long),
                                         old, adv, mask, torch.tensor([0, T], dtype=torch.int32))
    torch.testing.assert_close(loss, torch.tensor(-(1.0 - 2.0 + 0.5) / 3))
    torch.testing.assert_close(m["entropy"], torch.log(torch.tensor(float(V))))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "override, word",
    [
        (dict(loss_agg="mean"), "loss_agg"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(cu_seqlens=torch.tensor([0, 5, 40], dtype=torch.int32)), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 30, 20, 47], dtype=torch.int32)), "cu_seqlens"),
        (dict(old_logprobs=torch.zeros(46)), "old_logprobs"),
        (dict(advantages=torch.zeros(47, dtype=torch.long)), "advantages"),
        (dict(loss_mask=torch.ones(47)), "loss_mask"),
        (dict(ref_logprobs=torch.zeros(3)), "ref_logprobs"),
        (dict(num_tokens=0.0), "num_tokens"),
    ],
)
def test_bad_inputs_raise(override, word):
    hidden, weight, targets, old, adv, mask, cu, _ = _batch("cpu")
    args = dict(hidden=hidden, weight=weight, targets=targets, old_logprobs=old, advantages=adv, loss_mask=mask,
                cu_seqlens=cu)
    args.update(override)
    with pytest.raises(ValueError, match=word):
        fused_linear_grpo_loss(**args)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bias_and_temperature_gradients(backend, monkeypatch):
    """An lm-head bias (with temperature, over several vocab tiles on the torch path): loss and the hidden, weight
    and bias gradients match the reference."""
    monkeypatch.setattr(logprobs_torch, "TOKEN_CHUNK_MAX", 32)
    monkeypatch.setattr(logprobs_torch, "VOCAB_BLOCK_MIN", 200)
    monkeypatch.setattr(logprobs_torch, "TILE_BYTES", 4 * 32 * 200)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    hidden, weight, targets, old, adv, mask, cu, ref = _batch(device)
    bias = (torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(5)) * 0.5).to(device).requires_grad_()
    kw = dict(ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01, temperature=0.7, bias=bias)
    out = {}
    for name, fn in (("ours", lambda *a, **k: fused_linear_grpo_loss(*a, backend=backend, **k)),
                     ("ref", fused_linear_grpo_loss_ref)):
        hidden.grad = weight.grad = bias.grad = None
        loss, _ = fn(hidden, weight, targets, old, adv, mask, cu, **kw)
        loss.backward()
        out[name] = (loss.detach(), hidden.grad.clone(), weight.grad.clone(), bias.grad.clone())
    for label, a, b in zip(("loss", "grad hidden", "grad weight", "grad bias"), out["ours"], out["ref"]):
        torch.testing.assert_close(a, b, rtol=3e-5, atol=3e-5 * max(1.0, b.abs().max().item()),
                                   msg=lambda m, n=label: f"{n}: {m}")
    assert out["ours"][3].abs().sum() > 0
