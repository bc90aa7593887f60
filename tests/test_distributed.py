"""tokenbridge.distributed: the resumable sampler's order is DistributedSampler's."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from tokenbridge.distributed import ResumableSampler


@pytest.mark.parametrize("n, world", [(7, 2), (65, 8), (70000, 3), (64, 1)])
def test_resumable_sampler_is_distributed_samplers_order_without_lists(n, world):
    for rank in range(world):
        reference = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True)
        reference.set_epoch(3)
        ours = ResumableSampler(n, world, rank, seed=5)
        ours.set_position(3, 0)
        expected = list(reference)
        assert list(ours) == expected and len(ours) == len(expected)
        ours.set_position(3, 2)  # resume after this rank's first two samples
        assert list(ours) == expected[2:] and len(ours) == len(expected) - 2
