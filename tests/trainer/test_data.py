"""Data: JSONL errors name file:line, both SFT layouts render to the right masks, RL prompts, resumable order."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyesv2.data import (
    DataError,
    DataState,
    DataWarning,
    ShuffledIterator,
    epoch_order,
    load_jsonl,
    load_prompts,
    sft_samples,
)
from deepeyesv2.model import load_processor
from deepeyesv2.packing import pack
from deepeyesv2_rollout.chat import render_chat


@pytest.fixture(scope="module")
def proc():
    return load_processor("tiny")


@pytest.fixture()
def img_dir(tmp_path):
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (56, 84), "b.png": (84, 56)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CALL = '<think>look closer</think><code>\n```python\nprint(1)\n```\n</code>'
ANSWER = "<think>it is red</think><answer>red</answer>"


def trained_text(proc, sample) -> str:
    ids = sample.input_ids[sample.loss_mask.bool()].tolist()
    return proc.decode(ids)


# -- JSONL --------------------------------------------------------------------------------------

def test_load_jsonl_names_corrupt_line(tmp_path):
    p = write_jsonl(tmp_path / "train.jsonl", [{"a": 1}, '{"a": 2', {"a": 3}])
    with pytest.raises(DataError, match=r"train\.jsonl:2"):
        load_jsonl(p)
    p2 = write_jsonl(tmp_path / "list.jsonl", [{"a": 1}, "[1, 2]"])
    with pytest.raises(DataError, match=r"list\.jsonl:2.*JSON object"):
        load_jsonl(p2)
    with pytest.raises(DataError, match="not found"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_load_jsonl_max_bad_lines_counts_and_warns(tmp_path):
    p = write_jsonl(tmp_path / "train.jsonl", [{"a": 1}, "garbage", "", {"a": 3}, "{oops"])
    with pytest.warns(DataWarning, match=r"skipped 2 corrupt line\(s\) \(lines 2, 5\)"):
        recs = load_jsonl(p, max_bad_lines=2)
    assert [r["a"] for r in recs] == [1, 3]
    assert [r["_line"] for r in recs] == [1, 4] and recs[0]["_source"] == "train.jsonl"
    with pytest.raises(DataError, match=r"train\.jsonl:5.*2 bad line"):
        load_jsonl(p, max_bad_lines=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean files warn about nothing
        load_jsonl(write_jsonl(tmp_path / "ok.jsonl", [{"a": 1}]))


def test_load_json_array(tmp_path):
    p = tmp_path / "sft_part_0.json"
    p.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    recs = load_jsonl(p)
    assert [r["_line"] for r in recs] == [1, 2]
    p.write_text("[{\"a\": 1},\n {\"a\": ]")
    with pytest.raises(DataError, match=r"sft_part_0\.json:2"):
        load_jsonl(p)


# -- SFT ------------------------------------------------------------------------------------------

def test_chat_format_masks_match_render_chat(proc, img_dir):
    rec = {
        "messages": [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the box?"}]},
            {"role": "assistant", "content": CALL},
            {"role": "tool", "content": "<tool_response>stdout: 1</tool_response>"},
            {"role": "user", "content": "Code output: <image> here"},
            {"role": "assistant", "content": ANSWER},
        ],
        "images": ["a.png", "b.png"],
    }
    p = write_jsonl(img_dir / "train.jsonl", [rec])
    (s,) = sft_samples(load_jsonl(p), proc, base_dir=img_dir, source="train.jsonl")
    ref = render_chat(proc, rec["messages"], [Image.open(img_dir / "a.png"), Image.open(img_dir / "b.png")], name="ref")
    assert s.name == "train.jsonl:1"
    assert s.input_ids.tolist() == ref.token_ids
    assert s.loss_mask.tolist() == ref.loss_mask
    torch.testing.assert_close(s.pixel_values, ref.pixel_values)
    assert s.image_grid_thw.tolist() == ref.image_grid_thw.tolist()
    # independent of render_chat: the trained tokens are exactly the assistant turns
    assert trained_text(proc, s) == CALL + "<|im_end|>" + ANSWER + "<|im_end|>"


def test_sharegpt_conversations_masks(proc, img_dir):
    call = {"name": "search", "arguments": {"query": "red box"}}
    rec = {
        "system": "You are an agent.",
        "conversations": [
            {"from": "human", "value": "<image>What is it?"},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": "a red box (tool output)"},
            {"from": "gpt", "value": ANSWER},
        ],
        "images": ["a.png"],
    }
    p = write_jsonl(img_dir / "sg.jsonl", [rec])
    (s,) = sft_samples(load_jsonl(p), proc, base_dir=img_dir)
    expected_call = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
    ref = render_chat(proc, [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "<image>What is it?"},
        {"role": "assistant", "content": expected_call},
        {"role": "user", "content": "a red box (tool output)"},
        {"role": "assistant", "content": ANSWER},
    ], [Image.open(img_dir / "a.png")], name="ref")
    assert s.name == "sg.jsonl:1"
    assert s.input_ids.tolist() == ref.token_ids and s.loss_mask.tolist() == ref.loss_mask
    assert trained_text(proc, s) == expected_call + "<|im_end|>" + ANSWER + "<|im_end|>"
    assert "tool output" not in trained_text(proc, s)


def test_llamafactory_messages_layout_and_packing(proc, img_dir):
    """DeepEyesV2's released cold-start layout: role/content messages, <image> placeholders, a .json array;
    tool results come back as user turns and are not trained."""
    recs = [
        {"messages": [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": CALL},
                      {"role": "user", "content": "<tool_response>\nstdout: 1\n</tool_response>"},
                      {"role": "assistant", "content": ANSWER}], "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<answer>4</answer>"}]},
    ]
    p = img_dir / "sft_part_0.json"
    p.write_text(json.dumps(recs))
    samples = sft_samples(load_jsonl(p), proc, base_dir=img_dir)
    assert [s.name for s in samples] == ["sft_part_0.json:1", "sft_part_0.json:2"]
    assert trained_text(proc, samples[0]) == CALL + "<|im_end|>" + ANSWER + "<|im_end|>"
    batch = pack(samples, proc.image_pad_id)
    assert batch.num_tokens == sum(len(s) for s in samples)
    assert int(batch.loss_mask.sum()) == sum(int(s.loss_mask[1:].sum()) for s in samples)


@pytest.mark.parametrize("rec,match", [
    ({"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}], "images": ["missing.png"]},
     r"bad\.jsonl:2.*missing\.png.*not found"),
    ({"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}], "images": ["broken.png"]},
     r"bad\.jsonl:2.*broken\.png.*cannot decode"),
    ({"messages": [{"role": "user", "content": "<image><image>hi"}, {"role": "assistant", "content": "x"}], "images": ["a.png"]},
     r"bad\.jsonl:2.*more image placeholders than images"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "images": ["a.png"]},
     r"bad\.jsonl:2.*no placeholder"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}, r"bad\.jsonl:2.*unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:2.*no assistant turn"),
    ({"text": "hi"}, r"bad\.jsonl:2.*'messages' or 'conversations'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.jpg"}]},
                   {"role": "assistant", "content": "x"}]}, r"bad\.jsonl:2.*gone\.jpg.*not found"),
])
def test_sft_errors_name_file_line_and_image(proc, img_dir, rec, match):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    p = write_jsonl(img_dir / "bad.jsonl", [ok, rec])
    with pytest.raises(DataError, match=match):
        sft_samples(load_jsonl(p), proc, base_dir=img_dir)


# -- RL prompts -----------------------------------------------------------------------------------

def test_load_prompts(img_dir):
    rows = [
        {"id": "q1", "question": "What colour?", "images": ["a.png"], "answer": "red", "category": "perception"},
        {"id": 2, "question": "Who won?", "answer": ["Alice", "alice b."], "category": "search", "answer_type": "exact",
         "source": "synthetic"},
    ]
    ps = load_prompts(write_jsonl(img_dir / "prompts.jsonl", rows))
    assert [p.id for p in ps] == ["q1", "2"]
    assert ps[0].images == [str(img_dir / "a.png")] and ps[0].answer_type == "auto"
    assert ps[1].answer == ["Alice", "alice b."] and ps[1].metadata == {"source": "synthetic"}
    assert ps[1].category == "search" and ps[1].answer_type == "exact"


@pytest.mark.parametrize("row,match", [
    ({"id": "x", "question": "q"}, r"prompts\.jsonl:2.*missing 'answer'"),
    ({"id": "x", "answer": "a"}, r"prompts\.jsonl:2.*missing 'question'"),
    ({"id": "x", "question": "q", "answer": "a", "answer_type": "fuzzy"}, r"prompts\.jsonl:2.*answer_type"),
    ({"id": "q1", "question": "q", "answer": "a"}, r"prompts\.jsonl:2.*duplicate prompt id 'q1'.*prompts\.jsonl:1"),
    ({"id": "x", "question": "q", "answer": "a", "images": ["nope.png"]}, r"prompts\.jsonl:2.*image 0 not found"),
    ({"id": "x", "question": "q", "answer": {"a": 1}}, r"prompts\.jsonl:2.*'answer' must be"),
])
def test_load_prompts_validation(img_dir, row, match):
    p = write_jsonl(img_dir / "prompts.jsonl", [{"id": "q1", "question": "q", "answer": "a"}, row])
    with pytest.raises(DataError, match=match):
        load_prompts(p)


# -- resumable order ------------------------------------------------------------------------------

def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(20, seed=3, epoch=0), epoch_order(20, seed=3, epoch=1)
    assert sorted(a) == list(range(20)) and sorted(b) == list(range(20))
    assert a != b and a == epoch_order(20, seed=3, epoch=0) and a != epoch_order(20, seed=4, epoch=0)
    assert epoch_order(5, 0, 0, shuffle=False) == [0, 1, 2, 3, 4]


def test_iterator_resumes_exactly():
    it = ShuffledIterator(7, DataState(seed=11))
    first = it.take(10)
    saved = DataState.from_dict(it.state.to_dict())
    assert saved == DataState(epoch=1, position=3, seed=11)
    rest = it.take(12)
    resumed = ShuffledIterator(7, saved).take(12)
    assert resumed == rest
    stream = first + rest
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))  # whole epochs
    assert stream[:7] == epoch_order(7, 11, 0) and stream[7:14] == epoch_order(7, 11, 1)


def test_iterator_max_epochs_and_bad_state():
    it = ShuffledIterator(3, max_epochs=2)
    assert len(list(it)) == 6
    with pytest.raises(ValueError, match="position"):
        ShuffledIterator(3, DataState(position=5))


# ----------------------------------------------------------------------------- prompt images checked at load


def huge_png(path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height written row by row (a few hundred KB on disk; 400 M pixels for
    20000 x 20000 if decoded, which nothing here does)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def truncated_png(path) -> None:
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-300])  # the header is intact, the pixel data cut short


def flipped_png(path) -> None:
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside IDAT: the chunk's CRC no longer matches
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png"), r"cannot decode image"),
    (truncated_png, r"cannot decode image"),
    (flipped_png, r"cannot decode image"),
    # PIL itself refuses > 2x its limit at open, before the size can be read: its words carry the pixel count
    (lambda p: huge_png(p, 20000, 20000), r"image is over data\.max_image_pixels=89,478,485 \(.*400000000 pixels"),
    (lambda p: huge_png(p, 10000, 10000), r"image is 10000x10000 = 100,000,000 pixels, over data\.max_image_pixels=89,478,485"),
    (lambda p: huge_png(p, 400, 1), r"image is 400x1, an aspect ratio over 200"),
], ids=["garbage", "truncated", "bit-flip", "20000x20000", "10000x10000", "400x1"])
def test_bad_prompt_images_fail_at_load_naming_file_line(tmp_path, make, match):
    make(tmp_path / "bad.png")
    Image.new("RGB", (56, 56)).save(tmp_path / "good.png")
    rows = [{"id": "a", "question": "How many?", "answer": "3", "images": ["good.png"]},
            {"id": "b", "question": "How many?", "answer": "3", "images": ["good.png", "bad.png"]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"prompts\.jsonl:2: image 1 \(.*bad\.png\): {match}"):
        load_prompts(tmp_path / "prompts.jsonl")


def test_prompt_image_pixel_cap_is_configurable(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "im.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "question": "q?", "answer": "1", "images": ["im.png"]}) + "\n")
    assert len(load_prompts(tmp_path / "p.jsonl")) == 1
    with pytest.raises(DataError, match=r"p\.jsonl:1: image 0 .*100x100 = 10,000 pixels, over data\.max_image_pixels=9,999"):
        load_prompts(tmp_path / "p.jsonl", max_image_pixels=9_999)


def test_sft_image_pixel_cap(tmp_path, proc):
    Image.new("RGB", (100, 100)).save(tmp_path / "im.png")
    rec = {"messages": [{"role": "user", "content": "<image>How many?"}, {"role": "assistant", "content": "<answer>1</answer>"}],
           "images": ["im.png"], "_source": "sft.jsonl", "_line": 7}
    assert len(sft_samples([rec], proc, base_dir=tmp_path)) == 1
    with pytest.raises(DataError, match=r"sft\.jsonl:7: image 0 \(im\.png\): image is 100x100 = 10,000 pixels, over"):
        sft_samples([rec], proc, base_dir=tmp_path, max_image_pixels=9_999)
