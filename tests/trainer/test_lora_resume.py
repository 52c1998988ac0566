"""A LoRA run resumes exactly, and its checkpoint directory is a plain HF checkpoint (merged weights)."""

import json
import shutil

import torch

from deepeyesv2.checkpoint import checkpoints_dir, latest_checkpoint
from deepeyesv2.config import Config
from deepeyesv2.demo.examples import write_examples
from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2.sft import train_sft


def _run(data, out, resume):
    cfg = Config()
    cfg.model = ModelConfig(lora_rank=8)
    cfg.data.train_path = str(data)
    cfg.train.out_dir = str(out)
    cfg.train.steps, cfg.train.save_every, cfg.train.resume, cfg.train.progress = 3, 1, resume, False
    cfg.train.tokens_per_batch = 2048
    cfg.optim.lr = 1e-3
    train_sft(cfg)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_resume_is_exact_and_checkpoint_is_plain_hf(tmp_path):
    data = write_examples(tmp_path / "data")["sft"]
    out = tmp_path / "out"
    uninterrupted = _run(data, out, resume=False)
    assert len(uninterrupted) == 3
    # Simulate a kill after step 1: drop the later checkpoints and the pointer, then resume.
    ckpts = sorted(checkpoints_dir(out).glob("step_*"))
    for c in ckpts[1:]:
        shutil.rmtree(c)
    for f in checkpoints_dir(out).glob("latest*"):
        f.unlink()
    resumed = _run(data, out, resume=True)
    assert resumed == uninterrupted  # exact: same adapters, optimizer, RNG and data position
    model, _ = build_model(ModelConfig(name_or_path=str(latest_checkpoint(out))))
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert isinstance(model.lm_head.weight, torch.Tensor)
