"""Training data: JSONL loading, SFT records -> packing.Samples, RL prompt records, resumable shuffling.

SFT records come in two layouts, both rendered by `deepeyesv2_rollout.chat.render_chat` so SFT tokens match
what the rollout produces:
  - ours / LLaMA-Factory "sharegpt" with role tags (what DeepEyesV2's released cold-start data uses):
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str | [{"type": "text"|"image", ...}]}],
     "images": [path, ...]}   with `<image>` placeholders in string contents filled from "images" in order;
  - LLaMA-Factory "sharegpt" with from/value: {"conversations": [{"from": "human"|"gpt"|"observation"|
    "function_call"|"system", "value": str}], "images": [...], "system": str (optional)}.
Only assistant turns (gpt, function_call) are trained; tool outputs (tool / observation) and user turns,
including user turns that carry tool results, have loss mask 0.
"""

from __future__ import annotations

import base64
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from deepeyesv2_rollout.chat import load_image, render_chat
from deepeyesv2_rollout.protocol import get_profile

from deepeyesv2_rollout.qwen import ChatFormatError, ChatProcessor
from deepeyesv2_rollout.types import Prompt

from .config import RolloutConfig
from .packing import Sample
from .rewards import ANSWER_TYPES

PROMPT_CATEGORIES = ("perception", "search", "reasoning", "integration")  # RealX-Bench's four
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # default of data.max_image_pixels: PIL's decompression-bomb warning size
MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's smart_resize refuses an image whose long side is over 200x the short one


class DataError(ValueError):
    """Bad training data. The message names the file and line (or record)."""


class DataWarning(UserWarning):
    """Tolerated bad data (e.g. corrupt lines skipped under max_bad_lines)."""


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------


def load_jsonl(path: str | Path, max_bad_lines: int = 0) -> list[dict]:
    """One dict per non-blank line. Each record gains "_source" (file name) and "_line" (1-based line).

    A line that is not a JSON object raises DataError naming file:line, unless at most `max_bad_lines`
    such lines occur: those are skipped and summarised in one DataWarning. A `.json` file holding a JSON
    array of objects (LLaMA-Factory's layout) is also accepted; "_line" is then the record's 1-based index.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".json":
        return _load_json_array(path)
    records: list[dict] = []
    bad: list[tuple[int, str]] = []
    with path.open("r", encoding="utf-8", errors="strict") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno + 1}: not UTF-8 text ({e})") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            except ValueError as e:
                bad.append((lineno, str(e)))
                if len(bad) > max_bad_lines:
                    raise DataError(
                        f"{path}:{lineno}: corrupt JSONL line ({e}); {len(bad)} bad line(s) so far, "
                        f"max_bad_lines={max_bad_lines}"
                    ) from None
                continue
            rec.setdefault("_source", path.name)
            rec.setdefault("_line", lineno)
            records.append(rec)
    if bad:
        where = ", ".join(str(n) for n, _ in bad[:10]) + (" ..." if len(bad) > 10 else "")
        warnings.warn(f"{path}: skipped {len(bad)} corrupt line(s) (lines {where}); max_bad_lines={max_bad_lines}",
                      DataWarning, stacklevel=2)
    return records


def _load_json_array(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, got {type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{i + 1}: record is not a JSON object")
        rec = dict(rec)
        rec.setdefault("_source", path.name)
        rec.setdefault("_line", i + 1)
        out.append(rec)
    return out


def record_name(rec: dict, index: int, source: str | None = None) -> str:
    """"file.jsonl:LINE" for a record from load_jsonl (or "source:index+1")."""
    return f"{source or rec.get('_source', 'records')}:{rec.get('_line', index + 1)}"


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def check_image(ref: Any, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int] | None:
    """(width, height) of an image file, data URI / base64 string or bytes, read from its header without
    decoding the pixels, after a structural check (PIL's `verify`: for PNG every chunk's CRC, which finds
    truncation and bit flips; formats without checksums, e.g. JPEG, are only fully checked when decoded).
    DataError naming `where` for an unreadable image, one over `max_pixels` (data.max_image_pixels) or one
    the vision processor would refuse (aspect ratio over 200). None for references it does not read
    (PIL images, dicts): those are checked when decoded."""
    if isinstance(ref, (bytes, bytearray)):
        src: Any = io.BytesIO(ref)
    elif isinstance(ref, str) and (ref.startswith("data:image") or len(ref) > 512):
        try:
            src = io.BytesIO(base64.b64decode(ref.split(",", 1)[1] if ref.startswith("data:") else ref))
        except ValueError as e:
            raise DataError(f"{where}: cannot decode image (invalid base64: {e})") from None
    elif isinstance(ref, (str, Path)):
        src = Path(ref)
        if not src.is_file():
            raise DataError(f"{where}: image not found: {src}")
    else:
        return None
    try:
        with warnings.catch_warnings():
            # the pixel cap below is ours (data.max_image_pixels); PIL's warning about the same would be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise DataError(f"{where}: image is {width}x{height} = {width * height:,} pixels, over "
                                    f"data.max_image_pixels={max_pixels:,}")
                im.verify()
    except DataError:
        raise
    except Image.DecompressionBombError as e:  # PIL refuses > 2x its limit before telling the size
        raise DataError(f"{where}: image is over data.max_image_pixels={max_pixels:,} ({e})") from None
    except Exception as e:  # PIL raises a zoo of types for corrupt data
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise DataError(f"{where}: image is {width}x{height}, an aspect ratio over {MAX_ASPECT_RATIO} that the "
                        f"vision processor refuses")
    return width, height


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------

# Roles as render_chat understands them. "tool" renders as a user turn (Qwen2.5-VL's template wraps tool
# output in a user turn) and is never trained; function_call is the assistant calling a tool.
_ROLE_MAP = {
    "system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
    "function_call": "assistant", "tool": "tool", "observation": "tool", "function": "tool",
}


def _function_call_text(value: Any) -> str:
    """LLaMA-Factory's qwen template renders a function_call turn as <tool_call>\\n{json}\\n</tool_call>."""
    if isinstance(value, str) and "<tool_call>" in value:
        return value
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False)
    return f"<tool_call>\n{value.strip()}\n</tool_call>"


def sft_messages(rec: dict, name: str) -> tuple[list[dict], list[Any]]:
    """(messages with roles system/user/assistant/tool, image refs) from either SFT layout."""
    if "messages" in rec:
        raw, role_key, content_key = rec["messages"], "role", "content"
    elif "conversations" in rec:
        raw, role_key, content_key = rec["conversations"], "from", "value"
    else:
        raise DataError(f"{name}: SFT record needs 'messages' or 'conversations' (keys: {sorted(k for k in rec if not k.startswith('_'))})")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{name}: '{'messages' if role_key == 'role' else 'conversations'}' must be a non-empty list")
    messages: list[dict] = []
    if isinstance(rec.get("system"), str) and rec["system"] and not (isinstance(raw[0], dict) and raw[0].get(role_key) == "system"):
        messages.append({"role": "system", "content": rec["system"]})
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or role_key not in msg:
            raise DataError(f"{name}: message {i} needs a '{role_key}' field")
        src_role = msg[role_key]
        role = _ROLE_MAP.get(src_role)
        if role is None:
            raise DataError(f"{name}: message {i} has unknown role {src_role!r} (known: {sorted(_ROLE_MAP)})")
        content = msg.get(content_key)
        if src_role == "function_call":
            content = _function_call_text(content)
        if role == "assistant" and (content is None or (isinstance(content, str) and not content.strip())
                                    or (isinstance(content, list) and not content)):
            raise DataError(f"{name}: message {i} is an empty assistant turn (a zero-length answer would train "
                            f"only its end-of-turn token)")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{name}: no assistant turn, nothing to train on")
    images = rec.get("images") or []
    if isinstance(images, (str, dict)):
        images = [images]
    if not isinstance(images, list):
        raise DataError(f"{name}: 'images' must be a list, got {type(images).__name__}")
    return messages, images


def _describe(ref: Any) -> str:
    if isinstance(ref, (str, Path)):
        s = str(ref)
        return s if len(s) <= 120 else s[:40] + f"...({len(s)} chars)"
    return type(ref).__name__


def _load_images(messages: list[dict], images: list[Any], base_dir: str | Path | None, name: str,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[list[dict], list[Any]]:
    """Decode every image up front so that an error names the record and the image reference."""
    def load(ref: Any, k: str) -> Any:
        if isinstance(ref, dict):  # {"path": ...} / {"bytes": ...} as datasets write them
            ref = ref.get("path") or ref.get("bytes") or ref.get("url") or ref.get("image")
        where = f"{name}: image {k} ({_describe(ref)})"
        # the header first: an oversized image is refused before its pixels are decoded (a missing file is
        # left to load_image, whose message says so)
        inline = isinstance(ref, (bytes, bytearray)) or (isinstance(ref, str) and (ref.startswith("data:") or len(ref) > 512))
        if inline:
            check_image(ref, where, max_pixels)
        elif isinstance(ref, (str, Path)):
            p = Path(ref) if Path(ref).is_absolute() or base_dir is None else Path(base_dir) / ref
            if p.is_file():
                check_image(p, where, max_pixels)
        try:
            return load_image(ref, base_dir, where=where)
        except ChatFormatError as e:
            raise DataError(str(e)) from None

    loaded = [load(ref, str(k)) for k, ref in enumerate(images)]
    out_msgs = []
    for i, m in enumerate(messages):
        content = m["content"]
        if isinstance(content, list):
            new = []
            for j, item in enumerate(content):
                if isinstance(item, dict) and item.get("type") != "text" and (item.get("type") in ("image", "image_url") or "image" in item):
                    ref = item.get("image", item.get("image_url"))
                    if isinstance(ref, dict):
                        ref = ref.get("url")
                    if ref is not None:
                        item = {"type": "image", "image": load(ref, f"in message {i} item {j}")}
                new.append(item)
            content = new
        out_msgs.append({"role": m["role"], "content": content})
    return out_msgs, loaded


def stage_system_prompt(rollout: RolloutConfig) -> str:
    """The system turn every stage (SFT, RL, eval, the demo) gives a record without one of its own:
    rollout.system_prompt, or the protocol profile's."""
    return rollout.system_prompt or get_profile(rollout.protocol).system_prompt


def trained_protocol(rollout: RolloutConfig) -> dict:
    """What a checkpoint records it was trained under (checkpoint.PROTOCOL_FILE)."""
    return {"protocol": rollout.protocol, "system_prompt": stage_system_prompt(rollout)}


def adopt_trained_protocol(rollout: RolloutConfig, trained: dict | None, source: str) -> str | None:
    """RL or eval starting from a checkpoint of ours (`trained`: checkpoint.read_protocol): an unset
    rollout.system_prompt takes the one the checkpoint was trained under, so every stage keeps one prompt.
    Returns the line to print (what was adopted, or what differs), None when nothing needs saying."""
    if trained is None:
        return None
    notes = []
    if not rollout.system_prompt and trained["system_prompt"] != stage_system_prompt(rollout):
        rollout.system_prompt = trained["system_prompt"]
        notes.append(f"system prompt: the one {source} was trained under ({trained['system_prompt'][:50]!r}...)")
    elif trained["system_prompt"] != stage_system_prompt(rollout):
        notes.append(f"warning: rollout.system_prompt differs from the one {source} was trained under "
                     f"({trained['system_prompt'][:50]!r}...)")
    if trained["protocol"] != rollout.protocol:
        notes.append(f"warning: rollout.protocol {rollout.protocol!r} but {source} was trained under "
                     f"{trained['protocol']!r} (set --rollout.protocol {trained['protocol']})")
    return "; ".join(notes) or None


def system_prompt_mismatch(records: list[dict], system: str, source: str | None = None) -> str | None:
    """A one-line warning when SFT records carry their own system turn other than `system` (the one RL and eval
    sample under): the model would learn the tools under one prompt and be asked under another."""
    other, first = 0, None
    for i, rec in enumerate(records):
        try:
            messages, _ = sft_messages(rec, record_name(rec, i, source))
        except DataError:
            continue  # reported when the record is rendered
        own = messages[0]["content"] if messages[0]["role"] == "system" else None
        if isinstance(own, str) and own != system:
            other += 1
            first = first or (record_name(rec, i, source), own)
    if not other:
        return None
    name, own = first
    return (f"{other} of {len(records)} SFT records carry a system prompt other than the one RL and eval use "
            f"(first at {name}: {own[:60]!r}...); set rollout.system_prompt to it so every stage uses the same")


def sft_sample(rec: dict, processor: ChatProcessor, base_dir: str | Path | None = None, name: str = "sample",
               max_image_pixels: int = MAX_IMAGE_PIXELS, system: str | None = None) -> Sample:
    """One SFT record -> Sample (loss mask 1 on assistant tokens only). system: the system turn of a record
    without one (stage_system_prompt; None: chat.DEFAULT_SYSTEM)."""
    messages, images = sft_messages(rec, name)
    messages, pil = _load_images(messages, images, base_dir, name, max_image_pixels)
    extra = {} if system is None else {"default_system": system}
    try:
        r = render_chat(processor, messages, pil, base_dir=base_dir, train_roles=("assistant",), name=name, **extra)
    except ChatFormatError as e:
        raise DataError(str(e)) from None
    if not any(r.loss_mask):
        raise DataError(f"{name}: every assistant turn is empty, nothing to train on")
    return Sample(
        input_ids=torch.tensor(r.token_ids, dtype=torch.long),
        loss_mask=torch.tensor(r.loss_mask, dtype=torch.long),
        pixel_values=r.pixel_values,
        image_grid_thw=r.image_grid_thw,
        name=name,
    )


def sft_samples(records: list[dict], processor: ChatProcessor, base_dir: str | Path | None = None, source: str | None = None,
                max_image_pixels: int = MAX_IMAGE_PIXELS, system: str | None = None) -> list[Sample]:
    """Render SFT records (from load_jsonl) into Samples named "file.jsonl:LINE". Bad records raise DataError."""
    return [sft_sample(rec, processor, base_dir, record_name(rec, i, source), max_image_pixels, system)
            for i, rec in enumerate(records)]


# ---------------------------------------------------------------------------------------------
# RL prompts
# ---------------------------------------------------------------------------------------------


def prompt_record(rec: dict, name: str, base_dir: str | Path | None = None, check_images: bool = True,
                  max_image_pixels: int = MAX_IMAGE_PIXELS) -> Prompt:
    """A validated RL Prompt. With `check_images`, every image is found and its header read (check_image):
    a missing, corrupt, oversized or extreme-aspect image fails here, naming `name` (file:line), not at the
    step that first samples the prompt."""
    def need(key: str, types: tuple, what: str) -> Any:
        if key not in rec or rec[key] is None:
            raise DataError(f"{name}: prompt record is missing '{key}'")
        if not isinstance(rec[key], types):
            raise DataError(f"{name}: '{key}' must be {what}, got {type(rec[key]).__name__}")
        return rec[key]

    pid = need("id", (str, int), "a string or integer")
    question = need("question", (str,), "a string")
    if not question.strip():
        raise DataError(f"{name}: 'question' is empty")
    answer = need("answer", (str, int, float, list), "a string or a list of strings")
    if isinstance(answer, list):
        if not answer or not all(isinstance(a, (str, int, float)) for a in answer):
            raise DataError(f"{name}: 'answer' list must be non-empty strings")
        answer = [str(a) for a in answer]
        if not all(a.strip() for a in answer):
            raise DataError(f"{name}: 'answer' list holds an empty string (rewards would match against nothing)")
    else:
        answer = str(answer)
        if not answer.strip():
            raise DataError(f"{name}: 'answer' is empty (rewards would match against nothing)")
    category = rec.get("category") or "reasoning"
    if not isinstance(category, str):
        raise DataError(f"{name}: 'category' must be a string, got {type(category).__name__}")
    answer_type = rec.get("answer_type") or "auto"
    if answer_type not in ANSWER_TYPES:
        raise DataError(f"{name}: 'answer_type' must be one of {ANSWER_TYPES}, got {answer_type!r}")
    images = rec.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list):
        raise DataError(f"{name}: 'images' must be a list, got {type(images).__name__}")
    resolved = []
    for k, ref in enumerate(images):
        if isinstance(ref, str) and not ref.startswith("data:") and len(ref) <= 512:
            p = Path(ref)
            if not p.is_absolute() and base_dir is not None:
                p = Path(base_dir) / p
            if check_images and not p.is_file():
                raise DataError(f"{name}: image {k} not found: {p}")
            ref = str(p)
        if check_images:
            check_image(ref, f"{name}: image {k} ({_describe(ref)})", max_image_pixels)
        resolved.append(ref)
    known = {"id", "question", "answer", "images", "category", "answer_type"}
    extra = {k: v for k, v in rec.items() if k not in known and not k.startswith("_")}
    return Prompt(id=str(pid), question=question, images=resolved, answer=answer, answer_type=answer_type,
                  category=category, metadata=extra)


def load_prompts(path: str | Path, image_root: str | Path | None = None, max_bad_lines: int = 0,
                 check_images: bool = True, max_image_pixels: int = MAX_IMAGE_PIXELS) -> list[Prompt]:
    """RL prompts from JSONL: {"id", "question", "images", "answer", "category", "answer_type"}; relative image
    paths resolve against `image_root` (default: the file's folder). Duplicate ids are an error."""
    path = Path(path)
    base = Path(image_root) if image_root else path.parent
    out: list[Prompt] = []
    seen: dict[str, str] = {}
    for i, rec in enumerate(load_jsonl(path, max_bad_lines=max_bad_lines)):
        name = record_name(rec, i)
        p = prompt_record(rec, name, base, check_images, max_image_pixels)
        if p.id in seen:
            raise DataError(f"{name}: duplicate prompt id {p.id!r} (first at {seen[p.id]})")
        seen[p.id] = name
        out.append(p)
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


# ---------------------------------------------------------------------------------------------
# Resumable shuffling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataState:
    """Where a pass over the data stands: `position` items into epoch `epoch` of a `seed`-shuffled order."""

    epoch: int = 0
    position: int = 0
    seed: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "DataState":
        return cls(epoch=int(d["epoch"]), position=int(d["position"]), seed=int(d["seed"]))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The permutation of range(n) for one epoch; a pure function of (n, seed, epoch)."""
    if not shuffle:
        return list(range(n))
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


class ShuffledIterator:
    """Endless (or `max_epochs`-long) iterator over indices of n items, reshuffled each epoch.

    `state` after k items is exactly where a new iterator built from it continues: it yields the same
    indices the original would have yielded next.
    """

    def __init__(self, n: int, state: DataState | None = None, shuffle: bool = True, max_epochs: int | None = None):
        if n <= 0:
            raise ValueError(f"ShuffledIterator needs at least one item, got n={n}")
        self.n, self.shuffle, self.max_epochs = n, shuffle, max_epochs
        self.state = state or DataState()
        if not 0 <= self.state.position <= n:
            raise ValueError(f"DataState.position={self.state.position} is outside 0..{n} (was the data set changed?)")
        self._order = epoch_order(n, self.state.seed, self.state.epoch, shuffle)

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        s = self.state
        if s.position >= self.n:
            s = DataState(epoch=s.epoch + 1, position=0, seed=s.seed)
            self._order = epoch_order(self.n, s.seed, s.epoch, self.shuffle)
        if self.max_epochs is not None and s.epoch >= self.max_epochs:
            self.state = s
            raise StopIteration
        idx = self._order[s.position]
        self.state = DataState(epoch=s.epoch, position=s.position + 1, seed=s.seed)
        return idx

    def take(self, k: int) -> list[int]:
        """The next k indices (fewer only when max_epochs runs out)."""
        out = []
        for _ in range(k):
            try:
                out.append(next(self))
            except StopIteration:
                break
        return out
