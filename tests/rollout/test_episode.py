"""Episode loop: a scripted 3-turn episode through the real tools checked token by token, and each limit /
failure mode with a fake engine and fake tools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyesv2.model import ModelConfig, build_model
from deepeyesv2_rollout.chat import render_chat
from deepeyesv2_rollout.qwen import embed_inputs, mrope_position_ids
from deepeyesv2_rollout.engine import EmbeddedEngine, ScriptedEngine
from deepeyesv2_rollout.episode import SCHEDULES, EpisodeLimits, run_episodes
from deepeyesv2_rollout.types import Prompt
from deepeyesv2_rollout.protocol import format_ok
from deepeyesv2_rollout.tools.base import ToolRegistry, ToolResult
from deepeyesv2_rollout.types import GenerateResult, SamplingParams

CODE = "crop = image_1.crop((0, 0, 40, 30))\ncrop = crop.resize((80, 60))\ndisplay(crop)\nprint(crop.size)\n"
TURNS = [
    f"<think>Let me look closer at the corner.</think><code>\n```python\n{CODE}```\n</code>",
    '<think>Now I search.</think><tool_call>{"name": "search", "arguments": {"query": "lighthouse built year"}}</tool_call>',
    "<think>The tower was built in 1889.</think><answer>1889</answer>",
]


@pytest.fixture(params=SCHEDULES)
def schedule(request):
    """Every episode-loop test runs on both schedules."""
    return request.param


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_model(ModelConfig())
    model.eval()
    return model, processor


def _image(seed: int = 0, size=(80, 60)) -> Image.Image:
    arr = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    return Image.fromarray(arr)


def _teacher_forced_logprobs(model, traj, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T)[t - 1, ids[t]] over the whole final sequence, one full forward, no cache."""
    ids = torch.tensor(traj.token_ids)
    pos = mrope_position_ids(ids, traj.image_grid_thw, model.config.image_token_id, 2)
    with torch.no_grad():
        emb = embed_inputs(model, ids, traj.pixel_values, traj.image_grid_thw)
        h = model.model.language_model(inputs_embeds=emb[None], position_ids=pos[:, None], use_cache=False).last_hidden_state[0]
        lp = torch.log_softmax(model.lm_head(h).float() / temperature, dim=-1)
    out = torch.zeros(len(ids))
    out[1:] = lp[:-1].gather(-1, ids[1:, None])[:, 0]
    return out


def test_scripted_three_turn_episode_token_by_token(tiny, schedule):
    from deepeyesv2_rollout.tools import Session, default_registry

    model, proc = tiny
    img = _image()
    registry = default_registry()
    inner = EmbeddedEngine(model, proc, cache_tokens_budget=100_000)
    engine = ScriptedEngine(inner, proc, lambda tag: TURNS[tag.turn])
    sampling = SamplingParams(temperature=0.7, max_new_tokens=200, seed=0)
    prompt = Prompt(id="p0", question="When was the lighthouse built?", images=[img], answer="1889", category="search")
    trajs = run_episodes(engine, proc, registry, [prompt], group_size=2, sampling=sampling, progress=False,
                         schedule=schedule)
    assert len(trajs) == 2

    # The expected trajectory, rebuilt independently: prompt, forced turns, and the tools' own outputs.
    with Session([img]) as s:
        code_res = registry.call("code", {"code": CODE}, s)
        search_res = registry.call("search", {"query": "lighthouse built year"}, s)
    assert code_res.status == "ok" and len(code_res.images) == 1
    crop = img.crop((0, 0, 40, 30)).resize((80, 60))
    np.testing.assert_array_equal(np.asarray(code_res.images[0]), np.asarray(crop))
    rendered = render_chat(proc, prompt.chat_messages(), [img], add_generation_prompt=True, default_system=prompt.system)
    crop_vis = proc.image_inputs([crop])
    turn_ids = [proc.encode(t) for t in TURNS]
    obs1 = ([proc.im_end_id] + proc.encode("\n") + proc.turn_header("user") + proc.encode(code_res.text)
            + proc.encode("\n") + proc.image_block(crop_vis.grid_thw[0]) + proc.turn_footer() + proc.turn_header("assistant"))
    obs2 = ([proc.im_end_id] + proc.encode("\n") + proc.turn_header("user") + proc.encode(search_res.text)
            + proc.turn_footer() + proc.turn_header("assistant"))
    pieces = [(rendered.token_ids, 0), (turn_ids[0], 1), (obs1, 0), (turn_ids[1], 1), (obs2, 0), (turn_ids[2], 1), ([proc.im_end_id], 0)]
    exp_ids = [t for p, _ in pieces for t in p]
    exp_mask = [m for p, m in pieces for _ in p]

    for g, traj in enumerate(trajs):
        assert traj.token_ids == exp_ids, f"sample {g}: token ids differ"
        assert traj.loss_mask == exp_mask, f"sample {g}: loss mask differs"
        assert traj.prompt_len == len(rendered.token_ids)
        assert traj.stop_reason == "answer" and traj.answer == "1889" and traj.num_turns == 3
        assert traj.group_id == 0 and traj.sample_index == g and traj.prompt.answer == "1889"
        starts = np.cumsum([0] + [len(p) for p, _ in pieces])
        assert traj.turn_spans == [(int(starts[1]), int(starts[2])), (int(starts[3]), int(starts[4])), (int(starts[5]), int(starts[6]))]
        assert [(c.name, c.args, c.status) for c in traj.tool_calls] == [
            ("code", {"code": CODE}, "ok"), ("search", {"query": "lighthouse built year"}, "ok")]
        assert all(c.latency_s >= 0 and c.error is None for c in traj.tool_calls)
        # images: the input, then the crop the code showed, with the processor's own grids
        assert len(traj.images) == 2
        np.testing.assert_array_equal(np.asarray(traj.images[1]), np.asarray(crop))
        assert torch.equal(traj.image_grid_thw, torch.cat([rendered.image_grid_thw, crop_vis.grid_thw]))
        assert torch.equal(traj.pixel_values, torch.cat([rendered.pixel_values, crop_vis.pixel_values]))
        assert format_ok(traj.turn_texts)
        # sampling-time (KV-cached, batched) log-probs == a one-shot teacher-forced recomputation
        ref = _teacher_forced_logprobs(model, traj, 0.7)
        mask = torch.tensor(traj.loss_mask, dtype=torch.bool)
        got = torch.tensor(traj.sample_logprobs)
        assert torch.all(got[~mask] == 0)
        torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=0, msg=f"sample {g}: logprobs")
        assert torch.all(got[mask] < 0)
    st = inner.stats()
    assert st["tokens_cached"] > len(rendered.token_ids)  # sample 2 reused the prompt, turns 2-3 their prefix
    assert st["tokens_prefilled"] < sum(len(t.token_ids) for t in trajs)


# -- fakes for the limit / failure-mode tests --------------------------------------------------------------
class FakeEngine:
    """Emits scripted turn texts: script(tag) -> text or (text, finish_reason)."""

    def __init__(self, proc, script):
        self.proc, self.script = proc, script
        self.requests = []

    def generate(self, requests, sampling):
        out = []
        for r in requests:
            self.requests.append(r)
            s = self.script(r.tag)
            text, finish = (s, "stop") if isinstance(s, str) else s
            ids = self.proc.encode(text)[: r.max_new_tokens]
            if len(ids) == r.max_new_tokens and finish != "eos":
                finish = "length"
            out.append(GenerateResult(ids, [-0.5] * len(ids), finish, None))
        return out

    async def agenerate(self, request, sampling):
        return self.generate([request], sampling)[0]

    def update_weights(self, model):
        pass

    def stats(self):
        return {}

    def clear_cache(self):
        pass


class FakeTool:
    def __init__(self, name, text="ok", images=()):
        self.name, self.text, self.images = name, text, list(images)
        self.calls = []

    def call(self, args, session):
        self.calls.append(args)
        return ToolResult(text=self.text, images=list(self.images))


class FakeSession:
    closed = 0

    def __init__(self, images):
        self.images = images

    def close(self):
        FakeSession.closed += 1


def _run(proc, schedule, script, tools=None, limits=None, group_size=1, session_factory=FakeSession, images=None):
    registry = ToolRegistry(tools if tools is not None else [FakeTool("code"), FakeTool("search"), FakeTool("image_search")])
    prompt = Prompt(id="q", question="What is it?", images=images if images is not None else [_image(1)], answer="x")
    engine = FakeEngine(proc, script)
    trajs = run_episodes(engine, proc, registry, [prompt], group_size, SamplingParams(), limits or EpisodeLimits(),
                         progress=False, session_factory=session_factory, schedule=schedule)
    return trajs, engine, registry


CODE_TURN = "<think>a</think><code>\n```python\nprint(1)\n```\n</code>"
SEARCH_TURN = '<think>b</think><tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call>'
ANSWER_TURN = "<think>c</think><answer>x</answer>"


def _user_turns(proc, traj):
    text = proc.decode(traj.token_ids)
    return [t.split("<|im_end|>")[0] for t in text.split("<|im_start|>user\n")[2:]]


def test_max_turns_stops_without_running_last_tool(tiny, schedule):
    _, proc = tiny
    trajs, _, reg = _run(proc, schedule, lambda tag: CODE_TURN, limits=EpisodeLimits(max_turns=2))
    t = trajs[0]
    assert t.stop_reason == "max_turns" and t.num_turns == 2 and len(t.tool_calls) == 1
    assert t.token_ids[-len(proc.encode(CODE_TURN)):] == proc.encode(CODE_TURN)  # ends on the policy's turn


def test_malformed_tool_call_goes_back_as_error_then_answer(tiny, schedule):
    _, proc = tiny
    turns = ['<think>a</think><tool_call>{"name": "search", "arguments": {"query": }</tool_call>', ANSWER_TURN]
    trajs, _, _ = _run(proc, schedule, lambda tag: turns[tag.turn])
    t = trajs[0]
    assert t.stop_reason == "answer" and t.num_turns == 2 and t.tool_calls == []
    (feedback,) = _user_turns(proc, t)
    assert feedback.startswith("Error: malformed JSON in <tool_call>")
    assert not format_ok(t.turn_texts)


def test_unknown_tool_error_reaches_policy(tiny, schedule):
    _, proc = tiny
    turns = ['<think>a</think><tool_call>{"name": "calculator", "arguments": {"x": 1}}</tool_call>', ANSWER_TURN]
    trajs, _, _ = _run(proc, schedule, lambda tag: turns[tag.turn])
    t = trajs[0]
    assert [(c.name, c.status) for c in t.tool_calls] == [("calculator", "error")]
    assert "unknown tool 'calculator'" in _user_turns(proc, t)[0]
    assert t.stop_reason == "answer"


def test_no_action_and_repeated_im_start(tiny, schedule):
    _, proc = tiny
    trajs, _, _ = _run(proc, schedule, lambda tag: ("<think>I am done thinking.</think><|im_end|>", "eos"))
    assert trajs[0].stop_reason == "no_action" and trajs[0].num_turns == 1
    # a new <|im_start|> inside the turn (engine stops on it): nothing runs, the episode ends
    trajs, _, reg = _run(proc, schedule, lambda tag: (CODE_TURN[:-7] + "<|im_start|>", "stop"))
    assert trajs[0].stop_reason == "invalid_token" and trajs[0].tool_calls == []


def test_generation_past_tool_call_executes_first_call_only(tiny, schedule):
    _, proc = tiny
    search = FakeTool("search", text="<tool_response>real</tool_response>")
    turns = [(SEARCH_TURN + "<tool_response>hallucinated</tool_response><|im_end|>", "eos"), ANSWER_TURN]
    trajs, _, _ = _run(proc, schedule, lambda tag: turns[tag.turn], tools=[FakeTool("code"), search, FakeTool("image_search")])
    t = trajs[0]
    assert search.calls == [{"query": "q"}]
    assert _user_turns(proc, t)[0] == "<tool_response>real</tool_response>"
    # the turn ended with <|im_end|> itself: the observation must not add a second one
    text = proc.decode(t.token_ids)
    assert "<|im_end|><|im_end|>" not in text
    assert not format_ok(t.turn_texts)  # the hallucinated response is a format error


def test_empty_and_bad_tool_images(tiny, schedule):
    _, proc = tiny
    tools = [FakeTool("code", "Code execution result:\nstdout:\n\nstderr:\n", images=[]),
             FakeTool("search"), FakeTool("image_search", "<tool_response>none</tool_response>", images=[None, "x"])]
    turns = [CODE_TURN, '<think>b</think><tool_call>{"name": "image_search"}</tool_call>', ANSWER_TURN]
    trajs, _, _ = _run(proc, schedule, lambda tag: turns[tag.turn], tools=tools)
    t = trajs[0]
    assert t.stop_reason == "answer" and len(t.images) == 1 and t.image_grid_thw.shape == (1, 3)
    assert t.token_ids.count(proc.vision_start_id) == 1
    mrope_position_ids(torch.tensor(t.token_ids), t.image_grid_thw, proc.image_pad_id, 2)  # consistent layout


def test_tool_images_get_processor_pad_counts_and_max_images(tiny, schedule):
    _, proc = tiny
    shown = [_image(3, (50, 90)), _image(4, (120, 40))]
    tools = [FakeTool("code", "Code execution result:\nstdout:\n\nstderr:\n", images=shown), FakeTool("search"), FakeTool("image_search")]
    turns = [CODE_TURN, ANSWER_TURN]
    trajs, _, _ = _run(proc, schedule, lambda tag: turns[tag.turn], tools=tools)
    t = trajs[0]
    vis = proc.image_inputs(shown)
    assert torch.equal(t.image_grid_thw[1:], vis.grid_thw)
    assert t.token_ids.count(proc.image_pad_id) == sum(proc.num_image_tokens(g) for g in t.image_grid_thw)
    trajs, _, _ = _run(proc, schedule, lambda tag: turns[tag.turn], tools=tools, limits=EpisodeLimits(max_images=2))
    assert trajs[0].stop_reason == "max_images" and len(trajs[0].images) == 1


def test_token_limits_and_tool_output_truncation(tiny, schedule):
    _, proc = tiny
    long_text = " ".join(["word"] * 500)
    tools = [FakeTool("code", long_text), FakeTool("search"), FakeTool("image_search")]
    turns = [CODE_TURN, ANSWER_TURN]
    trajs, _, _ = _run(proc, schedule, lambda tag: turns[tag.turn], tools=tools, limits=EpisodeLimits(max_tool_output_tokens=10))
    obs = _user_turns(proc, trajs[0])[0]
    assert obs.endswith("...[output truncated]") and len(proc.encode(obs)) < 30
    prompt_len = trajs[0].prompt_len
    trajs, engine, _ = _run(proc, schedule, lambda tag: turns[tag.turn], tools=tools, limits=EpisodeLimits(max_total_tokens=prompt_len + 10))
    t = trajs[0]
    assert t.stop_reason == "max_tokens" and len(t) == prompt_len + 10 and engine.requests[0].max_new_tokens == 10
    assert sum(t.loss_mask) == 10


def test_session_failure_group_ids_and_registry_check(tiny, schedule):
    _, proc = tiny

    def broken(images):
        raise RuntimeError("no sandbox")

    with pytest.warns(RuntimeWarning, match="ends with tool_error: tool: RuntimeError: no sandbox"):
        trajs, _, _ = _run(proc, schedule, lambda tag: CODE_TURN, session_factory=broken, group_size=3)
    assert [t.stop_reason for t in trajs] == ["tool_error"] * 3
    assert [t.sample_index for t in trajs] == [0, 1, 2] and {t.group_id for t in trajs} == {0}
    assert "no sandbox" in trajs[0].tool_calls[0].error
    assert trajs[0].error.startswith("tool: RuntimeError: no sandbox (at test_episode.py:")
    FakeSession.closed = 0
    trajs, _, _ = _run(proc, schedule, lambda tag: [CODE_TURN, ANSWER_TURN][tag.turn], group_size=2)
    assert FakeSession.closed == 2  # one session per episode, closed at the end
    with pytest.raises(ValueError, match="image_search"):
        _run(proc, schedule, lambda tag: ANSWER_TURN, tools=[FakeTool("code"), FakeTool("search")])
