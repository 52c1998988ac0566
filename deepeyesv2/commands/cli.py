"""`deepeyesv2` command line: one entry point, one sub-command per job.

    deepeyesv2 info                      versions, device, available backends (and why others are not)
    deepeyesv2 sft  --config f.yaml ...  cold-start SFT
    deepeyesv2 rl   --config f.yaml ...  GRPO/DAPO on multi-turn tool rollouts
    deepeyesv2 demo [--quick]            SFT then RL on the tiny model with tools (the CPU demo)
    deepeyesv2 bench [--quick]           benchmarks vs peers -> bench/results/<date>-<device>.md
    deepeyesv2 eval --model M --data F   accuracy per category with tool rollouts (RealX-Bench-style JSONL)
    deepeyesv2 plot RUN_DIR              PNG training curves
    deepeyesv2 plan --config f.yaml [--gpu-mem 24GiB]   predicted peak memory by component, what fits
    deepeyesv2 check-data FILE           validate SFT / RL data: format, images, placeholders, system prompt, protocol
    deepeyesv2 sandbox-server [--port 8000] [--token T]  our isolated sandbox over HTTP, DeepEyesV2's code-server API

Overrides use the config's dotted field names: `--rl.group_size 8 --train.steps 20`.
"""

from __future__ import annotations

import importlib
import sys

# command -> the module whose main(argv) runs it. Only the chosen command's module is imported, so `--help` and
# one command do not pay for every other command's imports.
COMMANDS = {
    "info": "deepeyesv2.commands.info",
    "sft": "deepeyesv2.commands.train",
    "rl": "deepeyesv2.commands.train",
    "demo": "deepeyesv2.demo.run",
    "bench": "deepeyesv2.commands.bench",
    "eval": "deepeyesv2.commands.eval",
    "plan": "deepeyesv2.commands.plan",
    "plot": "deepeyesv2.commands.plot",
    "check-data": "deepeyesv2.commands.check_data",
    "sandbox-server": "deepeyesv2_rollout.tools.sandbox_server",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"deepeyesv2: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd])
    return module.main(cmd, rest) if cmd in ("sft", "rl") else module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
