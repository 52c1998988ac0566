"""The KL reference policy, without a second model on the accelerator where possible.

- LoRA: the reference is the base model, i.e. the policy with its adapters switched off
  (`with model.disable_adapter():`). Zero extra weight memory.
- Full fine-tune, `rl.ref_on_cpu`: a frozen copy of the initial weights lives in host memory and visits the
  policy's device only for the reference phase (all rows' reference log-probs are computed up front, before
  any training activations exist), then goes back.
- Full fine-tune otherwise: a frozen copy on the policy's device (the classic setup; costs one model).

Each returns per-token reference log-probs [T] fp32 for a packed row through `budgeted_logprobs`, so a token
budget bounds the reference forward as well.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from .lora import is_lora
from .host_copy import cpu_copy
from .packing import PackedBatch
from .policy_logprobs import budgeted_logprobs


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


class AdapterOffReference:
    """The base model under a LoRA policy: the same module tree with adapters disabled."""

    kind = "adapters-off"

    def __init__(self, policy):
        if not is_lora(policy):
            raise ValueError("AdapterOffReference needs a LoRA (peft) policy")
        self.policy = policy

    @torch.no_grad()
    def row_logprobs(self, rows: list[PackedBatch], temperature: float, token_budget: int = 0) -> list[torch.Tensor]:
        with self.policy.disable_adapter():
            return [budgeted_logprobs(self.policy, r, temperature, token_budget) for r in rows]


class FrozenCopyReference:
    """A frozen deep copy of the initial policy; with `on_cpu` it is parked in host memory between uses."""

    def __init__(self, policy, on_cpu: bool = False):
        self.device = _device_of(policy)
        self.on_cpu = on_cpu
        self.model = cpu_copy(policy) if on_cpu else copy.deepcopy(policy).eval().requires_grad_(False)
        self.kind = "cpu-copy" if on_cpu else "device-copy"

    @contextmanager
    def _on_device(self):
        if self.on_cpu and self.device.type != "cpu":
            self.model.to(self.device)
            try:
                yield
            finally:
                self.model.to("cpu")
        else:
            yield

    @torch.no_grad()
    def row_logprobs(self, rows: list[PackedBatch], temperature: float, token_budget: int = 0) -> list[torch.Tensor]:
        with self._on_device():
            return [budgeted_logprobs(self.model, r, temperature, token_budget) for r in rows]


def make_reference(policy, kl_coef: float, ref_on_cpu: bool = False):
    """The reference policy for a KL term (None when kl_coef == 0)."""
    if kl_coef <= 0:
        return None
    if is_lora(policy):
        return AdapterOffReference(policy)
    return FrozenCopyReference(policy, on_cpu=ref_on_cpu)
