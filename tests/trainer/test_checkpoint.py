"""Checkpoints: exact round trip of weights, optimizer, scheduler, RNG and data state; HF reload; atomicity."""

from __future__ import annotations

import errno
import random
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyesv2.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from deepeyesv2.config import OptimConfig
from deepeyesv2.data import DataState
from deepeyesv2.model import ModelConfig, build_model, packed_hidden
from deepeyesv2.optim import build_optimizer
from deepeyesv2.packing import Sample, pack
from deepeyesv2_rollout.chat import render_chat
from deepeyesv2_rollout.qwen import ChatProcessor


def trained(model, opt, sched, steps: int = 2) -> None:
    gen = torch.Generator().manual_seed(123)
    for _ in range(steps):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def rng_draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


@pytest.fixture(scope="module")
def tiny():
    model, proc = build_model(ModelConfig(seed=0))
    return model, proc


def test_round_trip(tmp_path, tiny):
    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=1), total_steps=10)
    trained(model, opt, sched)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = save_checkpoint(tmp_path, 2, model, proc, opt, sched, DataState(epoch=1, position=4, seed=9), {"stage": "sft", "best": 0.5})
    assert path == tmp_path / "checkpoints" / "step_000002"
    expected_draws = rng_draws()
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_opt = opt.state_dict()

    model2, _ = build_model(ModelConfig(seed=1), processor=proc)  # different weights
    assert not torch.equal(model2.lm_head.weight, model.lm_head.weight)
    opt2, sched2 = build_optimizer(model2, OptimConfig(lr=1e-3, warmup_steps=1), total_steps=10)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    step, state, extra = load_checkpoint(tmp_path, model2, opt2, sched2)  # out_dir -> latest

    assert (step, state, extra) == (2, DataState(epoch=1, position=4, seed=9), {"stage": "sft", "best": 0.5})
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_weights[k]), f"weight {k} differs after reload"
    got_opt = opt2.state_dict()
    assert got_opt["param_groups"] == expected_opt["param_groups"]
    assert set(got_opt["state"]) == set(expected_opt["state"]) and len(got_opt["state"]) > 0
    for i, st in expected_opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got_opt["state"][i][name], st[name]), f"optimizer state {i}.{name} differs"
    assert sched2.last_epoch == sched.last_epoch == 2 and sched2.get_last_lr() == sched.get_last_lr()
    assert rng_draws() == expected_draws  # RNG states restored


def test_hf_directory_reloads_with_identical_outputs(tmp_path, tiny):
    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3), total_steps=10)
    path = save_checkpoint(tmp_path, 7, model, proc, opt, sched, DataState(), {})
    reloaded, proc2 = build_model(ModelConfig(name_or_path=str(path)))
    assert isinstance(proc2, ChatProcessor)
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "<answer>noise</answer>"}]
    r1, r2 = render_chat(proc, msgs, [im]), render_chat(proc2, msgs, [im])
    assert r1.token_ids == r2.token_ids and r1.loss_mask == r2.loss_mask
    batch = pack([Sample(torch.tensor(r1.token_ids), torch.tensor(r1.loss_mask), r1.pixel_values, r1.image_grid_thw)],
                 proc.image_pad_id)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        a = model.lm_head(packed_hidden(model, batch))
        b = reloaded.lm_head(packed_hidden(reloaded, batch))
    assert torch.equal(a, b), f"max |diff| {float((a - b).abs().max())}"


def test_keep_last_latest_and_atomic_failure(tmp_path, tiny):
    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(), total_steps=10)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, None, opt, sched, DataState(position=step), {}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["latest", "step_000003", "step_000004"]
    assert (root / "latest").read_text().strip() == "step_000004"
    assert latest_checkpoint(tmp_path) == root / "step_000004"

    class Exploding(torch.nn.Module):
        def save_pretrained(self, *a, **k):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 5, Exploding(), None, None)
    assert not (root / "step_000005").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")], "temp dir left behind"
    assert latest_checkpoint(tmp_path) == root / "step_000004"

    # a stale pointer and an incomplete directory: fall back to the newest complete step
    (root / "latest").write_text("step_000099\n")
    (root / "step_000050").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step_000004"
    step, state, _ = load_checkpoint(root / "step_000003", restore_rng=False)
    assert step == 3 and state.position == 3


def test_missing_checkpoint_errors(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)


# ------------------------------------------------------------------------------ integrity (manifest + fallback)


def flip_byte(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x40
    path.write_bytes(bytes(data))


def two_checkpoints(tmp_path, model, proc):
    """Checkpoints at steps 1 and 2 with different weights; returns step 1's weights."""
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3), total_steps=10)
    trained(model, opt, sched, steps=1)
    save_checkpoint(tmp_path, 1, model, proc, opt, sched, DataState(position=1), {})
    step1 = {k: v.clone() for k, v in model.state_dict().items()}
    trained(model, opt, sched, steps=1)
    save_checkpoint(tmp_path, 2, model, proc, opt, sched, DataState(position=2), {})
    return step1


def corrupt_truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


CORRUPTIONS = {
    # a flipped byte in the tensor data (past the safetensors header): today a silent wrong resume
    "bit flip in model.safetensors": ("model.safetensors", lambda p: flip_byte(p, 0.6), "checksum mismatch"),
    "bit flip in trainer_state.pt": ("trainer_state.pt", lambda p: flip_byte(p, 0.5), "checksum mismatch"),
    "truncated model.safetensors": ("model.safetensors", corrupt_truncate, "truncated"),
    "deleted trainer_state.pt": ("trainer_state.pt", lambda p: p.unlink(), "trainer_state.pt is missing"),
    "deleted model.safetensors": ("model.safetensors", lambda p: p.unlink(), "model.safetensors is missing"),
    "deleted manifest.json": ("manifest.json", lambda p: p.unlink(), "no manifest.json"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_falls_back_to_the_newest_that_verifies(tmp_path, case, capfd):
    name, corrupt, why = CORRUPTIONS[case]
    model, proc = build_model(ModelConfig(seed=0))
    step1 = two_checkpoints(tmp_path, model, proc)
    root = tmp_path / "checkpoints"
    corrupt(root / "step_000002" / name)
    capfd.readouterr()

    model2, _ = build_model(ModelConfig(seed=1), processor=proc)
    opt2, sched2 = build_optimizer(model2, OptimConfig(lr=1e-3), total_steps=10)
    step, state, _ = load_checkpoint(tmp_path, model2, opt2, sched2)  # out_dir: the newest that verifies
    assert (step, state.position) == (1, 1)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, step1[k]), f"weight {k} is not step 1's after the fallback"
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("deepeyesv2:")]  # not HF's bars
    assert len(lines) == 1, lines
    assert "step_000002 fails verification" in lines[0] and why in lines[0] and "falling back to step_000001" in lines[0]

    # named explicitly, the corrupt step is refused (no fallback: the caller asked for that one)
    with pytest.raises(CheckpointError, match=rf"step_000002 fails verification: .*{why}"):
        load_checkpoint(root / "step_000002", restore_rng=False)


def test_no_checkpoint_verifies_is_one_clear_error(tmp_path, tiny):
    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(), total_steps=10)
    save_checkpoint(tmp_path, 1, model, proc, opt, sched, DataState(), {})
    flip_byte(tmp_path / "checkpoints" / "step_000001" / "model.safetensors", 0.7)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, restore_rng=False)
    msg = str(err.value)
    assert "\n" not in msg and "no checkpoint in" in msg and "step_000001 fails verification" in msg, msg


def test_manifest_covers_every_file(tmp_path, tiny):
    import json

    from deepeyesv2.checkpoint import verify_checkpoint

    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(), total_steps=10)
    path = save_checkpoint(tmp_path, 3, model, proc, opt, sched, DataState(), {})
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = {p.name for p in path.iterdir() if p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk and {"model.safetensors", "trainer_state.pt", "config.json"} <= on_disk
    assert all(rec["bytes"] == (path / n).stat().st_size for n, rec in manifest["files"].items())
    assert verify_checkpoint(path) is None


def test_interrupted_save_temp_dirs_are_removed_at_the_next_save(tmp_path, tiny, capfd):
    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(), total_steps=10)
    save_checkpoint(tmp_path, 1, model, None, opt, sched, DataState(), {})
    stale = tmp_path / "checkpoints" / ".tmp_step_000002_k3j1"  # a save killed half-way
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    capfd.readouterr()
    save_checkpoint(tmp_path, 2, model, None, opt, sched, DataState(), {})
    assert not stale.exists()
    err = capfd.readouterr().err
    assert "removed 1 temporary directory" in err and ".tmp_step_000002_k3j1" in err, err


DiskUsage = namedtuple("DiskUsage", "total used free")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_write_failed(*args, **kwargs):  # what torch.save raises when the disk fills up mid-write
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 3008 vs 2944: "
                       "PytorchStreamWriter failed writing file data/0: file write failed")


@pytest.mark.parametrize("where", ["model", "trainer_state"])
@pytest.mark.parametrize("failure", [_enospc, _torch_write_failed])
def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, tiny, monkeypatch, where, failure):
    from deepeyesv2.checkpoint import verify_checkpoint

    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3), total_steps=10)
    trained(model, opt, sched, steps=1)
    save_checkpoint(tmp_path, 1, model, proc, opt, sched, DataState(position=1), {})
    root = tmp_path / "checkpoints"
    weights1 = {k: v.clone() for k, v in model.state_dict().items()}
    trained(model, opt, sched, steps=1)
    with monkeypatch.context() as m:
        if where == "model":
            m.setattr(type(model), "save_pretrained", failure)
        else:
            m.setattr(torch, "save", failure)
        # a nearly full disk: 5 MiB left (torch's message alone says only "file write failed")
        m.setattr(shutil, "disk_usage", lambda path: DiskUsage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
        with pytest.raises(CheckpointError) as err:
            save_checkpoint(tmp_path, 2, model, proc, opt, sched, DataState(position=2), {})
        with pytest.raises(CheckpointError):  # re-saving an existing step: the old copy survives too
            save_checkpoint(tmp_path, 1, model, proc, opt, sched, DataState(position=1), {})
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert f"disk full while saving checkpoint {root / 'step_000002'}" in msg, msg
    assert "5.0 MiB free on " in msg and "needs about" in msg and f"previous checkpoint {root / 'step_000001'} is intact" in msg
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"], "partial save left behind"
    assert verify_checkpoint(root / "step_000001") is None
    model2, _ = build_model(ModelConfig(seed=1), processor=proc)
    step, state, _ = load_checkpoint(tmp_path, model2, restore_rng=False)
    assert (step, state.position) == (1, 1)
    assert all(torch.equal(v, weights1[k]) for k, v in model2.state_dict().items())


# ---------------------------------------------------------------------------------------------- LR schedule


def lrs(opt, sched, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("stop", [60, 30, 2])  # a finished schedule, mid-cosine, mid-warm-up
def test_resume_with_more_steps_keeps_the_lr_continuous(tiny, stop):
    from deepeyesv2.optim import extend_schedule

    model, _ = tiny
    cfg = OptimConfig(lr=1e-3, warmup_steps=3, min_lr_ratio=0.1)
    opt, sched = build_optimizer(model, cfg, total_steps=60)
    before = lrs(opt, sched, stop)
    at_resume = sched.get_last_lr()[0]
    state = sched.state_dict()

    opt2, sched2 = build_optimizer(model, cfg, total_steps=300)  # the resumed run asks for 300 steps
    sched2.load_state_dict(state)
    note = extend_schedule(sched2, 300)
    assert note and "60" in note and "300" in note and "\n" not in note
    after = lrs(opt2, sched2, 300 - stop + 1)
    assert after[0] == pytest.approx(at_resume, rel=1e-12)  # the resume step's LR is the one it had
    assert after[-1] == pytest.approx(1e-4, rel=1e-9)  # and the schedule still ends at lr * min_lr_ratio
    curve = before + after
    steps = [abs(b - a) for a, b in zip(curve, curve[1:])]
    warm = max(steps[:3])  # the warm-up's increments are the largest legitimate moves
    assert max(steps[3:]) <= warm, f"LR jumps by {max(steps[3:]):.3g} after the warm-up"
    if stop >= 3:
        assert all(b <= a + 1e-15 for a, b in zip(after, after[1:])), "LR rises again after the resume"
    assert extend_schedule(sched2, 300) is None  # same horizon: nothing to say


def test_other_write_errors_are_not_reported_as_disk_full(tmp_path, tiny, monkeypatch):
    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(), total_steps=10)
    save_checkpoint(tmp_path, 1, model, None, opt, sched, DataState(), {})
    monkeypatch.setattr(torch, "save", _torch_write_failed)  # plenty of space free: some other I/O failure
    with pytest.raises(RuntimeError, match="file write failed"):
        save_checkpoint(tmp_path, 2, model, None, opt, sched, DataState(), {})
    assert not (tmp_path / "checkpoints" / "step_000002").exists()


@pytest.mark.parametrize("edit", [
    lambda m: m.replace('"bytes"', '"bytez"', 1),  # still JSON, an entry without its size
    lambda m: m[: len(m) // 2],  # not JSON any more
    lambda m: m.replace('"xxh3_128": "', '"xxh3_128": "0', 1),  # a wrong checksum
])
def test_damaged_manifest_fails_verification_without_a_traceback(tmp_path, tiny, edit):
    from deepeyesv2.checkpoint import verify_checkpoint

    model, proc = tiny
    opt, sched = build_optimizer(model, OptimConfig(), total_steps=10)
    path = save_checkpoint(tmp_path, 1, model, None, opt, sched, DataState(), {})
    (path / "manifest.json").write_text(edit((path / "manifest.json").read_text()))
    assert verify_checkpoint(path) is not None
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies: step_000001 fails verification"):
        load_checkpoint(tmp_path, restore_rng=False)


def test_a_run_saved_before_manifests_resumes_unverified_with_one_line(tmp_path, capfd):
    """Checkpoints of an older version carry no manifest.json: the run still resumes, from its newest checkpoint,
    saying in one line that it is unverified (a run where other checkpoints have manifests still falls back)."""
    model, proc = build_model(ModelConfig(seed=0))
    two_checkpoints(tmp_path, model, proc)
    root = tmp_path / "checkpoints"
    for d in ("step_000001", "step_000002"):
        (root / d / "manifest.json").unlink()
    capfd.readouterr()
    model2, _ = build_model(ModelConfig(seed=1), processor=proc)
    opt2, sched2 = build_optimizer(model2, OptimConfig(lr=1e-3), total_steps=10)
    step, _, _ = load_checkpoint(tmp_path, model2, opt2, sched2)
    assert step == 2
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("deepeyesv2:")]
    assert len(lines) == 1 and "unverified" in lines[0] and "step_000002" in lines[0], lines
