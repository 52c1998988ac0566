"""The DeepEyesV2 tool protocol: parse one assistant turn into an action, check a trajectory's format.

An assistant turn is ``<think>...</think>`` followed by exactly one of

    <code>\\n```python\\n...\\n```\\n</code>
    <tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>
    <tool_call>{"name": "image_search"}</tool_call>
    <answer>...</answer>                                   (ends the episode)

`parse_action` is lenient (it takes the first action and ignores what follows it, so a generation that
ran past ``</tool_call>`` still executes the call it made) and reports malformed actions with an error
line the policy reads as its next user turn. `format_ok` is strict and is what the format reward uses.

A `ProtocolProfile` owns every template of the protocol around those actions: the system prompt, how a tool's
output is laid out as the next user turn, the text the environment opens the next assistant turn with, the
stop strings, the strings never sampled, how many returned images one round keeps and how they are resized, and
which fenced block of a <code> turn runs. Two profiles (`PROFILES`, config `rollout.protocol`):
- "ours": this project's layout (the default; the demo and the tests' recorded values use it);
- "deepeyesv2": the layout of the released DeepEyesV2 code, which its checkpoints and cold-start data were
  trained on (code results as `Code execution result:` + fenced stdout / stderr + `Images:`, the next turn
  opened with `<think>`, stops `</code>` / `</tool_call>`, `<|endoftext|>` `<size>` `<|im_start|>` banned, at most
  10 images per round resized to a short side of 32 px or more, the last fenced block executed). The prompt's
  wording is ours.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from .qwen import fit_image

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


def parse_action(text: str, code_block: str = "first") -> Action:
    """The action of one assistant turn (decoded with special tokens kept). code_block: which fenced block of
    a <code> action runs, "first" or "last" (DeepEyesV2 runs the last)."""
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
        fences = list(_FENCE.finditer(inner))
        fence = (fences[-1] if code_block == "last" else fences[0]) if fences else None
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


# -- profiles ---------------------------------------------------------------------------------------------------

CODE_BLOCKS = ("first", "last")

DEEPEYESV2_SYSTEM_PROMPT = (
    "You are a helpful assistant that answers questions about images. Reason step by step inside "
    "<think>...</think>, then either call one tool or answer.\n"
    "- Python: write code in a Jupyter notebook whose variables persist between calls; the i-th input image is "
    "already loaded as image_i (a PIL image). Put one fenced block inside <code>:\n"
    "<code>\n```python\n...\n```\n</code>\n"
    "Its stdout, stderr and the images shown with plt.show() come back to you.\n"
    '- Web search: <tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>\n'
    '- Image search with the input image: <tool_call>{"name": "image_search"}</tool_call>\n'
    "Call one tool per turn. When you are sure, give the final answer: <answer>...</answer>"
)


def _deepeyesv2_resize(im: Image.Image) -> tuple[Image.Image | None, str | None]:
    """The released rule for returned images: a side ratio over 200 is brought down (the long side to at most
    150x the short one), then a short side under 32 px is scaled up to 32. Silent, as there: no note."""
    w, h = im.size
    if w < 1 or h < 1:
        return None, "dropped: it has no pixels"
    long_side, short_side = max(w, h), min(w, h)
    if long_side / short_side > 200:
        old = long_side / short_side
        ratio = min(150, old / 2)
        target_long = int(short_side * ratio)
        other = int(short_side * old / ratio)
        w, h = (other, target_long) if h > w else (target_long, other)
        im = im.resize((max(1, w), max(1, h)), Image.Resampling.LANCZOS)
        w, h = im.size
    if min(w, h) < 32:
        scale = 32 / min(w, h)
        im = im.resize((math.ceil(w * scale), math.ceil(h * scale)), Image.Resampling.LANCZOS)
    return im, None


@dataclass(frozen=True)
class ProtocolProfile:
    """Every template of one protocol layout (see the module doc). The episode loop writes observations from
    these fields (episode.EpisodeRunner.add_observation); the sampling fields go into SamplingParams
    (`sampling_fields`)."""

    name: str
    system_prompt: str  # the system turn of every stage (config rollout.system_prompt overrides it)
    code_template: str  # a code call's text: {stdout} and {stderr} are the sandbox's (truncated) streams
    images_intro: str  # between a tool's text and its returned images (before the image blocks)
    intro_joined: bool  # tokenize the tool's text and images_intro as one string (else each on its own)
    think_prefill: str  # written by the environment (loss mask 0) after every assistant header that follows a tool turn
    stop: tuple[str, ...]  # stop strings of a policy turn (<|im_end|> and eos always stop)
    banned: tuple[str, ...]  # strings the policy can never sample (one token, or the last token of their encoding)
    max_images_per_round: int | None  # images one tool call gives back (the rest dropped); None: no cap
    code_block: str  # which fenced block of a <code> action runs: first | last
    # how a returned image is made processable: image -> (image or None to drop it, a note for the policy or None)
    resize: Callable[[Image.Image], tuple[Image.Image | None, str | None]]

    def __post_init__(self) -> None:
        if self.code_block not in CODE_BLOCKS:
            raise ValueError(f"profile {self.name}: code_block must be one of {CODE_BLOCKS}, got {self.code_block!r}")

    def sampling_fields(self, processor) -> dict:
        """SamplingParams fields of this profile: stop strings, and the banned strings as token ids (a string
        that is one token) or token sequences (one of several tokens: its last token is masked wherever the
        context ends with the others, as vLLM's bad_words do)."""
        ids, seqs = set(), []
        for text in self.banned:
            enc = tuple(processor.encode(text))
            if not enc:
                raise ValueError(f"profile {self.name}: banned string {text!r} encodes to no tokens")
            if len(enc) == 1:
                ids.add(enc[0])
            else:
                seqs.append(enc)
        return {"stop": list(self.stop), "banned_token_ids": tuple(sorted(ids)), "banned_sequences": tuple(seqs)}

    def check_sampling(self, sampling, processor) -> None:
        """Raise when `sampling` lacks this profile's stop strings or bans (the turns would then not follow
        the layout the profile writes around them)."""
        want = self.sampling_fields(processor)
        missing = [s for s in want["stop"] if s not in sampling.stop]
        missing += [f"banned token {t}" for t in want["banned_token_ids"] if t not in sampling.banned_token_ids]
        missing += [f"banned sequence {list(q)}" for q in want["banned_sequences"] if q not in sampling.banned_sequences]
        if missing:
            raise ValueError(f"sampling lacks what protocol profile {self.name!r} needs: {missing}; build it with "
                             f"SamplingParams(..., **profile.sampling_fields(processor))")

    def parse(self, text: str) -> Action:
        return parse_action(text, code_block=self.code_block)

    def code_text(self, stdout: str, stderr: str) -> str:
        return self.code_template.format(stdout=stdout, stderr=stderr)

    def fit_images(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[str]]:
        """The images one tool call returns, as they enter the context, and a note for each one changed (shown
        to the policy). At most max_images_per_round are kept."""
        if self.max_images_per_round is not None:
            images = images[: self.max_images_per_round]
        kept, notes = [], []
        for k, im in enumerate(images, 1):
            fitted, did = self.resize(im)
            if did is not None:
                notes.append(f"[returned image {k} ({im.width}x{im.height}) was {did}]")
            if fitted is not None:
                kept.append(fitted)
        return kept, notes


OURS = ProtocolProfile(
    name="ours",
    system_prompt=SYSTEM_PROMPT,
    code_template="Code execution result:\nstdout:\n{stdout}\nstderr:\n{stderr}",
    images_intro="\n",
    intro_joined=False,
    think_prefill="",
    stop=("</code>", "</tool_call>", "</answer>"),
    banned=(),
    max_images_per_round=None,
    code_block="first",
    resize=fit_image,  # pads extreme strips, and says so
)

DEEPEYESV2 = ProtocolProfile(
    name="deepeyesv2",
    system_prompt=DEEPEYESV2_SYSTEM_PROMPT,
    code_template="Code execution result:\nstdout:\n```\n{stdout}\n```\n\nstderr:\n```\n{stderr}\n```",
    images_intro="\n\nImages:\n",
    intro_joined=True,
    think_prefill="<think>",
    stop=("</code>", "</tool_call>"),
    banned=("<|endoftext|>", "<size>", "<|im_start|>"),
    max_images_per_round=10,
    code_block="last",
    resize=_deepeyesv2_resize,
)

PROFILES = {p.name: p for p in (OURS, DEEPEYESV2)}


def get_profile(name: str) -> ProtocolProfile:
    if name not in PROFILES:
        raise ValueError(f"rollout.protocol must be one of {tuple(PROFILES)}, got {name!r}")
    return PROFILES[name]
