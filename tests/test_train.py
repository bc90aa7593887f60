"""Trainer tests with a tiny model and synthetic tokens (no dependency on the real generator, VAE or quantizer):
DDP, exact resume, checkpoints, the family seam, and the real generator trained from a token file."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np

import pytest
import torch
from torch.utils.data import TensorDataset

from tokenbridge import checkpoint as C
from tokenbridge import train as T
from tokenbridge.config import ConfigError, DataConfig
from tokenbridge.generate import generate
from tokenbridge.quantizer import DimensionwiseQuantizer
from tokenbridge.tokens import CachedTokens, cache_latents
from tokenbridge.vae import vae_fingerprint

from toy_family import (LEVELS, TINY_SOURCE, FakeVAE, ToyGenerator, assert_states_equal, ckpt_of, run_tiny,
                        tiny_config, tiny_dataset)


# ------------------------------------------------------------------------------------------------------------------
# (a) two-process DDP == one process with the same global batch


DDP_SCRIPT = TINY_SOURCE + textwrap.dedent(
    '''
    import os
    import sys
    import torch
    from torch.utils.data import TensorDataset
    from tokenbridge.train import train

    out_dir, n = sys.argv[1], 64
    g = torch.Generator().manual_seed(123)
    ds = TensorDataset(torch.randint(0, 8, (n, 2, 2, 3), generator=g), torch.randint(0, 10, (n,), generator=g))
    cfg = {"out_dir": out_dir, "seed": 7, "family": "toy", "model": {"levels": 8, "width": 16},
           "train": {"steps": 6, "global_batch": 16, "lr": 3e-3, "warmup_steps": 2, "ema": 0.9,
                     "ckpt_every": 4, "log_every": 1, "device": "cpu"}}
    train(cfg, dataset=ds)
    # the process group is really gone: gloo threads that outlive it can abort the interpreter's exit (SIGABRT)
    tasks = "/proc/self/task"
    threads = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else []
    assert not [name for name in threads if "gloo" in name], f"gloo threads outlive training: {threads}"
    '''
)


def test_ddp_two_processes_match_single_process(tmp_path, torchrun_jobs):
    ddp_dir = torchrun_jobs[__name__]  # DDP_SCRIPT run by 2 gloo processes (conftest)
    # the same run in this process (same seed, data, model source and schedule as the script)
    run_tiny(tiny_config(tmp_path / "single", steps=6, ckpt_every=4, min_lr=0.0))

    ddp, one = ckpt_of(ddp_dir), ckpt_of(tmp_path / "single")
    assert ddp["step"] == one["step"] == 6 and ddp["world_size"] == 2 and one["world_size"] == 1
    assert len(ddp["rng"]) == 2  # every rank's RNG state is kept for exact resume
    assert_states_equal(ddp["model"], one["model"], exact=False)
    assert_states_equal(ddp["ema"], one["ema"], exact=False)
    assert not torch.equal(ddp["model"]["out.weight"], ddp["ema"]["out.weight"])
    # only rank 0 logs: one line per step, losses averaged over ranks equal the single-process losses
    log_ddp = [json.loads(s) for s in (ddp_dir / "log.jsonl").read_text().splitlines()]
    log_one = [json.loads(s) for s in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_ddp] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in log_ddp], [r["loss"] for r in log_one], rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# (b) stop -> resume == uninterrupted, bit for bit


def test_resume_mid_epoch_is_exact(tmp_path):
    model = {"levels": LEVELS, "width": 16, "dropout": 0.3, "random_shift": True}
    full = tiny_config(tmp_path / "full")
    full["model"] = model
    m_full = run_tiny(full)
    assert m_full["step"] == 10

    part = tiny_config(tmp_path / "part")
    part["model"] = model
    m_stop = run_tiny(part, stop_at=5)  # 4 steps per epoch: stops in the middle of epoch 1
    assert m_stop["step"] == 5
    stopped = ckpt_of(tmp_path / "part")
    assert (stopped["step"], stopped["epoch"], stopped["batch_in_epoch"]) == (5, 1, 1)
    with open(tmp_path / "part" / "log.jsonl", "a") as f:  # a killed run may have logged past its checkpoint
        f.write(json.dumps({"step": 6, "loss": 0.0}) + "\n")
    m_res = run_tiny(part, resume=True)
    assert m_res["step"] == 10

    a, b = ckpt_of(tmp_path / "full"), ckpt_of(tmp_path / "part")
    assert_states_equal(a["model"], b["model"])
    assert_states_equal(a["ema"], b["ema"])
    assert m_full["loss"] == m_res["loss"]
    steps = [json.loads(s)["step"] for s in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))

    # resume=False starts over (only with overwrite: a checkpoint is never replaced unasked) and reproduces the run
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        run_tiny(part, resume=False)
    m_again = run_tiny(part, resume=False, overwrite=True)
    assert m_again["loss"] == m_full["loss"]
    # a finished run resumed again does nothing
    assert run_tiny(part)["step"] == 10


# ------------------------------------------------------------------------------------------------------------------
# (c) atomic checkpoints, weights_only loading, clear errors


def test_checkpoint_atomic_and_weights_only(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    run_tiny(cfg, stop_at=2)
    path = tmp_path / C.CHECKPOINT_NAME
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == C.CKPT_FORMAT and isinstance(raw["config"], str)
    assert json.loads(raw["config"])["train"]["global_batch"] == 16
    assert {"torch", "numpy_keys", "python_state"} <= set(raw["rng"][0])
    before = path.read_bytes()

    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save({"partial": torch.zeros(3)}, f)  # a partial write happens ...
        raise OSError("disk full")  # ... then the write fails

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        run_tiny(cfg, stop_at=4)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))
    assert C.load_checkpoint(path)["step"] == 2


def test_bad_checkpoint_errors(tmp_path):
    cfg = tiny_config(tmp_path)
    path = tmp_path / C.CHECKPOINT_NAME
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        run_tiny(cfg)
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="not a tokenbridge training checkpoint"):
        run_tiny(cfg)
    with pytest.raises(FileNotFoundError):
        C.load_checkpoint(tmp_path / "missing.pt")
    path.unlink()
    run_tiny(cfg, stop_at=1)
    other = tiny_config(tmp_path)
    other["model"]["width"] = 8
    with pytest.raises(ValueError, match="does not fit"):
        run_tiny(other)


def test_toy_family_through_the_seam(tmp_path):
    """A family defined in the tests trains, checkpoints, resumes, exports and samples through the same trainer,
    checkpoint loader and sampler as the TokenBridge generator."""
    cfg = tiny_config(tmp_path, steps=3)
    cfg["model"] = {"preset": "narrow", "levels": LEVELS}
    run_tiny(cfg, stop_at=2)
    assert run_tiny(cfg)["step"] == 3  # resumed
    ckpt = ckpt_of(tmp_path)
    assert ckpt["config"]["family"] == "toy" and ckpt["config"]["model"]["width"] == 8  # the preset was applied
    model = C.load_generator(tmp_path / C.CHECKPOINT_NAME)
    assert isinstance(model, ToyGenerator) and not model.training
    assert torch.equal(model.out.weight, ckpt["ema"]["out.weight"])
    raw = C.load_generator(tmp_path / C.CHECKPOINT_NAME, ema=False)  # evaluate the raw weights instead
    assert torch.equal(raw.out.weight, ckpt["model"]["out.weight"]) and not raw.provenance["ema"]
    out = C.export_weights(tmp_path / C.CHECKPOINT_NAME, tmp_path / "w.safetensors")
    exported = C.load_generator(out)
    assert exported.provenance["family"] == "toy" and exported.provenance["step"] == 3
    assert torch.equal(exported.out.weight, ckpt["ema"]["out.weight"])
    with pytest.raises(ValueError, match="holds the EMA weights only"):
        C.load_generator(out, ema=False)
    with pytest.raises(ValueError, match="does not record its VAE"):
        generate(out, [0, 1])
    result = generate(out, [0, 1, 2], vae=FakeVAE(), seed=5, temperature=0.0)
    assert result["images"].shape == (3, 1, 2, 2)
    expected = FakeVAE().decode(exported.cls.weight[:3, :, None, None].expand(-1, -1, 2, 2))
    torch.testing.assert_close(result["images"], expected.clamp(-1, 1))
    with pytest.raises(ConfigError, match="unknown config key 'sampling option.cfg'"):
        generate(out, [0], vae=FakeVAE(), cfg=3.0)  # the toy family has no cfg option
    other = tiny_config(tmp_path, steps=3)
    other["family"] = "tokenbridge"
    other["model"] = {"preset": "tiny"}
    with pytest.raises(ValueError, match="holds a 'toy' generator"):
        T.train(other, dataset=tiny_dataset())


def test_epochs_and_bad_train_config(tmp_path):
    m = run_tiny(tiny_config(tmp_path, steps=None, epochs=1.5, warmup_steps=None, warmup_epochs=0.5))
    assert m["step"] == m["total_steps"] == 6  # 64 samples / batch 16 = 4 steps per epoch
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        run_tiny(tiny_config(tmp_path / "x", learning_rate=1.0))
    with pytest.raises(ConfigError, match="exactly one"):
        run_tiny(tiny_config(tmp_path / "y", epochs=2))
    with pytest.raises(ConfigError, match="'train.ema' = 1.0"):
        run_tiny(tiny_config(tmp_path / "y", ema=1.0))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before any work
    with pytest.raises(ValueError, match="smaller than train.global_batch"):
        run_tiny(tiny_config(tmp_path / "z", global_batch=128))


# ------------------------------------------------------------------------------------------------------------------
# Integration with the real quantizer and generator


@pytest.mark.parametrize("calibration", ["none", "quantile"])
def test_real_generator_trains_from_token_file(tmp_path, calibration):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(64, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(64) % 10)
    quantizer = {"levels": 16, "calibration": calibration}
    out = cache_latents(DataConfig(encode_batch=32), tmp_path / "tok.safetensors", quantizer=quantizer,
                        vae=FakeVAE(), dataset=ds, fit_samples=40)
    tok = CachedTokens(out)
    assert tok.quantizer_config["calibration"] == calibration and tok.grid_shape == (4, 4, 4)
    quant = tok.make_quantizer()
    assert quant.fitted
    x = FakeVAE().encode(ds.tensors[0][:4]).permute(0, 2, 3, 1).contiguous()
    if calibration != "none":  # fitted on the data: not the plain N(0, 1) bins
        assert not torch.equal(quant.quantize(x), DimensionwiseQuantizer(levels=16).quantize(x))

    model = {"preset": "tiny", "quantizer": quantizer,
             "backbone": {"grad_checkpointing": True}, "head": {"order": "frequency"}}
    cfg = {"out_dir": str(tmp_path / "run"), "model": model, "data": {"tokens": str(out)},
           "train": {"steps": 3, "global_batch": 16, "lr": 1e-3, "ckpt_every": 2, "device": "cpu"}}
    with pytest.raises(ConfigError, match="'model.grid_size' = \\[8, 8\\] but the token file"):
        T.train(cfg)  # the tiny preset is sized for the fmnist VAE's 8x8 grid
    model.update(grid_size=[4, 4], channels=4)
    metrics = T.train(cfg)
    assert metrics["step"] == 3 and math.isfinite(metrics["loss"])
    gen = C.load_generator(tmp_path / "run" / C.CHECKPOINT_NAME)
    assert torch.equal(gen.quantizer.quantize(x), quant.quantize(x))  # the fitted calibration travels with the model
    assert sorted(gen.config["head"]["order"]) == [0, 1, 2, 3]  # "frequency" resolved from the cached latents
    # cache_latents got a VAE object: the spec recorded is the data section's, the fingerprint that object's
    assert gen.provenance["vae"] == "fmnist" and gen.provenance["vae_fingerprint"] == vae_fingerprint(FakeVAE())
    with pytest.raises(ValueError, match="trained on the VAE 'fmnist' .* but the VAE 'fmnist' has fingerprint"):
        generate(gen, [0])  # the real fmnist VAE is not the one that made these tokens
    assert generate(gen, [0], vae=FakeVAE(), num_iter=2)["images"].shape == (1, 1, 4, 4)

    bad = {**cfg, "out_dir": str(tmp_path / "bad"), "model": {**model, "quantizer": {"levels": 32}}}
    with pytest.raises(ConfigError, match="disagrees with the token file"):
        T.train(bad)
