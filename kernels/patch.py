"""Opt-in patching of a loaded Qwen2.5-VL model with our kernels (one flag per kernel), per instance.

``patch_qwen2_5_vl(model, logprobs=True, mrope=True)``:

* ``mrope=True``: the language model's rotary module (``text_model.rotary_emb``) stops building [B, T, D] cos/sin
  and returns an ``MRopePositions`` (the [3, B, T] positions + inv_freq + sections); every decoder layer's
  ``self_attn.forward`` is replaced, on that instance, by a copy of transformers 5.24's ``Qwen2_5_VLAttention.forward``
  that rotates q/k with ``apply_mrope`` (cos/sin computed in-kernel) in the [B*T, H, D] layout the projections
  already have (no transpose copy before the rotation). Only this model instance changes: no class, and no
  function of the transformers modules, is modified. The vision tower's 2-D rope is left alone.
  Liger 0.8.5 patches ``modeling_qwen2_5_vl.apply_multimodal_rotary_pos_emb`` globally; that name no longer
  exists in transformers 5.x (the sections are interleaved in the rotary module), so its rope patch is a no-op
  there -- one reason this is written from scratch.
* ``logprobs=True``: attaches two methods to the instance, leaving ``forward`` untouched (generation and the
  usual logits path keep working):
    ``model.token_logprobs(hidden [T, H], targets [T], temperature=1.0, compute_entropy=True, entropy_grad=False,
    loss_mask=None) -> (logprobs [T] fp32, entropy [T] fp32)``: ``fused_logprobs`` with ``lm_head``, no [T, V].
    ``model.forward_logprobs(targets [B, T], temperature=1.0, compute_entropy=True, entropy_grad=False,
    loss_mask=None, **inputs) -> (logprobs, entropy)`` shaped like targets: runs the backbone (``model.model``,
    no lm_head) on ``inputs`` (input_ids, position_ids, pixel_values, ...) and then ``token_logprobs``.

Written against transformers 5.24; another major version raises, another 5.x minor version warns.
"""

from __future__ import annotations

import dataclasses
import types
import warnings

import torch

from .mrope import apply_mrope

TESTED_TRANSFORMERS = (5, 24)


@dataclasses.dataclass(frozen=True)
class MRopePositions:
    """What the patched rotary module hands to the patched attention instead of (cos, sin).

    position_ids: [3, B, T] int64, inv_freq: [D/2] fp32. Not a tuple on purpose: an unpatched attention that
    tries ``cos, sin = position_embeddings`` fails loudly instead of rotating with garbage.
    """

    position_ids: torch.Tensor
    inv_freq: torch.Tensor
    mrope_section: tuple[int, ...]
    scaling: float


def check_transformers_version(found: str | None = None) -> None:
    """Raise RuntimeError unless ``found`` (default: the installed transformers version) is 5.x; warn if not 5.24."""
    if found is None:
        import transformers

        found = transformers.__version__
    major, minor = (int(x) for x in found.split(".")[:2])
    if major != TESTED_TRANSFORMERS[0]:
        raise RuntimeError(
            f"patch_qwen2_5_vl was written for transformers {TESTED_TRANSFORMERS[0]}.x (tested on "
            f"{TESTED_TRANSFORMERS[0]}.{TESTED_TRANSFORMERS[1]}); found {found}. The attention "
            "forward it replaces would silently diverge: update kernels/patch.py first."
        )
    if minor != TESTED_TRANSFORMERS[1]:
        warnings.warn(
            f"patch_qwen2_5_vl was tested on transformers {TESTED_TRANSFORMERS[0]}.{TESTED_TRANSFORMERS[1]}, found "
            f"{found}; run tests/kernels/test_patch.py", stacklevel=3,
        )


def _text_model_of(model):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    if isinstance(model, m.Qwen2_5_VLForConditionalGeneration):
        return model.model.language_model
    if isinstance(model, m.Qwen2_5_VLModel):
        return model.language_model
    if isinstance(model, m.Qwen2_5_VLTextModel):
        return model
    raise TypeError(f"patch_qwen2_5_vl expects a Qwen2.5-VL model (ForConditionalGeneration, Model or TextModel), "
                    f"got {type(model).__name__}")


def _mrope_rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> MRopePositions:
    """Replaces ``Qwen2_5_VLRotaryEmbedding.forward``: x: [B, T, H] (unused), position_ids: [3, B, T] or [B, T]."""
    if position_ids.ndim == 2:
        position_ids = position_ids[None].expand(3, -1, -1)
    return MRopePositions(position_ids, self.inv_freq, tuple(self.mrope_section), float(self.attention_scaling))


def _mrope_attention_forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    cache=None,
    position_embeddings: MRopePositions | None = None,
    **kwargs,
):
    """``Qwen2_5_VLAttention.forward`` of transformers 5.24 with the rotation done by ``apply_mrope``."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    if not isinstance(position_embeddings, MRopePositions):
        raise TypeError("patched Qwen2.5-VL attention expects MRopePositions from the patched rotary module; "
                        f"got {type(position_embeddings).__name__} (was the rotary module replaced or unpatched?)")
    bsz, q_len, _ = hidden_states.size()
    # [B*T, H, D]: the projections' natural layout, which is what apply_mrope takes (per-token rotation)
    query_states = self.q_proj(hidden_states).view(bsz * q_len, -1, self.head_dim)
    key_states = self.k_proj(hidden_states).view(bsz * q_len, -1, self.head_dim)
    value_states = self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)

    rope = position_embeddings
    positions = rope.position_ids.reshape(3, bsz * q_len)
    query_states, key_states = apply_mrope(query_states, key_states, positions, rope.inv_freq,
                                           list(rope.mrope_section), scaling=rope.scaling)
    query_states = query_states.view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
    key_states = key_states.view(bsz, q_len, -1, self.head_dim).transpose(1, 2)

    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

    attention_interface = m.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, m.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=self.sliding_window,
        position_ids=position_ids,  # pass positions for FA2
        **kwargs,
    )
    attn_output = attn_output.reshape(bsz, q_len, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


def _token_logprobs(
    self,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    compute_entropy: bool = True,
    entropy_grad: bool = False,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden: [T, H] (final-norm output of the backbone), targets: [T] int64 (-100 = ignore)
    -> (logprobs [T] fp32, entropy [T] fp32) of softmax(lm_head(hidden) / temperature), without [T, V] logits."""
    from .logprobs import fused_logprobs  # lazy: written beside this module, heavy triton setup

    return fused_logprobs(hidden, self.lm_head.weight, targets, temperature=temperature, bias=self.lm_head.bias,
                          compute_entropy=compute_entropy, entropy_grad=entropy_grad, loss_mask=loss_mask)


def _forward_logprobs(
    self,
    targets: torch.Tensor,
    temperature: float = 1.0,
    compute_entropy: bool = True,
    entropy_grad: bool = False,
    loss_mask: torch.Tensor | None = None,
    **inputs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone forward on ``inputs`` (input_ids, position_ids, pixel_values, image_grid_thw, attention_mask, ...),
    then ``token_logprobs``. targets: [B, T] int64 -> (logprobs, entropy) fp32 shaped like targets."""
    hidden = self.model(**inputs).last_hidden_state  # [B, T, H]
    flat_mask = None if loss_mask is None else loss_mask.reshape(-1)
    logp, ent = self.token_logprobs(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), temperature,
                                    compute_entropy, entropy_grad, flat_mask)
    return logp.view(targets.shape), ent.view(targets.shape)


def patch_qwen2_5_vl(model, logprobs: bool = True, mrope: bool = True):
    """Patch a loaded Qwen2.5-VL model instance in place (see module docstring); returns the model.

    Raises RuntimeError on an untested transformers major version, TypeError on another model class,
    ValueError for mrope=True with a rope type whose frequencies change at run time, and for logprobs=True on a
    model without an lm_head.
    """
    check_transformers_version()
    text_model = _text_model_of(model)
    if mrope:
        rotary = text_model.rotary_emb
        if getattr(rotary, "rope_type", "default") != "default":
            raise ValueError(f"mrope=True supports rope_type 'default' only (static inv_freq), "
                             f"got {rotary.rope_type!r}")
        for attr in ("inv_freq", "mrope_section", "attention_scaling"):
            if not hasattr(rotary, attr):
                raise RuntimeError(f"rotary module has no {attr!r}: transformers changed, update kernels/patch.py")
        for layer in text_model.layers:
            attn = layer.self_attn
            for attr in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx", "sliding_window"):
                if not hasattr(attn, attr):
                    raise RuntimeError(f"attention has no {attr!r}: transformers changed, update kernels/patch.py")
            attn.forward = types.MethodType(_mrope_attention_forward, attn)
        rotary.forward = types.MethodType(_mrope_rotary_forward, rotary)
    if logprobs:
        if getattr(model, "lm_head", None) is None:
            raise ValueError("logprobs=True needs Qwen2_5_VLForConditionalGeneration (a model with an lm_head)")
        model.token_logprobs = types.MethodType(_token_logprobs, model)
        model.forward_logprobs = types.MethodType(_forward_logprobs, model)
    return model
