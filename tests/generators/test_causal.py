"""The causal TokenBridge family (tokenbridge-ar: TokenBridge's tokens and dimension-wise head on a KV-cached raster
GPT): the cached sampling path against teacher forcing, the sampling contract, the training life cycle (exact
resume, export, load, generate, the CLI) and the errors a user meets first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from tokenbridge import checkpoint as C
from tokenbridge import cli
from tokenbridge import train as T
from tokenbridge.config import ConfigError
from tokenbridge.generate import generate
from tokenbridge.generators import CausalTokenBridgeGenerator, TokenBridgeGenerator, get_family
from tokenbridge.quantizer import DimensionwiseQuantizer
from tokenbridge.tokens import TOKENS_FORMAT
from token_files import write_token_file

N, GRID, LEVELS = 32, (8, 8, 4), 64
L = GRID[0] * GRID[1]


def tiny_model(seed: int = 0, **config) -> CausalTokenBridgeGenerator:
    """The tiny preset with every parameter perturbed (the head's AdaLN layers start at zero: untouched, the
    channel steps would not depend on each other)."""
    torch.manual_seed(seed)
    model = CausalTokenBridgeGenerator.from_config({"preset": "tiny", **config}).eval()
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def tiny_indices(n: int = N, seed: int = 123) -> TensorDataset:
    """Index grids [n, 8, 8, 4] whose values depend on the class (something to learn)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    noise = torch.randint(-6, 7, (n, *GRID), generator=g)
    return TensorDataset((labels[:, None, None, None] * 5 + 8 + noise).clamp(0, LEVELS - 1), labels)


def tiny_run(out_dir: Path, **train) -> dict:
    base = {"steps": 6, "global_batch": 8, "lr": 3e-3, "warmup_steps": 2, "min_lr": 1e-4, "ema": 0.9,
            "ckpt_every": 2, "log_every": 1, "device": "cpu"}
    # head dropout and label dropout: resume must restore every random draw
    model = {"preset": "tiny", "head": {"dropout": 0.1}, "backbone": {"class_dropout": 0.3}}
    return {"out_dir": str(out_dir), "seed": 3, "family": "tokenbridge-ar", "model": model,
            "train": {**base, **train}}


def token_log_probs(model: CausalTokenBridgeGenerator, indices: torch.Tensor, labels: torch.Tensor,
                    scales: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced log-probability [N, H, W] of each token of indices [N, H, W, C]: sum over channels of
    log_softmax(logits) at the given index; with scales [L] (guidance at position t), the logits are
    u + s_t * (c - u) of the conditional and the unconditional (null class) pass."""
    n, c = indices.shape[0], model.channels

    def logits(rows: torch.Tensor) -> torch.Tensor:  # [N, L, C, levels] in natural channel order
        z = model.features(indices, rows)
        return model.head(z.reshape(n * L, -1), indices.reshape(n * L, c)).reshape(n, L, c, -1)

    mixed = logits(labels)
    if scales is not None:
        uncond = logits(torch.full_like(labels, model.num_classes))
        mixed = uncond + scales[None, :, None, None] * (mixed - uncond)
    picked = mixed.log_softmax(-1).gather(-1, indices.reshape(n, L, c, 1))[..., 0]
    return picked.sum(-1).reshape(n, *GRID[:2])


# ------------------------------------------------------------------------------------------------------------------
# the cached sampling path == teacher forcing


@pytest.mark.parametrize("prefix_tokens", [1, 3])
def test_cached_backbone_features_equal_uncached_and_teacher_forced_ones(prefix_tokens):
    model = tiny_model(backbone={"prefix_tokens": prefix_tokens})
    assert model.backbone.prefix_tokens == prefix_tokens
    indices, labels = tiny_indices(4)[:]
    labels = torch.tensor([0, 3, 9, 10])  # 10 = the null class
    with torch.no_grad():
        tokens = model._tokens(indices)
        forced = model.backbone.features(tokens, labels)
        cached = model.backbone.step_features(tokens, labels, use_cache=True)
        uncached = model.backbone.step_features(tokens, labels, use_cache=False)
        assert forced.shape == (4, L, model.backbone.width)
        torch.testing.assert_close(cached, forced, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(uncached, forced, rtol=1e-5, atol=1e-5)
        # causality: changing token t leaves the features of positions <= t alone and moves a later one
        t = 20
        changed = indices.clone()
        changed.view(4, L, -1)[:, t] = (changed.view(4, L, -1)[:, t] + 17) % LEVELS
        moved = model.features(changed, labels)
        torch.testing.assert_close(moved[:, : t + 1], forced[:, : t + 1], rtol=0, atol=0)
        assert (moved[:, t + 1] - forced[:, t + 1]).abs().max() > 1e-3
        # the class prefix reaches position 0
        assert (model.features(indices, torch.tensor([1, 3, 9, 10]))[0, 0] - forced[0, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("cfg, schedule", [(1.0, "linear"), (2.5, "constant"), (2.5, "linear")])
def test_sampled_log_probs_are_the_teacher_forced_ones(cfg, schedule):
    """`confidence` is the head's log-prob of each sampled token on the KV-cached path (both the backbone's and the
    head's caches); teacher forcing on the sampled indices, with guidance u + s_t (c - u) built here from the
    schedule's formula (linear: s_t = 1 + (cfg - 1)(t + 1) / L), gives the same numbers."""
    model = tiny_model(seed=1)
    labels = torch.tensor([2, 7, 10])
    out = model.sample(labels, cfg=cfg, cfg_schedule=schedule, generator=4)
    t = torch.arange(1, L + 1, dtype=torch.float32)
    scales = None if cfg == 1.0 else (torch.full((L,), cfg) if schedule == "constant" else 1 + (cfg - 1) * t / L)
    with torch.no_grad():
        expected = token_log_probs(model, out["indices"], labels, scales)
    torch.testing.assert_close(out["confidence"], expected, rtol=1e-4, atol=1e-4)
    assert out["latents"].shape == (3, 4, 8, 8) and out["indices"].dtype == torch.int64
    torch.testing.assert_close(out["latents"], model.quantizer.dequantize(out["indices"]).permute(0, 3, 1, 2))


def test_training_loss_is_the_mean_teacher_forced_cross_entropy_per_channel():
    model = tiny_model(seed=2)
    indices, labels = tiny_indices(5)[:]
    with torch.no_grad():
        expected = -token_log_probs(model, indices, labels).mean() / GRID[2]
        torch.testing.assert_close(model.loss((indices, labels)), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# the sampling contract


def test_sampling_is_deterministic_under_a_seed_and_the_filters_act():
    model = tiny_model(seed=3)
    labels = torch.tensor([0, 4, 10])
    steps = []
    a = model.sample(labels, cfg=2.0, top_k=20, top_p=0.9, generator=5, callback=steps.append)
    b = model.sample(labels, cfg=2.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in ("indices", "latents", "confidence"))
    c = model.sample(labels, cfg=2.0, top_k=20, top_p=0.9, generator=6)
    assert not torch.equal(a["indices"], c["indices"])
    # live views: one call per raster position, the grid filling up in raster order
    assert len(steps) == L and int(steps[-1]["step"]) == L and int(steps[0]["num_iter"]) == L
    assert int(steps[9]["mask"][0].sum()) == L - 10 and not bool(steps[9]["mask"][0, 0, 0])
    assert torch.equal(steps[-1]["indices"], a["indices"]) and not bool(steps[-1]["mask"].any())
    assert bool((steps[9]["latents"][:, :, 7, 7] == 0).all())
    # top_k = 1 and a tiny nucleus are greedy decoding: the seed no longer matters, and both agree
    greedy = [model.sample(labels, top_k=1, generator=s)["indices"] for s in (1, 2)]
    nucleus = model.sample(labels, top_p=1e-6, generator=3)["indices"]
    assert torch.equal(greedy[0], greedy[1]) and torch.equal(greedy[0], nucleus)
    # a low temperature concentrates the draws: higher log-likelihood than at temperature 1
    cold, warm = (model.sample(labels, temperature=temp, generator=7)["indices"] for temp in (0.3, 1.0))
    with torch.no_grad():
        assert token_log_probs(model, cold, labels).sum() > token_log_probs(model, warm, labels).sum()
    assert model.training is False and model.train().sample(labels, generator=5)["indices"].shape == (3, *GRID)
    assert model.training  # sample() restores the mode it found


def test_bad_inputs_are_named_before_any_work():
    model = tiny_model()
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="sample.top_k"):  # declared ranges: tests/generators/
        model.sample(labels, top_k=2.5)
    with pytest.raises(ValueError, match="generator must be None, an int seed"):
        model.sample(labels, generator="seed")
    indices, labels = tiny_indices(2)[:]
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 64\)"):
        model.loss((indices + LEVELS, labels))


def test_bad_configs_are_named(tmp_path):
    with pytest.raises(ConfigError, match="width=30 must be divisible by num_heads=4"):
        T.check_run_config({**tiny_run(tmp_path), "model": {"preset": "tiny", "backbone": {"width": 30,
                                                                                          "num_heads": 4}}})
    with pytest.raises(ConfigError, match="order must be a permutation of range"):
        T.check_run_config({**tiny_run(tmp_path), "model": {"preset": "tiny", "head": {"order": [0, 0, 1, 2]}}})
    with pytest.raises(ConfigError, match="'frequency' needs the training tokens"):
        CausalTokenBridgeGenerator.from_config({"preset": "tiny", "head": {"order": "frequency"}})
    with pytest.raises(ConfigError, match="sample.top_k"):
        T.check_run_config({**tiny_run(tmp_path), "sample": {"top_k": "many"}})
    three = write_token_file(tmp_path / "c3.safetensors", torch.randn(20, 3, 8, 8))
    cfg = {**tiny_run(tmp_path / "run"), "data": {"source": "tokens", "tokens": str(three)}}
    with pytest.raises(ConfigError, match=r"model.channels' = 4 but the token file .*c3.safetensors has 3"):
        T.train(cfg)
    assert not (tmp_path / "run" / C.CHECKPOINT_NAME).exists()


def test_presets_and_the_shipped_config():
    assert get_family("tokenbridge-ar") is CausalTokenBridgeGenerator
    run = T.load_run_config("fmnist-ar")
    assert run.family == "tokenbridge-ar" and run.model["head"]["order"] == "frequency"
    # about the shipped TokenBridge generator's size (the fmnist presets of both families, 4 channels, 64 levels)
    sizes = [sum(p.numel() for p in cls.from_config({"preset": "fmnist", "head": {"order": None}}).parameters())
             for cls in (CausalTokenBridgeGenerator, TokenBridgeGenerator)]
    assert abs(sizes[0] / sizes[1] - 1) < 0.05, sizes


# ------------------------------------------------------------------------------------------------------------------
# life cycle: trainer, exact resume, export, load, generate


def index_file(path: Path, n: int = 16) -> Path:
    """A cache-latents file of indices only (no latents), recording the default quantizer (the tiny preset's)."""
    indices, labels = tiny_indices(n)[:]
    meta = {"format": TOKENS_FORMAT, "version": "1", "levels": str(LEVELS), "num_classes": "10", "vae": "fmnist",
            "quantizer": json.dumps(DimensionwiseQuantizer().config())}
    save_file({"indices": indices.to(torch.uint8), "labels": labels}, str(path), metadata=meta)
    return path


def test_train_on_a_token_file_then_export_load_and_sample(tmp_path):
    tokens = index_file(tmp_path / "tokens.safetensors")
    cfg = tiny_run(tmp_path / "run", steps=2, global_batch=4)
    cfg["data"] = {"source": "tokens", "tokens": str(tokens)}
    cfg["model"]["head"]["order"] = "frequency"
    cfg["sample"] = {"cfg": 2.0, "top_k": 30}
    T.train(cfg)
    ckpt = tmp_path / "run" / C.CHECKPOINT_NAME
    exported = C.export_weights(ckpt, tmp_path / "ar.safetensors")
    model = C.load_generator(exported, family="tokenbridge-ar")
    assert isinstance(model, CausalTokenBridgeGenerator) and model.provenance["sample"] == {"cfg": 2.0, "top_k": 30}
    order = model.config["head"]["order"]
    assert sorted(order) == [0, 1, 2, 3] and model.head.order.tolist() == order  # resolved from the tokens
    out = generate(exported, [0, 1, 10], vae="fmnist", seed=4)
    assert out["images"].shape == (3, 1, 32, 32) and out["indices"].shape == (3, *GRID)
    assert float(out["images"].min()) >= -1 and float(out["images"].max()) <= 1
    # the recorded defaults apply (cfg 2, top-k 30) unless overridden; the same seed gives the same images
    same = generate(model, [0, 1, 10], vae="fmnist", seed=4, cfg=2.0, top_k=30)
    assert torch.equal(same["images"], out["images"])
    assert not torch.equal(generate(model, [0, 1, 10], vae="fmnist", seed=4, top_k=1)["indices"], out["indices"])
    # the EMA weights went out: a checkpoint loads its EMA weights too, and samples alike
    assert torch.equal(generate(ckpt, [0, 1, 10], vae="fmnist", seed=4)["images"], out["images"])
    loaded = CausalTokenBridgeGenerator.from_pretrained(model.save_pretrained(tmp_path / "pretrained"))
    assert torch.equal(generate(loaded, [0, 1, 10], vae="fmnist", seed=4)["images"], out["images"])
    cli.main(["sample", "--model", str(exported), "--labels", "0", "1", "--cfg", "1.5", "--cfg-schedule",
              "constant", "--top-p", "0.9", "--temperature", "0.9", "--out", str(tmp_path / "samples")])
    assert (tmp_path / "samples" / "samples.png").is_file()
    with pytest.raises(ValueError, match="holds a 'tokenbridge-ar' generator, but a 'tokenbridge' generator"):
        C.load_generator(exported, family="tokenbridge")
