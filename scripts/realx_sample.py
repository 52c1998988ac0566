"""A small synthetic RealX-Bench-style evaluation set (RealX-Bench itself is not public).

    python scripts/realx_sample.py [--out DIR]      # regenerates deepeyesv2/assets/realx_sample/

16 items, 4 per RealX-Bench category, each with one generated PNG:
  perception   the answer is in the image (counting, colour, position): code on the image helps
  search       the image shows a named entity of the shipped search corpus; the asked fact is only in the corpus
  reasoning    arithmetic / comparison over what the image shows
  integration  perception + search: identify the pictured entity (image_search) or count in the image (code),
               then look a fact up (search) and combine
Answers are computed from the drawn images and from `deepeyesv2_rollout.tools.search.load_corpus()` (the shipped
corpus, rollout/data/corpus.jsonl), so every item is answerable with the default tools. JSONL fields: id,
category, question, images (paths relative to the JSONL), answer, answer_type (numeric | choice | auto), plus
`tools` (the tool chain a solver would use) and, for items that need search, `search_query` (a query whose top
BM25 hit states the fact). Free-form answers use answer_type "auto" (exact match after normalisation, then the
judge if one is given), as DeepEyesV2 judges them with an LLM.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "deepeyesv2" / "assets" / "realx_sample"
SAMPLE_PATH = SAMPLE_DIR / "realx_sample.jsonl"


@dataclass
class Item:
    id: str
    category: str
    question: str
    image: Image.Image
    answer: str
    answer_type: str
    tools: list[str]
    search_query: str | None = None
    extra: dict = field(default_factory=dict)

    def record(self, image_path: str) -> dict:
        rec = {"id": self.id, "category": self.category, "question": self.question, "images": [image_path],
               "answer": self.answer, "answer_type": self.answer_type, "tools": self.tools}
        if self.search_query:
            rec["search_query"] = self.search_query
        return {**rec, **self.extra}


# ------------------------------------------------------------------------------------------- drawings
BG = (235, 235, 235)
RED, BLUE, GREEN = (220, 30, 30), (30, 60, 220), (40, 170, 60)


SQUARE = 6  # px side of the drawn squares (the sample's questions count them)


def _draw_squares(n_red: int, n_blue: int, rng: random.Random, size: int = 112) -> Image.Image:
    """size x size grey image with n_red red and n_blue blue SQUARE px squares at distinct grid cells."""
    a = np.full((size, size, 3), 235, dtype=np.uint8)
    cells = [(r, c) for r in range(size // (SQUARE * 2)) for c in range(size // (SQUARE * 2))]
    picks = rng.sample(cells, n_red + n_blue)
    for k, (r, c) in enumerate(picks):
        y, x = r * SQUARE * 2 + rng.randint(0, SQUARE - 1), c * SQUARE * 2 + rng.randint(0, SQUARE - 1)
        a[y : y + SQUARE, x : x + SQUARE] = (220, 30, 30) if k < n_red else (30, 60, 220)
    return Image.fromarray(a)

def squares_image(n_red: int, n_blue: int, seed: int, size: int = 112) -> Image.Image:
    """Non-overlapping red and blue squares on a light background (the demo's counting picture)."""

    return _draw_squares(n_red, n_blue, random.Random(seed), size=size)


def big_square_image(color: tuple[int, int, int], seed: int, size: int = 112) -> Image.Image:
    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), BG)
    d = ImageDraw.Draw(im)
    for _ in range(6):  # small grey distractor dots
        x, y = rng.randrange(size - 4), rng.randrange(size - 4)
        d.ellipse((x, y, x + 4, y + 4), fill=(120, 120, 120))
    d.rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=color)
    return im


def dot_image(quadrant: int, size: int = 112) -> Image.Image:
    """One blue dot in quadrant 0..3 (top-left, top-right, bottom-left, bottom-right)."""
    im = Image.new("RGB", (size, size), BG)
    cx = size // 4 + (size // 2) * (quadrant % 2)
    cy = size // 4 + (size // 2) * (quadrant // 2)
    ImageDraw.Draw(im).ellipse((cx - 8, cy - 8, cx + 8, cy + 8), fill=BLUE)
    return im


def bars_image(heights: list[int], size: int = 112) -> Image.Image:
    im = Image.new("RGB", (size, size), BG)
    d = ImageDraw.Draw(im)
    w = size // (2 * len(heights) + 1)
    for i, h in enumerate(heights):
        x0 = w * (2 * i + 1)
        d.rectangle((x0, size - 4 - h, x0 + w, size - 4), fill=BLUE)
    return im


def area_image(frac_w: float, frac_h: float, size: int = 112) -> Image.Image:
    im = Image.new("RGB", (size, size), BG)
    ImageDraw.Draw(im).rectangle((0, 0, int(size * frac_w) - 1, int(size * frac_h) - 1), fill=GREEN)
    return im


# ------------------------------------------------------------------------------------------- items
def _doc(docs: list[dict], title: str) -> dict:
    for d in docs:
        if d["title"] == title:
            return d
    raise ValueError(f"corpus has no document titled {title!r}")


def build_items(corpus_path: str | Path | None = None) -> list[Item]:
    """The 16 items, deterministic. Entity pictures are the image-search index's own drawings
    (`ImageIndex.synthetic`: the first 24 corpus entities), so image_search finds them exactly."""
    from deepeyesv2_rollout.tools.image_search import draw_entity_image
    from deepeyesv2_rollout.tools.search import load_corpus

    docs = load_corpus(corpus_path)
    index_docs = docs[:24]

    def entity(title: str) -> tuple[dict, Image.Image]:
        d = _doc(docs, title)
        seed = index_docs.index(d) if d in index_docs else 1000 + docs.index(d)
        return d, draw_entity_image(seed, (d.get("facts") or {}).get("color"), size=112)

    zorblax, zorblax_im = entity("Zorblax lighthouse")
    silcas, silcas_im = entity("Silcas Bridge")
    heron, heron_im = entity("Brihes heron")
    island = next(d for d in docs if d["kind"] == "island")
    island_im = entity(island["title"])[1]
    julven = _doc(docs, "Julven lighthouse")
    # integration: a pictured entity found by image search (in the index), then a fact by text search
    lh = next(d for d in index_docs if d["kind"] == "lighthouse" and d is not zorblax)
    lh_im = draw_entity_image(index_docs.index(lh), lh["facts"].get("color"), size=224)
    br = next(d for d in index_docs if d["kind"] == "bridge" and d is not silcas)
    br_im = draw_entity_image(index_docs.index(br), br["facts"].get("color"), size=224)

    count_q = "How many red squares are in the image?"
    items = [
        Item("perception-1", "perception", count_q, squares_image(4, 3, seed=11), "4", "numeric", ["code"]),
        Item("perception-2", "perception", count_q, squares_image(7, 2, seed=12), "7", "numeric", ["code"]),
        Item("perception-3", "perception", "What colour is the large square in the image? Answer with one word.",
             big_square_image(GREEN, seed=13), "green", "auto", ["code"]),
        Item("perception-4", "perception", "Where is the blue dot? (A) top-left (B) top-right (C) bottom-left "
             "(D) bottom-right. Answer with the letter.", dot_image(3), "D", "choice", ["code"]),
        Item("search-1", "search", f"This is the {zorblax['title']}. In what year was it built?", zorblax_im,
             str(zorblax["facts"]["year_built"]), "numeric", ["search"], search_query=f"{zorblax['title']} built"),
        Item("search-2", "search", f"The picture shows the {silcas['title']}. How many arches does it have?",
             silcas_im, str(silcas["facts"]["arches"]), "numeric", ["search"], search_query=f"{silcas['title']} arches"),
        Item("search-3", "search", f"This bird is the {heron['title']}. What colour is its plumage?", heron_im,
             str(heron["facts"]["plumage"]), "auto", ["search"], search_query=f"{heron['title']} plumage"),
        Item("search-4", "search", f"This is {island['title']}. What is its capital?", island_im,
             str(island["facts"]["capital"]), "auto", ["search"], search_query=f"{island['title']} capital"),
        Item("reasoning-1", "reasoning", "How many more red squares than blue squares are in the image?",
             squares_image(6, 2, seed=21), "4", "numeric", ["code"]),
        Item("reasoning-2", "reasoning", "Each red square is worth 3 points and each blue square 1 point. What is "
             "the total score of the image?", squares_image(3, 4, seed=22), "13", "numeric", ["code"]),
        Item("reasoning-3", "reasoning", "Which bar is the tallest? (A) left (B) middle (C) right. Answer with the "
             "letter.", bars_image([40, 90, 65]), "B", "choice", ["code"]),
        Item("reasoning-4", "reasoning", "What percentage of the image area does the green rectangle cover?",
             area_image(0.5, 0.5), "25%", "numeric", ["code"]),
        Item("integration-1", "integration", "In what year was the lighthouse in this picture built?", lh_im,
             str(lh["facts"]["year_built"]), "numeric", ["image_search", "search"],
             search_query=f"{lh['title']} built", extra={"entity": lh["title"]}),
        Item("integration-2", "integration", "How long, in metres, is the bridge in this picture?", br_im,
             str(br["facts"]["length_m"]), "numeric", ["image_search", "search"],
             search_query=f"{br['title']} long metres", extra={"entity": br["title"]}),
        Item("integration-3", "integration", f"How many metres taller is the {julven['title']} than the number of "
             "red squares in this image?", squares_image(5, 3, seed=31),
             str(julven["facts"]["height_m"] - 5), "numeric", ["code", "search"],
             search_query=f"{julven['title']} tall metres"),
        Item("integration-4", "integration", f"Add the number of red squares in the image to the number of arches "
             f"of the {silcas['title']}.", squares_image(6, 1, seed=32), str(6 + silcas["facts"]["arches"]),
             "numeric", ["code", "search"], search_query=f"{silcas['title']} arches"),
    ]
    return items


def write_sample(out_dir: str | Path = SAMPLE_DIR, corpus_path: str | Path | None = None) -> Path:
    """Write <out_dir>/realx_sample.jsonl and <out_dir>/images/<id>.png; returns the JSONL path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / "realx_sample.jsonl"
    with open(path, "w") as f:
        for item in build_items(corpus_path):
            rel = f"images/{item.id}.png"
            item.image.save(out / rel, optimize=True)
            f.write(json.dumps(item.record(rel)) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(SAMPLE_DIR))
    print(write_sample(ap.parse_args(argv).out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
