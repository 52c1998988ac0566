"""Device placement and bf16 autocast (mixed precision with fp32 weights). On the CPU `train.autocast: bf16`
forces what `auto` does on a GPU, so the same code paths run here: the SFT step, the RL update and the
embedded engine's sampling all compute in bf16 while weights and gradients stay fp32."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyesv2.config import Config
from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2.packing import Sample, pack
from deepeyesv2.precision import amp, autocast_dtype, resolve_device
from deepeyesv2.rl import update_policy
from deepeyesv2.optim import build_optimizer
from deepeyesv2.sft import sft_step
from deepeyesv2.parallel import SingleProcess
from deepeyesv2_rollout.chat import render_chat
from deepeyesv2_rollout.engine import EmbeddedEngine
from deepeyesv2_rollout.types import GenerateRequest, SamplingParams

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's choices")


@pytest.fixture(scope="module")
def tiny():
    return build_model(ModelConfig())


def _image(seed):
    return Image.fromarray((np.random.RandomState(seed).rand(56, 84, 3) * 255).astype("uint8"))


def make_row(proc, image_token_id, seed=0):
    samples = []
    for i in range(3):
        imgs = [_image(seed + i)] if i == 0 else []
        msgs = [{"role": "user", "content": "<image>" * len(imgs) + f"how many squares, {i}?"},
                {"role": "assistant", "content": f"<think>count</think><answer>{i + 2}</answer>"}]
        r = render_chat(proc, msgs, imgs, name=f"s{i}")
        samples.append(Sample(torch.tensor(r.token_ids), torch.tensor(r.loss_mask), r.pixel_values, r.image_grid_thw,
                              name=f"s{i}", token_fields={"old_logprobs": torch.full((len(r.token_ids),), -6.0)}))
    return pack(samples, image_token_id)


@no_cuda
def test_device_resolution():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="model.device='gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="no CUDA device"):
        build_model(ModelConfig(device="cuda:0"))


def test_autocast_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype("auto", cuda, torch.float32) is torch.bfloat16
    assert autocast_dtype("auto", cpu, torch.float32) is None  # CPUs: fp32 unless asked
    assert autocast_dtype("bf16", cpu, torch.float32) is torch.bfloat16
    assert autocast_dtype("auto", cuda, torch.bfloat16) is None  # bf16 weights compute in bf16 anyway
    assert autocast_dtype("off", cuda, torch.float32) is None
    with pytest.raises(ValueError, match="train.autocast must be one of"):
        autocast_dtype("fp8", cpu, torch.float32)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sft_step_under_bf16_autocast(tiny):
    """bf16 autocast: the loss and gradients are close to fp32's but not equal (it really ran in bf16), and
    weights and gradients stay fp32."""
    model, proc = tiny
    row = make_row(proc, model.config.image_token_id)
    assert amp("auto", model) is nullcontext  # fp32 on CPU by default
    out = {}
    for mode in ("off", "bf16"):
        model.zero_grad(set_to_none=True)
        loss, n_tok = sft_step(SingleProcess(model), [row], autocast=amp(mode, model))
        out[mode] = (loss, _grads(model))
    model.zero_grad(set_to_none=True)
    (l32, g32), (l16, g16) = out["off"], out["bf16"]
    assert l16 != l32 and l16 == pytest.approx(l32, rel=2e-2)
    assert g16.keys() == g32.keys() and all(g.dtype == torch.float32 for g in g16.values())
    for name, g in g32.items():  # bf16 rounding: ~0.5% relative error in every gradient, never zero
        rel = float((g16[name] - g).norm() / g.norm())
        assert 1e-4 < rel < 5e-2, f"{name}: relative gradient difference {rel}"
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_rl_update_under_bf16_autocast():
    """The RL update (recomputed old log-probs, KL reference, fused GRPO loss) under bf16 autocast: same
    metrics as fp32 within bf16 error, and an fp32 optimizer step."""
    cfg = Config()
    cfg.rl.recompute_old_logprobs, cfg.rl.kl_coef, cfg.train.autocast = True, 0.05, "bf16"
    from deepeyesv2.reference import make_reference

    res = {}
    for mode in ("off", "bf16"):
        model, proc = build_model(ModelConfig())
        cfg.train.autocast = mode
        opt, sched = build_optimizer(model, cfg.optim, 10)
        row = make_row(proc, model.config.image_token_id, seed=3)
        res[mode] = update_policy(SingleProcess(model), opt, sched, [row], torch.tensor([1.0, 0.0, 0.5]), torch.zeros(3, dtype=torch.long),
                                  cfg, make_reference(model, cfg.rl.kl_coef))
        assert all(p.dtype == torch.float32 for p in model.parameters())
    a, b = res["off"], res["bf16"]
    assert a["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and b["ratio_mean"] == pytest.approx(1.0, abs=1e-2)
    assert b["grad_norm"] != a["grad_norm"] and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2)
    assert b["entropy"] == pytest.approx(a["entropy"], rel=2e-2)


def test_engine_samples_under_bf16_autocast(tiny):
    """Teacher-forced log-probs from the engine under bf16 autocast (bf16 K/V) track fp32's closely."""
    model, proc = tiny
    model.eval()
    r = render_chat(proc, [{"role": "user", "content": "<image>how many?"}], [_image(7)], add_generation_prompt=True)
    forced = proc.encode("<think>count them</think><answer>3</answer>")
    req = GenerateRequest(r.token_ids, r.pixel_values, r.image_grid_thw, forced_tokens=forced)
    sp = SamplingParams(temperature=1.0, max_new_tokens=len(forced))
    (o32,) = EmbeddedEngine(model, proc).generate([req], sp)
    (o16,) = EmbeddedEngine(model, proc, autocast_dtype=torch.bfloat16).generate([req], sp)
    assert o16.token_ids == o32.token_ids == forced[: len(o32.token_ids)]
    lp32, lp16 = torch.tensor(o32.logprobs), torch.tensor(o16.logprobs)
    assert not torch.equal(lp32, lp16)
    torch.testing.assert_close(lp16, lp32, atol=0.1, rtol=0.05)


def test_engine_batch_under_autocast_gives_the_trainers_logprobs(tiny):
    """Two requests that finish at different steps (the decode then indexes the K/V buffers with a tensor of
    live rows, which refuses mixed dtypes) sample under bf16 autocast; their sampling-time log-probs are the
    trainer's log-probs under the same autocast (fp32 lm_head in both): the first PPO ratio stays ~1."""
    from deepeyesv2.policy_logprobs import packed_logprobs

    model, proc = tiny
    model.eval()
    forced = proc.encode("<think>count them</think><answer>3</answer>")
    reqs = []
    for i, question in enumerate(["how many?", "count the red squares in this picture please"]):
        r = render_chat(proc, [{"role": "user", "content": "<image>" + question}], [_image(7 + i)], add_generation_prompt=True)
        reqs.append((r, GenerateRequest(r.token_ids, r.pixel_values, r.image_grid_thw, forced_tokens=forced[: 5 + 4 * i])))
    outs = EmbeddedEngine(model, proc, autocast_dtype=torch.bfloat16).generate([q for _, q in reqs],
                                                                           SamplingParams(max_new_tokens=32))
    assert [len(o.token_ids) for o in outs] == [5, 9]
    for (r, _), o in zip(reqs, outs):
        ids, mask = r.token_ids + o.token_ids, [0] * len(r.token_ids) + [1] * len(o.token_ids)
        row = pack([Sample(torch.tensor(ids), torch.tensor(mask), r.pixel_values, r.image_grid_thw, name="x")],
                   model.config.image_token_id)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lp, _ = packed_logprobs(model, row)
        torch.testing.assert_close(torch.tensor(o.logprobs), lp[row.loss_mask.bool()], atol=1e-2, rtol=0)


def test_attention_kernels_get_one_dtype():
    """flash-attn / xformers take one half dtype: under autocast q, k (fp32 after RoPE) and v (bf16) are cast
    to the autocast dtype; outside it everything follows v."""
    from deepeyesv2.attention import kernel_dtype

    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in kernel_dtype(q, k, v)} == {torch.bfloat16}
    assert {t.dtype for t in kernel_dtype(q.half(), k.half(), v.half())} == {torch.float16}
    assert {t.dtype for t in kernel_dtype(q, k, v)} == {torch.bfloat16}


def test_training_precision_guards(monkeypatch):
    """fp16 weights cannot be trained without loss scaling (error); bf16 weights under plain AdamW warn that
    small updates round away; optimizer offload is refused under torchrun (FSDP2 shards the states)."""
    from deepeyesv2.config import OptimConfig

    lin = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="fp16 weights needs loss scaling"):
        build_optimizer(lin.half(), OptimConfig(), 10)
    with pytest.warns(UserWarning, match="bf16's resolution"):
        build_optimizer(lin.bfloat16(), OptimConfig(), 10)
    with pytest.raises(ValueError, match="offload_states is not supported under torchrun"):
        build_optimizer(lin.float(), OptimConfig(offload_states=True), 10, world_size=2)


def test_fp32_kernel_products_follow_torchs_matmul_precision(monkeypatch):
    """The fused kernels' fp32 GEMMs use tf32 exactly when torch's own fp32 matmuls do
    (torch.set_float32_matmul_precision); bf16 inputs always use the tensor cores; the CPU interpreter stays exact.
    train.tf32 sets the switch on CUDA only."""
    from deepeyesv2.precision import set_matmul_precision
    from deepeyesv2_kernels import logprobs as lp

    before = torch.get_float32_matmul_precision()
    try:
        monkeypatch.setattr(lp, "interpreting", lambda: False)  # as compiled for a GPU
        torch.set_float32_matmul_precision("highest")
        assert lp._dot_args(torch.float32) == {"DOT_PRECISION": "ieee", "DOT_UPCAST": False}
        assert lp._dot_args(torch.bfloat16) == {"DOT_PRECISION": "tf32", "DOT_UPCAST": False}
        torch.set_float32_matmul_precision("high")
        assert lp._dot_args(torch.float32) == {"DOT_PRECISION": "tf32", "DOT_UPCAST": False}
        monkeypatch.setattr(lp, "interpreting", lambda: True)
        assert lp._dot_args(torch.float32) == {"DOT_PRECISION": "ieee", "DOT_UPCAST": False}
        assert lp._dot_args(torch.bfloat16) == {"DOT_PRECISION": "ieee", "DOT_UPCAST": True}
        torch.set_float32_matmul_precision("highest")
        set_matmul_precision(True, torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"  # the CPU is left alone
    finally:
        torch.set_float32_matmul_precision(before)
