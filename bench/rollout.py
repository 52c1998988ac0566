"""Rollout benchmark: prefix KV reuse vs none, on G samples x 3 tool turns of the tiny model.

    python -m bench.rollout [--quick] [--rounds N]

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
import time

import numpy as np
import torch
from PIL import Image

from bench._common import exact_row, fmt_seconds, interleave, load_cell, paired_row, ratio_cell, render_table
from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2_rollout.engine import EmbeddedEngine, ScriptedEngine
from deepeyesv2_rollout.episode import EpisodeLimits, run_episodes
from deepeyesv2_rollout.types import Prompt
from deepeyesv2_rollout.tools import default_registry
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


def _prompt(size: int) -> Prompt:
    rng = np.random.RandomState(0)
    img = Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))
    return Prompt(id="bench", question="When was the lighthouse in this picture built? Look closely, then search.",
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


def markdown(rows: list[dict]) -> str:
    return render_table(rows, [("benchmark", "benchmark"), ("ours", "ours"), ("peer (no cache)", "peer"),
                               ("ours/peer (min-max)", ratio_cell), ("load before->after", load_cell),
                               ("device", "device")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="G=4 and a smaller image")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs per side (pairs per ratio)")
    args = ap.parse_args()
    print(markdown(run_benchmark(quick=args.quick, rounds=args.rounds)))


if __name__ == "__main__":
    main()
