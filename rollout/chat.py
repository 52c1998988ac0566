"""Chat rendering: messages and images -> token ids, loss mask and vision inputs (the Qwen2.5-VL format pieces --
tokenizer wrapper, image processing, M-RoPE positions -- are rollout/qwen.py).

One implementation serves SFT data, RL prompts and the tool turns a rollout appends, so the token
layout at sampling time and at training time cannot drift apart. The layout is Qwen2-VL's:

    <|im_start|>role\\n ... <|vision_start|><|image_pad|> x N<|vision_end|> ... <|im_end|>\\n

with N = t*h*w / merge_size**2 for the image's patch grid (one pad per merged patch), exactly as
the real processor expands it.

Only this template writes control tokens. Text the environment produced (tool outputs, search results)
goes through `ChatProcessor.encode_plain` (rollout/qwen.py): a printed `<|im_start|>` or `<|image_pad|>` is spelled with
ordinary tokens, so it can neither open a fake turn nor unbalance the image blocks, and undecodable
characters become U+FFFD. Images the environment returns go through `fit_image` first.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .qwen import ChatFormatError, ChatProcessor

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory / ShareGPT marker for "an image goes here"

















@dataclass
class RenderedChat:
    """token_ids [L]; loss_mask [L] (1 on assistant tokens the model must learn); images in order of
    appearance with their vision inputs."""

    token_ids: list[int]
    loss_mask: list[int]
    images: list[Image.Image] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


def load_image(src: Any, base_dir: str | Path | None = None, *, where: str = "") -> Image.Image:
    """A PIL image from a PIL image, a path, raw bytes or a base64 / data-URI string; errors name `where`."""
    try:
        if isinstance(src, Image.Image):
            return src.convert("RGB")
        if isinstance(src, (bytes, bytearray)):
            im = Image.open(io.BytesIO(src))
        elif isinstance(src, str) and (src.startswith("data:image") or len(src) > 512):
            payload = src.split(",", 1)[1] if src.startswith("data:") else src
            im = Image.open(io.BytesIO(base64.b64decode(payload, validate=False)))
        elif isinstance(src, (str, Path)):
            p = Path(src)
            if not p.is_absolute() and base_dir is not None:
                p = Path(base_dir) / p
            if not p.exists():
                raise ChatFormatError(f"{where}: image file not found: {p}")
            im = Image.open(p)
        else:
            raise ChatFormatError(f"{where}: unsupported image reference of type {type(src).__name__}")
        im.load()
        return im.convert("RGB")
    except ChatFormatError:
        raise
    except Exception as e:  # PIL raises a zoo of types for corrupt data
        raise ChatFormatError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None


def _content_parts(content: Any, where: str) -> list[tuple[str, Any]]:
    """Normalise a message content to [("text", str) | ("image", ref-or-None)]."""
    if content is None:
        return []
    if isinstance(content, str):
        parts: list[tuple[str, Any]] = []
        chunks = content.split(IMAGE_PLACEHOLDER)
        for i, chunk in enumerate(chunks):
            if i > 0:
                parts.append(("image", None))
            if chunk:
                parts.append(("text", chunk))
        return parts
    if isinstance(content, list):
        parts = []
        for item in content:
            if isinstance(item, str):
                parts.extend(_content_parts(item, where))
            elif isinstance(item, dict) and item.get("type") == "text":
                parts.append(("text", str(item.get("text", ""))))
            elif isinstance(item, dict) and (item.get("type") in ("image", "image_url") or "image" in item):
                ref = item.get("image", item.get("image_url"))
                if isinstance(ref, dict):
                    ref = ref.get("url")
                parts.append(("image", ref))
            else:
                raise ChatFormatError(f"{where}: unsupported content item {str(item)[:80]!r}")
        return parts
    raise ChatFormatError(f"{where}: message content must be a string or a list, got {type(content).__name__}")


def render_chat(
    processor: ChatProcessor,
    messages: list[dict],
    images: list[Any] | None = None,
    *,
    base_dir: str | Path | None = None,
    train_roles: tuple[str, ...] = ("assistant",),
    add_generation_prompt: bool = False,
    default_system: str | None = DEFAULT_SYSTEM,
    name: str = "sample",
) -> RenderedChat:
    """Render a conversation. `images` fills image slots without an inline reference, in order.

    Loss mask is 1 on the content and closing `<|im_end|>` of turns whose role is in `train_roles`
    (the assistant's); everything the user or a tool wrote is 0.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{name}: 'messages' must be a non-empty list")
    pending = list(images or [])
    ids: list[int] = []
    mask: list[int] = []
    pil_images: list[Image.Image] = []

    def emit(tokens: list[int], train: bool) -> None:
        ids.extend(tokens)
        mask.extend([int(train)] * len(tokens))

    if messages[0].get("role") != "system" and default_system is not None:
        emit(processor.turn_header("system") + processor.encode(default_system) + processor.turn_footer(), False)
    for i, msg in enumerate(messages):
        where = f"{name}: message {i}"
        if not isinstance(msg, dict) or "role" not in msg:
            raise ChatFormatError(f"{where}: each message needs a 'role'")
        role = {"human": "user", "gpt": "assistant", "observation": "user", "tool": "user"}.get(msg["role"], msg["role"])
        train = role in train_roles
        emit(processor.turn_header(role), False)
        for kind, ref in _content_parts(msg.get("content", msg.get("value")), where):
            if kind == "text":
                emit(processor.encode(ref), train)
                continue
            if ref is None:
                if not pending:
                    raise ChatFormatError(f"{where}: more image placeholders than images")
                ref = pending.pop(0)
            pil_images.append(load_image(ref, base_dir, where=f"{where} image {len(pil_images)}"))
            emit([-1 - (len(pil_images) - 1)], False)  # placeholder, expanded below once grids are known
        emit([processor.im_end_id], train)
        emit(processor.encode("\n"), False)
    if pending:
        raise ChatFormatError(f"{name}: {len(pending)} image(s) given but no placeholder for them")
    if add_generation_prompt:
        emit(processor.turn_header("assistant"), False)

    vis = processor.image_inputs(pil_images)
    out_ids: list[int] = []
    out_mask: list[int] = []
    for tok, m in zip(ids, mask):
        if tok < 0:
            block = processor.image_block(vis.grid_thw[-1 - tok])
            out_ids.extend(block)
            out_mask.extend([0] * len(block))
        else:
            out_ids.append(tok)
            out_mask.append(m)
    return RenderedChat(
        token_ids=out_ids,
        loss_mask=out_mask,
        images=pil_images,
        pixel_values=vis.pixel_values if pil_images else None,
        image_grid_thw=vis.grid_thw if pil_images else None,
    )


