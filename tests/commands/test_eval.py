"""`deepeyesv2 eval` on the shipped RealX-Bench-style sample.

A scripted oracle policy (it reads each item's tool chain and gold answer, answers some items wrong on purpose and
makes one code call fail) runs through the real rollout loop, sandbox, BM25 search and image search, so every
number of the report is known exactly. The CLI run with the tiny random model checks the table and files; the
sample itself is checked to be answerable (search hits state the answer, image search finds the entity, the
counting rule gives the count) and to match its generator.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepeyesv2.data import load_prompts
from deepeyesv2.commands.eval import (aggregate, eval_table, item_record, judge_config, main, parse_args,
                                     resolve_model_path, run_eval)
from deepeyesv2.config import JudgeConfig, import_callable
from deepeyesv2.judge import JudgeClient
from deepeyesv2.model import load_processor
from deepeyesv2.rewards import RewardResult, build_reward_fn, get_reward_fn
from deepeyesv2.scoring import rollout_and_score
from deepeyesv2.rollout_setup import Rollouts
from deepeyesv2_rollout.episode import EpisodeLimits
from deepeyesv2_rollout.tools.registry import default_registry
from deepeyesv2_rollout.tools.sandbox import SandboxLimits, SandboxPool
from deepeyesv2_rollout.types import GenerateResult, Prompt, SamplingParams, ToolCallRecord, Trajectory

# the sample's generator is a developer script (scripts/), not part of the installed package: load it by path
_spec = importlib.util.spec_from_file_location("realx_sample", Path(__file__).resolve().parents[2] / "scripts" / "realx_sample.py")
realx_sample = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = realx_sample  # dataclasses look their module up while the file runs
_spec.loader.exec_module(realx_sample)
SAMPLE_DIR, SAMPLE_PATH, build_items, write_sample = (realx_sample.SAMPLE_DIR, realx_sample.SAMPLE_PATH,
                                                      realx_sample.build_items, realx_sample.write_sample)

WRONG = {"perception-2", "search-3", "integration-1", "integration-4"}  # the oracle answers these wrong
FAILING_CODE = "reasoning-4"  # its code call raises inside the sandbox


class OracleEngine:
    """Engine protocol without a model: turn k runs the item's k-th tool, then it answers."""

    def __init__(self, processor, records: dict[str, dict]):
        self.processor, self.records = processor, records

    def turn(self, tag) -> str:
        rec = self.records[tag.prompt_id]
        tools = rec["tools"]
        if tag.turn < len(tools):
            tool = tools[tag.turn]
            if tool == "code":
                code = "print(1 / 0)" if tag.prompt_id == FAILING_CODE else "print(image_1.size)"
                return f"<think>Look at the image.</think><code>\n```python\n{code}\n```\n</code>"
            if tool == "search":
                return ('<think>Look it up.</think><tool_call>{"name": "search", "arguments": {"query": "'
                        + rec["search_query"] + '"}}</tool_call>')
            return '<think>Which entity is this?</think><tool_call>{"name": "image_search"}</tool_call>'
        answer = "wrong" if tag.prompt_id in WRONG else rec["answer"]
        return f"<think>Done.</think><answer>{answer}</answer>"

    def release_memory(self):
        pass

    def resume_memory(self):
        pass

    def shutdown(self):
        pass

    def generate(self, requests, sampling):
        out = []
        for r in requests:
            ids = self.processor.encode(self.turn(r.tag)) + [self.processor.im_end_id]
            out.append(GenerateResult(ids, [0.0] * len(ids), "eos", matched_stop=None))
        return out

    async def agenerate(self, request, sampling):
        return self.generate([request], sampling)[0]

    def update_weights(self, model): ...

    def stats(self):
        return {}

    def clear_cache(self): ...


def _records() -> dict[str, dict]:
    return {json.loads(line)["id"]: json.loads(line) for line in SAMPLE_PATH.read_text().splitlines() if line.strip()}


@pytest.fixture(scope="module")
def oracle_rollouts():
    proc = load_processor("tiny")
    pool = SandboxPool(size=2, limits=SandboxLimits(timeout_s=30))
    rollouts = Rollouts(engine=OracleEngine(proc, _records()), processor=proc, registry=default_registry(),
                        pool=pool, sampling=SamplingParams(temperature=0.0, max_new_tokens=256),
                        limits=EpisodeLimits(max_turns=4, max_total_tokens=32768), progress=False)
    yield rollouts, proc
    rollouts.close()


@pytest.fixture(scope="module")
def oracle_result(oracle_rollouts):
    rollouts, proc = oracle_rollouts
    return run_eval(rollouts, proc, load_prompts(SAMPLE_PATH), get_reward_fn("deepeyesv2"), samples=1)


def test_oracle_accuracy_and_tool_statistics(oracle_result):
    res = oracle_result
    assert set(res["by_category"]) == {"perception", "search", "reasoning", "integration"}
    for cat, s in res["by_category"].items():
        assert (s["episodes"], s["prompts"]) == (4, 4), cat
    acc = {c: s["accuracy"] for c, s in res["by_category"].items()}
    assert acc == {"perception": 0.75, "search": 0.75, "reasoning": 1.0, "integration": 0.5}
    assert res["overall"]["accuracy"] == pytest.approx(12 / 16)
    assert res["overall"]["episodes"] == 16 and len(res["items"]) == 16
    wrong = {it["id"] for it in res["items"] if it["accuracy"] < 1}
    assert wrong == WRONG
    # 20 calls: code 4 (perception) + 4 (reasoning) + 2 (integration); search 4 + 4; image_search 2
    assert res["overall"]["tools"] == pytest.approx({"code": 0.5, "image_search": 0.1, "search": 0.4})
    assert res["by_category"]["perception"]["tools"] == {"code": 1.0}
    assert res["by_category"]["search"]["tools"] == {"search": 1.0}
    assert res["by_category"]["integration"]["tools"] == pytest.approx({"code": 0.25, "image_search": 0.25, "search": 0.5})
    assert res["overall"]["tool_call_rate"] == 1.0
    assert res["by_category"]["reasoning"]["tool_success_rate"] == pytest.approx(3 / 4)
    assert res["overall"]["tool_success_rate"] == pytest.approx(19 / 20)
    turns = {c: s["mean_turns"] for c, s in res["by_category"].items()}
    assert turns == {"perception": 2.0, "search": 2.0, "reasoning": 2.0, "integration": 3.0}
    assert res["overall"]["mean_turns"] == pytest.approx(36 / 16)
    # deepeyesv2 reward: 0.8 * acc * (1 - 0.1 [search task used <tool_call>]) + 0.2 * format
    assert res["by_category"]["search"]["format"] == 1.0
    assert res["by_category"]["search"]["reward"] == pytest.approx((3 * (0.8 * 0.9 + 0.2) + 0.2) / 4)
    assert res["by_category"]["reasoning"]["reward"] == pytest.approx(1.0)


def test_table_structure(oracle_result):
    lines = eval_table(oracle_result).splitlines()
    assert len(lines) == 2 + 1 + 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["", "n", "accuracy"] and "tool_success_rate" in header and "mean_turns" in header
    rows = {ln.strip("|").split("|")[0].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]}
    assert list(rows) == ["overall", "integration", "perception", "reasoning", "search"]
    assert rows["overall"][1:3] == ["16", "0.750"]
    assert rows["integration"][1:3] == ["4", "0.500"]
    assert rows["search"][-1] == "search 100%"


def test_judge_rescues_free_form_answers(oracle_rollouts):
    rollouts, proc = oracle_rollouts
    prompts = [p for p in load_prompts(SAMPLE_PATH) if p.id in ("search-3", "search-1")]
    calls = []

    def judge(question, pred, gold):
        calls.append((pred, gold))
        return 1.0

    res = run_eval(rollouts, proc, prompts, get_reward_fn("deepeyesv2", judge=judge))
    # search-3 (free-form "amber", answered "wrong") goes to the judge; search-1 (numeric, right) never does
    assert calls == [("wrong", "amber")]
    assert res["overall"]["accuracy"] == 1.0


def test_items_are_readable(oracle_result):
    """Every item holds each turn's text, what the environment answered, the tool calls and the images' sizes."""
    items = {it["id"]: it for it in oracle_result["items"]}
    json.dumps(oracle_result)  # plain JSON all the way down
    failing = items[FAILING_CODE]
    assert [t["text"] is not None for t in failing["turn_texts"]] == [True, True]
    assert "print(1 / 0)" in failing["turn_texts"][0]["text"]
    assert "ZeroDivisionError" in failing["turn_texts"][0]["observation"]
    assert failing["turn_texts"][1]["observation"] is None and "<answer>" in failing["turn_texts"][1]["text"]
    call = failing["tool_calls"][0]
    assert (call["name"], call["status"], call["args"]["code"].strip()) == ("code", "error", "print(1 / 0)")
    assert "ZeroDivisionError" in call["error"]
    assert [im["source"] for im in failing["images"]] == ["input"]  # the code printed; it returned no image
    search = items["search-1"]
    assert "<tool_response>" in search["turn_texts"][0]["observation"]
    assert search["tool_calls"][0]["args"] == {"query": _records()["search-1"]["search_query"]}
    # image search hands back images: their sizes are recorded as tool images, and the observation shows them
    found = items["integration-1"]
    assert [im["source"] for im in found["images"]].count("tool") >= 1
    assert "<image>" in found["turn_texts"][0]["observation"] and "<|image_pad|>" not in found["turn_texts"][0]["observation"]
    for im in found["images"]:
        assert im["width"] > 0 and im["height"] > 0


def test_item_texts_are_cut(oracle_rollouts):
    rollouts, proc = oracle_rollouts
    trajs, results = rollout_and_score(rollouts, proc, [p for p in load_prompts(SAMPLE_PATH) if p.id == "search-1"],
                                       get_reward_fn("deepeyesv2"))
    rec = item_record(trajs[0], results[0], proc, max_chars=40)
    obs = rec["turn_texts"][0]["observation"]
    assert obs.endswith("more chars]") and len(obs) < 80


class _YesJudge(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Same. \\boxed{yes}"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def yes_judge_url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _YesJudge)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_endpoint_judge_counts_in_the_summary(oracle_rollouts, yes_judge_url):
    rollouts, proc = oracle_rollouts
    prompts = [p for p in load_prompts(SAMPLE_PATH) if p.id in ("search-3", "search-1")]
    judge = JudgeClient(JudgeConfig(url=yes_judge_url, model="stub", retries=0))
    res = run_eval(rollouts, proc, prompts, build_reward_fn("deepeyesv2", judge), samples=2, judge=judge)
    # search-3 (free-form "amber", answered "wrong") twice: one request, then the cache; search-1 is numeric
    assert res["overall"]["accuracy"] == 1.0
    assert (res["overall"]["judge_requests"], res["overall"]["judge_cache_hits"], res["overall"]["judge_failures"]) == (1, 1, 0)
    assert res["judge"]["url"] == yes_judge_url and res["judge"]["failure_reasons"] == {}


def test_cli_judge_flags_are_checked_first(tmp_path, capsys):
    data = tmp_path / "missing.jsonl"  # never read: the flags fail first
    assert main(["--model", "tiny", "--data", str(data), "--judge", "http://127.0.0.1:9/v1"]) == 2
    assert "--judge-model" in capsys.readouterr().err
    assert main(["--model", "tiny", "--data", str(data), "--judge", "http://127.0.0.1:9/v1", "--judge-model", "m",
                 "--judge-concurrency", "0"]) == 2
    assert "--judge-concurrency=0" in capsys.readouterr().err
    s = parse_args(["--model", "tiny", "--data", "x", "--judge", "http://h/v1", "--judge-model", "m",
                    "--judge-temperature", "0.7", "--judge-on-failure", "zero", "--judge-typed-only"])
    j = judge_config(s)
    assert (j.url, j.model, j.temperature, j.on_failure, j.free_form) == ("http://h/v1", "m", 0.7, "zero", False)


def _traj(pid, cat, n_turns, tools, sample=0):
    calls = [ToolCallRecord(name, {}, status, 0.0) for name, status in tools]
    return Trajectory(token_ids=[1], loss_mask=[0], sample_logprobs=[0.0], images=[], pixel_values=None,
                      image_grid_thw=None, turn_spans=[(0, 1)] * n_turns, tool_calls=calls, stop_reason="answer",
                      group_id=0, prompt_len=1, num_turns=n_turns, prompt_id=pid, sample_index=sample,
                      prompt=Prompt(id=pid, category=cat or ""))


def test_aggregate_with_several_samples():
    trajs = [_traj("a", "search", 2, [("search", "ok")]), _traj("a", "search", 1, [], sample=1),
             _traj("b", "perception", 3, [("code", "ok"), ("code", "error")]), _traj("c", None, 1, [])]
    results = [RewardResult(1.0, {"accuracy": 1.0, "format": 1.0}), RewardResult(0.2, {"accuracy": 0.0, "format": 1.0}),
               RewardResult(0.8, {"accuracy": 1.0, "format": 0.0}), RewardResult(0.0, {"accuracy": 0.0, "format": 0.0})]
    res = aggregate(trajs, results)
    assert res["by_category"]["search"]["episodes"] == 2 and res["by_category"]["search"]["prompts"] == 1
    assert res["by_category"]["search"]["accuracy"] == 0.5 and res["by_category"]["search"]["tool_call_rate"] == 0.5
    assert res["by_category"]["perception"]["tool_success_rate"] == 0.5
    assert res["by_category"]["unknown"]["episodes"] == 1
    assert res["overall"]["accuracy"] == 0.5 and res["overall"]["prompts"] == 3
    assert res["overall"]["tools"] == pytest.approx({"code": 2 / 3, "search": 1 / 3})
    with pytest.raises(ValueError, match="reward results"):
        aggregate(trajs, results[:2])


def test_cli_tiny_model_on_sample(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["--model", "tiny", "--data", str(SAMPLE_PATH), "--max-new-tokens", "12", "--max-turns", "2",
               "--out", str(out), "--no-progress", "--sandbox-workers", "0"])
    assert rc == 0
    res = json.loads((out / "eval_results.json").read_text())
    assert {c: s["episodes"] for c, s in res["by_category"].items()} == {
        "integration": 4, "perception": 4, "reasoning": 4, "search": 4}
    assert len(res["items"]) == 16 and res["settings"]["temperature"] == 0.0
    assert sum(it["accuracy"] for it in res["items"]) / 16 == pytest.approx(res["overall"]["accuracy"])
    table = (out / "eval_table.md").read_text()
    assert "| overall | 16 |" in table and "| search | 4 |" in table
    assert "| overall | 16 |" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["--model", "tiny", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": "q?"}\n')
    assert main(["--model", "tiny", "--data", str(bad)]) == 2
    assert "answer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="--judge must look like 'package.module:function'"):
        import_callable("no_colon", "--judge")
    with pytest.raises(ValueError, match="--judge 'math:no_such_function': cannot import"):
        import_callable("math:no_such_function", "--judge")
    assert import_callable("math:isclose", "--judge")(1.0, 1.0)


# ------------------------------------------------------------------------------------------- the sample
def test_sample_matches_its_generator(tmp_path):
    path = write_sample(tmp_path)
    assert path.read_text() == SAMPLE_PATH.read_text()
    for rec in _records().values():
        a = np.asarray(Image.open(tmp_path / rec["images"][0]).convert("RGB"))
        b = np.asarray(Image.open(SAMPLE_DIR / rec["images"][0]).convert("RGB"))
        assert np.array_equal(a, b), rec["id"]


def test_sample_is_answerable_with_the_tools():
    SQUARE = realx_sample.SQUARE  # the generator script (loaded by path above); the module moved to scripts/
    from deepeyesv2_rollout.tools.image_search import ImageIndex
    from deepeyesv2_rollout.tools.search import LocalBM25Search

    search, index = LocalBM25Search(), ImageIndex.synthetic()
    items = {it.id: it for it in build_items()}
    assert len(items) == 16
    for rec in _records().values():
        if "search" in rec["tools"]:
            top = search.search(rec["search_query"], 1)[0]
            fact = rec["answer"] if rec["id"] != "integration-3" else "43"  # 43 m tall minus 5 squares
            if rec["id"] == "integration-4":
                fact = "10 arches"
            assert fact in top.text, (rec["id"], top.title)
        if "image_search" in rec["tools"]:
            hit = index.search(Image.open(SAMPLE_DIR / rec["images"][0]), 1)[0]
            assert hit.title == rec["entity"] and hit.distance == 0, rec["id"]
        if rec["question"].startswith("How many red squares") or "red square" in rec["question"]:
            a = np.asarray(Image.open(SAMPLE_DIR / rec["images"][0]).convert("RGB")).astype(int)
            red = int((a[:, :, 0] > 2 * a[:, :, 2]).sum()) // SQUARE**2
            blue = int((a[:, :, 2] > 2 * a[:, :, 0]).sum()) // SQUARE**2
            expected = {"perception-1": red, "perception-2": red, "reasoning-1": red - blue,
                        "reasoning-2": 3 * red + blue, "integration-3": 43 - red, "integration-4": red + 10}
            assert str(expected[rec["id"]]) == rec["answer"], rec["id"]
