"""verl drop-in: `fused_logprobs` behind the two entry points of verl's fused-kernel path.

verl (``actor_rollout_ref.model.use_fused_kernels=True``) replaces the model's forward with one that runs the
backbone, rolls the labels left by one and calls, at call time,
  * ``fused_kernel_options.impl_backend=triton``:
    ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels, temperature, "none")``
  * ``impl_backend=torch``: ``verl.utils.experimental.torch_functional.FusedLinearForPPO()(hidden_states=...,
    vocab_weights=..., input_ids=..., temperature=...)``
and the actor reads ``output.log_probs`` / ``output.entropy`` (``.squeeze(0)`` on the packed [1, nnz] stream).
This module provides both with verl's argument names and order; `patch_verl()` points verl's two module
attributes at them (call it in every worker process: see docs/kernels_elsewhere.md).

Differences from verl's functions, all on purpose:
  * outputs are fp32 and shaped like the labels ([B, L] or [T]); verl's torch path rounds them to the hidden
    dtype (bf16) and its Triton path returns them flattened. Every verl call site either squeezes a [1, nnz]
    batch or indexes [B, L], which both layouts satisfy.
  * labels equal to -100 get log-prob 0 and entropy 0 (and no gradient); verl's kernels have no ignore index.
  * only reduction="none" (what verl's model forwards pass) and no vocab-parallel ``dist_process_group``.
  * any hidden size; verl's Triton ``linear_cross_entropy`` asserts hidden_size % 128 == 0 and CUDA tensors.
Checked against verl 0.9.1 itself (its torch path, its model forwards before and after `patch_verl()`) by
``python -m bench.verl_peer``.
"""

from __future__ import annotations

import torch

# verl module -> attribute that its fused model forwards import at call time.
VERL_TARGETS = {
    "verl.utils.kernel.linear_cross_entropy": "linear_cross_entropy",
    "verl.utils.experimental.torch_functional": "FusedLinearForPPO",
}


def _as_float_temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got a tensor of shape {tuple(temperature.shape)}")
        return float(temperature.item())
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a float, got {type(temperature).__name__}")
    return float(temperature)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``linear_cross_entropy``: per-token log-prob of `labels` and entropy of softmax(hidden @ weight.T / T).

    hidden: [B, L, H] or [T, H] (bf16/fp16/fp32; cast to weight's dtype if it differs, as verl's forwards do),
    weight: [V, H], labels: [B, L] or [T] int (-100 = ignored). Returns (log_probs, entropy), fp32, shaped like
    labels; both differentiable w.r.t. hidden and weight (the entropy feeds verl's entropy bonus). No [T, V]
    logits are materialised. Raises ValueError for reduction != "none", a dist_process_group, or bad shapes.
    """
    from ..logprobs import fused_logprobs

    if reduction != "none":
        raise ValueError(f"reduction must be 'none' (per-token, what verl's model forwards use), got {reduction!r}")
    if dist_process_group is not None:
        raise ValueError("dist_process_group (vocab-parallel lm_head) is not supported: pass the full [V, H] weight")
    if not isinstance(hidden, torch.Tensor) or hidden.ndim not in (2, 3):
        raise ValueError(f"hidden must be [B, L, H] or [T, H], got {getattr(hidden, 'shape', hidden)}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden without H), "
                         f"got {getattr(labels, 'shape', labels)}")
    temperature = _as_float_temperature(temperature)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # [T, H]; a view for contiguous input
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    logp, entropy = fused_logprobs(flat_hidden, weight.contiguous(), flat_labels, temperature=temperature,
                                   compute_entropy=True, entropy_grad=True)
    return logp.view(labels.shape), entropy.view(labels.shape)


# verl's FusedLinearForPPO backends (its __init__ raises ValueError for any other); ours computes both the same way.
VERL_FUSED_LINEAR_BACKENDS = ("torch", "liger")


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` module (torch and liger backends), computed by `fused_logprobs`.

    ``chunk_size`` and ``impl_backend`` are taken for signature compatibility and change nothing: the kernel sizes
    its own chunks, and verl's model forwards (0.9.1) pass ``impl_backend=model._verl_fused_kernels_backend``;
    an impl_backend other than "torch" or "liger" raises ValueError, as verl's does.
    forward(hidden_states [B, L, H] | [T, H], vocab_weights [V, H], input_ids [B, L] | [T], temperature)
    -> (log_probs, entropy), fp32, shaped like input_ids.
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in VERL_FUSED_LINEAR_BACKENDS:
            raise ValueError(f"impl_backend must be one of {VERL_FUSED_LINEAR_BACKENDS} (verl's), got {impl_backend!r}")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        vocab_weights: torch.Tensor,
        input_ids: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_cross_entropy(hidden_states, vocab_weights, input_ids, temperature)


def patch_verl() -> list[str]:
    """Point verl's fused-kernel entry points (both backends) at this module; returns the patched 'module.attr'.

    Global by design, like verl's own model patching; call it in each process that runs the actor (verl's
    ``actor_rollout_ref.model.external_lib`` imports a module there). Raises ImportError without verl and
    RuntimeError when a target module lacks the attribute (verl moved it: update VERL_TARGETS).
    """
    import importlib

    replacements = {"linear_cross_entropy": linear_cross_entropy, "FusedLinearForPPO": FusedLinearForPPO}
    modules = {}
    for module_name, attr in VERL_TARGETS.items():
        module = importlib.import_module(module_name)
        if not hasattr(module, attr):
            raise RuntimeError(f"{module_name} has no {attr!r}: this verl version moved its fused-kernel entry point; "
                               "update deepeyesv2_kernels.integrations.verl.VERL_TARGETS")
        modules[module_name] = module
    patched = []
    for module_name, attr in VERL_TARGETS.items():
        setattr(modules[module_name], attr, replacements[attr])
        patched.append(f"{module_name}.{attr}")
    # `verl.utils.kernel` re-exports linear_cross_entropy; keep the package attribute in step with the module's.
    package = importlib.import_module("verl.utils.kernel")
    if hasattr(package, "linear_cross_entropy"):
        package.linear_cross_entropy = linear_cross_entropy
        patched.append("verl.utils.kernel.linear_cross_entropy")
    return patched
