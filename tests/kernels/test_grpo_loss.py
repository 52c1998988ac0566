"""grpo_loss: Triton kernel (under TRITON_INTERPRET=1) and torch path vs the per-sequence reference loop."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere: lets the kernels run on CPU tensors

import pytest
import torch

from deepeyesv2_kernels.grpo_loss import grpo_loss
from deepeyesv2_kernels.grpo_loss_ref import grpo_loss_ref

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
METRICS = ["clip_frac", "approx_kl", "kl", "entropy", "ratio_mean"]


def make_batch(lens, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    logp = -torch.rand(T, generator=g) * 4
    old = logp + 0.4 * torch.randn(T, generator=g)  # wide enough that both clip sides trigger
    adv = torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) > 0.25
    ref = logp + 0.5 * torch.randn(T, generator=g)
    ent = torch.rand(T, generator=g) * 3
    # prompt/tool tokens (mask False) with values whose exp() overflows: must not leak NaN into loss or grads
    ref = torch.where(mask, ref, logp + 200.0)
    return dict(logprobs=logp.to(dtype), old_logprobs=old.to(dtype), advantages=adv.to(dtype), loss_mask=mask,
                cu_seqlens=cu, ref_logprobs=ref.to(dtype), entropy=ent.to(dtype))


def run(fn, batch, **kw):
    logp = batch["logprobs"].clone().requires_grad_()
    ent = batch["entropy"].clone().requires_grad_()
    args = {**batch, "logprobs": logp, "entropy": ent}
    loss, metrics = fn(**args, **kw)
    loss.backward()
    # no entropy term in the loss -> autograd leaves .grad None; the kernel returns zeros
    ent_grad = torch.zeros_like(ent) if ent.grad is None else ent.grad
    return loss.detach(), metrics, logp.grad, ent_grad


def assert_match(got, want, atol, rtol):
    names = ["loss", "metrics", "grad logprobs", "grad entropy"]
    for name, a, b in zip(names, got, want):
        if name == "metrics":
            for k in METRICS:
                torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"metric {k}: {m}")
        else:
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


LENS = [[1], [37], [5, 0, 17, 1, 14, 3]]
OPTIONS = [
    dict(),  # ref_logprobs given, kl_coef 0: kl reported as a metric, not in the loss
    dict(dual_clip=3.0, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01),
    dict(kl_coef=0.1, kl_estimator="k1", clip_low=0.1, clip_high=0.1),
    dict(kl_coef=0.1, kl_estimator="k2", entropy_coef=-0.02, num_tokens=50.0),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("lens", LENS, ids=lambda x: f"lens{len(x)}")
@pytest.mark.parametrize("opts", OPTIONS, ids=range(len(OPTIONS)))
def test_matches_reference_fp32(backend, agg, lens, opts):
    batch = make_batch(lens, seed=len(lens) + len(opts))
    got = run(grpo_loss, batch, loss_agg=agg, backend=backend, **opts)
    want = run(grpo_loss_ref, batch, loss_agg=agg, **opts)
    assert_match(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("agg", AGGS)
def test_bf16_inputs(agg):
    batch = make_batch([9, 30, 2], seed=3, dtype=torch.bfloat16)
    opts = dict(kl_coef=0.05, dual_clip=2.5, entropy_coef=0.01)
    got = run(grpo_loss, batch, loss_agg=agg, backend="triton", **opts)
    want = run(grpo_loss_ref, {k: v.float() if v.is_floating_point() else v for k, v in batch.items()},
               loss_agg=agg, **opts)
    assert got[2].dtype == torch.bfloat16
    assert_match(got, want, atol=1e-2, rtol=1e-2)


def test_independent_scalar_loop():
    # a token-by-token python loop, written without the reference's helpers
    batch = make_batch([4, 7, 2], seed=11)
    b = {k: v.tolist() for k, v in batch.items()}
    cu = b["cu_seqlens"]
    per_seq = []
    for s in range(len(cu) - 1):
        tot, n = 0.0, 0
        for t in range(cu[s], cu[s + 1]):
            if not b["loss_mask"][t]:
                continue
            ratio = torch.exp(torch.tensor(b["logprobs"][t] - b["old_logprobs"][t]).clamp(-20, 20)).item()
            a = b["advantages"][t]
            tot += max(-a * ratio, -a * min(max(ratio, 0.8), 1.28))
            n += 1
        if n:
            per_seq.append(tot / n)
    loss, _ = grpo_loss(batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["loss_mask"],
                        batch["cu_seqlens"], loss_agg="seq-mean-token-mean", backend="triton")
    assert loss.item() == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_on_policy_ratio_is_exactly_one(backend):
    batch = make_batch([6, 13, 1], seed=5)
    logp = batch["logprobs"].clone().requires_grad_()
    loss, m = grpo_loss(logp, batch["logprobs"].clone(), batch["advantages"], batch["loss_mask"],
                        batch["cu_seqlens"], backend=backend)
    loss.backward()
    mask, adv = batch["loss_mask"], batch["advantages"]
    n = mask.sum()
    assert m["ratio_mean"].item() == 1.0
    assert m["clip_frac"].item() == 0.0 and m["approx_kl"].item() == 0.0
    torch.testing.assert_close(loss, -(adv * mask).sum() / n)
    torch.testing.assert_close(logp.grad, torch.where(mask, -adv / n, 0.0))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_kl_reported_but_not_in_loss_when_coef_zero(backend):
    batch = make_batch([8, 5], seed=9)
    loss_ref, m = grpo_loss(**batch, kl_coef=0.0, backend=backend)
    no_ref = {k: v for k, v in batch.items() if k != "ref_logprobs"}
    loss_none, m_none = grpo_loss(**no_ref, backend=backend)
    assert m["kl"].item() > 0 and m_none["kl"].item() == 0.0
    assert loss_ref.item() == loss_none.item()


def test_num_tokens_accumulates_micro_batches():
    # two micro-batches normalised by the global count == one batch with token-mean
    a, b = make_batch([5, 9], seed=1), make_batch([12, 3], seed=2)
    n = float(a["loss_mask"].sum() + b["loss_mask"].sum())
    la, _ = grpo_loss(**{k: v for k, v in a.items() if k not in ("ref_logprobs", "entropy")}, num_tokens=n,
                      backend="triton")
    lb, _ = grpo_loss(**{k: v for k, v in b.items() if k not in ("ref_logprobs", "entropy")}, num_tokens=n,
                      backend="triton")
    cat = {k: torch.cat([a[k], b[k]]) for k in ("logprobs", "old_logprobs", "advantages", "loss_mask")}
    cat["cu_seqlens"] = torch.tensor([0, 5, 14, 26, 29], dtype=torch.int32)
    lab, _ = grpo_loss(**cat, backend="triton")
    torch.testing.assert_close(la + lb, lab)


def test_no_masked_tokens_gives_zero_loss_and_grad():
    batch = make_batch([3, 4], seed=0)
    batch["loss_mask"] = torch.zeros(7, dtype=torch.bool)
    for agg in AGGS:
        loss, m, g, _ = run(grpo_loss, batch, loss_agg=agg, backend="triton")
        assert loss.item() == 0.0 and (g == 0).all() and m["ratio_mean"].item() == 0.0


def test_reference_gradcheck_float64():
    batch = make_batch([3, 5, 2], seed=7)
    b = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    for agg in AGGS:
        def f(logp, ent):
            return grpo_loss_ref(logp, b["old_logprobs"], b["advantages"], b["loss_mask"], b["cu_seqlens"],
                                 ref_logprobs=b["ref_logprobs"], kl_coef=0.1, dual_clip=3.0, loss_agg=agg,
                                 entropy=ent, entropy_coef=0.01)[0]
        assert torch.autograd.gradcheck(f, (b["logprobs"].clone().requires_grad_(),
                                            b["entropy"].clone().requires_grad_()), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("bad, name", [
    (dict(loss_agg="mean"), "loss_agg"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)), "cu_seqlens"),
    (dict(advantages=torch.zeros(6)), "advantages"),
    (dict(loss_mask=torch.ones(7)), "loss_mask"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(backend="cuda"), "backend"),
    (dict(advantages=torch.zeros(7, device="meta")), "advantages is on meta, logprobs on cpu"),
])
def test_validation_errors(bad, name):
    batch = make_batch([3, 4], seed=0)
    kw = {**batch, **bad}
    with pytest.raises(ValueError, match=name):
        grpo_loss(**kw)
