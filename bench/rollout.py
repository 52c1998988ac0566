"""Rollout benchmark: prefix KV reuse vs none, on G samples x 3 tool turns of the tiny model.

    python -m bench.rollout [--quick]

A scripted policy (deterministic; each sample crops a different region and searches a different query,
so samples diverge after the prompt like sampled ones do) runs through the real tools twice in one
process: EmbeddedEngine with the radix prefix cache ("ours") and with it disabled ("peer": every turn
re-prefills the whole context, what a cache-less HF generate loop does). Both runs must give identical
trajectories; the table reports prefilled tokens and engine / episode wall time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from bench._common import render_table
from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2_rollout.engine import EmbeddedEngine, ScriptedEngine
from deepeyesv2_rollout.episode import EpisodeLimits, Prompt, run_episodes
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


def run_benchmark(quick: bool = False) -> list[dict]:
    """Rows: benchmark, ours (prefix cache), peer (no cache), ratio (peer / ours), device."""
    torch.manual_seed(0)
    group, size = (4, 224) if quick else (8, 336)
    model, proc = build_model(ModelConfig())
    model.eval()
    registry = default_registry()
    prompt = _prompt(size)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=256, seed=0)
    device = f"cpu ({torch.get_num_threads()} threads)"
    runs = {}
    for name, budget in (("peer", 0), ("ours", 1 << 20)):
        engine = TimedEngine(EmbeddedEngine(model, proc, cache_tokens_budget=budget))
        t = time.perf_counter()
        trajs = run_episodes(ScriptedEngine(engine, proc, script), proc, registry, [prompt], group, sampling,
                             EpisodeLimits(max_turns=3), progress=False)
        runs[name] = (trajs, engine.stats(), engine.seconds, time.perf_counter() - t)
    (t_ours, s_ours, e_ours, w_ours), (t_peer, s_peer, e_peer, w_peer) = runs["ours"], runs["peer"]
    for a, b in zip(t_ours, t_peer):  # the cache must not change a single token or log-prob
        if a.token_ids != b.token_ids or a.stop_reason != "answer":
            raise RuntimeError(f"cached and uncached rollouts differ (sample {a.sample_index}: {a.stop_reason})")
        if max(abs(x - y) for x, y in zip(a.sample_logprobs, b.sample_logprobs)) > 1e-4:
            raise RuntimeError(f"cached and uncached log-probs differ (sample {a.sample_index})")
    label = f"G={group} x 3 turns, prompt {t_ours[0].prompt_len} tok, {len(t_ours[0])} tok/traj"
    saved = 1 - s_ours["tokens_prefilled"] / s_peer["tokens_prefilled"]
    return [
        dict(benchmark=f"tokens prefilled ({label})", ours=s_ours["tokens_prefilled"], peer=s_peer["tokens_prefilled"],
             ratio=s_peer["tokens_prefilled"] / s_ours["tokens_prefilled"], device=device),
        dict(benchmark="prefill saved by prefix cache", ours=f"{saved:.1%}", peer="0%", ratio=None, device=device),
        dict(benchmark="engine wall time (s)", ours=round(e_ours, 3), peer=round(e_peer, 3), ratio=e_peer / e_ours, device=device),
        dict(benchmark="episode wall time incl. tools (s)", ours=round(w_ours, 3), peer=round(w_peer, 3), ratio=w_peer / w_ours, device=device),
    ]


def markdown(rows: list[dict]) -> str:
    return render_table(rows, [("benchmark", "benchmark"), ("ours", "ours"), ("peer (no cache)", "peer"),
                               ("ratio", lambda r: "" if r["ratio"] is None else f"{r['ratio']:.2f}x"),
                               ("device", "device")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="G=4 and a smaller image")
    args = ap.parse_args()
    print(markdown(run_benchmark(quick=args.quick)))


if __name__ == "__main__":
    main()
