"""Helpers shared by the bench/ modules: worker subprocesses, RSS probes, number formats, markdown tables, the naive
log-prob reference and the pytest-benchmark skip. At module level it imports only the standard library and
deepeyesv2.memory_probe (itself standard library only; torch and pytest are imported lazily), so a bench module's
parent process stays light."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# rss_kib(field="VmRSS") -> KiB of a /proc/self/status field (VmRSS now, VmHWM high-water mark): the package's copy
from deepeyesv2.memory_probe import rss_kib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def seconds_row(benchmark: str, ours: float, peer: float, device: str) -> dict:
    """A row comparing two durations in seconds: formatted values, ratio = ours / peer."""
    return dict(benchmark=benchmark, ours=fmt_seconds(ours), peer=fmt_seconds(peer), ratio=ours / peer, device=device)


def bytes_row(benchmark: str, ours: float, peer: float, device: str) -> dict:
    """A row comparing two byte counts: formatted values, ratio = ours / max(peer, 1) (a peer that needs no memory
    must not divide by zero)."""
    return dict(benchmark=benchmark, ours=fmt_bytes(ours), peer=fmt_bytes(peer), ratio=ours / max(peer, 1),
                device=device)


def failed_row(benchmark: str, ours: Mapping[str, Any], peer: Mapping[str, Any], device: str,
               error_chars: int | None = None) -> dict:
    """The row standing in for a comparison whose ours or peer worker failed: each side shows its error (the last
    `error_chars` characters, all when None) or "ok"; ratio NaN."""
    def side(res: Mapping[str, Any]) -> str:
        text = res.get("error", "ok")
        return text if error_chars is None else text[-error_chars:]

    return dict(benchmark=benchmark, ours=side(ours), peer=side(peer), ratio=float("nan"), device=device)


def render_table(rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[tuple[str, str | Callable[[Mapping[str, Any]], Any]]]) -> str:
    """A markdown table with one line per row; each column is (header, row key or function row -> cell text)."""
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [cell(r) if callable(cell) else r[cell] for _, cell in columns]
        lines.append("| " + " | ".join(f"{c}" for c in cells) + " |")
    return "\n".join(lines)


RATIO_COLUMNS = (("benchmark", "benchmark"), ("ours", "ours"), ("peer", "peer"),
                 ("ratio", lambda r: f"{r['ratio']:.3f}"), ("device", "device"))


def ratio_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table of rows {benchmark, ours, peer, ratio (a float), device}: | benchmark | ours | peer | ratio | device |."""
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
