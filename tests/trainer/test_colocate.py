"""Colocated rollout and training in one process: the embedded engine's KV cache is empty while the policy
updates and is rebuilt after; an engine with release/resume_memory (SGLang) gets them around the step;
greedy rollouts are unchanged by an update with lr = 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import deepeyesv2.rl as rl_mod
from deepeyesv2.config import Config
from deepeyesv2_rollout.types import Prompt
from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2.rollout_setup import make_rollouts
from deepeyesv2_rollout.chat import render_chat
from deepeyesv2_rollout.types import GenerateRequest, SamplingParams


def _image(seed):
    return Image.fromarray((np.random.RandomState(seed).rand(56, 84, 3) * 255).astype("uint8"))


def _requests(proc):
    out = []
    for i, text in enumerate(["how many dots?", "what colour is it?"]):
        r = render_chat(proc, [{"role": "user", "content": "<image>" + text}], [_image(i)], add_generation_prompt=True)
        out.append(GenerateRequest(r.token_ids, r.pixel_values, r.image_grid_thw))
    return out


def _config(tmp_path, lr=0.0, lora_rank=0) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(lora_rank=lora_rank)
    cfg.train.out_dir, cfg.train.steps, cfg.train.progress, cfg.train.save_every = str(tmp_path), 1, False, 100
    cfg.rl.prompts_per_step, cfg.rl.group_size, cfg.rl.dynamic_sampling = 2, 2, False
    cfg.rollout.max_new_tokens, cfg.rollout.max_turns, cfg.rollout.sandbox_workers = 6, 1, 1
    cfg.optim.lr = lr
    return cfg


class _MemoryHookedEngine:
    """The embedded engine plus SGLang's release/resume_memory hooks, logging the order of events."""

    def __init__(self, engine, events):
        self.engine, self.events = engine, events

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def clear_cache(self):
        self.events.append(("clear_cache", self.engine.cache.total_tokens))
        self.engine.clear_cache()

    def release_memory(self, tags=None):
        self.events.append(("release_memory", self.engine.cache.total_tokens))

    def resume_memory(self, tags=None):
        self.events.append(("resume_memory", self.engine.cache.total_tokens))

    def update_weights(self, model):
        self.events.append(("update_weights", self.engine.cache.total_tokens))
        self.engine.update_weights(model)


@pytest.mark.parametrize("lora_rank", [0, pytest.param(4, marks=pytest.mark.slow)])
def test_cache_empty_during_update_and_rollouts_unchanged(tmp_path, monkeypatch, lora_rank):
    cfg = _config(tmp_path, lr=0.0, lora_rank=lora_rank)
    model, proc = build_model(cfg.model)
    rollouts = make_rollouts(model.get_base_model() if lora_rank else model, proc, cfg, progress=False)
    events: list[tuple[str, int]] = []
    rollouts.engine = _MemoryHookedEngine(rollouts.engine, events)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    model.eval()
    before = rollouts.engine.generate(_requests(proc), greedy)
    assert rollouts.engine.cache.total_tokens > 0

    real_update = rl_mod.update_policy

    def observed_update(*args, **kwargs):
        events.append(("update_policy", rollouts.engine.cache.total_tokens))
        out = real_update(*args, **kwargs)
        events.append(("update_done", rollouts.engine.cache.total_tokens))
        return out

    monkeypatch.setattr(rl_mod, "update_policy", observed_update)
    prompts = [Prompt(id=f"p{i}", question="How many dots?", answer=str(i + 1), images=[_image(10 + i)])
               for i in range(2)]
    try:
        params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
        rl_mod.train_rl(cfg, prompts=prompts, model=model, processor=proc, rollouts=rollouts,
                        reward_fn=lambda inp: float(len(inp.response_text) % 3), progress=False)
    finally:
        rollouts.close()
    names = [e[0] for e in events]
    # the step syncs the engine before its rollouts, and once more at the end on the final weights
    assert names == ["update_weights", "clear_cache", "release_memory", "update_policy", "update_done",
                     "resume_memory", "update_weights"], events
    assert events[1][1] > 0, "the rollouts of the step should have filled the prefix cache"
    assert all(n == 0 for name, n in events[2:5]), f"KV cache not empty during the update: {events}"
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]), f"lr=0 changed {n}"
    model.eval()
    after = rollouts.engine.generate(_requests(proc), greedy)
    assert rollouts.engine.cache.total_tokens > 0, "the cache must rebuild after the step"
    for b, a in zip(before, after):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
