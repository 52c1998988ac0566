"""The demo's synthetic task, where a tool really helps: count the red squares in an image.

A tiny model cannot count small squares from 16 image tokens, but it can learn to write one fixed
program that counts them, run it in the sandbox, and copy the printed number into its answer.
The cold-start data mixes such tool trajectories with direct guesses (as a weak SFT policy would),
so RL has something to discover: calling the tool is what earns the accuracy reward.
"""

from __future__ import annotations

import random
import re

import numpy as np
from PIL import Image

from .data import PromptRecord

QUESTION = "How many red dots are in the image?"
# Every dot is a single pixel: invisible at the vision tower's 28-pixel merged patches, exact for code.
# Red pixels are the only ones whose red channel is over twice their blue channel (background grey,
# distractors blue). The program has no digit literals: digits elsewhere in the context would compete
# with the printed count that the answer must copy.
COUNT_CODE = (
    "import numpy as np\n"
    "r, g, b = [np.array(c).astype(int) for c in image_1.split()]\n"
    "print((r > b + b).sum())"
)
TOOL_TURN = "<think>The dots are tiny. I will count them with code.</think><code>\n```python\n" + COUNT_CODE + "\n```\n</code>"
ANSWER_TURN = "<think>Done.</think><answer>{n}</answer>"
GUESS_TURN = "<think>I can see them.</think><answer>{n}</answer>"


def count_image(n_red: int, n_blue: int, rng: random.Random, size: int = 112) -> Image.Image:
    """size x size grey image with n_red red and n_blue blue single-pixel dots at distinct places."""
    a = np.full((size, size, 3), 235, dtype=np.uint8)
    cells = rng.sample(range(size * size), n_red + n_blue)
    for k, cell in enumerate(cells):
        a[cell // size, cell % size] = (220, 30, 30) if k < n_red else (30, 60, 220)
    return Image.fromarray(a)


def count_prompts(n: int, seed: int, prefix: str = "count") -> list[PromptRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(1, 9)
        img = count_image(k, rng.randint(0, 5), rng)
        out.append(PromptRecord(id=f"{prefix}-{seed}-{i}", question=QUESTION, answer=str(k), images=[img],
                                category="perception", answer_type="numeric"))
    return out


_STDOUT = re.compile(r"stdout:\n(.*?)\n", re.DOTALL)


def expert_turn(context_text: str, use_tool: bool, guess: int, noise: int = 0) -> str:
    """The scripted cold-start policy: code first (if use_tool), then copy the printed count -- off by
    `noise` (a noisy expert; RL on the verifiable reward is what removes it)."""
    if "Code execution result" in context_text:
        m = _STDOUT.findall(context_text)
        try:
            n = int(m[-1].strip()) + noise
        except (IndexError, ValueError):
            return ANSWER_TURN.format(n=0)
        return ANSWER_TURN.format(n=min(9, max(1, n)) if noise else n)
    return TOOL_TURN if use_tool else GUESS_TURN.format(n=guess)
