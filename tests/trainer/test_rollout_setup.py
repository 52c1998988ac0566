"""The trainer's rollout stack from config (deepeyesv2.rollout_setup): what reaches the engine and the episode loop."""

from __future__ import annotations

from deepeyesv2.config import Config
from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2.rollout_setup import make_rollouts


def test_config_names_the_profiles_and_schedules_rollout_has():
    """config.py imports nothing of rollout's: its allowed names are copies, kept equal here."""
    from deepeyesv2.config import PROTOCOLS, ROLLOUT_SCHEDULES
    from deepeyesv2_rollout.episode import SCHEDULES
    from deepeyesv2_rollout.protocol import PROFILES

    assert PROTOCOLS == tuple(PROFILES) and ROLLOUT_SCHEDULES == SCHEDULES


def test_batching_settings_reach_the_embedded_engine():
    model, proc = build_model(ModelConfig())
    cfg = Config()
    cfg.rollout.max_running, cfg.rollout.max_seq_len, cfg.rollout.prefill_tokens_per_step = 3, 512, 64
    cfg.rollout.sandbox_workers = 0
    rollouts = make_rollouts(model, proc, cfg, progress=False)
    try:
        b = rollouts.engine.batching
        assert (b.max_running, b.max_seq_len, b.prefill_tokens_per_step) == (3, 512, 64)
    finally:
        rollouts.close()
