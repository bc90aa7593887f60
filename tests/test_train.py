"""Trainer tests with a tiny model and synthetic tokens (no dependency on the real generator, VAE or quantizer)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from tokenbridge import checkpoint as C
from tokenbridge import train as T
from tokenbridge.config import ConfigError, DataConfig, apply_overrides, read_yaml
from tokenbridge.distributed import ResumableSampler
from tokenbridge.generate import generate
from tokenbridge.optim import ema_decay_at, lr_at, param_groups
from tokenbridge.quantizer import DimensionwiseQuantizer
from tokenbridge.tokens import TOKENS_FORMAT, CachedTokens, cache_latents
from tokenbridge.vae import vae_fingerprint

# The tiny model lives in a string so that torchrun workers (separate processes) build exactly the same module.
TINY_SOURCE = textwrap.dedent(
    '''
    import random
    import numpy as np
    import torch
    from torch import nn
    from tokenbridge.generators import Generator, register_family
    from tokenbridge.generators.base import ShapesConfig


    class ToyConfig(ShapesConfig):
        grid_size: tuple[int, int] = (2, 2)
        channels: int = 3
        num_classes: int = 10
        levels: int = 8
        width: int = 16
        dropout: float = 0.0
        random_shift: bool = False


    @register_family
    class ToyGenerator(Generator):
        """A generator family that lives in the tests: trained, checkpointed, resumed and sampled through the same
        trainer and sampler as the TokenBridge generator. Batches are (indices [B, H, W, C] long, labels [B]); the
        loss is the cross-entropy of a channel-shifted copy of the tokens. Uses torch (dropout), numpy and python
        randomness so that exact resume checks every RNG."""

        family = "toy"
        presets = {"narrow": {"width": 8}}
        Config = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            levels, width = self.config["levels"], self.config["width"]
            self.emb = nn.Embedding(levels, width)
            self.cls = nn.Embedding(10, width)
            self.norm = nn.LayerNorm(width)
            self.hidden = nn.Linear(width, width)
            self.out = nn.Linear(width, levels)
            self.drop = nn.Dropout(self.config["dropout"])
            self.random_shift = self.config["random_shift"]

        def loss(self, batch):
            idx, labels = batch
            h = self.emb(idx) + self.cls(labels)[:, None, None, None]
            h = self.drop(torch.nn.functional.gelu(self.hidden(self.norm(h))))
            shift = 1
            if self.random_shift:
                shift = int(np.random.randint(1, idx.shape[-1])) if random.random() < 0.5 else 1
            target = idx.roll(shift, dims=-1)
            return torch.nn.functional.cross_entropy(self.out(h).flatten(0, -2), target.flatten())

        @torch.no_grad()
        def sample(self, labels, temperature: float = 1.0, generator=None):
            """latents [N, width, 2, 2]: the class embedding plus temperature-scaled noise."""
            z = self.cls(labels)[:, :, None, None].expand(-1, -1, 2, 2)
            noise = torch.randn(z.shape, generator=generator, device=z.device)
            return {"latents": z + temperature * noise}
    '''
)
_ns: dict = {}
exec(TINY_SOURCE, _ns)
ToyGenerator = _ns["ToyGenerator"]

N, GRID, LEVELS = 64, (2, 2, 3), 8


def tiny_dataset(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randint(0, LEVELS, (n, *GRID), generator=g), torch.randint(0, 10, (n,), generator=g))


def tiny_config(out_dir: Path, **train) -> dict:
    base = {
        "steps": 10,
        "global_batch": 16,
        "lr": 3e-3,
        "warmup_steps": 2,
        "min_lr": 1e-4,
        "ema": 0.9,
        "ckpt_every": 3,
        "log_every": 1,
        "device": "cpu",
    }
    base.update(train)
    return {"out_dir": str(out_dir), "seed": 7, "family": "toy", "model": {"levels": LEVELS, "width": 16},
            "train": base}


def run_tiny(cfg: dict, **kw) -> dict:
    return T.train(cfg, dataset=tiny_dataset(), **kw)


def ckpt_of(out_dir: Path) -> dict:
    return C.load_checkpoint(Path(out_dir) / C.CHECKPOINT_NAME)


def assert_states_equal(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


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


def test_ddp_two_processes_match_single_process(tmp_path, torchrun):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    torchrun(script, str(tmp_path / "ddp"), log_dir=tmp_path / "logs")
    # the same run in this process (same seed, data, model source and schedule as the script)
    run_tiny(tiny_config(tmp_path / "single", steps=6, ckpt_every=4, min_lr=0.0))

    ddp, one = ckpt_of(tmp_path / "ddp"), ckpt_of(tmp_path / "single")
    assert ddp["step"] == one["step"] == 6 and ddp["world_size"] == 2 and one["world_size"] == 1
    assert len(ddp["rng"]) == 2  # every rank's RNG state is kept for exact resume
    assert_states_equal(ddp["model"], one["model"], exact=False)
    assert_states_equal(ddp["ema"], one["ema"], exact=False)
    assert not torch.equal(ddp["model"]["out.weight"], ddp["ema"]["out.weight"])
    # only rank 0 logs: one line per step, losses averaged over ranks equal the single-process losses
    log_ddp = [json.loads(s) for s in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
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


# ------------------------------------------------------------------------------------------------------------------
# (d) weight decay groups, (e) learning-rate schedule


def test_no_weight_decay_on_1d_params(tmp_path):
    model = ToyGenerator.from_config({"levels": LEVELS})
    decay, no_decay = param_groups(model, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {"norm.weight", "norm.bias", "hidden.bias", "out.bias"}
    assert "emb.weight" in {names[id(p)] for p in decay["params"]}  # embeddings are decayed, as in MAR
    run_tiny(tiny_config(tmp_path, steps=1))
    groups = ckpt_of(tmp_path)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.02, 0.0]
    assert groups[0]["betas"] == (0.9, 0.95)
    assert sorted(len(g["params"]) for g in groups) == [4, 4]


def test_lr_schedule():
    peak, lo = 1e-3, 1e-5
    assert lr_at(0, peak, 10, 110, lo) == pytest.approx(1e-4)
    assert lr_at(4, peak, 10, 110, lo) == pytest.approx(5e-4)
    assert lr_at(9, peak, 10, 110, lo) == pytest.approx(peak)
    assert lr_at(10, peak, 10, 110, lo) == pytest.approx(peak)
    assert lr_at(60, peak, 10, 110, lo) == pytest.approx((peak + lo) / 2)
    assert lr_at(35, peak, 10, 110, lo) == pytest.approx(lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, peak, 10, 110, lo) == pytest.approx(lo)
    decay = [lr_at(s, peak, 10, 110, lo) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(0, peak, 0, 100) == pytest.approx(peak)


def test_lr_in_training_log_and_blr_rule(tmp_path):
    cfg = tiny_config(tmp_path, steps=6, lr=None, blr=2e-3, warmup_steps=2, min_lr=0.0, global_batch=32)
    run_tiny(cfg)
    peak = 2e-3 * 32 / 256
    lrs = [json.loads(s)["lr"] for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([lr_at(s, peak, 2, 6, 0.0) for s in range(6)])
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "it_s"} <= set(rec)


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


@pytest.mark.parametrize("warmup, decay", [(False, 0.5), (True, 0.1)])
def test_grad_clip_and_ema(tmp_path, warmup, decay):
    # a tiny clip bounds the first update; EMA with decay d after one step = d * init + (1 - d) * new, where the
    # warmed-up decay of the first update is min(0.5, 1 / 10) = 0.1
    cfg = tiny_config(tmp_path, steps=1, warmup_steps=0, grad_clip=1e-3, ema=0.5, ema_warmup=warmup)
    run_tiny(cfg)
    ck = ckpt_of(tmp_path)
    torch.manual_seed(7)
    init = ToyGenerator.from_config(cfg["model"]).state_dict()
    for k in init:
        torch.testing.assert_close(ck["ema"][k], decay * init[k] + (1 - decay) * ck["model"][k])
    assert json.loads((tmp_path / "log.jsonl").read_text())["grad_norm"] > 1e-3


def test_ema_warmup_schedule():
    assert [ema_decay_at(t, 0.9999) for t in (0, 1, 10, 90)] == pytest.approx([0.1, 2 / 11, 11 / 20, 0.91])
    assert ema_decay_at(10**6, 0.9999) == 0.9999 and ema_decay_at(0, 0.9999, warmup=False) == 0.9999
    # the share of the random initialisation left in the average after 400 steps at decay 0.995
    left = math.prod(ema_decay_at(t, 0.995) for t in range(400))
    assert left < 1e-6 < 0.995**400


# ------------------------------------------------------------------------------------------------------------------
# (f) cache_latents round trip with a fake VAE and quantizer


class FakeVAE(nn.Module):
    scaling_factor = 0.5

    def encode(self, x, sample=False):
        z = torch.nn.functional.pixel_unshuffle(x, 2) * 2.0  # [B, 1, 8, 8] -> [B, 4, 4, 4]
        return z + torch.randn_like(z) * 0.1 if sample else z

    def decode(self, z):
        return z.mean(1, keepdim=True).tanh()


def fake_images(n=10):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 3)


UNIFORM = {"levels": 64, "kind": "uniform", "value_range": (-1.0, 1.0)}


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


# ------------------------------------------------------------------------------------------------------------------
# (g) config loading and overrides


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out_dir: runs/x\nmodel:\n  depth: 2\ntrain:\n  lr: 1e-4\n  betas: [0.9, 0.95]\n")
    cfg = apply_overrides(read_yaml(path), ["train.lr=3e-4", "model.depth=4", "train.betas=[0.8, 0.9]",
                                            "new.sub.key=abc", "data.tokens=null", "train.bf16=false", "seed=3"])
    assert cfg["train"]["lr"] == 3e-4 and isinstance(cfg["train"]["lr"], float)
    assert cfg["model"]["depth"] == 4 and cfg["train"]["betas"] == [0.8, 0.9]
    assert cfg["new"]["sub"]["key"] == "abc" and cfg["data"]["tokens"] is None
    assert cfg["train"]["bf16"] is False and cfg["seed"] == 3
    assert read_yaml(path)["train"]["lr"] == 1e-4  # YAML "1e-4" is a float here
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"out_dir": "x"}, ["out_dir.x=1"])
    with pytest.raises(FileNotFoundError):
        read_yaml(tmp_path / "nope.yaml")


SHIPPED_CONFIG = Path(T.__file__).parents[1] / "configs" / "fmnist.yaml"


def test_shipped_fmnist_config_parses():
    run = T.load_run_config(SHIPPED_CONFIG)
    assert run == T.load_run_config("fmnist")  # the package ships its configs; the repository links to them
    assert run.train.grad_clip == 3.0 and run.train.betas == (0.9, 0.95) and run.seed == 0
    assert run.data.source == "tokens" and run.data.tokens.startswith("runs/")
    assert run.model["backbone"]["width"] == 192 and run.model["head"]["order"] == "frequency"
    assert run.sample == {"num_iter": 16, "cfg": 3.0}  # the config gives only what differs from the defaults
    assert run.model["quantizer"] == DimensionwiseQuantizer().config() and run.model["mask_ratio_min"] == 0.7


@pytest.mark.parametrize("override, message", [
    ("trian.steps=5", "unknown config key 'trian'"),
    ("train.steps=abc", "'train.steps' = 'abc': Input should be a valid integer"),
    ("train.steps=2.7", "'train.steps' = 2.7: Input should be a valid integer"),
    ("model.backbone.widht=3", "unknown config key 'model.backbone.widht' \\(known here: attn_dropout"),
    ("model.head.kind=vq", "'model.head.kind' = 'vq'"),
    ("model.quantizer.levels=1", "levels \\(B\\) must be an integer"),
    ("model.preset=huge", "unknown tokenbridge preset"),
    ("sample.temperature=nan", "'sample.temperature' = 'nan': Input should be a finite number"),
    ("sample.order=rnd", "'sample.order' = 'rnd': Input should be 'random' or 'confidence'"),
    ("data.limit=-5", "'data.limit' = -5: Input should be greater than 0"),
    ("family=gan", "unknown generator family"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        T.load_run_config(SHIPPED_CONFIG, [override])


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


@pytest.mark.parametrize("n, world", [(7, 2), (65, 8), (70000, 3), (64, 1)])
def test_resumable_sampler_is_distributed_samplers_order_without_lists(n, world):
    for rank in range(world):
        reference = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True)
        reference.set_epoch(3)
        ours = ResumableSampler(n, world, rank, seed=5)
        ours.set_position(3, 0)
        expected = list(reference)
        assert list(ours) == expected and len(ours) == len(expected)
        ours.set_position(3, 2)  # resume after this rank's first two samples
        assert list(ours) == expected[2:] and len(ours) == len(expected) - 2
