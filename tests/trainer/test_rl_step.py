"""One RL step on the tiny model with a scripted policy whose rewards are known.

The policy's turns come from a script (teacher-forced through the real embedded engine, so the
sampling-time log-probs are the model's); rewards are exact match. Checked: dynamic sampling drops the
all-equal group and refills; the group advantages; tool output tokens are never trained; the first
mini-batch is on-policy (ratio 1, no clipping, approx_kl 0); and a gradient step moves the log-probs in
the advantage's direction.
"""

from __future__ import annotations

import math

import pytest
import torch

from deepeyesv2.config import Config
from deepeyesv2.data import ShuffledIterator
from deepeyesv2_rollout.types import Prompt
from deepeyesv2.demo.task import TOOL_TURN, count_image
from deepeyesv2.policy_logprobs import packed_logprobs
from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2.rewards import RewardResult
from deepeyesv2.parallel import SingleProcess
from deepeyesv2.rl import build_rows, collect_groups, policy_loss, rollout_metrics, update_policy
from deepeyesv2.rollout_setup import make_rollouts
from deepeyesv2_kernels import group_advantages
from deepeyesv2_rollout.engine import ScriptedEngine

GROUP = 4
# prompt id -> which samples answer correctly; "tool" samples run the counting code first.
PLAN = {
    "p0": {"correct": {0, 1}, "tool": {0}},      # rewards [1, 1, 0, 0]
    "p1": {"correct": {0, 1, 2, 3}, "tool": set()},  # all equal -> dropped by dynamic sampling
    "p2": {"correct": {3}, "tool": set()},          # rewards [0, 0, 0, 1]
}
EXPECTED_REWARDS = {"p0": [1.0, 1.0, 0.0, 0.0], "p2": [0.0, 0.0, 0.0, 1.0]}


def exact_match(inp) -> RewardResult:
    ok = float(inp.answer is not None and inp.answer.strip() == str(inp.gold))
    return RewardResult(ok, {"accuracy": ok})


def script(prompts: dict[str, Prompt]):
    def turn(tag) -> str:
        plan, gold = PLAN[tag.prompt_id], prompts[tag.prompt_id].answer
        answer = gold if tag.sample_index in plan["correct"] else str(int(gold) + 1)
        if tag.sample_index in plan["tool"] and tag.turn == 0:
            return TOOL_TURN
        return f"<think>counted</think><answer>{answer}</answer>"
    return turn


def config() -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name_or_path="tiny", seed=0)
    cfg.train.tokens_per_batch, cfg.train.progress = 4096, False
    cfg.rollout.max_turns, cfg.rollout.max_new_tokens, cfg.rollout.max_total_tokens = 3, 200, 1024
    cfg.rollout.sandbox_workers = 1
    cfg.rl.prompts_per_step, cfg.rl.group_size, cfg.rl.mini_batches = 2, GROUP, 1
    cfg.rl.dynamic_sampling, cfg.rl.max_refill_rounds = True, 2
    return cfg


@pytest.fixture(scope="module")
def step():
    """Roll out p0 and p1 (p1 is dropped), refill with p2; score and pack."""
    import random

    cfg = config()
    model, proc = build_model(cfg.model)
    rng = random.Random(0)
    prompts = {pid: Prompt(id=pid, question="How many red squares are in the image?", answer=str(n),
                                 images=[count_image(n, 2, rng)], category="perception", answer_type="numeric")
               for pid, n in (("p0", 3), ("p1", 5), ("p2", 7))}
    rollouts = make_rollouts(model, proc, cfg, progress=False)
    rollouts.engine = ScriptedEngine(rollouts.engine, proc, script(prompts))
    order = ShuffledIterator(3, shuffle=False)
    model.eval()
    try:
        groups, stats = collect_groups(rollouts, list(prompts.values()), order, proc, exact_match, cfg)
    finally:
        rollouts.close()
    rows, rewards, gids = build_rows(groups, cfg.train.tokens_per_batch, proc)
    return dict(cfg=cfg, model=model, proc=proc, groups=groups, stats=stats, rows=rows, rewards=rewards, gids=gids)


def test_dynamic_sampling_drops_all_equal_group_and_refills(step):
    groups, stats = step["groups"], step["stats"]
    assert [g.trajectories[0].prompt_id for g in groups] == ["p0", "p2"]
    assert stats == {"groups_dropped": 1, "groups_sampled": 3}
    for g in groups:
        pid = g.trajectories[0].prompt_id
        assert [r.total for r in g.rewards] == EXPECTED_REWARDS[pid], pid
        assert [t.sample_index for t in g.trajectories] == list(range(GROUP))


def test_advantages_are_group_normalised(step):
    seq_adv, _ = group_advantages(step["rewards"], step["gids"], norm="std")
    expected = []
    for pid in ("p0", "p2"):
        r = EXPECTED_REWARDS[pid]
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))  # unbiased, as GRPO
        expected += [(x - mean) / (std + 1e-6) for x in r]
    torch.testing.assert_close(seq_adv, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    # broadcast onto tokens: every trained token of a sequence carries its sequence's advantage, others 0
    row = step["rows"][0]
    _, tok_adv = group_advantages(step["rewards"], step["gids"], cu_seqlens=row.cu_seqlens, loss_mask=row.loss_mask,
                                  seq_ids=row.seq_ids, norm="std")
    assert torch.all(tok_adv[~row.loss_mask] == 0)
    for s, sid in enumerate(row.seq_ids.tolist()):
        a, b = row.cu_seqlens[s].item(), row.cu_seqlens[s + 1].item()
        m = row.loss_mask[a:b]
        assert torch.all(tok_adv[a:b][m] == seq_adv[sid])


def test_tool_output_is_never_trained(step):
    proc = step["proc"]
    tool_traj = step["groups"][0].trajectories[0]
    assert len(tool_traj.tool_calls) == 1 and tool_traj.tool_calls[0].status == "ok", tool_traj.tool_calls
    assert tool_traj.stop_reason == "answer" and tool_traj.answer == "3"  # the sandbox counted 3 squares
    ids, mask = tool_traj.token_ids, tool_traj.loss_mask
    (s0, e0), (s1, e1) = tool_traj.turn_spans
    assert all(mask[s0:e0]) and all(mask[s1:e1])
    assert not any(mask[e0:s1]) and not any(mask[: tool_traj.prompt_len])
    observation = proc.decode(ids[e0:s1])
    assert "Code execution result" in observation and "stdout:\n3" in observation
    trained_text = proc.decode([t for t, m in zip(ids, mask) if m])
    assert "Code execution result" not in trained_text
    # the packed rows carry the same mask: trained targets are exactly the policy's tokens
    n_policy = sum(sum(t.loss_mask) for g in step["groups"] for t in g.trajectories)
    assert sum(int(r.loss_mask.sum()) for r in step["rows"]) == n_policy


def test_first_mini_batch_is_on_policy(step):
    """Sampling-time log-probs (embedded engine, incremental decode) vs the training forward: ratio 1 up to
    float rounding; with old log-probs recomputed by the training forward it is 1 exactly."""
    cfg, model, rows = step["cfg"], step["model"], step["rows"]
    _, tok_adv = group_advantages(step["rewards"], step["gids"], cu_seqlens=rows[0].cu_seqlens,
                                  loss_mask=rows[0].loss_mask, seq_ids=rows[0].seq_ids, norm="std")
    n_tok = float(rows[0].loss_mask.sum())
    model.train()
    with torch.no_grad():
        _, m = policy_loss(model, rows[0], tok_adv, cfg, n_tok)
    assert float(m["clip_frac"]) == 0.0
    assert abs(float(m["ratio_mean"]) - 1.0) < 1e-5 and abs(float(m["approx_kl"])) < 1e-6
    # teacher-forced sampling log-probs agree with the training forward token by token
    lp, _ = packed_logprobs(model, rows[0])
    torch.testing.assert_close(lp.detach()[rows[0].loss_mask], rows[0].token_fields["old_logprobs"][rows[0].loss_mask],
                               atol=2e-5, rtol=0)

    row = type(rows[0])(**{**rows[0].__dict__, "token_fields": {"old_logprobs": lp.detach()}})
    with torch.no_grad():
        _, m = policy_loss(model, row, tok_adv, cfg, n_tok)
    assert float(m["ratio_mean"]) == pytest.approx(1.0, abs=1e-7)
    assert float(m["clip_frac"]) == 0.0 and abs(float(m["approx_kl"])) < 1e-7


def test_gradient_step_follows_the_advantage(step):
    import copy

    cfg, rows = step["cfg"], step["rows"]
    model = copy.deepcopy(step["model"])
    seq_adv, _ = group_advantages(step["rewards"], step["gids"], norm="std")

    def per_sequence_logp() -> torch.Tensor:
        out = torch.zeros(len(seq_adv))
        with torch.no_grad():
            for row in rows:
                lp, _ = packed_logprobs(model, row)
                for s, sid in enumerate(row.seq_ids.tolist()):
                    a, b = row.cu_seqlens[s].item(), row.cu_seqlens[s + 1].item()
                    out[sid] = lp[a:b].sum()
        return out

    before = per_sequence_logp()
    # plain SGD: the step is exactly along the negative loss gradient, so the advantage-weighted log-prob
    # objective must rise (to first order)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    model.train()
    metrics = update_policy(SingleProcess(model), opt, sched, rows, step["rewards"], step["gids"], cfg)
    delta = per_sequence_logp() - before

    assert {"loss", "clip_frac", "approx_kl", "ratio_mean", "entropy", "grad_norm"} <= metrics.keys()
    assert metrics["clip_frac"] == 0.0 and metrics["grad_norm"] > 0
    assert float((seq_adv * delta).sum()) > 0
    pos = seq_adv > 0
    assert torch.all(delta[pos] > 0), f"positively-advantaged log-probs fell: {delta[pos]}"
    # Trajectories of a group share most tokens ("<think>counted</think><answer>"), so a negatively-advantaged
    # one may still rise a little through them; what must hold is the ordering within each group.
    for g in step["gids"].unique():
        in_g = step["gids"] == g
        assert delta[in_g & pos].min() > delta[in_g & (seq_adv < 0)].max(), f"group {int(g)}: {delta[in_g]}"


def test_rollout_metrics_keys(step):
    m = rollout_metrics(step["groups"])
    assert m["reward"] == pytest.approx(3 / 8)
    assert m["tool_call_rate"] == pytest.approx(1 / 8) and m["tool_success_rate"] == 1.0
    assert m["answered_rate"] == 1.0 and m["reward_accuracy"] == pytest.approx(3 / 8)
    assert {"response_length", "num_turns", "tool_calls_per_episode"} <= m.keys()


def test_every_rank_needs_a_prompt(monkeypatch):
    """Under torchrun the step's prompts are split over the ranks: fewer prompts than ranks is a config error
    named before any rollout (a rank with nothing to train would still have to join every collective)."""
    import deepeyesv2.parallel as dist_mod

    monkeypatch.setattr(dist_mod, "world_size", lambda: 4)
    cfg = Config()
    cfg.rl.prompts_per_step = 3
    with pytest.raises(ValueError, match="prompts_per_step=3 is smaller than the world size 4"):
        collect_groups(None, [], ShuffledIterator(1), None, exact_match, cfg)
