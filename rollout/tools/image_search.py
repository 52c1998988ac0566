"""Image search by perceptual hash (``imagehash.phash``) over a small local image set.

``ImageIndex.from_directory(dir)`` reads ``dir/titles.jsonl`` ({"file": ..., "title": ...} per
line); ``ImageIndex.synthetic()`` draws a deterministic index in memory whose titles are entities
of the shipped text corpus, so an image search leads on to a text search. Result text::

    <tool_response>
    Image search results for image_1:
    [1] <title> (hash distance 3)
    ...
    </tool_response>

with the hit images returned in the same order.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import imagehash
from PIL import Image, ImageDraw

from .base import ToolResult, error_result
from .search import load_corpus, wrap_response

COLOR_RGB = {"teal": (0, 128, 128), "crimson": (220, 20, 60), "ochre": (204, 119, 34),
             "violet": (143, 0, 255), "amber": (255, 191, 0), "indigo": (75, 0, 130),
             "scarlet": (255, 36, 0), "olive": (128, 128, 0), "silver": (192, 192, 192),
             "turquoise": (64, 224, 208), "magenta": (255, 0, 255), "saffron": (244, 196, 48),
             "cobalt": (0, 71, 171), "emerald": (80, 200, 120), "maroon": (128, 0, 0),
             "lilac": (200, 162, 200)}


@dataclass
class ImageHit:
    title: str
    image: Image.Image
    distance: int


def draw_entity_image(seed: int, color: str | None = None, size: int = 224) -> Image.Image:
    """A deterministic picture (shapes on a background of the entity's color, if it has one)."""
    rng = random.Random(seed)
    bg = COLOR_RGB.get(color or "", tuple(rng.randrange(256) for _ in range(3)))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    for _ in range(rng.randint(4, 9)):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        x1, y1 = x0 + rng.randint(20, size // 2), y0 + rng.randint(20, size // 2)
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return im


class ImageIndex:
    """Titles + images, searched by Hamming distance between 64-bit perceptual hashes."""

    def __init__(self, entries: list[tuple[str, Image.Image]]):
        if not entries:
            raise ValueError("ImageIndex needs at least one (title, image) entry")
        self.entries = [(str(t), im.convert("RGB")) for t, im in entries]
        self._hashes = [imagehash.phash(im) for _, im in self.entries]

    @classmethod
    def from_directory(cls, directory: str | Path) -> ImageIndex:
        directory = Path(directory)
        index_file = directory / "titles.jsonl"
        if not index_file.is_file():
            raise ValueError(f"image index {directory} has no titles.jsonl")
        entries = []
        with open(index_file) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    path = directory / row["file"]
                    with Image.open(path) as im:
                        entries.append((row["title"], im.convert("RGB")))
                except (json.JSONDecodeError, KeyError, TypeError, OSError) as e:
                    raise ValueError(f"{index_file}:{lineno}: bad entry ({e})") from None
        return cls(entries)

    @classmethod
    def synthetic(cls, n: int = 24, corpus_path: str | Path | None = None) -> ImageIndex:
        """``n`` drawn images titled with the first ``n`` corpus entities (deterministic)."""
        docs = load_corpus(corpus_path)[:n]
        return cls([(d["title"], draw_entity_image(i, (d.get("facts") or {}).get("color")))
                    for i, d in enumerate(docs)])

    def write(self, directory: str | Path) -> None:
        """Save as PNGs + titles.jsonl, readable by ``from_directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "titles.jsonl", "w") as f:
            for i, (title, im) in enumerate(self.entries):
                im.save(directory / f"{i:04d}.png")
                f.write(json.dumps({"file": f"{i:04d}.png", "title": title}) + "\n")

    def search(self, image: Image.Image, k: int = 3) -> list[ImageHit]:
        query = imagehash.phash(image.convert("RGB"))
        order = sorted(range(len(self.entries)), key=lambda i: (query - self._hashes[i], i))
        return [ImageHit(self.entries[i][0], self.entries[i][1], int(query - self._hashes[i]))
                for i in order[:k]]


class ImageSearchTool:
    """``{}`` or ``{"image_index": int}`` (1-based: 1 is image_1, the episode's first input)."""

    name = "image_search"

    def __init__(self, index: ImageIndex, k: int = 3):
        self.index, self.k = index, k

    def call(self, args: dict, session) -> ToolResult:
        started = time.perf_counter()
        args = args if isinstance(args, dict) else {}
        which = args.get("image_index", 1)
        images = list(getattr(session, "images", None) or [])

        def fail(msg: str) -> ToolResult:
            return error_result(msg, started, text=wrap_response(f"Error: {msg}"))

        if isinstance(which, bool) or not isinstance(which, int):
            return fail(f"image_index must be an integer, got {type(which).__name__}")
        if not images:
            return fail("this episode has no input image to search with")
        if not 1 <= which <= len(images):
            return fail(f"image_index {which} is out of range: the episode has image_1"
                        f"{'' if len(images) == 1 else f' .. image_{len(images)}'} "
                        "(image_index is 1-based)")
        try:
            hits = self.index.search(images[which - 1], self.k)
        except Exception as e:  # noqa: BLE001
            return fail(f"image search failed: {type(e).__name__}: {e}")
        lines = [f"Image search results for image_{which}:"]
        lines += [f"[{i}] {h.title} (hash distance {h.distance})" for i, h in enumerate(hits, 1)]
        return ToolResult(text=wrap_response("\n".join(lines)), images=[h.image for h in hits],
                          status="ok", error=None, latency_s=time.perf_counter() - started)
