"""D2C (Wang et al. 2025, arXiv 2503.17155): discrete tokens first, then continuous ones conditioned on them.

- ``source`` (tokenbridge.discrete, frozen): latents [B, h, w, C] -> coarse codes [B, gh, gw] in [0, K), made from
  each training image on the fly (a training-free quantizer of pooled latents, or a learned VQ);
- stage 1 (``stage1``, tokenbridge.gpt.RasterGPT): class-conditional raster GPT over the K codes, L1 = gh * gw;
- stage 2 (``stage2``, `FusedMARStage`): the continuous MAR family (masked random-order backbone + diffusion head,
  generators/mar.py) whose backbone reads the codes through a fusion module (tokenbridge.fusion, config
  ``stage2.fusion.kind``: "qformer", the paper's best, or "cross_attention").

Training (`loss`): stage-1 next-token loss on the real codes plus stage-2 diffusion loss, the sum of the stages
``train_stages`` names (one trainer, one checkpoint, one resume). Stage 2 sees the real codes with each one
replaced by a uniformly random code with probability ``stage2.corruption`` (training mode only), so that it
tolerates the errors of stage-1 samples instead of trusting every code. Random draws use the global RNG (the
trainer's resume restores it).

Sampling (`sample`): stage 1 draws codes (its own cfg / temperature / top-k / top-p), stage 2 the latents given
them (MAR steps, diffusion head, cfg on the class: both guidance halves see the same codes). `sample_stage2` takes
given codes.

Sizes (`presets`, counted): ``fmnist`` totals 2.95M parameters, like the TokenBridge ``fmnist`` preset (2.93M):
stage 1 0.66M (GPT 128 wide, 3 blocks, 256 codes of a 4x4 grid), stage 2 2.29M (MAR 144 wide, 3+3 blocks, 1.56M;
diffusion head 128 x 3, 0.35M; Q-Former of 8 queries x 1 layer, 0.34M; code embedding 0.04M). With
``fusion.kind: cross_attention`` (a layer after each of the 6 blocks, 0.50M) it is 3.12M. ``tiny``: 0.11M.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, create_model, field_validator

from ..config import ConfigError, Section, signature_model
from ..discrete import DiscreteSource, build_source
from ..fusion import CodeEmbedding, FusedMAR, build_fusion
from ..gpt import RasterGPT
from .. import samplers
from ..samplers import TOOLBOX_OPTIONS, GuidanceScale, Temperature, TopK, TopP
from .base import Generator, ShapesConfig, make_generator
from .editing import check_known
from .mar import ContinuousMARConfig, ContinuousMARGenerator, legacy_head
from .presets import FMNIST_SHAPES, TINY_MAR
from .registry import register_family

Stage1Config = signature_model(RasterGPT, "D2CStage1Config", exclude=("vocab_size", "seq_len", "num_classes"))
FusionConfig = signature_model(build_fusion, "D2CFusionConfig",
                               exclude=("width", "encoder_depth", "decoder_depth", "backbone_heads"))
_MAR_KEYS = ("mask_ratio_min", "diffusion_batch_mul", "backbone", "head")  # stage 2 = the mar family's config
_SHAPE_KEYS = ("grid_size", "channels", "num_classes")
Stage2Config = create_model(
    "D2CStage2Config", __base__=Section,
    corruption=(float, Field(default=0.1, ge=0, le=1)),  # probability of a random code in place of a real one
    fusion=(FusionConfig, FusionConfig()),
    **{k: (ContinuousMARConfig.model_fields[k].annotation, ContinuousMARConfig.model_fields[k]) for k in _MAR_KEYS},
)
# the source a config without one uses (training-free: 4 levels of each channel of 2x2-pooled latents)
DEFAULT_SOURCE = {"kind": "quantizer", "levels": 4, "pool": 2}


class D2CConfig(ShapesConfig):
    """grid_size, channels and num_classes default to the training latents'; codebook_size and code_grid are
    recorded from the source when the generator is first built (a checkpoint's must match its source)."""

    source: dict[str, Any] = DEFAULT_SOURCE  # tokenbridge.discrete.build_source config (replaced whole, not merged)
    codebook_size: PositiveInt | None = None  # K, from the source
    code_grid: tuple[PositiveInt, PositiveInt] | None = None  # (gh, gw), from the source
    train_stages: list[Literal[1, 2]] = Field(default=[1, 2], min_length=1)  # which losses `loss` sums
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()

    @field_validator("train_stages")
    @classmethod
    def _distinct(cls, stages: list[int]) -> list[int]:
        if len(set(stages)) != len(stages):
            raise ValueError(f"stages must be distinct, got {stages}")
        return sorted(stages)


def _record_source(cfg: dict[str, Any], source: DiscreteSource) -> None:
    """Fill codebook_size, code_grid and the source's full config into ``cfg``; a recorded value the source does
    not give (a checkpoint whose source changed, a VQ of another codebook) is a ConfigError."""
    found = {"codebook_size": int(source.codebook_size), "code_grid": [int(g) for g in source.grid]}
    for key, value in found.items():
        recorded = list(cfg[key]) if isinstance(cfg[key], (list, tuple)) else cfg[key]
        if recorded is not None and recorded != value:
            raise ConfigError(f"config key 'model.{key}' = {recorded} but the discrete source {cfg['source']} gives "
                              f"{value}: stage 1's vocabulary and stage 2's code embedding were built for "
                              f"{recorded}; use the source the model was trained with")
        cfg[key] = value
    cfg["source"] = source.config


def _build_source(cfg: dict[str, Any], load_weights: bool) -> DiscreteSource:
    try:
        return build_source(cfg["source"], tuple(cfg["grid_size"]), int(cfg["channels"]), load_weights=load_weights)
    except (ValueError, TypeError, OSError) as e:
        raise ConfigError(f"config key 'model.source' = {cfg['source']}: {e}") from None


class FusedMARStage(ContinuousMARGenerator):
    """Stage 2: the continuous MAR generator with a `FusedMAR` backbone and a `CodeEmbedding` of the codes.

    Not a family of its own: `conditioned_loss` / `conditioned_sample` bind the codes' context around the mar
    family's ``loss`` / ``sample`` (called bare, the backbone refuses to run without codes).
    config: the mar family's resolved model config; fusion: `build_fusion` options (kind, num_heads, ...).
    """

    def __init__(self, config: dict, fusion: dict, codebook_size: int, code_grid: tuple[int, int]) -> None:
        b = self.resolve_config(config)["backbone"]
        fuse = build_fusion(**fusion, width=int(b["width"]), encoder_depth=int(b["encoder_depth"]),
                            decoder_depth=int(b["decoder_depth"]), backbone_heads=int(b["num_heads"]))
        super().__init__(config, backbone=FusedMAR, fusion=fuse)
        self.code_embed = CodeEmbedding(codebook_size, code_grid, int(b["width"]))

    def context(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, gh, gw] -> the fusion's context (cross-attention: [N, gh*gw, W]; Q-Former: [N, Q, W])."""
        return self.backbone.fusion.condition(self.code_embed(codes))

    def features(self, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 codes: torch.Tensor) -> torch.Tensor:
        """Backbone features z [N, L, W] of tokens [N, L, C*p*p] given codes [N, gh, gw] (mask [N, L], True =
        hidden): what the diffusion head is conditioned on."""
        return self.backbone(tokens, labels, mask, context=self.context(codes))

    def conditioned_loss(self, batch: tuple[torch.Tensor, torch.Tensor], codes: torch.Tensor,
                         mask_ratio: float | None = None) -> torch.Tensor:
        """The mar family's diffusion loss on (latents [B, h, w, C], labels [B]) given codes [B, gh, gw]."""
        return self.loss(batch, mask_ratio, context=self.context(codes))

    @torch.no_grad()
    def conditioned_sample(self, labels: torch.Tensor, codes: torch.Tensor, **options: Any) -> dict[str, torch.Tensor]:
        """The mar family's ``sample(labels, **options)`` given codes [N, gh, gw]: dict(latents [N, C, h, w])."""
        return self.sample(labels, context=self.context(codes), **options)


# stage 2's sampling options: the mar family's sample() keywords (types and defaults held there, once), minus what
# D2C's sample takes itself or fills in
_STAGE2_PARAMS = [p for name, p in inspect.signature(ContinuousMARGenerator.sample).parameters.items()
                  if name not in ("self", "labels", "generator", "progress", "callback", "known", "known_mask",
                                  "context")]
STAGE2_DEFAULTS = {p.name: p.default for p in _STAGE2_PARAMS}


def _with_stage2_options(sample: Callable) -> Callable:
    """Give D2C's ``sample(..., **stage2)`` the stage-2 keywords in its signature and annotations (from the mar
    family's), so that they are sampling options like its own (validated, CLI flags, config keys)."""
    own = [p for p in inspect.signature(sample).parameters.values() if p.kind is not p.VAR_KEYWORD]
    stage2 = [p.replace(kind=p.KEYWORD_ONLY) for p in _STAGE2_PARAMS]
    sample.__signature__ = inspect.signature(sample).replace(parameters=own + stage2)
    hints = typing.get_type_hints(ContinuousMARGenerator.sample, include_extras=True)
    sample.__annotations__.update({p.name: hints[p.name] for p in _STAGE2_PARAMS})
    return sample


@register_family
class D2CGenerator(Generator):
    """Two-stage discrete-to-continuous generator (see the module docstring).

    loss((latents [B, h, w, C] float, labels [B] long in [0, num_classes])) -> scalar (sum of the trained stages).
    sample(labels [N]) -> dict(latents [N, C, h, w] float, codes [N, gh, gw] int64). Label num_classes =
    unconditional.
    """

    family = "d2c"
    items = "latents"  # trains on a token cache's continuous latents (tokenbridge.tokens.LatentTokens)
    presets: dict[str, dict] = {}  # filled at the end of this module
    Config = D2CConfig

    def __init__(self, config: dict, load_source_weights: bool = False, source: DiscreteSource | None = None) -> None:
        """config: a model config (resolved or not; shapes needed). load_source_weights: a VQ source reads its
        trained weights from its path (training start); False builds it untrained (a checkpoint's state dict
        then supplies them). source: one already built from ``config["source"]`` (check_config)."""
        super().__init__(config)
        cfg = self.config
        self.source = source if source is not None else _build_source(cfg, load_source_weights)
        _record_source(cfg, self.source)
        self.config = cfg
        self.codebook_size, self.code_grid = int(cfg["codebook_size"]), tuple(cfg["code_grid"])
        self.train_stages = tuple(cfg["train_stages"])
        self.stage1 = RasterGPT(vocab_size=self.codebook_size, seq_len=self.code_grid[0] * self.code_grid[1],
                                num_classes=self.num_classes, **cfg["stage1"])
        s2 = cfg["stage2"]
        mar_cfg = {**{k: cfg[k] for k in _SHAPE_KEYS}, **{k: s2[k] for k in _MAR_KEYS}}
        self.stage2 = FusedMARStage(mar_cfg, s2["fusion"], self.codebook_size, self.code_grid)
        self.corruption = float(s2["corruption"])

    # ------------------------------------------------------------------ config
    @classmethod
    def resolve_config(cls, config: dict, data: Any = None) -> dict:
        """Validate a model config (presets accepted). With ``data`` (a token dataset) fill grid, channels and
        classes from it and build the source (a VQ's weights read from its path) to record its codebook size,
        code grid and full config; a source that does not fit the latents or the recorded values is a
        ConfigError."""
        cfg = super().resolve_config(config, data)
        if data is not None:
            _record_source(cfg, _build_source(cfg, load_weights=True))
        return cfg

    @classmethod
    def recorded_config(cls, config: dict) -> dict:
        """A recorded model config with what older records leave out (stage 2's head: the mar family's rule)."""
        stage2 = dict(config.get("stage2") or {})
        return {**config, "stage2": {**stage2, "head": legacy_head(stage2.get("head"))}}

    @classmethod
    def meta_parts(cls, config: dict) -> tuple[dict, dict]:
        """The source is built untrained on the CPU for the trial build (its quantizer checks its tables; a VQ
        source reads only its folder's config.json)."""
        return config, {"source": _build_source(config, load_weights=False)}

    @classmethod
    def from_config(cls, config: dict, data: Any = None) -> D2CGenerator:
        """Build from a model config; with ``data`` (a token dataset) its shapes are used. A config that records
        no codebook_size was never built (a training start): a VQ source loads its trained weights from its path;
        a recorded one (checkpoint, pretrained folder) is built untrained for the state dict to fill."""
        cfg = cls.resolve_config(config, data)
        return cls(cfg, load_source_weights=data is not None or (config or {}).get("codebook_size") is None)

    # ------------------------------------------------------------------ training
    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Sum of the ``train_stages`` losses on a batch (latents [B, h, w, C], labels [B]); codes come from the
        frozen source."""
        latents, labels = self.check_batch(batch)
        codes = self.source.encode(latents)
        losses = []
        if 1 in self.train_stages:
            losses.append(self.stage1.loss(codes.flatten(1), labels))
        if 2 in self.train_stages:
            losses.append(self.stage2.conditioned_loss((latents, labels), self._corrupt(codes)))
        return torch.stack(losses).sum()

    def _corrupt(self, codes: torch.Tensor) -> torch.Tensor:
        """Each code replaced by a uniform random one with probability ``corruption`` (training mode only)."""
        if not self.training or self.corruption == 0:
            return codes
        replace = torch.rand(codes.shape, device=codes.device) < self.corruption
        return torch.where(replace, torch.randint_like(codes, self.codebook_size), codes)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    @_with_stage2_options
    def sample(self, labels: torch.Tensor, stage1_cfg: GuidanceScale = 1.0, stage1_temperature: Temperature = 1.0,
               stage1_top_k: TopK = 0, stage1_top_p: TopP = 1.0, generator: torch.Generator | int | None = None,
               progress: bool = False, callback: Callable[[dict[str, torch.Tensor]], None] | None = None,
               known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               **stage2: Any) -> dict[str, torch.Tensor]:
        """Generate for class ``labels`` [N]: stage-1 codes, then stage-2 latents given them.

        stage1_*: the GPT's guidance scale (constant), temperature (0 = greedy), top-k (0 = off) and nucleus
        (1 = off). stage2: the mar family's sampling options (num_iter, cfg, cfg_schedule, temperature,
        num_sampling_steps, clip_denoised, released_cfg, sorted_positions, orders and the sampler toolbox's;
        their types and defaults are `ContinuousMARGenerator.sample`'s, which this signature lists).
        generator: None (global RNG), an int seed or a torch.Generator on the model's device; both stages
        draw from it. Returns dict(latents [N, C, h, w] float, codes [N, gh, gw] int64); callback as the mar
        family's (after every stage-2 step), with the codes added.
        known, known_mask: editing (generators/editing.py): latents [N, C, h, w] and [N, h, w] bool (True = keep).
        Stage 1 is a raster GPT: the code of every cell wholly inside the kept region is forced to the source's
        code of the kept latents (`known_codes`) and the other codes are drawn in raster order, each seeing the
        forced codes before it but not those after it. Stage 2 keeps the kept latents as the mar family does.
        """
        stage2 = {**STAGE2_DEFAULTS, **stage2}
        self._check_stage2_options(labels, stage2)  # before stage 1 runs
        s2 = self.stage2
        edit = check_known(known, known_mask, labels.shape[0], s2.channels, s2.grid_size, s2.patch_size)
        device = next(self.parameters()).device
        gen = make_generator(generator, device)
        forced, keep = {}, None
        if edit is not None:
            known, keep = edit[0].to(device), known_mask.to(device)
            given, cells = self.known_codes(known, keep)
            if bool(keep.all()):  # nothing to generate
                return {"latents": known, "codes": given}
            forced = {"known": given.flatten(1), "known_mask": cells.flatten(1)}
        codes = self.stage1.sample(labels.to(device), generator=gen, cfg=float(stage1_cfg),
                                   temperature=float(stage1_temperature), top_k=int(stage1_top_k),
                                   top_p=float(stage1_top_p), progress=progress, **forced)
        codes = codes.reshape(labels.shape[0], *self.code_grid)
        return self.sample_stage2(labels, codes, generator=gen, progress=progress, callback=callback, known=known,
                                  known_mask=keep, **stage2)

    @torch.no_grad()
    def known_codes(self, known: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's codes of kept latents: (codes [N, gh, gw] int64, cell_known [N, gh, gw] bool).

        known [N, C, h, w], keep [N, h, w] bool. Latents outside the kept region are set to 0 (the prior mean)
        before encoding, so that no code depends on what is being regenerated (a learned VQ sees past its cell);
        a cell counts as known only when every latent under it is kept."""
        (gh, gw), (h, w) = self.code_grid, keep.shape[1:]
        codes = self.source.encode((known * keep[:, None]).permute(0, 2, 3, 1).contiguous())
        cells = keep.reshape(keep.shape[0], gh, h // gh, gw, w // gw).all(4).all(2)
        return codes, cells

    @torch.no_grad()
    def sample_stage2(self, labels: torch.Tensor, codes: torch.Tensor, generator: torch.Generator | int | None = None,
                      progress: bool = False, callback: Callable[[dict[str, torch.Tensor]], None] | None = None,
                      known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                      **options: Any) -> dict[str, torch.Tensor]:
        """Stage 2 alone for labels [N] and given codes [N, gh, gw] in [0, codebook_size); options: `sample`'s
        stage-2 options (unset ones take `sample`'s defaults). known, known_mask: the region to keep, as the mar
        family's. Returns dict(latents [N, C, h, w], codes)."""
        unknown = sorted(set(options) - set(STAGE2_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown stage-2 sampling options {unknown}; known: {sorted(STAGE2_DEFAULTS)}")
        self.check_labels(labels)
        self._check_codes(codes, labels.shape[0])
        device = next(self.parameters()).device
        codes = codes.to(device).long()
        gen = make_generator(generator, device)
        hook = None if callback is None else (lambda out: callback({**out, "codes": codes}))
        out = self.stage2.conditioned_sample(labels, codes, generator=gen, progress=progress, callback=hook,
                                             known=known, known_mask=known_mask, **options)
        return {**out, "codes": codes}

    def _check_stage2_options(self, labels: torch.Tensor, options: dict[str, Any]) -> None:
        """What the mar family's sample checks beyond its signature's types, checked before stage 1 runs."""
        self.stage2._check_diffusion_steps(options["num_sampling_steps"])
        self.stage2._check_orders(options["orders"], labels.shape[0])
        samplers.resolve(options["sampler"], options["num_sampling_steps"],
                         **{k: options[k] for k in TOOLBOX_OPTIONS[1:]})

    def _check_codes(self, codes: torch.Tensor, n: int) -> None:
        gh, gw = self.code_grid
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor [N, {gh}, {gw}], got {getattr(codes, 'dtype', codes)}")
        if tuple(codes.shape) != (n, gh, gw):
            raise ValueError(f"codes must be [N={n}, {gh}, {gw}] (this model's discrete grid), got shape "
                             f"{tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, codebook_size={self.codebook_size}), got range "
                             f"[{int(codes.min())}, {int(codes.max())}]: codes of another source or codebook?")


# ----------------------------------------------------------------------------------------------------------------
# Presets (one place names the sizes; `model: {preset: NAME}` in a config). The source is left to the config's
# default (DEFAULT_SOURCE): presets merge key by key, and a VQ source must be able to replace it whole.
D2CGenerator.presets.update({
    "tiny": {**FMNIST_SHAPES,
             "stage1": {"width": 32, "depth": 1, "num_heads": 2},
             "stage2": {"backbone": TINY_MAR,
                        "head": {"width": 32, "depth": 1}, "fusion": {"num_queries": 4, "depth": 1}}},
    "fmnist": {**FMNIST_SHAPES,
               "stage1": {"width": 128, "depth": 3, "num_heads": 4},
               "stage2": {"backbone": {"width": 144, "encoder_depth": 3, "decoder_depth": 3, "num_heads": 4,
                                       "buffer_size": 8},
                          "head": {"width": 128, "depth": 3}, "fusion": {"num_queries": 8, "depth": 1}}},
})
