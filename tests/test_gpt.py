"""RasterGPT (stage 1 of D2C): the KV-cached sampling path against the reference paths, causality, guidance and
filtering, label dropout, a tiny overfit and the input checks."""

from __future__ import annotations

import pytest
import torch

from tokenbridge.gpt import RasterGPT

V, L, K = 11, 6, 3  # vocabulary, sequence length, classes (label K = unconditional)


def tiny_gpt(dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs) -> RasterGPT:
    torch.manual_seed(seed)
    options = {"width": 32, "depth": 2, "num_heads": 4, "prefix_tokens": 2, **kwargs}
    return RasterGPT(V, L, K, **options).to(dtype).eval()


def random_batch(n: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, L), generator=g), torch.randint(0, K + 1, (n,), generator=g)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------------
# the cached path against the reference paths


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("prefix_tokens", [1, 3])
def test_cached_steps_equal_uncached_steps_and_forward(dtype, tol, prefix_tokens):
    model = tiny_gpt(dtype, prefix_tokens=prefix_tokens)
    codes, labels = random_batch()
    cached = model.incremental_logits(codes, labels, use_cache=True)
    uncached = model.incremental_logits(codes, labels, use_cache=False)
    with torch.no_grad():
        teacher = model(codes, labels)
    assert cached.shape == teacher.shape == (5, L, V) and cached.dtype == dtype
    torch.testing.assert_close(cached, uncached, rtol=0, atol=tol)
    torch.testing.assert_close(teacher, cached, rtol=0, atol=tol)


@pytest.mark.parametrize("cfg, schedule", [(1.0, "constant"), (3.0, "constant"), (2.5, "linear")])
def test_sample_with_cache_equals_sample_without(cfg, schedule):
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    opts = {"cfg": cfg, "cfg_schedule": schedule, "temperature": 1.5, "top_k": 8, "top_p": 0.95}
    fast = model.sample(labels, generator=seeded(7), use_cache=True, **opts)
    slow = model.sample(labels, generator=seeded(7), use_cache=False, **opts)
    assert fast.shape == (6, L) and fast.dtype == torch.int64
    assert int(fast.min()) >= 0 and int(fast.max()) < V
    assert torch.equal(fast, slow)


def test_sampling_is_deterministic_under_a_seed():
    model = tiny_gpt(torch.float32)
    labels = torch.arange(K + 1).repeat(3)
    first = model.sample(labels, generator=seeded(3), temperature=2.0)
    again = model.sample(labels, generator=seeded(3), temperature=2.0)
    other = model.sample(labels, generator=seeded(4), temperature=2.0)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)  # 72 near-uniform draws over 11 codes cannot all coincide


# ------------------------------------------------------------------------------------------------------------------
# causality, guidance and filtering


def test_logits_are_causal():
    model = tiny_gpt()
    codes, labels = random_batch()
    with torch.no_grad():
        before = model(codes, labels)
        for t in range(L - 1):  # the last code is never an input
            changed = codes.clone()
            changed[:, t] = (changed[:, t] + 1) % V
            after = model(changed, labels)
            torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-12)
            assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() > 1e-6
        # the label reaches every position
        other = model(codes, (labels + 1) % (K + 1))
        assert bool(((other - before).abs().amax(dim=(0, 2)) > 1e-6).all())


def guided_logits(model: RasterGPT, codes: torch.Tensor, labels: torch.Tensor, cfg: float, schedule: str):
    """u + s_t (c - u) for every position of given codes, from two teacher-forced passes."""
    with torch.no_grad():
        cond, uncond = model(codes, labels), model(codes, torch.full_like(labels, K))
    t = torch.arange(L, dtype=cond.dtype)
    scale = torch.full_like(t, cfg) if schedule == "constant" else 1 + (cfg - 1) * (t + 1) / L
    return uncond + scale[None, :, None] * (cond - uncond)


@pytest.mark.parametrize("cfg, schedule", [(1.0, "constant"), (1.0, "linear"), (4.0, "constant"),
                                           (4.0, "linear"), (0.0, "constant")])
def test_greedy_sampling_follows_the_guided_argmax(cfg, schedule):
    """top_k = 1 is greedy decoding: every sampled code is the argmax of the guided logits given the codes before
    it, whatever the seed (so this also checks the guidance formula and its schedule)."""
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    codes = model.sample(labels, generator=seeded(0), cfg=cfg, cfg_schedule=schedule, top_k=1)
    expected = guided_logits(model, codes, labels, cfg, schedule).argmax(-1)
    assert torch.equal(codes, expected)
    assert torch.equal(model.sample(labels, generator=seeded(9), cfg=cfg, cfg_schedule=schedule, top_k=1), codes)
    # a nucleus smaller than any single probability keeps only the top code, too
    assert torch.equal(model.sample(labels, cfg=cfg, cfg_schedule=schedule, top_p=1e-6), codes)


@pytest.mark.parametrize("cfg, schedule", [(1.0, "constant"), (3.0, "constant"), (3.0, "linear")])
def test_each_draw_uses_the_guided_tempered_distribution(cfg, schedule, monkeypatch):
    """The probabilities handed to torch.multinomial at step t are softmax(guided logits / temperature) of the
    codes drawn so far (float64, to rounding)."""
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2, 3])
    seen: list[torch.Tensor] = []
    draw = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.clone())
        return draw(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    codes = model.sample(labels, generator=seeded(2), cfg=cfg, cfg_schedule=schedule, temperature=0.7)
    expected = (guided_logits(model, codes, labels, cfg, schedule) / 0.7).softmax(-1)
    assert len(seen) == L
    torch.testing.assert_close(torch.stack(seen, dim=1), expected, rtol=0, atol=1e-12)


def test_guidance_doubles_the_batch_only_when_cfg_is_not_one():
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2])
    seen: list[int] = []
    hook = model.class_emb.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    try:
        plain = model.sample(labels, generator=seeded(5))
        assert set(seen) == {3}
        seen.clear()
        for schedule in ("constant", "linear"):
            assert torch.equal(model.sample(labels, generator=seeded(5), cfg=1.0, cfg_schedule=schedule), plain)
        assert set(seen) == {3}
        seen.clear()
        guided = model.sample(labels, generator=seeded(5), cfg=5.0)
        assert set(seen) == {6} and guided.shape == plain.shape
    finally:
        hook.remove()


# ------------------------------------------------------------------------------------------------------------------
# training


def test_loss_falls_on_a_tiny_overfit_set():
    model = tiny_gpt(torch.float32, class_dropout=0.0).train()
    codes, labels = random_batch(n=4, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = float(model.loss(codes, labels).detach())
    assert abs(start - torch.log(torch.tensor(float(V)))) < 0.3  # GPT-2 init: near-uniform predictions
    for _ in range(100):
        opt.zero_grad()
        loss = model.loss(codes, labels)
        loss.backward()
        opt.step()
    assert float(model.loss(codes, labels).detach()) < 0.5 * start


def test_label_dropout_only_in_training_mode():
    model = tiny_gpt(class_dropout=0.5)
    codes, labels = random_batch(n=16)
    labels = labels.clamp(max=K - 1)  # all conditional, so a dropped label shows
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(model(codes, labels).reshape(-1, V), codes.reshape(-1))
        torch.manual_seed(11)
        state = torch.get_rng_state()
        assert torch.equal(model.loss(codes, labels), plain)  # eval: no dropout ...
        assert torch.equal(torch.get_rng_state(), state)  # ... and no draw from the global RNG

        model.train()
        torch.manual_seed(11)
        drop = torch.rand(16) < 0.5
        dropped = labels.masked_fill(drop, K)
        expected = torch.nn.functional.cross_entropy(model(codes, dropped).reshape(-1, V), codes.reshape(-1))
        assert 0 < int(drop.sum()) < 16
        torch.manual_seed(11)
        torch.testing.assert_close(model.loss(codes, labels), expected, rtol=0, atol=1e-12)
        assert float((expected - plain).abs()) > 1e-6


# ------------------------------------------------------------------------------------------------------------------
# input checks


@pytest.mark.parametrize("codes, labels, match", [
    (torch.zeros(2, L, dtype=torch.long), torch.tensor([0, K + 1]), "labels"),
    (torch.zeros(2, L, dtype=torch.long), torch.tensor([-1, 0]), "labels"),
    (torch.zeros(2, L, dtype=torch.long), torch.tensor([0.0, 1.0]), "labels"),
    (torch.full((2, L), V), torch.tensor([0, 1]), "codes"),
    (torch.full((2, L), -1), torch.tensor([0, 1]), "codes"),
    (torch.zeros(2, L + 1, dtype=torch.long), torch.tensor([0, 1]), "codes"),
    (torch.zeros(3, L, dtype=torch.long), torch.tensor([0, 1]), "codes"),
    (torch.zeros(2, L), torch.tensor([0, 1]), "codes"),
])
def test_bad_codes_and_labels_raise(codes, labels, match):
    model = tiny_gpt()
    for call in (model, model.loss, model.incremental_logits):
        with pytest.raises(ValueError, match=match):
            call(codes, labels)


def test_temperature_zero_is_greedy_as_in_the_heads():
    """The toolbox's one temperature contract: 0 = the argmax at every step (top_k=1 draws it too), whatever the
    seed; the option's range is checked at the family's sample() (tests/generators/test_family_contract.py)."""
    model, labels = tiny_gpt(), torch.tensor([0, 1, K])
    greedy = model.sample(labels, generator=seeded(1), temperature=0.0, cfg=2.0)
    assert torch.equal(greedy, model.sample(labels, generator=seeded(2), temperature=0.0, cfg=2.0))
    assert torch.equal(greedy, model.sample(labels, generator=seeded(3), top_k=1, cfg=2.0))
    with pytest.raises(ValueError, match="labels"):
        model.sample(torch.tensor([[0, 1]]))


@pytest.mark.parametrize("kwargs, match", [
    ({"num_heads": 5}, "num_heads"), ({"depth": 0}, "depth"), ({"class_dropout": 1.0}, "class_dropout"),
    ({"prefix_tokens": 0}, "prefix_tokens"),
])
def test_bad_sizes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RasterGPT(V, L, K, **{"width": 32, **kwargs})
