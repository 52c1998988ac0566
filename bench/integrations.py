"""TRL GRPOTrainer steps with vs without our kernels (deepeyesv2_kernels.integrations.trl.apply), on CPU.

    python -m bench.integrations [--quick] [--steps N] [--rounds N]

A tiny Qwen2 (2 layers) with a large vocabulary -- the part the kernels act on -- and a word-level tokenizer of
the same size built with `tokenizers` (no download), trained by `trl.GRPOTrainer` (fp32, use_cpu, no vLLM,
beta=0.04 so the reference model's log-probs are computed too). Two variants, each run a fresh subprocess, the
runs alternating trl, ours, trl, ours ... for `rounds` rounds (bench/_common.py `interleave`; each ratio the median
of the per-round ratios, with their min-max):
  trl    TRL 1.x as shipped: its own chunked fused LM head (trl.kernels.ChunkedLogProbFunction)
  ours   the same trainer after `apply(trainer)`: log-probs and entropy by `fused_logprobs`
Step time: median wall time of the optimizer steps after the first (generation included: it is identical in both
variants, so the ratio understates the log-prob speed-up). Peak memory: peak RSS growth (VmHWM after resetting
the high-water mark once the trainer is built) over the whole run.

`rows(quick)` returns dicts (benchmark, ours, peer, ratio, device); `markdown_table(rows)` formats them.
"""

from __future__ import annotations

from functools import partial
import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

from bench._common import (bytes_row, failed_row, first_failure, interleave, reported, rss_baseline_kib, rss_kib,
                           run_worker, seconds_row, serve_worker)
from bench._common import ratio_table as markdown_table  # public: `deepeyesv2 bench` and the CLI print it

VARIANTS = ("trl", "ours")


@dataclass(frozen=True)
class Setup:
    vocab: int
    hidden: int
    completion: int
    generations: int
    prompts: int
    steps: int


FULL = Setup(vocab=151_936, hidden=256, completion=64, generations=4, prompts=8, steps=4)
QUICK = Setup(vocab=32_768, hidden=128, completion=32, generations=4, prompts=4, steps=3)


def _word_tokenizer(vocab: int):
    """A word-level fast tokenizer with exactly `vocab` ids (words w0..wN plus the chat specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    words = {tok: i for i, tok in enumerate(specials)}
    words.update({f"w{i}": i for i in range(len(specials), vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>")


def _worker(variant: str, setup: Setup) -> dict:
    """Runs in a fresh process: builds the model and trainer, trains `setup.steps` steps, reports time and RSS."""
    import warnings

    import torch
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    tokenizer = _word_tokenizer(setup.vocab)
    tmp = tempfile.mkdtemp(prefix="bench_integrations_")
    cfg = Qwen2Config(vocab_size=setup.vocab, hidden_size=setup.hidden, intermediate_size=2 * setup.hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp)
    prompts = [" ".join(f"w{10 + 7 * i + j}" for j in range(12)) for i in range(setup.prompts)]

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(output_dir=tmp, use_cpu=True, bf16=False, report_to=[], disable_tqdm=True, save_strategy="no",
                      max_completion_length=setup.completion, num_generations=setup.generations,
                      per_device_train_batch_size=setup.prompts * setup.generations // 2,
                      gradient_accumulation_steps=2, max_steps=setup.steps, seed=0, beta=0.04, optim="sgd",
                      learning_rate=1e-3, logging_steps=1, model_init_kwargs={"dtype": torch.float32})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=tmp, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                              args=args, train_dataset=Dataset.from_dict({"prompt": prompts * 4}),
                              processing_class=tokenizer, callbacks=[Timer()])
        if variant == "ours":
            from deepeyesv2_kernels.integrations.trl import apply

            apply(trainer)
        base = rss_baseline_kib()
        trainer.train()
    peak = rss_kib("VmHWM")
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"step_seconds": statistics.median(step_times[1:] or step_times), "peak_growth_bytes": (peak - base) * 1024,
            "losses": losses, "threads": torch.get_num_threads()}


def rows(quick: bool = False, steps: int | None = None, verbose: bool = True, rounds: int = 3) -> list[dict]:
    """Run both variants alternately, `rounds` subprocesses each, and return rows ours vs TRL. No warm-up process:
    each process discards its own first optimizer step."""
    setup = QUICK if quick else FULL
    if steps is not None:
        setup = replace(setup, steps=steps)

    sides = {v: reported(partial(run_worker, "bench.integrations", v, asdict(setup)), f"{v:5s}", verbose)
             for v in VARIANTS}
    run = interleave(sides, rounds=rounds, warmup=0, failed=lambda r: "error" in r)
    ours, peer = run.results["ours"], run.results["trl"]
    threads = next((r["threads"] for r in ours + peer if "threads" in r), "?")
    device = (f"CPU x{threads} threads, fp32, Qwen2 2L H={setup.hidden} V={setup.vocab}, "
              f"{setup.prompts}x{setup.generations} completions of <= {setup.completion} tokens")
    fo, fp = first_failure(ours), first_failure(peer)
    if fo or fp:
        return [failed_row("TRL GRPOTrainer step", fo or {}, fp or {}, device)]
    note = f"{rounds} alternating processes per variant, each the median of its steps after the first"
    return [
        seconds_row("TRL GRPOTrainer step time (ours vs trl)", [r["step_seconds"] for r in ours],
                    [r["step_seconds"] for r in peer], device, run, note),
        bytes_row("TRL GRPOTrainer peak RSS growth (ours vs trl)", [r["peak_growth_bytes"] for r in ours],
                  [r["peak_growth_bytes"] for r in peer], device, run, note),
    ]


def main(argv: list[str] | None = None) -> None:
    if serve_worker(argv, lambda variant, setup: _worker(variant, Setup(**setup))):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="V=32k, 3 steps per process (3 rounds x 2 processes: ~2 minutes on 2 busy cores)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="alternating processes per variant (pairs per ratio)")
    args = parser.parse_args(argv)
    print(markdown_table(rows(args.quick, args.steps, rounds=args.rounds)))


if __name__ == "__main__":
    main()
