"""Configuration: dataclasses with defaults, loadable from YAML, overridable from the CLI.

`deepeyesv2 rl --config run.yaml --rl.group_size 8` maps onto the same fields: YAML keys and dotted
CLI flags are the dataclass field names, and an unknown key is an error that names it.

Every config dataclass lives here and this module imports nothing else of the trainer: it is the bottom of
the package's import graph. The names a field may take (attention backends, LoRA targets, built-in rewards)
are defined here too, and the modules that implement them import these names (the kernels' loss modes come
from `deepeyesv2_kernels.grpo_terms`, the package below ours).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

# before jsonargparse is imported: its deprecation warnings are about its own API, not the user's config
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
from jsonargparse import ActionConfigFile, ArgumentParser  # noqa: E402

from deepeyesv2_kernels.grpo_terms import KL_ESTIMATORS, LOSS_AGGS

ATTN_BACKENDS = ("sdpa", "flash", "xformers")  # implemented in deepeyesv2.attention
LORA_ATTN_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})  # deepeyesv2.lora
LORA_MLP_TARGETS = frozenset({"gate_proj", "up_proj", "down_proj"})
REWARD_NAMES = ("deepeyesv2", "deepeyes_v1")  # deepeyesv2.rewards.REWARD_FNS' keys
ROLLOUT_SCHEDULES = ("async", "turn_sync")  # deepeyesv2_rollout.episode.SCHEDULES
PROTOCOLS = ("ours", "deepeyesv2")  # deepeyesv2_rollout.protocol.PROFILES
REPORTERS = ("jsonl", "tensorboard", "wandb")  # deepeyesv2.metrics.MetricsLogger


def setting(default: Any, help: str) -> Any:
    """A config field with its one-line help: `--help` shows it, followed by the allowed values from
    `constraints()` (tests/commands/test_help.py checks that every field has both)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """Which policy to train. `name_or_path` is a preset name (random weights, tiny tokenizer) or a local
    directory holding a Qwen2.5-VL checkpoint (config, safetensors, tokenizer, preprocessor_config)."""

    name_or_path: str = setting(
        "tiny", "the policy: a preset (tiny, small: random weights) or a local Qwen2.5-VL checkpoint directory")
    dtype: str = setting(
        "float32", "dtype of the weights (bfloat16 halves weight, gradient and optimizer memory of a real model)")
    attn_backend: str = setting(
        "sdpa", "attention over packed rows: sdpa (any device); flash, xformers need CUDA (see deepeyesv2 info)")
    seed: int = setting(0, "seed of the random weights of a preset (and of LoRA's initialisation)")
    device: str = setting("auto", "auto = this process's GPU if there is one, else cpu (deepeyesv2.precision)")
    freeze_vision: bool = setting(
        True, "keep the vision tower's weights fixed (DeepEyesV2 trains the language model only)")
    gradient_checkpointing: bool = setting(
        False, "recompute each decoder layer's activations in the backward (less memory, one more layer forward)")
    lora_rank: int = setting(
        0, "> 0: train LoRA adapters of this rank on the text model only (deepeyesv2.lora); 0 = full fine-tune")
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank)")
    lora_dropout: float = setting(0.0, "dropout on the LoRA adapters' input")
    lora_targets: tuple[str, ...] = setting(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "text-model projections that get LoRA adapters")


@dataclass
class DataConfig:
    train_path: str = setting(
        "", "JSONL (or a JSON array); SFT: trajectories, RL: prompts (deepeyesv2 check-data FILE checks one)")
    eval_path: str = setting("", "held-out data in the same layout (optional)")
    image_root: str = setting("", "relative image paths resolve against this folder (default: the data file's folder)")
    max_bad_lines: int = setting(0, "corrupt JSONL lines tolerated (counted, reported) before failing")
    max_image_pixels: int = setting(
        89_478_485, "larger images are refused at load (default: PIL's decompression-bomb warning size)")


@dataclass
class OptimConfig:
    lr: float = setting(1e-5, "peak learning rate of AdamW (0 = a dry run with the weights unchanged)")
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW (beta1, beta2)")
    warmup_steps: int = setting(0, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = setting(0.1, "the cosine decays to lr * min_lr_ratio (1.0 = constant after warm-up)")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = no clipping)")
    grad_accum: int = setting(1, "backward passes accumulated per optimizer step")
    offload_states: bool = setting(
        False, "keep AdamW moments and fp32 master weights in host memory (deepeyesv2.optim.OffloadedAdamW)")


@dataclass
class TrainConfig:
    out_dir: str = setting("runs/default", "run directory: metrics.jsonl, checkpoints/, plots/")
    steps: int = setting(100, "optimizer steps to run (SFT stops earlier when train.epochs are done)")
    epochs: int = setting(1, "SFT: passes over the data (train.steps caps it)")
    tokens_per_batch: int = setting(4096, "token budget of one packed row (sequences are packed first-fit-decreasing)")
    rows_per_step: int = setting(1, "SFT: packed rows per optimizer step (x grad_accum); with N ranks, at least N")
    save_every: int = setting(50, "write a checkpoint every this many steps (and at the end)")
    log_every: int = setting(1, "write a metrics.jsonl row every this many steps")
    seed: int = setting(0, "seed of data shuffling and sampling")
    resume: bool = setting(False, "continue from the newest checkpoint in out_dir that verifies")
    overwrite: bool = setting(False, "clear a finished run's metrics and checkpoints in out_dir and start over")
    progress: bool = setting(True, "show progress bars (off: one line per logged step)")
    report_to: tuple[str, ...] = setting(
        ("jsonl",), "where metrics go: jsonl (out_dir/metrics.jsonl, always written), tensorboard, wandb "
                    "(WANDB_MODE=offline: no network); a listed logger that is not installed is an error")
    autocast: str = setting(
        "auto",
        "auto = bf16 autocast on CUDA for fp32 weights, else off; bf16 = always; off = never (deepeyesv2.precision)")
    tf32: bool = setting(True, "on CUDA: run fp32 matmuls (lm-head kernels, engine logits) on tf32 tensor cores")
    logprob_tokens_budget: int = setting(
        0, "no-grad log-prob passes (old / reference) take at most this many tokens at once; 0 = a whole row")


@dataclass
class RolloutConfig:
    engine: str = setting(
        "embedded", "embedded (in process, radix prefix-KV cache) or sglang (GPU, pip install 'deepeyesv2[gpu]')")
    sglang_mem_fraction: float = setting(
        0.4, "GPU share SGLang reserves for weights + KV cache (the trainer shares the GPU)")
    temperature: float = setting(1.0, "sampling temperature (0 = greedy)")
    top_p: float = setting(1.0, "nucleus sampling mass")
    max_new_tokens: int = setting(256, "tokens the policy may write per turn")
    max_turns: int = setting(9, "policy turns per episode (tool calls + the answer)")
    max_total_tokens: int = setting(4096, "tokens per episode: prompt, policy turns and tool outputs together")
    max_images: int = setting(
        8, "images per episode (input + tool-returned); the episode stops at a tool output that would exceed it")
    cache_tokens: int = setting(200_000, "prefix-KV cache budget of the embedded engine, in tokens (0 = no cache)")
    max_running: int = setting(
        64, "embedded engine: sequences decoding at once (K/V pool slots); further requests wait for a free slot")
    max_seq_len: int = setting(
        32768, "embedded engine: context + new tokens one sequence may reach (a K/V slot's length)")
    prefill_tokens_per_step: int = setting(
        2048, "embedded engine: context tokens prefilled per scheduler step (longer contexts in chunks)")
    sandbox_workers: int = setting(4, "warm sandbox processes kept ready for code calls")
    code_timeout_s: float = setting(10.0, "wall-clock limit of one code call, seconds")
    schedule: str = setting(
        "async", "async: every episode advances on its own, no turn barrier; turn_sync: all episodes one turn together")
    tool_workers: int = setting(0, "threads running tool calls; 0 = one per episode of a rollout call (calls never queue)")
    tool_timeout_s: float = setting(
        120.0, "a tool call still running after this many seconds ends its episode (tool_error); above the tools' own limits")
    protocol: str = setting(
        "ours", "turn layout (rollout/protocol.py): ours, or deepeyesv2 (the released checkpoints' and cold-start data's)")
    system_prompt: str = setting(
        "", "system turn of SFT, RL, eval and the demo for records without one of their own; empty = the protocol's")


@dataclass
class RLConfig:
    prompts_per_step: int = setting(4, "prompts (groups) per RL step")
    group_size: int = setting(8, "samples per prompt (G); advantages are relative to the group")
    ppo_epochs: int = setting(1, "passes over each rollout batch")
    mini_batches: int = setting(1, "optimizer steps per rollout batch per epoch")
    clip_low: float = setting(0.2, "PPO clip range below 1: ratio >= 1 - clip_low")
    clip_high: float = setting(0.28, "PPO clip range above 1: ratio <= 1 + clip_high (DAPO clip-higher: > clip_low)")
    dual_clip: float | None = setting(None, "dual-clip bound c > 1 on negative-advantage tokens; null = off")
    kl_coef: float = setting(
        0.0, "weight of the KL penalty to the reference policy (0 = no reference; DeepEyesV2 trains without KL)")
    kl_estimator: str = setting(
        "k3", "KL estimator of the penalty (k1 = log-ratio, k2 = squared, k3 = unbiased low-variance)")
    ref_on_cpu: bool = setting(
        False, "full fine-tune: park the KL reference in host memory (LoRA: the base with adapters off, free)")
    loss_agg: str = setting(
        "token-mean",
        "loss averaging: token-mean (DAPO: each token alike), seq-mean-token-mean (GRPO: each sequence alike), ...")
    adv_norm: str = setting("std", "advantage normalisation: std (GRPO, divide by the group's std) or none (Dr.GRPO)")
    dynamic_sampling: bool = setting(True, "DAPO: drop groups whose rewards are all equal and refill")
    max_refill_rounds: int = setting(2, "DAPO dynamic sampling: extra rollout rounds to refill dropped groups")
    overlong_buffer: int = setting(
        0, "DAPO soft overlong penalty window (tokens before rollout.max_total_tokens); 0 = off")
    overlong_penalty: float = setting(1.0, "the overlong penalty at the limit (it grows linearly over the window)")
    entropy_coef: float = setting(0.0, "weight of the entropy bonus (0 = off)")
    recompute_old_logprobs: bool = setting(
        False, "recompute the old policy's log-probs before the update (else reuse the sampling-time ones)")
    reward: str = setting(
        "deepeyesv2", "reward function: a built-in name or a 'package.module:function' taking a RewardInput")
    log_completions: int = setting(
        4, "episodes per step written to out_dir/completions.jsonl (turns, tool calls, reward); 0 = none")


JUDGE_FAILURE_SCORES = ("rules", "zero")  # deepeyesv2.judge: how a verdict that failed after every retry is scored


@dataclass
class JudgeConfig:
    """An LLM judge served over an OpenAI-compatible chat endpoint (deepeyesv2.judge), used by RL and eval for
    answer_type 'judge' items and, with free_form, for free-form answers the rules reject."""

    url: str = setting(
        "", "LLM judge endpoint base, e.g. http://127.0.0.1:8000/v1 (vLLM / SGLang); \"\" = no judge, rules only")
    model: str = setting("", "the served judge model's name (vLLM --served-model-name); required with url")
    temperature: float = setting(0.3, "judge sampling temperature (DeepEyesV2 samples its judge at 0.3)")
    max_tokens: int = setting(512, "tokens per verdict (a short reasoning, then \\boxed{yes} or \\boxed{no})")
    concurrency: int = setting(16, "judge requests in flight at once (a step's verdicts go out together)")
    timeout_s: float = setting(60.0, "per judge request, seconds")
    retries: int = setting(
        3, "further attempts after a timeout, connection error, HTTP 429/5xx, bad JSON or no verdict")
    backoff_s: float = setting(1.0, "wait before the first retry; doubles each retry (with jitter, at most 30 s)")
    on_failure: str = setting(
        "rules", "a verdict that failed every attempt scores: rules (the rule matcher's score) or zero")
    free_form: bool = setting(
        True, "also judge free-form answers the rules reject (else only answer_type 'judge' items)")
    cache_size: int = setting(100_000, "verdicts kept, keyed by (question, answer, gold); 0 = no cache")
    api_key_env: str = setting(
        "", "name of an environment variable holding the endpoint's API key (sent as Bearer); \"\" = none")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------
# Constraints: one entry per field, checked by `validate` before anything is built (a bad value fails in one
# line naming the dotted key and what is allowed, instead of deep inside a step). tests/trainer/
# test_config_validation.py checks that every field of `Config` has an entry here.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A predicate on one field's value and the words that say what it allows."""

    ok: Callable[[Any], bool]
    allowed: str
    choices: tuple[str, ...] = ()  # the names an enum field takes (listed by --help; empty for ranges)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    words = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "") + (
        f" in [{lo}, {hi}]" if lo is not None and hi is not None else "")
    return Check(lambda v: isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)
                 and (hi is None or v <= hi), words)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite number in the interval; `lo_open` / `hi_open` exclude the bound."""
    def ok(v: Any) -> bool:
        if not _is_num(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or (v < hi if hi_open else v <= hi)

    if lo is not None and hi is not None:
        words = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        words = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        words = "a finite number"
    return Check(ok, words)


def one_of(*values: str) -> Check:
    return Check(lambda v: v in values, "one of " + ", ".join(repr(x) for x in values), choices=tuple(values))


def optional(check: Check) -> Check:
    return Check(lambda v: v is None or check.ok(v), f"null or {check.allowed}")


BOOL = Check(lambda v: isinstance(v, bool), "true or false")
TEXT = Check(lambda v: isinstance(v, str), "a string")
NONEMPTY = Check(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")


def _device_ok(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None


def _reward_ok(v: Any) -> bool:
    return isinstance(v, str) and (v in REWARD_NAMES or re.fullmatch(r"[\w.]+:[\w.]+", v) is not None)


def _judge_url_ok(v: Any) -> bool:
    return isinstance(v, str) and (v == "" or re.fullmatch(r"https?://\S+", v) is not None)


def _lora_targets_ok(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(t in LORA_ATTN_TARGETS | LORA_MLP_TARGETS for t in v)


def _reporters_ok(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(r in REPORTERS for r in v)


def _betas_ok(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v)


def constraints() -> dict[str, Check]:
    """Dotted key -> Check, for every field of Config."""
    return {
        "model.name_or_path": NONEMPTY,
        "model.dtype": one_of("float32", "bfloat16", "float16"),
        "model.attn_backend": one_of(*ATTN_BACKENDS),
        "model.seed": integer(0),
        "model.device": Check(_device_ok, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
        "model.freeze_vision": BOOL,
        "model.gradient_checkpointing": BOOL,
        "model.lora_rank": integer(0),
        "model.lora_alpha": number(0, lo_open=True),
        "model.lora_dropout": number(0, 1, hi_open=True),
        "model.lora_targets": Check(_lora_targets_ok, "a non-empty list of q_proj, k_proj, v_proj, o_proj, "
                                                      "gate_proj, up_proj, down_proj"),
        "data.train_path": TEXT,
        "data.eval_path": TEXT,
        "data.image_root": TEXT,
        "data.max_bad_lines": integer(0),
        "data.max_image_pixels": integer(1),
        "optim.lr": number(0),  # 0 is a legitimate dry run (rollouts and updates with the weights unchanged)
        "optim.weight_decay": number(0),
        "optim.betas": Check(_betas_ok, "two numbers in [0, 1)"),
        "optim.warmup_steps": integer(0),
        "optim.min_lr_ratio": number(0, 1),
        "optim.grad_clip": number(0),  # 0 = no clipping
        "optim.grad_accum": integer(1),
        "optim.offload_states": BOOL,
        "train.out_dir": NONEMPTY,
        "train.steps": integer(1),
        "train.epochs": integer(1),
        "train.tokens_per_batch": integer(1),
        "train.rows_per_step": integer(1),
        "train.save_every": integer(1),
        "train.log_every": integer(1),
        "train.seed": integer(0),  # numpy's default_rng takes non-negative seeds only
        "train.resume": BOOL,
        "train.overwrite": BOOL,
        "train.progress": BOOL,
        "train.report_to": Check(_reporters_ok, "a list of " + ", ".join(repr(r) for r in REPORTERS)),
        "train.autocast": one_of("auto", "bf16", "off"),
        "train.tf32": BOOL,
        "train.logprob_tokens_budget": integer(0),
        "rollout.engine": one_of("embedded", "sglang"),
        "rollout.sglang_mem_fraction": number(0, 1, lo_open=True, hi_open=True),
        "rollout.temperature": number(0),  # 0 = greedy
        "rollout.top_p": number(0, 1, lo_open=True),
        "rollout.max_new_tokens": integer(1),
        "rollout.max_turns": integer(1),
        "rollout.max_total_tokens": integer(1),
        "rollout.max_images": integer(0),
        "rollout.cache_tokens": integer(0),
        "rollout.max_running": integer(1),
        "rollout.max_seq_len": integer(1),
        "rollout.prefill_tokens_per_step": integer(1),
        "rollout.sandbox_workers": integer(0),
        "rollout.code_timeout_s": number(0, lo_open=True),
        "rollout.schedule": one_of(*ROLLOUT_SCHEDULES),
        "rollout.protocol": one_of(*PROTOCOLS),
        "rollout.system_prompt": TEXT,
        "rollout.tool_workers": integer(0),
        "rollout.tool_timeout_s": number(0, lo_open=True),
        "rl.prompts_per_step": integer(1),
        # one sample per group has advantage 0 (its own group mean): it would train on nothing, silently
        "rl.group_size": integer(2),
        "rl.ppo_epochs": integer(1),
        "rl.mini_batches": integer(1),
        "rl.clip_low": number(0, 1, hi_open=True),
        "rl.clip_high": number(0),
        "rl.dual_clip": optional(number(1, lo_open=True)),
        "rl.kl_coef": number(0),
        "rl.kl_estimator": one_of(*KL_ESTIMATORS),
        "rl.ref_on_cpu": BOOL,
        "rl.loss_agg": one_of(*LOSS_AGGS),
        "rl.adv_norm": one_of("std", "none"),
        "rl.dynamic_sampling": BOOL,
        "rl.max_refill_rounds": integer(0),
        "rl.overlong_buffer": integer(0),
        "rl.overlong_penalty": number(0),
        "rl.entropy_coef": number(),
        "rl.recompute_old_logprobs": BOOL,
        "rl.reward": Check(_reward_ok, "'deepeyesv2', 'deepeyes_v1' or a 'package.module:function' path",
                           choices=REWARD_NAMES),
        "rl.log_completions": integer(0),
        "judge.url": Check(_judge_url_ok, "'' or an http:// or https:// URL"),
        "judge.model": TEXT,
        "judge.temperature": number(0),
        "judge.max_tokens": integer(1),
        "judge.concurrency": integer(1),
        "judge.timeout_s": number(0, lo_open=True),
        "judge.retries": integer(0),
        "judge.backoff_s": number(0),
        "judge.on_failure": one_of(*JUDGE_FAILURE_SCORES),
        "judge.free_form": BOOL,
        "judge.cache_size": integer(0),
        "judge.api_key_env": TEXT,
    }


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_values(values: dict[str, tuple[Any, Check]]) -> None:
    """{name: (value, check)}: ConfigError "name=value: must be ..." for the first value its check refuses."""
    for key, (v, check) in values.items():
        if not check.ok(v):
            raise ConfigError(f"{key}={v!r}: must be {check.allowed}")


def validate(cfg: Config) -> Config:
    """Check every field's range or allowed values (and the few that constrain each other); ConfigError naming
    the dotted key and what is allowed. Returns cfg."""
    check_values({key: (_value(cfg, key), check) for key, check in constraints().items()})
    if cfg.rl.overlong_buffer >= cfg.rollout.max_total_tokens:
        raise ConfigError(f"rl.overlong_buffer={cfg.rl.overlong_buffer}: must be smaller than "
                          f"rollout.max_total_tokens={cfg.rollout.max_total_tokens} (the penalty starts at "
                          f"max_total_tokens - overlong_buffer)")
    if cfg.judge.url and not cfg.judge.model.strip():
        raise ConfigError(f"judge.url={cfg.judge.url!r} needs judge.model: the served judge model's name")
    if cfg.train.resume and cfg.train.overwrite:
        raise ConfigError("train.resume=True and train.overwrite=True: choose one (resume continues the run in "
                          "train.out_dir, overwrite clears it)")
    return cfg


def import_callable(spec: str, label: str) -> Callable:
    """`package.module:function` (a reward, a judge) -> the function; ValueError naming `label` and the spec."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{label} must look like 'package.module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{label} {spec!r}: cannot import {attr!r} from {module!r} ({e})") from None
    if not callable(fn):
        raise ValueError(f"{label} {spec!r} is not callable")
    return fn


def error_line(e: BaseException) -> str:
    """One line for a config error: the first two non-empty lines of jsonargparse's message (the bad key and
    why) or of ours, joined."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2]) or repr(e)


def field_help() -> dict[str, str]:
    """Dotted key -> the field's one-line help (its `setting(..., help)`), for every field of Config."""
    return {f"{section.name}.{f.name}": f.metadata.get("help", "")
            for section in dataclasses.fields(Config) for f in dataclasses.fields(section.default_factory)}


def config_parser(prog: str = "deepeyesv2", shown: tuple[str, ...] | None = None, description: str | None = None):
    """jsonargparse parser over `Config`: `--config file.yaml` plus dotted overrides (`--rl.group_size 8`).

    Each field's help is its one-line description and what `constraints()` allows. `shown`: the sections
    ("rl") or dotted keys ("rl.group_size") that `--help` lists (default: all); the others are still
    accepted, so one YAML serves every command, but a command's help lists only what it reads."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the fields below")
    parser.add_class_arguments(Config)
    helps, checks = field_help(), constraints()
    visible = {key for key in helps if shown is None or key in shown or key.split(".")[0] in shown}
    for action in parser._actions:  # jsonargparse keeps argparse's action list; no public setter for help
        if action.dest in helps:
            action.help = (f"{helps[action.dest]}. Allowed: {checks[action.dest].allowed}."
                           if action.dest in visible else argparse.SUPPRESS)
        elif action.dest in {f.name for f in dataclasses.fields(Config)}:  # `--rl CONFIG`: a section's own file
            action.help = (f"YAML file with {action.dest}.* fields"
                           if shown is None or action.dest in shown else argparse.SUPPRESS)
    titles = {f"<class '{s.default_factory.__module__}.{s.default_factory.__qualname__}'>": s.name
              for s in dataclasses.fields(Config)}
    for group in parser._action_groups:  # "<class 'deepeyesv2.config.RLConfig'>:" -> "rl:"
        group.title = titles.get(group.title, group.title)
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
        raise ConfigError(error_line(e)) from None
    return validate(config_from_namespace(parser, ns))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
