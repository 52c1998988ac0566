"""The async schedule (per-episode loops) against the turn-synchronous one (issue 15, items 2 and 4, faults).

- Determinism: the same prompts through turn_sync and async -- with tools whose latencies reverse the order in
  which they return -- give identical token ids, masks, stop reasons and images, and log-probs within fp32
  tolerance; with forced tokens and with seeded sampling (turns that sample mixed with forced tool calls).
- No barrier: an episode whose tool is slow does not hold back the others' next turns.
- Faults on a real engine and the real sandbox: an engine error on one request, a tool that hangs past
  tool_timeout_s, a sandbox that cannot start, a sandbox process that dies mid-call: the faulty episode ends with
  its stop reason and error (or, for the dead process, the policy reads the error), every other episode answers,
  and afterwards no KV slot, request, session, sandbox process or tool thread is left.
"""

from __future__ import annotations

import hashlib
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2_rollout.engine import EmbeddedEngine, ScriptedEngine
from deepeyesv2_rollout.episode import EpisodeLimits, run_episodes
from deepeyesv2_rollout.tools.base import ToolRegistry, ToolResult
from deepeyesv2_rollout.types import DEFAULT_STOP, BatchingConfig, Prompt, SamplingParams


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_model(ModelConfig())
    model.eval()
    return model, processor


def _image(seed: int, size=(56, 42)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


PROMPTS = [Prompt(id=f"p{i}", question=f"Question {i}: what is shown?", images=[_image(i)] if i != 1 else [],
                  answer="x") for i in range(3)]


def code_turn(tag) -> str:
    return f"<think>look {tag.sample_index}</think><code>\n```python\nprint({tag.turn}, '{tag.prompt_id}')\n```\n</code>"


def search_turn(tag) -> str:
    return (f'<think>find</think><tool_call>{{"name": "search", "arguments": {{"query": "q{tag.prompt_id}'
            f'{tag.sample_index}"}}}}</tool_call>')


def scripted(tag) -> str:
    """1-4 turns per episode, code and search calls, then the answer."""
    turns = 1 + (zlib.crc32(f"{tag.prompt_id}/{tag.sample_index}".encode()) % 4)
    if tag.turn + 1 >= turns:
        return f"<think>done</think><answer>{tag.sample_index}</answer>"
    return code_turn(tag) if (tag.turn + tag.sample_index) % 2 == 0 else search_turn(tag)


class Mixed:
    """Forces the scripted turn on some (sample, turn)s and lets the model sample the others: sampled turns end
    on a stop string and go back to the policy as malformed-action feedback, so episodes run several turns
    with sampled tokens in the middle."""

    def __init__(self, engine, proc):
        self.engine, self.proc = engine, proc

    def _request(self, r):
        if (r.tag.turn + r.tag.sample_index) % 3 == 1:
            return r
        import dataclasses

        return dataclasses.replace(r, forced_tokens=self.proc.encode(scripted(r.tag)))

    def generate(self, requests, sampling):
        return self.engine.generate([self._request(r) for r in requests], sampling)

    async def agenerate(self, request, sampling):
        return await self.engine.agenerate(self._request(request), sampling)


class SleepTool:
    """Answers after a latency that depends on (args, order): order=+1 and order=-1 reverse which calls of a
    turn come back first. The text and the image depend on the args only."""

    def __init__(self, name: str, order: int, scale: float = 0.002):
        self.name, self.order, self.scale = name, order, scale

    def call(self, args, session):
        h = int(hashlib.sha1(repr(sorted(args.items())).encode()).hexdigest(), 16)
        time.sleep(self.scale * ((h % 17) if self.order > 0 else 16 - (h % 17)))
        images = [_image(h % 1000, (28 + h % 3 * 14, 28))] if self.name == "code" and h % 3 == 0 else []
        return ToolResult(text=f"result of {args}", images=images)


def _registry(order: int) -> ToolRegistry:
    return ToolRegistry([SleepTool("code", order), SleepTool("search", order), SleepTool("image_search", order)])


def _run(engine, proc, schedule, order, sampling, group=3, **kw):
    return run_episodes(engine, proc, _registry(order), PROMPTS, group, sampling, EpisodeLimits(max_turns=5),
                        progress=False, session_factory=lambda images: None, schedule=schedule, **kw)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        key = (x.prompt_id, x.sample_index)
        assert (y.prompt_id, y.sample_index) == key
        assert x.token_ids == y.token_ids, key
        assert x.loss_mask == y.loss_mask, key
        assert x.stop_reason == y.stop_reason and x.turn_spans == y.turn_spans and x.turn_texts == y.turn_texts, key
        assert [(c.name, c.args, c.status) for c in x.tool_calls] == [(c.name, c.args, c.status) for c in y.tool_calls]
        assert len(x.images) == len(y.images)
        if x.pixel_values is not None:
            assert torch.equal(x.pixel_values, y.pixel_values) and torch.equal(x.image_grid_thw, y.image_grid_thw)
        torch.testing.assert_close(torch.tensor(x.sample_logprobs), torch.tensor(y.sample_logprobs), atol=1e-5, rtol=0,
                                   msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("policy", ["forced", "sampled"])
def test_async_equals_turn_sync_whatever_the_order(tiny, policy):
    model, proc = tiny
    if policy == "forced":
        sampling = SamplingParams(temperature=1.0, max_new_tokens=64, seed=3)
        make = lambda: ScriptedEngine(EmbeddedEngine(model, proc), proc, scripted)  # noqa: E731
    else:
        sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=11, stop=list(DEFAULT_STOP) + ["e"])
        make = lambda: Mixed(EmbeddedEngine(model, proc), proc)  # noqa: E731
    ref = _run(make(), proc, "turn_sync", +1, sampling)
    for order in (+1, -1):
        _assert_same(ref, _run(make(), proc, "async", order, sampling))
    _assert_same(ref, _run(make(), proc, "turn_sync", -1, sampling))
    # the workload is what the test claims: several turns; tool images (forced); sampled turns mid-episode
    assert max(t.num_turns for t in ref) >= 3
    if policy == "forced":
        assert {t.stop_reason for t in ref} == {"answer"}
        assert any(len(t.images) > len(t.prompt.images) for t in ref)
    else:
        assert any((k + t.sample_index) % 3 == 1 for t in ref for k in range(t.num_turns - 1))


def test_slow_tool_does_not_hold_back_other_episodes(tiny):
    """Episode (p0, 0)'s first tool call takes until every other episode has answered; under async they all
    finish meanwhile (under turn_sync they could not start turn 2 before it returned)."""
    _, proc = tiny
    others_done = threading.Event()
    answered: set = set()

    class Policy:
        def __init__(self):
            self.n = len(PROMPTS) * 2 - 1

        async def agenerate(self, r, sampling):
            from deepeyesv2_rollout.types import GenerateResult

            if r.tag.turn == 0:
                text = code_turn(r.tag)
            else:
                text = "<answer>x</answer>"
                if (r.tag.prompt_id, r.tag.sample_index) != ("p0", 0):
                    answered.add((r.tag.prompt_id, r.tag.sample_index))
                    if len(answered) == self.n:
                        others_done.set()
            ids = proc.encode(text)
            return GenerateResult(ids, [-0.1] * len(ids), "stop")

    class SlowCode:
        name = "code"

        def call(self, args, session):
            if "look 0" in args["code"] and "'p0'" in args["code"]:
                assert others_done.wait(20), "the other episodes waited for this tool"
            return ToolResult(text="ok")

    registry = ToolRegistry([SlowCode(), SleepTool("search", 1), SleepTool("image_search", 1)])
    trajs = run_episodes(Policy(), proc, registry, PROMPTS, 2, SamplingParams(), EpisodeLimits(), progress=False,
                         session_factory=lambda images: None, schedule="async")
    assert [t.stop_reason for t in trajs] == ["answer"] * 6 and others_done.is_set()


# -- faults ---------------------------------------------------------------------------------------------------
class HangingSearch:
    """Hangs on the query "hang" until the episode's session is closed (as a killed sandbox worker would end its
    call), at most 20 s; else answers."""

    name = "search"

    def call(self, args, session):
        if args.get("query") == "hang":
            assert session.closed.wait(20), "the hung call's session was never closed"
            return ToolResult(text="too late")
        return ToolResult(text="<tool_response>found</tool_response>")


def test_faults_end_only_their_episode_and_leak_nothing(tiny):
    from deepeyesv2_rollout.tools import CodeTool, SandboxPool
    from deepeyesv2_rollout.tools.sandbox import SandboxLimits, Session

    model, proc = tiny
    long_q = "a long question " * 200  # over max_seq_len below: the engine fails this request only
    # p1 has two input images: the only episode opening a session with two is p1#1 (p1#0 answers at once)
    prompts = [Prompt(id=f"p{i}", question="What is shown?", images=[_image(i)] * (2 if i == 1 else 1), answer="x")
               for i in range(3)]
    prompts.append(Prompt(id="long", question=long_q, images=[], answer="x"))

    def turns(tag):
        if tag.turn > 0 or (tag.prompt_id, tag.sample_index) == ("p1", 0):
            return "<think>ok</think><answer>x</answer>"
        kind = {("p0", 1): "hang", ("p1", 1): "nosandbox", ("p2", 1): "die"}.get((tag.prompt_id, tag.sample_index))
        if kind == "hang":
            return '<think>s</think><tool_call>{"name": "search", "arguments": {"query": "hang"}}</tool_call>'
        if kind == "die":
            return "<think>c</think><code>\n```python\nimport os\nos._exit(3)\n```\n</code>"
        if kind == "nosandbox":
            return "<think>c</think><code>\n```python\nprint('no')\n```\n</code>"
        return '<think>s</think><tool_call>{"name": "search", "arguments": {"query": "fine"}}</tool_call>'

    pool = SandboxPool(size=0, limits=SandboxLimits(timeout_s=20))

    registry = ToolRegistry([CodeTool(), HangingSearch(), SleepTool("image_search", 1)])
    inner = EmbeddedEngine(model, proc, batching=BatchingConfig(max_seq_len=768))
    engine = ScriptedEngine(inner, proc, turns)
    threads_before = {t.ident for t in threading.enumerate()}
    made = []

    def factory(images):
        if len(images) == 2:
            raise RuntimeError("the sandbox died and cannot restart")
        return HangSession(images, pool)

    class HangSession(Session):
        """The real sandbox session, recording its close (p0#1's hung search waits for it)."""

        def __init__(self, images, pool):
            super().__init__(images, pool=pool)
            self.closed = threading.Event()
            made.append(self)

        def close(self):
            self.closed.set()
            super().close()

    try:
        with pytest.warns(RuntimeWarning) as warned:
            trajs = run_episodes(engine, proc, registry, prompts, 2, SamplingParams(temperature=1.0, seed=0),
                                 EpisodeLimits(), progress=False, session_factory=factory, schedule="async",
                                 tool_timeout_s=8.0)  # past the hang; well above a cold sandbox start on a loaded machine
        by = {(t.prompt_id, t.sample_index): t for t in trajs}
        assert len(trajs) == 8 and [(t.prompt_id, t.sample_index) for t in trajs] == [
            (p.id, g) for p in prompts for g in range(2)]
        hung, nosb, died = by["p0", 1], by["p1", 1], by["p2", 1]
        assert hung.stop_reason == "tool_error" and "did not return within tool_timeout_s=8" in hung.error
        assert [(c.name, c.status) for c in hung.tool_calls] == [("search", "timeout")]
        assert nosb.stop_reason == "tool_error" and "the sandbox died and cannot restart" in nosb.error, (nosb.tool_calls, nosb.turn_texts)
        # a sandbox process that dies mid-call: the policy reads the error and goes on (the sandbox restarts)
        assert died.stop_reason == "answer" and died.tool_calls[0].status == "error", (died.error, died.tool_calls)
        assert "SandboxError" in died.tool_calls[0].error
        for g in range(2):
            long = by["long", g]
            assert long.stop_reason == "env_error" and long.error.startswith("generate: ValueError:")
            assert "max_seq_len=768" in long.error and long.num_turns == 0
        fine = [t for k, t in by.items() if k not in {("p0", 1), ("p1", 1), ("p2", 1), ("long", 0), ("long", 1)}]
        assert len(fine) == 3 and all(t.stop_reason == "answer" and t.error is None for t in fine)
        assert sum("ends with" in str(w.message) for w in warned) == 4
        # nothing left behind: KV slots, requests, sessions, sandbox processes, tool threads
        st = inner.stats()
        assert st["kv_slots_in_use"] == 0 and st["requests_running"] == 0 and st["requests_waiting"] == 0
        assert st["requests_prefilling"] == 0
        assert len(made) == 4 and all(s.closed.is_set() for s in made)
        deadline = time.monotonic() + 10
        while pool.live_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.live_pids() == []
        left = [t.name for t in threading.enumerate() if t.ident not in threads_before and t.name.startswith("rollout-tool")]
        assert left == []
    finally:
        inner.shutdown()
        pool.close()
