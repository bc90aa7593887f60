"""Replaying a masked-AR run: `sample(orders=...)` on every masked family (TokenBridge, MAR, D2C stage 2) equals a
fixed-order reference path built here from MAR's published sampling algorithm (cosine mask schedule, mask length
kept in [1, unknown - 1], the positions of a step taken in ascending order as `nonzero` yields them, linear cfg
1 + (cfg - 1)(L - mask_len)/L), and a default run is replayed by the orders its seed drew."""

from __future__ import annotations

import math

import pytest
import torch

from tokenbridge.backbone import sample_orders
from tokenbridge.generators import ContinuousMARGenerator, D2CGenerator, TokenBridgeGenerator

LABELS = torch.tensor([1, 4, 9])


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (the zero-initialised AdaLN layers would make every head output alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.15 * torch.randn(p.shape, generator=g))


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    mar = ContinuousMARGenerator.from_config({"preset": "tiny"}).eval()
    tb = TokenBridgeGenerator.from_config({"preset": "tiny"}).eval()
    d2c = D2CGenerator.from_config({"preset": "tiny"}).eval()
    for i, model in enumerate((mar, tb, d2c)):
        _randomize(model, i)
    return {"mar": mar, "tokenbridge": tb, "d2c": d2c}


MODELS = _models()


def reference_path(features, draw, to_tokens, token_dim: int, orders: torch.Tensor, num_iter: int, cfg: float,
                   dtype=torch.float32) -> torch.Tensor:
    """MAR's released sampling loop for given orders [N, L]: features(tokens [2N, L, D], mask [2N, L]) -> z;
    draw(z_cond [M, W], z_uncond [M, W], cfg_t) -> values [M, D], M the positions of the step in ascending order
    (row by row). Returns the values [N, L, D]."""
    n, length = orders.shape
    values = torch.zeros(n, length, token_dim, dtype=dtype)
    mask = torch.ones(n, length, dtype=torch.bool)
    for step in range(num_iter):
        unknown = int(mask[0].sum())
        mask_len = max(1, min(unknown - 1, math.floor(length * math.cos(math.pi / 2 * (step + 1) / num_iter))))
        next_mask = torch.zeros_like(mask).scatter(1, orders[:, :mask_len], True)
        to_predict = mask if step == num_iter - 1 else mask & ~next_mask
        tokens = to_tokens(values)
        z = features(torch.cat([tokens, tokens]), torch.cat([mask, mask]))
        rows = to_predict.nonzero(as_tuple=True)  # ascending: sample by sample, position by position
        cfg_t = 1 + (cfg - 1) * (length - mask_len) / length
        values[rows] = draw(z[:n][rows], z[n:][rows], cfg_t).to(dtype)
        mask = torch.zeros_like(mask) if step == num_iter - 1 else next_mask
    return values


def _setup(family: str):
    """(model, sample(**options) -> values [N, L, D], features, draw, to_tokens, token_dim, dtype) of a family."""
    model = MODELS[family]
    labels2 = torch.cat([LABELS, torch.full_like(LABELS, 10)])
    if family == "tokenbridge":
        def run(**options):
            return model.sample(LABELS, cfg_mix="z", **options)["indices"].reshape(len(LABELS), model.seq_len, -1)

        def features(tokens, mask):
            return model.backbone(tokens, labels2, mask)

        def draw(zc, zu, cfg_t, g):
            return model.head.sample(zu + cfg_t * (zc - zu), generator=g)[0]  # released: cfg on z
        return model, run, features, draw, model.indices_to_tokens, model.backbone.token_dim, torch.long
    if family == "mar":
        stage, codes = model, None
    else:
        stage, codes = model.stage2, torch.randint(0, model.codebook_size, (len(LABELS), *model.code_grid),
                                                   generator=torch.Generator().manual_seed(3))

    def run(**options):
        out = (model.sample(LABELS, num_sampling_steps=4, **options) if codes is None
               else model.sample_stage2(LABELS, codes, num_sampling_steps=4, **options))
        return out["latents"].permute(0, 2, 3, 1).reshape(len(LABELS), stage.seq_len, -1)

    def features(tokens, mask):
        if codes is None:
            return stage.backbone(tokens, labels2, mask)
        return stage.features(tokens, labels2, mask, torch.cat([codes, codes]))

    def draw(zc, zu, cfg_t, g):
        return stage.head.sample(torch.cat([zc, zu]), num_steps=4, cfg=cfg_t, generator=g)
    return stage, run, features, draw, (lambda v: v), stage.backbone.token_dim, torch.float32


@pytest.mark.parametrize("family", ["tokenbridge", "mar", "d2c"])
def test_sample_with_orders_follows_the_fixed_order_reference_path(family):
    stage, run, features, draw, to_tokens, token_dim, dtype = _setup(family)
    orders = sample_orders(len(LABELS), stage.seq_len, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        expected = reference_path(features, lambda zc, zu, cfg_t: draw(zc, zu, cfg_t, g), to_tokens, token_dim,
                                  orders, num_iter=4, cfg=3.0, dtype=dtype)
        released = {} if family == "tokenbridge" else {"released_cfg": True}  # cfg_mix "z" implies it
        got = run(num_iter=4, cfg=3.0, generator=7, orders=orders, sorted_positions=True, **released)
        # in generation order the same seed puts its randomness on other positions
        unsorted = run(num_iter=4, cfg=3.0, generator=7, orders=orders, **released)
    if dtype == torch.long:
        assert torch.equal(got, expected)
    else:
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert not torch.equal(unsorted.to(expected.dtype), expected)


@pytest.mark.parametrize("family", ["tokenbridge", "mar", "d2c"])
def test_a_seeded_run_is_replayed_by_the_orders_its_seed_drew(family):
    stage, run = _setup(family)[:2]
    default = run(num_iter=3, cfg=2.0, generator=5)
    g = torch.Generator().manual_seed(5)
    orders = sample_orders(len(LABELS), stage.seq_len, generator=g)  # the loop's first draw
    assert torch.equal(run(num_iter=3, cfg=2.0, generator=g, orders=orders), default)


@pytest.mark.parametrize("orders, message", [
    (torch.zeros(3, 64, dtype=torch.long), "permutation"), (torch.arange(64).expand(2, 64), r"shape \[N=3"),
    (torch.rand(3, 64), "integer tensor"),
])
def test_bad_orders_are_named(orders, message):
    for family in ("tokenbridge", "mar", "d2c"):
        with pytest.raises(ValueError, match=message):
            _setup(family)[1](num_iter=2, orders=orders)
    with pytest.raises(ValueError, match="order='random'"):
        MODELS["tokenbridge"].sample(LABELS, order="confidence", orders=torch.arange(64).expand(3, 64))
