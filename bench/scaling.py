"""How log-prob (+ entropy) forward + backward scales: time and extra memory vs sequence length and vs vocab size,
ours (`deepeyesv2_kernels.fused_logprobs`, no [T, V] logits) vs naive (`hidden @ W.T` -> fp32 log_softmax).

    python -m bench.scaling [--quick] [--out PNG] [--rounds N]

CPU: fp32, H=256; T = 256..8192 at V=32,768 and V = 4,096..151,936 at T=1,024 (--quick: H=64, T = 512..4096 at
V=32,768, V = 8,192..131,072 at T=512). GPU: bf16, H=3,584; T = 1k..32k at V=152,064 and V = 32k..256k at T=4,096.
Each method sweeps its grid in a fresh subprocess, and the sweeps alternate ours, naive, ours, naive ... for `rounds`
rounds (bench/_common.py `interleave`): each row's ratio is the median of the per-round ratios at its point, with
their min-max; the plot shows each method's median per point. Time: median of 2 runs after a warm-up. Extra memory: what a
step needs above its inputs and their gradients -- GPU: max_memory_allocated; CPU: peak RSS growth with glibc's
mmap threshold pinned (MALLOC_MMAP_THRESHOLD_), so that every freed large buffer goes back to the OS and the
high-water mark, reset before each point, sees only that point. A point that runs out of memory is recorded.
Writes a 2x2 PNG (time and memory, vs T and vs V; log-log) and returns rows at the largest size of each sweep.
"""

from __future__ import annotations

from functools import partial
import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from bench._common import (REPO_ROOT, failed_row, fmt_bytes, fmt_seconds, interleave, load_cell, naive_step, paired_row,
                           ratio_cell, render_table, reported, reset_peak_rss, rss_kib, run_worker, serve_worker,
                           skip_unless_benchmarking)

METHODS = ("ours", "naive")


@dataclass(frozen=True)
class Grid:
    H: int
    seq_lens: tuple[int, ...]  # sweep T at vocab V_for_T
    V_for_T: int
    vocabs: tuple[int, ...]  # sweep V at T_for_V
    T_for_V: int
    dtype: str = "float32"
    reps: int = 2


CPU_FULL = Grid(H=256, seq_lens=(256, 512, 1024, 2048, 4096, 8192), V_for_T=32_768,
                vocabs=(4096, 16_384, 65_536, 151_936), T_for_V=1024)
# Quick: a narrow H keeps it to seconds while T and V still pass the point where ours stops growing (its
# [chunk, V] buffers reach their fixed size).
CPU_QUICK = Grid(H=64, seq_lens=(512, 1024, 2048, 4096), V_for_T=32_768, vocabs=(8192, 32_768, 131_072), T_for_V=512)
GPU = Grid(H=3584, seq_lens=(1024, 2048, 4096, 8192, 16_384, 32_768), V_for_T=152_064,
           vocabs=(32_768, 65_536, 131_072, 152_064, 262_144), T_for_V=4096, dtype="bfloat16", reps=3)


def points(grid: Grid) -> list[tuple[str, int, int]]:
    """(axis, T, V) of every point of the grid."""
    return [("T", T, grid.V_for_T) for T in grid.seq_lens] + [("V", grid.T_for_V, V) for V in grid.vocabs]


def _step_fn(method: str):
    if method == "naive":
        step = naive_step
    elif method == "ours":
        from deepeyesv2_kernels import fused_logprobs

        def step(h, w, y):
            logp, _ = fused_logprobs(h, w, y)
            logp.sum().backward()
    else:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    return step


def _measure(step, T: int, V: int, grid: Grid, device: str) -> dict:
    import gc

    dtype = getattr(torch, grid.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, grid.H, generator=g, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, grid.H, generator=g, device=device, dtype=dtype) / grid.H**0.5).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g, device=device)
    grads = (hidden.numel() + weight.numel()) * hidden.element_size()

    def run():
        hidden.grad = weight.grad = None
        step(hidden, weight, targets)

    run()  # warm-up (autotuning, first-touch allocations)
    hidden.grad = weight.grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss(required=True)  # a peak that also covers the previous point would be wrong, not just noisy
        base = rss_kib("VmRSS") * 1024
    times = []
    for _ in range(grid.reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss_kib("VmHWM") * 1024
    return {"seconds": statistics.median(times), "extra_bytes": max(0, peak - base - grads)}


def _worker(method: str, grid: Grid) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = _step_fn(method)
    out = []
    for axis, T, V in points(grid):
        try:
            res = _measure(step, T, V, grid, device)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:  # an OOM point is a result, not a crash
            if device == "cuda":
                torch.cuda.empty_cache()
            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        out.append({"method": method, "axis": axis, "T": T, "V": V, **res})
    return out


def _last_line(text: str) -> str:
    return (text.strip().splitlines()[-1:] or ["no output"])[0][:200]


def _run_worker_subprocess(method: str, grid: Grid, timeout: float = 3600) -> list[dict]:
    # Pinning the mmap threshold keeps glibc from moving large freed buffers into the heap, where RSS would
    # keep them and hide the next point's peak.
    try:
        res = run_worker("bench.scaling", method, asdict(grid), timeout=timeout,
                         env={"MALLOC_MMAP_THRESHOLD_": "65536"}, describe_error=_last_line)
    except subprocess.TimeoutExpired:
        res = {"error": "timed out"}
    if isinstance(res, dict):  # the worker failed as a whole: every point carries its error
        return [{"method": method, "axis": a, "T": T, "V": V, "error": res["error"]} for a, T, V in points(grid)]
    return res


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{os.cpu_count()}c"


def plot(results: list[dict], grid: Grid, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for col, (axis, xkey, fixed) in enumerate((("T", "T", f"V={grid.V_for_T:,}"), ("V", "V", f"T={grid.T_for_V:,}"))):
        for row, (key, scale, unit) in enumerate((("seconds", 1e3, "ms"), ("extra_bytes", 2**-20, "MiB"))):
            ax = axes[row][col]
            for method, style in zip(METHODS, ("o-", "s--")):
                pts = [r for r in results if r["method"] == method and r["axis"] == axis and "error" not in r]
                if pts:
                    ax.plot([p[xkey] for p in pts], [max(p[key] * scale, 1e-3) for p in pts], style, label=method)
                failed = [r for r in results if r["method"] == method and r["axis"] == axis and "error" in r]
                for p in failed:
                    ax.annotate("OOM" if "memory" in p["error"].lower() else "fail", (p[xkey], 1), fontsize=7)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"{'sequence length T' if axis == 'T' else 'vocab size V'} ({fixed}, H={grid.H})")
            ax.set_ylabel(f"{'fwd+bwd time' if key == 'seconds' else 'peak extra memory'} ({unit})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(f"log-prob + entropy, fwd+bwd, {grid.dtype}: ours (fused) vs naive -- {device_name()}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_png_path() -> str:
    slug = "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-")
    return os.path.join(REPO_ROOT, "bench", "results", f"scaling-{datetime.date.today().isoformat()}-{slug}.png")


def median_points(sweeps: list[list[dict]]) -> list[dict]:
    """One result per point from several sweeps of one method: the median seconds and extra bytes over the sweeps
    where the point ran, or the first error where it failed in any sweep (an OOM is a result for that point)."""
    out = []
    for same in zip(*sweeps):
        err = next((r for r in same if "error" in r), None)
        if err is not None:
            out.append(err)
            continue
        out.append({**same[0], "seconds": statistics.median(r["seconds"] for r in same),
                    "extra_bytes": statistics.median(r["extra_bytes"] for r in same)})
    return out


def rows(quick: bool = False, png: str | None = None, verbose: bool = True, rounds: int = 3) -> list[dict]:
    """Sweep both methods alternately (`rounds` sweeps each, one subprocess per sweep; no warm-up process: each
    point has its own warm-up run), write the PNG, return rows (ours vs naive) at the largest T and the largest V."""
    grid = GPU if torch.cuda.is_available() else (CPU_QUICK if quick else CPU_FULL)

    def measured(sweep: list[dict]) -> str:
        return f"{sum('error' not in r for r in sweep)}/{len(sweep)} points"

    sides = {m: reported(partial(_run_worker_subprocess, m, grid), f"scaling {m}:", verbose, measured) for m in METHODS}
    run = interleave(sides, rounds=rounds, warmup=0)
    sweeps = run.results
    results = [r for m in METHODS for r in median_points(sweeps[m])]
    png = plot(results, grid, png or default_png_path())
    device = f"{device_name()}, {grid.dtype}, H={grid.H}"
    note = f"{rounds} alternating sweeps per method; plot: {os.path.relpath(png, REPO_ROOT)}"
    out = []
    for axis, T, V in (("T", grid.seq_lens[-1], grid.V_for_T), ("V", grid.T_for_V, grid.vocabs[-1])):
        i = points(grid).index((axis, T, V))
        ours, naive = [sw[i] for sw in sweeps["ours"]], [sw[i] for sw in sweeps["naive"]]
        e_ours = next((r["error"] for r in ours if "error" in r), None)
        e_naive = next((r["error"] for r in naive if "error" in r), None)
        for key, what, fmt in (("seconds", "time", fmt_seconds), ("extra_bytes", "extra memory", fmt_bytes)):
            bench = f"logprob scaling {what} at T={T:,} V={V:,} (ours vs naive)"
            if e_ours or e_naive:
                row = failed_row(bench, {"error": e_ours} if e_ours else {}, {"error": e_naive} if e_naive else {},
                                 device)
                out.append({**row, "note": note, "better": "lower"})
                continue
            # floor 1 byte: a naive point that needed no extra memory must not divide by zero (seconds never are 0)
            out.append(paired_row(bench, [r[key] for r in ours], [r[key] for r in naive], fmt, device, run, note,
                                  better="lower", floor=1.0 if key == "extra_bytes" else 0.0))
    return out


# ------------------------------------------------------------------------------------ pytest-benchmark
def _bench(benchmark, method: str):
    skip_unless_benchmarking(benchmark)
    step = _step_fn(method)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2048, 256, generator=g).requires_grad_()
    w = (torch.randn(16_384, 256, generator=g) / 16).requires_grad_()
    y = torch.randint(0, 16_384, (2048,), generator=g)

    def run():
        h.grad = w.grad = None
        step(h, w, y)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_bench_scaling_ours_T2048_V16k(benchmark):
    _bench(benchmark, "ours")


def test_bench_scaling_naive_T2048_V16k(benchmark):
    _bench(benchmark, "naive")


def main(argv: list[str] | None = None) -> None:
    grid = lambda g: Grid(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()})  # noqa: E731
    if serve_worker(argv, lambda method, g: _worker(method, grid(g))):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="PNG path (default bench/results/scaling-<date>-<device>.png)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating sweeps per method (pairs per ratio)")
    args = parser.parse_args(argv)
    print(render_table(rows(args.quick, args.out, rounds=args.rounds),
                       [("benchmark", "benchmark"), ("ours", "ours"), ("naive", "peer"),
                        ("ours/naive (min-max)", ratio_cell), ("load before->after", load_cell), ("device", "device")]))

if __name__ == "__main__":
    main()
