"""Memory levers for small accelerators: AdamW states in host memory, token-budgeted log-prob passes.

`OffloadedAdamW` keeps an fp32 master copy of every accelerator parameter, its gradient and both AdamW moments
in (pinned) host memory and steps them with torch's AdamW there; the device keeps only the weights and their
gradients. Per step, each gradient goes device -> host and each updated weight host -> device. Parameters that
already live on the CPU are stepped in place (nothing to offload), unless `force_copy` asks for the copy path --
which is how the CPU test suite exercises the same logic the GPU runs.

`budgeted_logprobs` runs a packed row's no-grad log-prob pass (old-policy recompute, KL reference) in pieces of
whole sequences of at most `token_budget` tokens, so that pass never holds more activations than the budget.
"""

from __future__ import annotations

import torch

from deepeyesv2_rollout.types import logprob_temperature

from .logprobs import packed_logprobs
from .model import unwrap_model
from .packing import PackedBatch


class OffloadedAdamW:
    """AdamW whose states (and fp32 master weights) live on the CPU. Same update as torch.optim.AdamW.

    `inner` is the torch AdamW over the host copies: give it to the LR scheduler; state_dict /
    load_state_dict / param_groups are its own, so checkpoints look like a plain AdamW's (over the masters).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 force_copy: bool = False):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("OffloadedAdamW got no trainable parameters")
        self.masters: list[torch.Tensor] = []
        for p in self.params:
            if p.device.type == "cpu" and not force_copy and p.dtype == torch.float32:
                self.masters.append(p)  # already in host memory: step it in place
            else:
                m = p.detach().to("cpu", torch.float32, copy=True)
                if torch.cuda.is_available() and p.device.type == "cuda":
                    m = m.pin_memory()
                self.masters.append(m.requires_grad_(True))
        # foreach=False: host peak stays at one parameter's temporaries (the whole point is to save memory).
        self.inner = torch.optim.AdamW(self.masters, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                       foreach=False)

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def _pairs(self):
        return [(p, m) for p, m in zip(self.params, self.masters) if m is not p]

    @torch.no_grad()
    def step(self) -> None:
        for p, m in self._pairs():
            m.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32)
        self.inner.step()
        for p, m in self._pairs():
            if p.grad is not None:
                p.copy_(m.to(p.device, non_blocking=True))
        for _, m in self._pairs():
            m.grad = None  # the host gradient copy is dead weight between steps

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        # masters must match the (restored) device weights: they are the weights AdamW updates
        with torch.no_grad():
            for p, m in self._pairs():
                m.copy_(p.detach().float().cpu())

    def state_bytes(self) -> dict:
        """{'device': bytes of optimizer state on accelerators, 'host': bytes in host memory}."""
        out = {"device": 0, "host": 0}
        for st in self.inner.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    out["host" if v.device.type == "cpu" else "device"] += v.numel() * v.element_size()
        return out


def split_row(row: PackedBatch, token_budget: int, image_token_id: int, spatial_merge_size: int = 2) -> list[PackedBatch]:
    """Split a packed row into rows of whole sequences with at most `token_budget` tokens each (a sequence
    longer than the budget goes alone: a sequence cannot be split without a KV cache). Images follow their
    sequence; position ids, targets, masks and token fields are sliced, cu_seqlens rebuilt."""
    if token_budget <= 0:
        raise ValueError(f"token_budget must be > 0, got {token_budget}")
    cu = row.cu_seqlens.tolist()
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    # images per sequence, from the <|image_pad|> counts (grids are in order of appearance)
    grids = row.image_grid_thw.tolist() if row.image_grid_thw is not None else []
    pads = [int((row.input_ids[a:b] == image_token_id).sum()) for a, b in zip(cu[:-1], cu[1:])]
    img_of_seq, i = [], 0
    patch_start = [0]
    for t, h, w in grids:
        patch_start.append(patch_start[-1] + t * h * w)
    for n_pad in pads:
        first = i
        while n_pad > 0:
            if i >= len(grids):
                raise ValueError("split_row: <|image_pad|> tokens without a matching image_grid_thw row")
            t, h, w = grids[i]
            n_pad -= t * h * w // spatial_merge_size**2
            i += 1
        img_of_seq.append((first, i))
    groups, cur, size = [], [], 0
    for s, n in enumerate(lens):
        if cur and size + n > token_budget:
            groups.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += n
    if cur:
        groups.append(cur)
    out = []
    for g in groups:
        a, b = cu[g[0]], cu[g[-1] + 1]
        i0, i1 = img_of_seq[g[0]][0], img_of_seq[g[-1]][1]
        has_img = i1 > i0
        out.append(PackedBatch(
            input_ids=row.input_ids[a:b], position_ids=row.position_ids[:, a:b],
            cu_seqlens=torch.tensor([0] + [cu[s + 1] - a for s in g], dtype=torch.int32, device=row.cu_seqlens.device),
            targets=row.targets[a:b], loss_mask=row.loss_mask[a:b],
            pixel_values=row.pixel_values[patch_start[i0]:patch_start[i1]] if has_img else None,
            image_grid_thw=row.image_grid_thw[i0:i1] if has_img else None,
            seq_ids=row.seq_ids[g[0]:g[-1] + 1], max_seqlen=max(lens[s] for s in g),
            token_fields={k: v[a:b] for k, v in row.token_fields.items()},
        ))
    return out


@torch.no_grad()
def budgeted_logprobs(model, row: PackedBatch, temperature: float = 1.0, token_budget: int = 0) -> torch.Tensor:
    """Log-probs [T] fp32 of row.targets (0 off the loss mask), computed `token_budget` tokens at a time
    (0 = the whole row at once). Equal to `packed_logprobs(model, row)` up to float reassociation."""
    temperature = logprob_temperature(temperature)
    if token_budget <= 0 or row.num_tokens <= token_budget:
        return packed_logprobs(model, row, temperature=temperature)[0]
    cfg = unwrap_model(model).config
    merge = getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", 2)
    parts = split_row(row, token_budget, cfg.image_token_id, merge)
    return torch.cat([packed_logprobs(model, p, temperature=temperature)[0] for p in parts])


def build_train_optimizer(model: torch.nn.Module, cfg, total_steps: int):
    """`deepeyesv2.optim.build_optimizer`, with the AdamW states in host memory when cfg.offload_states.

    cfg: OptimConfig. The schedule (warm-up + cosine) is the same function, applied to the host optimizer.
    """
    from .optim import build_optimizer

    opt, sched = build_optimizer(model, cfg, total_steps)
    if not getattr(cfg, "offload_states", False):
        return opt, sched
    from .distributed import is_distributed

    if is_distributed():
        raise ValueError("optim.offload_states is not supported under torchrun: FSDP2 already shards the AdamW "
                         "states over the ranks (1/world size each); turn it off")
    # `opt` holds no state yet (AdamW allocates lazily), so dropping it frees nothing but a list.
    off = OffloadedAdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return off, torch.optim.lr_scheduler.LambdaLR(off.inner, sched.lr_lambdas[0])


def cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of `model` with every parameter and buffer in host memory, made tensor by tensor
    (deepcopy then .to('cpu') would briefly hold a second copy on the accelerator)."""
    import copy

    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo).eval().requires_grad_(False)
