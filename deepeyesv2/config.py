"""Configuration: dataclasses with defaults, loadable from YAML, overridable from the CLI.

`deepeyesv2 rl --config run.yaml --rl.group_size 8` maps onto the same fields: YAML keys and dotted
CLI flags are the dataclass field names, and an unknown key is an error that names it.

Every config dataclass lives here and this module imports nothing else of the trainer: it is the bottom of
the package's import graph. The names a field may take (attention backends, LoRA targets, built-in rewards)
are defined here too, and the modules that implement them import these names (the kernels' loss modes come
from `deepeyesv2_kernels.grpo_terms`, the package below ours).
"""

from __future__ import annotations

import dataclasses
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
REPORTERS = ("jsonl", "tensorboard", "wandb")  # deepeyesv2.metrics.MetricsLogger


@dataclass
class ModelConfig:
    """Which policy to train. `name_or_path` is a preset name (random weights, tiny tokenizer) or a local
    directory holding a Qwen2.5-VL checkpoint (config, safetensors, tokenizer, preprocessor_config)."""

    name_or_path: str = "tiny"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_backend: str = "sdpa"  # sdpa | flash | xformers (see deepeyesv2.attention)
    seed: int = 0
    device: str = "auto"  # auto = this process's GPU if there is one, else cpu (deepeyesv2.precision)
    freeze_vision: bool = True
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward
    lora_rank: int = 0  # > 0: train LoRA adapters on the text model only (see deepeyesv2.lora); 0 = full fine-tune
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DataConfig:
    train_path: str = ""  # JSONL; SFT: trajectories (messages + images), RL: prompts
    eval_path: str = ""
    image_root: str = ""  # relative image paths resolve against this (default: the JSONL's folder)
    max_bad_lines: int = 0  # corrupt JSONL lines tolerated (counted, reported) before failing
    max_image_pixels: int = 89_478_485  # larger images are refused at load (PIL's decompression-bomb warning size)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    grad_accum: int = 1
    offload_states: bool = False  # AdamW moments + fp32 master weights in host memory (deepeyesv2.optim.OffloadedAdamW)


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
    resume: bool = False  # continue from the newest checkpoint in out_dir that verifies
    overwrite: bool = False  # clear a finished run's metrics and checkpoints in out_dir and start over
    progress: bool = True
    # where metrics go: jsonl (out_dir/metrics.jsonl, always written), tensorboard, wandb (WANDB_MODE=offline: no
    # network); a listed logger that is not installed is an error
    report_to: tuple[str, ...] = ("jsonl",)
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
    schedule: str = "async"  # async: every episode advances on its own, no turn barrier | turn_sync: all episodes one turn together
    tool_workers: int = 0  # threads running tool calls; 0 = one per episode of a rollout call (calls never queue)
    tool_timeout_s: float = 120.0  # a tool call still running after this ends its episode (tool_error); above the tools' own limits


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
    log_completions: int = 4  # episodes per step written to out_dir/completions.jsonl (turns, tool calls, reward); 0 = none


JUDGE_FAILURE_SCORES = ("rules", "zero")  # deepeyesv2.judge: how a verdict that failed after every retry is scored


@dataclass
class JudgeConfig:
    """An LLM judge served over an OpenAI-compatible chat endpoint (deepeyesv2.judge), used by RL and eval for
    answer_type 'judge' items and, with free_form, for free-form answers the rules reject."""

    url: str = ""  # LLM judge endpoint base, e.g. http://127.0.0.1:8000/v1 (vLLM / SGLang); "" = no judge, rules only
    model: str = ""  # the served judge model's name (vLLM --served-model-name); required with url
    temperature: float = 0.3  # judge sampling temperature (DeepEyesV2 samples its judge at 0.3)
    max_tokens: int = 512  # tokens per verdict (a short reasoning, then \boxed{yes} or \boxed{no})
    concurrency: int = 16  # judge requests in flight at once (a step's verdicts go out together)
    timeout_s: float = 60.0  # per judge request, seconds
    retries: int = 3  # further attempts after a timeout, connection error, HTTP 429/5xx, bad JSON or no verdict
    backoff_s: float = 1.0  # wait before the first retry; doubles each retry (with jitter, at most 30 s)
    on_failure: str = "rules"  # a verdict that failed every attempt scores: rules (the rule matcher's score) or zero
    free_form: bool = True  # also judge free-form answers the rules reject (else only answer_type 'judge' items)
    cache_size: int = 100_000  # verdicts kept, keyed by (question, answer, gold); 0 = no cache
    api_key_env: str = ""  # name of an environment variable holding the endpoint's API key (sent as Bearer); "" = none


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
    return Check(lambda v: v in values, "one of " + ", ".join(repr(x) for x in values))


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
        "rollout.sandbox_workers": integer(0),
        "rollout.code_timeout_s": number(0, lo_open=True),
        "rollout.schedule": one_of(*ROLLOUT_SCHEDULES),
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
        "rl.reward": Check(_reward_ok, "'deepeyesv2', 'deepeyes_v1' or a 'package.module:function' path"),
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


def error_line(e: BaseException) -> str:
    """One line for a config error: the first two non-empty lines of jsonargparse's message (the bad key and
    why) or of ours, joined."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2]) or repr(e)


def config_parser(prog: str = "deepeyesv2"):
    """jsonargparse parser over `Config`: `--config file.yaml` plus dotted overrides (`--rl.group_size 8`)."""
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
        raise ConfigError(error_line(e)) from None
    return validate(config_from_namespace(parser, ns))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
