"""Per-step metrics: one JSON object per line in out_dir/metrics.jsonl, plus TensorBoard when installed.

The JSONL file is the record of a run (plots are made from it); TensorBoard is a convenience and is
silently off -- reported once -- when `torch.utils.tensorboard` or `tensorboard` is missing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _plain(v: Any) -> Any:
    """JSON-friendly value: tensors / numpy scalars -> Python numbers."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a truncated last line (a crash mid-write) is skipped."""
    rows = []
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def _tensorboard_writer_cls():
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter


class MetricsLogger:
    """Appends {"step": ..., "time": ..., **metrics} rows to out_dir/metrics.jsonl (and TensorBoard).

    Appends to an existing file; when resuming from step S call `truncate_after(S)` first, which drops the
    rows a crashed run logged past its last checkpoint.
    """

    def __init__(self, out_dir: str | Path, use_tensorboard: bool | str = "auto"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        self._writer = None
        self._purge_step: int | None = None
        self._tb_cls = None
        if use_tensorboard:
            self._tb_cls = _tensorboard_writer_cls()
            if self._tb_cls is None:
                msg = "TensorBoard logging off: `tensorboard` is not installed (metrics.jsonl is still written)"
                if use_tensorboard is True:
                    raise ImportError(msg)
                log.warning(msg)
        self._file = self.path.open("a", encoding="utf-8")

    @property
    def tensorboard(self) -> bool:
        return self._tb_cls is not None

    def truncate_after(self, step: int) -> int:
        """Drop rows with step > `step` (resume). Returns the number of rows dropped."""
        self._file.close()
        rows = read_metrics(self.path) if self.path.exists() else []
        keep = [r for r in rows if int(r.get("step", -1)) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self._purge_step = step + 1  # TensorBoard drops its own events past the resume point
        return len(rows) - len(keep)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> dict:
        """Write one row. `step` comes from the argument or metrics["step"]. Returns the row written."""
        step = metrics.get("step") if step is None else step
        if step is None:
            raise ValueError("MetricsLogger.log needs a step (argument or metrics['step'])")
        row = {"step": int(step), "time": time.time()}
        row.update({k: _plain(v) for k, v in metrics.items() if k != "step"})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb_cls is not None:
            if self._writer is None:
                self._writer = self._tb_cls(log_dir=str(self.out_dir / "tensorboard"), purge_step=self._purge_step)
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._writer.add_scalar(k, v, int(step))
        return row

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA max allocated if a GPU is in use, else the peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes
