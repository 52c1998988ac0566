"""Bad input through the real entry points (train_sft, train_rl, load_config): one clear error that names
the file and line, the key, or the trajectory and function -- or a counted, reported skip -- and never a
silently wrong run (no metrics rows, no checkpoints after a failure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepeyesv2.config import Config, ConfigError, load_config
from deepeyesv2.data import DataError, DataWarning
from deepeyesv2.demo.examples import sft_record, write_examples
from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2.rewards import RewardError, RewardResult
from deepeyesv2.rl import train_rl
from deepeyesv2.sft import train_sft


@pytest.fixture(scope="module")
def tiny():
    return build_model(ModelConfig(name_or_path="tiny", seed=0))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_examples(tmp_path_factory.mktemp("data"), n_sft=3, n_rl=2, seed=1)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def sft_cfg(train_path: Path, out: Path, **train) -> Config:
    cfg = Config()
    cfg.data.train_path = str(train_path)
    cfg.train.out_dir, cfg.train.steps, cfg.train.tokens_per_batch, cfg.train.progress = str(out), 1, 512, False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def assert_nothing_written(out: Path) -> None:
    rows = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
    assert rows == "" and not (out / "checkpoints").exists(), "a failed run left metrics or checkpoints behind"


def good_lines(data) -> list[str]:
    return data["sft"].read_text().splitlines()


# --------------------------------------------------------------------------------------------- SFT data


def test_missing_image_names_file_line_and_image(tmp_path, data, tiny):
    lines = good_lines(data)
    lines.insert(1, json.dumps(sft_record("images/missing.png", 3, use_tool=False)))
    path = write_jsonl(data["sft"].parent / "missing_image.jsonl", lines)
    with pytest.raises(DataError, match=r"missing_image\.jsonl:2: image 0 .*missing\.png.*not found"):
        train_sft(sft_cfg(path, tmp_path / "out"), model=tiny[0], processor=tiny[1])
    assert_nothing_written(tmp_path / "out")


def test_corrupt_image_names_file_line(tmp_path, data, tiny):
    (data["sft"].parent / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = write_jsonl(data["sft"].parent / "corrupt_image.jsonl", [sft_record("images/broken.png", 3, use_tool=True)])
    with pytest.raises(DataError, match=r"corrupt_image\.jsonl:1: image 0 .*cannot decode image"):
        train_sft(sft_cfg(path, tmp_path / "out"), model=tiny[0], processor=tiny[1])


def test_corrupt_jsonl_line_fails_naming_the_line(tmp_path, data, tiny):
    lines = good_lines(data)
    lines.insert(2, '{"messages": [{"role": "user", "content": "hi"}')  # truncated mid-write
    path = write_jsonl(data["sft"].parent / "corrupt.jsonl", lines)
    with pytest.raises(DataError, match=r"corrupt\.jsonl:3: corrupt JSONL line.*max_bad_lines=0"):
        train_sft(sft_cfg(path, tmp_path / "out"), model=tiny[0], processor=tiny[1])
    assert_nothing_written(tmp_path / "out")


def test_corrupt_jsonl_line_is_a_counted_skip_when_tolerated(tmp_path, data, tiny):
    lines = good_lines(data)
    lines.insert(2, "not json at all")
    path = write_jsonl(data["sft"].parent / "tolerated.jsonl", lines)
    cfg = sft_cfg(path, tmp_path / "out")
    cfg.data.max_bad_lines = 1
    with pytest.warns(DataWarning, match=r"skipped 1 corrupt line\(s\) \(lines 3\)"):
        last = train_sft(cfg, model=tiny[0], processor=tiny[1])
    assert last["step"] == 1  # the good records still train


def test_missing_data_file(tmp_path, tiny):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        train_sft(sft_cfg(tmp_path / "nope.jsonl", tmp_path / "out"), model=tiny[0], processor=tiny[1])


def test_record_without_assistant_turn(tmp_path, tiny):
    path = write_jsonl(tmp_path / "no_answer.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"no_answer\.jsonl:1: no assistant turn"):
        train_sft(sft_cfg(path, tmp_path / "out"), model=tiny[0], processor=tiny[1])


def test_zero_length_assistant_answer(tmp_path, tiny):
    rec = {"messages": [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": ""}]}
    path = write_jsonl(tmp_path / "empty_answer.jsonl", [rec])
    with pytest.raises(DataError, match=r"empty_answer\.jsonl:1"):
        train_sft(sft_cfg(path, tmp_path / "out"), model=tiny[0], processor=tiny[1])


# ---------------------------------------------------------------------------------------------- RL data


def rl_cfg(train_path: Path, out: Path) -> Config:
    cfg = Config()
    cfg.data.train_path = str(train_path)
    cfg.train.out_dir, cfg.train.steps, cfg.train.progress = str(out), 1, False
    cfg.rollout.max_new_tokens, cfg.rollout.max_turns, cfg.rollout.sandbox_workers = 6, 1, 0
    cfg.rl.prompts_per_step, cfg.rl.group_size, cfg.rl.dynamic_sampling = 1, 2, False
    return cfg


def test_rl_prompt_with_missing_image(tmp_path, tiny):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "a", "question": "How many?", "answer": "3", "images": []},
        {"id": "b", "question": "How many?", "answer": "3", "images": ["gone.png"]},
    ])
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: image 0 not found: .*gone\.png"):
        train_rl(rl_cfg(path, tmp_path / "out"), model=tiny[0], processor=tiny[1])


def test_rl_prompt_with_empty_answer(tmp_path, tiny):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "question": "How many?", "answer": ""}])
    with pytest.raises(DataError, match=r"prompts\.jsonl:1"):
        train_rl(rl_cfg(path, tmp_path / "out"), model=tiny[0], processor=tiny[1])


def failing_reward(inp):
    raise KeyError("judge_score")


def nan_reward(inp):
    return RewardResult(float("nan"), {})


@pytest.mark.parametrize("fn, message", [
    (failing_reward, r"reward function \S*failing_reward failed on trajectory count-\d+#\d+: KeyError"),
    (nan_reward, r"reward function \S*nan_reward returned a non-finite reward nan for trajectory count-\d+#\d+"),
])
def test_reward_function_error_stops_the_run_naming_it(tmp_path, data, tiny, fn, message):
    out = tmp_path / "out"
    with pytest.raises(RewardError, match=message):
        train_rl(rl_cfg(data["rl"], out), model=tiny[0], processor=tiny[1], reward_fn=fn)
    assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------- config


def test_unknown_config_key_in_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rl:\n  group_size: 4\n  groupsize: 8\n")
    with pytest.raises(ConfigError, match="groupsize"):
        load_config(path)


@pytest.mark.parametrize("overrides, named", [
    ({"rl.group_sise": 4}, "group_sise"),
    ({"optimizer.lr": 1e-4}, "optimizer"),
    ({"train.steps": "ten"}, "train.steps"),
])
def test_bad_override_names_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*absent\.yaml"):
        load_config(tmp_path / "absent.yaml")
