"""The host swap space: block contents survive a round trip; a swap that does not fit changes nothing."""

from __future__ import annotations

import pytest
import torch

from ecoserve.kv_cache import HostSwapSpace, OutOfBlocksError

# [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
DEVICE_SHAPE = (2, 2, 10, 4, 2, 3)


def device_kv() -> torch.Tensor:
    return torch.randn(DEVICE_SHAPE, generator=torch.Generator().manual_seed(0))


def test_round_trip_moves_block_contents_and_frees_host_blocks() -> None:
    kv = device_kv()
    space = HostSwapSpace(kv, num_blocks=6)
    assert space.kv.shape == (2, 2, 6, 4, 2, 3) and space.kv.dtype == kv.dtype
    assert not space.kv.is_pinned()  # pinned only for a CUDA device KV
    src = [7, 2, 5]  # out of order, not consecutive
    saved = kv[:, :, src].clone()
    host = space.swap_out(kv, src)
    assert len(host) == 3 and space.num_free == 3 and space.num_blocks == 6
    assert torch.equal(space.kv[:, :, host], saved)
    kv[:, :, src] = 0.0  # the device blocks get reused meanwhile
    dst = [0, 9, 4]
    space.swap_in(host, kv, dst)
    assert torch.equal(kv[:, :, dst], saved)
    assert space.num_free == 6
    space.pool.assert_no_leaks()


def test_exhaustion_raises_and_leaves_everything_unchanged() -> None:
    kv = device_kv()
    space = HostSwapSpace(kv, num_blocks=4)
    first = space.swap_out(kv, [0, 1, 2])
    host_before = space.kv.clone()
    device_before = kv.clone()
    with pytest.raises(OutOfBlocksError):
        space.swap_out(kv, [3, 4])
    assert space.num_free == 1
    assert torch.equal(space.kv, host_before) and torch.equal(kv, device_before)
    space.free(first)
    space.pool.assert_no_leaks()


def test_bad_arguments_are_refused() -> None:
    kv = device_kv()
    space = HostSwapSpace(kv, num_blocks=4)
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        HostSwapSpace(kv, num_blocks=0)
    with pytest.raises(ValueError, match="does not match the swap space's block layout"):
        space.swap_out(torch.zeros(2, 2, 10, 8, 2, 3), [0])
    host = space.swap_out(kv, [1, 2])
    with pytest.raises(ValueError, match="one device block per host block"):
        space.swap_in(host, kv, [3])
    with pytest.raises(ValueError, match="not allocated"):
        space.swap_in([3], kv, [3])
    assert space.num_free == 2  # nothing changed
    assert space.swap_out(kv, []) == [] and space.num_free == 2
    space.free(host)
    space.pool.assert_no_leaks()


@pytest.mark.gpu
def test_round_trip_from_a_cuda_kv_uses_pinned_host_memory() -> None:
    kv = device_kv().to("cuda")
    space = HostSwapSpace(kv, num_blocks=4)
    assert space.kv.is_pinned() and space.kv.device.type == "cpu"
    saved = kv[:, :, [3, 8]].clone()
    host = space.swap_out(kv, [3, 8])
    kv[:, :, [3, 8]] = 0.0
    space.swap_in(host, kv, [1, 6])
    assert torch.equal(kv[:, :, [1, 6]], saved)
    space.pool.assert_no_leaks()
