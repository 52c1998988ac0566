"""The demo's synthetic task, where a tool really helps: count the red dots in an image.

A tiny model cannot see single-pixel dots through 28-pixel image patches, but it can learn to write a
short program that counts them, run it in the sandbox, and copy the printed number into its answer.
The cold-start data comes from a scripted expert that always writes a program, but half the time the
*buggy* one, which counts every coloured dot (the blue distractors too). Both kinds of trajectory
teach the format and the copying; only the verifiable reward tells the programs apart, so choosing
the right program is what RL has to discover.
"""

from __future__ import annotations

import random
import re

import numpy as np
from PIL import Image

from deepeyesv2_rollout.types import Prompt

QUESTION = "How many red dots are in the image?"
# Every dot is a single pixel: invisible at the vision tower's 28-pixel merged patches, exact for code.
# Red pixels are the only ones whose red channel is over twice their blue channel (background grey,
# distractors blue). The program has no digit literals: digits elsewhere in the context would compete
# with the printed count that the answer must copy.
RED_TEST = "(r > b + b)"
# The buggy test: grey background has r == g, every dot has r != g -- so it counts red and blue dots.
BUGGY_TEST = "(r != g)"
_PROGRAM = (
    "import numpy as np\n"
    "r, g, b = [np.array(c).astype(int) for c in image_1.split()]\n"
    "print({test}.sum())"
)
# The two programs share their first 2 lines and the print( prefix: they part at a single token.
COUNT_CODE = _PROGRAM.format(test=RED_TEST)
BUGGY_CODE = _PROGRAM.format(test=BUGGY_TEST)
_TOOL_TURN = "<think>The dots are tiny. I will count them with code.</think><code>\n```python\n{code}\n```\n</code>"
TOOL_TURN = _TOOL_TURN.format(code=COUNT_CODE)
BUGGY_TOOL_TURN = _TOOL_TURN.format(code=BUGGY_CODE)
ANSWER_TURN = "<think>Done.</think><answer>{n}</answer>"
GUESS_TURN = "<think>I can see them.</think><answer>{n}</answer>"


def count_image(n_red: int, n_blue: int, rng: random.Random, size: int = 112) -> Image.Image:
    """size x size grey image with n_red red and n_blue blue single-pixel dots at distinct places."""
    a = np.full((size, size, 3), 235, dtype=np.uint8)
    cells = rng.sample(range(size * size), n_red + n_blue)
    for k, cell in enumerate(cells):
        a[cell // size, cell % size] = (220, 30, 30) if k < n_red else (30, 60, 220)
    return Image.fromarray(a)


def count_prompts(n: int, seed: int, prefix: str = "count", max_count: int = 9) -> list[Prompt]:
    """n questions with 1..max_count red dots each (plus 0-5 blue distractors)."""
    if not 1 <= max_count <= 9:
        raise ValueError(f"max_count must be in 1..9 (one digit token), got {max_count}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(1, max_count)
        img = count_image(k, rng.randint(0, 5), rng)
        out.append(Prompt(id=f"{prefix}-{seed}-{i}", question=QUESTION, answer=str(k), images=[img],
                          category="perception", answer_type="numeric"))
    return out


def right_program_rate(trajectories) -> float:
    """Share of episodes whose code calls include the correct counting program (not the buggy one)."""
    right = [any(c.name == "code" and RED_TEST in str(c.args.get("code", "")) for c in t.tool_calls)
             for t in trajectories]
    return sum(right) / max(1, len(right))


_STDOUT = re.compile(r"stdout:\n(.*?)\n", re.DOTALL)


def expert_turn(context_text: str, use_tool: bool, guess: int, noise: int = 0, buggy: bool = False) -> str:
    """The scripted cold-start policy: a program first (if use_tool; the buggy one if `buggy`), then copy
    the printed count -- off by `noise` (an optional noisy expert)."""
    if "Code execution result" in context_text:
        m = _STDOUT.findall(context_text)
        try:
            n = int(m[-1].strip()) + noise
        except (IndexError, ValueError):
            return ANSWER_TURN.format(n=0)
        return ANSWER_TURN.format(n=min(9, max(1, n)) if noise else n)
    if use_tool:
        return BUGGY_TOOL_TURN if buggy else TOOL_TURN
    return GUESS_TURN.format(n=guess)
