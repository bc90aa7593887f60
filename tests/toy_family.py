"""Stand-ins the trainer tests share: a generator family that lives in the tests (trained, checkpointed, resumed
and sampled through the package's trainer and sampler), its tiny run config and data, and a fake VAE."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from tokenbridge import checkpoint as C
from tokenbridge import train as T

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
