"""Generator families: TokenBridge (discrete tokens, dimension-wise AR head), continuous MAR (diffusion head),
D2C (discrete codes, then continuous MAR conditioned on them) and TokenBridge on a causal raster backbone.
See registry.py for the seam and masked.py for what the MAR-style families share."""
from .d2c import D2CGenerator
from .mar import ContinuousMARGenerator
from .registry import FAMILIES, apply_preset, check_sample_options, get_family, register_family, sample_options
from .tokenbridge import TokenBridgeGenerator
from .causal import CausalTokenBridgeGenerator  # last: the CLI types an option by its first family

__all__ = ["FAMILIES", "CausalTokenBridgeGenerator", "ContinuousMARGenerator", "D2CGenerator",
           "TokenBridgeGenerator", "apply_preset", "check_sample_options", "get_family", "register_family",
           "sample_options"]
