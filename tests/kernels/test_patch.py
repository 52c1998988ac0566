"""patch_qwen2_5_vl on a tiny Qwen2.5-VL: patched outputs (M-RoPE kernel, fused log-probs) == unpatched ones."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere: the patched model runs the kernels on CPU

import pytest
import torch
import transformers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from deepeyesv2_kernels.patch import MRopePositions, check_transformers_version, patch_qwen2_5_vl


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()


def packed_inputs(T=29, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (B, T), generator=g)
    targets = torch.randint(0, 512, (B, T), generator=g)
    t = torch.arange(T)
    # distinct t/h/w rows so that every mrope section sees different angles
    pos = torch.stack([t, t // 2, t % 5])[:, None, :].expand(3, B, T)
    return ids, targets, pos


def logits_logprobs(model, ids, pos, targets):
    out = model(input_ids=ids, position_ids=pos, output_hidden_states=True)
    logp_all = torch.log_softmax(out.logits.float(), -1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return out.hidden_states[-1], logp, ent


@pytest.mark.parametrize("B", [1, 2])
def test_patched_model_matches_unpatched(B):
    model = tiny_model()
    ids, targets, pos = packed_inputs(B=B)
    hidden, logp, ent = logits_logprobs(model, ids, pos, targets)
    logp.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    patch_qwen2_5_vl(model, logprobs=True, mrope=True)
    assert isinstance(model.model.language_model.rotary_emb(ids, pos), MRopePositions)
    hidden_p, logp_l, _ = logits_logprobs(model, ids, pos, targets)  # logits path still works after patching
    torch.testing.assert_close(hidden_p, hidden, atol=2e-6, rtol=1e-5, msg=lambda m: f"hidden states: {m}")
    torch.testing.assert_close(logp_l, logp, atol=5e-6, rtol=1e-5)

    logp_p, ent_p = model.forward_logprobs(targets, input_ids=ids, position_ids=pos)
    assert logp_p.shape == targets.shape and logp_p.dtype == torch.float32
    torch.testing.assert_close(logp_p, logp, atol=5e-6, rtol=1e-5, msg=lambda m: f"logprobs: {m}")
    torch.testing.assert_close(ent_p, ent, atol=5e-6, rtol=1e-5, msg=lambda m: f"entropy: {m}")
    logp_p.sum().backward()
    for name, g in ref_grads.items():
        p = dict(model.named_parameters())[name]
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")


def test_token_logprobs_from_hidden_and_default_positions():
    model = tiny_model(seed=1)
    ids, targets, _ = packed_inputs(T=17, seed=1)
    out = model(input_ids=ids)  # no position_ids: the model builds its own
    want = torch.log_softmax(out.logits.float(), -1).gather(-1, targets[..., None])[0, :, 0]
    patch_qwen2_5_vl(model)
    hidden = model.model(input_ids=ids).last_hidden_state[0]
    targets_masked = targets[0].clone()
    targets_masked[3] = -100
    logp, _ = model.token_logprobs(hidden, targets_masked, compute_entropy=False)
    torch.testing.assert_close(logp[targets_masked != -100], want[targets_masked != -100], atol=5e-6, rtol=1e-5)
    assert logp[3].item() == 0.0


def test_generate_with_cache_unchanged():
    model = tiny_model(seed=2)
    ids, _, _ = packed_inputs(T=7, seed=2)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    want = model.generate(input_ids=ids, **kw)
    patch_qwen2_5_vl(model, logprobs=False, mrope=True)
    got = model.generate(input_ids=ids, **kw)
    assert torch.equal(got, want)


def test_mrope_only_leaves_other_instances_alone():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    patch_qwen2_5_vl(a, logprobs=False, mrope=True)
    assert not hasattr(a, "token_logprobs")
    ids, targets, pos = packed_inputs(T=9, seed=3)
    assert not isinstance(b.model.language_model.rotary_emb(ids, pos), MRopePositions)
    torch.testing.assert_close(a(input_ids=ids, position_ids=pos).logits, b(input_ids=ids, position_ids=pos).logits,
                               atol=2e-6, rtol=1e-5)


def test_fails_loudly():
    with pytest.raises(TypeError, match="Qwen2.5-VL"):
        patch_qwen2_5_vl(torch.nn.Linear(2, 2))
    check_transformers_version(transformers.__version__)  # the installed version is the tested one
    with pytest.raises(RuntimeError, match="transformers 5"):
        check_transformers_version("6.0.0")
    with pytest.raises(RuntimeError, match="transformers 5"):
        check_transformers_version("4.57.1")
    with pytest.warns(UserWarning, match="tested on transformers 5.24"):
        check_transformers_version("5.30.0")
