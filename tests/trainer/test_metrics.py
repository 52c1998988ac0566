"""Metrics JSONL rows, resume truncation, the optional loggers (TensorBoard, W&B: offline for real, and a fake module),
the console lines and no-update causes, peak memory, and the PNG plots made from a run directory."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from PIL import Image
from tqdm.auto import tqdm

from deepeyesv2.config import ConfigError
from deepeyesv2.metrics import (NO_UPDATE_CAUSES, MetricsLogger, UpdateCounter, check_reporters, console,
                                no_update_cause, peak_memory_bytes, quiet_hf_progress, read_metrics, step_line)
from deepeyesv2.commands.plot import group_metrics, plot_run


def test_rows_are_written_and_converted(tmp_path):
    with MetricsLogger(tmp_path) as log:
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
    with MetricsLogger(tmp_path) as log:
        for s in range(1, 8):
            log.log({"step": s, "loss": float(s)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "lo')  # a crash mid-write
    with MetricsLogger(tmp_path) as log:
        assert log.truncate_after(5) == 2
        log.log({"step": 6, "loss": 60.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0)]


def test_jsonl_only_by_default(tmp_path):
    with MetricsLogger(tmp_path) as log:
        log.log({"step": 1, "loss": 1.0})
    assert not log.tensorboard and not log.wandb
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_tensorboard_when_asked(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:  # asked for but missing: one error up front naming the key, not silently off
        with pytest.raises(ConfigError, match=r"train.report_to includes 'tensorboard'.*pip install tensorboard"):
            MetricsLogger(tmp_path, report_to=("jsonl", "tensorboard"))
        assert not (tmp_path / "metrics.jsonl").exists()
    else:
        with MetricsLogger(tmp_path, report_to=("tensorboard",)) as log:
            log.log({"step": 1, "loss": 1.0})
        assert any((tmp_path / "tensorboard").iterdir()) and (tmp_path / "metrics.jsonl").exists()


def test_unknown_or_missing_logger_is_a_config_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown logger 'mlflow'"):
        check_reporters(["jsonl", "mlflow"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, as when it is not installed
    with pytest.raises(ConfigError, match=r"train.report_to includes 'wandb'.*pip install wandb"):
        MetricsLogger(tmp_path, report_to=["wandb"])


class _FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


def test_wandb_gets_the_scalars_of_each_row_fake_module(tmp_path, monkeypatch):
    """The W&B calls, checked against a stand-in module (what the real one is given)."""
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    with MetricsLogger(tmp_path, report_to=("wandb",), run_name="r1", run_config={"rl": {"group_size": 4}}) as log:
        assert runs == []  # started by the first row, so only the rank that logs starts one
        log.log({"step": 1, "loss": torch.tensor(2.0), "phase": "sft", "ok": True, "bad": float("nan")})
        log.log({"step": 2, "loss": 1.5})
    (run,) = runs
    assert run.init == {"project": "deepeyesv2", "name": "r1", "dir": str(tmp_path), "config": {"rl": {"group_size": 4}}}
    assert run.logged == [(1, {"loss": 2.0}), (2, {"loss": 1.5})] and run.finished
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]  # jsonl as well


def test_wandb_offline_writes_the_run_without_network(tmp_path, monkeypatch):
    """The real package in offline mode (WANDB_MODE=offline): the run's records land under out_dir/wandb."""
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    with MetricsLogger(out, report_to=("jsonl", "wandb"), run_config={"train": {"steps": 2}}) as log:
        log.log({"step": 1, "loss_marker_a": 2.0})
        log.log({"step": 2, "loss_marker_a": 1.0})
    import wandb

    wandb.teardown()  # the service writes the record asynchronously; at exit this runs from wandb's atexit hook
    (record,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"loss_marker_a" in record.read_bytes()


def test_quiet_hf_progress_silences_and_restores_transformers_bars():
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with quiet_hf_progress():
        assert not hf_logging.is_progress_bar_enabled()
        bar = hf_logging.tqdm(range(3), desc="Writing model shards")
        assert not isinstance(bar, tqdm)  # transformers' EmptyTqdm: nothing drawn
    assert hf_logging.is_progress_bar_enabled()


def test_console_lines_go_through_a_shown_bar(capsys):
    bar = tqdm(total=2, file=sys.stderr, disable=False)
    console("saved checkpoint to x", bar)
    bar.close()
    console("rl done")
    err = capsys.readouterr().err
    assert "saved checkpoint to x\n" in err and err.endswith("rl done\n")
    row = {"step": 3, "loss": 0.0, "grad_norm": 0.0, "lr": 1e-05, "trained_tokens": 7}
    assert step_line("rl", row, 10, ("reward", "loss", "grad_norm", "lr"), "equal_rewards") == \
        "rl step 3/10: loss 0 grad_norm 0 lr 1e-05 [no update: equal_rewards]"


def test_no_update_causes_and_one_warning_each():
    row = {"trained_tokens": 10, "lr": 1e-5, "grad_norm": 0.5}
    assert no_update_cause(row) is None
    assert no_update_cause({**row, "grad_norm": 0.0}, all_groups_equal=True) == "equal_rewards"
    assert no_update_cause({**row, "grad_norm": 0.0}) == "zero_gradient"
    assert no_update_cause({**row, "lr": 0.0}) == "zero_lr"
    assert no_update_cause({"trained_tokens": 0, "lr": 1e-5}) == "no_trained_tokens"
    assert set(NO_UPDATE_CAUSES) == {"equal_rewards", "zero_gradient", "zero_lr", "no_trained_tokens"}
    c = UpdateCounter(start=2)
    first = c.observe("equal_rewards")
    assert first.startswith("deepeyesv2: warning: step without a weight update (equal_rewards): ")
    assert "SFT checkpoint" in first
    assert c.observe("equal_rewards") is None and c.observe(None) is None
    assert c.observe("zero_lr") is not None
    assert c.steps_without_update == 5
    assert c.summary() == "5 steps without update (2 before the resume, equal_rewards 2, zero_lr 1)"
    assert UpdateCounter().summary() == "0 steps without update"


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
    with MetricsLogger(tmp_path) as log:
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
