"""One process of bench/verl_peer.py: run the named sides on the saved inputs and save what they returned.

    python -P bench/verl_peer_worker.py --sides S1,S2 [--patch] INPUTS.pt OUTPUT.pt

Run by the verl venv's python for the verl sides and by our venv's python for ours (-P: bench/ must not go on
sys.path, where bench/kernels.py would pass for Hugging Face's `kernels` package). With --patch it calls our
`patch_verl()` first, so the verl sides then reach our functions through verl's own module attributes and call
sites. Imports only torch, verl and deepeyesv2_kernels, each inside the function that needs it.

INPUTS.pt: {case: {"hidden": [.., H] fp32, "weight": [V, H] fp32, "labels": [..] int64, "temperature": float,
"g_logp": like labels, "g_entropy": like labels or None}}. Each side computes (log_probs, entropy), then backward of
sum(log_probs * g_logp) + sum(entropy * g_entropy) (the entropy term dropped when g_entropy is None, so verl's
backward then gets dentropy=None). OUTPUT.pt: {"sides": {side: {case: {"logp", "entropy", "d_hidden", "d_weight"}
or {"error": "Type: message", "where": "file:line: source"}}}, "versions": {...}, "patched": [...]}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import traceback
from types import SimpleNamespace
from typing import Callable

import torch

# Sides: name -> what it calls. verl.* resolve verl's module attributes at call time, the way verl's fused model
# forwards import them, so after --patch they reach whatever patch_verl() put there.
VERL_SIDES = ("verl.FusedLinearForPPO", "verl.linear_cross_entropy", "verl.efficient_entropy_forward",
              "verl.forward_with_torch_backend", "verl.forward_with_triton_backend")
OURS_SIDES = ("ours.FusedLinearForPPO", "ours.linear_cross_entropy", "ours.fused_logprobs[triton]", "fp64.autograd")


def _verl_fused_linear(hidden, weight, labels, temperature):
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    # verl 0.9.1's dense_common.forward_with_torch_backend builds it exactly so (impl_backend from the model).
    return FusedLinearForPPO(impl_backend="torch").forward(hidden_states=hidden, vocab_weights=weight,
                                                           input_ids=labels, temperature=temperature)


def _verl_linear_cross_entropy(hidden, weight, labels, temperature):
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, labels, temperature, "none")


def _verl_entropy_kernel(hidden, weight, labels, temperature):
    """verl's host function under linear_cross_entropy, called without its torch.cuda.nvtx wrapper (which a CPU
    build of torch refuses first): what it needs next, on this machine."""
    from verl.utils.kernel import kernels

    reduction = kernels.get_entropy_reduction_enum_number("none")
    out = kernels.efficient_entropy_forward(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                            reduction, temperature, None)
    return out[0].view(labels.shape), out[1].view(labels.shape)


def _stand_in_model(hidden, weight):
    """What verl's forwards read off the Hugging Face model: .config's two output flags, .model(**kw) returning
    the backbone's output ([0] = last hidden state) and .lm_head.weight. The backbone is skipped: `hidden` is the
    leaf the gradients are compared on."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return SimpleNamespace(config=SimpleNamespace(output_attentions=False, output_hidden_states=False),
                           model=lambda **kwargs: BaseModelOutputWithPast(last_hidden_state=hidden),
                           lm_head=SimpleNamespace(weight=weight))


def _verl_model_forward(backend: str):
    def call(hidden, weight, labels, temperature):
        from verl.models.transformers import dense_common

        forward = {"torch": dense_common.forward_with_torch_backend,
                   "triton": dense_common.forward_with_triton_backend}[backend]
        # verl rolls input_ids left by one to get the labels; roll them right so that it recovers `labels`.
        out = forward(_stand_in_model(hidden, weight), input_ids=torch.roll(labels, shifts=1, dims=-1),
                      return_dict=True, temperature=temperature)
        return out.log_probs, out.entropy
    return call


def _ours_fused_linear(hidden, weight, labels, temperature):
    from deepeyesv2_kernels.integrations.verl import FusedLinearForPPO

    return FusedLinearForPPO(impl_backend="torch").forward(hidden_states=hidden, vocab_weights=weight,
                                                           input_ids=labels, temperature=temperature)


def _ours_linear_cross_entropy(hidden, weight, labels, temperature):
    from deepeyesv2_kernels.integrations.verl import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, labels, temperature, "none")


def _ours_triton(hidden, weight, labels, temperature):
    """The kernel the drop-in runs on CUDA (backend='auto' takes the torch path on CPU), here in Triton's
    interpreter (TRITON_INTERPRET=1 in this process's environment)."""
    from deepeyesv2_kernels import fused_logprobs

    logp, ent = fused_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                               temperature=temperature, compute_entropy=True, entropy_grad=True, backend="triton")
    return logp.view(labels.shape), ent.view(labels.shape)


def _fp64_autograd(hidden, weight, labels, temperature):
    """The formulas verl's torch path implements, in fp64 with autograd: the scale of fp32 rounding."""
    logits = (hidden.double() @ weight.double().t()) / temperature
    logp = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
    return logp, entropy


SIDES: dict[str, Callable] = {
    "verl.FusedLinearForPPO": _verl_fused_linear,
    "verl.linear_cross_entropy": _verl_linear_cross_entropy,
    "verl.efficient_entropy_forward": _verl_entropy_kernel,
    "verl.forward_with_torch_backend": _verl_model_forward("torch"),
    "verl.forward_with_triton_backend": _verl_model_forward("triton"),
    "ours.FusedLinearForPPO": _ours_fused_linear,
    "ours.linear_cross_entropy": _ours_linear_cross_entropy,
    "ours.fused_logprobs[triton]": _ours_triton,
    "fp64.autograd": _fp64_autograd,
}


def _where(exc: BaseException) -> str:
    """'file:line: source' of the innermost frame, the path cut to what follows site-packages/ (or the repo)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    path = frame.filename.split("site-packages/")[-1]
    return f"{path}:{frame.lineno}: {(frame.line or '').strip()}"


def run_case(fn: Callable, case: dict) -> dict:
    """fn's outputs and the gradients of the case's loss w.r.t. hidden and weight, or the error it raised."""
    hidden = case["hidden"].detach().clone().requires_grad_()
    weight = case["weight"].detach().clone().requires_grad_()
    try:
        logp, entropy = fn(hidden, weight, case["labels"], case["temperature"])
        loss = (logp * case["g_logp"].to(logp.dtype)).sum()
        if case["g_entropy"] is not None:
            loss = loss + (entropy * case["g_entropy"].to(entropy.dtype)).sum()
        loss.backward()
    except Exception as exc:  # noqa: BLE001 -- a side that cannot run here is a result: the table shows why
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                "where": _where(exc)}
    return {"logp": logp.detach(), "entropy": entropy.detach(), "d_hidden": hidden.grad, "d_weight": weight.grad}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "executable": sys.executable}
    for dist in ("torch", "triton", "verl", "transformers", "tensordict", "ray", "deepeyesv2"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", required=True, help="comma-separated names from SIDES")
    parser.add_argument("--patch", action="store_true", help="call deepeyesv2_kernels' patch_verl() first")
    parser.add_argument("inputs", help="torch.save'd cases")
    parser.add_argument("output", help="where to torch.save the results")
    args = parser.parse_args(argv)
    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        parser.error(f"unknown sides {unknown}; known: {list(SIDES)}")
    cases = torch.load(args.inputs)
    patched: list[str] = []
    if args.patch:
        from deepeyesv2_kernels.integrations.verl import patch_verl

        patched = patch_verl()
    results = {side: {name: run_case(SIDES[side], case) for name, case in cases.items()} for side in sides}
    torch.save({"sides": results, "versions": versions(), "patched": patched}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
