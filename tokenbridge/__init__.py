"""TokenBridge: discrete tokens from a pretrained continuous VAE (arXiv 2503.16430)."""
from .ordering import frequency_channel_order
from .quantizer import DimensionwiseQuantizer

__all__ = ["DimensionwiseQuantizer", "frequency_channel_order"]
__version__ = "0.1.0"
