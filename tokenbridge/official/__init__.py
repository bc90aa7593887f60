"""Released checkpoints (TokenBridge-L/H, MAR-B/L/H) -> the plain generators of this package.

- `convert` (`convert_tokenbridge`, `convert_mar`): an official ``checkpoint-last.pth`` -> a TokenBridgeGenerator
  or ContinuousMARGenerator; ``model.save_pretrained(dir)`` writes a folder that `checkpoint.load_generator` loads
  into the same plain classes, without this package (the ``tokenbridge convert`` command does both).
- `layout`: the key mapping and the weight rewrites that make the plain modules compute the released functions.
- `presets`: what the checkpoints do not hold (attention heads, the KL-16 channel order), the presets
  ``tokenbridge-l-official`` / ``tokenbridge-h-official`` and the released sampling settings.

Folded into the weights at conversion (no option of the core modules; exact to float32 rounding, see `layout`):
the affine pre-norms of the TokenBridge channel blocks (norm1, norm2) and of MAR's diffusion blocks (`in_ln`),
which only feed an AdaLN modulation; MAR's final modulation split (shift, scale), a swap of its Linear's two
halves; the released head's single projection of z, copied into the plain head's `z_in` and `z_cond`.

What no weight rewrite removes stays an option of the plain classes (or of their ``sample``), with the default of
this package's own models; converted folders set it. The one table of these options, what the released code does,
the core default and why no rewrite removes each, is ``tokenbridge/official/README.md``.
"""

from __future__ import annotations

from .convert import convert, convert_mar, convert_tokenbridge, detect_family, load_official_state, read_checkpoint
from .layout import ConversionError

__all__ = ["ConversionError", "convert", "convert_mar", "convert_tokenbridge", "detect_family",
           "load_official_state", "read_checkpoint"]
