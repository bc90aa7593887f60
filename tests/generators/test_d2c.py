"""The D2C family (discrete codes, then continuous MAR fused with them): the fusion modules' contract, two-stage
sampling, the training life cycle (exact resume per trained stage, generate, pretrained folders) and the errors a
mismatched discrete grid or codebook gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from tokenbridge import checkpoint as C
from tokenbridge import cli
from tokenbridge import train as T
from tokenbridge.backbone import MAR
from tokenbridge.config import ConfigError
from tokenbridge.generate import generate
from tokenbridge.generators import D2CGenerator
from tokenbridge.tokens import TOKENS_FORMAT
from tokenbridge.vq import VQTokenizer

N, GRID = 32, (8, 8, 4)
KINDS = ("qformer", "cross_attention")


def tiny_latents(n: int = N, seed: int = 123) -> TensorDataset:
    """Latents [n, 8, 8, 4] channel-last with class-dependent means."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    latents = 0.5 * torch.randn(n, *GRID, generator=g) + (labels.float() / 5 - 1)[:, None, None, None]
    return TensorDataset(latents, labels)


def tiny_run(out_dir: Path, stages: list[int] | None = None, **train) -> dict:
    base = {"steps": 6, "global_batch": 8, "lr": 3e-3, "warmup_steps": 2, "min_lr": 1e-4, "ema": 0.9,
            "ckpt_every": 2, "log_every": 1, "device": "cpu"}
    model = {"preset": "tiny", "stage2": {"backbone": {"dropout": 0.1}}}
    if stages is not None:
        model["train_stages"] = stages
    return {"out_dir": str(out_dir), "seed": 3, "family": "d2c", "model": model, "train": {**base, **train}}


def tiny_model(kind: str = "qformer", seed: int = 0, **config) -> D2CGenerator:
    torch.manual_seed(seed)
    return D2CGenerator.from_config({"preset": "tiny", "stage2": {"fusion": {"kind": kind}}, **config}).eval()


def wake(module: torch.nn.Module, std: float = 0.1) -> None:
    """Give a module's zero-initialised output layers weights, as training would (else their outputs are 0)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def backbone_inputs(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, 4, generator=g), torch.randint(0, 10, (n,), generator=g), torch.rand(n, 64, generator=g) < 0.6


# ------------------------------------------------------------------------------------------------------------------
# fusion


@pytest.mark.parametrize("kind", KINDS)
def test_fusion_output_follows_the_codes_and_only_them(kind):
    model = tiny_model(kind)
    wake(model.stage2.backbone.fusion)
    wake(model.stage2.head)
    stage2 = model.stage2
    tokens, labels, mask = backbone_inputs()
    codes = torch.randint(0, model.codebook_size, (3, 4, 4), generator=torch.Generator().manual_seed(1))
    other = codes.clone()
    other[1, 2, 3] = (other[1, 2, 3] + 1) % model.codebook_size  # one code of row 1 changed
    x, t = torch.randn(3 * 64, 4), torch.full((3 * 64,), 500)
    with torch.no_grad():
        z = stage2.features(tokens, labels, mask, codes)
        z_other = stage2.features(tokens, labels, mask, other)
        eps = stage2.head.denoise(x, t, stage2.head.z_cond(z.flatten(0, 1)))[0].view(3, 64, 4)
        eps_other = stage2.head.denoise(x, t, stage2.head.z_cond(z_other.flatten(0, 1)))[0].view(3, 64, 4)
        # the same codes as another object, and in other batch positions
        assert torch.equal(stage2.features(tokens, labels, mask, codes.clone()), z)
        perm = torch.tensor([2, 0, 1])
        permuted = stage2.features(tokens[perm], labels[perm], mask[perm], codes[perm].clone())
    torch.testing.assert_close(permuted, z[perm], rtol=1e-5, atol=1e-6)
    assert (z_other[1] - z[1]).abs().max() > 1e-4 and (eps_other[1] - eps[1]).abs().max() > 1e-4
    torch.testing.assert_close(z_other[[0, 2]], z[[0, 2]], rtol=0, atol=1e-6)  # other rows: their codes are equal
    torch.testing.assert_close(eps_other[[0, 2]], eps[[0, 2]], rtol=0, atol=1e-6)


def test_an_untrained_cross_attention_fusion_is_the_plain_backbone():
    """Zero-initialised output projections: before training, the fused backbone is exactly the MAR baseline."""
    model = tiny_model("cross_attention")
    fused = model.stage2.backbone
    backbone_cfg = model.config["stage2"]["backbone"]
    plain = MAR(grid_size=(8, 8), token_dim=4, num_classes=10, **backbone_cfg).eval()
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if not k.startswith("fusion.")})
    tokens, labels, mask = backbone_inputs()
    codes = torch.randint(0, model.codebook_size, (3, 4, 4))
    with torch.no_grad():
        assert torch.equal(model.stage2.features(tokens, labels, mask, codes), plain(tokens, labels, mask))
    with pytest.raises(ValueError, match="needs the discrete context"):  # never runs without codes
        fused(tokens, labels, mask)


# ------------------------------------------------------------------------------------------------------------------
# sampling


def test_two_stage_sampling_is_deterministic_under_a_seed():
    model = tiny_model()
    wake(model.stage2.head)
    labels = torch.tensor([0, 3, 7])
    opts = {"num_iter": 3, "num_sampling_steps": 4, "cfg": 2.0, "stage1_cfg": 2.0, "stage1_top_k": 50}
    seen = []
    a = model.sample(labels, generator=5, callback=lambda out: seen.append(out["codes"]), **opts)
    b = model.sample(labels, generator=5, **opts)
    assert a["latents"].shape == (3, 4, 8, 8) and a["codes"].shape == (3, 4, 4) and a["codes"].dtype == torch.int64
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["codes"], b["codes"])
    c = model.sample(labels, generator=6, **opts)
    assert not torch.equal(a["codes"], c["codes"]) and not torch.equal(a["latents"], c["latents"])
    assert len(seen) == 3 and all(torch.equal(s, a["codes"]) for s in seen)
    # stage 2 alone on given codes: deterministic too, and the codes steer it
    given = model.sample_stage2(labels, a["codes"], generator=9, num_iter=3, num_sampling_steps=4)
    again = model.sample_stage2(labels, a["codes"].clone(), generator=9, num_iter=3, num_sampling_steps=4)
    assert torch.equal(given["latents"], again["latents"]) and torch.equal(given["codes"], a["codes"])


def test_bad_codes_and_options_are_named_before_any_work():
    model = tiny_model()
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"codes must be \[N=2, 4, 4\].*discrete grid.*\(2, 3, 3\)"):
        model.sample_stage2(labels, torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook_size=256"):
        model.sample_stage2(labels, torch.full((2, 4, 4), 256))
    with pytest.raises(ValueError, match="integer"):
        model.sample_stage2(labels, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="unknown stage-2 sampling options.*stage1_cfg"):
        model.sample_stage2(labels, torch.zeros(2, 4, 4, dtype=torch.long), stage1_cfg=2.0)


# ------------------------------------------------------------------------------------------------------------------
# config errors: grid and codebook of the source


def test_a_source_that_does_not_match_the_recorded_codebook_or_grid(tmp_path):
    config = tiny_model().config  # resolved: records codebook_size 256 and code_grid [4, 4]
    assert config["codebook_size"] == 256 and config["code_grid"] == [4, 4]
    fewer_levels = {**config, "source": {"kind": "quantizer", "levels": 3, "pool": 2}}
    with pytest.raises(ConfigError, match=r"model.codebook_size' = 256 but the discrete source .* gives 81"):
        D2CGenerator.from_config(fewer_levels)
    coarser = {**config, "source": {"kind": "quantizer", "levels": 4, "pool": 4}}
    with pytest.raises(ConfigError, match=r"model.code_grid' = \[4, 4\] but .* gives \[2, 2\]"):
        D2CGenerator.from_config(coarser)
    with pytest.raises(ConfigError, match="pool=3"):
        D2CGenerator.from_config({"preset": "tiny", "source": {"kind": "quantizer", "pool": 3}})
    VQTokenizer(channels=3, codebook_size=16, dim=4, hidden=8, kmeans_init=False).save_pretrained(tmp_path / "vq3")
    with pytest.raises(ConfigError, match="model.source.*trained on 3 latent channels, these latents have 4"):
        D2CGenerator.from_config({"preset": "tiny", "source": {"kind": "vq", "path": str(tmp_path / "vq3")}})
    with pytest.raises(ConfigError, match="train_stages"):
        T.check_run_config({**tiny_run(tmp_path / "x"), "model": {"preset": "tiny", "train_stages": [3]}})
    # the shipped config passes the checks; its documented VQ alternative names a missing tokenizer folder
    assert T.load_run_config("fmnist-d2c").model["stage2"]["fusion"]["kind"] == "qformer"
    with pytest.raises(ConfigError, match=r"model.source.*not a VQ tokenizer folder"):
        T.load_run_config("fmnist-d2c", [f"model.source={{kind: vq, path: {tmp_path / 'none'}}}"])


# ------------------------------------------------------------------------------------------------------------------
# life cycle


@pytest.mark.parametrize("stages", [[2]])  # both stages (the default): tests/generators/test_family_contract.py
def test_resume_is_bit_identical(tmp_path, stages):
    full = T.train(tiny_run(tmp_path / "full", stages), dataset=tiny_latents())
    part_cfg = tiny_run(tmp_path / "part", stages)
    assert T.train(part_cfg, dataset=tiny_latents(), stop_at=3)["step"] == 3
    resumed = T.train(part_cfg, dataset=tiny_latents())
    assert resumed["step"] == full["step"] == 6 and resumed["loss"] == full["loss"]
    a, b = (C.load_checkpoint(p / C.CHECKPOINT_NAME) for p in (tmp_path / "full", tmp_path / "part"))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    init = tiny_model(seed=3).state_dict()  # the trainer seeds with run.seed before building
    moved = {n.split(".")[0] for n, v in a["model"].items() if v.is_floating_point() and not torch.equal(v, init[n])}
    assert moved == ({"stage1", "stage2"} if stages == [1, 2] else {"stage2"})


def write_token_file(path: Path, n: int = 16) -> Path:
    """A cache-latents file with latents [n, 4, 8, 8] (as tests/generators/test_mar.py writes them)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"indices": torch.randint(0, 64, (n, 8, 8, 4), dtype=torch.uint8, generator=g),
               "labels": torch.randint(0, 10, (n,), dtype=torch.int64, generator=g),
               "latents": torch.randn(n, 4, 8, 8, generator=g)}
    meta = {"format": TOKENS_FORMAT, "version": "1", "levels": "64", "quantizer": "{}", "num_classes": "10",
            "vae": "fmnist"}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_train_on_a_token_file_then_generate_and_round_trip(tmp_path):
    cfg = tiny_run(tmp_path / "run", steps=2, global_batch=4)
    cfg["data"] = {"source": "tokens", "tokens": str(write_token_file(tmp_path / "tokens.safetensors"))}
    T.train(cfg)
    ckpt = tmp_path / "run" / C.CHECKPOINT_NAME
    opts = {"vae": "fmnist", "seed": 4, "num_iter": 2, "num_sampling_steps": 3, "cfg": 2.0, "clip_denoised": 3.0}
    out = generate(ckpt, [0, 1, 2], **opts)
    assert out["images"].shape == (3, 1, 32, 32) and out["codes"].shape == (3, 4, 4)
    assert float(out["images"].min()) >= -1 and float(out["images"].max()) <= 1
    assert torch.equal(generate(ckpt, [0, 1, 2], **opts)["images"], out["images"])
    cli.main(["sample", "--model", str(ckpt), "--labels", "0", "1", "--num-iter", "2", "--num-sampling-steps", "3",
              "--stage1-top-k", "5", "--out", str(tmp_path / "samples")])
    assert (tmp_path / "samples" / "samples.png").is_file()
    model = C.load_generator(ckpt, family="d2c")
    loaded = D2CGenerator.from_pretrained(model.save_pretrained(tmp_path / "pretrained"))
    assert torch.equal(generate(loaded, [0, 1, 2], **opts)["images"], out["images"])


def test_a_vq_source_round_trips_through_a_pretrained_folder_without_its_folder(tmp_path):
    torch.manual_seed(0)
    latents, labels = tiny_latents(4)[:]
    vq = VQTokenizer(channels=4, codebook_size=16, dim=4, hidden=8)
    vq(tiny_latents(16, seed=5)[:][0])  # one training-mode pass: k-means initialises the codebook (not all one code)
    vq.eval().save_pretrained(tmp_path / "vq")
    model = tiny_model(source={"kind": "vq", "path": str(tmp_path / "vq")})
    assert model.codebook_size == 16 and model.code_grid == (4, 4)
    codes = model.source.encode(latents)
    assert torch.equal(codes, vq.encode(latents)) and len(codes.unique()) > 1  # the folder's weights were loaded
    folder = model.save_pretrained(tmp_path / "d2c")
    (tmp_path / "vq").rename(tmp_path / "gone")  # the pretrained folder must not need the tokenizer folder
    loaded = D2CGenerator.from_pretrained(folder)
    assert torch.equal(loaded.source.encode(latents), codes)
    opts = {"num_iter": 2, "num_sampling_steps": 3, "generator": 1}
    a, b = model.sample(labels, **opts), loaded.sample(labels, **opts)
    assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["latents"], b["latents"])
