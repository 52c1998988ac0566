"""Side-by-side timing and memory of our fused log-prob / GRPO kernels against the naive path and peers.

    python -m bench.kernels [--quick] [--reps N] [--rounds N] [--gpu-out PATH]

CPU (always): T=4096, H=1024, V=151,936 fp32 (--quick: T=1024, H=512, V=32,768), forward + backward w.r.t.
hidden and weight of
  naive          hidden @ W.T -> fp32 log_softmax -> gather, + entropy
  liger-ce       liger_kernel.ops.fused_linear_scaled_cross_entropy.LigerFusedLinearScaledCrossEntropyFunction
                 (return_entropy=True; on CPU its Verl-derived 512-token chunked torch fallback)
  ours           deepeyesv2_kernels.logprobs.fused_logprobs (chunked torch path on CPU)
  liger-grpo     liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(compiled=False), one chunk per sequence
  ours-grpo      deepeyesv2_kernels.linear_grpo.fused_linear_grpo_loss
Each run of a method is a fresh subprocess (its wall time: the median of --reps steps after one warm-up step;
its memory: the peak RSS growth, VmHWM reset after the inputs are allocated, minus the gradients of hidden and
weight, i.e. "extra above inputs and their gradients", the definition the GPU memory targets use). The methods'
processes alternate, one of each per round for --rounds rounds (bench/_common.py `interleave`), and each row's
ratio is the median of the per-round ratios with their min-max. On the GPU the methods alternate the same way
inside one process (the CUDA allocator's peak is reset per run).

GPU (only when CUDA exists): H=3584, V=152,064, bf16, T=4,096 and 16,384, random and "peaky" weights: ours vs
torch eager vs torch.compile vs Liger vs cut-cross-entropy (log-prob only), plus the fused GRPO loss; writes a
markdown table naming the device (--gpu-out).

`cpu_rows(quick)` / `gpu_rows()` return the rows as dicts (benchmark, ours, peer, ratio, device) for
`deepeyesv2 bench`. `test_bench_*` functions are pytest-benchmark entry points, skipped unless benchmarking is
enabled (`pytest bench/kernels.py --benchmark-enable`).
"""

from __future__ import annotations

from functools import partial
import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from bench._common import (bytes_row, failed_row, first_failure, interleave, naive_logprobs, naive_step, reported,
                           rss_baseline_kib, rss_kib, run_worker, seconds_row, serve_worker, skip_unless_benchmarking)
from bench._common import ratio_table as markdown_table  # public: `deepeyesv2 bench` and the CLI print it

CPU_METHODS = ("naive", "liger-ce", "ours", "liger-grpo", "ours-grpo")


@dataclass(frozen=True)
class Shape:
    T: int
    H: int
    V: int
    seq_len: int  # tokens per sequence of the GRPO batch (T / seq_len sequences)


FULL = Shape(T=4096, H=1024, V=151_936, seq_len=1024)
QUICK = Shape(T=1024, H=512, V=32_768, seq_len=256)


# --------------------------------------------------------------------------------------------- CPU workers
def _inputs(shape: Shape, dtype=torch.float32, device="cpu", peaky: bool = False, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(shape.T, shape.H, generator=g, device=device, dtype=dtype)
    weight = torch.randn(shape.V, shape.H, generator=g, device=device, dtype=dtype) / shape.H**0.5
    if peaky:  # a few dominant rows: trained-model-like, low-entropy softmax
        weight[:16] *= 8.0
    targets = torch.randint(0, shape.V, (shape.T,), generator=g, device=device)
    n_seq = shape.T // shape.seq_len
    adv = torch.randn(n_seq, generator=g, device=device).repeat_interleave(shape.seq_len)
    return hidden.requires_grad_(), weight.requires_grad_(), targets, adv


def _make_cpu_step(method: str, shape: Shape, hidden, weight, targets, adv):
    """A closure running forward + backward once (grads accumulate into .grad, reset by the caller)."""
    if method == "naive":
        def step():
            naive_step(hidden, weight, targets)
    elif method == "liger-ce":
        from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

        def step():
            nll, ent = LigerFusedLinearScaledCrossEntropyFunction.apply(hidden, weight, targets, return_entropy=True)
            (-nll).sum().backward()
    elif method == "ours":
        from deepeyesv2_kernels.logprobs import fused_logprobs

        def step():
            logp, ent = fused_logprobs(hidden, weight, targets, backend="torch")
            logp.sum().backward()
    elif method in ("liger-grpo", "ours-grpo"):
        n_seq, L = shape.T // shape.seq_len, shape.seq_len
        old = torch.zeros(shape.T) - 11.0  # off-policy enough that some ratios clip
        mask = torch.ones(shape.T, dtype=torch.bool)
        if method == "liger-grpo":
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, chunk_size=1,
                                               epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo")
            adv_seq = adv.view(n_seq, L)[:, 0].contiguous()

            def step():
                loss, _ = loss_fn(hidden.view(n_seq, L, -1), weight, targets.view(n_seq, L), mask.view(n_seq, L),
                                  adv_seq, old_per_token_logps=old.view(n_seq, L))
                loss.backward()
        else:
            from deepeyesv2_kernels.linear_grpo import fused_linear_grpo_loss

            cu = torch.arange(0, shape.T + 1, L, dtype=torch.int32)

            def step():
                loss, _ = fused_linear_grpo_loss(hidden, weight, targets, old, adv, mask, cu, backend="torch")
                loss.backward()
    else:
        raise ValueError(f"unknown method {method!r}")
    return step


def _cpu_worker(method: str, shape: Shape, reps: int) -> dict:
    """Runs in a fresh process: returns median seconds and peak extra bytes of one method."""
    hidden, weight, targets, adv = _inputs(shape)
    step = _make_cpu_step(method, shape, hidden, weight, targets, adv)
    base = rss_baseline_kib()
    times = []
    for i in range(reps + 1):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
    peak = rss_kib("VmHWM")
    grads = (hidden.numel() + weight.numel()) * hidden.element_size()
    return {"seconds": statistics.median(times), "extra_bytes": max(0, (peak - base) * 1024 - grads)}


def cpu_rows(quick: bool = False, reps: int | None = None, verbose: bool = True, rounds: int = 3) -> list[dict]:
    """Measure every CPU method, `rounds` fresh subprocesses each, alternating (naive, liger-ce, ours, liger-grpo,
    ours-grpo, naive, ...), and return comparison rows ours vs peer. No warm-up process: each process discards its
    own first step, and a whole discarded process would only warm the page cache."""
    shape = QUICK if quick else FULL
    reps = reps if reps is not None else 2
    payload = {"shape": shape.__dict__, "reps": reps}

    sides = {m: reported(partial(run_worker, "bench.kernels", m, payload), f"{m:11s}", verbose) for m in CPU_METHODS}
    run = interleave(sides, rounds=rounds, warmup=0, failed=lambda r: "error" in r)
    res = run.results
    device = f"CPU x{torch.get_num_threads()} threads, fp32, T={shape.T} H={shape.H} V={shape.V}"
    rows = []
    pairs = [("logprob+entropy fwd+bwd", "ours", "naive"), ("logprob+entropy fwd+bwd", "ours", "liger-ce"),
             ("GRPO loss fwd+bwd", "ours-grpo", "naive"), ("GRPO loss fwd+bwd", "ours-grpo", "liger-grpo")]
    note = f"{rounds} alternating processes per method, each the median of {reps} steps after a warm-up step"
    for bench, ours, peer in pairs:
        a, b = res[ours], res[peer]
        fa, fb = first_failure(a), first_failure(b)
        if fa or fb:
            rows.append(failed_row(f"{bench} vs {peer}", fa or {}, fb or {}, device))
            continue
        rows.append(seconds_row(f"{bench} time ({ours} vs {peer})", [x["seconds"] for x in a],
                                [x["seconds"] for x in b], device, run, note))
        rows.append(bytes_row(f"{bench} peak extra mem ({ours} vs {peer})", [x["extra_bytes"] for x in a],
                              [x["extra_bytes"] for x in b], device, run, note))
    return rows


# ------------------------------------------------------------------------------------------------- GPU
GPU_H, GPU_V = 3584, 152_064


def _gpu_methods():
    """name -> fn(hidden, weight, targets) returning per-token log-probs (differentiable)."""
    from deepeyesv2_kernels.logprobs import fused_logprobs

    methods = {
        "ours": lambda h, w, y: fused_logprobs(h, w, y)[0],
        "torch eager": lambda h, w, y: naive_logprobs(h, w, y)[0],
        "torch.compile": torch.compile(lambda h, w, y: naive_logprobs(h, w, y)[0]),
    }
    try:
        from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

        methods["liger"] = lambda h, w, y: -LigerFusedLinearScaledCrossEntropyFunction.apply(
            h, w, y, return_entropy=True)[0]
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        methods["cut-cross-entropy (logp only)"] = lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none")
    except ImportError:
        pass
    return methods


def _gpu_measure(fn, shape: Shape, peaky: bool, reps: int = 5) -> tuple[float, float]:
    hidden, weight, targets, _ = _inputs(shape, torch.bfloat16, "cuda", peaky)
    grads = (hidden.numel() + weight.numel()) * hidden.element_size()

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets).sum().backward()

    step()  # warm-up (compilation, autotuning)
    torch.cuda.synchronize()
    hidden.grad = weight.grad = None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    extra = torch.cuda.max_memory_allocated() - base - grads
    return statistics.median(times), extra


def gpu_rows(token_counts=(4096, 16_384), verbose: bool = True, rounds: int = 3) -> list[dict]:
    """GPU comparison rows (ours vs each peer), or [] without CUDA. Per shape the methods alternate in this process,
    `rounds` runs each after a warm-up round (each run: inputs, a warm-up step, median of 5 timed steps, the
    allocator peak above the inputs and their gradients)."""
    if not torch.cuda.is_available():
        return []
    device = f"{torch.cuda.get_device_name()} bf16 H={GPU_H} V={GPU_V}"
    rows = []
    methods = _gpu_methods()
    for T in token_counts:
        for peaky in (False, True):
            shape = Shape(T=T, H=GPU_H, V=GPU_V, seq_len=1024)

            def side(name, fn):
                def call():
                    try:
                        out = _gpu_measure(fn, shape, peaky)
                    except Exception as exc:  # a peer missing a kernel for this card must not stop the table
                        torch.cuda.empty_cache()
                        out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
                    if verbose:
                        print(f"  T={T} peaky={peaky} {name}: {out}", file=sys.stderr, flush=True)
                    return out
                return call

            run = interleave({name: side(name, fn) for name, fn in methods.items()}, rounds=rounds, warmup=1,
                             failed=lambda r: isinstance(r, dict))
            res = run.results
            ours = res["ours"]
            label = f"logp fwd+bwd T={T} {'peaky' if peaky else 'random'}"
            for name, r in res.items():
                if name == "ours" or first_failure(r) or first_failure(ours):
                    continue
                rows.append(seconds_row(f"{label} time vs {name}", [x[0] for x in ours], [x[0] for x in r], device, run))
                rows.append(bytes_row(f"{label} extra mem vs {name}", [x[1] for x in ours], [x[1] for x in r], device,
                                      run))
    return rows


# ------------------------------------------------------------------------------------- pytest-benchmark
def _bench_cpu_method(benchmark, method: str):
    skip_unless_benchmarking(benchmark)
    hidden, weight, targets, adv = _inputs(QUICK)
    step = _make_cpu_step(method, QUICK, hidden, weight, targets, adv)

    def run():
        hidden.grad = weight.grad = None
        step()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def test_bench_naive_logprobs(benchmark):
    _bench_cpu_method(benchmark, "naive")


def test_bench_liger_logprobs(benchmark):
    _bench_cpu_method(benchmark, "liger-ce")


def test_bench_fused_logprobs(benchmark):
    _bench_cpu_method(benchmark, "ours")


def test_bench_liger_grpo(benchmark):
    _bench_cpu_method(benchmark, "liger-grpo")


def test_bench_fused_linear_grpo(benchmark):
    _bench_cpu_method(benchmark, "ours-grpo")


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    if serve_worker(argv, lambda method, p: _cpu_worker(method, Shape(**p["shape"]), p["reps"])):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU shapes (3 rounds x 5 processes: ~3 minutes on 2 busy cores)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per process after its warm-up step")
    parser.add_argument("--rounds", type=int, default=3, help="alternating processes per method (pairs per ratio)")
    parser.add_argument("--gpu-out", default="bench/kernels_gpu.md", help="markdown file for the GPU table")
    args = parser.parse_args(argv)
    rows = cpu_rows(args.quick, args.reps, rounds=args.rounds)
    print(markdown_table(rows))
    if torch.cuda.is_available():
        g_rows = gpu_rows(rounds=args.rounds)
        table = markdown_table(g_rows)
        print()
        print(table)
        with open(args.gpu_out, "w") as f:
            f.write(f"# GPU: {torch.cuda.get_device_name()}\n\n{table}\n")
    else:
        print("\n(GPU section skipped: no CUDA device)")


if __name__ == "__main__":
    main()
