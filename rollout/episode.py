"""The episode: G samples per prompt, each a sequence of policy turns with tools between, and `run_episodes`.

    render prompt (chat.render_chat, generation prompt) --> for each turn:
      the policy generates one turn (one engine request)
      -> parse the action (protocol.parse_action)
      -> answer: done | code/tool: run on the tool pool (threads), one Session per episode | malformed: error text
      -> append  <|im_end|>\\n<|im_start|>user\\n{tool text}{image blocks}<|im_end|>\\n<|im_start|>assistant\\n{prefill}
         (loss mask 0; tool images get exactly the pad count the processor gives them)

The protocol profile (protocol.ProtocolProfile, `run_episodes(profile=...)`) owns the templates: how a code
result's stdout / stderr are laid out, what comes between a tool's text and its images, the text that opens the
next assistant turn (`think_prefill`, environment-written; `Trajectory.turn_texts` shows each turn as the policy
continued it, prefill first), how many returned images a round keeps and how they are resized, and which fenced
block of a <code> action runs. Its stop strings and banned tokens are sampling fields (`sampling_fields`).

Two schedules run those stages (`run_episodes(schedule=...)`), with the same stages and the same trajectories:
- "async" (rollout/agent_loop.py): every episode advances on its own -- its turn ends, its tool call goes to the
  tool pool, and its next turn is submitted as soon as the result is back. No barrier between episodes.
- "turn_sync": all live episodes generate one turn together (one batched `engine.generate`), then every tool
  call of that turn finishes before the next turn starts (the baseline; DeepEyesV2's released RL does this).
A turn's sampling seed derives from (sampling.seed, episode index, turn) only, so neither schedule's order of
requests or tool results changes what is sampled (batching changes fp32 round-off only).

The policy's tokens, including the stop tag it generated, get loss mask 1 and their sampling-time
log-probs; everything the environment writes gets 0. Limits end an episode with a recorded stop_reason.

Tool text is environment text: encoded as plain text (ChatProcessor.encode_plain), so what code prints can
never become a control token; returned images pass the profile's resize rule first. An exception while handling one
episode's turn, tool call or observation ends that episode only (stop_reason tool_error / env_error, the
one-line Trajectory.error, a RuntimeWarning); its state is rolled back to before the failing stage, so the
trajectory stays consistent (every pad block has its image) and the batch goes on. So does an engine error on
one request (async schedule: stage "generate", env_error) and a tool call that does not return within
`tool_timeout_s` (tool_error; its session is closed, the late result discarded).
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import wait
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .chat import render_chat

from .qwen import ChatProcessor
from .agent_loop import run_async
from .engine import Engine, stop_token_sets
from .protocol import OURS, Action, ProtocolProfile, invalid_action_feedback
from .radix_cache import image_hashes
from .tool_pool import ToolCall, ToolOutcome, ToolPool, close_quietly
from .types import GenerateRequest, GenerateResult, Prompt, SamplingParams, ToolCallRecord, Trajectory

PROTOCOL_TOOLS = ("code", "search", "image_search")
TRUNCATION_NOTE = "\n...[output truncated]"
MAX_ERROR_CHARS = 500  # Trajectory.error: an exception message can carry arbitrary tool output
# Which stop_reason a failing stage gives (see types.STOP_REASONS).
STAGE_STOP_REASONS = {"generate": "env_error", "turn": "env_error", "tool": "tool_error", "observation": "env_error"}
SCHEDULES = ("async", "turn_sync")


@dataclass
class EpisodeLimits:
    """max_turns: policy turns per episode; max_total_tokens: whole trajectory (prompt included);
    max_images: input + tool-returned images; max_tool_output_tokens: tool text beyond this is cut."""

    max_turns: int = 9
    max_total_tokens: int = 24576
    max_images: int = 32
    max_tool_output_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_total_tokens", "max_images", "max_tool_output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class RequestTag:
    """Attached to every engine request (engines pass it through; scripted policies key on it)."""

    prompt_id: str
    prompt_index: int
    sample_index: int
    turn: int


class _Episode:
    def __init__(self, prompt: Prompt, prompt_index: int, sample_index: int, group_id: int, rendered, processor: ChatProcessor):
        self.prompt, self.prompt_index, self.sample_index, self.group_id = prompt, prompt_index, sample_index, group_id
        self.ids: list[int] = list(rendered.token_ids)
        self.mask: list[int] = [0] * len(self.ids)
        self.logprobs: list[float] = [0.0] * len(self.ids)
        self.prompt_len = len(self.ids)
        self.images: list[Image.Image] = list(rendered.images)
        self.input_images = list(rendered.images)
        grids = rendered.image_grid_thw
        if self.images:
            sizes = [int(x) for x in grids.prod(-1)]
            self.pixels = list(rendered.pixel_values.split(sizes))
            self.grids = [g for g in grids]
            self.image_keys = image_hashes(rendered.pixel_values, grids)
        else:
            self.pixels, self.grids, self.image_keys = [], [], []
        self.turn_spans: list[tuple[int, int]] = []
        self.turn_texts: list[str] = []
        self.tool_calls: list[ToolCallRecord] = []
        self.stop_reason: str | None = None
        self.error: str | None = None
        self.error_reported = False
        self.answer: str | None = None
        self.session = None
        self.pending: Action | None = None
        self.prefill = ""  # the profile's think prefill the environment opened the current assistant turn with
        self.processor = processor

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def request(self, sampling: SamplingParams, limits: EpisodeLimits, index: int) -> GenerateRequest | None:
        room = limits.max_total_tokens - len(self.ids)
        if room < 1:
            self.stop_reason = "max_tokens"
            return None
        seed = None if sampling.seed is None else (sampling.seed * 1_000_003 + index * 1_009 + len(self.turn_spans)) % (1 << 63)
        return GenerateRequest(
            token_ids=list(self.ids),
            pixel_values=torch.cat(self.pixels) if self.pixels else None,
            image_grid_thw=torch.stack(self.grids) if self.grids else None,
            image_keys=list(self.image_keys),
            seed=seed,
            max_new_tokens=min(room, sampling.max_new_tokens),
            tag=RequestTag(self.prompt.id, self.prompt_index, self.sample_index, len(self.turn_spans)),
        )

    def extend(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        self.mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))

    def snapshot(self) -> tuple[int, ...]:
        """The lengths of everything a stage appends to (restore() truncates back to them)."""
        return (len(self.ids), len(self.mask), len(self.logprobs), len(self.images), len(self.pixels), len(self.grids),
                len(self.image_keys), len(self.turn_spans), len(self.turn_texts), len(self.tool_calls))

    def restore(self, snap: tuple[int, ...]) -> None:
        lists = (self.ids, self.mask, self.logprobs, self.images, self.pixels, self.grids, self.image_keys,
                 self.turn_spans, self.turn_texts, self.tool_calls)
        for lst, n in zip(lists, snap):
            del lst[n:]
        self.answer = None

    def trajectory(self) -> Trajectory:
        p = self.prompt
        return Trajectory(
            token_ids=self.ids, loss_mask=self.mask, sample_logprobs=self.logprobs, images=self.images,
            pixel_values=torch.cat(self.pixels) if self.pixels else None,
            image_grid_thw=torch.stack(self.grids) if self.grids else None,
            turn_spans=self.turn_spans, tool_calls=self.tool_calls, stop_reason=self.stop_reason or "unknown",
            group_id=self.group_id, prompt_len=self.prompt_len, num_turns=len(self.turn_spans), answer=self.answer,
            turn_texts=self.turn_texts, prompt_id=p.id, sample_index=self.sample_index,
            prompt=p, metadata=dict(p.metadata),
            error=self.error,
        )


def _default_session_factory(pool: Any) -> Callable[[list[Image.Image]], Any]:
    def make(images: list[Image.Image]):
        from .tools.sandbox import Session  # lazy: the sandbox is only needed once code runs

        return Session(images, pool=pool)

    return make


class EpisodeRunner:
    """State shared by one `run_episodes` call (processor, registry, limits, protocol profile, special token ids)."""

    def __init__(self, processor: ChatProcessor, registry: Any, limits: EpisodeLimits, session_factory: Callable,
                 profile: ProtocolProfile = OURS):
        self.p, self.registry, self.limits, self.session_factory = processor, registry, limits, session_factory
        self.profile = profile
        self.eos, self.special = stop_token_sets(processor)

    # -- faults ---------------------------------------------------------------------------------------
    def guarded(self, stage: str, fn: Callable, ep: _Episode, *args):
        """fn(ep, *args) on the loop's thread; an exception ends this episode only (state rolled back to before
        the stage)."""
        snap = ep.snapshot()
        try:
            return fn(ep, *args)
        except Exception as e:  # noqa: BLE001 -- one episode's fault must not cost the batch
            ep.restore(snap)
            self.fail(ep, stage, e)
            return None

    @staticmethod
    def fail(ep: _Episode, stage: str, e: BaseException) -> None:
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ is not None else None
        at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where is not None else ""
        msg = " ".join(f"{type(e).__name__}: {e}".split())  # one line
        if len(msg) > MAX_ERROR_CHARS:
            msg = msg[:MAX_ERROR_CHARS] + "..."
        ep.error = f"{stage}: {msg}{at}"
        ep.stop_reason = STAGE_STOP_REASONS[stage]
        ep.pending = None

    @staticmethod
    def report(episodes) -> None:
        """One warning line per newly failed episode, from the calling (main) thread."""
        for ep in episodes:
            if ep.error is not None and not ep.error_reported:
                ep.error_reported = True
                warnings.warn(f"episode {ep.prompt.id!r}#{ep.sample_index} ends with {ep.stop_reason}: {ep.error}",
                              RuntimeWarning, stacklevel=3)

    # -- the policy's turn ---------------------------------------------------------------------
    def add_turn(self, ep: _Episode, res: GenerateResult) -> None:
        """Append the policy's tokens (mask 1) and decide what happens next."""
        start = len(ep.ids)
        ep.ids.extend(res.token_ids)
        ep.mask.extend([1] * len(res.token_ids))
        ep.logprobs.extend(float(x) for x in res.logprobs)
        ep.turn_spans.append((start, len(ep.ids)))
        text = ep.prefill + self.p.decode(res.token_ids)  # the turn as the policy continued it
        ep.prefill = ""
        ep.turn_texts.append(text)
        if res.token_ids and res.token_ids[-1] in self.special:
            # a vision token or a new <|im_start|> inside the turn: the chat layout cannot be continued
            ep.stop_reason = "invalid_token"
            return
        if res.finish_reason == "length":
            ep.stop_reason = "max_tokens"
            return
        action = self.profile.parse(text)
        if action.kind == "answer":
            ep.answer = action.answer
            ep.stop_reason = "answer"
            if res.token_ids[-1] not in self.eos:
                ep.extend([self.p.im_end_id])
            return
        if action.kind == "invalid" and not action.has_action_tag and res.finish_reason == "eos":
            ep.stop_reason = "no_action"
            return
        if len(ep.turn_spans) >= self.limits.max_turns:
            ep.stop_reason = "max_turns"
            return
        ep.pending = action

    # -- the environment's turn ----------------------------------------------------------------------
    def call_tool(self, call: ToolCall) -> ToolOutcome:
        """Runs on a tool-pool thread: one tool call, with a new Session first (kept in `call.session`) when the
        episode has none. It touches no episode state (a call abandoned past its deadline may return after its
        episode ended); the loop applies the outcome (`apply_tool`)."""
        action = call.action
        if action.kind == "invalid":  # no call: the policy reads why its action was not understood
            return ToolOutcome(None, invalid_action_feedback(action))
        if call.session is None:
            try:
                call.session = self.session_factory(list(call.input_images))
            except Exception as e:  # noqa: BLE001 -- a sandbox that cannot start ends this episode only
                return ToolOutcome(ToolCallRecord(action.tool_name, action.tool_args, "error", 0.0, f"session: {e}"),
                                   error=e)
        try:
            result = self.registry.call(action.tool_name, action.tool_args, call.session)
            # A tool may hand back nothing, None entries or non-images: only real images become image blocks.
            images = [im.convert("RGB") for im in (result.images or []) if isinstance(im, Image.Image)]
        except Exception as e:  # noqa: BLE001 -- counted as a failed call; ends this episode only
            return ToolOutcome(ToolCallRecord(action.tool_name, action.tool_args, "error", 0.0,
                                              f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]), error=e)
        text = (self.profile.code_text(result.stdout, result.stderr) if result.stdout is not None
                else result.text or "")
        record = ToolCallRecord(action.tool_name, action.tool_args, result.status, result.latency_s, result.error,
                                output=text)
        return ToolOutcome(record, text, images)

    def apply_tool(self, ep: _Episode, call: ToolCall, out: ToolOutcome) -> None:
        """The loop's side of a finished call (both schedules): record it on the episode, then append the
        observation; a failed call ends the episode with tool_error instead."""
        ep.session = call.session
        if out.record is not None:
            ep.tool_calls.append(out.record)
        ep.pending = None
        if out.error is not None:
            self.fail(ep, "tool", out.error)
        elif not ep.done:
            self.guarded("observation", self.add_observation, ep, out.text, out.images)

    def tool_overdue(self, ep: _Episode, call: ToolCall, fut, tools: ToolPool, timeout_s: float) -> None:
        """A call that did not return within `timeout_s`: recorded as a timeout, the episode ends with
        tool_error, and the call is abandoned (its late outcome discarded, its new session closed)."""
        action = ep.pending
        msg = f"{action.tool_name} did not return within tool_timeout_s={timeout_s:g}"
        ep.tool_calls.append(ToolCallRecord(action.tool_name, action.tool_args, "timeout", float(timeout_s), msg))
        self.fail(ep, "tool", TimeoutError(msg))
        tools.abandon(ep, call, fut)

    def apply_result(self, ep: _Episode, res: GenerateResult) -> None:
        """The engine's answer to this episode's request: a malformed result is the engine's bug (raised, it ends
        the run); a well-formed one becomes the policy's turn."""
        if len(res.token_ids) != len(res.logprobs):
            raise ValueError(f"engine returned {len(res.token_ids)} tokens but {len(res.logprobs)} log-probs")
        self.guarded("turn", self.add_turn, ep, res)

    def add_observation(self, ep: _Episode, text: str, images: list[Image.Image]) -> None:
        """Append the user turn with the tool's text and images (mask 0). Nothing is appended until every
        piece (tokens, pixels, image keys) exists, so a failure leaves the episode as it was."""
        p, lim, prof = self.p, self.limits, self.profile
        images, notes = prof.fit_images(images)
        if len(ep.images) + len(images) > lim.max_images:
            ep.stop_reason = "max_images"
            return
        text_ids = p.encode_plain(text) if text else []
        cut = len(text_ids) > lim.max_tool_output_tokens
        if cut:
            text_ids = text_ids[: lim.max_tool_output_tokens] + p.encode_plain(TRUNCATION_NOTE)
        if notes:  # after the truncation: the policy always learns what happened to its images
            text_ids += p.encode_plain(("\n" if text_ids else "") + "\n".join(notes))
        if images and text_ids:
            if prof.intro_joined and not cut and not notes:
                # the released pipeline tokenizes the user turn as one string: "```" + "\n\nImages:\n" merge
                text_ids = p.encode_plain(text + prof.images_intro)
            else:
                text_ids += p.encode_plain(prof.images_intro)
        obs = [] if ep.ids[-1] == p.im_end_id else [p.im_end_id]
        obs += p.encode("\n") + p.turn_header("user") + text_ids
        vis = p.image_inputs(images) if images else None
        keys = image_hashes(vis.pixel_values, vis.grid_thw) if images else []
        for g in vis.grid_thw if images else []:
            obs += p.image_block(g)
        # the next assistant header and the profile's prefill as one string (as the released pipeline writes it)
        obs += p.turn_footer() + [p.im_start_id] + p.encode("assistant\n" + prof.think_prefill)
        if len(ep.ids) + len(obs) >= lim.max_total_tokens:
            ep.stop_reason = "max_tokens"
            return
        ep.extend(obs)
        if images:
            sizes = [int(x) for x in vis.grid_thw.prod(-1)]
            ep.images.extend(images)
            ep.pixels.extend(vis.pixel_values.split(sizes))
            ep.grids.extend(g for g in vis.grid_thw)
            ep.image_keys.extend(keys)
        ep.prefill = prof.think_prefill


def check_registry(registry: Any, required: tuple[str, ...]) -> None:
    """Fail loudly when a protocol tool is missing (a silently unregistered tool only shows up as the
    policy getting "unknown tool" errors)."""
    names = set(registry.names()) if hasattr(registry, "names") else None
    if names is None:
        return
    missing = [t for t in required if t not in names]
    if missing:
        raise ValueError(f"tool registry lacks {missing} (has {sorted(names)}); pass required_tools=() to allow it")


def run_episodes(
    engine: Engine,
    processor: ChatProcessor,
    registry: Any,
    prompts: list[Prompt],
    group_size: int,
    sampling: SamplingParams,
    limits: EpisodeLimits | None = None,
    pool: Any = None,
    progress: bool = True,
    *,
    session_factory: Callable[[list[Image.Image]], Any] | None = None,
    required_tools: tuple[str, ...] = PROTOCOL_TOOLS,
    group_id_offset: int = 0,
    seed_index_offset: int = 0,
    schedule: str = "async",
    max_tool_workers: int | None = None,
    tool_timeout_s: float | None = None,
    profile: ProtocolProfile = OURS,
) -> list[Trajectory]:
    """Roll out `group_size` episodes per prompt. Returns trajectories prompt-major (group g = prompts[g],
    group_id = group_id_offset + g), samples in order within a group.

    Episode i's sampling seed derives from (sampling.seed, seed_index_offset + i): a caller that splits one
    batch of prompts over several calls (data-parallel ranks) passes each slice's first episode index and
    samples exactly what one call over the whole batch would.

    schedule: "async" (per-episode loops, rollout/agent_loop.py; needs the engine's `agenerate`) or "turn_sync"
    (all live episodes one turn together through `engine.generate`). max_tool_workers: threads of the tool pool
    (None: one per episode, so tool calls never queue behind each other). tool_timeout_s: a tool call still
    running after this long ends its episode (tool_error); None waits for the tool's own limits. profile: the
    protocol layout (protocol.PROFILES); `sampling` must carry its stop strings and bans (checked)."""
    from tqdm.auto import tqdm

    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if max_tool_workers is not None and max_tool_workers < 1:
        raise ValueError(f"max_tool_workers must be >= 1 (or None: one per episode), got {max_tool_workers}")
    if tool_timeout_s is not None and not tool_timeout_s > 0:
        raise ValueError(f"tool_timeout_s must be > 0 (or None), got {tool_timeout_s}")
    limits = limits or EpisodeLimits()
    profile.check_sampling(sampling, processor)
    check_registry(registry, required_tools)
    if session_factory is None:
        session_factory = _default_session_factory(pool if pool is not None else getattr(registry, "pool", None))
    runner = EpisodeRunner(processor, registry, limits, session_factory, profile)
    episodes: list[_Episode] = []
    for pi, prompt in enumerate(prompts):
        rendered = render_chat(processor, prompt.chat_messages(), prompt.images, add_generation_prompt=True,
                               default_system=prompt.system, name=f"prompt {prompt.id!r}")
        for g in range(group_size):
            episodes.append(_Episode(prompt, pi, g, group_id_offset + pi, rendered, processor))
    if not episodes:
        return []
    tools = ToolPool(max_tool_workers or len(episodes))
    bar = tqdm(total=len(episodes), desc="episodes", disable=not progress, leave=False)
    seeds = [seed_index_offset + i for i in range(len(episodes))]
    try:
        if schedule == "async":
            run_async(engine, runner, episodes, seeds, sampling, tools, tool_timeout_s, bar)
        else:
            _run_turn_sync(engine, runner, episodes, seeds, sampling, tools, tool_timeout_s, bar)
    finally:
        bar.close()
        for ep in episodes:
            _close_session(ep)
        tools.close()
    return [ep.trajectory() for ep in episodes]


def _run_turn_sync(engine: Engine, runner: EpisodeRunner, episodes: list[_Episode], seeds: list[int],
                   sampling: SamplingParams, tools: ToolPool, tool_timeout_s: float | None, bar) -> None:
    """The turn-synchronous schedule: one batched generate over every live episode, then every tool call of the
    turn, then the next turn. An engine error fails the whole call (engine.generate raises it)."""
    limits = runner.limits
    while True:
        reqs = [(ep, ep.request(sampling, limits, seeds[i])) for i, ep in enumerate(episodes) if not ep.done]
        reqs = [(ep, r) for ep, r in reqs if r is not None]
        if not reqs:
            break
        results = engine.generate([r for _, r in reqs], sampling)
        if len(results) != len(reqs):
            raise RuntimeError(f"engine returned {len(results)} results for {len(reqs)} requests")
        for (ep, _), res in zip(reqs, results):
            runner.apply_result(ep, res)
        waiting = [ep for ep, _ in reqs if not ep.done]
        started = time.monotonic()
        calls = [ToolCall(ep.pending, ep.session, ep.input_images) for ep in waiting]
        futures = [tools.submit(runner.call_tool, call) for call in calls]
        for ep, call, fut in zip(waiting, calls, futures):
            left = None if tool_timeout_s is None else max(0.0, started + tool_timeout_s - time.monotonic())
            done, _ = wait([fut], timeout=left)
            if not done:
                runner.tool_overdue(ep, call, fut, tools, tool_timeout_s)
                continue
            runner.apply_tool(ep, call, fut.result())
        runner.report(ep for ep, _ in reqs)
        # A finished episode gives its sandbox back now, not at the end of the batch: a large
        # batch would otherwise hold one live worker process per tool-using episode.
        for ep, _ in reqs:
            if ep.done:
                _close_session(ep)
        bar.update(sum(ep.done for ep in episodes) - bar.n)


def _close_session(ep: _Episode) -> None:
    if ep.session is not None:
        close_quietly(ep.session)
        ep.session = None
