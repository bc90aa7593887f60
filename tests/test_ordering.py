"""Tests of the frequency-based channel order of the dimension-wise head (paper Sec. 3.2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenbridge.ordering import frequency_channel_order, low_frequency_energy_share


def smooth_noise(n: int, size: int, factor: int, generator: torch.Generator) -> torch.Tensor:
    """[n, size, size] noise upsampled (bicubic) from a grid `factor` times coarser: low-frequency content."""
    coarse = torch.randn(n, 1, size // factor, size // factor, generator=generator, dtype=torch.float64)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0]


def synthetic_latents(seed: int = 0) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """[16, 8, 16, 16] latents: 2 very smooth, 2 mildly smooth and 4 white-noise channels, in a shuffled layout."""
    g = torch.Generator().manual_seed(seed)
    n, size = 16, 16
    smooth, medium, white = [5, 2], [7, 0], [1, 3, 4, 6]
    latents = torch.empty(n, 8, size, size, dtype=torch.float64)
    for c in smooth:
        latents[:, c] = 3.0 * smooth_noise(n, size, 8, g) + 0.5  # an offset and scale must not matter
    for c in medium:
        latents[:, c] = smooth_noise(n, size, 2, g)
    for c in white:
        latents[:, c] = torch.randn(n, size, size, generator=g, dtype=torch.float64) * (1 + c)
    return latents.float(), smooth, medium, white


def test_smooth_channels_come_first():
    latents, smooth, medium, white = synthetic_latents()
    order, inverse = frequency_channel_order(latents)
    assert order.dtype == inverse.dtype == torch.long and order.shape == inverse.shape == (8,)
    assert set(order[:2].tolist()) == set(smooth)
    assert set(order[2:4].tolist()) == set(medium)
    assert set(order[4:].tolist()) == set(white)
    share = low_frequency_energy_share(latents)
    assert share.shape == (8,) and ((share >= 0) & (share <= 1)).all()
    assert share[smooth].min() > 0.9 and share[white].max() < 0.35  # white noise: ~pi/16 of the spectrum


def test_order_and_inverse_are_inverse_permutations():
    latents = synthetic_latents(seed=1)[0]
    order, inverse = frequency_channel_order(latents)
    assert torch.equal(torch.sort(order).values, torch.arange(8))
    assert torch.equal(order[inverse], torch.arange(8)) and torch.equal(inverse[order], torch.arange(8))
    # reordering channels and mapping back restores the natural order
    permuted = latents[:, order]
    assert torch.equal(permuted[:, inverse], latents)


def test_deterministic_and_equivariant_to_channel_permutation():
    latents = synthetic_latents(seed=2)[0]
    order, inverse = frequency_channel_order(latents)
    again = frequency_channel_order(latents.clone())
    assert torch.equal(again[0], order) and torch.equal(again[1], inverse)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    order_p, _ = frequency_channel_order(latents[:, perm])
    assert torch.equal(perm[order_p], order)  # same channels in the same order, whatever their layout


def test_ties_keep_natural_order():
    g = torch.Generator().manual_seed(0)
    one = torch.randn(4, 1, 8, 8, generator=g)
    order, _ = frequency_channel_order(one.repeat(1, 3, 1, 1))  # three identical channels
    assert order.tolist() == [0, 1, 2]


def test_cutoff_changes_the_measure():
    latents = synthetic_latents()[0]
    low = low_frequency_energy_share(latents, cutoff=0.1)
    high = low_frequency_energy_share(latents, cutoff=0.5)
    assert (low <= high + 1e-12).all()  # more of the spectrum counts as low frequency with a higher cutoff
    assert torch.allclose(low_frequency_energy_share(latents, cutoff=0.5 * 2**0.5), torch.ones(8, dtype=torch.float64))


def test_bad_inputs_raise():
    latents = synthetic_latents()[0]
    for bad in (latents[0], latents[None], latents[:, :, 0]):
        with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
            frequency_channel_order(bad)
    for value in (float("nan"), float("inf")):
        broken = latents.clone()
        broken[3, 2, 4, 5] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            frequency_channel_order(broken)
    for cutoff in (0.0, -0.1, 0.8):
        with pytest.raises(ValueError, match="cutoff"):
            frequency_channel_order(latents, cutoff=cutoff)
