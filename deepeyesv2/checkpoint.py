"""Checkpoints: an HF-format model directory plus the trainer state, written atomically.

Layout:
    out_dir/checkpoints/step_000100/   config.json, model.safetensors, tokenizer + preprocessor files, and
                                       processor_config.json + processing_deepeyesv2.py (`save_processor`),
                                       trainer_state.pt; a LoRA run adds adapter/ (a PEFT adapter folder)
                                       and lora_adapter.pt (what its resume restores)
    out_dir/checkpoints/latest         text file naming the newest complete step directory

    out_dir/checkpoints/step_*/manifest.json   size and xxh3-128 checksum of every other file in the directory

A step directory loads in a plain Python with transformers (and peft for adapter/), without this package:

    AutoProcessor.from_pretrained(step_dir, trust_remote_code=True)
    Qwen2_5_VLForConditionalGeneration.from_pretrained(step_dir)
    PeftModel.from_pretrained(base_model, step_dir / "adapter")

A checkpoint is written into a hidden temp directory (`.tmp_step_*`, removed at the next save or start if a
crash left one) and renamed into place, so a crash mid-save never leaves a half-written `step_*` directory.
Resume verifies the manifest and falls back, saying so, to the newest checkpoint that verifies: a bit flip,
a truncated or a deleted file never resumes silently. A save that runs out of disk raises one CheckpointError
naming the path and the space needed; the previous checkpoint is untouched.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import xxhash

from .data import DataState
from .lora import adapter_state, is_lora, load_adapter_state, merged_model, save_adapter
from .metrics import METRICS_FILE

ADAPTER_FILE = "lora_adapter.pt"
ADAPTER_DIR = "adapter"  # the PEFT adapter folder of a LoRA run: adapter_config.json + adapter_model.safetensors
PROCESSOR_CODE = Path(__file__).parent / "assets" / "hf_processor" / "processing_deepeyesv2.py"
PROCESSOR_CONFIG = "processor_config.json"

STATE_FILE = "trainer_state.pt"
PROTOCOL_FILE = "protocol.json"  # the turn layout and system prompt the checkpoint was trained under
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
HASH_NAME = "xxh3_128"  # non-cryptographic: it catches corruption, not tampering, at disk-read speed
_TMP_PREFIX = ".tmp_"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def say(msg: str) -> None:
    """One line on stderr: what the trainer did with the run directory (fallbacks, clean-ups, fresh starts)."""
    print(f"deepeyesv2: {msg}", file=sys.stderr, flush=True)


def launch_rank0() -> bool:
    """Rank 0 of a torchrun launch (or a single process). Read from torchrun's environment because the run
    directory is prepared before the process group exists."""
    return os.environ.get("RANK", "0") == "0"


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


def file_digest(path: Path, chunk: int = 1 << 23) -> str:
    """xxh3-128 of a file, read in 8 MiB chunks (a multi-GB safetensors file never sits in memory whole)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> dict:
    """manifest.json listing every other file of `ckpt` with its size and checksum. Returns the manifest."""
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE:
            files[p.relative_to(ckpt).as_posix()] = {"bytes": p.stat().st_size, HASH_NAME: file_digest(p)}
    manifest = {"format": 1, "hash": HASH_NAME, "files": files}
    with open(ckpt / MANIFEST_FILE, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def verify_checkpoint(ckpt: str | Path) -> str | None:
    """None when every file in the manifest is present with its recorded size and checksum; otherwise the
    first problem, in a few words (for a one-line message)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "missing"
    try:
        manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if manifest.get("hash") != HASH_NAME or not isinstance(files, dict):
            raise ValueError(f"unknown layout (hash {manifest.get('hash')!r})")
        if not all(isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get(HASH_NAME), str)
                   for r in files.values()):
            raise ValueError("an entry lacks its size or checksum")
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST_FILE} ({type(e).__name__})"
    if STATE_FILE not in files:
        return f"{MANIFEST_FILE} does not list {STATE_FILE}"
    for name, rec in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != rec["bytes"]:
            return f"{name} has {size} bytes, the manifest says {rec['bytes']} (truncated?)"
    for name, rec in files.items():  # sizes first: a truncated file is found without hashing everything
        if file_digest(ckpt / name) != rec[HASH_NAME]:
            return f"{name} checksum mismatch (corrupted on disk)"
    return None


def remove_stale_temp_dirs(root: Path, log: Callable[[str], None] = say) -> list[str]:
    """Delete the `.tmp_*` directories that interrupted saves left in `root`. Returns their names."""
    if not root.is_dir():
        return []
    stale = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_TMP_PREFIX))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log(f"removed {len(stale)} temporary director{'y' if len(stale) == 1 else 'ies'} left by interrupted "
            f"checkpoint saves in {root}: {', '.join(p.name for p in stale)}")
    return [p.name for p in stale]


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _checkpoint_bytes(ckpt: Path) -> int:
    try:
        return sum(rec["bytes"] for rec in json.loads((ckpt / MANIFEST_FILE).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())


def _disk_full(e: BaseException, free: int, need: int) -> bool:
    """Whether a failed save ran out of space: ENOSPC / EDQUOT anywhere in the exception chain, or -- because
    torch.save reports a failed write as a RuntimeError ("PytorchStreamWriter failed writing file ...: file
    write failed") and safetensors as its own error ("StorageFull") -- such a message while less space is
    free than the checkpoint needs."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if free < need and any(m in str(seen) for m in ("No space left", "StorageFull", "file write failed",
                                                         "Disk quota")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def read_protocol(ckpt: str | Path) -> dict | None:
    """The {"protocol", "system_prompt"} a checkpoint of ours was trained under (None: not ours, or older)."""
    path = Path(ckpt) / PROTOCOL_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not (isinstance(info, dict) and isinstance(info.get("protocol"), str) and isinstance(info.get("system_prompt"), str)):
        raise CheckpointError(f"{path}: needs string fields 'protocol' and 'system_prompt'")
    return info


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
    log: Callable[[str], None] = say,
    protocol: dict | None = None,
) -> Path:
    """Write out_dir/checkpoints/step_{step:06d}/ atomically with its manifest, point `latest` at it, keep the
    newest `keep_last` step directories (None or 0: keep all). `extra` must hold plain Python values.
    `protocol` ({"protocol", "system_prompt"}) goes to protocol.json, read back by `read_protocol` when RL or
    eval starts from the checkpoint. Returns the checkpoint directory. Disk full: CheckpointError naming the path and the space needed, the
    earlier checkpoints untouched."""
    root = checkpoints_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(root, log)
    final = root / f"step_{step:06d}"
    previous = latest_checkpoint(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}step_{step:06d}_", dir=root))
    try:
        if is_lora(model):
            # A LoRA run writes the merged model (the directory stays a plain HF checkpoint that
            # build_model loads, e.g. to start RL from an SFT-with-LoRA run) and the adapters, which
            # are what a resume restores: the frozen base is rebuilt from the run's config.
            merged_model(model).save_pretrained(str(tmp), safe_serialization=True)
            torch.save(adapter_state(model), tmp / ADAPTER_FILE)
            save_adapter(model, tmp / ADAPTER_DIR)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        if processor is not None:
            save_processor(processor, tmp)
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
        if protocol is not None:
            (tmp / PROTOCOL_FILE).write_text(json.dumps(protocol, indent=1))
        write_manifest(tmp)
        old = None
        if final.exists():  # re-saving a step (e.g. a resumed run reaching it again): swap, then delete
            old = root / f"{_TMP_PREFIX}old_{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception):
            free = shutil.disk_usage(root).free
            if previous is not None:  # the last save wrote the same files: the best estimate
                need = _checkpoint_bytes(previous)
            else:
                need = _tensor_bytes(optimizer.state_dict()) if optimizer is not None else 0
                if isinstance(model, torch.nn.Module):
                    need += _tensor_bytes(model.state_dict())
            if _disk_full(e, free, need):
                kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
                raise CheckpointError(
                    f"disk full while saving checkpoint {final}: {_gib(free)} free on {root}, the checkpoint needs "
                    f"about {_gib(need)}; {kept} (free space, or set train.out_dir elsewhere, then resume with "
                    f"--train.resume true)") from None
        raise
    _write_latest(root, final.name)
    if keep_last:
        for old_dir in _step_dirs(root)[:-keep_last]:
            if old_dir != final:
                shutil.rmtree(old_dir, ignore_errors=True)
    return final


def save_processor(processor, path: str | Path) -> None:
    """Write `processor` (a ChatProcessor) as a Hugging Face processor directory: the tokenizer (with its chat
    template), the image processor's preprocessor_config.json, and processor_config.json naming
    `processing_deepeyesv2.DeepEyesV2Processor` (copied beside it), so that
    `AutoProcessor.from_pretrained(path, trust_remote_code=True)` gives a Qwen2.5-VL processor without
    torchvision, which transformers' own Qwen2_5_VLProcessor needs for its video processor. Without
    trust_remote_code, AutoProcessor takes transformers' own class (processor_class), where torchvision is
    installed."""
    path = Path(path)
    processor.tokenizer.save_pretrained(str(path))
    processor.image_processor.save_pretrained(str(path))
    shutil.copyfile(PROCESSOR_CODE, path / PROCESSOR_CODE.name)
    config = {"processor_class": "Qwen2_5_VLProcessor",
              "auto_map": {"AutoProcessor": f"{PROCESSOR_CODE.stem}.DeepEyesV2Processor"}}
    (path / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def merge_and_save(model, processor, path: str | Path) -> Path:
    """Write a plain HF checkpoint of a LoRA model, adapters merged (config, safetensors, processor files), and
    its PEFT adapter folder in path/adapter. `model` itself is left unchanged. The directory loads with
    `build_model(ModelConfig(name_or_path=path))`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    merged_model(model).save_pretrained(str(path), safe_serialization=True)
    save_adapter(model, path / ADAPTER_DIR)
    if processor is not None:
        save_processor(processor, path)
    return path


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST_FILE)


def _step_number(p: Path) -> int:
    return int(_STEP_DIR.match(p.name).group(1))


def _step_dirs(root: Path, complete: bool = True) -> list[Path]:
    """Step directories, oldest first: those with a trainer_state.pt, or all of them (`complete=False`)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)
            and (not complete or (p / STATE_FILE).is_file())]
    return sorted(dirs, key=_step_number)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under out_dir (via the `latest` pointer, else the highest step), or None.
    Not verified: see `resume_checkpoint`."""
    root = checkpoints_dir(out_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    dirs = _step_dirs(root)
    return dirs[-1] if dirs else None


def resume_checkpoint(out_dir: str | Path, log: Callable[[str], None] = say, what: str = "resume") -> Path | None:
    """The checkpoint a resumed run continues from: the one `latest` names if it verifies, else the newest
    older step directory that does (saying in one line which ones failed and why). None when out_dir has no
    checkpoint at all; CheckpointError in one line when there are some and none verifies. `what` starts the
    lines it says (e.g. "model.name_or_path" when a run directory stands for its checkpoint)."""
    root = checkpoints_dir(out_dir)
    dirs = _step_dirs(root, complete=False)[::-1]  # newest first, incomplete ones included: verify says why
    pointer = root / LATEST_FILE
    named = pointer.read_text().strip() if pointer.is_file() else ""
    failed: list[str] = []
    if _STEP_DIR.match(named):
        n = int(_STEP_DIR.match(named).group(1))
        if not (root / named).is_dir():
            failed.append(f"{named} (named by {LATEST_FILE}) is missing")
        else:
            dirs = [root / named] + [d for d in dirs if _step_number(d) < n]
    if not dirs and not failed:
        return None
    if dirs and not any((d / MANIFEST_FILE).exists() for d in _step_dirs(root, complete=False)):
        # A run saved before checkpoints carried manifests: nothing to verify against. Refusing would strand every
        # older run, so resume from its newest complete checkpoint and say it is unverified.
        legacy = next((d for d in dirs if (d / STATE_FILE).is_file()), None)
        if legacy is not None:
            log(f"{what}: {root} was written without {MANIFEST_FILE} checksums (an older version); taking "
                f"{legacy.name} unverified")
            return legacy
    for d in dirs:
        why = verify_checkpoint(d)
        if why is None:
            if failed:
                log(f"{what}: {'; '.join(failed)}; falling back to {d.name}, the newest checkpoint in {root} that "
                    f"verifies")
            return d
        failed.append(f"{d.name} fails verification ({why})")
    raise CheckpointError(f"no checkpoint in {root} verifies: {'; '.join(failed)}")


def _resolve(path: str | Path, verify: bool = True) -> Path:
    path = Path(path)
    if path.is_dir() and _STEP_DIR.match(path.name) or (path / STATE_FILE).is_file():
        if verify and (why := verify_checkpoint(path)) is not None:
            raise CheckpointError(f"checkpoint {path} fails verification: {why}")
        return path
    ckpt = resume_checkpoint(path) if verify else latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint at {path} (neither a step directory with {STATE_FILE} nor an out_dir with checkpoints/)")
    return ckpt


def run_leftovers(out_dir: str | Path) -> list[str]:
    """What a previous run left in out_dir that a fresh run would mix with: logged metrics rows, checkpoints."""
    out = Path(out_dir)
    found = []
    metrics = out / METRICS_FILE
    if metrics.is_file():
        with metrics.open("rb") as f:
            rows = sum(1 for line in f if line.strip())
        if rows:
            found.append(f"{METRICS_FILE} with {rows} row{'s' * (rows != 1)}")
    steps = _step_dirs(checkpoints_dir(out), complete=False)
    if steps:
        found.append(f"checkpoints/{steps[-1].name}" + (f" and {len(steps) - 1} more" if len(steps) > 1 else ""))
    return found


def prepare_run_dir(out_dir: str | Path, resume: bool, overwrite: bool, main: bool | None = None,
                    log: Callable[[str], None] = say) -> Path | None:
    """Before a run builds anything: the checkpoint to resume from (verified), or None for a fresh start.

    - leftover `.tmp_*` directories of interrupted saves are removed;
    - resume: the newest checkpoint that verifies (see resume_checkpoint); none at all -> a fresh start, said;
    - no resume: a directory that already holds a run (metrics rows, checkpoints) is refused, in one line that
      names it and the flags, unless `overwrite`, which deletes what our runs write there (metrics.jsonl,
      checkpoints/, tensorboard/, plots/) and nothing else.
    `main` (default: rank 0 of the launch) does the deleting and the talking; other ranks only decide."""
    out = Path(out_dir)
    main = launch_rank0() if main is None else main
    quiet: Callable[[str], None] = log if main else (lambda _msg: None)
    if main:
        remove_stale_temp_dirs(checkpoints_dir(out), log)
    if resume:
        ckpt = resume_checkpoint(out, quiet)
        if ckpt is None:
            dropped = run_leftovers(out)  # at most metrics rows here: any step directory would have been verified
            quiet(f"train.resume: no checkpoint in {checkpoints_dir(out)}, starting fresh"
                  + (f" (dropping {dropped[0]} from an earlier attempt)" if dropped else ""))
        return ckpt
    leftovers = run_leftovers(out)
    if leftovers and not overwrite:
        raise CheckpointError(f"{out} already holds a run ({', '.join(leftovers)}): continue it with --train.resume "
                              f"true, or delete it and start over with --train.overwrite true")
    if leftovers and main:
        for name in (METRICS_FILE, "checkpoints", "tensorboard", "plots"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        quiet(f"train.overwrite: deleted the previous run in {out} ({', '.join(leftovers)})")
    return None


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
    verify: bool = True,
) -> tuple[int, DataState | None, dict]:
    """Restore model weights, optimizer, scheduler and RNG states from a step directory (verified against its
    manifest unless `verify=False`, for a caller that just did) or an out_dir's newest checkpoint that
    verifies. Returns (step, data_state, extra)."""
    ckpt = _resolve(dir_or_out_dir, verify)
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{ckpt / STATE_FILE}: cannot read trainer state ({type(e).__name__}: {e})") from None
    if model is not None:
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
