"""Checkpoints: exact round trip of weights, optimizer, scheduler, RNG and data state; HF reload; atomicity."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyesv2.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from deepeyesv2.config import OptimConfig
from deepeyesv2.data import DataState
from deepeyesv2.model import ModelConfig, build_model, packed_hidden
from deepeyesv2.optim import build_optimizer
from deepeyesv2.packing import Sample, pack
from deepeyesv2_rollout.chat import ChatProcessor, render_chat


def trained(model, opt, sched, steps: int = 2) -> None:
    gen = torch.Generator().manual_seed(123)
    for _ in range(steps):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def rng_draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


@pytest.fixture(scope="module")
def tiny():
    model, proc = build_model(ModelConfig(seed=0))
    return model, proc


def test_round_trip(tmp_path, tiny):
    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=1), total_steps=10)
    trained(model, opt, sched)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = save_checkpoint(tmp_path, 2, model, proc, opt, sched, DataState(epoch=1, position=4, seed=9), {"stage": "sft", "best": 0.5})
    assert path == tmp_path / "checkpoints" / "step_000002"
    expected_draws = rng_draws()
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_opt = opt.state_dict()

    model2, _ = build_model(ModelConfig(seed=1), processor=proc)  # different weights
    assert not torch.equal(model2.lm_head.weight, model.lm_head.weight)
    opt2, sched2 = build_optimizer(model2, OptimConfig(lr=1e-3, warmup_steps=1), total_steps=10)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    step, state, extra = load_checkpoint(tmp_path, model2, opt2, sched2)  # out_dir -> latest

    assert (step, state, extra) == (2, DataState(epoch=1, position=4, seed=9), {"stage": "sft", "best": 0.5})
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_weights[k]), f"weight {k} differs after reload"
    got_opt = opt2.state_dict()
    assert got_opt["param_groups"] == expected_opt["param_groups"]
    assert set(got_opt["state"]) == set(expected_opt["state"]) and len(got_opt["state"]) > 0
    for i, st in expected_opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got_opt["state"][i][name], st[name]), f"optimizer state {i}.{name} differs"
    assert sched2.last_epoch == sched.last_epoch == 2 and sched2.get_last_lr() == sched.get_last_lr()
    assert rng_draws() == expected_draws  # RNG states restored


def test_hf_directory_reloads_with_identical_outputs(tmp_path, tiny):
    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3), total_steps=10)
    path = save_checkpoint(tmp_path, 7, model, proc, opt, sched, DataState(), {})
    reloaded, proc2 = build_model(ModelConfig(name_or_path=str(path)))
    assert isinstance(proc2, ChatProcessor)
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "<answer>noise</answer>"}]
    r1, r2 = render_chat(proc, msgs, [im]), render_chat(proc2, msgs, [im])
    assert r1.token_ids == r2.token_ids and r1.loss_mask == r2.loss_mask
    batch = pack([Sample(torch.tensor(r1.token_ids), torch.tensor(r1.loss_mask), r1.pixel_values, r1.image_grid_thw)],
                 proc.image_pad_id)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        a = model.lm_head(packed_hidden(model, batch))
        b = reloaded.lm_head(packed_hidden(reloaded, batch))
    assert torch.equal(a, b), f"max |diff| {float((a - b).abs().max())}"


def test_keep_last_latest_and_atomic_failure(tmp_path, tiny):
    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(), total_steps=10)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, None, opt, sched, DataState(position=step), {}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["latest", "step_000003", "step_000004"]
    assert (root / "latest").read_text().strip() == "step_000004"
    assert latest_checkpoint(tmp_path) == root / "step_000004"

    class Exploding(torch.nn.Module):
        def save_pretrained(self, *a, **k):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 5, Exploding(), None, None)
    assert not (root / "step_000005").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")], "temp dir left behind"
    assert latest_checkpoint(tmp_path) == root / "step_000004"

    # a stale pointer and an incomplete directory: fall back to the newest complete step
    (root / "latest").write_text("step_000099\n")
    (root / "step_000050").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step_000004"
    step, state, _ = load_checkpoint(root / "step_000003", restore_rng=False)
    assert step == 3 and state.position == 3


def test_missing_checkpoint_errors(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
