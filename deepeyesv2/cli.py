"""`deepeyesv2` command line: one entry point, one sub-command per job.

    deepeyesv2 info                      versions, device, available backends (and why others are not)
    deepeyesv2 sft  --config f.yaml ...  cold-start SFT
    deepeyesv2 rl   --config f.yaml ...  GRPO/DAPO on multi-turn tool rollouts
    deepeyesv2 demo [--quick]            SFT then RL on the tiny model with tools (the CPU demo)
    deepeyesv2 bench [--quick]           benchmarks vs peers -> bench/results/<date>-<device>.md
    deepeyesv2 eval --model M --data F   accuracy per category with tool rollouts (RealX-Bench-style JSONL)
    deepeyesv2 plot RUN_DIR              PNG training curves
    deepeyesv2 plan --config f.yaml [--gpu-mem 24GiB]   predicted peak memory by component, what fits

Overrides use the config's dotted field names: `--rl.group_size 8 --train.steps 20`.
"""

from __future__ import annotations

import sys


def _import_version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "installed"))
    except Exception as e:  # missing or broken optional package
        return f"not available ({type(e).__name__})"


def info(forward: bool = True) -> dict:
    """Print and return what this install can do."""
    import platform

    import torch

    from . import __version__
    from .attention import BACKENDS, backend_available

    rows: dict[str, str] = {
        "deepeyesv2": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _import_version("transformers"),
        "triton": _import_version("triton"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
    }
    for b in BACKENDS:
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
        from deepeyesv2_rollout.tools.sandbox import isolation_report

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
    import time

    import numpy as np
    import torch
    from PIL import Image

    from deepeyesv2_kernels import fused_logprobs
    from deepeyesv2_rollout.chat import render_chat

    from .model import build_model, packed_hidden
    from .packing import Sample, pack

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        info(forward="--no-forward" not in rest)
        return 0
    if cmd in ("sft", "rl"):
        from .config import ConfigError, config_from_namespace, config_parser, validate

        parser = config_parser(prog=f"deepeyesv2 {cmd}")
        try:
            # every value's range / allowed values are checked here, before any model or data is loaded
            cfg = validate(config_from_namespace(parser, parser.parse_args(rest)))
        except (ConfigError, Exception) as e:  # jsonargparse errors and ours name the bad key
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            print(f"deepeyesv2 {cmd}: config error: {' '.join(lines[:2])}", file=sys.stderr)
            return 2
        from .checkpoint import CheckpointError
        from .rewards import RewardError

        try:
            if cmd == "sft":
                from .sft import train_sft

                train_sft(cfg)
            else:
                from .rl import train_rl

                train_rl(cfg)
        except (ValueError, FileNotFoundError, CheckpointError, RewardError) as e:
            # Bad input (data, config values, checkpoints, a failing reward function): the message names
            # the file/line/key; a traceback from deep inside the trainer would only bury it.
            print(f"deepeyesv2 {cmd}: error: {e}", file=sys.stderr)
            if "file not found" in str(e) and "examples/data" in str(e):
                print("  (generate the example data with: python -m deepeyesv2.make_examples examples/data)", file=sys.stderr)
            return 1
        return 0
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if cmd == "bench":
        from .benchmarks import main as bench_main

        return bench_main(rest)
    if cmd == "eval":
        from .eval_cli import main as eval_main

        return eval_main(rest)
    if cmd == "plan":
        from .memory_plan import main as plan_main

        return plan_main(rest)
    if cmd == "plot":
        if not rest:
            print("usage: deepeyesv2 plot RUN_DIR", file=sys.stderr)
            return 2
        from .plot import plot_run

        for path in plot_run(rest[0]):
            print(path)
        return 0
    print(f"deepeyesv2: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
