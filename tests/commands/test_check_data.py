"""`deepeyesv2 check-data`: good SFT and RL files pass with their counts; each kind of bad record is reported at
its file:line, the protocol verdict is format_ok's, and an unreadable file is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepeyesv2.commands.check_data import protocol_slip
from deepeyesv2.commands.cli import main
from deepeyesv2_rollout.protocol import SYSTEM_PROMPT, format_ok

REPO = Path(__file__).resolve().parents[2]
CODE_TURN = "<think>Count them.</think><code>\n```python\nprint(3)\n```\n</code>"
ANSWER_TURN = "<think>The program printed 3.</think><answer>3</answer>"


def _image(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.RandomState(0).rand(56, 56, 3) * 255).astype("uint8")).save(path)
    return str(path.relative_to(path.parent.parent))


def _sft(system: str | None, *assistant: str, user: str = "<image>How many?", images=("images/a.png",)) -> dict:
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]
    for k, text in enumerate(assistant):
        if k:
            msgs.append({"role": "tool", "content": "3"})
        msgs.append({"role": "assistant", "content": text})
    return {"messages": msgs, "images": list(images)}


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["check-data", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_shipped_examples_pass(capsys):
    rc, out, _ = _run(capsys, str(REPO / "examples" / "data" / "sft.jsonl"))
    assert rc == 0, out
    assert "SFT data, 16 record(s): 16 ok, 0 with problems" in out and "16 the stage's" in out
    rc, out, _ = _run(capsys, str(REPO / "examples" / "data" / "rl.jsonl"))
    assert rc == 0 and "RL data, 8 record(s): 8 ok" in out, out


def test_sft_problems_named_by_line(tmp_path, capsys):
    _image(tmp_path / "images" / "a.png")
    f = _write(tmp_path / "sft.jsonl", [
        _sft(SYSTEM_PROMPT, CODE_TURN, ANSWER_TURN),                      # 1: good, one tool turn
        _sft(SYSTEM_PROMPT, "<answer>3</answer>"),                        # 2: answer without <think>
        "{not json",                                                      # 3: corrupt line
        _sft(SYSTEM_PROMPT, ANSWER_TURN, user="<image><image>How many?"),  # 4: two placeholders, one image
        _sft(SYSTEM_PROMPT, ANSWER_TURN, images=("images/missing.png",)),  # 5: image not found
        _sft("Another prompt.", ANSWER_TURN),                             # 6: fine, but another system prompt (a note)
        _sft(SYSTEM_PROMPT, CODE_TURN),                                   # 7: ends on a code call, no answer
        _sft(SYSTEM_PROMPT, ANSWER_TURN, ANSWER_TURN),                    # 8: answers before the last turn
    ])
    rc, out, _ = _run(capsys, str(f))
    assert rc == 1, out
    assert "SFT data, 7 record(s): 2 ok, 5 with problems" in out, out  # the corrupt line is no record
    assert "sft.jsonl:2: protocol: assistant turn 1 of 1 has no <think>...</think>" in out
    assert "format reward scores such a trajectory 0" in out
    assert "skipped 1 corrupt line(s) (lines 3)" in out
    assert "sft.jsonl:4:" in out and "placeholder" in out
    assert "sft.jsonl:5:" in out and "missing.png" in out
    assert "sft.jsonl:7: protocol: assistant turn 1 of 1 is the last but does not <answer>" in out
    assert "sft.jsonl:8: protocol: assistant turn 1 of 2 answers before the last turn" in out
    assert "sft.jsonl:6" not in out.split("problems (")[1]  # another system prompt is a note, not a problem
    assert "1 record(s) train under another system prompt" in out and "first at sft.jsonl:6" in out
    assert "set rollout.system_prompt to it" in out
    rc, out, _ = _run(capsys, str(f), "--system-prompt", "Another prompt.")  # the prompt training will use
    assert "first at sft.jsonl:1" in out  # now the records under SYSTEM_PROMPT are the other ones
    assert "1 tool-call turn(s)" in out


def test_rl_problems_named_by_line(tmp_path, capsys):
    img = _image(tmp_path / "images" / "a.png")
    good = {"id": "a", "question": "How many?", "images": [img], "answer": "3", "answer_type": "numeric",
            "category": "perception"}
    f = _write(tmp_path / "rl.jsonl", [
        good,
        {**good, "id": "b", "question": "<image>How many?"},   # 2: placeholder in the question
        {**good, "id": "a"},                                    # 3: duplicate id
        {k: v for k, v in good.items() if k != "answer"} | {"id": "c"},  # 4: no answer
        {**good, "id": "d", "images": ["images/nope.png"]},     # 5: image not found
        {**good, "id": "e", "system": "You are terse."},        # 6: ok, a key RL does not read
    ])
    rc, out, _ = _run(capsys, str(f))
    assert rc == 1, out
    assert "RL data, 6 record(s): 2 ok, 4 with problems" in out, out
    assert "rl.jsonl:2: the question holds 1 <image> placeholder(s)" in out
    assert "rl.jsonl:3: duplicate prompt id 'a' (first at rl.jsonl:1)" in out
    assert "rl.jsonl:4: prompt record is missing 'answer'" in out
    assert "rl.jsonl:5: image 0 not found" in out
    assert "keys RL does not read (kept as trajectory metadata): system (1)" in out


def test_max_problems_caps_the_list(tmp_path, capsys):
    _image(tmp_path / "images" / "a.png")
    f = _write(tmp_path / "sft.jsonl", [_sft(SYSTEM_PROMPT, "<answer>3</answer>")] * 5)
    rc, out, _ = _run(capsys, str(f), "--max-problems", "2")
    assert rc == 1 and "problems (first 2 of 5):" in out
    assert out.count("protocol:") == 2


@pytest.mark.parametrize("turns", [
    [ANSWER_TURN], [CODE_TURN, ANSWER_TURN], ["<answer>3</answer>"], [CODE_TURN], [ANSWER_TURN, ANSWER_TURN],
    [ANSWER_TURN + " trailing"], ["<think>a</think><think>b</think><answer>3</answer>"], [],
    ["<think>x</think><tool_call>{\"name\": \"search\", \"arguments\": {\"query\": \"q\"}}</tool_call>", ANSWER_TURN],
])
def test_protocol_verdict_is_format_ok(turns):
    """One rule: check-data flags a trajectory exactly when the format reward's format_ok fails it."""
    assert (protocol_slip(turns) is None) == format_ok(turns)


def test_unreadable_file_is_one_line(tmp_path, capsys):
    rc, out, err = _run(capsys, str(tmp_path / "nope.jsonl"))
    assert rc == 2 and err.strip().count("\n") == 0 and "file not found" in err
    (tmp_path / "x.jsonl").write_text(json.dumps({"foo": 1}) + "\n")
    rc, out, err = _run(capsys, str(tmp_path / "x.jsonl"))
    assert rc == 2 and "--kind" in err
