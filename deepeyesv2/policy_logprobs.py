"""The policy's per-token log-probs of a packed row, from the backbone's hidden states through the fused kernel.

The lm_head is never applied as a matmul producing [T, V] logits: `fused_logprobs` (deepeyesv2_kernels) walks
the vocab in blocks (Triton on CUDA, token chunks on CPU), which is what keeps long packed rows in memory.

`budgeted_logprobs` runs a row's no-grad pass (old-policy recompute, KL reference) in pieces of whole sequences
of at most `token_budget` tokens, so that pass never holds more activations than the budget.
"""

from __future__ import annotations

import torch

from deepeyesv2_kernels import fused_logprobs
from deepeyesv2_rollout.types import logprob_temperature

from .model import packed_hidden, unwrap_model
from .packing import IGNORE_INDEX, PackedBatch, split_row


def packed_logprobs(
    model, batch: PackedBatch, temperature: float = 1.0, entropy: bool = False, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs [T] fp32 of batch.targets (0 where loss_mask is False), entropy [T] fp32, on the model's device."""
    head = model.lm_head
    batch = batch.to(head.weight.device)  # packed rows are built on the host; a no-op on CPU
    hidden = packed_hidden(model, batch)
    return fused_logprobs(
        hidden.contiguous(), head.weight, batch.targets, temperature=temperature,
        bias=head.bias, ignore_index=IGNORE_INDEX, compute_entropy=entropy, entropy_grad=entropy_grad,
        loss_mask=batch.loss_mask,
    )


@torch.no_grad()
def budgeted_logprobs(model, row: PackedBatch, temperature: float = 1.0, token_budget: int = 0) -> torch.Tensor:
    """Log-probs [T] fp32 of row.targets (0 off the loss mask), computed `token_budget` tokens at a time
    (0 = the whole row at once). Equal to `packed_logprobs(model, row)` up to float reassociation."""
    temperature = logprob_temperature(temperature)
    if token_budget <= 0 or row.num_tokens <= token_budget:
        return packed_logprobs(model, row, temperature=temperature)[0]
    cfg = unwrap_model(model).config
    parts = split_row(row, token_budget, cfg.image_token_id, cfg.vision_config.spatial_merge_size)
    return torch.cat([packed_logprobs(model, p, temperature=temperature)[0] for p in parts])
