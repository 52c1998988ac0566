"""The LLM judge service (deepeyesv2.judge) against a stub OpenAI-compatible server on 127.0.0.1.

The stub (stdlib http.server in a thread) answers by the candidate answer's first word: a verdict, wrong JSON, a
body of the wrong shape, a reply without a boxed verdict, HTTP 500 (once or always), 404, 429, a reply held until
the client gave up (once or always), or a barrier that only opens when several requests are in flight together.
Checked: verdicts, retries and what is not retried, counters (requests, retries, failures, cache hits), failures
scored as configured and never raised, the cache and in-flight sharing, the concurrency bound, the reward
integration (answer_type judge, free-form answers, numbers never judged) and one RL step whose metrics carry the
judge's counters and whose run directory gets completions.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import warnings
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deepeyesv2.config import Config, ConfigError, JudgeConfig, ModelConfig, load_config
from deepeyesv2.judge import JudgeClient, chat_url, make_judge, parse_verdict
from deepeyesv2.rewards import RewardInput, build_reward_fn, score_batch
from deepeyesv2_rollout.types import Prompt

_CANDIDATE = re.compile(r"Candidate answer: (.*?)\n\nIs the candidate", re.DOTALL)


class Stub:
    """What the server does, and what it saw. Reset per test by the `stub` fixture."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen: Counter = Counter()  # candidate answer -> requests received
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.inflight = self.max_inflight = 0
        self.release = threading.Event()  # held replies wait on this (set at the end of each test)
        self.barrier: threading.Barrier | None = None

    def reply(self, answer: str, n: int) -> tuple[int, bytes]:
        """(status, body) for the n-th request (1-based) about `answer`."""
        kind = answer.split()[0] if answer.split() else ""

        def chat(content) -> tuple[int, bytes]:
            return 200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()

        if kind == "yes":
            return chat("The candidate names the same thing. \\boxed{yes}")
        if kind == "no":
            return chat("A different thing. \\boxed{no}")
        if kind == "textyes":
            return chat("\\boxed{\\text{Yes}}")
        if kind == "badjson":
            return 200, b"{not json"
        if kind == "wrongshape":
            return 200, json.dumps({"choices": []}).encode()
        if kind == "nullcontent":
            return chat(None)
        if kind == "noverdict":
            return chat("I think it is right.")
        if kind == "err500":
            return 500, b"internal error"
        if kind == "err500once":
            return (500, b"internal error") if n == 1 else chat("\\boxed{yes}")
        if kind == "err429once":
            return (429, b"slow down") if n == 1 else chat("\\boxed{yes}")
        if kind == "err404":
            return 404, b"no such model"
        if kind in ("hang", "hangonce"):
            if kind == "hang" or n == 1:
                self.release.wait(30)  # the client's timeout fires first; the reply goes nowhere
            return chat("\\boxed{yes}")
        if kind == "barrier":
            try:
                self.barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                return 500, b"fewer requests in flight than expected"
            return chat("\\boxed{yes}")
        return 400, b"unknown stub behaviour"


class Handler(BaseHTTPRequestHandler):

    def do_POST(self):
        stub = self.server.stub
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = _CANDIDATE.search(body["messages"][-1]["content"]).group(1)
        with stub.lock:
            stub.seen[answer] += 1
            n = stub.seen[answer]
            stub.bodies.append(body)
            stub.headers.append(dict(self.headers))
            stub.inflight += 1
            stub.max_inflight = max(stub.max_inflight, stub.inflight)
        try:
            status, payload = stub.reply(answer, n)
        finally:
            with stub.lock:  # before the reply is written: the client frees its slot only after reading it
                stub.inflight -= 1
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that timed out closes its socket under a held reply


@pytest.fixture(scope="module")
def server():
    srv = Server(("127.0.0.1", 0), Handler)
    srv.stub = Stub()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stub.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def stub(server):
    server.stub = Stub()
    yield server.stub
    server.stub.release.set()


@pytest.fixture
def cfg(server) -> JudgeConfig:
    return JudgeConfig(url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="stub-judge", timeout_s=20.0,
                       retries=2, backoff_s=0.0, concurrency=4)


# ------------------------------------------------------------------------------------------- the protocol
def test_parse_verdict_and_url():
    assert parse_verdict("so \\boxed{yes}") == 1.0 and parse_verdict("\\boxed{ No }") == 0.0
    assert parse_verdict("\\boxed{yes} at first, but \\boxed{no}") == 0.0  # the last verdict counts
    assert parse_verdict("\\boxed{\\text{YES}}") == 1.0
    assert parse_verdict("yes") is None and parse_verdict("\\boxed{maybe}") is None
    assert chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_url("http://h:8000/v1/chat/completions") == "http://h:8000/v1/chat/completions"


def test_verdicts_and_the_request(stub, cfg):
    judge = JudgeClient(replace(cfg, temperature=0.3, max_tokens=77))
    assert judge("What colour?", "yes amber", "amber") == 1.0
    assert judge("What colour?", "no blue", "amber") == 0.0
    assert judge("What colour?", "textyes", "amber") == 1.0
    assert judge.take_stats() == {"judge_requests": 3, "judge_retries": 0, "judge_failures": 0, "judge_cache_hits": 0}
    body = stub.bodies[0]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("stub-judge", 0.3, 77)
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    user = body["messages"][1]["content"]
    assert "What colour?" in user and "Reference answer: amber" in user and "\\boxed{yes}" in user
    assert "Authorization" not in stub.headers[0]


def test_api_key_from_the_environment(stub, cfg, monkeypatch):
    monkeypatch.setenv("STUB_JUDGE_KEY", "k-123")
    assert JudgeClient(replace(cfg, api_key_env="STUB_JUDGE_KEY"))("q", "yes", "g") == 1.0
    assert stub.headers[-1]["Authorization"] == "Bearer k-123"
    monkeypatch.delenv("STUB_JUDGE_KEY")
    with pytest.raises(ValueError, match="STUB_JUDGE_KEY"):
        JudgeClient(replace(cfg, api_key_env="STUB_JUDGE_KEY"))


# ------------------------------------------------------------------------------------------- faults
FAULTS = [  # answer, attempts the server sees (retries=2: at most 3), failure reason or None (then a yes)
    ("badjson x", 3, "bad response json"),
    ("wrongshape x", 3, "bad response json"),
    ("nullcontent x", 3, "bad response json"),
    ("noverdict x", 3, "no boxed verdict"),
    ("err500 x", 3, "http 500"),
    ("err404 x", 1, "http 404"),  # not the server's passing trouble: not retried
    ("err500once x", 2, None),
    ("err429once x", 2, None),
]


@pytest.mark.parametrize("answer, attempts, reason", FAULTS, ids=[f[0].split()[0] for f in FAULTS])
def test_faults_are_retried_counted_and_scored(stub, cfg, answer, attempts, reason):
    judge = JudgeClient(cfg)
    with pytest.warns(RuntimeWarning, match="judge_failures") if reason else no_runtime_warning():
        score = judge("q", answer, "gold")
    assert stub.seen[answer] == attempts
    stats = judge.take_stats()
    assert stats["judge_requests"] == 1 and stats["judge_retries"] == attempts - 1
    assert stats["judge_failures"] == (1 if reason else 0)
    assert score == (0.0 if reason else 1.0)  # rules: "x..." is not "gold"
    assert judge.failure_reasons() == ({reason: 1} if reason else {})


@contextlib.contextmanager
def no_runtime_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def test_a_failed_verdict_scores_as_configured(stub, cfg):
    rules = JudgeClient(replace(cfg, retries=0, on_failure="rules"))
    zero = JudgeClient(replace(cfg, retries=0, on_failure="zero"))
    with pytest.warns(RuntimeWarning):
        assert rules("q", "err500 Amber", "err500 amber.") == 1.0  # the rule matcher: the same words
        assert rules("q", "err500 blue", "err500 amber") == 0.0
    with pytest.warns(RuntimeWarning):
        assert zero("q", "err500 Amber", "err500 amber.") == 0.0
    assert rules.take_stats()["judge_failures"] == 2 and zero.take_stats()["judge_failures"] == 1
    # a failure is not cached: the next step asks again
    with no_runtime_warning():  # warned once per reason per client
        rules("q", "err500 Amber", "err500 amber.")
    assert rules.take_stats()["judge_requests"] == 1


def test_a_reply_slower_than_the_timeout_is_retried(stub, cfg):
    judge = JudgeClient(replace(cfg, timeout_s=1.0, retries=2))
    assert judge("q", "hangonce x", "g") == 1.0  # the first attempt times out, the second is answered
    assert stub.seen["hangonce x"] == 2
    assert judge.take_stats() == {"judge_requests": 1, "judge_retries": 1, "judge_failures": 0, "judge_cache_hits": 0}


def test_a_server_that_never_answers_is_a_counted_failure(stub, cfg):
    judge = JudgeClient(replace(cfg, timeout_s=0.5, retries=1, on_failure="zero"))
    with pytest.warns(RuntimeWarning, match="timeout"):
        assert judge("q", "hang x", "g") == 0.0
    assert stub.seen["hang x"] == 2 and judge.failure_reasons() == {"timeout": 1}


def test_no_server_is_a_counted_failure(cfg):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = JudgeClient(replace(cfg, url=f"http://127.0.0.1:{port}/v1", retries=1))
    with pytest.warns(RuntimeWarning, match="connection"):
        assert judge("q", "yes", "g") == 0.0
    assert judge.take_stats()["judge_failures"] == 1


# ------------------------------------------------------------------------------------------- cache, concurrency
def test_cache_and_lru(stub, cfg):
    judge = JudgeClient(replace(cfg, cache_size=2))
    for _ in range(3):
        assert judge("q", "yes a", "g") == 1.0
    assert stub.seen["yes a"] == 1
    assert judge.take_stats() == {"judge_requests": 1, "judge_retries": 0, "judge_failures": 0, "judge_cache_hits": 2}
    judge("q", "yes a", "other gold")  # another key: the cache is keyed by (question, answer, gold)
    judge("q2", "yes a", "g")
    judge("q", "yes a", "g")  # evicted by the two above
    assert stub.seen["yes a"] == 4
    nocache = JudgeClient(replace(cfg, cache_size=0))
    nocache("q", "yes b", "g"), nocache("q", "yes b", "g")
    assert stub.seen["yes b"] == 2


def test_identical_questions_in_flight_share_one_request(stub, cfg):
    judge = JudgeClient(cfg)
    inputs = [RewardInput(answer="yes same", gold="g", answer_type="judge", question="q", id=str(i)) for i in range(8)]
    results = score_batch(inputs, build_reward_fn("deepeyesv2", judge), workers=8)
    assert [r.components["accuracy"] for r in results] == [1.0] * 8
    assert stub.seen["yes same"] == 1
    assert judge.take_stats() == {"judge_requests": 1, "judge_retries": 0, "judge_failures": 0, "judge_cache_hits": 7}


def test_requests_go_out_together_within_the_bound(stub, cfg):
    # the barrier opens only with 3 requests in flight at once: a serial judge would fail every verdict
    stub.barrier = threading.Barrier(3)
    judge = JudgeClient(replace(cfg, concurrency=3, timeout_s=60.0, retries=0))
    inputs = [RewardInput(answer=f"barrier {i}", gold="g", answer_type="judge", question="q", id=str(i)) for i in range(6)]
    results = score_batch(inputs, build_reward_fn("deepeyesv2", judge), workers=6)
    assert judge.take_stats()["judge_failures"] == 0
    assert [r.components["accuracy"] for r in results] == [1.0] * 6
    assert stub.max_inflight == 3  # never more than judge.concurrency


# ------------------------------------------------------------------------------------------- rewards
def test_reward_integration(stub, cfg):
    judge = JudgeClient(cfg)
    fn = build_reward_fn("deepeyesv2", judge)
    typed = RewardInput(answer="yes it is amber", gold="amber", answer_type="judge", question="q")
    free = RewardInput(answer="yes amber-ish, I think", gold="amber", answer_type="auto", question="q")
    exact = RewardInput(answer="Amber", gold="amber", answer_type="auto", question="q")  # the rules settle it
    number = RewardInput(answer="no 41", gold="42", answer_type="auto", question="q")  # numbers are never judged
    long = RewardInput(answer="yes " + "x" * 400, gold="amber", answer_type="judge", question="q")  # DeepEyesV2's rule
    res = score_batch([typed, free, exact, number, long], fn, workers=4)
    assert [r.components["accuracy"] for r in res] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert set(stub.seen) == {"yes it is amber", "yes amber-ish, I think"}
    only_typed = build_reward_fn("deepeyesv2", judge, judge_free_form=False)
    assert score_batch([free], only_typed)[0].components["accuracy"] == 0.0
    assert judge.take_stats()["judge_requests"] == 2
    # a failure inside a batch scores by the rules and the batch goes on
    with pytest.warns(RuntimeWarning):
        res = score_batch([RewardInput(answer="err500 x", gold="g", answer_type="judge", question="q"), typed], fn, 2)
    assert [r.components["accuracy"] for r in res] == [0.0, 1.0]


def test_config(server):
    assert make_judge(JudgeConfig()) is None
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    cfg = load_config(overrides={"judge.url": url, "judge.model": "m", "judge.temperature": 0.5})
    assert isinstance(make_judge(cfg.judge), JudgeClient) and cfg.judge.temperature == 0.5
    with pytest.raises(ConfigError, match="needs judge.model"):
        load_config(overrides={"judge.url": url})
    with pytest.raises(ConfigError, match="judge.url='ftp://x'"):
        load_config(overrides={"judge.url": "ftp://x", "judge.model": "m"})
    with pytest.raises(ConfigError, match="judge.on_failure"):
        load_config(overrides={"judge.on_failure": "half"})
    with pytest.raises(ConfigError, match="judge.concurrency"):
        load_config(overrides={"judge.concurrency": 0})
    with pytest.raises(ValueError, match="judge.model"):
        JudgeClient(JudgeConfig(url=url))


# ------------------------------------------------------------------------------------------- one RL step
def test_rl_step_metrics_and_completions(stub, cfg, tmp_path):
    from deepeyesv2.model import build_model
    from deepeyesv2.rl import train_rl
    from deepeyesv2.rollout_setup import make_rollouts
    from deepeyesv2_rollout.engine import ScriptedEngine

    c = Config()
    c.model = ModelConfig(name_or_path="tiny", seed=0)
    c.train.out_dir, c.train.steps, c.train.progress, c.train.tokens_per_batch = str(tmp_path / "run"), 1, False, 2048
    c.rollout.max_new_tokens, c.rollout.max_turns, c.rollout.max_total_tokens = 40, 1, 512
    c.rollout.sandbox_workers = 0
    c.rl.prompts_per_step, c.rl.group_size, c.rl.dynamic_sampling, c.rl.log_completions = 2, 3, False, 2
    c.judge = replace(cfg, retries=1)
    prompts = [Prompt(id=f"p{i}", question=f"Which colour is thing {i}?", answer="amber", answer_type="judge")
               for i in range(2)]
    # sample 0 of p0 is judged yes, of p1 the judge fails (500); samples 1 and 2 give one answer judged no
    answers = {("p0", 0): "yes amber", ("p1", 0): "err500 amber"}

    def script(tag) -> str:
        return f"<think>t</think><answer>{answers.get((tag.prompt_id, tag.sample_index), 'no blue')}</answer>"

    model, proc = build_model(c.model)
    rollouts = make_rollouts(model, proc, c, progress=False)
    rollouts.engine = ScriptedEngine(rollouts.engine, proc, script)
    try:
        with pytest.warns(RuntimeWarning, match="http 500"):
            last = train_rl(c, prompts=prompts, model=model, processor=proc, rollouts=rollouts)
    finally:
        rollouts.close()
    # 4 distinct (question, answer, gold): p0 yes / no, p1 err500 / no; the second "no blue" of each is a hit
    assert (last["judge_requests"], last["judge_retries"], last["judge_failures"], last["judge_cache_hits"]) == (4, 1, 1, 2)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["judge_requests"] == 4 and row["judge_failures"] == 1
    assert last["reward_accuracy"] == pytest.approx(1 / 6)  # one yes; the failure scores by the rules (0)
    lines = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and {x["step"] for x in lines} == {1}
    for x in lines:
        assert x["id"] in ("p0", "p1") and x["gold"] == "amber" and x["stop_reason"] == "answer"
        assert len(x["turns"]) == 1 and "<answer>" in x["turns"][0]["text"]
        assert set(x) >= {"reward", "components", "answer", "tool_calls", "images", "sample"}


def test_completions_log_is_reproducible_and_truncated_on_resume(tmp_path):
    from deepeyesv2.rewards import RewardResult
    from deepeyesv2.scoring import append_jsonl, completion_records, truncate_jsonl_after
    from deepeyesv2_rollout.types import ToolCallRecord, Trajectory

    def traj(i):
        return Trajectory(token_ids=[1], loss_mask=[0], sample_logprobs=[0.0], images=[], pixel_values=None,
                          image_grid_thw=None, turn_spans=[], stop_reason="answer", group_id=0, prompt_len=1,
                          num_turns=1, tool_calls=[ToolCallRecord("code", {"code": "x" * 50}, "ok", 0.1, output="y" * 50)],
                          turn_texts=[f"<answer>{i}</answer>"], answer=str(i), prompt_id=f"p{i}",
                          prompt=Prompt(id=f"p{i}", answer="3"))

    trajs, results = [traj(i) for i in range(6)], [RewardResult(float(i), {"accuracy": 0.0}) for i in range(6)]
    a = completion_records(3, trajs, results, None, 2, seed=7, max_chars=10)
    assert a == completion_records(3, trajs, results, None, 2, seed=7, max_chars=10)  # a resumed step logs the same
    assert len(a) == 2 and len({r["id"] for r in a}) == 2
    assert a[0]["tool_calls"][0]["output"].startswith("y" * 10) and a[0]["tool_calls"][0]["output"].endswith("more chars]")
    assert a[0]["tool_calls"][0]["args"]["code"].endswith("more chars]")
    turn = a[0]["turns"][0]
    assert turn["text"].startswith("<answer>") and turn["text"].endswith("more chars]") and turn["observation"] is None
    assert completion_records(3, trajs, results, None, 0, seed=7) == []
    log = tmp_path / "completions.jsonl"
    for step in (1, 2, 3):
        append_jsonl(log, completion_records(step, trajs, results, None, 2, seed=7))
    with open(log, "a") as f:
        f.write('{"step": 4, "id": "torn')  # a crash mid-write
    truncate_jsonl_after(log, 2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 1, 2, 2]
    truncate_jsonl_after(tmp_path / "absent.jsonl", 0)  # nothing to do
