"""AdamW + linear warm-up then cosine decay, over the trainable parameters only."""

from __future__ import annotations

import math
import warnings

import torch

from .config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (everything frozen?)")
    dtypes = {p.dtype for p in params}
    if torch.float16 in dtypes:
        raise ValueError("training fp16 weights needs loss scaling, which this trainer does not do: use "
                         "model.dtype float32 (bf16 autocast on GPU, train.autocast) or bfloat16")
    if torch.bfloat16 in dtypes and not getattr(cfg, "offload_states", False):
        warnings.warn("model.dtype=bfloat16 with AdamW on the bf16 weights: updates below bf16's resolution "
                      "(~lr 1e-6 on O(1) weights) are rounded away. For fp32 master weights use model.dtype "
                      "float32 (+ bf16 autocast, the GPU default) or optim.offload_states", stacklevel=2)
    # foreach=False keeps the optimizer's peak memory at one parameter's temporaries on CPU.
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, foreach=False)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio))


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
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)
