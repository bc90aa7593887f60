"""Tests for the TokenBridge generator family (tokenbridge.generators.tokenbridge)."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from tokenbridge.config import ConfigError
from tokenbridge.generators.tokenbridge import (
    TokenBridgeGenerator,
    expand_channel_order,
)
from tokenbridge.quantizer import DimensionwiseQuantizer
from tokenbridge.sampling import mask_schedule_list


TINY = {
    "grid_size": [4, 4],
    "channels": 2,
    "num_classes": 3,
    "quantizer": {"levels": 8},
    "backbone": {"width": 32, "encoder_depth": 1, "decoder_depth": 1, "num_heads": 2, "buffer_size": 4},
    "head": {"kind": "ar", "width": 32, "depth": 1, "num_heads": 2},
}


def tiny(seed: int = 0, **overrides) -> TokenBridgeGenerator:
    cfg = copy.deepcopy(TINY)
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    torch.manual_seed(seed)
    return TokenBridgeGenerator.from_config(cfg)


def random_batch(n: int = 4, levels: int = 8, grid=(4, 4), channels: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, levels, (n, *grid, channels), generator=g)
    return idx, torch.arange(n) % 3


# ---------------------------------------------------------------------------------------------- training


def test_forward_returns_finite_loss_near_uniform_at_init():
    model = tiny()
    idx, labels = random_batch()
    loss = model(idx, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert abs(float(loss.detach()) - torch.log(torch.tensor(8.0)).item()) < 1.0
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    # Cached token files store indices as uint8 / int16.
    assert torch.isfinite(model(idx.to(torch.uint8), labels)) and torch.isfinite(model(idx.to(torch.int16), labels))


def test_loss_is_taken_on_masked_positions_only():
    model = tiny()
    idx, labels = random_batch()
    seen = {}
    original = model.head.loss

    def spy(z, targets):
        seen["rows"], seen["targets"] = z.shape[0], targets
        return original(z, targets)

    model.head.loss = spy
    model(idx, labels, mask_ratio=0.5)
    assert seen["rows"] == 4 * 8  # ceil(16 * 0.5) masked positions per sample
    assert seen["targets"].shape == (32, 2)
    # No mask ratio given: drawn from [0.7, 1] -> between ceil(16 * 0.7) = 12 and 16 positions per sample.
    model(idx, labels)
    assert 4 * 12 <= seen["rows"] <= 4 * 16


def test_tiny_model_overfits_a_tiny_batch():
    model = tiny(backbone={"label_drop_prob": 0.0})
    idx, _ = random_batch(n=3)
    labels = torch.tensor([0, 1, 2])  # distinct labels identify the samples
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(150):
        loss = model(idx, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    model.eval()
    with torch.no_grad():
        final = sum(float(model(idx, labels)) for _ in range(5)) / 5
    assert first > 1.8  # ~ln(8) = 2.08 at init
    assert final < 0.3, f"loss {final:.3f} did not fall below 0.3 in 150 steps"


# ---------------------------------------------------------------------------------------------- sampling


def test_sample_outputs_shapes_ranges_and_latents():
    model = tiny()
    out = model.sample(torch.tensor([0, 1, 2, 3]), num_iter=5, cfg=2.0, generator=0)
    assert out["indices"].shape == (4, 4, 4, 2) and out["indices"].dtype == torch.long
    assert out["indices"].min() >= 0 and out["indices"].max() < 8
    assert out["latents"].shape == (4, 2, 4, 4)
    expected = model.quantizer.dequantize(out["indices"]).permute(0, 3, 1, 2)
    assert torch.equal(out["latents"], expected)
    assert out["confidence"].shape == (4, 4, 4) and (out["confidence"] <= 0).all()
    assert (out["confidence"] < 0).all()  # every position was sampled (log-prob of a sampled token < 0 here)


def test_sampling_is_deterministic_under_a_seed():
    model = tiny()
    labels = torch.tensor([0, 1, 2])
    for order in ("random", "confidence"):
        a = model.sample(labels, num_iter=4, cfg=1.5, order=order, generator=7)
        b = model.sample(labels, num_iter=4, cfg=1.5, order=order, generator=torch.Generator().manual_seed(7))
        c = model.sample(labels, num_iter=4, cfg=1.5, order=order, generator=8)
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["confidence"], b["confidence"])
        assert not torch.equal(a["indices"], c["indices"])


def test_cfg_one_equals_no_cfg_and_skips_unconditional_half():
    model = tiny()
    labels = torch.tensor([0, 2])
    batch_sizes = []
    hook = model.backbone.register_forward_hook(lambda mod, inp, out: batch_sizes.append(inp[0].shape[0]))
    plain = model.sample(labels, num_iter=4, cfg=None, generator=3)
    one = model.sample(labels, num_iter=4, cfg=1.0, generator=3)
    assert set(batch_sizes) == {2}
    batch_sizes.clear()
    guided = model.sample(labels, num_iter=4, cfg=4.0, generator=3)
    assert set(batch_sizes) == {4}  # conditional and unconditional rows in one pass
    hook.remove()
    assert torch.equal(plain["indices"], one["indices"]) and torch.equal(plain["confidence"], one["confidence"])
    assert guided["indices"].shape == plain["indices"].shape


def test_cfg_rows_are_conditional_then_unconditional_with_scheduled_scale():
    model = tiny()
    labels = torch.tensor([1, 2])
    seen_labels, scales = [], []
    hook = model.backbone.register_forward_hook(lambda mod, inp, out: seen_labels.append(inp[1].tolist()))
    original = model.head.sample

    def spy(z, **kwargs):
        scales.append(kwargs["cfg"])
        return original(z, **kwargs)

    model.head.sample = spy
    model.sample(labels, num_iter=4, cfg=3.0, cfg_schedule="linear", generator=0)
    hook.remove()
    assert all(row == [1, 2, 3, 3] for row in seen_labels)
    sched = mask_schedule_list(4, 16)
    assert scales == pytest.approx([1 + 2.0 * (16 - m) / 16 for m in sched])
    assert scales[-1] == pytest.approx(3.0)


class _ScoreHead(nn.Module):
    """Stub head: token indices 0, log-prob = z[:, 0] (so the confidence of a position is known)."""

    def sample(self, z, temperature=1.0, top_k=0, top_p=1.0, cfg=None, generator=None):
        n = z.shape[0] if cfg is None else z.shape[0] // 2
        return torch.zeros(n, 2, dtype=torch.long), z[:n, 0].clone()


def test_confidence_order_keeps_the_most_confident_positions():
    model = tiny()
    model.head = _ScoreHead()
    n, seq_len, num_iter = 3, 16, 5
    scores = -torch.rand(n, seq_len, generator=torch.Generator().manual_seed(0))
    masks = []

    def fake_z(mod, inp, out):
        masks.append(inp[2].clone())
        z = torch.zeros_like(out)
        z[..., 0] = scores
        return z

    model.backbone.register_forward_hook(fake_z)
    out = model.sample(torch.tensor([0, 1, 2]), num_iter=num_iter, order="confidence", generator=0)
    rank = scores.argsort(dim=1, descending=True)
    sched = mask_schedule_list(num_iter, seq_len)
    for step in range(1, num_iter):
        unmasked = seq_len - sched[step - 1]
        assert masks[step].sum(1).tolist() == [sched[step - 1]] * n
        for i in range(n):
            # After step s-1 exactly the `unmasked` highest-scoring positions are known.
            assert set(torch.nonzero(~masks[step][i]).flatten().tolist()) == set(rank[i, :unmasked].tolist())
    assert torch.allclose(out["confidence"].reshape(n, seq_len), scores)


def test_random_order_unmasks_on_the_cosine_schedule():
    model = tiny()
    masks = []
    model.backbone.register_forward_hook(lambda mod, inp, out: masks.append(inp[2].clone()))
    model.sample(torch.tensor([0, 1]), num_iter=6, generator=0)
    sched = mask_schedule_list(6, 16)
    assert [m.sum(1).tolist() for m in masks] == [[c, c] for c in [16] + sched[:-1]]
    for prev, cur in zip(masks, masks[1:]):
        assert not (cur & ~prev).any()  # a predicted position is never masked again
    assert not torch.equal(masks[1][0], masks[1][1])  # per-sample random orders


def test_num_iter_is_capped_at_sequence_length_and_mode_is_restored():
    model = tiny().train()
    calls = []
    model.backbone.register_forward_hook(lambda mod, inp, out: calls.append(mod.training))
    out = model.sample(torch.tensor([0]), num_iter=100, generator=0)
    assert len(calls) == 16 and not any(calls)
    assert model.training
    assert out["indices"].shape == (1, 4, 4, 2)


def test_patch_size_two():
    model = tiny(grid_size=[4, 4], channels=2, backbone={"patch_size": 2}, head={"order": [1, 0]})
    assert model.seq_len == 4 and model.backbone.token_dim == 8
    assert model.head.order.tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    idx, labels = random_batch()
    assert torch.isfinite(model(idx, labels))
    out = model.sample(torch.tensor([0, 1]), num_iter=4, generator=0)
    assert out["indices"].shape == (2, 4, 4, 2) and out["latents"].shape == (2, 2, 4, 4)
    conf = out["confidence"]
    assert torch.equal(conf[:, 0::2, 0::2], conf[:, 1::2, 1::2])  # one value per 2x2 patch


@pytest.mark.parametrize("head", [{"kind": "parallel", "width": 32, "depth": 1},
                                  {"kind": "grouped", "group_size": 2, "width": 32, "depth": 1, "num_heads": 2}])
def test_other_head_kinds(head):
    model = TokenBridgeGenerator.from_config({**TINY, "head": head})
    idx, labels = random_batch()
    assert torch.isfinite(model(idx, labels))
    out = model.sample(torch.tensor([0, 1]), num_iter=3, cfg=2.0, generator=0)
    assert out["indices"].shape == (2, 4, 4, 2)


# ---------------------------------------------------------------------------------------------- config


def test_config_roundtrip_rebuilds_the_same_model():
    model = tiny(head={"order": [1, 0]})
    cfg = model.config
    json.dumps(cfg)  # plain data, storable next to the weights
    rebuilt = TokenBridgeGenerator.from_config(json.loads(json.dumps(cfg)))
    rebuilt.load_state_dict(model.state_dict())
    idx, labels = random_batch()
    torch.manual_seed(5)
    a = model(idx, labels)
    torch.manual_seed(5)
    b = rebuilt.loss((idx, labels))
    assert torch.equal(a, b)
    assert torch.equal(
        model.sample(labels, num_iter=3, generator=1)["indices"],
        rebuilt.sample(labels, num_iter=3, generator=1)["indices"],
    )


def test_generator_with_a_fitted_quantizer():
    q = DimensionwiseQuantizer(levels=8, calibration="standardize").fit(torch.randn(1000, 2) * 2 + 1)
    model = TokenBridgeGenerator(TINY, quantizer=q)
    assert model.quantizer is q
    rebuilt = TokenBridgeGenerator.from_config({**TINY, "quantizer": q.config()})
    rebuilt.load_state_dict(model.state_dict())  # the fitted per-channel buffers load into a fresh quantizer
    idx, _ = random_batch()
    assert torch.equal(rebuilt.quantizer.dequantize(idx), q.dequantize(idx))


def test_presets_build_and_hold_the_sizes():
    model = TokenBridgeGenerator.from_config({"preset": "fmnist"})
    assert model.grid_size == (8, 8) and model.channels == 4 and model.levels == 64 and model.num_classes == 10
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 10e6
    assert model.config["backbone"]["width"] == 192 and model.config["head"]["width"] == 64
    # keys beside the preset win; the rest are the constructors' defaults (MAR's buffer of 64, B = 64)
    wide = TokenBridgeGenerator.resolve_config({"preset": "fmnist", "backbone": {"width": 256}})
    assert wide["backbone"]["width"] == 256 and wide["backbone"]["encoder_depth"] == 3
    assert TokenBridgeGenerator.resolve_config({"preset": "tokenbridge-l"})["backbone"]["buffer_size"] == 64
    quantizer = DimensionwiseQuantizer()  # its tables are computed, so it is built outside the meta device
    with torch.device("meta"):  # paper sizes, without allocating them
        large = TokenBridgeGenerator({"preset": "tokenbridge-l"}, quantizer)
    backbone_m = sum(p.numel() for p in large.backbone.parameters()) / 1e6
    head_m = sum(p.numel() for p in large.head.parameters()) / 1e6
    assert 400 < backbone_m < 420 and 64 < head_m < 66  # MAR-L backbone; the paper's 65M 1024 x 4 head


def test_flat_legacy_config_still_loads():
    legacy = {"grid_size": [4, 4], "channels": 2, "num_classes": 3, "levels": 8, "value_range": [-4.0, 4.0],
              "quantizer_kind": "uniform", "quantizer_tails": "paper", "quantizer_calibration": "none",
              "mask_ratio_min": 0.7, "backbone": TINY["backbone"],
              "head": {"kind": "ar", "width": 32, "depth": 1, "num_heads": 2, "group_size": None, "order": [1, 0]}}
    cfg = TokenBridgeGenerator.resolve_config(legacy)
    assert cfg["quantizer"]["levels"] == 8 and cfg["quantizer"]["kind"] == "uniform"
    assert cfg["quantizer"]["value_range"] == [-4.0, 4.0] and "group_size" not in cfg["head"]


def test_expand_channel_order():
    assert expand_channel_order(None, 4, 1) is None
    assert expand_channel_order([2, 0, 1], 3, 1) == [2, 0, 1]
    assert expand_channel_order([1, 0], 2, 2) == [4, 5, 6, 7, 0, 1, 2, 3]
    assert expand_channel_order(list(range(8))[::-1], 2, 2) == list(range(8))[::-1]
    with pytest.raises(ValueError, match="permutation"):
        expand_channel_order([0, 0], 2, 1)


def test_config_errors():
    with pytest.raises(ConfigError, match="'model.head.kind' = 'diffusion'"):
        TokenBridgeGenerator.from_config({**TINY, "head": {"kind": "diffusion"}})
    with pytest.raises(ConfigError, match="model.grid_size"):
        TokenBridgeGenerator.from_config({**TINY, "grid_size": [4, 0]})
    with pytest.raises(ConfigError, match="needs the training tokens"):
        TokenBridgeGenerator.from_config({**TINY, "head": {"order": "frequency"}})


# ---------------------------------------------------------------------------------------------- input validation


def test_input_validation():
    model = tiny()
    idx, labels = random_batch()
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        model(idx.clone().fill_(8), labels)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        model(idx - 1, labels)
    with pytest.raises(ValueError, match="labels"):
        model(idx, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="labels"):
        model(idx, labels.float())
    with pytest.raises(ValueError, match="generator"):
        model.sample(torch.tensor([0]), generator="seed")
