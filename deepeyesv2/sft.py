"""Stage 1 -- cold-start SFT on tool-use trajectories.

Loss: mean negative log-likelihood of the assistant's tokens (tool outputs, user turns and image
tokens are masked), normalised by the number of trained tokens in the whole optimizer step so that
gradient accumulation over packed rows equals one big batch. Log-probs come from the fused kernel:
the [T, V] logits are never materialised.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import parallel
from .checkpoint import launch_rank0, prepare_run_dir, say
from .config import Config, to_dict, validate
from .data import (DataState, load_jsonl, sft_samples, stage_system_prompt, system_prompt_mismatch,
                   trained_protocol)
from .metrics import (MetricsLogger, UpdateCounter, check_reporters, console, no_update_cause, peak_memory_bytes,
                      quiet_hf_progress, step_line)
from .model import build_model
from .optim import build_optimizer, extend_schedule
from .packing import PackedBatch, Sample, pack_by_budget
from .policy_logprobs import packed_logprobs
from .precision import amp, set_matmul_precision


def epoch_rows(samples: list[Sample], budget: int, image_token_id: int, seed: int, epoch: int) -> list[PackedBatch]:
    """The epoch's packed rows: a seeded shuffle, then first-fit-decreasing into `budget`-token rows."""
    order = list(range(len(samples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    rows = pack_by_budget([samples[i] for i in order], budget, image_token_id)
    random.Random(seed * 7_919 + epoch).shuffle(rows)  # FFD sorts by length; don't train longest-first
    return rows


def sft_step(par: parallel.Parallel, rows: list[PackedBatch], autocast=nullcontext) -> tuple[float, int]:
    """Forward+backward over the rows of one optimizer step. Returns (mean NLL, trained tokens).

    `rows` is the whole step's rows on every rank; each rank runs its share (`par.local_rows`), and the loss is
    divided by the step's global token count (counted from the full `rows`, identical on every rank, so no
    all-reduce is needed) -- with summed gradients that equals the single-process step.
    `autocast`: a factory of the forward's precision context (deepeyesv2.precision.amp)."""
    n_tok = sum(int(r.loss_mask.sum()) for r in rows)
    if n_tok == 0:
        raise ValueError("an SFT step with no trained tokens: every assistant turn is masked or empty")
    mine = par.local_rows(rows)
    total = 0.0
    for i, row in enumerate(mine):
        par.set_sync(i == len(mine) - 1)  # FSDP2: reduce-scatter once per step, after the last row
        with autocast():
            logp, _ = par.call(packed_logprobs, row)
        loss = -logp.sum() / n_tok
        loss.backward()
        total += float(loss.detach())
    return parallel.all_sum(total), n_tok


STEP_KEYS = ("loss", "grad_norm", "lr", "trained_tokens", "tokens_per_s", "peak_memory_gb")  # what a step line (progress off) shows


@quiet_hf_progress()  # transformers' loading / shard-writing bars would tangle with the step bar
def train_sft(cfg: Config, samples: list[Sample] | None = None, model=None, processor=None, progress: bool | None = None) -> dict:
    validate(cfg)  # every field's range, before anything is built
    check_reporters(cfg.train.report_to)  # a requested logger that is not installed fails now, not at step 1
    # refuses a finished run's directory without resume/overwrite; picks the newest checkpoint that verifies
    resume_from = prepare_run_dir(cfg.train.out_dir, cfg.train.resume, cfg.train.overwrite)
    torch.manual_seed(cfg.train.seed)
    if model is None:
        model, processor = build_model(cfg.model)
    if samples is None:
        if not cfg.data.train_path:
            raise ValueError("data.train_path is required for SFT (a JSONL of trajectories)")
        path = Path(cfg.data.train_path)
        records = load_jsonl(path, max_bad_lines=cfg.data.max_bad_lines)
        system = stage_system_prompt(cfg.rollout)
        if (note := system_prompt_mismatch(records, system, source=path.name)) is not None and launch_rank0():
            say(f"warning: {note}")
        samples = sft_samples(records, processor, base_dir=cfg.data.image_root or path.parent, source=path.name,
                              max_image_pixels=cfg.data.max_image_pixels, system=system)
    image_token_id = model.config.image_token_id
    par = parallel.setup(model)  # FSDP2 under torchrun with > 1 ranks, else the single-process object
    rows_per_step = cfg.train.rows_per_step * cfg.optim.grad_accum
    rows0 = epoch_rows(samples, cfg.train.tokens_per_batch, image_token_id, cfg.train.seed, 0)
    steps_per_epoch = max(1, len(rows0) // rows_per_step)
    total_steps = min(cfg.train.steps, steps_per_epoch * cfg.train.epochs)
    opt, sched = build_optimizer(model, cfg.optim, total_steps, par.world_size)
    autocast = amp(cfg.train.autocast, model)
    set_matmul_precision(cfg.train.tf32, next(model.parameters()).device)
    out = Path(cfg.train.out_dir)
    logger = MetricsLogger(out, cfg.train.report_to, run_config=to_dict(cfg))
    step, state, extra = 0, DataState(epoch=0, position=0, seed=cfg.train.seed), {}
    if (ckpt := resume_from) is not None:
        step, state, extra = par.load_checkpoint(ckpt, opt, sched)
        if (note := extend_schedule(sched, total_steps)) and par.is_main:
            say(note)
    if par.is_main:
        logger.truncate_after(step)  # a fresh run (step 0) starts an empty metrics.jsonl
    rows = rows0 if state.epoch == 0 else epoch_rows(samples, cfg.train.tokens_per_batch, image_token_id, cfg.train.seed, state.epoch)
    model.train()
    show = cfg.train.progress if progress is None else progress
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not show or not par.is_main, dynamic_ncols=True)
    last: dict = {}
    updates = UpdateCounter(extra.get("steps_without_update", 0))
    t_run, first_step = time.perf_counter(), step
    while step < total_steps:
        if state.position + rows_per_step > len(rows):
            state = DataState(epoch=state.epoch + 1, position=0, seed=state.seed)
            rows = epoch_rows(samples, cfg.train.tokens_per_batch, image_token_id, cfg.train.seed, state.epoch)
        batch = rows[state.position : state.position + rows_per_step]
        t0 = time.perf_counter()
        loss, n_tok = sft_step(par, batch, autocast)
        lr = sched.get_last_lr()[0]  # the rate this step uses (the scheduler advances inside the step)
        grad_norm = par.clip_and_step(opt, sched, cfg.optim.grad_clip)
        dt = time.perf_counter() - t0
        step += 1
        state = DataState(epoch=state.epoch, position=state.position + rows_per_step, seed=state.seed)
        last = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "trained_tokens": n_tok, "tokens": sum(r.num_tokens for r in batch),
            "tokens_per_s": sum(r.num_tokens for r in batch) / dt, "epoch": state.epoch,
            "peak_memory_gb": peak_memory_bytes() / 2**30,
        }
        cause = no_update_cause(last)
        if (warning := updates.observe(cause)) and par.is_main:
            console(warning, bar)
        last["steps_without_update"] = updates.steps_without_update
        if (step % cfg.train.log_every == 0 or step == total_steps) and par.is_main:
            logger.log(last)
            if bar.disable:
                console(step_line("sft", last, total_steps, STEP_KEYS, cause))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % cfg.train.save_every == 0 or step == total_steps:
            saved = par.save_checkpoint(out, step, processor, opt, sched, state,
                                        {"stage": "sft", "steps_without_update": updates.steps_without_update},
                                        protocol=trained_protocol(cfg.rollout))
            if par.is_main:
                console(f"deepeyesv2: saved checkpoint to {saved}", bar)
    bar.close()
    logger.close()
    if par.is_main:
        final = f"final loss {last['loss']:.4g}, " if last else ""
        console(f"sft done: step {step}/{total_steps} ({step - first_step} this run, "
                f"{time.perf_counter() - t_run:.1f} s), {final}{updates.summary()}; metrics in {logger.path}")
    return last
