import gzip
import struct

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    # The models under test are tiny: on 2 shared cores, torch's thread pool costs more than it saves.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def tiny_diffusers_vae():
    """Factory: a tiny diffusers AutoencoderKL (16x16 RGB -> 4 x 8 x 8), saved as a folder; returns the model."""
    diffusers = pytest.importorskip("diffusers", reason="the diffusers wrapper needs diffusers (dev extra)")

    def make(folder, **config):
        torch.manual_seed(0)
        model = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=16, **config,
        ).eval()
        model.save_pretrained(folder)
        return model

    return make


@pytest.fixture()
def fake_fashion_mnist():
    """Factory: the four Fashion-MNIST idx .gz files with random content (24 train, 8 test images) in a folder."""

    def make(root):
        rng = np.random.default_rng(0)
        for prefix, n in (("train", 24), ("t10k", 8)):
            with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
                f.write(struct.pack(">4i", 2051, n, 28, 28) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes())
            with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
                f.write(struct.pack(">2i", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
        return root

    return make
