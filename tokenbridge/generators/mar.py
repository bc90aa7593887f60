"""ContinuousMARGenerator: MAR with a diffusion loss on the VAE's continuous latents (Li et al. 2024), the
baseline TokenBridge claims to match, and the second stage of D2C.

Training (`loss`): latents [B, H, W, C] are patchified to tokens, a random subset of positions is masked (the same
truncated-normal ratio and random order as the TokenBridge generator), the backbone gives z per position and the
diffusion head's loss is taken on the masked tokens, each drawn ``diffusion_batch_mul`` times with independent
timesteps and noise (MAR: 4; more noise draws per backbone pass make the head's gradient less noisy for little
backbone cost).

Generation (`sample`): `num_iter` MAR steps on the cosine mask schedule in a random order; at every step the head
draws the next chunk's tokens by DDPM respaced to `num_sampling_steps`, with the per-step noise scaled by
`temperature` and classifier-free guidance on the predicted noise (cond and uncond rows in one batch).

The head learns its variance (improved DDPM, as MAR): with 100 of 1,000 steps the learned interpolation between
beta and beta~ matters for sample quality, and it costs one extra output per value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import PositiveFloat, PositiveInt

from ..backbone import MAR, patchify, unpatchify
from ..config import signature_model
from ..diffusion import NUM_SAMPLING_STEPS, DiffusionHead, drop_retired_options
from .. import samplers
from ..samplers import (CfgInterval, CfgSchedule, DiffusionSampler, GuidanceScale, Sampler, SamplingSteps, StepAnneal,
                        Temperature)
from .base import make_generator
from .editing import check_known
from .masked import NUM_ITER, MaskedConfig, MaskedGenerator
from .presets import FMNIST_MAR, FMNIST_SHAPES, IMAGENET_SHAPES, MAR_SIZES, PAPER_DROPOUT, TINY_MAR
from .registry import register_family

BackboneConfig = signature_model(MAR, "MARBackboneConfig", exclude=("grid_size", "token_dim", "num_classes"))
DiffusionHeadConfig = signature_model(DiffusionHead, "DiffusionHeadConfig", exclude=("z_dim", "token_dim"))


class ContinuousMARConfig(MaskedConfig):
    """grid_size, channels and num_classes default to the training latents' (None: taken from the token file)."""

    diffusion_batch_mul: PositiveInt = 4  # MAR: noise draws per masked token per step
    backbone: BackboneConfig = BackboneConfig()
    head: DiffusionHeadConfig = DiffusionHeadConfig()


@register_family
class ContinuousMARGenerator(MaskedGenerator):
    """MAR backbone + diffusion head on continuous latent tokens.

    loss((latents [B, H, W, C] float, labels [B] long in [0, num_classes])) -> scalar diffusion loss.
    sample(labels [N]) -> dict(latents [N, C, H, W] float). Label `num_classes` means unconditional.
    """

    family = "mar"
    items = "latents"  # trains on a token cache's continuous latents (tokenbridge.tokens.LatentTokens)
    presets: dict[str, dict] = {}  # filled at the end of this module
    Config = ContinuousMARConfig

    def __init__(self, config: dict, backbone: type[MAR] = MAR, **backbone_options: Any) -> None:
        """config: a model config; backbone: the MAR class to build (D2C's stage 2: `fusion.FusedMAR`), with
        ``backbone_options`` beside the config's backbone section."""
        super().__init__(config)
        cfg = self.config
        b, p = cfg["backbone"], int(cfg["backbone"]["patch_size"])
        self.patch_size = p
        self.backbone = backbone(grid_size=self.grid_size, token_dim=self.channels * p * p,
                                 num_classes=self.num_classes, **backbone_options, **b)
        self.head = DiffusionHead(z_dim=int(b["width"]), token_dim=self.channels * p * p, **cfg["head"])
        self.seq_len = self.backbone.seq_len
        self.mask_ratio_min = float(cfg["mask_ratio_min"])
        self.diffusion_batch_mul = int(cfg["diffusion_batch_mul"])

    # ------------------------------------------------------------------ config
    @classmethod
    def recorded_config(cls, config: dict) -> dict:
        """A recorded model config (checkpoint, export, pretrained folder) with what older records leave out: a
        head without ``vb_objective`` was trained before it existed, with "nats_continuous"."""
        return {**config, "head": legacy_head(config.get("head"))}

    # ------------------------------------------------------------------ training
    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], mask_ratio: float | None = None,
             context: torch.Tensor | None = None) -> torch.Tensor:
        """Diffusion loss on the masked tokens of a batch (latents [B, H, W, C], labels [B]). mask_ratio=None
        draws it from the truncated normal (MAR training). context: the backbone's extra conditioning [B, ...]
        (D2C's stage 2 passes its fusion context; None for the plain MAR backbone)."""
        latents, labels = self.check_batch(batch)
        tokens = patchify(latents.float(), self.patch_size)  # [B, L, C*p*p]
        z, mask = self._masked_features(tokens, labels, mask_ratio, context)
        k = self.diffusion_batch_mul
        return self.head.loss(z[mask].repeat(k, 1), tokens[mask].repeat(k, 1))

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample(self, labels: torch.Tensor, num_iter: SamplingSteps = NUM_ITER, cfg: GuidanceScale | None = 1.0,
               cfg_schedule: CfgSchedule = "linear", temperature: Temperature = 1.0,
               num_sampling_steps: SamplingSteps = NUM_SAMPLING_STEPS, clip_denoised: PositiveFloat | None = None,
               released_cfg: bool = False, sorted_positions: bool = False, sampler: Sampler = samplers.DEFAULT_SAMPLER,
               cfg_interval: CfgInterval | None = samplers.PAPER.cfg_interval,
               uncond_every: PositiveInt = samplers.PAPER.uncond_every,
               num_sampling_steps_end: SamplingSteps | None = samplers.PAPER.num_sampling_steps_end,
               sampling_steps_anneal: StepAnneal = samplers.PAPER.sampling_steps_anneal,
               diffusion_sampler: DiffusionSampler = samplers.PAPER.diffusion_sampler,
               generator: torch.Generator | int | None = None, progress: bool = False,
               callback: Callable[[dict[str, torch.Tensor]], None] | None = None,
               orders: torch.Tensor | None = None, known: torch.Tensor | None = None,
               known_mask: torch.Tensor | None = None, context: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Generate latent grids for class `labels` [N] (value num_classes = unconditional).

        num_iter: MAR steps (capped at the sequence length L). num_sampling_steps: DDPM steps per token, respaced
        from the head's training steps (MAR: 100 of 1,000). temperature scales the DDPM noise (0: the mean path).
        clip_denoised: clamp the head's predicted clean token to [-clip_denoised, clip_denoised] at every DDPM step
        (None: MAR's unclipped sampler; see DiffusionHead.sample for why a briefly trained head needs it).
        released_cfg: the last step's linear cfg scale is 1 + (cfg - 1)(L - 1)/L as in MAR's released sampler
        (converted MAR checkpoints record it); False: the scale reaches cfg.
        orders: [N, L] generation orders (each row a permutation of the L token positions) in place of random ones,
        to replay a run. sorted_positions: each step's positions reach the head in ascending position order as in
        MAR's released sampler (converted checkpoints record it), so that equal seeds and orders draw the same noise
        for the same position; False (the shipped generators' default): in generation order.
        cfg None or 1.0 runs without guidance; otherwise eps = eps_u + cfg_t (eps_c - eps_u), cfg_t by
        `cfg_schedule`. generator: None (global RNG), an int seed or a torch.Generator on the model's device.
        Returns dict(latents [N, C, H, W] float). callback: called after every MAR step with the outputs so far
        plus ``step``, ``num_iter`` and ``mask`` [N, H, W] bool (True = not generated yet; those latents are 0).
        sampler, cfg_interval, uncond_every, num_sampling_steps_end, sampling_steps_anneal, diffusion_sampler: the
        sampler toolbox (tokenbridge.samplers): guidance interval, unconditional-feature reuse, diffusion steps
        annealed from num_sampling_steps to num_sampling_steps_end across the MAR steps (DiSA), DDIM (eta 0);
        sampler="paper" ignores them (the sampler before the toolbox).
        known, known_mask: editing (generators/editing.py): latents [N, C, H, W] and [N, H, W] bool (True = keep);
        the kept latents are returned unchanged, the rest is sampled.
        context: [N, ...] the backbone's extra conditioning (D2C's stage 2 passes its fusion context); None for
        the plain MAR backbone.
        """
        edit = check_known(known, known_mask, labels.shape[0], self.channels, self.grid_size, self.patch_size)
        self._check_diffusion_steps(num_sampling_steps)
        box = samplers.resolve(sampler, num_sampling_steps, cfg_interval=cfg_interval, uncond_every=uncond_every,
                               num_sampling_steps_end=num_sampling_steps_end,
                               sampling_steps_anneal=sampling_steps_anneal, diffusion_sampler=diffusion_sampler)
        # diffusion steps of each MAR step, in order (the loop calls predict once per step, over the tokens an
        # edit leaves to generate)
        todo = self.seq_len if edit is None else max(self.seq_len - int(edit[1][0].sum()), 1)
        steps = iter(samplers.diffusion_steps_schedule(min(int(num_iter), todo), int(num_sampling_steps),
                                                       box.num_sampling_steps_end, box.sampling_steps_anneal))
        device = next(self.parameters()).device
        gen = make_generator(generator, device)
        labels = labels.to(device).long()
        orders = self._check_orders(orders, labels.shape[0])

        def predict(z_sel: torch.Tensor, step_cfg: float | None, g: torch.Generator | None):
            x = self.head.sample(z_sel, num_steps=next(steps), temperature=float(temperature),
                                 cfg=step_cfg, generator=g, clip_denoised=clip_denoised, method=box.diffusion_sampler)
            return x, None

        values = torch.zeros(labels.shape[0], self.seq_len, self.backbone.token_dim, device=device)
        token_known = None
        if edit is not None:
            latents, token_known = edit[0].to(device), edit[1].to(device)
            given = patchify(latents.permute(0, 2, 3, 1), self.patch_size)
            values = torch.where(token_known[..., None], given, values)
        values, score = self._generate(labels, values, lambda v: v, predict, num_iter, cfg, cfg_schedule, True, gen,
                                       progress, callback, released_cfg=bool(released_cfg), orders=orders,
                                       sorted_positions=bool(sorted_positions), box=box, known=token_known,
                                       context=context)
        return self._outputs(values, score)

    def _check_diffusion_steps(self, num_sampling_steps: int) -> None:
        """The diffusion steps respace the head's training steps: at most that many (the one bound the signature
        cannot declare)."""
        train_steps = len(self.head.schedule)
        if num_sampling_steps > train_steps:
            raise ValueError(f"num_sampling_steps must be an integer in [1, {train_steps}], got {num_sampling_steps}")

    def _outputs(self, values: torch.Tensor, score: torch.Tensor) -> dict[str, torch.Tensor]:
        grid = unpatchify(values, self.grid_size, self.patch_size)
        return {"latents": grid.permute(0, 3, 1, 2).contiguous()}


def legacy_head(head: dict | None) -> dict:
    """A recorded diffusion-head config, retired options dropped (`drop_retired_options`); without ``vb_objective``
    it predates the option: "nats_continuous"."""
    head = drop_retired_options(head or {})
    head.setdefault("vb_objective", "nats_continuous")
    return head


# ----------------------------------------------------------------------------------------------------------------
# Presets (one place names the sizes; `model: {preset: NAME}` in a config)

# Embedded default: the TokenBridge generator's fmnist backbone with a diffusion head. ImageNet 256x256 on MAR's
# KL-16 VAE: MAR's mar_base / mar_large / mar_huge with their buffer, dropout and the diffusion heads of their
# training commands (diffloss_d x diffloss_w: 6x1024, 8x1280, 12x1536).
_PAPER = {"buffer_size": 64, **PAPER_DROPOUT}
ContinuousMARGenerator.presets.update({
    "tiny": {**FMNIST_SHAPES, "backbone": TINY_MAR, "head": {"width": 32, "depth": 1}},
    "fmnist": {**FMNIST_SHAPES, "backbone": FMNIST_MAR, "head": {"width": 128, "depth": 3}},
    "mar-b": {**IMAGENET_SHAPES, "backbone": {**MAR_SIZES["b"], **_PAPER}, "head": {"width": 1024, "depth": 6}},
    "mar-l": {**IMAGENET_SHAPES, "backbone": {**MAR_SIZES["l"], **_PAPER}, "head": {"width": 1280, "depth": 8}},
    "mar-h": {**IMAGENET_SHAPES, "backbone": {**MAR_SIZES["h"], **_PAPER}, "head": {"width": 1536, "depth": 12}},
})
