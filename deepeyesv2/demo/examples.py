"""Tiny SFT and RL data sets on the demo's counting task, for the example configs, the README and tests.

    python -m deepeyesv2.demo.examples examples/data      # writes sft.jsonl, rl.jsonl, images/*.png

SFT records use our "messages" layout (see deepeyesv2.data): the user asks how many red squares an image
holds; the assistant either writes the counting program (then a tool turn carries the sandbox's output
in the exact format the sandbox prints, and a final assistant turn copies the count), or answers
directly. RL records are RealX-Bench-like prompts with numeric answers. Everything is a pure function of
the seed, so the files are byte-identical across runs.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from deepeyesv2_rollout.protocol import SYSTEM_PROMPT
from deepeyesv2_rollout.tools.sandbox import format_code_result

from deepeyesv2.demo.task import ANSWER_TURN, GUESS_TURN, QUESTION, TOOL_TURN, count_image

IMAGE_DIR = "images"
SFT_FILE = "sft.jsonl"
RL_FILE = "rl.jsonl"


def _image(out: Path, name: str, n_red: int, rng: random.Random) -> str:
    rel = f"{IMAGE_DIR}/{name}.png"
    count_image(n_red, rng.randint(0, 5), rng).save(out / rel, optimize=True)
    return rel


def sft_record(image: str, n_red: int, use_tool: bool) -> dict:
    """One cold-start trajectory: tool use (code, observation, answer) or a direct answer."""
    user = {"role": "user", "content": "<image>" + QUESTION}
    if use_tool:
        turns = [{"role": "assistant", "content": TOOL_TURN},
                 {"role": "tool", "content": format_code_result(f"{n_red}\n", "")},
                 {"role": "assistant", "content": ANSWER_TURN.format(n=n_red)}]
    else:
        turns = [{"role": "assistant", "content": GUESS_TURN.format(n=n_red)}]
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, user, *turns], "images": [image]}


def write_examples(out_dir: str | Path, n_sft: int = 16, n_rl: int = 8, seed: int = 0,
                   tool_fraction: float = 0.5) -> dict[str, Path]:
    """Write out_dir/{sft.jsonl, rl.jsonl, images/}. Image paths in the JSONL are relative to out_dir
    (the loaders resolve them against the JSONL's folder). Returns {"sft": path, "rl": path}."""
    out = Path(out_dir)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with (out / SFT_FILE).open("w", encoding="utf-8") as f:
        for i in range(n_sft):
            n = rng.randint(1, 9)
            rec = sft_record(_image(out, f"sft_{i:03d}", n, rng), n, use_tool=rng.random() < tool_fraction)
            f.write(json.dumps(rec) + "\n")
    with (out / RL_FILE).open("w", encoding="utf-8") as f:
        for i in range(n_rl):
            n = rng.randint(1, 9)
            rec = {"id": f"count-{i:03d}", "question": QUESTION, "images": [_image(out, f"rl_{i:03d}", n, rng)],
                   "answer": str(n), "category": "perception", "answer_type": "numeric"}
            f.write(json.dumps(rec) + "\n")
    return {"sft": out / SFT_FILE, "rl": out / RL_FILE}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deepeyesv2.demo.examples", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?", default="examples/data")
    ap.add_argument("--sft", type=int, default=16, help="SFT trajectories")
    ap.add_argument("--rl", type=int, default=8, help="RL prompts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = write_examples(args.out_dir, args.sft, args.rl, args.seed)
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
