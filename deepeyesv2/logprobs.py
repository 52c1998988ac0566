"""Per-token log-probs of a packed row, from the backbone's hidden states through the fused kernel.

The lm_head is never applied as a matmul producing [T, V] logits: `fused_logprobs` walks the vocab
in blocks (Triton on CUDA, token chunks on CPU), which is what keeps long packed rows in memory.
"""

from __future__ import annotations

import torch

from deepeyesv2_kernels import fused_logprobs

from .model import packed_hidden
from .packing import IGNORE_INDEX, PackedBatch


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
