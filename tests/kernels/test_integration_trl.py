"""deepeyesv2_kernels.integrations.trl inside TRL's GRPOTrainer, against TRL's own log-prob path (CPU).

The ladder: the patched fused forward vs TRL's fused forward on one batch (outputs and gradients, masks,
shift_labels, num_items_in_batch); then whole GRPOTrainer runs, with and without `apply`, from the same seed and
data: per-step loss, entropy, gradients before each optimizer step and parameters after it must agree, on a tiny
Qwen2 (text) and a tiny Qwen2.5-VL (pixel_values / image_grid_thw go through TRL's own VLM batching). The runs
use a reference model (beta > 0), num_iterations=2 (old log-probs), an entropy bonus (entropy gradient) and
temperature 0.7, so every way TRL asks for log-probs is exercised. fp32 on CPU; bf16 autocast is a slow variant.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

import deepeyesv2_kernels.logprobs as kernel_logprobs  # noqa: E402
from deepeyesv2_kernels.integrations import trl as integ  # noqa: E402
from deepeyesv2.model import TINY_PROCESSOR_DIR  # noqa: E402

PROMPTS = ["hello world", "the cat sat", "one two three", "a b c d"]


def _tiny_qwen2(tokenizer, seed=0, **overrides) -> Qwen2ForCausalLM:
    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    cfg.update(overrides)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TINY_PROCESSOR_DIR))


@pytest.fixture(scope="module")
def qwen2_dir(tokenizer, tmp_path_factory):
    # Saved to disk: with beta > 0 TRL builds the reference model from the policy's path.
    path = tmp_path_factory.mktemp("tiny_qwen2")
    _tiny_qwen2(tokenizer).save_pretrained(path)
    return str(path)


class _Recorder(TrainerCallback):
    """Gradients just before each optimizer step and parameters just after it."""

    def __init__(self):
        self.grads, self.params = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})


def _reward_len(completions, **kwargs):
    return [float(len(str(c))) for c in completions]


def run_grpo(model_path, processing_class, dataset, ours, out_dir, monkeypatch, **overrides):
    """Train a few GRPO steps; returns (log rows with a loss, recorder, number of fused_logprobs calls)."""
    calls = []
    real = kernel_logprobs.fused_logprobs

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_logprobs, "fused_logprobs", counting)
    cfg = dict(output_dir=str(out_dir), use_cpu=True, bf16=False, report_to=[], disable_tqdm=True, save_strategy="no",
               max_completion_length=8, num_generations=2, per_device_train_batch_size=4, max_steps=3,
               logging_steps=1, seed=0, temperature=0.7, beta=0.05, num_iterations=2, entropy_coef=0.01,
               optim="sgd", learning_rate=0.5, model_init_kwargs={"dtype": torch.float32})
    cfg.update(overrides)
    recorder = _Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model_path, reward_funcs=_reward_len, args=GRPOConfig(**cfg),
                              train_dataset=dataset, processing_class=processing_class, callbacks=[recorder])
        if ours:
            integ.apply(trainer)
        trainer.train()
    monkeypatch.setattr(kernel_logprobs, "fused_logprobs", real)
    rows = [r for r in trainer.state.log_history if "loss" in r]
    return rows, recorder, calls


def assert_runs_match(peer, ours, grad_tol=(1e-4, 1e-6), param_tol=(1e-5, 1e-6), loss_tol=(1e-5, 1e-6)):
    (rows_p, rec_p, calls_p), (rows_o, rec_o, calls_o) = peer, ours
    assert calls_p == [], "TRL's own run must not reach fused_logprobs"
    assert calls_o, "apply() did not route GRPOTrainer's log-probs through fused_logprobs"
    assert len(rows_p) == len(rows_o) and len(rec_p.grads) == len(rec_o.grads) > 0
    rtol, atol = loss_tol
    for step, (rp, ro) in enumerate(zip(rows_p, rows_o), 1):
        for key in ("loss", "entropy", "kl"):
            if key in rp:
                assert ro[key] == pytest.approx(rp[key], rel=rtol, abs=atol), f"step {step} {key}"
    for step, (gp, go) in enumerate(zip(rec_p.grads, rec_o.grads), 1):
        assert gp.keys() == go.keys(), f"step {step}: different parameters received gradients"
        for name in gp:
            torch.testing.assert_close(go[name], gp[name], rtol=grad_tol[0], atol=grad_tol[1],
                                       msg=lambda m, n=name, s=step: f"step {s} grad {n}: {m}")
    for step, (pp, po) in enumerate(zip(rec_p.params, rec_o.params), 1):
        for name in pp:
            torch.testing.assert_close(po[name], pp[name], rtol=param_tol[0], atol=param_tol[1],
                                       msg=lambda m, n=name, s=step: f"step {s} param {n}: {m}")


# ---------------------------------------------------------------- the fused forward, one batch


def _fused_pair(tokenizer, outputs=("log_probs", "entropy"), temperature=0.7, entropy_grad=True):
    peer = _tiny_qwen2(tokenizer)
    ours = copy.deepcopy(peer)
    add_fused_lm_head(peer, temperature=temperature, outputs=outputs)
    add_fused_lm_head(ours, temperature=temperature, outputs=outputs)
    integ.patch_fused_lm_head(ours, temperature=temperature, outputs=outputs, entropy_grad=entropy_grad)
    return peer, ours


def _batch(vocab, B=3, L=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (B, L), generator=g)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[0, :4] = 0  # left padding, as TRL pads prompts
    attention_mask[2, :2] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :6] = -100  # prompt tokens: only the completion is scored (logits_to_keep)
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("mode", ["labels", "shift_labels", "num_items", "all_masked"])
def test_fused_forward_matches_trl(tokenizer, mode):
    peer, ours = _fused_pair(tokenizer)
    input_ids, attention_mask, labels = _batch(len(tokenizer))
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=True)
    if mode == "shift_labels":
        kwargs["shift_labels"] = torch.roll(labels, -1, dims=1).masked_fill(
            torch.arange(labels.shape[1]) == labels.shape[1] - 1, -100)
    else:
        kwargs["labels"] = labels if mode != "all_masked" else torch.full_like(labels, -100)
    if mode == "num_items":
        kwargs["num_items_in_batch"] = 17
    out_p, out_o = peer(**kwargs), ours(**kwargs)
    for key in ("log_probs", "entropy", "label_mask", "loss"):
        torch.testing.assert_close(getattr(out_o, key), getattr(out_p, key), rtol=1e-5, atol=1e-6, msg=key)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out_p.log_probs.shape, generator=g)
    for model, out in ((peer, out_p), (ours, out_o)):
        (out.loss + (out.log_probs * w).sum() - 0.1 * (out.entropy * w).sum()).backward()
    # atol 1e-5: the vocab-tiled CPU path sums in another order than TRL's chunks; fp32 rounding of ~1e-7
    # reaches the embedding gradient (|g| ~ 1e-2) as ~2e-6 after two layers' backward. A wrong gradient is O(|g|).
    for (name, p_peer), p_ours in zip(peer.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_peer.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


def test_non_fused_calls_pass_through(tokenizer):
    plain = _tiny_qwen2(tokenizer)
    _, ours = _fused_pair(tokenizer)
    input_ids, attention_mask, _ = _batch(len(tokenizer))
    torch.testing.assert_close(ours(input_ids=input_ids, attention_mask=attention_mask).logits,
                               plain(input_ids=input_ids, attention_mask=attention_mask).logits, msg="logits")
    gen = ours.generate(input_ids[:1, 6:], max_new_tokens=3, do_sample=False)
    ref = plain.generate(input_ids[:1, 6:], max_new_tokens=3, do_sample=False)
    assert torch.equal(gen, ref), "generation changed"


def test_entropy_without_grad_flag_is_detached(tokenizer):
    _, ours = _fused_pair(tokenizer, entropy_grad=False)
    input_ids, attention_mask, labels = _batch(len(tokenizer))
    out = ours(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    assert out.log_probs.requires_grad and not out.entropy.requires_grad


def test_ref_outputs_only_log_probs(tokenizer):
    peer, ours = _fused_pair(tokenizer, outputs=("log_probs",))
    input_ids, attention_mask, labels = _batch(len(tokenizer))
    out_p = peer(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    out_o = ours(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    assert out_o.entropy is None and out_p.entropy is None
    torch.testing.assert_close(out_o.log_probs, out_p.log_probs, rtol=1e-5, atol=1e-6, msg="log_probs")


# ---------------------------------------------------------------- guards


def test_version_guard():
    with pytest.raises(RuntimeError, match="trl 1.x"):
        integ.check_versions("2.0.0", "5.24.0")
    with pytest.raises(RuntimeError, match="transformers 5.x"):
        integ.check_versions("1.16.0", "6.0.0")
    with pytest.warns(UserWarning, match="tested on trl 1.16"):
        integ.check_versions("1.17.0.dev0", "5.24.0")
    integ.check_versions("1.16.0", "5.24.1")  # tested versions: silent


def test_apply_refuses_what_is_not_a_grpo_trainer():
    with pytest.raises(TypeError, match="builtins.object, which is not a GRPOTrainer"):
        integ.apply(object())


def test_missing_or_changed_target_method_fails_loudly():
    # GRPOTrainer subclasses (a future TRL), made without __init__: only the class's method is inspected.
    class NoMethod(GRPOTrainer):
        _get_per_token_logps_and_entropies = None

    with pytest.raises(RuntimeError, match="_get_per_token_logps_and_entropies"):
        integ.apply(NoMethod.__new__(NoMethod))

    class OtherSeam(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids):
            return model(input_ids=input_ids).logits

    with pytest.raises(RuntimeError, match="fused_lm_head=True"):
        integ.apply(OtherSeam.__new__(OtherSeam))


def test_model_without_trl_fused_head_is_refused(tokenizer):
    with pytest.raises(RuntimeError, match="add_fused_lm_head"):
        integ.patch_fused_lm_head(_tiny_qwen2(tokenizer))


def test_scaled_logits_and_bad_outputs_are_refused(tokenizer):
    model = _tiny_qwen2(tokenizer)
    model.config.final_logit_softcapping = 30.0
    add_fused_lm_head(model)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        integ.patch_fused_lm_head(model)
    plain = _tiny_qwen2(tokenizer)
    add_fused_lm_head(plain)
    with pytest.raises(ValueError, match="outputs"):
        integ.patch_fused_lm_head(plain, outputs=("log_probs", "is_top1"))


def test_apply_is_idempotent(tokenizer):
    _, ours = _fused_pair(tokenizer)
    forward = ours.forward.__func__
    integ.patch_fused_lm_head(ours, temperature=0.7, outputs=("log_probs", "entropy"))
    assert ours.forward.__func__ is forward


# ---------------------------------------------------------------- whole GRPOTrainer runs


def test_grpo_trainer_text_matches_trl(qwen2_dir, tokenizer, tmp_path, monkeypatch):
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": PROMPTS})
    peer = run_grpo(qwen2_dir, tokenizer, data, False, tmp_path / "peer", monkeypatch)
    ours = run_grpo(qwen2_dir, tokenizer, data, True, tmp_path / "ours", monkeypatch)
    assert_runs_match(peer, ours)
    # The parameters moved: equal runs are not equal because nothing happened.
    first = ours[1].params[0]
    assert any(not torch.equal(first[n], ours[1].params[-1][n]) for n in first)


def _image_only_processor(tokenizer, image_processor):
    """Qwen2_5_VLProcessor without a video processor (needs torchvision, absent here)."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    template = (TINY_PROCESSOR_DIR / "chat_template.jinja").read_text()
    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                        chat_template=template)


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory):
    from deepeyesv2.model import build_model

    model, chat = build_model()  # tiny preset, random weights, repo tokenizer + image processor
    model.set_attn_implementation("sdpa")  # TRL batches padded rows; the repo's varlen attention wants packing
    path = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    model.save_pretrained(path)
    return str(path), _image_only_processor(chat.tokenizer, chat.image_processor)


def test_grpo_trainer_qwen2_5_vl_matches_trl(qwen2_5_vl, tmp_path, monkeypatch):
    import numpy as np
    from datasets import Dataset
    from PIL import Image

    path, processor = qwen2_5_vl
    rng = np.random.default_rng(0)
    sizes = [(56, 56), (84, 56), (56, 112), (56, 56)]  # different image_grid_thw per sample
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}] for t in PROMPTS]
    data = Dataset.from_dict({"prompt": prompts, "image": images})
    kw = dict(max_steps=2, max_completion_length=6, model_init_kwargs={"dtype": torch.float32,
                                                                       "attn_implementation": "sdpa"})
    peer = run_grpo(path, processor, data, False, tmp_path / "peer", monkeypatch, **kw)
    ours = run_grpo(path, processor, data, True, tmp_path / "ours", monkeypatch, **kw)
    assert_runs_match(peer, ours)
    visual = [n for n in ours[1].grads[0] if ".visual." in n or n.startswith("model.visual")]
    assert visual, "the vision tower got no gradient: images did not reach the fused forward"


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo"])
def test_grpo_trainer_loss_types_match_trl(qwen2_dir, tokenizer, tmp_path, monkeypatch, loss_type):
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": PROMPTS})
    kw = dict(loss_type=loss_type, max_steps=2)
    peer = run_grpo(qwen2_dir, tokenizer, data, False, tmp_path / "peer", monkeypatch, **kw)
    ours = run_grpo(qwen2_dir, tokenizer, data, True, tmp_path / "ours", monkeypatch, **kw)
    assert_runs_match(peer, ours)


@pytest.mark.slow
def test_grpo_trainer_bf16_autocast_close_to_fp32(qwen2_dir, tokenizer, tmp_path, monkeypatch):
    """Under bf16 autocast the head runs on bf16 operands (fp32 accumulation); TRL rounds its CPU logits to bf16.
    Ours must stay as close to the fp32 run as TRL's bf16 path is (within a small factor)."""
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": PROMPTS})
    kw = dict(max_steps=2, num_iterations=1)
    exact = run_grpo(qwen2_dir, tokenizer, data, False, tmp_path / "fp32", monkeypatch, **kw)
    peer = run_grpo(qwen2_dir, tokenizer, data, False, tmp_path / "peer", monkeypatch, bf16=True, **kw)
    ours = run_grpo(qwen2_dir, tokenizer, data, True, tmp_path / "ours", monkeypatch, bf16=True, **kw)
    assert ours[2], "fused_logprobs not called under autocast"

    def grad_err(run):
        g, ref = run[1].grads[0], exact[1].grads[0]
        return max(((g[n] - ref[n]).norm() / ref[n].norm().clamp(min=1e-12)).item() for n in ref)

    err_ours, err_peer = grad_err(ours), grad_err(peer)
    assert err_ours < 0.05, f"bf16 step-1 gradient relative error {err_ours:.3g}"
    assert err_ours <= 2 * err_peer + 1e-3, f"ours {err_ours:.3g} vs TRL bf16 {err_peer:.3g}"
