"""Pretrained folders (config.json + model.safetensors) for every family: save_pretrained / from_pretrained,
load_generator and export reading them."""

from __future__ import annotations

import json

import official_format as off
import pytest
import torch

from tokenbridge.checkpoint import export_weights, load_generator
from tokenbridge.official import convert_mar, convert_tokenbridge
from tokenbridge.generators import ContinuousMARGenerator, TokenBridgeGenerator


def _converted(family):
    if family == "tokenbridge":
        return convert_tokenbridge(off.tokenbridge_checkpoint(), num_heads=off.HEADS, head_num_heads=off.HEAD_HEADS)
    return convert_mar(off.mar_checkpoint(), num_heads=off.HEADS)


def _features(model):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, off.L, off.C, generator=g)
    mask = torch.rand(2, off.L, generator=g) < 0.5
    return model.backbone(tokens, torch.tensor([1, off.CLASSES]), mask)


@pytest.mark.parametrize("family", ["tokenbridge", "mar"])
def test_convert_save_load_gives_identical_outputs(tmp_path, family):
    model = _converted(family)
    folder = model.save_pretrained(tmp_path / family)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    record = json.loads((folder / "config.json").read_text())
    assert record["family"] == family and record["source"]["format"] == f"official-{family}"
    loaded = type(model).from_pretrained(folder)
    assert not loaded.training and loaded.provenance["sample"] == model.provenance["sample"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        z = _features(model)
        assert torch.equal(_features(loaded), z)
        if family == "tokenbridge":
            idx = torch.randint(0, off.LEVELS, (4, off.C))
            for use_cache in (True, False):
                assert torch.equal(loaded.head.sampling_logits(z[0, :4], idx, use_cache),
                                   model.head.sampling_logits(z[0, :4], idx, use_cache))
        else:
            x, t = torch.randn(4, off.C), torch.tensor([1, 10, 100, 999])
            for a, b in zip(loaded.head.denoise(x, t, loaded.head.z_cond(z[0, :4])),
                            model.head.denoise(x, t, model.head.z_cond(z[0, :4]))):
                assert torch.equal(a, b)
    options = {"num_iter": 3, "cfg": 2.0, "generator": 7}
    if family == "mar":
        options["num_sampling_steps"] = 5
    # random official-format weights are no denoiser: latents may overflow, identically
    torch.testing.assert_close(loaded.sample(torch.tensor([2, 4]), **options)["latents"],
                               model.sample(torch.tensor([2, 4]), **options)["latents"], rtol=0, atol=0, equal_nan=True)
    generic = load_generator(folder)  # the loader every --model option uses
    assert type(generic) is type(model) and generic.provenance["family"] == family


def test_wrong_family_and_incomplete_folder_are_refused(tmp_path):
    folder = _converted("mar").save_pretrained(tmp_path / "mar")
    with pytest.raises(ValueError, match="holds a 'mar' generator"):
        TokenBridgeGenerator.from_pretrained(folder)
    with pytest.raises(ValueError, match="'mar' generator, but a 'tokenbridge'"):
        load_generator(folder, family="tokenbridge")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_generator(folder)


def test_export_reads_a_folder(tmp_path):
    model = _converted("tokenbridge")
    folder = model.save_pretrained(tmp_path / "tb")
    out = export_weights(folder, tmp_path / "tb.safetensors")
    loaded = load_generator(out)
    assert loaded.provenance["sample"] == model.provenance["sample"]
    with torch.no_grad():
        assert torch.equal(_features(loaded), _features(model))
