"""EmbeddedEngine's continuous batching: results independent of batching and equal to the old static-batch
engine, group fork, chunked prefill beside decoding, the K/V slot pool, faults, barriers and shutdown."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2_rollout.chat import render_chat
from deepeyesv2_rollout.engine import EmbeddedEngine, Engine, EngineShutdown, ScriptedEngine, seeded_for_batch
from deepeyesv2_rollout.kv_pool import SlotPool
from deepeyesv2_rollout.types import BatchingConfig, GenerateRequest, SamplingParams

# Recorded from the static-batch engine before continuous batching replaced it (same requests as _cases).
REFERENCE = json.loads((Path(__file__).parent / "engine_static_reference.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_model(ModelConfig())
    model.eval()
    return model, processor


@pytest.fixture
def engines(tiny):
    """Makes EmbeddedEngines on the tiny model and shuts every one down at the end of the test."""
    made = []

    def make(**kw):
        model, proc = tiny
        eng = EmbeddedEngine(kw.pop("model", model), proc, **kw)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.shutdown()


def _image(seed, size=(80, 60)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def _request(proc, text, images):
    r = render_chat(proc, [{"role": "user", "content": "<image>" * len(images) + text}], images, add_generation_prompt=True)
    return GenerateRequest(r.token_ids, r.pixel_values, r.image_grid_thw)


def _cases(proc):
    """name -> (sampling, requests): what engine_static_reference.json was recorded from."""
    reqs = [_request(proc, "What is this?", [_image(0)]), _request(proc, "Count the red shapes please.", [_image(1)]),
            _request(proc, "Describe a cat.", []), _request(proc, "What is this?", [_image(0)]),
            _request(proc, "Q", [_image(2, (40, 100))])]
    forced = proc.encode("<think>a b c</think><answer>b</answer>")
    return {
        "greedy": (SamplingParams(temperature=0, max_new_tokens=10, stop=[]), reqs),
        "sampled": (SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=12, stop=[], seed=7), reqs),
        "forced": (SamplingParams(temperature=1.0), [GenerateRequest(**{**r.__dict__, "forced_tokens": forced}) for r in reqs]),
    }


def _same(results, reference, atol=1e-5):
    assert len(results) == len(reference)
    for r, ref in zip(results, reference):
        assert r.token_ids == ref["token_ids"] and r.finish_reason == ref["finish_reason"]
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(ref["logprobs"]), atol=atol, rtol=0)


def _as_ref(results):
    return [dict(token_ids=r.token_ids, logprobs=r.logprobs, finish_reason=r.finish_reason) for r in results]


@pytest.mark.parametrize("name", ["greedy", "sampled", "forced"])
def test_results_independent_of_batching_and_equal_to_static_engine(tiny, engines, name):
    _, proc = tiny
    sp, reqs = _cases(proc)[name]
    ref = REFERENCE[name]
    seeded = [seeded_for_batch(r, sp, i) for i, r in enumerate(reqs)]  # the seeds generate() gives them
    # (a) one at a time
    eng = engines()
    _same([eng.submit(r, sp).result() for r in seeded], ref)
    # (b) all together
    _same(engines().generate(reqs, sp), ref)
    # (c) shuffled, staggered between scheduler steps, few slots and a small prefill budget (chunks, queueing)
    eng = engines(threaded=False, batching=BatchingConfig(max_running=3, prefill_tokens_per_step=24))
    order = random.Random(0).sample(range(len(reqs)), len(reqs))
    futures = {}
    for k, i in enumerate(order):
        futures[i] = eng.submit(seeded[i], sp)
        for _ in range(k % 3):
            eng.step()
    assert eng.run_until_idle() > 0
    _same([futures[i].result() for i in range(len(reqs))], ref)
    st = eng.stats()
    assert st["kv_slots_in_use"] == 0 and st["requests_waiting"] == st["requests_running"] == 0
    # (d) shuffled, submitted concurrently from several threads to the scheduler thread
    eng = engines(batching=BatchingConfig(max_running=2, prefill_tokens_per_step=16))
    with ThreadPoolExecutor(4) as pool:
        futures = dict(zip(order, pool.map(lambda i: eng.submit(seeded[i], sp), order)))
    _same([futures[i].result() for i in range(len(reqs))], ref)


@pytest.mark.parametrize("max_running,budget", [(1, 1), (2, 5), (4, 13), (8, 64)])
def test_any_limits_give_the_static_results(tiny, engines, max_running, budget):
    """Slots and prefill budget change only how the work is cut: chunks of one or several rows, a long context
    alone in its buffer then beside others, queueing for slots."""
    _, proc = tiny
    sp, reqs = _cases(proc)["sampled"]
    eng = engines(threaded=False, batching=BatchingConfig(max_running=max_running, prefill_tokens_per_step=budget))
    rng = random.Random(budget)
    futures = {}
    for i in rng.sample(range(len(reqs)), len(reqs)):
        futures[i] = eng.submit(seeded_for_batch(reqs[i], sp, i), sp)
        for _ in range(rng.randrange(4)):
            eng.step()
    eng.run_until_idle()
    _same([futures[i].result() for i in range(len(reqs))], REFERENCE["sampled"])
    assert eng.stats()["kv_slots_in_use"] == 0


def test_group_samples_share_one_prefill(tiny, engines):
    _, proc = tiny
    req = _request(proc, "What is this?", [_image(0)])
    L = len(req.token_ids)
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, stop=[], seed=3)
    eng = engines(cache_tokens_budget=0)
    outs = eng.generate([req] * 4, sp)
    st = eng.stats()
    assert st["tokens_prefilled"] == L and st["prefill_steps"] == 1  # one prefill for the group
    assert st["tokens_shared"] == st["tokens_cached"] == 3 * L
    assert [o.cached_tokens for o in outs] == [0, L, L, L]
    assert len({tuple(o.token_ids) for o in outs}) > 1  # each sample draws with its own seed
    alone = [engines(cache_tokens_budget=0).submit(seeded_for_batch(req, sp, i), sp).result() for i in range(4)]
    _same(outs, _as_ref(alone))
    # a sample arriving while its group's prefill is still in flight joins it
    eng = engines(threaded=False, batching=BatchingConfig(prefill_tokens_per_step=8))
    first = eng.submit(seeded_for_batch(req, sp, 0), sp)
    eng.step()
    assert eng.stats()["requests_prefilling"] == 1
    late = eng.submit(seeded_for_batch(req, sp, 1), sp)
    eng.run_until_idle()
    assert eng.stats()["tokens_prefilled"] == L and late.result().cached_tokens == L
    _same([first.result(), late.result()], _as_ref(alone[:2]))


def test_contexts_sharing_a_prefix_prefill_it_once(tiny, engines):
    """Different prompts with one system prompt, arriving together: the first is prefilled, the others wait one
    step and start from its cached prefix (as the old one-by-one prefill did), instead of all computing it."""
    _, proc = tiny
    system = "You are a careful visual assistant. Think step by step, use tools when needed. " * 3
    prompts = [render_chat(proc, [{"role": "system", "content": system}, {"role": "user", "content": f"<image>question {p}?"}],
                           [_image(p)], add_generation_prompt=True) for p in range(4)]
    reqs = [GenerateRequest(r.token_ids, r.pixel_values, r.image_grid_thw) for r in prompts for _ in range(2)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=4, stop=[], seed=1)
    eng = engines()
    outs = eng.generate(reqs, sp)
    ids = [r.token_ids for r in prompts]
    shared = ids[0].index(proc.image_pad_id)  # the images differ: what precedes the first one is common
    assert all(x[:shared] == ids[0][:shared] for x in ids) and shared > 2 * 32
    st = eng.stats()
    assert st["tokens_prefilled"] == len(ids[0]) + sum(len(x) - shared for x in ids[1:])
    assert [o.cached_tokens for o in outs[::2]] == [0, shared, shared, shared]
    _same(outs, _as_ref(engines(cache_tokens_budget=0).generate(reqs, sp)))


def test_chunked_prefill_keeps_decoding(tiny, engines):
    _, proc = tiny
    short = GenerateRequest(proc.encode("hi"), forced_tokens=proc.encode(" ".join(["a"] * 40)))
    long = _request(proc, "Describe everything in this picture.", [_image(5, (200, 200))])
    sp = SamplingParams(temperature=0, max_new_tokens=40, stop=[])
    budget = 8
    assert len(long.token_ids) > 6 * budget
    eng = engines(threaded=False, batching=BatchingConfig(prefill_tokens_per_step=budget))
    f_short = eng.submit(short, sp)
    for _ in range(10):
        if eng.stats()["requests_running"]:
            break
        eng.step()
    assert eng.stats()["requests_running"] == 1
    f_long = eng.submit(long, sp)
    before = eng.stats()
    for _ in range(4):
        eng.step()
        st = eng.stats()
        assert st["requests_prefilling"] == 1 and st["requests_running"] == 1  # the long context is in chunks...
    assert st["decode_steps"] == before["decode_steps"] + 4  # ...while the short one decodes at every step
    assert st["tokens_prefilled"] == before["tokens_prefilled"] + 4 * budget
    eng.run_until_idle()
    ref = engines().generate([short, long], sp)
    _same([f_short.result(), f_long.result()], _as_ref(ref))


def test_slot_pool_decode_writes_in_place_and_retirement_moves_one_slot():
    pool = SlotPool(num_layers=2, kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
                    max_slots=4, max_len=16)
    for i, n in enumerate((3, 5, 2)):
        kv = [(torch.full((2, n, 4), 10.0 * i + l), torch.full((2, n, 4), -10.0 * i - l)) for l in range(2)]
        assert pool.append(kv, n, reserve=n + 4) == i
    storage = [k.data_ptr() for k in pool.keys]
    cache = pool.decode_cache([3, 5, 2])  # each row writes its next token after its own tokens
    new_k, new_v = torch.arange(3.0)[:, None, None, None].expand(3, 2, 1, 4) + 100, torch.zeros(3, 2, 1, 4)
    keys, values = cache.update(new_k, new_v, layer_idx=1)
    assert keys.shape == (3, 2, 6, 4) and keys.data_ptr() == pool.keys[1].data_ptr()  # a view of the pool
    assert [k.data_ptr() for k in pool.keys] == storage
    for row, col in enumerate((3, 5, 2)):
        assert torch.equal(pool.keys[1][row, :, col], torch.full((2, 4), 100.0 + row))
        assert torch.equal(pool.keys[1][row, :, :col], torch.full((2, col, 4), 10.0 * row + 1))
    pool.remove(0, last_len=3)  # slot 2 (3 filled tokens) moves into slot 0
    assert pool.n == 2 and pool.moves == 1
    assert torch.equal(pool.keys[1][0, :, :2], torch.full((2, 2, 4), 21.0)) and pool.keys[1][0, 0, 2, 0] == 102
    pool.remove(1, last_len=6)  # the last slot leaves: nothing moves
    assert pool.n == 1 and pool.moves == 1
    with pytest.raises(ValueError, match="exceed"):
        pool.append(kv, 2, reserve=17)


def test_retired_sequences_free_slots_for_waiting_ones(tiny, engines):
    _, proc = tiny
    base = _request(proc, "Q", [])
    reqs = [GenerateRequest(base.token_ids + proc.encode(f"{i}"), forced_tokens=proc.encode(" ".join(["b"] * (2 + 3 * i))))
            for i in range(6)]
    sp = SamplingParams(temperature=0, max_new_tokens=64, stop=[])
    eng = engines(threaded=False, batching=BatchingConfig(max_running=2))
    futures = [eng.submit(r, sp) for r in reqs]
    peak = 0
    while eng.step():
        peak = max(peak, eng.stats()["kv_slots_in_use"])
    st = eng.stats()
    assert peak == 2 and st["kv_slots_in_use"] == 0 and st["requests"] == 6
    assert st["kv_slot_moves"] <= 6  # at most one move per retirement
    assert st["decode_steps"] < sum(len(r.forced_tokens) for r in reqs)  # rows decode side by side
    alone = [engines().submit(r, sp).result() for r in reqs]
    _same([f.result() for f in futures], _as_ref(alone))


def test_faults_fail_only_their_request(tiny, engines):
    _, proc = tiny
    before = _scheduler_threads()
    eng = engines(batching=BatchingConfig(max_seq_len=200))
    good = [_request(proc, "What is this?", [_image(0)]), _request(proc, "Count.", [])]
    img = good[0]
    sp = SamplingParams(temperature=0, max_new_tokens=6, stop=[])
    bad_pixels = GenerateRequest(img.token_ids, img.pixel_values[:-4], img.image_grid_thw)  # fails on submit
    # hashes given, so the pixels are first touched by the vision tower, inside the scheduler's prefill
    bad_tower = GenerateRequest(img.token_ids, img.pixel_values[:, :7], img.image_grid_thw, image_keys=[123])
    too_long = GenerateRequest(proc.encode("x " * 300))
    futures = [eng.submit(r, sp) for r in (good[0], bad_pixels, good[1], bad_tower, too_long)]
    wait(futures)
    assert futures[0].exception() is None and futures[2].exception() is None
    with pytest.raises(ValueError, match="patches"):
        futures[1].result()
    assert futures[3].exception() is not None
    with pytest.raises(ValueError, match="max_seq_len"):
        futures[4].result()
    ref = engines()
    _same([futures[0].result(), futures[2].result()], _as_ref(ref.generate(good, sp)))
    st = eng.stats()
    assert st["kv_slots_in_use"] == 0 and st["requests_failed"] == 1 and st["requests"] == 2
    assert st["scheduler_threads"] == 1 and _scheduler_threads() == before + 2
    eng.shutdown()
    ref.shutdown()
    assert eng.stats()["scheduler_threads"] == 0 and _scheduler_threads() == before


def _scheduler_threads() -> int:
    return sum(t.name == "EmbeddedEngine-scheduler" and t.is_alive() for t in threading.enumerate())


def test_generate_raises_first_failure_after_all_finish(tiny, engines):
    _, proc = tiny
    eng = engines()
    ok = _request(proc, "Q", [])
    with pytest.raises(ValueError, match="request 1: empty token_ids"):
        eng.generate([ok, GenerateRequest([]), ok], SamplingParams(temperature=0, max_new_tokens=3))
    st = eng.stats()
    assert st["requests"] == 2 and st["kv_slots_in_use"] == 0


def test_shutdown_fails_in_flight_requests_and_a_new_request_restarts(tiny, engines):
    _, proc = tiny
    req = GenerateRequest(proc.encode("go"), forced_tokens=proc.encode(" ".join(["c"] * 60)))
    sp = SamplingParams(temperature=0, max_new_tokens=60, stop=[])
    eng = engines(batching=BatchingConfig(prefill_tokens_per_step=1))
    futures = [eng.submit(GenerateRequest(req.token_ids + [i + 5], forced_tokens=req.forced_tokens), sp) for i in range(4)]
    eng.shutdown()
    for f in futures:
        assert f.done() and (f.exception() is None or isinstance(f.exception(), EngineShutdown))
    st = eng.stats()
    assert st["scheduler_threads"] == 0 and st["kv_slots_in_use"] == 0 and st["requests_running"] == 0
    (o,) = eng.generate([req], sp)
    assert o.token_ids == req.forced_tokens and eng.stats()["scheduler_threads"] == 1
    eng.shutdown()
    assert eng.stats()["scheduler_threads"] == 0


def test_engine_dropped_without_shutdown_stops_its_thread(tiny):
    model, proc = tiny
    before = set(threading.enumerate())
    eng = EmbeddedEngine(model, proc)
    eng.generate([_request(proc, "Q", [])], SamplingParams(temperature=0, max_new_tokens=2))
    (thread,) = [t for t in threading.enumerate() if t not in before and t.name == "EmbeddedEngine-scheduler"]
    del eng
    gc.collect()
    thread.join(timeout=60)  # a bound on the test, not a timing assertion
    assert not thread.is_alive()


def test_update_weights_waits_for_requests_in_flight(tiny, engines):
    model, proc = tiny
    other, _ = build_model(ModelConfig(seed=1), processor=proc)
    other.eval()
    req = _request(proc, "What is this?", [_image(0)])
    sp = SamplingParams(temperature=0, max_new_tokens=8, stop=[])
    old = engines(threaded=False).generate([req], sp)
    new = engines(threaded=False, model=other).generate([req], sp)
    assert old[0].token_ids != new[0].token_ids or old[0].logprobs != pytest.approx(new[0].logprobs, abs=1e-4)
    eng = engines()
    futures = [eng.submit(req, sp) for _ in range(3)]
    eng.update_weights(other)
    assert all(f.done() for f in futures)  # generated by the old weights, all of them
    _same([f.result() for f in futures], _as_ref(old * 3))
    after = eng.submit(req, sp).result()
    assert after.cached_tokens == 0  # the cache went with the old weights
    _same([after], _as_ref(new))
    eng.release_memory()
    assert eng.stats()["kv_pool_tokens"] == 0
    eng.resume_memory()
    _same([eng.submit(req, sp).result()], _as_ref(new))


def test_agenerate_and_protocol(tiny, engines):
    model, proc = tiny
    sp, reqs = _cases(proc)["sampled"]
    eng = engines()
    assert isinstance(eng, Engine)

    async def rollout():
        return await asyncio.gather(*(eng.agenerate(seeded_for_batch(r, sp, i), sp) for i, r in enumerate(reqs)))

    _same(asyncio.run(rollout()), REFERENCE["sampled"])
    scripted = ScriptedEngine(eng, proc, lambda tag: f"<answer>{tag}</answer>")
    assert isinstance(scripted, Engine)
    out = scripted.submit(GenerateRequest(reqs[2].token_ids, tag="7"), SamplingParams()).result()
    assert proc.decode(out.token_ids) == "<answer>7</answer>" and out.matched_stop == "</answer>"
    out = asyncio.run(scripted.agenerate(GenerateRequest(reqs[2].token_ids, tag="8"), SamplingParams()))
    assert proc.decode(out.token_ids) == "<answer>8</answer>"
    with pytest.raises(RuntimeError, match="threaded"):
        asyncio.run(engines(threaded=False).agenerate(reqs[0], sp))


def test_batching_config_validates():
    with pytest.raises(ValueError, match="max_running"):
        BatchingConfig(max_running=0)
    with pytest.raises(ValueError, match="prefill_tokens_per_step"):
        BatchingConfig(prefill_tokens_per_step=0)
