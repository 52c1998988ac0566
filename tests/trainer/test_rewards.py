"""Rewards and answer matching: known values for every rule."""

from __future__ import annotations

import pytest

from deepeyesv2_rollout.types import Prompt, ToolCallRecord, Trajectory

from deepeyesv2.rewards import (
    RewardError,
    RewardInput,
    RewardResult,
    deepeyes_v1_reward,
    deepeyesv2_reward,
    extract_choice,
    get_reward_fn,
    infer_answer_type,
    match_answer,
    normalize_answer,
    overlong_penalty,
    reward_input_from_trajectory,
    score,
)


def inp(**kw) -> RewardInput:
    base = dict(answer="Paris", gold="Paris", answer_type="auto", category="perception", question="q?",
                format_ok=True, tool_names=[], failed_tool_calls=0, response_text="", id="p1#0")
    base.update(kw)
    return RewardInput(**base)


# -- matching -----------------------------------------------------------------------------------

def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer(None) == ""
    assert normalize_answer("\\boxed{Blue}") == "blue"


@pytest.mark.parametrize("pred,gold,expected", [
    ("the Eiffel Tower.", "Eiffel tower", 1.0),
    ("eiffel towers", "Eiffel tower", 0.0),
    ("PARIS", ["London", "paris"], 1.0),
    ("Berlin", ["London", "paris"], 0.0),
])
def test_exact(pred, gold, expected):
    assert match_answer(pred, gold, "exact") == expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("1,234", "1234", 1.0),
    ("1234.5", "1,234", 1.0),            # within 1% relative
    ("1300", "1234.0", 0.0),             # 5% off
    ("3.5%", "3.5", 1.0),
    ("35%", "0.35", 1.0),                # percent vs fraction
    ("1/2", "0.5", 1.0),
    ("0.333", "1/3", 1.0),
    ("12 cm", "12", 1.0),                # units stripped
    ("$5", "5 dollars", 1.0),
    ("1.2 million", "1,200,000", 1.0),
    ("The answer is 42.", "42", 1.0),    # last number in free text
    ("2000", "2019", 0.0),               # two bare integers compare exactly (years, counts)
    ("2019", "2019", 1.0),
    ("none", "7", 0.0),
    ("-0.5", "-1/2", 1.0),
])
def test_numeric(pred, gold, expected):
    assert match_answer(pred, gold, "numeric") == expected, (pred, gold)


def test_numeric_tolerance_is_configurable():
    assert match_answer("105.0", "100.0", "numeric", rel_tol=0.01) == 0.0
    assert match_answer("105.0", "100.0", "numeric", rel_tol=0.06) == 1.0


@pytest.mark.parametrize("pred,letter", [
    ("(B)", "B"), ("B.", "B"), ("b", "B"), ("the answer is b", "B"), ("B. Paris", "B"),
    ("Option C is right", "C"), ("I think D", "D"), ("[E]", "E"), ("nothing here", None),
])
def test_extract_choice(pred, letter):
    assert extract_choice(pred) == letter


def test_choice_matching():
    assert match_answer("The answer is (c).", "C", "choice") == 1.0
    assert match_answer("(B)", "C", "choice") == 0.0
    assert match_answer("(B)", "(B)", "auto") == 1.0
    with pytest.raises(ValueError, match="not a letter"):
        match_answer("B", "Paris", "choice")


@pytest.mark.parametrize("gold,kind", [("B", "choice"), ("(C)", "choice"), ("3.5%", "numeric"), ("1,234", "numeric"),
                                       ("12 cm", "numeric"), ("Paris", "exact"), ("2019-05-01", "exact"), ("a", "exact")])
def test_auto_type(gold, kind):
    assert infer_answer_type(gold) == kind


def test_judge_callback():
    calls = []

    def judge(question, pred, gold):
        calls.append((question, pred, gold))
        return 0.7 if "tan" in pred else 0.0

    assert match_answer("it is tan", "The countertop is tan.", "judge", judge=judge, question="color?") == pytest.approx(0.7)
    assert calls == [("color?", "it is tan", "The countertop is tan.")]
    assert match_answer("x", "y", "judge", judge=lambda q, p, g: 5.0) == 1.0  # clamped into [0, 1]
    with pytest.raises(ValueError, match="judge"):
        match_answer("x", "y", "judge")


def test_missing_or_empty_answer_scores_zero():
    assert match_answer(None, "Paris") == 0.0
    assert match_answer("   ", "Paris") == 0.0
    with pytest.raises(ValueError, match="answer_type"):
        match_answer("a", "b", "fuzzy")


# -- DeepEyesV2 reward --------------------------------------------------------------------------

def test_deepeyesv2_correct_and_wrong():
    r = deepeyesv2_reward(inp())
    assert r.total == pytest.approx(1.0) and r.components["accuracy"] == 1.0 and r.components["format"] == 1.0
    assert deepeyesv2_reward(inp(answer="London")).total == pytest.approx(0.2)
    assert deepeyesv2_reward(inp(format_ok=False)).total == pytest.approx(0.8)


def test_deepeyesv2_long_answer_is_zero_accuracy_and_format_error():
    long = "Paris " + "x" * 294  # exactly 300 characters: the rule is >= 300
    assert len(long) == 300
    r = deepeyesv2_reward(inp(answer=long, gold=long, answer_type="exact"))
    assert r.total == 0.0 and r.components["long_answer"] == 1.0
    ok = long[:299]
    assert deepeyesv2_reward(inp(answer=ok, gold=ok, answer_type="exact")).total == pytest.approx(1.0)


def test_deepeyesv2_missing_answer():
    r = deepeyesv2_reward(inp(answer=None))
    assert r.total == 0.0 and r.components == {"accuracy": 0.0, "format": 0.0, "search_penalty": 0.0, "long_answer": 0.0}
    assert deepeyesv2_reward(inp(answer="")).total == 0.0


def test_deepeyesv2_search_penalty():
    used = dict(category="search", response_text="<think>x</think><tool_call>{\"name\": \"search\"}</tool_call>")
    assert deepeyesv2_reward(inp(**used)).total == pytest.approx(0.8 * 0.9 + 0.2)
    assert deepeyesv2_reward(inp(**used, answer="London")).total == pytest.approx(0.2)  # penalty scales acc only
    assert deepeyesv2_reward(inp(category="search", tool_names=["image_search"])).total == pytest.approx(0.92)
    # code use on a search task, or a tool call on a non-search task: no penalty
    assert deepeyesv2_reward(inp(category="search", tool_names=["code"], response_text="<code>x</code>")).total == pytest.approx(1.0)
    assert deepeyesv2_reward(inp(category="perception", tool_names=["search"],
                                 response_text="<tool_call>{}</tool_call>")).total == pytest.approx(1.0)


def test_judge_settles_free_form_auto_answers_only():
    calls = []

    def judge(q, p, g):
        calls.append(p)
        return 1.0

    assert deepeyesv2_reward(inp(answer="it is Paris"), judge=judge).total == pytest.approx(1.0)
    assert deepeyesv2_reward(inp(answer="Paris"), judge=judge).total == pytest.approx(1.0)  # rule already right
    assert deepeyesv2_reward(inp(answer="(B)", gold="C"), judge=judge).total == pytest.approx(0.2)  # letters: rules
    assert deepeyesv2_reward(inp(answer="7", gold="8"), judge=judge).total == pytest.approx(0.2)  # numbers: rules
    assert calls == ["it is Paris"]


# -- DeepEyes v1 reward -------------------------------------------------------------------------

def test_v1_tool_bonus_only_when_right():
    assert deepeyes_v1_reward(inp(tool_names=["code"])).total == pytest.approx(0.8 + 0.2 + 1.2)
    assert deepeyes_v1_reward(inp(tool_names=["code"], answer="London")).total == pytest.approx(0.2)
    assert deepeyes_v1_reward(inp()).total == pytest.approx(1.0)  # right but no tool


def test_v1_failed_call_penalty():
    i = inp(tool_names=["code", "code", "code"], failed_tool_calls=2)
    assert deepeyes_v1_reward(i).total == pytest.approx(2.2)  # off by default
    assert deepeyes_v1_reward(i, failed_call_penalty=0.1).total == pytest.approx(2.0)
    fn = get_reward_fn("deepeyes_v1", failed_call_penalty=0.1)
    assert fn(i).total == pytest.approx(2.0)


# -- registry, score, overlong --------------------------------------------------------------------

def test_registry():
    assert get_reward_fn("deepeyesv2")(inp()).total == pytest.approx(1.0)
    by_path = get_reward_fn("deepeyesv2.rewards:deepeyes_v1_reward")
    assert by_path is deepeyes_v1_reward
    assert by_path(inp(tool_names=["code"])).total == pytest.approx(2.2)
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward_fn("nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward_fn("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward_fn("deepeyesv2.rewards:no_such_fn")
    judge_fn = get_reward_fn("deepeyesv2", judge=lambda q, p, g: 1.0)
    assert judge_fn(inp(answer="anything", answer_type="judge")).total == pytest.approx(1.0)


def test_score_wraps_errors_naming_trajectory_and_function():
    def broken(i):
        raise KeyError("boom")

    with pytest.raises(RewardError, match=r"broken.*traj-7#3.*KeyError"):
        score(inp(id="traj-7#3"), broken)
    # a judge-typed prompt without a judge is an error, not a silent 0
    with pytest.raises(RewardError, match=r"deepeyesv2_reward.*p1#0.*judge"):
        score(inp(answer_type="judge"), get_reward_fn("deepeyesv2"))
    with pytest.raises(RewardError, match="non-finite"):
        score(inp(), lambda i: float("nan"))
    r = score(inp(), lambda i: 0.25)
    assert isinstance(r, RewardResult) and r.total == 0.25


@pytest.mark.parametrize("length,expected", [(0, 0.0), (80, 0.0), (90, -0.5), (100, -1.0), (150, -1.0)])
def test_overlong_penalty(length, expected):
    assert overlong_penalty(length, max_len=100, buffer=20, penalty=1.0) == pytest.approx(expected)


def test_overlong_penalty_off_and_scaled():
    assert overlong_penalty(10_000, max_len=100, buffer=0, penalty=1.0) == 0.0
    assert overlong_penalty(95, max_len=100, buffer=20, penalty=0.5) == pytest.approx(-0.375)


# -- from a trajectory ----------------------------------------------------------------------------

def FakeCall(name: str, status: str = "ok", error: str | None = None) -> ToolCallRecord:
    return ToolCallRecord(name=name, args={}, status=status, latency_s=0.0, error=error)


def FakeTrajectory(token_ids, loss_mask, prompt_len, tool_calls, answer, prompt) -> Trajectory:
    """A rollout Trajectory with only what rewards read set (turn_spans empty: turns come from the loss mask)."""
    return Trajectory(token_ids=token_ids, loss_mask=loss_mask, sample_logprobs=[0.0] * len(token_ids), images=[],
                      pixel_values=None, image_grid_thw=None, turn_spans=[], tool_calls=tool_calls,
                      stop_reason="answer", group_id=0, prompt_len=prompt_len, num_turns=2, answer=answer,
                      prompt_id=prompt.id, prompt=prompt)


class FakeProcessor:
    """decode(ids) for a toy vocabulary: each id is one word."""

    vocab = {1: "<think>a</think>", 2: "<tool_call>{\"name\": \"search\", \"arguments\": {\"query\": \"x\"}}</tool_call>",
             3: "<answer>Paris</answer>", 9: "[tool output]", 0: "[prompt]"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[i] for i in ids)


def test_reward_input_from_trajectory():
    traj = FakeTrajectory(
        token_ids=[0, 0, 1, 2, 9, 9, 1, 3], loss_mask=[0, 0, 1, 1, 0, 0, 1, 1], prompt_len=2,
        tool_calls=[FakeCall("search"), FakeCall("search", status="error", error="down")], answer="Paris",
        prompt=Prompt(id="p9", answer="paris", category="search", answer_type="exact", question="capital?"),
    )
    ri = reward_input_from_trajectory(traj, FakeProcessor())
    assert ri.tool_names == ["search", "search"] and ri.failed_tool_calls == 1
    assert ri.response_text.count("<tool_call>") == 1 and "[tool output]" not in ri.response_text
    assert ri.gold == "paris" and ri.category == "search" and ri.question == "capital?" and "p9" in ri.id
    assert ri.format_ok is True
    assert deepeyesv2_reward(ri).total == pytest.approx(0.8 * 0.9 + 0.2)
    traj.answer = None  # falls back to the last turn's <answer>
    assert reward_input_from_trajectory(traj, FakeProcessor()).answer == "Paris"
    traj.prompt = Prompt(id="p9")
    with pytest.raises(RewardError, match="p9.*gold"):
        reward_input_from_trajectory(traj, FakeProcessor())
