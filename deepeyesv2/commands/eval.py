"""`deepeyesv2 eval`: run a checkpoint through the multi-turn tool rollout on a JSONL benchmark and score it.

    deepeyesv2 eval --model PATH_OR_PRESET --data FILE.jsonl [--samples N] [--temperature T] [--out DIR]
                    [--judge URL --judge-model NAME | --judge module:function] [--max-turns 9] [--max-new-tokens 256]
                    [--limit N]

The data is RealX-Bench-shaped JSONL (`deepeyesv2.data.load_prompts`): id, question, images, answer, category
(perception | search | reasoning | integration, or any other label), answer_type (auto | exact | numeric |
choice | judge). Episodes run exactly as in RL (same engine, tools, sandbox and limits), greedy by default.
Correctness is the `accuracy` component of the RL reward (`deepeyesv2.rewards.match_answer`: one matcher for
training and evaluation). A judge scores answer_type 'judge' items and the free-form answers the rules reject:
`--judge http://host:8000/v1 --judge-model NAME` asks an OpenAI-compatible chat endpoint (vLLM / SGLang; see
deepeyesv2.judge: boxed yes/no, concurrent, retried, cached, failures counted and scored by --judge-on-failure),
`--judge module:function` plugs in judge(question, pred, gold) -> [0, 1]. Printed and written to DIR: accuracy,
reward, format, tool-call rate, tool success rate, mean turns and the share of each tool among the calls, overall
and per category (eval_table.md), plus every episode (eval_results.json): its prediction and scores, every turn's
text with what the environment answered, the tool calls with their outputs (each text cut to 2,000 characters)
and the images' sizes; with an endpoint judge, its request, failure and cache-hit counts. `python scripts/realx_sample.py` (in a checkout) writes a 16-item synthetic sample
(shipped at deepeyesv2/assets/realx_sample/realx_sample.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from deepeyesv2.config import (PROTOCOLS, Config, JudgeConfig, ModelConfig, check_values, constraints, integer, number,
                               import_callable, one_of, optional)
from deepeyesv2.checkpoint import read_protocol
from deepeyesv2.data import DataError, load_prompts
from deepeyesv2.judge import JudgeClient
from deepeyesv2.model import PRESETS, build_model, resolve_model_path
from deepeyesv2.rewards import RewardResult, build_reward_fn
from deepeyesv2.rollout_setup import make_rollouts
from deepeyesv2.scoring import TRANSCRIPT_CHARS, by_category, rollout_and_score, summarize, transcript
from deepeyesv2_rollout.tools.registry import default_registry
from deepeyesv2_rollout.types import Prompt, Trajectory

TABLE_COLUMNS = ("accuracy", "reward", "format", "tool_call_rate", "tool_success_rate", "mean_turns")


@dataclass
class EvalSettings:
    model: str = "tiny"
    data: str = ""
    samples: int = 1
    temperature: float = 0.0  # 0 = greedy
    out: str = "runs/eval"
    judge: str | None = None  # an http(s) endpoint URL (OpenAI-compatible chat) or "module:function"
    judge_model: str = ""  # the endpoint's served model name
    judge_temperature: float = JudgeConfig.temperature
    judge_concurrency: int = JudgeConfig.concurrency
    judge_timeout_s: float = JudgeConfig.timeout_s
    judge_retries: int = JudgeConfig.retries
    judge_on_failure: str = JudgeConfig.on_failure
    judge_free_form: bool = JudgeConfig.free_form
    reward: str = "deepeyesv2"
    max_turns: int = 9
    max_new_tokens: int = 256
    max_total_tokens: int = 8192
    limit: int | None = None  # first N prompts only
    seed: int = 1234
    image_root: str | None = None
    corpus: str | None = None  # search corpus JSONL (default: the shipped one)
    sandbox_workers: int = 2
    code_timeout_s: float = 20.0
    dtype: str = "float32"
    progress: bool = True
    protocol: str | None = None  # turn layout (rollout.protocol); None: the checkpoint's (protocol.json), else ours
    system_prompt: str | None = None  # None: the one the checkpoint was trained under, else the protocol's


def check_settings(s: EvalSettings) -> None:
    """Every numeric flag's range, before the model or data is loaded (ConfigError naming the flag)."""
    check_values({
        "--samples": (s.samples, integer(1)), "--temperature": (s.temperature, number(0)),
        "--max-turns": (s.max_turns, integer(1)), "--max-new-tokens": (s.max_new_tokens, integer(1)),
        "--max-total-tokens": (s.max_total_tokens, integer(1)), "--limit": (s.limit, optional(integer(1))),
        "--seed": (s.seed, integer(0)), "--sandbox-workers": (s.sandbox_workers, integer(0)),
        "code_timeout_s": (s.code_timeout_s, number(0, lo_open=True)),  # no flag: set from Python only
        "--dtype": (s.dtype, one_of("float32", "bfloat16", "float16")),
        "--protocol": (s.protocol, optional(one_of(*PROTOCOLS))),
    })
    if is_url(s.judge):
        c = constraints()
        check_values({"--judge": (s.judge, c["judge.url"]), "--judge-temperature": (s.judge_temperature, c["judge.temperature"]),
                      "--judge-concurrency": (s.judge_concurrency, c["judge.concurrency"]),
                      "--judge-timeout-s": (s.judge_timeout_s, c["judge.timeout_s"]),
                      "--judge-retries": (s.judge_retries, c["judge.retries"]),
                      "--judge-on-failure": (s.judge_on_failure, c["judge.on_failure"])})
        if not s.judge_model.strip():
            raise ValueError(f"--judge {s.judge} needs --judge-model: the served judge model's name")


def is_url(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(("http://", "https://"))


def judge_config(s: EvalSettings) -> JudgeConfig:
    """The endpoint judge's settings from the flags (--judge URL)."""
    return replace(JudgeConfig(), url=s.judge or "", model=s.judge_model, temperature=s.judge_temperature,
                   concurrency=s.judge_concurrency, timeout_s=s.judge_timeout_s, retries=s.judge_retries,
                   on_failure=s.judge_on_failure, free_form=s.judge_free_form)


# ------------------------------------------------------------------------------------------- scoring
def item_record(t: Trajectory, r: RewardResult, processor=None, max_chars: int = TRANSCRIPT_CHARS) -> dict:
    """One episode of eval_results.json: the prediction and its scores, then `deepeyesv2.scoring.transcript`
    (turn_texts: each turn's text and what the environment answered; tool_calls with their outputs; images)."""
    p = t.prompt or Prompt(id=t.prompt_id)
    rec = transcript(t, processor, max_chars)
    return {"id": t.prompt_id, "sample": t.sample_index, "category": p.category or "unknown",
            "question": p.question, "gold": p.answer, "prediction": t.answer,
            "accuracy": r.components.get("accuracy", 0.0), "reward": r.total,
            "format": r.components.get("format", 0.0), "components": dict(r.components),
            "tools": [c.name for c in t.tool_calls],
            "tool_status": [c.status for c in t.tool_calls], "turns": t.num_turns, "stop_reason": t.stop_reason,
            "error": t.error, "turn_texts": rec["turns"], "tool_calls": rec["tool_calls"], "images": rec["images"]}


def aggregate(trajs: list[Trajectory], results: list[RewardResult], processor=None) -> dict:
    """{"overall": summary, "by_category": {category: summary}, "items": [...]}; summaries are
    `deepeyesv2.scoring.summarize` (the training-time evaluation's) plus the number of distinct prompts;
    `processor` decodes what the environment answered each turn (item_record)."""
    if len(trajs) != len(results):
        raise ValueError(f"{len(trajs)} trajectories but {len(results)} reward results")

    def summary(idx: list[int]) -> dict:
        s = summarize([trajs[i] for i in idx], [results[i] for i in idx])
        s["prompts"] = len({trajs[i].prompt_id for i in idx})
        return s

    return {"overall": summary(list(range(len(trajs)))),
            "by_category": {c: summary(idx) for c, idx in by_category(trajs).items()},
            "items": [item_record(t, r, processor) for t, r in zip(trajs, results)]}


def run_eval(rollouts, processor, prompts: list[Prompt], reward_fn, samples: int = 1,
             temperature: float = 0.0, seed: int = 1234, judge: JudgeClient | None = None) -> dict:
    """`samples` episodes per prompt through `rollouts` (a deepeyesv2.rollout_setup.Rollouts) at `temperature`
    (0 = greedy), scored by `reward_fn`; returns `aggregate(...)`. With an endpoint `judge` (the one bound into
    reward_fn) the episodes are scored from judge.concurrency threads, and its counters go into "overall"
    (judge_requests, judge_retries, judge_failures, judge_cache_hits) and "judge" (plus the failure reasons)."""
    workers = judge.cfg.concurrency if judge is not None else 1
    trajs, results = rollout_and_score(rollouts, processor, prompts, reward_fn, samples, temperature, seed, workers)
    result = aggregate(trajs, results, processor)
    if judge is not None:
        stats = judge.take_stats()
        result["overall"].update(stats)
        result["judge"] = {"url": judge.cfg.url, "model": judge.cfg.model, "temperature": judge.cfg.temperature,
                           **stats, "failure_reasons": judge.failure_reasons()}
    return result


def eval_table(result: dict) -> str:
    """Markdown: one row overall, one per category; n = episodes (prompts x samples)."""
    lines = ["| | n | " + " | ".join(TABLE_COLUMNS) + " | tools (share of calls) |",
             "|---" * (len(TABLE_COLUMNS) + 3) + "|"]
    rows = [("overall", result["overall"]), *result["by_category"].items()]
    for name, s in rows:
        tools = ", ".join(f"{k} {v:.0%}" for k, v in s["tools"].items()) or "-"
        lines.append(f"| {name} | {s['episodes']} | " + " | ".join(f"{s[c]:.3f}" for c in TABLE_COLUMNS) + f" | {tools} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- building
def build_rollouts(model, processor, s: EvalSettings, trained: dict | None = None):
    """The RL rollout stack (deepeyesv2.rollout_setup.make_rollouts) with evaluation limits, under the protocol
    and system prompt of the flags, else of the checkpoint (`trained`: checkpoint.read_protocol), else ours."""
    cfg = Config()
    trained = trained or {}
    cfg.rollout.protocol = s.protocol or trained.get("protocol", cfg.rollout.protocol)
    cfg.rollout.system_prompt = s.system_prompt if s.system_prompt is not None else trained.get("system_prompt", "")
    cfg.rollout.max_turns, cfg.rollout.max_new_tokens = s.max_turns, s.max_new_tokens
    cfg.rollout.max_total_tokens, cfg.rollout.temperature = s.max_total_tokens, s.temperature
    cfg.rollout.sandbox_workers, cfg.rollout.code_timeout_s = s.sandbox_workers, s.code_timeout_s
    cfg.train.seed = s.seed
    rollouts = make_rollouts(model, processor, cfg, progress=s.progress)
    if s.corpus:
        rollouts.registry = default_registry(corpus_path=s.corpus)
    return rollouts


def evaluate_checkpoint(s: EvalSettings) -> dict:
    """Load the model and data, run, write DIR/eval_results.json and DIR/eval_table.md; returns the result."""
    check_settings(s)
    if not s.data:
        raise ValueError("--data is required (a JSONL of prompts)")
    if not Path(s.data).is_file():
        raise ValueError(f"--data {s.data!r}: file not found")
    client = JudgeClient(judge_config(s)) if is_url(s.judge) else None
    judge = client or (import_callable(s.judge, "--judge") if s.judge else None)
    reward_fn = build_reward_fn(s.reward, judge, s.judge_free_form)
    prompts = load_prompts(s.data, image_root=s.image_root)
    if s.limit is not None:
        prompts = prompts[: s.limit]
    model_path = resolve_model_path(s.model, what="--model")
    model, processor = build_model(ModelConfig(name_or_path=model_path, dtype=s.dtype))
    model.eval()
    trained = read_protocol(model_path) if model_path not in PRESETS else None
    rollouts = build_rollouts(model, processor, s, trained)
    t0 = time.perf_counter()
    try:
        result = run_eval(rollouts, processor, prompts, reward_fn, s.samples, s.temperature, s.seed, judge=client)
    finally:
        rollouts.close()
    result["settings"] = {**asdict(s), "model_path": model_path, "protocol": rollouts.profile.name,
                          "system_prompt": rollouts.system_prompt}
    result["seconds"] = time.perf_counter() - t0
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    table = eval_table(result)
    (out / "eval_results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "eval_table.md").write_text(f"model: {model_path}, data: {s.data}, samples: {s.samples}, "
                                       f"temperature: {s.temperature}\n\n{table}\n")
    return result


def parse_args(argv: list[str] | None) -> EvalSettings:
    d = EvalSettings()
    ap = argparse.ArgumentParser(prog="deepeyesv2 eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="preset name (tiny, small), checkpoint dir or run dir")
    ap.add_argument("--data", required=True, help="JSONL: id, question, images, answer, category, answer_type")
    ap.add_argument("--samples", type=int, default=d.samples, help="episodes per prompt")
    ap.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default)")
    ap.add_argument("--out", default=d.out, help="directory for eval_results.json and eval_table.md")
    ap.add_argument("--judge", default=None, help="judge for answer_type judge and free-form answers: an OpenAI-compatible "
                    "endpoint URL (http://host:8000/v1, with --judge-model) or module:function (question, pred, gold) -> [0, 1]")
    ap.add_argument("--judge-model", default=d.judge_model, help="the endpoint's served judge model name")
    ap.add_argument("--judge-temperature", type=float, default=d.judge_temperature)
    ap.add_argument("--judge-concurrency", type=int, default=d.judge_concurrency, help="judge requests in flight at once")
    ap.add_argument("--judge-timeout-s", type=float, default=d.judge_timeout_s, help="per judge request")
    ap.add_argument("--judge-retries", type=int, default=d.judge_retries, help="further attempts per verdict")
    ap.add_argument("--judge-on-failure", default=d.judge_on_failure, choices=("rules", "zero"),
                    help="a verdict that failed every attempt scores the rule matcher's score, or zero")
    ap.add_argument("--judge-typed-only", action="store_true",
                    help="judge only answer_type judge items (not free-form answers the rules reject)")
    ap.add_argument("--reward", default=d.reward, help="reward whose accuracy/format components are reported")
    ap.add_argument("--max-turns", type=int, default=d.max_turns)
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="per policy turn")
    ap.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens, help="per episode, prompt included")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--image-root", default=None, help="relative image paths resolve here (default: the JSONL's folder)")
    ap.add_argument("--corpus", default=None, help="search corpus JSONL (default: the shipped corpus)")
    ap.add_argument("--sandbox-workers", type=int, default=d.sandbox_workers)
    ap.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--protocol", default=None, choices=PROTOCOLS,
                    help="turn layout (default: the checkpoint's, else ours); deepeyesv2 for the released checkpoints")
    ap.add_argument("--system-prompt", default=None,
                    help="system turn of every prompt (default: the one the checkpoint was trained under, else the protocol's)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    return EvalSettings(model=a.model, data=a.data, samples=a.samples, temperature=a.temperature, out=a.out,
                        judge=a.judge, judge_model=a.judge_model, judge_temperature=a.judge_temperature,
                        judge_concurrency=a.judge_concurrency, judge_timeout_s=a.judge_timeout_s,
                        judge_retries=a.judge_retries, judge_on_failure=a.judge_on_failure,
                        judge_free_form=not a.judge_typed_only, reward=a.reward, max_turns=a.max_turns, max_new_tokens=a.max_new_tokens,
                        max_total_tokens=a.max_total_tokens, limit=a.limit, seed=a.seed, image_root=a.image_root,
                        corpus=a.corpus, sandbox_workers=a.sandbox_workers, dtype=a.dtype, progress=not a.no_progress,
                        protocol=a.protocol, system_prompt=a.system_prompt)


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    try:
        result = evaluate_checkpoint(s)
    except (ValueError, FileNotFoundError, DataError) as e:  # bad arguments or data: one clear line, no trace
        print(f"deepeyesv2 eval: {e}", file=sys.stderr)
        return 2
    print(eval_table(result))
    o = result["overall"]
    print(f"\n[eval] {o['prompts']} prompts x {s.samples} samples: accuracy {o['accuracy']:.3f}, "
          f"tool-call rate {o['tool_call_rate']:.2f}, {result['seconds']:.0f} s; wrote {s.out}/eval_results.json, "
          f"{s.out}/eval_table.md")
    if "judge" in result:
        j = result["judge"]
        reasons = ", ".join(f"{k} x{v}" for k, v in sorted(j["failure_reasons"].items()))
        print(f"[eval] judge {j['url']}: {j['judge_requests']} requests, {j['judge_retries']} retries, "
              f"{j['judge_failures']} failures{f' ({reasons})' if reasons else ''}, {j['judge_cache_hits']} cache hits")
    return 0

