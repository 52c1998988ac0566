"""group_advantages: Triton kernel (under TRITON_INTERPRET=1) and torch path vs the python loop over groups."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere: lets the kernels run on CPU tensors

import pytest
import torch

from deepeyesv2_kernels.advantages import group_advantages
from deepeyesv2_kernels.advantages_ref import group_advantages_ref


def make_batch(N, seed=0, n_groups=7, max_len=9, reward_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-50, 10**12, (n_groups,), generator=g)  # arbitrary, negative and huge ints
    group_ids = ids[torch.randint(0, n_groups, (N,), generator=g)]  # ragged, unsorted groups
    rewards = (torch.randint(0, 6, (N,), generator=g) * 0.2).to(reward_dtype)  # 0, 0.2, ..: not exact in binary
    lens = torch.randint(0, max_len, (N,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
    mask = torch.rand(int(cu[-1]), generator=g) > 0.3
    return rewards, group_ids, cu, mask


def check(got, want, atol=1e-5):
    for name, a, b in zip(["seq_adv", "token_adv"], got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("norm", ["std", "none"])
@pytest.mark.parametrize("N", [1, 2, 37])
def test_matches_reference(backend, norm, N):
    rewards, group_ids, cu, mask = make_batch(N, seed=N)
    got = group_advantages(rewards, group_ids, cu, mask, norm=norm, backend=backend)
    check(got, group_advantages_ref(rewards, group_ids, cu, mask, norm=norm))
    # without tokens, and without a mask
    check(group_advantages(rewards, group_ids, norm=norm, backend=backend),
          group_advantages_ref(rewards, group_ids, norm=norm))
    check(group_advantages(rewards, group_ids, cu, norm=norm, backend=backend),
          group_advantages_ref(rewards, group_ids, cu, norm=norm))


def test_more_samples_than_one_scan_block():
    # N > BLOCK_N (256): the group scan loops over several blocks
    rewards, group_ids, cu, mask = make_batch(300, seed=300, n_groups=40)
    got = group_advantages(rewards, group_ids, cu, mask, backend="triton")
    check(got, group_advantages_ref(rewards, group_ids, cu, mask))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_seq_ids_subset_and_repeats(backend):
    # more or fewer segments than samples: segments pick their sample via seq_ids
    rewards, group_ids, _, _ = make_batch(20, seed=4)
    for S in (1, 5, 33):
        seq_ids = torch.randint(0, 20, (S,), generator=torch.Generator().manual_seed(S))
        lens = torch.randint(0, 40, (S,), generator=torch.Generator().manual_seed(S + 1))
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
        mask = torch.rand(int(cu[-1])) > 0.5
        got = group_advantages(rewards, group_ids, cu, mask, seq_ids=seq_ids, backend=backend)
        check(got, group_advantages_ref(rewards, group_ids, cu, mask, seq_ids=seq_ids))


def test_python_loop_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 7.0])
    group_ids = torch.tensor([3, 3, 9, 3, 9, 42])
    cu = torch.tensor([0, 2, 2, 5, 6, 8, 9], dtype=torch.int32)
    seq_adv, token_adv = group_advantages(rewards, group_ids, cu, backend="triton")
    g3 = torch.tensor([1.0, 0.0, 0.2])
    a3 = (g3 - g3.mean()) / (g3.std() + 1e-6)
    g9 = torch.tensor([0.5, 0.2])
    a9 = (g9 - g9.mean()) / (g9.std() + 1e-6)
    want = torch.tensor([a3[0], a3[1], a9[0], a3[2], a9[1], 0.0])
    torch.testing.assert_close(seq_adv, want)
    torch.testing.assert_close(token_adv, want.repeat_interleave(torch.tensor([2, 0, 3, 1, 2, 1])))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_equal_rewards_give_exactly_zero(backend):
    # all-right / all-wrong groups are common; rounding noise / (0 + eps) would give large spurious advantages
    rewards = torch.tensor([0.2, 0.2, 0.2, 0.8, 0.8, 0.1, 0.7, 0.3])
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    seq_adv, _ = group_advantages(rewards, group_ids, backend=backend)
    assert (seq_adv[:5] == 0).all()
    assert (seq_adv[5:] != 0).all()


def test_bf16_rewards():
    rewards, group_ids, cu, mask = make_batch(37, seed=2, reward_dtype=torch.bfloat16)
    got = group_advantages(rewards, group_ids, cu, mask, backend="triton")
    check(got, group_advantages_ref(rewards.float(), group_ids, cu, mask), atol=1e-3)


@pytest.mark.parametrize("kwargs, name", [
    (dict(norm="mad"), "norm"),
    (dict(group_ids=torch.zeros(4, dtype=torch.long)), "group_ids"),
    (dict(cu_seqlens=torch.tensor([0, 3, 2, 5, 6, 7], dtype=torch.int32)), "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32)), "seq_ids"),
    (dict(seq_ids=torch.tensor([0, 1, 2, 3, 9])), "seq_ids"),
    (dict(loss_mask=torch.ones(3, dtype=torch.bool)), "cu_seqlens"),
    (dict(backend="gpu"), "backend"),
    # a tensor left on another device is named before any launch ("meta" stands in for a host/GPU mix-up)
    (dict(cu_seqlens=torch.tensor([0, 1, 2, 3, 4, 7], dtype=torch.int32, device="meta")), "cu_seqlens is on meta"),
    (dict(group_ids=torch.tensor([0, 0, 1, 1, 1], device="meta")), "group_ids is on meta"),
])
def test_validation_errors(kwargs, name):
    args = dict(rewards=torch.rand(5), group_ids=torch.tensor([0, 0, 1, 1, 1]),
                cu_seqlens=torch.tensor([0, 1, 2, 3, 4, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match=name):
        group_advantages(**{**args, **kwargs})
