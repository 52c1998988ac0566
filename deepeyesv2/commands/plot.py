"""Training curves: PNGs of every numeric metric in a run's metrics.jsonl, grouped by theme.

    plot_run("runs/demo")  ->  runs/demo/plots/{loss,reward,tools,length,policy,throughput,memory,...}.png

Rows may carry a string "phase" (e.g. "sft", "rl"): each phase is drawn as its own line. An optional
`phases.json` ({"phases": [{"name": "sft", "start_step": 0, "end_step": 50}, ...]} or a bare list of those)
shades each phase's step range; an optional `demo_summary.json` (numbers, possibly nested one level)
becomes a bar chart `summary.png`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from deepeyesv2.metrics import METRICS_FILE, read_metrics

# (file stem, title, predicate on the metric name); first match wins, order matters.
GROUPS: list[tuple[str, str, re.Pattern]] = [
    ("loss", "Loss", re.compile(r"loss|nll", re.I)),
    ("reward", "Reward and its components", re.compile(r"reward|acc|format|score|penalty", re.I)),
    ("tools", "Tool calls", re.compile(r"tool|call|search|code", re.I)),
    ("length", "Response length / turns", re.compile(r"len|turn|overlong|truncat", re.I)),
    ("policy", "Policy: clipping, KL, entropy, ratio", re.compile(r"clip_frac|clipfrac|kl|entropy|ratio|adv", re.I)),
    ("optim", "Optimizer", re.compile(r"grad_norm|^lr$|learning_rate", re.I)),
    ("throughput", "Throughput", re.compile(r"per_s|/s$|throughput|tok_s|time|_s$|latency", re.I)),
    ("memory", "Memory", re.compile(r"mem|rss|bytes|gb$|gib", re.I)),
]
SKIP = {"step", "time", "epoch"}


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def group_metrics(names: list[str]) -> dict[str, list[str]]:
    """{file stem: metric names}; metrics matching no group go to "other"."""
    groups: dict[str, list[str]] = {}
    for name in names:
        stem = next((g for g, _, pat in GROUPS if pat.search(name)), "other")
        groups.setdefault(stem, []).append(name)
    return groups


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def _phase_spans(run_dir: Path) -> list[tuple[str, float, float]]:
    path = run_dir / "phases.json"
    if not path.is_file():
        return []
    data = _load_json(path)
    items = data.get("phases", []) if isinstance(data, dict) else data
    spans = []
    for p in items if isinstance(items, list) else []:
        if isinstance(p, dict) and _numeric(p.get("start_step")) and _numeric(p.get("end_step")):
            spans.append((str(p.get("name", "")), float(p["start_step"]), float(p["end_step"])))
    return spans


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif _numeric(v):
            out[key] = float(v)
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write PNG curves for run_dir/metrics.jsonl into run_dir/plots/; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (is this a run directory? train first, or pass train.out_dir)")
    rows = [r for r in read_metrics(metrics_path) if _numeric(r.get("step"))]
    names: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in SKIP and _numeric(v) and k not in names:
                names.append(k)
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    spans = _phase_spans(run_dir)
    phases = sorted({str(r["phase"]) for r in rows if "phase" in r}, key=lambda p: min(r["step"] for r in rows if r.get("phase") == p))
    # one colour per phase name, shared by its curve and its shaded span
    colour = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(phases + [n for n, _, _ in spans]))}
    written: list[Path] = []
    for stem, metrics in group_metrics(names).items():
        title = next((t for g, t, _ in GROUPS if g == stem), "Other metrics")
        ncols = min(3, len(metrics))
        nrows = math.ceil(len(metrics) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
        for ax, name in zip(axes.flat, metrics):
            for phase in phases or [None]:
                pts = [(r["step"], r[name]) for r in rows
                       if _numeric(r.get(name)) and (phase is None or str(r.get("phase")) == phase)]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=phase,
                            color=colour.get(phase, "C0") if phase is not None else "C0")
            for label, a, b in spans:
                ax.axvspan(a, b, color=colour[label], alpha=0.08, label=None if label in phases else (label or None))
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if phases or spans:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        fig.suptitle(f"{title} -- {run_dir.name}")
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    summary_path = run_dir / "demo_summary.json"
    if summary_path.is_file():
        data = _load_json(summary_path)
        values = _flatten(data) if isinstance(data, dict) else {}
        if values:
            fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(values) + 2), 3.5))
            ax.bar(range(len(values)), list(values.values()), color="C0")
            ax.set_xticks(range(len(values)), list(values.keys()), rotation=45, ha="right", fontsize=8)
            ax.set_title(f"Summary -- {run_dir.name}")
            ax.grid(axis="y", alpha=0.3)
            fig.tight_layout()
            path = out_dir / "summary.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    """`deepeyesv2 plot RUN_DIR`: the PNGs' paths, one per line."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: deepeyesv2 plot RUN_DIR   (PNG curves of RUN_DIR/metrics.jsonl into RUN_DIR/plots/)",
              file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    if not (Path(argv[0]) / METRICS_FILE).is_file():
        print(f"deepeyesv2 plot: {argv[0]}/{METRICS_FILE} not found (give a run directory written by sft or rl)",
              file=sys.stderr)
        return 2
    for path in plot_run(argv[0]):
        print(path)
    return 0
