"""TokenBridge: discrete tokens from a pretrained continuous VAE (arXiv 2503.16430)."""
