"""Generator families: TokenBridge (discrete tokens, dimension-wise AR head). See registry.py for the seam."""
from .registry import FAMILIES, apply_preset, check_sample_options, get_family, register_family, sample_options
from .tokenbridge import TokenBridgeGenerator

__all__ = ["FAMILIES", "TokenBridgeGenerator", "apply_preset", "check_sample_options", "get_family",
           "register_family", "sample_options"]
