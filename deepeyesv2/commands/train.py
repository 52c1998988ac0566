"""`deepeyesv2 sft|rl --config f.yaml [--section.field value ...]`: the two training stages from a config.

Every value's range and allowed values are checked before any model or data is loaded; bad input (data,
config values, checkpoints, a failing reward function) ends with one line naming the file, line or key.
"""

from __future__ import annotations

import sys

from deepeyesv2.attention import backend_available
from deepeyesv2.checkpoint import CheckpointError
from deepeyesv2.config import Config, ConfigError, config_from_namespace, config_parser, error_line, validate
from deepeyesv2.precision import resolve_device
from deepeyesv2.rewards import RewardError
from deepeyesv2.rl import train_rl
from deepeyesv2.sft import train_sft

STAGES = {"sft": train_sft, "rl": train_rl}
# the config sections each stage reads, which its --help lists (the others are accepted: one YAML serves both)
SECTIONS = {"sft": ("model", "data", "optim", "train", "rollout.protocol", "rollout.system_prompt"), "rl": None}
DESCRIPTIONS = {"sft": "Cold-start SFT on tool-use trajectories (assistant turns trained, tool outputs masked).",
                "rl": "GRPO/DAPO on multi-turn tool rollouts."}


def check_attention(cfg: Config) -> None:
    """ConfigError when model.attn_backend cannot run here (flash / xformers need CUDA and their package), before
    transformers would fail with a message about its own kernel hub."""
    ok, why = backend_available(cfg.model.attn_backend)
    if ok and cfg.model.attn_backend != "sdpa" and resolve_device(cfg.model.device).type != "cuda":
        ok, why = False, f"needs a CUDA device (model.device={cfg.model.device!r} is not one)"
    if not ok:
        raise ConfigError(f"model.attn_backend={cfg.model.attn_backend!r} {why}: use 'sdpa' here "
                          f"(deepeyesv2 info lists the backends this machine has)")


def main(cmd: str, argv: list[str]) -> int:
    parser = config_parser(prog=f"deepeyesv2 {cmd}", shown=SECTIONS[cmd], description=DESCRIPTIONS[cmd])
    try:
        cfg = validate(config_from_namespace(parser, parser.parse_args(argv)))
        check_attention(cfg)
    except Exception as e:  # jsonargparse's errors and ours (ConfigError) name the bad key
        print(f"deepeyesv2 {cmd}: config error: {error_line(e)}", file=sys.stderr)
        return 2
    try:
        STAGES[cmd](cfg)
    except (ValueError, FileNotFoundError, CheckpointError, RewardError) as e:
        # the message names the file/line/key; a traceback from deep inside the trainer would only bury it
        print(f"deepeyesv2 {cmd}: error: {e}", file=sys.stderr)
        if "file not found" in str(e) and "examples/data" in str(e):
            print("  (generate the example data with: python -m deepeyesv2.demo.examples examples/data)", file=sys.stderr)
        return 1
    return 0
