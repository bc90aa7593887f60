"""The continuous MAR family (diffusion loss on latents): head maths, sampling contract, training life cycle and
the errors a user meets first."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from tokenbridge import checkpoint as C
from tokenbridge import train as T
from tokenbridge.config import ConfigError
from tokenbridge.diffusion import DiffusionHead, DiffusionSchedule
from tokenbridge.generate import generate
from tokenbridge.generators import ContinuousMARGenerator, TokenBridgeGenerator
from tokenbridge.tokens import CachedTokens, LatentTokens
from token_files import write_token_file

N, GRID = 64, (8, 8, 4)


def tiny_latents(n: int = N, seed: int = 123) -> TensorDataset:
    """Latents [n, 8, 8, 4] channel-last (class-dependent means, so the model has something to learn)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    latents = 0.5 * torch.randn(n, *GRID, generator=g) + (labels.float() / 5 - 1)[:, None, None, None]
    return TensorDataset(latents, labels)


def tiny_run(out_dir: Path, **train) -> dict:
    base = {"steps": 8, "global_batch": 16, "lr": 3e-3, "warmup_steps": 2, "min_lr": 1e-4, "ema": 0.9,
            "ckpt_every": 3, "log_every": 1, "device": "cpu"}
    return {"out_dir": str(out_dir), "seed": 3, "family": "mar",
            "model": {"preset": "tiny", "backbone": {"dropout": 0.1}}, "train": {**base, **train}}


def tiny_model(seed: int = 0) -> ContinuousMARGenerator:
    torch.manual_seed(seed)
    return ContinuousMARGenerator.from_config({"preset": "tiny"}).eval()


# ------------------------------------------------------------------------------------------------------------------
# the diffusion head's maths


def test_cosine_schedule_alphas_match_the_formula():
    s, steps = 0.008, 1000
    sched = DiffusionSchedule.cosine(steps)

    def f(t: float) -> float:
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

    expected = torch.tensor([f(t + 1) / f(0) for t in range(steps)], dtype=torch.float64)
    alphas_cumprod = sched.sqrt_ac ** 2
    # betas are clipped at 0.999 only at the very end (t >= 999); up to there the product is the formula itself
    torch.testing.assert_close(alphas_cumprod[:999], expected[:999], rtol=1e-10, atol=1e-12)
    assert sched.betas.max() <= 0.999 and bool((sched.betas[:-1] < sched.betas[1:]).all())
    # 100 respaced steps keep the first and last training step, and their alphas are the originals'
    r = sched.respaced(100)
    assert len(r) == 100 and int(r.timesteps[0]) == 0 and int(r.timesteps[-1]) == 999
    torch.testing.assert_close(r.sqrt_ac, sched.sqrt_ac[r.timesteps])


def test_head_cfg_of_one_equals_no_guidance():
    torch.manual_seed(0)
    head = DiffusionHead(z_dim=8, token_dim=4, width=16, depth=2, train_steps=50)
    for p in head.parameters():  # the zero-initialised output layers would make every head output 0
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(6, 8)
    z_pair = torch.cat([z, torch.randn(6, 8)])  # conditional rows, then (different) unconditional rows
    plain = head.sample(z, num_steps=10, generator=torch.Generator().manual_seed(1))
    guided = head.sample(z_pair, num_steps=10, cfg=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)
    stronger = head.sample(z_pair, num_steps=10, cfg=3.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(stronger, plain, atol=1e-3)


def test_clip_denoised_bounds_the_predicted_clean_tokens():
    torch.manual_seed(0)
    head = DiffusionHead(z_dim=8, token_dim=4, width=16, depth=2, train_steps=100)
    for p in head.parameters():  # a wild, untrained head: its eps is far from the truth at every step
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(32, 8)
    free = head.sample(z, num_steps=20, generator=torch.Generator().manual_seed(0))
    clipped = head.sample(z, num_steps=20, generator=torch.Generator().manual_seed(0), clip_denoised=2.0)
    assert float(free.abs().max()) > 2.0
    # the last DDPM step returns the (clipped) predicted x0 itself
    assert float(clipped.abs().max()) <= 2.0 + 1e-5


def test_diffusion_loss_falls_on_a_tiny_overfit_batch():
    """One fixed batch of 8 grids, 150 Adam steps: the loss averaged over 20 fixed draws (mask, timesteps, noise)
    must fall below half of its value at initialisation (measured: 1.45 -> 0.33)."""
    model = tiny_model()
    latents, labels = tiny_latents(8)[:]

    def mean_loss() -> float:
        torch.manual_seed(99)
        with torch.no_grad():
            return sum(float(model.loss((latents, labels))) for _ in range(20)) / 20

    model.train()
    start = mean_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model.loss((latents, labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = mean_loss()
    assert end < 0.5 * start, (start, end)


# ------------------------------------------------------------------------------------------------------------------
# sampling contract


def test_sampling_is_deterministic_under_a_seed_and_cfg_one_is_no_guidance():
    model = tiny_model()
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    labels = torch.tensor([0, 3, 7])
    opts = {"num_iter": 4, "num_sampling_steps": 5}
    a = model.sample(labels, cfg=2.0, generator=5, **opts)["latents"]
    b = model.sample(labels, cfg=2.0, generator=5, **opts)["latents"]
    assert a.shape == (3, 4, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, model.sample(labels, cfg=2.0, generator=6, **opts)["latents"])
    one = model.sample(labels, cfg=1.0, generator=5, **opts)["latents"]
    assert torch.equal(one, model.sample(labels, cfg=None, generator=5, **opts)["latents"])
    assert not torch.allclose(one, a)


def test_released_cfg_changes_only_the_last_linear_step():
    """MAR's released sampler never lets its mask length drop below 1, so its last linear-cfg step uses
    1 + (cfg - 1)(L - 1)/L: with 2 steps on 64 positions the 19 tokens of step 1 agree, the 45 of step 2 differ."""
    model = tiny_model()
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    labels, opts = torch.tensor([0, 3]), {"num_iter": 2, "num_sampling_steps": 3, "generator": 5, "cfg": 3.0}
    plain = model.sample(labels, **opts)["latents"]
    released = model.sample(labels, released_cfg=True, **opts)["latents"]
    same = (plain == released).all(dim=1)  # [N, 8, 8]: positions whose 4 channels agree
    assert same.flatten(1).sum(1).tolist() == [19, 19]
    constant = {**opts, "cfg_schedule": "constant"}
    assert torch.equal(model.sample(labels, **constant)["latents"],
                       model.sample(labels, released_cfg=True, **constant)["latents"])


def test_callback_sees_the_grid_fill_up():
    model = tiny_model()
    seen = []
    model.sample(torch.tensor([1, 2]), num_iter=4, num_sampling_steps=3, generator=0,
                 callback=lambda out: seen.append(int(out["mask"].sum())))
    assert len(seen) == 4 and seen == sorted(seen, reverse=True) and seen[-1] == 0


def test_more_diffusion_steps_than_trained_are_named():
    """The one sampling bound a signature cannot declare (the declared ranges: tests/generators/)."""
    with pytest.raises(ValueError, match=r"num_sampling_steps must be an integer in \[1, 1000\], got 5000"):
        tiny_model().sample(torch.tensor([0]), num_sampling_steps=5000)


# ------------------------------------------------------------------------------------------------------------------
# life cycle: trainer, exact resume, DDP, export, generate


# A MAR whose random draws (mask, timesteps, noise, label drop) are seeded by each row's content instead of the
# process's RNG: the same global batch then gives the same gradient whether one process or two compute it, so the
# comparison checks what DDP adds (gradient averaging over every parameter of backbone and diffusion head, the
# sampler's split, the EMA, rank-0 checkpoints), not random draws. It lives in a string so that torchrun workers
# build the same class.
ROW_SEEDED_SOURCE = textwrap.dedent('''
    import torch
    from tokenbridge.generators import ContinuousMARGenerator, register_family


    @register_family
    class RowSeededMAR(ContinuousMARGenerator):
        family = "mar-row-seeded"

        def loss(self, batch, mask_ratio=None):
            latents, labels = batch
            losses = []
            for x, y in zip(latents, labels):
                torch.manual_seed(int(y) * 100_003 + int(x.double().abs().sum() * 1e4))
                losses.append(super().loss((x[None], y[None]), mask_ratio))
            return torch.stack(losses).mean()
''')
_ns: dict = {}
exec(ROW_SEEDED_SOURCE, _ns)

DDP_SCRIPT = ROW_SEEDED_SOURCE + textwrap.dedent('''
    import sys
    from torch.utils.data import TensorDataset
    from tokenbridge.train import train

    g = torch.Generator().manual_seed(123)
    labels = torch.randint(0, 10, (64,), generator=g)
    latents = 0.5 * torch.randn(64, 8, 8, 4, generator=g) + (labels.float() / 5 - 1)[:, None, None, None]
    cfg = {"out_dir": sys.argv[1], "seed": 3, "family": "mar-row-seeded", "model": {"preset": "tiny"},
           "train": {"steps": 4, "global_batch": 16, "lr": 3e-3, "warmup_steps": 2, "min_lr": 1e-4, "ema": 0.9,
                     "ckpt_every": 4, "log_every": 1, "device": "cpu"}}
    train(cfg, dataset=TensorDataset(latents, labels))
''')


def test_two_process_gloo_ddp_equals_one_process(tmp_path, torchrun_jobs):
    ddp_dir = torchrun_jobs[__name__]  # DDP_SCRIPT run by 2 gloo processes (conftest)
    single = {**tiny_run(tmp_path / "one", steps=4, ckpt_every=4), "family": "mar-row-seeded"}
    single["model"] = {"preset": "tiny"}
    T.train(single, dataset=tiny_latents())
    ddp, one = (C.load_checkpoint(p / C.CHECKPOINT_NAME) for p in (ddp_dir, tmp_path / "one"))
    assert ddp["step"] == one["step"] == 4 and ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    init = tiny_model(seed=3).state_dict()
    for key in ("model", "ema"):
        for name, value in one[key].items():
            torch.testing.assert_close(ddp[key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    moved = [n for n, v in one["model"].items() if v.is_floating_point() and not torch.equal(v, init[n])]
    assert any(n.startswith("head.") for n in moved) and any(n.startswith("backbone.") for n in moved)


def test_export_then_generate_through_the_common_sampler(tmp_path):
    T.train(tiny_run(tmp_path / "run", steps=3), dataset=tiny_latents())
    exported = C.export_weights(tmp_path / "run" / C.CHECKPOINT_NAME, tmp_path / "mar.safetensors")
    model = C.load_generator(exported, family="mar")
    assert isinstance(model, ContinuousMARGenerator) and model.provenance["family"] == "mar"
    # sampling defaults chosen after training are recorded at export, validated first
    with_clip = C.export_weights(tmp_path / "run" / C.CHECKPOINT_NAME, tmp_path / "clip.safetensors",
                                 sample={"clip_denoised": 3.0})
    assert C.load_generator(with_clip).provenance["sample"]["clip_denoised"] == 3.0
    with pytest.raises(ConfigError, match="clip_denoised"):
        C.export_weights(tmp_path / "run" / C.CHECKPOINT_NAME, tmp_path / "bad.safetensors",
                         sample={"clip_denoised": "wide"})
    assert not (tmp_path / "bad.safetensors").exists()
    out = generate(exported, [0, 1, 2], vae="fmnist", seed=4, num_iter=2, num_sampling_steps=3, cfg=2.0)
    again = generate(exported, [0, 1, 2], vae="fmnist", seed=4, num_iter=2, num_sampling_steps=3, cfg=2.0)
    assert out["images"].shape == (3, 1, 32, 32) and torch.equal(out["images"], again["images"])
    assert float(out["images"].min()) >= -1 and float(out["images"].max()) <= 1


# ------------------------------------------------------------------------------------------------------------------
# bad inputs


def latents_run(tmp_path: Path, tokens: Path, **model) -> dict:
    cfg = tiny_run(tmp_path / "run", steps=2, global_batch=4)
    cfg["data"] = {"source": "tokens", "tokens": str(tokens)}
    cfg["model"] = {**cfg["model"], **model}
    return cfg


def test_latents_with_nan_are_refused_naming_the_file(tmp_path):
    latents = torch.randn(20, 4, 8, 8, dtype=torch.float16)
    latents[7, 2, 3, 1] = float("nan")
    path = write_token_file(tmp_path / "nan.safetensors", latents)
    with pytest.raises(ValueError, match=r"nan\.safetensors: latents hold NaN or inf"):
        LatentTokens(CachedTokens(path))
    with pytest.raises(ValueError, match="NaN or inf"):
        T.train(latents_run(tmp_path, path))
    assert not (tmp_path / "run" / C.CHECKPOINT_NAME).exists()


def test_a_token_file_without_latents_is_refused(tmp_path):
    path = write_token_file(tmp_path / "indices_only.safetensors", None)
    with pytest.raises(ValueError, match="stores no continuous latents.*store_latents"):
        T.train(latents_run(tmp_path, path))


def test_wrong_channel_count_is_named(tmp_path):
    path = write_token_file(tmp_path / "c3.safetensors", torch.randn(20, 3, 8, 8))
    with pytest.raises(ConfigError, match=r"model.channels' = 4 but the token file .*c3.safetensors has 3"):
        T.train(latents_run(tmp_path, path))


def test_a_tokenbridge_checkpoint_where_a_continuous_one_is_expected(tmp_path):
    T.train(tiny_run(tmp_path / "run", steps=2), dataset=tiny_latents())
    with pytest.raises(ValueError, match="holds a 'mar' generator, but a 'tokenbridge' generator is expected"):
        C.load_generator(tmp_path / "run" / C.CHECKPOINT_NAME, family="tokenbridge")
    tb = TokenBridgeGenerator.from_config({"preset": "tiny"})
    record = {"family": "tokenbridge", "config": tb.config, "sample": {}, "vae": "fmnist", "step": 0, "ema": True}
    path = C.save_generator_weights(tb.state_dict(), record, tmp_path / "tb.safetensors")
    with pytest.raises(ValueError, match="holds a 'tokenbridge' generator, but a 'mar' generator is expected"):
        C.load_generator(path, family="mar")
    # resuming a run folder with the other family is refused too (the weights would not fit)
    cfg = {**tiny_run(tmp_path / "run", steps=3), "family": "tokenbridge", "model": {"preset": "tiny"}}
    indices = TensorDataset(torch.randint(0, 64, (N, *GRID)), torch.randint(0, 10, (N,)))
    with pytest.raises(ValueError, match="holds a 'mar' generator, the config trains 'tokenbridge'"):
        T.train(cfg, dataset=indices)
