"""Generator families: TokenBridge (discrete tokens, dimension-wise AR head), continuous MAR (diffusion head) and
D2C (discrete codes, then continuous MAR conditioned on them).
See registry.py for the seam and masked.py for what the MAR-style families share."""
from .causal import CausalTokenBridgeGenerator
from .d2c import D2CGenerator
from .mar import ContinuousMARGenerator
from .registry import FAMILIES, apply_preset, check_sample_options, get_family, register_family, sample_options
from .tokenbridge import TokenBridgeGenerator

__all__ = ["FAMILIES", "CausalTokenBridgeGenerator", "ContinuousMARGenerator", "D2CGenerator",
           "TokenBridgeGenerator", "apply_preset", "check_sample_options", "get_family", "register_family", "sample_options"]
