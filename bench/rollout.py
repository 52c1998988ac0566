"""Rollout benchmarks on the tiny model: prefix KV reuse vs none (`run_benchmark`), and the async schedule
(per-episode agent loops) vs the turn-synchronous one on a DeepEyesV2-shaped workload (`run_schedules`).

    python -m bench.rollout [--quick] [--rounds N] [--schedules]

A scripted policy (deterministic; each sample crops a different region and searches a different query,
so samples diverge after the prompt like sampled ones do) runs through the real tools in one process:
EmbeddedEngine with the radix prefix cache ("ours") and with it disabled ("peer": every turn re-prefills the
whole context, what a cache-less HF generate loop does). The two alternate (bench/_common.py `interleave`: a
warm-up run each, then ours, peer, ours, peer ... for `rounds` rounds), each run on a fresh engine (an empty
cache). Every run must give identical trajectories; the table reports prefilled tokens (a count, the same in
every run) and engine / episode wall time (ratio ours / peer: the median of the per-round ratios, with min-max).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from bench._common import (exact_row, fmt_seconds, interleave, load_cell, paired_row, ratio_cell, render_table,
                           reported)
from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2_rollout.engine import EmbeddedEngine, ScriptedEngine
from deepeyesv2_rollout.episode import EpisodeLimits, run_episodes
from deepeyesv2_rollout.types import Prompt
from deepeyesv2_rollout.tools import default_registry
from deepeyesv2_rollout.tools.base import ToolRegistry
from deepeyesv2_rollout.types import SamplingParams

QUERIES = ["lighthouse built year", "tower painted color", "bridge river city", "famous capital population",
           "mountain height", "red tower engineer", "lake shore lighthouse", "city bridge built"]


def script(tag) -> str:
    g = tag.sample_index
    if tag.turn == 0:
        x = 8 * (g % 8)
        code = f"crop = image_1.crop(({x}, 0, {x + 96}, 96))\ncrop = crop.resize((192, 192))\ndisplay(crop)\nprint(crop.size)\n"
        return f"<think>Sample {g}: the detail near x={x} matters, so I zoom in.</think><code>\n```python\n{code}```\n</code>"
    if tag.turn == 1:
        q = QUERIES[g % len(QUERIES)]
        return f'<think>Now I look it up.</think><tool_call>{{"name": "search", "arguments": {{"query": "{q}"}}}}</tool_call>'
    return f"<think>The results answer it.</think><answer>{1880 + g}</answer>"


class TimedEngine:
    """Adds the engine's own wall time (tool time excluded) to an engine."""

    def __init__(self, engine):
        self.engine, self.seconds = engine, 0.0

    def generate(self, requests, sampling):
        t = time.perf_counter()
        out = self.engine.generate(requests, sampling)
        self.seconds += time.perf_counter() - t
        return out

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _prompt(size: int, id: str = "bench", seed: int = 0) -> Prompt:
    rng = np.random.RandomState(seed)
    img = Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))
    return Prompt(id=id, question="When was the lighthouse in this picture built? Look closely, then search.",
                  images=[img], answer="1889", category="search")


def run_benchmark(quick: bool = False, rounds: int = 3) -> list[dict]:
    """Rows: benchmark, ours (prefix cache), peer (no cache), ratio (ours / peer), device."""
    torch.manual_seed(0)
    group, size = (4, 224) if quick else (8, 336)
    model, proc = build_model(ModelConfig())
    model.eval()
    registry = default_registry()
    prompt = _prompt(size)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=256, seed=0)
    device = f"cpu ({torch.get_num_threads()} threads)"

    def side(budget: int):
        def call():
            engine = TimedEngine(EmbeddedEngine(model, proc, cache_tokens_budget=budget))
            t = time.perf_counter()
            trajs = run_episodes(ScriptedEngine(engine, proc, script), proc, registry, [prompt], group, sampling,
                                 EpisodeLimits(max_turns=3), progress=False)
            return trajs, engine.stats(), engine.seconds, time.perf_counter() - t
        return call

    run = interleave({"ours": side(1 << 20), "peer": side(0)}, rounds=rounds, warmup=1)
    ours, peer = run.results["ours"], run.results["peer"]
    t_ref = ours[0][0]
    for trajs, *_ in ours + peer:  # the cache must not change a single token or log-prob, in any run
        for a, b in zip(t_ref, trajs):
            if a.token_ids != b.token_ids or b.stop_reason != "answer":
                raise RuntimeError(f"cached and uncached rollouts differ (sample {b.sample_index}: {b.stop_reason})")
            if max(abs(x - y) for x, y in zip(a.sample_logprobs, b.sample_logprobs)) > 1e-4:
                raise RuntimeError(f"cached and uncached log-probs differ (sample {b.sample_index})")
    prefilled = {name: {r[1]["tokens_prefilled"] for r in runs} for name, runs in (("ours", ours), ("peer", peer))}
    if any(len(v) != 1 for v in prefilled.values()):  # a count that changes between runs would not be a count
        raise RuntimeError(f"tokens prefilled differ between identical runs: {prefilled}")
    p_ours, p_peer = prefilled["ours"].pop(), prefilled["peer"].pop()
    label = f"G={group} x 3 turns, prompt {t_ref[0].prompt_len} tok, {len(t_ref[0])} tok/traj"
    note = f"{rounds} alternating runs each after a warm-up run, a fresh engine per run"
    return [
        exact_row(f"tokens prefilled ({label})", p_ours, p_peer, device),
        dict(benchmark="prefill saved by prefix cache", ours=f"{1 - p_ours / p_peer:.1%}", peer="0%", ratio=None,
             device=device),
        paired_row("engine wall time", [r[2] for r in ours], [r[2] for r in peer], fmt_seconds, device, run, note),
        paired_row("episode wall time incl. tools", [r[3] for r in ours], [r[3] for r in peer], fmt_seconds, device,
                   run, note),
    ]


# ------------------------------------------------------------------------------------ async vs turn_sync
@dataclass(frozen=True)
class Workload:
    """DeepEyesV2-shaped rollouts, drawn per episode from `seed`: 1-6 turns, each turn's length log-normal
    (median `turn_median` tokens, sigma `turn_sigma`, clipped to [turn_min, turn_max]); every turn but the last
    a code call (latency uniform in code_s) or a search call (search_s) -- DeepEyesV2's 1-10 s search scaled by
    `tool_scale` -- a third of code calls returning an image; the last turn answers."""

    prompts: int = 8
    group: int = 8
    turns: tuple[int, int] = (1, 6)
    turn_median: float = 64.0
    turn_sigma: float = 1.0
    turn_min: int = 16
    turn_max: int = 512
    code_s: tuple[float, float] = (0.02, 0.2)
    search_s: tuple[float, float] = (0.1, 1.0)
    tool_scale: float = 1.0  # 0: tools answer at once (the zero-latency comparison)
    seed: int = 0

    def describe(self) -> str:
        return (f"G={self.group} x {self.prompts} prompts, {self.turns[0]}-{self.turns[1]} turns/episode, turn length "
                f"log-normal(median {self.turn_median:g}, sigma {self.turn_sigma:g}) clipped to {self.turn_min}-"
                f"{self.turn_max} tok, code {self.code_s[0] * self.tool_scale * 1000:g}-"
                f"{self.code_s[1] * self.tool_scale * 1000:g} ms (1/3 return an image), search "
                f"{self.search_s[0] * self.tool_scale:g}-{self.search_s[1] * self.tool_scale:g} s, seed {self.seed}")

    def plan(self, prompt_index: int, sample: int) -> list[tuple[str, int, float, bool]]:
        """One episode's turns: (kind code|search|answer, turn tokens, tool latency s, returns an image)."""
        rng = np.random.default_rng([self.seed, prompt_index, sample])
        out = []
        n = int(rng.integers(self.turns[0], self.turns[1] + 1))
        for t in range(n):
            length = int(np.clip(round(rng.lognormal(np.log(self.turn_median), self.turn_sigma)), self.turn_min,
                                 self.turn_max))
            if t == n - 1:
                out.append(("answer", length, 0.0, False))
            elif rng.random() < 0.5:
                out.append(("code", length, float(rng.uniform(*self.code_s)) * self.tool_scale, rng.random() < 1 / 3))
            else:
                out.append(("search", length, float(rng.uniform(*self.search_s)) * self.tool_scale, False))
        return out


class PlannedPolicy:
    """Teacher-forces each episode's planned turns (exactly `length` tokens: a filler of plain word tokens
    inside <think>, then the action), so both schedules do identical work; the call's args carry the planned
    latency and image for the tools."""

    def __init__(self, engine, proc, work: Workload, prompt_index: dict[str, int]):
        self.engine, self.proc, self.work, self.prompt_index = engine, proc, work, prompt_index
        self.filler = proc.encode(" the tower stands near the river and the old bridge" * 60)
        self._plans: dict[tuple[int, int], list] = {}

    def turn_ids(self, tag) -> list[int]:
        key = (self.prompt_index[tag.prompt_id], tag.sample_index)
        if key not in self._plans:
            self._plans[key] = self.work.plan(*key)
        kind, length, latency, image = self._plans[key][tag.turn]
        if kind == "answer":
            action = "</think><answer>1889</answer>"
        elif kind == "code":
            action = (f"</think><code>\n```python\n# sleep={latency:.4f} image={int(image)}\nprint({tag.turn})\n```\n"
                      "</code>")
        else:
            action = (f'</think><tool_call>{{"name": "search", "arguments": {{"query": "q{key[0]}-{key[1]}-{tag.turn}", '
                      f'"sleep": {latency:.4f}}}}}</tool_call>')
        head, tail = self.proc.encode("<think>"), self.proc.encode(action)
        return head + self.filler[: max(0, length - len(head) - len(tail))] + tail

    def _forced(self, r):
        return dataclasses.replace(r, forced_tokens=self.turn_ids(r.tag))

    def generate(self, requests, sampling):
        return self.engine.generate([self._forced(r) for r in requests], sampling)

    async def agenerate(self, request, sampling):
        return await self.engine.agenerate(self._forced(request), sampling)


class SleepTool:
    """A tool that sleeps its planned latency (from the call's args) and answers; a code call planned with an
    image returns one. It runs on the episode loop's real tool pool."""

    def __init__(self, name: str):
        self.name = name

    def call(self, args, session):
        from deepeyesv2_rollout.tools.base import ToolResult

        if self.name == "code":
            m = re.search(r"sleep=([0-9.]+) image=(\d)", args.get("code", ""))
            latency, image = float(m.group(1)), m.group(2) == "1"
        else:
            latency, image = float(args.get("sleep", 0.0)), False
        t = time.perf_counter()
        if latency > 0:
            time.sleep(latency)
        images = [Image.new("RGB", (56, 56), (200, 30, 30))] if image else []
        text = "Code execution result:\nstdout:\n3\n\nstderr:\n" if self.name == "code" else (
            "<tool_response>\n1. The tower was built in 1889 by the river.\n</tool_response>")
        return ToolResult(text=text, images=images, latency_s=time.perf_counter() - t)


class Clocked:
    """Records when each request (by tag) was submitted and when its result reached the episode loop."""

    def __init__(self, engine):
        self.engine = engine
        self.sent: dict[tuple, float] = {}
        self.back: dict[tuple, float] = {}

    @staticmethod
    def _key(tag) -> tuple:
        return tag.prompt_id, tag.sample_index, tag.turn

    def generate(self, requests, sampling):
        t = time.perf_counter()
        for r in requests:
            self.sent[self._key(r.tag)] = t
        out = self.engine.generate(requests, sampling)
        t = time.perf_counter()
        for r in requests:
            self.back[self._key(r.tag)] = t
        return out

    async def agenerate(self, request, sampling):
        self.sent[self._key(request.tag)] = time.perf_counter()
        out = await self.engine.agenerate(request, sampling)
        self.back[self._key(request.tag)] = time.perf_counter()
        return out


def _schedule_run(model, proc, work: Workload, schedule: str):
    prompts = [_prompt(224, f"bench-{i}", seed=i) for i in range(work.prompts)]
    index = {p.id: i for i, p in enumerate(prompts)}
    inner = EmbeddedEngine(model, proc, cache_tokens_budget=1 << 22)
    clock = Clocked(PlannedPolicy(inner, proc, work, index))
    registry = ToolRegistry([SleepTool("code"), SleepTool("search"), SleepTool("image_search")])
    sampling = SamplingParams(temperature=1.0, max_new_tokens=work.turn_max, seed=0)
    t0 = time.perf_counter()
    trajs = run_episodes(clock, proc, registry, prompts, work.group, sampling,
                         EpisodeLimits(max_turns=work.turns[1], max_total_tokens=16384), progress=False,
                         session_factory=lambda images: None, schedule=schedule)
    wall = time.perf_counter() - t0
    st = inner.stats()
    inner.shutdown()
    ends, waits = [], []
    for t in trajs:
        keys = [(t.prompt_id, t.sample_index, k) for k in range(t.num_turns)]
        ends.append(clock.back[keys[-1]] - t0)
        waits.append(sum(clock.sent[b] - clock.back[a] for a, b in zip(keys, keys[1:])))
    return dict(trajs=trajs, wall=wall, ends=ends, waits=waits, generated=sum(sum(t.loss_mask) for t in trajs),
                decode_s=st["decode_s"], prefilled=st["tokens_prefilled"], minimum=physical_minimum(trajs, proc))


def physical_minimum(trajs: list, proc) -> int:
    """Context tokens that must be prefilled at least once: the groups' prompts as a prefix tree (prompts share
    the system prompt up to their first image, whose pads are the image's own), plus every environment-written
    token that a later turn reads (the observations; the final <|im_end|> after an answer is never read)."""
    prompts, seen = [], set()
    for t in trajs:
        if t.group_id not in seen:
            seen.add(t.group_id)
            prompts.append([(tok, t.group_id) if tok == proc.image_pad_id else tok for tok in t.token_ids[: t.prompt_len]])
    tree = 0
    for i, p in enumerate(prompts):
        shared = max((next((k for k, (a, b) in enumerate(zip(p, q)) if a != b), min(len(p), len(q)))
                      for q in prompts[:i]), default=0)
        tree += len(p) - shared
    env = sum(t.turn_spans[k + 1][0] - t.turn_spans[k][1] for t in trajs for k in range(t.num_turns - 1))
    return tree + env


def _same_trajectories(a: list, b: list) -> None:
    for x, y in zip(a, b):
        if x.token_ids != y.token_ids or x.loss_mask != y.loss_mask or y.stop_reason != "answer":
            raise RuntimeError(f"async and turn_sync rollouts differ ({y.prompt_id}#{y.sample_index}: {y.stop_reason})")
        if max(abs(p - q) for p, q in zip(x.sample_logprobs, y.sample_logprobs)) > 1e-4:
            raise RuntimeError(f"async and turn_sync log-probs differ ({y.prompt_id}#{y.sample_index})")


def run_schedules(quick: bool = False, rounds: int = 3, verbose: bool = False) -> list[dict]:
    """Rows: async (ours) vs turn_sync (peer) on the Workload, with its tool latencies and with none."""
    torch.manual_seed(0)
    model, proc = build_model(ModelConfig())
    model.eval()
    device = f"cpu ({torch.get_num_threads()} threads)"
    base = Workload(turn_max=256) if quick else Workload()
    rows: list[dict] = []
    for work in (base, dataclasses.replace(base, tool_scale=0.0)):
        sides = {name: reported(lambda name=name: _schedule_run(model, proc, work, name), name, verbose,
                                lambda r: f"{r['wall']:.2f} s")
                 for name in ("async", "turn_sync")}
        run = interleave(sides, rounds=rounds, warmup=1)
        ours, peer = run.results["async"], run.results["turn_sync"]
        for r in ours + peer:
            _same_trajectories(peer[0]["trajs"], r["trajs"])
        trajs = peer[0]["trajs"]
        calls = [c for t in trajs for c in t.tool_calls]
        label = "zero tool latency" if work.tool_scale == 0 else "tools as planned"
        note = (f"{work.describe()}; {len(trajs)} episodes, {sum(t.num_turns for t in trajs)} turns, "
                f"{sum(c.name == 'code' for c in calls)} code + {sum(c.name == 'search' for c in calls)} search calls, "
                f"{sum(len(t.images) - 1 for t in trajs)} tool images, {peer[0]['generated']} generated tokens; "
                f"{rounds} interleaved rounds after a warm-up each, a fresh engine per run")

        def per(key, fn):
            return [fn(r) for r in ours], [fn(r) for r in peer]

        def add(name, values, fmt, better):
            rows.append(paired_row(f"{name} ({label})", *values, fmt, device, run, note, better=better))

        add("episodes/s", per("eps", lambda r: len(r["trajs"]) / r["wall"]), lambda x: f"{x:.2f}", "higher")
        add("generated tokens/s", per("tps", lambda r: r["generated"] / r["wall"]), lambda x: f"{x:.0f}", "higher")
        add("p50 episode latency", per("p50", lambda r: float(np.percentile(r["ends"], 50))), fmt_seconds, "lower")
        add("p99 episode latency", per("p99", lambda r: float(np.percentile(r["ends"], 99))), fmt_seconds, "lower")
        add("engine decoding share of wall time", per("dec", lambda r: r["decode_s"] / r["wall"]),
            lambda x: f"{x:.1%}", "higher")
        add("tool wait per episode (turn end -> next turn sent)", per("wait", lambda r: float(np.mean(r["waits"]))),
            fmt_seconds, "lower")
        add("tokens prefilled / physical minimum", per("pf", lambda r: r["prefilled"] / r["minimum"]),
            lambda x: f"{x:.3f}", "lower")
        rows[-1]["note"] = (f"minimum {peer[0]['minimum']} = the groups' prompts once (as a prefix tree: they share "
                            f"the system prompt) + every environment-written token a later turn reads, once; "
                            f"prefilled async {[r['prefilled'] for r in ours]}, "
                            f"turn_sync {[r['prefilled'] for r in peer]}")
    return rows


def markdown(rows: list[dict]) -> str:
    return render_table(rows, [("benchmark", "benchmark"), ("ours", "ours"), ("peer (no cache)", "peer"),
                               ("ours/peer (min-max)", ratio_cell), ("load before->after", load_cell),
                               ("device", "device")])


def markdown_schedules(rows: list[dict]) -> str:
    return render_table(rows, [("benchmark", "benchmark"), ("async", "ours"), ("turn_sync", "peer"),
                               ("async/turn_sync (min-max)", ratio_cell), ("load before->after", load_cell),
                               ("device", "device")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="G=4 and a smaller image")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs per side (pairs per ratio)")
    ap.add_argument("--schedules", action="store_true", help="async vs turn_sync instead of cache vs no cache")
    args = ap.parse_args()
    if args.schedules:
        print(markdown_schedules(run_schedules(quick=args.quick, rounds=args.rounds, verbose=True)))
    else:
        print(markdown(run_benchmark(quick=args.quick, rounds=args.rounds)))


if __name__ == "__main__":
    main()
