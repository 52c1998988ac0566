"""TRL drop-in: make `trl.GRPOTrainer` score tokens with `fused_logprobs` (one call, per trainer instance).

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)
    deepeyesv2_kernels.integrations.trl.apply(trainer)
    trainer.train()

Where it hooks in. TRL 1.x's `GRPOTrainer._get_per_token_logps_and_entropies` slices the batch (micro-batches,
pixel_values / image_grid_thw per sample for VLMs), masks prompt and padding labels with -100 and calls
``model(**inputs, labels=labels, fused_lm_head=True)``; the trainer's ``__init__`` installed that ``fused_lm_head``
branch on the model instance (`trl.trainer.utils.add_fused_lm_head`), where TRL's own chunked log-prob kernel runs.
`apply` wraps that instance-level ``forward`` once more: with ``fused_lm_head=True`` it runs the backbone (no
lm_head), keeps the positions whose label is not -100 and scores them with `fused_logprobs`; any other call
(generation, a plain forward) goes to TRL's forward unchanged. So everything TRL does around the log-probs --
batching, VLM inputs, logits_to_keep slicing, masks, the loss types, importance sampling, the entropy mask and
bonus -- is TRL's own code, and only the [tokens, vocab] logits step is ours. No class and no TRL or transformers
function is modified; another trainer in the same process is unaffected.

The loss stays TRL's: its `_compute_loss` mixes the clipped ratio with importance-sampling corrections,
off-policy masks, the entropy mask and bonus, and per-loss-type normalisations; swapping it for `grpo_loss`
would fork that logic. The log-prob step is where the memory ([B, L, V] fp32 logits) goes.

Version guard: written against TRL 1.16 and transformers 5.24. Another MAJOR version of either raises
RuntimeError; another minor version warns. A missing `_get_per_token_logps_and_entropies`, a version of it that
no longer calls ``fused_lm_head=True``, or a model forward that is not TRL's fused one also raise RuntimeError:
patching blindly could leave TRL computing log-probs its own way (or, worse, half ours and half its).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import warnings

import torch

TESTED_TRL = (1, 16)
TESTED_TRANSFORMERS = (5, 24)
# The method whose model call we take over, and the keyword proving it goes through the fused LM head.
TARGET_METHOD = "_get_per_token_logps_and_entropies"
_SEAM = "fused_lm_head=True"
# Marks a model instance as patched (the wrapped forward carries it), so `apply` twice is a no-op.
_MARK = "_deepeyesv2_fused_lm_head"
# Config fields that scale or cap the logits before the softmax (TRL folds them into its kernel; we don't).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
SUPPORTED_OUTPUTS = ("log_probs", "entropy")


def _major_minor(version: str) -> tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_versions(trl_version: str | None = None, transformers_version: str | None = None) -> None:
    """Raise RuntimeError unless TRL is 1.x and transformers 5.x (default: the installed ones); warn on other minors."""
    if trl_version is None:
        import trl

        trl_version = trl.__version__
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    for name, found, tested in (("trl", trl_version, TESTED_TRL),
                                ("transformers", transformers_version, TESTED_TRANSFORMERS)):
        major, minor = _major_minor(found)
        if major != tested[0]:
            raise RuntimeError(
                f"deepeyesv2_kernels.integrations.trl was written for {name} {tested[0]}.x (tested on "
                f"{tested[0]}.{tested[1]}); found {name} {found}. GRPOTrainer's log-prob path may have moved: "
                f"update kernels/integrations/trl.py and tests/kernels/test_integration_trl.py first."
            )
        if minor != tested[1]:
            warnings.warn(f"deepeyesv2_kernels.integrations.trl was tested on {name} {tested[0]}.{tested[1]}, found "
                          f"{found}; run tests/kernels/test_integration_trl.py", stacklevel=3)


def _is_trl_fused_forward(forward) -> bool:
    # TRL's wrapper copies the model class's forward metadata (functools.wraps), but not its code object.
    code = getattr(getattr(forward, "__func__", None), "__code__", None)
    return code is not None and code.co_name == "_fused_forward" and "trl" in code.co_filename


def _check_logit_transforms(model) -> None:
    text_config = model.config.get_text_config()
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(text_config, attr, None)
        if value is not None and not (attr != "final_logit_softcapping" and value == 1):
            raise ValueError(f"model config sets {attr}={value!r}: the logits are scaled or capped before the "
                             "softmax, which fused_logprobs does not do; keep TRL's own fused LM head for this model")
    if getattr(text_config, "output_router_logits", False):
        raise ValueError("model config sets output_router_logits=True (MoE load-balancing loss): not supported by "
                         "this integration; keep TRL's own fused LM head for this model")


def _lm_head_dtype(device: torch.device, weight: torch.Tensor, cast_lm_head_to_fp32: bool) -> torch.dtype:
    """dtype of the head's matmul operands: TRL's (autocast dtype under mixed precision, else the weight's)."""
    if cast_lm_head_to_fp32:
        return torch.float32
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def patch_fused_lm_head(
    model,
    temperature: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
    entropy_grad: bool = False,
    cast_lm_head_to_fp32: bool = False,
):
    """Route ``model(..., labels=labels, fused_lm_head=True)`` of a TRL-patched model through `fused_logprobs`.

    model: a transformers causal LM / VLM whose instance ``forward`` is TRL's `add_fused_lm_head` wrapper (PEFT:
    the base model). The fused call returns TRL's `FusedCausalLMOutput` with ``log_probs`` [B, L-1] fp32 (or
    [B, L] with ``shift_labels``), ``entropy`` like it when "entropy" is in `outputs` (differentiable iff
    `entropy_grad`), ``label_mask`` and ``loss`` (-sum log_probs / num_items_in_batch or the label count); zeros
    where the label is -100. Returns the model. Idempotent.
    """
    from ..logprobs import fused_logprobs  # noqa: F401  (fail here, not mid-training, if the kernels are broken)

    if getattr(model.forward, _MARK, False):
        return model
    # accelerate's mixed-precision wrapper (autocast + outputs to fp32) may sit around TRL's forward; it keeps the
    # wrapped one as `_original_forward`. The fused call needs neither: TRL enters accelerator.autocast() around it
    # and our outputs are fp32, so ours goes outermost and the other calls still pass through both.
    if not (_is_trl_fused_forward(model.forward) or _is_trl_fused_forward(getattr(model, "_original_forward", None))):
        raise RuntimeError(
            "model.forward is not TRL's fused-LM-head forward (trl.trainer.utils.add_fused_lm_head): call apply() "
            "on a constructed GRPOTrainer, or add_fused_lm_head(model) before patch_fused_lm_head(model)"
        )
    unknown = [o for o in outputs if o not in SUPPORTED_OUTPUTS]
    if unknown or "log_probs" not in outputs:
        raise ValueError(f"outputs must contain 'log_probs' and only {SUPPORTED_OUTPUTS}, got {outputs}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
    _check_logit_transforms(model)
    want_entropy = "entropy" in outputs
    trl_forward = model.forward

    # Keeps the model class's signature, which `generate` validates its kwargs against (as TRL's wrapper does).
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

        from ..logprobs import fused_logprobs

        if kwargs.get("output_router_logits"):
            raise ValueError("output_router_logits=True (MoE aux loss) is not supported by the deepeyesv2 fused head")
        kwargs["use_cache"] = False
        # Looked up per call, like TRL does: FSDP and PEFT replace the backbone and head after patching.
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # [B, L, H]
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor shards: the kernel needs the whole head
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100  # [B, L-1]
        dtype = _lm_head_dtype(hidden.device, weight, cast_lm_head_to_fp32)
        # Only the scored positions go to the kernel (prompt and padding rows would be wasted GEMM work).
        hidden_sel = hidden[mask].to(dtype)  # [N, H], contiguous
        # Autocast off: the kernel picks its own precisions (fp32 accumulation), autocast would downcast them.
        with torch.autocast(hidden.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            logp, ent = fused_logprobs(
                hidden_sel, weight.to(dtype), labels[mask], temperature=temperature,
                bias=bias.to(dtype) if bias is not None else None, compute_entropy=want_entropy,
                entropy_grad=entropy_grad and want_entropy,
            )
        if logp.numel() == 0 and torch.is_grad_enabled():
            # An all-masked micro-batch must still give the head a (zero) gradient, as TRL's path does: DDP
            # errors on parameters that took no part in the loss. fused_logprobs connects only `hidden` here.
            logp = logp + weight.sum().float() * 0 + (bias.sum().float() * 0 if bias is not None else 0)
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero gradient, not an error).
        log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent) if want_entropy else None
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy,
                                   label_mask=mask)

    setattr(forward, _MARK, True)
    model.forward = types.MethodType(forward, model)
    return model


def apply(trainer):
    """Make a constructed `trl.GRPOTrainer` compute per-token log-probs and entropy with `fused_logprobs`.

    Patches the trainer's policy model (the PEFT base model if wrapped) and its reference model, per instance;
    honours ``trainer.temperature``, ``args.cast_lm_head_to_fp32`` and the entropy bonus (entropy gradient only
    when ``entropy_coef`` / adaptive entropy is on). Returns the trainer. Call it after ``GRPOTrainer(...)`` and
    before ``train()``. Raises TypeError when `trainer` is not a `GRPOTrainer`; RuntimeError on an untested
    TRL/transformers major version or when TRL's log-prob path is not the one this was written against;
    ValueError for models whose logits are scaled/capped, MoE aux losses, and DeepSpeed ZeRO-3 (the head would be
    gathered in the forward only).
    """
    check_versions()
    from trl import GRPOTrainer

    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"apply() takes a constructed trl.GRPOTrainer; got {type(trainer).__module__}."
                        f"{type(trainer).__qualname__}, which is not a GRPOTrainer")
    method = getattr(type(trainer), TARGET_METHOD, None)
    if method is None:
        raise RuntimeError(f"{type(trainer).__name__} has no {TARGET_METHOD}: TRL changed how GRPOTrainer computes "
                           "log-probs; update kernels/integrations/trl.py")
    try:
        source = inspect.getsource(inspect.unwrap(method))
    except (OSError, TypeError) as err:
        raise RuntimeError(f"cannot read the source of {TARGET_METHOD} to check its model call: {err}") from err
    if _SEAM not in source:
        raise RuntimeError(f"{type(trainer).__name__}.{TARGET_METHOD} no longer calls the model with {_SEAM}; "
                           "patching its model would not change how it computes log-probs")
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError("DeepSpeed ZeRO-3 is not supported: fused_logprobs recomputes the logits in backward, "
                         "where the sharded lm_head is not gathered")
    args = trainer.args
    cast32 = bool(getattr(args, "cast_lm_head_to_fp32", False))
    policy = trainer.model.get_base_model() if _is_peft(trainer.model) else trainer.model
    patch_fused_lm_head(policy, temperature=trainer.temperature, outputs=("log_probs", "entropy"),
                        entropy_grad=bool(getattr(trainer, "_entropy_bonus_enabled", True)),
                        cast_lm_head_to_fp32=cast32)
    if getattr(trainer, "ref_model", None) is not None:
        patch_fused_lm_head(trainer.ref_model, temperature=trainer.temperature, outputs=("log_probs",),
                            cast_lm_head_to_fp32=cast32)
    return trainer


def _is_peft(model) -> bool:
    with contextlib.suppress(ImportError):
        from peft import PeftModel

        return isinstance(model, PeftModel)
    return False
