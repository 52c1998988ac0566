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

SQUARE = 6  # px; the counting program divides the red pixel count by SQUARE**2
QUESTION = "How many red squares are in the image?"
# Red pixels are the only ones whose red channel is over twice their blue channel (background is
# grey, distractors blue); kept short so a tiny model can learn to write it.
COUNT_CODE = (
    "import numpy as np\n"
    "a = np.array(image_1).astype(int)\n"
    f"print((a[:, :, 0] > 2 * a[:, :, 2]).sum() // {SQUARE * SQUARE})"
)
TOOL_TURN = "<think>I will count them with code.</think><code>\n```python\n" + COUNT_CODE + "\n```\n</code>"
ANSWER_TURN = "<think>Done.</think><answer>{n}</answer>"
GUESS_TURN = "<think>I can see them.</think><answer>{n}</answer>"


def count_image(n_red: int, n_blue: int, rng: random.Random, size: int = 112) -> Image.Image:
    """size x size light background with n_red red and n_blue blue non-overlapping SQUARE px squares."""
    a = np.full((size, size, 3), 235, dtype=np.uint8)
    cells = [(r, c) for r in range(size // (SQUARE * 2)) for c in range(size // (SQUARE * 2))]
    picks = rng.sample(cells, n_red + n_blue)
    for k, (r, c) in enumerate(picks):
        y, x = r * SQUARE * 2 + rng.randint(0, SQUARE - 1), c * SQUARE * 2 + rng.randint(0, SQUARE - 1)
        a[y : y + SQUARE, x : x + SQUARE] = (220, 30, 30) if k < n_red else (30, 60, 220)
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


def expert_turn(context_text: str, use_tool: bool, guess: int) -> str:
    """The scripted cold-start policy: code first (if use_tool), then copy the printed count."""
    if "Code execution result" in context_text:
        m = _STDOUT.findall(context_text)
        return ANSWER_TURN.format(n=(m[-1].strip() if m else "0"))
    return TOOL_TURN if use_tool else GUESS_TURN.format(n=guess)
