"""Stage 2 -- GRPO with DAPO options on multi-turn tool rollouts.

One step, top to bottom (`rl_step`):
  rollouts (G samples per prompt, tools in between)  -> trajectories
  rewards (+ DAPO overlong penalty)                   -> r [N]
  DAPO dynamic sampling: drop groups whose rewards are all equal, refill from further prompts
  pack trajectories (first-fit-decreasing)            -> packed rows
  group advantages, broadcast onto tokens (kernel)    -> A [T]
  fused lm-head log-prob + clipped GRPO loss (kernel) -> loss, clip fraction, KL, entropy
  backward, clip, AdamW step, engine.update_weights
Old log-probs are the policy's sampling-time log-probs (the first mini-batch is exactly on-policy,
ratio = 1); `recompute_old_logprobs` recomputes them with the training forward instead. The
reference policy for the optional KL term is the base model with LoRA adapters off, else a frozen copy of
the initial weights (in host memory with rl.ref_on_cpu); see deepeyesv2.reference.

Rollout and training are colocated; no value model (GRPO). Under torchrun (FSDP2) every rank rolls out its
share of the step's prompts on the weights all-gathered for the rollouts and trains its shards on its own
episodes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from deepeyesv2_kernels import fused_linear_grpo_loss, group_advantages
from deepeyesv2_rollout.types import Prompt, Trajectory, logprob_temperature

from . import parallel
from .checkpoint import launch_rank0, prepare_run_dir, read_protocol, say
from .config import Config, to_dict, validate
from .data import DataState, ShuffledIterator, adopt_trained_protocol, load_prompts, trained_protocol
from .lora import is_lora
from .metrics import (MetricsLogger, UpdateCounter, check_reporters, console, no_update_cause, peak_memory_bytes,
                      quiet_hf_progress, step_line)
from .model import PRESETS, build_model, packed_hidden, resolve_model_path, unwrap_model
from .optim import build_optimizer, extend_schedule
from .packing import PackedBatch, Sample, pack_by_budget
from .parallel import all_gather_ints, all_sum, all_weighted_mean
from .policy_logprobs import budgeted_logprobs
from .precision import amp, set_matmul_precision
from .judge import make_judge
from .rewards import RewardResult, build_reward_fn, overlong_penalty, reward_input_from_trajectory, score_batch
from .reference import make_reference
from .rollout_setup import Rollouts, make_rollouts
from .scoring import append_jsonl, completion_records, truncate_jsonl_after


@dataclass
class ScoredGroup:
    trajectories: list[Trajectory]
    rewards: list[RewardResult]

    def rewards_equal(self) -> bool:
        """All the group's rewards are equal: every advantage is 0, the group teaches nothing."""
        return max(r.total for r in self.rewards) - min(r.total for r in self.rewards) < 1e-9


def score_trajectories(trajs: list[Trajectory], processor, reward_fn, cfg: Config) -> list[RewardResult]:
    """Rewards of a batch, scored together (with a judge: from judge.concurrency threads, so that the batch's
    judge requests are in flight at once), plus the DAPO overlong penalty."""
    workers = cfg.judge.concurrency if cfg.judge.url else 1
    out = []
    for t, res in zip(trajs, score_batch([reward_input_from_trajectory(t, processor) for t in trajs], reward_fn, workers)):
        if cfg.rl.overlong_buffer > 0:
            resp_len = int(sum(t.loss_mask))
            pen = overlong_penalty(resp_len, cfg.rollout.max_total_tokens, cfg.rl.overlong_buffer, cfg.rl.overlong_penalty)
            res = RewardResult(res.total + pen, {**res.components, "overlong": pen})
        out.append(res)
    return out


def trajectory_sample(t: Trajectory, name: str, vision_ids: set[int]) -> Sample:
    """A trajectory as a training sample. A vision token the policy itself sampled (the episode then
    stopped with `invalid_token`) has no image behind it, so the sample ends just before it; the
    episode's reward already carries the penalty."""
    end = len(t.token_ids)
    for i, (tok, m) in enumerate(zip(t.token_ids, t.loss_mask)):
        if m and tok in vision_ids:
            end = i
            break
    return Sample(
        input_ids=torch.tensor(t.token_ids[:end], dtype=torch.long),
        loss_mask=torch.tensor(t.loss_mask[:end], dtype=torch.long),
        pixel_values=t.pixel_values,
        image_grid_thw=t.image_grid_thw,
        name=name,
        token_fields={"old_logprobs": torch.tensor(t.sample_logprobs[:end], dtype=torch.float32)},
    )


def collect_groups(rollouts: Rollouts, prompts: list[Prompt], order: ShuffledIterator, processor, reward_fn, cfg: Config) -> tuple[list[ScoredGroup], dict]:
    """Roll out prompts_per_step prompts; with dynamic sampling, drop all-equal groups and refill.

    Under torchrun each rank fills its own quota (prompts_per_step split over the ranks). A round takes the
    ranks' summed shortfall from the shared prompt order (identical on every rank) and gives each rank its
    slice, so the order advances as in one process and, with nothing dropped, the ranks together roll out
    exactly the prompts, seeds and group ids a single process would. Returns this rank's groups and the
    global drop counts."""
    W, me = parallel.world_size(), parallel.rank()
    if cfg.rl.prompts_per_step < W:
        raise ValueError(f"rl.prompts_per_step={cfg.rl.prompts_per_step} is smaller than the world size {W}: "
                         "every rank needs at least one prompt per step")
    need = cfg.rl.prompts_per_step // W + (me < cfg.rl.prompts_per_step % W)
    groups: list[ScoredGroup] = []
    dropped = sampled = rounds = 0
    while True:
        short = all_gather_ints(need - len(groups))
        if sum(short) == 0:
            break
        batch = [prompts[i] for i in order.take(sum(short))]
        start = sum(short[:me])
        trajs = rollouts.run(batch[start : start + short[me]], cfg.rl.group_size, slice_start=start, round_size=len(batch))
        by_group: dict[int, list[tuple[Trajectory, RewardResult]]] = defaultdict(list)
        for t, r in zip(trajs, score_trajectories(trajs, processor, reward_fn, cfg)):  # the round's rewards together
            by_group[t.group_id].append((t, r))
        for gid in sorted(by_group):
            ts, rs = [t for t, _ in by_group[gid]], [r for _, r in by_group[gid]]
            sampled += 1
            equal = max(r.total for r in rs) - min(r.total for r in rs) < 1e-9
            if cfg.rl.dynamic_sampling and equal and rounds < cfg.rl.max_refill_rounds:
                dropped += 1
                continue
            groups.append(ScoredGroup(ts, rs))
        rounds += 1
        if not cfg.rl.dynamic_sampling:
            break
    return groups, {"groups_dropped": int(all_sum(dropped)), "groups_sampled": int(all_sum(sampled))}


def episode_summaries(groups: list[ScoredGroup]) -> list[dict]:
    """What the step's metrics need of each episode: small plain values (ranks exchange these, not trajectories)."""
    return [{"reward": r.total, "components": dict(r.components), "tool_calls": len(t.tool_calls),
             "tool_ok": sum(c.status == "ok" for c in t.tool_calls), "response_length": int(sum(t.loss_mask)),
             "num_turns": t.num_turns, "answered": t.stop_reason == "answer",
             # our side failed (a tool crashed, or decoding / encoding / image processing raised), not the policy
             "failed": t.stop_reason in ("tool_error", "env_error")}
            for g in groups for t, r in zip(g.trajectories, g.rewards)]


def rollout_metrics(groups: list[ScoredGroup], episodes: list[dict] | None = None) -> dict:
    """Mean reward (total and per component), tool-call and success rates, lengths. `episodes`: the
    episode_summaries of every rank's groups (default: those of `groups`)."""
    eps = episode_summaries(groups) if episodes is None else episodes
    calls = sum(e["tool_calls"] for e in eps)
    m = {
        "reward": float(np.mean([e["reward"] for e in eps])),
        "tool_call_rate": float(np.mean([e["tool_calls"] > 0 for e in eps])),
        "tool_calls_per_episode": calls / max(1, len(eps)),
        "tool_success_rate": sum(e["tool_ok"] for e in eps) / calls if calls else 0.0,
        "response_length": float(np.mean([e["response_length"] for e in eps])),
        "num_turns": float(np.mean([e["num_turns"] for e in eps])),
        "answered_rate": float(np.mean([e["answered"] for e in eps])),
        "episode_error_rate": float(np.mean([e["failed"] for e in eps])),
    }
    keys = sorted({k for e in eps for k in e["components"]})
    for k in keys:
        m[f"reward_{k}"] = float(np.mean([e["components"].get(k, 0.0) for e in eps]))
    return m


def build_rows(groups: list[ScoredGroup], budget: int, processor) -> tuple[list[PackedBatch], torch.Tensor, torch.Tensor]:
    """Packed rows + per-trajectory rewards [N] and group ids [N] (seq_ids index these)."""
    vision_ids = {processor.image_pad_id, processor.vision_start_id, processor.vision_end_id,
                  processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")}
    samples, rewards, gids = [], [], []
    for gi, g in enumerate(groups):
        for t, r in zip(g.trajectories, g.rewards):
            samples.append(trajectory_sample(t, f"{t.prompt_id}#{t.sample_index}", vision_ids))
            rewards.append(r.total)
            gids.append(gi)
    rows = pack_by_budget(samples, budget, processor.image_pad_id)
    return rows, torch.tensor(rewards, dtype=torch.float32), torch.tensor(gids, dtype=torch.long)


def policy_loss(model, row: PackedBatch, adv: torch.Tensor, cfg: Config, num_tokens: float) -> tuple[torch.Tensor, dict]:
    """Fused lm-head + GRPO/DAPO loss on one packed row (no [T, V] logits). With a KL term, the row carries its
    reference log-probs in token_fields["ref_logprobs"] (update_policy computes them up front)."""
    device = model.lm_head.weight.device
    row, adv = row.to(device), adv.to(device)  # rows and advantages are built on the host; no-ops on CPU
    ref_lp = row.token_fields["ref_logprobs"] if cfg.rl.kl_coef > 0 else None
    hidden = packed_hidden(model, row)
    return fused_linear_grpo_loss(
        hidden.contiguous(), model.lm_head.weight, row.targets,
        row.token_fields["old_logprobs"], adv, row.loss_mask, row.cu_seqlens, ref_logprobs=ref_lp,
        temperature=logprob_temperature(cfg.rollout.temperature),
        clip_low=cfg.rl.clip_low, clip_high=cfg.rl.clip_high, dual_clip=cfg.rl.dual_clip, kl_coef=cfg.rl.kl_coef,
        kl_estimator=cfg.rl.kl_estimator, loss_agg=cfg.rl.loss_agg, entropy_coef=cfg.rl.entropy_coef,
        num_tokens=num_tokens if cfg.rl.loss_agg == "token-mean" else None,
    )


def update_policy(par: parallel.Parallel, opt, sched, rows: list[PackedBatch], rewards, gids, cfg: Config,
                  ref_model=None) -> dict:
    """ppo_epochs x mini_batches optimizer steps over the packed rows.

    `rows` are this rank's rows; every mini-batch's loss is normalised by the global token count and gradients
    are summed over ranks, so the update equals one process training on all ranks' rows. Under FSDP2 a rank
    with fewer rows in a mini-batch runs zero-weighted passes over one of its rows, because every rank must run
    as many forwards/backwards (they are collectives). The no-grad recompute of the old log-probs runs inside
    `par.full_weights()` (each rank over its own rows). `ref_model`: deepeyesv2.reference.make_reference's."""
    budget = cfg.train.logprob_tokens_budget
    autocast = amp(cfg.train.autocast, par.policy)
    if cfg.rl.recompute_old_logprobs:
        with par.full_weights() as policy, autocast():
            for row in rows:
                row.token_fields["old_logprobs"] = budgeted_logprobs(policy, row, logprob_temperature(cfg.rollout.temperature), budget)
    if cfg.rl.kl_coef > 0:
        if ref_model is None:
            raise ValueError("rl.kl_coef > 0 needs a reference policy (deepeyesv2.reference.make_reference)")
        # All reference log-probs up front: a CPU-parked reference visits the device once, before any
        # training activations exist; with LoRA it is the policy itself with adapters off.
        with autocast():
            ref_lps = ref_model.row_logprobs(rows, logprob_temperature(cfg.rollout.temperature), budget)
        for row, lp in zip(rows, ref_lps):
            row.token_fields["ref_logprobs"] = lp.float()
    advs = []
    for row in rows:
        _, tok_adv = group_advantages(rewards, gids, cu_seqlens=row.cu_seqlens, loss_mask=row.loss_mask,
                                      seq_ids=row.seq_ids, norm=cfg.rl.adv_norm)
        advs.append(tok_adv)
    n_mb = min(all_gather_ints(max(1, min(cfg.rl.mini_batches, len(rows)))))
    # metrics as (weighted sum, weight): the kernel's per-row means are weighted by the row's trained tokens,
    # so the logged mean does not depend on how episodes were packed into rows or spread over ranks
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    loss_sum = 0.0
    for _epoch in range(cfg.rl.ppo_epochs):
        for mb in range(n_mb):
            idx = list(range(mb, len(rows), n_mb))
            n_tok = all_sum(sum(int(rows[i].loss_mask.sum()) for i in idx))
            n_seq = all_sum(sum(int(rows[i].seq_ids.numel()) for i in idx))
            if n_tok == 0:
                continue
            passes = max(all_gather_ints(len(idx)))
            for j in range(passes):
                i = idx[min(j, len(idx) - 1)]
                par.set_sync(j == passes - 1)  # FSDP2: reduce-scatter once per mini-batch, after its last pass
                with autocast():
                    loss, metrics = par.call(policy_loss, rows[i], advs[i], cfg, n_tok)
                # token-mean is already normalised by the mini-batch's token count; seq-mean modes are
                # per-row means, weighted here by the row's share of sequences.
                scale = 1.0 if cfg.rl.loss_agg == "token-mean" else rows[i].seq_ids.numel() / n_seq
                if j >= len(idx):
                    scale = 0.0  # a padding pass (see the docstring)
                (loss * scale).backward()
                if j < len(idx):
                    loss_sum += float(loss.detach()) * scale
                    n_row = float(rows[i].loss_mask.sum())
                    for k, v in metrics.items():
                        acc[k][0] += float(v) * n_row
                        acc[k][1] += n_row
            norm = par.clip_and_step(opt, sched, cfg.optim.grad_clip)
            acc["grad_norm"][0] += norm
            acc["grad_norm"][1] += 1
    out = all_weighted_mean(acc)
    if "grad_norm" in out:
        out["loss"] = all_sum(loss_sum) / max(1, cfg.rl.ppo_epochs * n_mb)
    return out


# what a step line (progress off) shows
STEP_KEYS = ("reward", "loss", "grad_norm", "lr", "groups_sampled", "groups_dropped", "zero_advantage_groups",
             "tool_call_rate", "response_length", "rollout_s", "train_s")


@quiet_hf_progress()  # transformers' loading / shard-writing bars would tangle with the step bar
def train_rl(cfg: Config, prompts: list[Prompt] | None = None, model=None, processor=None,
             rollouts: Rollouts | None = None, reward_fn=None, progress: bool | None = None) -> dict:
    """The RL loop. Under torchrun with > 1 ranks the policy is sharded with FSDP2 (deepeyesv2.parallel.setup):
    each step all-gathers the full weights once for the rollouts (the engine samples from the gathered policy
    itself, or SGLang is pushed the gathered tensors) and reshards them for the update; each rank rolls out its
    share of the step's prompts and trains on its own episodes."""
    validate(cfg)  # every field's range, before anything is built
    check_reporters(cfg.train.report_to)  # a requested logger that is not installed fails now, not at step 1
    # refuses a finished run's directory without resume/overwrite; picks the newest checkpoint that verifies
    resume_from = prepare_run_dir(cfg.train.out_dir, cfg.train.resume, cfg.train.overwrite)
    judge = make_judge(cfg.judge) if reward_fn is None else None  # a caller's reward_fn brings its own judge
    reward_fn = reward_fn or build_reward_fn(cfg.rl.reward, judge, cfg.judge.free_form)
    if prompts is None:  # before the model: a bad record or image fails at once, naming file:line
        if not cfg.data.train_path:
            raise ValueError("data.train_path is required for RL (a JSONL of prompts)")
        prompts = load_prompts(cfg.data.train_path, image_root=cfg.data.image_root or None,
                               max_bad_lines=cfg.data.max_bad_lines, max_image_pixels=cfg.data.max_image_pixels)
    if not prompts:
        raise ValueError("no RL prompts")
    torch.manual_seed(cfg.train.seed)
    # Resolved once: a run directory's newest checkpoint is verified (every file hashed) here, not again in build_model.
    source = resolve_model_path(cfg.model.name_or_path)
    if model is None:
        model, processor = build_model(replace(cfg.model, name_or_path=source))
    if source not in PRESETS:  # a checkpoint of ours says which prompt it was trained under
        trained = read_protocol(source)
        if (note := adopt_trained_protocol(cfg.rollout, trained, cfg.model.name_or_path)) and launch_rank0():
            say(note)
    if is_lora(model) and cfg.rollout.engine == "sglang":
        raise ValueError("model.lora_rank > 0 with rollout.engine='sglang' is not supported (SGLang would need "
                         "merged weights each step); use rollout.engine='embedded'")
    # The KL reference (a frozen copy unless LoRA) is taken before sharding: a plain module on every rank.
    ref_model = make_reference(model, cfg.rl.kl_coef, cfg.rl.ref_on_cpu)
    par = parallel.setup(model)  # FSDP2 under torchrun with > 1 ranks, else the single-process object
    set_matmul_precision(cfg.train.tf32, next(model.parameters()).device)
    rollout_model = unwrap_model(model)
    main = par.is_main
    show = (cfg.train.progress if progress is None else progress) and main
    own_rollouts = rollouts is None
    with par.full_weights():  # SGLang starts from the full weights
        rollouts = rollouts or make_rollouts(rollout_model, processor, cfg, progress=show)
    updates_per_step = cfg.rl.ppo_epochs * cfg.rl.mini_batches  # the schedule counts optimizer steps
    opt, sched = build_optimizer(model, cfg.optim, cfg.train.steps * updates_per_step, par.world_size)
    out = Path(cfg.train.out_dir)
    logger = MetricsLogger(out, cfg.train.report_to, run_config=to_dict(cfg))
    step, state, extra = 0, DataState(epoch=0, position=0, seed=cfg.train.seed), {}
    if (ckpt := resume_from) is not None:
        step, state, extra = par.load_checkpoint(ckpt, opt, sched)
        if (note := extend_schedule(sched, cfg.train.steps * updates_per_step)) and main:
            say(note)
    if main:
        logger.truncate_after(step)  # a fresh run (step 0) starts an empty metrics.jsonl
        truncate_jsonl_after(out / "completions.jsonl", step)
    order = ShuffledIterator(len(prompts), state)
    bar = tqdm(total=cfg.train.steps, initial=step, desc="rl", disable=not show, dynamic_ncols=True)
    last: dict = {}
    updates = UpdateCounter(extra.get("steps_without_update", 0))
    t_run, first_step = time.perf_counter(), step
    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            model.eval()
            # A step's sampling seeds are a function of (train.seed, step) only: a resumed run replays the
            # step exactly. The rollouts' per-call offset (refills) restarts each step; the base is spaced
            # far enough apart that no two steps share a seed.
            rollouts.start_step((cfg.train.seed * 100_003 + step) * 1_000_003)
            with par.full_weights():
                # the weights this step samples from (embedded: re-point, drop K/V of older weights; SGLang: push)
                rollouts.engine.update_weights(rollout_model)
                groups, ds = collect_groups(rollouts, prompts, order, processor, reward_fn, cfg)
            t_roll = time.perf_counter() - t0
            rows, rewards, gids = build_rows(groups, cfg.train.tokens_per_batch, processor)
            # The embedded engine's KV cache is dead weight during the update: free it (colocated memory).
            rollouts.engine.clear_cache()
            # SGLang: hand its KV pool (and weights) back to the allocator for the step, take them back after.
            rollouts.engine.release_memory()
            model.train()
            t1 = time.perf_counter()
            lr = sched.get_last_lr()[0]  # the rate this step's first update uses
            upd = update_policy(par, opt, sched, rows, rewards, gids, cfg, ref_model)
            t_train = time.perf_counter() - t1
            rollouts.engine.resume_memory()
            step += 1
            trained = int(all_sum(sum(int(r.loss_mask.sum()) for r in rows)))
            episodes = [e for part in parallel.all_gather_objects(episode_summaries(groups)) for e in part]
            engine = {k: all_sum(v) for k, v in rollouts.engine_stats().items()}  # summed over ranks
            last = {"step": step, **rollout_metrics(groups, episodes), **upd, **ds, "lr": lr,
                    "rollout_s": t_roll, "train_s": t_train, "trained_tokens": trained,
                    "tokens_per_s": all_sum(sum(r.num_tokens for r in rows)) / max(t_train, 1e-9),
                    "generated_tokens_per_s": trained / max(t_roll, 1e-9),
                    "peak_memory_gb": peak_memory_bytes() / 2**30, **engine}
            # groups kept with all-equal rewards (dynamic sampling keeps them after its last refill round)
            last["zero_advantage_groups"] = int(all_sum(sum(g.rewards_equal() for g in groups)))
            cause = no_update_cause(last, all_groups_equal=last["zero_advantage_groups"] == all_sum(len(groups)))
            if (warning := updates.observe(cause)) and main:
                console(warning, bar)
            last["steps_without_update"] = updates.steps_without_update
            if judge is not None:  # summed over ranks; every rank scores its own episodes
                last.update({k: int(all_sum(v)) for k, v in judge.take_stats().items()})
            if cfg.rl.log_completions and main:  # this rank's episodes (under torchrun: rank 0's share)
                append_jsonl(out / "completions.jsonl", completion_records(
                    step, [t for g in groups for t in g.trajectories], [r for g in groups for r in g.rewards],
                    processor, cfg.rl.log_completions, cfg.train.seed))
            if (step % cfg.train.log_every == 0 or step == cfg.train.steps) and main:
                logger.log(last)
                if bar.disable:
                    console(step_line("rl", last, cfg.train.steps, STEP_KEYS, cause))
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward']:.3f}", tools=f"{last['tool_call_rate']:.2f}")
            if step % cfg.train.save_every == 0 or step == cfg.train.steps:
                saved = par.save_checkpoint(out, step, processor, opt, sched, order.state,
                                            {"stage": "rl", "steps_without_update": updates.steps_without_update},
                                            protocol=trained_protocol(cfg.rollout))
                if main:
                    console(f"deepeyesv2: saved checkpoint to {saved}", bar)
        if last:
            with par.full_weights():  # leave the engine on the final weights (a caller may keep sampling)
                rollouts.engine.update_weights(rollout_model)
        if main:
            bar.close()  # the summary goes below the finished bar
            final = f"final reward {last['reward']:.4g}, " if last else ""
            console(f"rl done: step {step}/{cfg.train.steps} ({step - first_step} this run, "
                    f"{time.perf_counter() - t_run:.1f} s), {final}{updates.summary()}; metrics in {logger.path}")
    finally:
        bar.close()
        logger.close()
        if own_rollouts:
            rollouts.close()
    return last
