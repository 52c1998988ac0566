"""Evaluation: run a policy through the same multi-turn tool rollout and score it with the RL rewards.

Reports, overall and per category: mean reward and its components (accuracy, format), tool-call rate,
tool success rate, mean turns, and which tools each category used (DeepEyesV2's analysis of
task-adaptive tool use: perception -> code, knowledge -> search, both -> combined).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from deepeyesv2_rollout.types import Prompt, SamplingParams, Trajectory

from .rewards import RewardResult, reward_input_from_trajectory, score


def summarize(trajs: list[Trajectory], results: list[RewardResult]) -> dict:
    calls = [c for t in trajs for c in t.tool_calls]
    tools = Counter(c.name for c in calls)
    out = {
        "episodes": len(trajs),
        "reward": float(np.mean([r.total for r in results])) if results else 0.0,
        "accuracy": float(np.mean([r.components.get("accuracy", 0.0) for r in results])) if results else 0.0,
        "format": float(np.mean([r.components.get("format", 0.0) for r in results])) if results else 0.0,
        "tool_call_rate": float(np.mean([bool(t.tool_calls) for t in trajs])) if trajs else 0.0,
        "tool_success_rate": float(np.mean([c.status == "ok" for c in calls])) if calls else 0.0,
        "mean_turns": float(np.mean([t.num_turns for t in trajs])) if trajs else 0.0,
        "tools": {k: v / max(1, len(calls)) for k, v in sorted(tools.items())},
    }
    return out


def by_category(trajs: list[Trajectory]) -> dict[str, list[int]]:
    """Trajectory indices grouped by the prompt's category, categories sorted."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(trajs):
        groups[(t.prompt.category if t.prompt else "") or "unknown"].append(i)
    return dict(sorted(groups.items()))


def rollout_and_score(rollouts, processor, prompts: list[Prompt], reward_fn, samples_per_prompt: int = 1,
                      temperature: float = 0.0, seed: int = 1234) -> tuple[list[Trajectory], list[RewardResult]]:
    """`samples_per_prompt` episodes per prompt at `temperature` (0 = greedy) with sampling seeds from `seed`
    (the rollouts' own seed is restored after), each scored by `reward_fn`."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples must be >= 1, got {samples_per_prompt}")
    sampling = SamplingParams(**{**rollouts.sampling.__dict__, "temperature": temperature})
    saved_seed = rollouts.seed
    rollouts.seed = seed
    try:
        trajs = rollouts.run(prompts, samples_per_prompt, sampling)
    finally:
        rollouts.seed = saved_seed
    return trajs, [score(reward_input_from_trajectory(t, processor), reward_fn) for t in trajs]


def format_table(rows: dict[str, dict], extra: tuple[str, ...] = ()) -> str:
    """Markdown table: one row per named summary (`extra`: further numeric keys of the summaries)."""
    cols = ["reward", "accuracy", "format", "tool_call_rate", "tool_success_rate", "mean_turns", *extra]
    lines = ["| | " + " | ".join(cols) + " | tools |", "|---" * (len(cols) + 2) + "|"]
    for name, s in rows.items():
        tools = ", ".join(f"{k} {v:.0%}" for k, v in s.get("tools", {}).items()) or "-"
        lines.append(f"| {name} | " + " | ".join(f"{s[c]:.3f}" for c in cols) + f" | {tools} |")
    return "\n".join(lines)
