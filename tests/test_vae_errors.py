"""Bad VAE inputs give a clear ValueError / FileNotFoundError naming the file and the problem, before any work:
diffusers folders, save_vae files, crafted configs (checked on the meta device before anything is allocated),
kl16 checkpoints, spec strings, train_vae's output path, and the CLI's report of all of these."""

from __future__ import annotations

import dataclasses
import inspect
import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tokenbridge.autoencoder as autoencoder_module
import tokenbridge.training.vae as vae_training
from tokenbridge import cli
from tokenbridge.autoencoder import AutoencoderKL, build_vae
from tokenbridge.vae import (
    FMNIST_WEIGHTS,
    load_kl16,
    load_vae,
    read_vae_metadata,
    save_vae,
)
from tokenbridge.training.vae import train_vae

SHIPPED_GENERATOR = FMNIST_WEIGHTS.parent / "fmnist_generator.safetensors"


def _tiny(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return build_vae("fmnist", ch=4, ch_mult=(1, 2), norm_groups=2, resolution=8).eval()


def _rewrite(src, dst, meta_changes: dict | None = None, tensor_changes: dict | None = None):
    """Copy of the save_vae file ``src`` with metadata entries / tensors replaced (None removes one)."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for store, changes in ((meta, meta_changes), (tensors, tensor_changes)):
        for key, value in (changes or {}).items():
            if value is None:
                store.pop(key)
            else:
                store[key] = value
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture()
def vae_file(tmp_path):
    return save_vae(_tiny(), tmp_path / "tiny.safetensors")


def _config_with(path, **changes) -> str:
    return json.dumps({**read_vae_metadata(path)["config"], **changes})


# ---------------------------------------------------------------------------------------------------- 1. diffusers


@pytest.fixture()
def diffusers_folder(tmp_path, tiny_diffusers_vae):
    tiny_diffusers_vae(tmp_path / "vae")
    return tmp_path / "vae"


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_diffusers_folder_problems_name_the_folder(diffusers_folder, tmp_path):
    assert load_vae(f"diffusers:{diffusers_folder}").latent_channels == 4  # the intact folder loads
    weights = diffusers_folder / "diffusion_pytorch_model.safetensors"

    (diffusers_folder / "config.json").rename(tmp_path / "saved.json")
    with pytest.raises(FileNotFoundError, match=rf"{diffusers_folder} has no config.json"):
        load_vae(f"diffusers:{diffusers_folder}")
    with pytest.raises(FileNotFoundError, match=r"pipeline folder\? use 'diffusers:.*vae'"):
        load_vae(f"diffusers:{tmp_path}")  # a pipeline root (it has vae/) instead of its vae/ folder
    (tmp_path / "saved.json").rename(diffusers_folder / "config.json")

    weights.rename(tmp_path / weights.name)
    with pytest.raises(FileNotFoundError, match=rf"{diffusers_folder} has no weights"):
        load_vae(f"diffusers:{diffusers_folder}")
    (tmp_path / weights.name).rename(weights)

    _edit_config(diffusers_folder, _class_name="UNet2DModel")
    with pytest.raises(ValueError, match=r"config.json describes UNet2DModel, not a diffusers AutoencoderKL"):
        load_vae(f"diffusers:{diffusers_folder}")
    _edit_config(diffusers_folder, _class_name="AutoencoderKL", latent_channels="4")
    with pytest.raises(ValueError, match=r"config.json: needs .*latent_channels"):
        load_vae(f"diffusers:{diffusers_folder}")
    _edit_config(diffusers_folder, latent_channels=8)  # a config that does not fit the stored weights
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors does not match the AutoencoderKL "
                                         r"of .*config.json: .*shape mismatches"):
        load_vae(f"diffusers:{diffusers_folder}")
    _edit_config(diffusers_folder, latent_channels=4, down_block_types=["NoSuchBlock2D"] * 2)
    with pytest.raises(ValueError, match=rf"diffusers cannot build the AutoencoderKL of {diffusers_folder}"):
        load_vae(f"diffusers:{diffusers_folder}")
    _edit_config(diffusers_folder, down_block_types=["DownEncoderBlock2D"] * 2)
    (diffusers_folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not readable JSON"):
        load_vae(f"diffusers:{diffusers_folder}")


def test_diffusers_own_errors_come_back_naming_the_folder(diffusers_folder, monkeypatch):
    import diffusers

    def fail(*args, **kwargs):
        raise OSError("Error no file named diffusion_pytorch_model.safetensors found")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", fail)
    with pytest.raises(ValueError, match=rf"diffusers could not load the VAE folder {diffusers_folder} \(OSError"):
        load_vae(f"diffusers:{diffusers_folder}")


def test_diffusers_huge_config_is_refused_before_allocating(diffusers_folder):
    _edit_config(diffusers_folder, block_out_channels=[100000, 200000])  # ~ 10^12 parameters if built for real
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"does not match .*config.json: block_out_channels = 200000"):
        load_vae(f"diffusers:{diffusers_folder}")
    _edit_config(diffusers_folder, block_out_channels=[8, 16], layers_per_block=10**9)
    with pytest.raises(ValueError, match=r"describes 4000000006 resnet blocks"):
        load_vae(f"diffusers:{diffusers_folder}")
    assert time.perf_counter() - start < 10


# ------------------------------------------------------------------------------------------ 2. save_vae files


def test_malformed_or_incomplete_metadata(vae_file, tmp_path):
    bad = tmp_path / "bad.safetensors"
    cases = [
        ({"config": "{not json"}, r"the VAE metadata's 'config' is not valid JSON"),
        ({"config": "[1, 2]"}, r"the VAE metadata's 'config' is a list, not an object"),
        ({"config": None}, r"the VAE metadata has no 'config' entry"),
        ({"config": json.dumps({"ch": 4})}, r"bad VAE config in the metadata: AutoencoderKL config lacks keys"),
        ({"config": _config_with(vae_file, ch="4")}, r"ch must be an integer, got '4'"),
        ({"config": _config_with(vae_file, ch_mult=[1, 2.5])}, r"ch_mult\[1\] must be an integer"),
        ({"config": _config_with(vae_file, scaling_factor=float("nan"))}, r"scaling_factor=nan"),
        ({"config": _config_with(vae_file, norm_groups=0)}, r"norm_groups=0"),
        ({"config": _config_with(vae_file, colour="blue")}, r"unknown AutoencoderKL config keys: \['colour'\]"),
        ({"training": "{truncated"}, r"the VAE metadata's 'training' is not valid JSON"),
        ({"format": None}, r"a .safetensors file without tokenbridge metadata, not a tokenbridge VAE"),
    ]
    for changes, message in cases:
        _rewrite(vae_file, bad, meta_changes=changes)
        with pytest.raises(ValueError, match=message) as info:
            load_vae(str(bad))
        assert str(bad) in str(info.value), changes
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_vae_metadata(_rewrite(vae_file, bad, meta_changes={"config": "{"}))


def test_truncated_and_garbage_files(vae_file, tmp_path):
    data = vae_file.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("header_only", data[:40]),
                          ("garbage", b"\x00garbage" * 100), ("empty", b"")):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{path}: cannot read as safetensors \(SafetensorError"):
            load_vae(str(path))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"model": _tiny().state_dict()}, ckpt)
    with pytest.raises(ValueError, match=r"cannot read as safetensors.*given as 'kl16:PATH'"):
        load_vae(str(ckpt))  # an existing torch checkpoint given as a bare path


def test_files_that_are_not_vaes(vae_file, tmp_path):
    export = tmp_path / "generator.safetensors"
    save_file({"backbone.weight": torch.zeros(2, 2)}, str(export), metadata={"format": "tokenbridge-generator"})
    with pytest.raises(ValueError, match=rf"{export} is a 'tokenbridge-generator' file, not a tokenbridge VAE"):
        load_vae(str(export))
    if SHIPPED_GENERATOR.is_file():
        with pytest.raises(ValueError, match="'tokenbridge-generator' file, not a tokenbridge VAE"):
            load_vae(str(SHIPPED_GENERATOR))
    bad = tmp_path / "bad.safetensors"
    _rewrite(vae_file, bad, tensor_changes={"decoder.conv_out.bias": None, "extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"1 missing: decoder.conv_out.bias; 1 unexpected: extra.weight"):
        load_vae(str(bad))
    _rewrite(vae_file, bad, tensor_changes={"decoder.conv_out.bias": torch.zeros(1, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"'decoder.conv_out.bias' is torch.int64, not a floating-point tensor"):
        load_vae(str(bad))
    _rewrite(vae_file, bad, tensor_changes={"decoder.conv_out.bias": torch.tensor([float("nan")])})
    with pytest.raises(ValueError, match=rf"{bad}: 1 tensors contain NaN or inf \(decoder.conv_out.bias\)"):
        load_vae(str(bad))


def test_half_precision_file_loads_as_float32(vae_file, tmp_path):
    with safe_open(str(vae_file), framework="pt") as f:
        half = {k: f.get_tensor(k).half() for k in f.keys()}
    path = _rewrite(vae_file, tmp_path / "half.safetensors", tensor_changes=half)
    vae = load_vae(str(path))
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in vae.parameters())


# --------------------------------------------------------------------- 3. crafted configs: checked before allocating


def _built_on(monkeypatch) -> list[str]:
    """Records the device of every AutoencoderKL built from now on (its first parameter's)."""
    devices: list[str] = []
    original = AutoencoderKL.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        devices.append(next(self.parameters()).device.type)

    monkeypatch.setattr(AutoencoderKL, "__init__", spy)
    return devices


def test_huge_width_config_fails_fast_without_allocating(vae_file, tmp_path, monkeypatch):
    devices = _built_on(monkeypatch)
    crafted = _rewrite(vae_file, tmp_path / "crafted.safetensors",
                       meta_changes={"config": _config_with(vae_file, ch=100000)})  # terabytes of float32 if built
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"{crafted} does not match its AutoencoderKL config: ch \* max\(ch_mult\) "
                                         r"= 200000 in the config, but the largest stored tensor has 576 elements"):
        load_vae(str(crafted))
    _rewrite(vae_file, crafted, meta_changes={"config": _config_with(vae_file, num_res_blocks=10**9)})
    with pytest.raises(ValueError, match=r"describes 4000000006 resnet blocks, the file has only \d+ tensors"):
        load_vae(str(crafted))
    assert time.perf_counter() - start < 5
    assert devices == []  # refused by arithmetic: nothing was built at all


def test_meta_device_comparison_alone_catches_a_huge_width(vae_file, tmp_path, monkeypatch):
    # Without the arithmetic first check the model is built, but on the meta device, and every parameter shape is
    # compared with the stored one before any memory is allocated.
    monkeypatch.setattr(autoencoder_module, "cannot_match", lambda *args: None)
    devices = _built_on(monkeypatch)
    crafted = _rewrite(vae_file, tmp_path / "crafted.safetensors",
                       meta_changes={"config": _config_with(vae_file, ch=100000)})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"does not match the AutoencoderKL layout: .*shape mismatches: "
                                         r"encoder.conv_in.weight: file \(4, 1, 3, 3\) vs model \(100000, 1, 3, 3\)"):
        load_vae(str(crafted))
    assert time.perf_counter() - start < 5
    assert devices == ["meta"]


def test_valid_file_is_built_on_meta_then_materialised(vae_file, monkeypatch):
    devices = _built_on(monkeypatch)
    vae = load_vae(str(vae_file))
    assert devices == ["meta"] and all(p.device.type == "cpu" for p in vae.parameters())
    torch.testing.assert_close(vae.state_dict(), _tiny().state_dict())


def test_kl16_checkpoints_are_checked_on_the_meta_device(tmp_path, monkeypatch):
    tiny = _tiny()
    ckpt = tmp_path / "kl16.ckpt"
    torch.save({"model": tiny.state_dict()}, ckpt)
    huge = dataclasses.replace(tiny.config, ch=100000)
    devices = _built_on(monkeypatch)
    with pytest.raises(ValueError, match=rf"{ckpt} does not match the AutoencoderKL layout: .*missing"):
        load_kl16(ckpt)  # the real kl16 architecture (66M parameters) is only ever built on the meta device
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"ch \* max\(ch_mult\) = 200000 in the config"):
        load_kl16(ckpt, config=huge)
    assert time.perf_counter() - start < 5
    assert devices == ["meta"]
    for bad, message in (({"model": {"encoder.conv_in.weight": "weights"}}, r"'encoder.conv_in.weight' is str"),
                         ({"model": {**tiny.state_dict(), "decoder.conv_out.bias": torch.full((1,), float("inf"))}},
                          r"1 tensors contain NaN or inf")):
        torch.save(bad, ckpt)
        with pytest.raises(ValueError, match=message):
            load_kl16(ckpt, config=tiny.config)
    with pytest.raises(ValueError, match="config must be an AutoencoderKLConfig"):
        load_kl16(ckpt, config={"ch": 4})


# --------------------------------------------------------------------------------------------------- 4. specs


@pytest.mark.parametrize("spec", ["kl16", "kl16:", "diffusers", "diffusers:", "diffusers:  "])
def test_spec_forms_without_a_path(spec):
    with pytest.raises(ValueError, match=r"needs a path after the colon; use 'fmnist' .*'kl16:/path/kl16.ckpt'"):
        load_vae(spec)


def test_unknown_or_missing_specs_name_the_accepted_forms(tmp_path):
    forms = r"'fmnist' \(the shipped VAE\), 'kl16:/path/kl16.ckpt'.*'diffusers:/local/folder'.*\.safetensors"
    for spec in ("sdxl", "FMNIST", "", None, 3):
        with pytest.raises(ValueError, match=forms):
            load_vae(spec)
    for spec in (tmp_path / "none.safetensors", tmp_path / "sub" / "vae", "vae.ckpt"):
        with pytest.raises(FileNotFoundError, match=rf"{spec} not found.*{forms}"):
            load_vae(str(spec))
    with pytest.raises(ValueError, match=rf"{tmp_path}' is a directory, not a VAE file; use {forms}"):
        load_vae(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is a directory, not a VAE file; for a diffusers folder use 'diffusers:"):
        load_vae(str(tmp_path))
    with pytest.raises(ValueError, match=rf"VAE checkpoint {tmp_path} is a directory, not a file"):
        load_vae(f"kl16:{tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"VAE checkpoint .*none.ckpt not found"):
        load_vae(f"kl16:{tmp_path / 'none.ckpt'}")
    with pytest.raises(ValueError, match=rf"diffusers VAE folder {tmp_path / 'config.json'} is a file"):
        load_vae(f"diffusers:{tmp_path / 'config.json'}")
    with pytest.raises(FileNotFoundError, match=r"diffusers VAE folder .*nowhere not found"):
        load_vae(f"diffusers:{tmp_path / 'nowhere'}")


def test_bad_devices_fail_before_loading(vae_file):
    for device in ("bogus", "cuda:99", "meta"):
        with pytest.raises(ValueError, match="device"):
            load_vae(str(vae_file), device=device)


# ------------------------------------------------------------------------------------------------ 5. train_vae


def test_train_vae_checks_its_output_before_training(tmp_path, monkeypatch):
    assert inspect.signature(train_vae).parameters["out_path"].default is inspect.Parameter.empty

    def no_data(*args, **kwargs):
        raise AssertionError("train_vae read data before checking its arguments")

    monkeypatch.setattr(vae_training, "as_tensors", no_data)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "dir.safetensors").mkdir()
    cases = [
        (tmp_path / "dir.safetensors", r"dir.safetensors is a directory"),
        (tmp_path / "a_file" / "vae.safetensors", r"cannot create the folder of VAE output .*a_file/vae.safetensors"),
        (tmp_path / "vae.pt", r"out_path must be the .safetensors file to write"),
        (None, r"out_path must be the .safetensors file to write"),
    ]
    for out, message in cases:
        with pytest.raises(ValueError, match=message):
            train_vae(out, steps=2)
    out = tmp_path / "new" / "folder" / "vae.safetensors"
    for kwargs, message in (({"steps": 0}, "steps=0"), ({"steps": 1.5}, "steps=1.5"), ({"lr": float("nan")}, "lr=nan"),
                            ({"log_every": 0}, "log_every=0"), ({"kl_weight": -1}, "kl_weight=-1"),
                            ({"preset": "kl99"}, "unknown VAE preset"), ({"device": "cuda:99"}, "device")):
        with pytest.raises(ValueError, match=message):
            train_vae(out, **kwargs)
    assert not out.parent.exists()  # nothing is created for arguments that fail


def test_train_vae_stops_on_a_diverged_loss_without_writing(tmp_path, monkeypatch, fake_fashion_mnist):
    def broken(preset):
        vae = _tiny()
        with torch.no_grad():
            vae.decoder.conv_out.bias.fill_(float("nan"))
        return vae

    monkeypatch.setattr(vae_training, "build_vae", broken)
    out = tmp_path / "vae.safetensors"
    with pytest.raises(ValueError, match=rf"the loss is nan at step 0 .*{out} was not written"):
        train_vae(out, steps=2, batch_size=4, data_root=fake_fashion_mnist(tmp_path), log_every=1)
    assert not out.exists()
    with pytest.raises(ValueError, match="tensors contain NaN or inf"):
        save_vae(broken("fmnist"), out)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_reports_a_bad_vae_file(tmp_path, capsys):
    bad = tmp_path / "broken_vae.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SystemExit) as info:
        cli.main(["reconstruct", "--vae", str(bad), "--num-images", "2", "--levels", "8", "--ranges", "3",
                  "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "tokenbridge reconstruct: error:" in err and "broken_vae.safetensors" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
