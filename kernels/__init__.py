"""Fused Triton kernels for GRPO-style RL on (multimodal) LLMs, each with a torch reference.

Installed as ``deepeyesv2_kernels`` (the name ``kernels`` belongs to Hugging Face's package on PyPI,
which transformers probes). The folder uses only relative imports, so it can be copied into another
codebase under any name. It imports torch (and triton, lazily) only: never ``deepeyesv2`` or ``rollout``.

Public ops (Triton on CUDA, chunked/plain torch elsewhere, one API):
    fused_logprobs          hidden [T,H] x lm_head [V,H] -> log-probs [T], entropy [T]; no [T,V] logits
    fused_linear_grpo_loss  the same fused with the GRPO/DAPO token loss; grads produced in the forward
    grpo_loss               GRPO/DAPO loss on log-probs over packed sequences (cu_seqlens)
    group_advantages        GRPO / Dr.GRPO group advantages, broadcast onto the packed token stream
    apply_mrope             Qwen2.5-VL multimodal RoPE from position_ids [3,T]
    patch_qwen2_5_vl        opt-in: route a loaded Qwen2.5-VL through the kernels
References (the spec each kernel is tested against): *_ref.
"""

from __future__ import annotations

from .advantages import group_advantages
from .advantages_ref import group_advantages_ref
from .grpo_loss import grpo_loss
from .grpo_loss_ref import grpo_loss_ref
from .linear_grpo import fused_linear_grpo_loss
from .linear_grpo_ref import fused_linear_grpo_loss_ref
from .logprobs import fused_logprobs
from .logprobs_ref import logprobs_ref
from .logprobs_torch import chunked_logprobs
from .mrope import apply_mrope
from .mrope_ref import apply_mrope_ref
from .patch import patch_qwen2_5_vl

__version__ = "0.1.0"

__all__ = [
    "apply_mrope", "apply_mrope_ref", "chunked_logprobs", "fused_linear_grpo_loss", "fused_linear_grpo_loss_ref",
    "fused_logprobs", "grpo_loss", "grpo_loss_ref", "group_advantages", "group_advantages_ref", "logprobs_ref",
    "patch_qwen2_5_vl",
]
