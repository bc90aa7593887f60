"""The family contract (tokenbridge.generators.base.Generator), written once and run for every registered family:
exact resume, export / load round trip, determinism under a seed, and bad inputs named before any work.

`ToyGenerator` below is a family added the way a contributor adds one (a subclass with presets, its layers, `loss`
and `sample`); registering it is all it takes for every test here to run for it too."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tokenbridge import checkpoint as C
from tokenbridge import train as T
from tokenbridge.config import ConfigError
from tokenbridge.generators import FAMILIES, Generator, get_family, register_family, sample_options
from tokenbridge.generators.base import make_generator
from tokenbridge.generators.presets import FMNIST_SHAPES
from tokenbridge.samplers import Temperature


class ToyGenerator(Generator):
    """A class-conditional Gaussian on the latents: a learned mean per class, sampled with temperature * noise."""

    family, items = "toy-gaussian", "latents"
    presets = {"tiny": FMNIST_SHAPES}

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.mean = nn.Embedding(self.num_classes + 1, self.channels)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        latents, labels = self.check_batch(batch)
        return (latents - self.mean(labels)[:, None, None]).square().mean()

    def sample(self, labels: torch.Tensor, temperature: Temperature = 1.0, generator=None) -> dict[str, torch.Tensor]:
        gen = make_generator(generator, self.mean.weight.device)
        noise = torch.randn(labels.shape[0], self.channels, *self.grid_size, generator=gen)
        return {"latents": self.mean(labels)[:, :, None, None] + temperature * noise}


register_family(ToyGenerator)
# every family the package registers and the toy (not the variants other test modules register for their own use)
NAMES = sorted(n for n, c in FAMILIES.items() if c.__module__.startswith("tokenbridge.") or c is ToyGenerator)
del FAMILIES[ToyGenerator.family]  # registered only while a test of it runs (fixture `family`)

GRID, LEVELS = (8, 8, 4), 64
# the fewest steps each option allows, so that sampling is quick (applied where a family has the option)
QUICK = {"num_iter": 2, "num_sampling_steps": 3}
# values outside an option's declared range (tokenbridge.samplers), by option name
BAD_OPTIONS = {"temperature": -1.0, "cfg": math.nan, "top_k": -1, "top_p": 0.0, "num_iter": 0,
               "num_sampling_steps": 0, "cfg_schedule": "cosine", "clip_denoised": 0.0, "cfg_interval": (0.6, 0.2),
               "uncond_every": 0, "sampler": "fast", "diffusion_sampler": "euler", "order": "spiral",
               "stage1_cfg": -2.0, "stage1_temperature": -1.0, "stage1_top_k": -1, "stage1_top_p": 1.5}


@contextmanager
def registered(cls: type[Generator]):
    assert cls.family not in FAMILIES, f"another test module registered a family {cls.family!r}"
    FAMILIES[cls.family] = cls
    try:
        yield cls
    finally:
        del FAMILIES[cls.family]


@pytest.fixture(params=NAMES)
def family(request) -> type[Generator]:
    """Each registered family's class (the toy registered for the test's duration)."""
    if request.param == ToyGenerator.family:
        with registered(ToyGenerator):
            yield ToyGenerator
    else:
        yield get_family(request.param)


def dataset(cls: type[Generator], n: int = 16) -> TensorDataset:
    """n items of the family's kind ([n, 8, 8, 4] indices in [0, 64) or latents) and labels in [0, 10)."""
    g = torch.Generator().manual_seed(123)
    labels = torch.randint(0, 10, (n,), generator=g)
    if cls.items == "indices":
        return TensorDataset(torch.randint(0, LEVELS, (n, *GRID), generator=g), labels)
    return TensorDataset(0.5 * torch.randn(n, *GRID, generator=g) + labels.float()[:, None, None, None] / 5 - 1,
                         labels)


def run_config(cls: type[Generator], out_dir: Path, **train) -> dict:
    base = {"steps": 4, "global_batch": 8, "lr": 3e-3, "warmup_steps": 1, "min_lr": 1e-4, "ema": 0.9,
            "ckpt_every": 2, "log_every": 1, "device": "cpu"}
    return {"out_dir": str(out_dir), "seed": 3, "family": cls.family, "model": {"preset": "tiny"},
            "train": {**base, **train}}


def quick(cls: type[Generator]) -> dict:
    fields = sample_options(cls).model_fields
    return {k: v for k, v in QUICK.items() if k in fields}


def tiny(cls: type[Generator]) -> Generator:
    torch.manual_seed(0)
    return cls.from_config({"preset": "tiny"}).eval()


def test_resume_is_exact(family, tmp_path):
    """Stop after 2 of 4 steps and resume: the same weights, EMA and loss as the uninterrupted run, bit for bit."""
    full = T.train(run_config(family, tmp_path / "full"), dataset=dataset(family))
    part = run_config(family, tmp_path / "part")
    assert T.train(part, dataset=dataset(family), stop_at=2)["step"] == 2
    resumed = T.train(part, dataset=dataset(family))
    assert resumed["step"] == full["step"] == 4 and resumed["loss"] == full["loss"]
    a, b = (C.load_checkpoint(p / C.CHECKPOINT_NAME) for p in (tmp_path / "full", tmp_path / "part"))
    torch.manual_seed(3)  # the trainer seeds with run.seed before building
    built = family.from_config({"preset": "tiny"})
    init = built.state_dict()
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() == init.keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    # every part with trainable weights (backbone, head, both D2C stages, ...) trained
    trainable = {n for n, p in built.named_parameters() if p.requires_grad}
    moved = {n.split(".")[0] for n in trainable if not torch.equal(a["model"][n], init[n])}
    assert trainable and moved == {n.split(".")[0] for n in trainable}


def test_export_and_pretrained_folder_round_trip(family, tmp_path):
    """checkpoint -> exported .safetensors -> pretrained folder: the same config, weights, record and samples."""
    T.train(run_config(family, tmp_path / "run", steps=2), dataset=dataset(family))
    ckpt = tmp_path / "run" / C.CHECKPOINT_NAME
    exported = C.export_weights(ckpt, tmp_path / "model.safetensors", sample={"temperature": 0.5})
    model = C.load_generator(exported, family=family.family)
    folder = model.save_pretrained(tmp_path / "pretrained")
    loaded = family.from_pretrained(folder)
    assert type(model) is type(loaded) is family and loaded.config == model.config == C.load_generator(ckpt).config
    assert loaded.provenance["sample"] == model.provenance["sample"] == {"temperature": 0.5}
    assert loaded.provenance["step"] == model.provenance["step"] == 2
    record = ("family", "vae", "vae_fingerprint", "tokens", "ema", "train", "trajectory")
    assert {k: loaded.provenance.get(k) for k in record} == {k: model.provenance.get(k) for k in record}
    # the recipe and the loss trajectory of the run travel with the weights (repro shipped plots them)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert model.provenance["train"]["steps"] == 2 and log
    assert model.provenance["trajectory"] == {"step": [e["step"] for e in log],
                                              "loss": [round(e["loss"], 5) for e in log]}
    state, ema = loaded.state_dict(), C.load_checkpoint(ckpt)["ema"]
    assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in state)
    labels = torch.tensor([0, 3, 10])
    outs = [m.sample(labels, generator=4, **quick(family)) for m in (C.load_generator(ckpt), model, loaded)]
    assert all(torch.equal(o["latents"], outs[0]["latents"]) for o in outs)
    with pytest.raises(ValueError, match=f"holds a '{family.family}' generator"):
        C.load_generator(exported, family="no-such-family")


def test_sampling_is_deterministic_under_a_seed(family):
    model, labels = tiny(family), torch.tensor([0, 1, 10])
    a = model.sample(labels, generator=5, **quick(family))
    b = model.sample(labels, generator=torch.Generator().manual_seed(5), **quick(family))
    c = model.sample(labels, generator=6, **quick(family))
    assert a["latents"].shape == (3, GRID[2], *GRID[:2]) and a["latents"].dtype == torch.float32
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["latents"], c["latents"])


def no_work(model: nn.Module) -> None:
    """Make any submodule's forward fail: a check that raises after this ran before any work."""
    def refuse(*_):
        raise AssertionError("work started before the inputs were checked")
    for module in model.modules():
        module.register_forward_pre_hook(refuse)


def test_bad_sampling_inputs_are_named_before_any_work(family):
    model = tiny(family)
    no_work(model)
    labels = torch.tensor([0, 1])
    options = sample_options(family).model_fields
    bad = {name: value for name, value in BAD_OPTIONS.items() if name in options}
    assert "temperature" in bad or "stage1_temperature" in bad
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"sample.{name}"):
            model.sample(labels, **{name: value})
    for labels, message in [(torch.tensor([0, 11]), r"labels must lie in \[0, 10\]"),
                            (torch.tensor([], dtype=torch.long), "labels is empty"),
                            (torch.tensor([0.0, 1.0]), "labels must be an integer tensor"),
                            (torch.tensor([[0, 1]]), "labels must be a 1-D integer tensor")]:
        with pytest.raises(ValueError, match=message):
            model.sample(labels)
    with pytest.raises(TypeError, match="no_such_option"):
        model.sample(torch.tensor([0]), no_such_option=1)


def test_bad_training_batches_are_named_before_any_work(family):
    model = tiny(family).train()
    no_work(model)
    items, labels = dataset(family, 2)[:]
    name, kind = family.items, "an integer" if family.items == "indices" else "a float"
    with pytest.raises(ValueError, match=rf"{name} must be \[B, 8, 8, 4\].*channel count"):
        model.loss((items[..., :3], labels))
    with pytest.raises(ValueError, match=f"{name} must be {kind} tensor"):
        model.loss((items.double() if name == "indices" else items.long(), labels))
    with pytest.raises(ValueError, match=r"labels must be integers \[2\]"):
        model.loss((items, labels[:1]))


def test_config_mistakes_are_named(family, tmp_path):
    """A typo in the model or sample section, an unknown preset and a missing shape: one ConfigError each."""
    cfg = run_config(family, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown config key 'model.widht'"):
        T.check_run_config({**cfg, "model": {"preset": "tiny", "widht": 8}})
    with pytest.raises(ConfigError, match=r"unknown config key 'sample.temprature'"):
        T.check_run_config({**cfg, "sample": {"temprature": 1.0}})
    with pytest.raises(ConfigError, match=f"unknown {family.family} preset"):
        family.from_config({"preset": "huge"})
    with pytest.raises(ConfigError, match="model.grid_size, model.channels and model.num_classes are needed"):
        family.from_config({**family.presets["tiny"], "channels": None})
    run = T.check_run_config({**cfg, "sample": {"temperature": 0.5}})  # a good config passes whole
    assert run.sample == {"temperature": 0.5} and run.model["channels"] == 4
