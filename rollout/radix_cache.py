"""Prefix KV cache: a radix tree over token keys whose nodes hold per-layer K/V slices, LRU-evicted.

Keys are token ids, except that each `<|image_pad|>` is keyed by (image content hash, index within the
image): two different images with the same pad count must not share KV, and the same image at the same
place must. M-RoPE positions are a function of the key prefix (tokens + image grids, which the hash
covers), so equal key prefixes imply equal K/V -- what makes reuse exact.

The G samples of a group share their prompt's prefill, and each new turn of an episode only prefills
the tokens appended since its previous turn (tool output); the policy's own tokens were cached while
it decoded them.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence

import torch
import xxhash

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys [Hk, n, D], values [Hk, n, D])


def image_content_hash(pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[int]) -> int:
    """64-bit hash of one image's patchified pixels and its grid (pixels: [P, D])."""
    h = xxhash.xxh64()
    h.update(repr(tuple(int(x) for x in grid_thw)).encode())
    h.update(pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.intdigest()


def image_hashes(pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None) -> list[int]:
    """One hash per image of a concatenated [P, D] pixel tensor split by its [N, 3] grids."""
    if image_grid_thw is None or image_grid_thw.shape[0] == 0:
        return []
    if pixel_values is None:
        raise ValueError("image_grid_thw given without pixel_values")
    sizes = [int(x) for x in image_grid_thw.prod(-1)]
    if sum(sizes) != pixel_values.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but the grids need {sum(sizes)}")
    return [image_content_hash(pv, g) for pv, g in zip(pixel_values.split(sizes), image_grid_thw)]


def cache_key(token_ids: Sequence[int], image_pad_id: int, image_keys: Sequence[int], pads_per_image: Sequence[int]) -> list[Hashable]:
    """token ids with the j-th pad of image i replaced by (image_keys[i], j)."""
    key: list[Hashable] = []
    img, j = 0, 0
    for t in token_ids:
        if t != image_pad_id:
            key.append(t)
            continue
        if img >= len(image_keys):
            raise ValueError(f"more <|image_pad|> tokens than the {len(image_keys)} image(s) account for")
        key.append((image_keys[img], j))
        j += 1
        if j == pads_per_image[img]:
            img, j = img + 1, 0
    if img != len(image_keys):
        raise ValueError(f"{len(image_keys)} images but only {img} complete <|image_pad|> blocks in the context")
    return key


class _Node:
    __slots__ = ("key", "kv", "children", "parent", "last_access")

    def __init__(self, key: list, kv: KV | None, parent: "_Node | None", tick: int):
        self.key = key
        self.kv = kv
        self.children: dict[Hashable, _Node] = {}
        self.parent = parent
        self.last_access = tick


def _common_len(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    """Token-budgeted prefix cache. `match` returns the longest cached prefix's K/V; `insert` stores the
    K/V of a whole key (only the part not already cached is kept); least recently used leaves are evicted
    when more than `budget_tokens` tokens are held."""

    def __init__(self, budget_tokens: int):
        if budget_tokens < 0:
            raise ValueError(f"budget_tokens must be >= 0, got {budget_tokens}")
        self.budget_tokens = budget_tokens
        self._tick = itertools.count(1)
        self.clear()

    def clear(self) -> None:
        self.root = _Node([], None, None, 0)
        self.total_tokens = 0
        self.evicted_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.budget_tokens > 0

    def num_nodes(self) -> int:
        stack, n = [self.root], 0
        while stack:
            node = stack.pop()
            n += 1
            stack.extend(node.children.values())
        return n - 1

    # -- tree walking -------------------------------------------------------------------------
    def _split(self, node: _Node, at: int) -> _Node:
        """Cut node's edge after `at` key elements; returns the new upper node (which keeps node below it)."""
        upper = _Node(node.key[:at], [(k[:, :at], v[:, :at]) for k, v in node.kv], node.parent, node.last_access)
        node.parent.children[upper.key[0]] = upper
        node.key = node.key[at:]
        node.kv = [(k[:, at:], v[:, at:]) for k, v in node.kv]
        node.parent = upper
        upper.children[node.key[0]] = node
        return upper

    def _walk(self, key: Sequence[Hashable]) -> tuple[list[_Node], int]:
        """Nodes on the path covering the longest cached prefix of `key` (split so it ends on a node)."""
        node, i, path = self.root, 0, []
        tick = next(self._tick)
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                break
            c = _common_len(child.key, key[i:])
            if c < len(child.key):
                child = self._split(child, c)
            child.last_access = tick
            path.append(child)
            i += c
            node = child
        return path, i

    def match(self, key: Sequence[Hashable]) -> tuple[int, KV | None]:
        """(n, kv): the longest cached prefix key[:n] and its per-layer K/V ([Hk, n, D] each), or (0, None)."""
        if not self.enabled or not key:
            return 0, None
        path, n = self._walk(key)
        if n == 0:
            return 0, None
        num_layers = len(path[0].kv)
        kv = [
            (torch.cat([p.kv[l][0] for p in path], dim=1), torch.cat([p.kv[l][1] for p in path], dim=1))
            for l in range(num_layers)
        ]
        return n, kv

    def insert(self, key: Sequence[Hashable], kv: KV) -> int:
        """Cache K/V for `key` (kv: per layer [Hk, len(key), D]). Returns how many new tokens were stored."""
        if not self.enabled or not key:
            return 0
        if kv[0][0].shape[1] != len(key):
            raise ValueError(f"insert: K/V covers {kv[0][0].shape[1]} tokens but the key has {len(key)}")
        path, n = self._walk(key)
        added = len(key) - n
        if added:
            parent = path[-1] if path else self.root
            # clone: the slices would otherwise pin the engine's whole decode buffer in memory
            leaf_kv = [(k[:, n:].clone(), v[:, n:].clone()) for k, v in kv]
            leaf = _Node(list(key[n:]), leaf_kv, parent, next(self._tick))
            parent.children[leaf.key[0]] = leaf
            self.total_tokens += added
        self._evict()
        return added

    def _evict(self) -> None:
        if self.total_tokens <= self.budget_tokens:
            return
        leaves: list[tuple[int, int, _Node]] = []
        counter = itertools.count()
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                leaves.append((node.last_access, next(counter), node))
        heapq.heapify(leaves)
        while self.total_tokens > self.budget_tokens and leaves:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            del parent.children[node.key[0]]
            self.total_tokens -= len(node.key)
            self.evicted_tokens += len(node.key)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_access, next(counter), parent))
