"""Sharded token caches: multi-process caching, restart after a kill, exact resume of training over shards, and
reading (single files, synthetic sets, bad manifests)."""

from __future__ import annotations

import json
import pickle
import textwrap
from pathlib import Path

import pytest
import torch

from tokenbridge.checkpoint import CHECKPOINT_NAME, load_checkpoint
from tokenbridge.config import DataConfig
from tokenbridge.shards import MANIFEST, ShardedTokens, cache_shards, write_synthetic_shards
from tokenbridge.tokens import cache_latents
from tokenbridge.train import train

# The stand-in VAE and images live in a string so that torchrun workers build exactly the same ones.
SOURCE = textwrap.dedent(
    '''
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset


    class TinyVAE(nn.Module):
        """[B, 1, 8, 8] grey images -> [B, 4, 4, 4] latents; counts the images it encodes."""
        scaling_factor = 0.5

        def __init__(self, fail_after=None):
            super().__init__()
            self.seen, self.fail_after = 0, fail_after

        def encode(self, x, sample=False):
            if self.fail_after is not None and self.seen + len(x) > self.fail_after:
                raise RuntimeError("killed")
            self.seen += len(x)
            z = torch.nn.functional.pixel_unshuffle(x, 2) * 2.0
            return z + torch.randn_like(z) * 0.1 if sample else z


    def images(n=50):
        g = torch.Generator().manual_seed(0)
        # a left-right gradient so that flipped images give other tokens
        x = torch.rand(n, 1, 8, 8, generator=g) * 0.5 + torch.linspace(-0.5, 0.5, 8)
        return TensorDataset(x, torch.arange(n) % 10)


    QUANT = {"levels": 16, "calibration": "standardize"}
    '''
)
_ns: dict = {}
exec(SOURCE, _ns)
TinyVAE, images, QUANT = _ns["TinyVAE"], _ns["images"], _ns["QUANT"]
DATA = DataConfig(vae="tiny", encode_batch=4, sample_posterior=True)

DDP_SCRIPT = SOURCE + textwrap.dedent(
    '''
    import sys
    from tokenbridge.config import DataConfig
    from tokenbridge.shards import cache_shards

    data = DataConfig(vae="tiny", encode_batch=4, sample_posterior=True)
    cache_shards(data, sys.argv[1], quantizer=QUANT, shard_size=8, vae=TinyVAE(), dataset=images(), flip=True,
                 latents_dtype="float16", fit_samples=20)
    '''
)


def cache(out: Path, **kw) -> Path:
    args = dict(quantizer=QUANT, shard_size=8, vae=TinyVAE(), dataset=images(), flip=True, latents_dtype="float16",
                fit_samples=20)
    return cache_shards(DATA, out, **{**args, **kw})


def test_two_processes_equal_one_process(tmp_path, torchrun_jobs):
    ddp_dir = torchrun_jobs[__name__]  # DDP_SCRIPT run by 2 processes (conftest)
    one = cache(tmp_path / "one")
    assert one == tmp_path / "one" / MANIFEST
    two = json.loads((ddp_dir / MANIFEST).read_text())
    assert two == json.loads(one.read_text())
    assert len(two["shards"]) == 7 and two["count"] == 50 and two["grid"] == [4, 4, 4] and two["flip"]
    for name in [s["file"] for s in two["shards"]] + ["quantizer.safetensors"]:
        assert (ddp_dir / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    # the union of the ranks' shards, ordered by image index, is the one-process cache
    mine, ref = ShardedTokens(ddp_dir, verify=True), ShardedTokens(one)
    order = torch.argsort(mine.image_index[:])
    assert torch.equal(mine.image_index[:][order], torch.arange(50))
    for name in ("indices", "labels", "latents", "_flipped"):
        assert torch.equal(getattr(mine, name)[:][order], getattr(ref, name)[:]), name
    assert mine.latents.dtype == torch.float16 and mine.quantizer_config["calibration"] == "standardize"
    assert not torch.equal(mine.indices[:], mine._flipped[:])
    assert mine.num_classes == 10 and mine.vae == "tiny" and mine.scaling_factor == 0.5
    assert torch.equal(pickle.loads(pickle.dumps(mine)).indices[:], mine.indices[:])  # DataLoader workers (spawn)


def test_restart_skips_finished_shards(tmp_path):
    out = tmp_path / "tok"
    with pytest.raises(RuntimeError, match="killed"):  # dies during shard 2 (after the quantizer fit's 20 images)
        cache(out, vae=TinyVAE(fail_after=20 + 2 * 8 * 2 + 4))
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == ["shard-00000.safetensors",
                                                                       "shard-00001.safetensors"]
    assert not (out / MANIFEST).exists() and not list(out.glob(".*.tmp"))
    vae = TinyVAE()
    cache(out, vae=vae)
    assert vae.seen == (50 - 16) * 2  # shards 2..6 only (plain + flipped), the fitted quantizer is reused
    ref = cache(tmp_path / "ref")
    assert (out / MANIFEST).read_text() == ref.read_text()

    (out / "shard-00003.safetensors").unlink()  # a lost shard ...
    data = bytearray((out / "shard-00005.safetensors").read_bytes())
    data[-1] ^= 1  # ... and a damaged one are encoded again
    (out / "shard-00005.safetensors").write_bytes(bytes(data))
    vae = TinyVAE()
    cache(out, vae=vae)
    assert vae.seen == (8 + 8) * 2
    assert (out / "shard-00005.safetensors").read_bytes() == (tmp_path / "ref" / "shard-00005.safetensors").read_bytes()
    vae = TinyVAE()
    cache(out, vae=vae, flip=False)  # another setup re-encodes everything
    assert vae.seen == 50 and not ShardedTokens(out).flip


def _tb_config(out_dir: Path) -> dict:
    return {"out_dir": str(out_dir), "seed": 3, "family": "tokenbridge",
            "model": {"preset": "tiny", "grid_size": [4, 4], "quantizer": {"levels": 16}},
            "train": {"steps": 6, "global_batch": 8, "lr": 1e-3, "warmup_steps": 1, "ema": 0.9, "ckpt_every": 2,
                      "log_every": 1, "device": "cpu"}}


def test_training_over_shards_resumes_exactly(tmp_path):
    manifest = cache(tmp_path / "tok", quantizer={"levels": 16}, shard_size=7, latents_dtype=None)
    tokens = ShardedTokens(manifest)
    assert tokens.flip and len(tokens) == 50 and tokens.latents is None
    full = train(_tb_config(tmp_path / "full"), dataset=tokens)
    part = _tb_config(tmp_path / "part")
    assert train(part, dataset=ShardedTokens(manifest), stop_at=3)["step"] == 3  # 6 steps per epoch: mid-epoch
    resumed = train(part, dataset=ShardedTokens(manifest))
    assert resumed["step"] == full["step"] == 6 and resumed["loss"] == full["loss"]
    a, b = (load_checkpoint(tmp_path / d / CHECKPOINT_NAME) for d in ("full", "part"))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_reading_single_files_synthetic_sets_and_errors(tmp_path):
    single = cache_latents(DataConfig(vae="tiny", encode_batch=8), tmp_path / "one.safetensors",
                           quantizer={"levels": 16}, vae=TinyVAE(), dataset=images(20))
    tok = ShardedTokens(single)
    assert len(tok) == 20 and tok.grid_shape == (4, 4, 4) and tok.indices[:5].shape == (5, 4, 4, 4)
    x, y = tok[3]
    assert x.dtype == torch.long and x.shape == (4, 4, 4) and int(y) == 3 and tok.make_quantizer().levels == 16

    manifest = write_synthetic_shards(tmp_path / "syn", 25, grid=(2, 3, 4), levels=300, shard_size=10, num_classes=7)
    syn = ShardedTokens(tmp_path / "syn", verify=True)
    assert len(syn) == 25 and syn.grid_shape == (2, 3, 4) and syn.levels == 300 and syn.num_classes == 7
    assert len(syn.manifest["shards"]) == 3 and syn.vae == "synthetic"
    rows = syn.indices[:23]  # spans the three shards
    assert rows.dtype == torch.int16 and rows.shape == (23, 2, 3, 4)
    x, y = syn[21]
    assert x.dtype == torch.long and torch.equal(x, rows[21].long()) and y.dtype == torch.int64 and y.ndim == 0
    assert torch.equal(syn.indices[-1], syn[24][0].to(torch.int16)) and syn.indices[5:15:3].shape[0] == 4
    assert int(rows.max()) < 300 and int(syn.labels[:].max()) < 7 and syn.make_quantizer().levels == 300
    again = write_synthetic_shards(tmp_path / "syn2", 25, grid=(2, 3, 4), levels=300, shard_size=10, num_classes=7)
    assert again.read_text() == manifest.read_text()

    good = json.loads(manifest.read_text())

    def bad(change: dict, match: str, name: str = MANIFEST) -> None:
        (tmp_path / "syn" / name).write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            ShardedTokens(tmp_path / "syn" / name)

    bad({"format": "something-else"}, "not a tokenbridge shard manifest")
    bad({"count": 26}, "counts sum to 25, manifest count is 26")
    shards = [dict(s) for s in good["shards"]]
    shards[1]["count"] = 11
    bad({"shards": shards, "count": 26}, r"shard-00001.safetensors: '\w+' holds 10 items, .* says 11")
    shards[1] = {**good["shards"][1], "sha256": "0" * 64}
    (tmp_path / "syn" / "other.json").write_text(json.dumps({**good, "shards": shards}))
    assert len(ShardedTokens(tmp_path / "syn" / "other.json")) == 25  # checksums are read only when asked
    with pytest.raises(ValueError, match="does not match its sha256"):
        ShardedTokens(tmp_path / "syn" / "other.json", verify=True)
    (tmp_path / "syn" / MANIFEST).write_text(json.dumps(good))
    (tmp_path / "syn" / "shard-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="shard-00002.safetensors listed in .* is missing"):
        ShardedTokens(tmp_path / "syn")
    with pytest.raises(ValueError, match="shard_size must be an integer >= 1"):
        cache_shards(DATA, tmp_path / "x", shard_size=0, vae=TinyVAE(), dataset=images())
    with pytest.raises(ValueError, match="latents_dtype"):
        cache_shards(DATA, tmp_path / "x", latents_dtype="bfloat16", vae=TinyVAE(), dataset=images())
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        cache_shards(DATA, tmp_path / "file" / "x", vae=TinyVAE(), dataset=images())
    with pytest.raises(FileNotFoundError):
        ShardedTokens(tmp_path / "nowhere")
