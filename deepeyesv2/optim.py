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

    def lr_lambda(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def clip_and_step(model: torch.nn.Module, opt, sched, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)
