"""`deepeyesv2 sft|rl --config f.yaml [--section.field value ...]`: the two training stages from a config.

Every value's range and allowed values are checked before any model or data is loaded; bad input (data,
config values, checkpoints, a failing reward function) ends with one line naming the file, line or key.
"""

from __future__ import annotations

import sys

from deepeyesv2.checkpoint import CheckpointError
from deepeyesv2.config import config_from_namespace, config_parser, error_line, validate
from deepeyesv2.rewards import RewardError
from deepeyesv2.rl import train_rl
from deepeyesv2.sft import train_sft

STAGES = {"sft": train_sft, "rl": train_rl}


def main(cmd: str, argv: list[str]) -> int:
    parser = config_parser(prog=f"deepeyesv2 {cmd}")
    try:
        cfg = validate(config_from_namespace(parser, parser.parse_args(argv)))
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
