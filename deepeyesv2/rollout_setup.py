"""The trainer's handle on rollout/: engine + tools + sandbox pool + sampling limits, built from config."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deepeyesv2_rollout.engine import EmbeddedEngine
from deepeyesv2_rollout.episode import EpisodeLimits, run_episodes
from deepeyesv2_rollout.protocol import OURS, ProtocolProfile, get_profile
from deepeyesv2_rollout.sglang_engine import SGLangEngine  # imports sglang itself only when started
from deepeyesv2_rollout.tools.registry import default_registry
from deepeyesv2_rollout.tools.sandbox import SandboxLimits, SandboxPool
from deepeyesv2_rollout.types import BatchingConfig, Prompt, SamplingParams, Trajectory

from .config import Config
from .data import stage_system_prompt
from .model import PRESETS, resolve_model_path
from .precision import autocast_dtype


@dataclass
class Rollouts:
    engine: Any
    processor: Any
    registry: Any
    pool: SandboxPool | None
    sampling: SamplingParams
    limits: EpisodeLimits
    progress: bool = True
    seed: int = 0
    required_tools: tuple[str, ...] = ("code", "search", "image_search")
    schedule: str = "async"  # run_episodes' schedule: async (per-episode loops) | turn_sync
    tool_workers: int | None = None  # tool-pool threads; None: one per episode
    tool_timeout_s: float | None = None  # a tool call past this ends its episode; None: the tools' own limits
    profile: ProtocolProfile = OURS  # the turn layout (rollout.protocol); `sampling` carries its stops and bans
    system_prompt: str = OURS.system_prompt  # every prompt's system turn unless its messages bring one
    _offset: int = field(default=0, repr=False)

    def run(self, prompts: list[Prompt], group_size: int, sampling: SamplingParams | None = None, *,
            slice_start: int = 0, round_size: int | None = None) -> list[Trajectory]:
        """G episodes per prompt. Group ids are unique across calls (refills never merge groups).

        A data-parallel rank runs only its slice of a round of `round_size` prompts, starting at `slice_start`:
        its seeds and group ids are those the prompts would get in one call over the whole round, so the ranks
        together sample what a single process would."""
        round_size = len(prompts) if round_size is None else round_size
        prompts = [replace(p, system=self.system_prompt) for p in prompts]  # one system prompt for every stage
        sp = sampling or self.sampling
        sp = SamplingParams(**{**sp.__dict__, "seed": self.seed + self._offset})
        trajs = []
        if prompts:
            trajs = run_episodes(self.engine, self.processor, self.registry, prompts, group_size,
                                 sp, self.limits, pool=self.pool, progress=self.progress,
                                 required_tools=self.required_tools, group_id_offset=self._offset + slice_start,
                                 seed_index_offset=slice_start * group_size, schedule=self.schedule,
                                 max_tool_workers=self.tool_workers, tool_timeout_s=self.tool_timeout_s,
                                 profile=self.profile)
        self._offset += round_size
        return trajs

    def start_step(self, seed: int) -> None:
        """Sampling seeds and group ids of a training step derive from `seed` alone, so a resumed run
        samples exactly what the uninterrupted one did."""
        self.seed, self._offset = seed, 0

    def engine_stats(self) -> dict:
        return {f"engine_{k}": v for k, v in self.engine.stats().items()}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.engine.shutdown()  # SGLang: its scheduler processes and GPU pools


def sglang_model_dir(model, processor, cfg: Config) -> str:
    """The checkpoint directory SGLang starts from: model.name_or_path's (a run directory stands for its newest
    verified checkpoint), or for a preset (random weights, no directory) the model and processor written to
    out_dir/sglang_init."""
    if cfg.model.name_or_path not in PRESETS:
        return resolve_model_path(cfg.model.name_or_path)
    path = Path(cfg.train.out_dir) / "sglang_init"
    model.save_pretrained(str(path), safe_serialization=True)
    processor.tokenizer.save_pretrained(str(path))
    processor.image_processor.save_pretrained(str(path))
    return str(path)


def make_engine(model, processor, cfg: Config):
    if cfg.rollout.engine == "embedded":
        p = next(model.parameters())
        batching = BatchingConfig(max_running=cfg.rollout.max_running, max_seq_len=cfg.rollout.max_seq_len,
                                  prefill_tokens_per_step=cfg.rollout.prefill_tokens_per_step)
        return EmbeddedEngine(model, processor, cache_tokens_budget=cfg.rollout.cache_tokens,
                              autocast_dtype=autocast_dtype(cfg.train.autocast, p.device, p.dtype), batching=batching)
    if cfg.rollout.engine == "sglang":
        if not 0.0 < cfg.rollout.sglang_mem_fraction < 1.0:
            raise ValueError(f"rollout.sglang_mem_fraction must be in (0, 1), got {cfg.rollout.sglang_mem_fraction}")
        engine = SGLangEngine(model_path=sglang_model_dir(model, processor, cfg), processor=processor,
                              mem_fraction_static=cfg.rollout.sglang_mem_fraction)
        engine.update_weights(model)  # the policy may already differ from the directory SGLang loaded
        return engine
    raise ValueError(f"rollout.engine must be 'embedded' or 'sglang', got {cfg.rollout.engine!r}")


def make_rollouts(model, processor, cfg: Config, progress: bool | None = None) -> Rollouts:
    profile = get_profile(cfg.rollout.protocol)
    pool = SandboxPool(size=cfg.rollout.sandbox_workers, limits=SandboxLimits(timeout_s=cfg.rollout.code_timeout_s))
    return Rollouts(
        engine=make_engine(model, processor, cfg),
        processor=processor,
        registry=default_registry(),
        pool=pool,
        sampling=SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens, **profile.sampling_fields(processor)),
        limits=EpisodeLimits(max_turns=cfg.rollout.max_turns, max_total_tokens=cfg.rollout.max_total_tokens,
                             max_images=cfg.rollout.max_images),
        progress=cfg.train.progress if progress is None else progress,
        seed=cfg.train.seed,
        schedule=cfg.rollout.schedule,
        tool_workers=cfg.rollout.tool_workers or None,
        tool_timeout_s=cfg.rollout.tool_timeout_s,
        profile=profile,
        system_prompt=stage_system_prompt(cfg.rollout),
    )
