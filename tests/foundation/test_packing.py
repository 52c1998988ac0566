"""Packing is exact: a packed row gives each sequence the log-probs it gets alone, unpadded."""

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyesv2.policy_logprobs import packed_logprobs
from deepeyesv2.model import build_model, packed_hidden
from deepeyesv2.packing import IGNORE_INDEX, PackingError, Sample, first_fit_decreasing, pack, pack_by_budget
from deepeyesv2_rollout.chat import render_chat
from deepeyesv2_rollout.qwen import ChatFormatError, mrope_position_ids


@pytest.fixture(scope="module")
def tiny():
    return build_model()


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _samples(proc):
    convs = [
        ([{"role": "user", "content": "<image>How many dots?"}, {"role": "assistant", "content": "<answer>3</answer>"}], [_image(84, 112, 0)]),
        ([{"role": "user", "content": "Name the capital."}, {"role": "assistant", "content": "<think>ok</think><answer>Paris</answer>"}], []),
        ([{"role": "user", "content": "<image>and <image> compare"}, {"role": "assistant", "content": "left is bigger"}], [_image(140, 70, 1), _image(56, 56, 2)]),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there, friend"}], []),
    ]
    out = []
    for i, (m, ims) in enumerate(convs):
        r = render_chat(proc, m, ims, name=f"s{i}")
        out.append(Sample(torch.tensor(r.token_ids), torch.tensor(r.loss_mask), r.pixel_values, r.image_grid_thw, name=f"s{i}"))
    return out


def test_packed_logprobs_equal_alone(tiny):
    model, proc = tiny
    samples = _samples(proc)
    row = pack(samples, model.config.image_token_id)
    assert row.image_grid_thw.shape[0] == 3
    with torch.no_grad():
        logp, _ = packed_logprobs(model, row)
        for i, s in enumerate(samples):
            alone, _ = packed_logprobs(model, pack([s], model.config.image_token_id))
            a, b = int(row.cu_seqlens[i]), int(row.cu_seqlens[i + 1])
            torch.testing.assert_close(logp[a:b], alone, rtol=1e-5, atol=2e-5, msg=f"sequence {i} log-probs differ packed vs alone")
            # and alone == the stock HF forward (full logits), unpacked
            ids = s.input_ids[None]
            kw = dict(pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                      mm_token_type_ids=(ids == model.config.image_token_id).int()) if s.pixel_values is not None else {}
            logits = model(input_ids=ids, **kw).logits[0]
            ref = torch.log_softmax(logits.float(), -1)[:-1].gather(-1, s.input_ids[1:, None])[:, 0]
            mask = s.loss_mask[1:].bool()
            torch.testing.assert_close(alone[:-1][mask], ref[mask], rtol=1e-5, atol=2e-5, msg=f"sequence {i} vs HF forward")


def test_targets_never_cross_sequences(tiny):
    model, proc = tiny
    row = pack(_samples(proc), model.config.image_token_id)
    ends = row.cu_seqlens[1:] - 1
    assert (row.targets[ends.long()] == IGNORE_INDEX).all()
    assert not row.loss_mask[ends.long()].any()


def test_mrope_positions_match_transformers(tiny):
    model, proc = tiny
    for s in _samples(proc):
        ids = s.input_ids[None]
        ours = mrope_position_ids(s.input_ids, s.image_grid_thw, model.config.image_token_id, 2)
        if s.image_grid_thw is None:
            expected = torch.arange(len(s)).expand(3, -1)
        else:
            expected, _ = model.model.get_rope_index(ids, (ids == model.config.image_token_id).int(), s.image_grid_thw)
            expected = expected[:, 0]
        assert torch.equal(ours, expected), s.name


def test_packed_gradients_equal_alone(tiny):
    model, proc = tiny
    samples = _samples(proc)[:2]
    W = model.lm_head.weight

    def grad_of(rows):
        model.zero_grad()
        for r in rows:
            logp, _ = packed_logprobs(model, r)
            logp.sum().backward()
        return W.grad.clone()

    g_packed = grad_of([pack(samples, model.config.image_token_id)])
    g_alone = grad_of([pack([s], model.config.image_token_id) for s in samples])
    model.zero_grad()
    torch.testing.assert_close(g_packed, g_alone, rtol=1e-4, atol=1e-6)


def test_ffd_budget_and_waste():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6, 1, 500).astype(int), 64, 4096).tolist()
    bins = first_fit_decreasing(lengths, 8192)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 8192 for b in bins)
    waste = 1 - sum(lengths) / (len(bins) * 8192)
    assert waste < 0.03, waste


def test_bad_inputs_name_the_sample(tiny):
    model, proc = tiny
    good = _samples(proc)[0]
    with pytest.raises(PackingError, match="empty"):
        pack([Sample(torch.tensor([1]), torch.tensor([1]), name="tiny-one")], model.config.image_token_id)
    with pytest.raises(PackingError, match="long-one.*exceed"):
        pack_by_budget([Sample(torch.arange(50), torch.ones(50), name="long-one")], 16, model.config.image_token_id)
    cut = Sample(good.input_ids[:-20].clone(), good.loss_mask[:-20].clone(), good.pixel_values, good.image_grid_thw, name="cut")
    pads = (good.input_ids == model.config.image_token_id).nonzero()[:, 0]
    broken = good.input_ids.clone()
    broken[pads[0]] = 5  # one <|image_pad|> too few
    with pytest.raises(PackingError, match="mismatch.*<\\|image_pad\\|>|image 0 has"):
        pack([Sample(broken, good.loss_mask, good.pixel_values, good.image_grid_thw, name="mismatch")], model.config.image_token_id)
    with pytest.raises(ChatFormatError, match="bad.*cannot decode image"):
        render_chat(proc, [{"role": "user", "content": "<image>x"}], [b"not an image"], name="bad")
    with pytest.raises(ChatFormatError, match="missing.*not found"):
        render_chat(proc, [{"role": "user", "content": "<image>x"}], ["/nonexistent.png"], name="missing")
    assert len(cut) < len(good)
