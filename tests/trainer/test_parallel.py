"""FSDP2 data parallelism on 2 CPU ranks (gloo), launched by torchrun like a real job: the same losses,
gradient norms and final weights as a single-process run of the same steps (DDP-equivalent numerics,
up to float summation order), and checkpoints that single-process and distributed runs resume alike.

SFT first, then RL: each rank rolls out its share of the step's prompts on a full replica of the weights
and trains its shards. The RL step is set up so that the equivalence is not vacuous: 3 prompts per step
over 2 ranks (uneven: rank 1 runs zero-weighted padding passes), a reward with spread (so advantages and
gradients are non-zero), dynamic sampling with a refill round, two PPO epochs with old log-probs
recomputed on the rollout replica, and a KL term against a frozen reference."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from deepeyesv2.checkpoint import LATEST_FILE, checkpoints_dir
from deepeyesv2.config import Config, to_dict
from deepeyesv2.parallel import DataParallel, _fqn_to_index, _index_to_fqn, is_distributed
from deepeyesv2.demo.examples import write_examples
from deepeyesv2.metrics import read_metrics
from deepeyesv2.model import ModelConfig
from deepeyesv2.rl import train_rl
from deepeyesv2.sft import train_sft

STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_config(out: Path, train_path: Path, resume: bool = False) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name_or_path="tiny", seed=0)
    cfg.data.train_path = str(train_path)
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 1
    # 2 rows per step: one per rank. Rows hold 1-2 samples of different lengths, so ranks see different
    # token counts and only the global normalisation makes the gradients agree.
    cfg.train.out_dir, cfg.train.steps, cfg.train.epochs, cfg.train.save_every = str(out), STEPS, 10, 2
    cfg.train.tokens_per_batch, cfg.train.rows_per_step = 700, 2
    cfg.train.progress, cfg.train.resume = False, resume
    return cfg


def cli_overrides(cfg: Config) -> list[str]:
    return ["--model.name_or_path", "tiny", "--data.train_path", cfg.data.train_path,
            "--optim.lr", str(cfg.optim.lr), "--optim.warmup_steps", str(cfg.optim.warmup_steps),
            "--train.out_dir", cfg.train.out_dir, "--train.steps", str(cfg.train.steps),
            "--train.epochs", str(cfg.train.epochs), "--train.save_every", str(cfg.train.save_every),
            "--train.tokens_per_batch", str(cfg.train.tokens_per_batch),
            "--train.rows_per_step", str(cfg.train.rows_per_step), "--train.progress", "false",
            "--train.resume", "true" if cfg.train.resume else "false"]


def torchrun_sft(cfg: Config, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "deepeyesv2", "sft", *cli_overrides(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def point_latest_at(out: Path, step: int) -> None:
    """Simulate a run that died after the checkpoint at `step`: later checkpoints never happened."""
    root = checkpoints_dir(out)
    for d in root.glob("step_*"):
        if int(d.name.split("_")[1]) > step:
            shutil.rmtree(d)
    (root / LATEST_FILE).write_text(f"step_{step:06d}\n")


def assert_close_curves(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra["trained_tokens"] == rb["trained_tokens"] and ra["tokens"] == rb["tokens"], f"step {ra['step']}: data differs"
        assert ra["lr"] == rb["lr"], f"step {ra['step']}: lr"
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), f"step {ra['step']}: loss {ra['loss']} vs {rb['loss']}"
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4), f"step {ra['step']}: grad_norm"


def assert_close_weights(a: Path, b: Path, atol: float = 1e-4) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    moved = 0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"weight {k}: {m}")
    init = load_file(a.parent / "step_000002" / "model.safetensors") if (a.parent / "step_000002").exists() else None
    if init is not None:
        moved = sum(not torch.equal(init[k], wa[k]) for k in wa)
        assert moved > 0, "weights did not change between checkpoints: the comparison would be vacuous"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A single-process reference run and a 2-rank FSDP2 run of the same STEPS steps."""
    tmp = tmp_path_factory.mktemp("dist")
    data = write_examples(tmp / "data", n_sft=8, n_rl=1, seed=5)
    train_sft(sft_config(tmp / "single", data["sft"]))
    torchrun_sft(sft_config(tmp / "fsdp", data["sft"]))
    return {"single": tmp / "single", "fsdp": tmp / "fsdp", "data": data["sft"]}


def assert_same_run(out, reference) -> None:
    """`out` logged the same loss curve as `reference` and ended with the same weights."""
    assert_close_curves(read_metrics(out / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl"))
    last = f"step_{STEPS:06d}"
    assert_close_weights(checkpoints_dir(out) / last, checkpoints_dir(reference) / last)


def test_fsdp2_two_ranks_match_single_process(runs):
    single, fsdp = runs["single"], runs["fsdp"]
    assert_same_run(fsdp, single)
    last = f"step_{STEPS:06d}"
    # the distributed checkpoint is a normal HF directory with the single-process optimizer layout
    st_f = torch.load(checkpoints_dir(fsdp) / last / "trainer_state.pt", weights_only=True)
    st_s = torch.load(checkpoints_dir(single) / last / "trainer_state.pt", weights_only=True)
    assert st_f["optimizer"]["param_groups"][0]["params"] == st_s["optimizer"]["param_groups"][0]["params"]
    for i, s in st_s["optimizer"]["state"].items():
        torch.testing.assert_close(st_f["optimizer"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"], atol=1e-9, rtol=1e-3)
    assert st_f["data_state"] == st_s["data_state"] and st_f["scheduler"] == st_s["scheduler"]


def test_single_process_resumes_a_distributed_checkpoint(runs, tmp_path):
    """Kill the FSDP2 run after its step-2 checkpoint; a single process resumes it and ends where the
    uninterrupted runs did."""
    out = tmp_path / "resumed"
    shutil.copytree(runs["fsdp"], out)
    point_latest_at(out, 2)
    train_sft(sft_config(out, runs["data"], resume=True))
    assert_same_run(out, runs["single"])


@pytest.mark.slow  # a second torchrun launch (~20 s)
def test_fsdp2_resumes_a_single_process_checkpoint(runs, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(runs["single"], out)
    point_latest_at(out, 2)
    torchrun_sft(sft_config(out, runs["data"], resume=True))
    assert_same_run(out, runs["single"])


def test_optimizer_layout_round_trip():
    sd = {"state": {"b.w": {"step": 1}, "a.w": {"step": 2}}, "param_groups": [{"lr": 0.1, "params": ["a.w", "b.w"]}]}
    fqns = ["a.w", "b.w"]
    idx = _fqn_to_index(sd, fqns)
    assert idx == {"state": {1: {"step": 1}, 0: {"step": 2}}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    assert _index_to_fqn(idx, fqns) == sd


def test_not_distributed_without_torchrun(tmp_path):
    assert not is_distributed()
    with pytest.raises(RuntimeError, match="process group"):
        DataParallel.shard(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- RL

RL_STEPS = 3
# Differ legitimately between one process and two ranks: wall clock, memory, cache hit counts.
RL_VOLATILE = ("tokens_per_s", "generated_tokens_per_s", "rollout_s", "train_s", "peak_memory_gb", "time")

REWARD_MODULE = '''
from deepeyesv2.rewards import RewardResult

def spread(inp):
    """A reward with spread for a random policy: the response's character count mod 5."""
    r = (len(inp.response_text) % 5) / 4
    return RewardResult(r, {"spread": r})
'''


def rl_config(out: Path, train_path: Path, resume: bool = False) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name_or_path="tiny", seed=0)
    cfg.data.train_path = str(train_path)
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 1
    cfg.train.out_dir, cfg.train.steps, cfg.train.save_every, cfg.train.seed = str(out), RL_STEPS, 2, 11
    cfg.train.tokens_per_batch, cfg.train.progress, cfg.train.resume = 600, False, resume
    cfg.rollout.max_new_tokens, cfg.rollout.max_turns, cfg.rollout.max_total_tokens = 8, 1, 512
    cfg.rollout.sandbox_workers = 0
    cfg.rl.reward = "spread_reward:spread"
    cfg.rl.prompts_per_step, cfg.rl.group_size = 3, 3
    cfg.rl.dynamic_sampling, cfg.rl.max_refill_rounds = True, 1
    cfg.rl.ppo_epochs, cfg.rl.mini_batches, cfg.rl.recompute_old_logprobs = 2, 1, True
    cfg.rl.kl_coef = 0.01
    return cfg


def torchrun_rl(cfg: Config, tmp: Path, nproc: int = 2) -> None:
    path = tmp / f"rl-{free_port()}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "deepeyesv2", "rl", "--config", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def assert_same_rl_curves(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, RL_STEPS + 1))
    for ra, rb in zip(a, b):
        keys = {k for k in ra if k not in RL_VOLATILE and not k.startswith("engine_")}
        assert keys == {k for k in rb if k not in RL_VOLATILE and not k.startswith("engine_")}
        for k in keys:
            # rewards, counts and lengths are exact (same sampled tokens); losses and norms up to float
            # summation order over ranks
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), f"step {ra['step']}: {k} {ra[k]} vs {rb[k]}"


@pytest.fixture(scope="module")
def rl_runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dist_rl")
    (tmp / "spread_reward.py").write_text(textwrap.dedent(REWARD_MODULE))
    data = write_examples(tmp / "data", n_sft=1, n_rl=8, seed=2)
    sys.path.insert(0, str(tmp))
    try:
        train_rl(rl_config(tmp / "single", data["rl"]))
    finally:
        sys.path.remove(str(tmp))
        sys.modules.pop("spread_reward", None)
    torchrun_rl(rl_config(tmp / "fsdp", data["rl"]), tmp)
    return {"tmp": tmp, "single": tmp / "single", "fsdp": tmp / "fsdp", "data": data["rl"]}


def test_fsdp2_rl_matches_single_process(rl_runs):
    single = read_metrics(rl_runs["single"] / "metrics.jsonl")
    # the comparison means something only if the policy moved and the refill path ran
    assert all(r["grad_norm"] > 0 for r in single)
    assert any(r["groups_dropped"] > 0 for r in single)
    assert all(r["groups_sampled"] >= 3 for r in single)
    assert_same_rl_curves(read_metrics(rl_runs["fsdp"] / "metrics.jsonl"), single)
    last = f"step_{RL_STEPS:06d}"
    assert_close_weights(checkpoints_dir(rl_runs["fsdp"]) / last, checkpoints_dir(rl_runs["single"]) / last)


@pytest.mark.slow  # a second torchrun launch
def test_fsdp2_rl_resumes_its_checkpoint(rl_runs):
    """Kill the distributed run after its step-2 checkpoint; torchrun resumes it and ends where the
    single process did (weights, optimizer state and the rollout replica all come back)."""
    out = rl_runs["tmp"] / "resumed"
    shutil.copytree(rl_runs["fsdp"], out)
    point_latest_at(out, 2)
    torchrun_rl(rl_config(out, rl_runs["data"], resume=True), rl_runs["tmp"])
    assert_same_rl_curves(read_metrics(out / "metrics.jsonl"), read_metrics(rl_runs["single"] / "metrics.jsonl"))
    last = f"step_{RL_STEPS:06d}"
    assert_close_weights(checkpoints_dir(out) / last, checkpoints_dir(rl_runs["single"]) / last)
