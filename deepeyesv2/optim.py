"""AdamW + linear warm-up then cosine decay, over the trainable parameters only; gradient clipping and the step.

`OffloadedAdamW` (`optim.offload_states`) keeps an fp32 master copy of every accelerator parameter, its gradient
and both AdamW moments in (pinned) host memory and steps them with torch's AdamW there; the device keeps only
the weights and their gradients. Per step, each gradient goes device -> host and each updated weight host ->
device. Parameters that already live on the CPU are stepped in place (nothing to offload), unless `force_copy`
asks for the copy path -- which is how the CPU test suite exercises the same logic the GPU runs.
"""

from __future__ import annotations

import math
import warnings

import torch

from .config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int, world_size: int = 1):
    """(optimizer, LambdaLR of WarmupCosine) over `model`'s trainable parameters: torch's AdamW, or
    `OffloadedAdamW` when cfg.offload_states. `world_size` > 1 (FSDP2 over ranks) refuses offloading: the
    AdamW states are already sharded 1/world_size per rank."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (everything frozen?)")
    dtypes = {p.dtype for p in params}
    if torch.float16 in dtypes:
        raise ValueError("training fp16 weights needs loss scaling, which this trainer does not do: use "
                         "model.dtype float32 (bf16 autocast on GPU, train.autocast) or bfloat16")
    if torch.bfloat16 in dtypes and not cfg.offload_states:
        warnings.warn("model.dtype=bfloat16 with AdamW on the bf16 weights: updates below bf16's resolution "
                      "(~lr 1e-6 on O(1) weights) are rounded away. For fp32 master weights use model.dtype "
                      "float32 (+ bf16 autocast, the GPU default) or optim.offload_states", stacklevel=2)
    schedule = WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    if cfg.offload_states:
        if world_size > 1:
            raise ValueError("optim.offload_states is not supported under torchrun: FSDP2 already shards the AdamW "
                             "states over the ranks (1/world size each); turn it off")
        off = OffloadedAdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        return off, torch.optim.lr_scheduler.LambdaLR(off.inner, schedule)
    # foreach=False keeps the optimizer's peak memory at one parameter's temporaries on CPU.
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, foreach=False)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


class WarmupCosine:
    """LR multiplier: linear warm-up over `warmup_steps`, then a cosine from `start_ratio` (1 unless the
    schedule was extended) at `start_step` down to `min_lr_ratio` at `total_steps`.

    An object rather than a closure because LambdaLR's state_dict stores a callable object's fields: the
    checkpoint then records the horizon the run was scheduled for, and a resume with another `train.steps`
    can continue the curve from where it stands (`extend`) instead of jumping onto a different one."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = int(warmup_steps), int(total_steps), float(min_lr_ratio)
        self.start_step, self.start_ratio = int(warmup_steps), 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / max(1, self.warmup_steps)
        span = max(1, self.total_steps - self.start_step)
        progress = min(1.0, (step - self.start_step) / span)
        return self.min_lr_ratio + (self.start_ratio - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def extend(self, step: int, total_steps: int) -> bool:
        """Re-target the schedule to end at `total_steps`, continuous at `step` (the resume point): during the
        warm-up only the end moves; after it, a new cosine starts from the current multiplier. Returns whether
        anything changed."""
        if total_steps == self.total_steps:
            return False
        if step > self.start_step:
            self.start_ratio, self.start_step = self(step), int(step)
        self.total_steps = int(total_steps)
        return True


def extend_schedule(sched, total_steps: int) -> str | None:
    """After a resume: make `sched` (restored from a checkpoint) end at `total_steps` optimizer steps without a
    jump in the LR. Returns the one-line note to print, or None when the horizon is unchanged."""
    fn = sched.lr_lambdas[0]
    if not isinstance(fn, WarmupCosine):
        raise TypeError(f"extend_schedule needs a WarmupCosine schedule, got {type(fn).__name__}")
    step, old = sched.last_epoch, fn.total_steps
    if not fn.extend(step, total_steps):
        return None
    base, now, end = sched.base_lrs[0], fn(step), fn.min_lr_ratio
    head = (f"LR schedule: the checkpoint was scheduled for {old} optimizer steps, this run for {total_steps}; "
            f"resuming at step {step} with lr {base * now:.3g}")
    if step >= fn.warmup_steps and now <= end:  # the old schedule had already decayed to its floor
        return head + f", which stays there (the schedule had reached its minimum; no jump)"
    return head + (f", a cosine from there reaches lr {base * end:.3g} at step {total_steps} (continuous, the "
                   f"warm-up is not repeated)")


def clip_and_step(model: torch.nn.Module, opt, sched, max_norm: float) -> float:
    """Clip to the global gradient norm (max_norm <= 0: no clipping), step, zero grads. Returns the pre-clip
    norm. Under FSDP2 the gradients are DTensor shards: their norm is a DTensor whose full value is the global
    norm, the same number one process computes over the whole gradient."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor  # lazy: torch builds without distributed lack it

        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


class OffloadedAdamW:
    """AdamW whose states (and fp32 master weights) live on the CPU. Same update as torch.optim.AdamW.

    `inner` is the torch AdamW over the host copies: give it to the LR scheduler; state_dict /
    load_state_dict / param_groups are its own, so checkpoints look like a plain AdamW's (over the masters).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 force_copy: bool = False):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("OffloadedAdamW got no trainable parameters")
        self.masters: list[torch.Tensor] = []
        for p in self.params:
            if p.device.type == "cpu" and not force_copy and p.dtype == torch.float32:
                self.masters.append(p)  # already in host memory: step it in place
            else:
                m = p.detach().to("cpu", torch.float32, copy=True)
                if torch.cuda.is_available() and p.device.type == "cuda":
                    m = m.pin_memory()
                self.masters.append(m.requires_grad_(True))
        # foreach=False: host peak stays at one parameter's temporaries (the whole point is to save memory).
        self.inner = torch.optim.AdamW(self.masters, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                       foreach=False)

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def _pairs(self):
        return [(p, m) for p, m in zip(self.params, self.masters) if m is not p]

    @torch.no_grad()
    def step(self) -> None:
        for p, m in self._pairs():
            m.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32)
        self.inner.step()
        for p, m in self._pairs():
            if p.grad is not None:
                p.copy_(m.to(p.device, non_blocking=True))
        for _, m in self._pairs():
            m.grad = None  # the host gradient copy is dead weight between steps

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        # masters must match the (restored) device weights: they are the weights AdamW updates
        with torch.no_grad():
            for p, m in self._pairs():
                m.copy_(p.detach().float().cpu())

    def state_bytes(self) -> dict:
        """{'device': bytes of optimizer state on accelerators, 'host': bytes in host memory}."""
        out = {"device": 0, "host": 0}
        for st in self.inner.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    out["host" if v.device.type == "cpu" else "device"] += v.numel() * v.element_size()
        return out

