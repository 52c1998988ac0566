"""EmbeddedEngine: cached vs uncached generation, log-probs vs teacher forcing, sampling, stops, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2_rollout.chat import render_chat
from deepeyesv2_rollout.qwen import embed_inputs, mrope_position_ids
from deepeyesv2_rollout.engine import EmbeddedEngine, Engine, ScriptedEngine, sample_tokens
from deepeyesv2_rollout.types import GenerateRequest, SamplingParams


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_model(ModelConfig())
    model.eval()
    return model, processor


def _image(seed, size=(80, 60)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def _request(proc, text, images):
    r = render_chat(proc, [{"role": "user", "content": "<image>" * len(images) + text}], images, add_generation_prompt=True)
    return GenerateRequest(r.token_ids, r.pixel_values, r.image_grid_thw)


def _full_logprobs(model, req, new, temperature=1.0):
    """Teacher-forced log_softmax(logits / T) of `new` after req's context: one full forward, no cache."""
    ids = torch.tensor(req.token_ids + new)
    pos = mrope_position_ids(ids, req.image_grid_thw, model.config.image_token_id, 2)
    with torch.no_grad():
        emb = embed_inputs(model, ids, req.pixel_values, req.image_grid_thw)
        h = model.model.language_model(inputs_embeds=emb[None], position_ids=pos[:, None], use_cache=False).last_hidden_state[0]
        lp = torch.log_softmax(model.lm_head(h).float() / temperature, -1)
    L = len(req.token_ids)
    steps = lp[L - 1 : L - 1 + len(new)]
    return steps.gather(-1, torch.tensor(new)[:, None])[:, 0], steps.argmax(-1)


def test_stock_cached_path_matches_full_forward(tiny):
    """Without cu_seq_lens the varlen attention defers to SDPA with transformers' own causal mask, so a
    DynamicCache prefill + continuation equals one full forward."""
    from transformers import DynamicCache

    model, proc = tiny
    req = _request(proc, "count the shapes", [_image(0)])
    ids = torch.tensor(req.token_ids)
    pos = mrope_position_ids(ids, req.image_grid_thw, proc.image_pad_id, 2)
    lm = model.model.language_model
    with torch.no_grad():
        emb = embed_inputs(model, ids, req.pixel_values, req.image_grid_thw)[None]
        full = lm(inputs_embeds=emb, position_ids=pos[:, None], use_cache=False).last_hidden_state
        cache = DynamicCache(config=model.config.text_config)
        P = 30
        a = lm(inputs_embeds=emb[:, :P], position_ids=pos[:, None, :P], cache=cache, use_cache=True).last_hidden_state
        b = lm(inputs_embeds=emb[:, P:], position_ids=pos[:, None, P:], cache=cache, use_cache=True).last_hidden_state
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=0)


def test_greedy_cache_vs_no_cache_multi_turn(tiny):
    model, proc = tiny
    sp = SamplingParams(temperature=0, max_new_tokens=12, stop=[])
    outs, stats = {}, {}
    for budget in (0, 100_000):
        eng = EmbeddedEngine(model, proc, cache_tokens_budget=budget)
        assert isinstance(eng, Engine)
        base = [_request(proc, "What is this?", [_image(0)]), _request(proc, "Count.", [_image(1)])]
        reqs = [base[0], base[0], base[1], base[0]]  # a group of 3 samples sharing a prompt, and another prompt
        turns, contexts = [], []
        for turn in range(3):
            res = eng.generate(reqs, sp)
            turns.append(res)
            contexts.append(reqs)
            # next turn: the context grows by the policy's tokens and an environment reply
            reqs = [GenerateRequest(r.token_ids + o.token_ids + proc.encode(f"\nok {turn}\n"), r.pixel_values, r.image_grid_thw)
                    for r, o in zip(reqs, res)]
        outs[budget], stats[budget] = turns, eng.stats()
    for t in range(3):
        for a, b in zip(outs[0][t], outs[100_000][t]):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason == "length"
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    s0, s1 = stats[0], stats[100_000]
    # without the radix cache only the group's fork saves prefill: 2 of the 3 samples of base[0] at every turn
    # (greedy samples of one context stay equal, so their next contexts are equal too)
    assert s0["tokens_cached"] == s0["tokens_shared"] > 0 and s1["tokens_cached"] > s1["tokens_shared"]
    per_turn = [sum(len(r.token_ids) for r in c) for c in contexts]
    assert s0["tokens_prefilled"] + s0["tokens_cached"] == s1["tokens_prefilled"] + s1["tokens_cached"] == sum(per_turn)
    assert s0["tokens_shared"] == sum(2 * len(c[0].token_ids) for c in contexts)
    assert s1["tokens_prefilled"] < 0.6 * s0["tokens_prefilled"]
    assert s0["tokens_decoded"] == s1["tokens_decoded"] == 3 * 4 * 12
    # turn 3 of the first sample re-prefilled only the environment's reply and the last policy token
    assert outs[100_000][2][0].cached_tokens == len(contexts[1][0].token_ids) + 12 - 1


def test_logprobs_match_teacher_forcing_when_sampling(tiny):
    model, proc = tiny
    eng = EmbeddedEngine(model, proc)
    reqs = [_request(proc, "Describe.", [_image(2)]), _request(proc, "Describe the picture in detail.", [_image(3, (40, 100))])]
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=16, stop=[], seed=7)
    res = eng.generate(reqs, sp)
    for r, o in zip(reqs, res):
        ref, _ = _full_logprobs(model, r, o.token_ids, temperature=0.8)
        torch.testing.assert_close(torch.tensor(o.logprobs), ref, atol=1e-5, rtol=0)
    # seeded: the same seeds give the same samples whether a request runs alone or batched
    alone = eng.generate([GenerateRequest(**{**reqs[1].__dict__, "seed": 8})], sp)
    assert alone[0].token_ids == res[1].token_ids  # request 1 of a batch with seed 7 uses seed 7 + 1
    other = eng.generate([GenerateRequest(**{**reqs[1].__dict__, "seed": 9})], sp)
    assert other[0].token_ids != res[1].token_ids


def test_sample_tokens_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(200, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    tok, lp = sample_tokens(logits, SamplingParams(temperature=1.0, top_k=2), gens)
    assert set(tok.tolist()) == {2, 3}
    # the returned log-prob is of the unfiltered tempered distribution (what the trainer computes)
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0])
    tok, _ = sample_tokens(logits, SamplingParams(temperature=1.0, top_p=0.5), gens)
    assert set(tok.tolist()) == {3}  # p(3) = 0.64 >= 0.5 alone
    tok, lp = sample_tokens(logits, SamplingParams(temperature=0), gens)
    assert set(tok.tolist()) == {3}
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[:, 3])


def test_stops_forced_tokens_and_errors(tiny):
    model, proc = tiny
    eng = EmbeddedEngine(model, proc)
    req = _request(proc, "Q", [_image(0)])
    sp = SamplingParams(temperature=0)
    forced = proc.encode('<think>a</think><tool_call>{"name": "image_search"}</tool_call><tool_response>made up')
    (o,) = eng.generate([GenerateRequest(**{**req.__dict__, "forced_tokens": forced})], sp)
    assert o.finish_reason == "stop" and o.matched_stop == "</tool_call>"
    assert proc.decode(o.token_ids).endswith("</tool_call>") and o.token_ids == forced[: len(o.token_ids)]
    ref, _ = _full_logprobs(model, req, o.token_ids)
    torch.testing.assert_close(torch.tensor(o.logprobs), ref, atol=1e-5, rtol=0)
    # a multi-token stop string (as the real Qwen tokenizer splits tags) is matched on decoded text
    forced = proc.encode("the red tower is tall and the blue one")
    (o,) = eng.generate([GenerateRequest(**{**req.__dict__, "forced_tokens": forced})], SamplingParams(temperature=0, stop=["tower is"]))
    assert o.matched_stop == "tower is" and proc.decode(o.token_ids).endswith("tower is")
    forced = proc.encode("<think>a</think><|im_end|>more")
    (o,) = eng.generate([GenerateRequest(**{**req.__dict__, "forced_tokens": forced})], sp)
    assert o.finish_reason == "eos" and o.token_ids[-1] == proc.im_end_id
    forced = proc.encode("<think>a</think><|im_start|>user")
    (o,) = eng.generate([GenerateRequest(**{**req.__dict__, "forced_tokens": forced})], sp)
    assert o.finish_reason == "stop" and o.matched_stop == "<|im_start|>"
    (o,) = eng.generate([GenerateRequest(**{**req.__dict__, "max_new_tokens": 3})], SamplingParams(temperature=0, stop=[]))
    assert o.finish_reason == "length" and len(o.token_ids) == 3
    bad = GenerateRequest(req.token_ids + [proc.image_pad_id], req.pixel_values, req.image_grid_thw)
    with pytest.raises(ValueError, match="request 0"):
        eng.generate([bad], sp)
    with pytest.raises(ValueError, match="empty token_ids"):
        eng.generate([GenerateRequest([])], sp)


def test_same_size_images_do_not_share_kv(tiny):
    model, proc = tiny
    a, b = _request(proc, "Q", [_image(10)]), _request(proc, "Q", [_image(11)])
    assert len(a.token_ids) == len(b.token_ids)
    sp = SamplingParams(temperature=0, max_new_tokens=8, stop=[])
    cached = EmbeddedEngine(model, proc)
    ra, rb = cached.generate([a], sp)[0], cached.generate([b], sp)[0]
    fresh = EmbeddedEngine(model, proc, cache_tokens_budget=0).generate([b], sp)[0]
    assert rb.token_ids == fresh.token_ids and rb.logprobs == pytest.approx(fresh.logprobs, abs=1e-5)
    assert rb.cached_tokens < a.token_ids.index(proc.image_pad_id) + 1  # stopped at the image


def test_update_weights_invalidates_cache(tiny):
    _, proc = tiny
    model, _ = build_model(ModelConfig(seed=1), processor=proc)
    model.eval()
    eng = EmbeddedEngine(model, proc)
    req = _request(proc, "Q", [_image(0)])
    sp = SamplingParams(temperature=0, max_new_tokens=6, stop=[])
    first = eng.generate([req], sp)[0]
    assert eng.stats()["cache_tokens"] > 0
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
        model.model.language_model.layers[0].self_attn.k_proj.weight.add_(0.05)
    eng.update_weights(model)
    assert eng.stats()["cache_tokens"] == 0
    after = eng.generate([req], sp)[0]
    assert after.cached_tokens == 0
    ref, _ = _full_logprobs(model, req, after.token_ids)
    torch.testing.assert_close(torch.tensor(after.logprobs), ref, atol=1e-5, rtol=0)
    assert after.logprobs != pytest.approx(first.logprobs, abs=1e-4)
    eng.clear_cache()
    assert eng.stats()["cache_tokens"] == 0


def test_scripted_engine_forces_script(tiny):
    model, proc = tiny
    eng = ScriptedEngine(EmbeddedEngine(model, proc), proc, lambda tag: f"<think>{tag}</think><answer>{tag}</answer>")
    req = _request(proc, "Q", [])
    outs = eng.generate([GenerateRequest(**{**req.__dict__, "tag": t}) for t in ("1", "2")], SamplingParams())
    assert [proc.decode(o.token_ids) for o in outs] == ["<think>1</think><answer>1</answer>", "<think>2</think><answer>2</answer>"]
    assert all(o.matched_stop == "</answer>" for o in outs)


def test_sample_tokens_never_draws_padding_rows_or_banned_ids():
    """Rows past the tokenizer (an lm head padded like real Qwen's) and banned ids are never drawn, greedy or
    sampled; the log-prob is still over every row."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0, 9.0]]).repeat(300, 1)  # rows 4, 5: padding, most likely
    gens = [torch.Generator().manual_seed(i) for i in range(300)]
    full = torch.log_softmax(logits, -1)
    tok, lp = sample_tokens(logits, SamplingParams(temperature=1.0), gens)
    assert {4, 5} <= set(tok.tolist())  # without the limit the padding rows are drawn (the fault the limit handles)
    tok, lp = sample_tokens(logits, SamplingParams(temperature=1.0, banned_token_ids=(3,)), gens, draw_rows=4)
    assert set(tok.tolist()) == {0, 1, 2}
    torch.testing.assert_close(lp, full.gather(-1, tok[:, None])[:, 0])
    tok, lp = sample_tokens(logits, SamplingParams(temperature=0, banned_token_ids=(3,)), gens, draw_rows=4)
    assert set(tok.tolist()) == {2}
    torch.testing.assert_close(lp, full[:, 2])


def test_engine_with_a_padded_lm_head_samples_only_tokenizer_ids(monkeypatch):
    """A tiny model whose lm head has 200 rows past the tokenizer (as `wide` has 150,912 and real Qwen2.5-VL 271):
    the embedded engine never samples them, and its log-probs are the full-width ones the trainer computes."""
    import deepeyesv2.model as model_mod

    monkeypatch.setitem(model_mod.PRESETS, "tiny-padded", {**model_mod.PRESETS["tiny"], "vocab_size": 1224})
    model, proc = build_model(ModelConfig(name_or_path="tiny-padded"))
    model.eval()
    with torch.no_grad():  # make the padding rows the likeliest, so an unmasked draw would surely take them
        model.lm_head.weight[len(proc.tokenizer):] = model.lm_head.weight[:200] * 3
    assert model.lm_head.weight.shape[0] == len(proc.tokenizer) + 200
    engine = EmbeddedEngine(model, proc)
    try:
        req = _request(proc, "Count the dots.", [])
        sp = SamplingParams(temperature=1.0, max_new_tokens=48, stop=[], seed=3)
        outs = engine.generate([GenerateRequest(req.token_ids, None, None, seed=s) for s in range(4)], sp)
        new = [t for o in outs for t in o.token_ids]
        assert new and max(new) < len(proc.tokenizer)
        o = outs[0]
        lp, _ = _full_logprobs(model, req, list(o.token_ids))
        torch.testing.assert_close(torch.tensor(o.logprobs), lp, atol=1e-4, rtol=1e-4)
    finally:
        engine.shutdown()
