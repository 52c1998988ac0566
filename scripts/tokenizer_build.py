"""Train the tiny model's byte-level BPE tokenizer offline and write the tiny processor directory.

Run once by the developers (``python scripts/tokenizer_build.py``); its output under
``deepeyesv2/assets/tiny_processor/`` is committed, so nothing is trained or downloaded at run time.
The special tokens are Qwen2.5-VL's, so the chat layout (``<|im_start|>``, one ``<|image_pad|>`` per
merged patch between ``<|vision_start|>``/``<|vision_end|>``) is token-for-token the real model's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "deepeyesv2" / "assets" / "tiny_processor"

# Qwen2.5's added tokens, in Qwen's order (ids differ: ours start after the small byte-level vocab).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Tags of the DeepEyesV2 tool protocol. Single tokens in the tiny vocabulary, so a tiny model can
# learn the protocol quickly; the rollout code matches them as stop *strings*, which also works
# with the real Qwen tokenizer where some are several tokens.
TOOL_TAGS = [
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<code>", "</code>", "<answer>", "</answer>",
]
VOCAB_SIZE = 1024

# Qwen2-VL's chat template (Jinja), trimmed of video handling we don't use; it renders the same layout
# as ``deepeyesv2_rollout.chat`` so `apply_chat_template` users get identical tokens.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _training_text(seed: int = 0) -> list[str]:
    """A small synthetic corpus: English, numbers, Python snippets and the tool protocol."""
    rng = random.Random(seed)
    words = (
        "the a of and to in is it that for on with as by this image picture shows what how many where which "
        "color digit number shape count crop zoom region left right top bottom center small large red green "
        "blue yellow teal purple orange black white circle square triangle star lighthouse tower bridge city "
        "river mountain built year painted located named famous capital population answer question search "
        "result code python print size width height box pixel value total sum mean area distance tool call "
        "think first need look closer then compute the answer is found document title text".split()
    )
    code = [
        "from PIL import Image\nimport numpy as np\n",
        "w, h = image_1.size\nprint(w, h)\n",
        "crop = image_1.crop((0, 0, w // 2, h // 2))\ncrop = crop.resize((crop.width * 4, crop.height * 4))\ncrop\n",
        "arr = np.array(image_1)\nprint(arr.shape, arr.mean())\n",
        "for i in range(10):\n    print(i * i)\n",
        "import matplotlib.pyplot as plt\nplt.imshow(image_1)\nplt.show()\n",
        "def area(a, b):\n    return a * b\nprint(area(3, 4))\n",
    ]
    texts = []
    for _ in range(4000):
        n = rng.randint(5, 30)
        sent = " ".join(rng.choice(words) for _ in range(n))
        sent = sent.capitalize() + rng.choice([".", "?", "!", ","]) + " " + str(rng.randint(0, 99999))
        texts.append(sent)
    for _ in range(600):
        texts.append(rng.choice(code))
        texts.append(
            f"<think>I need to look at the image.</think><code>\n```python\n{rng.choice(code)}```\n</code>"
        )
        texts.append(f"<answer>{rng.randint(0, 999)}</answer> <tool_call>{{\"name\": \"search\", "
                     f"\"arguments\": {{\"query\": \"{' '.join(rng.choice(words) for _ in range(4))}\"}}}}</tool_call>")
    return texts


def build(out_dir: Path = ASSETS) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS) - len(TOOL_TAGS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(TOOL_TAGS)  # added, not special: decode() keeps them
    fast.chat_template = CHAT_TEMPLATE
    # Small images for the tiny model; the real Qwen2.5-VL processor keeps its own limits.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    # Saved side by side, the layout of a real Qwen2.5-VL checkpoint directory (tokenizer files +
    # preprocessor_config.json), so one loader serves both. We don't build `Qwen2_5_VLProcessor`:
    # without torchvision its video half can't be constructed, and we render chats ourselves.
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    path = build()
    print(f"wrote {path}")
    print(json.dumps(sorted(p.name for p in path.iterdir())))
