"""LoRA on the language model (vision tower and lm_head frozen), via peft, for SFT and RL.

`apply_lora` wraps the model in a `peft.PeftModel` whose adapters sit on the text model's projections only
(the vision tower has `gate_proj`/`up_proj`/`down_proj` too, so targets are matched by a regex anchored at
`language_model.layers.N`). The adapters are injected in place: `unwrap_model` (deepeyesv2.model) gives the plain
Qwen2.5-VL module tree with the adapters active, which is what the packed forward and the rollout engine use.

The KL reference for free: the base model is the policy with its adapters switched off
(`with model.disable_adapter():`), so no second copy of the weights is held (deepeyesv2.reference).

`merged_model` folds the adapters into a host copy (W + B A * alpha / r) for a plain HF checkpoint that
`build_model` loads; `save_adapter` writes peft's own adapter folder, which `PeftModel.from_pretrained` loads
(both written by deepeyesv2.checkpoint).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from .config import LORA_ATTN_TARGETS as _ATTN, LORA_MLP_TARGETS as _MLP, ModelConfig
from .host_copy import cpu_copy

TEXT_LAYER_PREFIX = r"(?:.*\.)?language_model\.layers\.\d+\."


def target_regex(targets: tuple[str, ...] | list[str]) -> str:
    """peft `target_modules` regex matching `targets` inside the text model's decoder layers only."""
    unknown = sorted(set(targets) - _ATTN - _MLP)
    if not targets or unknown:
        raise ValueError(f"model.lora_targets must be a non-empty subset of {sorted(_ATTN | _MLP)}, got {list(targets)}")
    attn = [t for t in targets if t in _ATTN]
    mlp = [t for t in targets if t in _MLP]
    alts = ([rf"self_attn\.(?:{'|'.join(attn)})"] if attn else []) + ([rf"mlp\.(?:{'|'.join(mlp)})"] if mlp else [])
    return TEXT_LAYER_PREFIX + f"(?:{'|'.join(alts)})"


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def apply_lora(model, cfg: ModelConfig):
    """Wrap `model` (Qwen2_5_VLForConditionalGeneration) in a PeftModel with adapters of rank cfg.lora_rank.

    Everything but the adapters is frozen (embeddings, lm_head, norms, vision tower), so the fused log-prob
    kernels skip the [V, H] lm_head gradient. Adapters are created in the model's dtype on its device.
    """
    import peft

    if cfg.lora_rank <= 0:
        raise ValueError(f"model.lora_rank must be > 0 to apply LoRA, got {cfg.lora_rank}")
    if is_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    lcfg = peft.LoraConfig(r=int(cfg.lora_rank), lora_alpha=float(cfg.lora_alpha), lora_dropout=float(cfg.lora_dropout),
                           target_modules=target_regex(tuple(cfg.lora_targets)), bias="none")
    with warnings.catch_warnings():  # peft probes transformers' deprecated `is_gradient_checkpointing`
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(model, lcfg)
    dtype = next(model.parameters()).dtype
    for name, p in wrapped.named_parameters():
        if "lora_" in name and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return wrapped


def merged_model(model):
    """A plain Qwen2.5-VL with the adapters folded into the weights, in host memory (a copy made tensor by
    tensor: `model` keeps training, and a checkpoint save never holds a second model on the accelerator)."""
    if not is_lora(model):
        raise ValueError("merged_model: the model has no LoRA adapters")
    return cpu_copy(model).merge_and_unload()


def save_adapter(model, path: str | Path) -> Path:
    """peft's adapter folder (adapter_config.json + adapter_model.safetensors), loadable on the base model with
    `peft.PeftModel.from_pretrained(base, path)`. Returns `path`."""
    if not is_lora(model):
        raise ValueError("save_adapter: the model has no LoRA adapters")
    model.save_pretrained(str(path), safe_serialization=True)  # + peft's README.md model card
    return Path(path)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapters' weights only (peft's key naming), e.g. to save next to a base checkpoint."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if re.search(r"lora_", k)]
    if unexpected:
        raise ValueError(f"adapter state does not fit the model: unexpected {unexpected[:5]}")
