"""A run directory works wherever a model path does, through one resolver (`deepeyesv2.model.resolve_model_path`):
SFT and RL (`model.name_or_path`), `eval --model` and `plan --model` take an SFT run's out_dir as its newest
verified checkpoint, saying so in one line; a Hub id is one line saying that nothing is downloaded and how to
fetch the weights; a run directory without a checkpoint that verifies is one line, not a tokenizer error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepeyesv2.checkpoint import checkpoints_dir
from deepeyesv2.commands.plan import load_arch
from deepeyesv2.config import Config, ModelConfig
from deepeyesv2.demo.examples import write_examples
from deepeyesv2.model import build_model, resolve_model_path
from deepeyesv2.sft import train_sft

REPO = Path(__file__).resolve().parents[2]
HUB_ID = "Qwen/Qwen2.5-VL-7B-Instruct"


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    code = "import sys; from deepeyesv2.commands.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def sft_config(data: Path, out: Path, name_or_path: str = "tiny", steps: int = 2) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name_or_path=name_or_path)
    cfg.data.train_path = str(data)
    cfg.train.out_dir = str(out)
    cfg.train.steps, cfg.train.save_every, cfg.train.progress = steps, 1, False
    cfg.train.tokens_per_batch = 2048
    cfg.optim.lr = 1e-3
    return cfg


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """(examples, run directory) of a 2-step tiny SFT run, a checkpoint at each step."""
    tmp = tmp_path_factory.mktemp("model_path")
    examples = write_examples(tmp / "data")
    train_sft(sft_config(examples["sft"], tmp / "sft"))
    return examples, tmp / "sft"


def test_presets_and_checkpoint_dirs_pass_through(sft_run, capfd):
    _, run = sft_run
    step = checkpoints_dir(run) / "step_000002"
    assert resolve_model_path("tiny") == "tiny"
    assert resolve_model_path(str(step)) == str(step)
    assert capfd.readouterr().err == ""  # nothing to say


def test_run_dir_is_its_newest_verified_checkpoint_in_one_line(sft_run, capfd):
    _, run = sft_run
    assert resolve_model_path(str(run)) == str(checkpoints_dir(run) / "step_000002")
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model.name_or_path" in lines[0] and "run directory" in lines[0], lines
    assert "step_000002" in lines[0]


def test_run_dir_falls_back_past_a_corrupt_checkpoint(sft_run, tmp_path, capfd):
    _, run = sft_run
    copy = tmp_path / "sft"
    shutil.copytree(run, copy)
    weights = checkpoints_dir(copy) / "step_000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert resolve_model_path(str(copy), what="--model") == str(checkpoints_dir(copy) / "step_000001")
    err = capfd.readouterr().err
    assert "--model:" in err and "step_000002 fails verification" in err and "falling back to step_000001" in err


def test_run_dir_without_checkpoints_and_other_strings_are_one_clear_error(tmp_path):
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="run directory without any checkpoint"):
        resolve_model_path(str(tmp_path / "fresh"))
    with pytest.raises(ValueError, match="neither a preset.*holds neither config.json nor checkpoints/"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_model_path(str(tmp_path / "a" / "b" / "missing"))


def test_hub_id_says_nothing_is_downloaded_and_how_to_fetch_it():
    with pytest.raises(ValueError) as e:
        resolve_model_path(HUB_ID)
    msg = str(e.value)
    assert "\n" not in msg and "nothing is downloaded at run time" in msg
    assert f"huggingface-cli download {HUB_ID} --local-dir models/Qwen2.5-VL-7B-Instruct" in msg
    assert "processor directory not found" not in msg


def test_build_model_from_a_run_dir_loads_its_checkpoint(sft_run):
    _, run = sft_run
    a, _ = build_model(ModelConfig(name_or_path=str(run)))
    b, _ = build_model(ModelConfig(name_or_path=str(checkpoints_dir(run) / "step_000002")))
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_sft_continues_from_a_run_dir(sft_run, tmp_path, capfd):
    examples, run = sft_run
    train_sft(sft_config(examples["sft"], tmp_path / "sft2", name_or_path=str(run), steps=1))
    assert (checkpoints_dir(tmp_path / "sft2") / "step_000001" / "config.json").is_file()
    assert "step_000002" in capfd.readouterr().err


def test_plan_takes_a_run_dir(sft_run):
    _, run = sft_run
    arch = load_arch(str(run))
    assert arch.hidden == json.loads((checkpoints_dir(run) / "step_000002" / "config.json").read_text())["text_config"]["hidden_size"]


def test_rl_and_eval_cli_take_a_run_dir_and_refuse_a_hub_id_in_one_line(sft_run, tmp_path):
    examples, run = sft_run
    proc = cli("rl", "--config", "examples/rl_tiny.yaml", "--model.name_or_path", str(run), "--train.steps", "1",
               "--train.out_dir", str(tmp_path / "rl"), "--rl.group_size", "2", "--rollout.max_new_tokens", "8",
               "--train.progress", "false")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "is a run directory" in proc.stderr and "step_000002" in proc.stderr
    assert (checkpoints_dir(tmp_path / "rl") / "step_000001" / "config.json").is_file()

    proc = cli("rl", "--config", "examples/rl_tiny.yaml", "--model.name_or_path", HUB_ID,
               "--train.out_dir", str(tmp_path / "rl_hub"), "--train.progress", "false")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "nothing is downloaded at run time" in line and "huggingface-cli download" in line

    proc = cli("eval", "--model", HUB_ID, "--data", "deepeyesv2/assets/realx_sample/realx_sample.jsonl")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("deepeyesv2 eval: --model") and "huggingface-cli download" in line
