"""One system prompt for every stage: SFT, RL and eval render records without a system turn under
rollout.system_prompt (or the protocol profile's); a checkpoint records the one it was trained under, RL and eval
from it adopt it; SFT warns when its records carry another."""

from __future__ import annotations

import json
import re
from pathlib import Path

from deepeyesv2.checkpoint import PROTOCOL_FILE, latest_checkpoint, read_protocol
from deepeyesv2.commands.eval import EvalSettings, build_rollouts, evaluate_checkpoint
from deepeyesv2.config import Config
from deepeyesv2.data import adopt_trained_protocol, stage_system_prompt
from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2.rl import train_rl
from deepeyesv2.rollout_setup import make_rollouts
from deepeyesv2.sft import train_sft
from deepeyesv2_rollout.protocol import DEEPEYESV2, OURS
from deepeyesv2_rollout.types import GenerateResult, Prompt

BOB = "You are Bob, who counts things."


def sharegpt(n: int, system: str | None) -> list[dict]:
    """ShareGPT records (DeepEyesV2's cold-start layout), with their own system prompt."""
    out = []
    for i in range(n):
        rec = {"conversations": [{"from": "human", "value": f"How many? {i}"},
                                 {"from": "gpt", "value": f"<think>count</think><answer>{i}</answer>"}]}
        if system is not None:
            rec["system"] = system
        out.append(rec)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_cfg(data: Path, out: Path, system_prompt: str = "") -> Config:
    cfg = Config()
    cfg.data.train_path = str(data)
    cfg.train.out_dir, cfg.train.steps, cfg.train.tokens_per_batch, cfg.train.progress = str(out), 1, 512, False
    cfg.rollout.system_prompt = system_prompt
    return cfg


def test_stage_system_prompt_is_the_field_else_the_profiles():
    cfg = Config()
    assert stage_system_prompt(cfg.rollout) == OURS.system_prompt
    cfg.rollout.protocol = "deepeyesv2"
    assert stage_system_prompt(cfg.rollout) == DEEPEYESV2.system_prompt
    cfg.rollout.system_prompt = BOB
    assert stage_system_prompt(cfg.rollout) == BOB


def test_adopting_a_checkpoints_prompt():
    cfg = Config()
    note = adopt_trained_protocol(cfg.rollout, {"protocol": "ours", "system_prompt": BOB}, "runs/sft")
    assert cfg.rollout.system_prompt == BOB and "trained under" in note
    assert adopt_trained_protocol(cfg.rollout, {"protocol": "ours", "system_prompt": BOB}, "runs/sft") is None
    cfg.rollout.system_prompt = "Another."  # set explicitly: kept, with a warning
    note = adopt_trained_protocol(cfg.rollout, {"protocol": "deepeyesv2", "system_prompt": BOB}, "runs/sft")
    assert cfg.rollout.system_prompt == "Another."
    assert "differs" in note and "--rollout.protocol deepeyesv2" in note
    assert adopt_trained_protocol(cfg.rollout, None, "tiny") is None


class CapturingEngine:
    """Answers at once and keeps every request's context."""

    def __init__(self, proc):
        self.proc, self.contexts = proc, []

    def generate(self, requests, sampling):
        return [self._one(r) for r in requests]

    async def agenerate(self, request, sampling):
        return self._one(request)

    def _one(self, r):
        self.contexts.append(self.proc.decode(r.token_ids))
        ids = self.proc.encode("<think>t</think><answer>1</answer>")
        return GenerateResult(ids, [-0.1] * len(ids), "stop", "</answer>")

    def stats(self):
        return {}

    def shutdown(self):
        pass


def test_rollouts_render_every_prompt_under_the_stage_prompt(tmp_path):
    model, proc = build_model(ModelConfig())
    cfg = Config()
    cfg.rollout.system_prompt, cfg.rollout.sandbox_workers = BOB, 0
    rollouts = make_rollouts(model, proc, cfg, progress=False)
    try:
        rollouts.engine = CapturingEngine(proc)
        own = Prompt(id="own", answer="1", messages=[{"role": "system", "content": "Per record."},
                                                      {"role": "user", "content": "How many?"}])
        rollouts.run([Prompt(id="a", question="How many?", answer="1"), own], 1)
    finally:
        rollouts.close()
    assert rollouts.engine.contexts[0].startswith(f"<|im_start|>system\n{BOB}<|im_end|>")
    assert rollouts.engine.contexts[1].startswith("<|im_start|>system\nPer record.<|im_end|>")  # a record's own wins


def test_sft_rl_eval_keep_a_sharegpt_sets_own_prompt(tmp_path, capsys):
    """A ShareGPT set with its own system prompt: SFT under it (set once, rollout.system_prompt), RL from the SFT
    run directory and eval from the RL run adopt it without being told."""
    data = write_jsonl(tmp_path / "cold_start.jsonl", sharegpt(3, BOB))
    # unset, the records' prompt differs from the one RL and eval would use: one warning line naming the fix
    train_sft(sft_cfg(data, tmp_path / "sft_unset"))
    err = capsys.readouterr().err
    assert re.search(r"deepeyesv2: warning: 3 of 3 SFT records carry a system prompt other than .*rollout\.system_prompt", err)
    train_sft(sft_cfg(data, tmp_path / "sft", system_prompt=BOB))  # set to the records' prompt: no warning
    assert "carry a system prompt" not in capsys.readouterr().err
    assert read_protocol(latest_checkpoint(tmp_path / "sft")) == {"protocol": "ours", "system_prompt": BOB}

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "question": "How many?", "answer": "1"}])
    cfg = Config()
    cfg.data.train_path, cfg.model.name_or_path = str(prompts), str(tmp_path / "sft")
    cfg.train.out_dir, cfg.train.steps, cfg.train.progress = str(tmp_path / "rl"), 1, False
    cfg.rollout.max_new_tokens, cfg.rollout.max_turns, cfg.rollout.sandbox_workers = 6, 1, 0
    cfg.rl.prompts_per_step, cfg.rl.group_size, cfg.rl.dynamic_sampling = 1, 2, False
    train_rl(cfg)  # rollout.system_prompt unset: taken from the SFT checkpoint, and said
    assert "system prompt: the one" in capsys.readouterr().err
    ckpt = latest_checkpoint(tmp_path / "rl")
    assert json.loads((ckpt / PROTOCOL_FILE).read_text()) == {"protocol": "ours", "system_prompt": BOB}

    s = EvalSettings(model=str(tmp_path / "rl"), data=str(prompts), out=str(tmp_path / "eval"), max_new_tokens=6,
                     max_turns=1, sandbox_workers=0, progress=False)
    result = evaluate_checkpoint(s)
    assert result["settings"]["system_prompt"] == BOB and result["settings"]["protocol"] == "ours"
    model, proc = build_model(ModelConfig())
    flagged = build_rollouts(model, proc, EvalSettings(system_prompt="Flag.", protocol="deepeyesv2"),
                             read_protocol(ckpt))
    try:  # flags win over the checkpoint
        assert flagged.system_prompt == "Flag." and flagged.profile is DEEPEYESV2
    finally:
        flagged.close()

