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

What stays a behavioural difference: an option of the plain classes (or of their ``sample``) that converted
folders set, each with the default of this package's own models.

| option | the released code | the core default | why no weight rewrite removes it |
|---|---|---|---|
| backbone `norm_eps` | 1e-6 | 1e-5 (torch's, as the shipped generators were trained) | eps sits inside sqrt(var(x) + eps), var taken per input row: no affine map of the weights moves it |
| head `gelu` | "exact" (erf) | "tanh" | a different activation function of the pre-activation; no reparametrization of the Linears around it turns one into the other |
| head `final_norm` | on (`channel_norm`, affine, before the final non-affine LayerNorm) | off | the non-affine LayerNorm after it renormalizes g * n + b by that vector's own mean and variance, which depend on g, b and n: g, b cannot move into the modulation after it |
| head `sample_start_cond` | on: the sampler adds the first condition embedding e_0 to the first input, training does not | off | it makes the sampling path differ from the training path; a rewrite of e_0, pos_emb or z_in changes both paths |
| `sample(cfg_mix="z")` (TokenBridge) | guidance mixes the backbone's features, z_u + cfg (z_c - z_u), before one head pass | "logits": guidance on the head's logits at every channel step | a sampling rule: the head is nonlinear in z, so mixing before it is another distribution (weights are not involved) |
| `sample(released_cfg=True)` (mar, d2c) and the last step of `cfg_mix="z"` | linear cfg counts at least one masked position: the last step uses 1 + (cfg - 1)(L - 1)/L | the schedule reaches cfg at the last step | a sampling schedule, not weights |
| `sample(sorted_positions=True)` | a step's positions reach the head in ascending order | generation order | which noise lands on which position (the seeded stream), not the weights |
| diffusion head `full_batch_noise` | the noise of every step is drawn over the doubled [cond; uncond] batch, the last step too | N rows, none at the last step | the same distribution; only the random stream of a seed differs |
| quantizer `tails="clamped"` | boundaries clamped to +-std_range before the bins' means are taken (outer value 2.437 at B = 64) | "paper": open outer bins (2.510) | the quantizer's tables are computed from its config (and checked on load): they define the tokens the backbone reads, they are not weights |
| quantizer `arithmetic="float32"` | Eq. 1 in float32 as the released GPU code computes it, its float32 values, the first index on ties | "midpoints": the float64-exact nearest value | the indices differ at ties (tests/test_quantizer_released.py counts them): a different rounding of the input, not a weight |
"""

from __future__ import annotations

from .convert import convert, convert_mar, convert_tokenbridge, detect_family, load_official_state, read_checkpoint
from .layout import ConversionError

__all__ = ["ConversionError", "convert", "convert_mar", "convert_tokenbridge", "detect_family",
           "load_official_state", "read_checkpoint"]
