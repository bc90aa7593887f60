import math

import pytest
import torch

import tokenbridge.heads as heads
import tokenbridge.layers as layers
import tokenbridge.samplers as samplers
from tokenbridge.diffusion import DiffusionHead, DiffusionSchedule
from tokenbridge.heads import DimensionwiseARHead, GroupedHead, ParallelHead, build_head

Z_DIM, C, LEVELS = 16, 6, 10
ORDER = [3, 1, 5, 0, 2, 4]


def _randomise(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Trained heads have non-zero AdaLN modulation; the zero init would make every block the identity."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module.eval()


def _ar(order=ORDER, **kw) -> DimensionwiseARHead:
    torch.manual_seed(0)
    return _randomise(DimensionwiseARHead(Z_DIM, C, LEVELS, width=32, depth=2, num_heads=4, order=order, **kw))


def _grouped(group_size=2) -> GroupedHead:
    torch.manual_seed(0)
    return _randomise(GroupedHead(Z_DIM, C, 4, group_size=group_size, width=32, depth=2, num_heads=4, order=ORDER))


def _z(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, Z_DIM, generator=torch.Generator().manual_seed(seed))


def _sample(head, z, seed=0, **kw):
    return head.sample(z, generator=torch.Generator().manual_seed(seed), **kw)


def _record_step_logits(monkeypatch, head, z, **kw):
    """Sample while recording the logits handed to the sampler at every step: [N, S, vocab]."""
    seen = []
    pick = samplers.pick

    def recording_pick(logits, *args):
        seen.append(logits.clone())
        return pick(logits, *args)

    monkeypatch.setattr(samplers, "pick", recording_pick)
    indices, log_prob = _sample(head, z, **kw)
    monkeypatch.setattr(samplers, "pick", pick)
    return indices, log_prob, torch.stack(seen, 1)


# ---------------------------------------------------------------------------------------------------------------
# KV cache and teacher forcing


@pytest.mark.parametrize("make", [_ar, _grouped], ids=["ar", "grouped"])
@pytest.mark.parametrize("kw", [{}, {"top_k": 3, "top_p": 0.8, "temperature": 1.3}, {"cfg": 2.5}])
def test_cached_and_uncached_sampling_agree(make, kw):
    head, n = make(), 9
    z = _z(2 * n) if "cfg" in kw else _z(n)
    a, la = _sample(head, z, use_cache=True, **kw)
    b, lb = _sample(head, z, use_cache=False, **kw)
    assert a.shape == (n, C) and a.dtype == torch.long and la.shape == (n,)
    assert torch.equal(a, b)
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [_ar, _grouped], ids=["ar", "grouped"])
@pytest.mark.parametrize("precompute_rows", [0, 10**6], ids=["per-step-modulation", "precomputed-modulation"])
def test_teacher_forced_logits_equal_incremental(monkeypatch, make, precompute_rows):
    head = make()
    head.precompute_max_rows = precompute_rows
    z = _z(7)
    indices, log_prob, incremental = _record_step_logits(monkeypatch, head, z)
    with torch.no_grad():
        teacher = head.step_logits(z, indices)
    torch.testing.assert_close(incremental, teacher, atol=1e-5, rtol=1e-5)
    # log_prob (temperature 1, no filtering) is the model's log-likelihood of the sample
    nll = head.loss(z, indices, reduction="none") * C
    torch.testing.assert_close(log_prob, -nll, atol=1e-4, rtol=1e-4)


def test_forward_is_natural_order_and_causal_in_prediction_order():
    head = _ar(order=ORDER)
    z, idx = _z(5), torch.randint(0, LEVELS, (5, C), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = head(z, idx)
        assert base.shape == (5, C, LEVELS)
        last, first = ORDER[-1], ORDER[0]
        changed = idx.clone()
        changed[:, last] = (changed[:, last] + 1) % LEVELS  # predicted last: nothing depends on it
        torch.testing.assert_close(head(z, changed), base)
        changed = idx.clone()
        changed[:, first] = (changed[:, first] + 1) % LEVELS  # predicted first: only its own logits stay
        out = head(z, changed)
        torch.testing.assert_close(out[:, first], base[:, first])
        assert not torch.allclose(out[:, ORDER[1]], base[:, ORDER[1]])
        # natural-order logits are the step logits permuted back
        torch.testing.assert_close(base[:, ORDER], head.step_logits(z, idx))


@pytest.mark.parametrize("order", [None, ORDER, list(reversed(range(C)))], ids=["natural", "freq-like", "reversed"])
def test_order_round_trips(order):
    head = _ar(order=order)
    z = _z(6)
    idx, lp = _sample(head, z, temperature=0.0)
    assert idx.min() >= 0 and idx.max() < LEVELS
    with torch.no_grad():  # greedy sample = per-channel argmax of teacher-forced logits, in natural order
        logits = head(z, idx)
    assert torch.equal(logits.argmax(-1), idx)
    torch.testing.assert_close(lp, logits.log_softmax(-1).gather(-1, idx[..., None]).sum((1, 2)))
    g = _grouped(group_size=3)
    q = torch.randint(0, 4, (6, C))
    assert torch.equal(g._decode(g._encode(q)), q)


def test_reversed_order_head_is_a_permuted_natural_head():
    """The order only relabels channels: a reversed-order head equals a natural one on reversed channels."""
    rev = list(reversed(range(C)))
    a, b = _ar(order=None), _ar(order=rev)
    b.load_state_dict(a.state_dict() | {"order": b.order, "inverse": b.inverse})
    z, idx = _z(4), torch.randint(0, LEVELS, (4, C))
    with torch.no_grad():
        torch.testing.assert_close(b(z, idx), a(z, idx.flip(1)).flip(1))
    ia, la = _sample(a, z)
    ib, lb = _sample(b, z)
    assert torch.equal(ib, ia.flip(1))
    torch.testing.assert_close(la, lb)


# ---------------------------------------------------------------------------------------------------------------
# guidance, temperature, filtering


@pytest.mark.parametrize("make", [_ar, _grouped, lambda: _randomise(ParallelHead(Z_DIM, C, LEVELS, width=32))],
                         ids=["ar", "grouped", "parallel"])
def test_cfg_one_equals_conditional_sampling(make):
    head, n = make(), 8
    z_c, z_u = _z(n, 1), _z(n, 2)
    a, la = _sample(head, z_c)
    b, lb = _sample(head, torch.cat([z_c, z_u]), cfg=1.0)
    assert torch.equal(a, b)
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)


def test_cfg_guides_every_step_with_per_row_scale(monkeypatch):
    head, n = _ar(), 5
    z = torch.cat([_z(n, 1), _z(n, 2)])
    scale = torch.tensor([0.0, 1.0, 2.0, 3.5, 5.0])
    idx, _, seen = _record_step_logits(monkeypatch, head, z, cfg=scale, temperature=0.0)
    with torch.no_grad():
        l_c, l_u = head.step_logits(z[:n], idx), head.step_logits(z[n:], idx)
    torch.testing.assert_close(seen, l_u + scale[:, None, None] * (l_c - l_u), atol=1e-4, rtol=1e-4)
    assert torch.equal(seen.argmax(-1), idx[:, ORDER])  # greedy on the guided logits, steps in prediction order


def test_greedy_is_deterministic_and_top_k_one_is_greedy():
    head, z = _ar(), _z(10)
    a, la = _sample(head, z, seed=0, temperature=0.0)
    b, lb = _sample(head, z, seed=123, temperature=0.0)
    c, _ = _sample(head, z, seed=7, top_k=1)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(la, lb) and (la <= 0).all()
    s1, _ = _sample(head, z, seed=5)
    s2, _ = _sample(head, z, seed=5)
    s3, _ = _sample(head, z, seed=6)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(samplers.filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(samplers.filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(samplers.filter_logits(logits, 0, 0.1)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(samplers.filter_logits(logits, 0, 1.0)).any()


# ---------------------------------------------------------------------------------------------------------------
# training on a task where channel 1 = f(channel 0) and channel 0 is independent of z


def _train(head, steps=80, batch=256, lr=3e-3):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    head.train()
    for _ in range(steps):
        z = torch.randn(batch, 8, generator=g)
        c0 = torch.randint(0, 8, (batch,), generator=g)
        loss = head.loss(z, torch.stack([c0, (3 * c0 + 1) % 8], 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    z = torch.randn(2048, 8, generator=g)
    c0 = torch.randint(0, 8, (2048,), generator=g)
    with torch.no_grad():
        return head.loss(z, torch.stack([c0, (3 * c0 + 1) % 8], 1)).item()


def test_autoregressive_heads_learn_the_channel_dependency_parallel_cannot():
    floor, independent = math.log(8) / 2, math.log(8)  # nats per channel: optimum / best without dependency
    torch.manual_seed(0)
    ar = _train(DimensionwiseARHead(8, 2, 8, width=32, depth=1, num_heads=2))
    grouped = _train(GroupedHead(8, 2, 8, group_size=2, width=32, depth=1, num_heads=2))
    parallel = _train(ParallelHead(8, 2, 8, width=32, depth=1))
    assert ar < floor + 0.05, ar
    assert grouped < floor + 0.05, grouped
    assert parallel > independent - 0.1, parallel
    assert ar < parallel - 0.8


def test_grouped_parameter_count_grows_with_group_size():
    counts = [
        sum(p.numel() for p in GroupedHead(64, 4, 16, group_size=g, width=256, depth=3).parameters())
        for g in (1, 2, 4)
    ]
    # the numbers quoted in the GroupedHead docstring; g = 4 = C has one step, so no class embedding table
    assert counts == [2_958_912, 3_126_272, 19_771_392]
    ar = DimensionwiseARHead(64, 4, 16, width=256, depth=3)
    assert sum(p.numel() for p in ar.parameters()) == counts[0]


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_fused_loss_equals_the_plain_loss_and_gradients(monkeypatch, group_size):
    torch.manual_seed(group_size)
    head = GroupedHead(12, 4, 6, group_size=group_size, width=16, depth=1, num_heads=2, order=[2, 0, 3, 1])
    with torch.no_grad():  # non-zero output weights, so that every gradient is exercised
        head.out_w.normal_(0, 0.3)
        head.out_b.normal_(0, 0.3)
    z, indices = torch.randn(37, 12), torch.randint(0, 6, (37, 4))
    results = []
    for min_vocab in (10**9, 1):  # plain, then fused (in chunks of a few rows)
        monkeypatch.setattr(GroupedHead, "fused_loss_min_vocab", min_vocab)
        monkeypatch.setattr(layers.LinearCrossEntropy, "chunk_elements", 5 * head.vocab)
        head.zero_grad()
        loss = head.loss(z, indices)
        (3.0 * loss).backward()  # a non-unit upstream gradient
        results.append((loss.detach(), {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain)
    assert plain_grads.keys() == fused_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], msg=name)


def test_paper_head_size():
    head = DimensionwiseARHead(1024, 16, 64, width=1024, depth=4, num_heads=8)
    assert round(sum(p.numel() for p in head.parameters()) / 1e6) == 65  # paper Table 2e: 1024 x 4 -> 65M


# ---------------------------------------------------------------------------------------------------------------
# diffusion head


def test_diffusion_head_samples_and_learns():
    torch.manual_seed(0)
    head = DiffusionHead(Z_DIM, 4, width=64, depth=2, train_steps=1000)
    w = torch.randn(Z_DIM, 4) / 4
    g = torch.Generator().manual_seed(0)
    z_eval = torch.randn(512, Z_DIM, generator=g)

    def eval_loss():
        with torch.no_grad():
            return head.loss(z_eval, z_eval @ w, generator=torch.Generator().manual_seed(1)).item()

    before = eval_loss()
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    for _ in range(150):
        z = torch.randn(256, Z_DIM, generator=g)
        loss = head.loss(z, z @ w, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)

    head.eval()
    x = head.sample(z_eval[:6], num_steps=25, generator=torch.Generator().manual_seed(0))
    y = head.sample(z_eval[:6], num_steps=25, generator=torch.Generator().manual_seed(0))
    assert x.shape == (6, 4) and torch.isfinite(x).all() and torch.equal(x, y)
    guided = head.sample(torch.cat([z_eval[:6], torch.zeros(6, Z_DIM)]), num_steps=10, cfg=3.0)
    assert guided.shape == (6, 4) and torch.isfinite(guided).all()
    same = head.sample(torch.cat([z_eval[:6], torch.zeros(6, Z_DIM)]), num_steps=25, cfg=1.0,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, x, atol=1e-4, rtol=1e-4)


def test_diffusion_respacing():
    s = DiffusionSchedule.cosine(1000)
    r = s.respaced(100)
    assert r.timesteps[0] == 0 and r.timesteps[-1] == 999 and len(r.timesteps) == 100
    torch.testing.assert_close(r.sqrt_ac[-1], s.sqrt_ac[-1])
    assert (r.betas > 0).all() and (r.betas < 1).all()
    with pytest.raises(ValueError, match="num_steps"):
        s.respaced(0)


def test_diffusion_schedule_model_posterior_with_true_noise_is_the_true_posterior():
    s = DiffusionSchedule.cosine(50).respaced(20)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    i = torch.tensor([0, 3, 7, 12, 19])
    x = s.q_sample(x0, i, noise)
    mean, logvar = s.p_mean_logvar(x, i, noise, -torch.ones_like(x))  # v = -1: the posterior's variance
    true_mean, true_logvar = s.q_posterior(x0, x, i)
    torch.testing.assert_close(mean, true_mean)
    torch.testing.assert_close(logvar, true_logvar.expand_as(logvar))
    assert len(s) == 20


# ---------------------------------------------------------------------------------------------------------------
# interface and errors


def test_build_head_kinds():
    assert isinstance(build_head("ar", z_dim=8, num_channels=4, levels=8, width=16, depth=1), DimensionwiseARHead)
    assert isinstance(build_head("parallel", z_dim=8, num_channels=4, levels=8), ParallelHead)
    assert isinstance(build_head("grouped", z_dim=8, num_channels=4, levels=8, group_size=2), GroupedHead)
    assert isinstance(build_head("diffusion", z_dim=8, token_dim=4, width=16), DiffusionHead)
    with pytest.raises(ValueError, match="unknown head kind"):
        build_head("vq")


def test_training_mode_with_dropout_backprops():
    head = DimensionwiseARHead(Z_DIM, C, LEVELS, width=32, depth=2, dropout=0.1, attn_dropout=0.1).train()
    loss = head.loss(_z(4), torch.randint(0, LEVELS, (4, C)))
    loss.backward()
    assert torch.isfinite(loss) and head.out_w.grad is not None


def test_bad_inputs_raise_value_errors():
    head, z, idx = _ar(), _z(3), torch.randint(0, LEVELS, (3, C))
    with pytest.raises(ValueError, match="z must have shape"):
        head(torch.randn(3, Z_DIM + 1), idx)
    with pytest.raises(ValueError, match="z must have shape"):
        head.sample(torch.randn(3, 2, Z_DIM))
    with pytest.raises(ValueError, match=r"levels=10\)"):
        head(z, idx + LEVELS)
    with pytest.raises(ValueError, match=r"levels=10\)"):
        head.loss(z, idx - LEVELS)
    with pytest.raises(ValueError, match="num_channels=6"):
        head(z, idx[:, :4])
    with pytest.raises(ValueError, match="N=3"):
        head(z, torch.randint(0, LEVELS, (4, C)))
    with pytest.raises(ValueError, match="integer"):
        head(z, idx.float())
    with pytest.raises(ValueError, match="cfg"):
        head.sample(_z(5), cfg=2.0)
    with pytest.raises(ValueError, match="cfg must be"):
        head.sample(_z(6), cfg=torch.ones(4))
    with pytest.raises(ValueError, match="permutation"):
        DimensionwiseARHead(Z_DIM, C, LEVELS, order=[0, 0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="divisible by group_size"):
        GroupedHead(Z_DIM, C, LEVELS, group_size=4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DimensionwiseARHead(Z_DIM, C, LEVELS, width=30, num_heads=4)
    with pytest.raises(ValueError, match="z must have shape"):
        ParallelHead(Z_DIM, C, LEVELS).sample(torch.randn(2, 3))
    with pytest.raises(ValueError, match="target must have shape"):
        DiffusionHead(Z_DIM, 4, width=16).loss(z, torch.randn(3, 5))
    with pytest.raises(ValueError, match="reduction"):
        head.loss(z, idx, reduction="sum")
