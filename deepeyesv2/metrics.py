"""What a run reports: metrics.jsonl rows (+ TensorBoard / W&B), its console lines, and steps that trained nothing.

The JSONL file is the record of a run (plots are made from it) and is always written; `train.report_to` adds
TensorBoard and Weights & Biases, imported only when asked for. A logger that is asked for but not installed is
a ConfigError before anything is built, never silently off. W&B honours its own environment (`WANDB_MODE=offline`
writes the run under out_dir/wandb without network; `WANDB_PROJECT`).

Console lines (stderr, through `tqdm.write` so they never tangle with a progress bar): one line per step when
the bar is off, "saved checkpoint to ..." lines, one warning per cause of a step that did not update the
weights, and one summary line at the end. Hugging Face's own progress bars (loading weights, writing shards) are
off while a stage runs (`quiet_hf_progress`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from .config import REPORTERS, ConfigError

METRICS_FILE = "metrics.jsonl"
WANDB_PROJECT = "deepeyesv2"  # W&B project when WANDB_PROJECT is not set

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


def check_reporters(report_to: tuple[str, ...] | list[str]) -> None:
    """ConfigError naming train.report_to when it lists an unknown logger or one whose package is missing."""
    for name in report_to:
        if name not in REPORTERS:
            raise ConfigError(f"train.report_to: unknown logger {name!r}; allowed: {', '.join(REPORTERS)}")
        if name == "jsonl":
            continue
        try:
            if name == "tensorboard":
                import tensorboard  # noqa: F401
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            else:
                import wandb  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"train.report_to includes {name!r} but it cannot be imported ({e}): "
                              f"pip install {name}, or drop it from train.report_to "
                              f"(metrics.jsonl is always written)") from None


def _scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a row, without step and time (what TensorBoard and W&B plot)."""
    return {k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class MetricsLogger:
    """Appends {"step": ..., "time": ..., **metrics} rows to out_dir/metrics.jsonl, and to the loggers of
    `report_to` ("tensorboard": out_dir/tensorboard; "wandb": a run named `run_name`, files under out_dir/wandb,
    `run_config` as its config). TensorBoard's writer and the W&B run start at the first row logged, so only
    the rank that logs creates them.

    Appends to an existing file; when resuming from step S call `truncate_after(S)` first, which drops the
    rows a crashed run logged past its last checkpoint (TensorBoard purges its own; a resumed W&B run is a new
    W&B run, whose steps start at S + 1).
    """

    def __init__(self, out_dir: str | Path, report_to: tuple[str, ...] | list[str] = ("jsonl",),
                 run_name: str | None = None, run_config: dict | None = None):
        check_reporters(report_to)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        self.report_to = tuple(report_to)
        self.run_name = run_name or self.out_dir.resolve().name
        self.run_config = run_config
        self._writer = None
        self._wandb_run = None
        self._purge_step: int | None = None
        self._file = self.path.open("a", encoding="utf-8")

    @property
    def tensorboard(self) -> bool:
        return "tensorboard" in self.report_to

    @property
    def wandb(self) -> bool:
        return "wandb" in self.report_to

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
        scalars = _scalars(row)
        if self.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=self._purge_step)
            for k, v in scalars.items():
                self._writer.add_scalar(k, v, int(step))
        if self.wandb:
            if self._wandb_run is None:
                import wandb

                self._wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
                                             name=self.run_name, dir=str(self.out_dir), config=self.run_config)
            self._wandb_run.log(scalars, step=int(step))
        return row

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# Console lines
# ---------------------------------------------------------------------------------------------------------


def console(line: str, bar: tqdm | None = None) -> None:
    """One line on stderr; through the bar's `write` while a bar is shown, so the bar redraws below it."""
    if bar is not None and not bar.disable:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """transformers' and huggingface_hub's own tqdm bars ("Loading weights", "Writing model shards", downloads)
    off inside, restored after: a stage prints its own bar or step lines, and theirs would tangle with them."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def step_line(stage: str, row: dict, total_steps: int, keys: tuple[str, ...], cause: str | None = None) -> str:
    """`rl step 3/10: reward 0.25 loss 0.0123 ...` with the row's `keys` that it has (and the no-update cause)."""
    parts = [f"{k} {_fmt(row[k])}" for k in keys if k in row]
    tail = f" [no update: {cause}]" if cause else ""
    return f"{stage} step {row['step']}/{total_steps}: " + " ".join(parts) + tail


# ---------------------------------------------------------------------------------------------------------
# Steps that did not update the weights
# ---------------------------------------------------------------------------------------------------------

# cause -> what happened and the fix, said once per run in the warning line
NO_UPDATE_CAUSES = {
    "no_trained_tokens": "no token of the step was trained (every response or assistant turn was empty or "
                         "masked), so no optimizer step ran: check the data's assistant turns and "
                         "rollout.max_new_tokens",
    "zero_lr": "the learning rate was 0, so the weights did not change (optim.lr=0 is a dry run): set optim.lr > 0",
    "equal_rewards": "every group's rewards were equal, so every advantage was 0 and so were the loss and the "
                     "gradient (a random or untrained policy rarely answers right, whatever DAPO dynamic sampling "
                     "drops and refills): start RL from an SFT checkpoint (--model.name_or_path "
                     "<sft out_dir>/checkpoints/<step>), use prompts the policy sometimes solves, or raise "
                     "rl.group_size / rl.max_refill_rounds",
    "zero_gradient": "the gradient was 0 for every trained parameter: check model.lora_targets, "
                     "model.freeze_vision and the loss mask",
}


def no_update_cause(row: dict, all_groups_equal: bool = False) -> str | None:
    """Why a step's metrics row shows no weight update (a key of NO_UPDATE_CAUSES), or None if it updated.
    `all_groups_equal` (RL): every kept group's rewards were equal (zero advantages)."""
    if row.get("trained_tokens", 0) == 0 or "grad_norm" not in row:
        return "no_trained_tokens"
    if row["lr"] == 0:
        return "zero_lr"
    if row["grad_norm"] == 0:
        return "equal_rewards" if all_groups_equal else "zero_gradient"
    return None


class UpdateCounter:
    """Counts a run's steps without a weight update, by cause; `observe` returns the warning line the first time
    a cause is seen (None otherwise). `start`: the count a resumed run had at its checkpoint."""

    def __init__(self, start: int = 0):
        self.steps_without_update = int(start)
        self.causes: Counter[str] = Counter()

    def observe(self, cause: str | None) -> str | None:
        if cause is None:
            return None
        self.steps_without_update += 1
        self.causes[cause] += 1
        if self.causes[cause] > 1:
            return None
        return f"deepeyesv2: warning: step without a weight update ({cause}): {NO_UPDATE_CAUSES[cause]}"

    def summary(self) -> str:
        """`3 steps without update (equal_rewards 3)`; a resumed run's earlier steps have no cause on record:
        `3 steps without update (2 before the resume, zero_lr 1)`."""
        n = self.steps_without_update
        before = n - sum(self.causes.values())
        by = ([f"{before} before the resume"] if before else []) + [f"{c} {k}" for c, k in sorted(self.causes.items())]
        return f"{n} step{'s' if n != 1 else ''} without update" + (f" ({', '.join(by)})" if by else "")


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA max allocated if a GPU is in use, else the peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes
