"""Measure the peak memory of one real RL-like training step on CPU, in a fresh process (clean RSS baseline).

    python -m bench.memory_probe --preset small --mode lora --tokens 1024

The step is ours end to end: `build_model` (LoRA / checkpointing knobs), `build_optimizer` (offload knob),
packed rows of random token ids (4 sequences each), `packed_hidden` + `fused_linear_grpo_loss`, backward over
2 rows (gradient accumulation), clip and AdamW step -- twice, so the second step runs with AdamW moments and
gradients alive, as every later step does. Peak = VmHWM at the end minus VmRSS right after the imports.
Used by tests/trainer/test_memory_plan.py (planner validation) and bench/memory.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODES = {
    "full": dict(lora_rank=0, gradient_checkpointing=False, offload=False),
    "lora": dict(lora_rank=16, gradient_checkpointing=False, offload=False),
    "lora+ckpt+offload": dict(lora_rank=16, gradient_checkpointing=True, offload=True),
}


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> None:
    try:  # reset the RSS high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def synthetic_rows(image_token_id: int, n_rows: int, tokens: int, seqs: int = 4, seed: int = 0):
    """Packed rows of `seqs` random-token sequences, all tokens trained, with old log-probs and advantages."""
    import torch

    from deepeyesv2.packing import Sample, pack

    g = torch.Generator().manual_seed(seed)
    rows, advs = [], []
    for r in range(n_rows):
        samples = []
        for i in range(seqs):
            n = tokens // seqs
            ids = torch.randint(10, 500, (n,), generator=g)
            samples.append(Sample(ids, torch.ones(n, dtype=torch.long), name=f"r{r}s{i}",
                                  token_fields={"old_logprobs": torch.full((n,), -6.0)}))
        row = pack(samples, image_token_id)
        rows.append(row)
        advs.append(torch.randn(seqs, generator=g).repeat_interleave(tokens // seqs))
    return rows, advs


def measure_step(preset: str, mode: str, tokens: int, dtype: str = "float32", steps: int = 2, rows: int = 2,
                 seqs: int = 4, lora_rank: int | None = None) -> dict:
    """Runs in the calling process: returns peak RSS growth (bytes) of building + training `steps` steps."""
    import gc

    import torch

    from deepeyesv2_kernels import fused_linear_grpo_loss

    from deepeyesv2.config import ModelConfig, OptimConfig
    from deepeyesv2.model import build_model, packed_hidden
    from deepeyesv2.optim import build_optimizer, clip_and_step

    knobs = dict(MODES[mode])
    if lora_rank is not None and knobs["lora_rank"]:
        knobs["lora_rank"] = lora_rank
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    # Import (and touch) everything lazily loaded before the baseline: libraries are not what we measure.
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: F401

    from deepeyesv2.model import load_processor

    load_processor(preset)
    gc.collect()
    base = rss_kib()
    _reset_hwm()
    # device="cpu": the probe measures host RSS (the planner's CPU mode), also on a machine with a GPU
    model, _ = build_model(ModelConfig(name_or_path=preset, dtype=dtype, lora_rank=knobs["lora_rank"], device="cpu",
                                       gradient_checkpointing=knobs["gradient_checkpointing"]))
    model.train()
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-4, offload_states=knobs["offload"]), steps)
    data, advs = synthetic_rows(model.config.image_token_id, rows, tokens, seqs)
    gc.collect()
    after_build = rss_kib()
    _reset_hwm()
    losses = []
    for _ in range(steps):
        n_tok = float(sum(int(r.loss_mask.sum()) for r in data))
        for row, adv in zip(data, advs):
            hidden = packed_hidden(model, row)
            loss, _ = fused_linear_grpo_loss(hidden.contiguous(), model.lm_head.weight, row.targets,
                                             row.token_fields["old_logprobs"], adv, row.loss_mask, row.cu_seqlens,
                                             num_tokens=n_tok)
            loss.backward()
            losses.append(float(loss))
            del hidden, loss
        clip_and_step(model, opt, sched, 1.0)
    peak = rss_kib("VmHWM")
    return {"preset": preset, "mode": mode, "tokens": tokens, "dtype": dtype,
            "peak_growth_bytes": (peak - base) * 1024, "build_growth_bytes": (after_build - base) * 1024,
            "losses": losses, "threads": torch.get_num_threads()}


def measure_in_subprocess(preset: str, mode: str, tokens: int, dtype: str = "float32", timeout: float = 600) -> dict:
    cmd = [sys.executable, "-m", "bench.memory_probe", "--preset", preset, "--mode", mode, "--tokens", str(tokens),
           "--dtype", dtype]
    # A fixed mmap threshold: glibc's dynamic one rises after the first large free, after which freed
    # activations stay in the heap and the RSS high-water mark measures fragmentation, not tensors.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {preset}/{mode} failed:\n{(proc.stderr or proc.stdout)[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--mode", default="full", choices=list(MODES))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    print(json.dumps(measure_step(args.preset, args.mode, args.tokens, args.dtype)))


if __name__ == "__main__":
    main()
