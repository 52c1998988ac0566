"""Config values are checked up front, in one place (deepeyesv2.config.constraints): a bad value fails in one
line naming the dotted key and what is allowed -- from the CLI (exit 2), load_config, and train_sft /
train_rl (which the demo calls) -- before any model is built or data is read."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest

import deepeyesv2.rl as rl_mod
import deepeyesv2.sft as sft_mod
from deepeyesv2.commands.cli import main
from deepeyesv2.config import Config, ConfigError, constraints, load_config, validate
from deepeyesv2.demo.run import DemoSettings, demo_config

REPO = Path(__file__).resolve().parents[2]


class ModelBuilt(AssertionError):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Building a model (or reading data) is a failure here: validation must come first."""
    def build(*a, **k):
        raise ModelBuilt("the model was built before the config was checked")

    monkeypatch.setattr(sft_mod, "build_model", build)
    monkeypatch.setattr(rl_mod, "build_model", build)


BAD = [
    (["--train.steps", "-5"], "train.steps=-5: must be an integer >= 1"),
    (["--train.save_every", "0"], "train.save_every=0: must be an integer >= 1"),
    (["--rl.group_size", "1"], "rl.group_size=1: must be an integer >= 2"),
    (["--optim.lr=-1e-3"], "optim.lr=-0.001: must be a number >= 0"),
    (["--train.tokens_per_batch", "0"], "train.tokens_per_batch=0: must be an integer >= 1"),
    (["--rl.loss_agg", "foo"], "rl.loss_agg='foo': must be one of 'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum'"),
    (["--rollout.top_p", "0"], "rollout.top_p=0"),
    (["--model.dtype", "float8"], "model.dtype='float8': must be one of 'float32', 'bfloat16', 'float16'"),
    (["--rl.dual_clip", "0.5"], "rl.dual_clip=0.5: must be null or a number > 1"),
    (["--optim.betas", "[0.9, 1.5]"], "optim.betas"),
    (["--rl.kl_estimator", "k9"], "rl.kl_estimator='k9'"),
    (["--train.autocast", "fp8"], "train.autocast='fp8'"),
    (["--rl.overlong_buffer", "5000"], "rl.overlong_buffer=5000: must be smaller than rollout.max_total_tokens="),
    (["--train.resume", "true", "--train.overwrite", "true"], "choose one"),
]


@pytest.mark.parametrize("cmd", ["sft", "rl"])
@pytest.mark.parametrize("args, message", BAD, ids=[a[0] for a, _ in BAD])
def test_cli_rejects_bad_values_in_one_line_before_building_anything(cmd, args, message, no_model, tmp_path):
    config = REPO / "examples" / f"{cmd}_tiny.yaml"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([cmd, "--config", str(config), "--train.out_dir", str(tmp_path / "out"), *args])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_python_entry_points_validate_first(stage, no_model, tmp_path):
    cfg = Config()
    cfg.train.out_dir, cfg.train.save_every = str(tmp_path / "out"), 0
    cfg.data.train_path = str(tmp_path / "missing.jsonl")  # would fail later, naming the file
    train = sft_mod.train_sft if stage == "sft" else rl_mod.train_rl
    with pytest.raises(ConfigError, match=r"^train\.save_every=0: must be an integer >= 1$"):
        train(cfg)


def test_load_config_validates():
    with pytest.raises(ConfigError, match=r"rl\.group_size=1: must be an integer >= 2"):
        load_config(overrides={"rl.group_size": 1})


def test_every_field_has_a_constraint():
    keys = {f"{sec.name}.{f.name}" for sec in dataclasses.fields(Config)
            for f in dataclasses.fields(sec.default_factory())}
    table = set(constraints())
    assert keys - table == set(), f"fields without a constraint: {sorted(keys - table)}"
    assert table - keys == set(), f"constraints for no field: {sorted(table - keys)}"


def test_defaults_examples_and_demo_configs_are_valid():
    validate(Config())
    for name in ("sft_tiny.yaml", "rl_tiny.yaml"):
        load_config(REPO / "examples" / name)
    for settings in (DemoSettings(), DemoSettings.quick()):
        for stage in ("sft", "rl"):
            validate(demo_config(settings, stage))


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "--samples=0: must be an integer >= 1"),
    (["--temperature", "-1"], "--temperature=-1.0: must be a number >= 0"),
    (["--max-turns", "0"], "--max-turns=0: must be an integer >= 1"),
    (["--limit", "0"], "--limit=0: must be null or an integer >= 1"),
])
def test_eval_rejects_bad_flags_before_loading_the_model(args, message, monkeypatch, tmp_path, capsys):
    import deepeyesv2.model as model_mod
    from deepeyesv2.commands.eval import main as eval_main

    monkeypatch.setattr(model_mod, "build_model", lambda *a, **k: (_ for _ in ()).throw(ModelBuilt("built")))
    data = REPO / "deepeyesv2" / "assets" / "realx_sample" / "realx_sample.jsonl"
    assert eval_main(["--model", "tiny", "--data", str(data), "--out", str(tmp_path), *args]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], lines


def test_eval_refuses_a_corrupt_prompt_image_naming_file_line(monkeypatch, tmp_path, capsys):
    import json

    import deepeyesv2.model as model_mod
    from deepeyesv2.commands.eval import main as eval_main

    monkeypatch.setattr(model_mod, "build_model", lambda *a, **k: (_ for _ in ()).throw(ModelBuilt("built")))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (tmp_path / "bench.jsonl").write_text(json.dumps({"id": "a", "question": "q?", "answer": "1",
                                                      "images": ["broken.png"]}) + "\n")
    assert eval_main(["--model", "tiny", "--data", str(tmp_path / "bench.jsonl"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bench.jsonl:1: image 0" in err and "cannot decode image" in err, err


def test_demo_checks_both_stages_before_building_the_model(monkeypatch, tmp_path):
    import deepeyesv2.demo.run as demo_mod

    monkeypatch.setattr(demo_mod, "build_model", lambda *a, **k: (_ for _ in ()).throw(ModelBuilt("built")))
    s = DemoSettings.quick()
    s.out_dir, s.group_size = str(tmp_path / "demo"), 1
    with pytest.raises(ConfigError, match=r"^rl\.group_size=1: must be an integer >= 2$"):
        demo_mod.run_demo(s, progress=False)
