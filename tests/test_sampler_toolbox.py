"""The sampler toolbox (tokenbridge.samplers): step counts of its schedules, today's sampler kept bit for bit in
every family, the guidance interval and feature reuse against the plain loop, DDIM against its published update,
determinism under a seed, and bad values refused before any work."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from tokenbridge import checkpoint as C
from tokenbridge import cli
from tokenbridge.diffusion import DiffusionSchedule, ddim_step
from tokenbridge.generate import sampling_defaults, with_defaults
from tokenbridge.generators import ContinuousMARGenerator, D2CGenerator, TokenBridgeGenerator, check_sample_options
from tokenbridge.repro.frontier import kept, pareto
from tokenbridge.sampling import mask_schedule_list
from tokenbridge.samplers import PAPER, diffusion_steps_schedule, guided, record_reuse_error, resolve
from tokenbridge.sweep import cell_options

FAMILIES = (TokenBridgeGenerator, ContinuousMARGenerator, D2CGenerator)
LABELS = torch.tensor([0, 3, 7, 10])  # 10 = unconditional
BASE = {"num_iter": 5, "cfg": 3.0}
DIFFUSION = {"num_sampling_steps": 8}
ROOT = Path(__file__).resolve().parents[1]


def tiny(cls: type, seed: int = 0) -> torch.nn.Module:
    """A tiny generator with noised weights: the zero-initialised output layers would make every guidance
    difference 0 and hide what the options change."""
    torch.manual_seed(seed)
    model = cls.from_config({"preset": "tiny"}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def base(cls: type) -> dict:
    return {**BASE, **(DIFFUSION if cls is not TokenBridgeGenerator else {})}


def stage(model: torch.nn.Module) -> torch.nn.Module:
    """The part that runs the MAR loop (D2C: stage 2)."""
    return model.stage2 if isinstance(model, D2CGenerator) else model


def run(model: torch.nn.Module, seed: int = 1, **options) -> torch.Tensor:
    return model.sample(LABELS, generator=seed, **{**base(type(model)), **options})["latents"]


# ---------------------------------------------------------------------------------------------- step counts
def test_diffusion_step_schedules_count_from_start_to_end():
    assert diffusion_steps_schedule(6, 40) == [40] * 6
    linear = diffusion_steps_schedule(10, 50, 5, "linear")
    assert linear == [round(50 - 45 * k / 9) for k in range(10)]  # DiSA: linear in the MAR step's progress
    cosine = diffusion_steps_schedule(10, 50, 5, "cosine")
    assert cosine == [round(5 + 45 * (1 + math.cos(math.pi * k / 9)) / 2) for k in range(10)]
    for steps in (linear, cosine):
        assert steps[0] == 50 and steps[-1] == 5 and steps == sorted(steps, reverse=True)
    assert all(c >= l for c, l in zip(cosine[:5], linear[:5]))  # the cosine stays high longer, then drops faster
    assert diffusion_steps_schedule(1, 30, 3) == [30]  # one MAR step: the start
    assert diffusion_steps_schedule(4, 7, 7, "cosine") == [7] * 4


@pytest.mark.parametrize("cls", (ContinuousMARGenerator, D2CGenerator))
def test_the_head_gets_the_annealed_step_counts_and_sampler(cls, monkeypatch):
    model = tiny(cls)
    head, calls = stage(model).head, []
    real = head.sample

    def spy(z, num_steps=100, method="ddpm", **kw):
        calls.append((num_steps, method))
        return real(z, num_steps=num_steps, method=method, **kw)

    monkeypatch.setattr(head, "sample", spy)
    run(model, num_sampling_steps_end=2, sampling_steps_anneal="cosine", diffusion_sampler="ddim")
    assert calls == [(s, "ddim") for s in diffusion_steps_schedule(5, 8, 2, "cosine")]
    calls.clear()
    run(model)
    assert calls == [(8, "ddpm")] * 5


@pytest.mark.parametrize("cls", FAMILIES)
def test_guidance_interval_and_reuse_decide_the_backbone_rows(cls, monkeypatch):
    """Rows through the backbone per step: 2N on the guided steps (mask ratio at the step's start inside the
    interval) unless their unconditional features are reused, N elsewhere."""
    model = tiny(cls)
    backbone, rows = stage(model).backbone, []
    real = backbone.forward
    monkeypatch.setattr(backbone, "forward",
                        lambda tokens, *a, **k: rows.append(tokens.shape[0]) or real(tokens, *a, **k))
    n, seq_len = len(LABELS), stage(model).seq_len
    before = [seq_len] + mask_schedule_list(5, seq_len)[:-1]
    interval = (0.0, 0.6)
    run(model, cfg_interval=interval)
    is_guided = [guided(interval, m / seq_len) for m in before]
    assert 0 < sum(is_guided) < 5
    assert rows == [2 * n if g else n for g in is_guided]
    rows.clear()
    run(model, uncond_every=2)  # every step guided; the unconditional rows run on guided steps 0, 2, 4
    assert rows == [2 * n, n, 2 * n, n, 2 * n]


# ---------------------------------------------------------------------------------------------- today's sampler
@pytest.mark.parametrize("cls", FAMILIES)
def test_todays_setting_is_todays_sampler_bit_for_bit(cls):
    model = tiny(cls)
    today = run(model)
    # the toolbox's other paths at settings that mean today's sampler
    same = [run(model, cfg_interval=(0.0, 1.0)), run(model, cfg_interval=(0.0, 1.0), uncond_every=1)]
    if cls is not TokenBridgeGenerator:
        same.append(run(model, num_sampling_steps_end=8, sampling_steps_anneal="cosine"))
    # the named preset: whatever the toolbox options say
    wild = {"cfg_interval": (0.2, 0.4), "uncond_every": 3}
    if cls is not TokenBridgeGenerator:
        wild.update(num_sampling_steps_end=2, diffusion_sampler="ddim")
    same.append(run(model, sampler="paper", **wild))
    for other in same:
        assert torch.equal(other, today)
    assert not torch.equal(run(model, **wild), today)  # the options do change the samples


@pytest.mark.parametrize("cls", FAMILIES)
def test_without_guidance_the_interval_and_reuse_change_nothing(cls):
    model = tiny(cls)
    plain = run(model, cfg=1.0)
    assert torch.equal(run(model, cfg=1.0, cfg_interval=(0.3, 0.5), uncond_every=2), plain)


def test_an_empty_interval_is_sampling_without_guidance():
    model = tiny(TokenBridgeGenerator)
    assert torch.equal(run(model, cfg_interval=(0.0, 0.0)), run(model, cfg=1.0))


# ---------------------------------------------------------------------------------------------- feature reuse
@pytest.mark.parametrize("cls", (TokenBridgeGenerator, ContinuousMARGenerator))
def test_reuse_error_is_measured_without_changing_the_sample(cls):
    model = tiny(cls)
    reused = run(model, uncond_every=2)
    with record_reuse_error() as errors:
        probed = run(model, uncond_every=2)
    assert torch.equal(probed, reused)
    assert [e["step"] for e in errors] == [1.0, 3.0]
    assert all(0 < e["z_u"] < 1 and 0 < e["guidance"] < float("inf") for e in errors)
    with record_reuse_error() as none:
        run(model)
    assert none == []  # nothing is reused, nothing to measure


# ---------------------------------------------------------------------------------------------- DDIM
def test_ddim_step_is_the_published_update():
    """DDIM (Song et al. 2021, eta = 0) as improved-diffusion writes it: eps re-derived from the clipped x0,
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, built here from alphas_cumprod in float64."""
    s = DiffusionSchedule.cosine(1000).respaced(10)
    abar = s.sqrt_ac ** 2
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    for i, clip in ((9, None), (5, 1.0), (1, None)):
        x0 = (torch.sqrt(1 / abar[i]) * x - torch.sqrt(1 / abar[i] - 1) * eps)
        x0 = x0 if clip is None else x0.clamp(-clip, clip)
        eps_hat = (torch.sqrt(1 / abar[i]) * x - x0) / torch.sqrt(1 / abar[i] - 1)
        want = torch.sqrt(abar[i - 1]) * x0 + torch.sqrt(1 - abar[i - 1]) * eps_hat
        torch.testing.assert_close(ddim_step(s, x, i, eps, clip), want)
    x0 = torch.sqrt(1 / abar[0]) * x - torch.sqrt(1 / abar[0] - 1) * eps
    torch.testing.assert_close(ddim_step(s, x, 0, eps), x0)


def test_ddim_with_the_exact_noise_lands_on_the_data_point():
    """For data that is one point x*, eps(x, t) = (x - sqrt(abar) x*) / sqrt(1 - abar) is exact and DDIM maps any
    start onto x* at any step count."""
    target = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    for steps in (3, 25):
        s = DiffusionSchedule.cosine(1000).respaced(steps)
        x = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
        for i in reversed(range(steps)):
            eps = (x - s.sqrt_ac[i] * target) / s.sqrt_1m_ac[i]
            x = ddim_step(s, x, i, eps)
        torch.testing.assert_close(x, target)


def test_ddim_has_no_per_step_noise():
    model = tiny(ContinuousMARGenerator)
    ddim = run(model, diffusion_sampler="ddim")
    assert torch.equal(run(model, diffusion_sampler="ddim", temperature=0.0), ddim)
    assert not torch.equal(run(model, temperature=0.0), run(model))  # DDPM's noise does scale


# ---------------------------------------------------------------------------------------------- determinism
NEW_OPTIONS = [{"cfg_interval": (0.0, 0.5)}, {"uncond_every": 2}, {"cfg_interval": (0.1, 0.9), "uncond_every": 3},
               {"num_sampling_steps_end": 2}, {"num_sampling_steps_end": 3, "sampling_steps_anneal": "cosine"},
               {"diffusion_sampler": "ddim"},
               {"diffusion_sampler": "ddim", "num_sampling_steps_end": 2, "cfg_interval": (0.0, 0.5)}]


# the AR head has no diffusion steps: TokenBridge takes the first three settings only
CASES = [(cls, o) for cls in FAMILIES for o in NEW_OPTIONS
         if cls is not TokenBridgeGenerator or set(o) <= {"cfg_interval", "uncond_every"}]


@pytest.mark.parametrize("cls,options", CASES, ids=lambda v: v.__name__ if isinstance(v, type) else "+".join(v))
def test_every_option_is_deterministic_under_a_seed(cls, options):
    model = tiny(cls)
    first = run(model, seed=5, **options)
    assert torch.equal(run(model, seed=5, **options), first)
    assert not torch.equal(run(model, seed=6, **options), first)


# ---------------------------------------------------------------------------------------------- bad values
BAD = [({"cfg_interval": (-0.1, 0.5)}, "cfg_interval"), ({"cfg_interval": (0.2, 1.5)}, "cfg_interval"),
       ({"cfg_interval": (0.6, 0.2)}, "cfg_interval"), ({"uncond_every": 0}, "uncond_every"),
       ({"sampler": "fast"}, "sampler"), ({"num_iter": 0}, "num_iter")]
BAD_DIFFUSION = [({"num_sampling_steps_end": 9}, "end at or below where it starts"),
                 ({"num_sampling_steps_end": 0}, "num_sampling_steps_end"),
                 ({"num_sampling_steps": 0}, "num_sampling_steps"),
                 ({"sampling_steps_anneal": "exp"}, "sampling_steps_anneal"),
                 ({"diffusion_sampler": "euler"}, "diffusion_sampler")]


@pytest.mark.parametrize("cls", FAMILIES)
def test_bad_values_are_named_before_any_work(cls, monkeypatch):
    model = tiny(cls)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(stage(model).backbone, "forward", no_work)
    if isinstance(model, D2CGenerator):
        monkeypatch.setattr(model.stage1, "sample", no_work)
    cases = BAD + (BAD_DIFFUSION if cls is not TokenBridgeGenerator else [])
    for options, name in cases:
        with pytest.raises(ValueError, match=name):
            run(model, **options)
        # sampler="paper" ignores the options but still checks them
        if "sampler" not in options and "num_iter" not in options:
            with pytest.raises(ValueError, match=name):
                run(model, sampler="paper", **options)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="end at an integer in"):
        diffusion_steps_schedule(4, 10, 20)
    with pytest.raises(ValueError, match="integers >= 1"):
        diffusion_steps_schedule(0, 10)
    with pytest.raises(ValueError, match="anneal"):
        diffusion_steps_schedule(4, 10, 2, "exp")
    assert resolve("toolbox") == PAPER


# ---------------------------------------------------------------------------------------------- recorded and CLI
def test_toolbox_defaults_are_recorded_and_read_back(tmp_path):
    model = tiny(ContinuousMARGenerator)
    sample = check_sample_options(ContinuousMARGenerator, {"cfg_interval": [0.0, 0.5], "diffusion_sampler": "ddim",
                                                           "num_sampling_steps_end": 5})
    record = {"family": "mar", "config": model.config, "sample": sample, "vae": "fmnist", "step": 0, "ema": True}
    path = C.save_generator_weights(model.state_dict(), record, tmp_path / "mar.safetensors")
    assert sampling_defaults(C.load_generator(path)) == {"cfg_interval": (0.0, 0.5), "diffusion_sampler": "ddim",
                                                         "num_sampling_steps_end": 5}
    with pytest.raises(Exception, match="cfg_interval"):
        check_sample_options(ContinuousMARGenerator, {"cfg_interval": [0.1]})


def test_the_paper_sampler_runs_the_defaults_recorded_before(tmp_path):
    # tools/record_sampling.py (how the shipped MAR and D2C generators got their toolbox defaults) moves the
    # defaults and keeps the old ones as the record of sampler="paper"; the weights stay as they were
    spec = importlib.util.spec_from_file_location("record_sampling", ROOT / "tools" / "record_sampling.py")
    record_sampling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record_sampling)
    model = tiny(ContinuousMARGenerator)
    today = base(ContinuousMARGenerator)
    record = {"family": "mar", "config": model.config, "sample": today, "vae": "fmnist", "step": 0, "ema": True}
    path = C.save_generator_weights(model.state_dict(), record, tmp_path / "mar.safetensors")
    record_sampling.main([str(path), "diffusion_sampler=ddim", "num_sampling_steps=4", "cfg_interval=[0, 0.5]"])
    loaded = C.load_generator(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    fast = {**today, "diffusion_sampler": "ddim", "num_sampling_steps": 4, "cfg_interval": (0.0, 0.5)}
    assert sampling_defaults(loaded) == with_defaults(loaded, {}) == fast
    assert sampling_defaults(loaded, "paper") == today
    assert with_defaults(loaded, {"sampler": "paper", "cfg": 2.0}) == {**today, "sampler": "paper", "cfg": 2.0}
    swept = cell_options(loaded, {"sampler": "paper"})  # what `sweep` records for a cell of today's sampler
    assert (swept["num_sampling_steps"], swept["diffusion_sampler"]) == (today["num_sampling_steps"], "ddpm")
    paper = loaded.sample(LABELS, generator=1, **with_defaults(loaded, {"sampler": "paper"}))["latents"]
    assert torch.equal(paper, run(model))  # today's sampler, bit for bit
    assert not torch.equal(loaded.sample(LABELS, generator=1, **with_defaults(loaded, {}))["latents"], paper)


def test_cli_takes_an_interval_and_the_preset():
    args = cli.build_parser().parse_args(["sample", "--cfg-interval", "0", "0.5", "--sampler", "paper",
                                          "--uncond-every", "2", "--diffusion-sampler", "ddim"])
    assert (args.cfg_interval, args.sampler, args.uncond_every, args.diffusion_sampler) == ([0.0, 0.5], "paper", 2,
                                                                                           "ddim")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["sample", "--sampler", "fast"])


def test_frontier_verdicts():
    """`repro frontier`: quality kept within today's seed range; the Pareto set in images/s and FD."""
    today = {"name": "paper", "images_per_s": 1.0, "fd_cls": (20.0, 2.0), "recall": (0.5, 0.04)}
    rows = [today,
            {"name": "fast", "images_per_s": 4.0, "fd_cls": (21.9, 5.0), "recall": (0.47, 0.0)},
            {"name": "worse", "images_per_s": 3.0, "fd_cls": (22.5, 0.1), "recall": (0.5, 0.0)},
            {"name": "blurry", "images_per_s": 5.0, "fd_cls": (30.0, 0.1), "recall": (0.40, 0.0)}]
    assert [kept(r, today) for r in rows] == [True, True, False, False]
    assert pareto(rows) == {"paper", "fast", "blurry"}
