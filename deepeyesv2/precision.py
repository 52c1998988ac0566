"""Where the policy runs and in what precision.

`model.device: auto` puts the policy on this process's GPU (LOCAL_RANK under torchrun) when there is one,
else on the CPU. `train.autocast` runs the forward passes (training, old/reference log-probs, the embedded
engine's sampling) under bf16 autocast while the weights, gradients and AdamW states stay in their own
dtype -- mixed precision with fp32 master weights:
  auto  bf16 autocast on CUDA when the weights are fp32; off on the CPU (most CPUs have no fast bf16 matmul)
  bf16  always (also on the CPU, which is how the CPU tests exercise the GPU's setting)
  off   never
The backward runs outside the autocast region, as torch recommends; autograd replays the forward's dtypes.
`train.tf32` (CUDA only) lets the remaining fp32 matmuls -- the fused lm-head kernels, the engine's logits --
use tf32 tensor cores (torch.set_float32_matmul_precision("high"), which the kernels follow as torch does).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch

AUTOCAST_MODES = ("auto", "bf16", "off")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is available, else cpu; 'cuda' (no index) -> cuda:LOCAL_RANK, so
    that under torchrun each rank takes its own GPU; anything else as torch.device(name)."""
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"model.device={name!r} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={name!r} but this machine has no CUDA device (use 'auto' or 'cpu')")
    return device


def autocast_dtype(mode: str, device: torch.device, weight_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype for `train.autocast` = mode on `device` (None = no autocast)."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"train.autocast must be one of {AUTOCAST_MODES}, got {mode!r}")
    if mode == "off" or weight_dtype != torch.float32:
        return None  # bf16/fp16 weights already compute in their dtype
    if mode == "auto" and device.type != "cuda":
        return None
    return torch.bfloat16


def amp(mode: str, model: torch.nn.Module) -> Callable[[], ContextManager]:
    """A factory of autocast contexts for `model`'s forward passes (nullcontext when autocast is off)."""
    p = next(model.parameters())
    dtype = autocast_dtype(mode, p.device, p.dtype)
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(p.device.type, dtype=dtype)


def set_matmul_precision(tf32: bool, device: torch.device) -> None:
    """train.tf32 on a CUDA device: torch.set_float32_matmul_precision("high") (else "highest"). Process-wide,
    as the setting itself is; a no-op on the CPU."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
