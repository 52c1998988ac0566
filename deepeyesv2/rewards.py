"""Rewards for RL and answer matching for evaluation -- pure functions over plain values.

One answer matcher (`match_answer`) serves both the RL rewards and evaluation, so "correct" means the
same thing in both places. Reward functions take a `RewardInput` (plain values, no rollout types) and
return a `RewardResult(total, components)`; `score` wraps a call so that a failing reward function
raises a `RewardError` naming the trajectory and the function instead of silently scoring 0; `score_batch` scores
a batch from a thread pool, so that the judge requests of a batch (deepeyesv2.judge) go out together.

Rules (from DeepEyesV2's released `verl/utils/reward_score/deepeyesv2.py`):
  deepeyesv2:  0.8 * acc * (1 - 0.1 [search task and a <tool_call> used]) + 0.2 * format
               answers of 300+ characters: acc = 0 and a format error (an anti-judge-hacking rule)
  deepeyes_v1: 0.8 * acc + 0.2 * format + 1.2 * [a tool was called and acc > 0.5]
               (optionally - failed_call_penalty * failed tool calls)
"""

from __future__ import annotations

import math
import re
import string
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from deepeyesv2_rollout.protocol import format_ok as protocol_format_ok
from deepeyesv2_rollout.types import Trajectory

from .config import REWARD_NAMES, import_callable

ANSWER_TYPES = ("auto", "exact", "numeric", "choice", "judge")
MAX_ANSWER_CHARS = 300  # DeepEyesV2: `len(answer_text) >= 300` -> accuracy 0 and a format error
SEARCH_TOOL_PENALTY = 0.1  # DeepEyesV2: search tasks lose 10% of the accuracy term when <tool_call> was used
SEARCH_TOOL_NAMES = ("search", "image_search")  # the tools called through <tool_call> (code uses <code>)

Judge = Callable[[str, str, str], float]  # judge(question, pred, gold) -> score in [0, 1]


class RewardError(RuntimeError):
    """A reward function failed; the message names the trajectory and the function."""


# ---------------------------------------------------------------------------------------------
# Answer matching
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "“”‘’«»。，、：；！？"})


def _unwrap_latex(s: str) -> str:
    s = re.sub(r"\\boxed\{(.*)\}", r"\1", s)
    s = re.sub(r"\\(?:text|textbf|mathrm)\{(.*?)\}", r"\1", s)
    return s.replace("$", "")


def normalize_answer(s: str | None) -> str:
    """SQuAD-style: lower case, no punctuation, no articles (a/an/the), single spaces; \\boxed{} unwrapped."""
    if s is None:
        return ""
    s = _unwrap_latex(str(s)).lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


_SCALES = {"thousand": 1e3, "k": 1e3, "million": 1e6, "mn": 1e6, "billion": 1e9, "bn": 1e9, "trillion": 1e12}
_NUM = r"[-+−]?(?:\d+(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
# A whole answer that *is* a number: optional currency, the number (or a fraction a/b), an optional percent or
# scale word, and at most three short unit words ("12 cm", "$5", "3.5%", "1.2 million people", "5k").
_STRICT = re.compile(
    rf"^[$€£¥]?\s*(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?\s*(?P<pct>%|percent\b)?\s*"
    r"(?:(?P<scale>thousand|million|billion|trillion|mn|bn|k)\b)?\s*(?P<unit>(?:[^\W\d_]+\.?|[°²³/])(?:\s*(?:[^\W\d_]+\.?|[°²³/])){0,2})?$",
    re.IGNORECASE,
)
_ANY_NUM = re.compile(rf"(?<![\w.]){_NUM}(?:\s*/\s*{_NUM})?(?:\s*%)?")


@dataclass(frozen=True)
class ParsedNumber:
    value: float
    percent: bool = False
    plain_int: bool = False  # written as a bare integer ("2019", "1,234"): compared exactly, not with tolerance


def _to_float(num: str) -> float:
    return float(num.replace(",", "").replace("−", "-"))


def parse_number(s: str | None, strict: bool = True) -> ParsedNumber | None:
    """The number an answer states, or None. strict: the whole string must be a number (plus units);
    otherwise the last number in the text is taken ("the answer is 42" -> 42)."""
    if s is None:
        return None
    s = _unwrap_latex(str(s)).strip().rstrip(".").strip()
    m = _STRICT.match(s)
    if m is None:
        if strict:
            return None
        hits = [h.group(0) for h in _ANY_NUM.finditer(s)]
        return parse_number(hits[-1], strict=True) if hits else None
    try:
        value = _to_float(m.group("num"))
        if m.group("den"):
            value /= _to_float(m.group("den"))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    scale = (m.group("scale") or "").lower()
    value *= _SCALES.get(scale, 1.0)
    plain = not (m.group("den") or m.group("pct") or scale) and re.fullmatch(r"[-+−]?[\d,]+", m.group("num")) is not None
    return ParsedNumber(value, percent=bool(m.group("pct")), plain_int=plain)


def _numbers_match(p: ParsedNumber, g: ParsedNumber, rel_tol: float) -> bool:
    if p.plain_int and g.plain_int:
        return p.value == g.value  # counts and years: 2000 is not "within 1%" of 2019
    candidates = [p.value]
    if p.percent != g.percent:  # "35%" vs "0.35"
        candidates += [p.value / 100, p.value * 100]
    return any(math.isclose(c, g.value, rel_tol=rel_tol, abs_tol=1e-9) for c in candidates)


def extract_choice(s: str | None) -> str | None:
    """The multiple-choice letter (A-J) an answer picks: "(B)", "B.", "b", "the answer is b" -> "B"."""
    if s is None:
        return None
    t = _unwrap_latex(str(s)).strip()
    m = re.fullmatch(r"[\(\[]?\s*([A-Ja-j])\s*[\)\]\.:]?", t)
    if m:
        return m.group(1).upper()
    m = re.match(r"^[\(\[]([A-Ja-j])[\)\]]", t) or re.match(r"^([A-J])[\.\):](?:\s|$)", t)
    if m:
        return m.group(1).upper()
    hits = re.findall(r"(?:answer|option|choice)\s*(?:is|:|=)?\s*[\(\[]?([A-Ja-j])\b[\)\]]?", t, re.IGNORECASE)
    if hits:
        return hits[-1].upper()
    letters = set(re.findall(r"(?<![\w'])([A-J])(?![\w'])", t))
    if len(letters) > 1:
        letters.discard("I")  # the pronoun in "I think B"
    return letters.pop() if len(letters) == 1 else None


def infer_answer_type(gold: str) -> str:
    """auto -> choice (gold is a single letter A-J), numeric (gold parses as a number), else exact."""
    if re.fullmatch(r"[\(\[]?\s*[A-J]\s*[\)\]\.]?", str(gold).strip()):
        return "choice"
    if parse_number(gold, strict=True) is not None:
        return "numeric"
    return "exact"


def _match_one(pred: str, gold: str, answer_type: str, rel_tol: float, judge: Judge | None, question: str) -> float:
    kind = infer_answer_type(gold) if answer_type == "auto" else answer_type
    if kind == "exact":
        return float(normalize_answer(pred) == normalize_answer(gold))
    if kind == "numeric":
        g = parse_number(gold, strict=True) or parse_number(gold, strict=False)
        if g is None:
            raise ValueError(f"answer_type 'numeric' but the gold answer {gold!r} has no number")
        p = parse_number(pred, strict=True) or parse_number(pred, strict=False)
        return float(p is not None and _numbers_match(p, g, rel_tol))
    if kind == "choice":
        g = extract_choice(gold)
        if g is None:
            raise ValueError(f"answer_type 'choice' but the gold answer {gold!r} is not a letter A-J")
        return float(extract_choice(pred) == g)
    if kind == "judge":
        if judge is None:
            raise ValueError("answer_type 'judge' needs a judge(question, pred, gold) callback; none was given")
        v = float(judge(question, pred, gold))
        if not math.isfinite(v):
            raise ValueError(f"judge returned {v} for pred {pred[:60]!r}")
        return min(1.0, max(0.0, v))
    raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")


def match_answer(
    pred: str | None,
    gold: str | list[str],
    answer_type: str = "auto",
    rel_tol: float = 1e-2,
    judge: Judge | None = None,
    question: str = "",
) -> float:
    """Score in [0, 1] of `pred` against `gold` (any of a list). Missing or empty pred -> 0.

    answer_type: exact | numeric | choice | judge | auto (per gold: choice, numeric, else exact).
    Numbers compare with relative tolerance `rel_tol`, except two bare integers, which must be equal.
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    golds = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    if not golds or any(g is None for g in golds):
        raise ValueError(f"gold answer must be a string or a non-empty list of strings, got {gold!r}")
    if pred is None or not str(pred).strip():
        return 0.0
    best = 0.0
    for g in golds:
        best = max(best, _match_one(str(pred), str(g), answer_type, rel_tol, judge, question))
        if best >= 1.0:
            break
    return best


# ---------------------------------------------------------------------------------------------
# Reward functions
# ---------------------------------------------------------------------------------------------


@dataclass
class RewardInput:
    """What a reward function sees of one trajectory (plain values, no rollout types)."""

    answer: str | None  # the text inside <answer>...</answer>, None if the policy never answered
    gold: str | list[str]
    answer_type: str = "auto"
    category: str = ""  # perception | search | reasoning | integration | ...
    question: str = ""
    format_ok: bool = True
    tool_names: list[str] = field(default_factory=list)  # every tool call, in order
    failed_tool_calls: int = 0
    response_text: str = ""  # the policy's own turns, joined
    id: str = "?"


@dataclass
class RewardResult:
    total: float
    components: dict[str, float] = field(default_factory=dict)


RewardFn = Callable[[RewardInput], RewardResult]


def _accuracy_and_format(inp: RewardInput, judge: Judge | None, rel_tol: float, long_answer_rule: bool,
                         judge_free_form: bool = True) -> tuple[float, float, float]:
    """(accuracy, format, long_answer flag). judge_free_form: free-form answers the rules reject go to the judge too."""
    fmt = 1.0 if inp.format_ok else 0.0
    answer = inp.answer.strip() if inp.answer is not None else ""
    if not answer:
        return 0.0, 0.0, 0.0  # DeepEyesV2: no answer text is a format error; accuracy 0 (never an exception)
    if long_answer_rule and len(answer) >= MAX_ANSWER_CHARS:
        # DeepEyesV2: "Penalize for model trying to predict longer answer to hack llm-as-judge"
        return 0.0, 0.0, 1.0
    acc = match_answer(answer, inp.gold, inp.answer_type, rel_tol=rel_tol, judge=judge, question=inp.question)
    if acc < 1.0 and judge is not None and judge_free_form and inp.answer_type == "auto" and _free_form(inp.gold):
        # DeepEyesV2 judges accuracy with an LLM; rules settle letters and numbers and the easy free-form
        # cases, the judge (when given) the rest: "it is pink" vs "pink".
        acc = match_answer(answer, inp.gold, "judge", judge=judge, question=inp.question)
    return acc, fmt, 0.0


def _free_form(gold: str | list[str]) -> bool:
    golds = gold if isinstance(gold, (list, tuple)) else [gold]
    return any(infer_answer_type(str(g)) == "exact" for g in golds)


def used_tool_call(inp: RewardInput) -> bool:
    """Whether the policy used a `<tool_call>` (search / image search; code goes through `<code>`)."""
    return "<tool_call>" in inp.response_text or any(n in SEARCH_TOOL_NAMES for n in inp.tool_names)


def deepeyesv2_reward(inp: RewardInput, judge: Judge | None = None, rel_tol: float = 1e-2,
                      judge_free_form: bool = True) -> RewardResult:
    """0.8 * acc * (1 - 0.1 * [search task and <tool_call> used]) + 0.2 * format (DeepEyesV2's
    `compute_score_search`: `0.8 * acc_reward * (1 - search_penalty) + 0.2 * format_reward`)."""
    acc, fmt, long_answer = _accuracy_and_format(inp, judge, rel_tol, long_answer_rule=True, judge_free_form=judge_free_form)
    penalty = SEARCH_TOOL_PENALTY if inp.category == "search" and used_tool_call(inp) else 0.0
    total = 0.8 * acc * (1.0 - penalty) + 0.2 * fmt
    return RewardResult(total, {"accuracy": acc, "format": fmt, "search_penalty": penalty, "long_answer": long_answer})


def deepeyes_v1_reward(
    inp: RewardInput, judge: Judge | None = None, rel_tol: float = 1e-2, failed_call_penalty: float = 0.0,
    judge_free_form: bool = True,
) -> RewardResult:
    """0.8 * acc + 0.2 * format + 1.2 * [tool called and acc > 0.5] - failed_call_penalty * failed calls."""
    acc, fmt, _ = _accuracy_and_format(inp, judge, rel_tol, long_answer_rule=False, judge_free_form=judge_free_form)
    tool = 1.0 if inp.tool_names and acc > 0.5 else 0.0
    failed = failed_call_penalty * inp.failed_tool_calls
    total = 0.8 * acc + 0.2 * fmt + 1.2 * tool - failed
    return RewardResult(total, {"accuracy": acc, "format": fmt, "tool": tool, "failed_call_penalty": failed})


REWARD_FNS: dict[str, Callable[..., RewardResult]] = {
    "deepeyesv2": deepeyesv2_reward,
    "deepeyes_v1": deepeyes_v1_reward,
}
# config.py validates `rl.reward` against REWARD_NAMES before anything is built; the two must not drift
assert tuple(REWARD_FNS) == REWARD_NAMES, (tuple(REWARD_FNS), REWARD_NAMES)


def get_reward_fn(name: str, **params: Any) -> RewardFn:
    """A reward function by name ("deepeyesv2", "deepeyes_v1") or import path ("package.module:function").
    `params` (e.g. judge=..., failed_call_penalty=0.1) are bound as keyword arguments; None values are dropped."""
    if name in REWARD_FNS:
        fn = REWARD_FNS[name]
    elif ":" in name:
        fn = import_callable(name, "reward")
    else:
        raise ValueError(f"unknown reward {name!r}: use one of {sorted(REWARD_FNS)} or 'package.module:function'")
    params = {k: v for k, v in params.items() if v is not None}
    return partial(fn, **params) if params else fn


def build_reward_fn(name: str, judge: Judge | None = None, judge_free_form: bool = True) -> RewardFn:
    """The reward `name` with the judge bound: a built-in gets `judge` and `judge_free_form`; a
    "package.module:function" reward gets `judge=` only, and only when there is a judge."""
    if judge is None:
        return get_reward_fn(name)
    if name in REWARD_FNS:
        return get_reward_fn(name, judge=judge, judge_free_form=judge_free_form)
    return get_reward_fn(name, judge=judge)


def _fn_name(fn: Callable) -> str:
    while isinstance(fn, partial):
        fn = fn.func
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def score(inp: RewardInput, reward_fn: RewardFn) -> RewardResult:
    """Run `reward_fn` on one trajectory. Any exception (or a non-finite total) becomes a RewardError that
    names the trajectory id and the function -- never a silent 0. A bare float return is accepted."""
    tid = getattr(inp, "id", "?")
    try:
        out = reward_fn(inp)
    except Exception as e:
        raise RewardError(f"reward function {_fn_name(reward_fn)} failed on trajectory {tid}: {type(e).__name__}: {e}") from e
    if isinstance(out, (int, float)):
        out = RewardResult(float(out), {})
    if not isinstance(out, RewardResult):
        raise RewardError(f"reward function {_fn_name(reward_fn)} returned {type(out).__name__} for trajectory {tid}; "
                          "expected RewardResult or float")
    if not math.isfinite(out.total):
        raise RewardError(f"reward function {_fn_name(reward_fn)} returned a non-finite reward {out.total} for trajectory {tid}")
    return out


def score_batch(inputs: list[RewardInput], reward_fn: RewardFn, workers: int = 1) -> list[RewardResult]:
    """`score` of every input, in order. workers > 1: from a pool of that many threads, so that the judge calls of
    the batch (each blocking on the service) are in flight together; the judge itself bounds its requests."""
    if workers <= 1 or len(inputs) <= 1:
        return [score(inp, reward_fn) for inp in inputs]
    with ThreadPoolExecutor(max_workers=min(workers, len(inputs)), thread_name_prefix="reward") as pool:
        return list(pool.map(lambda inp: score(inp, reward_fn), inputs))


def overlong_penalty(length: int, max_len: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO soft overlong punishment: 0 up to max_len - buffer, then linear down to -penalty at max_len
    (and -penalty beyond). buffer <= 0 turns it off."""
    if buffer <= 0:
        return 0.0
    start = max_len - buffer
    if length <= start:
        return 0.0
    return -penalty * min(1.0, (length - start) / buffer)


# ---------------------------------------------------------------------------------------------
# From a rollout Trajectory
# ---------------------------------------------------------------------------------------------

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def policy_turn_texts(token_ids, loss_mask, processor, start: int = 0) -> list[str]:
    """Decode each maximal run of loss_mask == 1 (one policy turn) after `start`; special tokens kept so
    that format checks see a stray `<|im_start|>`."""
    ids = [int(t) for t in token_ids]
    mask = [int(m) for m in loss_mask]
    turns, i = [], start
    while i < len(ids):
        if mask[i]:
            j = i
            while j < len(ids) and mask[j]:
                j += 1
            turns.append(processor.decode(ids[i:j], skip_special_tokens=False))
            i = j
        else:
            i += 1
    return turns


def trajectory_turn_texts(traj: Trajectory, processor: Any) -> list[str]:
    """The policy's turns as text: `traj.turn_texts` if the rollout filled it, else decoded from
    `turn_spans`, else from the runs of loss_mask == 1 after the prompt."""
    if traj.turn_texts:
        return list(traj.turn_texts)
    if traj.turn_spans:
        return [processor.decode([int(t) for t in traj.token_ids[a:b]], skip_special_tokens=False) for a, b in traj.turn_spans]
    return policy_turn_texts(traj.token_ids, traj.loss_mask, processor, start=traj.prompt_len)


def trajectory_id(traj: Trajectory) -> str:
    return f"{traj.prompt_id or '?'}#{traj.sample_index}"


def reward_input_from_trajectory(traj: Trajectory, processor: Any) -> RewardInput:
    """A RewardInput from a rollout Trajectory: the policy's turns (decoded), its tool calls, its answer, and
    the gold answer, answer type, category and question of the Prompt it ran (`traj.prompt`)."""
    tid = trajectory_id(traj)
    p = traj.prompt
    if p is None or p.answer is None:
        raise RewardError(f"trajectory {tid}: its prompt has no gold 'answer'")
    turns = trajectory_turn_texts(traj, processor)
    answer = traj.answer
    if answer is None and turns:
        m = _ANSWER_RE.findall(turns[-1])
        answer = m[-1].strip() if m else None
    return RewardInput(
        answer=answer,
        gold=p.answer,
        answer_type=p.answer_type or "auto",
        category=p.category or "",
        question=p.question or "",
        format_ok=bool(protocol_format_ok(turns)),
        tool_names=[c.name for c in traj.tool_calls],
        failed_tool_calls=sum(1 for c in traj.tool_calls if c.status != "ok"),
        response_text="\n".join(turns),
        id=tid,
    )
