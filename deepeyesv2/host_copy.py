"""Frozen copies of a model in host memory, made tensor by tensor.

`copy.deepcopy(model).to("cpu")` would briefly hold a second copy on the accelerator; here each parameter and
buffer is copied to the host first and the module tree is deep-copied around those copies. Used for the KL
reference parked in host memory (deepeyesv2.reference) and for merging LoRA adapters into a host copy before
a checkpoint is written (deepeyesv2.lora).
"""

from __future__ import annotations

import copy

import torch


def cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen (eval, no grad) deep copy of `model` with every parameter and buffer in host memory."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo).eval().requires_grad_(False)
