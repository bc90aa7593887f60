"""The sizes the families' presets share (one place each; a family's `presets` combine them with its head).

- shapes: Fashion-MNIST on the embedded f4 VAE (8x8x4 latents, 10 classes) and ImageNet 256x256 on MAR's KL-16
  VAE (16x16x16 latents, 1,000 classes);
- MAR backbones: ``tiny`` (tests), ``fmnist`` (the embedded default, 192 wide, 3+3 blocks) and MAR's base / large
  / huge sizes (``MAR_SIZES``), with the papers' dropout (``PAPER_DROPOUT``) for the ImageNet presets.
"""

from __future__ import annotations

FMNIST_SHAPES = {"grid_size": [8, 8], "channels": 4, "num_classes": 10}
IMAGENET_SHAPES = {"grid_size": [16, 16], "channels": 16, "num_classes": 1000}
PAPER_DROPOUT = {"dropout": 0.1, "attn_dropout": 0.1}

TINY_MAR = {"width": 32, "encoder_depth": 1, "decoder_depth": 1, "num_heads": 2, "buffer_size": 2}
FMNIST_MAR = {"width": 192, "encoder_depth": 3, "decoder_depth": 3, "num_heads": 4, "buffer_size": 8}
# MAR's mar_base / mar_large / mar_huge backbones (width, depth of encoder and decoder, heads)
MAR_SIZES = {
    "b": {"width": 768, "encoder_depth": 12, "decoder_depth": 12, "num_heads": 12},
    "l": {"width": 1024, "encoder_depth": 16, "decoder_depth": 16, "num_heads": 16},
    "h": {"width": 1280, "encoder_depth": 20, "decoder_depth": 20, "num_heads": 16},
}
