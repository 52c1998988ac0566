"""Checkpoints: an HF-format model directory plus the trainer state, written atomically.

Layout:
    out_dir/checkpoints/step_000100/   config.json, model.safetensors, tokenizer + preprocessor files
                                       (loadable by build_model(ModelConfig(name_or_path=...)) and
                                       ChatProcessor.from_pretrained), trainer_state.pt
    out_dir/checkpoints/latest         text file naming the newest complete step directory

A checkpoint is written into a hidden temp directory and renamed into place, so a crash mid-save never
leaves a half-written `step_*` directory that resume would pick up.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DataState

ADAPTER_FILE = "lora_adapter.pt"

STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def rng_state() -> dict:
    """Python, NumPy and torch (CPU + CUDA) RNG states, as plain lists/tensors (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # this process's device only: under torchrun each rank owns one GPU (get_rng_state_all would create a
        # context on every visible GPU, and every rank would restore rank 0's states)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible device
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model,
    processor,
    optimizer: torch.optim.Optimizer | None,
    scheduler=None,
    data_state: DataState | dict | None = None,
    extra: dict | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write out_dir/checkpoints/step_{step:06d}/ atomically, point `latest` at it, keep the newest
    `keep_last` step directories (None or 0: keep all). `extra` must hold plain Python values.
    Returns the checkpoint directory."""
    root = checkpoints_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_step_{step:06d}_", dir=root))
    try:
        from .lora import adapter_state, is_lora, merged_model

        if is_lora(model):
            # A LoRA run writes the merged model (the directory stays a plain HF checkpoint that
            # build_model loads, e.g. to start RL from an SFT-with-LoRA run) and the adapters, which
            # are what a resume restores: the frozen base is rebuilt from the run's config.
            merged_model(model).save_pretrained(str(tmp), safe_serialization=True)
            torch.save(adapter_state(model), tmp / ADAPTER_FILE)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        if processor is not None:
            processor.tokenizer.save_pretrained(str(tmp))
            processor.image_processor.save_pretrained(str(tmp))
        if is_dataclass(data_state):
            data_state = asdict(data_state)
        state = {
            "step": int(step),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "data_state": data_state,
            "extra": dict(extra or {}),
        }
        torch.save(state, tmp / STATE_FILE)
        if final.exists():  # re-saving a step (e.g. a resumed run reaching it again)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(root, final.name)
    if keep_last:
        for old in _step_dirs(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST_FILE)


def _step_dirs(root: Path) -> list[Path]:
    """Complete step directories (those with a trainer_state.pt), oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(dirs, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under out_dir (via the `latest` pointer, else the highest step), or None."""
    root = checkpoints_dir(out_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    dirs = _step_dirs(root)
    return dirs[-1] if dirs else None


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint at {path} (neither a step directory with {STATE_FILE} nor an out_dir with checkpoints/)")
    return ckpt


def load_model_weights(model, ckpt_dir: str | Path) -> None:
    """Copy the HF-format weights in ckpt_dir into `model` (same architecture).

    The weights are loaded through `from_pretrained` (so transformers' own key renaming between the saved
    and in-memory layouts applies) into a CPU copy, then copied over: this holds a second copy of the
    weights in host memory for the duration.
    """
    cls = type(model)
    dtype = next(model.parameters()).dtype
    loaded = cls.from_pretrained(str(ckpt_dir), dtype=dtype, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    del loaded
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_checkpoint(
    dir_or_out_dir: str | Path,
    model=None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    restore_rng: bool = True,
) -> tuple[int, DataState | None, dict]:
    """Restore model weights, optimizer, scheduler and RNG states from a step directory or an out_dir's
    latest checkpoint. Returns (step, data_state, extra)."""
    ckpt = _resolve(dir_or_out_dir)
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{ckpt / STATE_FILE}: cannot read trainer state ({type(e).__name__}: {e})") from None
    if model is not None:
        from .lora import is_lora, load_adapter_state

        if is_lora(model):
            if not (ckpt / ADAPTER_FILE).exists():
                raise CheckpointError(f"{ckpt}: the model has LoRA adapters but the checkpoint holds none "
                                      f"(saved from a full fine-tune?)")
            load_adapter_state(model, torch.load(ckpt / ADAPTER_FILE, map_location="cpu", weights_only=True))
        else:
            load_model_weights(model, ckpt)
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{ckpt}: saved without optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    ds = state.get("data_state")
    data_state = DataState.from_dict(ds) if isinstance(ds, dict) else None
    return int(state["step"]), data_state, dict(state.get("extra") or {})
