"""Radix prefix cache: insert / match / split / evict, image-hash keying, counters."""

from __future__ import annotations

import pytest
import torch

from deepeyesv2_rollout.radix_cache import RadixCache, cache_key, image_content_hash, image_hashes

LAYERS, HK, D = 2, 2, 3


def kv_for(key):
    """Fake per-layer K/V whose values encode (layer, token value) so slices can be checked exactly."""
    vals = torch.tensor([hash(k) % 1000 for k in key], dtype=torch.float32)
    out = []
    for l in range(LAYERS):
        k = (vals + 1000 * l).view(1, -1, 1).expand(HK, -1, D).clone()
        out.append((k, -k))
    return out


def assert_kv(kv, key):
    ref = kv_for(key)
    for l in range(LAYERS):
        assert torch.equal(kv[l][0], ref[l][0]) and torch.equal(kv[l][1], ref[l][1]), f"layer {l}"


def test_insert_match_and_split():
    c = RadixCache(1000)
    a = [1, 2, 3, 4, 5]
    assert c.insert(a, kv_for(a)) == 5
    n, kv = c.match([1, 2, 3, 9])
    assert n == 3
    assert_kv(kv, [1, 2, 3])  # the edge [1..5] was split at 3
    assert c.num_nodes() == 2 and c.total_tokens == 5
    b = [1, 2, 3, 7, 8]
    assert c.insert(b, kv_for(b)) == 2  # only the new suffix is stored
    assert c.total_tokens == 7 and c.num_nodes() == 3
    n, kv = c.match(b + [10])
    assert n == 5
    assert_kv(kv, b)
    n, kv = c.match(a)
    assert n == 5
    assert_kv(kv, a)
    assert c.match([9, 9]) == (0, None)
    assert c.insert(a, kv_for(a)) == 0  # already cached


def test_lru_eviction_under_budget():
    c = RadixCache(8)
    a, b = [1, 2, 3, 4], [1, 2, 5, 6]
    c.insert(a, kv_for(a))
    c.insert(b, kv_for(b))  # shares [1, 2]: 6 tokens held
    assert c.total_tokens == 6
    c.match(a)  # a is now the most recently used
    d = [7, 8, 9, 10]
    c.insert(d, kv_for(d))  # 10 > 8: evict the LRU leaf ([5, 6] of b)
    assert c.total_tokens == 8 and c.evicted_tokens == 2
    assert c.match(b)[0] == 2 and c.match(a)[0] == 4 and c.match(d)[0] == 4
    c.insert([11, 12, 13, 14, 15, 16, 17, 18, 19], kv_for([11, 12, 13, 14, 15, 16, 17, 18, 19]))
    assert c.total_tokens <= 8  # a too-long entry evicts down to the budget, itself included if needed
    c.clear()
    assert c.total_tokens == 0 and c.match(a) == (0, None)


def test_interior_node_becomes_leaf_and_is_evicted():
    c = RadixCache(5)
    a = [1, 2, 3]
    c.insert(a, kv_for(a))
    c.insert([1, 2, 3, 4, 5], kv_for([1, 2, 3, 4, 5]))
    c.insert([9, 9, 9], kv_for([9, 9, 9]))  # 8 tokens: evict [4, 5], then [1, 2, 3] (now a leaf)
    assert c.total_tokens == 3 and c.match([1, 2, 3])[0] == 0 and c.match([9, 9, 9])[0] == 3


def test_disabled_cache_and_bad_input():
    c = RadixCache(0)
    assert not c.enabled and c.insert([1, 2], kv_for([1, 2])) == 0 and c.match([1, 2]) == (0, None)
    with pytest.raises(ValueError, match="budget_tokens"):
        RadixCache(-1)
    c = RadixCache(10)
    with pytest.raises(ValueError, match="covers 2 tokens but the key has 3"):
        c.insert([1, 2, 3], kv_for([1, 2]))


def test_image_pad_keys_by_content_hash():
    pad = 99
    px1, px2 = torch.rand(16, 4), torch.rand(16, 4)
    grid = torch.tensor([[1, 4, 4]])
    h1, h2 = image_hashes(px1, grid)[0], image_hashes(px2, grid)[0]
    assert h1 != h2 and h1 == image_content_hash(px1.clone(), [1, 4, 4])
    assert image_content_hash(px1, [1, 2, 8]) != h1  # same pixels, different grid
    ids = [5, pad, pad, pad, pad, 6]
    k1 = cache_key(ids, pad, [h1], [4])
    k2 = cache_key(ids, pad, [h2], [4])
    assert k1[0] == 5 and k1[1:5] == [(h1, 0), (h1, 1), (h1, 2), (h1, 3)] and k1[5] == 6
    c = RadixCache(100)
    c.insert(k1, kv_for(k1))
    assert c.match(k2)[0] == 1  # same pad count, other image: only the text token before it matches
    assert c.match(k1)[0] == 6
    two = cache_key([pad, pad, 7, pad, pad], pad, [h1, h2], [2, 2])
    assert two == [(h1, 0), (h1, 1), 7, (h2, 0), (h2, 1)]
    with pytest.raises(ValueError, match="more <|image_pad|>"):
        cache_key([pad, pad, pad], pad, [h1], [2])
    with pytest.raises(ValueError, match="2 images"):
        cache_key([pad, pad], pad, [h1, h2], [2, 2])
    with pytest.raises(ValueError, match="patches"):
        image_hashes(torch.rand(10, 4), grid)
