"""Memory planner: predicted peak memory of one colocated RL step, by component, from the model config alone.

    deepeyesv2 plan --config run.yaml [--gpu-mem 24GiB] [--model qwen2.5-vl-7b] [--prompt-tokens 1024]

Two phases share the device (colocated rollout and training, deepeyesv2.rl):
  rollout  weights + optimizer state (unless offloaded) + KV cache (the generate call's buffers for every
           sequence of the step, plus the radix prefix cache) + vision forward of one image
  train    weights + grads + optimizer state + saved activations of one packed row + log-prob workspace
           (our fused kernel: [C, V] tiles on GPU, two [Tc, Vb] tiles on CPU, vs the naive [T, V] logits)
           + backward temporaries
The peak is the larger phase plus a fixed runtime overhead. Every term is a closed-form count of the tensors
our code keeps (see `layer_activation_bytes` for the saved-tensor list, checked with autograd's
saved_tensors_hooks on the tiny model). Conservative where the order of frees varies: during the
forward/backward all gradients are assumed alive (true from the second micro-batch of a step on) and the
AdamW moments exist (true from the second step on).

Runtime overhead: CUDA_OVERHEAD_BYTES is an assumption (CUDA context + cuBLAS/cuDNN workspaces + allocator
slack), not a measurement. CPU_OVERHEAD_BYTES was measured once on CPU (torch 2.13, glibc malloc, 2 threads)
as the peak-RSS growth of a real step beyond the tensors counted here (allocator arenas, autograd
bookkeeping, thread-local buffers); tests/trainer/test_memory_plan.py checks predictions within 20%.

Architectures: a preset name (tiny, small), a shipped config (qwen2.5-vl-3b, qwen2.5-vl-7b: published
architecture numbers in deepeyesv2/assets/arch/), or any Qwen2.5-VL checkpoint directory / config.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from deepeyesv2.config import config_from_namespace, config_parser, error_line
from deepeyesv2.model import PRESETS, load_processor, preset_config, resolve_model_path

ARCH_DIR = Path(__file__).resolve().parents[1] / "assets" / "arch"
GiB = 2**30
MiB = 2**20
CUDA_OVERHEAD_BYTES = 1 * GiB  # assumption: CUDA context ~0.5 GiB + cuBLAS workspace + allocator fragmentation
CPU_OVERHEAD_BYTES = 20 * MiB  # measured once: 17-23 MiB over tiny (3 modes) and small (LoRA), see module docstring
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# deepeyesv2_kernels.logprobs_torch's vocab tiling (TILE_BYTES, TOKEN_CHUNK_MAX, VOCAB_BLOCK_MIN): two [Tc, Vb]
# fp32 tiles; tests/trainer/test_memory_plan.py checks cpu_logprob_tile against vocab_tiles
CPU_TILE_BYTES, CPU_TOKEN_CHUNK_MAX, CPU_VOCAB_BLOCK_MIN = 64 * MiB, 8192, 1024
GPU_FUSED_CHUNK_BYTES = 900 * MiB  # deepeyesv2_kernels.logprobs.FUSED_CHUNK_BYTES (fp32 logits + grad tile)
PATCH_VALUES = 3 * 2 * 14 * 14  # one pixel_values row: channels x temporal patch x patch x patch


@dataclass(frozen=True)
class Arch:
    """The numbers that size Qwen2.5-VL's tensors."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    v_depth: int
    v_hidden: int
    v_intermediate: int
    v_heads: int
    v_out: int
    patch: int = 14
    merge: int = 2
    temporal_patch: int = 2
    name: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def arch_from_config(cfg, name: str = "") -> Arch:
    """Arch from a Qwen2_5_VLConfig or its dict (transformers 4 flat layout or 5 `text_config` layout)."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    t = d.get("text_config") or d
    v = d["vision_config"]
    tied = bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    return Arch(
        hidden=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
        kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"], intermediate=t["intermediate_size"],
        vocab=t["vocab_size"], tied=tied, v_depth=v["depth"], v_hidden=v["hidden_size"],
        v_intermediate=v["intermediate_size"], v_heads=v["num_heads"], v_out=v.get("out_hidden_size", t["hidden_size"]),
        patch=v.get("patch_size", 14), merge=v.get("spatial_merge_size", 2),
        temporal_patch=v.get("temporal_patch_size", 2), name=name,
    )


def shipped_archs() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def load_arch(name_or_path: str) -> Arch:
    """A preset (tiny, small), a shipped architecture (qwen2.5-vl-3b, qwen2.5-vl-7b), or a checkpoint dir/config."""
    if name_or_path in PRESETS:
        return arch_from_config(preset_config(PRESETS[name_or_path], load_processor(name_or_path)), name_or_path)
    key = name_or_path.lower().removeprefix("qwen/").removesuffix("-instruct")
    if (ARCH_DIR / f"{key}.json").is_file():
        return arch_from_config(json.loads((ARCH_DIR / f"{key}.json").read_text()), key)
    path = Path(name_or_path)
    if not path.is_file():  # a config.json itself, or else what a model argument stands for (deepeyesv2.model)
        try:
            path = Path(resolve_model_path(name_or_path, what="--model")) / "config.json"
        except ValueError as e:
            raise ValueError(f"{e}; plan also takes a shipped architecture ({', '.join(shipped_archs())})") from None
    return arch_from_config(json.loads(path.read_text()), path.parent.name)


# ------------------------------------------------------------------------------------------ parameters


def text_layer_params(a: Arch) -> int:
    attn = a.hidden * a.hidden + a.hidden + 2 * (a.hidden * a.kv_dim + a.kv_dim) + a.hidden * a.hidden
    return attn + 3 * a.hidden * a.intermediate + 2 * a.hidden


def vision_params(a: Arch) -> int:
    h, i = a.v_hidden, a.v_intermediate
    block = (h * 3 * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h) + 2 * h
    merged = h * a.merge**2
    merger = h + merged * merged + merged + merged * a.v_out + a.v_out
    return 3 * a.temporal_patch * a.patch**2 * h + a.v_depth * block + merger


def param_counts(a: Arch) -> dict[str, int]:
    """Exact parameter counts by part: embed, layers, norm, lm_head (0 when tied), vision."""
    return {"embed": a.vocab * a.hidden, "layers": a.layers * text_layer_params(a), "norm": a.hidden,
            "lm_head": 0 if a.tied else a.vocab * a.hidden, "vision": vision_params(a)}


def lora_params(a: Arch, rank: int, targets=LORA_TARGETS) -> int:
    h, kv, i = a.hidden, a.kv_dim, a.intermediate
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return a.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


# ------------------------------------------------------------------------------------------ the plan


@dataclass
class PlanSetup:
    """What one step looks like. Defaults follow the DeepEyesV2 recipe at a modest scale."""

    dtype: str = "bfloat16"
    device: str = "cuda"  # cuda: flash varlen attention + Triton fused loss; cpu: SDPA segments + chunked torch
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    checkpointing: bool = False
    offload_optimizer: bool = False
    freeze_vision: bool = True
    row_tokens: int = 4096  # packed row (train.tokens_per_batch); raised to fit one whole trajectory
    prompts: int = 4  # rl.prompts_per_step
    group_size: int = 8
    prompt_tokens: int = 1024  # prompt incl. image tokens
    response_tokens: int = 2048  # all policy turns + tool outputs of one trajectory
    images: int = 1  # images per trajectory (input + tool-returned), of `image_size` px square
    image_size: int = 448
    cache_tokens: int = 0  # embedded engine's radix prefix cache budget (rollout.cache_tokens)
    kl: str = "none"  # none | adapters-off | device-copy | cpu-copy
    include_rollout: bool = True


def _attn_bytes(a: Arch, s: int, device: str) -> int:
    """Saved by attention per token: q and k (after RoPE), v, output, log-sum-exp; SDPA segments see K/V
    expanded to all heads and copy the output once more before o_proj; flash varlen keeps GQA and a view."""
    if device == "cuda":
        return s * (2 * a.hidden + 2 * a.kv_dim) + 4 * a.heads
    return s * (5 * a.hidden) + 4 * a.heads


def layer_activation_bytes(a: Arch, p: PlanSetup) -> int:
    """Bytes autograd keeps per token per decoder layer (no checkpointing).

    Per RMSNorm (x2): fp32 input (4H, the variance needs it), [full FT: the normalised input for the weight's
    grad, s*H], output = linear input (s*H). Attention: see `_attn_bytes`. MLP: gate, up, silu(gate),
    silu*up (4 * s * I). LoRA: the rank-r intermediate per adapted projection.
    """
    s = DTYPE_BYTES[p.dtype]
    norm = 4 * a.hidden + s * a.hidden + (s * a.hidden if p.lora_rank == 0 else 0)
    lora = s * p.lora_rank * len(p.lora_targets) if p.lora_rank else 0
    return 2 * norm + _attn_bytes(a, s, p.device) + 4 * s * a.intermediate + lora


def vision_tokens(a: Arch, image_size: int) -> tuple[int, int]:
    """(patches, LM tokens) of one square image (resized to a multiple of patch * merge)."""
    side = max(1, round(image_size / (a.patch * a.merge))) * a.merge
    patches = side * side
    return patches, patches // a.merge**2


def cpu_logprob_tile(T: int, vocab: int) -> tuple[int, int]:
    """(tokens, vocab rows) of one fp32 tile of the CPU log-prob path (= logprobs_torch.vocab_tiles)."""
    elems = CPU_TILE_BYTES // 4
    tokens = max(1, min(T, CPU_TOKEN_CHUNK_MAX, elems // min(vocab, CPU_VOCAB_BLOCK_MIN)))
    return tokens, max(1, min(vocab, elems // tokens))


def logprob_chunk_tokens(a: Arch, p: PlanSetup, T: int) -> int:
    """Tokens per chunk of the GPU fused loss ([C, V] logits + gradient)."""
    s = DTYPE_BYTES[p.dtype]
    return max(16, min(T, GPU_FUSED_CHUNK_BYTES // ((4 + s) * a.vocab)))


def plan(a: Arch, p: PlanSetup) -> dict:
    """Predicted bytes by component for both phases, the peak, and what the naive [T, V] logits would cost."""
    s = DTYPE_BYTES[p.dtype]
    counts = param_counts(a)
    n_lora = lora_params(a, p.lora_rank, p.lora_targets) if p.lora_rank else 0
    total = sum(counts.values()) + n_lora
    if p.lora_rank:
        trainable = n_lora
    else:
        trainable = total - (counts["vision"] if p.freeze_vision else 0)
    head_trainable = p.lora_rank == 0
    weights = total * s
    grads = trainable * s
    # torch AdamW keeps exp_avg and exp_avg_sq in the parameter dtype; offloaded: fp32 masters + moments on host
    opt = 2 * trainable * s
    opt_device = 0 if (p.offload_optimizer and p.device == "cuda") else (3 * trainable * 4 if p.offload_optimizer else opt)
    biggest = max(a.vocab * a.hidden if p.lora_rank == 0 else 0,
                  a.hidden * a.intermediate if p.lora_rank == 0 else a.intermediate * p.lora_rank)
    step_temp = 2 * biggest * (4 if p.offload_optimizer else s)

    seq = p.prompt_tokens + p.response_tokens
    T = max(p.row_tokens, seq)
    per_layer = layer_activation_bytes(a, p)
    # embedding ids, RoPE cos/sin, final norm (and, kept by the fused loss, d loss / d hidden [T, H])
    glob = T * (8 + 2 * a.head_dim * s + 4 * a.hidden + 2 * s * a.hidden + s * a.hidden)
    if p.checkpointing:
        act = T * (a.layers * s * a.hidden + per_layer) + glob  # layer inputs + one layer recomputed
    else:
        act = T * a.layers * per_layer + glob
    # backward temporaries: gradients of one layer's MLP intermediates and hidden states in flight
    bwd = T * s * (3 * a.intermediate + 2 * a.hidden)

    if p.device == "cuda":
        tile = (logprob_chunk_tokens(a, p, T), a.vocab)
        lp_work = tile[0] * a.vocab * (4 + s)  # fp32 logits tile + gradient tile in the input dtype
    else:
        tile = cpu_logprob_tile(T, a.vocab)
        lp_work = 2 * tile[0] * tile[1] * 4  # two fp32 [Tc, Vb] tiles
        if s != 4:  # fp32 upcast of the lm_head weight, and (full FT) an fp32 [V, H] gradient accumulator
            lp_work += a.vocab * a.hidden * 4 * (2 if head_trainable else 1)
    naive_lp = T * a.vocab * (s + 4 + 4)  # [T, V] logits + fp32 log-softmax + its gradient

    patches, _ = vision_tokens(a, p.image_size)
    # frozen tower: no saved activations, only the pixels and one block's transients (per image, in turn)
    pix = p.images * patches * PATCH_VALUES * 4
    v_attn = 0 if p.device == "cuda" else a.v_heads * patches * patches * 4
    vision = pix + (patches * s * (6 * a.v_hidden + 3 * a.v_intermediate) + v_attn if p.images else 0)
    if not p.freeze_vision and p.lora_rank == 0:
        vp = replace(p, lora_rank=0)
        va = replace(a, hidden=a.v_hidden, intermediate=a.v_intermediate, heads=a.v_heads, kv_heads=a.v_heads)
        vision += p.images * patches * a.v_depth * layer_activation_bytes(va, vp)

    ref = 0
    if p.kl == "device-copy":
        ref = weights
    overhead = CUDA_OVERHEAD_BYTES if p.device == "cuda" else CPU_OVERHEAD_BYTES

    train = {"weights": weights, "reference weights": ref, "grads": grads, "optimizer state": opt_device,
             "activations": act, "backward temporaries": bwd, "log-prob workspace": lp_work,
             "images / vision": vision}
    kv_per_token = 2 * a.layers * a.kv_dim * s
    n_seq = p.prompts * p.group_size
    rollout = {"weights": weights, "reference weights": ref, "optimizer state": opt_device,
               "KV cache": kv_per_token * (n_seq * seq + p.cache_tokens),
               "images / vision": vision, "decode logits": n_seq * a.vocab * 4 * 2}
    train_peak = (weights + ref + grads + opt_device
                  + max(act + bwd + lp_work + vision, step_temp))
    if p.kl == "cpu-copy":  # the parked copy visits the device for the reference pass, before any activations
        train_peak = max(train_peak, 2 * weights + opt_device + lp_work)
    rollout_peak = sum(rollout.values()) if p.include_rollout else 0
    peak = max(train_peak, rollout_peak) + overhead
    return {"arch": a.name, "setup": asdict(p), "params": total, "trainable": trainable, "row_tokens": T,
            "train": train, "rollout": rollout, "train_peak": train_peak + overhead,
            "rollout_peak": rollout_peak + overhead if p.include_rollout else 0, "overhead": overhead,
            "peak": peak, "naive_logprob_bytes": naive_lp, "logprob_tile": list(tile),
            "host_optimizer_bytes": 3 * trainable * 4 if p.offload_optimizer and p.device == "cuda" else 0}


MODES = {
    "full": dict(lora_rank=0, checkpointing=False, offload_optimizer=False),
    "full+ckpt": dict(lora_rank=0, checkpointing=True, offload_optimizer=False),
    "lora": dict(lora_rank=64, checkpointing=False, offload_optimizer=False),
    "lora+ckpt+offload": dict(lora_rank=64, checkpointing=True, offload_optimizer=True),
}


def largest_fit(a: Arch, p: PlanSetup, budget: int, groups=(4, 8, 16, 32), max_response: int = 65536) -> dict[int, int]:
    """For each group size G: the longest response (tokens) whose step fits `budget` bytes (0: none fits)."""
    out = {}
    for g in groups:
        lo, hi = 0, max_response
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if plan(a, replace(p, group_size=g, response_tokens=mid))["peak"] <= budget:
                lo = mid
            else:
                hi = mid - 1
        out[g] = lo
    return out


def parse_bytes(text: str) -> int:
    """'24GiB', '24GB', '80G', '1.5TiB', '512MiB' -> bytes. GB and GiB both mean 2**30 here (binary units
    throughout). A bare number is refused: '24' would otherwise be 24 bytes, which nobody means."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGT])(?:i?B)?|(B))\s*", text, re.IGNORECASE)
    if not m:
        bare = re.fullmatch(r"\s*[0-9.]+\s*", text) is not None
        raise ValueError(f"--gpu-mem {text!r} has no unit: write e.g. {text.strip()}GiB" if bare else
                         f"--gpu-mem must look like 24GiB, 80GB or 512MiB, got {text!r}")
    unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()] if m.group(2) else 1
    return int(float(m.group(1)) * unit)


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def setup_from_config(cfg, mode: str | None = None, **overrides) -> PlanSetup:
    """PlanSetup from a deepeyesv2 Config (model / optim / train / rollout / rl fields), optionally a MODES entry."""
    kl = "none"
    if cfg.rl.kl_coef > 0:
        kl = "adapters-off" if cfg.model.lora_rank > 0 else ("cpu-copy" if cfg.rl.ref_on_cpu else "device-copy")
    p = PlanSetup(dtype=cfg.model.dtype, lora_rank=cfg.model.lora_rank, lora_targets=tuple(cfg.model.lora_targets),
                  checkpointing=cfg.model.gradient_checkpointing, offload_optimizer=cfg.optim.offload_states,
                  freeze_vision=cfg.model.freeze_vision, row_tokens=cfg.train.tokens_per_batch,
                  prompts=cfg.rl.prompts_per_step, group_size=cfg.rl.group_size,
                  response_tokens=cfg.rollout.max_total_tokens,
                  cache_tokens=cfg.rollout.cache_tokens if cfg.rollout.engine == "embedded" else 0, kl=kl)
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        p = replace(p, **MODES[mode])
        if p.lora_rank == 0 and p.kl == "adapters-off":
            p = replace(p, kl="device-copy")
    return replace(p, **overrides)


# ------------------------------------------------------------------------------ real-model defaults


# the config fields the plan reads (`plan --help` lists them; the others are accepted and ignored)
PLAN_KEYS = ("model.name_or_path", "model.dtype", "model.lora_rank", "model.lora_targets", "model.freeze_vision",
             "model.gradient_checkpointing", "optim.offload_states", "train.tokens_per_batch", "rollout.engine",
             "rollout.max_total_tokens", "rollout.cache_tokens", "rl.prompts_per_step", "rl.group_size",
             "rl.kl_coef", "rl.ref_on_cpu")


def is_real_arch(name_or_path: str) -> bool:
    """A real Qwen2.5-VL architecture (shipped or a checkpoint), not one of our random-weight presets."""
    return name_or_path not in PRESETS


def real_model_defaults(cfg, given: set[str]) -> tuple[object, list[str]]:
    """(cfg with real-model values, one line per value it assumed) for planning a real architecture from a config
    written for a preset: bf16 weights instead of fp32, and a prefix-KV cache sized from the step's rollouts
    (every trajectory's prefix kept between its turns) instead of the preset's fixed token budget. Keys the user
    gave on the command line (`given`) are kept."""
    notes: list[str] = []
    model, rollout = cfg.model, cfg.rollout
    if "model.dtype" not in given and model.dtype != "bfloat16":
        notes.append(f"model.dtype=bfloat16 (config: {model.dtype}): real checkpoints train in bf16")
        model = replace(model, dtype="bfloat16")
    cache = cfg.rl.prompts_per_step * cfg.rl.group_size * cfg.rollout.max_total_tokens
    if "rollout.cache_tokens" not in given and rollout.engine == "embedded" and rollout.cache_tokens != cache:
        notes.append(f"rollout.cache_tokens={cache} (config: {rollout.cache_tokens}) = rl.prompts_per_step "
                     f"{cfg.rl.prompts_per_step} x rl.group_size {cfg.rl.group_size} x rollout.max_total_tokens "
                     f"{cfg.rollout.max_total_tokens}: each trajectory's prefix kept between its turns")
        rollout = replace(rollout, cache_tokens=cache)
    return replace(cfg, model=model, rollout=rollout), notes


# ------------------------------------------------------------------------------ changes that make a step fit


@dataclass(frozen=True)
class Change:
    """One config change the planner may suggest: the dotted key, its new value, and the PlanSetup it gives."""

    key: str
    value: object
    setup: dict

    def flag(self) -> str:
        v = str(self.value).lower() if isinstance(self.value, bool) else self.value
        return f"--{self.key} {v}"


def candidate_changes(p: PlanSetup) -> list[list[Change]]:
    """Per lever, its candidate values mildest first, levers in order of preference: those that keep what is
    trained and sampled (precision, recomputation, where state lives, cache and row sizes) before LoRA, and
    smaller groups or episodes (which change the recipe) last."""
    seq = p.prompt_tokens + p.response_tokens
    levers: list[list[Change]] = []
    if p.dtype == "float32":
        levers.append([Change("model.dtype", "bfloat16", {"dtype": "bfloat16"})])
    if not p.checkpointing:
        levers.append([Change("model.gradient_checkpointing", True, {"checkpointing": True})])
    if p.kl == "device-copy":
        levers.append([Change("rl.ref_on_cpu", True, {"kl": "cpu-copy"})])
    if p.cache_tokens > 0:
        levers.append([Change("rollout.cache_tokens", c, {"cache_tokens": c})
                       for c in (p.cache_tokens // 2, p.cache_tokens // 4, p.cache_tokens // 8, 0)])
    rows = [r for r in (p.row_tokens // 2**k for k in range(1, 6)) if r >= 256 and max(r, seq) < max(p.row_tokens, seq)]
    if rows:
        levers.append([Change("train.tokens_per_batch", r, {"row_tokens": r}) for r in rows])
    if not p.offload_optimizer:
        levers.append([Change("optim.offload_states", True, {"offload_optimizer": True})])
    if p.lora_rank == 0:
        kl = {"kl": "adapters-off"} if p.kl != "none" else {}
        levers.append([Change("model.lora_rank", 64, {"lora_rank": 64, **kl})])
    groups = [g for g in (p.group_size // 2**k for k in range(1, 4)) if g >= 2]
    if groups:
        levers.append([Change("rl.group_size", g, {"group_size": g}) for g in groups])
    lengths = [n for n in (p.response_tokens // 2**k for k in range(1, 4)) if n >= 256]
    if lengths:
        levers.append([Change("rollout.max_total_tokens", n, {"response_tokens": n}) for n in lengths])
    return levers


def changes_that_fit(a: Arch, p: PlanSetup, budget: int, n: int = 3, most: int = 3) -> list[tuple[list[Change], int]]:
    """Up to `n` sets of config changes (each of at most `most` levers, fewest first, then by lever preference,
    each lever at its mildest value that fits) whose predicted peak fits `budget`, with that peak. A set that
    contains an already found one is skipped: it adds a change the step does not need."""
    levers = candidate_changes(p)
    found: list[tuple[list[Change], int]] = []
    chosen: list[set[int]] = []
    for size in range(1, most + 1):
        for combo in itertools.combinations(range(len(levers)), size):
            if any(c <= set(combo) for c in chosen):
                continue
            # the mildest assignment first: fewest steps down each lever's list
            options = sorted(itertools.product(*(range(len(levers[i])) for i in combo)), key=lambda ix: (sum(ix), ix))
            for ix in options:
                changes = [levers[i][j] for i, j in zip(combo, ix)]
                peak = plan(a, replace(p, **{k: v for c in changes for k, v in c.setup.items()}))["peak"]
                if peak <= budget:
                    found.append((changes, peak))
                    chosen.append(set(combo))
                    break
            if len(found) == n:
                return found
    return found


def leanest(a: Arch, p: PlanSetup) -> tuple[list[Change], int]:
    """Every lever at its strongest value, and the peak that gives (when nothing up to `most` levers fits)."""
    changes = [lever[-1] for lever in candidate_changes(p)]
    return changes, plan(a, replace(p, **{k: v for c in changes for k, v in c.setup.items()}))["peak"]


def fit_lines(a: Arch, p: PlanSetup, peak: int, budget: int) -> list[str]:
    """What the report says about the budget: fits, or the (computed) changes that would make it fit."""
    if peak <= budget:
        return [f"budget {fmt_bytes(budget)}: fits ({fmt_bytes(budget - peak)} to spare)"]
    lines = [f"budget {fmt_bytes(budget)}: does NOT fit (over by {fmt_bytes(peak - budget)})"]
    found = changes_that_fit(a, p, budget)
    if found:
        lines.append(f"{len(found)} way(s) to make it fit, fewest changes first (PREDICTED peak; add a line's flags to "
                     f"the command or set them in the YAML):")
        lines += [f"  {k}. {' '.join(c.flag() for c in changes)}   -> {fmt_bytes(pk)}"
                  for k, (changes, pk) in enumerate(found, 1)]
    else:
        changes, pk = leanest(a, p)
        lines.append(f"no set of up to 3 changes fits; even {' '.join(c.flag() for c in changes)} predicts "
                     f"{fmt_bytes(pk)}: a smaller model or a larger device")
    return lines


def report(result: dict, budget: int | None = None, fits: dict[int, int] | None = None,
           assumed: list[str] | None = None, fit: list[str] | None = None) -> str:
    """The plan as text. `assumed`: the real-model defaults it used (real_model_defaults); `fit`: fit_lines."""
    r, p = result, result["setup"]
    lines = [f"memory plan (PREDICTED) for {r['arch']}: {r['params'] / 1e9:.3f} B params, {r['trainable'] / 1e6:.1f} M "
             f"trainable, {p['dtype']} on {p['device']}, lora_rank={p['lora_rank']} checkpointing={p['checkpointing']} "
             f"offload_optimizer={p['offload_optimizer']} kl={p['kl']}",
             f"step: {p['prompts']} prompts x G={p['group_size']}, {p['prompt_tokens']} prompt + {p['response_tokens']} "
             f"response tokens, packed rows of {r['row_tokens']} tokens, {p['images']} image(s) of {p['image_size']} px",
             "", "| component | train phase | rollout phase |", "|---|---|---|"]
    for k in dict.fromkeys(list(r["train"]) + list(r["rollout"])):
        t, o = r["train"].get(k), r["rollout"].get(k)
        lines.append(f"| {k} | {fmt_bytes(t) if t is not None else '-'} | {fmt_bytes(o) if o is not None else '-'} |")
    lines.append(f"| runtime overhead | {fmt_bytes(r['overhead'])} | {fmt_bytes(r['overhead'])} |")
    lines.append(f"| **phase peak** | **{fmt_bytes(r['train_peak'])}** | **{fmt_bytes(r['rollout_peak'])}** |")
    lines += ["", f"predicted peak: {fmt_bytes(r['peak'])}",
              f"log-prob workspace: {fmt_bytes(r['train']['log-prob workspace'])} (tiles of {r['logprob_tile'][0]} tokens x {r['logprob_tile'][1]} vocab rows)"
              f" vs naive [T, V] logits {fmt_bytes(r['naive_logprob_bytes'])}"]
    if r["host_optimizer_bytes"]:
        lines.append(f"host memory for the offloaded optimizer: {fmt_bytes(r['host_optimizer_bytes'])}")
    if assumed:
        lines[1:1] = assumed
    if fit is not None:
        lines += fit
    elif budget is not None:
        lines.append(f"budget {fmt_bytes(budget)}: {'fits' if r['peak'] <= budget else 'does NOT fit'}")
    if fits:
        lines += ["", f"largest response length that fits {fmt_bytes(budget)} (prompt {p['prompt_tokens']} tokens, "
                  f"{p['prompts']} prompts per step):", "| group size | max response tokens |", "|---|---|"]
        lines += [f"| {g} | {n if n else 'does not fit'} |" for g, n in fits.items()]
    return "\n".join(lines)


def fits_table(models=("qwen2.5-vl-3b", "qwen2.5-vl-7b"), budgets_gib=(24, 48, 80), group_size: int = 8,
               prompt_tokens: int = 1024, prompts: int = 4, response_tokens: int = 2048) -> str:
    """The 'fits on one GPU' markdown table (PREDICTED): per model x mode, the peak of a step with
    `response_tokens`, and per budget the longest response (tokens per trajectory) that fits at G=group_size."""
    head = (f"| model | mode | predicted peak, G={group_size} x {response_tokens}-token responses | "
            + " | ".join(f"{b} GB: max response tokens" for b in budgets_gib) + " |")
    lines = [head, "|---|---|---|" + "---|" * len(budgets_gib)]
    for name in models:
        a = load_arch(name)
        for mode, knobs in MODES.items():
            p = PlanSetup(prompt_tokens=prompt_tokens, prompts=prompts, group_size=group_size,
                          response_tokens=response_tokens, kl="none", **knobs)
            cells = [fmt_bytes(plan(a, p)["peak"])]
            for b in budgets_gib:
                n = largest_fit(a, p, b * GiB, groups=(group_size,))[group_size]
                cells.append(str(n) if n else "does not fit")
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`deepeyesv2 plan`: plan-specific flags here, everything else is the usual config (--config, --rl.group_size ...)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="deepeyesv2 plan", add_help=False,
                                 description="Predicted peak memory of one colocated RL step, by component, and what "
                                             "would fit a budget. Besides these flags it takes the usual config: "
                                             "--config run.yaml and dotted overrides (listed below).")
    ap.add_argument("-h", "--help", action="store_true", help="show this help (with the config keys plan reads)")
    ap.add_argument("--config", default=None, help="YAML run config (the keys listed below; others are ignored)")
    ap.add_argument("--gpu-mem", default=None, help="device memory budget with its unit, e.g. 24GiB, 80GB, 512MiB")
    ap.add_argument("--model", default=None, help="architecture to plan (default: model.name_or_path): "
                    + ", ".join(shipped_archs()) + ", a preset or a checkpoint dir; a real one is planned with "
                    "real-model defaults (bf16, a KV cache sized from the rollout settings), each stated")
    ap.add_argument("--mode", default=None, choices=list(MODES), help="override LoRA / checkpointing / offload knobs")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--prompt-tokens", type=int, default=1024, help="prompt tokens incl. image tokens")
    ap.add_argument("--image-size", type=int, default=448, help="image side, pixels")
    ap.add_argument("--images", type=int, default=1, help="images per trajectory (input + tool-returned)")
    ap.add_argument("--table", action="store_true", help="print the fits-on-one-GPU table for 3B/7B and exit")
    args, rest = ap.parse_known_args(argv)
    rest = (["--config", args.config] if args.config else []) + rest  # the file first: dotted overrides win
    parser = config_parser(prog="deepeyesv2 plan", shown=PLAN_KEYS)
    if args.help:
        print(ap.format_help())
        print("config keys plan reads (in the --config YAML or as dotted overrides, e.g. --rl.group_size 16):")
        # the config parser's groups, without its own usage line and generic options (-h, --print_config)
        print("\n\n".join(part for part in parser.format_help().split("\n\n")
                          if not part.startswith(("usage:", "options:"))))
        return 0
    if args.table:
        print(fits_table())
        return 0
    try:
        budget = parse_bytes(args.gpu_mem) if args.gpu_mem else None
        cfg = config_from_namespace(parser, parser.parse_args(rest))
    except ValueError as e:
        print(f"deepeyesv2 plan: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # jsonargparse names the bad key
        print(f"deepeyesv2 plan: config error: {error_line(e)}", file=sys.stderr)
        return 2
    try:
        name = args.model or cfg.model.name_or_path
        arch = load_arch(name)
        assumed: list[str] = []
        if args.model and is_real_arch(args.model):
            given = {tok[2:].split("=", 1)[0] for tok in rest if tok.startswith("--")}
            cfg, notes = real_model_defaults(cfg, given)
            if notes:
                assumed = [f"assumed for the real architecture {arch.name} (the config is for "
                           f"model.name_or_path={cfg.model.name_or_path}; set a key on the command line to keep yours):"]
                assumed += [f"  {n}" for n in notes]
        setup = setup_from_config(cfg, args.mode, device=args.device, prompt_tokens=args.prompt_tokens,
                                  image_size=args.image_size, images=args.images)
    except ValueError as e:
        print(f"deepeyesv2 plan: {e}", file=sys.stderr)
        return 2
    result = plan(arch, setup)
    fits = largest_fit(arch, setup, budget) if budget else None
    fit = fit_lines(arch, setup, result["peak"], budget) if budget else None
    print(report(result, budget, fits, assumed=assumed, fit=fit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
