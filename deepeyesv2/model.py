"""The policy: Qwen2.5-VL built from a config preset with random weights, or loaded from a local directory.

Both paths produce the same class (`Qwen2_5_VLForConditionalGeneration`) and the same processor type,
so tests and the CPU demo exercise the code that trains real checkpoints. `resolve_model_path` is the one
reading of a model argument (model.name_or_path, eval's and plan's --model): a preset, a checkpoint
directory, or a run directory, which stands for its newest checkpoint that verifies.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from deepeyesv2_rollout.qwen import ChatProcessor, embed_inputs

from .attention import impl_name, register_varlen_attention
from .checkpoint import CheckpointError, checkpoints_dir, launch_rank0, resume_checkpoint, say
from .config import ModelConfig
from .lora import apply_lora
from .packing import PackedBatch
from .precision import resolve_device

TINY_PROCESSOR_DIR = Path(__file__).parent / "assets" / "tiny_processor"

# Named presets (gpt-fast style). `tiny` keeps the real vision tower's shape rules (patch 14, spatial
# merge 2, temporal patch 2, window attention + full-attention blocks) at toy width.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[4, 6, 6]),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, window_size=112,
                    fullatt_block_indexes=[1]),
    ),
    "small": dict(  # for memory-planner validation and benchmarks: a mid-size LM on the same vocab
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, mrope_section=[8, 12, 12]),  # head_dim 64: sections sum to 32
        vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, window_size=112,
                    fullatt_block_indexes=[1]),
    ),
    # Real Qwen2.5-VL's lm-head width: its 151,665 tokens padded to 151,936 rows. Here the tiny tokenizer's ids
    # fill the first rows and the rest are padding that the engines never sample (masked logits, as for real
    # Qwen's padded rows) while log-probs and the loss span every row -- the width where fused log-prob
    # kernels matter and where TRL runs out of memory. Two layers, so a GRPO step fits a CPU in seconds.
    "wide": dict(
        vocab_size=151_936,
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                  num_key_value_heads=4, mrope_section=[8, 12, 12]),
        vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, window_size=112,
                    fullatt_block_indexes=[1]),
    ),
}


# what a Hugging Face Hub model id looks like ("Qwen/Qwen2.5-VL-7B-Instruct"): one slash, no path syntax
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def resolve_model_path(name_or_path: str, what: str = "model.name_or_path") -> str:
    """The preset or checkpoint directory that `name_or_path` stands for: a preset name or a directory with a
    config.json as given; a run directory (out_dir of an SFT or RL run) as its newest checkpoint that verifies,
    said in one line on stderr (rank 0). Anything else: ValueError in one line naming `what`; for a string that
    looks like a Hub id, it says that nothing is downloaded at run time and how to fetch the weights."""
    if name_or_path in PRESETS:
        return name_or_path
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return str(path)
    if path.is_dir() and checkpoints_dir(path).is_dir():
        quiet = say if launch_rank0() else (lambda _msg: None)
        try:
            ckpt = resume_checkpoint(path, quiet, what=what)
        except CheckpointError as e:
            raise ValueError(f"{what} {name_or_path!r} is a run directory: {e}") from None
        if ckpt is None:
            raise ValueError(f"{what} {name_or_path!r} is a run directory without any checkpoint yet")
        quiet(f"{what} {name_or_path} is a run directory: loading its newest verified checkpoint {ckpt}")
        return str(ckpt)
    if not path.exists() and _HUB_ID.match(name_or_path):
        local = f"models/{path.name}"
        raise ValueError(f"{what} {name_or_path!r} is no preset ({', '.join(PRESETS)}) and no local directory; "
                         f"nothing is downloaded at run time: if it names a Hugging Face Hub model, get its weights "
                         f"with `huggingface-cli download {name_or_path} --local-dir {local}` and pass "
                         f"{what} {local}")
    holds = " (the directory holds neither config.json nor checkpoints/)" if path.is_dir() else ""
    raise ValueError(f"{what} {name_or_path!r} is neither a preset ({', '.join(PRESETS)}), a checkpoint directory "
                     f"with a config.json, nor a run directory with checkpoints{holds}")


def load_processor(name_or_path: str = "tiny") -> ChatProcessor:
    """The processor of a preset (the shipped tiny tokenizer), a checkpoint or a run directory."""
    path = resolve_model_path(name_or_path)
    if path in PRESETS:
        return ChatProcessor.from_pretrained(TINY_PROCESSOR_DIR)
    return ChatProcessor.from_pretrained(path)


def preset_config(preset: dict, processor: ChatProcessor):
    from transformers import Qwen2_5_VLConfig

    text = dict(preset["text"])
    section = text.pop("mrope_section")
    tok = processor.tokenizer
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=preset.get("vocab_size", len(tok)), max_position_embeddings=32768, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": preset.get("rope_theta", 1_000_000.0), "mrope_section": section},
            bos_token_id=None, eos_token_id=processor.im_end_id, pad_token_id=processor.pad_id, **text,
        ),
        vision_config=dict(
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            out_hidden_size=preset["text"]["hidden_size"], **preset["vision"],
        ),
        image_token_id=processor.image_pad_id,
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=processor.vision_start_id,
        vision_end_token_id=processor.vision_end_id,
        tie_word_embeddings=False,
    )


def build_model(cfg: ModelConfig | None = None, processor: ChatProcessor | None = None):
    """(model, processor). Random weights for a preset (seeded), or weights from a local checkpoint directory or a
    run directory's newest verified checkpoint (`resolve_model_path`)."""
    import transformers
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = cfg or ModelConfig()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    device = resolve_device(cfg.device)  # a bad device fails before any weights are built
    name_or_path = resolve_model_path(cfg.name_or_path)
    processor = processor or load_processor(name_or_path)
    register_varlen_attention()
    # The vision tower keeps SDPA (it has its own per-image cu_seqlens); the text model gets varlen.
    attn = {"text_config": impl_name(cfg.attn_backend), "vision_config": "sdpa", "": "sdpa"}
    transformers.logging.set_verbosity_error()
    if name_or_path in PRESETS:
        config = preset_config(PRESETS[name_or_path], processor)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)
    else:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name_or_path, attn_implementation=attn, dtype=dtype)
    model.to(device)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank > 0:
        model = apply_lora(model, cfg)
    return model, processor


def unwrap_model(model):
    """The Qwen2.5-VL model under a PEFT wrapper (LoRA layers are injected in place, so they stay active)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def packed_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states of a packed row: [T, H] (model dtype), lm_head not applied.

    The language model runs on the whole row once; `cu_seq_lens_q` makes the varlen attention keep
    every sequence to itself, and position ids restart per sequence.
    """
    model = unwrap_model(model)
    embeds = embed_inputs(model, batch.input_ids, batch.pixel_values, batch.image_grid_thw)
    out = model.model.language_model(
        inputs_embeds=embeds.unsqueeze(0),
        position_ids=batch.position_ids.unsqueeze(1),
        attention_mask=None,
        use_cache=False,
        cu_seq_lens_q=batch.cu_seqlens,
        cu_seq_lens_k=batch.cu_seqlens,
        max_length_q=batch.max_seqlen,
        max_length_k=batch.max_seqlen,
    )
    return out.last_hidden_state[0]
