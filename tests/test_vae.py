import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenbridge.autoencoder import PRESETS, AutoencoderKL, AutoencoderKLConfig, build_vae
from tokenbridge.data import as_tensors, fashion_mnist_root
from tokenbridge.metrics import psnr
from tokenbridge.vae import (
    FMNIST_WEIGHTS,
    load_kl16,
    load_vae,
    read_vae_metadata,
    save_vae,
    vae_fingerprint,
)
from tokenbridge.training.vae import train_vae

TINY = AutoencoderKLConfig(
    ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=4, embed_dim=4, in_channels=3,
    resolution=16, norm_groups=4, scaling_factor=0.5,
)
# The shipped weights give 28.86 dB mean per-image PSNR ([0, 1] scale) on the first 256 test images (see
# FMNIST_TRAINING in training/vae.py); the bound leaves room for numerics across platforms.
FMNIST_MIN_PSNR_DB = 27.5


def kl16_meta_state():
    with torch.device("meta"):
        model = AutoencoderKL(PRESETS["kl16"])
    return model, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_kl16_layout_matches_mar_checkpoint():
    model, shapes = kl16_meta_state()
    assert 66.3e6 < sum(p.numel() for p in model.parameters()) < 66.7e6
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.4.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.4.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quant_conv.weight": (32, 32, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    nin = sorted(k.rsplit(".", 2)[0] for k in shapes if "nin_shortcut.weight" in k)
    assert nin == ["decoder.up.1.block.0", "decoder.up.3.block.0", "encoder.down.2.block.0", "encoder.down.4.block.0"]
    attn = {k.split(".attn")[0] for k in shapes if ".attn" in k}
    assert attn == {"encoder.down.4", "encoder.mid", "decoder.mid"}
    assert {k.split(".")[2] for k in shapes if ".downsample." in k} == {"0", "1", "2", "3"}
    assert {k.split(".")[2] for k in shapes if ".upsample." in k} == {"1", "2", "3", "4"}
    assert {k.split(".")[4] for k in shapes if k.startswith("decoder.up.") and ".block." in k} == {"0", "1", "2"}
    assert {k.split(".")[4] for k in shapes if k.startswith("encoder.down.") and ".block." in k} == {"0", "1"}
    assert model.latent_channels == 16 and model.stride == 16 and model.scaling_factor == 0.2325


def test_kl16_loader_round_trip(tmp_path):
    torch.manual_seed(0)
    src = AutoencoderKL(TINY).eval()
    path = tmp_path / "kl.ckpt"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)
    loaded = load_kl16(path, config=TINY, scaling_factor=0.25)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = loaded.encode(x)
        assert z.shape == (2, 4, 8, 8)
        assert torch.allclose(z, src.encode_moments(x)[0] * 0.25, atol=1e-6)
        assert torch.allclose(loaded.decode(z), src.decoder(src.post_quant_conv(z / 0.25)), atol=1e-5)
    bare = tmp_path / "bare.ckpt"
    torch.save(src.state_dict(), bare)
    assert load_kl16(bare, config=TINY).scaling_factor == 0.2325


def test_kl16_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_kl16(tmp_path / "missing.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        load_kl16(corrupt)
    state = AutoencoderKL(TINY).state_dict()
    state["extra.weight"] = state.pop("encoder.conv_in.weight")
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"model": state}, wrong)
    with pytest.raises(ValueError, match=r"missing: encoder.conv_in.weight.*unexpected: extra.weight"):
        load_kl16(wrong, config=TINY)
    with pytest.raises(ValueError, match="missing"):  # a tiny checkpoint is not a kl16 checkpoint
        load_kl16(wrong)
    shapes = AutoencoderKL(TINY).state_dict()
    shapes["post_quant_conv.weight"] = torch.zeros(4, 4, 3, 3)
    torch.save({"model": shapes}, wrong)
    with pytest.raises(ValueError, match=r"shape mismatches: post_quant_conv.weight"):
        load_kl16(wrong, config=TINY)
    torch.save({"state_dict": [1, 2]}, wrong)
    with pytest.raises(ValueError, match="'model'"):
        load_kl16(wrong)


def test_save_load_safetensors(tmp_path):
    vae = AutoencoderKL(TINY).eval()
    path = save_vae(vae, tmp_path / "v.safetensors", training={"steps": 1})
    assert not (tmp_path / "v.safetensors.tmp").exists()
    meta = read_vae_metadata(path)
    assert meta["config"]["ch_mult"] == [1, 2] and meta["training"] == {"steps": 1}
    loaded = load_vae(str(path))
    assert loaded.config == TINY and loaded.scaling_factor == 0.5
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), vae.encode(x), atol=1e-6)


def test_load_vae_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown VAE spec"):
        load_vae("sdxl")
    with pytest.raises(FileNotFoundError):
        load_vae(str(tmp_path / "none.safetensors"))
    with pytest.raises(FileNotFoundError):
        load_vae("kl16:" + str(tmp_path / "none.ckpt"))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read as safetensors"):
        load_vae(str(tmp_path / "bad.safetensors"))
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="diffusers"):
            load_vae("diffusers:" + str(tmp_path))


def test_input_validation():
    vae = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match="channels"):
        vae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vae.encode(torch.full((1, 3, 16, 16), 255.0))
    with pytest.raises(ValueError, match="NaN"):
        vae.encode(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="latents have 3 channels"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="preset"):
        build_vae("kl99")


def test_sampling_uses_posterior():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode_moments(x)
        g = torch.Generator().manual_seed(1)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
        z = vae.encode(x, sample=True, generator=g)
    assert torch.allclose(z, (mean + (0.5 * logvar).exp() * noise) * 0.5, atol=1e-6)


@pytest.mark.skipif(not FMNIST_WEIGHTS.is_file(), reason="shipped fmnist weights not trained yet")
@pytest.mark.skipif(not (fashion_mnist_root() / "t10k-images-idx3-ubyte.gz").is_file(), reason="no Fashion-MNIST")
def test_shipped_fmnist_vae():
    vae = load_vae("fmnist")
    assert (vae.latent_channels, vae.stride, vae.image_channels) == (4, 4, 1)
    assert FMNIST_WEIGHTS.stat().st_size < 5e6
    x, _ = as_tensors("test", limit=256)
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (256, 4, 8, 8)
        assert torch.allclose(z, vae.encode_moments(x)[0] * vae.scaling_factor)
        recon = vae.decode(z)
    assert recon.shape == x.shape
    assert psnr(recon.clamp(-1, 1), x).mean() > FMNIST_MIN_PSNR_DB
    std = z.transpose(0, 1).flatten(1).std(1)
    assert torch.all(std > 0.4) and torch.all(std < 1.6), std  # every channel used, roughly unit scale
    assert z.std() == pytest.approx(1.0, abs=0.1) and z.mean().abs() < 0.2
    assert z.abs().max() < 8
    assert vae.training_info["steps"] == 1400


def test_train_vae_smoke(tmp_path, fake_fashion_mnist):
    out = tmp_path / "w" / "vae.safetensors"
    vae = train_vae(out, steps=2, batch_size=4, data_root=fake_fashion_mnist(tmp_path), log_every=1)
    loaded = load_vae(str(out))
    assert loaded.scaling_factor == pytest.approx(vae.scaling_factor) and loaded.scaling_factor != 1.0
    assert loaded.training_info["steps"] == 2 and len(loaded.training_info["test_latents"]["std"]) == 4


def test_diffusers_folder_is_wrapped_with_its_scaling_factor(tmp_path, tiny_diffusers_vae):
    model = tiny_diffusers_vae(tmp_path / "vae", scaling_factor=0.5)

    vae = load_vae(f"diffusers:{tmp_path / 'vae'}")
    assert (vae.latent_channels, vae.stride, vae.scaling_factor) == (4, 2, 0.5)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images)
        assert latents.shape == (2, 4, 8, 8)
        torch.testing.assert_close(latents, model.encode(images).latent_dist.mean * 0.5)
        torch.testing.assert_close(vae.decode(latents), model.decode(latents / 0.5).sample)
    with pytest.raises(ValueError):
        vae.encode(torch.rand(2, 1, 16, 16))  # wrong channel count
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vae(f"diffusers:{tmp_path / 'missing'}")


# ---------------------------------------------------------------------------------------------------------------
# vae_fingerprint


def _tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return build_vae("fmnist", ch=4, ch_mult=(1, 2), norm_groups=2, resolution=8).eval()


def test_fingerprint_format_and_golden_value():
    vae = _tiny_vae()
    with torch.no_grad():  # weights independent of torch's RNG and kernels
        for i, t in enumerate(vae.state_dict().values()):
            t.copy_(((torch.arange(t.numel()) % 17 - 8) * (i + 1)).reshape(t.shape) / 64)  # exact in float32
    fp = vae_fingerprint(vae)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == vae_fingerprint(vae)
    assert fp == "25209163b2a96169"  # changing the definition invalidates fingerprints stored with trained generators


def test_fingerprint_changes_with_any_weight():
    vae = _tiny_vae()
    base = vae_fingerprint(vae)
    state = vae.state_dict()
    seen = {base}
    with torch.no_grad():
        for key, tensor in state.items():
            flat = tensor.view(-1)
            old = flat[-1].clone()
            flat[-1] += 1e-3
            fp = vae_fingerprint(vae)
            assert fp not in seen, key
            seen.add(fp)
            flat[-1] = old
    assert vae_fingerprint(vae) == base
    assert vae_fingerprint(_tiny_vae(seed=1)) != base
    assert vae_fingerprint(_tiny_vae().to(torch.bfloat16)) != base  # same weights, other storage dtype


def test_fingerprint_stable_across_loads_and_processes(tmp_path):
    vae = _tiny_vae()
    path = save_vae(vae, tmp_path / "tiny.safetensors")
    fp = vae_fingerprint(vae)
    assert vae_fingerprint(load_vae(str(path))) == fp == vae_fingerprint(load_vae(str(path)))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"model": vae.state_dict()}, ckpt)
    same = load_kl16(ckpt, config=vae.config, scaling_factor=vae.scaling_factor)
    assert vae_fingerprint(same) == fp  # same weights and scale through the kl16 loader
    assert vae_fingerprint(load_kl16(ckpt, config=vae.config, scaling_factor=0.5)) != fp  # another latent scale
    code = f"from tokenbridge.vae import load_vae, vae_fingerprint; print(vae_fingerprint(load_vae({str(path)!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == fp


def test_fingerprint_rejects_meta_weights():
    with torch.device("meta"):
        vae = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match="meta"):
        vae_fingerprint(vae)


@pytest.mark.skipif(not FMNIST_WEIGHTS.is_file(), reason="shipped fmnist weights not trained yet")
def test_fingerprint_of_shipped_fmnist_vae():
    first, second = load_vae("fmnist"), load_vae("fmnist")
    assert vae_fingerprint(first) == vae_fingerprint(second)
    assert vae_fingerprint(first) != vae_fingerprint(build_vae("fmnist"))


def test_fingerprint_of_diffusers_wrapper_hashes_the_wrapped_model(tmp_path, tiny_diffusers_vae):
    model = tiny_diffusers_vae(tmp_path / "vae")
    vae = load_vae(f"diffusers:{tmp_path / 'vae'}")
    keys = vae.state_dict().keys()
    assert set(keys) == {f"model.{k}" for k in model.state_dict()}
    fp = vae_fingerprint(vae)
    assert fp == vae_fingerprint(load_vae(f"diffusers:{tmp_path / 'vae'}"))
    with torch.no_grad():
        next(vae.model.parameters()).view(-1)[0] += 1e-3
    assert vae_fingerprint(vae) != fp
