"""Packing vs naive padded batching: padding waste and forward+backward tokens/s on the tiny model.

    python -m bench.packing [--quick] [--rounds N]

Lengths are drawn log-normally between 64 and 4096 tokens; a third of the samples carry an image.
Both paths run the same samples in the same process, alternately (bench/_common.py `interleave`: a warm-up pass
each, then packed, padded, packed, padded ... for `rounds` rounds); the tokens/s ratio ours (packed) / peer (padded)
is the median of the per-round ratios with their min-max. The padding waste is a count, the same in every run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from bench._common import exact_row, interleave, load_cell, paired_row, ratio_cell, render_table
from deepeyesv2.policy_logprobs import packed_logprobs
from deepeyesv2.model import build_model
from deepeyesv2.packing import Sample, first_fit_decreasing, pack


def make_samples(proc, n: int, seed: int = 0, max_len: int = 4096) -> list[Sample]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=6.3, sigma=0.9, size=n), 64, max_len).astype(int)
    samples = []
    for i, L in enumerate(lengths):
        block, pix, grid = [], None, None
        if i % 3 == 0:
            h, w = (int(x) for x in rng.integers(56, 224, 2))
            vis = proc.image_inputs([Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))])
            pix, grid = vis.pixel_values, vis.grid_thw
            block = proc.image_block(grid[0])
        n_text = max(2, int(L) - len(block))
        text = rng.integers(0, 900, n_text).tolist()  # ordinary (non-special) tokens of the tiny vocab
        ids = text[:1] + block + text[1:]
        mask = [0] * (1 + len(block)) + [1] * (n_text - 1)
        samples.append(Sample(torch.tensor(ids), torch.tensor(mask), pix, grid, name=f"bench{i}"))
    return samples


def padded_step(model, samples: list[Sample], pad_id: int) -> None:
    """The peer: right-padded batch through the stock HF forward (full logits) + backward."""
    Lmax = max(len(s) for s in samples)
    ids = torch.full((len(samples), Lmax), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, s in enumerate(samples):
        ids[b, : len(s)] = s.input_ids
        att[b, : len(s)] = 1
        labels[b, : len(s)] = torch.where(s.loss_mask.bool(), s.input_ids, -100)
    imgs = [s for s in samples if s.image_grid_thw is not None]
    kw = {}
    if imgs:
        kw = dict(pixel_values=torch.cat([s.pixel_values for s in imgs]), image_grid_thw=torch.cat([s.image_grid_thw for s in imgs]),
                  mm_token_type_ids=(ids == model.config.image_token_id).int())
    out = model(input_ids=ids, attention_mask=att, labels=labels, **kw)
    out.loss.backward()


def packed_step(model, rows) -> None:
    for row in rows:
        logp, _ = packed_logprobs(model, row)
        (-logp.sum() / max(1, int(row.loss_mask.sum()))).backward()


def run(quick: bool = False, rounds: int = 3) -> list[dict]:
    torch.manual_seed(0)
    model, proc = build_model()
    n, budget, batch = (24, 4096, 4) if quick else (60, 8192, 4)
    samples = make_samples(proc, n, max_len=budget)
    lengths = [len(s) for s in samples]
    total = sum(lengths)
    bins = first_fit_decreasing(lengths, budget)
    rows = [pack([samples[i] for i in b], model.config.image_token_id) for b in bins]
    pack_waste = 1 - total / (len(bins) * budget)
    order = np.random.default_rng(1).permutation(n)
    groups = [[samples[i] for i in order[j : j + batch]] for j in range(0, n, batch)]
    pad_slots = sum(len(g) * max(len(s) for s in g) for g in groups)
    pad_waste = 1 - total / pad_slots

    # Padded batches need the stock attention path (its mask), so each padded pass swaps the implementation in and
    # back out: the packed pass right after it must run our varlen path again.
    varlen = model.config.text_config._attn_implementation

    def timed(fn, attn: str):
        def call() -> float:
            model.zero_grad(set_to_none=True)
            model.config.text_config._attn_implementation = attn
            try:
                t0 = time.perf_counter()
                fn()
                return time.perf_counter() - t0
            finally:
                model.config.text_config._attn_implementation = varlen
        return call

    # warm-up pass each: first-call allocations and lazy imports are not what we measure
    run = interleave({"ours": timed(lambda: packed_step(model, rows), varlen),
                      "peer": timed(lambda: [padded_step(model, g, proc.pad_id) for g in groups], "sdpa")},
                     rounds=rounds, warmup=1)
    t_pack, t_pad = run.results["ours"], run.results["peer"]
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    rows_out = [
        exact_row("padding waste (fraction of slots)", round(pack_waste, 4), round(pad_waste, 4), device,
                  f"FFD into {budget}-token rows vs padded batches of {batch}"),
        paired_row("fwd+bwd tokens/s, tiny Qwen2.5-VL", [total / t for t in t_pack], [total / t for t in t_pad],
                   round, device, run, f"{n} samples, {total} tokens, 1/3 with images; {rounds} alternating passes each"),
    ]
    return rows_out


def print_table(rows: list[dict]) -> None:
    print(render_table(rows, [("benchmark", "benchmark"), ("ours", "ours"), ("peer", "peer"),
                              ("ours/peer (min-max)", ratio_cell), ("load before->after", load_cell),
                              ("device", "device"), ("note", lambda r: r.get("note", ""))]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="alternating passes per side (pairs per ratio)")
    args = ap.parse_args()
    print_table(run(args.quick, args.rounds))
