"""Peak memory of one RL training step on CPU: ours (full FT / LoRA / LoRA + checkpointing + offload) vs TRL.

    python -m bench.memory [--quick] [--rounds N]

Same architecture on both sides. TRL's GRPOTrainer takes a text model, so the peer runs a Qwen2ForCausalLM with
exactly the text sizes of our policy (the `small` preset: hidden 1024, 8 layers, 16 heads / 4 KV heads, MLP 2816,
vocab 1024; `--quick`: the `tiny` preset); ours runs the Qwen2.5-VL preset itself (its frozen vision tower adds
~1 % of the weights and is not run: the batch is text). Batch: 2 prompts x G=4 completions, 64 prompt + 192
completion tokens (8 sequences, 2048 tokens); ours packs them into two rows of 1024 tokens. LoRA rank 16 on
q/k/v/o/gate/up/down_proj on both sides; AdamW; fp32.

Measured, each run of a variant in a fresh subprocess, ours and the peer alternating for `rounds` rounds per pair
(bench/_common.py `interleave`; the ratio is the median of the per-round ratios with their min-max; memory is
nearly deterministic, so the spread mostly shows allocator and thread-pool variation): peak RSS growth over the
RSS right after the imports, during the training part of a step (forward, backward, optimizer step) -- for TRL the high-water mark is reset when
`compute_loss` starts, so its generation (KV cache) is excluded, like our rollout phase. Two steps, the max kept
(the second step runs with AdamW moments alive). glibc's mmap threshold is fixed (see bench.memory_probe)
on both sides. Peer variants: TRL + PEFT for LoRA, TRL + PEFT + gradient_checkpointing for the lean mode, plain
TRL for full fine-tuning.

`rows(quick)` returns dicts (benchmark, ours, peer, ratio, device); `markdown_table(rows)` formats them.
"""

from __future__ import annotations

from functools import partial
import argparse
import sys
import tempfile

from bench._common import (bytes_row, failed_row, first_failure, interleave, reported, reset_peak_rss, rss_kib,
                           run_worker, serve_worker)
from bench._common import ratio_table as markdown_table  # public: `deepeyesv2 bench` and the CLI print it

PROMPTS, GROUP, PROMPT_TOKENS, COMPLETION = 2, 4, 64, 192
LORA_RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (our mode, peer variant, label)
PAIRS = [("full", "trl", "full fine-tune"), ("lora", "trl+peft", "LoRA"),
         ("lora+ckpt+offload", "trl+peft+ckpt", "LoRA + checkpointing (+ our optimizer offload)")]
ENV = {"OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}


def _trl_worker(variant: str, preset: str) -> dict:
    import gc
    import warnings

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from deepeyesv2.model import PRESETS, TINY_PROCESSOR_DIR

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(str(TINY_PROCESSOR_DIR))
    text = dict(PRESETS[preset]["text"])
    text.pop("mrope_section")
    tmp = tempfile.mkdtemp(prefix="bench_memory_")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=None, **text)).save_pretrained(tmp)
    words = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 2][:400]
    prompts = [" ".join(words[(7 * i + j) % len(words)] for j in range(PROMPT_TOKENS)) for i in range(PROMPTS)]
    gc.collect()
    base = rss_kib("VmRSS")
    peaks: list[int] = []

    class Peak(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            peaks.append(rss_kib("VmHWM"))

    args = GRPOConfig(output_dir=tmp, use_cpu=True, bf16=False, report_to=[], disable_tqdm=True, save_strategy="no",
                      max_completion_length=COMPLETION, num_generations=GROUP, per_device_train_batch_size=PROMPTS * GROUP,
                      max_steps=2, seed=0, beta=0.0, optim="adamw_torch", learning_rate=1e-4, logging_steps=1,
                      gradient_checkpointing=variant.endswith("ckpt"),
                      generation_kwargs={"min_new_tokens": COMPLETION}, model_init_kwargs={"dtype": torch.float32})
    peft_config = LoraConfig(r=LORA_RANK, lora_alpha=32, target_modules=TARGETS) if "peft" in variant else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=tmp, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                              args=args, train_dataset=Dataset.from_dict({"prompt": prompts * 8}),
                              processing_class=tok, callbacks=[Peak()], peft_config=peft_config)
        real_compute_loss = trainer.compute_loss

        def compute_loss(*a, **kw):
            reset_peak_rss()  # generation is done: measure the training part only
            return real_compute_loss(*a, **kw)

        trainer.compute_loss = compute_loss
        trainer.train()
    return {"peak_growth_bytes": (max(peaks) - base) * 1024, "threads": torch.get_num_threads(),
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


def _ours_worker(mode: str, preset: str) -> dict:
    from bench.memory_probe import measure_step

    out = measure_step(preset, mode, tokens=GROUP * (PROMPT_TOKENS + COMPLETION), rows=PROMPTS, steps=2,
                       seqs=GROUP, lora_rank=LORA_RANK)
    return out


def _run(kind: str, variant: str, preset: str) -> dict:
    return run_worker("bench.memory", kind, {"variant": variant, "preset": preset}, env=ENV,
                      describe_error=lambda text: text[-800:])


def rows(quick: bool = False, verbose: bool = True, rounds: int = 2) -> list[dict]:
    """Per pair, ours and the peer alternate, `rounds` fresh processes each (no warm-up process: each worker runs
    two steps and keeps the max, and memory needs no warm cache)."""
    preset = "tiny" if quick else "small"
    device = (f"CPU x2 threads, fp32, {preset} text sizes, {PROMPTS}x{GROUP} sequences of {PROMPT_TOKENS}+{COMPLETION} "
              f"tokens, LoRA r={LORA_RANK}; peer = TRL GRPOTrainer on Qwen2ForCausalLM of the same sizes")
    out = []
    for mode, peer_variant, label in PAIRS:
        sides = {side: reported(partial(_run, kind, variant, preset), f"{variant:18s} {kind}", verbose)
                 for side, kind, variant in (("ours", "ours", mode), ("peer", "trl", peer_variant))}
        run = interleave(sides, rounds=rounds, warmup=0, failed=lambda r: "error" in r)
        ours, peer = run.results["ours"], run.results["peer"]
        fo, fp = first_failure(ours), first_failure(peer)
        if fo or fp:
            out.append(failed_row(f"RL step peak RSS growth, {label}", fo or {}, fp or {}, device, error_chars=200))
            continue
        out.append(bytes_row(f"RL step peak RSS growth, {label} (ours {mode} vs {peer_variant})",
                             [r["peak_growth_bytes"] for r in ours], [r["peak_growth_bytes"] for r in peer], device,
                             run, f"{rounds} alternating processes per side"))
    return out


def main(argv: list[str] | None = None) -> None:
    if serve_worker(argv, lambda kind, p: (_trl_worker if kind == "trl" else _ours_worker)(p["variant"], p["preset"])):
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a few minutes)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating processes per side (pairs per ratio)")
    args = ap.parse_args(argv)
    print(markdown_table(rows(args.quick, rounds=args.rounds)))


if __name__ == "__main__":
    main()
