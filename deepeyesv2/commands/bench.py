"""`deepeyesv2 bench [--quick] [--only NAME,...]`: run the side-by-side benchmarks in bench/ and write one report.

Each benchmark runs in its own subprocess (`python -m deepeyesv2.commands.bench --worker NAME`), so one that crashes,
runs out of memory or times out becomes a "failed" row and the others still run. Every benchmark returns rows
{benchmark, ours, peer, ratio, device, note}. A measured row comes from interleaved runs (bench/_common.py
`interleave`: the two sides alternate A B A B after a warm-up each) and also carries ratio_min / ratio_max / noisy /
load: its ratio is the median of the per-pair ratios ours_i / peer_i, kept as is, and the table prints it with its
min-max spread, or "noisy" where the spread is over bench/_common.py's NOISY_SPREAD. A row of deterministic counts
is marked `exact`. Any other row's `ratio` is recomputed as ours / peer from the displayed values wherever they
parse. `better` says whether lower or higher wins. The report -- versions, command line, load average, the table --
goes to bench/results/<YYYY-MM-DD>-<device>.md and to stdout.

Benchmarks (bench/<module>.py; --quick uses each one's small setting):
  packing       packed rows vs padded batches: padding waste, fwd+bwd tokens/s (tiny Qwen2.5-VL)
  kernels       CPU: fused log-prob / GRPO loss vs naive and Liger's chunked torch paths
  rollout       radix prefix-KV cache vs no cache: prefilled tokens, engine and episode wall time
  rollout_async async per-episode agent loops vs turn-synchronous rollouts on a DeepEyesV2-shaped workload
  integrations  TRL GRPOTrainer with our kernels vs as shipped (always its quick setting unless
                --integrations-full: the full run takes ~12 min on 2 cores)
  e2e_grpo      one whole GRPO step: ours vs TRL GRPOTrainer (vs TRL + Liger)
  scaling       log-prob time and memory vs T and V, ours vs naive (+ a PNG)
  kernels-gpu   the GPU kernel table (only when CUDA exists)
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import tempfile
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROW_KEYS = ("benchmark", "ours", "peer", "ratio", "device", "note")
# keys of an interleaved row (bench/_common.py paired_row) and of a deterministic one (exact_row), kept as given
PAIRED_KEYS = ("ratio_min", "ratio_max", "noisy", "pairs", "load")
EXACT_KEY = "exact"
ROWS_MARKER = "DEEPEYESV2_BENCH_ROWS "


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark: `module.function(**kwargs)` returns a list of row dicts."""

    name: str
    module: str
    function: str
    quick: dict = field(default_factory=dict)
    full: dict = field(default_factory=dict)
    needs_cuda: bool = False


BENCHMARKS: tuple[BenchSpec, ...] = (
    BenchSpec("packing", "bench.packing", "run", {"quick": True}, {"quick": False}),
    BenchSpec("kernels", "bench.kernels", "cpu_rows", {"quick": True, "verbose": False}, {"quick": False, "verbose": False}),
    BenchSpec("rollout", "bench.rollout", "run_benchmark", {"quick": True}, {"quick": False}),
    BenchSpec("rollout_async", "bench.rollout", "run_schedules", {"quick": True, "rounds": 2}, {"quick": False}),
    BenchSpec("integrations", "bench.integrations", "rows", {"quick": True, "verbose": False},
              {"quick": True, "verbose": False}),
    BenchSpec("e2e_grpo", "bench.e2e_grpo", "rows", {"quick": True, "verbose": False}, {"quick": False, "verbose": False}),
    BenchSpec("scaling", "bench.scaling", "rows", {"quick": True, "verbose": False}, {"quick": False, "verbose": False}),
    BenchSpec("kernels-gpu", "bench.kernels", "gpu_rows", {"verbose": False}, {"verbose": False}, needs_cuda=True),
)
BY_NAME = {b.name: b for b in BENCHMARKS}


# ------------------------------------------------------------------------------------------- rows
_VALUE = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(ms|s|KiB|MiB|GiB|B|%|x)?\s*$")
_UNITS = {None: 1.0, "x": 1.0, "ms": 1e-3, "s": 1.0, "B": 1.0, "KiB": 2.0**10, "MiB": 2.0**20, "GiB": 2.0**30, "%": 0.01}
_LOWER_IS_BETTER = ("time", "mem", "waste", "prefill", "rss", "seconds", "latency", "bytes")
_HIGHER_IS_BETTER = ("tokens/s", "tok/s", "throughput", "speed-up", "speedup", "accuracy")


def parse_value(v) -> float | None:
    """A displayed value as a number in base units: 12 -> 12.0, "12 ms" -> 0.012, "1.5 GiB" -> 1610612736.0,
    "62.5%" -> 0.625; None for anything else ("failed", "n/a", ...)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    m = _VALUE.match(str(v).replace(",", ""))
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def infer_better(benchmark: str) -> str:
    b = benchmark.lower()
    if any(k in b for k in _HIGHER_IS_BETTER):
        return "higher"
    if any(k in b for k in _LOWER_IS_BETTER):
        return "lower"
    return "?"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def normalize_rows(rows: list[dict], default_device: str = "") -> list[dict]:
    """Rows with every key of ROW_KEYS plus `better`. An interleaved row (it has ratio_min) keeps its ratio, the
    median of its per-pair ratios, and its PAIRED_KEYS; any other row gets ratio = ours / peer from the displayed
    values when both parse (else the row's own ratio if finite, else None). A row without a ratio whose peer is 0
    or missing is informational ("prefill saved: 62% vs 0%"): it is folded into the previous row's note."""
    out: list[dict] = []
    for r in rows:
        if not isinstance(r, dict) or "benchmark" not in r:
            raise ValueError(f"benchmark row must be a dict with a 'benchmark' key, got {r!r}")
        row = {k: r.get(k) for k in ROW_KEYS}
        row["device"] = row["device"] or default_device
        row["note"] = row["note"] or ""
        row["better"] = r.get("better") or infer_better(str(row["benchmark"]))
        a, b = parse_value(row["ours"]), parse_value(row["peer"])
        if "ratio_min" in r:
            row.update({k: r.get(k) for k in PAIRED_KEYS})
            row["ratio"] = float(r["ratio"]) if _finite(r["ratio"]) else None
            out.append(row)
            continue
        if r.get(EXACT_KEY):
            row[EXACT_KEY] = True
        if a is not None and b:
            row["ratio"] = a / b
        else:
            given = row["ratio"]
            row["ratio"] = float(given) if _finite(given) else None
        if row["ratio"] is None and a is not None and not b and out:
            prev = out[-1]
            prev["note"] = "; ".join(x for x in (prev["note"], f"{row['benchmark']}: {row['ours']} vs {row['peer']}") if x)
            continue
        out.append(row)
    return out


def failed_row(name: str, error: str, device: str) -> dict:
    return {"benchmark": name, "ours": "failed", "peer": "-", "ratio": None, "device": device,
            "note": error.replace("|", "/").replace("\n", " ")[:300], "better": "?"}


def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")


def ratio_cell(row: dict) -> str:
    """The ratio as printed: "0.934 (0.901-0.972)" (median of the pair ratios, their min-max), "noisy
    (0.61-1.40)" where the pairs spread over the bound (no ratio is claimed then), "0.439 (exact)" for
    deterministic counts, "0.500 (single run)" for a row not measured interleaved, "n/a" without a ratio."""
    ratio = row.get("ratio")
    if not _finite(ratio):
        return "n/a"
    if "ratio_min" in row:
        lo, hi = row["ratio_min"], row["ratio_max"]
        if row.get("noisy"):
            return f"noisy ({lo:.3g}-{hi:.3g})"
        return f"{ratio:.3f} ({lo:.3f}-{hi:.3f})"
    return f"{ratio:.3f} ({'exact' if row.get(EXACT_KEY) else 'single run'})"


def load_cell(row: dict) -> str:
    """The 1-minute load average before -> after an interleaved row's runs ("7.9->8.3"), "-" for other rows."""
    load = row.get("load")
    if not load:
        return "-"
    return "->".join(f"{x:.1f}" for x in load)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| group | benchmark | ours | peer | ours/peer (min-max) | better | load | device | note |", "|---" * 9 + "|"]
    for r in rows:
        lines.append("| " + " | ".join([_cell(r.get("group", "")), _cell(r["benchmark"]), _cell(r["ours"]),
                                          _cell(r["peer"]), ratio_cell(r), _cell(r.get("better", "?")), load_cell(r),
                                          _cell(r["device"]), _cell(r.get("note", ""))]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- environment
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("deepeyesv2", "torch", "transformers", "triton", "trl", "liger-kernel", "pytest-benchmark"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def device_label() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{os.cpu_count()}c"


def device_slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "unknown"


def repo_root() -> Path:
    """The source checkout holding bench/ (the benchmarks are scripts, not part of the installed package)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "__init__.py").is_file():
        raise FileNotFoundError(f"deepeyesv2 bench needs a source checkout: no bench/ package next to {root / 'deepeyesv2'}")
    return root


def import_bench(module: str):
    """Import `bench.<x>` from the checkout's bench/ (repo_root()). The `bench` package is loaded from its file
    location: the installed package never edits sys.path (a checkout folder on it would also let our `kernels/`
    folder shadow Hugging Face's installed `kernels` package, which transformers probes by import name)."""
    if "bench" not in sys.modules:
        init = repo_root() / "bench" / "__init__.py"
        spec = importlib.util.spec_from_file_location("bench", init, submodule_search_locations=[str(init.parent)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = pkg
        spec.loader.exec_module(pkg)
    return importlib.import_module(module)


# ------------------------------------------------------------------------------------------- running
def _worker(name: str, quick: bool, kwargs_json: str | None) -> None:
    spec = BY_NAME[name]
    kwargs = json.loads(kwargs_json) if kwargs_json else (spec.quick if quick else spec.full)
    fn = getattr(import_bench(spec.module), spec.function)
    rows = fn(**kwargs)
    print(ROWS_MARKER + json.dumps(rows, default=_jsonable), flush=True)


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def run_one(spec: BenchSpec, quick: bool, timeout: float, kwargs: dict | None = None) -> tuple[list[dict], float, str | None]:
    """(rows, seconds, error) of one benchmark run in a fresh subprocess."""
    cmd = [sys.executable, "-m", "deepeyesv2.commands.bench", "--worker", spec.name]
    if quick:
        cmd.append("--quick")
    if kwargs is not None:
        cmd += ["--kwargs", json.dumps(kwargs)]
    t0 = time.perf_counter()
    try:
        # cwd outside the checkout: nothing of it lands on the worker's sys.path (import_bench loads bench/ by path)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], time.perf_counter() - t0, f"timed out after {timeout:.0f} s"
    dt = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(ROWS_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = [ln.strip() for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        errs = [ln for ln in tail if re.search(r"(Error|Exception|error:)", ln)]
        return [], dt, f"exit {proc.returncode}: " + ((errs or tail or ["no output"])[-1])
    return json.loads(lines[-1][len(ROWS_MARKER):]), dt, None


def select(only: str | None, cuda: bool) -> list[BenchSpec]:
    if not only:
        return [b for b in BENCHMARKS if cuda or not b.needs_cuda]
    names = [n.strip() for n in only.split(",") if n.strip()]
    bad = [n for n in names if n not in BY_NAME]
    if bad:
        raise ValueError(f"--only: unknown benchmark(s) {bad}; choose from {[b.name for b in BENCHMARKS]}")
    return [BY_NAME[n] for n in names]


def report(rows: list[dict], *, date: str, device: str, command: str, quick: bool, timings: dict[str, float],
           vers: dict[str, str], load: tuple[float, float]) -> str:
    """The markdown report; `load` = the 1-minute load average before the first and after the last benchmark."""
    bound = import_bench("bench._common").NOISY_SPREAD
    lines = [f"# deepeyesv2 bench -- {date} -- {device}", "",
             f"Command: `{command}` ({'quick' if quick else 'full'} settings)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, 1-minute load average {load[0]:.1f} before the "
             f"first benchmark, {load[1]:.1f} after the last.", "",
             "ratio = ours / peer, measured interleaved: the two sides ran alternately (A B A B ..., after a warm-up "
             "each; where memory is measured each run is a fresh process), and the ratio is the median of the "
             "per-pair ratios with their min-max in brackets. Where max/min of the pair ratios is over "
             f"{bound} (bench/_common.py NOISY_SPREAD) the load moved too much within the pairs and the cell says "
             "`noisy` instead of a ratio. `exact`: deterministic counts. load = 1-minute load average before -> "
             "after the row's runs. `better` says which direction wins. Each benchmark ran in its own subprocess.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), "",
             markdown_table(rows), "",
             "Wall time per benchmark: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), ""]
    return "\n".join(lines)


def run_benchmarks(specs: list[BenchSpec], quick: bool, timeout: float, integrations_full: bool = False,
                   progress: bool = True) -> tuple[list[dict], dict[str, float]]:
    device = device_label()
    rows, timings = [], {}
    for spec in specs:
        kwargs = {"quick": False, "verbose": False} if spec.name == "integrations" and integrations_full else None
        if progress:
            print(f"[bench] {spec.name} ...", file=sys.stderr, flush=True)
        got, dt, err = run_one(spec, quick, timeout, kwargs)
        timings[spec.name] = dt
        if err is None:
            try:
                got = normalize_rows(got, device)
            except ValueError as e:
                err = str(e)
        block = [failed_row(spec.name, err, device)] if err else got
        for r in block:
            r["group"] = spec.name
        rows += block
        if progress:
            print(f"[bench] {spec.name}: {'FAILED ' + err if err else f'{len(got)} rows'} ({dt:.0f} s)",
                  file=sys.stderr, flush=True)
    return rows, timings


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="deepeyesv2 bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small settings (3 interleaved rounds per ratio): 14 min on 2 shared CPU cores at load 2-10")
    ap.add_argument("--only", default=None, help="comma-separated benchmark names (see the list above)")
    ap.add_argument("--out", default=None, help="report path (default bench/results/<YYYY-MM-DD>-<device>.md)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 900 quick, 7200 full)")
    ap.add_argument("--integrations-full", action="store_true", help="run bench/integrations.py's full setting")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--kwargs", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.quick, args.kwargs)
        return 0
    import torch

    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name:13s} {b.module}.{b.function}{'  (CUDA only)' if b.needs_cuda else ''}")
        return 0
    try:
        specs = select(args.only, torch.cuda.is_available())
        root = repo_root()
    except (ValueError, FileNotFoundError) as e:
        print(f"deepeyesv2 bench: {e}", file=sys.stderr)
        return 2
    timeout = args.timeout or (900.0 if args.quick else 7200.0)
    load_before = import_bench("bench._common").load_average()
    rows, timings = run_benchmarks(specs, args.quick, timeout, args.integrations_full)
    load = (load_before, import_bench("bench._common").load_average())
    date, device = datetime.date.today().isoformat(), device_label()
    text = report(rows, date=date, device=device, command=" ".join(["deepeyesv2", "bench", *argv]), quick=args.quick,
                  timings=timings, vers=versions(), load=load)
    out = Path(args.out) if args.out else root / "bench" / "results" / f"{date}-{device_slug(device)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"[bench] wrote {out}", file=sys.stderr)
    return 1 if any(r["ours"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
