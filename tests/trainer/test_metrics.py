"""Metrics JSONL rows, resume truncation, peak memory, and the PNG plots made from a run directory."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from deepeyesv2.metrics import MetricsLogger, peak_memory_bytes, read_metrics
from deepeyesv2.commands.plot import group_metrics, plot_run


def test_rows_are_written_and_converted(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False) as log:
        log.log({"step": 1, "loss": torch.tensor(2.5), "lr": 1e-5, "phase": "sft"})
        log.log({"reward/mean": 0.75}, step=2)
        with pytest.raises(ValueError, match="step"):
            log.log({"loss": 1.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 2.5 and isinstance(rows[0]["loss"], float) and rows[0]["phase"] == "sft"
    assert rows[1]["reward/mean"] == 0.75 and "time" in rows[1]
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])  # plain JSON lines


def test_resume_truncates_rows_past_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False) as log:
        for s in range(1, 8):
            log.log({"step": s, "loss": float(s)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "lo')  # a crash mid-write
    with MetricsLogger(tmp_path, use_tensorboard=False) as log:
        assert log.truncate_after(5) == 2
        log.log({"step": 6, "loss": 60.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0)]


def test_tensorboard_auto(tmp_path):
    log = MetricsLogger(tmp_path, use_tensorboard="auto")
    log.log({"step": 1, "loss": 1.0})
    log.close()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not log.tensorboard and not (tmp_path / "tensorboard").exists()
        with pytest.raises(ImportError, match="tensorboard"):
            MetricsLogger(tmp_path, use_tensorboard=True)
    else:
        assert log.tensorboard and any((tmp_path / "tensorboard").iterdir())


def test_peak_memory_bytes():
    before = peak_memory_bytes()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    x += 1
    after = peak_memory_bytes()
    assert after >= before and after >= x.numel() * 4


def test_group_metrics():
    g = group_metrics(["loss", "policy_loss", "reward/mean", "reward/accuracy", "tool_call_rate", "tool_success_rate",
                       "response_len_mean", "clip_frac", "kl", "entropy", "tokens_per_s", "peak_memory_gb", "grad_norm", "foo"])
    assert g["loss"] == ["loss", "policy_loss"]
    assert g["reward"] == ["reward/mean", "reward/accuracy"]
    assert g["tools"] == ["tool_call_rate", "tool_success_rate"]
    assert g["length"] == ["response_len_mean"]
    assert g["policy"] == ["clip_frac", "kl", "entropy"]
    assert g["throughput"] == ["tokens_per_s"] and g["memory"] == ["peak_memory_gb"] and g["optim"] == ["grad_norm"]
    assert g["other"] == ["foo"]


def test_plot_run_writes_pngs(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False) as log:
        for s in range(1, 6):
            log.log({"step": s, "phase": "sft", "loss": 3.0 / s, "tokens_per_s": 100.0 + s, "peak_memory_gb": 0.5})
        for s in range(6, 11):
            log.log({"step": s, "phase": "rl", "loss": 0.1, "reward/mean": s / 10, "tool_call_rate": 0.5,
                     "clip_frac": 0.01, "response_len_mean": 40.0 + s})
    (tmp_path / "phases.json").write_text(json.dumps({"phases": [{"name": "sft", "start_step": 1, "end_step": 5},
                                                                 {"name": "rl", "start_step": 6, "end_step": 10}]}))
    (tmp_path / "demo_summary.json").write_text(json.dumps({"accuracy": {"before": 0.1, "after": 0.4}, "note": "x"}))
    paths = plot_run(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["length.png", "loss.png", "memory.png", "policy.png", "reward.png", "summary.png",
                     "throughput.png", "tools.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots"
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_plot_run_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_run(tmp_path)
