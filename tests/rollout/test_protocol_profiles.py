"""Protocol profiles: the `deepeyesv2` profile reproduces the released DeepEyesV2 layout token for token, `ours`
keeps this project's, and banned strings are never sampled by the embedded engine."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2_rollout.chat import render_chat
from deepeyesv2_rollout.engine import EmbeddedEngine
from deepeyesv2_rollout.episode import SCHEDULES, EpisodeLimits, run_episodes
from deepeyesv2_rollout.protocol import DEEPEYESV2, OURS, PROFILES, format_ok, get_profile, parse_action
from deepeyesv2_rollout.tools.base import ToolRegistry, ToolResult
from deepeyesv2_rollout.types import GenerateRequest, GenerateResult, Prompt, SamplingParams


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_model(ModelConfig())
    model.eval()
    return model, processor


def _image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


# The policy's three turns. Turn 1 has two fenced blocks: the released code runs the last one. Turns 2 and 3
# continue the "<think>" the environment opened them with.
TURN1 = ("<think>Zoom in on the left half.</think>\n<code>\n```python\nprint('draft')\n```\n"
         "```python\nprint(3)\nimport sys; print('warn', file=sys.stderr)\nshow(image_1)\n```\n</code>")
TURN2 = "The crop shows 3 marks.</think>\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"query\": \"marks\"}}\n</tool_call>"
TURN3 = "The search agrees.</think>\n<answer>3</answer><|im_end|>"
STDOUT, STDERR = "3\n", "warn\n"
SEARCH_TEXT = "<tool_response>\n1. Marks (example.org)\nThree marks.\n</tool_response>"


class ScriptedTurns:
    """Returns the scripted turn `tag.turn` as token ids (the released pipeline's vLLM would have sampled them)."""

    def __init__(self, proc, turns):
        self.proc, self.turns = proc, turns

    def generate(self, requests, sampling):
        return [self._one(r) for r in requests]

    async def agenerate(self, request, sampling):
        return self._one(request)

    def _one(self, r):
        ids = self.proc.encode(self.turns[r.tag.turn])
        finish = "eos" if ids[-1] == self.proc.im_end_id else "stop"
        return GenerateResult(ids, [-0.5] * len(ids), finish, None)


class FixedTool:
    def __init__(self, name, result, seen):
        self.name, self.result, self.seen = name, result, seen

    def call(self, args, session):
        self.seen.append((self.name, args))
        return ToolResult(text=self.result.text, images=[im.copy() for im in self.result.images],
                          stdout=self.result.stdout, stderr=self.result.stderr)


class NoSession:
    def __init__(self, images):
        pass

    def close(self):
        pass


def _vision(n_pads: int) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * n_pads + "<|vision_end|>"


def _released_layout_ids(proc, system: str, question: str) -> tuple[list[int], list[int]]:
    """The 3-turn trajectory in the released layout, written out by hand from its facts, tokenized the way the
    released pipeline does: every environment chunk is one string (special tokens parsed, each `<image>`
    expanded to its vision block), every policy turn is what was sampled. Returns (ids, loss mask).

    Images (all multiples of 28 px, the Qwen2-VL patch x merge size, so no resize): the prompt's 112x56 -> 4 x 2
    merged patches = 8 pads; the code's two returned images 56x84 and 84x56 -> 6 pads each."""
    prompt = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{_vision(8)}{question}<|im_end|>\n"
              "<|im_start|>assistant\n")
    obs1 = ("<|im_end|>\n<|im_start|>user\n"
            f"Code execution result:\nstdout:\n```\n{STDOUT}\n```\n\nstderr:\n```\n{STDERR}\n```\n\nImages:\n"
            f"{_vision(6)}{_vision(6)}<|im_end|>\n<|im_start|>assistant\n<think>")
    obs2 = f"<|im_end|>\n<|im_start|>user\n{SEARCH_TEXT}<|im_end|>\n<|im_start|>assistant\n<think>"
    ids, mask = [], []
    for text, learned in ((prompt, 0), (TURN1, 1), (obs1, 0), (TURN2, 1), (obs2, 0), (TURN3, 1)):
        chunk = proc.tokenizer.encode(text, add_special_tokens=False)
        ids += chunk
        mask += [learned] * len(chunk)
    return ids, mask


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_released_layout_round_trips_token_for_token(tiny, schedule):
    _, proc = tiny
    seen: list = []
    code = ToolResult(text="(ours)", images=[_image(1, 56, 84), _image(2, 84, 56)], stdout=STDOUT, stderr=STDERR)
    registry = ToolRegistry([FixedTool("code", code, seen), FixedTool("search", ToolResult(text=SEARCH_TEXT), seen),
                             FixedTool("image_search", ToolResult(text="unused"), seen)])
    question = "How many marks are there?"
    prompt = Prompt(id="p", images=[_image(0, 112, 56)], answer="3", system=DEEPEYESV2.system_prompt,
                    messages=[{"role": "user", "content": "<image>" + question}])
    sampling = SamplingParams(temperature=1.0, **DEEPEYESV2.sampling_fields(proc))
    (t,) = run_episodes(ScriptedTurns(proc, [TURN1, TURN2, TURN3]), proc, registry, [prompt], 1, sampling,
                        EpisodeLimits(), progress=False, session_factory=NoSession, schedule=schedule,
                        profile=DEEPEYESV2)
    want_ids, want_mask = _released_layout_ids(proc, DEEPEYESV2.system_prompt, question)
    assert t.stop_reason == "answer" and t.answer == "3"
    assert t.token_ids == want_ids
    assert t.loss_mask == want_mask
    # the last fenced block ran; each turn reads as the policy continued it, prefill first, and passes the format
    assert seen[0] == ("code", {"code": "print(3)\nimport sys; print('warn', file=sys.stderr)\nshow(image_1)\n"})
    assert seen[1] == ("search", {"query": "marks"})
    assert t.turn_texts == [TURN1, "<think>" + TURN2, "<think>" + TURN3]
    assert format_ok(t.turn_texts)
    assert t.tool_calls[0].output.startswith("Code execution result:\nstdout:\n```\n3\n")
    assert t.pixel_values is not None and t.image_grid_thw.tolist() == [[1, 4, 8], [1, 6, 4], [1, 4, 6]]


def test_ours_layout_is_unchanged(tiny):
    """The default profile writes what this project always wrote: code text unfenced, images after a newline,
    no prefill (the demo's and the recorded tests' numbers depend on it)."""
    _, proc = tiny
    code = ToolResult(text="Code execution result:\nstdout:\n3\n\nstderr:\n", images=[_image(1, 56, 84)],
                      stdout="3\n", stderr="")
    registry = ToolRegistry([FixedTool("code", code, []), FixedTool("search", ToolResult(text="s"), []),
                             FixedTool("image_search", ToolResult(text="i"), [])])
    prompt = Prompt(id="p", question="Q?", images=[_image(0, 112, 56)], answer="3")
    turns = ["<think>a</think><code>\n```python\nprint(3)\n```\n</code>", "<think>b</think><answer>3</answer>"]
    (t,) = run_episodes(ScriptedTurns(proc, turns), proc, registry, [prompt], 1, SamplingParams(), EpisodeLimits(),
                        progress=False, session_factory=NoSession)
    r = render_chat(proc, prompt.chat_messages(), prompt.images, add_generation_prompt=True, default_system=OURS.system_prompt)
    obs = ([proc.im_end_id] + proc.encode("\n") + proc.turn_header("user") + proc.encode(code.text) + proc.encode("\n")
           + proc.image_block([1, 6, 4]) + proc.turn_footer() + proc.turn_header("assistant"))
    assert t.token_ids == r.token_ids + proc.encode(turns[0]) + obs + proc.encode(turns[1]) + [proc.im_end_id]
    assert t.turn_texts == turns


def test_profile_sampling_fields_and_the_check(tiny):
    _, proc = tiny
    f = DEEPEYESV2.sampling_fields(proc)
    assert f["stop"] == ["</code>", "</tool_call>"]
    single = {proc.tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>")}
    assert set(f["banned_token_ids"]) == single
    assert f["banned_sequences"] == (tuple(proc.encode("<size>")),)  # three tokens in the tiny vocabulary
    assert OURS.sampling_fields(proc) == {"stop": ["</code>", "</tool_call>", "</answer>"], "banned_token_ids": (),
                                          "banned_sequences": ()}
    with pytest.raises(ValueError, match="lacks what protocol profile 'deepeyesv2' needs"):
        DEEPEYESV2.check_sampling(SamplingParams(), proc)
    DEEPEYESV2.check_sampling(SamplingParams(**f), proc)
    with pytest.raises(ValueError, match="rollout.protocol must be one of"):
        get_profile("released")
    assert set(PROFILES) == {"ours", "deepeyesv2"}


def test_last_fenced_block_runs_only_under_deepeyesv2():
    turn = "<think>t</think><code>\n```python\nfirst()\n```\n```python\nsecond()\n```\n</code>"
    assert parse_action(turn).code == "first()\n"
    assert DEEPEYESV2.parse(turn).code == "second()\n"


def test_returned_images_capped_and_resized_as_released():
    small = [_image(k, 20, 10) for k in range(12)]
    kept, notes = DEEPEYESV2.fit_images(small)
    assert len(kept) == 10 and notes == []  # at most 10 per round, resized silently
    assert {im.size for im in kept} == {(64, 32)}  # short side scaled up to 32, aspect kept
    (strip,), _ = DEEPEYESV2.fit_images([_image(0, 1000, 2)])
    # side ratio 500 > 200: the long side comes down to 150x the short one (300 x 6), then the short side up to 32
    assert strip.size == (1600, 32)
    assert DEEPEYESV2.fit_images([Image.new("RGB", (0, 5))])[0] == []
    kept, notes = OURS.fit_images([_image(0, 1000, 2)] + small)
    assert len(kept) == 13 and notes and "padded" in notes[0]  # ours: no cap, strips padded and noted


def test_banned_strings_are_never_sampled(tiny):
    """A single banned token is never drawn, and a banned sequence is never completed, by the embedded engine --
    here the tokens greedy decoding picks first, so an unmasked draw would surely take them."""
    model, proc = tiny
    engine = EmbeddedEngine(model, proc)
    try:
        r = render_chat(proc, [{"role": "user", "content": "Count."}], [], add_generation_prompt=True)
        req = GenerateRequest(r.token_ids)
        greedy = SamplingParams(temperature=0, max_new_tokens=12, stop=[])
        free = engine.generate([req], greedy)[0].token_ids
        assert len(free) >= 3
        one = engine.generate([req], SamplingParams(temperature=0, max_new_tokens=12, stop=[],
                                                    banned_token_ids=(free[0],)))[0].token_ids
        assert free[0] not in one
        seq = (free[0], free[1])
        two = engine.generate([req], SamplingParams(temperature=0, max_new_tokens=12, stop=[],
                                                    banned_sequences=(seq,)))[0].token_ids
        assert two[0] == free[0] and two[1] != free[1]
        assert all((a, b) != seq for a, b in zip(two, two[1:]))
        # the sequence may also start in the context: a context ending with free[0] cannot continue with free[1]
        ctx = GenerateRequest(r.token_ids + [free[0]])
        cont = engine.generate([ctx], SamplingParams(temperature=0, max_new_tokens=4, stop=[],
                                                     banned_sequences=(seq,)))[0].token_ids
        assert cont[0] != free[1]
        sampled = engine.generate([GenerateRequest(r.token_ids, seed=s) for s in range(16)],
                                  SamplingParams(temperature=1.0, max_new_tokens=12, stop=[],
                                                 banned_token_ids=(free[0],)))
        assert all(free[0] not in o.token_ids for o in sampled)
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="2\\+ tokens"):
        SamplingParams(banned_sequences=((5,),))
