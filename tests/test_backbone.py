"""Tests for tokenbridge.backbone (MAR) and tokenbridge.sampling (schedules)."""

import math

import pytest
import torch
from scipy.stats import truncnorm

from tokenbridge.backbone import MAR, patchify, random_masking, sample_orders, unpatchify
from tokenbridge.sampling import (
    cfg_schedule,
    mask_schedule,
    mask_schedule_list,
    num_masked_for_ratio,
    truncnorm_mask_ratio,
    truncnorm_mean,
)


def tiny_mar(**kwargs) -> MAR:
    args = dict(
        grid_size=(4, 4), token_dim=3, num_classes=5, width=32, encoder_depth=1, decoder_depth=1, num_heads=2,
        buffer_size=4, label_drop_prob=0.1,
    )
    args.update(kwargs)
    return MAR(**args)


# ---------------------------------------------------------------------------------------------- mask ratio / orders


def test_truncnorm_mask_ratio_bounds_and_mean():
    g = torch.Generator().manual_seed(0)
    r = truncnorm_mask_ratio(20000, generator=g)
    assert r.min() >= 0.7 and r.max() <= 1.0
    expected = truncnorm((0.7 - 1.0) / 0.25, 0.0, loc=1.0, scale=0.25).mean()
    assert truncnorm_mean() == pytest.approx(expected, abs=1e-9)
    assert float(r.mean()) == pytest.approx(expected, abs=0.003)
    # Mass concentrates near 1 (loc = 1): the upper half of [0.7, 1] holds more than half the draws.
    assert float((r > 0.85).float().mean()) > 0.55


def test_truncnorm_mask_ratio_rejects_bad_bounds():
    with pytest.raises(ValueError, match="bounds"):
        truncnorm_mask_ratio(1, low=0.9, high=0.8)
    with pytest.raises(ValueError, match="scale"):
        truncnorm_mask_ratio(1, scale=0.0)


def test_num_masked_for_ratio():
    assert num_masked_for_ratio(0.7, 64) == math.ceil(0.7 * 64)
    assert num_masked_for_ratio(1.0, 64) == 64
    assert num_masked_for_ratio(0.0, 64) == 1


def test_sample_orders_are_permutations_and_differ_per_sample():
    g = torch.Generator().manual_seed(1)
    orders = sample_orders(8, 37, generator=g)
    assert orders.shape == (8, 37) and orders.dtype == torch.long
    for row in orders:
        assert torch.equal(row.sort().values, torch.arange(37))
    assert len({tuple(r.tolist()) for r in orders}) == 8


def test_random_masking_marks_order_prefix():
    orders = sample_orders(5, 20, generator=torch.Generator().manual_seed(2))
    mask = random_masking(orders, 13)
    assert mask.dtype == torch.bool and torch.equal(mask.sum(1), torch.full((5,), 13))
    for row_mask, row_order in zip(mask, orders):
        assert row_mask[row_order[:13]].all() and not row_mask[row_order[13:]].any()
    with pytest.raises(ValueError, match="num_masked"):
        random_masking(orders, 21)


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("seq_len,num_iter", [(64, 64), (64, 8), (64, 1), (256, 64), (256, 256), (10, 3), (16, 15)])
def test_mask_schedule_predicts_every_position_exactly_once(seq_len, num_iter):
    sched = mask_schedule_list(num_iter, seq_len)
    assert len(sched) == num_iter and sched[-1] == 0
    assert all(s >= 1 for s in sched[:-1])
    counts = [seq_len] + sched
    assert all(a > b for a, b in zip(counts, counts[1:])), "every step predicts at least one position"
    assert sum(a - b for a, b in zip(counts, counts[1:])) == seq_len
    assert [mask_schedule(s, num_iter, seq_len) for s in range(num_iter)] == sched
    # With a random order, step s predicts order[sched[s]:sched[s-1]]: the chunks tile the permutation.
    order = torch.randperm(seq_len, generator=torch.Generator().manual_seed(seq_len + num_iter))
    predicted = torch.cat([order[b:a] for a, b in zip(counts, counts[1:])])
    assert torch.equal(predicted.sort().values, torch.arange(seq_len))


def test_mask_schedule_follows_cosine():
    seq_len, num_iter = 256, 64
    sched = mask_schedule_list(num_iter, seq_len)
    cosine = [math.floor(seq_len * math.cos(math.pi / 2 * (s + 1) / num_iter)) for s in range(num_iter)]
    counts = [seq_len] + sched
    # Where the cosine target is flat (first steps) or would leave too few positions for the remaining steps
    # (last steps), the clamps take over; elsewhere the schedule is the cosine itself.
    for s in range(num_iter):
        assert sched[s] in (cosine[s], counts[s] - 1, num_iter - 1 - s)
    assert sum(a != b for a, b in zip(sched, cosine)) <= num_iter // 5


def test_mask_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_iter"):
        mask_schedule_list(65, 64)
    with pytest.raises(ValueError, match="num_iter"):
        mask_schedule_list(0, 64)
    with pytest.raises(ValueError, match="step"):
        mask_schedule(8, 8, 64)


def test_cfg_schedule():
    assert cfg_schedule(3.0, "linear", 1.0) == pytest.approx(1.0)
    assert cfg_schedule(3.0, "linear", 0.0) == pytest.approx(3.0)
    L, mask_len = 256, 64
    assert cfg_schedule(3.0, "linear", mask_len / L) == pytest.approx(1 + 2.0 * (L - mask_len) / L)
    assert cfg_schedule(3.0, "constant", 0.7) == 3.0
    with pytest.raises(ValueError, match="schedule"):
        cfg_schedule(3.0, "cosine", 0.5)
    with pytest.raises(ValueError, match="masked_fraction"):
        cfg_schedule(3.0, "linear", 1.5)


# ---------------------------------------------------------------------------------------------- patchify


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.long])
def test_patchify_roundtrip(p, dtype):
    x = torch.randint(0, 100, (3, 8, 4, 5)).to(dtype)
    t = patchify(x, p)
    assert t.shape == (3, (8 // p) * (4 // p), 5 * p * p)
    assert torch.equal(unpatchify(t, (8, 4), p), x)


def test_patchify_layout_is_channel_major_inside_a_patch():
    x = torch.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    t = patchify(x, 2)
    # Token 1 of sample 0 is the patch at rows 0-1, columns 2-3; value c*4 + i*2 + j is x[0, i, 2 + j, c].
    for c in range(3):
        for i in range(2):
            for j in range(2):
                assert t[0, 1, c * 4 + i * 2 + j] == x[0, i, 2 + j, c]


def test_patchify_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 5, 4, 2), 2)
    with pytest.raises(ValueError, match="unpatchify"):
        unpatchify(torch.zeros(1, 3, 8), (4, 4), 2)


# ---------------------------------------------------------------------------------------------- MAR


def test_mar_shapes_and_masked_values_are_invisible():
    torch.manual_seed(0)
    model = tiny_mar().eval()
    tokens = torch.randn(3, 16, 3)
    labels = torch.tensor([0, 4, 5])
    mask = random_masking(sample_orders(3, 16), 11)
    z = model(tokens, labels, mask)
    assert z.shape == (3, 16, 32)
    # The encoder never sees masked positions: changing their values changes nothing.
    noisy = torch.where(mask.unsqueeze(-1), torch.randn_like(tokens) * 10, tokens)
    assert torch.allclose(model(noisy, labels, mask), z, atol=1e-6)
    # Visible values do matter.
    changed = torch.where(mask.unsqueeze(-1), tokens, tokens + 1.0)
    assert not torch.allclose(model(changed, labels, mask), z, atol=1e-3)


def test_mar_rows_with_different_mask_counts_match_single_rows():
    torch.manual_seed(0)
    model = tiny_mar().eval()
    tokens = torch.randn(3, 16, 3)
    labels = torch.tensor([1, 2, 3])
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :16] = True  # everything masked: the encoder only has the buffer
    mask[1, 3:9] = True
    mask[2, ::3] = True
    z = model(tokens, labels, mask)
    for i in range(3):
        zi = model(tokens[i : i + 1], labels[i : i + 1], mask[i : i + 1])
        assert torch.allclose(z[i], zi[0], atol=1e-5)


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    model = tiny_mar(label_drop_prob=0.5)
    n = 400
    tokens = torch.randn(1, 16, 3).expand(n, 16, 3)
    mask = random_masking(sample_orders(1, 16), 10).expand(n, 16)
    model.eval()
    z_cond = model(tokens[:1], torch.tensor([2]), mask[:1])
    z_uncond = model(tokens[:1], torch.tensor([5]), mask[:1])
    assert not torch.allclose(z_cond, z_uncond, atol=1e-4)
    z_eval = model(tokens, torch.full((n,), 2), mask)
    assert torch.allclose(z_eval, z_cond.expand_as(z_eval), atol=1e-5)

    model.train()  # dropout is 0, so label dropout is the only randomness
    z_train = model(tokens, torch.full((n,), 2), mask)
    dropped = (z_train - z_uncond).abs().amax(dim=(1, 2)) < 1e-5
    kept = (z_train - z_cond).abs().amax(dim=(1, 2)) < 1e-5
    assert bool((dropped ^ kept).all())
    assert 0.4 < float(dropped.float().mean()) < 0.6


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = tiny_mar(label_drop_prob=0.0).train()
    ckpt = tiny_mar(label_drop_prob=0.0, grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    tokens = torch.randn(2, 16, 3)
    labels = torch.tensor([0, 1])
    mask = random_masking(sample_orders(2, 16), 12)
    for model in (plain, ckpt):
        model(tokens, labels, mask).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_mar_patch_size_sets_sequence_length():
    model = tiny_mar(grid_size=(8, 4), token_dim=12, patch_size=2)
    assert model.seq_len == 8
    x = torch.randn(2, 8, 4, 3)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 8, 12) and torch.equal(model.unpatchify(tokens), x)
    z = model(tokens, torch.tensor([0, 1]), torch.ones(2, 8, dtype=torch.bool))
    assert z.shape == (2, 8, 32)


def test_mar_input_validation():
    model = tiny_mar()
    tokens, labels, mask = torch.randn(2, 16, 3), torch.tensor([0, 1]), torch.ones(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randn(2, 15, 3), labels, mask)
    with pytest.raises(ValueError, match="floating"):
        model(tokens.long(), labels, mask)
    with pytest.raises(ValueError, match="labels"):
        model(tokens, torch.tensor([0, 6]), mask)
    with pytest.raises(ValueError, match="labels"):
        model(tokens, torch.tensor([0]), mask)
    with pytest.raises(ValueError, match="mask"):
        model(tokens, labels, mask.float())
    with pytest.raises(ValueError, match="divisible"):
        tiny_mar(grid_size=(5, 4), patch_size=2)
    with pytest.raises(ValueError, match="buffer_size"):
        tiny_mar(buffer_size=0)
