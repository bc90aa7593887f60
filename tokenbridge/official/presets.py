"""The released models' settings that their checkpoints do not hold: sizes no tensor shape shows, the TokenBridge
channel order, the presets naming the released TokenBridge sizes, and the released sampling settings.

The presets are registered as TokenBridgeGenerator presets (``model: {preset: tokenbridge-l-official}``) when this
package is imported. They describe what `convert_tokenbridge` writes: the plain head ("ar") with the options the
released layout needs after the weight rewrites (see the table in ``tokenbridge/official/__init__.py``).
"""

from __future__ import annotations

from ..generators.tokenbridge import TokenBridgeGenerator

__all__ = ["CHANNEL_ORDER", "HEAD_NUM_HEADS", "MAR_SAMPLING", "MAR_SAMPLING_COMMON", "NUM_HEADS", "TOKENBRIDGE_PRESETS",
           "TOKENBRIDGE_SAMPLING", "TOKENBRIDGE_SAMPLING_COMMON", "released_head", "tokenbridge_preset_of"]

# backbone width -> attention heads of the released models (mar_base / large / huge, tokenbridge_large / huge)
NUM_HEADS = {768: 12, 1024: 16, 1280: 16}
HEAD_NUM_HEADS = 8  # the channel head's, in every released TokenBridge size
# the KL-16 channel order hard-coded in the released TokenBridge model (channel CHANNEL_ORDER[0] predicted first)
CHANNEL_ORDER = [8, 1, 10, 9, 6, 12, 4, 0, 3, 11, 7, 14, 2, 15, 13, 5]
_DROPOUT = {"dropout": 0.1, "attn_dropout": 0.1}  # the released models' proj_dropout and attn_dropout


def released_head(width: int, depth: int, num_heads: int = HEAD_NUM_HEADS, mlp_ratio: float = 4.0,
                  order: list[int] | None = None, first_token_timestep: bool = True) -> dict:
    """The head section of a converted TokenBridge config: the plain "ar" head with the released layout's options
    that no weight rewrite removes (exact GELU, the extra `channel_norm` as final_norm, and the sampler's
    first-input quirk as sample_start_cond)."""
    return {"kind": "ar", "width": width, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
            "order": list(CHANNEL_ORDER if order is None else order), "gelu": "exact", "final_norm": True,
            "sample_start_cond": bool(first_token_timestep), **_DROPOUT}


def _tokenbridge(width: int, depth: int, head_depth: int) -> dict:
    return {"grid_size": [16, 16], "channels": 16, "num_classes": 1000,
            "quantizer": {"levels": 64, "tails": "clamped", "arithmetic": "float32"},
            "backbone": {"width": width, "encoder_depth": depth, "decoder_depth": depth, "num_heads": NUM_HEADS[width],
                         "buffer_size": 64, "norm_eps": 1e-6, **_DROPOUT},
            "head": released_head(1024, head_depth)}


TOKENBRIDGE_PRESETS = {"tokenbridge-l-official": _tokenbridge(1024, 16, 4),
                       "tokenbridge-h-official": _tokenbridge(1280, 20, 6)}
TokenBridgeGenerator.presets.update(TOKENBRIDGE_PRESETS)

# The released samplers at every size (TokenBridge: 256 MAR steps, linear cfg on z, a step's positions to the head
# in ascending order; MAR: the same with the released last cfg step, temperature 1.0 and 100 diffusion steps) and
# the size-dependent settings of the released evaluation commands (the official READMEs).
TOKENBRIDGE_SAMPLING_COMMON = {"num_iter": 256, "cfg_schedule": "linear", "cfg_mix": "z", "sorted_positions": True}
TOKENBRIDGE_SAMPLING = {"tokenbridge-l-official": {"cfg": 3.1, "temperature": 0.96},
                        "tokenbridge-h-official": {"cfg": 3.45, "temperature": 0.91}}
MAR_SAMPLING_COMMON = {"num_iter": 256, "num_sampling_steps": 100, "cfg_schedule": "linear", "temperature": 1.0,
                       "released_cfg": True, "sorted_positions": True}
# keyed by (backbone width, diffusion head depth): MAR-B / L / H
MAR_SAMPLING = {(768, 6): {"cfg": 2.9}, (1024, 8): {"cfg": 3.0}, (1280, 12): {"cfg": 3.2}}


def tokenbridge_preset_of(width: int, head_depth: int) -> str | None:
    """The official preset of a (backbone width, head depth), None for a size that was not released."""
    for name, preset in TOKENBRIDGE_PRESETS.items():
        if (preset["backbone"]["width"], preset["head"]["depth"]) == (width, head_depth):
            return name
    return None
