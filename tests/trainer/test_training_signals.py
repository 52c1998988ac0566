"""Training that did not train says so, and a run's console lines (issue #19 items 4 and 6).

RL from a random policy: every reward is 0, so every group is all-equal, DAPO dynamic sampling drops and refills
until its last round keeps them, every advantage is 0 and so are the loss and the gradient. That is the cause with
LoRA too (its B = 0 start is not: B gets a gradient as soon as an advantage is not 0, checked below). Each such
step is counted (`steps_without_update`, cumulative; `zero_advantage_groups`), warned about once per cause, shown
on its step line and in the end summary. SFT with lr 0 is the zero_lr cause, and the count survives a resume (in the checkpoint).
With `train.progress: false` every logged step and the end print one line; checkpoints print "saved checkpoint
to ..."; transformers' "Writing model shards" bar does not appear. A requested logger that is missing fails before
the run directory exists.
"""

from __future__ import annotations

import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from deepeyesv2.config import Config, ConfigError
from deepeyesv2.demo.examples import write_examples
from deepeyesv2.metrics import read_metrics
from deepeyesv2.model import ModelConfig
from deepeyesv2.rewards import RewardResult
from deepeyesv2.rl import train_rl
from deepeyesv2.sft import train_sft
from deepeyesv2_rollout.types import Prompt


def _image(seed):
    return Image.fromarray((np.random.RandomState(seed).rand(56, 84, 3) * 255).astype("uint8"))


def _rl_config(out, steps=2) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(lora_rank=4)
    cfg.train.out_dir, cfg.train.steps, cfg.train.progress, cfg.train.save_every = str(out), steps, False, 1
    cfg.rl.prompts_per_step, cfg.rl.group_size = 2, 2
    cfg.rollout.max_new_tokens, cfg.rollout.max_turns, cfg.rollout.sandbox_workers = 6, 1, 1
    cfg.optim.lr = 1e-3
    return cfg


PROMPTS = [Prompt(id=f"p{i}", question="how many?", answer="3", images=[_image(i)], answer_type="numeric")
           for i in range(4)]


def test_rl_from_a_random_lora_policy_reports_steps_without_update(tmp_path, capsys):
    out = tmp_path / "rl"
    last = train_rl(_rl_config(out), prompts=PROMPTS)
    err = capsys.readouterr().err
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["steps_without_update"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reward"] == 0 and r["loss"] == 0 and r["grad_norm"] == 0
        assert r["groups_dropped"] > 0 and r["zero_advantage_groups"] == 2  # both kept groups all-equal
    warnings = [ln for ln in err.splitlines() if "warning: step without a weight update" in ln]
    assert len(warnings) == 1 and "(equal_rewards)" in warnings[0] and "SFT checkpoint" in warnings[0]
    steps = [ln for ln in err.splitlines() if ln.startswith("rl step ")]
    assert len(steps) == 2 and steps[0].startswith("rl step 1/2: reward 0 loss 0 grad_norm 0 ")
    assert all(ln.endswith("[no update: equal_rewards]") for ln in steps)
    assert err.count("deepeyesv2: saved checkpoint to ") == 2 and str(out / "checkpoints") in err
    (done,) = [ln for ln in err.splitlines() if ln.startswith("rl done: ")]
    assert "step 2/2" in done and "2 steps without update (equal_rewards 2)" in done
    assert "Writing model shards" not in err and "Loading weights" not in err
    assert last["steps_without_update"] == 2


def _varied_reward(inp) -> RewardResult:
    """A reward that differs between a group's samples (a hash of the response): non-zero advantages."""
    return RewardResult(zlib.crc32(inp.response_text.encode()) % 97 / 97, {})


def test_lora_gets_a_gradient_when_advantages_are_not_zero(tmp_path, capsys):
    cfg = _rl_config(tmp_path / "rl", steps=1)
    cfg.rl.group_size = 4
    last = train_rl(cfg, prompts=PROMPTS, reward_fn=_varied_reward)
    err = capsys.readouterr().err
    assert last["grad_norm"] > 0 and last["zero_advantage_groups"] == 0 and last["steps_without_update"] == 0
    assert "warning" not in err and "rl done: step 1/1" in err and "0 steps without update" in err


def _sft_config(data, out, steps, resume=False) -> Config:
    cfg = Config()
    cfg.data.train_path, cfg.train.out_dir = str(data), str(out)
    cfg.train.steps, cfg.train.save_every, cfg.train.progress, cfg.train.resume = steps, 1, False, resume
    cfg.train.tokens_per_batch = 2048
    return cfg


def test_sft_step_lines_summary_and_zero_lr_count_survive_resume(tmp_path, capsys):
    data = write_examples(tmp_path / "data")["sft"]
    out = tmp_path / "sft"
    cfg = _sft_config(data, out, 2)
    cfg.optim.lr = 0.0
    train_sft(cfg)
    err = capsys.readouterr().err
    assert err.count("(zero_lr)") == 1  # one warning for two steps
    steps = [ln for ln in err.splitlines() if ln.startswith("sft step ")]
    assert [ln.split(":")[0] for ln in steps] == ["sft step 1/2", "sft step 2/2"]
    assert all(" loss " in ln and " grad_norm " in ln and ln.endswith("[no update: zero_lr]") for ln in steps)
    assert err.count("deepeyesv2: saved checkpoint to ") == 2
    assert "2 steps without update (zero_lr 2)" in err and "Writing model shards" not in err

    cfg = _sft_config(data, out, 3, resume=True)
    cfg.optim.lr = 0.0
    last = train_sft(cfg)
    err = capsys.readouterr().err
    assert last["steps_without_update"] == 3 and err.count("(zero_lr)") == 1  # warned once per run
    assert [r["steps_without_update"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    (done,) = [ln for ln in err.splitlines() if ln.startswith("sft done: ")]
    assert "step 3/3 (1 this run" in done and "3 steps without update (2 before the resume, zero_lr 1)" in done


def test_missing_requested_logger_fails_before_the_run_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    cfg = _sft_config(tmp_path / "missing.jsonl", tmp_path / "sft", 1)
    cfg.train.report_to = ("jsonl", "wandb")
    with pytest.raises(ConfigError, match="train.report_to includes 'wandb'"):
        train_sft(cfg)
    assert not (tmp_path / "sft").exists()
    cfg = _rl_config(tmp_path / "rl")
    cfg.train.report_to = ("wandb",)
    with pytest.raises(ConfigError, match="train.report_to includes 'wandb'"):
        train_rl(cfg, prompts=PROMPTS)
    assert not (tmp_path / "rl").exists()


def test_sft_reports_to_wandb_offline(tmp_path, monkeypatch):
    """`train.report_to: [jsonl, wandb]` with the real package in offline mode: no network, the run's config and
    rows under out_dir/wandb."""
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_examples(tmp_path / "data")["sft"]
    cfg = _sft_config(data, tmp_path / "sft", 1)
    cfg.train.report_to = ("jsonl", "wandb")
    train_sft(cfg)
    import wandb

    wandb.teardown()  # the service writes the record asynchronously; at exit this runs from wandb's atexit hook
    (record,) = (tmp_path / "sft" / "wandb").glob("offline-run-*/run-*.wandb")
    body = record.read_bytes()
    assert b"trained_tokens" in body and b"tokens_per_batch" in body  # a row's metric and the run's config
    assert len(read_metrics(tmp_path / "sft" / "metrics.jsonl")) == 1
