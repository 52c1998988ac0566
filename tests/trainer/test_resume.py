"""Exact resume: a run killed after a checkpoint and resumed with train.resume=True logs the same curve and
ends with the same weights as a run that was never interrupted -- for SFT (across an epoch boundary) and
for RL (seeded sampling through the embedded engine, dynamic-sampling refills, real rewards).

The "kill" is an exception raised inside the optimizer step after the checkpoint: the dead run has
logged a metrics row past its last checkpoint, which resume must drop and recompute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deepeyesv2.rl as rl_mod
import deepeyesv2.parallel as parallel_mod
from deepeyesv2.checkpoint import latest_checkpoint
from deepeyesv2.config import Config
from deepeyesv2.data import load_prompts
from deepeyesv2.demo.examples import write_examples
from deepeyesv2.metrics import read_metrics
from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2.rl import train_rl
from deepeyesv2.rollout_setup import make_rollouts
from deepeyesv2.sft import train_sft
from deepeyesv2_rollout.types import GenerateRequest

# Wall-clock and cumulative-engine metrics legitimately differ after a restart.
VOLATILE = ("time", "tokens_per_s", "generated_tokens_per_s", "rollout_s", "train_s", "peak_memory_gb")


class Killed(RuntimeError):
    pass


def kill_at_call(monkeypatch, module, name: str, n: int) -> None:
    """Make the n-th call of `module.name` raise (a simulated SIGKILL inside a training step)."""
    real = getattr(module, name)
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed(f"killed at call {n} of {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, step)


def stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE and not k.startswith("engine_")} for r in rows]


def assert_same_curves(a: list[dict], b: list[dict]) -> None:
    a, b = stable(a), stable(b)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), f"step {ra['step']}: keys differ"
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, float):
                assert va == pytest.approx(vb, rel=1e-6, abs=1e-7), f"step {ra['step']}: {k} {va} != {vb}"
            else:
                assert va == vb, f"step {ra['step']}: {k} {va} != {vb}"


def assert_same_final_weights(out_a: Path, out_b: Path, atol: float = 0.0) -> None:
    wa = load_file(latest_checkpoint(out_a) / "model.safetensors")
    wb = load_file(latest_checkpoint(out_b) / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        same = torch.equal(wa[k], wb[k]) if atol == 0 else torch.allclose(wa[k], wb[k], rtol=0, atol=atol)
        assert same, f"weight {k} differs after resume (max {float((wa[k] - wb[k]).abs().max())})"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_examples(tmp_path_factory.mktemp("data"), n_sft=4, n_rl=8, seed=3)


# -------------------------------------------------------------------------------------------------- SFT


def sft_config(out: Path, data: dict, resume: bool = False) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name_or_path="tiny", seed=0)
    cfg.data.train_path = str(data["sft"])
    cfg.optim.lr, cfg.optim.warmup_steps = 2e-3, 1
    # 4 samples -> 4 one-sample rows per epoch: 6 steps cross into epoch 1 after the resume point.
    cfg.train.out_dir, cfg.train.steps, cfg.train.epochs = str(out), 6, 10
    cfg.train.tokens_per_batch, cfg.train.rows_per_step, cfg.train.save_every = 512, 1, 3
    cfg.train.progress, cfg.train.resume = False, resume
    return cfg


def test_sft_resume_is_exact(tmp_path, data, monkeypatch):
    ref = train_sft(sft_config(tmp_path / "ref", data))
    assert ref["step"] == 6 and ref["epoch"] == 1

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        kill_at_call(m, parallel_mod, "clip_and_step", 5)  # dies in step 5: steps 1-4 logged, checkpoint at 3
        with pytest.raises(Killed):
            train_sft(sft_config(run, data))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert latest_checkpoint(run).name == "step_000003"

    torch.manual_seed(1234)  # a different global RNG state: resume must restore its own
    train_sft(sft_config(run, data, resume=True))
    assert_same_curves(read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "ref" / "metrics.jsonl"))
    assert_same_final_weights(run, tmp_path / "ref")


# --------------------------------------------------------------------------------------------------- RL


class HalfScripted:
    """An engine that answers correctly for sample 0 of prompts with an even id number (teacher-forced, so
    its log-probs are still the model's) and lets the model sample freely for everything else. Groups of
    odd prompts are then all-zero reward and dynamic sampling drops and refills them."""

    def __init__(self, engine, processor, answers: dict[str, str]):
        self.engine, self.processor, self.answers = engine, processor, answers

    def _forced(self, r):
        pid = r.tag.prompt_id
        if r.tag.sample_index == 0 and int(pid.rsplit("-", 1)[1]) % 2 == 0:
            ids = self.processor.encode(f"<think>count</think><answer>{self.answers[pid]}</answer>")
            r = GenerateRequest(**{**r.__dict__, "forced_tokens": ids})
        return r

    def generate(self, requests, sampling):
        return self.engine.generate([self._forced(r) for r in requests], sampling)

    async def agenerate(self, request, sampling):
        return await self.engine.agenerate(self._forced(request), sampling)

    def update_weights(self, model):
        self.engine.update_weights(model)

    def stats(self):
        return self.engine.stats()

    def clear_cache(self):
        self.engine.clear_cache()

    def release_memory(self):
        self.engine.release_memory()

    def resume_memory(self):
        self.engine.resume_memory()

    def shutdown(self):
        self.engine.shutdown()


def rl_config(out: Path, resume: bool = False, schedule: str = "async") -> Config:
    cfg = Config()
    cfg.rollout.schedule = schedule
    cfg.model = ModelConfig(name_or_path="tiny", seed=0)
    cfg.optim.lr, cfg.optim.min_lr_ratio = 5e-3, 0.5
    cfg.train.out_dir, cfg.train.steps, cfg.train.save_every = str(out), 3, 2
    cfg.train.tokens_per_batch, cfg.train.seed = 2048, 7
    cfg.train.progress, cfg.train.resume = False, resume
    cfg.rollout.max_new_tokens, cfg.rollout.max_turns, cfg.rollout.max_total_tokens = 10, 1, 512
    cfg.rollout.sandbox_workers = 0
    cfg.rl.prompts_per_step, cfg.rl.group_size, cfg.rl.mini_batches = 2, 3, 2
    cfg.rl.max_refill_rounds = 1
    return cfg


def run_rl(cfg: Config, prompts) -> dict:
    model, proc = build_model(cfg.model)
    rollouts = make_rollouts(model, proc, cfg, progress=False)
    rollouts.engine = HalfScripted(rollouts.engine, proc, {p.id: str(p.answer) for p in prompts})
    try:
        return train_rl(cfg, prompts=prompts, model=model, processor=proc, rollouts=rollouts)
    finally:
        rollouts.close()


@pytest.mark.slow  # ~50 s on 2 shared cores, per schedule
@pytest.mark.parametrize("schedule", ["turn_sync", "async"])
def test_rl_resume_is_exact(tmp_path, data, monkeypatch, schedule):
    """turn_sync: the resumed run's weights are bit-identical. async: every sampled token, reward and metric is
    replayed (the seeds are per request), but which requests share an engine batch depends on timing, and the
    sampling-time log-probs -- the loss's old log-probs -- carry that batch's fp32 round-off (~1e-7): the weights
    agree to fp32 tolerance, not bit for bit."""
    prompts = load_prompts(data["rl"])
    ref = run_rl(rl_config(tmp_path / "ref", schedule=schedule), prompts)
    assert ref["step"] == 3
    ref_rows = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    # the test means something only if the policy actually moved and groups were dropped and refilled
    assert any(r["grad_norm"] > 0 for r in ref_rows) and any(r["groups_dropped"] > 0 for r in ref_rows)

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        kill_at_call(m, rl_mod, "update_policy", 3)  # dies in step 3 after its rollouts; checkpoint at 2
        with pytest.raises(Killed):
            run_rl(rl_config(run, schedule=schedule), prompts)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert latest_checkpoint(run).name == "step_000002"

    torch.manual_seed(99)
    run_rl(rl_config(run, resume=True, schedule=schedule), prompts)
    assert_same_curves(read_metrics(run / "metrics.jsonl"), ref_rows)
    assert_same_final_weights(run, tmp_path / "ref", atol=0.0 if schedule == "turn_sync" else 1e-6)
