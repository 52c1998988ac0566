"""K/V storage of the embedded engine's running sequences: a slot pool that decode steps update in place,
and the Cache stand-ins the HF language model writes through.

Layout: per layer one keys and one values tensor [S, Hk, C, D]. Sequence i of the decode batch owns slot i
and holds its tokens' K/V at columns [0, length). The decoding sequences always occupy slots [0, n), so the
decode step's keys and values are the *views* keys[:n, :, :width] (width = longest live length + 1): no
gather of the live rows. Keeping [0, n) dense costs one move per retirement (the last slot's filled columns
go into the freed slot), i.e. a copy of at most one sequence's K/V per finished sequence -- not per step.

Why slots and views, not a gather or a paged layout: the HF attention takes one [B, Hk, K, D] tensor per
layer, so a paged or scattered layout would need a gather of every live row's K/V at every step -- the copy
this pool exists to avoid. Rows shorter than `width` are masked per row (a boolean length mask).

What a decode step copies: the new token's K/V of each live row (index_put into its slot: n x Hk x D per
layer), plus the move above for each sequence that finished at that step. Both are bounded by the batch,
independent of the sequences' lengths. (The attention kernel itself may expand grouped K/V heads; for one
query token transformers' SDPA path packs the query heads instead, so it does not.)
"""

from __future__ import annotations

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys [Hk, n, D], values [Hk, n, D])


def _grown(size: int, need: int, limit: int) -> int:
    """The next capacity >= need: doubling from `size` (amortizes the copy of a reallocation), at most limit."""
    size = max(size, 1)
    while size < need:
        size *= 2
    return min(size, limit)


class SlotPool:
    """Per-layer K/V [slots, Hk, length, D] for the decoding sequences; slots [0, n) are in use.

    Allocated on first use and grown (doubling, live slots copied once) up to max_slots x max_len; `release`
    drops the tensors when nothing is running (the colocated trainer then gets the memory back).
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 max_slots: int, max_len: int):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.max_slots, self.max_len = max_slots, max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.n = 0  # slots in use
        self.moves = 0  # slot-to-slot copies made to keep [0, n) dense (one per retirement at most)

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def _ensure(self, slots: int, length: int) -> None:
        """Room for `slots` slots of `length` columns (a regrow copies the slots in use once)."""
        if slots > self.max_slots or length > self.max_len:
            raise ValueError(f"K/V pool: {slots} slots x {length} tokens exceed {self.max_slots} x {self.max_len}")
        if slots <= self.slots and length <= self.length:
            return
        s = _grown(self.slots, slots, self.max_slots)
        c = _grown(self.length, length, self.max_len)
        shape = (s, self.kv_heads, c, self.head_dim)
        # Zeros, not empty: masked columns still enter SDPA's (0-weighted) sum, and garbage NaNs would leak.
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        values = [torch.zeros_like(k) for k in keys]
        for old, new in zip(self.keys + self.values, keys + values):
            new[: self.n, :, : old.shape[2]] = old[: self.n]
        self.keys, self.values = keys, values

    def append(self, kv: KV, length: int, reserve: int) -> int:
        """Put a sequence whose context K/V is kv ([Hk, length, D] per layer) into slot n (a copy of its
        context, once per sequence); it will grow to `reserve` tokens."""
        self._ensure(self.n + 1, reserve)
        i = self.n
        for (k, v), kb, vb in zip(kv, self.keys, self.values):
            kb[i, :, :length] = k
            vb[i, :, :length] = v
        self.n += 1
        return i

    def remove(self, i: int, last_len: int) -> None:
        """Free slot i: the last slot in use (last_len filled columns) moves into it, so [0, n - 1) stays dense."""
        last = self.n - 1
        if i != last:
            for kb, vb in zip(self.keys, self.values):
                kb[i, :, :last_len] = kb[last, :, :last_len]
                vb[i, :, :last_len] = vb[last, :, :last_len]
            self.moves += 1
        self.n -= 1

    def clear(self) -> None:
        """Forget every slot (the tensors stay allocated)."""
        self.n = 0

    def release(self) -> None:
        if self.n:
            raise RuntimeError(f"K/V pool: cannot release with {self.n} slots in use")
        self.keys, self.values = [], []

    def kv(self, i: int, length: int) -> KV:
        """Views of slot i's first `length` tokens (for the prefix cache, which clones what it keeps)."""
        return [(kb[i, :, :length], vb[i, :, :length]) for kb, vb in zip(self.keys, self.values)]

    def decode_cache(self, columns: list[int]) -> "SlotCache":
        """Cache for one decode step of slots [0, len(columns)): row i writes its token at columns[i]."""
        return SlotCache(self, columns)


class SlotCache:
    """Stands in for transformers' Cache in a decode step (one query token per row): writes each row's new K/V
    in place into its slot at its own column, and hands the attention the views [:n, :, :width]."""

    def __init__(self, pool: SlotPool, columns: list[int]):
        n = len(columns)
        self.pool, self.n, self.width = pool, n, max(columns) + 1
        self.rows = torch.arange(n, device=pool.device)
        self.cols = torch.tensor(columns, device=pool.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states [n, Hk, 1, D] -> keys, values [n, Hk, width, D] (views of the pool)."""
        kb, vb = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        # Under autocast the keys arrive fp32 (RoPE multiplies by fp32 cos/sin) and the values bf16: store both
        # in the pool's dtype (index_put refuses a dtype mismatch).
        kb[self.rows, :, self.cols] = key_states[:, :, 0].to(kb.dtype)
        vb[self.rows, :, self.cols] = value_states[:, :, 0].to(vb.dtype)
        return kb[: self.n, :, : self.width], vb[: self.n, :, : self.width]


class PrefillCache:
    """Stands in for transformers' Cache in a prefill step: K/V live in per-layer buffers [P, Hk, C, D] built for
    that step; a call writes the new tokens at columns [write, write + q) of every row and attends to columns
    [0, write + q)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write: int):
        self.keys, self.values, self.write = keys, values, write

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        q = key_states.shape[2]
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        kb[:, :, self.write : self.write + q] = key_states.to(kb.dtype)
        vb[:, :, self.write : self.write + q] = value_states.to(vb.dtype)
        return kb[:, :, : self.write + q], vb[:, :, : self.write + q]
