"""SGLangEngine's per-request API on CPU: agenerate through a stand-in's async_generate, submit through generate."""

from __future__ import annotations

import asyncio

import pytest

from deepeyesv2_rollout.qwen import ChatProcessor
from deepeyesv2_rollout.engine import Engine
from deepeyesv2_rollout.sglang_engine import SGLangEngine
from deepeyesv2_rollout.types import GenerateRequest, SamplingParams


@pytest.fixture(scope="module")
def proc():
    from deepeyesv2.model import load_processor

    return load_processor("tiny")


class AnswerSGL:
    """Answers every request with "<answer>1</answer>", like sgl.Engine's generate / async_generate outputs."""

    def __init__(self, proc: ChatProcessor):
        self.proc, self.calls = proc, []

    def _output(self, ids):
        out = self.proc.encode("<answer>1</answer>")
        return {"output_ids": out, "meta_info": {
            "prompt_tokens": len(ids), "cached_tokens": 2, "completion_tokens": len(out),
            "output_token_logprobs": [(-0.5, t, None) for t in out], "finish_reason": {"type": "stop", "matched": "</answer>"}}}

    async def async_generate(self, input_ids, sampling_params, return_logprob=False, image_data=None):
        assert return_logprob and isinstance(input_ids[0], int) and isinstance(sampling_params, dict)
        self.calls.append(("async_generate", sampling_params))
        return self._output(input_ids)

    def generate(self, input_ids, sampling_params, return_logprob=False, image_data=None):
        self.calls.append(("generate", sampling_params))
        return [self._output(ids) for ids in input_ids]

    def shutdown(self):
        self.calls.append(("shutdown",))


def test_agenerate_and_submit(proc):
    fake = AnswerSGL(proc)
    eng = SGLangEngine(None, proc, engine=fake)
    assert isinstance(eng, Engine)
    req = GenerateRequest(proc.encode("hello there"), seed=4)
    sp = SamplingParams(temperature=0.7)
    out = asyncio.run(eng.agenerate(req, sp))
    assert proc.decode(out.token_ids) == "<answer>1</answer>" and out.matched_stop == "</answer>" and out.cached_tokens == 2
    assert fake.calls[-1][0] == "async_generate" and fake.calls[-1][1]["sampling_seed"] == 4
    assert eng.submit(req, sp).result() == out
    assert fake.calls[-1][0] == "generate"
    with pytest.raises(ValueError, match="teacher-force"):
        asyncio.run(eng.agenerate(GenerateRequest(req.token_ids, forced_tokens=[1]), sp))
    eng.shutdown()
    assert fake.calls[-1] == ("shutdown",)


class LatencySGL:
    """A stand-in sgl.Engine whose async_generate takes a per-request latency (from the request's context) and
    answers with a scripted turn: episodes' requests are in flight together, and finish out of order."""

    def __init__(self, proc: ChatProcessor, turns, latency):
        self.proc, self.turns, self.latency = proc, turns, latency
        self.in_flight = self.max_in_flight = 0
        self.finished: list[str] = []

    async def async_generate(self, input_ids, sampling_params, return_logprob=False, image_data=None):
        text = self.proc.decode(input_ids)
        turn = text.count("<|im_start|>assistant") - 1
        key = text.split("Q", 1)[1].split("?", 1)[0]  # the prompt's number
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency(int(key), turn))
        finally:
            self.in_flight -= 1
        self.finished.append(f"{key}:{turn}")
        out = self.proc.encode(self.turns[turn])
        return {"output_ids": out, "meta_info": {
            "prompt_tokens": len(input_ids), "cached_tokens": 0, "completion_tokens": len(out),
            "output_token_logprobs": [(-0.25, t, None) for t in out], "finish_reason": {"type": "stop", "matched": None}}}

    def generate(self, input_ids, sampling_params, return_logprob=False, image_data=None):
        async def batch():  # a batch is served together, as SGLang would
            return await asyncio.gather(*(self.async_generate(ids, p, return_logprob, image_data)
                                          for ids, p in zip(input_ids, sampling_params)))

        return asyncio.run(batch())

    def shutdown(self):
        pass


def test_episodes_await_sglang_per_request_with_latencies(proc):
    """The async schedule over SGLangEngine: every episode awaits its own async_generate, so requests with
    different latencies are in flight together and come back out of order; the trajectories are those of the
    turn-synchronous schedule over the same engine."""
    from deepeyesv2_rollout.episode import EpisodeLimits, run_episodes
    from deepeyesv2_rollout.tools.base import ToolRegistry, ToolResult
    from deepeyesv2_rollout.types import Prompt

    class Text:
        def __init__(self, name):
            self.name = name

        def call(self, args, session):
            return ToolResult(text=f"{self.name} ok")

    class NoSession:
        def __init__(self, images):
            pass

        def close(self):
            pass

    turns = ['<think>a</think><tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call>',
             "<think>b</think><answer>1</answer>"]
    prompts = [Prompt(id=f"p{i}", question=f"Q{i}?", answer="1") for i in range(4)]
    registry = ToolRegistry([Text("code"), Text("search"), Text("image_search")])
    out = {}
    for schedule in ("async", "turn_sync"):
        # prompt 0 is the slowest on its first turn, prompt 3 the fastest
        fake = LatencySGL(proc, turns, lambda k, t: 0.1 * (4 - k) if t == 0 else 0.01)
        eng = SGLangEngine(None, proc, engine=fake)
        trajs = run_episodes(eng, proc, registry, prompts, 2, SamplingParams(seed=3), EpisodeLimits(),
                             progress=False, session_factory=NoSession, schedule=schedule)
        out[schedule] = (trajs, fake)
    trajs, fake = out["async"]
    assert all(t.stop_reason == "answer" for t in trajs)
    assert fake.max_in_flight == 8  # every episode's first turn was awaited at once
    first = [f for f in fake.finished if f.endswith(":0")]
    assert first[:2] == ["3:0", "3:0"] and first[-2:] == ["0:0", "0:0"]  # the fastest came back first
    # an episode's second turn went out before the slowest first turns were back: no turn barrier
    assert fake.finished.index("3:1") < fake.finished.index("0:0")
    for a, b in zip(trajs, out["turn_sync"][0]):
        assert (a.token_ids, a.loss_mask, a.sample_logprobs) == (b.token_ids, b.loss_mask, b.sample_logprobs)


def test_banned_sequences_through_sglangs_custom_logit_processor(proc, monkeypatch):
    """A banned string of several tokens: the request carries custom_params and the processor (SGLang calls it
    with each row's Req), and the processor masks the completing token only where the context ends with the rest."""
    from types import SimpleNamespace

    import torch

    import deepeyesv2_rollout.sglang_engine as sglang_engine
    from deepeyesv2_rollout.sampling import mask_banned_sequences

    seq = (5, 6, 7)
    rows = [SimpleNamespace(origin_input_ids=[1, 5], output_ids=[6]),  # context ends 5, 6: 7 is banned
            SimpleNamespace(origin_input_ids=[1, 5, 6], output_ids=[]),  # the sequence's start in the prompt
            SimpleNamespace(origin_input_ids=[1, 6], output_ids=[5])]  # ends 6, 5: nothing banned
    logits = torch.zeros(4, 10)
    params = [{"banned_sequences": [list(seq)], "__req__": r} for r in rows] + [None]
    out = mask_banned_sequences(logits, params)
    assert torch.isinf(out[0, 7]) and torch.isinf(out[1, 7]) and torch.isfinite(out[2]).all() and torch.isfinite(out[3]).all()
    assert torch.isfinite(out[0, :7]).all() and torch.isfinite(out[0, 8:]).all()

    seen = []

    class Fake(AnswerSGL):
        async def async_generate(self, input_ids, sampling_params, return_logprob=False, image_data=None, **kw):
            seen.append((sampling_params, kw))
            return self._output(input_ids)

        def generate(self, input_ids, sampling_params, return_logprob=False, image_data=None, **kw):
            seen.append((sampling_params, kw))
            return [self._output(ids) for ids in input_ids]

    monkeypatch.setattr(sglang_engine, "banned_sequences_processor", lambda: "PROCESSOR")
    eng = SGLangEngine(None, proc, engine=Fake(proc))
    sp = SamplingParams(banned_token_ids=(3,), banned_sequences=(seq,))
    req = GenerateRequest(proc.encode("hi"))
    asyncio.run(eng.agenerate(req, sp))
    eng.generate([req, req], sp)
    (p1, kw1), (p2, kw2) = seen
    assert p1["custom_params"] == {"banned_sequences": [[5, 6, 7]]} and p1["logit_bias"] == {"3": -1e9}
    assert kw1 == {"custom_logit_processor": "PROCESSOR"} and kw2 == {"custom_logit_processor": ["PROCESSOR"] * 2}
    asyncio.run(eng.agenerate(req, SamplingParams()))
    assert seen[-1][1] == {} and "custom_params" not in seen[-1][0]  # no bans: nothing extra sent
