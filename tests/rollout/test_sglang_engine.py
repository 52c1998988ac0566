"""SGLang adapter on CPU: a fake `sgl.Engine` (tiny HF model, greedy) gives the same trajectories as
EmbeddedEngine; output-format mapping, stop handling, weight updates, memory hooks, missing-sglang error."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2_rollout.chat import render_chat
from deepeyesv2_rollout.qwen import embed_inputs, mrope_position_ids
from deepeyesv2_rollout.engine import EmbeddedEngine
from deepeyesv2_rollout.episode import EpisodeLimits, run_episodes
from deepeyesv2_rollout.types import Prompt
from deepeyesv2_rollout.sglang_engine import SGLangEngine, hf_to_checkpoint_name
from deepeyesv2_rollout.tools.base import ToolRegistry, ToolResult
from deepeyesv2_rollout.types import GenerateRequest, SamplingParams


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_model(ModelConfig())
    model.eval()
    return model, processor


def _image(seed, size=(80, 60)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


class FakeSGL:
    """Mimics sgl.Engine.generate(input_ids=[[...]], sampling_params=[{...}], return_logprob=True,
    image_data=[[{format: processor_output, ...}] | None]) with greedy decoding by full forwards of the
    tiny HF model, and the output dict layout SGLang returns."""

    def __init__(self, model, proc):
        self.model, self.proc = model, proc
        self.seen: list[list[int]] = []
        self.calls: list[tuple] = []

    @torch.no_grad()
    def _next_logprobs(self, ids, image):
        x = torch.tensor(ids)
        pv = grid = None
        if image:
            pv, grid = image[0]["pixel_values"], image[0]["image_grid_thw"]
        pos = mrope_position_ids(x, grid, self.proc.image_pad_id, 2)
        emb = embed_inputs(self.model, x, pv, grid)
        h = self.model.model.language_model(inputs_embeds=emb[None], position_ids=pos[:, None], use_cache=False).last_hidden_state
        return torch.log_softmax(self.model.lm_head(h[0, -1]).float(), -1)

    def generate(self, input_ids, sampling_params, return_logprob=False, image_data=None):
        assert return_logprob
        self.calls.append(("generate", sampling_params, image_data))
        outs = []
        for i, (ids, sp) in enumerate(zip(input_ids, sampling_params)):
            assert sp["temperature"] == 0, "the fake only decodes greedily"
            cached = max((next((k for k, (a, b) in enumerate(zip(ids, s)) if a != b), min(len(ids), len(s))) for s in self.seen), default=0)
            self.seen.append(list(ids))
            ctx, out, lps, fin = list(ids), [], [], None
            while fin is None:
                lp = self._next_logprobs(ctx, image_data[i] if image_data else None)
                t = int(lp.argmax())
                out.append(t)
                lps.append((float(lp[t]), t, None))
                ctx.append(t)
                text = self.proc.decode(out)
                hit = [s for s in sp["stop"] if s in text]
                if t in sp["stop_token_ids"]:
                    fin = {"type": "stop", "matched": t}
                elif hit:
                    fin = {"type": "stop", "matched": hit[0]}
                elif len(out) >= sp["max_new_tokens"]:
                    fin = {"type": "length", "length": len(out)}
            outs.append({"text": self.proc.decode(out), "output_ids": out,
                         "meta_info": {"prompt_tokens": len(ids), "completion_tokens": len(out), "cached_tokens": cached,
                                       "output_token_logprobs": lps, "finish_reason": fin}})
        return outs

    async def async_generate(self, input_ids, sampling_params, return_logprob=False, image_data=None):
        """sgl.Engine.async_generate for one request (the async episode loop's path)."""
        return self.generate([input_ids], [sampling_params], return_logprob, [image_data] if image_data else None)[0]

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update", [n for n, _ in named_tensors], flush_cache))

    def flush_cache(self):
        self.calls.append(("flush",))

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tags))


def _request(proc, text, images):
    r = render_chat(proc, [{"role": "user", "content": "<image>" * len(images) + text}], images, add_generation_prompt=True)
    return GenerateRequest(r.token_ids, r.pixel_values, r.image_grid_thw)


def test_greedy_generate_matches_embedded_engine(tiny):
    model, proc = tiny
    ours = EmbeddedEngine(model, proc)
    sgl = SGLangEngine(None, proc, engine=FakeSGL(model, proc))
    sp = SamplingParams(temperature=0, max_new_tokens=6, stop=[])
    reqs = [_request(proc, "What is this?", [_image(0)]), _request(proc, "Text only.", [])]
    reqs.append(reqs[0])
    for turn in range(2):
        a, b = ours.generate(reqs, sp), sgl.generate(reqs, sp)
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason == "length"
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
        reqs = [GenerateRequest(r.token_ids + o.token_ids + proc.encode("\nok\n"), r.pixel_values, r.image_grid_thw) for r, o in zip(reqs, a)]
    st = sgl.stats()
    assert st["tokens_decoded"] == 2 * 3 * 6 and st["tokens_cached"] > 0
    assert st["tokens_prefilled"] + st["tokens_cached"] == ours.stats()["tokens_prefilled"] + ours.stats()["tokens_cached"]


class EchoTool:
    name = "search"

    def call(self, args, session):
        return ToolResult(text=f"<tool_response>{args}</tool_response>")


def test_greedy_episodes_identical_across_engines(tiny):
    model, proc = tiny
    registry = ToolRegistry([EchoTool()])
    prompts = [Prompt(id="a", question="Where is it?", images=[_image(1)]), Prompt(id="b", question="Count.", images=[])]
    sp = SamplingParams(temperature=0, max_new_tokens=5)
    kw = dict(limits=EpisodeLimits(max_turns=2), progress=False, required_tools=(), session_factory=lambda imgs: None)
    t1 = run_episodes(EmbeddedEngine(model, proc), proc, registry, prompts, 2, sp, **kw)
    t2 = run_episodes(SGLangEngine(None, proc, engine=FakeSGL(model, proc)), proc, registry, prompts, 2, sp, **kw)
    for a, b in zip(t1, t2):
        assert a.token_ids == b.token_ids and a.loss_mask == b.loss_mask and a.stop_reason == b.stop_reason
        torch.testing.assert_close(torch.tensor(a.sample_logprobs), torch.tensor(b.sample_logprobs), atol=1e-5, rtol=0)


class CannedSGL(FakeSGL):
    """Returns fixed outputs, to check how SGLang's output dicts are mapped."""

    def __init__(self, proc, outputs):
        super().__init__(None, proc)
        self.outputs = outputs

    def generate(self, input_ids, sampling_params, return_logprob=False, image_data=None):
        self.calls.append(("generate", sampling_params, image_data))
        res = []
        for ids, (text_or_ids, fin) in zip(input_ids, self.outputs):
            out = self.proc.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
            res.append({"text": "", "output_ids": out, "meta_info": {
                "prompt_tokens": len(ids), "cached_tokens": 3, "completion_tokens": len(out),
                "output_token_logprobs": [(-0.1 * (k + 1), t, None) for k, t in enumerate(out)], "finish_reason": fin}})
        return res


def test_output_mapping_and_stop_handling(tiny):
    _, proc = tiny
    req = _request(proc, "Q", [_image(0)])
    call = '<think>a</think><tool_call>{"name": "image_search"}</tool_call>'
    outputs = [
        (call + "<tool_response>made up</tool_response>", {"type": "stop", "matched": "</tool_call>"}),  # ran past the stop
        ("<answer>1</answer><|im_end|>", {"type": "stop", "matched": proc.im_end_id}),
        ("abc" + "<|im_end|>", {"type": "stop", "matched": proc.im_end_id}),
        ("hello there", {"type": "length", "length": 2}),
        ("<think>x</think><|im_start|>user", {"type": "stop", "matched": proc.im_start_id}),
    ]
    fake = CannedSGL(proc, outputs)
    eng = SGLangEngine(None, proc, engine=fake)
    res = eng.generate([req] * 5, SamplingParams(temperature=0.7, top_k=0, seed=3))
    n_call = len(proc.encode(call))
    assert res[0].finish_reason == "stop" and res[0].matched_stop == "</tool_call>" and len(res[0].token_ids) == n_call
    assert res[0].logprobs == pytest.approx([-0.1 * (k + 1) for k in range(n_call)])
    assert res[1].finish_reason == "stop" and res[1].matched_stop == "</answer>"  # cut at </answer>
    assert res[2].finish_reason == "eos" and res[2].token_ids[-1] == proc.im_end_id
    assert res[3].finish_reason == "length"
    assert res[4].finish_reason == "stop" and res[4].matched_stop == "<|im_start|>" and res[4].token_ids[-1] == proc.im_start_id
    _, params, images = fake.calls[0]
    p = params[0]
    assert p["top_k"] == -1 and p["temperature"] == 0.7 and p["no_stop_trim"] and not p["skip_special_tokens"]
    assert proc.im_end_id in p["stop_token_ids"] and p["stop"] == ["</code>", "</tool_call>", "</answer>"]
    assert p["sampling_seed"] == 3 and "logit_bias" not in p
    banned = SGLangEngine(None, proc, engine=CannedSGL(proc, outputs[:1]))._sampling_params(req, SamplingParams(banned_token_ids=(7, 9)))
    assert banned["logit_bias"] == {"7": -1e9, "9": -1e9}  # banned ids are never drawn by SGLang either
    assert images[0][0]["format"] == "processor_output" and torch.equal(images[0][0]["image_grid_thw"], req.image_grid_thw)
    st = eng.stats()
    assert st["tokens_cached"] == 15 and st["tokens_prefilled"] == 5 * (len(req.token_ids) - 3)
    with pytest.raises(ValueError, match="teacher-force"):
        eng.generate([GenerateRequest(req.token_ids, forced_tokens=[1])], SamplingParams())


def test_weight_update_cache_and_memory_hooks(tiny):
    model, proc = tiny
    fake = FakeSGL(model, proc)
    eng = SGLangEngine(None, proc, engine=fake, update_bucket_bytes=200_000)
    eng.update_weights(model)
    updates = [c for c in fake.calls if c[0] == "update"]
    sent = [n for c in updates for n in c[1]]
    everything = [hf_to_checkpoint_name(n) for n, _ in model.named_parameters()]
    assert sent == everything and len(updates) > 1
    assert [c[2] for c in updates] == [False] * (len(updates) - 1) + [True]  # one cache flush, at the end
    # the frozen vision tower too: release_memory frees SGLang's weights, resume brings back garbage
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert any(n.startswith("visual.") for n in sent)
    assert "model.layers.0.self_attn.q_proj.weight" in sent and "lm_head.weight" in sent
    eng.clear_cache()
    eng.release_memory(["kv_cache"])
    eng.resume_memory(["kv_cache"])
    assert fake.calls[-3:] == [("flush",), ("release", ["kv_cache"]), ("resume", ["kv_cache"])]


def test_missing_sglang_or_cuda_is_a_one_line_error(tiny, monkeypatch):
    _, proc = tiny
    monkeypatch.setitem(sys.modules, "sglang", None)  # import sglang -> ImportError
    with pytest.raises(RuntimeError, match="sglang") as e:
        SGLangEngine("/nonexistent", proc)
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "sglang", types.ModuleType("sglang"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA") as e:
        SGLangEngine("/nonexistent", proc)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    with pytest.raises(RuntimeError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        SGLangEngine(None, proc, engine=object())


def test_trainer_starts_sglang_from_a_directory_with_the_policys_weights(tiny, monkeypatch, tmp_path):
    """rollout.engine=sglang with the tiny preset: SGLang gets a real checkpoint directory (the preset has
    none), the policy's current weights are pushed before the first rollout, and closing the rollouts shuts
    SGLang's processes down."""
    from deepeyesv2.config import Config
    from deepeyesv2.rollout_setup import make_rollouts

    model, proc = tiny
    started = []

    class StubEngine:
        def __init__(self, model_path, **kwargs):
            started.append((model_path, kwargs))
            self.calls = []

        def update_weights_from_tensor(self, bucket, flush_cache):
            self.calls.append(("update", [n for n, _ in bucket], flush_cache))

        def shutdown(self):
            self.calls.append(("shutdown",))

    sgl = types.ModuleType("sglang")
    sgl.Engine = StubEngine
    monkeypatch.setitem(sys.modules, "sglang", sgl)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = Config()
    cfg.rollout.engine, cfg.rollout.sandbox_workers, cfg.train.out_dir = "sglang", 0, str(tmp_path)
    rollouts = make_rollouts(model, proc, cfg, progress=False)
    (path, kwargs), = started
    assert path == str(tmp_path / "sglang_init")
    assert kwargs == {"enable_memory_saver": True, "enable_custom_logit_processor": True, "mem_fraction_static": 0.4}
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "sglang_init" / f).is_file(), f
    calls = rollouts.engine.engine.calls
    pushed = [n for c in calls for n in c[1]]
    assert pushed == [hf_to_checkpoint_name(n) for n, _ in model.named_parameters()]
    assert calls[-1][2] is True  # the last bucket flushes SGLang's prefix cache
    rollouts.close()
    assert calls[-1] == ("shutdown",)
