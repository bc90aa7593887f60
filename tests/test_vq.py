"""D2C's coarse discrete tokens: the learned VQ tokenizer of latents (tokenbridge.vq), the training-free quantizer
source and the source builder (tokenbridge.discrete), and `tokenbridge train-vq`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenbridge import cli
from tokenbridge.discrete import MAX_CODES, QuantizerSource, VQSource, build_source
from tokenbridge.quantizer import DimensionwiseQuantizer
from tokenbridge.training.vq import train_vq
from tokenbridge.vq import VQTokenizer, code_usage
from token_files import write_token_file

TINY = {"codebook_size": 64, "dim": 8, "hidden": 32}


def k_patterns(k: int = 8, n: int = 512, grid: tuple[int, int, int] = (4, 4, 2), seed: int = 0) -> torch.Tensor:
    """n latents [n, h, w, C], each one of k fixed random patterns."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(k, *grid, generator=g)
    return patterns[torch.randint(k, (n,), generator=g)]


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory) -> Path:
    """A tiny tokenizer (4 channels, 8x8 latent grid, downsample 2) trained briefly and saved."""
    x = k_patterns(n=256, grid=(8, 8, 4))
    out = tmp_path_factory.mktemp("vq") / "tok"
    train_vq(x[:224], x[224:], {**TINY, "codebook_size": 32}, steps=40, batch_size=16, lr=3e-3, out_dir=out,
             progress=False)
    return out


# ------------------------------------------------------------------------------------------------------------------
# the learned tokenizer


@pytest.mark.parametrize("downsample", [1, 2])
def test_decode_of_encode_is_the_forward_reconstruction(downsample):
    torch.manual_seed(0)
    model = VQTokenizer(channels=2, downsample=downsample, kmeans_init=False, **TINY)
    x = torch.randn(6, 4, 4, 2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    codes = model.encode(x)  # in training mode too, encode leaves the codebook alone
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert codes.dtype == torch.int64 and codes.shape == (6, 4 // downsample, 4 // downsample)
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    model.eval()
    with torch.no_grad():
        recon, fwd_codes, _ = model(x)
    assert torch.equal(fwd_codes, codes)
    decoded = model.decode(codes)
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded, recon, rtol=0, atol=1e-6)


def test_a_tokenizer_learns_k_patterns_and_training_is_deterministic():
    x = k_patterns()
    config = {**TINY, "downsample": 2}  # 8 patterns x 4 cells = 32 distinct cells <= 64 codes
    report = train_vq(x[:448], x[448:], config, steps=200, batch_size=32, lr=3e-3, seed=1, progress=False)
    assert report["latent_mse"] < 0.02 * report["latent_var"], report
    assert report["codes_used"] >= 8 and report["code_grid"] == [2, 2]
    again = train_vq(x[:448], x[448:], config, steps=20, batch_size=32, lr=3e-3, seed=1, progress=False)
    third = train_vq(x[:448], x[448:], config, steps=20, batch_size=32, lr=3e-3, seed=1, progress=False)
    assert again["latent_mse"] == third["latent_mse"] and again["perplexity"] == third["perplexity"]


def test_training_leaves_the_callers_random_stream_alone():
    x = k_patterns()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_vq(x[:448], x[448:], {**TINY, "downsample": 2}, steps=5, batch_size=32, seed=7, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_dead_code_replacement_keeps_the_codebook_in_use():
    g = torch.Generator().manual_seed(0)
    x = 3 + 0.5 * torch.randn(512, 4, 4, 2, generator=g)  # far from a randomly initialised codebook
    reports = {th: train_vq(x[:448], x[448:], {**TINY, "downsample": 1, "kmeans_init": False,
                                                 "threshold_ema_dead_code": th},
                            steps=150, batch_size=32, lr=3e-3, progress=False) for th in (0.0, 2.0)}
    assert reports[2.0]["usage"] > 0.75 and reports[2.0]["perplexity"] > 32, reports[2.0]
    assert reports[0.0]["usage"] < 0.25, reports[0.0]


def test_code_usage_counts_and_perplexity():
    usage = code_usage(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 8)
    assert usage["codes_used"] == 4 and usage["usage"] == 0.5
    assert usage["perplexity"] == pytest.approx(4.0)
    assert code_usage(torch.zeros(10, dtype=torch.long), 8)["perplexity"] == pytest.approx(1.0)


def test_a_saved_folder_loads_with_identical_codes_and_is_not_overwritten(trained_folder, tmp_path):
    model = VQTokenizer.from_pretrained(trained_folder)
    assert sorted(p.name for p in trained_folder.iterdir()) == ["config.json", "model.safetensors"]
    assert model.report["steps"] == 40 and 0 < model.report["usage"] <= 1
    x = k_patterns(n=32, grid=(8, 8, 4), seed=5)
    codes = model.encode(x)
    out = tmp_path / "copy"
    model.save_pretrained(out)
    with pytest.raises(ValueError, match="already holds a VQ tokenizer"):
        model.save_pretrained(out)
    with pytest.raises(ValueError, match="already holds a VQ tokenizer"):
        train_vq(x, x, TINY, steps=1, out_dir=out, progress=False)
    loaded = VQTokenizer.from_pretrained(out)
    assert torch.equal(loaded.encode(x), codes) and loaded.report == model.report
    model.save_pretrained(out, report={"note": "replaced"}, overwrite=True)
    assert VQTokenizer.from_pretrained(out).report == {"note": "replaced"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temporary folder left behind
    with pytest.raises(FileNotFoundError, match="not a VQ tokenizer folder"):
        VQTokenizer.from_pretrained(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------------------------
# the training-free quantizer source


def test_quantizer_source_is_exact_at_bin_centres():
    b, c, pool = 4, 4, 2
    source = QuantizerSource((8, 8), c, levels=b, pool=pool)
    assert source.codebook_size == b**c and source.grid == (4, 4)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(b, (5, 4, 4, c), generator=g)
    centres = source.quantizer.dequantize(idx)  # [5, 4, 4, C] at the bins' reconstruction values
    latents = centres.repeat_interleave(pool, 1).repeat_interleave(pool, 2)  # each cell constant over 2x2
    codes = source.encode(latents)
    expected = sum(idx[..., i] * b**i for i in range(c))
    assert codes.dtype == torch.int64 and torch.equal(codes, expected)
    assert int(codes.min()) >= 0 and int(codes.max()) < b**c
    assert torch.equal(source.decode(codes), latents)
    every = torch.arange(b**c).reshape(1, 16, 16)
    assert torch.equal(QuantizerSource((16, 16), c, levels=b, pool=1).encode(
        QuantizerSource((16, 16), c, levels=b, pool=1).decode(every)), every)


def test_quantizer_source_takes_the_quantizer_defaults_and_refuses_too_many_codes():
    source = build_source({"kind": "quantizer"}, (8, 8), 4)
    q = DimensionwiseQuantizer(levels=source.config["levels"]).config()
    assert source.config["quantizer"] == {k: q[k] for k in ("value_range", "std_range", "kind", "tails")}
    assert build_source({"kind": "quantizer", "levels": 2}, (8, 8), 16).codebook_size == MAX_CODES
    with pytest.raises(ValueError, match=r"4\*\*16 = 4294967296 codes"):
        build_source({"kind": "quantizer", "levels": 4}, (8, 8), 16)
    with pytest.raises(ValueError, match="training-free"):
        build_source({"kind": "quantizer", "quantizer": {"calibration": "quantile"}}, (8, 8), 4)


def test_wrong_grids_channels_and_keys_are_named(trained_folder):
    with pytest.raises(ValueError, match="7x8 is not divisible by the discrete source's pool=2"):
        build_source({"kind": "quantizer", "pool": 2}, (7, 8), 4)
    source = build_source({"kind": "quantizer"}, (8, 8), 4)
    with pytest.raises(ValueError, match=r"takes latents \[N, 8, 8, 4\], got \[2, 8, 8, 8\]"):
        source.encode(torch.zeros(2, 8, 8, 8))
    with pytest.raises(ValueError, match=r"code grid is \[4, 4\]"):
        source.decode(torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must lie in"):
        source.decode(torch.full((1, 4, 4), 256))
    with pytest.raises(ValueError, match="trained on 4 latent channels, these latents have 8"):
        build_source({"kind": "vq", "path": str(trained_folder)}, (8, 8), 8)
    with pytest.raises(ValueError, match="trained on a 8x8 latent grid, got 16x16"):
        build_source({"kind": "vq", "path": str(trained_folder)}, (16, 16), 4)
    with pytest.raises(ValueError, match=r"unknown keys \['levels'\]"):
        build_source({"kind": "vq", "path": str(trained_folder), "levels": 4}, (8, 8), 4)
    with pytest.raises(ValueError, match="'kind' must be one of"):
        build_source({"kind": "vqgan"}, (8, 8), 4)
    with pytest.raises(ValueError, match="needs 'path'"):
        build_source({"kind": "vq"}, (8, 8), 4)


# ------------------------------------------------------------------------------------------------------------------
# build_source round trip and freezing


@pytest.mark.parametrize("kind", ["quantizer", "vq"])
def test_build_source_round_trip_through_a_state_dict(kind, trained_folder):
    config = {"kind": "quantizer", "levels": 3, "pool": 2} if kind == "quantizer" else \
        {"kind": "vq", "path": str(trained_folder)}
    source = build_source(config, (8, 8), 4)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    rebuilt = build_source(source.config, (8, 8), 4, load_weights=False)
    rebuilt.load_state_dict(state)
    x = k_patterns(n=16, grid=(8, 8, 4), seed=3)
    assert torch.equal(rebuilt.encode(x), source.encode(x))
    assert rebuilt.config == source.config and rebuilt.codebook_size == source.codebook_size
    assert source.decode(source.encode(x)).shape == x.shape
    if kind == "vq":
        assert source.grid == (4, 4) and source.config["tokenizer"]["latent_grid"] == [8, 8]


def test_a_vq_source_stays_frozen_inside_a_training_model(trained_folder):
    source = build_source({"kind": "vq", "path": str(trained_folder)}, (8, 8), 4)
    assert isinstance(source, VQSource)
    parent = torch.nn.Sequential(source).train()
    assert not source.training and not source.tokenizer.training
    assert not any(p.requires_grad for p in source.parameters())
    before = {k: v.clone() for k, v in source.state_dict().items()}
    x = k_patterns(n=64, grid=(8, 8, 4), seed=9) * 3
    codes = source.encode(x)
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    for other in (source, build_source({"kind": "quantizer"}, (8, 8), 4)):
        plain = other.encode(x), other.decode(other.encode(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's bf16 autocast: codes stay float32's
            assert torch.equal(other.encode(x), plain[0]) and torch.equal(other.decode(plain[0]), plain[1])
    assert torch.equal(codes, source.encode(x)) and parent is not None


# ------------------------------------------------------------------------------------------------------------------
# tokenbridge train-vq


def test_cli_train_vq_writes_a_loadable_folder_and_reports_usage(tmp_path, capsys):
    latents = k_patterns(n=40, grid=(8, 8, 4)).permute(0, 3, 1, 2).contiguous()
    tokens = write_token_file(tmp_path / "tokens.safetensors", latents, n=40)
    out = tmp_path / "vq"
    args = ["train-vq", "--tokens", str(tokens), "--out", str(out), "--codebook-size", "16", "--dim", "8",
            "--steps", "20", "--batch-size", "8", "--lr", "3e-3", "--device", "cpu"]
    cli.main(args)
    printed = capsys.readouterr().out
    assert "codes used" in printed and "perplexity" in printed and " dB" in printed  # the fmnist VAE gives PSNR
    model = VQTokenizer.from_pretrained(out)
    assert model.codebook_size == 16 and model.report["num_test"] == 2 and model.report["tokens"] == str(tokens)
    assert model.encode(latents.permute(0, 2, 3, 1)).shape == (40, 4, 4)
    with pytest.raises(SystemExit):
        cli.main(args)
    assert "already holds a VQ tokenizer" in capsys.readouterr().err
    for bad, message in ((tmp_path / "none.safetensors", "does not exist"),
                         (write_token_file(tmp_path / "nolat.safetensors", None), "stores no continuous latents")):
        with pytest.raises(SystemExit):
            cli.main(["train-vq", "--tokens", str(bad), "--out", str(tmp_path / "other")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
