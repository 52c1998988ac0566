"""The README's CLI block, run as written: every line of the ```bash block under "## CLI" is one command, run in
order in a scratch directory that holds a copy of `examples/` (the commands write `examples/data` and `runs/`
relative to where they run) and the package folder (for `eval --data deepeyesv2/assets/...`). Each must exit 0;
a few outputs are checked for what the README says about them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from deepeyesv2.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def readme_cli_commands() -> list[str]:
    """The lines of the first ```bash block after the README's "## CLI" heading."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## CLI\n"):]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, "README's CLI section has no ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_cli_block_runs_as_written(tmp_path):
    commands = readme_cli_commands()
    assert any(c.startswith("torchrun ") for c in commands) and any(" plan " in c for c in commands)
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    # the package itself, not a copy: `python -m deepeyesv2` from this folder must import the installed code
    (tmp_path / "deepeyesv2").symlink_to(REPO / "deepeyesv2", target_is_directory=True)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's console scripts
    env["PET_MASTER_PORT"] = str(_free_port())  # torchrun's --master-port, without changing the command
    outputs = {}
    for line in commands:
        args = shlex.split(line, comments=True)
        if args[0] == "torchrun":
            env["PET_MASTER_PORT"] = str(_free_port())
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README command failed ({proc.returncode}): {line}\n{proc.stderr[-3000:]}"
        outputs[line] = proc.stdout + proc.stderr

    check = next(o for c, o in outputs.items() if "check-data" in c)
    assert "0 with problems" in check, check
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "rl" / "metrics.jsonl")][-2:] == [5, 6]
    assert (tmp_path / "runs" / "rl" / "plots" / "loss.png").is_file()
    plan = next(o for c, o in outputs.items() if " plan " in c)
    assert "assumed for the real architecture qwen2.5-vl-7b" in plan and "model.dtype=bfloat16" in plan, plan
    assert "way(s) to make it fit" in plan, plan
    for run in ("sft_tiny", "rl_tiny"):  # the torchrun runs, at the configs' out_dir
        assert (tmp_path / "runs" / run / "checkpoints" / "latest").is_file(), run
