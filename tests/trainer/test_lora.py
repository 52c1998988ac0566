"""LoRA on the text model: targets, the packed forward on a PeftModel, merge-and-save round trip, the fused
kernels skipping the [V, H] weight gradient, adapters-off / CPU KL references, an SFT step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from deepeyesv2.config import Config
from deepeyesv2.policy_logprobs import packed_logprobs
from deepeyesv2.checkpoint import merge_and_save
from deepeyesv2.lora import is_lora, target_regex
from deepeyesv2.model import ModelConfig, build_model, unwrap_model
from deepeyesv2.optim import build_optimizer, clip_and_step
from deepeyesv2.packing import Sample, pack
from deepeyesv2.reference import AdapterOffReference, FrozenCopyReference, make_reference
from deepeyesv2.rl import update_policy
from deepeyesv2.sft import sft_step
from deepeyesv2.parallel import SingleProcess
from deepeyesv2_kernels import fused_linear_grpo_loss, fused_logprobs
from deepeyesv2_rollout.chat import render_chat


def _image(seed, size=(84, 56)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def make_row(proc, image_token_id, n=3, seed=0):
    """A packed row of n chats, the first with an image; old log-probs from a fixed value."""
    samples = []
    for i in range(n):
        imgs = [_image(seed + i)] if i == 0 else []
        msgs = [{"role": "user", "content": "<image>" * len(imgs) + f"question {i} about things"},
                {"role": "assistant", "content": f"<answer>{i * 7}</answer> some more words {i}"}]
        r = render_chat(proc, msgs, imgs, name=f"s{i}")
        L = len(r.token_ids)
        samples.append(Sample(torch.tensor(r.token_ids), torch.tensor(r.loss_mask), r.pixel_values, r.image_grid_thw,
                              name=f"s{i}", token_fields={"old_logprobs": torch.full((L,), -7.0)}))
    return pack(samples, image_token_id)


def _perturb_adapters(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def base():
    model, proc = build_model(ModelConfig())
    return model, proc


@pytest.fixture()
def lora():
    model, proc = build_model(ModelConfig(lora_rank=4, lora_alpha=8))
    return model, proc


def test_adapters_only_on_text_projections(lora):
    model, _ = lora
    assert is_lora(model)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted and all(".language_model.layers." in n for n in adapted), sorted(adapted)[:3]
    # 2 layers x 7 projections; the vision tower's gate/up/down_proj must not be adapted
    assert len(adapted) == 2 * 7
    assert not any("visual" in n for n in adapted)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not model.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="lora_targets"):
        target_regex(("qkv",))


def test_packed_forward_on_peft_model_equals_base(base, lora):
    """Fresh adapters (B = 0) leave the function unchanged; packed_hidden reaches the LM through the wrapper."""
    (m0, proc), (m1, _) = base, lora
    row = make_row(proc, m0.config.image_token_id)
    with torch.no_grad():
        lp0, _ = packed_logprobs(m0, row)
        lp1, _ = packed_logprobs(m1, row)
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=0)
    assert unwrap_model(m1) is m1.get_base_model() and unwrap_model(m0) is m0


def test_merge_and_save_round_trip(lora, tmp_path):
    model, proc = lora
    _perturb_adapters(model)
    row = make_row(proc, model.config.image_token_id, seed=3)
    with torch.no_grad():
        lp_lora, _ = packed_logprobs(model, row)
    merge_and_save(model, proc, tmp_path / "merged")
    assert is_lora(model), "merge_and_save must leave the training model's adapters in place"
    loaded, proc2 = build_model(ModelConfig(name_or_path=str(tmp_path / "merged")))
    assert not is_lora(loaded)
    assert not any("lora" in n or "base_layer" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        lp_merged, _ = packed_logprobs(loaded, row)
    torch.testing.assert_close(lp_merged, lp_lora, rtol=1e-5, atol=1e-5)
    assert len(proc2.tokenizer) == len(proc.tokenizer)


class _Shapes(TorchDispatchMode):
    """Records the shape of every new tensor an op returns (all allocations under autograd go through here);
    views of an input (a slice of the weight, a transpose) share its storage and allocate nothing."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        seen = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("op", ["logprobs", "grpo"])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_kernel_skips_weight_grad_when_frozen(op, weight_grad):
    T, H, V = 63, 48, 4099
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(weight_grad)
    targets = torch.randint(0, V, (T,), generator=g)
    mask = torch.ones(T, dtype=torch.bool)
    with _Shapes() as rec:
        if op == "logprobs":
            lp, _ = fused_logprobs(hidden, weight, targets, loss_mask=mask, backend="torch")
            loss = -lp.sum()
        else:
            loss, _ = fused_linear_grpo_loss(hidden, weight, targets, torch.full((T,), -8.0), torch.randn(T, generator=g),
                                             mask, torch.tensor([0, 20, T], dtype=torch.int32), backend="torch")
        loss.backward()
    assert hidden.grad is not None and hidden.grad.shape == (T, H)
    if weight_grad:  # the control: the same call with a trainable head does form the [V, H] gradient
        assert (V, H) in rec.shapes and weight.grad is not None
    else:
        assert weight.grad is None
        assert (V, H) not in rec.shapes, "a [V, H] buffer was allocated for a frozen lm_head"


def test_adapters_off_reference_is_the_base_model(base, lora):
    (m0, proc), (m1, _) = base, lora
    _perturb_adapters(m1, seed=1)
    rows = [make_row(proc, m0.config.image_token_id, seed=5)]
    ref = make_reference(m1, kl_coef=0.1)
    assert isinstance(ref, AdapterOffReference)
    (ref_lp,) = ref.row_logprobs(rows, temperature=0.7)
    with torch.no_grad():
        base_lp, _ = packed_logprobs(m0, rows[0], temperature=0.7)
        lora_lp, _ = packed_logprobs(m1, rows[0], temperature=0.7)
    torch.testing.assert_close(ref_lp, base_lp, rtol=0, atol=0)
    assert (lora_lp - base_lp).abs().max() > 1e-4, "control: the perturbed adapters must change the policy"
    # no second model: the reference holds the policy itself
    assert ref.policy is m1


def test_update_policy_kl_uses_adapters_off_reference(lora):
    model, proc = lora
    _perturb_adapters(model, seed=2)
    cfg = Config()
    cfg.rl.kl_coef, cfg.rollout.temperature, cfg.optim.lr = 0.5, 1.0, 0.0
    row = make_row(proc, model.config.image_token_id, seed=7)
    opt, sched = build_optimizer(model, cfg.optim, 1)
    ref = make_reference(model, cfg.rl.kl_coef)
    out = update_policy(SingleProcess(model), opt, sched, [row], torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 0]), cfg, ref)
    with torch.no_grad(), model.disable_adapter():
        expect, _ = packed_logprobs(model, row)
    torch.testing.assert_close(row.token_fields["ref_logprobs"], expect, rtol=0, atol=0)
    assert out["kl"] > 0  # adapters perturbed: the policy differs from its base


def test_cpu_reference_copy_is_frozen_and_separate(base):
    m0, proc = base
    model, _ = build_model(ModelConfig(seed=0))
    ref = FrozenCopyReference(model, on_cpu=True)
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert all(p.device.type == "cpu" and not p.requires_grad and p.data_ptr() not in ptrs for p in ref.model.parameters())
    row = make_row(proc, model.config.image_token_id, seed=9)
    with torch.no_grad():
        before, _ = packed_logprobs(model, row)
        for p in model.parameters():
            p.add_(0.01)
    (ref_lp,) = ref.row_logprobs([row], 1.0, token_budget=40)
    torch.testing.assert_close(ref_lp, before, rtol=1e-5, atol=1e-5)


def test_lora_sft_step_trains_adapters_only(lora):
    model, proc = lora
    cfg = Config()
    cfg.optim.lr = 1e-2
    row = make_row(proc, model.config.image_token_id, seed=11)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt, sched = build_optimizer(model, cfg.optim, 1)
    model.train()
    sft_step(SingleProcess(model), [row])
    assert model.lm_head.weight.grad is None
    clip_and_step(model, opt, sched, 1.0)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    changed = [n for n, p in model.named_parameters() if n in adapters and not torch.equal(p, adapters[n])]
    assert any("lora_B" in n for n in changed), "the adapters did not train"
