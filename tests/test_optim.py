"""tokenbridge.optim: AdamW groups, the schedules (against torch's own schedulers), ScheduledAdamW (against the
loops the trainers were written with), the EMA, and what the trainer logs of them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tokenbridge.optim import ScheduledAdamW, ema_decay_at, lr_at, one_cycle, param_groups, warmup_cosine

from toy_family import LEVELS, ToyGenerator, ckpt_of, run_tiny, tiny_config


def test_no_weight_decay_on_1d_params(tmp_path):
    model = ToyGenerator.from_config({"levels": LEVELS})
    decay, no_decay = param_groups(model, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {"norm.weight", "norm.bias", "hidden.bias", "out.bias"}
    assert "emb.weight" in {names[id(p)] for p in decay["params"]}  # embeddings are decayed, as in MAR
    run_tiny(tiny_config(tmp_path, steps=1))
    groups = ckpt_of(tmp_path)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.02, 0.0]
    assert groups[0]["betas"] == (0.9, 0.95)
    assert sorted(len(g["params"]) for g in groups) == [4, 4]


def test_lr_schedule():
    peak, lo = 1e-3, 1e-5
    assert lr_at(0, peak, 10, 110, lo) == pytest.approx(1e-4)
    assert lr_at(4, peak, 10, 110, lo) == pytest.approx(5e-4)
    assert lr_at(9, peak, 10, 110, lo) == pytest.approx(peak)
    assert lr_at(10, peak, 10, 110, lo) == pytest.approx(peak)
    assert lr_at(60, peak, 10, 110, lo) == pytest.approx((peak + lo) / 2)
    assert lr_at(35, peak, 10, 110, lo) == pytest.approx(lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, peak, 10, 110, lo) == pytest.approx(lo)
    decay = [lr_at(s, peak, 10, 110, lo) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(0, peak, 0, 100) == pytest.approx(peak)


def test_lr_in_training_log_and_blr_rule(tmp_path):
    cfg = tiny_config(tmp_path, steps=6, lr=None, blr=2e-3, warmup_steps=2, min_lr=0.0, global_batch=32)
    run_tiny(cfg)
    peak = 2e-3 * 32 / 256
    lrs = [json.loads(s)["lr"] for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([lr_at(s, peak, 2, 6, 0.0) for s in range(6)])
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "it_s"} <= set(rec)


@pytest.mark.parametrize("warmup, decay", [(False, 0.5), (True, 0.1)])
def test_grad_clip_and_ema(tmp_path, warmup, decay):
    # a tiny clip bounds the first update; EMA with decay d after one step = d * init + (1 - d) * new, where the
    # warmed-up decay of the first update is min(0.5, 1 / 10) = 0.1
    cfg = tiny_config(tmp_path, steps=1, warmup_steps=0, grad_clip=1e-3, ema=0.5, ema_warmup=warmup)
    run_tiny(cfg)
    ck = ckpt_of(tmp_path)
    torch.manual_seed(7)
    init = ToyGenerator.from_config(cfg["model"]).state_dict()
    for k in init:
        torch.testing.assert_close(ck["ema"][k], decay * init[k] + (1 - decay) * ck["model"][k])
    assert json.loads((tmp_path / "log.jsonl").read_text())["grad_norm"] > 1e-3


def test_ema_warmup_schedule():
    assert [ema_decay_at(t, 0.9999) for t in (0, 1, 10, 90)] == pytest.approx([0.1, 2 / 11, 11 / 20, 0.91])
    assert ema_decay_at(10**6, 0.9999) == 0.9999 and ema_decay_at(0, 0.9999, warmup=False) == 0.9999
    # the share of the random initialisation left in the average after 400 steps at decay 0.995
    left = math.prod(ema_decay_at(t, 0.995) for t in range(400))
    assert left < 1e-6 < 0.995**400


def _hyperparameters(opt: torch.optim.Optimizer) -> tuple[float, float]:
    group = opt.param_groups[0]
    return group["lr"], group["betas"][0]


@pytest.mark.parametrize("lr, warmup, total", [(2e-3, 100, 1400), (3e-3, 4, 40), (1e-3, 0, 10)])
def test_warmup_cosine_multiplier_form_is_lambdalr(lr, warmup, total):
    # the VAE and VQ trainers were written with LambdaLR(lr_at(s, 1.0, ...)): the multiplier form is that, bit for bit
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, warmup, total))
    ours, direct = warmup_cosine(lr, warmup, total, as_multiplier=True), warmup_cosine(lr, warmup, total)
    for step in range(total):
        assert ours(step) == (opt.param_groups[0]["lr"], None), step
        assert direct(step)[0] == pytest.approx(ours(step)[0], rel=1e-12)
        opt.step()
        sched.step()
    if (lr, warmup) == (2e-3, 100):  # the two forms round the warm-up differently: why the multiplier form is kept
        assert any(direct(s)[0] != ours(s)[0] for s in range(warmup))


@pytest.mark.parametrize("total, pct_start", [(100, 0.2), (7, 0.2), (469 * 4, 0.2), (50, 0.3)])
def test_one_cycle_is_torchs_onecycle(total, pct_start):
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total, pct_start=pct_start)
    ours = one_cycle(3e-3, total, pct_start=pct_start)
    for step in range(total):
        assert ours(step) == _hyperparameters(opt), step
        opt.step()
        sched.step()


def _trained(make_opt, step_fn, steps: int = 12) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    opt = make_opt(model)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(16, 6, generator=g)
        loss = model(x).square().mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        step_fn(opt, step)
    return model.state_dict()


def _adamw_lambdalr(model):  # the VQ and VAE trainers before ScheduledAdamW
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, betas=(0.9, 0.99), weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, 3, 12))


def _adamw_onecycle(model):  # the classifier's trainer before ScheduledAdamW
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=5e-4)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=12, pct_start=0.2)


def _torch_step(pair, step):
    pair[0].step()
    pair[1].step()


def test_scheduled_adamw_is_the_loops_it_replaced():
    cases = [(_adamw_lambdalr, lambda m: ScheduledAdamW(m.parameters(), warmup_cosine(2e-2, 3, 12, as_multiplier=True),
                                                         betas=(0.9, 0.99), weight_decay=1e-4)),
             (_adamw_onecycle, lambda m: ScheduledAdamW(m.parameters(), one_cycle(2e-2, 12, pct_start=0.2),
                                                         betas=(0.9, 0.999), weight_decay=5e-4))]
    for reference, ours in cases:
        expected, got = _trained(reference, _torch_step), _trained(ours, ScheduledAdamW.step)
        assert all(torch.equal(expected[k], got[k]) for k in expected)
        assert not torch.equal(got["0.weight"], _trained(ours, lambda opt, step: None)["0.weight"])  # it trained
