"""Memory levers (activation checkpointing, optimizer offload, token-budgeted log-prob passes) and the
memory planner: exact parameter counts, the CLI, and predicted vs measured peak RSS of a real CPU step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import deepeyesv2.policy_logprobs as logprobs_mod
from deepeyesv2.commands.cli import main as cli_main
from deepeyesv2.config import Config, OptimConfig
from deepeyesv2.optim import OffloadedAdamW, build_optimizer
from deepeyesv2.packing import split_row
from deepeyesv2.parallel import SingleProcess
from deepeyesv2.policy_logprobs import budgeted_logprobs
from deepeyesv2.commands.plan import (CPU_OVERHEAD_BYTES, GiB, PlanSetup, largest_fit, load_arch, lora_params,
                                    param_counts, parse_bytes, plan)
from bench.memory_probe import measure_in_subprocess
from deepeyesv2.model import ModelConfig, build_model, packed_hidden
from deepeyesv2.packing import Sample, pack
from deepeyesv2.rl import update_policy
from deepeyesv2_kernels import fused_linear_grpo_loss
from deepeyesv2_rollout.chat import render_chat


def _row(proc, image_token_id, n=5, seed=0):
    """n chats of different lengths; chats 0 and 2 carry an image of different sizes."""
    samples = []
    for i in range(n):
        imgs = []
        if i in (0, 2):
            rs = np.random.RandomState(seed + i)
            imgs = [Image.fromarray((rs.rand(56 + 28 * i, 84, 3) * 255).astype("uint8"))]
        msgs = [{"role": "user", "content": "<image>" * len(imgs) + "tell me " + "more " * (3 * i)},
                {"role": "assistant", "content": f"<answer>{i}</answer>" + " ok" * i}]
        r = render_chat(proc, msgs, imgs, name=f"s{i}")
        L = len(r.token_ids)
        samples.append(Sample(torch.tensor(r.token_ids), torch.tensor(r.loss_mask), r.pixel_values, r.image_grid_thw,
                              name=f"s{i}", token_fields={"old_logprobs": torch.full((L,), -7.0)}))
    return pack(samples, image_token_id)


# ---------------------------------------------------------------- activation checkpointing


def test_checkpointing_gives_identical_grads_on_packed_rows():
    grads = []
    for ckpt in (False, True):
        model, proc = build_model(ModelConfig(gradient_checkpointing=ckpt))
        model.train()
        row = _row(proc, model.config.image_token_id)
        adv = torch.linspace(-1, 1, row.num_tokens)
        hidden = packed_hidden(model, row)
        loss, _ = fused_linear_grpo_loss(hidden.contiguous(), model.lm_head.weight, row.targets,
                                         row.token_fields["old_logprobs"], adv, row.loss_mask, row.cu_seqlens)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert model.model.language_model.gradient_checkpointing is ckpt
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"grad {n}: {m}")


# ---------------------------------------------------------------- optimizer state offload


def test_offloaded_adamw_matches_adamw():
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), (3, 4, 2)]
    ref = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    ours = [p.detach().clone().requires_grad_() for p in ref]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref, foreach=False, **kw)
    opt = OffloadedAdamW(ours, force_copy=True, **kw)  # the copy path the GPU takes, run on CPU
    assert all(m is not p for m, p in zip(opt.masters, ours))
    for step in range(4):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, q, gr in zip(ref, ours, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt_ref.step()
        opt.step()
        opt.zero_grad()
        for i, (p, q) in enumerate(zip(ref, ours)):
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=lambda m, i=i, s=step: f"step {s} param {i}: {m}")
        assert all(q.grad is None for q in ours) and all(m.grad is None for m in opt.masters)
    assert opt.state_bytes()["device"] == 0 and opt.state_bytes()["host"] > 0
    # round trip through a checkpoint's state dict
    opt2 = OffloadedAdamW([q.detach().clone().requires_grad_() for q in ours], force_copy=True, **kw)
    opt2.load_state_dict(opt.state_dict())
    for a, b in zip(opt.inner.state.values(), opt2.inner.state.values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_build_optimizer_offload_keeps_schedule():
    model, _ = build_model(ModelConfig())
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, offload_states=True)
    opt, sched = build_optimizer(model, cfg, total_steps=10)
    assert isinstance(opt, OffloadedAdamW) and sched.optimizer is opt.inner
    lrs = [sched.get_last_lr()[0]]
    for _ in range(3):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])


# ---------------------------------------------------------------- token-budgeted log-prob passes


def test_split_row_and_budgeted_logprobs_match_whole_row(monkeypatch):
    model, proc = build_model(ModelConfig())
    row = _row(proc, model.config.image_token_id)
    whole = budgeted_logprobs(model, row, temperature=0.7)
    lens = (row.cu_seqlens[1:] - row.cu_seqlens[:-1]).tolist()
    budget = max(lens) + 5
    parts = split_row(row, budget, model.config.image_token_id)
    assert len(parts) > 1 and all(p.num_tokens <= budget for p in parts)
    assert sum(p.num_tokens for p in parts) == row.num_tokens
    assert sum(0 if p.image_grid_thw is None else p.image_grid_thw.shape[0] for p in parts) == 2
    seen = []
    real = logprobs_mod.packed_logprobs
    monkeypatch.setattr(logprobs_mod, "packed_logprobs", lambda m, r, **kw: seen.append(r.num_tokens) or real(m, r, **kw))
    chunked = budgeted_logprobs(model, row, temperature=0.7, token_budget=budget)
    assert max(seen) <= budget and len(seen) == len(parts)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="token_budget"):
        split_row(row, 0, model.config.image_token_id)


def test_recompute_old_logprobs_respects_token_budget(monkeypatch):
    model, proc = build_model(ModelConfig())
    row = _row(proc, model.config.image_token_id, seed=4)
    cfg = Config()
    cfg.rl.recompute_old_logprobs, cfg.optim.lr = True, 0.0
    cfg.train.logprob_tokens_budget = int((row.cu_seqlens[1:] - row.cu_seqlens[:-1]).max()) + 1
    seen = []
    real = logprobs_mod.packed_logprobs
    monkeypatch.setattr(logprobs_mod, "packed_logprobs", lambda m, r, **kw: seen.append(r.num_tokens) or real(m, r, **kw))
    opt, sched = build_optimizer(model, cfg.optim, 1)
    out = update_policy(SingleProcess(model), opt, sched, [row], torch.tensor([1.0, 0, 0, 1, 0]), torch.zeros(5, dtype=torch.long), cfg)
    assert seen and max(seen) <= cfg.train.logprob_tokens_budget and len(seen) > 1
    assert out["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # recomputed old log-probs = the policy's own


# ---------------------------------------------------------------- planner


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_param_counts_exact(preset):
    model, _ = build_model(ModelConfig(name_or_path=preset))
    counts = param_counts(load_arch(preset))
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["vision"] == sum(p.numel() for p in model.model.visual.parameters())
    lora, _ = build_model(ModelConfig(name_or_path=preset, lora_rank=8))
    assert lora_params(load_arch(preset), 8) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_shipped_architectures_match_published_sizes():
    # Qwen2.5-VL-3B-Instruct: 3,754,622,976 parameters; 7B: 8,292,166,656 (safetensors metadata of the releases)
    assert sum(param_counts(load_arch("qwen2.5-vl-3b")).values()) == 3_754_622_976
    assert sum(param_counts(load_arch("Qwen/Qwen2.5-VL-7B-Instruct")).values()) == 8_292_166_656


def test_cpu_logprob_tile_is_the_kernels_tiling():
    """The planner's copy of the CPU kernel's tile sizing agrees with the kernel (constants and formula)."""
    from deepeyesv2.commands import plan as mp
    from deepeyesv2_kernels import logprobs_torch as lt

    assert (mp.CPU_TILE_BYTES, mp.CPU_TOKEN_CHUNK_MAX, mp.CPU_VOCAB_BLOCK_MIN) == (
        lt.TILE_BYTES, lt.TOKEN_CHUNK_MAX, lt.VOCAB_BLOCK_MIN)
    for T, V in [(1, 7), (300, 257), (4096, 151_936), (20_000, 151_936), (100_000, 1_000), (17, 300_000)]:
        assert mp.cpu_logprob_tile(T, V) == lt.vocab_tiles(T, V), (T, V)


def test_plan_orders_modes_and_fits():
    a = load_arch("qwen2.5-vl-7b")
    full = plan(a, PlanSetup())
    lora = plan(a, PlanSetup(lora_rank=64))
    lean = plan(a, PlanSetup(lora_rank=64, checkpointing=True, offload_optimizer=True))
    assert full["peak"] > lora["peak"] > lean["peak"]
    # full fine-tune in bf16 with AdamW: weights + grads + 2 moments = 8 bytes per trainable parameter at least
    assert full["peak"] > 8 * full["trainable"]
    assert lean["train"]["activations"] < lora["train"]["activations"] / 5
    # at 4k tokens per row: [T, V] logits + log-softmax + grad (~6 GiB) vs one 0.9 GiB tile of the fused kernel
    assert full["naive_logprob_bytes"] > 5 * full["train"]["log-prob workspace"]
    fits = largest_fit(a, PlanSetup(lora_rank=64, checkpointing=True, offload_optimizer=True), 80 * GiB, groups=(4, 8, 16))
    assert fits[4] >= fits[8] >= fits[16] > 0
    p = PlanSetup(lora_rank=64, checkpointing=True, offload_optimizer=True, group_size=8, response_tokens=fits[8])
    assert plan(a, p)["peak"] <= 80 * GiB < plan(a, PlanSetup(**{**p.__dict__, "response_tokens": fits[8] + 1}))["peak"]
    assert parse_bytes("24GiB") == parse_bytes("24 GB") == 24 * GiB
    with pytest.raises(ValueError, match="gpu-mem"):
        parse_bytes("lots")


def test_plan_cli(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  name_or_path: qwen2.5-vl-3b\n  dtype: bfloat16\n  lora_rank: 32\nrl:\n  group_size: 8\n")
    assert cli_main(["plan", "--config", str(cfg), "--gpu-mem", "24GiB"]) == 0
    out = capsys.readouterr().out
    for word in ("PREDICTED", "weights", "optimizer state", "activations", "log-prob workspace", "KV cache",
                 "images / vision", "naive [T, V] logits", "max response tokens", "| 8 |"):
        assert word in out, word
    assert cli_main(["plan", "--model", "no-such-model"]) == 2


# ---------------------------------------------------------------- predicted vs measured (real step, subprocess)

PROBE_KNOBS = {"full": dict(lora_rank=0), "lora": dict(lora_rank=16),
               "lora+ckpt+offload": dict(lora_rank=16, checkpointing=True, offload_optimizer=True)}


def _predicted(preset: str, mode: str, tokens: int) -> int:
    setup = PlanSetup(dtype="float32", device="cpu", row_tokens=tokens, prompt_tokens=0, response_tokens=tokens // 4,
                      images=0, include_rollout=False, **PROBE_KNOBS[mode])
    return plan(load_arch(preset), setup)["peak"]


def _check(preset: str, mode: str, tokens: int) -> None:
    measured = measure_in_subprocess(preset, mode, tokens)["peak_growth_bytes"]
    predicted = _predicted(preset, mode, tokens)
    assert abs(predicted - measured) <= 0.2 * measured, (
        f"{preset}/{mode}: predicted {predicted / 2**20:.1f} MiB vs measured {measured / 2**20:.1f} MiB")


def test_planner_matches_measured_step_tiny():
    _check("tiny", "full", 1024)
    assert CPU_OVERHEAD_BYTES < 64 * 2**20  # the fixed term must stay a small part of a real model's peak


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "lora+ckpt+offload"])
def test_planner_matches_measured_step_tiny_modes(mode):
    _check("tiny", mode, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora", "lora+ckpt+offload"])
def test_planner_matches_measured_step_small(mode):
    _check("small", mode, 512)
