"""DeepEyesV2 protocol: parsing each action kind, malformed actions, known failure modes, format checks."""

from __future__ import annotations

import pytest

from deepeyesv2_rollout.protocol import format_ok, parse_action, strip_turn_end, turn_format_ok
from deepeyesv2_rollout.types import SamplingParams

CODE = "<think>crop it</think><code>\n```python\nx = image_1.crop((0, 0, 10, 10))\nx\n```\n</code>"
SEARCH = '<think>look up</think><tool_call>{"name": "search", "arguments": {"query": "red tower"}}</tool_call>'
IMSEARCH = '<think>what is this</think><tool_call>{"name": "image_search"}</tool_call>'
ANSWER = "<think>so</think><answer> 42 </answer>"


def test_code_action():
    a = parse_action(CODE)
    assert a.kind == "code" and a.code == "x = image_1.crop((0, 0, 10, 10))\nx\n"
    assert a.tool_name == "code" and a.tool_args == {"code": a.code}
    assert parse_action(CODE.replace("```python", "```")).kind == "code"  # bare fence accepted


def test_tool_actions():
    a = parse_action(SEARCH)
    assert (a.kind, a.tool_name, a.tool_args) == ("tool", "search", {"query": "red tower"})
    a = parse_action(IMSEARCH)
    assert (a.kind, a.tool_name, a.tool_args) == ("tool", "image_search", {})
    # double-encoded arguments (some models emit them) and whitespace/newlines around the JSON
    a = parse_action('<think>x</think><tool_call>\n{"name": "search", "arguments": "{\\"query\\": \\"a\\"}"}\n</tool_call>')
    assert a.tool_args == {"query": "a"}


def test_answer_action_and_turn_end():
    a = parse_action(ANSWER + "<|im_end|>")
    assert (a.kind, a.answer) == ("answer", "42")
    assert strip_turn_end("abc <|im_end|>\n<|endoftext|>") == "abc"


@pytest.mark.parametrize(
    "text, error",
    [
        ('<think>a</think><tool_call>{"name": "search", "arguments": {"query": }</tool_call>', "malformed JSON in <tool_call>"),
        ('<think>a</think><tool_call>["search"]</tool_call>', "must hold a JSON object"),
        ('<think>a</think><tool_call>{"arguments": {}}</tool_call>', 'needs a string "name"'),
        ('<think>a</think><tool_call>{"name": "search", "arguments": [1]}</tool_call>', '"arguments" must be a JSON object'),
        ("<think>a</think><code>\nprint(1)\n</code>", "fenced block"),
        ("<think>a</think><code>\n```python\n\n```\n</code>", "empty"),
        ("<think>a</think><code>\n```python\nprint(1)\n```", "unterminated <code>"),
        ("<think>a</think><answer>3", "unterminated <answer>"),
        ("<think>a</think>3</answer>", "</answer> without a matching <answer>"),
        ("<think>a</think>I think it is 3.", "no action"),
        ("<think>a</think><|im_start|>user\nhi", "<|im_start|>"),
    ],
)
def test_invalid_actions_have_clear_errors(text, error):
    a = parse_action(text)
    assert a.kind == "invalid" and error in a.error, a.error


def test_no_action_flag_distinguishes_silence_from_malformed():
    assert parse_action("<think>done</think>").has_action_tag is False
    assert parse_action("<think>a</think><answer>3").has_action_tag is True


def test_think_may_mention_tags_and_first_action_wins():
    # an <answer> mentioned inside <think> must not count as the action
    a = parse_action("<think>I will not <answer> yet</think>" + SEARCH.split("</think>")[1])
    assert a.kind == "tool"
    # generation that did not stop after </tool_call> (hallucinated tool response): the call still runs
    a = parse_action(SEARCH + "<tool_response>made up</tool_response><answer>1</answer>")
    assert a.kind == "tool" and a.tool_args == {"query": "red tower"}


def test_format_ok():
    assert format_ok([CODE, SEARCH, IMSEARCH, ANSWER + "<|im_end|>"])
    assert format_ok([ANSWER])
    assert not format_ok([])
    assert not format_ok([CODE])  # never answered
    assert not format_ok([ANSWER, ANSWER])  # answer before the end
    assert not format_ok([CODE.replace("<think>crop it</think>", ""), ANSWER])  # missing think
    assert not format_ok([SEARCH + "<tool_response>x</tool_response>", ANSWER])  # ran past </tool_call>
    assert not format_ok([CODE + "<|im_start|>user", ANSWER])
    assert not format_ok(["<think>a</think><think>b</think>" + ANSWER.split("</think>")[1]])
    assert not format_ok(["<think>a</think>some text <answer>1</answer>"])  # text between think and action
    assert not format_ok(['<think>a</think><tool_call>{"name": }</tool_call>', ANSWER])
    assert turn_format_ok(SEARCH + "\n<|im_end|>", final=False)


def test_sampling_params_validation():
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=0).logprob_temperature == 1.0
    assert SamplingParams(temperature=0.5).logprob_temperature == 0.5
    assert SamplingParams().stop == ["</code>", "</tool_call>", "</answer>"]
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            SamplingParams(**bad)
