"""The DeepEyesV2 tool protocol: parse one assistant turn into an action, check a trajectory's format.

An assistant turn is ``<think>...</think>`` followed by exactly one of

    <code>\\n```python\\n...\\n```\\n</code>
    <tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>
    <tool_call>{"name": "image_search"}</tool_call>
    <answer>...</answer>                                   (ends the episode)

`parse_action` is lenient (it takes the first action and ignores what follows it, so a generation that
ran past ``</tool_call>`` still executes the call it made) and reports malformed actions with an error
line the policy reads as its next user turn. `format_ok` is strict and is what the format reward uses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

SYSTEM_PROMPT = (
    "You are a helpful assistant that answers questions about images. Think step by step inside "
    "<think>...</think>, then take exactly one action:\n"
    "- run Python on the images (preloaded as image_1, image_2, ...; images you show are returned to you):\n"
    "<code>\n```python\n...\n```\n</code>\n"
    '- search the web: <tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>\n'
    '- search by image: <tool_call>{"name": "image_search"}</tool_call>\n'
    "- or give the final answer: <answer>...</answer>"
)

ACTION_TAGS = {"code": ("<code>", "</code>"), "tool": ("<tool_call>", "</tool_call>"), "answer": ("<answer>", "</answer>")}
# Special tokens that may close a turn; anything else after the action breaks the format.
TURN_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)


@dataclass
class Action:
    """What the policy asked for. kind: "code" | "tool" | "answer" | "invalid".
    has_action_tag is False when the turn contained no action tag at all (the policy just stopped talking)."""

    kind: str
    code: str | None = None
    tool_name: str | None = None
    tool_args: dict = field(default_factory=dict)
    answer: str | None = None
    error: str | None = None
    has_action_tag: bool = True


def _invalid(error: str, has_action_tag: bool = True) -> Action:
    return Action(kind="invalid", error=error, has_action_tag=has_action_tag)


def strip_turn_end(text: str) -> str:
    """Drop a trailing <|im_end|> / <|endoftext|> (and whitespace) the policy may have closed its turn with."""
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for tok in TURN_END_TOKENS:
            if text.endswith(tok):
                text = text[: -len(tok)].rstrip()
                changed = True
    return text


def _first_action_open(body: str) -> tuple[str, int] | None:
    hits = [(body.find(open_), kind) for kind, (open_, _) in ACTION_TAGS.items() if open_ in body]
    if not hits:
        return None
    pos, kind = min(hits)
    return kind, pos


def parse_tool_call(payload: str) -> tuple[str, dict] | str:
    """(name, args) from a <tool_call> JSON payload, or an error line."""
    try:
        obj = json.loads(payload.strip())
    except json.JSONDecodeError as e:
        return f"malformed JSON in <tool_call>: {e.msg} at char {e.pos}"
    if not isinstance(obj, dict):
        return f"<tool_call> must hold a JSON object, got {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return '<tool_call> JSON needs a string "name"'
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return f'malformed JSON in <tool_call> "arguments": {e.msg}'
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return f'<tool_call> "arguments" must be a JSON object, got {type(args).__name__}'
    return name, args


def parse_action(text: str) -> Action:
    """The action of one assistant turn (decoded with special tokens kept)."""
    if "<|im_start|>" in text:
        # The policy started a new chat turn inside its own (a known failure mode): the context would no
        # longer follow the chat layout, so nothing in this turn is executed.
        return _invalid("the turn contains <|im_start|>; write one action and stop")
    text = strip_turn_end(text)
    m = _THINK.match(text)
    body = text[m.end():] if m else text
    if not m and "</think>" in text:
        body = text.split("</think>", 1)[1]
    first = _first_action_open(body)
    if first is None:
        for kind, (_, close) in ACTION_TAGS.items():
            if close in body:
                return _invalid(f"{close} without a matching {ACTION_TAGS[kind][0]}")
        return _invalid("no action: expected <code>, <tool_call> or <answer> after </think>", has_action_tag=False)
    kind, pos = first
    open_, close = ACTION_TAGS[kind]
    start = pos + len(open_)
    end = body.find(close, start)
    if end < 0:
        return _invalid(f"unterminated {open_}: close it with {close}")
    inner = body[start:end]
    if kind == "answer":
        return Action(kind="answer", answer=inner.strip())
    if kind == "code":
        fence = _FENCE.search(inner)
        if fence is None:
            return _invalid("<code> must contain a fenced block: ```python\\n...\\n```")
        code = fence.group(1)
        if not code.strip():
            return _invalid("the ```python block in <code> is empty")
        return Action(kind="code", code=code, tool_name="code", tool_args={"code": code})
    parsed = parse_tool_call(inner)
    if isinstance(parsed, str):
        return _invalid(parsed)
    name, args = parsed
    return Action(kind="tool", tool_name=name, tool_args=args)


def turn_format_ok(text: str, final: bool) -> bool:
    """One turn: a single think block, exactly one well-formed action, nothing after it but a turn end.
    The final turn must answer; the others must call a tool or run code."""
    if "<|im_start|>" in text:
        return False
    text = strip_turn_end(text)
    m = _THINK.match(text)
    if m is None or "<think>" in m.group(1):
        return False
    body = text[m.end():]
    if "<think>" in body or "</think>" in body:
        return False
    action = parse_action(text)
    if action.kind == "invalid" or (action.kind == "answer") != final:
        return False
    open_, close = ACTION_TAGS[action.kind]
    if not body.startswith(open_) or body.count(open_) != 1 or body.count(close) != 1:
        return False
    if not body.endswith(close):  # trailing text: e.g. a hallucinated <tool_response> after </tool_call>
        return False
    other_tags = [t for k, pair in ACTION_TAGS.items() if k != action.kind for t in pair]
    return not any(t in body for t in other_tags)


def format_ok(turn_texts: list[str]) -> bool:
    """Well-formed think/action structure over a whole trajectory ending in an answer."""
    if not turn_texts:
        return False
    return all(turn_format_ok(t, final=(i == len(turn_texts) - 1)) for i, t in enumerate(turn_texts))


def invalid_action_feedback(action: Action) -> str:
    """The user-turn text telling the policy what was wrong with its last action."""
    return f"Error: {action.error}"
