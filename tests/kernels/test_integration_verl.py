"""deepeyesv2_kernels.integrations.verl against verl's published torch formulas, re-derived here.

verl is not installable here (GPU-only deps), so its reference is written out independently from
``verl/utils/experimental/torch_functional.py`` (FusedLinearForPPO): logits = hidden @ W.T / temperature in fp32,
log_probs = log_softmax(logits).gather(labels), entropy = logsumexp(logits) - sum(softmax(logits) * logits); the
gradients are autograd's through those formulas. The monkey patch is checked on stand-in verl modules.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from deepeyesv2_kernels.integrations import verl as integ


def verl_reference(hidden, weight, labels, temperature):
    """verl's torch-backend formulas (fp32 logits), per token, shaped like labels."""
    logits = (hidden.float() @ weight.float().t()) / temperature
    log_probs = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
    return log_probs, entropy


def _inputs(shape, H, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, shape, generator=g)
    return hidden, weight, labels


@pytest.mark.parametrize("shape", [(3, 37), (1, 63), (41,)], ids=["B3xL37", "packed1x63", "T41"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_cross_entropy_matches_verl_formulas(shape, temperature):
    H, V = 24, 1031
    hidden, weight, labels = _inputs(shape, H, V)
    logp, ent = integ.linear_cross_entropy(hidden, weight, labels, temperature, "none")
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp_ref, ent_ref = verl_reference(h_ref, w_ref, labels, temperature)
    assert logp.shape == labels.shape and ent.shape == labels.shape, "outputs must be shaped like labels"
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(logp, logp_ref, rtol=1e-5, atol=1e-5, msg="log_probs")
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-5, msg="entropy")
    # A loss using both outputs, like verl's policy loss with an entropy bonus.
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    ((logp * w_lp).sum() - 0.01 * (ent * w_ent).sum()).backward()
    ((logp_ref * w_lp).sum() - 0.01 * (ent_ref * w_ent).sum()).backward()
    assert hidden.grad.shape == hidden.shape
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-4, atol=1e-5, msg="d hidden")
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-4, atol=1e-5, msg="d weight")


def test_fused_linear_for_ppo_module_signature_and_values():
    hidden, weight, labels = _inputs((2, 19), 16, 517)
    module = integ.FusedLinearForPPO(chunk_size=8)
    logp, ent = module.forward(hidden_states=hidden, vocab_weights=weight, input_ids=labels, temperature=0.5)
    logp_ref, ent_ref = verl_reference(hidden.detach(), weight.detach(), labels, 0.5)
    torch.testing.assert_close(logp, logp_ref, rtol=1e-5, atol=1e-5, msg="log_probs")
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-5, msg="entropy")


def test_bf16_hidden_is_cast_to_weight_dtype_like_verl():
    hidden, weight, labels = _inputs((2, 11), 16, 257)
    logp, _ = integ.linear_cross_entropy(hidden.detach().bfloat16(), weight.detach(), labels, 1.0)
    logp_ref, _ = verl_reference(hidden.detach().bfloat16().float(), weight.detach(), labels, 1.0)
    torch.testing.assert_close(logp, logp_ref, rtol=1e-5, atol=1e-5, msg="log_probs from bf16 hidden")


def test_tensor_temperature_and_ignore_index():
    hidden, weight, labels = _inputs((1, 9), 8, 101)
    labels = labels.clone()
    labels[0, 4] = -100
    logp, ent = integ.linear_cross_entropy(hidden.detach(), weight.detach(), labels, torch.tensor(0.8))
    assert logp[0, 4].item() == 0.0 and ent[0, 4].item() == 0.0, "ignored label must give 0"
    keep = labels != -100
    logp_ref, ent_ref = verl_reference(hidden.detach()[keep], weight.detach(), labels[keep], 0.8)
    torch.testing.assert_close(logp[keep], logp_ref, rtol=1e-5, atol=1e-5, msg="log_probs")
    torch.testing.assert_close(ent[keep], ent_ref, rtol=1e-5, atol=1e-5, msg="entropy")


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(reduction="mean"), "reduction"), (dict(dist_process_group=object()), "dist_process_group"),
     (dict(temperature=torch.ones(3)), "temperature")],
)
def test_bad_arguments_raise(kwargs, match):
    hidden, weight, labels = _inputs((1, 5), 8, 33)
    with pytest.raises(ValueError, match=match):
        integ.linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_label_shape_mismatch_raises():
    hidden, weight, labels = _inputs((2, 5), 8, 33)
    with pytest.raises(ValueError, match="labels"):
        integ.linear_cross_entropy(hidden, weight, labels[:, :4])


@pytest.fixture
def fake_verl(monkeypatch):
    """Stand-in verl modules holding the two attributes verl's fused forwards import at call time."""
    sentinel_lce, sentinel_cls = object(), object()
    names = ["verl", "verl.utils", "verl.utils.kernel", "verl.utils.kernel.linear_cross_entropy",
             "verl.utils.experimental", "verl.utils.experimental.torch_functional"]
    mods = {n: types.ModuleType(n) for n in names}
    mods["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy = sentinel_lce
    mods["verl.utils.kernel"].linear_cross_entropy = sentinel_lce
    mods["verl.utils.experimental.torch_functional"].FusedLinearForPPO = sentinel_cls
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    return mods


def test_patch_verl_replaces_both_backends(fake_verl):
    patched = integ.patch_verl()
    assert fake_verl["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy is integ.linear_cross_entropy
    assert fake_verl["verl.utils.kernel"].linear_cross_entropy is integ.linear_cross_entropy
    assert fake_verl["verl.utils.experimental.torch_functional"].FusedLinearForPPO is integ.FusedLinearForPPO
    assert len(patched) == 3
    # What verl's forward_with_triton_backend does at call time now resolves to ours.
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy  # noqa: PLC0415

    assert linear_cross_entropy is integ.linear_cross_entropy


def test_patch_verl_fails_loudly_when_entry_point_moved(fake_verl):
    del fake_verl["verl.utils.experimental.torch_functional"].FusedLinearForPPO
    with pytest.raises(RuntimeError, match="FusedLinearForPPO"):
        integ.patch_verl()
    # Nothing half-patched.
    assert fake_verl["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy is not integ.linear_cross_entropy
