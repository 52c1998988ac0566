"""Backend choice shared by the kernels: Triton on CUDA, the torch path elsewhere.

The Triton CPU interpreter (TRITON_INTERPRET=1, read by triton when it is first imported) is used
only when a caller asks for `backend="triton"` on CPU tensors -- the tests do, to check each kernel
against its reference. `backend="auto"` never picks the interpreter: it is orders of magnitude
slower than the torch path.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import torch

try:  # triton is optional: every op has a torch path
    import triton
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

BACKENDS = ("auto", "triton", "torch")


def kernel(fn):
    """@kernel on every Triton kernel of the package: `triton.jit` at import (the CPU interpreter or the compiler,
    per TRITON_INTERPRET as triton read it); the plain function where triton is absent (every op then takes its
    torch path)."""
    return triton.jit(fn) if triton is not None else fn


@kernel
def _probe():
    pass


# Whether this package's kernels were built by the CPU interpreter: asked of a kernel decorated like them, so the
# answer is what triton.jit did, not what the environment says now.
_INTERPRETED = triton is not None and type(_probe).__name__ == "InterpretedFunction"


def interpreting() -> bool:
    return _INTERPRETED


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launch code issued it: `kernel[grid](*args, **kwargs)`."""

    kernel: Any  # triton JITFunction, or an Autotuner wrapping one
    grid: tuple | Callable
    args: tuple
    kwargs: dict


# Set only inside `capture_launches()`: the launches recorded instead of run, and the SM version to pick tiles for.
_captured: list[Launch] | None = None
_capture_arch: int | None = None


@contextlib.contextmanager
def capture_launches(arch: int = 90) -> Iterator[list[Launch]]:
    """Record every kernel launch instead of running it, with the tile configs the launch code picks on an sm_<arch>.

    The compile audit (`audit.py`) calls the public ops on small CPU tensors inside this context and compiles
    what was recorded for real GPU targets: the signatures, constexprs and configs are exactly those the launch
    code passes, not a hand-written copy that could drift. Outputs of captured launches are left unwritten.
    """
    global _captured, _capture_arch
    if _captured is not None:
        raise RuntimeError("capture_launches() does not nest")
    _captured, _capture_arch = [], arch
    try:
        yield _captured
    finally:
        _captured, _capture_arch = None, None


def launch(kernel, grid, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, or its record while `capture_launches()` is active."""
    if _captured is not None:
        _captured.append(Launch(kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


def gpu_arch(device: torch.device) -> int | None:
    """SM version (80, 90, ...) whose tile configs the launch code should pick: the CUDA device's, the one being
    captured for the compile audit, or None under the interpreter and on the CPU (few large tiles run fastest)."""
    if _capture_arch is not None:
        return _capture_arch
    if device.type == "cuda" and not interpreting():
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return None


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors) or _captured is not None
    if backend == "triton":
        if triton is None:
            raise ValueError("backend='triton' but triton is not installed")
        if not (on_cuda or interpreting()):
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
        return True
    # 'auto' never picks the CPU interpreter (tests ask for it with backend='triton'): it is orders of
    # magnitude slower than the torch path.
    return triton is not None and on_cuda
