"""Generator families: TokenBridge (discrete tokens, dimension-wise AR head) and continuous MAR (diffusion head).
See registry.py for the seam and masked.py for what the MAR-style families share."""
from .mar import ContinuousMARGenerator
from .registry import FAMILIES, apply_preset, check_sample_options, get_family, register_family, sample_options
from .tokenbridge import TokenBridgeGenerator

__all__ = ["FAMILIES", "ContinuousMARGenerator", "TokenBridgeGenerator", "apply_preset", "check_sample_options",
           "get_family", "register_family", "sample_options"]
