"""Helpers shared by the bench/ modules: interleaved measurement (every ratio), worker subprocesses, RSS probes,
number formats, markdown tables, the naive log-prob reference and the pytest-benchmark skip. At module level it
imports only the standard library, bench.memory_probe and deepeyesv2.commands.bench (both standard library only;
torch and pytest are imported lazily), so a bench module's parent process stays light.

Interleaving: a ratio compares two sides measured alternately -- warm-up A, warm-up B, then A B A B ... -- and is
the median of the per-pair ratios A_i / B_i, with their min-max spread and the load average before and after. Run
one after the other, minutes apart, the two sides of one row saw different loads on this shared machine (the same
kernels row read 3.27 busy and 0.93 quiet); a pair is taken seconds apart, and the spread says how much the load
moved within the pairs. Where memory is measured, each call of a side is a fresh worker process (a process's RSS
high-water mark cannot be shared by two sides), so the processes alternate A B A B.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# ratio_cell / load_cell: how `deepeyesv2 bench` prints a row's ratio and load; the bench tables print them the same way
from deepeyesv2.commands.bench import load_cell, ratio_cell  # noqa: F401  (re-exported for the bench modules)
# rss_kib(field="VmRSS") -> KiB of a /proc/self/status field (VmRSS now, VmHWM high-water mark): the package's copy
from bench.memory_probe import rss_kib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- interleaving
# A row prints "noisy" instead of its ratio when max/min of its per-pair ratios exceeds this. Why 1.5: the effects
# the README reports are ratios of 0.5-0.9 (or their inverse); when pairs taken seconds apart disagree by more than
# 1.5x, the load moved by as much as the effect within a pair, and a median of 3 such pairs cannot tell "ours 0.7x"
# from "even". Below it, the median with its printed spread is a figure a reader can check against a rerun.
NOISY_SPREAD = 1.5


def load_average() -> float:
    """The 1-minute load average (os.getloadavg; NaN where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


@dataclass(frozen=True)
class Interleaved:
    """What `interleave` measured: each side's results in round order (warm-ups dropped), every call made in
    order (warm-ups included) and the 1-minute load average before the first and after the last call."""

    results: dict[str, list]
    calls: tuple[str, ...]
    load_before: float
    load_after: float

    @property
    def load(self) -> list[float]:
        return [self.load_before, self.load_after]


def reported(call: Callable[[], Any], label: str, verbose: bool,
             show: Callable[[Any], Any] = lambda result: result) -> Callable[[], Any]:
    """`call` for `interleave`, printing "  <label> <show(result)>" to stderr after each run when verbose: the
    progress lines of a long interleaved benchmark."""
    def run() -> Any:
        result = call()
        if verbose:
            print(f"  {label} {show(result)}", file=sys.stderr, flush=True)
        return result
    return run


def interleave(sides: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
               failed: Callable[[Any], bool] = lambda result: False,
               load: Callable[[], float] = load_average) -> Interleaved:
    """Call the sides alternately: `warmup` rounds whose results are dropped, then `rounds` rounds, each round
    calling every side once in the order given (two sides: warm-up A, warm-up B, A B A B ...). A side whose result
    `failed(result)` is not called again; its list then ends with that result (a failed warm-up is kept too), so
    the caller can show the error. The load average is read before the first call and after the last."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"interleave: rounds must be >= 1 and warmup >= 0, got rounds={rounds} warmup={warmup}")
    results: dict[str, list] = {name: [] for name in sides}
    dead: set[str] = set()
    calls: list[str] = []
    before = load()
    for i in range(warmup + rounds):
        for name, fn in sides.items():
            if name in dead:
                continue
            calls.append(name)
            out = fn()
            if failed(out):
                dead.add(name)
                results[name].append(out)
            elif i >= warmup:
                results[name].append(out)
    return Interleaved(results, tuple(calls), before, load())


@dataclass(frozen=True)
class PairStats:
    """Per-pair ratios ours_i / peer_i of interleaved runs: their median and min-max, and whether they spread more
    than `bound` (max / min)."""

    ratios: tuple[float, ...]
    median: float
    lo: float
    hi: float
    bound: float

    @property
    def spread(self) -> float:
        return self.hi / self.lo if self.lo > 0 else math.inf

    @property
    def noisy(self) -> bool:
        # NaN or infinite spreads are noisy too: a ratio is printed only when the pairs agree within the bound
        return not self.spread <= self.bound


def pair_stats(ours: Sequence[float], peer: Sequence[float], bound: float = NOISY_SPREAD,
               floor: float = 0.0) -> PairStats:
    """Median and min-max of ours[i] / max(peer[i], floor) over the pairs (`floor` 1 for byte counts, where a peer
    that needs no memory must not divide by zero)."""
    if len(ours) != len(peer) or not ours:
        raise ValueError(f"pair_stats: need as many ours as peer values, at least one; got {len(ours)} and {len(peer)}")
    ratios = tuple(float(a) / max(float(b), floor) if max(float(b), floor) else math.inf for a, b in zip(ours, peer))
    return PairStats(ratios, statistics.median(ratios), min(ratios), max(ratios), bound)


def paired_row(benchmark: str, ours: Sequence[float], peer: Sequence[float], fmt: Callable[[float], Any],
               device: str, run: Interleaved, note: str = "", better: str | None = None, floor: float = 0.0) -> dict:
    """A row of interleaved values: ours / peer show each side's median (formatted by `fmt`); ratio is the median
    of the per-pair ratios ours_i / peer_i (not the ratio of the medians), ratio_min / ratio_max their range,
    noisy whether that range is wider than NOISY_SPREAD, load the load average before and after the runs."""
    st = pair_stats(ours, peer, floor=floor)
    row = dict(benchmark=benchmark, ours=fmt(statistics.median(ours)), peer=fmt(statistics.median(peer)),
               ratio=st.median, ratio_min=st.lo, ratio_max=st.hi, noisy=st.noisy, pairs=len(st.ratios),
               load=run.load, device=device, note=note)
    if better is not None:
        row["better"] = better
    return row


def exact_row(benchmark: str, ours: float, peer: float, device: str, note: str = "", better: str | None = None) -> dict:
    """A row of two deterministic counts (tokens prefilled, padding slots): the same in every run, so it has no
    spread to report and is never noisy; ratio = ours / peer."""
    row = dict(benchmark=benchmark, ours=ours, peer=peer, ratio=ours / peer if peer else None, exact=True,
               device=device, note=note)
    if better is not None:
        row["better"] = better
    return row


# ------------------------------------------------------------------------------------------ subprocesses
def run_worker(module: str, worker: str, payload: Any = None, timeout: float = 3600, env: Mapping[str, str] | None = None,
               describe_error: Callable[[str], str] = lambda text: text[-500:]) -> Any:
    """Run `python -m <module> --worker <worker> --payload <json>` in a fresh process from the repo root (the
    module's `main` hands that to `serve_worker`); returns the worker's last stdout line parsed as JSON, or
    {"error": describe_error(stderr or stdout)} when it exits non-zero. `env` entries are added to this process's
    environment. subprocess.TimeoutExpired propagates (callers decide what a timeout is worth)."""
    full_env = {**os.environ, **env} if env is not None else None
    args = ["--worker", worker, "--payload", json.dumps(payload)]
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=timeout, env=full_env)
    if proc.returncode != 0:
        return {"error": describe_error(proc.stderr or proc.stdout)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_worker(argv: Sequence[str] | None, handler: Callable[[str, Any], Any]) -> bool:
    """The worker side of run_worker. If argv (default sys.argv[1:]) is a worker call, print
    json.dumps(handler(worker, payload)) as one line and return True; else return False and leave the
    command line to the module's own parser."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" not in argv:
        return False
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--payload", default="null")
    args = parser.parse_args(argv)
    print(json.dumps(handler(args.worker, json.loads(args.payload))))
    return True


# ------------------------------------------------------------------------------------------- RSS probes
def reset_peak_rss(required: bool = False) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Without `required`, a kernel that refuses is ignored (the
    peak then also covers what ran before); with it the OSError propagates."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        if required:
            raise


def rss_baseline_kib() -> int:
    """Collect garbage, reset the RSS high-water mark and return the current RSS in KiB: the baseline that a later
    rss_kib("VmHWM") is compared with."""
    gc.collect()
    reset_peak_rss()
    return rss_kib("VmRSS")


# ---------------------------------------------------------------------------------------------- formats
def fmt_seconds(x: float) -> str:
    """'123 ms' below 10 s, else '12.3 s'."""
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def fmt_bytes(x: float) -> str:
    """'1.23 GiB' from 1 GiB up, else '123 MiB'."""
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


def seconds_row(benchmark: str, ours: Sequence[float], peer: Sequence[float], device: str, run: Interleaved,
                note: str = "") -> dict:
    """A paired_row of durations in seconds (one value per interleaved round and side)."""
    return paired_row(benchmark, ours, peer, fmt_seconds, device, run, note)


def bytes_row(benchmark: str, ours: Sequence[float], peer: Sequence[float], device: str, run: Interleaved,
              note: str = "") -> dict:
    """A paired_row of byte counts, each pair's ratio ours / max(peer, 1) (a peer that needs no memory must not
    divide by zero)."""
    return paired_row(benchmark, ours, peer, fmt_bytes, device, run, note, floor=1.0)


def failed_row(benchmark: str, ours: Mapping[str, Any], peer: Mapping[str, Any], device: str,
               error_chars: int | None = None) -> dict:
    """The row standing in for a comparison whose ours or peer worker failed: each side shows its error (the last
    `error_chars` characters, all when None) or "ok"; ratio NaN."""
    def side(res: Mapping[str, Any]) -> str:
        text = res.get("error", "ok")
        return text if error_chars is None else text[-error_chars:]

    return dict(benchmark=benchmark, ours=side(ours), peer=side(peer), ratio=None, device=device)


def first_failure(results: Sequence[Any]) -> dict | None:
    """The first worker result of a side that is an {"error": ...} dict (run_worker's failure), else None."""
    return next((r for r in results if isinstance(r, dict) and "error" in r), None)


def render_table(rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[tuple[str, str | Callable[[Mapping[str, Any]], Any]]]) -> str:
    """A markdown table with one line per row; each column is (header, row key or function row -> cell text)."""
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [cell(r) if callable(cell) else r[cell] for _, cell in columns]
        lines.append("| " + " | ".join(f"{c}" for c in cells) + " |")
    return "\n".join(lines)


def publish(text: str, out: str | os.PathLike | None, default_name: str, write: bool = True) -> None:
    """Print a peer benchmark's markdown and, with `write`, save it to `out` (default bench/results/<default_name>)."""
    print(text)
    if write:
        path = out or os.path.join(REPO_ROOT, "bench", "results", default_name)
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}", file=sys.stderr)


RATIO_COLUMNS = (("benchmark", "benchmark"), ("ours", "ours"), ("peer", "peer"), ("ours/peer (min-max)", ratio_cell),
                 ("load before->after", load_cell), ("device", "device"))


def ratio_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table of rows (paired_row / exact_row / failed_row):
    | benchmark | ours | peer | ours/peer (min-max) | load before->after | device |."""
    return render_table(rows, RATIO_COLUMNS)


# ------------------------------------------------------------------------------------- log-prob reference
def naive_logprobs(hidden, weight, targets):
    """The naive path: hidden [T, H] @ weight [V, H].T -> fp32 log_softmax over [T, V] -> (logp [T], entropy [T])
    fp32, both differentiable."""
    import torch

    log_p = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    logp = log_p.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy


def naive_step(hidden, weight, targets) -> None:
    """Forward + backward of the naive path (entropy computed, as ours does, but not differentiated)."""
    logp, ent = naive_logprobs(hidden, weight, targets)
    (logp.sum() + 0.0 * ent.sum().detach()).backward()


# ------------------------------------------------------------------------------------ pytest-benchmark
def skip_unless_benchmarking(benchmark) -> None:
    """Skip a pytest-benchmark entry point unless benchmarking is enabled (--benchmark-enable / --benchmark-only)."""
    import pytest

    if getattr(benchmark, "disabled", True):
        pytest.skip("benchmarks run only with --benchmark-enable / --benchmark-only")
