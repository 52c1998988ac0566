"""apply_mrope: reference vs transformers' Qwen2.5-VL rotary code; Triton kernel (TRITON_INTERPRET=1) vs reference."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere: lets the kernels run on CPU tensors

import pytest
import torch
from transformers import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

from deepeyesv2_kernels.mrope import apply_mrope
from deepeyesv2_kernels.mrope_ref import apply_mrope_ref

CASES = [  # (T, Hq, Hk, D, mrope_section)
    (1, 4, 2, 16, [2, 3, 3]),
    (37, 5, 1, 16, [2, 3, 3]),
    (23, 4, 2, 128, [16, 24, 24]),  # Qwen2.5-VL-7B head
    (9, 3, 3, 24, [4, 2, 2, 4]),  # > 3 chunks: rows cycle t, h, w, t
]


def hf_rotary(D, section, theta=10000.0):
    cfg = Qwen2_5_VLTextConfig(hidden_size=D * 2, num_attention_heads=2,
                               rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section})
    return hf.Qwen2_5_VLRotaryEmbedding(cfg)


def packed_positions(T, seed):
    # packed sequences: positions restart per sequence; image-like stretches with distinct t/h/w rows
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.arange(T) % 11, (torch.arange(T) // 3) % 11, torch.arange(T) % 4])
    return pos + torch.randint(0, 3000, (1, T), generator=g)  # large positions: angle accuracy matters


def make(T, Hq, Hk, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, Hq, D, generator=g).to(dtype)
    k = torch.randn(T, Hk, D, generator=g).to(dtype)
    return q, k, packed_positions(T, seed)


@pytest.mark.parametrize("T, Hq, Hk, D, section", CASES)
def test_reference_is_transformers(T, Hq, Hk, D, section):
    rot = hf_rotary(D, section)
    q, k, pos = make(T, Hq, Hk, D)
    cos, sin = rot(q[None], pos[:, None, :])  # [1, T, D]
    # transformers' attention layout is [B, H, T, D]
    q_hf, k_hf = hf.apply_rotary_pos_emb(q[None].transpose(1, 2), k[None].transpose(1, 2), cos, sin)
    q_ref, k_ref = apply_mrope_ref(q, k, pos, rot.inv_freq, section)
    torch.testing.assert_close(q_ref, q_hf[0].transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(k_ref, k_hf[0].transpose(0, 1), atol=0, rtol=0)


def fwd_bwd(fn, q, k, pos, inv_freq, section, gq, gk, **kw):
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = fn(q, k, pos, inv_freq, section, **kw)
    ((qo.float() * gq).sum() + (ko.float() * gk).sum()).backward()
    return qo.detach(), ko.detach(), q.grad, k.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("T, Hq, Hk, D, section", CASES)
def test_kernel_matches_reference_fp32(backend, T, Hq, Hk, D, section):
    rot = hf_rotary(D, section)
    q, k, pos = make(T, Hq, Hk, D, seed=T)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    got = fwd_bwd(apply_mrope, q, k, pos, rot.inv_freq, section, gq, gk, backend=backend)
    want = fwd_bwd(apply_mrope_ref, q, k, pos, rot.inv_freq, section, gq, gk)
    for name, a, b in zip(["q_out", "k_out", "grad q", "grad k"], got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_kernel_bf16():
    T, Hq, Hk, D, section = 37, 4, 2, 128, [16, 24, 24]
    rot = hf_rotary(D, section)
    q, k, pos = make(T, Hq, Hk, D, seed=1, dtype=torch.bfloat16)
    gq, gk = torch.randn(q.shape), torch.randn(k.shape)
    got = fwd_bwd(apply_mrope, q, k, pos, rot.inv_freq, section, gq, gk, backend="triton")
    want = fwd_bwd(apply_mrope_ref, q.float(), k.float(), pos, rot.inv_freq, section, gq, gk)
    for name, a, b in zip(["q_out", "k_out", "grad q", "grad k"], got, want):
        assert a.dtype == torch.bfloat16, name
        torch.testing.assert_close(a.float(), b, atol=3e-2, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strided_inputs_and_inplace(backend):
    # q/k as views of a fused qkv projection [T, (Hq + 2 Hk) * D] (strided heads), then in place
    T, Hq, Hk, D, section = 13, 4, 2, 16, [2, 3, 3]
    rot = hf_rotary(D, section)
    qkv = torch.randn(T, (Hq + 2 * Hk) * D)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hk) * D].view(T, Hk, D)
    pos = packed_positions(T, 0)
    q_ref, k_ref = apply_mrope_ref(q, k, pos, rot.inv_freq, section)
    q_out, k_out = apply_mrope(q, k, pos, rot.inv_freq, section, backend=backend)
    torch.testing.assert_close(q_out, q_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_ref, atol=2e-5, rtol=1e-5)
    v_before = qkv[:, (Hq + Hk) * D:].clone()
    q_in, k_in = apply_mrope(q, k, pos, rot.inv_freq, section, inplace=True, backend=backend)
    assert q_in.data_ptr() == q.data_ptr() and k_in.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, q_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(qkv[:, (Hq + Hk) * D:], v_before), "in-place rotation wrote outside q/k"


def test_inplace_backward():
    T, Hq, Hk, D, section = 11, 2, 1, 16, [2, 3, 3]
    rot = hf_rotary(D, section)
    q0, k0, pos = make(T, Hq, Hk, D, seed=2)
    gq, gk = torch.randn_like(q0), torch.randn_like(k0)
    leaf_q, leaf_k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    qo, ko = apply_mrope(leaf_q * 1.0, leaf_k * 1.0, pos, rot.inv_freq, section, inplace=True, backend="triton")
    ((qo * gq).sum() + (ko * gk).sum()).backward()
    want = fwd_bwd(apply_mrope_ref, q0, k0, pos, rot.inv_freq, section, gq, gk)
    torch.testing.assert_close(leaf_q.grad, want[2], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(leaf_k.grad, want[3], atol=2e-5, rtol=1e-5)


def test_reference_gradcheck_float64():
    T, Hq, Hk, D, section = 5, 2, 1, 16, [2, 3, 3]
    rot = hf_rotary(D, section)
    q, k, pos = make(T, Hq, Hk, D, seed=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: apply_mrope_ref(a, b, pos, rot.inv_freq.double(), section),
        (q.requires_grad_(), k.requires_grad_()))


@pytest.mark.parametrize("change, name", [
    (dict(position_ids=torch.zeros(2, 7, dtype=torch.long)), "position_ids"),
    (dict(inv_freq=torch.ones(7)), "inv_freq"),
    (dict(mrope_section=[2, 3, 2]), "mrope_section"),
    (dict(k=torch.randn(7, 2, 8)), "k"),
    (dict(backend="xla"), "backend"),
    (dict(position_ids=torch.zeros(3, 7, dtype=torch.long, device="meta")), "position_ids is on meta"),
])
def test_validation_errors(change, name):
    args = dict(q=torch.randn(7, 4, 16), k=torch.randn(7, 2, 16), position_ids=torch.zeros(3, 7, dtype=torch.long),
                inv_freq=torch.ones(8), mrope_section=[2, 3, 3])
    with pytest.raises(ValueError, match=name):
        apply_mrope(**{**args, **change})
