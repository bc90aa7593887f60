"""Generator families: TokenBridge (discrete tokens, dimension-wise AR head), continuous MAR (diffusion head),
D2C (discrete codes, then continuous MAR conditioned on them) and TokenBridge on a causal raster backbone.
See base.py for the contract every family fulfils, registry.py for the lookup, and masked.py for what the MAR-style families share."""
from .base import Generator, apply_preset, sample_options
from .d2c import D2CGenerator
from .mar import ContinuousMARGenerator
from .registry import FAMILIES, check_sample_options, get_family, register_family
from .tokenbridge import TokenBridgeGenerator
from .causal import CausalTokenBridgeGenerator  # last: the CLI types an option by its first family

__all__ = ["FAMILIES", "CausalTokenBridgeGenerator", "ContinuousMARGenerator", "D2CGenerator", "Generator",
           "TokenBridgeGenerator", "apply_preset", "check_sample_options", "get_family", "register_family",
           "sample_options"]
