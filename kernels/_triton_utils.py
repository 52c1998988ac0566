"""Backend choice shared by the kernels: Triton on CUDA, the torch path elsewhere.

The Triton CPU interpreter (TRITON_INTERPRET=1, read by triton when it is first imported) is used
only when a caller asks for `backend="triton"` on CPU tensors -- the tests do, to check each kernel
against its reference. `backend="auto"` never picks the interpreter: it is orders of magnitude
slower than the torch path.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # triton is optional: every op has a torch path
    import triton
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def jit(fn, interpret: bool):
    """triton.jit on first use, not at import; `interpret` is part of the cache key only."""
    del interpret
    return triton.jit(fn)


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """ValueError naming the first tensor that is not on the first one's device (None entries are skipped):
    a Triton launch with one host tensor would fail deep inside with a pointer error, the torch path with a
    generic device error."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    if not named:
        return
    first, ref = named[0]
    for name, t in named[1:]:
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}, {first} on {ref.device}")


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "triton":
        if triton is None:
            raise ValueError("backend='triton' but triton is not installed")
        if not (on_cuda or interpreting()):
            raise ValueError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1")
        return True
    return triton is not None and on_cuda
