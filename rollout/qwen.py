"""The Qwen2.5-VL format, in one place: the tokenizer + image-processor wrapper (`ChatProcessor`, with the
special-token ids and the plain encoding of environment text), image fitting, 3-D M-RoPE positions, and the
forward helpers that merge image features into the token embeddings (model passed in). Chat rendering --
messages to token ids and loss masks -- is rollout/chat.py, on top of this."""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image


# Qwen2-VL's smart_resize raises ("absolute aspect ratio must be smaller than 200") above this long:short ratio.
MAX_ASPECT_RATIO = 200
# A padded image is never larger than the largest image a tool may return (SandboxLimits.max_image_pixels).
MAX_FIT_PIXELS = 4096 * 4096

# transformers' split_special_tokens sets a flag on the shared Rust tokenizer for the call and leaves it set
# until the next call resets it; two threads encoding at once could each see the other's setting. Every
# ChatProcessor encode holds this lock.
_ENCODE_LOCK = threading.Lock()
_SURROGATE = re.compile("[\ud800-\udfff]")


def sanitize_text(text: str | bytes) -> str:
    """Text any tokenizer takes. Bytes decode as UTF-8 with U+FFFD for what is not; in a str, a lone
    surrogate (os.listdir gives U+DC80..U+DCFF for undecodable file-name bytes, JSON can carry "\\ud800")
    becomes U+FFFD and a surrogate pair stored as two code points becomes its character. Valid text is
    returned unchanged (the same object)."""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", "replace")
    if not _SURROGATE.search(text):
        return text
    # UTF-16 round trip: pairs re-join, the decoder replaces each unpaired surrogate with one U+FFFD
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _max_padded_long_side() -> int:
    """The longest side whose canvas, padded to MAX_ASPECT_RATIO, stays within MAX_FIT_PIXELS."""
    side = math.isqrt(MAX_ASPECT_RATIO * MAX_FIT_PIXELS)
    while side * math.ceil(side / MAX_ASPECT_RATIO) > MAX_FIT_PIXELS:
        side -= 1
    return side


_MAX_PADDED_LONG_SIDE = _max_padded_long_side()


def fit_image(im: Image.Image) -> tuple[Image.Image | None, str | None]:
    """An image the Qwen2-VL processor accepts, and what was done to it (None when nothing was).

    No pixels (0 x h): dropped (None). Long side over MAX_ASPECT_RATIO times the short one (a 400x1 strip):
    padded with black at the bottom / right up to that ratio, so the content keeps its coordinates; a strip
    too long for a padded canvas within MAX_FIT_PIXELS is shrunk first. Every other image is returned as is,
    the same object, so ordinary images reach the processor exactly as before."""
    w, h = im.size
    if w < 1 or h < 1:
        return None, "dropped: it has no pixels"
    long_side, short_side = max(w, h), min(w, h)
    if long_side <= MAX_ASPECT_RATIO * short_side:
        return im, None
    did = []
    if long_side > _MAX_PADDED_LONG_SIDE:
        scale = _MAX_PADDED_LONG_SIDE / long_side
        im = im.resize((max(1, min(_MAX_PADDED_LONG_SIDE, round(w * scale))),
                        max(1, min(_MAX_PADDED_LONG_SIDE, round(h * scale)))), Image.Resampling.BICUBIC)
        w, h = im.size
        did.append(f"shrunk to {w}x{h}")
    short_needed = math.ceil(max(w, h) / MAX_ASPECT_RATIO)
    size = (max(w, short_needed), h) if h > w else (w, max(h, short_needed))
    canvas = Image.new(im.mode, size)  # zeros: black
    canvas.paste(im, (0, 0))
    did.append(f"padded to {size[0]}x{size[1]} with black (aspect ratio over {MAX_ASPECT_RATIO}:1)")
    return canvas, " and ".join(did)


class ChatFormatError(ValueError):
    """A sample that cannot be rendered (bad image, bad message structure). The message names the sample."""


@dataclass
class ImageInputs:
    """Vision inputs for a list of images, in order. pixel_values: [P, C*tps*p*p] fp32; grid_thw: [N, 3] int64."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor


@dataclass
class ChatProcessor:
    """Tokenizer + Qwen2-VL image processor, with the ids of the chat's special tokens."""

    tokenizer: Any
    image_processor: Any

    def __post_init__(self) -> None:
        ids = self.tokenizer.convert_tokens_to_ids
        self.im_start_id = ids("<|im_start|>")
        self.im_end_id = ids("<|im_end|>")
        self.image_pad_id = ids("<|image_pad|>")
        self.vision_start_id = ids("<|vision_start|>")
        self.vision_end_id = ids("<|vision_end|>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.im_end_id
        unk = self.tokenizer.unk_token_id
        for name in ("im_start_id", "im_end_id", "image_pad_id", "vision_start_id", "vision_end_id"):
            if getattr(self, name) is None or getattr(self, name) == unk:
                raise ValueError(f"tokenizer lacks the Qwen2-VL special token for {name}")
        if self.im_start_id in self.encode_plain("<|im_start|>"):
            # a tokenizer that ignores split_special_tokens would let tool output open chat turns
            raise ValueError(f"tokenizer {type(self.tokenizer).__name__} does not honour split_special_tokens")
        self.merge_size = int(self.image_processor.merge_size)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ChatProcessor":
        """Load from a local directory laid out like a Qwen2.5-VL checkpoint (tokenizer + preprocessor_config)."""
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"processor directory not found: {path}")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
        return cls(tokenizer=tokenizer, image_processor=image_processor)

    # -- text ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Our own text (template pieces, the policy's turns in scripts and data): special tokens are parsed."""
        with _ENCODE_LOCK:
            return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_plain(self, text: str | bytes) -> list[int]:
        """Environment text (tool outputs, search results): sanitized (`sanitize_text`), and special-token
        strings are split into ordinary tokens. Text without special tokens gets exactly `encode`'s ids."""
        with _ENCODE_LOCK:
            return self.tokenizer.encode(sanitize_text(text), add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- images -------------------------------------------------------------------------------
    def image_inputs(self, images: list[Image.Image]) -> ImageInputs:
        """Resize + patchify images exactly as Qwen2-VL's processor does."""
        if not images:
            return ImageInputs(torch.zeros(0, 0), torch.zeros(0, 3, dtype=torch.long))
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return ImageInputs(out["pixel_values"].float(), out["image_grid_thw"].long())

    def num_image_tokens(self, grid_thw: torch.Tensor | list[int]) -> int:
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // (self.merge_size**2)

    def image_block(self, grid_thw: torch.Tensor | list[int]) -> list[int]:
        return [self.vision_start_id] + [self.image_pad_id] * self.num_image_tokens(grid_thw) + [self.vision_end_id]

    # -- turns ----------------------------------------------------------------------------------
    def turn_header(self, role: str) -> list[int]:
        return [self.im_start_id] + self.encode(f"{role}\n")

    def turn_footer(self) -> list[int]:
        return [self.im_end_id] + self.encode("\n")


def mrope_position_ids(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_token_id: int, spatial_merge_size: int
) -> torch.Tensor:
    """Qwen2.5-VL 3-D positions for ONE sequence: [3, L] int64.

    Text tokens advance all three rows together; an image's merged patches get (t, h, w) grid positions
    offset by the current position, and text resumes at offset + max(h, w) / merge (the grid's extent),
    exactly as transformers' `get_rope_index` does for still images.
    """
    ids = input_ids.tolist()
    L = len(ids)
    pos = torch.empty(3, L, dtype=torch.long)
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw]
    gi = 0
    i = 0
    cur = 0
    while i < L:
        if ids[i] != image_token_id:
            j = i
            while j < L and ids[j] != image_token_id:
                j += 1
            pos[:, i:j] = torch.arange(cur, cur + j - i)
            cur += j - i
            i = j
            continue
        if gi >= len(grids):
            raise ChatFormatError("more <|image_pad|> blocks than images")
        t, h, w = grids[gi]
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        n = t * gh * gw
        if ids[i : i + n] != [image_token_id] * n or (i + n < L and ids[i + n] == image_token_id):
            run = i
            while run < L and ids[run] == image_token_id:
                run += 1
            raise ChatFormatError(f"image {gi} has {run - i} <|image_pad|> tokens but its grid {t}x{h}x{w} needs {n}")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        pos[0, i : i + n] = tt.reshape(-1) + cur
        pos[1, i : i + n] = hh.reshape(-1) + cur
        pos[2, i : i + n] = ww.reshape(-1) + cur
        cur += max(gh, gw)
        i += n
        gi += 1
    if gi != len(grids):
        raise ChatFormatError(f"{len(grids)} images but only {gi} <|image_pad|> blocks")
    return pos


def image_embeddings(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Vision tower + merger: [P, D] patches -> [N_tokens, H] one row per <|image_pad|>."""
    out = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    return torch.cat(list(out.pooler_output), dim=0)


def embed_inputs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with image features scattered into the <|image_pad|> slots: [T, H]."""
    embeds = model.model.get_input_embeddings()(input_ids)
    if pixel_values is not None and image_grid_thw is not None and image_grid_thw.shape[0]:
        feats = image_embeddings(model, pixel_values, image_grid_thw).to(embeds.dtype)
        slots = input_ids == model.config.image_token_id
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"{int(slots.sum())} <|image_pad|> tokens but the images give {feats.shape[0]} features")
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), feats)
    return embeds
