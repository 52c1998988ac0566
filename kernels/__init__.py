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

import importlib

__version__ = "0.1.0"

# name -> submodule; resolved on first access so `import deepeyesv2_kernels` stays cheap (PEP 562).
_EXPORTS = {
    "fused_logprobs": "logprobs",
    "logprobs_ref": "logprobs_ref",
    "chunked_logprobs": "logprobs_torch",
    "fused_linear_grpo_loss": "linear_grpo",
    "fused_linear_grpo_loss_ref": "linear_grpo_ref",
    "grpo_loss": "grpo_loss",
    "grpo_loss_ref": "grpo_loss_ref",
    "group_advantages": "advantages",
    "group_advantages_ref": "advantages_ref",
    "apply_mrope": "mrope",
    "patch_qwen2_5_vl": "patch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
