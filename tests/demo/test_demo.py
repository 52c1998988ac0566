"""The demo's promise: reward rises through the recipe. The full run is slow; CI runs a shortened one."""

import json

import pytest

from deepeyesv2.demo.run import DemoSettings, run_demo
from deepeyesv2.demo.task import BUGGY_CODE, COUNT_CODE, count_image, count_prompts, expert_turn


def test_counting_program_is_exact_and_the_expert_copies_its_output():
    import random

    import numpy as np  # noqa: F401  (used by COUNT_CODE)

    rng = random.Random(0)
    for n in range(1, 10):
        blue = rng.randint(0, 5)
        ns = {"image_1": count_image(n, blue, rng)}
        out = []
        exec(COUNT_CODE.replace("print(", "out.append("), {**ns, "out": out})
        exec(BUGGY_CODE.replace("print(", "out.append("), {**ns, "out": out})
        assert [int(x) for x in out] == [n, n + blue]  # the buggy program counts the blue distractors too
    assert expert_turn("Code execution result:\nstdout:\n7\n\nstderr:\n", True, 3).endswith("<answer>7</answer>")
    assert expert_turn("Code execution result:\nstdout:\n7\n\nstderr:\n", True, 3, noise=1).endswith("<answer>8</answer>")
    assert COUNT_CODE in expert_turn("How many red dots?", True, 3)
    assert BUGGY_CODE in expert_turn("How many red dots?", True, 3, buggy=True)
    assert expert_turn("How many red dots?", False, 3).endswith("<answer>3</answer>")
    assert [p.answer for p in count_prompts(5, seed=1)] == [p.answer for p in count_prompts(5, seed=1)]
    assert {p.answer for p in count_prompts(64, seed=1, max_count=4)} == {"1", "2", "3", "4"}


def test_demo_short_run(tmp_path):
    """Shortened demo: SFT on the real-sandbox cold-start data must beat the untrained model, and the RL
    stage must run on tool rollouts and log its metrics."""
    s = DemoSettings.quick()
    s.out_dir = str(tmp_path / "demo")
    summary = run_demo(s, progress=False)
    res = summary["results"]
    assert res["before SFT"]["reward"] < 0.05
    assert res["after SFT"]["reward"] > res["before SFT"]["reward"] + 0.1
    assert res["after SFT"]["format"] > 0.5
    rows = [json.loads(line) for line in (tmp_path / "demo" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, s.rl_steps + 1))
    for key in ("reward", "reward_accuracy", "reward_format", "tool_call_rate", "clip_frac", "loss", "entropy"):
        assert key in rows[-1], key
    assert (tmp_path / "demo" / "demo_summary.json").exists()


@pytest.mark.slow
def test_demo_reward_rises_through_the_recipe(tmp_path):
    """The full demo (about 10 minutes on 2 cores): after RL > after SFT > before SFT on held-out prompts."""
    s = DemoSettings()
    s.out_dir = str(tmp_path / "demo")
    summary = run_demo(s, progress=False)
    res = summary["results"]
    assert res["after RL"]["reward"] > res["after SFT"]["reward"] > res["before SFT"]["reward"], res
    assert summary["ordering_ok"]
