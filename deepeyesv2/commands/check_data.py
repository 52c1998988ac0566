"""`deepeyesv2 check-data FILE`: validate an SFT or RL data file before training on it.

    deepeyesv2 check-data data.jsonl [--kind auto|sft|rl] [--image-root DIR] [--model tiny] [--max-problems 20]
                                     [--protocol ours|deepeyesv2] [--system-prompt TEXT]

It runs the loaders the trainer runs (`deepeyesv2.data`: JSONL / JSON-array parsing, SFT rendering with image
and `<image>` placeholder checks, RL prompt validation with image headers) on every record instead of stopping
at the first bad one, and adds what the loaders accept but training would silently get wrong:

  - SFT trajectories whose assistant turns break the tool protocol (`deepeyesv2_rollout.protocol.format_ok`, the
    rule the format reward applies): e.g. an `<answer>` without `<think>` trains the policy to write turns that
    score format 0;
  - SFT system prompts other than the one every stage uses (`--system-prompt`, else the `--protocol` profile's,
    as rollout.system_prompt / rollout.protocol): SFT would teach under another prompt than RL and eval sample
    with (records without one get the stage's);
  - RL questions that hold `<image>` placeholders (the rollout puts the record's images before the question
    itself, so the placeholders would be doubled), and record keys RL does not read (`system`, ...).

Prints counts, then the first problems as `file:line: ...`. Exit 0: no problems (notes may be printed);
1: problems found; 2: the file cannot be read or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from deepeyesv2.data import DataError, DataWarning, load_jsonl, prompt_record, record_name, sft_messages, sft_sample
from deepeyesv2.model import load_processor
from deepeyesv2_rollout.chat import IMAGE_PLACEHOLDER
from deepeyesv2_rollout.protocol import PROFILES, SYSTEM_PROMPT, format_ok, get_profile, parse_action, turn_format_ok

RL_KEYS = ("id", "question", "answer", "images", "category", "answer_type")


@dataclass
class Report:
    """What one pass over a file found: counts for the summary, problems (file:line: what) and notes."""

    kind: str
    records: int = 0
    ok: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    tokens: list[int] = field(default_factory=list)
    first_system_mismatch: str = ""  # SFT: the first record whose system prompt is another than the stage's


def detect_kind(records: list[dict]) -> str:
    """"sft" (messages / conversations) or "rl" (question), from the first record that says."""
    for rec in records:
        if "messages" in rec or "conversations" in rec:
            return "sft"
        if "question" in rec:
            return "rl"
    raise DataError("no record has 'messages' / 'conversations' (SFT) or 'question' (RL): pass --kind")


def _text(content) -> str:
    """The text of a message content (a string, or a list of parts of which the text parts count)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def protocol_slip(turns: list[str]) -> str | None:
    """None when `format_ok(turns)` (the format reward's rule) holds; else which assistant turn breaks it and how.
    The verdict is format_ok's; the words only explain it."""
    if format_ok(turns):
        return None
    for i, text in enumerate(turns):
        final = i == len(turns) - 1
        if turn_format_ok(text, final):
            continue
        where = f"assistant turn {i + 1} of {len(turns)}"
        action = parse_action(text)
        if not text.lstrip().startswith("<think>") or "</think>" not in text:
            return f"{where} has no <think>...</think> before its action"
        if action.kind == "invalid":
            return f"{where}: {action.error}"
        if final and action.kind != "answer":
            return f"{where} is the last but does not <answer> (it calls {action.tool_name})"
        if not final and action.kind == "answer":
            return f"{where} answers before the last turn"
        return f"{where} has more than its one action (a second tag or text after the closing tag)"
    return "the trajectory does not follow the protocol"


def check_sft(records: list[dict], processor, base_dir: Path, rep: Report, stage_prompt: str = SYSTEM_PROMPT) -> None:
    for i, rec in enumerate(records):
        name = record_name(rec, i)
        rep.records += 1
        try:
            messages, _ = sft_messages(rec, name)
            sample = sft_sample(rec, processor, base_dir, name, system=stage_prompt)
        except DataError as e:
            rep.problems.append(str(e))
            continue
        rep.tokens.append(len(sample.input_ids))
        rep.counts["images"] += 0 if sample.image_grid_thw is None else len(sample.image_grid_thw)
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        rep.counts["system: the stage's" if system == stage_prompt else
                   "system: none" if system is None else "system: another"] += 1
        if system is not None and system != stage_prompt and not rep.first_system_mismatch:
            rep.first_system_mismatch = name
        turns = [_text(m["content"]) for m in messages if m["role"] == "assistant"]
        slip = protocol_slip(turns)
        if slip:
            rep.problems.append(f"{name}: protocol: {slip} (format_ok is false: the format reward scores such a "
                                f"trajectory 0)")
            continue
        rep.counts["tool turns"] += len(turns) - 1
        rep.ok += 1
    if other := rep.counts["system: another"]:
        rep.notes.append(f"{other} record(s) train under another system prompt than every stage uses "
                         f"(--system-prompt, else the protocol's; rollout.system_prompt in training): first at "
                         f"{rep.first_system_mismatch}; set rollout.system_prompt to it so RL and eval use it too")


def check_rl(records: list[dict], base_dir: Path, rep: Report) -> None:
    seen: dict[str, str] = {}
    unread: Counter = Counter()
    for i, rec in enumerate(records):
        name = record_name(rec, i)
        rep.records += 1
        try:
            prompt = prompt_record(rec, name, base_dir)
        except DataError as e:
            rep.problems.append(str(e))
            continue
        if prompt.id in seen:
            rep.problems.append(f"{name}: duplicate prompt id {prompt.id!r} (first at {seen[prompt.id]})")
            continue
        seen[prompt.id] = name
        n = prompt.question.count(IMAGE_PLACEHOLDER)
        if n:
            rep.problems.append(f"{name}: the question holds {n} {IMAGE_PLACEHOLDER} placeholder(s): the rollout puts "
                                f"the record's {len(prompt.images)} image(s) before the question itself, so drop them")
            continue
        unread.update(k for k in prompt.metadata)
        rep.counts["images"] += len(prompt.images)
        rep.counts[f"category {prompt.category}"] += 1
        rep.counts[f"answer_type {prompt.answer_type}"] += 1
        rep.ok += 1
    if unread:
        keys = ", ".join(f"{k} ({n})" for k, n in unread.most_common())
        rep.notes.append(f"keys RL does not read (kept as trajectory metadata): {keys}"
                         + ("; the system prompt of RL rollouts is protocol.SYSTEM_PROMPT" if "system" in unread else ""))


def summary(path: Path, rep: Report, max_problems: int) -> str:
    lines = [f"{path}: {rep.kind.upper()} data, {rep.records} record(s): {rep.ok} ok, {rep.records - rep.ok} with problems"]
    if rep.kind == "sft":
        parts = [f"{rep.counts['images']} image(s)", f"{rep.counts['tool turns']} tool-call turn(s) in the ok records"]
        if rep.tokens:
            parts.append(f"tokens per record {min(rep.tokens)} / {int(statistics.median(rep.tokens))} / "
                         f"{max(rep.tokens)} (min / median / max)")
        parts.append("system prompt: " + ", ".join(f"{rep.counts[k]} {k.removeprefix('system: ')}"
                                                   for k in ("system: the stage's", "system: another", "system: none")))
        lines += ["  " + p for p in parts]
    else:
        lines.append(f"  {rep.counts['images']} image(s); " + ", ".join(
            f"{k} {n}" for k, n in sorted(rep.counts.items()) if k.startswith(("category", "answer_type"))))
    lines += [f"  note: {n}" for n in rep.notes]
    if rep.problems:
        lines.append(f"problems (first {min(max_problems, len(rep.problems))} of {len(rep.problems)}):")
        lines += [f"  {p}" for p in rep.problems[:max_problems]]
    return "\n".join(lines)


def check_file(path: Path, kind: str = "auto", image_root: str = "", model: str = "tiny",
               stage_prompt: str = SYSTEM_PROMPT) -> Report:
    """Every record of `path` through the trainer's loaders and the checks above. DataError when the file itself
    cannot be read (missing, not UTF-8, not a JSON array)."""
    with warnings.catch_warnings(record=True) as caught:  # corrupt lines: counted and listed, not fatal here
        warnings.simplefilter("always", DataWarning)
        records = load_jsonl(path, max_bad_lines=sys.maxsize)
    kind = detect_kind(records) if kind == "auto" else kind
    rep = Report(kind=kind)
    # "FILE: skipped N corrupt line(s) (lines ...); max_bad_lines=..." -- the cap is ours here, not the user's
    rep.problems += [str(w.message).split("; max_bad_lines=")[0] for w in caught if issubclass(w.category, DataWarning)]
    base = Path(image_root) if image_root else path.parent
    if kind == "sft":
        check_sft(records, load_processor(model), base, rep, stage_prompt)  # tokenizer + image processor, as sft.py renders with
    else:
        check_rl(records, base, rep)
    if not records:
        rep.problems.append(f"{path}: no records")
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deepeyesv2 check-data", description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path, help="JSONL (or a JSON array) of SFT trajectories or RL prompts")
    ap.add_argument("--kind", choices=("auto", "sft", "rl"), default="auto",
                    help="auto: SFT if records have messages / conversations, RL if they have a question")
    ap.add_argument("--image-root", default="", help="relative image paths resolve against this (data.image_root; "
                                                     "default: the file's folder)")
    ap.add_argument("--model", default="tiny", help="the processor SFT records are rendered with (model.name_or_path)")
    ap.add_argument("--max-problems", type=int, default=20, help="problems listed (all are counted)")
    ap.add_argument("--protocol", choices=tuple(PROFILES), default="ours",
                    help="the rollout.protocol the data is for (its system prompt is the default stage prompt)")
    ap.add_argument("--system-prompt", default="", help="the rollout.system_prompt training will use (default: the protocol's)")
    args = ap.parse_args(argv)
    try:
        stage_prompt = args.system_prompt or get_profile(args.protocol).system_prompt
        rep = check_file(args.file, args.kind, args.image_root, args.model, stage_prompt)
    except (DataError, ValueError) as e:
        print(f"deepeyesv2 check-data: {e}", file=sys.stderr)
        return 2
    print(summary(args.file, rep, args.max_problems))
    return 1 if rep.problems else 0


if __name__ == "__main__":
    sys.exit(main())
