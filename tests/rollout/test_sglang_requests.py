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
