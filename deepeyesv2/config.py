"""Configuration: dataclasses with defaults, loadable from YAML, overridable from the CLI.

`deepeyesv2 rl --config run.yaml --rl.group_size 8` maps onto the same fields: YAML keys and dotted
CLI flags are the dataclass field names, and an unknown key is an error that names it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .model import ModelConfig


@dataclass
class DataConfig:
    train_path: str = ""  # JSONL; SFT: trajectories (messages + images), RL: prompts
    eval_path: str = ""
    image_root: str = ""  # relative image paths resolve against this (default: the JSONL's folder)
    max_bad_lines: int = 0  # corrupt JSONL lines tolerated (counted, reported) before failing


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    grad_accum: int = 1
    offload_states: bool = False  # AdamW moments + fp32 master weights in host memory (deepeyesv2.memory)


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 100
    epochs: int = 1  # SFT: passes over the data (steps caps it)
    tokens_per_batch: int = 4096  # packing budget per packed row
    rows_per_step: int = 1  # packed rows per optimizer step (x grad_accum)
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    resume: bool = False
    progress: bool = True
    autocast: str = "auto"  # auto = bf16 autocast on CUDA for fp32 weights | bf16 | off (deepeyesv2.precision)
    tf32: bool = True  # on CUDA: fp32 matmuls (lm-head kernels, engine logits) on tf32 tensor cores
    logprob_tokens_budget: int = 0  # no-grad log-prob passes (old / reference) take <= this many tokens at once; 0 = a whole row


@dataclass
class RolloutConfig:
    engine: str = "embedded"  # embedded | sglang
    sglang_mem_fraction: float = 0.4  # GPU share SGLang reserves for weights + KV cache (the trainer shares the GPU)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256  # per policy turn
    max_turns: int = 9
    max_total_tokens: int = 4096
    max_images: int = 8
    cache_tokens: int = 200_000  # prefix-KV cache budget of the embedded engine
    sandbox_workers: int = 4
    code_timeout_s: float = 10.0


@dataclass
class RLConfig:
    prompts_per_step: int = 4
    group_size: int = 8
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per rollout batch per epoch
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher
    dual_clip: float | None = None
    kl_coef: float = 0.0  # DeepEyesV2 trains without KL
    kl_estimator: str = "k3"
    ref_on_cpu: bool = False  # full fine-tune KL reference parked in host memory (LoRA: base = adapters off, free)
    loss_agg: str = "token-mean"
    adv_norm: str = "std"  # std (GRPO) | none (Dr.GRPO)
    dynamic_sampling: bool = True  # DAPO: drop groups whose rewards are all equal, refill
    max_refill_rounds: int = 2
    overlong_buffer: int = 0  # DAPO soft overlong penalty window (tokens); 0 = off
    overlong_penalty: float = 1.0
    entropy_coef: float = 0.0
    recompute_old_logprobs: bool = False  # else reuse the sampling-time log-probs
    reward: str = "deepeyesv2"  # deepeyesv2 | deepeyes_v1 | a "module:function" path


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)


class ConfigError(ValueError):
    pass


def config_parser(prog: str = "deepeyesv2"):
    """jsonargparse parser over `Config`: `--config file.yaml` plus dotted overrides (`--rl.group_size 8`)."""
    import os

    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, exit_on_error=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the fields below")
    parser.add_class_arguments(Config)
    return parser


def config_from_namespace(parser, ns) -> Config:
    init = parser.instantiate(ns)
    return Config(**{f.name: getattr(init, f.name) for f in dataclasses.fields(Config)})


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Config from an optional YAML file and {"rl.group_size": 8}-style overrides; bad keys raise ConfigError."""
    argv: list[str] = []
    if path:
        if not Path(path).exists():
            raise ConfigError(f"config file not found: {path}")
        argv += ["--config", str(path)]
    for key, value in (overrides or {}).items():
        argv += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()]
    parser = config_parser()
    try:
        ns = parser.parse_args(argv)
    except Exception as e:  # jsonargparse raises ArgumentError/SystemExit-like errors with the key named
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ConfigError(" ".join(lines[:2]) or repr(e)) from None
    return config_from_namespace(parser, ns)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
