"""tokenbridge.tokens: cache_latents round trip with a fake VAE and quantizer, and bad token files named."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tokenbridge import train as T
from tokenbridge.config import DataConfig
from tokenbridge.quantizer import DimensionwiseQuantizer
from tokenbridge.tokens import TOKENS_FORMAT, CachedTokens, cache_latents
from tokenbridge.vae import vae_fingerprint

from toy_family import UNIFORM, FakeVAE, ckpt_of, fake_images, tiny_config


def test_cache_latents_round_trip(tmp_path):
    ds = fake_images()
    data = DataConfig(vae="fake", encode_batch=4)
    out = cache_latents(data, tmp_path / "tok.safetensors", quantizer=UNIFORM, vae=FakeVAE(), dataset=ds)
    assert not list(tmp_path.glob("*.tmp"))
    tok = CachedTokens(out)
    assert tok.indices.dtype == torch.uint8 and tok.indices.shape == (10, 4, 4, 4) and tok.grid_shape == (4, 4, 4)
    images, labels = ds.tensors
    expected = DimensionwiseQuantizer(**UNIFORM).quantize(FakeVAE().encode(images).permute(0, 2, 3, 1))
    assert torch.equal(tok.indices.long(), expected)
    assert torch.equal(tok.labels, labels)
    assert tok.latents.shape == (10, 4, 4, 4) and torch.allclose(tok.latents, FakeVAE().encode(images))
    assert tok.levels == 64 and tok.scaling_factor == 0.5 and tok.num_classes == 3
    assert tok.vae == "fake" and tok.quantizer_config["kind"] == "uniform"
    assert tok.vae_fingerprint == vae_fingerprint(FakeVAE())  # the VAE that made the tokens is recorded
    x, y = tok[3]
    assert x.dtype == torch.long and x.shape == (4, 4, 4) and int(y) == 0

    # more than 256 levels -> int16; posterior sampling is reproducible from the seed
    big_q = {**UNIFORM, "levels": 300}
    data = DataConfig(vae="fake", sample_posterior=True, store_latents=False)
    big = cache_latents(data, tmp_path / "big.safetensors", quantizer=big_q, vae=FakeVAE(), dataset=ds)
    s1 = CachedTokens(big)
    assert s1.indices.dtype == torch.int16 and len(s1) == 10 and s1.latents is None
    again = cache_latents(data, tmp_path / "big2.safetensors", quantizer=big_q, vae=FakeVAE(), dataset=ds)
    assert torch.equal(CachedTokens(again).indices, s1.indices)

    # the trainer reads the token file through the data section and records where it came from
    cfg = tiny_config(tmp_path / "run", steps=2, global_batch=4)
    cfg["model"] = {"levels": 64, "grid_size": [4, 4], "channels": 4, "num_classes": 3}  # the file's shapes
    cfg["data"] = {"source": "tokens", "tokens": str(out)}
    assert T.train(cfg)["step"] == 2
    provenance = ckpt_of(tmp_path / "run")["provenance"]
    assert provenance == {"tokens": str(out), "tokens_items": 10, "vae": "fake",
                          "vae_fingerprint": vae_fingerprint(FakeVAE())}


def test_cached_tokens_bad_files(tmp_path):
    out = cache_latents(DataConfig(), tmp_path / "tok.safetensors", quantizer={**UNIFORM, "levels": 16},
                        vae=FakeVAE(), dataset=fake_images())
    data = out.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        CachedTokens(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="corrupt"):
        CachedTokens(tmp_path / "junk.safetensors")
    save_file({"indices": torch.zeros(2, 1, 1, 1, dtype=torch.uint8)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a tokenbridge token file"):
        CachedTokens(tmp_path / "plain.safetensors")
    meta = {"format": TOKENS_FORMAT, "levels": "4", "quantizer": "{}"}
    save_file({"indices": torch.zeros(2, 3, dtype=torch.uint8), "labels": torch.zeros(2, dtype=torch.int64)},
              str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="indices must be"):
        CachedTokens(tmp_path / "shape.safetensors")
    save_file({"indices": torch.full((2, 1, 1, 1), 9, dtype=torch.uint8), "labels": torch.zeros(2, dtype=torch.int64)},
              str(tmp_path / "range.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="outside"):
        CachedTokens(tmp_path / "range.safetensors")
    with pytest.raises(FileNotFoundError):
        CachedTokens(tmp_path / "missing.safetensors")
