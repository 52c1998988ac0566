"""The `deepeyesv2` command end to end, in subprocesses, with the example configs exactly as a fresh clone
has them (run from the repository root): SFT and RL write metrics and loadable checkpoints, `plot` writes
PNGs, and bad configs / data fail with exit codes and messages that name the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepeyesv2.commands.cli import COMMANDS, main
from deepeyesv2.demo.examples import main as make_examples_main
from deepeyesv2.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`deepeyesv2 ARGS` as a user runs it (the console script's `main`), from the repository root."""
    code = "import sys; from deepeyesv2.commands.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_checkpoint(out: Path, step: int) -> Path:
    ckpt = out / "checkpoints" / f"step_{step:06d}"
    for name in ("config.json", "model.safetensors", "trainer_state.pt", "preprocessor_config.json"):
        assert (ckpt / name).is_file(), f"{ckpt} lacks {name}"
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    return ckpt


def test_example_data_is_in_sync_with_its_generator(tmp_path):
    assert make_examples_main([str(tmp_path)]) == 0
    for name in ("sft.jsonl", "rl.jsonl"):
        assert (tmp_path / name).read_text() == (REPO / "examples" / "data" / name).read_text(), (
            f"examples/data/{name} is stale: re-run python -m deepeyesv2.demo.examples examples/data")
    images = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert images == sorted(p.name for p in (REPO / "examples" / "data" / "images").iterdir())
    for rec in map(json.loads, (tmp_path / "sft.jsonl").read_text().splitlines()):
        assert (tmp_path / rec["images"][0]).read_bytes()[:8] == PNG_MAGIC


def test_sft_then_plot(tmp_path):
    out = tmp_path / "sft"
    proc = cli("sft", "--config", "examples/sft_tiny.yaml", "--train.steps", "2", "--train.out_dir", str(out),
               "--train.tokens_per_batch", "512", "--train.progress", "false")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] > 0 and r["trained_tokens"] > 0 for r in rows)
    assert max(r["lr"] for r in rows) == pytest.approx(1e-3)  # the YAML's lr
    assert_checkpoint(out, 2)

    proc = cli("plot", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    pngs = [Path(line) for line in proc.stdout.split() if line.endswith(".png")]
    assert any(p.name == "loss.png" for p in pngs), proc.stdout
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC, p


def test_rl_one_step(tmp_path):
    out = tmp_path / "rl"
    proc = cli("rl", "--config", "examples/rl_tiny.yaml", "--train.steps", "1", "--train.out_dir", str(out),
               "--rl.group_size", "2", "--rollout.max_new_tokens", "16", "--train.progress", "false")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = read_metrics(out / "metrics.jsonl")
    assert row["step"] == 1
    for key in ("reward", "loss", "clip_frac", "approx_kl", "entropy", "grad_norm", "groups_sampled",
                "tool_call_rate", "response_length", "trained_tokens", "rollout_s", "engine_tokens_decoded"):
        assert key in row, f"metrics.jsonl lacks {key}"
    assert row["groups_sampled"] >= 2 and row["trained_tokens"] > 0
    assert_checkpoint(out, 1)


@pytest.mark.parametrize("args, named", [
    (["--train.bogus_key", "3"], "bogus_key"),
    (["--train.steps", "many"], "train.steps"),
])
def test_bad_flag_exits_2_naming_it(args, named):
    proc = cli("sft", "--config", "examples/sft_tiny.yaml", *args)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_yaml_key_exits_2_naming_it(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  steps: 2\n  stepz: 3\n")
    proc = cli("rl", "--config", str(cfg))
    assert proc.returncode == 2 and "stepz" in proc.stderr, proc.stderr


def test_missing_data_file_is_one_clear_line(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = cli("sft", "--config", "examples/sft_tiny.yaml", "--data.train_path", str(missing), "--train.out_dir",
               str(tmp_path / "out"), "--train.progress", "false")
    assert proc.returncode == 1 and str(missing) in proc.stderr and "not found" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_command_answers_help(cmd, capsys):
    """Each command in the dispatcher's table imports and prints its usage for --help (exit 0)."""
    try:
        rc = main([cmd, "--help"])
    except SystemExit as e:  # argparse / jsonargparse exit after printing help
        rc = e.code
    out = capsys.readouterr()
    assert rc in (0, None), (cmd, out.err[-500:])
    assert "usage" in (out.out + out.err).lower(), (cmd, out.out[:300])


def test_plot_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl not found" in err[0]
