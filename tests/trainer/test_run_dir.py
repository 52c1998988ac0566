"""Run directories through the real entry point (train_sft): a finished run is never silently overwritten,
resume says when it starts fresh or falls back past a corrupt checkpoint (and still replays exactly), and
resuming with more steps continues the LR schedule instead of jumping onto a new one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepeyesv2.checkpoint import CheckpointError, checkpoints_dir
from deepeyesv2.config import Config
from deepeyesv2.demo.examples import write_examples
from deepeyesv2.metrics import read_metrics
from deepeyesv2.model import ModelConfig
from deepeyesv2.sft import train_sft


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_examples(tmp_path_factory.mktemp("data"), n_sft=4, n_rl=1, seed=3)["sft"]


def cfg_for(out: Path, data: Path, steps: int = 2, **train) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name_or_path="tiny", seed=0)
    cfg.data.train_path = str(data)
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio = 2e-3, 1, 0.1
    cfg.train.out_dir, cfg.train.steps, cfg.train.epochs, cfg.train.save_every = str(out), steps, 10, 2
    cfg.train.tokens_per_batch, cfg.train.progress = 512, False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def said(capfd) -> list[str]:
    """Our one-line notes on stderr (HF's progress bars left out)."""
    return [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("deepeyesv2:")]


def test_rerun_into_a_finished_run_is_refused_and_overwrite_clears_it(tmp_path, data, capfd):
    out = tmp_path / "run"
    train_sft(cfg_for(out, data, steps=2))
    with pytest.raises(CheckpointError) as err:
        train_sft(cfg_for(out, data, steps=1))
    msg = str(err.value)
    assert "\n" not in msg and str(out) in msg and "--train.resume true" in msg and "--train.overwrite true" in msg, msg
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2], "the refused run touched the metrics"
    assert (checkpoints_dir(out) / "step_000002").is_dir()

    capfd.readouterr()
    train_sft(cfg_for(out, data, steps=1, overwrite=True))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert sorted(p.name for p in checkpoints_dir(out).glob("step_*")) == ["step_000001"]  # no mix of two runs
    assert any("train.overwrite: deleted the previous run" in ln for ln in said(capfd))


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, data, capfd):
    out = tmp_path / "run"
    capfd.readouterr()
    last = train_sft(cfg_for(out, data, steps=1, resume=True))
    assert last["step"] == 1
    lines = said(capfd)
    assert any("train.resume: no checkpoint in" in ln and "starting fresh" in ln for ln in lines), lines


def test_resume_past_a_corrupt_checkpoint_replays_exactly(tmp_path, data, capfd):
    out = tmp_path / "run"
    train_sft(cfg_for(out, data, steps=4))
    # cloned: load_file maps the file, and the flip below rewrites it in place
    good = {k: v.clone() for k, v in load_file(checkpoints_dir(out) / "step_000004" / "model.safetensors").items()}
    rows = read_metrics(out / "metrics.jsonl")
    p = checkpoints_dir(out) / "step_000004" / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[int(len(raw) * 0.6)] ^= 0x10  # one bit flipped inside a tensor
    p.write_bytes(bytes(raw))

    capfd.readouterr()
    train_sft(cfg_for(out, data, steps=4, resume=True))  # falls back to step 2 and trains 3-4 again
    lines = said(capfd)
    assert any("step_000004 fails verification" in ln and "falling back to step_000002" in ln for ln in lines), lines
    again = load_file(checkpoints_dir(out) / "step_000004" / "model.safetensors")
    for k in good:
        assert torch.equal(good[k], again[k]), f"weight {k} differs from the uninterrupted run"
    assert [r["loss"] for r in read_metrics(out / "metrics.jsonl")] == [r["loss"] for r in rows]


def test_interrupted_save_leftovers_are_removed_at_start(tmp_path, data, capfd):
    out = tmp_path / "run"
    train_sft(cfg_for(out, data, steps=2))
    stale = checkpoints_dir(out) / ".tmp_step_000004_x1"
    stale.mkdir()
    capfd.readouterr()
    train_sft(cfg_for(out, data, steps=2, resume=True))  # nothing left to train; the leftovers still go
    assert not stale.exists()
    assert any("removed 1 temporary directory" in ln for ln in said(capfd))


def test_resume_with_more_steps_continues_the_lr(tmp_path, data, capfd):
    out = tmp_path / "run"
    train_sft(cfg_for(out, data, steps=2))  # warm-up to 2e-3 at step 1, cosine down to 2e-4 after step 2
    capfd.readouterr()
    train_sft(cfg_for(out, data, steps=4, resume=True))
    lr = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(lr) == [1, 2, 3, 4]
    # extended, the finished schedule stays at its floor; re-targeted from step 0 it would climb back to ~1.5e-3
    assert lr[2] >= lr[3] >= lr[4], lr
    assert lr[3] == pytest.approx(2e-4, rel=1e-6) and lr[4] == pytest.approx(2e-4, rel=1e-6), lr
    lines = said(capfd)
    assert any("LR schedule" in ln and "scheduled for 2 optimizer steps, this run for 4" in ln for ln in lines), lines


def test_cli_refuses_a_finished_run_in_one_line(tmp_path, data):
    from deepeyesv2.commands.cli import main

    out = tmp_path / "run"
    train_sft(cfg_for(out, data, steps=1))
    args = ["sft", "--data.train_path", str(data), "--train.out_dir", str(out), "--train.steps", "1",
            "--train.tokens_per_batch", "512", "--train.progress", "false"]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and str(out) in lines[0] and "--train.resume true" in lines[0], lines
