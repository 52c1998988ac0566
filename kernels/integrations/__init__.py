"""Adapters that put the kernels inside other RL codebases: ``.trl`` (GRPOTrainer) and ``.verl`` (fused-kernel path).

Import the submodule you need; each imports its host library lazily, inside its functions, so importing
``deepeyesv2_kernels`` (or this package) never pulls in TRL, transformers or verl.
"""
