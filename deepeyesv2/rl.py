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

Simplifications: one process drives rollout and training (colocated); no value model (GRPO).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from deepeyesv2_kernels import fused_linear_grpo_loss, group_advantages
from deepeyesv2_rollout.types import Trajectory

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config
from .data import DataState, PromptRecord, ShuffledIterator, load_prompts
from .distributed import env_world_size
from .logprobs import packed_logprobs
from .metrics import MetricsLogger, peak_memory_bytes
from .lora import is_lora
from .memory import budgeted_logprobs, build_train_optimizer
from .model import build_model, packed_hidden, unwrap_model
from .optim import clip_and_step
from .packing import PackedBatch, Sample, pack_by_budget
from .rewards import RewardResult, get_reward_fn, overlong_penalty, reward_input_from_trajectory, score
from .reference import make_reference
from .rollouts import Rollouts, make_rollouts


@dataclass
class ScoredGroup:
    trajectories: list[Trajectory]
    rewards: list[RewardResult]


def score_trajectories(trajs: list[Trajectory], processor, reward_fn, cfg: Config) -> list[RewardResult]:
    out = []
    for t in trajs:
        res = score(reward_input_from_trajectory(t, processor), reward_fn)
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


def collect_groups(rollouts: Rollouts, prompts: list[PromptRecord], order: ShuffledIterator, processor, reward_fn, cfg: Config) -> tuple[list[ScoredGroup], dict]:
    """Roll out prompts_per_step prompts; with dynamic sampling, drop all-equal groups and refill."""
    groups: list[ScoredGroup] = []
    stats = {"groups_dropped": 0, "groups_sampled": 0}
    need = cfg.rl.prompts_per_step
    rounds = 0
    while len(groups) < need:
        batch = [prompts[i] for i in order.take(need - len(groups))]
        trajs = rollouts.run(batch, cfg.rl.group_size)
        by_group: dict[int, list[Trajectory]] = defaultdict(list)
        for t in trajs:
            by_group[t.group_id].append(t)
        for gid in sorted(by_group):
            ts = by_group[gid]
            rs = score_trajectories(ts, processor, reward_fn, cfg)
            stats["groups_sampled"] += 1
            equal = max(r.total for r in rs) - min(r.total for r in rs) < 1e-9
            if cfg.rl.dynamic_sampling and equal and rounds < cfg.rl.max_refill_rounds:
                stats["groups_dropped"] += 1
                continue
            groups.append(ScoredGroup(ts, rs))
        rounds += 1
        if not cfg.rl.dynamic_sampling:
            break
    return groups[: max(need, 1)], stats


def rollout_metrics(groups: list[ScoredGroup]) -> dict:
    trajs = [t for g in groups for t in g.trajectories]
    rewards = [r for g in groups for r in g.rewards]
    calls = [c for t in trajs for c in t.tool_calls]
    m = {
        "reward": float(np.mean([r.total for r in rewards])),
        "tool_call_rate": float(np.mean([len(t.tool_calls) > 0 for t in trajs])),
        "tool_calls_per_episode": len(calls) / max(1, len(trajs)),
        "tool_success_rate": float(np.mean([c.status == "ok" for c in calls])) if calls else 0.0,
        "response_length": float(np.mean([sum(t.loss_mask) for t in trajs])),
        "num_turns": float(np.mean([t.num_turns for t in trajs])),
        "answered_rate": float(np.mean([t.stop_reason == "answer" for t in trajs])),
    }
    keys = sorted({k for r in rewards for k in r.components})
    for k in keys:
        m[f"reward_{k}"] = float(np.mean([r.components.get(k, 0.0) for r in rewards]))
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


def policy_loss(model, row: PackedBatch, adv: torch.Tensor, cfg: Config, num_tokens: float, ref_model=None) -> tuple[torch.Tensor, dict]:
    """Fused lm-head + GRPO/DAPO loss on one packed row (no [T, V] logits)."""
    ref_lp = row.token_fields.get("ref_logprobs") if cfg.rl.kl_coef > 0 else None
    if ref_lp is None and ref_model is not None and cfg.rl.kl_coef > 0 and not hasattr(ref_model, "row_logprobs"):
        with torch.no_grad():
            ref_lp, _ = packed_logprobs(ref_model, row, temperature=cfg.rollout.temperature)
    hidden = packed_hidden(model, row)
    return fused_linear_grpo_loss(
        hidden.contiguous(), model.lm_head.weight, row.targets,
        row.token_fields["old_logprobs"], adv, row.loss_mask, row.cu_seqlens, ref_logprobs=ref_lp,
        temperature=cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0,
        clip_low=cfg.rl.clip_low, clip_high=cfg.rl.clip_high, dual_clip=cfg.rl.dual_clip, kl_coef=cfg.rl.kl_coef,
        kl_estimator=cfg.rl.kl_estimator, loss_agg=cfg.rl.loss_agg, entropy_coef=cfg.rl.entropy_coef,
        num_tokens=num_tokens if cfg.rl.loss_agg == "token-mean" else None,
    )


def update_policy(model, opt, sched, rows: list[PackedBatch], rewards, gids, cfg: Config, ref_model=None) -> dict:
    """ppo_epochs x mini_batches optimizer steps over the packed rows."""
    budget = cfg.train.logprob_tokens_budget
    if cfg.rl.recompute_old_logprobs:
        for row in rows:
            row.token_fields["old_logprobs"] = budgeted_logprobs(model, row, cfg.rollout.temperature or 1.0, budget)
    if cfg.rl.kl_coef > 0 and hasattr(ref_model, "row_logprobs"):
        # All reference log-probs up front: a CPU-parked reference visits the device once, before any
        # training activations exist; with LoRA it is the policy itself with adapters off.
        for row, lp in zip(rows, ref_model.row_logprobs(rows, cfg.rollout.temperature or 1.0, budget)):
            row.token_fields["ref_logprobs"] = lp
    advs = []
    for row in rows:
        _, tok_adv = group_advantages(rewards, gids, cu_seqlens=row.cu_seqlens, loss_mask=row.loss_mask,
                                      seq_ids=row.seq_ids, norm=cfg.rl.adv_norm)
        advs.append(tok_adv)
    n_mb = max(1, min(cfg.rl.mini_batches, len(rows)))
    acc: dict[str, list[float]] = defaultdict(list)
    for _epoch in range(cfg.rl.ppo_epochs):
        for mb in range(n_mb):
            idx = list(range(mb, len(rows), n_mb))
            n_tok = float(sum(int(rows[i].loss_mask.sum()) for i in idx))
            n_seq = sum(int(rows[i].seq_ids.numel()) for i in idx)
            if n_tok == 0:
                continue
            for i in idx:
                loss, metrics = policy_loss(model, rows[i], advs[i], cfg, n_tok, ref_model)
                # token-mean is already normalised by the mini-batch's token count; seq-mean modes are
                # per-row means, weighted here by the row's share of sequences.
                scale = 1.0 if cfg.rl.loss_agg == "token-mean" else rows[i].seq_ids.numel() / n_seq
                (loss * scale).backward()
                acc["loss"].append(float(loss.detach()) * scale)
                for k, v in metrics.items():
                    acc[k].append(float(v))
            acc["grad_norm"].append(clip_and_step(model, opt, sched, cfg.optim.grad_clip))
    out = {k: (float(np.sum(v)) if k == "loss" else float(np.mean(v))) for k, v in acc.items() if v}
    if "loss" in out:
        out["loss"] /= max(1, cfg.rl.ppo_epochs * n_mb)
    return out


def train_rl(cfg: Config, prompts: list[PromptRecord] | None = None, model=None, processor=None,
             rollouts: Rollouts | None = None, reward_fn=None, progress: bool | None = None) -> dict:
    if env_world_size() > 1:
        # Each rank would run the whole RL loop on its own and write the same out_dir: refuse, don't duplicate.
        raise ValueError(f"RL under torchrun (WORLD_SIZE={env_world_size()}) is not supported yet: FSDP2 covers SFT "
                         "only; run 'deepeyesv2 rl' as a single process")
    torch.manual_seed(cfg.train.seed)
    if model is None:
        model, processor = build_model(cfg.model)
    if prompts is None:
        if not cfg.data.train_path:
            raise ValueError("data.train_path is required for RL (a JSONL of prompts)")
        prompts = load_prompts(cfg.data.train_path, image_root=cfg.data.image_root or None, max_bad_lines=cfg.data.max_bad_lines)
    if not prompts:
        raise ValueError("no RL prompts")
    reward_fn = reward_fn or get_reward_fn(cfg.rl.reward)
    own_rollouts = rollouts is None
    if is_lora(model) and cfg.rollout.engine == "sglang":
        raise ValueError("model.lora_rank > 0 with rollout.engine='sglang' is not supported (SGLang would need "
                         "merged weights each step); use rollout.engine='embedded'")
    rollouts = rollouts or make_rollouts(unwrap_model(model), processor, cfg)
    ref_model = make_reference(model, cfg.rl.kl_coef, cfg.rl.ref_on_cpu)
    opt, sched = build_train_optimizer(model, cfg.optim, cfg.train.steps * cfg.rl.ppo_epochs * cfg.rl.mini_batches)
    out = Path(cfg.train.out_dir)
    logger = MetricsLogger(out)
    step, state = 0, DataState(epoch=0, position=0, seed=cfg.train.seed)
    ckpt = latest_checkpoint(out) if cfg.train.resume else None
    if ckpt is not None:
        step, state, _ = load_checkpoint(ckpt, model, opt, sched)
        rollouts.engine.update_weights(unwrap_model(model))
    logger.truncate_after(step)  # a fresh run (step 0) starts an empty metrics.jsonl
    order = ShuffledIterator(len(prompts), state)
    show = cfg.train.progress if progress is None else progress
    bar = tqdm(total=cfg.train.steps, initial=step, desc="rl", disable=not show, dynamic_ncols=True)
    last: dict = {}
    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            model.eval()
            # A step's sampling seeds are a function of (train.seed, step) only: a resumed run replays the
            # step exactly. The rollouts' per-call offset (refills) restarts each step; the base is spaced
            # far enough apart that no two steps share a seed.
            rollouts.start_step((cfg.train.seed * 100_003 + step) * 1_000_003)
            groups, ds = collect_groups(rollouts, prompts, order, processor, reward_fn, cfg)
            t_roll = time.perf_counter() - t0
            rows, rewards, gids = build_rows(groups, cfg.train.tokens_per_batch, processor)
            # The embedded engine's KV cache is dead weight during the update: free it (colocated memory).
            rollouts.engine.clear_cache()
            # SGLang: hand its KV pool (and weights) back to the allocator for the step, take them back after.
            if callable(release := getattr(rollouts.engine, "release_memory", None)):
                release()
            model.train()
            t1 = time.perf_counter()
            lr = sched.get_last_lr()[0]  # the rate this step's first update uses
            upd = update_policy(model, opt, sched, rows, rewards, gids, cfg, ref_model)
            t_train = time.perf_counter() - t1
            if callable(resume := getattr(rollouts.engine, "resume_memory", None)):
                resume()
            rollouts.engine.update_weights(unwrap_model(model))
            step += 1
            trained = sum(int(r.loss_mask.sum()) for r in rows)
            last = {"step": step, **rollout_metrics(groups), **upd, **ds, "lr": lr,
                    "rollout_s": t_roll, "train_s": t_train, "trained_tokens": trained,
                    "tokens_per_s": sum(r.num_tokens for r in rows) / max(t_train, 1e-9),
                    "generated_tokens_per_s": trained / max(t_roll, 1e-9),
                    "peak_memory_gb": peak_memory_bytes() / 2**30, **rollouts.engine_stats()}
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                logger.log(last)
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward']:.3f}", tools=f"{last['tool_call_rate']:.2f}")
            if step % cfg.train.save_every == 0 or step == cfg.train.steps:
                save_checkpoint(out, step, model, processor, opt, sched, order.state, {"stage": "rl"})
    finally:
        bar.close()
        logger.close()
        if own_rollouts:
            rollouts.close()
    return last
