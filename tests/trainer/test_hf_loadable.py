"""A checkpoint loads the way Hugging Face users load one, in a Python that cannot import this package.

The supported way (README, "Loading a checkpoint without deepeyesv2"), whose example this test runs as written
(our paths in place of its own), in a subprocess started with `python -I -S` and only site-packages on
sys.path (so the editable install's finder never runs and `deepeyesv2` is not importable):

    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    model(**inputs).logits, model.generate(**inputs, max_new_tokens=..., do_sample=False)

Its token ids, logits and greedy generation must equal ours (the packed forward with our M-RoPE positions, and
the embedded rollout engine at temperature 0). A LoRA run's adapter/ folder loads with
`PeftModel.from_pretrained(base, folder)` and gives our LoRA model's logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyesv2.checkpoint import ADAPTER_DIR, save_checkpoint
from deepeyesv2.config import ModelConfig
from deepeyesv2.model import build_model, packed_hidden, unwrap_model
from deepeyesv2.packing import Sample, pack
from deepeyesv2_rollout.chat import render_chat
from deepeyesv2_rollout.engine import EmbeddedEngine
from deepeyesv2_rollout.types import GenerateRequest, SamplingParams

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 12
QUESTION = "How many red squares are in the picture? Think, then answer."

# The README's calls, plus what the comparison needs: logits, token ids, and the logits without mm_token_type_ids.
CLEAN_SCRIPT = r'''
import json
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

jobs = json.loads(JOBS)
for job in jobs:
    ckpt = job["checkpoint"]
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    if job["adapter"]:
        from peft import PeftModel
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(job["base"])
        model = PeftModel.from_pretrained(base, job["adapter"])
    else:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
    model.eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(job["image"])},
                                             {"type": "text", "text": job["question"]}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        out = model.generate(**inputs, max_new_tokens=job["new_tokens"], do_sample=False)
        # the tokenizer + image processor alone give no mm_token_type_ids: the model then uses 1-D positions
        logits_1d = model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits[0]
    n = inputs["input_ids"].shape[1]
    torch.save({"input_ids": inputs["input_ids"][0], "pixel_values": inputs["pixel_values"],
                "image_grid_thw": inputs["image_grid_thw"], "logits": logits, "logits_1d": logits_1d, "generated": out[0, n:].tolist(),
                "text": processor.decode(out[0, n:]), "processor": type(processor).__name__,
                "dtype": str(logits.dtype)}, job["out"])
'''


README_SNIPPET_AFTER = "**Loading a checkpoint without deepeyesv2.**"
README_CKPT, README_IMAGE, README_QUESTION = "runs/sft/checkpoints/step_000100", "chart.png", "What is the peak value?"
README_NEW_TOKENS = "max_new_tokens=256"


def readme_snippet(ckpt: Path, image: Path) -> str:
    """The README's loading example as written, with our checkpoint, image and question in place of its own
    and a shorter generation."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(README_SNIPPET_AFTER):].split("```python\n", 1)[1].split("```", 1)[0]
    for old, new in ((README_CKPT, str(ckpt)), (README_IMAGE, str(image)), (README_QUESTION, QUESTION),
                     (README_NEW_TOKENS, f"max_new_tokens={NEW_TOKENS}")):
        assert block.count(old) == 1, f"the README's example no longer holds {old!r}"
        block = block.replace(old, new)
    return block


def run_clean(code: str, cwd: Path) -> str:
    """Run `code` in `python -I -S` (no PYTHONPATH, no user site, no .pth files, no cwd on sys.path) with only
    site-packages on sys.path, after checking that deepeyesv2 cannot be imported there. Returns its stdout."""
    site = sysconfig.get_paths()["purelib"]
    prelude = (f"import importlib.util, sys\nsys.path.append({site!r})\n"
               "assert importlib.util.find_spec('deepeyesv2') is None, 'deepeyesv2 is importable'\n")
    env = {"HF_HOME": str(cwd / "hf_home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", prelude + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def picture(path: Path) -> Path:
    """A 112 x 84 image: after Qwen2-VL's resize an 8 x 6 patch grid, 12 merged image tokens."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)).save(path)
    return path


def ours(model, processor, input_ids: torch.Tensor, image: Path) -> tuple[torch.Tensor, list[int]]:
    """Our logits [L, V] (packed forward, our positions, our image processing) and our greedy continuation."""
    vis = processor.image_inputs([Image.open(image)])
    ids = input_ids.long()
    row = pack([Sample(input_ids=ids, loss_mask=torch.zeros_like(ids), pixel_values=vis.pixel_values,
                       image_grid_thw=vis.grid_thw)], model.config.image_token_id)
    with torch.no_grad():
        logits = model.lm_head(packed_hidden(model, row)).float()
    engine = EmbeddedEngine(unwrap_model(model), processor, threaded=False)  # as rl.py hands it over (unwrap_model)
    try:
        res = engine.generate([GenerateRequest(token_ids=ids.tolist(), pixel_values=vis.pixel_values,
                                               image_grid_thw=vis.grid_thw)],
                              SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, stop=[]))[0]
    finally:
        engine.shutdown()
    return logits, res.token_ids


def _lora_with_live_adapters(seed: int):
    """The tiny policy with rank-8 adapters whose B is non-zero (peft starts B at 0: the adapters would be a no-op)."""
    model, proc = build_model(ModelConfig(lora_rank=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, proc


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Our full-weight and LoRA checkpoints, and what the clean interpreter made of them."""
    tmp = tmp_path_factory.mktemp("hf_loadable")
    image = picture(tmp / "image.png")
    full, proc = build_model(ModelConfig())  # the tiny preset, seeded: also the LoRA run's base
    full.eval()
    full_ckpt = save_checkpoint(tmp / "run_full", 1, full, proc, None)
    lora, lproc = _lora_with_live_adapters(seed=1)
    lora.eval()
    lora_ckpt = save_checkpoint(tmp / "run_lora", 1, lora, lproc, None)
    jobs = {
        "full": dict(checkpoint=str(full_ckpt), adapter=None, base=None),
        "merged": dict(checkpoint=str(lora_ckpt), adapter=None, base=None),
        "adapter": dict(checkpoint=str(lora_ckpt), adapter=str(lora_ckpt / ADAPTER_DIR), base=str(full_ckpt)),
    }
    for name, job in jobs.items():
        job.update(image=str(image), question=QUESTION, new_tokens=NEW_TOKENS, out=str(tmp / f"{name}.pt"))
    run_clean(f"JOBS = {json.dumps(json.dumps(list(jobs.values())))}\n" + CLEAN_SCRIPT, tmp)
    theirs = {name: torch.load(job["out"], weights_only=True) for name, job in jobs.items()}
    readme_out = run_clean(readme_snippet(full_ckpt, image), tmp)
    return dict(full=full, lora=lora, proc=proc, image=image, full_ckpt=full_ckpt, lora_ckpt=lora_ckpt,
                theirs=theirs, readme_out=readme_out)


def test_checkpoint_holds_a_processor_that_needs_neither_torchvision_nor_us(loaded):
    ckpt = loaded["full_ckpt"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
                 "processing_deepeyesv2.py"):
        assert (ckpt / name).is_file(), name
    code = (ckpt / "processing_deepeyesv2.py").read_text()
    assert "deepeyesv2" not in "".join(ln for ln in code.splitlines() if ln.startswith(("import", "from")))
    assert loaded["theirs"]["full"]["processor"] == "DeepEyesV2Processor"
    assert loaded["theirs"]["full"]["dtype"] == "torch.float32"


def test_hf_inputs_logits_and_greedy_generation_equal_ours(loaded):
    proc, theirs = loaded["proc"], loaded["theirs"]["full"]
    ids = theirs["input_ids"]
    # the same prompt as our renderer writes it (system turn, image block expanded to its 12 tokens)
    rendered = render_chat(proc, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                           [Image.open(loaded["image"])], add_generation_prompt=True)
    assert ids.tolist() == rendered.token_ids
    assert int((ids == proc.image_pad_id).sum()) == 12
    torch.testing.assert_close(theirs["pixel_values"].float(), rendered.pixel_values, rtol=0, atol=1e-6)
    logits, generated = ours(loaded["full"], proc, ids, loaded["image"])
    torch.testing.assert_close(theirs["logits"], logits, rtol=1e-4, atol=1e-4)  # fp32 on both sides
    # what the comparison guards against: without mm_token_type_ids the model falls back to 1-D positions
    # (1.3e-2 on this random tiny model, 0 between the two sides above; the issue saw 4.7 on a trained one)
    assert (theirs["logits_1d"] - logits).abs().max() > 1e-3
    assert theirs["generated"] == generated and len(generated) == NEW_TOKENS
    assert theirs["text"] == proc.decode(generated)
    # the README's example, run as written: it prints our greedy continuation
    assert loaded["readme_out"] == proc.decode(generated) + "\n"


def test_lora_run_merged_checkpoint_and_peft_adapter_folder_equal_ours(loaded):
    lora, proc = loaded["lora"], loaded["proc"]
    adapter = loaded["lora_ckpt"] / ADAPTER_DIR
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    ids = loaded["theirs"]["adapter"]["input_ids"]
    logits, generated = ours(lora, proc, ids, loaded["image"])
    full_logits, _ = ours(loaded["full"], proc, ids, loaded["image"])
    assert (logits - full_logits).abs().max() > 1e-3, "the adapters must change the logits for this test to mean anything"
    for name in ("adapter", "merged"):
        theirs = loaded["theirs"][name]
        assert theirs["input_ids"].tolist() == ids.tolist()
        torch.testing.assert_close(theirs["logits"], logits, rtol=1e-4, atol=1e-4, msg=name)
        assert theirs["generated"] == generated, name
