"""One whole GRPO training step, ours vs TRL's GRPOTrainer (and TRL + Liger), on the same Qwen2.5-VL (CPU or GPU).

    python -m bench.e2e_grpo [--quick] [--steps N] [--rounds N] [--only ours,trl,trl-liger]
                             [--model tiny|DIR] [--engine auto|embedded|sglang] [--trl-vllm auto|on|off]

The same script runs on a GPU machine: with CUDA, ours samples with SGLang (`--engine auto` picks it when
`sglang` is installed, else the embedded engine) and trains under bf16 autocast on fp32 weights; TRL runs on
the GPU with bf16 and samples with vLLM in colocate mode (`--trl-vllm auto`: when `vllm` is installed).
`--model DIR` benchmarks a local Qwen2.5-VL checkpoint instead of the tiny random one (on a GPU the tiny
model measures overheads, not kernels). The table's device column names the GPU or the CPU threads.

The same task for every variant: the tiny random-weight Qwen2.5-VL of `deepeyesv2.model.build_model()` (vision
tower frozen, fp32, SDPA), P counting prompts each with one 112x112 image and the DeepEyesV2 system prompt, G
samples per prompt at temperature 1, one policy turn of at most M new tokens (TRL cannot run our multi-turn tool
protocol, so tools are off for everyone: `rollout.max_turns = 1`), a reward that depends on the completion text,
DAPO token-mean clipped loss (0.2 / 0.28), no KL, AdamW, grad clip 1. One step = generation + rewards +
advantages + log-probs + loss + backward + optimizer step.
  ours       deepeyesv2: make_rollouts (embedded engine, radix prefix cache) -> rl.collect_groups ->
             rl.build_rows (packing) -> rl.update_policy (fused lm-head GRPO loss), the body of `train_rl`
  trl        trl.GRPOTrainer(use_cpu=True), HF generate, TRL's chunked fused lm-head log-probs
  trl-liger  the same with use_liger_kernel=True (TRL 1.16 then applies Liger's layer kernels, keeping its own
             log-prob head). With liger-kernel 0.8.5 + transformers 5.24 it fails at import for Qwen2.5-VL
             (LigerQwen2_5_VLCausalLMOutputWithPast is not defined): its row says n/a with that reason.
Each run of a variant is a fresh subprocess: one warm-up step, then the median of `steps` steps. The variants' runs
alternate (ours, trl, trl-liger, ours, ...) for `rounds` rounds (bench/_common.py `interleave`), and each ratio is
the median of the per-round ratios ours / peer with their min-max (a variant that fails is not run again).
Generated tokens/s = completion tokens / generation seconds; trained tokens/s = completion (loss) tokens / (step - generation)
seconds; step CPU time = process CPU seconds (all threads), the number to compare on a shared machine, where
wall time depends on other jobs; peak RSS growth = VmHWM over the steps minus the RSS after setup (model, trainer,
data built).
"""

from __future__ import annotations

from functools import partial
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

from bench._common import (first_failure, fmt_bytes, fmt_seconds, interleave, load_cell, paired_row, ratio_cell,
                           render_table, reported, rss_baseline_kib, rss_kib, run_worker, serve_worker, skip_unless_benchmarking)

VARIANTS = ("ours", "trl", "trl-liger")


@dataclass(frozen=True)
class Setup:
    prompts: int  # P prompts per step
    group: int  # G samples per prompt
    completion: int  # M: max new tokens of the single policy turn
    steps: int  # timed steps after one warm-up step
    image: int = 112  # px, square
    lr: float = 1e-6
    model: str = "tiny"  # a deepeyesv2 preset or a local Qwen2.5-VL directory
    engine: str = "embedded"  # ours: embedded | sglang
    vllm: bool = False  # TRL: sample with vLLM (colocate)
    fixed_length: bool = False  # every completion exactly `completion` tokens on both sides (no stop can be drawn)


def resolve_backends(engine: str = "auto", vllm: str = "auto", cuda: bool | None = None) -> dict:
    """{"cuda", "engine", "vllm"}: 'auto' picks SGLang / vLLM on a CUDA machine where they are installed, the
    embedded engine / HF generate otherwise. An explicit choice is kept (a worker that cannot honour it fails
    and its row says why)."""
    import importlib.util

    import torch

    if engine not in ("auto", "embedded", "sglang"):
        raise ValueError(f"--engine must be auto, embedded or sglang, got {engine!r}")
    if vllm not in ("auto", "on", "off"):
        raise ValueError(f"--trl-vllm must be auto, on or off, got {vllm!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    has = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
    if engine == "auto":
        engine = "sglang" if cuda and has("sglang") else "embedded"
    use_vllm = (cuda and has("vllm")) if vllm == "auto" else vllm == "on"
    return {"cuda": cuda, "engine": engine, "vllm": use_vllm}


def _sync() -> None:
    """Wait for queued GPU work, so that phase timings are real (a no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, bf16"
    return f"CPU x{torch.get_num_threads()} threads, fp32"


FULL = Setup(prompts=4, group=8, completion=64, steps=4)
QUICK = Setup(prompts=2, group=4, completion=32, steps=3)
# The `wide` preset (real Qwen2.5-VL's 151,936-row lm head): G=8 completions of a fixed length, so both sides do
# the same work; the length is what the real-width comparison asks for (256-1,024 tokens).
WIDE_FULL = Setup(prompts=1, group=8, completion=512, steps=2, model="wide", fixed_length=True)
WIDE_QUICK = Setup(prompts=1, group=8, completion=256, steps=1, model="wide", fixed_length=True)
MICRO = Setup(prompts=1, group=2, completion=8, steps=1)  # pytest-benchmark


def never_drawn(proc, vocab_rows: int) -> tuple[list[int], list[int]]:
    """(ids that would end or break a turn: eos, <|im_end|>, <|im_start|>, vision tokens; the lm head's padding
    rows past the tokenizer) -- for a fixed-length run, neither side may draw any of them."""
    from deepeyesv2_rollout.sampling import stop_token_sets

    eos, special = stop_token_sets(proc)
    return sorted(eos | set(special)), list(range(len(proc.tokenizer), vocab_rows))


def text_reward(text: str) -> float:
    """The shared reward: any deterministic function of the completion text with spread inside a group, so
    advantages are non-zero (a random-weight policy never answers correctly)."""
    return (len(text.strip()) % 5) / 4.0


def task_prompts(setup: Setup):
    """P Prompts: the demo's counting question over a generated image (same for every variant)."""
    from deepeyesv2.demo.task import count_prompts

    prompts = count_prompts(setup.prompts, seed=7, prefix="e2e")
    for p in prompts:
        p.images = [im.resize((setup.image, setup.image)) for im in p.images]
    return prompts


# ------------------------------------------------------------------------------------------------ ours
def _ours_trainer(setup: Setup):
    """(step function, model): one GRPO step with the pieces of deepeyesv2.rl.train_rl."""
    import torch

    from deepeyesv2.config import Config
    from deepeyesv2.data import ShuffledIterator
    from deepeyesv2.model import ModelConfig, build_model
    from deepeyesv2.optim import build_optimizer
    from deepeyesv2.parallel import SingleProcess
    from deepeyesv2.rewards import RewardResult
    from deepeyesv2.rl import build_rows, collect_groups, update_policy
    from deepeyesv2.rollout_setup import make_rollouts

    torch.manual_seed(0)
    cfg = Config()
    # model.device / train.autocast stay 'auto': the GPU when there is one, bf16 autocast on it
    cfg.model = ModelConfig(name_or_path=setup.model, freeze_vision=True)
    cfg.rollout.engine, cfg.rollout.sglang_mem_fraction = setup.engine, ENGINE_MEM_FRACTION
    cfg.train.out_dir = tempfile.mkdtemp(prefix="bench_e2e_ours_")  # SGLang's start directory for a preset
    cfg.rollout.max_turns = 1  # single turn: the task TRL can run too
    cfg.rollout.max_new_tokens = setup.completion
    cfg.rollout.temperature = 1.0
    cfg.rollout.max_total_tokens = 8192
    cfg.rollout.sandbox_workers = 0  # no tools are called; do not pre-start sandbox processes
    cfg.rl.prompts_per_step, cfg.rl.group_size = setup.prompts, setup.group
    cfg.rl.dynamic_sampling = False  # TRL keeps all-equal groups too
    cfg.rl.clip_low, cfg.rl.clip_high, cfg.rl.kl_coef = 0.2, 0.28, 0.0
    cfg.optim.lr, cfg.optim.min_lr_ratio, cfg.optim.grad_clip = setup.lr, 1.0, 1.0
    cfg.train.tokens_per_batch = 16384
    cfg.train.progress = False
    model, proc = build_model(cfg.model)
    prompts = task_prompts(setup)
    rollouts = make_rollouts(model, proc, cfg, progress=False)
    rollouts.required_tools = ()
    if setup.fixed_length:  # no stop string, no stop token can be drawn: every completion is `completion` long
        stops, _ = never_drawn(proc, model.lm_head.weight.shape[0])  # padding rows: never drawn by the engine
        rollouts.sampling = replace(rollouts.sampling, stop=[], banned_token_ids=tuple(stops))
    order = ShuffledIterator(len(prompts))
    opt, sched = build_optimizer(model, cfg.optim, 1 + setup.steps)
    par = SingleProcess(model)

    def reward_fn(inp):
        return RewardResult(text_reward(inp.response_text), {})

    def step(i: int) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        model.eval()
        rollouts.seed = 1000 + i
        groups, _ = collect_groups(rollouts, prompts, order, proc, reward_fn, cfg)
        _sync()
        t_gen = time.perf_counter() - t0
        rows, rewards, gids = build_rows(groups, cfg.train.tokens_per_batch, proc)
        rollouts.engine.clear_cache()
        rollouts.engine.release_memory()  # as train_rl: SGLang's pools go back while the update runs
        model.train()
        update_policy(par, opt, sched, rows, rewards, gids, cfg)
        rollouts.engine.resume_memory()
        rollouts.engine.update_weights(model)
        _sync()
        trajs = [t for g in groups for t in g.trajectories]
        return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "gen_seconds": t_gen,
                "generated_tokens": sum(sum(t.loss_mask) for t in trajs),
                "forward_tokens": sum(r.num_tokens for r in rows),
                "prompt_tokens": trajs[0].prompt_len}

    return step, rollouts.close


# ------------------------------------------------------------------------------------------------- TRL
def _image_only_processor(tokenizer, image_processor, chat_template: str):
    """Qwen2_5_VLProcessor without a video processor (it needs torchvision, which this install lacks)."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                        chat_template=chat_template)


def trl_config_kwargs(setup: Setup, liger: bool, cuda: bool, output_dir: str) -> dict:
    """GRPOConfig arguments for the same step as ours: DAPO loss, clip 0.2 / 0.28, no KL, constant LR, one
    optimizer step per P x G completions. GPU: bf16 mixed precision and, with setup.vllm, vLLM colocated."""
    import torch

    kwargs = dict(output_dir=output_dir, use_cpu=not cuda, bf16=cuda, report_to=[], disable_tqdm=True,
                  save_strategy="no", max_completion_length=setup.completion, num_generations=setup.group,
                  per_device_train_batch_size=setup.prompts * setup.group, gradient_accumulation_steps=1,
                  max_steps=1 + setup.steps, seed=0, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
                  temperature=1.0, top_p=1.0, learning_rate=setup.lr, lr_scheduler_type="constant",
                  max_grad_norm=1.0, weight_decay=0.0, logging_steps=1, use_liger_kernel=liger,
                  model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"})
    if setup.vllm:
        kwargs.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=ENGINE_MEM_FRACTION)
    return kwargs


def _trl_trainer(setup: Setup, liger: bool):
    import warnings

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from deepeyesv2.model import PRESETS, TINY_PROCESSOR_DIR, ModelConfig, build_model, load_processor
    from deepeyesv2_rollout.protocol import SYSTEM_PROMPT

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="bench_e2e_grpo_")
    cuda = torch.cuda.is_available()
    if setup.model in PRESETS:  # TRL (and vLLM) load from a directory: write the preset's random weights
        model, chat = build_model(ModelConfig(name_or_path=setup.model, device="cpu"))
        model.set_attn_implementation("sdpa")  # TRL batches padded rows (our varlen attention wants packed ones)
        model.save_pretrained(tmp)
        del model
        model_dir, template = tmp, (TINY_PROCESSOR_DIR / "chat_template.jinja").read_text()
    else:
        chat = load_processor(setup.model)
        model_dir, template = setup.model, chat.tokenizer.chat_template
    processor = _image_only_processor(chat.tokenizer, chat.image_processor, template)
    if setup.fixed_length:  # the same ids ours never draws, and the lm head's padding rows past the tokenizer
        from transformers import AutoConfig

        rows = AutoConfig.from_pretrained(model_dir).text_config.vocab_size
        stops, padding = never_drawn(chat, rows)
        generation_kwargs = {"suppress_tokens": [chat.image_pad_id, *stops, *padding]}
    else:
        generation_kwargs = None
    prompts = task_prompts(setup)
    columns = {
        "prompt": [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.question}]}]
                   for p in prompts],
        "image": [p.images[0] for p in prompts],
    }
    per_step = setup.prompts * setup.group
    times: list[dict] = []
    gen: dict = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            gen.clear()
            _sync()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            times.append({"seconds": time.perf_counter() - self.t0, "cpu_seconds": time.process_time() - self.c0, **gen})

    def reward(completions, **kwargs):
        return [text_reward(c[-1]["content"] if isinstance(c, list) else str(c)) for c in completions]

    args = GRPOConfig(**trl_config_kwargs(setup, liger, cuda, tmp), generation_kwargs=generation_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, processing_class=processor,
                              train_dataset=Dataset.from_dict({k: v * 64 for k, v in columns.items()}),
                              callbacks=[Timer()])
    trainer.model.model.visual.requires_grad_(False)  # as ours: vision frozen (the optimizer skips it)
    generate = trainer._generate_single_turn

    def timed_generate(prompt_ids, *a, **kw):
        # HF generate and vLLM colocate both come through here (TRL 1.16): prompt ids in, completion ids first out
        _sync()
        t0 = time.perf_counter()
        out = generate(prompt_ids, *a, **kw)
        _sync()
        completion_ids = out[0] if isinstance(out, tuple) else out
        gen.update(gen_seconds=time.perf_counter() - t0, generated_tokens=sum(len(c) for c in completion_ids),
                   prompt_tokens=len(prompt_ids[0]))
        return out

    trainer._generate_single_turn = timed_generate

    def run_all() -> list[dict]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        for t in times:  # the loss covers completion tokens; the forward runs over the padded prompt + completion
            t["forward_tokens"] = per_step * t["prompt_tokens"] + t["generated_tokens"]
        return times

    return run_all


# --------------------------------------------------------------------------------------------- workers
def _summary(steps: list[dict], base_kib: int) -> dict:
    import torch

    timed = steps[1:] or steps
    cuda = {}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        cuda = {"peak_cuda_bytes": torch.cuda.max_memory_allocated(), "device_used_bytes": total - free}
    med = {k: statistics.median(s[k] for s in timed) for k in timed[0]}
    train_s = statistics.median(s["seconds"] - s["gen_seconds"] for s in timed)
    return {**med, "train_seconds": train_s, "min_seconds": min(s["seconds"] for s in timed),
            "generated_tok_s": statistics.median(s["generated_tokens"] / s["gen_seconds"] for s in timed),
            "trained_tok_s": statistics.median(s["generated_tokens"] / (s["seconds"] - s["gen_seconds"]) for s in timed),
            "peak_rss_growth_bytes": (rss_kib("VmHWM") - base_kib) * 1024, "peak_rss_bytes": rss_kib("VmHWM") * 1024,
            "threads": torch.get_num_threads(), "steps_timed": len(timed), "device": device_name(), **cuda}


def _reset_cuda_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _worker(variant: str, setup: Setup) -> dict:
    if variant == "ours":
        step, close = _ours_trainer(setup)
        base = rss_baseline_kib()
        _reset_cuda_peak()
        try:
            steps = [step(i) for i in range(1 + setup.steps)]
        finally:
            close()
        return _summary(steps, base)
    if variant in ("trl", "trl-liger"):
        run_all = _trl_trainer(setup, liger=variant == "trl-liger")
        base = rss_baseline_kib()
        _reset_cuda_peak()
        return _summary(run_all(), base)
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")


def _run_worker_subprocess(variant: str, setup: Setup, timeout: float = 1800) -> dict:
    try:
        return run_worker("bench.e2e_grpo", variant, asdict(setup), timeout=timeout, describe_error=_last_error_line)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs[-1] if errs else (lines[-1] if lines else "no output"))[:300]


METRICS = (  # key, label, formatter, better
    ("seconds", "GRPO step time", fmt_seconds, "lower"),
    # CPU seconds of the process (all threads): far less sensitive than wall time to other jobs on a shared machine
    ("cpu_seconds", "GRPO step CPU time (all threads)", fmt_seconds, "lower"),
    ("generated_tok_s", "GRPO generated tokens/s", lambda x: f"{x:.0f}", "higher"),
    ("trained_tok_s", "GRPO trained tokens/s (update phase)", lambda x: f"{x:.0f}", "higher"),
    ("peak_rss_growth_bytes", "GRPO peak RSS growth", fmt_bytes, "lower"),
)
# On a GPU the memory that matters is the device's. SGLang runs in its own processes and vLLM in TRL's, so a
# per-process allocator peak would not compare like with like: the row is the device memory in use after a
# step, all processes (both engines reserve ENGINE_MEM_FRACTION of it for weights + KV cache).
GPU_METRICS = (*METRICS[:4], ("device_used_bytes", "GRPO GPU memory in use after a step (all processes)", fmt_bytes, "lower"))
ENGINE_MEM_FRACTION = 0.3


def rows(quick: bool = False, steps: int | None = None, variants: tuple[str, ...] = VARIANTS,
         verbose: bool = True, model: str = "tiny", engine: str = "auto", trl_vllm: str = "auto",
         rounds: int = 3) -> list[dict]:
    """Run the variants alternately, `rounds` subprocesses each; rows ours vs trl and ours vs trl-liger (ratio = the
    median of the per-round ratios ours / peer). No warm-up process: each process discards its own first step."""
    if model == "wide":
        setup = WIDE_QUICK if quick else WIDE_FULL
    else:
        setup = QUICK if quick else FULL
    if steps is not None:
        setup = replace(setup, steps=steps)
    backends = resolve_backends(engine, trl_vllm)
    setup = replace(setup, model=model, engine=backends["engine"], vllm=backends["vllm"])

    sides = {v: reported(partial(_run_worker_subprocess, v, setup), f"e2e_grpo {v:9s}", verbose) for v in variants}
    run = interleave(sides, rounds=rounds, warmup=0, failed=lambda r: "error" in r)
    res = run.results
    ours_runs = res.get("ours", [{"error": "not run"}])
    device = next((r["device"] for runs in res.values() for r in runs if "device" in r), "?")
    metrics = GPU_METRICS if backends["cuda"] else METRICS
    engines = (f"; ours samples with {'SGLang' if setup.engine == 'sglang' else 'the embedded engine'}, "
               f"TRL with {'vLLM (colocate)' if setup.vllm else 'HF generate'}")
    note = (f"{'tiny' if setup.model == 'tiny' else setup.model} Qwen2.5-VL, P={setup.prompts} prompts x G={setup.group}, "
            f"1 turn {'of exactly' if setup.fixed_length else '<='} {setup.completion} new tokens, 1 image {setup.image}px; {rounds} alternating processes per "
            f"variant, each the median of {setup.steps} steps after a warm-up{engines}")
    out = []
    for peer_name in [v for v in variants if v != "ours"]:
        peer_runs = res[peer_name]
        label = "TRL GRPOTrainer" if peer_name == "trl" else "TRL GRPOTrainer + Liger"
        f_ours, f_peer = first_failure(ours_runs), first_failure(peer_runs)
        if f_ours or f_peer:
            why = (f_peer or f_ours)["error"]
            if peer_name == "trl-liger" and f_peer and not _has_cuda():
                # Even where the patch imports, Liger's layer kernels (RMSNorm, SwiGLU, RoPE) are Triton GPU kernels.
                why += "; on CPU this peer cannot run anyway: Liger's layer kernels are Triton kernels that need a GPU"
            out.append(dict(benchmark=f"GRPO step (ours vs {label})", ours="failed" if f_ours else "ok",
                            peer="n/a" if f_peer else "ok", ratio=None, device=device,
                            note=f"{'ours' if f_ours else peer_name} failed: {why}", better="lower"))
            continue
        med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
        time_note = (f"; prompt tokens ours {med(ours_runs, 'prompt_tokens'):.0f} / TRL {med(peer_runs, 'prompt_tokens'):.0f}"
                     f"; fastest step ours {fmt_seconds(min(r['min_seconds'] for r in ours_runs))} / "
                     f"TRL {fmt_seconds(min(r['min_seconds'] for r in peer_runs))}")
        for key, name, fmt, better in metrics:
            out.append(paired_row(f"{name} (ours vs {label})", [r[key] for r in ours_runs], [r[key] for r in peer_runs],
                                  fmt, device, run, note + (time_note if key == "seconds" else ""), better))
    return out


# ------------------------------------------------------------------------------------ pytest-benchmark
def test_bench_e2e_grpo_step_ours(benchmark):
    """One of our GRPO steps on the MICRO setup (run with `pytest bench/ --benchmark-only`)."""
    skip_unless_benchmarking(benchmark)
    step, close = _ours_trainer(MICRO)
    counter = iter(range(10**6))
    try:
        out = benchmark.pedantic(lambda: step(next(counter)), rounds=2, warmup_rounds=1)
    finally:
        close()
    assert out["generated_tokens"] > 0


# ------------------------------------------------------------------------------------------------- CLI
def markdown_table(table_rows: list[dict]) -> str:
    """| benchmark | ours | peer | ours/peer (min-max) | better | load before->after | note |; a ratio of None
    shows as n/a, pairs that spread over NOISY_SPREAD as noisy."""
    return render_table(table_rows, [("benchmark", "benchmark"), ("ours", "ours"), ("peer", "peer"),
                                     ("ours/peer (min-max)", ratio_cell), ("better", "better"),
                                     ("load before->after", load_cell), ("note", "note")])


def main(argv: list[str] | None = None) -> None:
    if serve_worker(argv, lambda variant, setup: _worker(variant, Setup(**setup))):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process after its warm-up step")
    parser.add_argument("--rounds", type=int, default=3, help="alternating processes per variant (pairs per ratio)")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants (ours always runs)")
    parser.add_argument("--model", default="tiny", help="'tiny', 'wide' (151,936-row lm head, fixed-length G=8 "
                        "completions) or a local Qwen2.5-VL directory")
    parser.add_argument("--engine", default="auto", choices=("auto", "embedded", "sglang"),
                        help="our rollout engine (auto: SGLang on CUDA when installed)")
    parser.add_argument("--trl-vllm", default="auto", choices=("auto", "on", "off"),
                        help="TRL samples with vLLM colocate (auto: on CUDA when installed)")
    args = parser.parse_args(argv)
    variants = tuple(dict.fromkeys(["ours", *[v.strip() for v in args.only.split(",") if v.strip()]]))
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"--only: unknown variant(s) {bad}; choose from {VARIANTS}")
    print(markdown_table(rows(args.quick, args.steps, variants, model=args.model, engine=args.engine,
                              trl_vllm=args.trl_vllm, rounds=args.rounds)))


if __name__ == "__main__":
    main()
