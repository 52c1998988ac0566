"""Qwen2.5-VL's processor for still images, loadable without torchvision (shipped in every deepeyesv2 checkpoint).

transformers' own `Qwen2_5_VLProcessor` always builds a video processor, and its video processors need
torchvision. The policy never sees videos, so this subclass has no video processor: everything else -- the
tokenizer, the image processor, the chat template, expanding `<|image_pad|>` by each image's grid and the
`mm_token_type_ids` that the model needs for its 3-D (M-RoPE) positions -- is transformers' code, unchanged.

    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)

This file imports transformers only: the checkpoint loads without the deepeyesv2 package.
"""

from transformers import ProcessorMixin, Qwen2_5_VLProcessor


class DeepEyesV2Processor(Qwen2_5_VLProcessor):
    # ProcessorMixin reads its sub-processors off the __init__ signature: image_processor and tokenizer only.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def _process_videos(self, videos, **kwargs):
        raise ValueError("this checkpoint's processor handles images only (it has no video processor)")


__all__ = ["DeepEyesV2Processor"]
