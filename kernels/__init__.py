"""Fused Triton kernels for GRPO-style RL on (multimodal) LLMs, each with a torch reference.

Installed as ``deepeyesv2_kernels`` (the name ``kernels`` belongs to Hugging Face's package on PyPI).
The folder uses only relative imports, so it can be copied into another codebase under any name.
This package imports torch (and triton lazily, on CUDA) only: never ``deepeyesv2`` or ``rollout``.
"""

__version__ = "0.1.0"
