"""`deepeyesv2 info [--no-forward]`: versions, device, available backends (and why others are not), and a
forward pass of the tiny model on a packed batch."""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from PIL import Image

from deepeyesv2 import __version__
from deepeyesv2.attention import backend_available
from deepeyesv2.config import ATTN_BACKENDS
from deepeyesv2.model import build_model, packed_hidden
from deepeyesv2.packing import Sample, pack
from deepeyesv2_kernels import fused_logprobs
from deepeyesv2_rollout.chat import render_chat
from deepeyesv2_rollout.tools.sandbox import isolation_report


def _import_version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "installed"))
    except Exception as e:  # missing or broken optional package
        return f"not available ({type(e).__name__})"


def info(forward: bool = True) -> dict:
    """Print and return what this install can do."""
    rows: dict[str, str] = {
        "deepeyesv2": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _import_version("transformers"),
        "triton": _import_version("triton"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
    }
    for b in ATTN_BACKENDS:
        ok, why = backend_available(b)
        rows[f"attention.{b}"] = ("yes: " if ok else "no: ") + why
    rows["kernels"] = "triton (CUDA)" if torch.cuda.is_available() else "chunked torch (CPU); triton via TRITON_INTERPRET=1 in tests"
    rows["kernels.audit"] = ("python -m deepeyesv2_kernels.audit: compiles every Triton kernel for sm_80/sm_90 "
                             "(no GPU needed) and reports registers, spills, shared memory, tensor cores, pipelining")
    rows["rollout.embedded"] = "yes: HF model with radix prefix-KV cache"
    try:
        import sglang  # noqa: F401

        rows["rollout.sglang"] = "yes" if torch.cuda.is_available() else "no: sglang installed but no CUDA device"
    except Exception as e:
        rows["rollout.sglang"] = f"no: sglang not installed ({type(e).__name__}); pip install 'deepeyesv2[gpu]' on a GPU machine"
    try:
        iso = isolation_report()
        rows["sandbox"] = ", ".join(f"{k}={v}" for k, v in iso.items())
    except Exception as e:
        rows["sandbox"] = f"unavailable ({type(e).__name__}: {e})"
    for peer in ("liger_kernel", "trl", "peft"):
        rows[f"peer.{peer}"] = _import_version(peer)
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")
    if forward:
        rows["forward"] = _forward_smoke()
        print(f"{'forward':<{width}}  {rows['forward']}")
    return rows


def _forward_smoke() -> str:
    """A forward pass of the tiny model on a packed batch of 3 samples, 2 with images."""
    model, proc = build_model()
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((84, 112), (140, 70))]
    convs = [
        ([{"role": "user", "content": "<image>How many red dots?"}, {"role": "assistant", "content": "<answer>3</answer>"}], imgs[:1]),
        ([{"role": "user", "content": "<image>What colour is the tower?"}, {"role": "assistant", "content": "<answer>teal</answer>"}], imgs[1:]),
        ([{"role": "user", "content": "What is 6 times 7?"}, {"role": "assistant", "content": "<answer>42</answer>"}], []),
    ]
    samples = []
    for i, (msgs, ims) in enumerate(convs):
        r = render_chat(proc, msgs, ims, name=f"smoke{i}")
        samples.append(Sample(torch.tensor(r.token_ids), torch.tensor(r.loss_mask), r.pixel_values, r.image_grid_thw, name=f"smoke{i}"))
    batch = pack(samples, model.config.image_token_id).to(model.lm_head.weight.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        hidden = packed_hidden(model, batch)
        logp, _ = fused_logprobs(hidden, model.lm_head.weight, batch.targets, loss_mask=batch.loss_mask)
    dt = time.perf_counter() - t0
    nll = -(logp.sum() / batch.loss_mask.sum()).item()
    return (f"tiny Qwen2.5-VL ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), packed row of "
            f"{len(samples)} samples / {batch.num_tokens} tokens / {batch.image_grid_thw.shape[0]} images: "
            f"hidden {tuple(hidden.shape)}, NLL {nll:.3f} on {int(batch.loss_mask.sum())} answer tokens, {dt * 1e3:.0f} ms")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="deepeyesv2 info", description=__doc__)
    ap.add_argument("--no-forward", action="store_true", help="skip the tiny model's forward pass")
    args = ap.parse_args(argv)
    info(forward=not args.no_forward)
    return 0
