"""Evaluation: run a policy through the same multi-turn tool rollout and score it with the RL rewards.

Reports, overall and per category: mean reward and its components (accuracy, format), tool-call rate,
tool success rate, mean turns, and which tools each category used (DeepEyesV2's analysis of
task-adaptive tool use: perception -> code, knowledge -> search, both -> combined). `transcript` is one
episode in readable form (every turn's text, what the environment answered, the tool calls, the images' sizes),
for eval_results.json and RL's completions.jsonl.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from deepeyesv2_rollout.types import Prompt, SamplingParams, Trajectory

from .rewards import RewardResult, reward_input_from_trajectory, score_batch, trajectory_turn_texts

TRANSCRIPT_CHARS = 2000  # per text field of a transcript (a turn, an observation, a tool output or argument)


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
                      temperature: float = 0.0, seed: int = 1234,
                      workers: int = 1) -> tuple[list[Trajectory], list[RewardResult]]:
    """`samples_per_prompt` episodes per prompt at `temperature` (0 = greedy) with sampling seeds from `seed`
    (the rollouts' own seed is restored after), each scored by `reward_fn` (all together, from `workers`
    threads: see rewards.score_batch)."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples must be >= 1, got {samples_per_prompt}")
    sampling = SamplingParams(**{**rollouts.sampling.__dict__, "temperature": temperature})
    saved_seed = rollouts.seed
    rollouts.seed = seed
    try:
        trajs = rollouts.run(prompts, samples_per_prompt, sampling)
    finally:
        rollouts.seed = saved_seed
    return trajs, score_batch([reward_input_from_trajectory(t, processor) for t in trajs], reward_fn, workers)


def format_table(rows: dict[str, dict], extra: tuple[str, ...] = ()) -> str:
    """Markdown table: one row per named summary (`extra`: further numeric keys of the summaries)."""
    cols = ["reward", "accuracy", "format", "tool_call_rate", "tool_success_rate", "mean_turns", *extra]
    lines = ["| | " + " | ".join(cols) + " | tools |", "|---" * (len(cols) + 2) + "|"]
    for name, s in rows.items():
        tools = ", ".join(f"{k} {v:.0%}" for k, v in s.get("tools", {}).items()) or "-"
        lines.append(f"| {name} | " + " | ".join(f"{s[c]:.3f}" for c in cols) + f" | {tools} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- transcripts
def clip_text(text: str | None, max_chars: int = TRANSCRIPT_CHARS) -> str | None:
    """`text` cut to max_chars, saying how much was cut."""
    if text is None or len(text) <= max_chars:
        return text
    return text[:max_chars] + f"...[{len(text) - max_chars} more chars]"


def _clip_value(v: Any, max_chars: int) -> Any:
    if isinstance(v, str):
        return clip_text(v, max_chars)
    if isinstance(v, dict):
        return {k: _clip_value(x, max_chars) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clip_value(x, max_chars) for x in v]
    return v


_EMPTY_IMAGE = re.compile(r"<\|vision_start\|><\|vision_end\|>")


def observation_texts(t: Trajectory, processor: Any) -> list[str | None]:
    """What followed each policy turn until the next one (the tool's reply as the policy saw it: the chat markup,
    the text after truncation, `<image>` for each image block), decoded from token_ids; None after the last turn
    when nothing but the turn's end followed. Needs `turn_spans`; [] without them."""
    spans = list(t.turn_spans)
    out: list[str | None] = []
    for i, (_, end) in enumerate(spans):
        stop = spans[i + 1][0] if i + 1 < len(spans) else len(t.token_ids)
        ids = [int(x) for x in t.token_ids[end:stop] if int(x) != processor.image_pad_id]
        if i + 1 == len(spans) and all(x == processor.im_end_id for x in ids):
            out.append(None)
            continue
        out.append(_EMPTY_IMAGE.sub("<image>", processor.decode(ids, skip_special_tokens=False)))
    return out


def transcript(t: Trajectory, processor: Any | None = None, max_chars: int = TRANSCRIPT_CHARS) -> dict:
    """One episode, readable: turns [{text, observation}] (the policy's text; what came back before its next turn,
    None without a processor or turn spans), tool_calls [{name, args, status, latency_s, error, output}], images
    [{width, height, source: input | tool}]. Every text is cut to max_chars."""
    if t.turn_texts or processor is not None:
        texts = trajectory_turn_texts(t, processor)
    else:
        texts = []
    obs = observation_texts(t, processor) if processor is not None and t.turn_spans else []
    obs = obs if len(obs) == len(texts) else [None] * len(texts)
    n_input = len(t.prompt.images) if t.prompt is not None else 0
    return {
        "turns": [{"text": clip_text(x, max_chars), "observation": clip_text(o, max_chars)} for x, o in zip(texts, obs)],
        "tool_calls": [{"name": c.name, "args": _clip_value(c.args, max_chars), "status": c.status,
                        "latency_s": c.latency_s, "error": clip_text(c.error, max_chars),
                        "output": clip_text(c.output, max_chars)} for c in t.tool_calls],
        "images": [{"width": im.width, "height": im.height, "source": "input" if k < n_input else "tool"}
                   for k, im in enumerate(t.images)],
    }


def completion_records(step: int, trajs: list[Trajectory], results: list[RewardResult], processor: Any, n: int,
                       seed: int, max_chars: int = TRANSCRIPT_CHARS) -> list[dict]:
    """`n` of the step's episodes (drawn with a generator seeded by (seed, step), so a resumed run logs the same
    ones) as completions.jsonl lines: step, id, sample, reward and its components, answer, gold, stop reason, and
    the transcript."""
    if len(trajs) != len(results):
        raise ValueError(f"{len(trajs)} trajectories but {len(results)} reward results")
    if n <= 0 or not trajs:
        return []
    rng = np.random.default_rng([seed, step])
    picks = sorted(rng.choice(len(trajs), size=min(n, len(trajs)), replace=False).tolist())
    out = []
    for i in picks:
        t, r = trajs[i], results[i]
        out.append({"step": step, "id": t.prompt_id, "sample": t.sample_index, "reward": r.total,
                    "components": dict(r.components), "answer": t.answer,
                    "gold": t.prompt.answer if t.prompt is not None else None, "stop_reason": t.stop_reason,
                    "error": t.error, **transcript(t, processor, max_chars)})
    return out


def append_jsonl(path: str | Path, records: list[dict]) -> None:
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, default=str) + "\n")


def truncate_jsonl_after(path: str | Path, step: int) -> None:
    """Keep the lines of a per-step JSONL whose "step" is <= `step` (a resumed run rewrites what follows); a line
    torn by a crash mid-write is dropped."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(ln)
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
